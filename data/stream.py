"""What one DataLoader worker does: its share of the shards -> checked samples -> shuffled -> rows -> micro-batches.

Every stream here is a pure function of (seed, epoch, task, slot), where a slot is one (rank,
worker) pair, so any worker can rebuild its stream and fast-forward to a resume point; the layout of
an epoch (shard split, pass-bounded shuffle buffer, task quotas) is described in `data/loader.py`,
which builds the `EpochPlan` and runs the workers.
"""

from __future__ import annotations

import collections
import math
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from data.config import LoaderConfig
from data.layout import TASKS, make_labels, strip_caption
from data.packing import RowBuilder, make_batch
from data.reader import SHARD_REASONS, BadInputError, bad, check_sample, read_shard
from model.config import VocabLayout

# Seed-sequence tags, so the shard order, the shuffle buffer, the schedule and caption dropout never
# share a stream.
_SHARD_ORDER, _BUFFER, _SCHEDULE, _CAPTION = 1, 2, 3, 4
_PASS_END = object()  # marks the end of one pass in a task's sample stream


@dataclass(frozen=True)
class EpochPlan:
    """Everything a worker needs, fixed at construction and identical on every rank."""

    cfg: LoaderConfig
    layout: VocabLayout
    tokenizer_sha256: str | None
    shards: dict[str, list[str]]       # task -> usable shards
    task_ids: dict[str, int]           # task -> index in the model's task list
    rank: int
    world_size: int
    quota: dict[str, float]            # task -> share of a slot's micro-batches
    batches_per_epoch: int             # per rank
    expected: dict[str, int] = field(default_factory=dict)  # shard -> manifest sample count, where recorded

    @property
    def workers(self) -> int:
        return max(1, self.cfg.num_workers)

    @property
    def slots(self) -> int:
        return self.world_size * self.workers

    def worker_batches(self, role: int) -> int:
        """Micro-batches worker `role` yields per epoch: its share of the rank's round robin."""
        return len(range(role, self.batches_per_epoch, self.workers))

    def schedule(self, epoch: int, role: int) -> list[str]:
        """The task of each micro-batch worker `role` of this rank yields in `epoch`."""
        n = self.worker_batches(role)
        counts = _apportion(n, self.quota)
        seq = [t for t in self.quota for _ in range(counts[t])]
        slot = self.rank * self.workers + role
        order = _rng(self.cfg.seed, epoch, _SCHEDULE, slot).permutation(len(seq))
        return [seq[i] for i in order]


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def caption_dropped(seed: int, epoch: int, key: str, p: float) -> bool:
    """Whether t2i sample `key` trains without its caption in `epoch`: one draw seeded by (seed, epoch,
    key) alone, so it is the same whichever rank, worker, pass or resume reads the sample."""
    return p > 0 and _rng(seed, epoch, _CAPTION, zlib.crc32(key.encode())).random() < p


def _apportion(n: int, shares: Mapping[str, float]) -> dict[str, int]:
    """Split n micro-batches over tasks in proportion to shares (largest remainder, ties by order)."""
    total = sum(shares.values())
    exact = {t: n * s / total for t, s in shares.items()}
    counts = {t: int(math.floor(x)) for t, x in exact.items()}
    rest = sorted(shares, key=lambda t: (-(exact[t] - counts[t]), list(shares).index(t)))
    for t in rest[: n - sum(counts.values())]:
        counts[t] += 1
    return counts


