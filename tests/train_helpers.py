"""Helpers shared by the training tests: command lines for `train/main.py` under each launcher, subprocesses
that always die with their process group, and readers for what a run writes (metrics.jsonl, summary.json).

Every run is CPU, fp32, the debug preset of train/configs/smoke.yaml shrunk by `--set` overrides, in a tmp
dir. Each subprocess gets its own free MASTER_PORT, so tests never collide with another job's 29500.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "train" / "main.py"
SMOKE = REPO / "train" / "configs" / "smoke.yaml"
BIN = Path(sys.executable).parent  # the venv's bin: deepspeed and torchrun live next to python
DS_ZERO3 = REPO / "ds_configs" / "zero3_cpu.json"
DS_PIPELINE = REPO / "ds_configs" / "pipeline_cpu.json"
DS_SINGLE = REPO / "ds_configs" / "single_cpu.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def settings(dataset: Path, out: Path, **fields) -> list[str]:
    """`section.field=value` overrides for a small CPU run of the smoke config; `fields` use
    `section__field` keys (e.g. run__max_steps=6) and override these defaults."""
    base = {
        "data.dataset_dir": str(dataset),
        "run.output_dir": str(out),
        "run.device": "cpu",
        "parallel.precision": "fp32",
        "data.micro_batch_size": 2,
        "data.num_workers": 0,
        "logging.progress_bar": "false",
        "checkpoint.export_hf": "false",
        "checkpoint.save_every": 0,
        "checkpoint.resume": "auto",
        "run.max_steps": 6,
    }
    base.update({k.replace("__", "."): v for k, v in fields.items()})
    return [f"{key}={value}" for key, value in base.items()]


def overrides(dataset: Path, out: Path, **fields) -> list[str]:
    """The same as `--set` arguments for train/main.py."""
    args: list[str] = []
    for item in settings(dataset, out, **fields):
        args += ["--set", item]
    return args


def child_env(port: bool = False, threads: int | None = 1, **extra: str) -> dict[str, str]:
    """Environment of a training subprocess: CPU accelerator, no launcher variables inherited, one thread
    per rank (2 shared cores; None keeps torch's default). MASTER_PORT only with `port` (mpirun needs it; a
    lone process picks its own, the deepspeed launcher and torchrun take --master_port)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "OMP_NUM_THREADS") and not k.startswith(("OMPI_", "PMI_", "PMIX_", "SLURM_"))}
    # PYTHONFAULTHANDLER: a rank that dies of a signal (an abort at exit, a segfault) shows where in the log.
    env.update(DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", PYTHONFAULTHANDLER="1")
    if port:
        env["MASTER_PORT"] = str(free_port())
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(extra)
    return env


def single_cmd(args: Iterable[str], config: Path = SMOKE, ds_config: Path = DS_SINGLE) -> list[str]:
    return [sys.executable, str(MAIN), "--config", str(config), "--deepspeed_config", str(ds_config), *args]


def deepspeed_cmd(args: Iterable[str], port: int, nprocs: int = 2, ds_config: Path = DS_ZERO3) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", str(port), str(MAIN),
            "--config", str(SMOKE), "--deepspeed_config", str(ds_config), *args]


def torchrun_cmd(args: Iterable[str], port: int, nprocs: int = 2, ds_config: Path = DS_PIPELINE) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", str(port), str(MAIN),
            "--config", str(SMOKE), "--deepspeed_config", str(ds_config), *args]


class Run:
    """A finished subprocess: exit code, combined output, wall time."""

    def __init__(self, cmd: list[str], rc: int, output: str, wall_s: float) -> None:
        self.cmd, self.rc, self.output, self.wall_s = cmd, rc, output, wall_s

    def explain(self) -> str:
        return f"command: {' '.join(self.cmd)}\nexit code {self.rc}\n--- output (tail) ---\n{self.output[-6000:]}"


