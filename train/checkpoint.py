"""Checkpoints that survive crashes and exact resume (stop signals: train/signals.py).

Layout under `<output_dir>/checkpoints/`:

    step_00000040/            DeepSpeed engine state (model, optimizer, scheduler) + ours:
        trainer_state_rank{r}.json   step, data-loader position, RNG states of that rank
        COMPLETE                     written by rank 0 after every rank finished writing
    latest                    the tag of the newest COMPLETE checkpoint (replaced atomically)

A checkpoint counts only once COMPLETE exists, and `latest` moves only after that, so a crash (or
SIGKILL) while saving leaves the previous checkpoint as the one resumed from. Old checkpoints are
pruned only after a newer one is complete. Trainer state is JSON (no pickles to trust on load).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d{8})$")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after checkpointing; run again to continue
EXIT_NONFINITE = 3   # too many consecutive NaN/inf losses; stopped after checkpointing


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, rank: int) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank

    # ----- discovery ---------------------------------------------------------------------------------
    def complete_tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        tags = [p.name for p in self.root.iterdir() if _TAG.match(p.name) and (p / COMPLETE).exists()]
        return sorted(tags)

    def latest(self) -> str | None:
        """The newest complete checkpoint: `latest` if it names a complete one, else a scan."""
        pointer = self.root / LATEST
        if pointer.exists():
            tag = pointer.read_text().strip()
            if (self.root / tag / COMPLETE).exists():
                return tag
        tags = self.complete_tags()
        return tags[-1] if tags else None

    @staticmethod
    def resolve(spec: str, root: Path) -> tuple[Path, str] | None:
        """checkpoint.resume -> (root, tag) or None: 'auto', 'none', or a path to a root or a tag dir."""
        if spec == "none":
            return None
        if spec == "auto":
            tag = CheckpointManager(root, 1, 0).latest()
            return (root, tag) if tag else None
        p = Path(spec)
        if (p / COMPLETE).exists():
            return p.parent, p.name
        tag = CheckpointManager(p, 1, 0).latest()
        if tag is None:
            raise ValueError(f"checkpoint.resume={spec!r}: no complete checkpoint there "
                             f"(a step_NNNNNNNN directory with a {COMPLETE} file)")
        return p, tag

    # ----- save / load -------------------------------------------------------------------------------
    def save(self, engine, step: int, trainer_state: dict[str, Any]) -> str:
        tag = tag_for(step)
        if self.rank == 0:
            stale = self.root / tag
            if stale.exists() and not (stale / COMPLETE).exists():
                shutil.rmtree(stale)  # an earlier crash mid-save at this very step
        _barrier()
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
        _atomic_write(self.root / tag / f"trainer_state_rank{self.rank}.json",
                      json.dumps({**trainer_state, "step": step}))
        _barrier()
        if self.rank == 0:
            _atomic_write(self.root / tag / COMPLETE, f"{step}\n")
            _atomic_write(self.root / LATEST, tag + "\n")
            for old in self.complete_tags()[: -self.keep_last]:
                shutil.rmtree(self.root / old, ignore_errors=True)
        _barrier()
        return tag

    def load(self, engine, root: Path, tag: str) -> dict[str, Any]:
        path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
        mine = root / tag / f"trainer_state_rank{self.rank}.json"
        if not mine.exists():  # resumed on a different world size: rank 0's position is the same for all
            mine = root / tag / "trainer_state_rank0.json"
        return json.loads(mine.read_text())


# ----- RNG state -----------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
