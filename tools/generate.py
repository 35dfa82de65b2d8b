"""Sample from a trained model: text-to-image (classifier-free guidance, constrained image blocks, pixels through
the dataset's image tokenizer) and understanding (image + question -> answer text).

    python -m tools.generate --checkpoint runs/smoke --task t2i --prompt "a handwritten digit seven" --out grid.png
    python -m tools.generate --checkpoint runs/smoke/hf --data demo_data --task mmu --image digit.png \
        --prompt "Which digit is this?"

`--checkpoint` is a run directory (its newest complete DeepSpeed checkpoint), a `checkpoints/` root, one
`step_NNNNNNNN` directory, or an exported HF directory (`hf/`, `python -m tools.export`), all read by
`tools.checkpoints.open_checkpoint`. The dataset (text tokenizer, image tokenizer, vocabulary layout) is
`--data`, or the run's `config.yaml` `data.dataset_dir`.
Token-level decoding (KV cache under causal MoD routing, the Emu3 image-block constraint) is
`model/generation.py`; this file turns text and pixels into prompts and tokens back into text and pixels.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from data.imagetok import Emu3VQ, PatchVQ, load_image_tokenizer
from data.layout import image_size_text
from data.manifest import load_manifest
from data.vocab import UnifiedVocab
from model import UnifiedTransformer
from model.generation import generate_image_tokens, generate_text
from tools.checkpoints import OpenedCheckpoint, open_checkpoint


@dataclass
class SamplingConfig:
    """How images and answers are sampled."""

    cfg_scale: float = 3.0
    """Classifier-free guidance: logits = uncond + cfg_scale * (cond - uncond); 1.0 turns guidance off."""
    temperature: float = 1.0
    """Softmax temperature for image codes; 0 = greedy (every sample of a prompt the same image)."""
    top_k: int = 0
    """Draw image codes from the top_k most likely only (0 = the whole codebook)."""
    max_new_tokens: int = 32
    """Answer length cap for understanding (decoding stops earlier at EOS)."""
    seed: int = 0
    """Seeds the sampling generator: the same seed gives the same images."""

    def __post_init__(self) -> None:
        if not (isinstance(self.cfg_scale, (int, float)) and np.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise ValueError(f"sampling.cfg_scale must be a finite number >= 0, got {self.cfg_scale!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"sampling.temperature must be >= 0, got {self.temperature!r}")
        for name, lo in (("top_k", 0), ("max_new_tokens", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"sampling.{name} must be an integer >= {lo}, got {v!r}")


# ----- the dataset of a checkpoint ------------------------------------------------------------------------
def dataset_dir_of(ckpt: OpenedCheckpoint, data: str | os.PathLike | None) -> Path:
    """`--data`, else the run config's data.dataset_dir (relative to the working directory, else to the run)."""
    if data:
        return Path(data)
    if ckpt.config_path is None:
        raise ValueError("--data is required: the checkpoint has no run config.yaml naming its dataset")
    if ckpt.run_config is None:
        raise ValueError(f"--data is required: {ckpt.config_path} could not be read as a run config")
    rel = ckpt.run_config.data.dataset_dir
    if not rel:
        raise ValueError(f"{ckpt.config_path}: field data.dataset_dir is missing; pass --data")
    for base in (Path.cwd(), *ckpt.config_path.resolve().parents):
        if (base / rel / "manifest.json").is_file():
            return base / rel
    raise ValueError(f"{ckpt.config_path}: field data.dataset_dir {rel!r} has no manifest.json here; pass --data")


