"""`python -m data.prepare tokenizer | images | text` run as subprocesses, as users run them.

(`demo` runs as a subprocess in the session fixture `demo_dataset`; tests/test_data_demo.py checks it.)
The images path uses a tiny random `Emu3VQVAE` saved with `save_pretrained`, and checks its codes
against an independent re-implementation of Emu3's pixel normalisation.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from data.inspect import inspect
from data.layout import make_labels
from data.prepare import main
from data.manifest import load_manifest
from data.reader import iter_samples
from data.vocab import SentencePieceTrainConfig, UnifiedVocab, train_sentencepiece
from tests.conftest import run_module

CORPUS = [
    "a red square on a black background",
    "a small blue circle in the middle",
    "what colour is the shape?",
    "it is red.",
    "counting: one, two, three",
] * 10


def _dataset(root: Path):
    m = load_manifest(root)
    return m, UnifiedVocab.from_manifest(m)


def test_tokenizer_command_is_deterministic_and_encodes_digits(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n")
    outs = []
    for name in ("a", "b"):
        proc = run_module("data.prepare", "tokenizer", "--input", str(corpus), "--vocab-size", "300",
                          "--out", str(tmp_path / name))
        assert proc.returncode == 0, proc.stderr
        outs.append((tmp_path / name / "tokenizer.model").read_bytes())
    assert outs[0] == outs[1]
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "a" / "tokenizer.model"))
    assert sp.get_piece_size() <= 300
    for text in ("16*16", "7*9 = 63", "a red square"):
        ids = sp.encode(text)
        assert sp.unk_id() not in ids and sp.decode(ids) == text


@pytest.fixture(scope="module")
def tiny_vq(tmp_path_factory) -> Path:
    import torch
    from transformers import Emu3VQVAE, Emu3VQVAEConfig

    torch.manual_seed(0)
    cfg = Emu3VQVAEConfig(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32,
                          channel_multiplier=[1, 2], num_res_blocks=1, attn_resolutions=[],
                          temporal_downsample_factor=4, hidden_size=64)  # hidden_size = 32 * 2 (middle attention)
    d = tmp_path_factory.mktemp("vq")
    Emu3VQVAE(cfg).eval().save_pretrained(str(d))
    return d


def _reference_codes(model, image_path: Path) -> np.ndarray:
    """Emu3's preprocessing written out by hand: RGB, /255, (x - CLIP mean) / CLIP std, CHW."""
    import torch
    from PIL import Image

    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    x = (np.asarray(Image.open(image_path).convert("RGB"), dtype=np.float32) / 255.0 - mean) / std
    with torch.no_grad():
        tokens = model.encode(torch.from_numpy(x.transpose(2, 0, 1))[None], image_sizes=torch.tensor([[32, 32]]))
    return tokens.image_tokens[0].numpy()


def test_images_command_writes_emu3_codes(tmp_path, tiny_vq):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):  # smooth random colour fields, so the VQ sees structure
        small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(small).resize((32, 32), Image.BILINEAR).save(tmp_path / f"img{i}.png")
    items = [
        {"image": "img0.png", "caption": "a red square"},
        {"image": "img1.png", "caption": "a small blue circle", "split": "train", "source": "synthetic:1"},
        {"image": "img2.png", "question": "what colour is the shape?", "answer": "it is red."},
        {"image": "img3.png", "question": "what colour is the shape?", "answer": "blue", "split": "validation"},
    ]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(x) for x in items) + "\n\n")
    sp = train_sentencepiece(CORPUS, tmp_path / "sp.model", SentencePieceTrainConfig(vocab_size=300))
    out = tmp_path / "ds"
    proc = run_module("data.prepare", "images", "--manifest", str(tmp_path / "items.jsonl"), "--vq-model",
                      str(tiny_vq), "--tokenizer", str(sp), "--out", str(out), "--min-pixels", "1024",
                      "--max-pixels", "1024")
    assert proc.returncode == 0, proc.stderr
    m, vocab = _dataset(out)
    assert m.samples["train"] == {"t2i": 2, "mmu": 1}
    assert m.samples["validation"] == {"mmu": 1}
    assert vocab.layout.visual_size == 64 and m.doc["image_tokenizer"]["type"] == "emu3-vqvae"
    assert (out / m.doc["image_tokenizer"]["path"]).resolve() == tiny_vq.resolve()
    assert (out / "tokenizer.model").read_bytes() == sp.read_bytes()  # copied: the dataset is self-contained

    from transformers import Emu3VQVAE

    model = Emu3VQVAE.from_pretrained(str(tiny_vq)).eval()
    seen = 0
    for split, by_task in m.shards.items():
        for task, shards in by_task.items():
            for shard in shards:
                for key, ids, meta in iter_samples(shard):
                    line = int(key.split("-")[2])
                    item = items[line - 1]
                    assert key == f"{task}-{split}-{line:06d}" and meta["image_hw"] == [16, 16]
                    np.testing.assert_array_equal(vocab.ids_to_codes(ids), _reference_codes(model, tmp_path / item["image"]))
                    labels = make_labels(ids, task, meta, vocab.layout, key=key)
                    if task == "t2i":
                        assert vocab.decode_text(ids[1:ids.tolist().index(vocab.layout.boi_id)]) == item["caption"]
                        assert (labels != -100).sum() == 16 * 16 + 1
                    else:
                        assert vocab.decode_text(ids[meta["answer_start"]:-1]) == item["answer"]
                    seen += 1
    assert seen == 4

    # The dataset's images decode through its own VQ model (data.inspect's PNG path, in-process).
    png_dir = tmp_path / "png"
    assert inspect(str(out), n=1, png_dir=str(png_dir), out=io.StringIO()) == 3
    assert Image.open(png_dir / "t2i-train-000001.png").size == (32, 32)


