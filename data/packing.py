"""Fixed-shape rows and micro-batches from variable-length samples of one task.

Two modes, chosen by `LoaderConfig.pack`:

- packing: whole samples are concatenated into a row in stream order while they fit (next-fit);
  the sample that does not fit closes the row, whose remainder is padded, and opens the next row.
  Samples are never split across rows, so every label still predicts a token of its own sample.
  Emu3's fine-tuning pads every sample to the full length instead, which wastes compute on short
  samples (pitfalls.md); packing same-task samples avoids it.
- padding: one sample per row, right-padded (Emu3 trains with right padding).

Padding uses `pad_id` in the inputs and -100 in the labels. Every micro-batch is [B, S] so pipeline
stages can exchange fixed shapes.

Position ids carry the document boundaries (the micro-batch contract): they restart at 0 at the start
of every sample in a row, and the trailing padding continues the last sample's positions. The model
derives its document mask from them alone: a new document starts at t = 0 and wherever
`position_ids[b, t] != position_ids[b, t - 1] + 1`. So every packed sample sees only itself, with the
RoPE positions it would have alone (Megatron's reset_position_ids / reset_attention_mask), and a
one-sample row, padded or not, reads 0..S-1 and needs no mask at all. Padding joins the last document
rather than starting its own: its labels are -100, and causal attention keeps it from affecting any
real token before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from data.layout import IGNORE_INDEX


@dataclass
class Row:
    """One row of a micro-batch before padding."""

    ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    length: int = 0


class RowBuilder:
    """Turns a stream of (ids, labels, key) samples of one task into full rows of `seq_len`."""

    def __init__(self, seq_len: int, pack: bool) -> None:
        self.seq_len = seq_len
        self.pack = pack
        self._open = Row()

    @property
    def open_length(self) -> int:
        """Tokens in the row being filled."""
        return self._open.length

    def add(self, ids: np.ndarray, labels: np.ndarray, key: str) -> list[Row]:
        """Add one sample (len <= seq_len); returns the rows this closed (zero, one or two)."""
        n = len(ids)
        assert 0 < n <= self.seq_len and len(labels) == n, (n, self.seq_len, len(labels))
        done: list[Row] = []
        if self._open.length and (not self.pack or self._open.length + n > self.seq_len):
            done.append(self._open)
            self._open = Row()
        self._open.ids.append(ids)
        self._open.labels.append(labels)
        self._open.keys.append(key)
        self._open.length += n
        if not self.pack or self._open.length == self.seq_len:
            done.append(self._open)
            self._open = Row()
        return done


def rows_to_arrays(rows: list[Row], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, labels, position_ids), each int64 [B, S]: pad_id / -100 after each row's samples,
    positions restarting at every sample and running on through the padding."""
    ids_BS = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    labels_BS = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    pos_BS = np.empty((len(rows), seq_len), dtype=np.int64)
    for b, row in enumerate(rows):
        assert row.ids and row.length <= seq_len, (len(row.ids), row.length, seq_len)
        ids_BS[b, :row.length] = np.concatenate(row.ids)
        labels_BS[b, :row.length] = np.concatenate(row.labels)
        lengths = [len(x) for x in row.ids]
        lengths[-1] += seq_len - row.length  # the padding extends the last document
        pos_BS[b] = np.concatenate([np.arange(n) for n in lengths])
    return ids_BS, labels_BS, pos_BS


def batch_width(rows: list[Row], seq_len: int, pad_to: str, multiple: int) -> int:
    """Columns of a micro-batch: seq_len, or (pad_to="longest") its longest row rounded up to `multiple`
    and capped at seq_len, so a micro-batch of short samples does not pay for padding up to seq_len."""
    if pad_to == "seq_len":
        return seq_len
    longest = max(row.length for row in rows)
    return min(seq_len, -(-longest // multiple) * multiple)


def make_batch(rows: list[Row], seq_len: int, pad_id: int, task_id: int, pad_to: str = "seq_len",
               pad_multiple: int = 8) -> dict[str, torch.Tensor]:
    """The micro-batch contract: input_ids, labels, position_ids [B, S] and task_ids [B], all int64.
    S is seq_len, or with pad_to="longest" the longest row rounded up to pad_multiple (see batch_width)."""
    width = batch_width(rows, seq_len, pad_to, pad_multiple)
    ids_BS, labels_BS, pos_BS = rows_to_arrays(rows, width, pad_id)
    return {
        "input_ids": torch.from_numpy(ids_BS),
        "labels": torch.from_numpy(labels_BS),
        "task_ids": torch.full((len(rows),), task_id, dtype=torch.long),
        "position_ids": torch.from_numpy(pos_BS),
    }


def estimate_rows_per_sample(lengths: list[int], seq_len: int, pack: bool) -> float:
    """Rows the builder makes per sample on a stream with these lengths (1.0 when padding)."""
    if not pack or not lengths:
        return 1.0
    builder = RowBuilder(seq_len, pack=True)
    rows = 0
    for n in lengths:
        n = min(n, seq_len)
        rows += len(builder.add(np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int64), ""))
    rows += 1 if builder.open_length else 0
    return rows / len(lengths)