# ----- prompts and decoding ------------------------------------------------------------------------------
class Sampler:
    """Text/pixels <-> tokens around `model/generation.py`, for one model and one dataset's vocabulary."""

    def __init__(self, model: UnifiedTransformer, vocab: UnifiedVocab, image_tokenizer: PatchVQ | Emu3VQ | None):
        if model.config.vocab != vocab.layout:
            raise ValueError(f"model vocabulary {model.config.vocab} differs from the dataset's {vocab.layout}")
        self.model, self.vocab, self.tok = model, vocab, image_tokenizer
        self.layout = vocab.layout
        self.device = next(model.parameters()).device

    @classmethod
    def from_dataset(cls, model: UnifiedTransformer, dataset_dir: str | os.PathLike) -> "Sampler":
        manifest = load_manifest(dataset_dir)
        return cls(model, UnifiedVocab.from_manifest(manifest), load_image_tokenizer(manifest))

    def task_id(self, task: str) -> int:
        tasks = self.model.config.mod.tasks
        if task not in tasks:
            raise ValueError(f"the model has no task {task!r} (mod.tasks = {tasks})")
        return tasks.index(task)

    def default_grid(self) -> tuple[int, int]:
        """(h, w) of generated code grids: the patch tokenizer's fixed grid."""
        if isinstance(self.tok, PatchVQ):
            return self.tok.cfg.grid, self.tok.cfg.grid
        raise ValueError("this dataset's image tokenizer has no fixed grid; pass the grid (e.g. --grid 32x32)")

    def image_header(self, h: int, w: int) -> list[int]:
        """`<image start> "h*w" <image token>`: forced before the first code."""
        lay = self.layout
        return [lay.boi_id, *self.vocab.encode_text(image_size_text(h, w)), lay.img_id]

    def t2i_prompt(self, caption: str, h: int, w: int) -> list[int]:
        """BOS caption header: the t2i training layout up to the first code; "" gives the unconditional
        prompt, exactly the caption-dropped sequence classifier-free-guidance training sees."""
        caption_ids = self.vocab.encode_text(caption) if caption else []
        return [self.layout.bos_id, *caption_ids, *self.image_header(h, w)]

    def text_to_image(self, captions: Sequence[str], cfg: SamplingConfig,
                      grid: tuple[int, int] | None = None) -> np.ndarray:
        """One image per caption: code grids (N, h, w) int64, each parsed back from a well-formed block."""
        from data.layout import parse_image_block

        h, w = grid or self.default_grid()
        gen = torch.Generator(device=self.device).manual_seed(cfg.seed)
        num_codes = self.tok.codebook_size if self.tok is not None else None
        body = generate_image_tokens(
            self.model, [self.t2i_prompt(c, h, w) for c in captions], self.t2i_prompt("", h, w),
            self.task_id("t2i"), h, w, cfg_scale=cfg.cfg_scale, temperature=cfg.temperature, top_k=cfg.top_k,
            num_codes=num_codes, generator=gen,
        ).cpu().numpy()
        header = np.asarray(self.image_header(h, w))
        return np.stack([parse_image_block(np.concatenate([header, b]), self.layout)[0] for b in body])

    def to_pil(self, codes_hw: np.ndarray):
        if self.tok is None:
            raise ValueError("the dataset names no image tokenizer: cannot turn codes into pixels")
        return self.tok.to_pil(codes_hw)

    def encode_image_file(self, path: str | os.PathLike) -> np.ndarray:
        """An image file -> (h, w) codes. The patch tokenizer reads grayscale with dark ink on a light
        background (what `PatchVQ.to_pil` writes), resized to its image size."""
        from PIL import Image

        if self.tok is None:
            raise ValueError("the dataset names no image tokenizer: cannot encode an image")
        try:
            with Image.open(path) as img:
                img.load()
                if isinstance(self.tok, Emu3VQ):
                    return self.tok.encode_pil([img])[0]
                s = self.tok.cfg.image_size
                gray = np.asarray(img.convert("L").resize((s, s), Image.BILINEAR), dtype=np.float32) / 255.0
        except OSError as e:
            raise ValueError(f"--image {path}: cannot read the image ({e})") from None
        return self.tok.encode((1.0 - gray)[None])[0]

    def mmu_prompt(self, codes_hw: np.ndarray, question: str) -> list[int]:
        """The understanding training layout up to where the answer starts."""
        ids, answer_start = self.vocab.mmu(question, "x", codes_hw)
        return [int(i) for i in ids[:answer_start]]

    def answer(self, codes: Sequence[np.ndarray], questions: Sequence[str], max_new_tokens: int = 32) -> list[str]:
        """Greedy answers, one per (image, question)."""
        prompts = [self.mmu_prompt(c, q) for c, q in zip(codes, questions, strict=True)]
        return self.continue_mmu(prompts, max_new_tokens)

    def continue_mmu(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32) -> list[str]:
        """Greedy answer text for understanding prompts (`mmu_prompt` layouts): text ids only, stop at EOS."""
        lay = self.layout
        allowed = torch.zeros(lay.vocab_size, dtype=torch.bool)
        allowed[:lay.text_size] = True
        allowed[lay.eos_id] = True
        out = generate_text(self.model, prompts, self.task_id("mmu"), max_new_tokens=max_new_tokens, allowed=allowed)
        return [self.vocab.decode_text(ids).strip() for ids in out]