class Launched:
    """A running subprocess in its own session (so the whole launcher tree can be signalled), output to a log."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        self.cmd, self.log = cmd, log
        self._log_file = open(log, "w")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(cmd: list[str], env: dict[str, str], log: Path) -> Launched:
    return Launched(cmd, env, log)


def kill_group(launched: Launched, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(launched.pid, sig)
    except ProcessLookupError:
        pass


def finish(launched: Launched, timeout: float) -> Run:
    """Wait for the process (killing its process group past `timeout`, or on any error here) and return what
    it did. Whatever it left behind in its group (launcher children, loader workers) is killed too."""
    try:
        rc = launched.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(launched)
        launched.proc.wait()
        rc = None
    except BaseException:
        kill_group(launched)
        raise
    finally:
        launched._log_file.close()
    kill_group(launched)
    out = launched.output()
    if rc is None:
        rc = -signal.SIGKILL
        out += f"\n[test] killed after the {timeout} s timeout"
    return Run(launched.cmd, rc, out, time.perf_counter() - launched.t0)


def run(cmd: list[str] | Callable[[int], list[str]], env: dict[str, str], log: Path, timeout: float = 240) -> Run:
    """Run to the end. `cmd` may be a function of a rendezvous port (a launcher's --master_port). A free port
    can be taken by another process's connection between `free_port()` and the bind on this busy shared
    machine, so a run that died of EADDRINUSE is started once more on a fresh port."""
    for attempt in (1, 2):
        port = free_port()
        argv = cmd(port) if callable(cmd) else cmd
        result = finish(start(argv, {**env, "MASTER_PORT": str(port)} if "MASTER_PORT" in env else env, log),
                        timeout)
        if result.rc == 0 or "EADDRINUSE" not in result.output:
            return result
    return result


def wait_for_step(proc: Launched, metrics: Path, step: int, timeout: float = 180) -> None:
    """Block until metrics.jsonl holds `step` (or fail if the process exits or time runs out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r["step"] >= step for r in read_metrics(metrics, missing_ok=True)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run exited with {proc.poll()} before logging step {step}:\n"
                                 f"{proc.output()[-4000:]}")
        time.sleep(0.05)
    kill_group(proc)
    raise AssertionError(f"step {step} did not appear in {metrics} within {timeout} s")


def read_metrics(path: Path, missing_ok: bool = False) -> list[dict]:
    if missing_ok and not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if missing_ok:  # a line being written right now
                continue
            raise
    return records


def losses(path: Path) -> dict[int, float]:
    """step -> loss/total from metrics.jsonl."""
    return {r["step"]: r["loss/total"] for r in read_metrics(path)}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def complete_checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_") and (p / "COMPLETE").exists())


def latest(out: Path) -> str:
    return (out / "checkpoints" / "latest").read_text().strip()


def assert_hf_export_loads(hf_dir: Path, seq_len: int = 24) -> None:
    """<output_dir>/hf loads with our `UnifiedTransformer.from_hf` and with transformers'
    `Emu3ForCausalLM.from_pretrained`, and both give the same logits for a dense task (a task with no MoD
    capacity runs every layer on every token, which is what the plain HF model computes)."""
    import torch
    from transformers import Emu3ForCausalLM

    from model import UnifiedTransformer

    ours = UnifiedTransformer.from_hf(hf_dir).float().eval()
    theirs = Emu3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    cfg = ours.config
    dense = [t for t in cfg.mod.tasks
             if all(cfg.mod.capacity_of(layer, t) >= 1.0 for layer in range(cfg.num_hidden_layers))]
    assert dense, f"no dense task in {cfg.mod.tasks} to compare against the plain HF model"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=g)
    task_ids = torch.full((2,), cfg.mod.tasks.index(dense[0]), dtype=torch.long)
    with torch.no_grad():
        a = ours(ids, task_ids=task_ids).logits
        b = theirs(ids).logits
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def release_process_group() -> None:
    """Undo an in-process run's process group for the tests after it, as main() does at the end of a run:
    through DeepSpeed, which caches groups made from the world (a later in-process run in this pytest process
    would otherwise reuse a destroyed one: "Group ... is not registered"). Also after a run that raised."""
    from train.launch import shutdown_distributed

    shutdown_distributed()


@contextlib.contextmanager
def main_in_this_process():
    """Around in-process `train.main.main` calls: a free MASTER_PORT for their world-of-1 gloo group; the
    environment a run exports (RANK, WORLD_SIZE, ...) and the process group are undone afterwards for later
    tests, also after a run that raised."""
    saved = dict(os.environ)
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        yield
    finally:
        release_process_group()
        os.environ.clear()
        os.environ.update(saved)


def main_here(dataset: Path, out: Path, **fields) -> int:
    """`train.main.main` in this process on the smoke config with `settings(dataset, out, **fields)`."""
    from train.main import main

    argv = ["--config", str(SMOKE), "--deepspeed_config", str(DS_SINGLE)]
    for item in settings(dataset, out, **fields):
        argv += ["--set", item]
    return main(argv)
