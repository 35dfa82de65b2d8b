"""train/launch.py: rank/world/master discovery per launcher (pure, from env dicts) and real 2-process runs.

The env dicts mirror what each launcher sets; the Slurm ones were measured on Slurm 22.05 (`sbatch -n 2`:
the batch shell has no SLURM_STEP_ID; `srun` adds SLURM_STEP_ID/SLURM_STEP_NUM_TASKS; `mpirun` inside the
job leaves every rank with the batch shell's SLURM_PROCID=0). The real runs (`mpirun -np 2`, `torchrun
--nproc_per_node 2`) start gloo process groups through `init_distributed` and all-reduce a tensor; the
first one on a machine JIT-compiles DeepSpeed's shm_comm op (~30 s, then cached).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from train.launch import (
    DistEnv, add_launcher_args, discover, expand_hostlist, expand_tasks_per_node, init_distributed, select_device,
)

REPO = Path(__file__).resolve().parents[1]


# ----- discover(): one env dict per launcher ---------------------------------------------------------
def test_plain_python_is_rank_0_of_1():
    env = discover({"PATH": "/usr/bin", "HOME": "/root"})
    assert env == DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")
    assert env.is_main and env.single_node


def test_torchrun():
    environ = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1",
               "MASTER_ADDR": "node7", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "none"}
    assert discover(environ) == DistEnv(3, 8, 1, 2, "node7", 29400, "torchrun")


def test_deepspeed_launcher_uses_local_size():
    # deepspeed/launcher/launch.py sets LOCAL_SIZE (not LOCAL_WORLD_SIZE) and CROSS_RANK/CROSS_SIZE.
    environ = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
               "CROSS_SIZE": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert discover(environ) == DistEnv(5, 8, 1, 4, "10.0.0.1", 29500, "deepspeed")


def test_hand_set_rank_on_one_node_defaults_address_and_local_rank():
    env = discover({"RANK": "1", "WORLD_SIZE": "2"})
    assert (env.local_rank, env.local_world_size, env.master_addr, env.master_port, env.launcher) == \
        (1, 2, "127.0.0.1", 29500, "env")


def test_hand_set_rank_on_several_nodes_needs_master_addr():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        discover({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})


def _slurm_step(**extra: str) -> dict[str, str]:
    """What `srun` gives task 5 of an 8-task, 2-node step (plus the job's variables)."""
    return {"SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[001-004,010],login1", "SLURM_NTASKS": "8",
            "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_STEP_ID": "0",
            "SLURM_STEPID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
            "SLURM_TASKS_PER_NODE": "4(x2)", **extra}


def test_slurm_step():
    env = discover(_slurm_step())
    # First host of the nodelist; port 20000 + 123456 % 10000.
    assert env == DistEnv(5, 8, 1, 4, "gpu001", 23456, "slurm")


def test_slurm_step_prefers_the_step_nodelist_and_takes_an_explicit_master():
    assert discover(_slurm_step(SLURM_STEP_NODELIST="gpu[003-004]")).master_addr == "gpu003"
    env = discover(_slurm_step(MASTER_ADDR="10.1.2.3", MASTER_PORT="31000"))
    assert (env.master_addr, env.master_port) == ("10.1.2.3", 31000)


def test_slurm_port_differs_between_jobs_and_is_stable_within_one():
    ports = {discover(_slurm_step(SLURM_JOB_ID=str(j), SLURM_PROCID=str(r))).master_port
             for j in (7, 8) for r in (0, 5)}
    assert ports == {20007, 20008}


def test_slurm_uneven_tasks_per_node():
    # 5 tasks: 2 + 2 + 1; the last node's only task is rank 4.
    base = dict(SLURM_NTASKS="5", SLURM_STEP_NUM_TASKS="5", SLURM_STEP_TASKS_PER_NODE="2(x2),1",
                SLURM_PROCID="4", SLURM_LOCALID="0")
    assert discover(_slurm_step(**base, SLURM_NODEID="2")).local_world_size == 1
    no_nodeid = {k: v for k, v in _slurm_step(**base).items() if k != "SLURM_NODEID"}
    assert discover(no_nodeid).local_world_size == 1
    assert discover({**no_nodeid, "SLURM_PROCID": "1", "SLURM_LOCALID": "1"}).local_world_size == 2


def test_slurm_batch_shell_is_one_process():
    # Measured inside `sbatch -n 2`: no step id, so this shell is a single process.
    batch = {"SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "vm", "SLURM_NTASKS": "2", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2", "SLURM_NNODES": "1"}
    assert discover(batch) == DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")


def test_slurm_step_with_a_different_task_count_is_not_ours():
    environ = _slurm_step(SLURM_STEP_NUM_TASKS="2")
    assert discover(environ).launcher == "single"


def test_mpirun_inside_an_allocation_uses_open_mpi():
    # Measured: ranks of `mpirun -np 2` inside `sbatch -n 2` inherit SLURM_PROCID=0, SLURM_NTASKS=2.
    environ = {"SLURM_JOB_ID": "2", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "vm",
               "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_RANK": "1"}
    assert discover(environ) == DistEnv(1, 2, 1, 2, "127.0.0.1", 29500, "openmpi")
    # Open MPI's remote daemons run in a Slurm step of their own: a disagreeing size means not ours.
    in_daemon_step = {**environ, "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "OMPI_COMM_WORLD_SIZE": "16",
                      "OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    assert discover(in_daemon_step).launcher == "openmpi"


def test_open_mpi_on_several_nodes_leaves_the_address_to_mpi():
    environ = {"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
               "OMPI_COMM_WORLD_LOCAL_SIZE": "8"}
    env = discover(environ)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (9, 16, 1, 8)
    assert env.master_addr is None  # resolve() broadcasts rank 0's hostname
    with pytest.raises(ValueError, match="resolve"):
        init_distributed(env)
    assert discover({**environ, "MASTER_ADDR": "head0"}).master_addr == "head0"


def test_mpich_hydra():
    environ = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2",
               "PMI_FD": "5", "MASTER_PORT": "12345"}
    env = discover(environ)
    assert env == DistEnv(2, 4, 0, 2, None, 12345, "pmi")
    assert discover({**environ, "MPI_LOCALNRANKS": "4"}).master_addr == "127.0.0.1"


def test_mpi_only_known_to_mpi_points_to_resolve():
    with pytest.raises(ValueError, match=r"PMIX_RANK=3.*resolve\(\)"):
        discover({"PMIX_RANK": "3", "PMIX_NAMESPACE": "prterun-x"})


def test_precedence_explicit_over_slurm_over_mpi():
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
    assert discover({**_slurm_step(), **ompi, "RANK": "0", "WORLD_SIZE": "1"}).launcher == "env"
    assert discover({**_slurm_step(), **ompi}).launcher == "slurm"
    assert discover(ompi).launcher == "openmpi"


def test_bad_values_name_the_variable():
    with pytest.raises(ValueError, match=r"RANK='x' is not an integer"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"rank 2 is outside \[0, 2\)"):
        discover({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="WORLD_SIZE is not set"):
        discover({"RANK": "0"})
    with pytest.raises(ValueError, match="MASTER_PORT='http'"):
        discover({"MASTER_PORT": "http"})
    with pytest.raises(ValueError, match="not a TCP port"):
        discover({"MASTER_PORT": "70000"})
    with pytest.raises(ValueError, match=r"SLURM_STEP_TASKS_PER_NODE='4\(y2\)'"):
        discover(_slurm_step(SLURM_STEP_TASKS_PER_NODE="4(y2)"))


# ----- Slurm syntax ----------------------------------------------------------------------------------
# Expected lists are `scontrol show hostnames` output (Slurm 22.05), except "a[1-2]-ib,b5", which
# 22.05's scontrol refuses; we read it as the obvious a1-ib a2-ib b5.
@pytest.mark.parametrize("nodelist, hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("gpu[001-003,010]", ["gpu001", "gpu002", "gpu003", "gpu010"]),
    ("gpu[001-004,010],login1", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "login1"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("n[01-2]", ["n01", "n02"]),
    ("a[1-2]-ib,b5", ["a1-ib", "a2-ib", "b5"]),
    ("node[01-02]x[1-2]", ["node01x1", "node01x2", "node02x1", "node02x2"]),
    ("n[1-2][3-4]", ["n13", "n14", "n23", "n24"]),
    (" n1 , n2 ", ["n1", "n2"]),
    ("n[1-3],n2", ["n1", "n2", "n3", "n2"]),
])
def test_expand_hostlist(nodelist, hosts):
    assert expand_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist, message", [
    ("n[3-1]", "runs backwards"),
    ("n[a-b]", "not a number or a range"),
    ("n[]", "not a number or a range"),
    ("n[1-2", "unclosed"),
    ("n[1-2]]", "without"),
    ("n[1[2]]", "nested"),
    (",", "names no host"),
])
def test_expand_hostlist_errors(nodelist, message):
    with pytest.raises(ValueError, match=message) as info:
        expand_hostlist(nodelist, where="SLURM_JOB_NODELIST")
    assert "SLURM_JOB_NODELIST" in str(info.value)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("4(x2)") == [4, 4]
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("8") == [8]


