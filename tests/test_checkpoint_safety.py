"""Checkpoint writes under crashes and full disks (train/checkpoint.py).

Crash ordering: a tiny DeepSpeed engine (world of 1, in this process) saves step 1, then step 2 with a crash
injected into one write: the engine's files, the trainer state, the fingerprint, COMPLETE or `latest`. A
crash is an exception nothing in the trainer catches (as if the process died there); the injected file
writes raise on `write()`, after `open()` has created (or truncated) the file, so a `latest` written in place
instead of replaced would be left empty. Each case must leave step 2 without COMPLETE and `latest` naming
step 1.

Disk full: a whole in-process training run whose trainer-state write at step 2 fails with ENOSPC reports
the path and the cause, removes the partial step and exits 74; the next start, whose config write fails
too, exits 74 naming the file and leaves config.yaml whole.
"""

from __future__ import annotations

import builtins
import errno
import io
import os
from pathlib import Path

import pytest

from tests.test_train_single import _main, in_process  # noqa: F401 (fixture)
from tests.train_helpers import complete_checkpoints, free_port, latest, release_process_group


class Crash(BaseException):
    """The process dying at this point: no handler of the trainer catches it."""


def _fail_writes(monkeypatch, match, exc=lambda path: Crash(str(path))):
    """Files whose path `match`es raise `exc(path)` on their first write (after open created/truncated them)."""
    real_open = builtins.open

    class Failing(io.TextIOWrapper):
        pass

    def opener(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax") and match(Path(file)):
            def write(*_a, **_k):
                raise exc(Path(file))
            f.write = write
        return f

    monkeypatch.setattr(builtins, "open", opener)
    monkeypatch.setattr(io, "open", opener)


@pytest.fixture(scope="module")
def engine():
    import deepspeed
    import torch

    saved = dict(os.environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    deepspeed.init_distributed("gloo")
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
          "zero_optimization": {"stage": 0}, "steps_per_print": 1 << 30}
    eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    yield eng
    release_process_group()
    os.environ.clear()
    os.environ.update(saved)


def _manager(tmp_path, keep_last=3):
    from train.checkpoint import CheckpointManager

    return CheckpointManager(tmp_path / "checkpoints", keep_last, rank=0)


def _save(ckpt, engine, step):
    return ckpt.save(engine, step, {"loader": {}, "rng": {}}, {"run.seed": 0})


@pytest.mark.parametrize("where", ["engine", "trainer_state", "fingerprint", "COMPLETE", "latest"])
def test_crash_while_saving_leaves_the_previous_checkpoint_latest(engine, tmp_path, monkeypatch, where):
    ckpt = _manager(tmp_path)
    _save(ckpt, engine, 1)
    pointer = ckpt.root / "latest"
    assert pointer.read_text() == "step_00000001\n"
    if where == "engine":
        real = engine.save_checkpoint

        def partial(root, tag, **kw):
            (Path(root) / tag).mkdir(parents=True, exist_ok=True)
            (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 10)
            raise Crash("engine files")

        monkeypatch.setattr(engine, "save_checkpoint", partial)
    else:
        prefix = {"trainer_state": "trainer_state_rank", "fingerprint": "fingerprint.json"}.get(where, where)
        _fail_writes(monkeypatch, lambda p: p.name.startswith(prefix))
    with pytest.raises(Crash):
        _save(ckpt, engine, 2)
    monkeypatch.undo()
    step2 = ckpt.root / "step_00000002"
    assert not (step2 / "COMPLETE").exists(), sorted(p.name for p in step2.iterdir())
    assert pointer.read_text() == "step_00000001\n"  # not truncated, not moved
    assert ckpt.latest() == "step_00000001" and ckpt.complete_tags() == ["step_00000001"]
    if where == "engine":
        engine.save_checkpoint = real
    # The next save of step 2 replaces the incomplete directory.
    assert _save(ckpt, engine, 2) == "step_00000002" and ckpt.latest() == "step_00000002"


def test_a_complete_checkpoint_is_never_rewritten(engine, tmp_path):
    ckpt = _manager(tmp_path)
    _save(ckpt, engine, 1)
    files = {p.name: p.stat().st_mtime_ns for p in (ckpt.root / "step_00000001").iterdir()}
    assert _save(ckpt, engine, 1) == "step_00000001"
    assert {p.name: p.stat().st_mtime_ns for p in (ckpt.root / "step_00000001").iterdir()} == files


def test_save_without_pruning_keeps_older_checkpoints(engine, tmp_path):
    ckpt = _manager(tmp_path, keep_last=1)
    _save(ckpt, engine, 1)
    ckpt.save(engine, 2, {}, {}, prune=False)
    assert ckpt.complete_tags() == ["step_00000001", "step_00000002"]
    _save(ckpt, engine, 3)
    assert ckpt.complete_tags() == ["step_00000003"]


@pytest.mark.parametrize("code,cause", [(errno.ENOSPC, "disk full (ENOSPC)"), (errno.EACCES, "permission denied (EACCES)")])
def test_write_error_names_path_and_cause_and_removes_the_partial_tag(engine, tmp_path, monkeypatch, code, cause):
    from train.checkpoint import CheckpointWriteError

    ckpt = _manager(tmp_path)
    _save(ckpt, engine, 1)
    _fail_writes(monkeypatch, lambda p: p.name.startswith("trainer_state_rank"),
                 lambda p: OSError(code, os.strerror(code), str(p)))
    with pytest.raises(CheckpointWriteError) as e:
        _save(ckpt, engine, 2)
    monkeypatch.undo()
    assert f"{cause} writing {ckpt.root / 'step_00000002' / 'trainer_state_rank0.json'}" in str(e.value)
    assert not (ckpt.root / "step_00000002").exists()
    assert ckpt.latest() == "step_00000001"


def test_disk_full_run_exits_74_and_next_start_reports_config_write(in_process, demo_dataset, tmp_path,  # noqa: F811
                                                                    monkeypatch, capsys):
    out = tmp_path / "run"
    kw = dict(run__max_steps=3, checkpoint__save_every=1)
    enospc = lambda p: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(p))  # noqa: E731
    _fail_writes(monkeypatch, lambda p: p.name.startswith("trainer_state_rank") and "step_00000002" in str(p), enospc)
    rc = _main(demo_dataset, out, **kw)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 74, err
    assert (f"disk full (ENOSPC) writing {out / 'checkpoints' / 'step_00000002' / 'trainer_state_rank0.json'}"
            in err), err
    assert not (out / "checkpoints" / "step_00000002").exists()
    assert latest(out) == "step_00000001" and complete_checkpoints(out) == ["step_00000001"]
    first_config = (out / "config.yaml").read_text()
    assert (out / "configs" / "config_000.yaml").read_text() == first_config

    _fail_writes(monkeypatch, lambda p: p.parent.name == "configs", enospc)
    rc = _main(demo_dataset, out, **kw)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == 74, err
    assert "the run's config was not saved: disk full (ENOSPC) writing " + str(out / "configs" / "config_001.yaml") \
        in err, err
    assert (out / "config.yaml").read_text() == first_config
    assert sorted(p.name for p in (out / "configs").iterdir()) == ["config_000.yaml"]  # no temporary left
