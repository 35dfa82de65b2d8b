"""The embedded demo dataset: scikit-learn's handwritten digits as t2i, mmu and lm samples.

Built offline from `sklearn.datasets.load_digits` (1,797 real 8x8 scans, 10 classes, values 0..16):
1. images are split into train/validation by image, stratified by class and seeded;
2. every image becomes a grid of visual codes, in one of two formats (`DemoConfig.image_format`,
   `python -m data.prepare demo --image-format ...`, recorded in the manifest's `demo` section):
   - grey8 (default): the native 8x8 scan, one code per pixel, the code being its grey level 0..16
     (`PatchVQ.grey_levels`, a fixed 17-entry codebook): lossless, 64 codes + 8 EOLs, a t2i sample
     of about 90 tokens. The demo model learns to draw digits from captions in this format.
   - patch16: upsampled to 32x32 (bilinear), 2x2 patches quantised by a KMeans `PatchVQ` codebook
     of 256 codes fit on the training images: a 16x16 grid, about 290 tokens per t2i sample. Closer
     to a real image tokenizer, but the demo model stays at chance on it: 256 learned
     codes describe an image that has 64 pixels.
3. a sentencepiece tokenizer (vocab <= 512) is trained on the demo's text templates;
4. per image one t2i sample (a varied caption naming the digit) and one mmu sample (a varied question,
   an answer naming the digit); plus template-generated lm text about digits, counting and arithmetic.

Every caption is written: classifier-free-guidance dropout is the loader's (`data.caption_dropout`),
drawn per epoch, so each epoch trains a different set of images unconditionally. Every random choice
comes from generators seeded by `DemoConfig.seed`: building twice gives byte-identical shards and
the same manifest.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.imagetok import PatchVQ, PatchVQConfig
from data.layout import MMU_ASSISTANT_SUFFIX, MMU_SYSTEM_PREFIX, image_size_text
from data.shards import DatasetWriter, ShardConfig
from data.vocab import SentencePieceTrainConfig, UnifiedVocab, train_sentencepiece

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

CAPTIONS = (
    "a handwritten digit {name}",
    "the number {d} written by hand",
    "a scanned handwritten {name}",
    "a grayscale image of the digit {d}",
    "handwritten number {name}",
    "a hand-drawn {d}",
    "the digit {name}, written with a pen",
    "a small picture of a handwritten {d}",
)
"""t2i captions; {d} is the numeral, {name} the word."""

QUESTIONS = (
    ("Which digit is this?", "It is the digit {d}."),
    ("What number is written here?", "{Name}."),
    ("What digit does the image show?", "The image shows a handwritten {name}."),
    ("Read the handwritten digit.", "{d}"),
    ("Is this digit odd or even? Name it too.", "It is {name}, an {parity} number."),
    ("What is written in this picture?", "A handwritten {name}."),
)
"""mmu (question, answer) templates."""

LM_TEMPLATES = (
    "{a} plus {b} is {sum}.",
    "{a} + {b} = {sum}",
    "{a} times {b} is {prod}.",
    "counting up from {a}: {a}, {a1}, {a2}, {a3}.",
    "counting down from {a3}: {a3}, {a2}, {a1}, {a}.",
    "after {a} comes {a1}, and after {a1} comes {a2}.",
    "the digit {name} is written as {d}.",
    "{Name} is an {parity} number.",
    "{Name} plus one is {next_name}.",
)
"""lm templates; a, b in [0, 100) (about 30k distinct texts, so validation can avoid training text), d a digit."""


IMAGE_FORMATS = {"grey8": (8, 1, 17), "patch16": (32, 2, 256)}
"""Image format -> default (image_size, patch_size, codebook_size); grey8's are fixed."""


