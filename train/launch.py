"""Who am I in the job: rank, world size, local rank and rendezvous address under every launcher.

One process per GPU (or CPU rank), with the same command line under each launcher:

    deepspeed --num_gpus 8 train/main.py --config run.yaml          # RANK/WORLD_SIZE/LOCAL_RANK + --local_rank
    torchrun --nproc_per_node 8 train/main.py --config run.yaml     # same, plus LOCAL_WORLD_SIZE
    mpirun -np 16 python train/main.py --config run.yaml            # OMPI_COMM_WORLD_* or PMI_* (MPICH/Hydra)
    srun python train/main.py --config run.yaml                     # SLURM_PROCID/NTASKS/LOCALID, inside a step
    python train/main.py --config run.yaml                          # one process: rank 0 of 1

`discover(environ)` is a pure function of the environment (unit-tested with dicts). `resolve()` adds
what only MPI itself can tell (mpi4py), and `init_distributed(env)` exports the torch variables and
starts the process group through DeepSpeed with its own MPI discovery switched off: DeepSpeed's
`auto_mpi_discovery` overwrites MASTER_ADDR with `hostname -I`, which users must be able to control.

Precedence (first that applies wins):
  1. RANK and WORLD_SIZE set explicitly (torchrun, the deepspeed launcher, or a user).
  2. Slurm, but only inside a job step that really holds SLURM_NTASKS tasks: SLURM_STEP_ID (or
     SLURM_STEPID) is set, SLURM_STEP_NUM_TASKS equals SLURM_NTASKS when present, and no MPI launcher
     variable disagrees on the size. The batch shell of `sbatch -n 8` has SLURM_PROCID=0 and
     SLURM_NTASKS=8 but no step id (measured on Slurm 22.05): it is ONE process, so it must not wait
     for 7 peers. Ranks started by `mpirun` inside an allocation inherit those same batch variables
     (every rank sees SLURM_PROCID=0), so the MPI variables decide there.
  3. Open MPI (OMPI_COMM_WORLD_RANK/SIZE/LOCAL_RANK/LOCAL_SIZE).
  4. PMI from MPICH/Hydra or Intel MPI (PMI_RANK, PMI_SIZE, MPI_LOCALRANKID, MPI_LOCALNRANKS).
  5. A single process, rank 0 of 1.
A process that only MPI knows about (PMIX_RANK without sizes, PMI_RANK without its local ids) makes
`discover` raise; `resolve` then asks mpi4py.

MASTER_ADDR: an explicit MASTER_ADDR always wins; else Slurm: the first host of the step's (or job's)
nodelist, where rank 0 runs under Slurm's block distribution; else MPI: 127.0.0.1 when all ranks
share one node, otherwise rank 0's hostname broadcast over MPI (`mpi_master_addr`, called by
`resolve`). MASTER_PORT: an explicit MASTER_PORT wins; else Slurm: 20000 + SLURM_JOB_ID % 10000
(the same on every rank, different for concurrent jobs on shared nodes); else 29500.

A job of one process has no peers to meet: `init_distributed` gives it an in-process store and the loopback
interface for gloo/NCCL, so it opens no port on the machine's other interfaces. (torch's TCPStore server
listens on every interface whatever MASTER_ADDR says, and gloo binds the address the hostname resolves to.)

On CPU the first `init_distributed` on a machine JIT-compiles DeepSpeed's shm_comm op (~30 s, then
cached in ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Mapping

LAUNCHERS = ("torchrun", "deepspeed", "env", "slurm", "openmpi", "pmi", "mpi4py", "single")
DEFAULT_PORT = 29500
SLURM_PORT_BASE = 20000
LOCALHOST = "127.0.0.1"


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as found in the environment."""

    rank: int
    """Global rank in [0, world_size)."""
    world_size: int
    """Number of processes in the job (one per GPU, or per CPU rank)."""
    local_rank: int
    """Rank among the processes on this node; picks the GPU (cuda:local_rank)."""
    local_world_size: int
    """Processes on this node."""
    master_addr: str | None
    """Address of rank 0's rendezvous store; None means "rank 0's hostname, to be shared over MPI"
    (filled by `resolve`)."""
    master_port: int
    """TCP port of the rendezvous store (the same on every rank)."""
    launcher: str
    """Which launcher's variables were used: one of LAUNCHERS."""
    device: str = "cpu"
    """Set by `init_distributed`: "cuda:<i>" or "cpu"."""

    def __post_init__(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"DistEnv.launcher must be one of {LAUNCHERS}, got {self.launcher!r}")
        if self.world_size < 1:
            raise ValueError(f"world size must be >= 1, got {self.world_size} (launcher {self.launcher})")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.world_size}) (launcher {self.launcher})")
        if not 1 <= self.local_world_size <= self.world_size:
            raise ValueError(
                f"local world size {self.local_world_size} is outside [1, world size {self.world_size}] "
                f"(launcher {self.launcher})"
            )
        if not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(
                f"local rank {self.local_rank} is outside [0, {self.local_world_size}) (launcher {self.launcher})"
            )
        if not 1 <= self.master_port <= 65535:
            raise ValueError(f"master port {self.master_port} is not a TCP port (launcher {self.launcher})")
        if self.master_addr is not None and not self.master_addr.strip():
            raise ValueError(f"master address is empty (launcher {self.launcher})")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def single_node(self) -> bool:
        return self.local_world_size == self.world_size


