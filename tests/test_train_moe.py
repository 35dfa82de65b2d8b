"""MoE MLPs through the ZeRO trainer end to end (train/main.py in this process): the expert counts reach
TensorBoard (moe/*), the step's FLOPs count the slots each expert ran, the HF export keeps the experts, and a
resume with another `model.moe` is refused like another MoD plan."""

from __future__ import annotations

import math

import pytest

from tests.train_helpers import main_here, main_in_this_process, read_metrics, release_process_group

MOE = '{layers: "2-3", num_experts: 4, top_k: 2, router: task, capacity_factor: 1.25}'


@pytest.fixture()
def in_process():
    """`train.main.main` in this process (train_helpers.main_in_this_process)."""
    with main_in_this_process():
        yield


def _main(dataset, out, **kw) -> int:
    return main_here(dataset, out, **kw)


def _spy_forward(monkeypatch) -> list[dict]:
    """Every training forward's inputs and expert counts, as the model returned them."""
    from model.transformer import UnifiedTransformer

    real, seen = UnifiedTransformer.forward, []

    def spy(self, input_ids, task_ids=None, position_ids=None, routing=None, labels=None):
        out = real(self, input_ids, task_ids=task_ids, position_ids=position_ids, routing=routing, labels=labels)
        if labels is not None:
            seen.append(dict(input_ids=input_ids.detach().cpu(), task_ids=task_ids.detach().cpu(),
                             position_ids=position_ids.detach().cpu(), experts=out.experts.detach().cpu()))
        return out

    monkeypatch.setattr(UnifiedTransformer, "forward", spy)
    return seen


def test_moe_zero0_run_logs_experts_counts_exact_flops_exports_and_refuses_another_top_k(
        in_process, demo_dataset, tmp_path, monkeypatch):
    from model import UnifiedTransformer
    from model.flops import describe_microbatch, microbatch_flops, step_flops
    from model.moe import MoEMLP
    from train.config import RunConfig

    seen = _spy_forward(monkeypatch)
    out = tmp_path / "run"
    accum, steps = 2, 4
    assert _main(demo_dataset, out, model__moe=MOE, run__max_steps=steps, optim__grad_accum=accum,
                 logging__log_every=1, logging__eval_at_end="false", checkpoint__export_hf="true",
                 checkpoint__save_every=steps) == 0
    cfg = RunConfig.load(out / "config.yaml")
    E, layers = cfg.model.moe.num_experts, cfg.model.moe.layers
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(records) == list(range(1, steps + 1)) and len(seen) == steps * accum  # no skipped micro-batch
    any_dropped = False
    for step, r in records.items():
        mbs = seen[(step - 1) * accum:step * accum]
        counts = sum(m["experts"].double() for m in mbs)  # [L, T, E, 2]
        tasks = {cfg.model.mod.tasks[int(m["task_ids"][0])] for m in mbs}
        # moe/*: each expert's share of the task's slots, the dropped share, the busiest expert's share x E.
        for task in cfg.model.mod.tasks:
            t = cfg.model.mod.tasks.index(task)
            for layer in layers:
                tag = f"moe/max_load/{task}/layer_{layer}"
                if task not in tasks:
                    assert tag not in r, (step, tag)
                    continue
                routed, dropped = counts[layer, t, :, 0], counts[layer, t, :, 1]
                shares = [r[f"moe/load/{task}/layer_{layer}/expert_{e}"] for e in range(E)]
                assert shares == pytest.approx((routed / routed.sum()).tolist(), rel=1e-9), (step, task, layer)
                assert sum(shares) == pytest.approx(1.0)
                assert r[tag] == pytest.approx(max(shares) * E, rel=1e-9) and 1.0 <= r[tag] <= E
                assert r[f"moe/dropped/{task}/layer_{layer}"] == pytest.approx(float(dropped.sum() / routed.sum()))
                any_dropped |= bool(dropped.sum() > 0)
        assert r["moe/balance_loss"] > 0 and r["moe/balance_loss"] < r["mod/aux_loss"] + 1e-12, step
        # flops/actual_per_step: recounted from the forward's own counts, slots = routed - dropped per expert.
        rows = [describe_microbatch(m["input_ids"], m["position_ids"], m["task_ids"], cfg.model) for m in mbs]
        want = 0
        for m, rows_m in zip(mbs, rows):
            run_LE = (m["experts"][..., 0] - m["experts"][..., 1]).sum(1)
            slots = {layer: [int(v) for v in run_LE[layer, :E].round()] for layer in layers}
            want += microbatch_flops(cfg.model, rows_m, train=True, recompute=cfg.parallel.activation_checkpointing,
                                     expert_slots=slots).total
        assert r["flops/actual_per_step"] == want, step
        assert r["flops/dense_per_step"] == step_flops(cfg.model, rows).dense, step  # experts counted as dense MLPs
    assert any_dropped, "capacity_factor 1.25 with a zero-init router drops slots: the test would not see them"
    nominal = step_flops(cfg.model, [describe_microbatch(m["input_ids"], m["position_ids"], m["task_ids"],
                                                         cfg.model) for m in seen[-accum:]]).actual
    assert records[steps]["flops/actual_per_step"] < nominal  # k slots per token would overcount dropped slots

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = set(acc.Tags()["scalars"])
    assert "moe/balance_loss" in tb and any(t.startswith("moe/load/") for t in tb)
    assert {k for k in records[steps] if k.startswith("moe/")} <= tb

    net = UnifiedTransformer.from_hf(out / "hf")
    assert net.config.moe.layers == layers and net.config.moe.top_k == 2
    for layer in range(cfg.model.num_hidden_layers):
        assert isinstance(net.model.layers[layer].mlp, MoEMLP) == (layer in layers), layer

    # A resume must not change how tokens are routed to experts unless accepted (train/fingerprint.py).
    release_process_group()
    rc = _main(demo_dataset, out, model__moe=MOE.replace("top_k: 2", "top_k: 1"), run__max_steps=steps + 2,
               optim__grad_accum=accum, logging__eval_at_end="false")
    assert rc == 2
    assert len(seen) == steps * accum  # refused before any training forward


