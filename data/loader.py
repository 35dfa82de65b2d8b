"""The training data pipeline: webdataset shards -> task-homogeneous, fixed-shape micro-batches.

    loader = UnimodLoader(LoaderConfig(dataset_dir="demo_data", seq_len=1024, micro_batch_size=4),
                          tasks=model_cfg.mod.tasks, rank=rank, world_size=world)
    loader.load_state_dict(ckpt["loader"])        # optional, before iterating
    for batch in loader:                          # one epoch: exactly len(loader) micro-batches
        batch["input_ids"], batch["labels"], batch["position_ids"]   # LongTensor [B, S]
        batch["task_ids"]                                           # LongTensor [B], one task
    ckpt["loader"] = loader.state_dict()          # between steps

A row holds one sample (padding) or several whole samples of one task (packing). `position_ids`
restart at 0 at every sample and continue through the trailing padding, so they mark the document
boundaries: a new document starts at t = 0 and wherever position_ids[b, t] != position_ids[b, t-1] + 1
(the model's document mask; see `data/packing.py`). Labels are -100 on padding and wherever the task's
layout leaves a token unsupervised, so no label asks a sample to predict its neighbour's tokens.

This file builds the epoch plan and holds resume and the data-loss accounting; `data/config.py` holds
the configuration (`LoaderConfig`), `data/stream.py` what each worker does. How an epoch is laid out
(every reader is one (rank, worker) pair, a "slot"; N = world x workers):

- Shards. For every task and every pass over its data, the task's shard list is shuffled with a
  seed that depends on (seed, epoch, task, pass) only, so every rank draws the same order, and slot
  s reads `order[s::N]` (webdataset's detshuffle + split_by_node + split_by_worker, with the rank
  and world passed in rather than read from torch.distributed). Each task needs >= N shards: a
  reader without a shard would hang DDP (webdataset #188).
- Samples. Each slot streams its shards of a task through a shuffle buffer seeded by (seed, epoch,
  task, slot), checks every sample (`data.reader.check_sample`), derives labels
  (`data.layout.make_labels`) and packs or pads rows (`data.packing`). When its shards run out the
  slot starts the next pass over a freshly shuffled order, so a task stream never ends mid-epoch.
- Mixing. A task's weight is the number of passes over its data per epoch (1.0: every sample once;
  0.2: a fifth of them, a different fifth each epoch). Every slot's epoch is a seeded permutation of
  a fixed quota of micro-batches per task, so every rank yields exactly the same number of
  micro-batches (uneven counts hang DDP, webdataset #225) while each step mixes tasks across ranks
  and workers. With padding and shards that split evenly over slots, an epoch of weight-1.0 tasks
  is exactly one pass: every sample once, none twice. With packing the quota comes from the packing
  ratio measured on the first shard, so an epoch is one pass give or take a few rows.
- Resume. A rank's micro-batch i comes from worker i % W (DataLoader's in-order round robin), and
  every worker's stream is a pure function of (seed, epoch, slot). `state_dict()` records the epoch
  and how many micro-batches the trainer has taken; after `load_state_dict()` each worker replays its
  stream up to its share of that count without building tensors, then continues, so a resumed run
  sees exactly the batches of an uninterrupted one (webdataset has no mid-epoch resume, #177).
  Replay reads the shards again: its cost grows with the position inside the epoch. The state is
  the same on every rank apart from the counters, so rank 0's copy can restore every rank.
- Bad input. `raise` (default) stops at the first problem with a message naming shard, key and
  field; `skip` drops the sample (or the rest of a broken shard) and counts it. A shard whose sample
  count differs from the manifest's `shard_samples` is a bad shard too (`truncated_shard`: a tar cut
  inside a header reads as a shorter valid tar), and the samples a dropped or cut shard never
  delivered are counted as `lost_samples`. Every dropped shard is printed once, with the rank, by
  the training process. `max_skip_fraction` bounds the loss: past it the loader raises
  `DataLossError` (at start-up when the start-up check already drops too much). Counters travel with
  the batches from the worker processes, so `counters()` and the limit are right, and stop at the
  same micro-batch, with any number of workers.
- Over-long samples. A t2i or mmu sample is never cut: that would leave an image block without its
  last rows and `<image end>`, or an mmu sample without its answer, i.e. train on a layout the model
  never sees at inference. Packing never drops one either: every sample fits a row of its own. Such a
  sample is rejected (a bad input, see above) whatever `overlong` says; `overlong="truncate"` cuts lm
  samples only, where a cut is harmless. A manifest records each task's longest sample
  (`splits.<split>.max_len`), so a data.seq_len too short for the data fails when the loader is built.
- Caption dropout (`caption_dropout`, classifier-free guidance): a t2i sample is re-laid with an empty
  caption (`BOS <image block> EOS`, what the sampler's unconditional prompt continues) with
  probability p, drawn from (seed, epoch, sample key) alone: the same captions drop on every rank
  count, worker count and resume, and another epoch drops others. The shards keep every caption;
  validation reads them as written. Dropped captions are counted in `counters()["captions_dropped"]`.
- Image format (`image_grid`): when set, every t2i/mmu image block must be that [h, w] code grid; a
  dataset tokenised in another format is refused when the loader is built.
"""

