"""The train step where a one-process grad_accum-1 run does not reach it (train/configs/emu3_8b_unimod.yaml
accumulates 4 micro-batches on every rank): gradient accumulation, the per-task loss apart from the router aux loss, the
summary's token count and the tokens/s rate across data-parallel ranks.

Every run starts from one random model saved as HF (checkpoint.init_from_hf) and trains a single task, t2i,
on padded rows (data.pack=false) read in the training process (no loader workers). The loader then yields
the same rows in the same order whatever data.micro_batch_size is, and every t2i row supervises the same
number of image codes (and routes the same number of tokens), so the mean of two micro-batch means is the
mean over their rows: grad_accum 2 x micro-batch 2 is the same step as grad_accum 1 x micro-batch 4.

The step is also recomputed here, apart from the trainer, from the initial weights and the rows the run's own
config.yaml makes the loader yield: cross-entropy, aux loss, gradient, and the AdamW update. The optimizer is
set so that one step shows the gradient's scale: AdamW's first update is lr * g / (|g| + eps), which with the
default eps is lr * sign(g), blind to a gradient halved; eps = 1, far above every gradient element of the
debug model, makes it ~ lr * g. No clipping (it rescales), no weight decay, a constant LR.
"""

from __future__ import annotations

import pytest

from tests.train_helpers import (DS_ZERO3, SMOKE, child_env, overrides, read_metrics, run, settings, single_cmd,
                                 summary, torchrun_cmd)

SEQ_LEN = 96  # the demo's longest t2i sample is 90 tokens: one padded sample per row
AUX_WEIGHT = 0.5  # large, so a per-task loss that wrongly includes the aux loss is far off
LR = 1e-2
EPS = 1.0


def _step_settings(init, **fields) -> dict:
    return dict(data__tasks="{t2i: 1.0}", data__pack="false", data__seq_len=SEQ_LEN, data__num_workers=0,
                model__mod__aux_loss_weight=AUX_WEIGHT, checkpoint__init_from_hf=init, optim__lr=LR,
                optim__eps=EPS, optim__grad_clip=0.0, optim__weight_decay=0.0, optim__warmup_steps=0,
                optim__min_lr_ratio=1.0, **fields)


@pytest.fixture(scope="module")
def runs(demo_dataset, tmp_path_factory):
    """The initial weights, and three runs from them: one step of grad_accum 1 x micro-batch 4 and one of
    grad_accum 2 x micro-batch 2 in one process (both exported as HF), and two steps of grad_accum 2 x
    micro-batch 2 on 2 ranks (torchrun, ZeRO-3, gloo)."""
    import torch

    from model import UnifiedTransformer
    from train.config import RunConfig

    root = tmp_path_factory.mktemp("train_step")
    init = root / "init_hf"
    model_cfg = RunConfig.load(SMOKE, settings(demo_dataset, root, model__mod__aux_loss_weight=AUX_WEIGHT)).model
    torch.manual_seed(1234)
    UnifiedTransformer(model_cfg).save_hf(init)

    def single(name, **fields):
        out = root / name
        args = overrides(demo_dataset, out, run__max_steps=1, checkpoint__export_hf="true",
                         **_step_settings(init, **fields))
        return out, run(single_cmd(args), child_env(), root / f"{name}.log")

    found = {"init": init,
             "accum1": single("accum1", data__micro_batch_size=4, optim__grad_accum=1),
             "accum2": single("accum2", data__micro_batch_size=2, optim__grad_accum=2)}
    out = root / "two_ranks"
    args = overrides(demo_dataset, out, run__max_steps=2, data__micro_batch_size=2, optim__grad_accum=2,
                     **_step_settings(init))
    found["two_ranks"] = out, run(lambda port: torchrun_cmd(args, port=port, ds_config=DS_ZERO3), child_env(),
                                  root / "two_ranks.log")
    return found


