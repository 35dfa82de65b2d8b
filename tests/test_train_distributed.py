"""Two-process training on CPU (gloo, fp32, debug preset, demo data) under each launcher:

- `deepspeed --num_gpus 2` with ZeRO-3: the loss falls, checkpoints are COMPLETE with `latest`, a second
  invocation with more steps resumes from the checkpoint step, and the HF export holds the gathered shards;
- `torchrun` with 2 pipeline stages: step 1's loss equals the one-process loss on the same weights and batch;
- `mpirun -np 2` starts and trains.

Each launch costs 10-30 s on 2 cores, so module fixtures run each once and several tests read the result.
"""

from __future__ import annotations

import shutil
import sys

import pytest

from tests.train_helpers import (DS_SINGLE, MAIN, SMOKE, assert_hf_export_loads, child_env,
                                 complete_checkpoints, deepspeed_cmd, latest, losses, overrides,
                                 read_metrics, run, settings, single_cmd, summary, torchrun_cmd)

# A learning rate that moves a fresh debug model visibly within a dozen steps.
FAST = dict(optim__lr=3e-3, optim__warmup_steps=2)


# ----- ZeRO-3 through the deepspeed launcher ------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero3(demo_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3") / "run"
    ports = []  # the rendezvous ports, which name DeepSpeed's shared-memory workspaces
    first = run(lambda port: ports.append(port) or deepspeed_cmd(
        overrides(demo_dataset, out, run__max_steps=10, checkpoint__save_every=5, **FAST), port=port),
        child_env(), out.parent / "first.log")
    state = {"first": first, "out": out, "ports": ports}
    if first.rc == 0:
        state["first_summary"] = summary(out)
        state["first_steps"] = sorted(losses(out / "metrics.jsonl"))
        state["first_complete"] = complete_checkpoints(out)
        state["first_latest"] = latest(out)
    # The same command with more steps: resumes from step_00000010 (checkpoint.resume=auto), then exports HF.
    # A longer run reshapes the schedule, which a resume refuses unless accepted.
    state["second"] = run(lambda port: ports.append(port) or deepspeed_cmd(overrides(demo_dataset, out, run__max_steps=14,
                                                               checkpoint__save_every=5, checkpoint__export_hf="true",
                                                               checkpoint__accept_changes="[run.max_steps]",
                                                               **FAST), port=port),
                          child_env(), out.parent / "second.log")
    return state


def test_zero3_two_processes_loss_falls_and_checkpoints(zero3):
    first = zero3["first"]
    assert first.rc == 0, first.explain()
    assert "2 process(es) via deepspeed" in first.output and "ZeRO stage 3" in first.output, first.explain()
    s = zero3["first_summary"]
    assert s["status"] == "completed" and s["steps"] == 10 and s["world_size"] == 2, s
    assert zero3["first_steps"] == list(range(1, 11))
    assert zero3["first_complete"] == ["step_00000005", "step_00000010"]
    assert zero3["first_latest"] == "step_00000010"
    ckpt = zero3["out"] / "checkpoints" / "step_00000010"
    # Every rank wrote its ZeRO shard and its trainer state (loader position, RNG) before COMPLETE.
    for rank in (0, 1):
        assert (ckpt / f"trainer_state_rank{rank}.json").exists()
        assert list(ckpt.rglob(f"*zero_pp_rank_{rank}_*optim_states.pt")), sorted(p.name for p in ckpt.rglob("*"))
    assert (ckpt / "COMPLETE").read_text().strip() == "10"
    records = read_metrics(zero3["out"] / "metrics.jsonl")
    loss = [r["loss/total"] for r in records]
    # Mean of the last three steps against the first three: each step is a different task's micro-batch.
    assert sum(loss[-3:]) / 3 < sum(loss[:3]) / 3 - 0.3, loss
    assert all(r["optim/grad_norm"] > 0 for r in records)


def test_zero3_resume_continues_from_checkpoint_step(zero3):
    second = zero3["second"]
    assert second.rc == 0, second.explain()
    out = zero3["out"]
    assert f"resumed from {out / 'checkpoints' / 'step_00000010'} at step 10" in second.output, second.explain()
    s = summary(out)
    assert s["status"] == "completed" and s["steps"] == 14 and s["steps_this_run"] == 4, s
    assert s["loss_first"] == pytest.approx(zero3["first_summary"]["loss_first"])  # carried in the checkpoint
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == list(range(1, 15)), steps  # continued, nothing twice
    assert latest(out) == "step_00000014" and complete_checkpoints(out) == ["step_00000010", "step_00000014"]
    # The restored scheduler continues at its step; the cosine now spans the new max_steps (14, was 10).
    from train.config import RunConfig
    from train.engine import lr_lambda

    optim = RunConfig.load(out / "config.yaml").optim
    lrs = {r["step"]: r["optim/lr"] for r in read_metrics(out / "metrics.jsonl")}
    for step, lr in lrs.items():
        want = optim.lr * lr_lambda(optim, 10 if step <= 10 else 14)(step)
        assert lr == pytest.approx(want, rel=1e-9), (step, lr, want)


