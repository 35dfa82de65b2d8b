"""Test helper: small shard datasets written to the shard contract, for the loader's tests.

Written independently of the production writer (data/shards.py) so the loader is tested against
the contract itself: webdataset.ShardWriter shards of one task and split, keys without dots,
`ids.npy` int32 in Emu3's layout, `json` with task / tokenizer_sha256 / image_hw / answer_start /
source, and a manifest.json listing the shards relative to the directory with each shard's sample
count (`shard_samples`; left out with `shard_counts=False`, as older writers did). Text is a byte-level
stand-in tokenizer (ids = character codes, all < 256 = text_size of the small vocabulary).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import numpy as np
import webdataset as wds

from data.layout import lm_ids, mmu_ids, t2i_ids
from model.config import VocabLayout

SMALL = VocabLayout(text_size=256, pad_id=256, bos_id=257, eos_id=258, boi_id=259, eoi_id=260, img_id=261,
                    eol_id=262, eof_id=263, visual_start=264, visual_size=512, vocab_size=776)
SHA = hashlib.sha256(b"byte-level test tokenizer").hexdigest()
OTHER_SHA = hashlib.sha256(b"some other tokenizer").hexdigest()


def text_ids(s: str) -> list[int]:
    return [ord(c) for c in s]


def make_sample(task: str, rng: np.random.Generator, layout: VocabLayout = SMALL) -> tuple[np.ndarray, dict]:
    """(ids int32, json meta) of one random sample of `task`, 7 to ~60 tokens long."""
    meta: dict[str, Any] = {"task": task, "tokenizer_sha256": SHA, "image_hw": None, "answer_start": None,
                            "source": f"random:{task}"}
    if task == "lm":
        return lm_ids(rng.integers(0, 256, int(rng.integers(3, 40))).tolist(), layout), meta
    h, w = (int(v) for v in rng.integers(2, 5, size=2))
    codes_HW = rng.integers(0, layout.visual_size, (h, w))
    size = text_ids(f"{h}*{w}")
    meta["image_hw"] = [h, w]
    if task == "t2i":
        return t2i_ids(rng.integers(0, 256, int(rng.integers(0, 8))).tolist(), codes_HW, layout, size), meta
    ids, answer_start = mmu_ids(text_ids("Q: "), codes_HW, rng.integers(0, 256, 4).tolist(),
                                rng.integers(0, 256, int(rng.integers(1, 6))).tolist(), layout, size)
    meta["answer_start"] = answer_start
    return ids, meta


Mutate = Callable[[str, dict], "dict | None"]


def write_dataset(root: str, *, shards: int = 8, per_shard: int = 4, tasks: tuple[str, ...] = ("t2i", "mmu", "lm"),
                  split: str = "train", seed: int = 0, mutate: Mutate | None = None,
                  sample_fn: Callable[[str, np.random.Generator], tuple[np.ndarray, dict]] | None = None,
                  shard_counts: bool = True) -> dict[str, tuple[str, np.ndarray, dict]]:
    """Write `shards` x `per_shard` samples per task plus manifest.json; returns key -> (task, ids, meta).

    `mutate(key, sample)` may edit the webdataset sample dict before it is written (to make bad
    input) or return None to leave the sample out. Returned samples are the ones written.
    """
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    written: dict[str, tuple[str, np.ndarray, dict]] = {}
    names: dict[str, list[str]] = {}
    counts: dict[str, list[int]] = {}
    for task in tasks:
        counts[task] = [0] * shards
        pattern = os.path.join(root, f"{task}-{split}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
            for n in range(shards * per_shard):
                key = f"{task}-{split}-{n // per_shard:06d}-{n % per_shard}"
                ids, meta = (sample_fn or make_sample)(task, rng)
                sample = {"__key__": key, "ids.npy": np.asarray(ids, dtype=np.int32), "json": meta}
                if mutate is not None:
                    sample = mutate(key, sample)
                    if sample is None:
                        continue
                sink.write(sample)
                counts[task][sink.shard - 1] += 1  # ShardWriter.shard: index of the next shard it opens
                written[key] = (task, np.asarray(sample.get("ids.npy")), sample.get("json"))
        names[task] = [f"{task}-{split}-{i:06d}.tar" for i in range(shards)]
    manifest = {
        "format": "unimod-shards-v1",
        "vocab": SMALL.to_dict(),
        "tokenizer": {"type": "sentencepiece", "path": "tokenizer.model", "sha256": SHA},
        "image_tokenizer": None,
        "splits": {split: {"shards": names, "samples": {t: sum(counts[t]) for t in tasks}}},
        "created_by": "tests/shard_fixtures.py",
    }
    if shard_counts:
        manifest["splits"][split]["shard_samples"] = counts
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return written


def shard_path(root: str, task: str, index: int, split: str = "train") -> str:
    return os.path.join(root, f"{task}-{split}-{index:06d}.tar")
