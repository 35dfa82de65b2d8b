"""Image tokenizers: pixels <-> (h, w) grids of codebook indices, both ways.

- `PatchVQ`: the demo's tokenizer. A grayscale image is cut into non-overlapping p x p patches and
  each patch is replaced by its nearest codebook vector; the codebook is learned with scikit-learn
  KMeans on the training images' patches (`PatchVQ.fit`), or fixed to n evenly spaced grey levels
  with 1 x 1 patches (`PatchVQ.grey_levels`: lossless for images quantised to those levels, as the
  8x8 digits are). Decoding pastes the codebook vectors back, so the round trip image -> codes ->
  image is a reconstruction a person can look at. Saved as `codebook.safetensors` + `config.json`.
- `Emu3VQ`: transformers' `Emu3VQVAE` (Emu3's vision tokenizer) loaded from a local directory,
  with pixels prepared exactly as `Emu3ImageProcessor` prepares them (resize to a multiple of the
  VQ's downsampling factor, rescale 1/255, normalise with the processor's mean/std).

`load_image_tokenizer(manifest)` rebuilds either from a manifest's `image_tokenizer`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data.manifest import Manifest

PATCH_VQ_TYPE = "patch-vq"
EMU3_VQ_TYPE = "emu3-vqvae"


@dataclass
class PatchVQConfig:
    """Shape of a patch vector quantiser over square grayscale images."""

    image_size: int = 32
    """Side of the (square) images it encodes, in pixels."""
    patch_size: int = 2
    """Side of one patch; the code grid is (image_size / patch_size) squared."""
    codebook_size: int = 256
    """Number of codebook vectors (KMeans clusters) = vocab.visual_size."""
    kmeans_max_iter: int = 100
    """Lloyd iterations cap for the codebook fit."""
    seed: int = 0
    """KMeans initialisation seed (the fit is deterministic given it)."""

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "codebook_size", "kmeans_max_iter"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"image_tokenizer.{name} must be a positive integer, got {v!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_tokenizer.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class PatchVQ:
    """Nearest-codebook-vector quantiser over p x p patches of [0, 1] grayscale images."""

    def __init__(self, cfg: PatchVQConfig, codebook_KD: np.ndarray):
        codebook_KD = np.asarray(codebook_KD, dtype=np.float32)
        if codebook_KD.shape != (cfg.codebook_size, cfg.patch_size ** 2):
            raise ValueError(
                f"codebook shape {codebook_KD.shape} does not match codebook_size x patch_size^2 "
                f"({cfg.codebook_size}, {cfg.patch_size ** 2})"
            )
        self.cfg = cfg
        self.codebook_KD = codebook_KD

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    # ----- patches ------------------------------------------------------------------------------
    def _patches(self, images_NHW: np.ndarray) -> np.ndarray:
        """(N, H, W) -> (N * g * g, p * p), patches in row-major grid order."""
        images_NHW = np.asarray(images_NHW, dtype=np.float32)
        s, p, g = self.cfg.image_size, self.cfg.patch_size, self.cfg.grid
        if images_NHW.ndim != 3 or images_NHW.shape[1:] != (s, s):
            raise ValueError(f"images must have shape (N, {s}, {s}), got {images_NHW.shape}")
        return images_NHW.reshape(-1, g, p, g, p).transpose(0, 1, 3, 2, 4).reshape(-1, p * p)

    @classmethod
    def fit(cls, images_NHW: np.ndarray, cfg: PatchVQConfig = PatchVQConfig()) -> "PatchVQ":
        """Learn the codebook with KMeans on every patch of `images_NHW` (values in [0, 1])."""
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits

        patches = cls(cfg, np.zeros((cfg.codebook_size, cfg.patch_size ** 2)))._patches(images_NHW)
        # Most patches repeat (blank background above all); clustering the distinct ones weighted by
        # their counts gives the same objective at a fraction of the cost.
        unique, counts = np.unique(patches, axis=0, return_counts=True)
        if len(unique) < cfg.codebook_size:
            raise ValueError(
                f"only {len(unique)} distinct patches for image_tokenizer.codebook_size {cfg.codebook_size}"
            )
        # One OpenMP thread: sklearn's multi-threaded Lloyd step sums per-thread partial centres in
        # scheduling order, which changes the float bits and so the codebook from run to run.
        with threadpool_limits(limits=1, user_api="openmp"):
            km = KMeans(n_clusters=cfg.codebook_size, n_init=1, max_iter=cfg.kmeans_max_iter,
                        random_state=cfg.seed).fit(unique, sample_weight=counts.astype(np.float64))
        # Sort the codebook by brightness so code ids mean something when printed (0 = darkest).
        centers = km.cluster_centers_.astype(np.float32)
        order = np.argsort(centers.sum(1), kind="stable")
        return cls(cfg, centers[order])

    @classmethod
    def grey_levels(cls, image_size: int, levels: int) -> "PatchVQ":
        """Pixel-wise quantiser: code k is the grey level k / (levels - 1), one code per pixel.

        Nothing is learned, so the codes mean the same in every build, and an image whose pixels are
        already on those levels (sklearn's digits: 0..16 / 16 with 17 levels) round-trips exactly.
        """
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"image_tokenizer.codebook_size (grey levels) must be an integer >= 2, got {levels!r}")
        cfg = PatchVQConfig(image_size=image_size, patch_size=1, codebook_size=levels)
        return cls(cfg, (np.arange(levels, dtype=np.float32) / (levels - 1))[:, None])

    # ----- codes --------------------------------------------------------------------------------
    def encode(self, images_NHW: np.ndarray) -> np.ndarray:
        """(N, H, W) images in [0, 1] -> (N, g, g) int64 codes (nearest codebook vector, L2)."""
        patches = self._patches(images_NHW)
        c2 = (self.codebook_KD ** 2).sum(1)
        codes = np.empty(len(patches), dtype=np.int64)
        for lo in range(0, len(patches), 65536):
            x = patches[lo:lo + 65536]
            # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is constant per row, so argmin ignores it.
            codes[lo:lo + len(x)] = np.argmin(c2[None, :] - 2.0 * x @ self.codebook_KD.T, axis=1)
        g = self.cfg.grid
        return codes.reshape(-1, g, g)

    def decode(self, codes_Nhw: np.ndarray) -> np.ndarray:
        """(N, g, g) codes -> (N, H, W) float32 images in [0, 1]."""
        codes_Nhw = np.asarray(codes_Nhw)
        g, p = self.cfg.grid, self.cfg.patch_size
        if codes_Nhw.ndim == 2:
            codes_Nhw = codes_Nhw[None]
        if codes_Nhw.shape[1:] != (g, g):
            raise ValueError(f"codes must have shape (N, {g}, {g}), got {codes_Nhw.shape}")
        if codes_Nhw.min() < 0 or codes_Nhw.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size})")
        patches = self.codebook_KD[codes_Nhw.reshape(-1)]
        return patches.reshape(-1, g, g, p, p).transpose(0, 1, 3, 2, 4).reshape(-1, g * p, g * p)

    def to_pil(self, codes_hw: np.ndarray):
        """One code grid -> a PIL grayscale image, ink dark on white as the digits were scanned."""
        from PIL import Image

        img = self.decode(codes_hw)[0]
        return Image.fromarray(np.round(255.0 * (1.0 - np.clip(img, 0.0, 1.0))).astype(np.uint8), mode="L")

    # ----- files --------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"codebook": self.codebook_KD}, str(directory / "codebook.safetensors"))
        (directory / "config.json").write_text(
            json.dumps({"type": PATCH_VQ_TYPE, **asdict(self.cfg)}, indent=2, sort_keys=True) + "\n"
        )
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PatchVQ":
        from safetensors.numpy import load_file

        directory = Path(directory)
        cfg_path = directory / "config.json"
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{cfg_path}: cannot read the patch-VQ config ({e})") from None
        if raw.pop("type", None) != PATCH_VQ_TYPE:
            raise ValueError(f"{cfg_path}: field type must be {PATCH_VQ_TYPE!r}")
        return cls(PatchVQConfig(**raw), load_file(str(directory / "codebook.safetensors"))["codebook"])

    def manifest_entry(self, dataset_dir: str | os.PathLike, directory: str | os.PathLike) -> dict[str, Any]:
        return {"type": PATCH_VQ_TYPE, "path": Path(os.path.relpath(directory, dataset_dir)).as_posix(),
                "codebook_size": self.codebook_size, "image_size": self.cfg.image_size,
                "patch_size": self.cfg.patch_size}


class Emu3VQ:
    """transformers' `Emu3VQVAE` from a local directory, with Emu3's own pixel preparation."""

    def __init__(self, directory: str | os.PathLike, min_pixels: int | None = None, max_pixels: int | None = None):
        import torch
        from transformers import Emu3ImageProcessor, Emu3VQVAE

        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise ValueError(f"VQ model directory {self.directory} has no config.json")
        self.model = Emu3VQVAE.from_pretrained(str(self.directory), local_files_only=True).eval()
        self.factor = int(self.model.vision_spatial_factor)
        overrides: dict[str, Any] = {"spatial_factor": self.factor}
        if min_pixels is not None:
            overrides["min_pixels"] = int(min_pixels)
        if max_pixels is not None:
            overrides["max_pixels"] = int(max_pixels)
        if (self.directory / "preprocessor_config.json").is_file():
            # A released tokenizer ships its processor settings (mean/std, pixel budget): use them.
            self.processor = Emu3ImageProcessor.from_pretrained(str(self.directory), local_files_only=True,
                                                                **overrides)
        else:
            self.processor = Emu3ImageProcessor(**overrides)
        self.torch = torch

    @property
    def codebook_size(self) -> int:
        return int(self.model.config.codebook_size)

    def encode_pil(self, images: Sequence[Any]) -> list[np.ndarray]:
        """PIL images (any size/mode) -> list of (h, w) int64 code grids, one per image."""
        torch = self.torch
        out: list[np.ndarray] = []
        for img in images:
            batch = self.processor.preprocess([img.convert("RGB")], return_tensors="pt")
            with torch.no_grad():
                tokens = self.model.encode(batch["pixel_values"], image_sizes=batch["image_sizes"]).image_tokens
            out.append(tokens[0].cpu().numpy().astype(np.int64))
        return out

    def to_pil(self, codes_hw: np.ndarray):
        """One code grid -> a PIL RGB image (processor.postprocess undoes the normalisation)."""
        torch = self.torch
        with torch.no_grad():
            pixels = self.model.decode(torch.as_tensor(np.asarray(codes_hw), dtype=torch.long)[None])
        out = self.processor.postprocess(pixels.float(), return_tensors="PIL.Image.Image")
        return out["pixel_values"][0]

    def manifest_entry(self, dataset_dir: str | os.PathLike) -> dict[str, Any]:
        return {"type": EMU3_VQ_TYPE, "path": Path(os.path.relpath(self.directory, dataset_dir)).as_posix(),
                "codebook_size": self.codebook_size, "spatial_factor": self.factor,
                "min_pixels": int(self.processor.min_pixels), "max_pixels": int(self.processor.max_pixels)}


def load_image_tokenizer(manifest: Manifest) -> PatchVQ | Emu3VQ | None:
    """The image tokenizer a dataset names in its manifest, or None when it names none."""
    info = manifest.doc.get("image_tokenizer")
    if not info or info.get("path") is None:
        return None
    path = Path(manifest.root) / info["path"]
    if info.get("type") == PATCH_VQ_TYPE:
        return PatchVQ.load(path)
    if info.get("type") == EMU3_VQ_TYPE:
        return Emu3VQ(path, info.get("min_pixels"), info.get("max_pixels"))
    raise ValueError(f"{manifest.path}: field image_tokenizer.type {info.get('type')!r} "
                     f"is not {PATCH_VQ_TYPE!r} or {EMU3_VQ_TYPE!r}")