def _finished(runs, name):
    out, result = runs[name]
    assert result.rc == 0, result.explain()
    return out


def _first_step(out):
    records = read_metrics(out / "metrics.jsonl")
    assert records and records[0]["step"] == 1, records
    return records[0]


def _recompute(init, out, world_size: int = 1) -> dict:
    """The first step of the run in `out`, computed here from the initial weights and the rows of each rank's
    first grad_accum micro-batches (the loader rebuilt from the run's config.yaml), all rows in one batch: with
    one supervised and one routed count per row, CE + aux over the pooled rows is the trainer's objective, the
    mean over micro-batches and ranks of each micro-batch's CE + aux. Returns that CE and aux, the gradient and
    the initial weights (by parameter name)."""
    import torch

    from data.loader import UnimodLoader
    from model import UnifiedTransformer
    from model.loss import causal_lm_loss
    from train.config import RunConfig

    cfg = RunConfig.load(out / "config.yaml")
    model = UnifiedTransformer.from_hf(init).float().train()
    assert model.config.mod == cfg.model.mod  # the initial checkpoint has the run's MoD plan and aux weight
    micro = []
    for rank in range(world_size):
        loader = UnimodLoader(cfg.data, tasks=cfg.model.mod.tasks, rank=rank, world_size=world_size,
                              layout=cfg.model.vocab)
        it = iter(loader)
        micro += [next(it) for _ in range(cfg.optim.grad_accum)]
        it.close()
    assert all(int(b["task_ids"][0]) == cfg.model.mod.tasks.index("t2i") for b in micro)
    # One supervised count per row: the pooled mean below is then the mean of the micro-batch means.
    counts = torch.cat([(b["labels"] != -100).sum(1) for b in micro])
    assert (counts == counts[0]).all() and counts[0] > 0, counts
    batch = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
    net = model(batch["input_ids"], task_ids=batch["task_ids"], position_ids=batch["position_ids"])
    ce = causal_lm_loss(net.logits, batch["labels"])
    (ce + net.aux_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    aux = float(net.aux_loss.detach())
    assert aux > 0.01, aux  # the MoD layers routed t2i rows: there is an aux loss to keep apart
    return {"ce": float(ce.detach()), "aux": aux, "grads": grads, "weights": weights}


def _grad_norm(grads) -> float:
    import torch

    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])))


def _config(out) -> dict:
    import yaml

    return yaml.safe_load((out / "config.yaml").read_text())


def _weights(hf_dir) -> dict:
    from model import UnifiedTransformer

    return {n: p.detach() for n, p in UnifiedTransformer.from_hf(hf_dir).float().named_parameters()}


# ----- gradient accumulation ---------------------------------------------------------------------------------
def test_grad_accum_2_equals_twice_the_micro_batch(runs):
    """grad_accum 2 x micro-batch 2 logs the same losses and gradient norm as grad_accum 1 x micro-batch 4 on
    the same rows, and its one step leaves the same weights."""
    import torch

    one, two = _finished(runs, "accum1"), _finished(runs, "accum2")
    r1, r2 = _first_step(one), _first_step(two)
    for tag in ("loss/total", "loss/t2i", "mod/aux_loss", "optim/grad_norm"):
        assert r2[tag] == pytest.approx(r1[tag], rel=1e-5), (tag, r1[tag], r2[tag])
    w0, w1, w2 = _weights(runs["init"]), _weights(one / "hf"), _weights(two / "hf")
    assert sorted(w1) == sorted(w2) == sorted(w0)
    moved = max(float((w1[n] - w0[n]).abs().max()) for n in w0)
    assert moved > 0.1 * LR, moved  # the step moved the weights by a share of lr, as eps=1 makes it
    for name in w0:
        torch.testing.assert_close(w2[name] - w0[name], w1[name] - w0[name], rtol=1e-3, atol=1e-3 * moved,
                                   msg=lambda m: f"{name}: {m}")


