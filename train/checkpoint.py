"""Checkpoints that survive crashes and exact resume (stop signals: train/signals.py).

Layout under `<output_dir>/checkpoints/`:

    step_00000040/            DeepSpeed engine state (model, optimizer, scheduler) + ours:
        trainer_state_rank{r}.json   step, data-loader position, RNG states of that rank
        fingerprint.json             what the run was configured with (train/fingerprint.py)
        COMPLETE                     written by rank 0 after every rank finished writing
    latest                    the tag of the newest COMPLETE checkpoint (replaced atomically)

Write order: engine files and trainer states (every rank), fingerprint (rank 0), a barrier, COMPLETE, then
`latest`, then pruning. A checkpoint counts only once COMPLETE exists and `latest` moves only after that, so
a crash (or SIGKILL) while saving leaves the previous checkpoint as the one resumed from. A COMPLETE
checkpoint is never rewritten, and old ones are pruned only after a newer one is complete. A save that fails
(disk full, no permission) removes its partial directory and raises `CheckpointWriteError` naming the path
and the cause. Trainer state is JSON (no pickles to trust on load).
"""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from data.files import atomic_write
from train import fingerprint as fingerprints
from train.launch import barrier, distributed

COMPLETE = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step_(\d{8})$")

_CAUSES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted", errno.EROFS: "read-only file system"}


class CheckpointWriteError(RuntimeError):
    """A checkpoint (or the run's config) could not be written; the message names the path and the cause."""


def describe_write_error(e: BaseException, where: Path) -> str:
    """'disk full (ENOSPC) writing <path>' for an OSError; torch.save reports a full disk as a RuntimeError
    without errno, so that one gets its text and the free space left."""
    if isinstance(e, OSError) and e.errno is not None:
        cause = _CAUSES.get(e.errno, e.strerror or "I/O error")
        return f"{cause} ({errno.errorcode.get(e.errno, e.errno)}) writing {e.filename or where}"
    try:
        free = f"{shutil.disk_usage(where if where.exists() else where.parent).free / 2**20:.0f} MiB free there"
    except OSError:
        free = "free space unknown"
    return f"{type(e).__name__} writing {where}: {e} ({free})"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def broadcast_from_rank0(obj: Any) -> Any:
    """Rank 0's `obj` on every rank: decisions made by reading a shared filesystem are made once (ranks with a
    stale view of it would otherwise decide differently)."""
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _first_error(mine: str | None) -> str | None:
    """Agree across ranks on whether any rank failed; the first failing rank's message (None: all fine)."""
    if not distributed():
        return mine
    every: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return next((e for e in every if e is not None), None)


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
    def save(self, engine, step: int, trainer_state: dict[str, Any], fingerprint: dict[str, Any],
             prune: bool = True) -> str:
        """Write checkpoint `step` (every rank calls this). Returns its tag; a COMPLETE checkpoint of that step
        is kept as it is (a stop right after a periodic save, or the exit-3 save of an unchanged model). Raises
        CheckpointWriteError on every rank when any rank could not write, after removing the partial tag."""
        tag = tag_for(step)
        tag_dir = self.root / tag
        if broadcast_from_rank0((tag_dir / COMPLETE).exists()):
            return tag
        if self.rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)  # an earlier crash mid-save at this very step
        barrier()
        failed = None
        where = tag_dir
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step}, save_latest=False)
            where = tag_dir / f"trainer_state_rank{self.rank}.json"
            atomic_write(where, json.dumps({**trainer_state, "step": step}))
            if self.rank == 0:
                where = tag_dir / fingerprints.FINGERPRINT
                fingerprints.write(tag_dir, fingerprint, atomic_write)
        except (OSError, RuntimeError) as e:
            failed = describe_write_error(e, where)
        failed = _first_error(failed)  # also the barrier before COMPLETE: every rank has written its part
        if failed is None and self.rank == 0:
            where = tag_dir / COMPLETE
            try:
                atomic_write(where, f"{step}\n")
                where = self.root / LATEST
                atomic_write(where, tag + "\n")
            except BaseException as e:
                # `latest` still names the previous checkpoint; without COMPLETE no scan picks this one either.
                (tag_dir / COMPLETE).unlink(missing_ok=True)
                if not isinstance(e, OSError):
                    raise
                failed = describe_write_error(e, where)
        failed = broadcast_from_rank0(failed)
        if failed is not None:
            if self.rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
            barrier()
            raise CheckpointWriteError(f"checkpoint {tag_dir} not saved: {failed}; its partial directory was "
                                       f"removed, {self.latest() or 'no checkpoint'} stays the latest")
        if prune and self.rank == 0:
            for old in self.complete_tags()[: -self.keep_last]:
                shutil.rmtree(self.root / old, ignore_errors=True)
        barrier()
        return tag

    def load(self, engine, root: Path, tag: str, state_dir: Path | None = None) -> dict[str, Any]:
        """Load `root/tag` into the engine; returns this rank's trainer state, read from `state_dir` (default
        `root/tag`; an elastic resume loads a converted copy of the checkpoint kept elsewhere)."""
        path, _ = engine.load_checkpoint(str(root), tag=tag, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
        state_dir = state_dir or root / tag
        mine = state_dir / f"trainer_state_rank{self.rank}.json"
        if not mine.exists():  # resumed on a different world size: rank 0's position is the same for all
            mine = state_dir / "trainer_state_rank0.json"
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