def test_zero3_hf_export_holds_the_gathered_weights(zero3):
    second = zero3["second"]
    assert second.rc == 0, second.explain()
    out = zero3["out"]
    assert_hf_export_loads(out / "hf")
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from model.hf import ROUTERS_FILE

    exported = load_file(str(out / "hf" / "model.safetensors"))
    exported.update(load_file(str(out / "hf" / ROUTERS_FILE)))
    # The final checkpoint's ZeRO-3 shards, merged by DeepSpeed's own tool, are the exported weights exactly.
    merged = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_00000014")
    assert sorted(merged) == sorted(exported)
    for key, value in merged.items():
        # fp32 training exports fp32 (and the gathered weights are the master weights, not a 16-bit copy).
        assert exported[key].dtype == torch.float32, (key, exported[key].dtype)
        assert exported[key].shape == value.shape and torch.equal(exported[key], value), key


# ----- 2-stage pipeline through torchrun vs one process -------------------------------------------------------
@pytest.fixture(scope="module")
def pipeline(demo_dataset, tmp_path_factory):
    """One random model saved as HF; both runs start from it with the same seed and data-parallel size 1."""
    import torch

    from model import UnifiedTransformer
    from train.config import RunConfig

    root = tmp_path_factory.mktemp("pipeline")
    init = root / "init_hf"
    model_cfg = RunConfig.load(SMOKE, settings(demo_dataset, root)).model
    torch.manual_seed(1234)
    UnifiedTransformer(model_cfg).save_hf(init)
    # A constant LR: the schedule then does not depend on max_steps, so 4 steps + 2 resumed ones follow the
    # same LR as 6 straight ones (a cosine would be stretched by the second invocation's max_steps).
    common = dict(checkpoint__init_from_hf=init, optim__lr=2e-3, optim__warmup_steps=0, optim__min_lr_ratio=1.0)
    pipe = dict(parallel__mode="pipeline", parallel__pipeline_stages=2, **common)
    # 4 steps, then the same command with 6: the pipeline engine's checkpoint round trip (per-stage layer
    # files, ZeRO-1 optimizer shards) in the exact mode shipped, compared against 6 uninterrupted steps.
    ports = []
    first = run(lambda port: ports.append(port) or torchrun_cmd(overrides(demo_dataset, root / "pipe", run__max_steps=4,
                                                                          **pipe), port=port),
                child_env(), root / "pipe_first.log")
    piped = run(lambda port: ports.append(port) or torchrun_cmd(overrides(demo_dataset, root / "pipe", run__max_steps=6,
                                                    checkpoint__export_hf="true",
                                                    checkpoint__accept_changes="[run.max_steps]", **pipe), port=port),
                child_env(), root / "pipe.log")
    single = run(single_cmd(overrides(demo_dataset, root / "single", run__max_steps=6, **common)), child_env(),
                 root / "single.log")
    return {"root": root, "first": first, "pipe": piped, "single": single, "init": init, "ports": ports}


@pytest.mark.parametrize("fixture", ["zero3", "pipeline"])
def test_finished_runs_leave_no_shared_memory_behind(fixture, request):
    """DeepSpeed's CPU all-reduce creates a ~70 MB /dev/shm workspace per rank and never unlinks it; a finished
    run removes its own (train/launch.py remove_shm_workspace), under the deepspeed launcher and torchrun."""
    from train.launch import shm_workspace

    state = request.getfixturevalue(fixture)
    assert state["ports"]
    left = [p for port in state["ports"] for rank in (0, 1)
            if (p := shm_workspace(rank, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})).exists()]
    assert not left, f"DeepSpeed shared-memory workspaces left behind: {left}"


