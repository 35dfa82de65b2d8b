"""One-process training runs on CPU (fp32, debug preset, demo data): the smoke run, its TensorBoard scalars and
FLOPs, its HF export; checkpoints under SIGTERM, SIGUSR1 and SIGKILL with exact resume; non-finite losses.

Runs are subprocesses of `train/main.py` (as a user starts them), shared between tests by module fixtures.
The non-finite-loss tests run `train.main.main` in-process with `UnifiedTransformer.head_loss` (the loss the ZeRO
engine reads as `out.loss`) patched, so production carries no test-only switch.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from tests.train_helpers import (MAIN, assert_hf_export_loads, child_env, complete_checkpoints, finish, kill_group,
                                 latest, losses, main_here, main_in_this_process, read_metrics, run, settings,
                                 single_cmd, start, summary, wait_for_step)

SMOKE_LIMIT_S = 120  # the issue: the first run a user makes finishes in under 2 minutes on 2 CPU cores


# ----- the smoke run -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(demo_dataset, tmp_path_factory):
    """`python train/main.py --smoke` as shipped, pointed at tmp dirs, with a peak FLOP/s so MFU is logged.
    No MASTER_PORT (child_env's default): a lone process must find its own port."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    cmd = [sys.executable, str(MAIN), "--smoke", "--set", f"data.dataset_dir={demo_dataset}",
           "--set", f"run.output_dir={out}", "--set", "logging.peak_tflops=1.0",
           "--set", "logging.progress_bar=false"]
    result = run(cmd, child_env(threads=None), out.parent / "smoke.log", timeout=300)
    print(f"\n[smoke] python train/main.py --smoke: exit {result.rc} in {result.wall_s:.1f} s wall")
    return out, result


def test_smoke_exits_0_fast_and_learns(smoke):
    out, result = smoke
    assert result.rc == 0, result.explain()
    assert result.wall_s < SMOKE_LIMIT_S, f"smoke took {result.wall_s:.1f} s (limit {SMOKE_LIMIT_S})"
    s = summary(out)
    assert s["status"] == "completed" and s["steps"] == 30 and s["world_size"] == 1, s
    assert s["loss_final"] < s["loss_first"] - 0.5, s
    # FLOPs against the padding-free dense baseline: test_flops_scalars_equal_the_flops_model checks the numbers
    # (the sign depends on the data: packed short samples pay S x S masked attention in the dense layers).
    assert math.isfinite(s["mod_flops_saved_pct"]) and 0 <= s["pad_pct"] < 100, s
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "hf", "tensorboard"):
        assert (out / name).exists(), name
    assert latest(out) == "step_00000030" and complete_checkpoints(out) == ["step_00000015", "step_00000030"]