# ----- pure discovery ------------------------------------------------------------------------------
def discover(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """This process's DistEnv from the environment alone (see the module docstring for precedence)."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_explicit(environ)
    if _in_slurm_step(environ):
        return _from_slurm(environ)
    if "OMPI_COMM_WORLD_RANK" in environ:
        return _from_mpi(environ, "openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                         "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    if all(k in environ for k in ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")):
        return _from_mpi(environ, "pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    marker = _mpi_only_marker(environ)
    if marker:
        raise ValueError(
            f"this process was started by MPI ({marker}={environ[marker]}) but its world size or local rank "
            f"is not in the environment: use train.launch.resolve(), which asks mpi4py"
        )
    return DistEnv(0, 1, 0, 1, _master_addr(environ, LOCALHOST), _master_port(environ, DEFAULT_PORT), "single")


def _int(environ: Mapping[str, str], name: str, launcher: str) -> int:
    raw = environ.get(name)
    if raw is None:
        raise ValueError(f"{name} is not set but the {launcher} launcher's other variables are")
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer (launcher {launcher})") from None


def _master_addr(environ: Mapping[str, str], fallback: str | None) -> str | None:
    explicit = environ.get("MASTER_ADDR", "").strip()
    return explicit or fallback


def _master_port(environ: Mapping[str, str], fallback: int) -> int:
    if environ.get("MASTER_PORT", "").strip():
        return _int(environ, "MASTER_PORT", "env")
    return fallback


def _from_explicit(environ: Mapping[str, str]) -> DistEnv:
    if "TORCHELASTIC_RUN_ID" in environ:
        launcher = "torchrun"
    elif "CROSS_RANK" in environ:  # set only by deepspeed/launcher/launch.py
        launcher = "deepspeed"
    else:
        launcher = "env"
    rank, world = _int(environ, "RANK", launcher), _int(environ, "WORLD_SIZE", launcher)
    # torchrun: LOCAL_WORLD_SIZE; the deepspeed launcher: LOCAL_SIZE; a hand-set env: assume one node.
    local_world = world
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if name in environ:
            local_world = _int(environ, name, launcher)
            break
    local_rank = _int(environ, "LOCAL_RANK", launcher) if "LOCAL_RANK" in environ else rank % local_world
    addr = _master_addr(environ, LOCALHOST if local_world == world else None)
    if addr is None:
        raise ValueError(
            f"RANK/WORLD_SIZE are set for {world} processes on several nodes (local world size {local_world}) "
            f"but MASTER_ADDR is not: set MASTER_ADDR to rank 0's host"
        )
    return DistEnv(rank, world, local_rank, local_world, addr, _master_port(environ, DEFAULT_PORT), launcher)


def _in_slurm_step(environ: Mapping[str, str]) -> bool:
    """True when the Slurm variables describe this process's own job step (see module docstring)."""
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return False
    if "SLURM_STEP_ID" not in environ and "SLURM_STEPID" not in environ:
        return False  # the batch shell (or salloc's shell): one process, whatever SLURM_NTASKS says
    ntasks = environ["SLURM_NTASKS"].strip()
    if environ.get("SLURM_STEP_NUM_TASKS", ntasks).strip() != ntasks:
        return False
    for size_var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        # mpirun inside an allocation: Open MPI's remote daemons run in a Slurm step of their own,
        # so their children see that step's variables; the MPI size is the truth then.
        if size_var in environ and environ[size_var].strip() != ntasks:
            return False
    return True


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    rank, world = _int(environ, "SLURM_PROCID", "slurm"), _int(environ, "SLURM_NTASKS", "slurm")
    local_rank = _int(environ, "SLURM_LOCALID", "slurm") if "SLURM_LOCALID" in environ else 0
    local_world = _slurm_local_world(environ, rank, local_rank, world)
    nodelist_var = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                         if environ.get(v, "").strip()), None)
    first_host = expand_hostlist(environ[nodelist_var], where=nodelist_var)[0] if nodelist_var else None
    addr = _master_addr(environ, first_host or (LOCALHOST if local_world == world else None))
    if addr is None:
        raise ValueError("Slurm step spans several nodes but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set")
    job_var = next((v for v in ("SLURM_JOB_ID", "SLURM_JOBID") if v in environ), None)
    port = SLURM_PORT_BASE + _int(environ, job_var, "slurm") % 10000 if job_var else DEFAULT_PORT
    return DistEnv(rank, world, local_rank, local_world, addr, _master_port(environ, port), "slurm")


