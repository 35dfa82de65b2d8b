"""Checks of shard datasets against the shard contract: manifest, shards, and every sample.

The loader (`data/loader.py`) calls `check_sample` on every sample it reads, checks every shard's
sample count against the manifest when the shard ends (`read_shard(url, expected)`), and calls
`validate_shards` on every shard before training starts, so a bad dataset fails (or, under the
`skip` policy, is pruned) before the first step instead of hours in. `validate_dataset(dir)` runs the
same checks from the command line or a notebook:

    python -m data.validate /path/to/dataset [--split train] [--skip]   # fast: first sample per shard
    python -m data.validate /path/to/dataset --full                      # every sample of every shard

The fast check (the loader's start-up check) opens every shard and checks its first sample: a
readable, non-empty tar, the right task, the manifest's tokenizer, ids inside the vocabulary, the
image grid. It cannot see damage past the first sample: a bad sample deep inside, or a shard cut
short (a tar cut inside a header even reads as a shorter valid tar). `--full` reads every sample of
every shard: `check_sample` on each, each shard's sample count against the manifest's
`shard_samples`, and each task's longest sample against the manifest's `max_len`; it reports every
problem per split, task and shard rather than stopping at the first. A manifest written before
`shard_samples` existed still loads (a note says so once); the count check then covers only each
task's total.

Every problem is a `BadInputError` whose message names the shard, the sample key and the field, and
whose `reason` is one of `REASONS` (the loader's skip counters are keyed by it). Shard names in a
manifest must be plain relative paths: a manifest is data, and data must never choose a shell
command (`pipe:`) or a file outside the dataset directory.
"""

from __future__ import annotations

import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np
import webdataset as wds

from data.layout import TASKS, parse_image_block
from model.config import VocabLayout

MANIFEST_FORMAT = "unimod-shards-v1"

REASONS = (
    "unreadable_shard",    # not a tar, or a tar cut short in the middle of a member
    "empty_shard",         # a shard with no sample at all
    "missing_field",       # ids.npy, json, or a required json key is absent
    "bad_field",           # a field that does not parse or breaks the layout (bos/eos, answer_start)
    "out_of_vocab",        # a token id outside [0, vocab.visual_end)
    "image_grid",          # the image block's rows/EOL structure disagrees with json image_hw
    "tokenizer_mismatch",  # written with another text tokenizer than the manifest names
    "task_mismatch",       # a sample of another task inside a shard of this task
    "overlong",            # longer than seq_len while the loader rejects over-long samples
    "image_format",        # an image grid other than the loader's data.image_grid
    "truncated_shard",     # fewer samples than the manifest records: cut short (maybe inside a tar header)
    "overfull_shard",      # more samples than the manifest records: not the shard the manifest describes
)
"""Kinds of bad input; keys of the loader's `skipped_*/<reason>` counters."""

SHARD_REASONS = ("unreadable_shard", "empty_shard", "truncated_shard", "overfull_shard")
"""Reasons that concern the shard file itself; the others concern one sample."""

WHOLE_SHARD_REASONS = SHARD_REASONS + ("tokenizer_mismatch", "task_mismatch")
"""Found in a shard's first sample, these condemn the whole shard: a shard is written in one go, by
one tokenizer, for one task. Any other first-sample problem only drops that sample."""


