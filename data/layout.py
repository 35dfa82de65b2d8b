"""Emu3 token layouts per task (text-to-image, understanding, plain text) and their loss labels.

Sequences are built from already-tokenised pieces (text ids from the text tokenizer, an (h, w) grid of
visual codes), so this file needs only the `VocabLayout`; `data.vocab.UnifiedVocab` wraps it with a
tokenizer. Layouts follow Emu3's training code and transformers' `Emu3Processor`:

    image block: <image start> "{h}*{w}" <image token> row_1 EOL ... row_h EOL EOF <image end>
    t2i:         BOS {caption} [image block] EOS
    mmu:         BOS "You are a helpful assistant. USER: " [image block] "{question} ASSISTANT:" {answer} EOS
    lm:          BOS {text} EOS

Labels follow the shard contract (HF convention: aligned with the inputs, -100 = ignored, the loss
shifts by one): t2i supervises the visual codes of its image block (plus EOL/EOF/<image end> when
`image_structural_in_loss`) and the final EOS; mmu supervises every position from `answer_start`;
lm supervises every position but the leading BOS. Padding is never supervised. Emu3's own image
fine-tuning drops the image structural tokens from the loss (Emu3 issue #53), hence the default.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from model.config import VocabLayout

IGNORE_INDEX = -100
"""Label value the cross-entropy ignores (PyTorch / HF convention)."""

TASKS = ("t2i", "mmu", "lm")
"""Task names, in the order `model.config.MoDConfig.tasks` uses by default."""

MMU_SYSTEM_PREFIX = "You are a helpful assistant. USER: "
"""Text Emu3-Chat puts between BOS and the image block of an understanding sample."""

MMU_ASSISTANT_SUFFIX = " ASSISTANT:"
"""Text appended to the question; the answer starts right after it."""


def strip_caption(ids: np.ndarray, layout: VocabLayout) -> np.ndarray:
    """A t2i sample re-laid with an empty caption: `BOS <image block> EOS`, exactly what `t2i_ids` gives
    for `caption_ids=[]` (the loader's per-epoch classifier-free-guidance dropout). Same dtype as `ids`."""
    ids = np.asarray(ids)
    starts = np.flatnonzero(ids == layout.boi_id)
    if ids.ndim != 1 or len(ids) == 0 or ids[0] != layout.bos_id or len(starts) == 0:
        raise ValueError("strip_caption needs a t2i sample: BOS, a caption, then an image block")
    # Caption ids are text ids, so the first <image start> is where the caption ends.
    return np.concatenate([ids[:1], ids[starts[0]:]])


def image_size_text(h: int, w: int) -> str:
    """The "h*w" string Emu3 writes (as ordinary text tokens) before `<image token>`."""
    return f"{h}*{w}"


def image_block(codes_HW: np.ndarray, layout: VocabLayout, size_ids: Sequence[int]) -> np.ndarray:
    """`<image start> size_ids <image token> (row EOL)*h EOF <image end>` for an (h, w) code grid.

    `size_ids` are the text ids of `image_size_text(h, w)`; they are passed in because only the text
    tokenizer knows them.
    """
    codes_HW = np.asarray(codes_HW)
    if codes_HW.ndim != 2 or codes_HW.size == 0:
        raise ValueError(f"image codes must be a non-empty (h, w) grid, got shape {codes_HW.shape}")
    if codes_HW.min() < 0 or codes_HW.max() >= layout.visual_size:
        raise ValueError(
            f"image codes must lie in [0, {layout.visual_size}) (vocab.visual_size), "
            f"got [{codes_HW.min()}, {codes_HW.max()}]"
        )
    _check_text(size_ids, layout, "size_ids")
    h, w = codes_HW.shape
    # Each row of visual ids gets an EOL column appended: (h, w + 1) flattened row-major.
    rows_HW1 = np.concatenate(
        [codes_HW.astype(np.int64) + layout.visual_start, np.full((h, 1), layout.eol_id, dtype=np.int64)], axis=1
    )
    return np.concatenate([
        [layout.boi_id], np.asarray(size_ids, dtype=np.int64), [layout.img_id],
        rows_HW1.reshape(-1), [layout.eof_id, layout.eoi_id],
    ]).astype(np.int32)


def t2i_ids(caption_ids: Sequence[int], codes_HW: np.ndarray, layout: VocabLayout,
            size_ids: Sequence[int]) -> np.ndarray:
    """Text-to-image sample; pass an empty caption for the classifier-free-guidance (dropped) case."""
    _check_text(caption_ids, layout, "caption_ids")
    return np.concatenate([
        [layout.bos_id], np.asarray(caption_ids, dtype=np.int64), image_block(codes_HW, layout, size_ids),
        [layout.eos_id],
    ]).astype(np.int32)


def mmu_ids(prefix_ids: Sequence[int], codes_HW: np.ndarray, question_ids: Sequence[int],
            answer_ids: Sequence[int], layout: VocabLayout, size_ids: Sequence[int]) -> tuple[np.ndarray, int]:
    """Understanding sample and `answer_start` (index of the first answer token in the result).

    `prefix_ids` encode `MMU_SYSTEM_PREFIX`; `question_ids` encode question + `MMU_ASSISTANT_SUFFIX`.
    """
    for name, piece in (("prefix_ids", prefix_ids), ("question_ids", question_ids), ("answer_ids", answer_ids)):
        _check_text(piece, layout, name)
    if len(answer_ids) == 0:
        raise ValueError("answer_ids is empty: an understanding sample needs an answer to supervise")
    head = np.concatenate([
        [layout.bos_id], np.asarray(prefix_ids, dtype=np.int64), image_block(codes_HW, layout, size_ids),
        np.asarray(question_ids, dtype=np.int64),
    ])
    ids = np.concatenate([head, np.asarray(answer_ids, dtype=np.int64), [layout.eos_id]]).astype(np.int32)
    return ids, int(len(head))


def lm_ids(text_ids: Sequence[int], layout: VocabLayout) -> np.ndarray:
    """Plain-text sample."""
    _check_text(text_ids, layout, "text_ids")
    if len(text_ids) == 0:
        raise ValueError("text_ids is empty: a plain-text sample needs at least one token")
    return np.concatenate([[layout.bos_id], np.asarray(text_ids, dtype=np.int64), [layout.eos_id]]).astype(np.int32)


def image_spans(ids: np.ndarray, layout: VocabLayout) -> list[tuple[int, int]]:
    """(start, end) index pairs of every image block: ids[start] is <image start>, ids[end - 1] <image end>."""
    ids = np.asarray(ids)
    starts = np.flatnonzero(ids == layout.boi_id)
    ends = np.flatnonzero(ids == layout.eoi_id)
    if len(starts) != len(ends) or np.any(ends <= starts):
        raise ValueError(
            f"unbalanced image blocks: <image start> at {starts.tolist()}, <image end> at {ends.tolist()}"
        )
    return [(int(s), int(e) + 1) for s, e in zip(starts, ends)]


def parse_image_block(ids: np.ndarray, layout: VocabLayout) -> tuple[np.ndarray, tuple[int, int]]:
    """Inverse of `image_block` without the tokenizer: (codes_HW, (start, end)) of the first block.

    The grid shape comes from the EOL positions, not from the "h*w" text, so this works for any text
    tokenizer; raises ValueError when the rows are ragged or a non-visual id sits inside a row.
    """
    spans = image_spans(ids, layout)
    if not spans:
        raise ValueError("no image block (<image start> ... <image end>) in the sequence")
    start, end = spans[0]
    block = np.asarray(ids[start:end], dtype=np.int64)
    img_pos = np.flatnonzero(block == layout.img_id)
    if len(img_pos) != 1 or block[-2] != layout.eof_id:
        raise ValueError("image block lacks exactly one <image token> or does not end with EOF <image end>")
    body = block[img_pos[0] + 1:-2]
    eols = np.flatnonzero(body == layout.eol_id)
    if len(eols) == 0 or eols[-1] != len(body) - 1:
        raise ValueError("image block rows must each end with EOL")
    w = int(eols[0])
    h = len(eols)
    if w == 0 or len(body) != h * (w + 1) or np.any(eols != np.arange(h) * (w + 1) + w):
        raise ValueError(f"image block rows are ragged (EOL positions {eols.tolist()})")
    codes = body.reshape(h, w + 1)[:, :w]
    if codes.min() < layout.visual_start or codes.max() >= layout.visual_end:
        raise ValueError("image block rows contain non-visual ids")
    return (codes - layout.visual_start).astype(np.int64), (start, end)


def make_labels(ids: np.ndarray, task: str, meta: Mapping[str, Any] | None, layout: VocabLayout,
                image_structural_in_loss: bool = False, *, key: str | None = None) -> np.ndarray:
    """Loss labels (int64, same length as `ids`, -100 = ignored) for one sample of `task`.

    `meta` is the sample's json (mmu reads `answer_start`); `key` only improves error messages.
    Trailing or interior padding (`pad_id`) is always ignored.
    """
    where = f"sample {key!r}: " if key is not None else ""
    ids = np.asarray(ids)
    if ids.ndim != 1 or len(ids) == 0:
        raise ValueError(f"{where}ids must be a non-empty 1-D array, got shape {ids.shape}")
    ids64 = ids.astype(np.int64)
    labels = np.full(len(ids64), IGNORE_INDEX, dtype=np.int64)

    if task == "t2i":
        keep = np.zeros(len(ids64), dtype=bool)
        try:
            spans = image_spans(ids64, layout)
        except ValueError as e:
            raise ValueError(f"{where}task t2i: {e}") from None
        if not spans:
            raise ValueError(f"{where}task t2i has no image block")
        for start, end in spans:
            block = ids64[start:end]
            inside = (block >= layout.visual_start) & (block < layout.visual_end)
            if image_structural_in_loss:
                # The tokens that end rows, the frame and the image: what the sampler must emit itself.
                inside |= (block == layout.eol_id) | (block == layout.eof_id) | (block == layout.eoi_id)
            keep[start:end] = inside
        keep |= ids64 == layout.eos_id
    elif task == "mmu":
        answer_start = (meta or {}).get("answer_start")
        if isinstance(answer_start, bool) or not isinstance(answer_start, (int, np.integer)):
            raise ValueError(f"{where}task mmu needs an integer json field answer_start, got {answer_start!r}")
        if not 0 < int(answer_start) < len(ids64):
            raise ValueError(
                f"{where}json field answer_start = {answer_start} is outside the sequence (length {len(ids64)})"
            )
        keep = np.arange(len(ids64)) >= int(answer_start)
    elif task == "lm":
        keep = np.ones(len(ids64), dtype=bool)
        keep[0] = False  # BOS has no previous token to be predicted from
    else:
        raise ValueError(f"{where}task {task!r} is not one of {TASKS}")

    keep &= ids64 != layout.pad_id
    labels[keep] = ids64[keep]
    return labels


def _check_text(piece: Sequence[int], layout: VocabLayout, name: str) -> None:
    arr = np.asarray(piece, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= layout.text_size):
        raise ValueError(f"{name} must hold text ids in [0, {layout.text_size}) (vocab.text_size)")
