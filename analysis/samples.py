"""Per-task samples for the analysis: calibration from the TRAIN split, evaluation from VALIDATION.

Samples are read straight from the shards named by the dataset's manifest and checked with the
loader's own `check_sample` (errors name the shard, the sample key and the field); labels come from
`data.layout.make_labels`, the training labels. Samples are taken round-robin over a split's shards
(one from each shard in turn), so a small calibration set still spans every shard, and the choice is
deterministic: the same dataset always gives the same calibration set.

Batches are right-padded with `pad_id`; under causal attention a padded position is never attended
by a real one, so every real position computes exactly what it would alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from data.layout import IGNORE_INDEX, make_labels
from data.manifest import Manifest, load_manifest
from data.reader import check_sample, read_shard
from model.config import VocabLayout


@dataclass
class Sample:
    key: str
    """Sample key (`__key__`) in its shard."""
    shard: str
    """Path of the shard it came from."""
    ids: np.ndarray
    """Token ids [L] int64."""
    labels: np.ndarray
    """Loss labels [L] int64, aligned with `ids` (-100 = not supervised), as training uses them."""


@dataclass
class Batch:
    input_ids: torch.Tensor
    """[B, S] long, right-padded with pad_id."""
    labels: torch.Tensor
    """[B, S] long, -100 on padding and unsupervised positions."""
    lengths: torch.Tensor
    """[B] long: real length of each row."""


def open_dataset(dataset_dir: str, layout: VocabLayout) -> Manifest:
    """The dataset's manifest, after checking that its ids mean what the model's vocabulary says."""
    manifest = load_manifest(dataset_dir)
    if manifest.vocab != layout:
        diff = [k for k, v in layout.to_dict().items() if manifest.vocab.to_dict()[k] != v]
        raise ValueError(f"{dataset_dir}/manifest.json: field vocab.{diff[0]} = {getattr(manifest.vocab, diff[0])} "
                         f"but the checkpoint's vocabulary has {getattr(layout, diff[0])}; the data was written "
                         "for another model")
    return manifest


def _round_robin(shards: list[str]) -> Iterator[tuple[str, dict]]:
    streams = [(s, read_shard(s)) for s in shards]
    while streams:
        alive = []
        for shard, it in streams:
            raw = next(it, None)
            if raw is not None:
                alive.append((shard, it))
                yield shard, raw
        streams = alive


def load_task_samples(manifest: Manifest, split: str, task: str, n: int) -> list[Sample]:
    """Up to `n` checked samples of `task` from `split` (fewer if the split holds fewer)."""
    shards = manifest.shards.get(split, {}).get(task)
    if not shards:
        raise ValueError(f"{manifest.root}/manifest.json: field splits.{split}.shards.{task} is missing or "
                         f"empty; the analysis needs {split} samples of task {task!r}")
    out: list[Sample] = []
    for shard, raw in _round_robin(shards):
        ids, meta = check_sample(raw, shard=shard, task=task, layout=manifest.vocab,
                                 tokenizer_sha256=manifest.tokenizer_sha256)
        key = raw.get("__key__")
        try:
            labels = make_labels(ids, task, meta, manifest.vocab, key=key)
        except ValueError as e:
            raise ValueError(f"shard {shard}: {e}") from None
        out.append(Sample(key=key, shard=shard, ids=ids.astype(np.int64), labels=labels))
        if len(out) == n:
            break
    return out


def make_batches(samples: list[Sample], batch_size: int, pad_id: int, device: torch.device | str) -> list[Batch]:
    """Consecutive groups of `batch_size` samples, sorted by length first so little padding is computed."""
    ordered = sorted(samples, key=lambda s: len(s.ids))
    batches = []
    for start in range(0, len(ordered), batch_size):
        group = ordered[start:start + batch_size]
        S = max(len(s.ids) for s in group)
        ids = torch.full((len(group), S), pad_id, dtype=torch.long)
        labels = torch.full((len(group), S), IGNORE_INDEX, dtype=torch.long)
        for row, s in enumerate(group):
            ids[row, :len(s.ids)] = torch.from_numpy(s.ids)
            labels[row, :len(s.ids)] = torch.from_numpy(s.labels)
        lengths = torch.tensor([len(s.ids) for s in group], dtype=torch.long)
        batches.append(Batch(ids.to(device), labels.to(device), lengths.to(device)))
    return batches