@dataclass
class DemoConfig:
    """What `build_demo` builds."""

    seed: int = 0
    """Seeds the split, the codebook fit and every template choice."""
    val_fraction: float = 0.1
    """Fraction of images (stratified by class) held out for validation."""
    image_format: str = "grey8"
    """grey8: the native 8x8 grid, 17 grey levels as codes (learnable by the demo model); patch16: 32x32
    upsampled, 2x2 patches through a KMeans codebook of 256 (see the module docstring)."""
    image_size: int | None = None
    """Side the digits are tokenised at; None: the format's (grey8 8, fixed; patch16 32, a multiple of 8)."""
    patch_size: int | None = None
    """PatchVQ patch side, code grid = (image_size / patch_size) squared; None: the format's (grey8 1, fixed)."""
    codebook_size: int | None = None
    """Visual codebook size (vocab.visual_size); None: the format's (grey8 17 grey levels, fixed; patch16 256)."""
    text_vocab_size: int = 512
    """Upper bound of the sentencepiece vocabulary (vocab.text_size)."""
    lm_per_image: float = 1.0
    """Number of lm samples per image of the split."""
    shard_max_count: int = 500
    """Samples per shard at most (several shards per task, so several ranks/workers get data)."""
    shard_max_size_mb: float = 64.0
    """Shard size cap in MB."""

    def __post_init__(self) -> None:
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"demo.image_format must be one of {sorted(IMAGE_FORMATS)}, got {self.image_format!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"demo.val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.lm_per_image >= 0:
            raise ValueError(f"demo.lm_per_image must be >= 0, got {self.lm_per_image}")
        for name, default in zip(("image_size", "patch_size", "codebook_size"), IMAGE_FORMATS[self.image_format]):
            if getattr(self, name) is None:
                setattr(self, name, default)
            elif self.image_format == "grey8" and getattr(self, name) != default:
                raise ValueError(f"demo.{name} is {default} in image_format grey8 (the native 8x8 grid, one code "
                                 f"per grey level 0..16), got {getattr(self, name)!r}; use image_format patch16")
        if self.image_size % 8:
            raise ValueError(f"demo.image_size must be a multiple of 8 (the digits are 8x8), got {self.image_size}")
        # PatchVQConfig / SentencePieceTrainConfig / ShardConfig validate the rest when built.