# ----- device and command line ------------------------------------------------------------------------
def test_select_device():
    env = DistEnv(3, 4, 3, 4, "127.0.0.1", 29500, "torchrun")
    assert select_device(env, gpu_count=0) == "cpu"
    assert select_device(env, gpu_count=4) == "cuda:3"
    with pytest.raises(ValueError, match="LOCAL_RANK 3 but only 2 GPUs visible"):
        select_device(env, gpu_count=2, environ={"CUDA_VISIBLE_DEVICES": "0,1"})
    # srun --gpus-per-task=1: each task sees exactly its own GPU as cuda:0.
    assert select_device(env, gpu_count=1, environ={"CUDA_VISIBLE_DEVICES": "3"}) == "cuda:0"


def test_init_distributed_refuses_bad_arguments_before_touching_anything(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    env = DistEnv(0, 1, 0, 1, "127.0.0.1", 29500, "single")
    with pytest.raises(ValueError, match="device must be None, 'cpu' or 'cuda'"):
        init_distributed(env, device="gpu")
    with pytest.raises(ValueError, match="timeout_s"):
        init_distributed(env, timeout_s=0)
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is visible"):
            init_distributed(env, device="cuda")
    assert "RANK" not in os.environ


def test_launcher_args_accept_deepspeeds_local_rank():
    parser = argparse.ArgumentParser()
    add_launcher_args(parser)
    assert parser.parse_args(["--local_rank=1"]).local_rank == 1
    assert parser.parse_args(["--local-rank", "2"]).local_rank == 2
    assert parser.parse_args([]).local_rank is None


# ----- real process groups ----------------------------------------------------------------------------
_SCRIPT = textwrap.dedent("""
    import os, socket, sys
    sys.path.insert(0, {repo!r})
    import torch
    import torch.distributed as dist
    from train.launch import discover, init_distributed, mpi_master_addr, resolve

    env = init_distributed(discover(), timeout_s=120)
    t = torch.tensor([float(env.rank + 1)])
    dist.all_reduce(t)
    extra = ""
    if env.launcher == "openmpi":
        # What only MPI knows: rank 0's hostname, and rank/size via mpi4py with Open MPI's variables hidden.
        bare = {{k: v for k, v in os.environ.items()
                if not k.startswith("OMPI_COMM_WORLD") and k not in ("RANK", "WORLD_SIZE")}}
        m = resolve(bare)
        extra = (f" mpi_master={{mpi_master_addr() == socket.gethostname()}}"
                 f" mpi4py={{m.launcher}}:{{m.rank}}/{{m.world_size}}:{{m.local_rank}}/{{m.local_world_size}}")
    # One file per rank: mpirun forwards the ranks' stdout in chunks that may interleave mid-line.
    with open(os.path.join(sys.argv[1], f"rank{{env.rank}}.txt"), "w") as f:
        f.write(f"RESULT rank={{env.rank}} world={{env.world_size}} local={{env.local_rank}}/{{env.local_world_size}} "
                f"launcher={{env.launcher}} device={{env.device}} sum={{t.item():g}}{{extra}}")
    dist.destroy_process_group()
""")


def _free_port() -> int:
    # Engineers and CI jobs share this machine: never rely on 29500 being free.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    launcher_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items()
           if k not in launcher_vars and not k.startswith(("SLURM_", "OMPI_", "PMI", "TORCHELASTIC"))}
    return {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **extra}


