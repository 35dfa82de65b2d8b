"""Dataset preparation CLI: text tokenizer, demo dataset, image+text shards, plain-text shards.

    python -m data.prepare tokenizer --input corpus.txt --vocab-size 512 --out DIR
    python -m data.prepare demo --out DIR
    python -m data.prepare images --manifest items.jsonl --vq-model VQ_DIR --tokenizer TOK --out DIR
    python -m data.prepare text --input corpus.txt --tokenizer TOK --out DIR --visual-size 32768
    python -m data.prepare merge --out DIR PART_DIR [PART_DIR ...]

`images` reads one JSON object per line: {"image": path (relative to the jsonl file), "caption": ...}
for text-to-image, or {"image": ..., "question": ..., "answer": ...} for understanding; optional
"split" ("train" | "validation", default train) and "source". Images go through transformers'
`Emu3VQVAE` (local directory) with Emu3's own pixel preparation. `--tokenizer` is a sentencepiece
`.model` file or an HF tokenizer directory; it is copied into the dataset so the dataset is
self-contained. Every dataset gets a manifest.json in the shard contract (see data/shards.py).
Captions are always written whole: classifier-free-guidance caption dropout is the training loader's
(`data.caption_dropout`), drawn afresh every epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from data.files import atomic_write
from data.manifest import MANIFEST_NAME, load_manifest
from data.shards import DatasetWriter, ShardConfig
from data.vocab import SentencePieceTrainConfig, UnifiedVocab, train_sentencepiece


def _command_line(sub: str, args: argparse.Namespace) -> str:
    """The manifest's `created_by`: the sub-command and its options, minus --out (where it was written
    says nothing about what it holds, and leaving it out keeps rebuilds elsewhere identical)."""
    parts = ["python", "-m", "data.prepare", sub]
    for name, value in sorted(vars(args).items()):
        if name in ("out", "command", "func") or value is None or value is False:
            continue
        parts.append("--" + name.replace("_", "-"))
        if value is not True:
            parts.append(str(value))
    return shlex.join(parts)


def _shard_config(args: argparse.Namespace) -> ShardConfig:
    return ShardConfig(max_count=args.shard_max_count, max_size_mb=args.shard_size_mb)


def _copy_tokenizer(src: str, out_dir: Path) -> Path:
    """Copy the text tokenizer into the dataset: `tokenizer.model` or an HF `tokenizer/` directory."""
    src_path = Path(src)
    if src_path.is_dir():
        dst = out_dir / "tokenizer"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src_path, dst)
        return dst
    if src_path.is_file():
        dst = out_dir / "tokenizer.model"
        shutil.copyfile(src_path, dst)
        return dst
    raise ValueError(f"--tokenizer {src}: no such file or directory")


# ----- tokenizer ------------------------------------------------------------------------------------
def cmd_tokenizer(args: argparse.Namespace) -> None:
    lines = Path(args.input).read_text(encoding="utf-8").splitlines()
    out = train_sentencepiece(lines, Path(args.out) / "tokenizer.model",
                              SentencePieceTrainConfig(vocab_size=args.vocab_size, model_type=args.model_type))
    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_file=str(out)).get_piece_size()
    print(f"wrote {out} ({n} pieces)")


# ----- demo -----------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> None:
    from data.demo import DemoConfig, build_demo

    cfg = DemoConfig(seed=args.seed, image_format=args.image_format, codebook_size=args.codebook_size,
                     text_vocab_size=args.text_vocab_size, shard_max_count=args.shard_max_count,
                     shard_max_size_mb=args.shard_size_mb)
    manifest = build_demo(args.out, cfg, created_by=_command_line("demo", args))
    _report(args.out, manifest)


# ----- images ---------------------------------------------------------------------------------------
def _read_items(path: Path) -> list[tuple[int, dict[str, Any]]]:
    items = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object")
            items.append((n, item))
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def _item_task(path: Path, n: int, item: dict[str, Any]) -> str:
    def text(field: str) -> bool:
        v = item.get(field)
        if v is not None and (not isinstance(v, str) or not v.strip()):
            raise ValueError(f"{path}:{n}: field {field!r} must be a non-empty string")
        return v is not None

    if not isinstance(item.get("image"), str):
        raise ValueError(f"{path}:{n}: field 'image' (a path) is missing")
    has_caption, has_q, has_a = text("caption"), text("question"), text("answer")
    if has_caption and not (has_q or has_a):
        return "t2i"
    if has_q and has_a and not has_caption:
        return "mmu"
    raise ValueError(f"{path}:{n}: give either field 'caption' (t2i) or fields 'question' and 'answer' (mmu)")


def cmd_images(args: argparse.Namespace) -> None:
    from PIL import Image

    from data.imagetok import Emu3VQ

    items_path = Path(args.manifest)
    items = _read_items(items_path)
    # Check every line's fields before the (slow) VQ encoding starts, so a typo fails in a second.
    tasks = [_item_task(items_path, n, item) for n, item in items]
    for n, item in items:
        if item.get("split", "train") not in ("train", "validation"):
            raise ValueError(f"{items_path}:{n}: field 'split' must be train or validation, got {item['split']!r}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vq = Emu3VQ(args.vq_model, min_pixels=args.min_pixels, max_pixels=args.max_pixels)
    vocab = UnifiedVocab.from_path(_copy_tokenizer(args.tokenizer, out), visual_size=vq.codebook_size)
    if vocab.layout.visual_size != vq.codebook_size:
        raise ValueError(f"tokenizer has {vocab.layout.visual_size} visual tokens, the VQ model {vq.codebook_size}")
    writer = DatasetWriter(out, _shard_config(args), vocab)
    for (n, item), task in zip(items, tasks):
        split = item.get("split", "train")
        image_path = (items_path.parent / item["image"]).resolve()
        try:
            with Image.open(image_path) as img:
                img.load()
                codes = vq.encode_pil([img])[0]
        except (OSError, ValueError) as e:
            raise ValueError(f"{items_path}:{n}: field 'image' {item['image']!r} cannot be read ({e})") from None
        meta: dict[str, Any] = {"image_hw": list(codes.shape), "source": str(item.get("source", item["image"]))}
        key = f"{task}-{split}-{n:06d}"
        try:
            if task == "t2i":
                ids = vocab.t2i(item["caption"], codes)
            else:
                ids, meta["answer_start"] = vocab.mmu(item["question"], item["answer"], codes)
        except ValueError as e:
            raise ValueError(f"{items_path}:{n}: {e}") from None
        writer.write(split, task, key, ids, meta)
    manifest = writer.finish(vq.manifest_entry(out), _command_line("images", args))
    _report(out, manifest)


# ----- text -----------------------------------------------------------------------------------------
def cmd_text(args: argparse.Namespace) -> None:
    src = Path(args.input)
    lines = [(n, ln.strip()) for n, ln in enumerate(src.read_text(encoding="utf-8").splitlines(), 1) if ln.strip()]
    if not lines:
        raise ValueError(f"--input {src}: no non-empty lines")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = _copy_tokenizer(args.tokenizer, out)
    if tok.is_file() and args.visual_size is None:
        raise ValueError("--visual-size is required with a sentencepiece tokenizer (it fixes vocab.visual_start)")
    vocab = UnifiedVocab.from_path(tok, visual_size=args.visual_size)
    writer = DatasetWriter(out, _shard_config(args), vocab)
    n_val = int(round(args.val_fraction * len(lines)))
    val_lines = set(np.random.default_rng(args.seed).permutation(len(lines))[:n_val].tolist())
    body = args.max_len - 2  # room for BOS and EOS
    for i, (n, text) in enumerate(lines):
        split = "validation" if i in val_lines else "train"
        try:
            ids = vocab.encode_text(text)
        except ValueError as e:
            raise ValueError(f"{src}:{n}: {e}") from None
        # Long lines become several samples of at most --max-len tokens each.
        for c, lo in enumerate(range(0, len(ids), body)):
            chunk = np.asarray(ids[lo:lo + body], dtype=np.int64)
            seq = np.concatenate([[vocab.layout.bos_id], chunk, [vocab.layout.eos_id]])
            writer.write(split, "lm", f"lm-{split}-{n:06d}-{c}", seq, {"source": f"{src.name}:{n}"})
    manifest = writer.finish(None, _command_line("text", args))
    _report(out, manifest)


# ----- merge ----------------------------------------------------------------------------------------
def cmd_merge(args: argparse.Namespace) -> None:
    """Datasets prepared in parts (e.g. by the Slurm array job slurm/prepare_data_array.sh) -> one dataset.

    The parts must agree on the vocabulary layout and the text tokenizer (same sha256): ids of different
    tokenizers would mean different things. Shards are hard-linked (copied across file systems) as
    `part<i>-<name>`; the tokenizer, and the image tokenizer when it lives inside the first part, are
    copied; sample counts add up and per-shard counts (`shard_samples`) follow their shards. The manifest is
    written last, so a crash leaves no usable half dataset.
    """
    parts = [Path(p) for p in args.parts]
    out = Path(args.out)
    if out.resolve() in [p.resolve() for p in parts]:
        raise ValueError(f"--out {out} is one of the parts")
    manifests = [load_manifest(p) for p in parts]
    ref, ref_dir = manifests[0], parts[0]
    for part, m in zip(parts[1:], manifests[1:]):
        if m.vocab != ref.vocab:
            raise ValueError(f"{part}/{MANIFEST_NAME}: field vocab {m.doc['vocab']} differs from {ref_dir}'s "
                             f"{ref.doc['vocab']}")
        if m.tokenizer_sha256 != ref.tokenizer_sha256:
            raise ValueError(f"{part}/{MANIFEST_NAME}: field tokenizer.sha256 differs from {ref_dir}'s: the parts were "
                             f"tokenized with different text tokenizers")
    out.mkdir(parents=True, exist_ok=True)
    tok_src = ref_dir / ref.doc["tokenizer"]["path"]
    _copy_tokenizer(str(tok_src), out)
    image_tok = ref.doc.get("image_tokenizer")
    if image_tok and image_tok.get("path"):
        src = (ref_dir / image_tok["path"]).resolve()
        if src.is_relative_to(ref_dir.resolve()):
            dst = out / src.relative_to(ref_dir.resolve())
            if dst.exists():
                shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
        else:  # a model directory outside the part (e.g. the Emu3VQVAE): point at it from the new place
            image_tok = {**image_tok, "path": os.path.relpath(src, out.resolve())}
    splits: dict[str, Any] = {}
    for i, m in enumerate(manifests):
        for split, by_task in m.shards.items():
            dst_split = splits.setdefault(split, {"shards": {}, "samples": {}})
            for task, paths in by_task.items():
                for path in paths:
                    new = f"part{i:04d}-{os.path.relpath(path, m.root)}"
                    target = out / new
                    if target.exists():
                        target.unlink()
                    try:
                        os.link(path, target)
                    except OSError:
                        shutil.copyfile(path, target)
                    dst_split["shards"].setdefault(task, []).append(new)
            for task, n in m.samples[split].items():
                dst_split["samples"][task] = dst_split["samples"].get(task, 0) + n
    # The longest sample of the merge, and the count of every shard, are known only where every part
    # holding the task recorded its own (parts written before shard_samples existed have none).
    for split, dst_split in splits.items():
        longest: dict[str, int] = {}
        per_shard: dict[str, list[int]] = {}
        for task in dst_split["shards"]:
            holding = [m for m in manifests if task in m.shards.get(split, {})]
            parts_max = [m.max_len[split].get(task) for m in holding]
            if parts_max and None not in parts_max:
                longest[task] = max(parts_max)
            parts_counts = [m.shard_samples[split].get(task) for m in holding]
            if parts_counts and None not in parts_counts:
                per_shard[task] = [n for counts in parts_counts for n in counts]
        dst_split["shard_samples"] = per_shard
        dst_split["max_len"] = longest
    manifest = {**ref.doc, "image_tokenizer": image_tok, "splits": splits,
                "created_by": _command_line("merge", args)}
    atomic_write(out / MANIFEST_NAME, json.dumps(manifest, indent=2))
    _report(out, manifest)


def _report(out: str | Path, manifest: dict[str, Any]) -> None:
    for split, info in manifest["splits"].items():
        counts = ", ".join(f"{t}={n} in {len(info['shards'][t])} shards" for t, n in info["samples"].items())
        print(f"{split}: {counts or 'empty'}")
    print(f"vocab: {manifest['vocab']}")
    print(f"wrote {Path(out) / 'manifest.json'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def shard_args(p: argparse.ArgumentParser, max_count: int) -> None:
        p.add_argument("--shard-size-mb", type=float, default=64.0, help="close a shard past this many MB")
        p.add_argument("--shard-max-count", type=int, default=max_count, help="samples per shard at most")

    p = sub.add_parser("tokenizer", help="train a sentencepiece text tokenizer")
    p.add_argument("--input", required=True, help="text corpus, one sentence per line")
    p.add_argument("--vocab-size", type=int, required=True)
    p.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    p.add_argument("--out", required=True, help="directory; the model is written as DIR/tokenizer.model")
    p.set_defaults(func=cmd_tokenizer)

    p = sub.add_parser("demo", help="build the embedded handwritten-digits dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-format", default="grey8", choices=("grey8", "patch16"),
                   help="grey8: native 8x8 grid, 17 grey levels as codes (~90 tokens per t2i sample); "
                        "patch16: 32x32 through a KMeans 2x2-patch codebook, 16x16 codes (~290 tokens)")
    p.add_argument("--codebook-size", type=int, default=None, help="patch16: KMeans codebook size (default 256)")
    p.add_argument("--text-vocab-size", type=int, default=512)
    shard_args(p, 500)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("images", help="images + captions / questions -> shards via Emu3VQVAE")
    p.add_argument("--manifest", required=True, help="JSON lines: image, caption | question + answer, split")
    p.add_argument("--vq-model", required=True, help="local directory of an Emu3VQVAE (save_pretrained)")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file or HF tokenizer directory")
    p.add_argument("--out", required=True)
    p.add_argument("--min-pixels", type=int, default=None, help="override the image processor's pixel floor")
    p.add_argument("--max-pixels", type=int, default=None, help="override the image processor's pixel cap")
    shard_args(p, 1000)
    p.set_defaults(func=cmd_images)

    p = sub.add_parser("text", help="plain text lines -> lm shards")
    p.add_argument("--input", required=True, help="text file, one sample per non-empty line")
    p.add_argument("--tokenizer", required=True, help="sentencepiece .model file or HF tokenizer directory")
    p.add_argument("--out", required=True)
    p.add_argument("--visual-size", type=int, default=None,
                   help="codebook size of the image tokenizer the model uses (required for sentencepiece)")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per sample incl. BOS/EOS; longer lines split")
    p.add_argument("--val-fraction", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    shard_args(p, 1000)
    p.set_defaults(func=cmd_text)

    p = sub.add_parser("merge", help="datasets prepared in parts (same tokenizer) -> one dataset")
    p.add_argument("--out", required=True)
    p.add_argument("parts", nargs="+", help="dataset directories, each with a manifest.json")
    p.set_defaults(func=cmd_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "max_len", 3) < 3:
        raise SystemExit("error: --max-len must be >= 3")
    if not 0.0 <= getattr(args, "val_fraction", 0.0) < 1.0:
        raise SystemExit("error: --val-fraction must be in [0, 1)")
    try:
        args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
