"""Start-up refuses what would fail later: each case exits 2 with a message naming the field, before the process
group (and so the model and the engine) exists. In-process and fast: `train.launch.init_distributed` is replaced
by a function that fails the test, so a check that fired any later would show up as that failure.
"""

from __future__ import annotations

import os
import sys

import pytest

import train.launch
from tests.train_helpers import DS_PIPELINE, DS_SINGLE, SMOKE
from train.main import main


@pytest.fixture
def no_launch(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("init_distributed was reached: the error was not caught up front")

    monkeypatch.setattr(train.launch, "init_distributed", refuse)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK",
                "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def run_main(capsys, *sets: str, ds=DS_SINGLE) -> tuple[int, str]:
    argv = ["--config", str(SMOKE), "--deepspeed_config", str(ds)]
    for item in ["parallel.precision=fp32", "run.device=cpu", "data.micro_batch_size=2", *sets]:
        argv += ["--set", item]
    rc = main(argv)
    return rc, capsys.readouterr().err


def _expect(capsys, words, *sets, ds=DS_SINGLE):
    rc, err = run_main(capsys, *sets, ds=ds)
    assert rc == 2, err
    # Every rank prints its error; in a job of several processes the line says whose it is (train/log.py).
    world = int(os.environ.get("WORLD_SIZE", "1"))
    assert err.startswith("[rank 0] error: " if world > 1 else "error: ") and str(SMOKE) in err, err
    for w in words:
        assert w in err, f"{w!r} not in {err!r}"


def test_dataset_dir_that_does_not_exist(capsys, no_launch, tmp_path):
    _expect(capsys, ["data.dataset_dir=", "no such directory"], f"data.dataset_dir={tmp_path / 'nope'}",
            f"run.output_dir={tmp_path / 'run'}")


def test_dataset_dir_without_manifest(capsys, no_launch, tmp_path):
    _expect(capsys, ["data.dataset_dir=", "has no manifest.json"], f"data.dataset_dir={tmp_path}",
            f"run.output_dir={tmp_path / 'run'}")


def test_output_dir_that_is_a_file(capsys, no_launch, demo_dataset, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("")
    _expect(capsys, [f"run.output_dir={f}", "is a file"], f"data.dataset_dir={demo_dataset}", f"run.output_dir={f}")


def test_output_dir_under_a_file(capsys, no_launch, demo_dataset, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("")
    _expect(capsys, ["run.output_dir=", "is not a writable directory"], f"data.dataset_dir={demo_dataset}",
            f"run.output_dir={f / 'run'}")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, where even root cannot create a directory")
def test_output_dir_that_cannot_be_written_even_by_root(capsys, no_launch, demo_dataset):
    # Permission bits do not stop root (CI runs as root); a directory in /proc cannot be made by anyone.
    _expect(capsys, ["run.output_dir=/proc/emu3-unimod-run", "is not a writable directory"],
            f"data.dataset_dir={demo_dataset}", "run.output_dir=/proc/emu3-unimod-run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits (covered by the /proc case)")
def test_output_dir_without_write_permission(capsys, no_launch, demo_dataset, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    _expect(capsys, ["run.output_dir=", "is not a writable directory"], f"data.dataset_dir={demo_dataset}",
            f"run.output_dir={locked / 'run'}")


def test_resume_path_that_does_not_exist(capsys, no_launch, demo_dataset, tmp_path):
    _expect(capsys, [f"checkpoint.resume={tmp_path / 'ckpt'}", "no such file or directory"],
            f"data.dataset_dir={demo_dataset}", f"run.output_dir={tmp_path / 'run'}",
            f"checkpoint.resume={tmp_path / 'ckpt'}")


def test_resume_path_without_a_complete_checkpoint(capsys, no_launch, demo_dataset, tmp_path):
    (tmp_path / "ckpt" / "step_00000004").mkdir(parents=True)  # a save that never finished
    _expect(capsys, ["checkpoint.resume=", "no complete checkpoint"], f"data.dataset_dir={demo_dataset}",
            f"run.output_dir={tmp_path / 'run'}", f"checkpoint.resume={tmp_path / 'ckpt'}")


def test_more_readers_than_shards(capsys, no_launch, demo_dataset, tmp_path):
    # The demo has 4 train shards per task; 2 ranks x 3 workers = 6 readers.
    no_launch.setenv("RANK", "0")
    no_launch.setenv("WORLD_SIZE", "2")
    _expect(capsys, ["data.num_workers=3 x 2 data-parallel rank(s) = 6 readers", "task t2i has 4 shard(s)",
                     "set data.num_workers to at most 2"],
            f"data.dataset_dir={demo_dataset}", f"run.output_dir={tmp_path / 'run'}", "data.num_workers=3")


def test_readers_count_data_parallel_ranks_only(capsys, no_launch, demo_dataset, tmp_path, monkeypatch):
    """Pipeline stages share their data-parallel replica's data: 4 ranks in 2 stages are 2 readers per worker,
    so 2 workers fit 4 shards and start-up goes on to the process group (the refusing stub)."""
    no_launch.setenv("RANK", "0")
    no_launch.setenv("WORLD_SIZE", "4")
    with pytest.raises(AssertionError, match="init_distributed was reached"):
        run_main(capsys, f"data.dataset_dir={demo_dataset}", f"run.output_dir={tmp_path / 'run'}",
                 "data.num_workers=2", "parallel.mode=pipeline", "parallel.pipeline_stages=2", ds=DS_PIPELINE)


def test_seq_len_longer_than_the_model_positions(capsys, no_launch, demo_dataset, tmp_path):
    _expect(capsys, ["data.seq_len=4096", "model.max_position_embeddings=2048"],
            f"data.dataset_dir={demo_dataset}", f"run.output_dir={tmp_path / 'run'}", "data.seq_len=4096",
            "model.max_position_embeddings=2048")


def test_more_pipeline_stages_than_layers(capsys, no_launch, demo_dataset, tmp_path):
    no_launch.setenv("RANK", "0")
    no_launch.setenv("WORLD_SIZE", "8")
    _expect(capsys, ["parallel.pipeline_stages=8", "model.num_hidden_layers"], f"data.dataset_dir={demo_dataset}",
            f"run.output_dir={tmp_path / 'run'}", "parallel.mode=pipeline", "parallel.pipeline_stages=8",
            "model.num_hidden_layers=4", ds=DS_PIPELINE)


def test_checks_run_before_importing_deepspeed(tmp_path):
    """A refused start-up is quick: nothing of DeepSpeed (seconds to import, a JIT build on CPU) is loaded."""
    import subprocess

    from tests.train_helpers import MAIN, child_env

    proc = subprocess.run([sys.executable, "-X", "importtime", str(MAIN), "--config", str(SMOKE), "--set",
                           f"data.dataset_dir={tmp_path / 'nope'}"], env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "data.dataset_dir=" in proc.stderr and "no such directory" in proc.stderr
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "deepspeed" not in imported, sorted(m for m in imported if "deepspeed" in m)[:5]


def test_known_third_party_warnings_are_filtered_from_the_start(capsys, no_launch, tmp_path):
    """DeepSpeed's calls of collectives that torch deprecates would print a FutureWarning per rank (and per step
    where something resets Python's warning registry): train/main.py filters exactly those two."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        rc, _ = run_main(capsys, f"data.dataset_dir={tmp_path / 'nope'}")  # any early exit: filters are set first
        assert rc == 2
        for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "some_other_call"):
            warnings.warn(f"`torch.distributed.{name}` is deprecated. Please use ... instead.", FutureWarning)
    assert [str(w.message).split("`")[1] for w in seen] == ["torch.distributed.some_other_call"]