def test_accumulated_step_is_the_recomputed_step(runs):
    """The grad_accum 2 run's step, recomputed here on its 4 rows: loss/t2i is the cross-entropy alone,
    loss/total adds the aux loss, the gradient norm is that of CE + aux averaged over the micro-batches (not
    divided by grad_accum once more), and the exported weights moved by AdamW's first update of that gradient."""
    import torch

    out = _finished(runs, "accum2")
    want = _recompute(runs["init"], out)
    r = _first_step(out)
    assert r["loss/t2i"] == pytest.approx(want["ce"], rel=1e-5), (r, want["ce"], want["aux"])
    assert r["mod/aux_loss"] == pytest.approx(want["aux"], rel=1e-4), (r, want["aux"])
    assert r["loss/total"] == pytest.approx(want["ce"] + want["aux"], rel=1e-5), r
    assert r["optim/grad_norm"] == pytest.approx(_grad_norm(want["grads"]), rel=1e-4), r
    lr = r["optim/lr"]
    assert lr == pytest.approx(LR, rel=1e-9)
    after, w0 = _weights(out / "hf"), want["weights"]
    for name, g in want["grads"].items():
        step = -lr * g / (g.abs() + EPS)  # AdamW's bias-corrected first step: m = g, v = g^2
        torch.testing.assert_close(after[name] - w0[name], step, rtol=1e-3, atol=1e-3 * lr,
                                   msg=lambda m: f"{name}: {m}")


# ----- what a step is counted as --------------------------------------------------------------------------------
@pytest.mark.parametrize("name, ranks", [("accum1", 1), ("accum2", 1), ("two_ranks", 2)])
def test_summary_tokens_are_steps_x_accum_x_batch_x_seq_x_ranks(runs, name, ranks):
    """summary.json's tokens count every position of every micro-batch on every data-parallel rank."""
    import json

    out = _finished(runs, name)
    s = summary(out)
    cfg = _config(out)
    assert s["world_size"] == ranks and s["status"] == "completed", s
    want = s["steps"] * cfg["optim"]["grad_accum"] * cfg["data"]["micro_batch_size"] * SEQ_LEN * ranks
    assert s["steps"] == cfg["run"]["max_steps"] and s["tokens"] == want, json.dumps(s, indent=1)


def test_two_ranks_tokens_per_s_is_the_global_rate(runs):
    """throughput/tokens_per_s counts every rank's tokens: times the step's wall time it is the global
    tokens of the step (micro-batch x seq_len x grad_accum x 2 ranks), and samples/s likewise."""
    out = _finished(runs, "two_ranks")
    cfg = _config(out)
    rows = cfg["data"]["micro_batch_size"] * cfg["optim"]["grad_accum"] * 2
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert r["throughput/tokens_per_s"] * r["time/step_s"] == pytest.approx(rows * SEQ_LEN, rel=1e-9), r
        assert r["throughput/samples_per_s"] * r["time/step_s"] == pytest.approx(rows, rel=1e-9), r


def test_two_ranks_step_is_the_recomputed_step(runs):
    """ZeRO-3 on 2 ranks x grad_accum 2: the logged losses and gradient norm are those of the mean objective
    over both ranks' 8 rows, recomputed here (each rank's loader rebuilt for its rank)."""
    out = _finished(runs, "two_ranks")
    want = _recompute(runs["init"], out, world_size=2)
    r = _first_step(out)
    assert r["loss/t2i"] == pytest.approx(want["ce"], rel=1e-5), (r, want["ce"], want["aux"])
    assert r["mod/aux_loss"] == pytest.approx(want["aux"], rel=1e-4), r
    assert r["loss/total"] == pytest.approx(want["ce"] + want["aux"], rel=1e-5), r
    assert r["optim/grad_norm"] == pytest.approx(_grad_norm(want["grads"]), rel=1e-4), r