def _scalars(out: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tensorboard_has_every_tag(smoke):
    out, result = smoke
    assert result.rc == 0, result.explain()
    from train.config import RunConfig

    cfg = RunConfig.load(out / "config.yaml")
    tb = _scalars(out)
    steps = set(range(1, 31))
    tasks_seen = [t for t in cfg.model.mod.tasks if f"loss/{t}" in tb]
    assert {"t2i", "mmu"} <= set(tasks_seen), sorted(tb)
    required = ["loss/total", "optim/lr", "optim/grad_norm", "throughput/tokens_per_s", "throughput/samples_per_s",
                "throughput/tflops_per_device", "throughput/mfu_pct", "flops/actual_per_step",
                "flops/dense_per_step", "flops/mod_saved_pct", "data/pad_pct", "throughput/real_tokens_per_s",
                "mod/aux_loss", "time/step_s", "time/data_pct", "data/skipped_samples",
                "data/captions_dropped"] + [f"loss/{t}" for t in tasks_seen]
    required += [f"mod/capacity/{t}/layer_{i}" for t in tasks_seen for i in cfg.model.mod.mod_layers()
                 if cfg.model.mod.capacity_of(i, t) < 1.0]
    missing = [t for t in required if t not in tb]
    assert not missing, f"missing tags {missing}; have {sorted(tb)}"
    assert any(t.startswith("memory/") for t in tb), sorted(tb)
    for tag in required:
        if not tag.startswith(("loss/t2i", "loss/mmu", "loss/lm", "mod/capacity/")):
            assert set(tb[tag]) == steps, f"{tag} logged at steps {sorted(tb[tag])}"
    # Every step's task loss is the total minus the aux loss (one task-homogeneous micro-batch per step).
    for step in steps:
        per_task = [tb[f"loss/{t}"][step] for t in tasks_seen if step in tb[f"loss/{t}"]]
        assert len(per_task) == 1, (step, per_task)
        assert per_task[0] + tb["mod/aux_loss"][step] == pytest.approx(tb["loss/total"][step], rel=1e-5)
    for tag in [t for t in required if t.startswith("mod/capacity/")]:
        assert all(0.0 < v <= 0.5 for v in tb[tag].values()), (tag, tb[tag])  # planned 0.25 of image tokens
    dropped = [tb["data/captions_dropped"][s] for s in sorted(steps)]
    assert dropped == sorted(dropped) and dropped[-1] > 0, dropped  # smoke.yaml: data.caption_dropout 0.2
    lrs = [tb["optim/lr"][s] for s in sorted(steps)]
    assert max(lrs) == pytest.approx(cfg.optim.lr, rel=0.05) and lrs[0] < lrs[cfg.optim.warmup_steps - 1]
    assert all(v > 0 and math.isfinite(v) for v in tb["optim/grad_norm"].values())


def test_flops_scalars_equal_the_flops_model(smoke):
    """flops/*, data/pad_pct and the rates derived from them are model.flops of the micro-batches that step
    trained on: the run's loader rebuilt from its config.yaml yields them again (same seed, one rank), and
    each is described and counted independently of the trainer's bookkeeping."""
    out, result = smoke
    assert result.rc == 0, result.explain()
    from data.loader import UnimodLoader
    from model.flops import describe_microbatch, microbatch_flops, step_flops
    from train.config import RunConfig

    cfg = RunConfig.load(out / "config.yaml")
    B, S, accum = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.optim.grad_accum
    tb = _scalars(out)
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(records) == list(range(1, 31))
    loader = UnimodLoader(cfg.data, tasks=cfg.model.mod.tasks, rank=0, world_size=1, layout=cfg.model.vocab)

    def batches():
        while True:
            yield from loader

    it = batches()
    saved_any = padded_any = False
    total_actual = total_dense = total_tokens = total_real = 0
    for step in range(1, 31):
        r = records[step]
        mbs = [next(it) for _ in range(accum)]
        (task,) = [t for t in cfg.model.mod.tasks if f"loss/{t}" in r]
        assert all(cfg.model.mod.tasks[int(b["task_ids"][0])] == task for b in mbs), (step, task)
        rows = [describe_microbatch(b["input_ids"], b["position_ids"], b["task_ids"], cfg.model) for b in mbs]
        want = step_flops(cfg.model, rows)
        real = sum(int((b["input_ids"] != cfg.model.vocab.pad_id).sum()) for b in mbs)
        assert want.tokens == accum * B * S and want.real_tokens == real, step
        assert r["flops/actual_per_step"] == want.actual and r["flops/dense_per_step"] == want.dense, (step, task)
        assert r["flops/mod_saved_pct"] == pytest.approx(want.saved_pct, rel=1e-12)
        assert r["data/pad_pct"] == pytest.approx(100 * (1 - real / (accum * B * S)), rel=1e-12)
        assert tb["flops/actual_per_step"][step] == pytest.approx(want.actual, rel=1e-6)  # TB keeps float32
        assert tb["flops/dense_per_step"][step] == pytest.approx(want.dense, rel=1e-6)
        assert tb["flops/mod_saved_pct"][step] == pytest.approx(want.saved_pct, rel=1e-5)
        assert tb["data/pad_pct"][step] == pytest.approx(r["data/pad_pct"], rel=1e-5)
        step_s = r["time/step_s"]
        assert r["throughput/tokens_per_s"] == pytest.approx(accum * B * S / step_s, rel=1e-9)
        assert r["throughput/real_tokens_per_s"] == pytest.approx(real / step_s, rel=1e-9)
        assert r["throughput/samples_per_s"] == pytest.approx(accum * B / step_s, rel=1e-9)
        assert r["throughput/tflops_per_device"] == pytest.approx(want.actual / step_s / 1e12, rel=1e-9)
        assert r["throughput/mfu_pct"] == pytest.approx(100 * want.actual / step_s / 1e12, rel=1e-9)
        # MoD skipped work: the same rows with every layer dense would have cost more.
        saved_any |= want.actual < sum(microbatch_flops(cfg.model, mb, dense=True).total for mb in rows)
        padded_any |= real < accum * B * S
        total_actual, total_dense = total_actual + want.actual, total_dense + want.dense
        total_tokens, total_real = total_tokens + want.tokens, total_real + real
    assert saved_any  # image-task steps ran their MoD layers on a quarter of the image codes
    assert padded_any  # image rows hold one sample each: padding is there, and counted apart
    s = summary(out)
    assert (s["flops_actual"], s["flops_dense"], s["tokens"], s["real_tokens"]) == \
        (total_actual, total_dense, total_tokens, total_real)
    assert s["mod_flops_saved_pct"] == pytest.approx(100 * (1 - total_actual / total_dense), rel=1e-12)
    assert s["pad_pct"] == pytest.approx(100 * (1 - total_real / total_tokens), rel=1e-12)


def test_smoke_hf_export_loads_in_both_libraries(smoke):
    out, result = smoke
    assert result.rc == 0, result.explain()
    assert_hf_export_loads(out / "hf")


# ----- stop signals, SIGKILL, crash mid-save, exact resume ----------------------------------------------------
CHAIN = dict(run__max_steps=12, data__num_workers=1, checkpoint__keep_last=2)


@pytest.fixture(scope="module")
def reference(demo_dataset, tmp_path_factory):
    """The uninterrupted run: per-step losses, no checkpoint until the end."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = run(single_cmd(_sets(demo_dataset, out, checkpoint__save_every=0)), child_env(), out.parent / "log")
    assert result.rc == 0, result.explain()
    return losses(out / "metrics.jsonl")


def _sets(dataset, out, **kw):
    items = settings(dataset, out, **{**CHAIN, **kw})
    return [a for item in items for a in ("--set", item)]


@pytest.fixture(scope="module")
def interrupted(demo_dataset, tmp_path_factory):
    """The same run, interrupted three times in one output dir: SIGTERM after step 2 appears, then (resumed)
    SIGUSR1, then (resumed) SIGKILL of the whole process group once a checkpoint after the SIGUSR1 one is
    complete; then an incomplete step directory is planted (a crash mid-save) and the run resumes to the end."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    metrics = out / "metrics.jsonl"
    cmd = single_cmd(_sets(demo_dataset, out, checkpoint__save_every=2))
    stages = {}

    def stage(name, until_step, sig, group=False):
        proc = start(cmd, child_env(), out.parent / f"{name}.log")
        try:
            wait_for_step(proc, metrics, until_step)
            if group:
                kill_group(proc, sig)
            else:
                os.kill(proc.pid, sig)  # the trainer only; its loader worker is its own business
        except BaseException:
            kill_group(proc)
            raise
        result = finish(proc, timeout=120)
        stages[name] = {"result": result, "summary": summary(out), "latest": latest(out),
                        "complete": complete_checkpoints(out), "steps": sorted(losses(metrics))}
        return stages[name]

    s1 = stage("sigterm", 2, signal.SIGTERM)["summary"]["steps"]
    s2 = stage("sigusr1", s1 + 1, signal.SIGUSR1)["summary"]["steps"]
    even = s2 + 1 if (s2 + 1) % 2 == 0 else s2 + 2  # the next periodic checkpoint after s2
    stages["kill_after"] = even
    stage("sigkill", even + 1, signal.SIGKILL, group=True)
    # A crash while saving the final step: its directory exists without COMPLETE and nothing points at it.
    stale = out / "checkpoints" / "step_00000012"
    stale.mkdir(exist_ok=True)
    (stale / "half_written.pt").write_bytes(b"\x00" * 100)
    stages["latest_before_final"] = latest(out)
    proc = start(cmd, child_env(), out.parent / "final.log")
    stages["final"] = {"result": finish(proc, timeout=120), "summary": summary(out), "latest": latest(out),
                       "complete": complete_checkpoints(out)}
    stages["losses"] = losses(metrics)
    stages["records"] = read_metrics(metrics)
    stages["out"] = out
    return stages


def test_sigterm_checkpoints_and_exits_75(interrupted):
    st = interrupted["sigterm"]
    r, s = st["result"], st["summary"]
    assert r.rc == 75, r.explain()
    assert s["status"] == "preempted" and s["steps"] >= 2, s
    tag = f"step_{s['steps']:08d}"
    assert st["latest"] == tag and tag in st["complete"], st
    assert st["steps"] == list(range(1, s["steps"] + 1))  # it stopped at the step it checkpointed
    # At a step boundary, or while step 2's periodic checkpoint was written (then that one is used as is).
    assert re.search(rf"stop signal received(: checkpointing at step| while checkpointing step) {s['steps']}\b",
                     r.output), r.explain()


def test_sigusr1_checkpoints_and_resume_continues(interrupted):
    s1 = interrupted["sigterm"]["summary"]["steps"]
    st = interrupted["sigusr1"]
    r, s = st["result"], st["summary"]
    assert r.rc == 75, r.explain()
    assert f"resumed from {interrupted['out'] / 'checkpoints' / f'step_{s1:08d}'} at step {s1}" in r.output
    assert s["status"] == "preempted" and s["steps"] > s1 and s["steps_this_run"] == s["steps"] - s1, s
    assert st["latest"] == f"step_{s['steps']:08d}" and st["latest"] in st["complete"]
    assert st["steps"] == list(range(1, s["steps"] + 1))  # metrics.jsonl continued, no step twice


def test_sigkill_then_resume_ignores_incomplete_checkpoint(interrupted):
    kill = interrupted["sigkill"]
    assert kill["result"].rc == -signal.SIGKILL, kill["result"].explain()
    resumed_at = int(interrupted["latest_before_final"].removeprefix("step_"))
    assert resumed_at >= interrupted["kill_after"]  # the checkpoint before the step it saw was complete
    fin = interrupted["final"]
    r = fin["result"]
    assert r.rc == 0, r.explain()
    assert f"at step {resumed_at}" in r.output and "step_00000012 at step" not in r.output, r.explain()
    assert fin["summary"]["status"] == "completed" and fin["summary"]["steps"] == 12
    assert fin["summary"]["steps_this_run"] == 12 - resumed_at
    # The planted half-written step_00000012 was replaced by a complete one.
    assert fin["latest"] == "step_00000012" and "step_00000012" in fin["complete"]
    assert not (interrupted["out"] / "checkpoints" / "step_00000012" / "half_written.pt").exists()
    assert len(fin["complete"]) == 2  # keep_last


def test_interrupted_run_has_the_uninterrupted_losses(interrupted, reference):
    steps = [r["step"] for r in interrupted["records"]]
    assert steps == list(range(1, 13)), steps  # every step logged once, in order, across four processes
    got = interrupted["losses"]
    assert sorted(reference) == list(range(1, 13))
    diffs = {s: abs(got[s] - reference[s]) for s in reference}
    assert max(diffs.values()) <= 1e-6, diffs
    assert reference[12] < reference[1]
    # TensorBoard, too, holds each step once: a resumed writer purges what a killed one logged past its checkpoint.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(interrupted["out"] / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("loss/total")
    assert [e.step for e in events] == list(range(1, 13)), [e.step for e in events]
    assert all(e.value == pytest.approx(got[e.step], rel=1e-6) for e in events)


def test_latest_naming_an_incomplete_checkpoint_is_not_used(tmp_path):
    from train.checkpoint import CheckpointManager

    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        d = root / f"step_{step:08d}"
        d.mkdir(parents=True)
        if complete:
            (d / "COMPLETE").write_text(f"{step}\n")
    (root / "latest").write_text("step_00000006\n")  # as if a crash had moved it early
    assert CheckpointManager(root, 2, 0).latest() == "step_00000004"
    assert CheckpointManager.resolve("auto", root) == (root, "step_00000004")
    assert CheckpointManager.resolve(str(root), root) == (root, "step_00000004")
    assert CheckpointManager.resolve("none", root) is None
    with pytest.raises(ValueError, match="no complete checkpoint"):
        CheckpointManager.resolve(str(tmp_path / "elsewhere"), root)


# ----- non-finite losses (in-process, loss function patched) ---------------------------------------------------
@pytest.fixture(scope="module")
def in_process():
    """`train.main.main` in this process (train_helpers.main_in_this_process)."""
    with main_in_this_process():
        yield


def _patch_loss(monkeypatch, bad_calls):
    """Make the model's cross-entropy (the ZeRO engine's `out.loss`) NaN on the calls `bad_calls(n)` picks."""
    from model.transformer import UnifiedTransformer

    real = UnifiedTransformer.head_loss
    calls = []

    def flaky(self, h, labels):
        calls.append(len(calls) + 1)
        loss = real(self, h, labels)
        return loss * float("nan") if bad_calls(len(calls)) else loss

    monkeypatch.setattr(UnifiedTransformer, "head_loss", flaky)
    return calls


def _console(capsys) -> str:
    """What the run printed, both streams (train/log.py decides which line goes where)."""
    cap = capsys.readouterr()
    return cap.out + cap.err


def _main(dataset, out, **kw) -> int:
    return main_here(dataset, out, **kw)


def test_task_loss_is_the_cross_entropy_without_the_aux_loss(in_process, demo_dataset, tmp_path, monkeypatch):
    """loss/<task> is the micro-batch's cross-entropy as the ZeRO engine's loss function returned it (one
    micro-batch per step here); the MoD aux loss is in loss/total and mod/aux_loss only."""
    from model.transformer import UnifiedTransformer

    real = UnifiedTransformer.head_loss
    ces = []

    def spy(self, h, labels):
        loss = real(self, h, labels)
        ces.append(float(loss.detach()))
        return loss

    monkeypatch.setattr(UnifiedTransformer, "head_loss", spy)
    out = tmp_path / "run"
    assert _main(demo_dataset, out, run__max_steps=3, logging__log_every=1, logging__eval_at_end="false",
                 checkpoint__resume="none") == 0
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == len(ces) == 3, (records, ces)
    for r, ce in zip(records, ces):
        (task,) = [k for k in r if k.startswith("loss/") and k != "loss/total"]
        assert r[task] == pytest.approx(ce, rel=1e-6), (r, ce)
        assert r["loss/total"] == pytest.approx(ce + r["mod/aux_loss"], rel=1e-6), (r, ce)
    assert any(r["mod/aux_loss"] > 0 for r in records)


def test_isolated_nonfinite_losses_are_skipped(in_process, demo_dataset, tmp_path, monkeypatch, capsys):
    calls = _patch_loss(monkeypatch, lambda n: n in (2, 4))
    out = tmp_path / "run"
    rc = _main(demo_dataset, out, run__max_steps=4, checkpoint__resume="none")
    err = _console(capsys)
    assert rc == 0, err
    assert len(calls) == 6  # 4 steps + 2 skipped micro-batches, each replaced by the next one
    assert "step 2: non-finite loss, micro-batch skipped (1 in a row)" in err, err
    assert "step 3: non-finite loss, micro-batch skipped (1 in a row)" in err, err
    s = summary(out)
    assert s["status"] == "completed" and s["steps"] == 4 and s["skipped_nonfinite_microbatches"] == 2, s
    assert all(math.isfinite(v) for v in losses(out / "metrics.jsonl").values())


def test_repeated_nonfinite_losses_save_and_exit_3(in_process, demo_dataset, tmp_path, monkeypatch, capsys):
    _patch_loss(monkeypatch, lambda n: n >= 3)
    out = tmp_path / "run"
    rc = _main(demo_dataset, out, run__max_steps=10, checkpoint__max_consecutive_nonfinite=3,
               checkpoint__export_hf="true", checkpoint__resume="none")
    err = _console(capsys)
    assert rc == 3, err
    assert "3 consecutive non-finite losses or gradient norms at step 3: stopping; lower optim.lr" in err, err
    s = summary(out)
    assert s["status"] == "stopped_nonfinite" and s["steps"] == 2 and s["skipped_nonfinite_microbatches"] == 3, s
    assert s["skipped_nonfinite_steps"] == 0, s
    assert latest(out) == "step_00000002" and complete_checkpoints(out) == ["step_00000002"]
    assert not (out / "hf").exists()  # a diverged run is not exported


def _patch_nan_grads(monkeypatch, bad_calls):
    """Finite losses whose gradients are NaN on the calls `bad_calls(n)` picks (the issue's case: a finite loss
    of 2.4e24 and a NaN gradient norm)."""
    import torch

    from model.transformer import UnifiedTransformer

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    real = UnifiedTransformer.head_loss
    calls = []

    def poisoned(self, h, labels):
        calls.append(len(calls) + 1)
        loss = real(self, h, labels)
        return NanGrad.apply(loss) if bad_calls(len(calls)) else loss

    monkeypatch.setattr(UnifiedTransformer, "head_loss", poisoned)
    return calls


def _checkpoint_bytes(out: Path, tag: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "checkpoints" / tag).iterdir())}