def load_digit_images(image_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, S, S) float32 in [0, 1], labels (N,) int64) from scikit-learn's bundled digits.

    At S = 8 the scans come back as they are (pixel values k / 16, k = 0..16); larger sides are
    upsampled bilinearly.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = (digits.images / 16.0).astype(np.float32)
    if image_size == small.shape[1]:
        return small, digits.target.astype(np.int64)
    big = np.stack([
        np.asarray(Image.fromarray(x, mode="F").resize((image_size, image_size), Image.BILINEAR)) for x in small
    ])
    return np.clip(big, 0.0, 1.0), digits.target.astype(np.int64)


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of image indices into (train, validation); disjoint by construction."""
    from sklearn.model_selection import train_test_split

    train, val = train_test_split(np.arange(len(labels)), test_size=val_fraction, stratify=labels,
                                  random_state=seed)
    return np.asarray(train), np.asarray(val)


def _fill(template: str, d: int) -> str:
    return template.format(d=d, name=NAMES[d], Name=NAMES[d].capitalize(),
                           parity="even" if d % 2 == 0 else "odd")


def lm_text(rng: np.random.Generator) -> str:
    """One short text about digits, counting or arithmetic."""
    t = LM_TEMPLATES[int(rng.integers(len(LM_TEMPLATES)))]
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    d = int(rng.integers(10))
    return t.format(a=a, b=b, sum=a + b, prod=a * b, a1=a + 1, a2=a + 2, a3=a + 3, d=d, name=NAMES[d],
                    Name=NAMES[d].capitalize(), parity="even" if d % 2 == 0 else "odd",
                    next_name=NAMES[d + 1] if d < 9 else "ten")


def tokenizer_corpus(seed: int, n_lm: int = 4000) -> list[str]:
    """Every caption, question and answer the demo can produce, plus sampled lm text."""
    # The "h*w" texts of both formats' grids (and 32*32), so every format's header encodes compactly.
    lines = [MMU_SYSTEM_PREFIX, MMU_ASSISTANT_SUFFIX.strip(), image_size_text(8, 8), image_size_text(16, 16),
             image_size_text(32, 32)]
    for d in range(10):
        lines += [_fill(c, d) for c in CAPTIONS]
        lines += [_fill(q, d) + MMU_ASSISTANT_SUFFIX for q, _ in QUESTIONS]
        lines += [_fill(a, d) for _, a in QUESTIONS]
    rng = np.random.default_rng([seed, 99])
    lines += [lm_text(rng) for _ in range(n_lm)]
    return lines


def build_demo(out_dir: str | os.PathLike, cfg: DemoConfig = DemoConfig(), created_by: str = "") -> dict[str, Any]:
    """Build the demo dataset into `out_dir`; returns its manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = load_digit_images(cfg.image_size)
    train_idx, val_idx = split_indices(labels, cfg.val_fraction, cfg.seed)

    if cfg.image_format == "grey8":
        # The scans are integers 0..16: a fixed codebook of those levels is lossless and needs no fit.
        vq = PatchVQ.grey_levels(cfg.image_size, cfg.codebook_size)
    else:
        vq = PatchVQ.fit(images[train_idx], PatchVQConfig(image_size=cfg.image_size, patch_size=cfg.patch_size,
                                                          codebook_size=cfg.codebook_size, seed=cfg.seed))
    vq_dir = vq.save(out_dir / "image_tokenizer")
    codes = vq.encode(images)

    sp_path = train_sentencepiece(tokenizer_corpus(cfg.seed), out_dir / "tokenizer.model",
                                  SentencePieceTrainConfig(vocab_size=cfg.text_vocab_size))
    vocab = UnifiedVocab.from_sentencepiece(sp_path, cfg.codebook_size)
    writer = DatasetWriter(out_dir, ShardConfig(cfg.shard_max_count, cfg.shard_max_size_mb), vocab)
    hw = list(codes.shape[1:])

    train_lm: set[str] = set()
    for split_no, (split, idx) in enumerate((("train", train_idx), ("validation", val_idx))):
        # One generator per (split, purpose): adding a template elsewhere does not reshuffle these.
        # (Tag 2 seeded the write-time caption dropout, now the loader's: data.caption_dropout.)
        rng_cap = np.random.default_rng([cfg.seed, split_no, 1])
        rng_q = np.random.default_rng([cfg.seed, split_no, 3])
        rng_lm = np.random.default_rng([cfg.seed, split_no, 4])
        for n, i in enumerate(idx):
            d = int(labels[i])
            caption = _fill(CAPTIONS[int(rng_cap.integers(len(CAPTIONS)))], d)
            writer.write(split, "t2i", f"t2i-{split}-{n:06d}", vocab.t2i(caption, codes[i]),
                         {"image_hw": hw, "source": f"digits:{int(i)}", "label": d, "caption": caption})
            q, a = QUESTIONS[int(rng_q.integers(len(QUESTIONS)))]
            ids, answer_start = vocab.mmu(_fill(q, d), _fill(a, d), codes[i])
            writer.write(split, "mmu", f"mmu-{split}-{n:06d}", ids,
                         {"image_hw": hw, "answer_start": answer_start, "source": f"digits:{int(i)}", "label": d})
        n_lm = int(round(cfg.lm_per_image * len(idx)))
        n, tries = 0, 0
        while n < n_lm and tries < 100 * max(n_lm, 1):
            tries += 1
            text = lm_text(rng_lm)
            if split == "train":
                train_lm.add(text)
            elif text in train_lm:
                continue  # keep validation text unseen in training
            writer.write(split, "lm", f"lm-{split}-{n:06d}", vocab.lm(text), {"source": "template:lm"})
            n += 1
        if n < n_lm:
            raise ValueError(f"demo: only {n} of {n_lm} {split} lm texts could be made unseen in training")

    return writer.finish(vq.manifest_entry(out_dir, vq_dir), created_by or "data.demo.build_demo",
                         extra={"demo": asdict(cfg)})