def test_pipeline_first_loss_equals_single_process(pipeline):
    first, single = pipeline["first"], pipeline["single"]
    assert first.rc == 0, first.explain()
    assert single.rc == 0, single.explain()
    assert "2 process(es) via torchrun" in first.output and "mode pipeline" in first.output, first.explain()
    assert "pipeline partition" in first.output and "stage 1:" in first.output, first.explain()
    p = losses(pipeline["root"] / "pipe" / "metrics.jsonl")
    s = losses(pipeline["root"] / "single" / "metrics.jsonl")
    assert abs(p[1] - s[1]) <= 1e-5, (p[1], s[1])


def test_pipeline_resume_follows_the_single_process_run(pipeline):
    """Both step AdamW on the same gradients, so the losses stay equal (up to float reordering) through the
    pipeline's save at step 4 and its resume."""
    piped = pipeline["pipe"]
    assert piped.rc == 0, piped.explain()
    assert f"resumed from {pipeline['root'] / 'pipe' / 'checkpoints' / 'step_00000004'} at step 4" in piped.output
    p = losses(pipeline["root"] / "pipe" / "metrics.jsonl")
    s = losses(pipeline["root"] / "single" / "metrics.jsonl")
    assert sorted(p) == sorted(s) == list(range(1, 7))
    for step in range(2, 7):
        assert abs(p[step] - s[step]) <= 1e-4, (step, p, s)


def test_pipeline_trains_checkpoints_and_exports(pipeline):
    piped = pipeline["pipe"]
    assert piped.rc == 0, piped.explain()
    out = pipeline["root"] / "pipe"
    s = summary(out)
    assert s["status"] == "completed" and s["steps"] == 6 and s["mode"] == "pipeline", s
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(r["optim/grad_norm"] > 0 and r["flops/actual_per_step"] > 0 for r in records)
    # The last stage counts the micro-batches it fetched: the same FLOPs and padding as the one-process run on
    # the same data (whose counts test_train_single checks against model.flops batch by batch).
    single = {r["step"]: r for r in read_metrics(pipeline["root"] / "single" / "metrics.jsonl")}
    for r in records:
        for tag in ("flops/actual_per_step", "flops/dense_per_step", "flops/mod_saved_pct", "data/pad_pct"):
            assert r[tag] == single[r["step"]][tag], (r["step"], tag)
    # The router aux loss travelled through both stages into the loss.
    image_steps = [r for r in records if "loss/t2i" in r or "loss/mmu" in r]
    assert image_steps and all(r["mod/aux_loss"] > 0 for r in image_steps)
    # The last stage's loss recorded each micro-batch under its task: loss/<task> is the cross-entropy alone (one
    # micro-batch per step here), as in the one-process run; the aux loss is in loss/total only.
    for r in records:
        (task,) = [k for k in r if k.startswith("loss/") and k != "loss/total"]
        assert r[task] + r["mod/aux_loss"] == pytest.approx(r["loss/total"], rel=1e-6), r
        assert abs(r[task] - single[r["step"]][task]) <= 1e-4, (r["step"], task)
    assert latest(out) == "step_00000006"
    assert_hf_export_loads(out / "hf")
    # The export differs from the initial weights (it trained) but keeps every tensor name.
    from safetensors.torch import load_file

    before = load_file(str(pipeline["init"] / "model.safetensors"))
    after = load_file(str(out / "hf" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    assert any(not (before[k] == after[k]).all() for k in before)


# ----- mpirun ----------------------------------------------------------------------------------------------------
def test_mpirun_two_ranks_train(demo_dataset, tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun on PATH: run scripts/system_deps.sh as root (installs Open MPI)")
    out = tmp_path / "run"
    # Debian's Open MPI refuses root without the two ALLOW variables; --oversubscribe lets 2 ranks share cores.
    env = child_env(port=True, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                    OMPI_MCA_btl_vader_single_copy_mechanism="none")
    cmd = [mpirun, "--oversubscribe", "-np", "2", sys.executable, str(MAIN), "--config", str(SMOKE),
           "--deepspeed_config", str(DS_SINGLE), *overrides(demo_dataset, out, run__max_steps=3)]
    result = run(cmd, env, tmp_path / "mpirun.log")
    assert result.rc == 0, result.explain()
    assert "2 process(es) via openmpi" in result.output, result.explain()
    s = summary(out)
    assert s["status"] == "completed" and s["steps"] == 3 and s["world_size"] == 2, s
    records = read_metrics(out / "metrics.jsonl")
    # ZeRO-0 data parallel: 2 ranks x 2 rows per step.
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["throughput/samples_per_s"] * r["time/step_s"] == pytest.approx(4) for r in records)
    assert latest(out) == "step_00000003"