def test_issue_case_lr_1e6_skips_the_nan_gradient_step_and_keeps_step_1(in_process, demo_dataset, tmp_path, capsys):
    """The reported run, flags as given: step 2 has a finite loss and a NaN gradient norm. It is skipped, not
    applied; five skipped steps stop the run with 3; the exit-3 save leaves the COMPLETE step_1 byte for byte
    and prunes nothing; no weight is NaN."""
    import torch

    out = tmp_path / "run"
    kw = dict(optim__lr=1000000, optim__warmup_steps=0, checkpoint__save_every=1, checkpoint__keep_last=1)
    rc = _main(demo_dataset, out, **kw)
    err = _console(capsys)
    assert rc == 3, err
    assert err.count("step 2: non-finite gradient norm, optimizer step skipped") == 5, err
    assert sorted(losses(out / "metrics.jsonl")) == [1]  # step 2 was never applied, so never logged
    s = summary(out)
    assert s["status"] == "stopped_nonfinite" and s["steps"] == 1 and s["skipped_nonfinite_steps"] == 5, s
    assert latest(out) == "step_00000001" and complete_checkpoints(out) == ["step_00000001"]
    assert not (out / "checkpoints" / "step_00000002").exists()
    weights = torch.load(out / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt",
                         map_location="cpu", weights_only=False)["module"]
    assert all(torch.isfinite(v).all() for v in weights.values())
    # Resuming with a lower lr is refused until the change is accepted, and then the lr is the new one
    # (the weights after a 1e6 step give NaN gradients at any lr, so that resume stops with 3 again: measured).
    before = _checkpoint_bytes(out, "step_00000001")
    assert _main(demo_dataset, out, **{**kw, "optim__lr": 0.003}) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 1000000 -> 0.003" in err and "--set checkpoint.accept_changes=[optim.lr]" in err, err
    assert _checkpoint_bytes(out, "step_00000001") == before


