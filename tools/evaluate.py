"""Evaluate a model on a dataset's validation split: understanding accuracy, generation accuracy, text
perplexity, agreement of causal router decisions with top-k routing, and MoE expert use.

    python -m tools.evaluate --checkpoint runs/smoke --data demo_data --out eval.json
    python -m tools.evaluate --data demo_data --images real --out real.json    # the metric's ceiling, no model
    python -m tools.evaluate --data demo_data --images noise --out noise.json  # its floor (chance, ~10%)

Metrics (keys of the JSON / TensorBoard scalars):
- `understanding/accuracy`: greedy answers to the validation understanding samples (image + question)
  that name the right digit, as a word or a numeral, and no other digit (demo data; labels in the json).
- `generation/accuracy` (+ `generation/accuracy_digit_<d>`): images sampled for captions naming each digit
  (classifier-free guidance, constrained decoding), decoded to pixels by the dataset's image tokenizer and
  read by an independent classifier: a scikit-learn SVM fit on the TRAINING split of the original digit
  images (never on model output, never on validation images). Fed the real validation images through the
  tokenizer round trip it scores ~100%; fed noise, 10% in expectation (the prompts are balanced over digits).
- `text/perplexity` (causal routing, as sampled) and `text/perplexity_topk` (training routing) on the
  validation plain-text samples.
- `router/agreement/<task>/layer_<i>` and `router/agreement/layer_<i>`: over routable tokens, how often
  "router logit > 0" (the causal decision) equals top-k membership, in the top-k forward; plus
  `router/causal_keep/<task>/layer_<i>`, the fraction the causal rule keeps (compare with the capacity).
- `experts/max_load/<task>/layer_<i>` and `experts/overlap/<a>_<b>/layer_<i>` for MoE layers: how evenly a
  task spreads its slots over the experts, and how much two tasks share experts (`Evaluator.expert_use`).

Training calls `Evaluator(dataset_dir, EvalConfig(...)).run(model)` every N steps (the classifier and the
validation samples are loaded once) and logs `result.metrics` and `result.grid()` to TensorBoard.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from data.demo import CAPTIONS, NAMES, load_digit_images, split_indices
from data.files import atomic_write
from data.imagetok import PatchVQ
from data.layout import make_labels
from data.manifest import load_manifest
from data.reader import iter_samples
from model.loss import IGNORE_INDEX
from model.mod import ROUTING_STATS
from model.moe import routed_load
from tools.checkpoints import open_checkpoint
from tools.generate import Sampler, SamplingConfig, add_sampling_args, dataset_dir_of, image_grid, sampling_config

IMAGE_SOURCES = ("model", "real", "noise")
_DIGIT_WORDS = {name: d for d, name in enumerate(NAMES)}
_DIGIT_RE = re.compile(r"\b(" + "|".join(NAMES) + r"|[0-9])\b", re.IGNORECASE)


@dataclass
class EvalConfig:
    """What the evaluator measures and on how much data."""

    max_samples: int = 50
    """Validation samples per measurement: understanding questions, lm texts, and sequences per task for
    router agreement (the first ones of each split, in shard order)."""
    images_per_digit: int = 10
    """Images generated per digit for generation accuracy (10 digits): 100 images put the accuracy within about
    +-0.05 (one standard error at 0.8). The training run's evaluation uses this default too."""
    batch_size: int = 16
    """Sequences per forward / decoding batch."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Image sampling (guidance scale, temperature, top-k, seed) and the answer length cap."""

    def __post_init__(self) -> None:
        if isinstance(self.sampling, dict):
            self.sampling = SamplingConfig(**self.sampling)
        for name in ("max_samples", "images_per_digit", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"eval.{name} must be a positive integer, got {v!r}")


