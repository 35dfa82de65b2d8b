"""Checks of shard datasets against the shard contract: manifest, shards, and every sample.

The loader (`data/loader.py`) calls `validate_shards` on every shard before training starts, so a
bad dataset fails (or, under the `skip` policy, is pruned) before the first step instead of hours
in; while training it checks every sample it reads with `data.reader.check_sample`, and every
shard's sample count against the manifest when the shard ends. `validate_dataset(dir)` runs the
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

Problems are `data.reader.BadInputError`s naming the shard, the sample key and the field; the
manifest's own are ValueErrors naming the file and the field (`data.manifest.load_manifest`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from data.manifest import Manifest, load_manifest
from data.reader import SHARD_REASONS, WHOLE_SHARD_REASONS, BadInputError, bad, check_sample, read_shard
from model.config import VocabLayout


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
    path = manifest.path
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
