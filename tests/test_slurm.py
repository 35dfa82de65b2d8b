"""slurm/train_emu3_mod.sh on a real one-node Slurm cluster (slurm/local_cluster.sh), and mpirun launches.

The cluster is the real thing (munged, slurmctld, slurmd of Slurm 22.05 on localhost), started here when
this machine can (root, Slurm installed or installable by scripts/system_deps.sh), else every test skips
with the reason. A cluster that was already running is used and left running; one started here is stopped
at the end. Every job runs 2 CPU ranks (CPU_MODE=1) of the smoke configuration for a few steps.

  - the sbatch script completes: TensorBoard events, a complete checkpoint, summary.json with the steps;
  - preemption: `scancel --signal=USR1` (what `#SBATCH --signal=USR1@300` does, to every task of every
    step and not the batch shell) makes the ranks checkpoint and exit 75; the script requeues the job;
    the requeued run resumes from that step and its per-step losses equal an uninterrupted run's;
  - `scancel` (SIGTERM to everything): the ranks checkpoint, and the job is not requeued;
  - bad settings (missing config, non-numeric or mismatched GPUS_PER_NODE, no GPUs without CPU_MODE, a
    bad config value) fail fast with a clear message in the job log;
  - `mpirun -np 2` of the trainer inside an sbatch allocation, with the Slurm-installed Open MPI (Slurm's
    own variables are then the batch shell's, and the MPI ones must win). `mpirun` outside Slurm is
    tested in tests/test_train_distributed.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = REPO / "slurm" / "local_cluster.sh"
SCRIPT = "slurm/train_emu3_mod.sh"  # submitted relative to the repo, as the docs tell users to
SBIN_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
STEPS = 16
# Few steps, no data workers (2 cores), no periodic checkpoint: the only mid-run checkpoint in the
# preemption test is the one the signal asks for.
TRAIN_SETS = f"run.max_steps={STEPS} checkpoint.save_every=0 data.num_workers=0"
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"]
# Variables of an enclosing launcher or of the user's own runs must not leak into the jobs.
LEAKY_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "OMPI_", "PMI_", "PMIX_")
LEAKY = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
         "CUDA_VISIBLE_DEVICES", "CONFIG", "DS_CONFIG", "OUTPUT_DIR", "DATA_DIR", "EXTRA_SETS", "GPUS_PER_NODE",
         "CPU_MODE", "RESUME", "PREPARE_DEMO_DATA", "MAX_REQUEUES", "PYTHON", "REPO_DIR", "SRUN_WAIT"}


# ----- the cluster -------------------------------------------------------------------------------------
def _why_no_cluster() -> str | None:
    """None when this machine can run the local cluster, else the reason to skip."""
    if os.geteuid() != 0:
        return "needs root: slurm/local_cluster.sh runs munged, slurmctld and slurmd as root"
    if all(shutil.which(b, path=SBIN_PATH) for b in SLURM_BINARIES):
        return None
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it (see scripts/system_deps.sh)"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "system_deps.sh")], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        return f"scripts/system_deps.sh could not install Slurm: {(proc.stdout + proc.stderr)[-500:]}"
    missing = [b for b in SLURM_BINARIES if not shutil.which(b, path=SBIN_PATH)]
    return f"still missing after scripts/system_deps.sh: {missing}" if missing else None


def _cluster_cmd(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_CLUSTER), command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": SBIN_PATH})


# A stop at a step boundary, or while that step's periodic checkpoint was written (which is then used as is).
STOPPED_AT = r"stop signal received(?:: checkpointing at step| while checkpointing step) (\d+)"


@pytest.fixture(scope="module")
def cluster() -> dict[str, str]:
    """The environment for sbatch/scontrol against the running local cluster."""
    reason = _why_no_cluster()
    if reason:
        pytest.skip(reason)
    was_up = _cluster_cmd("status").returncode == 0
    if not was_up:
        proc = _cluster_cmd("start")
        assert proc.returncode == 0, f"slurm/local_cluster.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    conf = _cluster_cmd("env").stdout.strip().removeprefix("export SLURM_CONF=")
    env = {k: v for k, v in os.environ.items() if k not in LEAKY and not k.startswith(LEAKY_PREFIXES)}
    env.update(SLURM_CONF=conf, PATH=SBIN_PATH, DS_ACCELERATOR="cpu")
    yield env
    if not was_up:
        proc = _cluster_cmd("stop")
        assert proc.returncode == 0, proc.stderr


def test_local_cluster_is_idempotent(cluster):
    again = _cluster_cmd("start")
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    status = _cluster_cmd("status")
    assert status.returncode == 0 and "idle" in status.stdout, status.stdout


# ----- jobs ----------------------------------------------------------------------------------------------
def sbatch(env: dict[str, str], job_env: dict[str, str], options: list[str], log_dir: Path,
           script: str = SCRIPT) -> str:
    """Submit from the repository root; returns the job id. The job log is log_dir/job-<id>.out."""
    cmd = ["sbatch", "--parsable", f"--output={log_dir}/job-%j.out", *options]
    cmd.append(script)
    proc = subprocess.run(cmd, cwd=REPO, env={**env, **job_env}, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_info(env: dict[str, str], job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                         timeout=30).stdout
    return {k: v for k, v in re.findall(r"(JobState|ExitCode|Restarts|Reason)=(\S+)", out)}


def wait_job(env: dict[str, str], job_id: str, timeout: float, restarts: int = 0) -> dict[str, str]:
    """Poll (0.5 s; `sbatch --wait` polls at 2, 8, 32 s) until the job is final after `restarts` requeues."""
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    final_since = None
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in FINAL_STATES:
            if int(info.get("Restarts", "0")) >= restarts:
                return info
            # Final without the expected requeue; allow a moment in case the requeue is in flight.
            final_since = final_since or time.monotonic()
            if time.monotonic() - final_since > 5:
                pytest.fail(f"job {job_id} ended without being requeued {restarts} time(s): {info}")
        else:
            final_since = None
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], env=env, timeout=30)
    pytest.fail(f"job {job_id} not done after {timeout:.0f} s: {info}")


def job_log(log_dir: Path, job_id: str) -> str:
    return (log_dir / f"job-{job_id}.out").read_text(errors="replace")


def train_env(demo_dataset: Path, out: Path, extra: str = TRAIN_SETS, **more: str) -> dict[str, str]:
    return {"CPU_MODE": "1", "GPUS_PER_NODE": "2", "CONFIG": "train/configs/smoke.yaml",
            "DATA_DIR": str(demo_dataset), "OUTPUT_DIR": str(out), "EXTRA_SETS": extra, **more}


def read_metrics(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss/total"] for r in rows}


def assert_complete_checkpoint(out: Path, step: int) -> None:
    tag = out / "checkpoints" / f"step_{step:08d}"
    assert (tag / "COMPLETE").is_file(), f"no complete checkpoint {tag}: {sorted((out / 'checkpoints').iterdir())}"


def wait_for_training(env: dict[str, str], job: str, out: Path, log_dir: Path, steps: int = 2) -> None:
    """Return once the ranks have logged `steps` steps, so their signal handlers are installed (before
    that, SIGUSR1's default action would just kill them)."""
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert time.monotonic() < deadline, f"job {job} never started training: {job_info(env, job)}"
        assert job_info(env, job).get("JobState") not in FINAL_STATES, job_log(log_dir, job)[-3000:]
        time.sleep(0.2)


@pytest.fixture(scope="module")
def completed_run(cluster, demo_dataset, tmp_path_factory):
    """`sbatch slurm/train_emu3_mod.sh`, smoke config, 2 CPU ranks, run to the end (shared by two tests)."""
    base = tmp_path_factory.mktemp("slurm_complete")
    out = base / "run"
    t0 = time.monotonic()
    job = sbatch(cluster, train_env(demo_dataset, out), CPU_JOB, base)
    info = wait_job(cluster, job, timeout=240)
    return {"job": job, "info": info, "out": out, "log": job_log(base, job), "seconds": time.monotonic() - t0}


@pytest.mark.slow
def test_sbatch_smoke_run_completes(completed_run):
    info, out, log = completed_run["info"], completed_run["out"], completed_run["log"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-3000:]}"
    # Two ranks found each other through srun's SLURM_* variables, not two single-process runs.
    assert "2 process(es) via slurm" in log, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS and summary["world_size"] == 2
    assert list((out / "tensorboard").glob("events.out.tfevents.*")), "no TensorBoard event file"
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    assert_complete_checkpoint(out, STEPS)
    assert sorted(read_metrics(out)) == list(range(1, STEPS + 1))
    # Logs under the output dir: the script's own lines and the ranks' output.
    job = completed_run["job"]
    assert "training finished (exit 0)" in (out / "logs" / f"job-{job}.log").read_text()
    assert f"[train] checkpoint {out}/checkpoints/step_{STEPS:08d}" in (out / "logs" / f"train-{job}.log").read_text()


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes_exactly(cluster, demo_dataset, completed_run, tmp_path):
    out = tmp_path / "run"
    job = sbatch(cluster, train_env(demo_dataset, out), CPU_JOB, tmp_path)
    wait_for_training(cluster, job, out, tmp_path)
    # Without --batch/--full, scancel signals every task of every step but not the batch shell: exactly
    # what `#SBATCH --signal=USR1@300` does before the time limit.
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster, check=True, timeout=30)
    info = wait_job(cluster, job, timeout=240, restarts=1)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", \
        f"{info}\n{log[-4000:]}"

    stopped = re.search(STOPPED_AT, log)
    assert stopped, log[-4000:]
    k = int(stopped.group(1))
    assert 2 <= k < STEPS, f"the signal was handled at step {k}, not mid-run"
    assert f"requeueing job {job}" in log
    assert f"resumed from {out}/checkpoints/step_{k:08d} at step {k}" in log, log[-4000:]
    assert_complete_checkpoint(out, k)
    assert_complete_checkpoint(out, STEPS)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["steps_this_run"] == STEPS - k
    # Continuity: every step logged once, and the interrupted run's losses are the uninterrupted run's
    # (same seed, same data order): the resume restored weights, optimizer, schedule and data position.
    interrupted, reference = read_metrics(out), read_metrics(completed_run["out"])
    assert sorted(interrupted) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert math.isclose(interrupted[step], reference[step], rel_tol=1e-4), \
            f"step {step}: loss {interrupted[step]} after resume at {k}, {reference[step]} uninterrupted"


