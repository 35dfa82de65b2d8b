"""SIGTERM to the whole process group, as Slurm, scancel and torchrun deliver it (DataLoader workers included),
in every phase of a run: start-up, mid-step, mid-save, the end-of-run export and evaluation (train/signals.py).

Each run is a real `train/main.py` in its own session, signalled with os.killpg. Module fixtures chain several
attempts in one output directory, so the assertions share a handful of runs:

  single process, one loader worker:  start-up (1 s in) -> 75, nothing written; mid-save (a step directory
      without COMPLETE) -> that checkpoint completes, 75; mid-step -> resumes, checkpoints, 75; during the final
      evaluation -> the evaluation finishes, 0, "completed".
  two ranks under torchrun (ZeRO-3, one worker each): mid-step -> both ranks checkpoint the same
      step and exit 75; resumed, then signalled while the final checkpoint is written -> training completes, the
      export is written, the final evaluation is skipped and the summary says so.
The phases that no outside timing can hit reliably (after the process group, before the first step; before
the process group) run in-process with a function on the way patched to signal its own process.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.train_helpers import (DS_SINGLE, DS_ZERO3, REPO, SMOKE, child_env, complete_checkpoints, finish, free_port,
                                 kill_group, latest, overrides, read_metrics, release_process_group, settings, single_cmd,
                                 start, summary, torchrun_cmd)

# Small and quick, but with a loader worker (the process that used to die of the group's SIGTERM), periodic
# checkpoints to interrupt, an HF export and a short final evaluation.
RUN = dict(run__max_steps=8, data__num_workers=1, checkpoint__save_every=2, checkpoint__keep_last=2,
           checkpoint__export_hf="true", logging__eval_at_end="true", logging__eval_samples=5)
WORKER_DIED = "killed by signal"
# torchrun prints a SignalException traceback of its own; none may pass through the trainer or the loader.
OUR_TRACEBACK = (f'File "{REPO}/train/', f'File "{REPO}/data/')


def _incomplete_step_dir(out: Path, after: int) -> Path | None:
    """A step directory past `after` being written (no COMPLETE yet)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return None
    for d in sorted(root.glob("step_*")):
        if int(d.name.removeprefix("step_")) > after and not (d / "COMPLETE").exists():
            return d
    return None


