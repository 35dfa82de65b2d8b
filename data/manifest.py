"""Reading a dataset's manifest.json: the one reader, which checks every field it returns.

The manifest (written by `data.shards.DatasetWriter`, or by `python -m data.prepare merge`) lists, per
split, the shards and sample count of every task, each shard's sample count and each task's longest
sample; it names the vocabulary layout, the text tokenizer and the image tokenizer:

    manifest = load_manifest("demo_data")
    manifest.shards["train"]["t2i"]           # shard paths, joined onto the dataset directory
    manifest.vocab, manifest.tokenizer_sha256
    manifest.doc["image_tokenizer"]           # sections read where they are used

Every error is a ValueError naming the file and the field. Shard names must be plain relative paths:
a manifest is data, and data must never choose a shell command (`pipe:`) or a file outside the
dataset directory.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from data.layout import TASKS
from model.config import VocabLayout

MANIFEST_FORMAT = "unimod-shards-v1"
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """A checked manifest.json, with shard names resolved to paths."""

    root: str
    """Dataset directory (shard paths below are joined onto it)."""
    vocab: VocabLayout
    """Vocabulary layout the token ids were written in."""
    tokenizer_sha256: str
    """Hash of the text tokenizer every sample must carry in its json."""
    shards: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """split -> task -> shard paths."""
    samples: dict[str, dict[str, int]] = field(default_factory=dict)
    """split -> task -> number of samples the writer put in the split."""
    max_len: dict[str, dict[str, int]] = field(default_factory=dict)
    """split -> task -> tokens of the longest sample (absent for tasks of manifests written without it)."""
    shard_samples: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    """split -> task -> samples in each shard, parallel to `shards` (absent for tasks of manifests written
    without it: a shard cut short then goes unnoticed unless the cut breaks a tar member)."""
    doc: dict[str, Any] = field(default_factory=dict)
    """The whole document as read: the sections the fields above do not model (`tokenizer` path and type,
    `image_tokenizer`, `demo`, `created_by`) are checked where they are used."""

    @property
    def path(self) -> str:
        """The manifest file, for error messages."""
        return os.path.join(self.root, MANIFEST_NAME)

    def expected_counts(self, split: str) -> dict[str, int]:
        """Shard path -> samples the manifest records in it, for the shards of `split` that have a count."""
        return {url: n for task, counts in self.shard_samples.get(split, {}).items()
                for url, n in zip(self.shards[split][task], counts)}


_NOTED: set[str] = set()  # manifests whose missing shard counts were already reported in this process


def load_manifest(dataset_dir: str | os.PathLike) -> Manifest:
    """Read and check `<dataset_dir>/manifest.json`; errors name the file and the field."""
    root = os.fspath(dataset_dir)
    path = os.path.join(root, MANIFEST_NAME)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no manifest.json in dataset directory {root!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read the manifest ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: field format must be {MANIFEST_FORMAT!r}, got {_get(doc, 'format')!r}")
    try:
        vocab = VocabLayout(**doc["vocab"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: field vocab is not a valid VocabLayout: {e}") from None
    sha = _get(_get(doc, "tokenizer"), "sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise ValueError(f"{path}: field tokenizer.sha256 must be a 64-digit hex string, got {sha!r}")
    splits = doc.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise ValueError(f"{path}: field splits must be a non-empty mapping, got {splits!r}")
    shards: dict[str, dict[str, list[str]]] = {}
    samples: dict[str, dict[str, int]] = {}
    max_len: dict[str, dict[str, int]] = {}
    shard_samples: dict[str, dict[str, list[int]]] = {}
    for split, body in splits.items():
        where = f"{path}: field splits.{split}"
        per_task = _get(body, "shards")
        if not isinstance(per_task, dict):
            raise ValueError(f"{where}.shards must map task -> list of shard names, got {per_task!r}")
        shards[split] = {}
        for task, names in per_task.items():
            if task not in TASKS:
                raise ValueError(f"{where}.shards names task {task!r}, not one of {TASKS}")
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{where}.shards.{task} must be a list of shard names")
            shards[split][task] = [_shard_path(root, n, f"{where}.shards.{task}") for n in names]
        counts = _get(body, "samples") or {}
        if not isinstance(counts, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts.values()):
            raise ValueError(f"{where}.samples must map task -> non-negative int, got {counts!r}")
        samples[split] = dict(counts)
        longest = _get(body, "max_len") or {}
        if not isinstance(longest, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in longest.values()):
            raise ValueError(f"{where}.max_len must map task -> positive int, got {longest!r}")
        max_len[split] = dict(longest)
        shard_samples[split] = _shard_counts(body, shards[split], samples[split], where)
    without = [f"{split}.{task}" for split in shards for task in shards[split] if task not in shard_samples[split]]
    if without and path not in _NOTED:
        # Said once per process: every rank and every tool loading the manifest would repeat it.
        _NOTED.add(path)
        print(f"note: {path} records no per-shard sample counts (splits.<split>.shard_samples) for "
              f"{', '.join(without)}: written by an older data.prepare, so a shard cut short (e.g. inside a "
              f"tar header, which reads as a shorter valid tar) is not caught there; rebuild or re-merge the "
              f"dataset to get them", file=sys.stderr, flush=True)
    return Manifest(root=root, vocab=vocab, tokenizer_sha256=sha, shards=shards, samples=samples,
                    max_len=max_len, shard_samples=shard_samples, doc=doc)


def _shard_counts(body: dict, shards: dict[str, list[str]], samples: dict[str, int], where: str
                  ) -> dict[str, list[int]]:
    """splits.<split>.shard_samples, checked: one non-negative int per shard, adding up to `samples`."""
    counts = _get(body, "shard_samples") or {}
    if not isinstance(counts, dict):
        raise ValueError(f"{where}.shard_samples must map task -> list of per-shard sample counts, got {counts!r}")
    out: dict[str, list[int]] = {}
    for task, ns in counts.items():
        here = f"{where}.shard_samples.{task}"
        if task not in shards:
            raise ValueError(f"{here}: task {task!r} has no shards in {where}.shards")
        if not isinstance(ns, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in ns):
            raise ValueError(f"{here} must be a list of non-negative ints, got {ns!r}")
        if len(ns) != len(shards[task]):
            raise ValueError(f"{here} has {len(ns)} counts for the {len(shards[task])} shards of {where}.shards.{task}")
        if task in samples and sum(ns) != samples[task]:
            raise ValueError(f"{here} adds up to {sum(ns)} but {where}.samples.{task} is {samples[task]}")
        out[task] = list(ns)
    return out


def _get(d: Any, key: str) -> Any:
    return d.get(key) if isinstance(d, dict) else None


def _shard_path(root: str, name: str, where: str) -> str:
    # A manifest is data: a URL, an absolute path or ".." would let it pick what gets opened or run.
    if not name or ":" in name or os.path.isabs(name) or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"{where}: shard name {name!r} must be a plain path relative to the dataset directory")
    return os.path.join(root, name)
