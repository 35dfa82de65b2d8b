"""The `data:` section of a run (`LoaderConfig`): where the shards are and how they become micro-batches.

Apart from the loader (`data/loader.py`) so that the worker side (`data/stream.py`) and the run config
(`train/config.py`) can use it without importing the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import braceexpand

from data.layout import TASKS
from model.config import check_int, check_number, known_fields


@dataclass
class LoaderConfig:
    """Where the shards are and how they become micro-batches (the `data:` section of a run)."""

    dataset_dir: str | None = None
    """Directory holding manifest.json and the shards; exclusive with `shards`."""
    split: str = "train"
    """Split of the manifest to read."""
    shards: dict[str, str | list[str]] | None = None
    """Task -> brace-expanded shard URLs ("/data/t2i-{000000..000127}.tar", "https://..."), instead of a
    manifest. Needs `batches_per_epoch` (no sample counts) and the vocabulary layout passed to the loader."""
    tokenizer_sha256: str | None = None
    """With `shards`: hash every sample's json must carry (None: not checked). The manifest's otherwise."""
    tasks: dict[str, float] = field(default_factory=lambda: {"t2i": 1.0, "mmu": 1.0, "lm": 0.2})
    """Task -> passes over its data per epoch (1.0 = every sample once, 0.2 = a fifth)."""
    seq_len: int = 4096
    """Tokens per row; every micro-batch is [micro_batch_size, seq_len]."""
    micro_batch_size: int = 1
    """Rows per micro-batch (per rank, per step of gradient accumulation)."""
    pack: bool = True
    """Concatenate whole same-task samples into rows (True) or pad one sample per row (False)."""
    pad_to: str = "seq_len"
    """seq_len: every micro-batch is [micro_batch_size, seq_len] (fixed shapes, which pipeline parallelism
    needs); longest: cut each micro-batch's trailing padding down to its longest row rounded up to
    pad_multiple (HF's pad-to-longest collation), so short samples (a whole micro-batch of 90-token
    images at seq_len 128) do not pay the dense layers and the head for padding."""
    pad_multiple: int = 8
    """With pad_to: longest, round the width up to a multiple of this (tensor-core friendly shapes)."""
    overlong: str = "reject"
    """lm sample longer than seq_len: reject (a bad input, see bad_input) or truncate it. A t2i or mmu
    sample is never cut (it would lose its image end or its answer): always rejected."""
    caption_dropout: float = 0.0
    """Probability that a t2i sample trains with an empty caption this epoch (classifier-free guidance;
    Emu3 uses 0.05). Drawn per (seed, epoch, sample key); lm and mmu samples are never touched."""
    image_grid: list[int] | None = None
    """[h, w] code grid every t2i/mmu image must have (e.g. [8, 8] for the grey8 demo); None: any grid.
    A shard whose first sample disagrees fails the start-up check under either bad_input policy."""
    shuffle_buffer: int = 1000
    """Samples held per task stream for shuffling; 0 or 1 keeps shard order."""
    seed: int = 0
    """Seeds shard order, shuffle buffers and the task schedule; same on every rank."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process."""
    bad_input: str = "raise"
    """raise: stop at the first bad shard or sample; skip: drop it and count it in counters()."""
    max_skip_fraction: float = 0.01
    """Under skip, the share of the data that may be lost before the loader raises DataLossError: bad
    samples skipped plus samples that dropped or cut-short shards never delivered (manifest counts),
    over the samples this rank expected to read so far, judged over at least 1/max_skip_fraction
    samples so that one early bad sample does not stop a run; shards left out at start-up count as
    their share of the split's samples and are judged when the loader is built. 1.0: no limit."""
    allow_pipe: bool = False
    """Allow `pipe:` shard URLs, which run a shell command; only for trusted configs."""
    image_structural_in_loss: bool = False
    """Also supervise EOL/EOF/<image end> of t2i image blocks (Emu3 leaves them out, Emu3 #53)."""
    batches_per_epoch: int | None = None
    """Micro-batches per rank per epoch; None derives it from the manifest's sample counts and weights."""
    validate_on_start: bool = True
    """Check every shard's first sample when the loader is built (tokenizer, task, vocabulary, tar)."""

    def __post_init__(self) -> None:
        if (self.dataset_dir is None) == (self.shards is None):
            raise ValueError("data: set exactly one of data.dataset_dir and data.shards")
        if not isinstance(self.tasks, Mapping) or not self.tasks:
            raise ValueError(f"data.tasks must map task -> weight, got {self.tasks!r}")
        for task, w in self.tasks.items():
            if task not in TASKS:
                raise ValueError(f"data.tasks names {task!r}, not one of {TASKS}")
            check_number(f"data.tasks.{task}", w, 0.0, lo_open=True)
        for name, lo in (("seq_len", 2), ("micro_batch_size", 1), ("shuffle_buffer", 0), ("seed", 0),
                         ("num_workers", 0)):
            check_int(f"data.{name}", getattr(self, name), lo)
        if self.batches_per_epoch is not None and (
                isinstance(self.batches_per_epoch, bool) or not isinstance(self.batches_per_epoch, int)
                or self.batches_per_epoch < 1):
            raise ValueError(f"data.batches_per_epoch must be a positive integer or null, got {self.batches_per_epoch!r}")
        if self.bad_input not in ("raise", "skip"):
            raise ValueError(f"data.bad_input must be 'raise' or 'skip', got {self.bad_input!r}")
        check_number("data.max_skip_fraction", self.max_skip_fraction, 0.0, 1.0)  # 1.0: no limit
        if self.pad_to not in ("seq_len", "longest"):
            raise ValueError(f"data.pad_to must be 'seq_len' or 'longest', got {self.pad_to!r}")
        check_int("data.pad_multiple", self.pad_multiple, 1)
        if self.overlong not in ("reject", "truncate"):
            raise ValueError(f"data.overlong must be 'reject' or 'truncate', got {self.overlong!r}")
        check_number("data.caption_dropout", self.caption_dropout, 0.0, 1.0)
        if self.image_grid is not None:
            g = self.image_grid
            if (not isinstance(g, (list, tuple)) or len(g) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in g)):
                raise ValueError(f"data.image_grid must be [h, w] (two positive integers) or null, got {g!r}")
            self.image_grid = [int(v) for v in g]
        if self.shards is not None:
            if not isinstance(self.shards, Mapping):
                raise ValueError(f"data.shards must map task -> shard URLs, got {self.shards!r}")
            for task in self.tasks:
                if task not in self.shards:
                    raise ValueError(f"data.shards has no entry for task {task!r} named in data.tasks")
            self.shards = {t: expand_urls(spec, self.allow_pipe, f"data.shards.{t}") for t, spec in self.shards.items()}
            if self.batches_per_epoch is None:
                raise ValueError("data.batches_per_epoch is required with data.shards (no manifest sample counts)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoaderConfig":
        return cls(**known_fields(cls, d, "data"))


def expand_urls(spec: str | list[str], allow_pipe: bool, where: str) -> list[str]:
    """Brace-expand shard URLs; refuse `pipe:` (a shell command) unless allowed."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items or not all(isinstance(s, str) and s for s in items):
        raise ValueError(f"{where} must be a non-empty string or list of strings, got {spec!r}")
    urls = [u for s in items for u in braceexpand.braceexpand(s)]
    for u in urls:
        if u.startswith("pipe:") and not allow_pipe:
            raise ValueError(f"{where}: {u!r} is a pipe: URL, which runs a shell command; "
                             "set data.allow_pipe: true only for trusted configs")
    return urls