def _slurm_local_world(environ: Mapping[str, str], rank: int, local_rank: int, world: int) -> int:
    """Tasks on this node, from the step's tasks-per-node string ("4(x2),3") and this node's index."""
    for var in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        if environ.get(var, "").strip():
            counts = expand_tasks_per_node(environ[var], where=var)
            break
    else:
        nodes_var = next((v for v in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES")
                          if v in environ), None)
        nodes = _int(environ, nodes_var, "slurm") if nodes_var else 1
        if nodes < 1 or world % nodes:
            raise ValueError(f"cannot tell the tasks on this node: no SLURM_STEP_TASKS_PER_NODE and "
                             f"SLURM_NTASKS={world} over {nodes_var}={nodes}")
        return world // nodes
    if len(set(counts)) == 1:
        return counts[0]
    if "SLURM_NODEID" in environ:
        node = _int(environ, "SLURM_NODEID", "slurm")
    else:
        # Block distribution: this node's first rank is rank - local_rank.
        starts = [sum(counts[:i]) for i in range(len(counts))]
        if rank - local_rank not in starts:
            raise ValueError(f"{var}={environ[var]!r} does not place rank {rank} (local rank {local_rank}); "
                             f"set SLURM_NODEID")
        node = starts.index(rank - local_rank)
    if not 0 <= node < len(counts):
        raise ValueError(f"SLURM_NODEID={node} but {var}={environ[var]!r} lists {len(counts)} nodes")
    return counts[node]


def _from_mpi(environ: Mapping[str, str], launcher: str, rank_var: str, size_var: str, local_rank_var: str,
              local_size_var: str) -> DistEnv:
    rank, world = _int(environ, rank_var, launcher), _int(environ, size_var, launcher)
    local_rank, local_world = _int(environ, local_rank_var, launcher), _int(environ, local_size_var, launcher)
    # Several nodes: rank 0's hostname is known only to rank 0, so `resolve` broadcasts it over MPI.
    addr = _master_addr(environ, LOCALHOST if local_world == world else None)
    return DistEnv(rank, world, local_rank, local_world, addr, _master_port(environ, DEFAULT_PORT), launcher)


def _mpi_only_marker(environ: Mapping[str, str]) -> str | None:
    for var in ("PMIX_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK"):
        if var in environ:
            return var
    return None


# ----- Slurm hostlist and tasks-per-node syntax --------------------------------------------------------
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(nodelist: str, where: str = "nodelist") -> list[str]:
    """Expand Slurm hostlist syntax without scontrol: "gpu[001-003,010],login1" -> gpu001 ... login1.

    Ranges keep the zero padding of their lower bound ("n[098-101]" -> n098 ... n101), a host may
    have several bracket groups ("node[01-02]x[1-2]" -> node01x1 node01x2 node02x1 node02x2, the
    first group varying slowest, as `scontrol show hostnames` orders them) and text after a bracket
    ("a[1-2]-ib"). Duplicates and order are kept; empty items are ignored.
    """
    hosts: list[str] = []
    for item in _split_top_level(nodelist, where):
        item = item.strip()
        if item:
            hosts.extend(_expand_host(item, nodelist, where))
    if not hosts:
        raise ValueError(f"{where}={nodelist!r} names no host")
    return hosts


def _split_top_level(text: str, where: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"{where}={text!r}: nested '[' at position {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{where}={text!r}: ']' without '[' at position {i}")
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"{where}={text!r}: unclosed '['")
    items.append(text[start:])
    return items