from __future__ import annotations

import collections
import io
import math
import sys
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader

from data.config import LoaderConfig
from data.manifest import load_manifest
from data.packing import estimate_rows_per_sample
from data.reader import BadInputError, read_shard
from data.stream import DroppedShard, EpochDataset, EpochPlan, WorkerError, WorkerNews
from data.validate import validate_shards
from model.config import VocabLayout

_STATE_VERSION = 1


# ----- the loader --------------------------------------------------------------------------------------
def _worker_keeps_reading_through_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker survives SIGTERM / SIGUSR1 from anyone but its parent.

    Slurm (time limit, preemption, scancel), torchrun and a kill of the process group signal every process,
    workers included. torch's worker handler dies on SIGTERM (and SIGUSR1's default action kills), and the
    training process then fails mid-step or inside torch.save with "DataLoader worker ... killed by signal",
    leaving the checkpoint incomplete. The training process handles the stop (train/signals.py) and shuts its
    workers down itself. SIGTERM is not simply ignored: the parent also uses it, through multiprocessing's
    terminate(), to end a worker that did not stop (DataLoader shutdown, and interpreter exit, which joins
    daemonic children right after terminating them: an ignored SIGTERM would hang the parent there). So
    SIGTERM is blocked and taken by a thread that exits cleanly only when the sender is the parent, which is
    what torch's own worker handler does for its parent.
    """
    import os
    import signal
    import threading

    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    parent = os.getppid()
    # Before any other thread exists in the worker, so that every thread inherits the mask and a SIGTERM can
    # only be collected by `sigwaitinfo` below.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

    def take_sigterm() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)  # status 0: the parent's SIGCHLD check reports only workers killed by a signal

    threading.Thread(target=take_sigterm, name=f"worker{worker_id}-sigterm", daemon=True).start()


class UnimodLoader:
    """Iterable over one epoch of micro-batches per `iter()`; resumable; see the module docstring."""

    def __init__(self, config: LoaderConfig, tasks: list[str], rank: int = 0, world_size: int = 1,
                 layout: VocabLayout | None = None) -> None:
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank} world_size={world_size}")
        missing = [t for t in config.tasks if t not in tasks]
        if missing:
            raise ValueError(f"data.tasks names {missing[0]!r}, which is not in the model's task list {list(tasks)}")
        self.config = config
        cfg = config

        samples: dict[str, int] | None = None
        expected: dict[str, int] = {}  # shard -> the manifest's sample count, where it records one
        if cfg.dataset_dir is not None:
            manifest = load_manifest(cfg.dataset_dir)
            if cfg.split not in manifest.shards:
                raise ValueError(f"data.split {cfg.split!r} is not in {cfg.dataset_dir}/manifest.json "
                                 f"(splits: {sorted(manifest.shards)})")
            if layout is not None and layout != manifest.vocab:
                raise ValueError(f"{cfg.dataset_dir}/manifest.json field vocab {manifest.vocab.to_dict()} differs "
                                 f"from the model's vocab {layout.to_dict()}: the ids would mean other tokens")
            layout, sha = manifest.vocab, manifest.tokenizer_sha256
            by_task = manifest.shards[cfg.split]
            for t in cfg.tasks:
                if t not in by_task:
                    raise ValueError(f"data.tasks names {t!r} but split {cfg.split!r} of "
                                     f"{cfg.dataset_dir}/manifest.json has no {t} shards")
            shards = {t: list(by_task[t]) for t in cfg.tasks}
            samples = {t: manifest.samples[cfg.split].get(t, 0) for t in cfg.tasks}
            counts = manifest.expected_counts(cfg.split)
            expected = {u: counts[u] for t in cfg.tasks for u in shards[t] if u in counts}
            _check_longest(cfg, manifest.max_len.get(cfg.split, {}))
        else:
            if layout is None:
                raise ValueError("data.shards without a manifest: pass the model's VocabLayout as layout=")
            sha = cfg.tokenizer_sha256
            shards = {t: list(cfg.shards[t]) for t in cfg.tasks}

        self.rank = rank
        self._start_counters: collections.Counter[str] = collections.Counter()
        # (shard, reason) -> samples skipped or lost: start-up, finished epochs, and this epoch per worker
        # role; only there to name the worst shards when max_skip_fraction stops the run.
        self._start_by_shard: collections.Counter[tuple[str, str]] = collections.Counter()
        self._done_by_shard: collections.Counter[tuple[str, str]] = collections.Counter()
        self._worker_by_shard: dict[int, dict[tuple[str, str], int]] = {}
        self._reported: set[tuple[str, str]] = set()  # dropped shards printed already
        self._start_fraction = 0.0                    # share of the split's data left out at start-up
        if cfg.validate_on_start:
            report = validate_shards(shards, layout=layout, tokenizer_sha256=sha, bad_input=cfg.bad_input,
                                     image_grid=cfg.image_grid, expected=expected)
            for e in report.skipped:
                lost = report.lost.get(e.shard or "")
                self._start_counters["skipped_shards"] += 1
                self._start_counters[f"skipped_shards/{e.reason}"] += 1
                self._start_counters["lost_samples"] += lost or 0
                self._start_counters[f"lost_samples/{e.reason}"] += lost or 0
                self._start_by_shard[(e.shard or "?", e.reason or "?")] += lost or 0
                self._report_drop(DroppedShard(e.shard or "?", e.reason or "?", str(e), lost), "at start-up")
            self._check_start_loss(shards, report.skipped, report.lost, expected)
            shards = report.usable

        slots = world_size * max(1, cfg.num_workers)
        for t, urls in shards.items():
            if len(urls) < slots:
                raise ValueError(
                    f"task {t} has {len(urls)} usable shards but {world_size} ranks x {max(1, cfg.num_workers)} "
                    f"workers = {slots} readers each need at least one (a reader without data hangs DDP); "
                    f"write more, smaller shards or lower data.num_workers")

        # Rows one pass over each task's data fills, per slot; the quota of a task is weight x that.
        rows_per_sample = {t: estimate_rows_per_sample(_first_lengths(shards[t][0]), cfg.seq_len, cfg.pack)
                           for t in cfg.tasks} if cfg.pack else {t: 1.0 for t in cfg.tasks}
        if samples is not None:
            per_slot = {t: cfg.tasks[t] * samples[t] * rows_per_sample[t] / (slots * cfg.micro_batch_size)
                        for t in cfg.tasks}
            quota = {t: max(1.0, float(round(x))) for t, x in per_slot.items()}
        else:
            quota = {t: float(cfg.tasks[t]) for t in cfg.tasks}
        if cfg.batches_per_epoch is not None:
            total = cfg.batches_per_epoch
        else:
            total = int(sum(quota.values())) * max(1, cfg.num_workers)

        self._plan = EpochPlan(cfg=cfg, layout=layout, tokenizer_sha256=sha, shards=shards,
                           task_ids={t: list(tasks).index(t) for t in cfg.tasks}, rank=rank,
                           world_size=world_size, quota=quota, batches_per_epoch=total, expected=expected)
        self._epoch = 0
        self._consumed = 0
        self._done_counters: collections.Counter[str] = collections.Counter()  # finished epochs
        self._worker_counters: dict[int, dict[str, int]] = {}                   # this epoch, per role
        self.last_keys: list[list[str]] = []
        """Sample keys of each row of the last micro-batch yielded (logging, debugging, tests)."""

    # -- iteration
    def __len__(self) -> int:
        return self._plan.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def layout(self) -> VocabLayout:
        return self._plan.layout

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its first micro-batch on the next `iter()`."""
        self._fold_counters()
        self._epoch, self._consumed = int(epoch), 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._consumed >= len(self):
            self.set_epoch(self._epoch + 1)
        ds = EpochDataset(self._plan, self._epoch, self._consumed)
        dl = DataLoader(ds, batch_size=None, num_workers=self.config.num_workers,
                        worker_init_fn=_worker_keeps_reading_through_stop_signals)
        for batch, role, news, keys in dl:
            self._take_news(role, news)
            if isinstance(batch, WorkerError):
                raise batch.error
            self._check_loss()
            self._consumed += 1
            self.last_keys = keys
            yield batch
        if self._consumed != len(self):
            raise RuntimeError(f"epoch {self._epoch} ended after {self._consumed} of {len(self)} micro-batches")
        self.set_epoch(self._epoch + 1)

    # -- resume
    def state_dict(self) -> dict[str, Any]:
        """Position (epoch, micro-batches taken this epoch), counters, and what must match on load."""
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "consumed": self._consumed,
            "done_counters": dict(self._done_counters),
            "worker_counters": {str(k): dict(v) for k, v in self._worker_counters.items()},
            "fingerprint": self._fingerprint(),
        }

    # Fingerprint fields an elastic resume may change (they depend on the data-parallel size and workers only).
    _ELASTIC_KEYS = ("world_size", "workers", "batches_per_epoch")

    def load_state_dict(self, state: Mapping[str, Any], elastic: bool = False) -> None:
        """Restore the position. `elastic`: the state may come from another data-parallel world size or
        worker count (`_ELASTIC_KEYS`); the same epoch then continues at the same global position (see
        `_elastic_position`), but in another batch order: exact resume needs the same layout."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r} is not {_STATE_VERSION}")
        mine, theirs = self._fingerprint(), state["fingerprint"]
        for k, v in mine.items():
            if theirs.get(k) != v and not (elastic and k in self._ELASTIC_KEYS):
                hint = (" (a resume on another data-parallel size or worker count continues at the same global "
                        "position with elastic=True: checkpoint.accept_changes)" if k in self._ELASTIC_KEYS else "")
                raise ValueError(f"loader state was saved with {k}={theirs.get(k)!r} but this run has "
                                 f"{k}={v!r}; the batch order would differ, so exact resume is impossible{hint}")
        consumed = int(state["consumed"])
        same = all(theirs.get(k) == mine[k] for k in self._ELASTIC_KEYS)
        if not same:
            consumed = self._elastic_position(theirs, consumed)
        elif not 0 <= consumed <= len(self):
            raise ValueError(f"loader state consumed={state['consumed']} is outside [0, {len(self)}]")
        self._epoch, self._consumed = int(state["epoch"]), consumed
        self._done_counters = collections.Counter(state["done_counters"])
        self._worker_counters = {int(k): dict(v) for k, v in state["worker_counters"].items()}
        if not same:  # the old worker roles mean nothing here: their counts join the finished epochs'
            self._fold_counters()

    def _elastic_position(self, theirs: Mapping[str, Any], consumed: int) -> int:
        """This rank's micro-batch index in the current epoch for a state saved under another layout: the
        global number of micro-batches taken (consumed x their data-parallel size; every rank takes the same
        number) spread over this run's ranks, rounded down, so at most world_size - 1 global micro-batches of
        the epoch are read again rather than any skipped. A finished epoch stays finished. Which samples the
        remaining micro-batches hold differs from the uninterrupted run: shards and shuffle buffers are
        assigned per (rank, worker) slot, and the slots changed."""
        their_len = int(theirs["batches_per_epoch"])
        if not 0 <= consumed <= their_len:
            raise ValueError(f"loader state consumed={consumed} is outside [0, {their_len}]")
        if consumed == their_len:
            return len(self)
        return min(consumed * int(theirs["world_size"]) // self._plan.world_size, len(self))

    def _fingerprint(self) -> dict[str, Any]:
        p, c = self._plan, self.config
        return {"seed": c.seed, "world_size": p.world_size, "workers": p.workers, "seq_len": c.seq_len,
                "micro_batch_size": c.micro_batch_size, "pack": c.pack, "shuffle_buffer": c.shuffle_buffer,
                "tasks": dict(c.tasks), "batches_per_epoch": p.batches_per_epoch, "overlong": c.overlong,
                "num_shards": {t: len(u) for t, u in p.shards.items()}}

    # -- counters
    def _fold_counters(self) -> None:
        for c in self._worker_counters.values():
            self._done_counters.update(c)
        for by_shard in self._worker_by_shard.values():
            self._done_by_shard.update(by_shard)
        self._worker_counters, self._worker_by_shard = {}, {}

    def counters(self) -> dict[str, int]:
        """This rank's data counters over every epoch so far, start-up check included:

        - `read_samples`: samples taken out of shards, good or bad (read-ahead and resume replay included).
        - `skipped_samples`, `skipped_samples/<reason>`: samples dropped under bad_input: skip.
        - `skipped_shards`, `skipped_shards/<reason>`: shards dropped whole or from their fault on (each
          time a pass reads them; once for those left out at start-up).
        - `lost_samples`, `lost_samples/<reason>`: samples the manifest records in those shards that were
          never read (0 for shards without a manifest count).
        - `captions_dropped`: t2i samples trained without their caption (data.caption_dropout).

        Reasons are data.reader.REASONS; a `<reason>` key is present once it has counted something.
        """
        total = collections.Counter({"read_samples": 0, "skipped_samples": 0, "skipped_shards": 0,
                                     "lost_samples": 0, "captions_dropped": 0})
        total.update(self._start_counters)
        total.update(self._done_counters)
        for c in self._worker_counters.values():
            total.update(c)
        return dict(total)

    # -- loss reporting and the max_skip_fraction limit
    def _take_news(self, role: int, news: WorkerNews) -> None:
        self._worker_counters[role] = news.counts
        if news.by_shard is not None:
            self._worker_by_shard[role] = news.by_shard
        for d in news.dropped:
            self._report_drop(d, "while reading")

    def _report_drop(self, d: DroppedShard, when: str) -> None:
        # Once per shard and reason: a dropped shard is met again in every pass and epoch.
        if (d.shard, d.reason) in self._reported:
            return
        self._reported.add((d.shard, d.reason))
        lost = "an unknown number of samples lost (no manifest count)" if d.lost is None else f"{d.lost} samples lost"
        print(f"[data] rank {self.rank}: bad shard dropped {when} under data.bad_input: skip ({lost}): {d.message}",
              file=sys.stderr, flush=True)

    def _worst(self, by_shard: Mapping[tuple[str, str], int], n: int = 3) -> str:
        per: dict[str, collections.Counter[str]] = {}
        for (shard, reason), k in by_shard.items():
            per.setdefault(shard, collections.Counter())[reason] += k
        top = sorted(per.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))[:n]
        return "; ".join(f"{shard}: {sum(r.values())} ({', '.join(f'{x} {k}' for x, k in sorted(r.items()))})"
                         for shard, r in top) or "none"

    def _check_start_loss(self, shards: Mapping[str, list[str]], skipped: list[BadInputError],
                          lost: Mapping[str, int], expected: Mapping[str, int]) -> None:
        """Judge the start-up check's drops against the whole split: samples where the manifest counts
        every shard, else shards (each shard then stands for an equal share)."""
        urls = [u for t in shards for u in shards[t]]
        if not skipped or not urls:
            return
        if all(u in expected for u in urls) and sum(expected[u] for u in urls) > 0:
            gone, total, unit = sum(lost.values()), sum(expected[u] for u in urls), "samples"
        else:
            gone, total, unit = len(skipped), len(urls), "shards"
        self._start_fraction = gone / total
        limit = self.config.max_skip_fraction
        if self._start_fraction > limit:
            raise DataLossError(
                f"data.max_skip_fraction {limit:g} exceeded at start-up on rank {self.rank}: the start-up check "
                f"left out {len(skipped)} of the {len(urls)} shards of split {self.config.split!r} "
                f"(tasks {', '.join(shards)}), {gone} of its {total} {unit} = {self._start_fraction:.1%}. "
                f"Worst shards: {self._worst(self._start_by_shard)}. Repair or remove them, or raise "
                f"data.max_skip_fraction (1.0 = no limit)")

    def _check_loss(self) -> None:
        """Raise DataLossError once the samples lost on this rank pass data.max_skip_fraction.

        Checked in the training process on every micro-batch, from counters that travel with the
        batches; workers deliver in a fixed round robin and their streams are seeded, so the run
        stops at the same micro-batch whatever the timing.
        """
        limit = self.config.max_skip_fraction
        if limit >= 1.0:
            return
        c = self.counters()
        lost_reading = c["lost_samples"] - self._start_counters["lost_samples"]
        gone = c["skipped_samples"] + lost_reading
        if gone == 0:
            return
        seen = c["read_samples"] + lost_reading
        floor = math.ceil(1.0 / limit) if limit > 0 else 1
        reading = gone / max(seen, floor)
        f0 = self._start_fraction
        total = f0 + (1.0 - f0) * reading
        if total <= limit:
            return
        by_shard = collections.Counter(self._start_by_shard)
        by_shard.update(self._done_by_shard)
        for d in self._worker_by_shard.values():
            by_shard.update(d)
        judged = f" (judged over at least {floor} samples)" if seen < floor else ""
        start = (f"; with the {f0:.1%} of the split left out at start-up, an estimated {total:.1%} of the data"
                 if f0 > 0 else "")
        raise DataLossError(
            f"data.max_skip_fraction {limit:g} exceeded on rank {self.rank} in epoch {self._epoch} before "
            f"micro-batch {self._consumed}: of the {seen} samples this rank expected to read so far, {gone} were "
            f"lost ({c['skipped_samples']} bad samples skipped, {lost_reading} never delivered by shards dropped "
            f"or cut short) = {reading:.1%}{judged}{start} > {limit:.1%}. Worst shards: {self._worst(by_shard)}. "
            f"Repair or remove them (python -m data.validate DIR --full lists every fault), or raise "
            f"data.max_skip_fraction (1.0 = no limit)")


class DataLossError(ValueError):
    """More of the data was lost to bad input than data.max_skip_fraction allows."""


def _check_longest(cfg: LoaderConfig, longest: Mapping[str, int]) -> None:
    """Refuse a data.seq_len shorter than a task's longest sample (manifest `max_len`) before any step.

    Every such sample would be rejected mid-run (an image sample cannot be cut, and packing never
    splits a sample); only lm under `overlong: truncate` has a use for it.
    """
    for task in cfg.tasks:
        n = longest.get(task)
        if n is None or n <= cfg.seq_len or (task == "lm" and cfg.overlong == "truncate"):
            continue
        fix = (f"raise data.seq_len to >= {n} or set data.overlong: truncate" if task == "lm" else
               f"raise data.seq_len to >= {n} ({task} samples are never cut or dropped to fit)")
        raise ValueError(f"data.seq_len {cfg.seq_len} is shorter than the longest {task} sample of split "
                         f"{cfg.split!r}: {n} tokens (field splits.{cfg.split}.max_len.{task} of "
                         f"{cfg.dataset_dir}/manifest.json); {fix}")


def _first_lengths(url: str, limit: int = 256) -> list[int]:
    """Token counts of up to `limit` samples at the start of a shard (packing-ratio estimate only)."""
    out: list[int] = []
    try:
        for raw in read_shard(url):
            try:
                out.append(int(np.load(io.BytesIO(raw["ids.npy"]), allow_pickle=False).shape[0]))
            except Exception:
                continue  # bad samples are the stream's business; the estimate just leaves them out
            if len(out) >= limit:
                break
    except BadInputError:
        pass
    return out