def test_moe_zero3_two_processes_train_and_export(demo_dataset, tmp_path):
    """ZeRO-3 over 2 ranks with MoE layers converted from a dense checkpoint at the start: rank 0 computes the
    calibration importance and rank 1 reads it (train/moe_init.py), every rank reduces every expert's gradient
    even when its tokens chose only some experts (idle experts run on zero rows, model/moe.py), the loss stays
    finite and the HF export gathered from the shards rebuilds the MoE layers, cut by that importance."""
    import torch
    from safetensors.torch import load_file

    from model import UnifiedTransformer
    from model.hf import MOE_FILE
    from model.moe import MoEMLP, snake_partition
    from tests.train_helpers import SMOKE, child_env, deepspeed_cmd, overrides, run, settings, summary
    from train.config import RunConfig
    from train.moe_init import IMPORTANCE_FILE

    out = tmp_path / "run"
    torch.manual_seed(7)
    UnifiedTransformer(RunConfig.load(SMOKE, settings(demo_dataset, out)).model).save_hf(tmp_path / "dense_hf")
    # top_k 1 of 8 experts on 2-row micro-batches: some expert gets no slot on some rank in most steps.
    moe = '{layers: "1-2", num_experts: 8, top_k: 1, router: task, capacity_factor: 1.0}'
    done = run(lambda port: deepspeed_cmd(overrides(demo_dataset, out, model__moe=moe, run__max_steps=6,
                                                    checkpoint__export_hf="true",
                                                    checkpoint__init_from_hf=tmp_path / "dense_hf",
                                                    checkpoint__moe_calibration_samples=4), port=port),
               child_env(), tmp_path / "zero3_moe.log")
    assert done.rc == 0, done.explain()
    assert "ZeRO stage 3" in done.output, done.explain()
    s = summary(out)
    assert s["status"] == "completed" and s["steps"] == 6, s
    records = read_metrics(out / "metrics.jsonl")
    assert all(math.isfinite(r["loss/total"]) for r in records if "loss/total" in r)
    assert any(k.startswith("moe/load/") for r in records for k in r), records[-1].keys()
    net = UnifiedTransformer.from_hf(out / "hf")
    assert [i for i, layer in enumerate(net.model.layers) if isinstance(layer.mlp, MoEMLP)] == [1, 2]
    importance = load_file(str(out / IMPORTANCE_FILE))["importance"]
    saved = load_file(str(out / "hf" / MOE_FILE))
    for i in (1, 2):
        assert not torch.equal(saved[f"model.layers.{i}.mlp.expert_neurons"], torch.arange(176).view(8, 22))
        assert torch.equal(saved[f"model.layers.{i}.mlp.expert_neurons"], torch.stack(snake_partition(importance[i], 8)))


def test_moe_run_resumes_exactly(in_process, demo_dataset, tmp_path):
    """An MoE run (with a shared expert) stopped after 2 of 4 steps and resumed continues as the uninterrupted run
    does: the same
    losses, balance losses and expert loads at steps 3-4 (the routers, experts and their optimizer state come
    back from the checkpoint; the conversion's importance file is reused, not recomputed)."""
    import torch

    from model import UnifiedTransformer
    from tests.train_helpers import SMOKE, settings
    from train.config import RunConfig
    from train.moe_init import IMPORTANCE_FILE

    torch.manual_seed(11)
    dense = tmp_path / "dense_hf"
    UnifiedTransformer(RunConfig.load(SMOKE, settings(demo_dataset, tmp_path)).model).save_hf(dense)
    # A constant LR, so that the schedule does not depend on run.max_steps, which the resume raises.
    # Shared experts too: the most important neurons in expert 0, which every token runs.
    moe = '{layers: "2-3", num_experts: 4, top_k: 1, shared_experts: 1, router: task, capacity_factor: 1.25}'
    common = dict(model__moe=moe, checkpoint__init_from_hf=dense, checkpoint__moe_calibration_samples=4,
                  logging__log_every=1, logging__eval_at_end="false", optim__warmup_steps=0,
                  optim__min_lr_ratio=1.0, checkpoint__accept_changes="[run.max_steps]")
    assert _main(demo_dataset, tmp_path / "straight", run__max_steps=4, **common) == 0
    release_process_group()
    out = tmp_path / "resumed"
    assert _main(demo_dataset, out, run__max_steps=2, checkpoint__save_every=2, **common) == 0
    stamp = (out / IMPORTANCE_FILE).stat().st_mtime_ns
    release_process_group()
    assert _main(demo_dataset, out, run__max_steps=4, **common) == 0
    assert (out / IMPORTANCE_FILE).stat().st_mtime_ns == stamp
    want = {r["step"]: r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl")}
    got = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        keys = [k for k in want[step] if k.startswith(("loss/", "moe/")) or k == "optim/grad_norm"]
        assert any(k.startswith("moe/load/") for k in keys)
        for k in keys:
            assert got[step][k] == pytest.approx(want[step][k], rel=1e-6, abs=1e-9), (step, k)
