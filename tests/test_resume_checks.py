"""What a resume may change (train/fingerprint.py): refused changes exit 2 before any engine is built, naming the
field, the old and new value and the override; accepted schedule changes take effect from the resumed step; every
start keeps its config (configs/config_NNN.yaml)."""

from __future__ import annotations

import pytest

from tests.test_train_single import _main, in_process  # noqa: F401 (fixture)
from tests.train_helpers import read_metrics


def test_compare_sorts_layout_shape_accepted_and_refused():
    from train.fingerprint import compare

    old = {"parallel.world_size": 2, "model.hidden_size": 64, "optim.lr": 1e-3, "run.max_steps": 10,
           "model.mod.aux_loss_weight": 0.01, "model.mod.tasks": ["t2i", "mmu", "lm"]}
    new = {**old, "parallel.world_size": 4, "model.hidden_size": 128, "optim.lr": 5e-4, "run.max_steps": 20,
           "model.mod.aux_loss_weight": 0.1, "model.mod.tasks": ["mmu", "t2i", "lm"], "run.seed": 3}
    c = compare(old, new, accept=["optim.lr", "run.max_steps", "model.hidden_size", "optim.eps"])
    assert [x.field for x in c.layout] == ["parallel.world_size"]
    assert [x.field for x in c.shape] == ["model.hidden_size", "model.mod.tasks"]  # accepting a shape does nothing
    assert [x.field for x in c.accepted] == ["optim.lr", "run.max_steps"]
    assert [x.field for x in c.refused] == ["model.mod.aux_loss_weight"]  # run.seed: absent from the old one
    assert c.unused_accepts == ["model.hidden_size", "optim.eps"] and not c.ok
    msg = c.error("checkpoint X")
    assert "model.hidden_size: 64 -> 128" in msg and "cannot be accepted" in msg
    assert "--set checkpoint.accept_changes=[model.mod.aux_loss_weight]" in msg
    assert "model.mod.aux_loss_weight: 0.01 -> 0.1" in msg and "parallel.world_size: 2 -> 4" in msg



def test_grad_accum_that_keeps_the_global_batch_needs_no_acceptance():
    from train.fingerprint import compare

    old = {"parallel.world_size": 2, "parallel.data_parallel_size": 2, "data.micro_batch_size": 4,
           "optim.grad_accum": 1}
    fewer = {**old, "parallel.world_size": 1, "parallel.data_parallel_size": 1, "optim.grad_accum": 2}
    c = compare(old, fewer, accept=["parallel.layout"])
    assert [x.field for x in c.accepted] == ["optim.grad_accum"] and not c.refused and not c.unused_accepts
    # The same accumulation change on the same ranks doubles the global batch: that one must be accepted.
    c = compare(old, {**old, "optim.grad_accum": 2}, accept=[])
    assert [x.field for x in c.refused] == ["optim.grad_accum"]
    assert "elastic resume" in compare(old, fewer, accept=[]).error("X")