@pytest.mark.slow
def test_scancel_checkpoints_and_is_not_requeued(cluster, demo_dataset, tmp_path):
    # scancel sends SIGTERM to the ranks and to the batch shell: the ranks checkpoint within KillWait,
    # and the script must not requeue a job its user cancelled.
    out = tmp_path / "run"
    job = sbatch(cluster, train_env(demo_dataset, out), CPU_JOB, tmp_path)
    wait_for_training(cluster, job, out, tmp_path)
    subprocess.run(["scancel", job], env=cluster, check=True, timeout=30)
    info = wait_job(cluster, job, timeout=120)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", f"{info}\n{log[-3000:]}"
    stopped = re.search(STOPPED_AT, log)
    assert stopped, log[-3000:]
    assert_complete_checkpoint(out, int(stopped.group(1)))
    assert "not requeueing" in log and "requeueing job" not in log, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["steps"] == int(stopped.group(1))


def test_bad_settings_fail_fast_with_a_clear_message(cluster, demo_dataset, tmp_path):
    base = train_env(demo_dataset, tmp_path / "run")
    cases = {  # name: (job env, sbatch options, expected message in the job log, exit code)
        "missing config": ({**base, "CONFIG": "train/configs/nope.yaml"}, CPU_JOB,
                           f"CONFIG={REPO}/train/configs/nope.yaml: no such file", 2),
        "gpu count not a number": ({**base, "GPUS_PER_NODE": "eight"}, CPU_JOB,
                                   "GPUS_PER_NODE must be a positive integer, got 'eight'", 2),
        "gpu count vs allocation": ({**base, "GPUS_PER_NODE": "4"}, CPU_JOB,
                                    "GPUS_PER_NODE=4 but the allocation has 2 task(s) per node", 2),
        "no gpus without cpu mode": ({**base, "CPU_MODE": "0"}, CPU_JOB, "no GPUs in this allocation", 2),
        "bad config value": ({**base, "EXTRA_SETS": "optim.lr=-1"}, CPU_JOB, "optim.lr must be a number", 2),
    }
    jobs = {name: sbatch(cluster, job_env, options, tmp_path) for name, (job_env, options, _, _) in cases.items()}
    for name, (_, _, message, code) in cases.items():
        info = wait_job(cluster, jobs[name], timeout=120)
        log = job_log(tmp_path, jobs[name])
        assert info["JobState"] == "FAILED" and info["ExitCode"] == f"{code}:0", f"{name}: {info}\n{log}"
        assert message in log, f"{name}: expected {message!r} in the job log:\n{log}"
        if name != "bad config value":  # caught by the script itself: no rank was started
            assert "srun" not in log and "[train]" not in log, f"{name}: ranks started:\n{log}"
    assert "bad configuration (exit 2)" in job_log(tmp_path, jobs["bad config value"])


