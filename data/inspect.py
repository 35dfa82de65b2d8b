"""Print decoded samples of a dataset: text, structure, loss mask sizes, and images.

    python -m data.inspect DATASET_DIR [--n 3] [--split train] [--task t2i] [--png-dir DIR]
    python -m data.inspect DATASET_DIR/t2i-train-000000.tar --n 2
    python -m data.inspect /tmp/copied-000000.tar          # a shard on its own, no manifest

Images are decoded through the dataset's own image tokenizer (manifest `image_tokenizer`) and shown
as ASCII art, or written as PNG files with --png-dir. A shard path reads the manifest next to it;
a shard without one (copied out, or sent in a bug report) is shown undecoded: each sample's key,
json fields, length and first token ids, since only the manifest knows the vocabulary they index.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data.imagetok import load_image_tokenizer
from data.layout import IGNORE_INDEX, TASKS, make_labels
from data.manifest import MANIFEST_NAME, Manifest, load_manifest
from data.reader import iter_samples
from data.shards import SPLITS
from data.vocab import UnifiedVocab

_RAMP = " .:-=+*#%@"  # light to dark


def ascii_art(image: Any, width: int = 32) -> str:
    """A PIL image as text, darker pixels as denser characters (rows halved: characters are tall)."""
    gray = image.convert("L")
    height = max(1, round(gray.height * width / gray.width / 2))
    px = np.asarray(gray.resize((width, height)), dtype=np.float32) / 255.0
    idx = np.clip(((1.0 - px) * len(_RAMP)).astype(int), 0, len(_RAMP) - 1)
    return "\n".join("".join(_RAMP[i] for i in row) for row in idx)


def _first_shards(manifest: Manifest, split: str | None, task: str | None) -> list[Path]:
    """The first shard of every (split, task) the manifest lists, optionally filtered."""
    out = []
    for s in SPLITS if split is None else (split,):
        for t in TASKS if task is None else (task,):
            paths = manifest.shards.get(s, {}).get(t, [])
            if paths:
                out.append(Path(paths[0]))
    return out


def inspect(path: str, n: int = 3, split: str | None = None, task: str | None = None,
            png_dir: str | None = None, out=None) -> int:
    """Print up to `n` samples of each (split, task), or of the one shard given; returns how many."""
    out = out if out is not None else sys.stdout  # looked up per call: a default would pin the import-time stream
    p = Path(path)
    dataset_dir = p if p.is_dir() else p.parent
    if not p.is_dir() and not (dataset_dir / MANIFEST_NAME).exists():
        return _inspect_raw(p, n, out)
    manifest = load_manifest(dataset_dir)
    vocab = UnifiedVocab.from_manifest(manifest)
    imagetok = load_image_tokenizer(manifest)
    print(f"dataset {dataset_dir}: vocab {manifest.doc['vocab']}", file=out)
    if p.is_dir():
        shards = _first_shards(manifest, split, task)
    else:
        shards = [p]
    if png_dir:
        Path(png_dir).mkdir(parents=True, exist_ok=True)
    printed = 0
    for shard in shards:
        print(f"\n=== {shard.name}", file=out)
        for i, (key, ids, meta) in enumerate(iter_samples(shard)):
            if i >= n:
                break
            labels = make_labels(ids, meta["task"], meta, vocab.layout, key=key)
            print(f"--- {key}  task={meta['task']}  tokens={len(ids)}  "
                  f"supervised={int((labels != IGNORE_INDEX).sum())}  source={meta.get('source')}", file=out)
            print(vocab.describe(ids), file=out)
            if meta.get("image_hw") is not None:
                codes = vocab.ids_to_codes(ids)
                if imagetok is None:
                    print(f"(image {codes.shape[0]}x{codes.shape[1]} codes; the dataset names no image tokenizer)",
                          file=out)
                else:
                    img = imagetok.to_pil(codes)
                    if png_dir:
                        target = Path(png_dir) / f"{key}.png"
                        img.save(target)
                        print(f"(image written to {target})", file=out)
                    else:
                        print(ascii_art(img), file=out)
            printed += 1
    return printed


def _inspect_raw(shard: Path, n: int, out, head: int = 24) -> int:
    """Up to `n` samples of a shard that has no manifest next to it, undecoded."""
    if not shard.is_file():
        raise ValueError(f"{shard}: no such shard file or dataset directory")
    print(f"shard {shard}: no {MANIFEST_NAME} next to it, so token ids are shown undecoded", file=out)
    printed = 0
    for i, (key, ids, meta) in enumerate(iter_samples(shard)):
        if i >= n:
            break
        more = " ..." if len(ids) > head else ""
        print(f"--- {key}  task={meta.get('task')}  tokens={len(ids)}  source={meta.get('source')}", file=out)
        print(f"json: {meta}", file=out)
        print(f"ids: {ids[:head].tolist()}{more}", file=out)
        printed += 1
    return printed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.inspect", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="dataset directory (with manifest.json) or one of its shards")
    parser.add_argument("--n", type=int, default=3, help="samples per shard shown")
    parser.add_argument("--split", choices=SPLITS, default=None)
    parser.add_argument("--task", choices=TASKS, default=None)
    parser.add_argument("--png-dir", default=None, help="write images as PNG files here instead of ASCII art")
    args = parser.parse_args(argv)
    try:
        inspect(args.path, args.n, args.split, args.task, args.png_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