@pytest.fixture
def two_steps(in_process, demo_dataset, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    assert _main(demo_dataset, out, run__max_steps=2, optim__warmup_steps=0) == 0
    return out


@pytest.mark.parametrize("change,field,old,new", [
    (dict(model__hidden_size=32), "model.hidden_size", "64", "32"),
    (dict(model__mod__tasks="[mmu,t2i,lm]"), "model.mod.tasks", '["t2i", "mmu", "lm"]', '["mmu", "t2i", "lm"]'),
])
def test_shape_change_exits_2_before_the_engine(two_steps, demo_dataset, monkeypatch, capsys, change, field, old, new):
    import train.loop

    def no_engine(*a, **k):
        raise AssertionError("the engine was built for a refused resume")

    monkeypatch.setattr(train.loop, "build_engine", no_engine)  # the name the Trainer calls
    capsys.readouterr()
    rc = _main(demo_dataset, two_steps, run__max_steps=2, optim__warmup_steps=0, **change,
               checkpoint__accept_changes=f"[{field}]")
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"{field}: {old} -> {new}" in err and "cannot be accepted" in err, err
    assert "size mismatch" not in err


def test_capacity_and_seed_changes_are_refused_until_accepted(two_steps, demo_dataset, capsys):
    capsys.readouterr()
    changed = dict(model__mod__aux_loss_weight=0.05, run__max_steps=2, optim__warmup_steps=0)
    assert _main(demo_dataset, two_steps, **changed) == 2
    err = capsys.readouterr().err
    assert "model.mod.aux_loss_weight: 0.01 -> 0.05" in err, err
    assert "--set checkpoint.accept_changes=[model.mod.aux_loss_weight]" in err, err


def test_accepted_max_steps_and_lr_reshape_the_schedule_from_the_resumed_step(two_steps, demo_dataset, capsys):
    from train.config import OptimConfig
    from train.engine import lr_lambda

    rc = _main(demo_dataset, two_steps, run__max_steps=4, optim__warmup_steps=0, optim__lr=0.002,
               checkpoint__accept_changes="[run.max_steps,optim.lr]")
    assert rc == 0, capsys.readouterr().err
    records = {r["step"]: r["optim/lr"] for r in read_metrics(two_steps / "metrics.jsonl")}
    old, new = lr_lambda(OptimConfig(warmup_steps=0), 2), lr_lambda(OptimConfig(warmup_steps=0), 4)
    assert records[2] == pytest.approx(3e-3 * old(2), rel=1e-9)  # the first run: cosine over 2 steps, smoke lr
    assert records[3] == pytest.approx(0.002 * new(3), rel=1e-9) and records[4] == pytest.approx(0.002 * new(4))
    # Each start kept its config; config.yaml is the latest one.
    configs = sorted(p.name for p in (two_steps / "configs").iterdir())
    assert configs == ["config_000.yaml", "config_001.yaml"]
    assert "max_steps: 2" in (two_steps / "configs" / "config_000.yaml").read_text()
    assert (two_steps / "config.yaml").read_text() == (two_steps / "configs" / "config_001.yaml").read_text()


def _pick_on_two_ranks(rank: int, root: str, port: int, answers) -> None:
    """One rank of test_rank_0_picks_the_checkpoint_for_every_rank: rank 1's own view of the shared filesystem is
    stale (it would pick step 2); `_check_resume` must hand it rank 0's pick."""
    from pathlib import Path

    import torch.distributed as dist

    from train.checkpoint import CheckpointManager
    from train.config import RunConfig
    from train.launch import DistEnv
    from train.loop import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        if rank == 1:
            CheckpointManager.latest = lambda self: "step_00000002"  # a stale copy of `latest`
        trainer = Trainer.__new__(Trainer)  # only what _check_resume reads
        trainer.cfg = RunConfig.from_dict({
            "model": {"preset": "debug"},
            "data": {"shards": {"t2i": "x.tar"}, "tasks": {"t2i": 1.0}, "batches_per_epoch": 1, "seq_len": 1024},
            "run": {"output_dir": root}})
        trainer.env = DistEnv(rank, 2, rank, 2, "127.0.0.1", port, "single")
        trainer.out = Path(root)
        trainer.fingerprint = {}
        answers[rank] = trainer._check_resume().checkpoint.resume
    finally:
        dist.destroy_process_group()


def test_rank_0_picks_the_checkpoint_for_every_rank(tmp_path):
    import torch.multiprocessing as mp

    from tests.train_helpers import free_port

    for step in (2, 4):
        tag = tmp_path / "checkpoints" / f"step_{step:08d}"
        tag.mkdir(parents=True)
        (tag / "COMPLETE").write_text(f"{step}\n")
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004\n")
    answers = mp.Manager().dict()
    mp.spawn(_pick_on_two_ranks, args=(str(tmp_path), free_port(), answers), nprocs=2, join=True)
    picked = str(tmp_path / "checkpoints" / "step_00000004")
    assert dict(answers) == {0: picked, 1: picked}