# ----- mpirun inside an allocation ----------------------------------------------------------------------
def _mpi_train_cmd(demo_dataset: Path, out: Path) -> list[str]:
    return [str(REPO / ".venv" / "bin" / "python"), "train/main.py", "--config", "train/configs/smoke.yaml",
            "--deepspeed_config", "ds_configs/zero3_cpu.json", "--set", "run.max_steps=3",
            "--set", "checkpoint.save_every=0", "--set", "data.num_workers=0", "--set", f"run.output_dir={out}",
            "--set", f"data.dataset_dir={demo_dataset}", "--set", "run.device=cpu"]


@pytest.mark.slow
def test_mpirun_inside_an_sbatch_allocation(cluster, demo_dataset, tmp_path):
    # The batch shell's SLURM_PROCID=0/SLURM_NTASKS=2 reach both ranks; train/launch.py must take the
    # Open MPI variables instead, or both ranks would claim rank 0.
    if shutil.which("mpirun") is None:
        pytest.skip("no mpirun: scripts/system_deps.sh installs Open MPI")
    out = tmp_path / "run"
    wrap = "mpirun --allow-run-as-root -np 2 " + " ".join(_mpi_train_cmd(demo_dataset, out))
    job = sbatch(cluster, {}, ["--ntasks=2", "--cpus-per-task=1", "--time=10"], tmp_path, script=f"--wrap={wrap}")
    info = wait_job(cluster, job, timeout=240)
    log = job_log(tmp_path, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    assert "2 process(es) via openmpi" in log, log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["world_size"] == 2


# ----- data preparation array job ---------------------------------------------------------------------
def test_prepare_data_array_job_then_merge(cluster, demo_dataset, tmp_path):
    """slurm/prepare_data_array.sh: one array task per input file, each a dataset part; MERGE=1 makes the one
    dataset training reads. A bad setting fails fast with the variable named in the task's log."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i in range(2):
        (inputs / f"part_{i}.txt").write_text("".join(f"line {i} number {n} is here.\n" for n in range(12)))
    out = tmp_path / "dataset"
    job_env = {"MODE": "text", "INPUT_DIR": str(inputs), "OUT_DIR": str(out),
               "TOKENIZER": str(demo_dataset / "tokenizer.model"), "VISUAL_SIZE": "256",
               "EXTRA_ARGS": "--shard-max-count 5"}
    script = "slurm/prepare_data_array.sh"
    array = sbatch(cluster, job_env, ["--array=0-1", "--cpus-per-task=1", "--time=5", "--output",
                                      f"{tmp_path}/prep-%A_%a.out"], tmp_path, script=script)
    for task in ("0", "1"):
        info = wait_job(cluster, f"{array}_{task}", timeout=180)
        assert info.get("JobState") == "COMPLETED", (info, (tmp_path / f"prep-{array}_{task}.out").read_text())
    merge = sbatch(cluster, {**job_env, "MERGE": "1"}, ["--cpus-per-task=1", "--time=5"], tmp_path, script=script)
    info = wait_job(cluster, merge, timeout=120)
    assert info.get("JobState") == "COMPLETED", (info, job_log(tmp_path, merge))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"]["lm"] == 24
    bad = sbatch(cluster, {**job_env, "INPUT_DIR": str(tmp_path / "missing")}, ["--array=0", "--cpus-per-task=1", "--time=5",
                                                                               "--output", f"{tmp_path}/bad-%A_%a.out"],
                 tmp_path, script=script)
    info = wait_job(cluster, f"{bad}_0", timeout=60)
    assert info.get("JobState") == "FAILED"
    assert "no *.txt files in INPUT_DIR" in (tmp_path / f"bad-{bad}_0.out").read_text()