def test_images_command_errors_name_line_and_field(tmp_path, tiny_vq):
    Path(tmp_path / "img.png").write_bytes(b"not a png")
    sp = train_sentencepiece(CORPUS, tmp_path / "sp.model", SentencePieceTrainConfig(vocab_size=300))
    cases = [
        ('{"image": "img.png", "caption": "a"}\n{"image": "img.png"}\n', r"items.jsonl:2: give either field 'caption'"),
        ('{"image": "img.png", "caption": "a"}\n', r"items.jsonl:1: field 'image' 'img.png' cannot be read"),
        ('{"image": "x.png", "caption": "a", "split": "test"}\n', r"items.jsonl:1: field 'split'"),
    ]
    for text, expected in cases:  # in-process: three subprocesses would each re-import torch
        (tmp_path / "items.jsonl").write_text(text)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["images", "--manifest", str(tmp_path / "items.jsonl"), "--vq-model", str(tiny_vq),
                       "--tokenizer", str(sp), "--out", str(tmp_path / "ds")])
        assert rc == 2 and re.search(expected, err.getvalue()), err.getvalue()


def test_text_command_chunks_lines_and_splits(tmp_path):
    sp = train_sentencepiece(CORPUS, tmp_path / "sp.model", SentencePieceTrainConfig(vocab_size=300))
    lines = [f"counting: {i}, {i + 1}, {i + 2} and a red square" for i in range(20)]
    (tmp_path / "corpus.txt").write_text("\n\n".join(lines) + "\n")
    out = tmp_path / "lm"
    proc = run_module("data.prepare", "text", "--input", str(tmp_path / "corpus.txt"), "--tokenizer", str(sp),
                      "--out", str(out), "--visual-size", "256", "--max-len", "8", "--val-fraction", "0.25",
                      "--shard-max-count", "16")
    assert proc.returncode == 0, proc.stderr
    m, vocab = _dataset(out)
    assert m.doc["image_tokenizer"] is None and vocab.layout.visual_size == 256
    assert len(m.shards["train"]["lm"]) > 1  # cut by --shard-max-count
    texts: dict[int, list[tuple[int, np.ndarray]]] = {}
    splits: dict[int, set[str]] = {}
    for split, by_task in m.shards.items():
        for shard in by_task["lm"]:
            for key, ids, meta in iter_samples(shard):
                assert len(ids) <= 8 and ids[0] == vocab.layout.bos_id and ids[-1] == vocab.layout.eos_id
                line = int(meta["source"].split(":")[1])
                texts.setdefault(line, []).append((int(key.rsplit("-", 1)[1]), ids[1:-1]))
                splits.setdefault(line, set()).add(split)
    assert all(len(s) == 1 for s in splits.values())  # a line's chunks never straddle splits
    assert sum("validation" in s for s in splits.values()) == 5
    for k, (line, chunks) in enumerate(sorted(texts.items())):
        joined = np.concatenate([c for _, c in sorted(chunks, key=lambda t: t[0])])
        assert vocab.decode_text(joined) == lines[k]

    proc = run_module("data.prepare", "text", "--input", str(tmp_path / "corpus.txt"), "--tokenizer", str(sp),
                      "--out", str(tmp_path / "bad"))
    assert proc.returncode == 2 and "--visual-size is required" in proc.stderr