# ----- one worker's stream ------------------------------------------------------------------------------
class Counters:
    """Read, skip, loss and caption-dropout counts of one worker since the start of the epoch (replayed
    batches included), and what it dropped since its last batch, for the training process to report."""

    def __init__(self) -> None:
        self.c: collections.Counter[str] = collections.Counter()
        self._by_shard: collections.Counter[tuple[str, str]] = collections.Counter()  # this epoch
        self._by_shard_changed = False
        self._dropped: list[DroppedShard] = []  # since the last news()

    def skip(self, e: BadInputError, lost: int | None = None) -> None:
        """Count a skipped sample, or a dropped shard that cost `lost` unread samples (None: unknown,
        the shard has no manifest count)."""
        shard_level = e.reason in SHARD_REASONS
        kind = "skipped_shards" if shard_level else "skipped_samples"
        self.c[kind] += 1
        self.c[f"{kind}/{e.reason}"] += 1
        if shard_level:
            self.c["lost_samples"] += lost or 0
            self.c[f"lost_samples/{e.reason}"] += lost or 0
            self._dropped.append(DroppedShard(e.shard or "?", e.reason or "?", str(e), lost))
        self._by_shard[(e.shard or "?", e.reason or "?")] += (lost or 0) if shard_level else 1
        self._by_shard_changed = True

    def news(self) -> WorkerNews:
        """The counters so far and what changed since the previous call (sent with every batch)."""
        by_shard = dict(self._by_shard) if self._by_shard_changed else None
        out = WorkerNews(dict(self.c), by_shard, self._dropped)
        self._by_shard_changed, self._dropped = False, []
        return out


@dataclass
class DroppedShard:
    """A shard that a worker gave up on (in whole or from the point of the fault) under `skip`."""

    shard: str
    """Shard path or URL."""
    reason: str
    """One of data.reader.SHARD_REASONS."""
    message: str
    """The BadInputError's message (shard, last key, field, expected vs read)."""
    lost: int | None
    """Samples the manifest records in the shard that were never read; None without a manifest count."""


@dataclass
class WorkerNews:
    """What a worker sends with each batch besides the batch itself."""

    counts: dict[str, int]
    """Its counters since the start of the epoch (replay included): replaces the previous copy."""
    by_shard: dict[tuple[str, str], int] | None
    """(shard, reason) -> samples skipped or lost since the start of the epoch; None when unchanged since
    the previous batch (it is only there to name the worst shards, and need not travel every time)."""
    dropped: list[DroppedShard]
    """Shards dropped since the previous batch (printed once by the training process)."""


