"""`python -m data.prepare merge`: parts prepared separately (the Slurm array job) become one dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from data.config import LoaderConfig
from data.loader import UnimodLoader
from data.validate import validate_dataset

REPO = Path(__file__).resolve().parents[1]


def prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.prepare", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def text_part(tmp: Path, name: str, tokenizer: Path, lines: list[str], visual_size: int = 256) -> Path:
    src = tmp / f"{name}.txt"
    src.write_text("\n".join(lines) + "\n")
    out = tmp / name
    proc = prepare("text", "--input", str(src), "--tokenizer", str(tokenizer), "--visual-size", str(visual_size),
                   "--out", str(out), "--shard-max-count", "10")
    assert proc.returncode == 0, proc.stderr
    return out


def test_merge_adds_parts_up_and_trains_from_one_manifest(demo_dataset, tmp_path):
    tok = demo_dataset / "tokenizer.model"
    a = text_part(tmp_path, "a", tok, [f"the number {i} comes before {i + 1}." for i in range(30)])
    b = text_part(tmp_path, "b", tok, [f"seven plus {i} is {7 + i}." for i in range(25)])
    merged = tmp_path / "merged"
    proc = prepare("merge", "--out", str(merged), str(a), str(b))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"]["lm"] == 55
    assert len(manifest["splits"]["train"]["shards"]["lm"]) == 6  # 3 + 3 shards of <= 10 samples
    # Each shard keeps its own count, in the order of the merged shard list (the reader checks it).
    assert manifest["splits"]["train"]["shard_samples"]["lm"] == [10, 10, 10, 10, 10, 5]
    # The longest sample of the merge, read back from its shards (what data.seq_len is checked against).
    from data.reader import iter_samples
    longest = max(len(ids) for s in manifest["splits"]["train"]["shards"]["lm"] for _, ids, _ in iter_samples(merged / s))
    assert manifest["splits"]["train"]["max_len"] == {"lm": longest}
    validate_dataset(str(merged))
    loader = UnimodLoader(LoaderConfig(dataset_dir=str(merged), tasks={"lm": 1.0}, seq_len=64, micro_batch_size=2,
                                       pack=False, num_workers=0, shuffle_buffer=0), tasks=["t2i", "mmu", "lm"])
    rows = sum(len(keys) for _ in loader for keys in [loader.last_keys])
    assert rows == 56  # 55 samples padded one per row, into 28 micro-batches of 2


def test_merge_refuses_parts_with_another_vocabulary(demo_dataset, tmp_path):
    tok = demo_dataset / "tokenizer.model"
    a = text_part(tmp_path, "a", tok, ["one two three."] * 3)
    b = text_part(tmp_path, "b", tok, ["four five six."] * 3, visual_size=512)
    proc = prepare("merge", "--out", str(tmp_path / "m"), str(a), str(b))
    assert proc.returncode == 2 and "field vocab" in proc.stderr and str(b) in proc.stderr
    assert not (tmp_path / "m" / "manifest.json").exists()


def test_merge_keeps_shard_counts_only_where_every_part_has_them(demo_dataset, tmp_path):
    """A part written before shard_samples existed: the merged task has no per-shard counts (a partial
    list would not line up with the shards), and the manifest still loads."""
    from data.manifest import load_manifest

    tok = demo_dataset / "tokenizer.model"
    a = text_part(tmp_path, "a", tok, [f"line {i}." for i in range(12)])
    b = text_part(tmp_path, "b", tok, [f"row {i}." for i in range(5)])
    doc = json.loads((b / "manifest.json").read_text())
    del doc["splits"]["train"]["shard_samples"]
    (b / "manifest.json").write_text(json.dumps(doc))
    merged = tmp_path / "merged"
    assert prepare("merge", "--out", str(merged), str(a), str(b)).returncode == 0
    assert json.loads((merged / "manifest.json").read_text())["splits"]["train"]["shard_samples"] == {}
    assert load_manifest(str(merged)).samples["train"]["lm"] == 17
