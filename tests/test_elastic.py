"""Elastic resume (train/elastic.py): a checkpoint continues on another data-parallel size, and across the
pipeline and ZeRO, through DeepSpeed's universal checkpoint, with weights, Adam moments, LR schedule and step.

Fast tests: the layout read from a checkpoint's files, the resume decision and its refusals, the loader's
elastic position. Slow tests (one chain of launches per module fixture, CPU, fp32, demo data):

- ZeRO-3: 2 ranks -> 1 rank (grad_accum 2: the same global batch) -> 2 ranks, against 6 uninterrupted steps on
  2 ranks. Exact: the converted fp32 weights equal DeepSpeed's own consolidation (zero_to_fp32), and a 1-rank
  engine that loaded the conversion saves weights, Adam moments and step bit for bit equal to it. The batch
  order after a data-parallel change differs from the uninterrupted run (documented), so losses are compared
  with a tolerance.
- Pipeline (2 stages, data-parallel 1) -> ZeRO-3 (1 rank) -> pipeline: the data-parallel size stays 1, so the
  batches are the uninterrupted run's and the losses agree to float rounding.

The LR warms up over more steps than any run here: the schedule then depends on the step only (not on
run.max_steps), so a run that stops at step 4 and the uninterrupted one to step 6 share it, and an LR that
restarted from step 0 after a resume would show.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.train_helpers import (DS_PIPELINE, DS_ZERO3, child_env, complete_checkpoints, deepspeed_cmd, losses,
                                 overrides, read_metrics, run, single_cmd, torchrun_cmd)
from train.elastic import Layout, accepts_layout_change, convert_to_universal, resume_plan

# Warmup longer than every run: lr(step) = optim.lr * (step + 1) / (WARMUP + 1), whatever run.max_steps is.
WARMUP = 20
COMMON = dict(optim__lr=3e-3, optim__warmup_steps=WARMUP, checkpoint__keep_last=5, run__seed=0)
# The resumed runs stop at other steps than the run they resume (run.max_steps is in the fingerprint).
ACCEPT = dict(checkpoint__accept_changes="[parallel.layout,run.max_steps]")
# 2 -> 1 rank keeps the global batch by doubling the accumulation, and 1 -> 2 halves it again: a grad_accum
# change that keeps the global batch needs no acceptance (train/fingerprint.py).
ACCEPT_ACCUM = ACCEPT
# Per-step loss tolerance after a data-parallel change: other micro-batches (other tasks and samples) make the
# step's loss. Measured on the demo data: 0.009, 0.041, 0.033, 0.039 at steps 3-6 (losses about 6.0-6.1).
DATA_ORDER_TOL = 0.15
# Same batches, another partitioning: only the float reduction order differs. Measured: steps 3-5 bit-identical
# to the uninterrupted pipeline run, step 6 off by 5e-7.
FLOAT_TOL = 1e-5


def _zero_dir(universal: Path) -> dict[str, Path]:
    return {p.name: p for p in (universal / "zero").iterdir() if p.is_dir()}


def _state(path: Path, like: torch.Tensor | None = None) -> torch.Tensor:
    """A universal checkpoint's per-parameter file: {"param": tensor, ...} from ZeRO-1/2, a flat tensor from
    ZeRO-3 (reshaped to `like`)."""
    x = torch.load(path)
    x = x["param"] if isinstance(x, dict) else x
    return x.reshape(like.shape) if like is not None else x


def _lr(step: int) -> float:
    return 3e-3 * (step + 1) / (WARMUP + 1)


# ----- fast: layouts, plans, the loader ----------------------------------------------------------------------------
def _fake_checkpoint(tmp: Path, names: list[str]) -> Path:
    tag = tmp / "step_00000004"
    tag.mkdir(parents=True)
    for n in names:
        (tag / n).write_text("")
    return tag


def test_layout_from_deepspeed_file_names(tmp_path):
    z3 = _fake_checkpoint(tmp_path / "z3", ["trainer_state_rank0.json", "trainer_state_rank1.json",
                                            "zero_pp_rank_0_mp_rank_00_model_states.pt",
                                            "zero_pp_rank_1_mp_rank_00_model_states.pt",
                                            "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                            "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
    assert Layout.of_checkpoint(z3) == Layout("zero", 2, 1, 3)
    pipe = _fake_checkpoint(tmp_path / "pp", ["trainer_state_rank0.json", "trainer_state_rank1.json",
                                              "layer_00-model_states.pt", "layer_01-model_states.pt",
                                              "mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt",
                                              "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                              "zero_pp_rank_0_mp_rank_01_optim_states.pt"])
    assert Layout.of_checkpoint(pipe) == Layout("pipeline", 2, 2, 1)
    z0 = _fake_checkpoint(tmp_path / "z0", ["trainer_state_rank0.json", "trainer_state_rank1.json",
                                            "mp_rank_00_model_states.pt"])
    assert Layout.of_checkpoint(z0) == Layout("zero", 2, 1, 0)


def test_layout_from_fingerprint(tmp_path):
    tag = _fake_checkpoint(tmp_path, ["trainer_state_rank0.json"])
    (tag / "fingerprint.json").write_text(json.dumps({"version": 1, "fields": {
        "parallel.world_size": 4, "parallel.data_parallel_size": 2, "parallel.mode": "pipeline",
        "parallel.pipeline_stages": 2, "parallel.zero_stage": 0, "parallel.precision": "bf16"}}))
    layout = Layout.of_checkpoint(tag)
    assert layout == Layout("pipeline", 4, 2, 0, sharded=True)  # bf16 ZeRO-0: DeepSpeed's bf16 optimizer shards
    assert layout.dp_size == 2


def test_resume_plan_decisions(tmp_path):
    z3x2, z3x1 = Layout("zero", 2, 1, 3), Layout("zero", 1, 1, 3)
    pipe = Layout("pipeline", 2, 2, 1)
    assert resume_plan(tmp_path, "t", z3x2, z3x2, accept=False).action == "same"
    # ZeRO-1 and ZeRO-2 write the same files: a plain load.
    assert resume_plan(tmp_path, "t", Layout("zero", 2, 1, 1), Layout("zero", 2, 1, 2), accept=False).action == "same"
    plan = resume_plan(tmp_path, "t", z3x2, z3x1, accept=True)
    assert plan.universal and plan.load_dir == tmp_path / "t" and plan.tag == "universal_zero"
    assert resume_plan(tmp_path, "t", z3x1, pipe, accept=True).tag == "universal_pipeline"
    # ZeRO-0 replicates the optimizer: another data-parallel size loads it as it is.
    assert resume_plan(tmp_path, "t", Layout("zero", 2, 1, 0), Layout("zero", 1, 1, 0), accept=True).action == \
        "replicated"
    with pytest.raises(ValueError, match=r"checkpoint.accept_changes=\[parallel.layout\]"):
        resume_plan(tmp_path, "t", z3x2, z3x1, accept=False)
    with pytest.raises(ValueError, match="ZeRO-0 checkpoint has no ZeRO shards"):
        resume_plan(tmp_path, "t", Layout("zero", 2, 1, 0), z3x1, accept=True)
    with pytest.raises(ValueError, match="zero_optimization.stage is 0"):
        resume_plan(tmp_path, "t", z3x2, Layout("zero", 1, 1, 0), accept=True)


def test_accepting_a_layout_change():
    old, new = Layout("zero", 2, 1, 3), Layout("zero", 1, 1, 3)
    assert accepts_layout_change(["parallel.layout"], old, new)
    assert accepts_layout_change(["parallel.world_size", "parallel.data_parallel_size"], old, new)
    assert not accepts_layout_change(["parallel.world_size"], old, new)
    assert not accepts_layout_change(["optim.lr"], old, new)


def test_loader_elastic_position(demo_dataset):
    from data.config import LoaderConfig
    from data.loader import UnimodLoader

    cfg = LoaderConfig(dataset_dir=str(demo_dataset), seq_len=352, micro_batch_size=2, num_workers=0,
                       tasks={"t2i": 1.0, "mmu": 1.0, "lm": 0.2})
    tasks = ["t2i", "mmu", "lm"]
    two = UnimodLoader(cfg, tasks, rank=1, world_size=2)
    one = UnimodLoader(cfg, tasks, rank=0, world_size=1)
    state = {**two.state_dict(), "epoch": 3, "consumed": 7}
    with pytest.raises(ValueError, match="world_size=2 but this run has world_size=1.*accept_changes"):
        one.load_state_dict(state)
    one.load_state_dict(state, elastic=True)
    assert (one.epoch, one.state_dict()["consumed"]) == (3, 14)  # 7 micro-batches on each of 2 ranks
    # 1 -> 2 ranks: 7 global micro-batches become 3 per rank (rounded down: one is read again, none skipped).
    two.load_state_dict({**one.state_dict(), "consumed": 7}, elastic=True)
    assert two.state_dict()["consumed"] == 3
    # A finished epoch stays finished: the next iteration starts epoch 4.
    one.load_state_dict({**state, "consumed": len(two)}, elastic=True)
    assert one.state_dict()["consumed"] == len(one)
    with pytest.raises(ValueError, match="consumed=999 is outside"):
        one.load_state_dict({**state, "consumed": 999}, elastic=True)


# ----- slow: ZeRO-3 2 -> 1 -> 2 ranks ----------------------------------------------------------------------------
def _check(result):
    assert result.rc == 0, result.explain()
    return result


@pytest.fixture(scope="module")
def zero3_chain(demo_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic_zero3")
    a, b0, b, c = root / "a", root / "b0", root / "b", root / "c"
    runs = {}
    # A: 6 uninterrupted steps on 2 ranks, checkpoints at 2, 4, 6.
    runs["a"] = run(lambda port: deepspeed_cmd(overrides(demo_dataset, a, run__max_steps=6, checkpoint__save_every=2,
                                                         **COMMON), port=port), child_env(), root / "a.log")
    if runs["a"].rc:
        return {"root": root, "runs": runs}
    a2 = a / "checkpoints" / "step_00000002"
    # B0: 1 rank loads A's step 2 and saves it again at once (max_steps 2): the state right after conversion.
    runs["b0"] = run(single_cmd(overrides(demo_dataset, b0, run__max_steps=2, checkpoint__resume=a2, **COMMON,
                                          **ACCEPT), ds_config=DS_ZERO3), child_env(), root / "b0.log")
    # B: 1 rank, twice the accumulation (same global batch), steps 3-4 from A's step 2.
    runs["b"] = run(single_cmd(overrides(demo_dataset, b, run__max_steps=4, checkpoint__save_every=2,
                                         checkpoint__resume=a2, optim__grad_accum=2, **COMMON, **ACCEPT_ACCUM),
                               ds_config=DS_ZERO3), child_env(), root / "b.log")
    # C: back to 2 ranks, steps 5-6 from B's step 4.
    runs["c"] = run(lambda port: deepspeed_cmd(overrides(demo_dataset, c, run__max_steps=6,
                                                         checkpoint__resume=b / "checkpoints" / "step_00000004",
                                                         **COMMON, **ACCEPT_ACCUM), port=port), child_env(), root / "c.log")
    return {"root": root, "runs": runs, "a": a, "b0": b0, "b": b, "c": c}


@pytest.mark.slow
def test_zero3_conversion_is_exact(zero3_chain):
    runs = zero3_chain["runs"]
    for name in ("a", "b0"):
        _check(runs[name])
    assert "elastic resume via DeepSpeed's universal checkpoint: zero, data-parallel 2, ZeRO stage 3 -> zero, " \
           "data-parallel 1" in runs["b0"].output
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from train.safe_load import weights_only_torch_load

    a2 = zero3_chain["a"] / "checkpoints" / "step_00000002"
    uni = a2 / "universal_zero"
    assert uni.is_dir() and not list(a2.glob("universal_zero.tmp*"))
    with weights_only_torch_load():
        merged = get_fp32_state_dict_from_zero_checkpoint(str(a2.parent), tag=a2.name)
        theirs = _zero_dir(uni)
        assert sorted(theirs) == sorted(merged)
        for name, value in merged.items():  # DeepSpeed's own consolidation of A's 2 shards
            assert torch.equal(_state(theirs[name] / "fp32.pt", value), value), name
        # The 1-rank engine that loaded the conversion saved (at the same step, before any training) exactly the
        # weights, Adam moments and Adam step it was given.
        b0_tag = zero3_chain["b0"] / "checkpoints" / "step_00000002"
        again = convert_to_universal(b0_tag, Layout("zero", 1, 1, 3), Layout("zero", 2, 1, 3), num_layers=4)
        mine = _zero_dir(again)
        assert sorted(mine) == sorted(theirs)
        for name in theirs:
            for key in ("fp32", "exp_avg", "exp_avg_sq"):
                t = _state(theirs[name] / f"{key}.pt")
                m = _state(mine[name] / f"{key}.pt")
                assert torch.equal(t, m), (name, key)
                assert key == "fp32" or t.abs().sum() > 0, (name, key)  # moments were really carried
            assert float(torch.load(mine[name] / "step.pt")) == float(torch.load(theirs[name] / "step.pt")) == 2.0
        # Each optimizer group kept its own weight decay (ZeRO-3's universal loader gives all of them group 0's).
        groups = torch.load(again / "zero" / "optimizer_state.pt")["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


@pytest.mark.slow
def test_zero3_two_one_two_ranks_continue(zero3_chain):
    runs = zero3_chain["runs"]
    for name in ("a", "b", "c"):
        _check(runs[name])
    a, b, c = zero3_chain["a"], zero3_chain["b"], zero3_chain["c"]
    assert f"resumed from {a / 'checkpoints' / 'step_00000002'} at step 2" in runs["b"].output
    assert "data-parallel 1, ZeRO stage 3 -> zero, data-parallel 2" in runs["c"].output
    assert f"resumed from {b / 'checkpoints' / 'step_00000004'} at step 4" in runs["c"].output
    assert "step_00000004" in complete_checkpoints(b)
    base = losses(a / "metrics.jsonl")
    got = {**losses(b / "metrics.jsonl"), **losses(c / "metrics.jsonl")}
    assert sorted(got) == [3, 4, 5, 6], got
    for run_dir in (b, c):
        for r in read_metrics(run_dir / "metrics.jsonl"):
            assert r["optim/lr"] == pytest.approx(_lr(r["step"]), rel=1e-9), r  # the schedule went on
            assert r["throughput/samples_per_s"] * r["time/step_s"] == pytest.approx(4)  # same global batch
    diffs = {s: abs(got[s] - base[s]) for s in got}
    print(f"[elastic] ZeRO-3 2->1->2 |loss - uninterrupted| per step: {diffs}")
    assert max(diffs.values()) <= DATA_ORDER_TOL, (got, base)
    assert got[6] < got[3] - 0.1, got  # and it kept learning


# ----- slow: pipeline (2 stages) -> ZeRO-3 (1 rank) -> pipeline ---------------------------------------------------
@pytest.fixture(scope="module")
def pipeline_chain(demo_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic_pipe")
    p, q, r = root / "p", root / "q", root / "r"
    pipe = dict(parallel__mode="pipeline", parallel__pipeline_stages=2)
    runs = {"p": run(lambda port: torchrun_cmd(overrides(demo_dataset, p, run__max_steps=6, checkpoint__save_every=2,
                                                         **pipe, **COMMON), port=port, ds_config=DS_PIPELINE),
                     child_env(), root / "p.log")}
    if runs["p"].rc:
        return {"root": root, "runs": runs}
    runs["q"] = run(single_cmd(overrides(demo_dataset, q, run__max_steps=4, checkpoint__save_every=2,
                                         checkpoint__resume=p / "checkpoints" / "step_00000002", **COMMON, **ACCEPT),
                               ds_config=DS_ZERO3), child_env(), root / "q.log")
    runs["r"] = run(lambda port: torchrun_cmd(overrides(demo_dataset, r, run__max_steps=6,
                                                        checkpoint__resume=q / "checkpoints" / "step_00000004",
                                                        **pipe, **COMMON, **ACCEPT), port=port,
                                              ds_config=DS_PIPELINE), child_env(), root / "r.log")
    return {"root": root, "runs": runs, "p": p, "q": q, "r": r}


@pytest.mark.slow
def test_pipeline_to_zero3_and_back(pipeline_chain):
    runs = pipeline_chain["runs"]
    for name in ("p", "q", "r"):
        _check(runs[name])
    p, q, r = pipeline_chain["p"], pipeline_chain["q"], pipeline_chain["r"]
    assert "pipeline, 2 stages, data-parallel 1, ZeRO stage 1 -> zero, data-parallel 1, ZeRO stage 3" \
        in runs["q"].output
    assert "zero, data-parallel 1, ZeRO stage 3 -> pipeline, 2 stages" in runs["r"].output
    # The converted pipeline weights are the layer files' tensors under the plain model's names, exactly.
    from model.transformer import stage_key_to_hf
    from train.safe_load import weights_only_torch_load

    p2 = p / "checkpoints" / "step_00000002"
    uni = _zero_dir(p2 / "universal_zero")
    with weights_only_torch_load():
        for layer_file in sorted(p2.glob("layer_*-model_states.pt")):
            idx = int(layer_file.name[len("layer_"):].split("-")[0])
            for key, value in torch.load(layer_file).items():
                name = stage_key_to_hf(f"{idx}.{key}", 4)
                assert torch.equal(_state(uni[name] / "fp32.pt", value), value.float()), name
    base = losses(p / "metrics.jsonl")
    got = {**losses(q / "metrics.jsonl"), **losses(r / "metrics.jsonl")}
    assert sorted(got) == [3, 4, 5, 6], got
    # Data-parallel size 1 throughout: the same batches as the uninterrupted pipeline run, so the same losses up
    # to float rounding, which they could not be with lost Adam moments or a restarted schedule.
    for step in got:
        assert abs(got[step] - base[step]) <= FLOAT_TOL, (step, got, base)
    for run_dir in (q, r):
        for rec in read_metrics(run_dir / "metrics.jsonl"):
            assert rec["optim/lr"] == pytest.approx(_lr(rec["step"]), rel=1e-9), rec
