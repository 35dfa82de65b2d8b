"""Checkpoint loading never runs code from a checkpoint (train/safe_load.py).

Tiny engines (the debug preset) are built in this process in a world-of-1 gloo group through the trainer's
own `build_zero_engine` / `build_pipeline_engine` (which install the safe checkpoint engine), trained one
step and saved as `CheckpointManager.save` does, in every mode shipped: ZeRO-0/1/2/3 fp32, ZeRO-3 bf16, and the
pipeline engine (ZeRO-1, fp32 and bf16; one stage here, two stages under torchrun in the one slow test,
tests/safe_load_ranks.py). Then:
- a clean resume (`CheckpointManager.load` -> `engine.load_checkpoint`) restores the weights exactly;
- an object whose unpickling calls `os.mkdir(marker)` is planted in mp_rank_00_model_states.pt, in a ZeRO
  optimizer state file, in a ZeRO-3 model state file and in a pipeline layer file; the resume path, the tools'
  one checkpoint reader (tools/checkpoints.py `open_checkpoint`, and `python -m tools.export`) and zero_to_fp32
  refuse it with an error naming the
  file and the global, and the marker is never created.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from tests.train_helpers import BIN, REPO, SMOKE, child_env, free_port, release_process_group, run
from train.safe_load import (ALLOWED_GLOBALS, SafeTorchCheckpointEngine, UnsafeCheckpointError,
                             install_safe_checkpoint_engine, weights_only_torch_load)

pytestmark = pytest.mark.usefixtures("one_thread")

DS = REPO / "ds_configs"
# mode -> (parallel.mode, precision, DeepSpeed JSON, ZeRO stage override or None)
MODES = {
    "zero0": ("zero", "fp32", DS / "single_cpu.json", None),
    "zero1": ("zero", "fp32", DS / "single_cpu.json", 1),
    "zero2": ("zero", "fp32", DS / "single_cpu.json", 2),
    "zero3": ("zero", "fp32", DS / "zero3_cpu.json", None),
    "zero3_bf16": ("zero", "bf16", DS / "zero3_bf16.json", None),
    "pipe": ("pipeline", "fp32", DS / "pipeline_cpu.json", None),
    "pipe_bf16": ("pipeline", "bf16", DS / "pipeline_bf16.json", None),
}
TAG = "step_00000001"


@pytest.fixture(scope="module")
def world_of_one():
    """A gloo group of one process for deepspeed.initialize; environment and group undone afterwards."""
    import deepspeed

    saved = dict(os.environ)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    yield
    release_process_group()
    os.environ.clear()
    os.environ.update(saved)


def build(mode: str, tmp: Path, world_size: int = 1):
    """(engine, run config, weights getter) for one mode, through the trainer's engine builders; a pipeline
    gets one stage per process."""
    from train.config import RunConfig, load_ds_config, reconcile_ds_config

    parallel, precision, ds_path, stage = MODES[mode]
    cfg = RunConfig.load(SMOKE, [f"data.dataset_dir={tmp / 'no-data'}", "data.micro_batch_size=2",
                                 "data.seq_len=32", "data.pad_to=seq_len", f"parallel.mode={parallel}",
                                 f"parallel.precision={precision}", f"run.output_dir={tmp}"]
                     + ([f"parallel.pipeline_stages={world_size}"] if parallel == "pipeline" else []))
    ds = load_ds_config(ds_path)
    if stage is not None:
        ds["zero_optimization"] = {**ds["zero_optimization"], "stage": stage}
    ds = reconcile_ds_config(ds, cfg, world_size=world_size, on_gpu=False, where=str(ds_path))
    if parallel == "pipeline":
        from train.pipeline import build_pipeline_engine

        engine, _ = build_pipeline_engine(cfg, ds, precision, torch.device("cpu"))
        return engine, cfg, lambda: {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
    from train.zero import build_zero_engine, consolidated_state_dict

    engine, model = build_zero_engine(cfg, ds, precision, torch.device("cpu"))
    z = ds["zero_optimization"]["stage"]
    return engine, cfg, lambda: {k: v.float() for k, v in consolidated_state_dict(engine, model, z).items()}


def train_one_step(engine, cfg) -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=g)
    tasks = torch.zeros(2, dtype=torch.long)
    if cfg.parallel.mode == "pipeline":
        pos = torch.arange(32).expand(2, 32).contiguous()
        engine.train_batch(iter([((ids, tasks, pos), ids.clone())]))
    else:
        loss = engine(ids, task_ids=tasks).logits.float().mean()
        engine.backward(loss)
        engine.step()


@pytest.fixture(scope="module")
def saved(world_of_one, tmp_path_factory):
    """mode -> (run dir with config.yaml and checkpoints/step_00000001, the weights saved there), built on
    first use and shared by the tests of this module."""
    from train.checkpoint import COMPLETE

    cache: dict[str, tuple[Path, dict[str, torch.Tensor]]] = {}

    def get(mode: str):
        if mode not in cache:
            run = tmp_path_factory.mktemp(mode)
            engine, cfg, weights = build(mode, run)
            assert isinstance(engine.checkpoint_engine, SafeTorchCheckpointEngine), \
                "the trainer's engine builder must install the safe checkpoint engine"
            train_one_step(engine, cfg)
            # The engine files as CheckpointManager.save writes them, plus what makes the tag complete.
            engine.save_checkpoint(str(run / "checkpoints"), tag=TAG, client_state={"step": 1}, save_latest=False)
            (run / "checkpoints" / TAG / "trainer_state_rank0.json").write_text('{"step": 1}')
            (run / "checkpoints" / TAG / COMPLETE).write_text("1\n")
            (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))  # as the trainer writes it
            cache[mode] = (run, weights())
        return cache[mode]

    return get


class Planted:
    """What an attacker plants: unpickling it calls os.mkdir(marker), i.e. runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def planted_copy(saved, mode: str, file: str, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of the mode's run with a Planted object inside `file` -> (run dir, tag dir, marker path)."""
    src, _ = saved(mode)
    run = tmp_path / "run"
    shutil.copytree(src, run)
    target = run / "checkpoints" / TAG / file
    state = torch.load(target, map_location="cpu", weights_only=False)  # our own file, written just above
    marker = tmp_path / "code-ran"
    if "optimizer_state_dict" in state:
        state["optimizer_state_dict"]["planted"] = Planted(marker)
    else:
        state["planted"] = Planted(marker)
    torch.save(state, target)
    return run, target.parent, marker


def assert_refused(excinfo, file: Path, marker: Path) -> None:
    msg = str(excinfo.value)
    assert str(file) in msg and "posix.mkdir" in msg and "ALLOWED_GLOBALS" in msg, msg
    assert not marker.exists(), "the planted code ran"


# ----- the allow-list is what real checkpoints hold ----------------------------------------------------------
def test_allow_list_covers_every_saved_file_and_each_entry_is_used(saved):
    names = {f"{c.__module__}.{c.__qualname__}": c for c in ALLOWED_GLOBALS}
    used: set[str] = set()
    for mode in MODES:
        run, _ = saved(mode)
        for f in sorted((run / "checkpoints" / TAG).glob("*.pt")):
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(f))
            assert found <= set(names), f"{mode} {f.name}: {sorted(found - set(names))} not on the allow-list"
            used |= found
    # fp16 (DynamicLossScaler) does not run on CPU; every other entry must be needed by some mode here.
    assert set(names) - used == {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"}, sorted(set(names) - used)


# ----- resume: engine.load_checkpoint ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_resume_round_trip_restores_the_weights(saved, mode, tmp_path):
    from train.checkpoint import CheckpointManager

    run, expected = saved(mode)
    engine, _, weights = build(mode, tmp_path)
    before = weights()
    assert any(not torch.equal(before[k], expected[k]) for k in expected), "the fresh engine already had them"
    CheckpointManager(run / "checkpoints", 1, 0).load(engine, run / "checkpoints", TAG)
    after = weights()
    assert after.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(after[k], expected[k], rtol=0, atol=0, msg=k)
    assert engine.global_steps == 1


@pytest.mark.parametrize("mode, file", [
    ("zero0", "mp_rank_00_model_states.pt"),
    ("zero2", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero3", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("pipe", "layer_02-model_states.pt"),
])
def test_resume_refuses_a_planted_pickle(saved, mode, file, tmp_path):
    from train.checkpoint import CheckpointManager

    run, tag_dir, marker = planted_copy(saved, mode, file, tmp_path)
    engine, _, _ = build(mode, tmp_path / "fresh")
    with pytest.raises(UnsafeCheckpointError) as excinfo:
        CheckpointManager(run / "checkpoints", 1, 0).load(engine, run / "checkpoints", TAG)
    assert_refused(excinfo, tag_dir / file, marker)


# ----- export / generate / analyze: open_checkpoint ----------------------------------------------------------
@pytest.mark.parametrize("mode, file", [
    ("zero0", "mp_rank_00_model_states.pt"),
    ("zero2", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero2", "mp_rank_00_model_states.pt"),
    ("zero3", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
    ("pipe", "layer_02-model_states.pt"),
])
def test_export_refuses_a_planted_pickle(saved, mode, file, tmp_path):
    from tools.checkpoints import open_checkpoint

    run, tag_dir, marker = planted_copy(saved, mode, file, tmp_path)
    with pytest.raises(UnsafeCheckpointError) as excinfo:
        open_checkpoint(run)
    assert_refused(excinfo, tag_dir / file, marker)


@pytest.mark.parametrize("entry", ["generate", "analyze"])
def test_generate_and_analyze_refuse_a_planted_pickle(saved, entry, tmp_path):
    """`python -m tools.generate` and `python -m tools.analyze` read checkpoints through open_checkpoint; the
    refusal reaches them unwrapped."""
    from analysis.checkpoint import load_dense
    from tools.generate import open_checkpoint as load_model  # the reader the generation CLI calls

    file = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    run, tag_dir, marker = planted_copy(saved, "zero2", file, tmp_path)
    with pytest.raises(UnsafeCheckpointError) as excinfo:
        (load_model if entry == "generate" else load_dense)(run)
    assert_refused(excinfo, tag_dir / file, marker)


@pytest.mark.parametrize("mode", ["zero0", "zero2", "zero3", "pipe"])
def test_export_reads_clean_checkpoints(saved, mode):
    from model.transformer import stage_key_to_hf
    from tools.checkpoints import open_checkpoint

    run, expected = saved(mode)
    model = open_checkpoint(run).model
    if mode == "pipe":
        expected = {stage_key_to_hf(k, model.config.num_hidden_layers): v for k, v in expected.items()}
    got = model.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=k)


def test_export_cli_refuses_with_exit_2_and_names_the_file(saved, tmp_path):
    file = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    run, tag_dir, marker = planted_copy(saved, "zero1", file, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "tools.export", "--checkpoint", str(run), "--out",
                           str(tmp_path / "hf")], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: {tag_dir / file}: refused to load" in proc.stderr and "posix.mkdir" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not marker.exists() and not (tmp_path / "hf").exists()


# ----- zero_to_fp32 under weights_only_torch_load --------------------------------------------------------------
@pytest.mark.parametrize("mode, file", [
    ("zero1", "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero1", "mp_rank_00_model_states.pt"),
    ("zero3", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
])
def test_zero_to_fp32_refuses_a_planted_pickle(saved, mode, file, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run, tag_dir, marker = planted_copy(saved, mode, file, tmp_path)
    with pytest.raises(UnsafeCheckpointError) as excinfo, weights_only_torch_load():
        get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=TAG)
    assert_refused(excinfo, tag_dir / file, marker)


def test_zero_to_fp32_reads_a_clean_checkpoint_and_torch_load_is_restored(saved):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run, expected = saved("zero3")
    original = torch.load
    with weights_only_torch_load():
        assert torch.load is not original
        state = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag=TAG)
    assert torch.load is original
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(RuntimeError), weights_only_torch_load():
        raise RuntimeError("an error inside the block")
    assert torch.load is original


# ----- installing ------------------------------------------------------------------------------------------------
def test_install_refuses_other_checkpoint_engines():
    with pytest.raises(ValueError, match="only TorchCheckpointEngine loads are made safe"):
        install_safe_checkpoint_engine(SimpleNamespace(checkpoint_engine=object(), load_checkpoint=lambda: None))


# ----- two pipeline stages (two processes) -------------------------------------------------------------------------
@pytest.mark.slow
def test_two_stage_pipeline_resumes_and_each_stage_refuses_its_planted_layer(tmp_path):
    """Each stage reads only its own layer files: a pickle planted in one layer of each stage is refused on both
    ranks (neither waits for the other), and the clean checkpoint round-trips exactly on both."""
    result = run(lambda port: [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port),
                               str(REPO / "tests" / "safe_load_ranks.py"), "pipe", str(tmp_path)],
                 child_env(), tmp_path / "ranks.log", timeout=300)
    assert result.rc == 0, result.explain()
    for rank, layer in ((0, "layer_01"), (1, "layer_05")):
        assert f"[rank {rank}] round trip exact at step 1" in result.output, result.explain()
        refused = f"[rank {rank}] refused: {tmp_path / 'planted' / TAG / layer}-model_states.pt: refused to load"
        assert refused in result.output and "posix.mkdir" in result.output, result.explain()
    assert not (tmp_path / "code-ran").exists(), "the planted code ran"