def _expand_host(item: str, nodelist: str, where: str) -> list[str]:
    # Alternating literal text and bracket groups: "node", "01-02", "x", "1-2", "".
    parts = re.split(r"\[([^\]]*)\]", item)
    out = [""]
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out = [prefix + part for prefix in out]
        else:
            values = _expand_ranges(part, nodelist, where)
            out = [prefix + v for prefix in out for v in values]
    return out


def _expand_ranges(group: str, nodelist: str, where: str) -> list[str]:
    values: list[str] = []
    for rng in group.split(","):
        m = _RANGE.match(rng.strip())
        if not m:
            raise ValueError(f"{where}={nodelist!r}: {rng!r} in [{group}] is not a number or a range lo-hi")
        lo_text, hi_text = m.group(1), m.group(2)
        lo, hi = int(lo_text), int(hi_text if hi_text is not None else lo_text)
        if hi < lo:
            raise ValueError(f"{where}={nodelist!r}: range {rng!r} in [{group}] runs backwards")
        width = len(lo_text)  # Slurm pads every value to the lower bound's width
        values.extend(str(v).zfill(width) for v in range(lo, hi + 1))
    return values


def expand_tasks_per_node(text: str, where: str = "SLURM_TASKS_PER_NODE") -> list[int]:
    """"4(x2),3" -> [4, 4, 3]: Slurm's compressed tasks-per-node list, one count per node."""
    counts: list[int] = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"{where}={text!r}: {item!r} is not N or N(xR)")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if not counts or min(counts) < 1:
        raise ValueError(f"{where}={text!r} must list at least one positive count")
    return counts


# ----- what only MPI can tell ------------------------------------------------------------------------
def mpi_master_addr() -> str:
    """Rank 0's hostname, broadcast to every rank over MPI_COMM_WORLD (collective: all ranks call it)."""
    from mpi4py import MPI  # loaded only under MPI: importing it initialises MPI

    comm = MPI.COMM_WORLD
    return comm.bcast(socket.gethostname() if comm.Get_rank() == 0 else None, root=0)