class BadInputError(ValueError):
    """A shard or sample that breaks the contract; the message names shard, key and field.

    The structured attributes survive pickling, so the loader can carry the error out of a
    DataLoader worker intact (see `data.stream.WorkerError`).
    """

    def __init__(self, message: str, *, shard: str | None = None, key: str | None = None,
                 field: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.shard, self.key, self.field, self.reason = shard, key, field, reason

    def __reduce__(self):
        # Keep the structured fields when the error is pickled across worker processes.
        return (_rebuild_bad_input, (str(self), self.shard, self.key, self.field, self.reason))


def _rebuild_bad_input(message: str, shard: str | None, key: str | None, field: str | None,
                       reason: str | None) -> BadInputError:
    return BadInputError(message, shard=shard, key=key, field=field, reason=reason)


def bad(reason: str, shard: str, key: str | None, fld: str, detail: str) -> BadInputError:
    """Build the one message format every check uses: shard, key, field, then what is wrong."""
    assert reason in REASONS, reason
    return BadInputError(f"{reason}: shard {shard}: key {key!r}: field {fld}: {detail}",
                         shard=shard, key=key, field=fld, reason=reason)


# ----- manifest --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Manifest:
    """The parts of `manifest.json` the loader needs, with shard names resolved to paths."""

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

    def expected_counts(self, split: str) -> dict[str, int]:
        """Shard path -> samples the manifest records in it, for the shards of `split` that have a count."""
        return {url: n for task, counts in self.shard_samples.get(split, {}).items()
                for url, n in zip(self.shards[split][task], counts)}


_NOTED: set[str] = set()  # manifests whose missing shard counts were already reported in this process


def load_manifest(dataset_dir: str) -> Manifest:
    """Read and check `<dataset_dir>/manifest.json`; errors name the file and the field."""
    path = os.path.join(dataset_dir, "manifest.json")
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no manifest.json in dataset directory {dataset_dir!r}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
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
            shards[split][task] = [_shard_path(dataset_dir, n, f"{where}.shards.{task}") for n in names]
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
    return Manifest(root=dataset_dir, vocab=vocab, tokenizer_sha256=sha, shards=shards, samples=samples,
                    max_len=max_len, shard_samples=shard_samples)


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


# ----- shards ----------------------------------------------------------------------------------------
def read_shard(url: str, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples ({"__key__", "ids.npy": bytes, "json": bytes, ...}) of one shard.

    A broken tar becomes a `BadInputError` naming the shard and the last sample read whole; a shard
    that holds no sample raises `empty_shard` after the iteration. With `expected` (the manifest's
    count for this shard), a shard that ends early raises `truncated_shard` after its last sample,
    and one with more samples raises `overfull_shard` instead of yielding the first extra one:
    Python's tarfile reads a tar cut inside a header as a shorter valid archive, so the count is
    the only thing that tells such a cut from the end of the shard.
    """
    last_key: str | None = None
    n = 0
    try:
        for raw in wds.tarfile_samples([{"url": url}]):
            if expected is not None and n == expected:
                raise bad("overfull_shard", url, raw.get("__key__"), "tar",
                          f"holds more samples than the {expected} the manifest records (sample "
                          f"{raw.get('__key__')!r} is number {n + 1}): not the shard the manifest was written for")
            n += 1
            last_key = raw.get("__key__")
            yield raw
    except BadInputError:
        raise
    except Exception as e:  # tarfile.TarError, OSError, and whatever a remote stream raises
        raise _tar_error(url, last_key, e, n, expected) from e
    if n == 0:
        raise bad("empty_shard", url, None, "tar", "the shard holds no sample"
                  + (f" (the manifest records {expected})" if expected else ""))
    if expected is not None and n < expected:
        raise bad("truncated_shard", url, last_key, "tar",
                  f"ends after sample {last_key!r}: expected {expected} samples (manifest), read {n}, "
                  f"{expected - n} lost; the file was cut short, e.g. inside a tar header, which reads as a "
                  f"shorter valid tar")


def _tar_error(url: str, last_key: str | None, e: Exception, n: int = 0, expected: int | None = None
               ) -> BadInputError:
    text = str(e.args[0]) if e.args else type(e).__name__
    if "empty file" in text:
        return bad("empty_shard", url, None, "tar", "the file is empty"
                   + (f" (the manifest records {expected} samples)" if expected else ""))
    after = f"after sample {last_key!r}" if last_key is not None else "before the first sample"
    counts = f" ({n} of the {expected} samples the manifest records read whole)" if expected is not None else ""
    return bad("unreadable_shard", url, last_key, "tar",
               f"not a readable tar ({type(e).__name__}: {text}); reading stopped {after}{counts}")


# ----- samples ---------------------------------------------------------------------------------------
def check_sample(raw: Mapping[str, Any], *, shard: str, task: str, layout: VocabLayout,
                 tokenizer_sha256: str | None, image_grid: list[int] | None = None
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode and check one raw sample of a `task` shard; returns (ids int32 [L], json meta).

    `tokenizer_sha256=None` skips the tokenizer check (explicit shard lists without a manifest);
    `image_grid=None` accepts any image grid, [h, w] only that one.
    """
    key = raw.get("__key__")
    for name in ("ids.npy", "json"):
        if name not in raw:
            raise bad("missing_field", shard, key, name, f"absent (sample has {sorted(k for k in raw if not k.startswith('__'))})")
    try:
        # allow_pickle=False: a pickled object array in a shard must never run code here.
        ids = np.load(io.BytesIO(raw["ids.npy"]), allow_pickle=False)
    except Exception as e:
        raise bad("bad_field", shard, key, "ids.npy", f"not a .npy array: {e}") from None
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or len(ids) < 2:
        raise bad("bad_field", shard, key, "ids.npy",
                  f"must be a 1-D integer array of length >= 2, got dtype {ids.dtype} shape {ids.shape}")
    try:
        meta = json.loads(raw["json"])
    except Exception as e:
        raise bad("bad_field", shard, key, "json", f"not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise bad("bad_field", shard, key, "json", f"must be an object, got {type(meta).__name__}")
    for name in ("task", "tokenizer_sha256"):
        if name not in meta:
            raise bad("missing_field", shard, key, f"json.{name}", "absent")
    if meta["task"] != task:
        raise bad("task_mismatch", shard, key, "json.task", f"is {meta['task']!r} inside a {task!r} shard")
    if tokenizer_sha256 is not None and meta["tokenizer_sha256"] != tokenizer_sha256:
        raise bad("tokenizer_mismatch", shard, key, "json.tokenizer_sha256",
                  f"{str(meta['tokenizer_sha256'])[:12]}... differs from the manifest's {tokenizer_sha256[:12]}...")

    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= layout.visual_end:
        pos = int(np.flatnonzero((ids < 0) | (ids >= layout.visual_end))[0])
        raise bad("out_of_vocab", shard, key, "ids.npy",
                  f"id {int(ids[pos])} at position {pos} is outside [0, {layout.visual_end})")
    ids = ids.astype(np.int32, copy=False)
    if ids[0] != layout.bos_id or ids[-1] != layout.eos_id:
        raise bad("bad_field", shard, key, "ids.npy",
                  f"must start with bos_id {layout.bos_id} and end with eos_id {layout.eos_id}, "
                  f"got {int(ids[0])} ... {int(ids[-1])}")

    if task in ("t2i", "mmu"):
        _check_image(ids, meta, shard, key, layout)
        if image_grid is not None and meta["image_hw"] != list(image_grid):
            h, w = meta["image_hw"]
            raise bad("image_format", shard, key, "json.image_hw",
                      f"the image is a {h}x{w} code grid but data.image_grid is {list(image_grid)}: the dataset "
                      f"was tokenised in another image format than the run expects")
    if task == "mmu":
        start = meta.get("answer_start")
        if start is None:
            raise bad("missing_field", shard, key, "json.answer_start", "absent (mmu needs it)")
        if isinstance(start, bool) or not isinstance(start, int) or not 0 < start < len(ids):
            raise bad("bad_field", shard, key, "json.answer_start",
                      f"{start!r} is not an index inside the sequence (length {len(ids)})")
    return ids, meta


def _check_image(ids: np.ndarray, meta: dict, shard: str, key: str | None, layout: VocabLayout) -> None:
    hw = meta.get("image_hw")
    if hw is None:
        raise bad("missing_field", shard, key, "json.image_hw", "absent (a sample with an image needs it)")
    if (not isinstance(hw, list) or len(hw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in hw)):
        raise bad("bad_field", shard, key, "json.image_hw", f"must be [h, w] positive ints, got {hw!r}")
    try:
        codes_HW, _ = parse_image_block(ids, layout)
    except ValueError as e:
        raise bad("image_grid", shard, key, "ids.npy", f"image block does not parse: {e}") from None
    if list(codes_HW.shape) != hw:
        raise bad("image_grid", shard, key, "json.image_hw",
                  f"declares {hw[0]}x{hw[1]} but the rows/EOL structure in ids.npy is "
                  f"{codes_HW.shape[0]}x{codes_HW.shape[1]}")


# ----- start-up validation and the full check ----------------------------------------------------------
@dataclass
class ShardCheck:
    """What the full check (`validate_shards(..., full=True)`) found in one shard."""

    task: str
    """Task the manifest files the shard under."""
    shard: str
    """Shard path."""
    expected: int | None
    """Samples the manifest records in the shard (None: the manifest has no per-shard count)."""
    split: str | None = None
    """Split of the manifest (set by `validate_dataset`)."""
    read: int = 0
    """Samples read from the tar, good and bad."""
    longest: int = 0
    """Tokens of the longest sample that passed `check_sample`."""
    longest_key: str | None = None
    """Key of that sample."""
    bad_samples: list[BadInputError] = field(default_factory=list)
    """One error per sample that failed `check_sample`."""
    fault: BadInputError | None = None
    """The shard-level problem (reasons in SHARD_REASONS) that ended the read early or condemned it."""

    @property
    def ok(self) -> bool:
        return self.fault is None and not self.bad_samples


@dataclass
class ValidationReport:
    """Outcome of checking each shard's first sample, or (full check) every sample."""

    usable: dict[str, list[str]] = field(default_factory=dict)
    """task -> shards that passed, in the given order (the full check: those without a shard-level fault)."""
    skipped: list[BadInputError] = field(default_factory=list)
    """One error per shard left out (only under the skip policy; reasons in WHOLE_SHARD_REASONS)."""
    lost: dict[str, int] = field(default_factory=dict)
    """Shard -> samples the manifest records in it that were not read: the whole count of a shard left
    out, the missing tail of one cut short (full check). Shards without a manifest count are absent."""
    checks: list[ShardCheck] = field(default_factory=list)
    """Full check only: one entry per shard, in the order read."""
    problems: list[str] = field(default_factory=list)
    """Full check only: disagreements between the shards and the manifest's max_len or sample totals."""

    def skipped_by_reason(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.skipped:
            out[e.reason or "unknown"] = out.get(e.reason or "unknown", 0) + 1
        return out


def validate_shards(shards: Mapping[str, list[str]], *, layout: VocabLayout, tokenizer_sha256: str | None,
                    bad_input: str = "raise", image_grid: list[int] | None = None,
                    expected: Mapping[str, int] | None = None, full: bool = False) -> ValidationReport:
    """Open every shard and check its first sample (readable, right task, tokenizer, vocabulary, and the
    image grid when `image_grid` is given); with `full`, check every sample and each shard's count.

    `expected` maps shard -> the manifest's sample count: it sizes `report.lost` for shards left out
    and, with `full`, is checked against the samples read. The fast check catches the dataset-wide
    mistakes (a shard from another tokenizer or vocabulary, a file that is not a tar) before training;
    damage deeper inside a shard is caught per sample while training. An image grid other than
    `image_grid` raises under either policy in the fast check: it is a dataset that does not fit the
    run, not a damaged sample, and skipping would leave nothing to train on.
    """
    if bad_input not in ("raise", "skip"):
        raise ValueError(f"bad_input must be 'raise' or 'skip', got {bad_input!r}")
    expected = expected or {}
    report = ValidationReport()
    for task, urls in shards.items():
        report.usable[task] = []
        for url in urls:
            if full:
                chk = _check_whole_shard(task, url, expected.get(url), layout, tokenizer_sha256, image_grid, bad_input)
                report.checks.append(chk)
                if chk.fault is not None:
                    report.skipped.append(chk.fault)
                    if chk.expected is not None:
                        report.lost[url] = max(0, chk.expected - chk.read)
                else:
                    report.usable[task].append(url)
                continue
            try:
                stream = read_shard(url)
                try:
                    raw = next(stream)
                except StopIteration:  # read_shard raises empty_shard itself; kept for clarity
                    raise bad("empty_shard", url, None, "tar", "the shard holds no sample") from None
                finally:
                    stream.close()
                check_sample(raw, shard=url, task=task, layout=layout, tokenizer_sha256=tokenizer_sha256,
                             image_grid=image_grid)
            except BadInputError as e:
                if bad_input == "raise" or e.reason == "image_format":
                    raise
                if e.reason in WHOLE_SHARD_REASONS:
                    report.skipped.append(e)
                    if url in expected:
                        report.lost[url] = expected[url]
                    continue
                # A sample-level fault: the stream drops (and counts) that sample when it reaches it.
            report.usable[task].append(url)
    return report


def _check_whole_shard(task: str, url: str, expected: int | None, layout: VocabLayout,
                       tokenizer_sha256: str | None, image_grid: list[int] | None, bad_input: str) -> ShardCheck:
    chk = ShardCheck(task=task, shard=url, expected=expected)
    try:
        for raw in read_shard(url, expected):
            chk.read += 1
            try:
                ids, _ = check_sample(raw, shard=url, task=task, layout=layout, tokenizer_sha256=tokenizer_sha256,
                                      image_grid=image_grid)
            except BadInputError as e:
                if bad_input == "raise":
                    raise
                chk.bad_samples.append(e)
                continue
            if len(ids) > chk.longest:
                chk.longest, chk.longest_key = len(ids), raw.get("__key__")
    except BadInputError as e:
        if bad_input == "raise" or e.reason not in SHARD_REASONS:
            raise
        chk.fault = e
    return chk


def _manifest_problems(manifest: Manifest, split: str, checks: list[ShardCheck]) -> list[str]:
    """What the full check's per-shard findings say about the manifest's max_len and sample totals."""
    path = os.path.join(manifest.root, "manifest.json")
    out = []
    for task in manifest.shards[split]:
        mine = [c for c in checks if c.task == task]
        read = sum(c.read for c in mine)
        total = manifest.samples[split].get(task)
        whole = all(c.fault is None for c in mine)
        # With per-shard counts every shard was checked already; without them the total is all there is.
        if task not in manifest.shard_samples[split] and whole and total is not None and read != total:
            out.append(f"{path}: field splits.{split}.samples.{task} is {total} but its shards hold {read} samples")
        n = manifest.max_len[split].get(task)
        top = max(mine, key=lambda c: c.longest, default=None)
        if n is None or top is None:
            continue
        if top.longest > n:
            out.append(f"{path}: field splits.{split}.max_len.{task} is {n} but sample {top.longest_key!r} of "
                       f"{top.shard} has {top.longest} tokens (the loader checks data.seq_len against max_len)")
        elif top.longest < n and all(c.ok for c in mine):
            out.append(f"{path}: field splits.{split}.max_len.{task} is {n} but the longest {task} sample in its "
                       f"shards has {top.longest} tokens ({top.longest_key!r} of {top.shard})")
    return out


def validate_dataset(dataset_dir: str, splits: list[str] | None = None, bad_input: str = "raise",
                     full: bool = False) -> ValidationReport:
    """`validate_shards` over every split (or the given ones) of a dataset directory's manifest; with
    `full`, also the manifest's max_len and totals against what the shards hold (`report.problems`,
    raised as a ValueError under `raise`)."""
    manifest = load_manifest(dataset_dir)
    merged = ValidationReport()
    for split in splits or sorted(manifest.shards):
        if split not in manifest.shards:
            raise ValueError(f"split {split!r} is not in {dataset_dir}/manifest.json (has {sorted(manifest.shards)})")
        rep = validate_shards(manifest.shards[split], layout=manifest.vocab,
                              tokenizer_sha256=manifest.tokenizer_sha256, bad_input=bad_input,
                              expected=manifest.expected_counts(split), full=full)
        for task, urls in rep.usable.items():
            merged.usable.setdefault(task, []).extend(urls)
        merged.skipped.extend(rep.skipped)
        merged.lost.update(rep.lost)
        for chk in rep.checks:
            chk.split = split
        merged.checks.extend(rep.checks)
        if full:
            merged.problems.extend(_manifest_problems(manifest, split, rep.checks))
    if merged.problems and bad_input == "raise":
        raise ValueError("; ".join(merged.problems))
    return merged


def _print_full(rep: ValidationReport, root: str, shown: int = 5) -> None:
    groups: dict[tuple[str | None, str], list[ShardCheck]] = {}
    for chk in rep.checks:
        groups.setdefault((chk.split, chk.task), []).append(chk)
    for (split, task), checks in groups.items():
        read = sum(c.read for c in checks)
        counted = [c.expected for c in checks if c.expected is not None]
        recorded = f"manifest {sum(counted)}" if len(counted) == len(checks) else "no per-shard counts in the manifest"
        n_bad = sum(len(c.bad_samples) for c in checks)
        n_faults = sum(c.fault is not None for c in checks)
        longest = max((c.longest for c in checks), default=0)
        print(f"{split}/{task}: {len(checks)} shards, {read} samples read ({recorded}), {n_bad} bad samples, "
              f"{n_faults} bad shards, longest sample {longest} tokens")
        for c in checks:
            name = os.path.relpath(c.shard, root)
            exp = f" of {c.expected}" if c.expected is not None else ""
            print(f"  {'ok ' if c.ok else 'BAD'} {name}: {c.read}{exp} samples read, {len(c.bad_samples)} bad, "
                  f"longest {c.longest}")
            if c.fault is not None:
                print(f"      {c.fault}")
            for e in c.bad_samples[:shown]:
                print(f"      {e}")
            if len(c.bad_samples) > shown:
                print(f"      ... and {len(c.bad_samples) - shown} more bad samples")
    for msg in rep.problems:
        print(f"BAD {msg}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset_dir")
    p.add_argument("--split", action="append", help="split to check (repeatable; default: all)")
    p.add_argument("--skip", action="store_true", help="report every bad shard instead of stopping at the first")
    p.add_argument("--full", action="store_true",
                   help="read every sample of every shard: check_sample on each, each shard's sample count "
                        "against the manifest's shard_samples, each task's longest sample against its max_len; "
                        "reports every problem per split, task and shard (default: the fast check of each "
                        "shard's first sample, the loader's start-up check)")
    args = p.parse_args(argv)
    try:
        rep = validate_dataset(args.dataset_dir, args.split, "skip" if args.skip or args.full else "raise",
                               full=args.full)
    except ValueError as e:
        print(f"BAD {e}")
        return 1
    if args.full:
        _print_full(rep, args.dataset_dir)
        return 0 if all(c.ok for c in rep.checks) and not rep.problems else 1
    for task, urls in sorted(rep.usable.items()):
        print(f"{task}: {len(urls)} shards ok (first sample of each checked; --full reads every sample)")
    for e in rep.skipped:
        lost = rep.lost.get(e.shard or "")
        print(f"BAD {e}" + (f" ({lost} samples lost)" if lost is not None else ""))
    return 1 if rep.skipped else 0


if __name__ == "__main__":
    raise SystemExit(main())