def image_grid(images: Sequence[Any], ncols: int | None = None, pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile images (PIL images or [H,W] / [H,W,3] arrays: uint8, or floats in [0, 1]) into one uint8 [H,W,3]
    array, row-major, white between tiles; `SummaryWriter.add_image(tag, grid, step, dataformats="HWC")`.
    `scale` enlarges every tile by pixel repetition (an 8x8 demo digit is too small to look at)."""
    if len(images) == 0:
        raise ValueError("image_grid needs at least one image")
    tiles = []
    for img in images:
        a = np.asarray(img.convert("RGB")) if hasattr(img, "convert") else np.asarray(img)
        if a.dtype != np.uint8:
            a = np.round(255.0 * np.clip(a.astype(np.float32), 0.0, 1.0)).astype(np.uint8)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if scale > 1:
            a = a.repeat(scale, axis=0).repeat(scale, axis=1)
        tiles.append(a)
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    ncols = ncols or int(np.ceil(np.sqrt(len(tiles))))
    nrows = int(np.ceil(len(tiles) / ncols))
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + t.shape[0], x:x + t.shape[1]] = t
    return grid


# ----- command line --------------------------------------------------------------------------------------
def _parse_grid(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h <= 0 or w <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"--grid {text!r} must look like 16x16") from None
    return h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run dir, checkpoints/ root, step_N dir, or HF dir")
    p.add_argument("--data", help="dataset directory (default: the run config's data.dataset_dir)")
    p.add_argument("--task", required=True, choices=["t2i", "mmu"])
    p.add_argument("--prompt", required=True, help="t2i: the caption; mmu: the question")
    p.add_argument("--image", help="mmu: the image file to ask about")
    p.add_argument("--out", help="t2i: PNG to write the grid of samples to")
    p.add_argument("--scale", type=int, default=4, help="t2i: enlarge each sample this many times in the PNG")
    p.add_argument("--num-samples", type=int, default=8, help="t2i: images to sample for the prompt")
    p.add_argument("--grid", help="t2i: code grid HxW (default: the image tokenizer's)")
    add_sampling_args(p)
    return p


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The SamplingConfig options and --device, shared by the generate and evaluate CLIs."""
    p.add_argument("--cfg-scale", type=float, default=SamplingConfig.cfg_scale)
    p.add_argument("--temperature", type=float, default=SamplingConfig.temperature)
    p.add_argument("--top-k", type=int, default=SamplingConfig.top_k)
    p.add_argument("--max-new-tokens", type=int, default=SamplingConfig.max_new_tokens)
    p.add_argument("--seed", type=int, default=SamplingConfig.seed)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k,
                          max_new_tokens=args.max_new_tokens, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = sampling_config(args)
        if args.task == "t2i" and not args.out:
            raise ValueError("--out is required with --task t2i")
        if args.task == "mmu" and not args.image:
            raise ValueError("--image is required with --task mmu")
        if args.scale < 1:
            raise ValueError(f"--scale must be >= 1, got {args.scale}")
        if args.num_samples < 1:
            raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
        grid = _parse_grid(args.grid)
        ckpt = open_checkpoint(args.checkpoint, dtype=torch.float32)
        sampler = Sampler.from_dataset(ckpt.model.to(args.device), dataset_dir_of(ckpt, args.data))
        t0 = time.perf_counter()
        if args.task == "t2i":
            codes = sampler.text_to_image([args.prompt] * args.num_samples, cfg, grid)
            from PIL import Image

            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image_grid([sampler.to_pil(c) for c in codes], scale=args.scale)).save(out)
            print(f"wrote {len(codes)} samples of {codes.shape[1]}x{codes.shape[2]} codes to {out} "
                  f"({time.perf_counter() - t0:.2f} s, {ckpt.kind} checkpoint)")
        else:
            answer = sampler.answer([sampler.encode_image_file(args.image)], [args.prompt], cfg.max_new_tokens)[0]
            print(answer)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
