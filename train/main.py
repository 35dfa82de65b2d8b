"""Train an Emu3-architecture unified model with task-aware Mixture-of-Depths under DeepSpeed.

The one entry point, unchanged under every launcher (train/launch.py finds rank and rendezvous):

    python train/main.py --smoke                                   # first run: CPU or 1 GPU, < 2 min
    python train/main.py --config train/configs/demo.yaml --prepare-demo-data
    deepspeed --num_gpus 8 train/main.py --config train/configs/emu3_8b_unimod.yaml \
        --deepspeed_config ds_configs/zero3_bf16.json
    torchrun --nproc_per_node 8 train/main.py --config ... --deepspeed_config ...
    mpirun -np 16 python train/main.py --config ... --deepspeed_config ...
    srun python train/main.py --config ... --deepspeed_config ...   (see slurm/train_emu3_mod.sh)
    python train/main.py --config ... --plan --nodes 4 --gpus-per-node 8   # capacity planner, no GPU

Options: `--set section.field=value` (repeatable) overrides the YAML; `--resume auto|none|PATH`.
Exit codes: 0 done (also when a stop signal came after the last step: see train/signals.py); 75 stopped by
SIGTERM/SIGUSR1 with a complete checkpoint, or during start-up with nothing to save (run again to continue);
3 stopped after repeated non-finite losses or gradient norms (the last finite checkpoint kept); 74 a checkpoint
could not be written (disk full, permissions: the path and cause are printed, the partial one removed); 2 bad
configuration or environment (named field, raised before the process group and the model exist), or a resume
this configuration may not make (checkpoint.accept_changes). torchrun reports a rank's 75 as its own exit code 1; the deepspeed
launcher and one process per rank under srun keep it (docs/slurm.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python train/main.py` / `deepspeed train/main.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "train" / "configs" / "smoke.yaml"
DEFAULT_DS_CONFIG = {"cpu": REPO / "ds_configs" / "single_cpu.json", "gpu": REPO / "ds_configs" / "single_gpu.json"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from train.launch import add_launcher_args

    p = argparse.ArgumentParser(prog="train/main.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="run YAML (model/data/optim/parallel/logging/checkpoint/run sections)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   help="DeepSpeed JSON; 'auto' values are filled from the YAML (default: ds_configs/single_*.json)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config value (YAML syntax), e.g. --set optim.lr=1e-4")
    p.add_argument("--resume", help="auto | none | path to a checkpoint (same as --set checkpoint.resume=...)")
    p.add_argument("--smoke", action="store_true",
                   help="one process, debug preset with MoD, demo data (built if missing), a few dozen steps")
    p.add_argument("--prepare-demo-data", action="store_true",
                   help="build the embedded demo dataset into data.dataset_dir if it has no manifest.json")
    p.add_argument("--plan", action="store_true", help="print the capacity plan and exit (no GPU needed)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--assumed-mfu", type=float, default=0.4)
    add_launcher_args(p)
    args = p.parse_args(argv)
    if args.smoke and not args.config:
        args.config = str(SMOKE_CONFIG)
        args.prepare_demo_data = True
    if not args.config:
        p.error("--config is required (or --smoke)")
    if args.resume:
        args.set.append(f"checkpoint.resume={args.resume}")
    return args


def ensure_demo_data(config_path: str, overrides: list[str], local_rank: int) -> None:
    """Build the demo dataset where the config points, once per machine (local rank 0); the other
    ranks wait for its manifest, which the builder writes last."""
    from train.config import read_config_doc

    doc = read_config_doc(config_path, overrides)
    dataset_dir = (doc.get("data") or {}).get("dataset_dir")
    if not dataset_dir:
        raise ValueError("--prepare-demo-data needs data.dataset_dir in the config")
    manifest = Path(dataset_dir) / "manifest.json"
    if manifest.exists():
        from data.demo import DemoConfig

        demo = json.loads(manifest.read_text()).get("demo")  # None: not a demo build, nothing to check
        built = demo.get("image_format", "patch16") if isinstance(demo, dict) else None
        if built is not None and built != DemoConfig().image_format:
            # An earlier version built the demo in the 16x16 patch format, which the demo model cannot learn.
            raise ValueError(f"{manifest}: the demo dataset there is in image format {built!r}, not "
                             f"{DemoConfig().image_format!r}; delete {dataset_dir} to have it rebuilt")
        return
    if local_rank == 0:
        from data.demo import build_demo
        from train.log import log

        log.info(f"[train] building the demo dataset into {dataset_dir} (about 20 s)", all_ranks=True)
        build_demo(dataset_dir, created_by="train/main.py --prepare-demo-data")
        return
    deadline = time.time() + 600
    while not manifest.exists():
        if time.time() > deadline:
            raise RuntimeError(f"waited 10 min for local rank 0 to build {manifest}")
        time.sleep(1.0)


def run_plan(cfg, args) -> int:
    """Print the capacity plan; exit 1 when it does not fit in --gpu-memory-gib."""
    from train.config import load_ds_config
    from tools.capacity import format_plan, plan

    offload = False
    if args.deepspeed_config:
        zero = load_ds_config(args.deepspeed_config).get("zero_optimization", {})
        offload = zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    report = plan(cfg, nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib,
                  offload_optimizer=offload, assumed_mfu=args.assumed_mfu)
    from train.log import log

    log.info(format_plan(report))
    return 0 if report.fits else 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_known_warnings() -> None:
    """Known third-party warnings that a user cannot act on, silenced for the whole run (DataLoader workers
    fork from this process and inherit the filters).

    DeepSpeed 0.19.8's ZeRO-3 gathers and reduce-scatters parameters with `all_gather_into_tensor` and
    `reduce_scatter_tensor`, which torch 2.13 deprecates (a FutureWarning raised from torch.distributed's
    c10d_logger wrapper). Python prints a warning once per process and code location, so every rank prints
    both, and again after anything resets the warnings filters: a 30-step 2-rank CPU ZeRO-3 smoke job under
    sbatch printed them 61 times (122 of its 292 lines; DeepSpeed spawned `numactl` at every reduction, see
    LOCAL_SIZE in train/launch.py). The call sites are DeepSpeed's; drop these filters once it uses the new names.
    """
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{name}` is deprecated",
                                category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    # First thing: from here on SIGTERM / SIGUSR1 end the run with exit 75 whatever phase it is in (before
    # this, a SIGUSR1 one second into start-up killed the process with 138 and no summary).
    from train.log import log
    from train.signals import EXIT_PREEMPTED, StopRequested, StopSignal

    stop = StopSignal()
    _quiet_known_warnings()
    where = {}  # what start-up has learnt so far, for the report of a stop during it
    try:
        return _run(argv, stop, where)
    except StopRequested as e:
        log.error(f"[train] {e} during start-up, before the process group: exiting with code {EXIT_PREEMPTED}, "
                  f"nothing to save (run again to continue)", all_ranks=True)
        _startup_stop_summary(where, str(e))
        return EXIT_PREEMPTED
    finally:
        stop.restore()


def _run(argv: list[str] | None, stop, where: dict) -> int:
    args = parse_args(argv)
    from train.config import (RunConfig, check_environment, load_ds_config, reconcile_ds_config,
                              resolve_precision)
    from train.launch import init_distributed, remove_shm_workspace, resolve, shutdown_distributed
    from train.log import log, set_rank
    from train.signals import EXIT_PREEMPTED

    try:
        if args.plan:
            return run_plan(RunConfig.load(args.config, args.set), args)
        env = resolve()
        set_rank(env.rank, env.world_size)
        if args.prepare_demo_data:
            ensure_demo_data(args.config, args.set, env.local_rank)
        cfg = RunConfig.load(args.config, args.set)
        where.update(cfg=cfg, env=env)

        import torch

        on_gpu = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
        if cfg.run.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("run.device=cuda but no CUDA device is visible")
        ds_path = args.deepspeed_config or DEFAULT_DS_CONFIG["gpu" if on_gpu else "cpu"]
        # Every contradiction is reported here, before a process group or a model exists.
        ds_config = reconcile_ds_config(load_ds_config(ds_path), cfg, env.world_size, on_gpu, where=str(ds_path))
        check_environment(cfg, env.world_size, where=args.config)
        precision = resolve_precision(cfg.parallel.precision, on_gpu)
        if not on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
    except ValueError as e:
        # Every rank checks and prints: a path that exists on rank 0's node may be missing on another's.
        log.error(f"error: {e}", all_ranks=True)
        return 2

    if env.launcher == "single" and not os.environ.get("MASTER_PORT"):
        # A lone process only talks to itself: a free port, so two runs on one machine (or another job on
        # 29500) cannot collide with EADDRINUSE.
        env = dataclasses.replace(env, master_port=_free_port())
    # From here a rank that left on its own would leave the others in a collective: signals are recorded and
    # agreed on (all-reduce) instead.
    stop.defer()
    env = init_distributed(env, device="cuda" if on_gpu else "cpu")
    device = torch.device(env.device)
    if stop.agreed(device):
        log.info(f"[train] stop signal during start-up, before the model was built: exiting with code "
                 f"{EXIT_PREEMPTED}, nothing to save (run again to continue)")
        _startup_stop_summary(where, stop.name or "a stop signal (on another rank)")
        shutdown_distributed()
        return EXIT_PREEMPTED
    log.info(f"[train] {env.world_size} process(es) via {env.launcher}, device {device}, precision {precision}, "
             f"mode {cfg.parallel.mode}, ZeRO stage {ds_config['zero_optimization'].get('stage', 0)}")
    log.info(f"[train] deepspeed config: {json.dumps(ds_config)}")
    from train.loop import Trainer

    try:
        trainer = Trainer(cfg, ds_config, env, device, precision)
        code = trainer.fit(stop)
    except BaseException:
        # A crash skips the orderly shutdown below (a peer may still be inside a collective), but this rank's
        # DeepSpeed shared-memory workspace can go: unlinking removes its name only, a peer's mapping of it
        # stays valid, and otherwise ~70 MB of RAM stays in /dev/shm after every crashed run.
        remove_shm_workspace(env.rank)
        raise
    # Every rank returns from fit at the same point (an exception skips this). The engine's reference cycles
    # hold gloo work handles and tensors: freed now, while the interpreter is whole, and then the group, rather
    # than during interpreter finalization, where a finished 2-rank run was seen to abort ("terminate called
    # without an active exception"; pytorch/pytorch#179291 describes the mechanism).
    del trainer
    gc.collect()
    shutdown_distributed()
    return code


def _startup_stop_summary(where: dict, signal_name: str) -> None:
    """summary.json for a run stopped before its first step, written by rank 0 when the output directory is
    known and holds no summary yet: an earlier attempt's summary (preempted at step N, or completed) still
    describes the run, since this attempt trained nothing."""
    cfg, env = where.get("cfg"), where.get("env")
    if cfg is None or env is None or env.rank != 0:
        return
    out = Path(cfg.run.output_dir)
    path = out / "summary.json"
    if path.exists() or not out.is_dir():
        return
    from data.files import atomic_write
    from train.checkpoint import CheckpointManager

    try:
        found = CheckpointManager.resolve(cfg.checkpoint.resume, out / "checkpoints")
    except ValueError:
        found = None
    steps = int(found[1].removeprefix("step_")) if found else 0
    summary = {"status": "preempted", "stopped_during": "startup", "signal": signal_name, "steps": steps,
               "steps_this_run": 0, "world_size": env.world_size}
    atomic_write(path, json.dumps(summary, indent=2))


if __name__ == "__main__":
    sys.exit(main())