@dataclass
class EvalResult:
    metrics: dict[str, float]
    """Scalar metrics (see the module docstring)."""
    images: np.ndarray | None
    """[10 * images_per_digit, H, W] generated images in [0, 1] (ink high), digit-major; None without demo data."""
    images_per_digit: int = 1

    def grid(self) -> np.ndarray:
        """uint8 [H, W, 3] grid, one row per digit, ink dark on white: for `add_image(..., dataformats="HWC")`."""
        if self.images is None:
            raise ValueError("no generated images to show (generation accuracy needs the demo data)")
        # Enlarged to >= 32 px a side: the grey8 demo's 8x8 digits are too small to look at as they are.
        return image_grid(list(1.0 - self.images), ncols=self.images_per_digit,
                          scale=max(1, 32 // self.images.shape[1]))


def names_digits(text: str) -> set[int]:
    """Digits a text names, as words ("seven") or numerals ("7")."""
    return {int(m) if m.isdigit() else _DIGIT_WORDS[m.lower()] for m in _DIGIT_RE.findall(text)}


class DigitClassifier:
    """The independent judge of generated digits: an RBF SVM on raw pixels of the original training images."""

    def __init__(self, images_NHW: np.ndarray, labels: np.ndarray) -> None:
        from sklearn.svm import SVC

        self.shape = images_NHW.shape[1:]
        self.svm = SVC(C=10.0, gamma="scale").fit(images_NHW.reshape(len(images_NHW), -1), labels)

    def predict(self, images_NHW: np.ndarray) -> np.ndarray:
        images_NHW = np.asarray(images_NHW, dtype=np.float32)
        if images_NHW.shape[1:] != self.shape:
            raise ValueError(f"classifier expects images of shape {self.shape}, got {images_NHW.shape[1:]}")
        return self.svm.predict(images_NHW.reshape(len(images_NHW), -1))


class Evaluator:
    """Loads one dataset's validation samples, tokenizers and (demo data) the digit classifier once."""

    def __init__(self, dataset_dir: str | Path, cfg: EvalConfig = EvalConfig(), split: str = "validation") -> None:
        from data.imagetok import load_image_tokenizer
        from data.vocab import UnifiedVocab

        self.dataset_dir, self.cfg, self.split = Path(dataset_dir), cfg, split
        manifest = load_manifest(self.dataset_dir)
        if split not in manifest.shards:
            raise ValueError(f"{self.dataset_dir / 'manifest.json'}: field splits has no {split!r} split")
        self.vocab = UnifiedVocab.from_manifest(manifest)
        self.image_tokenizer = load_image_tokenizer(manifest)
        self.samples = {task: self._read(manifest.shards[split].get(task, [])) for task in ("t2i", "mmu", "lm")}
        demo = manifest.doc.get("demo")
        self.demo = isinstance(demo, dict) and isinstance(self.image_tokenizer, PatchVQ)
        if self.demo:
            images, labels = load_digit_images(int(demo.get("image_size", 32)))
            train_idx, val_idx = split_indices(labels, float(demo["val_fraction"]), int(demo["seed"]))
            self.classifier = DigitClassifier(images[train_idx], labels[train_idx])
            self.val_images, self.val_labels = images[val_idx], labels[val_idx]

    def _read(self, shards: Sequence[str]) -> list[tuple[str, np.ndarray, dict[str, Any], str]]:
        out = []
        for shard in shards:
            for key, ids, meta in iter_samples(shard):
                out.append((key, np.asarray(ids, dtype=np.int64), meta, shard))
                if len(out) >= self.cfg.max_samples:
                    return out
        return out

    # ----- everything ----------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, model, images: str = "model") -> EvalResult:
        """All metrics for `model` (restored to its train/eval mode afterwards). `images` picks what the
        generation classifier reads: model samples, or the real / noise references."""
        was_training = model.training
        model.eval()
        try:
            metrics: dict[str, float] = {}
            sampler = Sampler(model, self.vocab, self.image_tokenizer)
            generated = None
            if self.demo:
                metrics.update(self.understanding(sampler))
                gen_metrics, generated = self.generation(images, sampler)
                metrics.update(gen_metrics)
            metrics.update(self.perplexity(model))
            counts = self.routing_counts(model)  # one top-k pass for the MoD and the MoE metrics
            metrics.update(self.router_agreement(model, counts))
            metrics.update(self.expert_use(model, counts))
        finally:
            model.train(was_training)
        return EvalResult(metrics, generated, self.cfg.images_per_digit)

    @torch.no_grad()
    def task_accuracy(self, model, task: str) -> dict[str, float]:
        """The accuracy that measures `task` (demo data): understanding for mmu, generation for t2i; {} for
        other tasks or data without the demo's labels. The analysis probes score their edited models by it."""
        if not self.demo or task not in ("mmu", "t2i"):
            return {}
        was_training = model.training
        model.eval()
        try:
            sampler = Sampler(model, self.vocab, self.image_tokenizer)
            if task == "mmu":
                return self.understanding(sampler)
            return {"generation/accuracy": self.generation("model", sampler)[0]["generation/accuracy"]}
        finally:
            model.train(was_training)

    # ----- understanding -------------------------------------------------------------------------------
    def understanding(self, sampler: Sampler) -> dict[str, float]:
        samples = self.samples["mmu"]
        if not samples:
            return {}
        correct = 0
        for lo in range(0, len(samples), self.cfg.batch_size):
            batch = samples[lo:lo + self.cfg.batch_size]
            prompts = []
            for key, ids, meta, shard in batch:
                start, label = meta.get("answer_start"), meta.get("label")
                if not isinstance(start, int) or not 0 < start < len(ids):
                    raise ValueError(f"{shard}: sample {key!r}: field json.answer_start {start!r} is not an index of ids")
                if not isinstance(label, int) or not 0 <= label <= 9:
                    raise ValueError(f"{shard}: sample {key!r}: field json.label {label!r} is not a digit")
                prompts.append(ids[:start].tolist())
            answers = sampler.continue_mmu(prompts, self.cfg.sampling.max_new_tokens)
            for (_, _, meta, _), ans in zip(batch, answers):
                correct += names_digits(ans) == {meta["label"]}
        return {"understanding/accuracy": correct / len(samples)}

    # ----- generation ----------------------------------------------------------------------------------
    def prompts(self) -> tuple[list[int], list[str]]:
        """(digit, caption) for every image to generate: each digit `images_per_digit` times, captions
        cycling through the demo's templates."""
        digits, captions = [], []
        for d in range(10):
            for j in range(self.cfg.images_per_digit):
                digits.append(d)
                captions.append(CAPTIONS[j % len(CAPTIONS)].format(d=d, name=NAMES[d]))
        return digits, captions

    def reference_images(self, digits: Sequence[int], kind: str) -> np.ndarray:
        """real: the first validation images of each digit through the tokenizer round trip; noise: uniformly
        random code grids, decoded. [N, H, W] in [0, 1]."""
        tok = self.image_tokenizer
        if kind == "real":
            picked, seen = [], {d: 0 for d in set(digits)}
            for d in digits:
                idx = np.flatnonzero(self.val_labels == d)
                if seen[d] >= len(idx):
                    raise ValueError(f"only {len(idx)} validation images of digit {d}; lower images_per_digit")
                picked.append(idx[seen[d]])
                seen[d] += 1
            return tok.decode(tok.encode(self.val_images[picked]))
        if kind == "noise":
            rng = np.random.default_rng(self.cfg.sampling.seed)
            g = tok.cfg.grid
            return tok.decode(rng.integers(0, tok.codebook_size, size=(len(digits), g, g)))
        raise ValueError(f"image source {kind!r} is not one of {IMAGE_SOURCES}")

    def generation(self, source: str, sampler: Sampler | None = None) -> tuple[dict[str, float], np.ndarray]:
        """Generation accuracy of images from `source` (model needs `sampler`) and the images themselves."""
        if not self.demo:
            raise ValueError(f"{self.dataset_dir}: generation accuracy needs the demo digits dataset")
        digits, captions = self.prompts()
        if source == "model":
            if sampler is None:
                raise ValueError("image source 'model' needs a sampler")
            codes = [sampler.text_to_image(captions[lo:lo + self.cfg.batch_size], self.cfg.sampling)
                     for lo in range(0, len(captions), self.cfg.batch_size)]
            images = self.image_tokenizer.decode(np.concatenate(codes))
        else:
            images = self.reference_images(digits, source)
        pred = self.classifier.predict(images)
        digits_arr = np.asarray(digits)
        metrics = {"generation/accuracy": float((pred == digits_arr).mean())}
        for d in range(10):
            metrics[f"generation/accuracy_digit_{d}"] = float((pred[digits_arr == d] == d).mean())
        return metrics, images

    # ----- perplexity ----------------------------------------------------------------------------------
    def _batches(self, task: str):
        """Right-padded (ids [B,S], samples) batches; right padding never changes earlier positions."""
        samples = self.samples[task]
        for lo in range(0, len(samples), self.cfg.batch_size):
            batch = samples[lo:lo + self.cfg.batch_size]
            S = max(len(ids) for _, ids, _, _ in batch)
            ids = torch.full((len(batch), S), self.vocab.layout.pad_id, dtype=torch.long)
            for b, (_, x, _, _) in enumerate(batch):
                ids[b, :len(x)] = torch.as_tensor(x)
            yield ids, batch

    @torch.no_grad()
    def perplexity(self, model) -> dict[str, float]:
        if not self.samples["lm"]:
            return {}
        if "lm" not in model.config.mod.tasks:
            return {}
        device = next(model.parameters()).device
        task = torch.tensor(model.config.mod.tasks.index("lm"), device=device)
        out = {}
        for routing, name in (("causal", "text/perplexity"), ("topk", "text/perplexity_topk")):
            nll, count = 0.0, 0
            for ids, batch in self._batches("lm"):
                labels = torch.full_like(ids, -100)
                for b, (key, x, meta, _) in enumerate(batch):
                    labels[b, :len(x)] = torch.as_tensor(make_labels(x, "lm", meta, self.vocab.layout, key=key))
                ids, labels = ids.to(device), labels.to(device)
                # The forward's chunked loss: no [B,S,V] logits (184k columns at Emu3 scale).
                mean = model(ids, task_ids=task.expand(len(batch)), routing=routing, labels=labels).loss
                n = int((labels[:, 1:] != IGNORE_INDEX).sum())
                nll += float(mean) * n
                count += n
            out[name] = float(np.exp(nll / max(count, 1)))
        return out

    # ----- routing: MoD router agreement, MoE expert use ------------------------------------------------
    @torch.no_grad()
    def routing_counts(self, model) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """One top-k (training routing) forward over every task's validation samples -> (MoD routing counts
        [L, T, len(ROUTING_STATS)], MoE expert counts [L, T, E, 2] or None without MoE layers), float64; None
        when the model has neither MoD nor MoE layers."""
        cfg = model.config
        if not cfg.mod.mod_layers() and not cfg.moe.layers:
            return None
        device = next(model.parameters()).device
        routing = torch.zeros(cfg.num_hidden_layers, cfg.num_tasks, len(ROUTING_STATS), dtype=torch.float64)
        experts = None
        for task in ("t2i", "mmu", "lm"):
            if task not in cfg.mod.tasks:
                continue
            t = cfg.mod.tasks.index(task)
            for ids, batch in self._batches(task):
                task_ids = torch.full((len(batch),), t, dtype=torch.long, device=device)
                out = model(ids.to(device), task_ids=task_ids, routing="topk")
                routing += out.routing.double().cpu()
                if out.experts is not None:
                    experts = out.experts.double().cpu() + (0 if experts is None else experts)
        return routing, experts

    def router_agreement(self, model, counts: tuple[torch.Tensor, torch.Tensor | None] | None = None
                         ) -> dict[str, float]:
        """Per MoD layer and routed task, on the validation samples in the top-k forward: the fraction of
        routable tokens whose causal decision (logit > 0) equals top-k membership (`agreement`), and the
        fraction a causal decision keeps (`causal_keep`). The forward counts both (model/mod.py
        ROUTING_STATS); training logs the same on its micro-batches as mod/agreement and mod/causal_keep.
        `counts`: `routing_counts(model)` when the caller has it already."""
        cfg = model.config
        mod_layers = cfg.mod.mod_layers()
        if not mod_layers:
            return {}
        stats = (counts or self.routing_counts(model))[0]
        col = {name: i for i, name in enumerate(ROUTING_STATS)}
        out = {}
        for layer in mod_layers:
            agree = total = 0.0
            for t, task in enumerate(cfg.mod.tasks):
                n = float(stats[layer, t, col["routable"]])
                if n > 0 and cfg.mod.capacity_of(layer, t) < 1.0:
                    a = float(stats[layer, t, col["agree"]])
                    out[f"router/agreement/{task}/layer_{layer}"] = a / n
                    out[f"router/causal_keep/{task}/layer_{layer}"] = float(stats[layer, t, col["router_on"]]) / n
                    agree, total = agree + a, total + n
            if total > 0:
                out[f"router/agreement/layer_{layer}"] = agree / total
        return out

    def expert_use(self, model, counts: tuple[torch.Tensor, torch.Tensor | None] | None = None) -> dict[str, float]:
        """Per MoE layer, on the validation samples in the top-k forward (the slots the router chose among the
        routed experts, before any capacity drop):
          - `experts/max_load/<task>/layer_<i>`: the busiest expert's share of the task's slots x E (1 =
            balanced, E = one expert takes every slot), as training logs moe/max_load;
          - `experts/overlap/<a>_<b>/layer_<i>`: sum over experts of min(share under task a, share under task b),
            how much two tasks use the same experts (1 = identical use, 0 = disjoint experts): what a task-aware
            router can separate and a shared one separates only through the tokens themselves."""
        cfg = model.config
        if not cfg.moe.layers:
            return {}
        experts = (counts or self.routing_counts(model))[1]
        out = {}
        for layer in cfg.moe.layers:
            shares = {}
            for t, task in enumerate(cfg.mod.tasks):
                load = routed_load(experts[layer, t, :, 0], cfg.moe.shared_experts)
                if load is not None:
                    shares[task], out[f"experts/max_load/{task}/layer_{layer}"] = load
            names = list(shares)
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    out[f"experts/overlap/{a}_{b}/layer_{layer}"] = float(torch.minimum(shares[a], shares[b]).sum())
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="run dir, checkpoints/ root, step_N dir, or HF dir (not needed for "
                                        "--images real|noise)")
    p.add_argument("--data", help="dataset directory (default: the run config's data.dataset_dir)")
    p.add_argument("--out", required=True, help="JSON file for the metrics")
    p.add_argument("--grid", help="PNG for the grid of generated images (one row per digit)")
    p.add_argument("--images", choices=IMAGE_SOURCES, default="model",
                   help="what generation accuracy classifies: model samples, or the real/noise references")
    p.add_argument("--max-samples", type=int, default=EvalConfig.max_samples)
    p.add_argument("--images-per-digit", type=int, default=EvalConfig.images_per_digit)
    add_sampling_args(p)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = EvalConfig(max_samples=args.max_samples, images_per_digit=args.images_per_digit,
                         sampling=sampling_config(args))
        if args.checkpoint:
            ckpt = open_checkpoint(args.checkpoint, dtype=torch.float32)
            evaluator = Evaluator(dataset_dir_of(ckpt, args.data), cfg)
            result = evaluator.run(ckpt.model.to(args.device), images=args.images)
        else:
            if args.images == "model":
                raise ValueError("--checkpoint is required unless --images is real or noise")
            if not args.data:
                raise ValueError("--data is required without --checkpoint")
            evaluator = Evaluator(args.data, cfg)
            metrics, images = evaluator.generation(args.images)
            result = EvalResult(metrics, images, cfg.images_per_digit)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(result.metrics, indent=2, sort_keys=True) + "\n")
    if args.grid and result.images is not None:
        from PIL import Image

        Image.fromarray(result.grid()).save(args.grid)
    for k, v in sorted(result.metrics.items()):
        print(f"{k}: {v:.4f}")
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