def _results(proc: subprocess.CompletedProcess, out: Path) -> list[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [f.read_text() for f in sorted(out.glob("rank*.txt"))]


def test_mpirun_two_ranks_all_reduce(tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun on PATH: run scripts/system_deps.sh as root (installs Open MPI)")
    script = tmp_path / "tiny.py"
    script.write_text(_SCRIPT.format(repo=str(REPO)))
    # Debian's Open MPI refuses root without these; --oversubscribe lets 2 ranks share fewer cores.
    env = _clean_env(MASTER_PORT=str(_free_port()), OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
                     OMPI_MCA_btl_vader_single_copy_mechanism="none")
    proc = subprocess.run([mpirun, "--oversubscribe", "-np", "2", sys.executable, str(script), str(tmp_path)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert _results(proc, tmp_path) == [
        f"RESULT rank={r} world=2 local={r}/2 launcher=openmpi device=cpu sum=3 mpi_master=True "
        f"mpi4py=mpi4py:{r}/2:{r}/2" for r in (0, 1)
    ]


def test_torchrun_two_ranks_all_reduce(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(_SCRIPT.format(repo=str(REPO)))
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(_free_port()), str(script), str(tmp_path)], env=_clean_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert _results(proc, tmp_path) == [
        f"RESULT rank={r} world=2 local={r}/2 launcher=torchrun device=cpu sum=3" for r in (0, 1)
    ]


_LONE = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import psutil
    import torch
    import torch.distributed as dist
    from train.launch import discover, init_distributed

    env = init_distributed(discover(), timeout_s=60)
    t = torch.ones(1)
    dist.all_reduce(t)
    listening = sorted({{c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
                        if c.status == psutil.CONN_LISTEN}})
    print("RESULT", env.launcher, env.world_size, t.item(), ",".join(listening))
    dist.destroy_process_group()
""")


def test_lone_process_listens_on_loopback_only(tmp_path):
    """torch's TCPStore server binds every interface whatever MASTER_ADDR says (`ss -ltnp` showed `*:<port>`),
    and gloo binds the address the hostname resolves to: a one-process run must open neither to the network."""
    script = tmp_path / "lone.py"
    script.write_text(_LONE.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, str(script)], env=_clean_env(MASTER_PORT=str(_free_port())),
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    _, launcher, world, total, listening = line.split(" ")
    assert (launcher, world, float(total)) == ("single", "1", 1.0)
    assert set(filter(None, listening.split(","))) <= {"127.0.0.1", "::1"}, listening


# ----- how launchers report a rank's exit code 75 (docs/slurm.md) ----------------------------------------------
def test_torchrun_reports_a_ranks_75_as_1_and_the_deepspeed_launcher_keeps_it(tmp_path):
    """What train/main.py's docstring and docs/slurm.md tell users: under torchrun a stopped run's exit code is
    1 (the 75 only appears in its failure report), under the deepspeed launcher it is 75."""
    script = tmp_path / "stopped.py"
    script.write_text("import sys; sys.exit(75)\n")
    bin_dir = Path(sys.executable).parent
    torchrun = subprocess.run([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port",
                               str(_free_port()), str(script)], env=_clean_env(), cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert torchrun.returncode == 1, torchrun.stderr[-2000:]
    assert re.search(r"exitcode\s*:\s*75", torchrun.stderr), torchrun.stderr[-2000:]
    ds = subprocess.run([str(bin_dir / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()),
                         str(script)], env=_clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert ds.returncode == 75, (ds.stdout + ds.stderr)[-2000:]
