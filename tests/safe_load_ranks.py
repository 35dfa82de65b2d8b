"""Run by tests/test_safe_load.py under `torchrun --nproc_per_node 2 tests/safe_load_ranks.py <mode> <dir>`:
a 2-stage pipeline (one stage per rank) trains a step and saves; a fresh engine resumes it (weights compared
on each rank); then rank 0 plants a pickle in one layer file of each stage and a third engine must refuse it.
Each rank prints what it saw; the test reads the lines."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tests.test_safe_load import TAG, Planted, build, train_one_step  # noqa: E402
from train.safe_load import UnsafeCheckpointError  # noqa: E402

PLANTED_LAYERS = ("layer_01-model_states.pt", "layer_05-model_states.pt")  # first decoder (stage 0), head (stage 1)


def main(mode: str, out: Path) -> None:
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    rank = dist.get_rank()
    engine, cfg, weights = build(mode, out, world_size=2)
    train_one_step(engine, cfg)
    engine.save_checkpoint(str(out / "good"), tag=TAG, client_state={"step": 1}, save_latest=False)
    saved = weights()

    fresh, _, fresh_weights = build(mode, out, world_size=2)
    fresh.load_checkpoint(str(out / "good"), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    got = fresh_weights()
    exact = got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    print(f"[rank {rank}] round trip {'exact' if exact else 'DIFFERS'} at step {fresh.global_steps}", flush=True)

    dist.barrier()
    if rank == 0:
        shutil.copytree(out / "good", out / "planted")
        for name in PLANTED_LAYERS:
            file = out / "planted" / TAG / name
            state = torch.load(file, weights_only=False)  # our own file, written above
            state["planted"] = Planted(out / "code-ran")
            torch.save(state, file)
    dist.barrier()
    third, _, _ = build(mode, out, world_size=2)
    try:
        third.load_checkpoint(str(out / "planted"), tag=TAG)
        print(f"[rank {rank}] NOT refused", flush=True)
    except UnsafeCheckpointError as e:
        print(f"[rank {rank}] refused: {e}", flush=True)
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