def test_nan_gradient_steps_stop_and_lower_lr_resume_takes_effect(in_process, demo_dataset, tmp_path, monkeypatch,
                                                                  capsys):
    """From step 3 on every gradient is NaN: steps 3.. are skipped (not applied: the checkpointed weights stay
    finite), the exit-3 save does not rewrite the COMPLETE step_2 and prunes nothing. A resume with a lower
    lr (accepted) continues from step_2 and its metrics log the new lr."""
    from train.config import OptimConfig
    from train.engine import lr_lambda

    calls = _patch_nan_grads(monkeypatch, lambda n: n >= 3)
    out = tmp_path / "run"
    kw = dict(optim__warmup_steps=0, checkpoint__save_every=1, checkpoint__keep_last=1, run__max_steps=4,
              checkpoint__max_consecutive_nonfinite=3)
    assert _main(demo_dataset, out, **kw) == 3
    assert len(calls) == 5  # steps 1 and 2, then step 3 tried three times
    err = _console(capsys)
    assert "3 consecutive non-finite losses or gradient norms at step 3" in err, err
    assert latest(out) == "step_00000002" and complete_checkpoints(out) == ["step_00000002"]
    monkeypatch.undo()
    rc = _main(demo_dataset, out, **kw, optim__lr=0.001, checkpoint__accept_changes="[optim.lr]")
    cap = capsys.readouterr()
    err = cap.out + cap.err
    assert rc == 0, err
    assert "resuming with an accepted change (checkpoint.accept_changes) optim.lr: 0.003 -> 0.001" in err, err
    records = {r["step"]: r for r in read_metrics(out / "metrics.jsonl")}
    f = lr_lambda(OptimConfig(lr=0.001, warmup_steps=0), 4)
    assert sorted(records) == [1, 2, 3, 4]
    for step in (3, 4):
        assert records[step]["optim/lr"] == pytest.approx(0.001 * f(step), rel=1e-9), records[step]
    old = lr_lambda(OptimConfig(lr=0.003, warmup_steps=0), 4)
    assert records[2]["optim/lr"] == pytest.approx(0.003 * old(2), rel=1e-9)  # the first run's schedule