def _signal_when(proc, ready, timeout: float = 180, poll_s: float = 0.005) -> object:
    """Poll `ready()` until it returns something, then SIGTERM the whole process group; returns what it gave."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            got = ready()
            if got:
                kill_group(proc, signal.SIGTERM)
                return got
            if proc.poll() is not None:
                raise AssertionError(f"the run exited with {proc.poll()} before the moment to signal it:\n"
                                     f"{proc.output()[-4000:]}")
            time.sleep(poll_s)
        raise AssertionError(f"the moment to signal never came within {timeout} s:\n{proc.output()[-3000:]}")
    except BaseException:
        kill_group(proc)
        raise


def _state(out: Path) -> dict:
    root = out / "checkpoints"
    return {"summary": summary(out) if (out / "summary.json").exists() else None,
            "complete": complete_checkpoints(out) if root.is_dir() else [],
            "latest": latest(out) if (root / "latest").exists() else None,
            "steps": sorted(r["step"] for r in read_metrics(out / "metrics.jsonl", missing_ok=True) if "loss/total" in r)}


# ----- one process ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single(demo_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("signals_single") / "run"
    cmd = single_cmd(overrides(demo_dataset, out, **RUN))
    stages = {"out": out}

    def attempt(name, ready=None, after_s=None):
        proc = start(cmd, child_env(), out.parent / f"{name}.log")
        t0 = time.monotonic()
        if after_s is not None:
            _signal_when(proc, lambda: time.monotonic() - t0 >= after_s)
        elif ready is not None:
            stages[f"{name}_at"] = _signal_when(proc, ready)
        result = finish(proc, timeout=180)
        stages[name] = {"result": result, **_state(out)}
        print(f"\n[signals] {name}: exit {result.rc} in {result.wall_s:.1f} s")
        return stages[name]

    attempt("startup", after_s=1.0)
    attempt("midsave", ready=lambda: _incomplete_step_dir(out, 0))
    saved = stages["midsave"]["summary"]["steps"]
    attempt("midstep", ready=lambda: any(s > saved + 1 for s in _state(out)["steps"]))
    attempt("final_eval", ready=lambda: "final evaluation" in (out.parent / "final_eval.log").read_text())
    return stages


def test_startup_signal_exits_75_with_nothing_written(single):
    st = single["startup"]
    r = st["result"]
    assert r.rc == 75, r.explain()
    assert "SIGTERM during start-up, before the process group: exiting with code 75" in r.output, r.explain()
    assert r.wall_s < 15, r.wall_s  # acted on at once, not after the start-up it interrupted
    assert st["complete"] == [] and st["steps"] == [], st


def test_signal_while_saving_completes_that_checkpoint_and_exits_75(single):
    st = single["midsave"]
    r, s = st["result"], st["summary"]
    assert r.rc == 75, r.explain()
    saving = int(single["midsave_at"].name.removeprefix("step_"))
    # The signal reached the loader worker too: it kept running, so the save finished and nothing crashed.
    assert WORKER_DIED not in r.output, r.explain()
    assert f"stop signal received while checkpointing step {saving}: that checkpoint is complete" in r.output, \
        r.explain()
    assert s["status"] == "preempted" and s["steps"] == saving, s
    assert st["latest"] == f"step_{saving:08d}" and st["latest"] in st["complete"], st
    assert st["steps"] == list(range(1, saving + 1)), st  # no step after the one saved


def test_signal_mid_step_resumes_checkpoints_and_exits_75(single):
    before = single["midsave"]["summary"]["steps"]
    st = single["midstep"]
    r, s = st["result"], st["summary"]
    assert r.rc == 75, r.explain()
    assert WORKER_DIED not in r.output, r.explain()
    assert f"at step {before}" in r.output and "resumed from" in r.output, r.explain()
    assert f"stop signal received: checkpointing at step {s['steps']}" in r.output or \
        f"while checkpointing step {s['steps']}" in r.output, r.explain()
    assert s["status"] == "preempted" and before < s["steps"] < 8, s
    assert s["steps_this_run"] == s["steps"] - before, s
    assert st["latest"] == f"step_{s['steps']:08d}" and st["latest"] in st["complete"], st
    assert st["steps"] == list(range(1, s["steps"] + 1)), st


def test_signal_during_final_evaluation_finishes_it_and_exits_0(single):
    st = single["final_eval"]
    r, s = st["result"], st["summary"]
    out = single["out"]
    assert r.rc == 0, r.explain()
    assert s["status"] == "completed" and s["steps"] == 8 and "eval_skipped" not in s, s
    assert "eval" in s and (out / "eval.json").exists(), s
    assert (out / "hf" / "config.json").exists()
    assert st["latest"] == "step_00000008" and st["steps"] == list(range(1, 9)), st


# ----- two ranks under torchrun --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(demo_dataset, tmp_path_factory):
    """ZeRO-3, 2 ranks, one loader worker each. torchrun gets the group's SIGTERM too: it passes SIGTERM on to the
    ranks, waits up to 30 s for them, and exits 1 (its own code, whatever the ranks returned). Not the deepspeed
    launcher here: its single-node `deepspeed` runner has no SIGTERM handler and dies at once (exit 143), leaving
    the ranks to its child launch.py, and the test, like srun, would take the group down with it."""
    out = tmp_path_factory.mktemp("signals_two") / "run"
    stages = {"out": out}
    sets = dict(RUN, run__max_steps=6, checkpoint__save_every=0)

    def attempt(name, ready):
        cmd = torchrun_cmd(overrides(demo_dataset, out, **sets), port=free_port(), ds_config=DS_ZERO3)
        proc = start(cmd, child_env(), out.parent / f"{name}.log")
        stages[f"{name}_at"] = _signal_when(proc, ready)
        result = finish(proc, timeout=240)
        stages[name] = {"result": result, **_state(out)}
        print(f"\n[signals] 2 ranks {name}: launcher exit {result.rc} in {result.wall_s:.1f} s")

    attempt("midstep", ready=lambda: any(s >= 2 for s in _state(out)["steps"]))
    attempt("final_save", ready=lambda: _incomplete_step_dir(out, 5))
    return stages


def test_two_ranks_checkpoint_the_same_step_and_exit_75(two_ranks):
    st = two_ranks["midstep"]
    r, s = st["result"], st["summary"]
    assert s is not None, r.explain()
    assert s["status"] == "preempted" and s["world_size"] == 2 and 2 <= s["steps"] < 6, s
    assert st["latest"] == f"step_{s['steps']:08d}" and st["latest"] in st["complete"], st
    ckpt = two_ranks["out"] / "checkpoints" / st["latest"]
    assert {p.name for p in ckpt.glob("trainer_state_rank*.json")} == {"trainer_state_rank0.json",
                                                                       "trainer_state_rank1.json"}
    assert r.output.count("stop signal received: checkpointing at step") == 1, r.explain()  # rank 0 logs
    assert WORKER_DIED not in r.output and not any(t in r.output for t in OUR_TRACEBACK), r.explain()
    assert r.rc == 1  # torchrun's own code once it was signalled (see the fixture), not the ranks' 75


def test_two_ranks_signalled_while_the_final_checkpoint_is_written_complete_the_run(two_ranks):
    stopped = two_ranks["midstep"]["summary"]["steps"]
    st = two_ranks["final_save"]
    r, s = st["result"], st["summary"]
    assert "resumed from" in r.output and f"at step {stopped}" in r.output, r.explain()
    assert two_ranks["final_save_at"].name == "step_00000006"
    assert s["status"] == "completed" and s["steps"] == 6 and s["steps_this_run"] == 6 - stopped, s
    assert "stop signal before the final evaluation" in s["eval_skipped"] and "eval" not in s, s
    assert not (two_ranks["out"] / "eval.json").exists()
    assert (two_ranks["out"] / "hf" / "config.json").exists()  # the export was finished
    assert st["latest"] == "step_00000006" and "step_00000006" in st["complete"], st
    assert WORKER_DIED not in r.output and not any(t in r.output for t in OUR_TRACEBACK), r.explain()


# ----- in-process: the start-up phases no outside timing can hit ----------------------------------------------
@pytest.fixture
def in_process(monkeypatch):
    """`train.main.main` in this process with a free MASTER_PORT; its exported variables and process group are
    undone afterwards."""

    saved = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "OMPI_COMM_WORLD_RANK",
                "PMI_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    os.environ["MASTER_PORT"] = str(free_port())
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    release_process_group()
    os.environ.clear()
    os.environ.update(saved)
    # main() puts the handlers back: a SIGTERM to pytest must still end pytest.
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def _main(dataset, out, **kw) -> int:
    from train.main import main

    argv = ["--config", str(SMOKE), "--deepspeed_config", str(DS_SINGLE)]
    for item in settings(dataset, out, **kw):
        argv += ["--set", item]
    return main(argv)


def _signal_self_after(monkeypatch, module, name):
    real = getattr(module, name)

    def then_signal(*a, **k):
        result = real(*a, **k)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(module, name, then_signal)


def test_signal_before_the_process_group_exits_75_at_once(in_process, demo_dataset, tmp_path, monkeypatch, capsys):
    import train.config
    import train.launch

    _signal_self_after(monkeypatch, train.config, "check_environment")
    monkeypatch.setattr(train.launch, "init_distributed",
                        lambda *a, **k: pytest.fail("the start-up went on after the signal"))
    out = tmp_path / "run"
    assert _main(demo_dataset, out) == 75
    assert "SIGTERM during start-up, before the process group: exiting with code 75" in capsys.readouterr().err
    s = summary(out)  # the output directory exists (check_environment made it) and had no summary
    assert s["status"] == "preempted" and s["stopped_during"] == "startup" and s["steps"] == 0, s


def test_signal_after_the_engine_before_the_first_step_exits_75(in_process, demo_dataset, tmp_path, monkeypatch,
                                                                 capsys):
    import train.loop

    _signal_self_after(monkeypatch, train.loop.Trainer, "_resume")
    out = tmp_path / "run"
    assert _main(demo_dataset, out) == 75
    assert "stop signal before the first step: exiting with code 75" in capsys.readouterr().out
    assert not (out / "checkpoints").exists() or complete_checkpoints(out) == []
    s = summary(out)
    assert s["status"] == "preempted" and s["stopped_during"] == "startup" and s["steps"] == 0, s
    assert s["signal"] == "SIGTERM"
