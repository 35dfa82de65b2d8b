"""Writing datasets in the shard contract: webdataset tar shards per (split, task) plus manifest.json.

Every sample is one `__key__` with `ids.npy` (1-D int32, Emu3 layout, BOS ... EOS) and `json`
(task, tokenizer_sha256, image_hw, answer_start, source, ...). The manifest lists, per split, the
shards and sample count of every task, the sample count of each shard (`shard_samples`, parallel to
`shards`: the reader checks it when a shard ends, since a tar cut inside a header reads as a shorter
valid tar) and the token count of its longest sample (`max_len`), which the loader checks against
`data.seq_len` before the first step. Shards are written with
`webdataset.ShardWriter` and cut by sample count and by size; tar headers get a fixed mtime, owner
and mode so that building the same data twice gives byte-identical shards.

    writer = DatasetWriter(out_dir, ShardConfig(max_count=500), vocab)
    writer.write("train", "t2i", key, ids, meta)
    writer.finish(image_tokenizer=..., created_by="python -m data.prepare demo")  # -> manifest.json

Read back with `data.manifest.load_manifest` and `data.reader` (`read_shard`, `check_sample`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from data.files import atomic_write
from data.layout import TASKS
from data.manifest import MANIFEST_FORMAT, MANIFEST_NAME
from data.vocab import UnifiedVocab

SPLITS = ("train", "validation")

_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Fixed tar header fields: the default mtime is "now", which would make every build differ.
_TAR_FIELDS = dict(mtime=0.0, user="unimod", group="unimod", mode=0o444)


@dataclass
class ShardConfig:
    """When `DatasetWriter` closes a shard and starts the next."""

    max_count: int = 1000
    """Samples per shard at most."""
    max_size_mb: float = 64.0
    """A shard is closed once its payload reaches this many MB (so it may exceed it by one sample)."""

    def __post_init__(self) -> None:
        if isinstance(self.max_count, bool) or not isinstance(self.max_count, int) or self.max_count <= 0:
            raise ValueError(f"shards.max_count must be a positive integer, got {self.max_count!r}")
        if not (isinstance(self.max_size_mb, (int, float)) and self.max_size_mb > 0):
            raise ValueError(f"shards.max_size_mb must be > 0, got {self.max_size_mb!r}")


class DatasetWriter:
    """Writes samples into `out_dir`, one `webdataset.ShardWriter` per (split, task), then the manifest."""

    def __init__(self, out_dir: str | os.PathLike, cfg: ShardConfig, vocab: UnifiedVocab):
        import webdataset as wds

        self._wds = wds
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.vocab = vocab
        self._writers: dict[tuple[str, str], Any] = {}
        self._counts: dict[tuple[str, str], int] = {}
        self._shard_counts: dict[tuple[str, str], list[int]] = {}
        self._max_len: dict[tuple[str, str], int] = {}
        self._keys: set[str] = set()

    def _writer(self, split: str, task: str):
        # Opened on the first sample only: ShardWriter creates its first tar on construction, and an
        # empty shard in the manifest would leave a rank without data.
        if (split, task) not in self._writers:
            pattern = str(self.out_dir / f"{task}-{split}-%06d.tar")
            self._writers[(split, task)] = self._wds.ShardWriter(
                pattern, maxcount=self.cfg.max_count, maxsize=self.cfg.max_size_mb * 1e6, verbose=0, **_TAR_FIELDS
            )
            self._counts[(split, task)] = 0
            self._shard_counts[(split, task)] = []
        return self._writers[(split, task)]

    def write(self, split: str, task: str, key: str, ids: np.ndarray, meta: Mapping[str, Any]) -> None:
        """Validate and write one sample; `meta` gets `task` and `tokenizer_sha256` filled in."""
        if split not in SPLITS:
            raise ValueError(f"sample {key!r}: split {split!r} is not one of {SPLITS}")
        if task not in TASKS:
            raise ValueError(f"sample {key!r}: task {task!r} is not one of {TASKS}")
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise ValueError(f"sample key {key!r} must be non-empty letters, digits, '-' or '_' (no dots)")
        if key in self._keys:
            raise ValueError(f"sample key {key!r} is written twice")
        ids = np.asarray(ids)
        lay = self.vocab.layout
        if ids.ndim != 1 or len(ids) < 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"sample {key!r}: ids must be a 1-D integer array of length >= 2, got {ids.shape}")
        if ids[0] != lay.bos_id or ids[-1] != lay.eos_id:
            raise ValueError(f"sample {key!r}: ids must start with bos_id {lay.bos_id} and end with eos_id {lay.eos_id}")
        if ids.min() < 0 or ids.max() >= lay.vocab_size:
            raise ValueError(f"sample {key!r}: ids outside [0, vocab_size={lay.vocab_size})")
        meta = {"task": task, "tokenizer_sha256": self.vocab.sha256, "image_hw": None, "answer_start": None,
                "source": "", **dict(meta)}
        if meta["task"] != task:
            raise ValueError(f"sample {key!r}: json field task {meta['task']!r} differs from the shard's task {task!r}")
        if task in ("t2i", "mmu") and not (isinstance(meta["image_hw"], (list, tuple)) and len(meta["image_hw"]) == 2):
            raise ValueError(f"sample {key!r}: json field image_hw must be [h, w] for task {task}")
        if task == "mmu" and not isinstance(meta["answer_start"], int):
            raise ValueError(f"sample {key!r}: json field answer_start must be an int for task mmu")
        if isinstance(meta["image_hw"], tuple):
            meta["image_hw"] = list(meta["image_hw"])
        w = self._writer(split, task)
        w.write({"__key__": key, "ids.npy": ids.astype(np.int32), "json": meta})
        self._keys.add(key)
        self._counts[(split, task)] += 1
        per_shard = self._shard_counts[(split, task)]
        while len(per_shard) < w.shard:  # ShardWriter opened a new shard for this sample
            per_shard.append(0)
        per_shard[w.shard - 1] += 1
        self._max_len[(split, task)] = max(self._max_len.get((split, task), 0), len(ids))

    def finish(self, image_tokenizer: Mapping[str, Any] | None, created_by: str,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Close every shard and write manifest.json; returns the manifest."""
        splits: dict[str, Any] = {}
        for split in SPLITS:
            shards: dict[str, list[str]] = {}
            samples: dict[str, int] = {}
            shard_samples: dict[str, list[int]] = {}
            max_len: dict[str, int] = {}
            for task in TASKS:
                w = self._writers.get((split, task))
                if w is None:
                    continue
                n_shards = w.shard  # ShardWriter's next shard index = shards opened so far
                w.close()
                shards[task] = [f"{task}-{split}-{i:06d}.tar" for i in range(n_shards)]
                samples[task] = self._counts[(split, task)]
                shard_samples[task] = list(self._shard_counts[(split, task)])
                assert len(shard_samples[task]) == n_shards, (shard_samples[task], n_shards)
                max_len[task] = self._max_len[(split, task)]
            splits[split] = {"shards": shards, "samples": samples, "shard_samples": shard_samples, "max_len": max_len}
        self._writers.clear()
        manifest = {
            "format": MANIFEST_FORMAT,
            "vocab": self.vocab.layout.to_dict(),
            "tokenizer": self.vocab.manifest_entry(self.out_dir),
            "image_tokenizer": dict(image_tokenizer) if image_tokenizer is not None else None,
            "splits": splits,
            "created_by": created_by,
        }
        if extra:
            manifest.update(extra)
        atomic_write(self.out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
        return manifest
