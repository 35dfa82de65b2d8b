"""Reading shards: the one tar reader (`read_shard`) and the one sample check (`check_sample`).

    for raw in read_shard(url, expected=manifest.expected_counts("train").get(url)):
        ids, meta = check_sample(raw, shard=url, task="t2i", layout=manifest.vocab,
                                 tokenizer_sha256=manifest.tokenizer_sha256)

`read_shard` yields a shard's raw webdataset samples and checks the shard itself: a readable tar,
not empty, and (given the manifest's count) neither cut short nor overfull. `check_sample` decodes
one sample (`decode_sample`, with no pickle ever loaded) and checks it against the shard contract:
task, tokenizer, vocabulary, layout, image grid. `iter_samples` reads and decodes without that check,
for code that looks at a shard without knowing its vocabulary or task (inspection, tests): (key, ids,
meta) per sample.

Every problem is a `BadInputError` whose message names the shard, the sample key and the field, and
whose `reason` is one of `REASONS` (the loader's skip counters are keyed by it).
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Iterator, Mapping

import numpy as np
import webdataset as wds

from data.layout import parse_image_block
from model.config import VocabLayout

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


# ----- shards ----------------------------------------------------------------------------------------
def read_shard(url: str | os.PathLike, expected: int | None = None) -> Iterator[dict[str, Any]]:
    """Raw webdataset samples ({"__key__", "ids.npy": bytes, "json": bytes, ...}) of one shard.

    A broken tar becomes a `BadInputError` naming the shard and the last sample read whole; a shard
    that holds no sample raises `empty_shard` after the iteration. With `expected` (the manifest's
    count for this shard), a shard that ends early raises `truncated_shard` after its last sample,
    and one with more samples raises `overfull_shard` instead of yielding the first extra one:
    Python's tarfile reads a tar cut inside a header as a shorter valid archive, so the count is
    the only thing that tells such a cut from the end of the shard.
    """
    url = os.fspath(url)
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
def iter_samples(url: str | os.PathLike, expected: int | None = None
                 ) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """(key, ids, json meta) of every sample of one shard: `read_shard` and `decode_sample`, without the
    checks that need a vocabulary or the shard's task (`check_sample`)."""
    url = os.fspath(url)
    for raw in read_shard(url, expected):
        ids, meta = decode_sample(raw, url)
        yield raw["__key__"], ids, meta


def decode_sample(raw: Mapping[str, Any], shard: str) -> tuple[np.ndarray, dict[str, Any]]:
    """(ids [L] as written, json meta) of one raw sample: both fields present, ids a 1-D integer array of
    at least two tokens, the json an object."""
    key = raw.get("__key__")
    for name in ("ids.npy", "json"):
        if name not in raw:
            fields = sorted(k for k in raw if not k.startswith("__"))
            raise bad("missing_field", shard, key, name, f"absent (sample has {fields})")
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
    return ids, meta


def check_sample(raw: Mapping[str, Any], *, shard: str, task: str, layout: VocabLayout,
                 tokenizer_sha256: str | None, image_grid: list[int] | None = None
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode and check one raw sample of a `task` shard; returns (ids int32 [L], json meta).

    `tokenizer_sha256=None` skips the tokenizer check (explicit shard lists without a manifest);
    `image_grid=None` accepts any image grid, [h, w] only that one.
    """
    key = raw.get("__key__")
    ids, meta = decode_sample(raw, shard)
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