def _task_samples(plan: EpochPlan, task: str, epoch: int, slot: int, counters: Counters
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """Endless (ids, labels, key) of `task` for one slot: pass after pass over its shard share."""
    cfg, shards = plan.cfg, plan.shards[task]
    ti = TASKS.index(task)
    for pass_idx in range(1 << 62):
        order = _rng(cfg.seed, epoch, _SHARD_ORDER, ti, pass_idx).permutation(len(shards))
        good = 0
        for i in order[slot::plan.slots]:
            url = shards[i]
            expected = plan.expected.get(url)
            n_read = 0
            try:
                for raw in read_shard(url, expected):
                    n_read += 1
                    counters.c["read_samples"] += 1
                    try:
                        ids, meta = check_sample(raw, shard=url, task=task, layout=plan.layout,
                                                 tokenizer_sha256=plan.tokenizer_sha256, image_grid=cfg.image_grid)
                        if len(ids) > cfg.seq_len and (task != "lm" or cfg.overlong == "reject"):
                            why = ("data.overlong: reject" if task == "lm" else
                                   f"{task} samples are never cut, whatever data.overlong says")
                            raise bad("overlong", url, raw.get("__key__"), "ids.npy",
                                      f"length {len(ids)} > data.seq_len {cfg.seq_len} ({why})")
                        labels = make_labels(ids, task, meta, plan.layout, cfg.image_structural_in_loss,
                                             key=raw.get("__key__"))
                    except BadInputError as e:
                        if cfg.bad_input == "raise":
                            raise
                        counters.skip(e)
                        continue
                    except ValueError as e:  # make_labels found what check_sample let through
                        err = bad("bad_field", url, raw.get("__key__"), "ids.npy", str(e))
                        if cfg.bad_input == "raise":
                            raise err from e
                        counters.skip(err)
                        continue
                    good += 1
                    yield ids[: cfg.seq_len], labels[: cfg.seq_len], raw["__key__"]
            except BadInputError as e:  # the shard itself (read_shard) failed: unreadable, empty, cut short
                if cfg.bad_input == "raise" or e.reason not in SHARD_REASONS:
                    raise
                counters.skip(e, lost=None if expected is None else max(0, expected - n_read))
        yield _PASS_END
        if good == 0:
            # Without this a slot whose every shard is bad would spin forever under skip.
            raise ValueError(f"task {task}: reader slot {slot} found no usable sample in a whole pass over "
                             f"its {len(order[slot::plan.slots])} shards (data.bad_input: skip hid them all)")


def _shuffled(samples: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Shuffle buffer (webdataset's `shuffle`, with our own seeded generator) drained at every pass end.

    Draining at `_PASS_END` keeps passes apart: a pass's samples all come out before the next pass's
    first one, so with evenly split data an epoch is exactly one pass, and a pass never loses a
    sample to read-ahead.
    """
    buf: list = []
    for s in samples:
        if s is _PASS_END:
            rng.shuffle(buf)
            yield from buf
            buf = []
        elif size <= 1:
            yield s
        elif len(buf) < size:
            buf.append(s)
        else:
            i = int(rng.integers(size))
            yield buf[i]
            buf[i] = s


class _TaskBatches:
    """Endless micro-batches (lists of rows) of one task for one slot."""

    def __init__(self, plan: EpochPlan, task: str, epoch: int, slot: int, counters: Counters) -> None:
        samples = _task_samples(plan, task, epoch, slot, counters)
        rng = _rng(plan.cfg.seed, epoch, _BUFFER, TASKS.index(task), slot)
        self._samples = _shuffled(samples, plan.cfg.shuffle_buffer, rng)
        self._rows = RowBuilder(plan.cfg.seq_len, plan.cfg.pack)
        self._ready: collections.deque = collections.deque()
        self._b = plan.cfg.micro_batch_size
        self._plan, self._epoch, self._counters = plan, epoch, counters
        self._drop = plan.cfg.caption_dropout if task == "t2i" else 0.0

    def next(self) -> list:
        while len(self._ready) < self._b:
            ids, labels, key = next(self._samples)
            # After the shuffle buffer, so the count covers samples that reach a row.
            if caption_dropped(self._plan.cfg.seed, self._epoch, key, self._drop):
                short = strip_caption(ids, self._plan.layout)
                if len(short) < len(ids):  # a sample written without a caption has nothing to drop
                    ids = short
                    labels = make_labels(ids, "t2i", None, self._plan.layout,
                                         self._plan.cfg.image_structural_in_loss, key=key)
                    self._counters.c["captions_dropped"] += 1
            self._ready.extend(self._rows.add(ids, labels, key))
        return [self._ready.popleft() for _ in range(self._b)]


class EpochDataset(IterableDataset):
    """One rank's epoch from micro-batch `start` on; each DataLoader worker plays one worker role."""

    def __init__(self, plan: EpochPlan, epoch: int, start: int) -> None:
        super().__init__()
        self.plan, self.epoch, self.start = plan, epoch, start

    def __iter__(self):
        info = get_worker_info()
        j = info.id if info is not None else 0
        plan = self.plan
        w = plan.workers
        # A fresh DataLoader starts its round robin at worker 0, so DataLoader worker j must play the
        # role whose next micro-batch is the rank's micro-batch `start + j`.
        role = (self.start + j) % w
        skip = len(range(role, self.start, w))
        slot = plan.rank * w + role
        counters = Counters()
        streams: dict[str, _TaskBatches] = {}
        try:
            for n, task in enumerate(plan.schedule(self.epoch, role)):
                if task not in streams:
                    streams[task] = _TaskBatches(plan, task, self.epoch, slot, counters)
                rows = streams[task].next()
                if n < skip:
                    continue  # replaying up to the resume point: read, but build no tensors
                batch = make_batch(rows, plan.cfg.seq_len, plan.layout.pad_id, plan.task_ids[task],
                                   plan.cfg.pad_to, plan.cfg.pad_multiple)
                keys = [list(r.keys) for r in rows]
                yield batch, role, counters.news(), keys
        except ValueError as e:  # BadInputError and the no-usable-data error
            # Sent as data rather than raised: PyTorch re-raises a worker's exception with its message
            # only (the shard/key/field attributes are lost), and a DataLoader whose worker raised
            # took 2 x 5 s to shut down in our tests.
            yield WorkerError(e), role, counters.news(), []


@dataclass
class WorkerError:
    """A data error raised in a worker, carried to the training process to be raised there."""

    error: ValueError
