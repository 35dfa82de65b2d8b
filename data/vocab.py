"""The unified vocabulary: a text tokenizer, the eight structural tokens, then the visual codebook.

`UnifiedVocab` is the one object that knows where every id lives (`model.config.VocabLayout`),
encodes and decodes text and code grids both ways, builds Emu3 sequences per task (via
`data.layout`) and describes its tokenizer for the dataset manifest.

Two text tokenizers are supported:
- a sentencepiece model trained by `python -m data.prepare tokenizer` (`train_sentencepiece`): text
  ids are the sentencepiece ids, the structural ids follow at `text_size`, then the codebook;
- a local HF tokenizer directory (a real Emu3 checkpoint's): ids are read from the tokenizer by
  Emu3's token names (`EMU3_TOKEN_NAMES`, visual token k = "<|visual token {k:06d}|>"), so a
  sequence we write is exactly what Emu3's own tokenizer would produce.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from data import layout as L
from data.manifest import Manifest
from model.config import VocabLayout

EMU3_TOKEN_NAMES = {
    "bos_id": "<|extra_203|>",
    "eos_id": "<|extra_204|>",
    "pad_id": "<|endoftext|>",
    "boi_id": "<|image start|>",
    "eoi_id": "<|image end|>",
    "img_id": "<|image token|>",
    "eol_id": "<|extra_200|>",
    "eof_id": "<|extra_201|>",
}
"""Structural token strings in Emu3's released tokenizer, by `VocabLayout` field."""

VISUAL_TOKEN_FORMAT = "<|visual token {:06d}|>"
_VISUAL_TOKEN_RE = re.compile(r"^<\|visual token (\d{6})\|>$")

# Order of the structural ids after the sentencepiece text ids (our own vocabularies only).
_STRUCTURAL_ORDER = ("pad_id", "bos_id", "eos_id", "boi_id", "eoi_id", "img_id", "eol_id", "eof_id")