def discover_mpi4py(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Rank, size and local rank from mpi4py, for MPIs whose variables `discover` cannot read."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks that share this node's memory
    try:
        local_rank, local_world = node.Get_rank(), node.Get_size()
    finally:
        node.Free()
    rank, size = world.Get_rank(), world.Get_size()
    addr = _master_addr(environ, None)
    if addr is None:
        addr = LOCALHOST if local_world == size else world.bcast(socket.gethostname() if rank == 0 else None, root=0)
    return DistEnv(rank, size, local_rank, local_world, addr, _master_port(environ, DEFAULT_PORT), "mpi4py")


def resolve(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """`discover`, completed over MPI where the environment is not enough (call it on every rank)."""
    if not _known_without_mpi(environ) and _mpi_only_marker(environ):
        return discover_mpi4py(environ)
    env = discover(environ)
    if env.master_addr is None:
        env = dataclasses.replace(env, master_addr=mpi_master_addr())
    return env


def _known_without_mpi(environ: Mapping[str, str]) -> bool:
    return ("RANK" in environ or "WORLD_SIZE" in environ or _in_slurm_step(environ)
            or "OMPI_COMM_WORLD_RANK" in environ
            or all(k in environ for k in ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")))


# ----- process group ---------------------------------------------------------------------------------
def select_device(env: DistEnv, gpu_count: int | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """"cuda:<local_rank>" when CUDA is available, else "cpu". `gpu_count` None asks torch."""
    if gpu_count is None:
        import torch

        gpu_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpu_count == 0:
        return "cpu"
    if env.local_rank < gpu_count:
        return f"cuda:{env.local_rank}"
    visible = [d for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if gpu_count == 1 and len(visible) == 1:
        # Slurm's --gpus-per-task / --gpu-bind=single:1 gives each task its own single visible GPU.
        return "cuda:0"
    raise ValueError(
        f"LOCAL_RANK {env.local_rank} but only {gpu_count} GPUs visible: start at most {gpu_count} processes "
        f"per node (launcher {env.launcher}, local world size {env.local_world_size}, "
        f"CUDA_VISIBLE_DEVICES={environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!r})"
    )


def init_distributed(env: DistEnv, backend: str | None = None, timeout_s: int = 1800,
                     device: str | None = None) -> DistEnv:
    """Export the torch.distributed variables, pick the device and start the process group.

    Returns `env` with `device` set. `device` "cpu" keeps a GPU machine on CPU (run.device=cpu); None
    or "cuda" take cuda:<local_rank> when CUDA is available. NCCL on CUDA, gloo on CPU, unless
    `backend` says otherwise.
    """
    if device not in (None, "cpu", "cuda"):
        raise ValueError(f"init_distributed: device must be None, 'cpu' or 'cuda', got {device!r}")
    if env.master_addr is None:
        raise ValueError("DistEnv.master_addr is None (MPI on several nodes): build it with train.launch.resolve()")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, int) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive integer, got {timeout_s!r}")
    chosen = "cpu" if device == "cpu" else select_device(env)
    if device == "cuda" and chosen == "cpu":
        raise ValueError("init_distributed: device='cuda' but no CUDA device is visible")
    device = chosen
    os.environ.update(
        RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port),
        # The deepspeed launcher's name for LOCAL_WORLD_SIZE. DeepSpeed's CPU accelerator counts its devices from
        # it, and without it runs `numactl --hardware` in a subprocess at every ZeRO-3 gradient reduction (under
        # srun, torchrun, mpirun): a process per step, and each one resets Python's once-per-location warnings.
        LOCAL_SIZE=str(env.local_world_size),
    )
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(device)  # before init: NCCL binds each rank's communicator to this GPU
    if env.world_size == 1:
        _init_lone_process(backend or ("nccl" if device.startswith("cuda") else "gloo"), timeout_s)
    import deepspeed

    # Adopts a process group that already exists (the lone process's), else starts one from the variables above.
    deepspeed.init_distributed(
        dist_backend=backend or ("nccl" if device.startswith("cuda") else "gloo"),
        auto_mpi_discovery=False, timeout=timedelta(seconds=timeout_s), verbose=env.is_main,
    )
    return dataclasses.replace(env, device=device)


def distributed() -> bool:
    """Whether a process group exists (every collective helper of the trainer is a no-op without one)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank, when there are ranks to wait for."""
    if distributed():
        import torch.distributed as dist

        dist.barrier()


def shutdown_distributed() -> None:
    """Destroy the process group at the end of a run, through DeepSpeed so its cached groups go too, instead of
    leaving gloo's worker threads to interpreter finalization (see the end of train/main.py `_run`)."""
    import torch.distributed as dist

    if not distributed():
        return
    import deepspeed.comm as ds_comm

    rank = dist.get_rank()
    if ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
    remove_shm_workspace(rank)


def shm_workspace(rank: int, environ: Mapping[str, str] = os.environ) -> Path | None:
    """The shared-memory file DeepSpeed's CPU all-reduce (deepspeed/ops/csrc/cpu/comm/shm.cpp, 0.19) creates for
    `rank` when every rank is on this node: /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>.
    None without a rendezvous address."""
    addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    if not addr or not port:
        return None
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def remove_shm_workspace(rank: int) -> None:
    """Unlink this rank's DeepSpeed shared-memory workspace at the end of a run. DeepSpeed never unlinks it (its
    shared_close is not called), and /dev/shm is RAM: each multi-process CPU run left ~70 MB per rank behind,
    measured 22 GB after a day of test runs on a 24 GB machine, until compiles and runs started swapping. The
    peers mapped it at start-up; unlinking removes only the name, their mappings stay valid."""
    path = shm_workspace(rank)
    if path is not None:
        path.unlink(missing_ok=True)


def loopback_interface() -> str | None:
    """Name of the interface that holds 127.0.0.1 ("lo" on Linux), or None when none does."""
    import psutil  # a DeepSpeed dependency

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == LOCALHOST for a in addrs):
            return name
    return None


def _init_lone_process(backend: str, timeout_s: int) -> None:
    """The default process group of a one-process job, reachable from this machine only: an in-process
    HashStore instead of a TCPStore (whose server binds every interface, measured with `ss -ltnp`), and gloo's
    and NCCL's sockets on the loopback interface unless the user chose one (GLOO_/NCCL_SOCKET_IFNAME)."""
    import torch.distributed as dist

    if dist.is_initialized():  # a second run in one process (tests, notebooks) keeps the first group
        return
    lo = loopback_interface()
    if lo is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=timeout_s))


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """Accept the `--local_rank N` the deepspeed launcher appends (and torch's `--local-rank`), so the
    command line stays the same under every launcher; LOCAL_RANK in the environment is what counts."""
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help="set by the deepspeed launcher; ignored in favour of $LOCAL_RANK")