def test_dropped_shard_is_counted_in_metrics_and_summary(in_process, demo_dataset, tmp_path):
    """A shard that is not a tar, under data.bad_input: skip, reaches TensorBoard's twin (metrics.jsonl) and
    summary.json per reason with the samples it held, summed over ranks (here one)."""
    import json
    import shutil

    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    manifest = json.loads((data / "manifest.json").read_text())
    held = manifest["splits"]["train"]["shard_samples"]["lm"][1]
    (data / "lm-train-000001.tar").write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "run"
    assert _main(data, out, run__max_steps=2, data__bad_input="skip", data__max_skip_fraction=1.0) == 0
    data_summary = summary(out)["data"]
    assert data_summary["skipped_shards"] == 1 and data_summary["skipped_shards/unreadable_shard"] == 1
    assert data_summary["lost_samples"] == held and data_summary["lost_samples/unreadable_shard"] == held
    assert data_summary["read_samples"] > 0 and data_summary["skipped_samples"] == 0
    last = read_metrics(out / "metrics.jsonl")[-1]
    assert last["data/skipped_shards/unreadable_shard"] == 1 and last["data/lost_samples"] == held


def test_a_crashed_run_leaves_no_shared_memory_behind(demo_dataset, tmp_path):
    """An exception inside training skips the orderly shutdown, yet the rank's DeepSpeed CPU all-reduce workspace
    (~70 MB in /dev/shm, which DeepSpeed never unlinks) is removed on the way out; the error still propagates."""
    import glob
    import socket
    import subprocess

    with socket.socket() as sock:  # a free port, given to the run, so its workspace's name is known
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "crash.py"
    script.write_text(f"""
import glob, sys
sys.path.insert(0, {str(Path(MAIN).resolve().parents[1])!r})
import torch
import train.loop as loop

def crash(self, stop):
    import torch.distributed as dist
    dist.all_reduce(torch.zeros(4))  # the shared-memory workspace exists from here
    # Only this run's workspace (its port is in the name): other jobs on the machine may hold their own.
    print("WORKSPACE", *glob.glob("/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"), flush=True)
    raise RuntimeError("crash inside training")

loop.Trainer.fit = crash
from train.main import main
sys.exit(main(["--smoke", "--set", "run.output_dir={tmp_path / 'run'}", "--set", "data.dataset_dir={demo_dataset}"]))
""")
    before = set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode != 0 and "crash inside training" in proc.stderr
    during = set(next(line for line in proc.stdout.splitlines() if line.startswith("WORKSPACE")).split()[1:])
    assert during - before, "the run created no workspace: the test would pass without the fix"
    assert not (set(glob.glob("/dev/shm/deepspeed_allreduce_buffer_*")) & (during - before))