class TextTokenizer(Protocol):
    """What `UnifiedVocab` needs from a text tokenizer (ids never include BOS/EOS)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class SentencePieceText:
    """A sentencepiece `.model` file; BOS/EOS are ours, so sentencepiece adds none."""

    kind = "sentencepiece"

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"sentencepiece model {self.path} does not exist")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @property
    def size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text, out_type=int))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFText:
    """A local HF tokenizer directory, loaded with `AutoTokenizer` (never from the network)."""

    kind = "hf"

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise ValueError(f"HF tokenizer directory {self.path} does not exist")
        self.tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """sha256 of a `.model` file's bytes, or of an HF directory's files concatenated in sorted order."""
    path = Path(path)
    h = hashlib.sha256()
    if path.is_file():
        h.update(path.read_bytes())
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if not files:
            raise ValueError(f"tokenizer directory {path} is empty")
        for p in sorted(files, key=lambda p: p.relative_to(path).as_posix()):
            h.update(p.read_bytes())
    else:
        raise ValueError(f"tokenizer path {path} does not exist")
    return h.hexdigest()


@dataclass
class SentencePieceTrainConfig:
    """How `train_sentencepiece` trains the text tokenizer of our own datasets."""

    vocab_size: int = 512
    """Upper bound of text ids; the trained model may be smaller if the corpus has fewer pieces."""
    model_type: str = "bpe"
    """sentencepiece model type: bpe | unigram."""
    byte_fallback: bool = True
    """Encode any character outside the learned pieces as UTF-8 bytes, so nothing maps to <unk>."""

    def __post_init__(self) -> None:
        # 256 byte pieces + <unk> + "*" need room before any learned piece.
        floor = 260 if self.byte_fallback else 8
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < floor:
            raise ValueError(f"tokenizer.vocab_size must be an integer >= {floor}, got {self.vocab_size!r}")
        if self.model_type not in ("bpe", "unigram"):
            raise ValueError(f"tokenizer.model_type must be bpe or unigram, got {self.model_type!r}")


def train_sentencepiece(lines: Sequence[str], out_path: str | os.PathLike,
                        cfg: SentencePieceTrainConfig = SentencePieceTrainConfig()) -> Path:
    """Train a sentencepiece model on `lines` and write it to `out_path` (a `.model` file).

    Deterministic: one thread, no input sampling or shuffling. Digits are split one per piece and
    "*" is a piece of its own, so the "h*w" image size text always encodes the same way.
    """
    import io

    import sentencepiece as spm

    lines = [ln for ln in (s.strip() for s in lines) if ln]
    if not lines:
        raise ValueError("tokenizer corpus is empty")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=cfg.vocab_size,
        model_type=cfg.model_type, byte_fallback=cfg.byte_fallback, split_digits=True,
        user_defined_symbols=["*"], character_coverage=1.0, hard_vocab_limit=False,
        # Our structural tokens replace sentencepiece's own BOS/EOS/PAD.
        unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.getvalue())
    return out_path


class UnifiedVocab:
    """Text tokenizer + structural tokens + visual codebook, behind one `VocabLayout`."""

    def __init__(self, text: TextTokenizer, layout: VocabLayout, tokenizer_path: str | os.PathLike):
        self.text = text
        self.layout = layout
        self.tokenizer_path = Path(tokenizer_path)
        self.sha256 = tokenizer_sha256(self.tokenizer_path)

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def from_sentencepiece(cls, path: str | os.PathLike, visual_size: int) -> "UnifiedVocab":
        """Text ids [0, n), the 8 structural ids at n.., then `visual_size` codes."""
        text = SentencePieceText(path)
        n = text.size
        ids = {name: n + i for i, name in enumerate(_STRUCTURAL_ORDER)}
        visual_start = n + len(_STRUCTURAL_ORDER)
        layout = VocabLayout(text_size=n, visual_start=visual_start, visual_size=int(visual_size),
                             vocab_size=visual_start + int(visual_size), **ids)
        return cls(text, layout, path)

    @classmethod
    def from_hf(cls, path: str | os.PathLike, visual_size: int | None = None) -> "UnifiedVocab":
        """Read every id from an Emu3-style HF tokenizer directory by token name.

        Text ids are those below the lowest structural id. The codebook is the contiguous run of
        "<|visual token NNNNNN|>" tokens starting at 000000; `visual_size` (the VQ model's codebook)
        may cut it shorter and must not exceed it.
        """
        text = HFText(path)
        tok = text.tok
        vocab = tok.get_vocab()
        ids: dict[str, int] = {}
        for field_name, token in EMU3_TOKEN_NAMES.items():
            if token not in vocab:
                raise ValueError(f"HF tokenizer {path} has no token {token!r} (needed for vocab.{field_name})")
            ids[field_name] = int(vocab[token])
        visual = sorted((int(m.group(1)), i) for t, i in vocab.items() if (m := _VISUAL_TOKEN_RE.match(t)))
        if not visual or visual[0][0] != 0:
            raise ValueError(f"HF tokenizer {path} has no {VISUAL_TOKEN_FORMAT.format(0)!r} token")
        visual_start = visual[0][1]
        run = 0
        for k, tid in visual:
            if k != run or tid != visual_start + k:
                break
            run += 1
        if visual_size is None:
            visual_size = run
        elif visual_size > run:
            raise ValueError(
                f"visual_size {visual_size} exceeds the {run} contiguous visual tokens in HF tokenizer {path}"
            )
        text_size = min(ids.values())
        layout = VocabLayout(text_size=text_size, visual_start=visual_start, visual_size=int(visual_size),
                             vocab_size=max(len(tok), visual_start + run), **ids)
        return cls(text, layout, path)

    @classmethod
    def from_path(cls, path: str | os.PathLike, visual_size: int | None = None) -> "UnifiedVocab":
        """A `.model` file is sentencepiece, a directory is an HF tokenizer."""
        path = Path(path)
        if path.is_dir():
            return cls.from_hf(path, visual_size)
        if visual_size is None:
            raise ValueError(f"visual_size is required with the sentencepiece tokenizer {path}")
        return cls.from_sentencepiece(path, visual_size)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "UnifiedVocab":
        """Rebuild the vocabulary a dataset was written with and check it against its manifest."""
        info = manifest.doc.get("tokenizer") or {}
        where = manifest.path
        if info.get("type") not in ("sentencepiece", "hf") or not info.get("path"):
            raise ValueError(f"{where}: field tokenizer must have type sentencepiece|hf and a path, got {info}")
        path = Path(manifest.root) / info["path"]
        expected = manifest.vocab
        if info["type"] == "sentencepiece":
            vocab = cls.from_sentencepiece(path, expected.visual_size)
        else:
            vocab = cls.from_hf(path, expected.visual_size)
        if vocab.sha256 != manifest.tokenizer_sha256:
            raise ValueError(f"{where}: field tokenizer.sha256 does not match the tokenizer at {path}")
        if vocab.layout != expected:
            raise ValueError(f"{where}: field vocab {expected} differs from the tokenizer's layout {vocab.layout}")
        return vocab

    # ----- manifest -----------------------------------------------------------------------------
    def manifest_entry(self, dataset_dir: str | os.PathLike) -> dict[str, str]:
        """The manifest's `tokenizer` field; the tokenizer must live inside `dataset_dir`."""
        rel = os.path.relpath(self.tokenizer_path, dataset_dir)
        return {"type": self.text.kind, "path": Path(rel).as_posix(), "sha256": self.sha256}

    # ----- text and codes -----------------------------------------------------------------------
    def encode_text(self, text: str) -> list[int]:
        ids = self.text.encode(text)
        bad = [i for i in ids if not 0 <= i < self.layout.text_size]
        if bad:
            # An HF tokenizer parses special-token strings inside the text; refuse them rather than
            # let data inject structure (e.g. a fake <image start>).
            raise ValueError(f"text {text[:60]!r} encodes to non-text ids {bad[:4]} (special tokens in the text?)")
        return ids

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.text.decode(ids)

    def ids_to_codes(self, ids: np.ndarray) -> np.ndarray:
        """The (h, w) code grid of the first image block in `ids`."""
        return L.parse_image_block(ids, self.layout)[0]

    # ----- sequences per task -------------------------------------------------------------------
    def t2i(self, caption: str, codes_HW: np.ndarray) -> np.ndarray:
        """Text-to-image ids; an empty caption is the classifier-free-guidance unconditional sample."""
        h, w = np.asarray(codes_HW).shape
        caption_ids = self.encode_text(caption) if caption else []
        return L.t2i_ids(caption_ids, codes_HW, self.layout, self.encode_text(L.image_size_text(h, w)))

    def mmu(self, question: str, answer: str, codes_HW: np.ndarray) -> tuple[np.ndarray, int]:
        """Understanding ids and `answer_start`."""
        h, w = np.asarray(codes_HW).shape
        return L.mmu_ids(
            # Emu3's template keeps the space after "USER:" and before the answer; sentencepiece
            # folds it into its word-start marker, a BPE tokenizer keeps it as Emu3 does.
            self.encode_text(L.MMU_SYSTEM_PREFIX), codes_HW,
            self.encode_text(question.strip() + L.MMU_ASSISTANT_SUFFIX), self.encode_text(" " + answer.strip()),
            self.layout, self.encode_text(L.image_size_text(h, w)),
        )

    def lm(self, text: str) -> np.ndarray:
        return L.lm_ids(self.encode_text(text), self.layout)

    # ----- decoding for people ------------------------------------------------------------------
    def describe(self, ids: Sequence[int]) -> str:
        """Readable rendering: text decoded, structural tokens named, each image block as <image h*w>."""
        lay = self.layout
        names = {v: f"<{k[:-3]}>" for k, v in lay.structural_ids().items()}
        ids = [int(i) for i in ids]
        out: list[str] = []
        text: list[int] = []
        i = 0

        def flush() -> None:
            if text:
                out.append(self.decode_text(text))
                text.clear()

        while i < len(ids):
            t = ids[i]
            if t == lay.boi_id:
                flush()
                try:
                    codes, (start, end) = L.parse_image_block(np.asarray(ids[i:]), lay)
                    out.append(f"<image {codes.shape[0]}*{codes.shape[1]}>")
                    i += end
                    continue
                except ValueError:
                    out.append(names[t])
            elif t < lay.text_size:
                text.append(t)
            elif t in names:
                flush()
                out.append(names[t])
            elif lay.visual_start <= t < lay.visual_end:
                flush()
                out.append(f"<v{t - lay.visual_start}>")
            else:
                flush()
                out.append(f"<id{t}>")
            i += 1
        flush()
        return "".join(out)
