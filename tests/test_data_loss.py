"""Silent data loss (issue 12): shards cut short, dropped shards reported, the loss limit, `--full`.

Each fault is written into a small dataset (4 shards x 4 samples of t2i and lm; padding, micro-batch 1,
no shuffle buffer, so one epoch reads each shard once and the counts are exact). Under `raise` the
error names shard, key, field and reason; under `skip` the right reason and number of lost samples
are counted and the dropped shard is printed once, by the training process, with the rank.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from data.config import LoaderConfig
from data.loader import DataLossError, UnimodLoader
from data.manifest import load_manifest
from data.reader import BadInputError, read_shard
from data.validate import main as validate_main, validate_dataset
from tests.shard_fixtures import shard_path, write_dataset
from tests.test_data_bad_input import epoch_keys, loader

TASKS = ["t2i", "mmu", "lm"]
BAD_KEY = "t2i-train-000001-3"  # last sample of its shard: past the start-up check of the first sample


def make(tmp_path, mutate=None, **kw) -> tuple[str, dict]:
    kw = {"shards": 4, "per_shard": 4, "tasks": ("t2i", "lm"), **kw}
    return str(tmp_path), write_dataset(str(tmp_path), mutate=mutate, **kw)


def members(path: str) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return tf.getmembers()


# ----- the faults ----------------------------------------------------------------------------------------
def cut_in_header(path: str) -> None:
    """Cut 100 bytes into the tar header of sample 2's first member: tarfile reads samples 0 and 1 and
    then sees a clean end of archive."""
    m = members(path)[4]
    assert m.name.endswith("-2.ids.npy"), m.name
    with open(path, "r+b") as f:
        f.truncate(m.offset + 100)


def cut_in_data(path: str) -> None:
    """Cut 3 bytes into the data of sample 2's second member: tarfile raises."""
    m = members(path)[5]
    assert m.name.endswith("-2.json"), m.name
    with open(path, "r+b") as f:
        f.truncate(m.offset_data + 3)


def random_bytes(path: str) -> None:
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())


def empty_file(path: str) -> None:
    open(path, "wb").close()


def out_of_vocab(key, s):
    if key == BAD_KEY:
        s["ids.npy"] = s["ids.npy"].copy()
        s["ids.npy"][5] = 9999
    return s


def missing_field(key, s):
    if key == BAD_KEY:
        del s["json"]
    return s


@dataclass
class Fault:
    task: str
    reason: str
    key: str | None          # the key the error names
    field: str
    lost: int                # samples the manifest records in the shard that are never read
    gone: list[str]          # keys that never reach a batch
    damage: Callable[[str], None] | None = None   # applied to shard 1 of `task` after writing
    mutate: Callable | None = None                # applied to samples while writing
    at_start: bool = False   # caught by the start-up check (first sample of each shard)

    @property
    def shard_level(self) -> bool:
        return self.mutate is None


def lm1(*idx: int) -> list[str]:
    return [f"lm-train-000001-{i}" for i in idx]


FAULTS = {
    "cut_in_tar_header": Fault("lm", "truncated_shard", "lm-train-000001-1", "tar", 2, lm1(2, 3), damage=cut_in_header),
    "cut_in_member_data": Fault("lm", "unreadable_shard", "lm-train-000001-1", "tar", 2, lm1(2, 3), damage=cut_in_data),
    "random_bytes": Fault("lm", "unreadable_shard", None, "tar", 4, lm1(0, 1, 2, 3), damage=random_bytes, at_start=True),
    "empty_file": Fault("lm", "empty_shard", None, "tar", 4, lm1(0, 1, 2, 3), damage=empty_file, at_start=True),
    "out_of_vocab": Fault("t2i", "out_of_vocab", BAD_KEY, "ids.npy", 0, [BAD_KEY], mutate=out_of_vocab),
    "missing_field": Fault("t2i", "missing_field", BAD_KEY, "json", 0, [BAD_KEY], mutate=missing_field),
}


def faulty(tmp_path, name: str) -> tuple[str, dict, Fault, str]:
    f = FAULTS[name]
    root, samples = make(tmp_path, f.mutate)
    path = shard_path(root, f.task, 1)
    if f.damage is not None:
        f.damage(path)
    return root, samples, f, path


@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_under_raise_names_shard_key_field_and_reason(tmp_path, name):
    root, _, f, path = faulty(tmp_path, name)
    with pytest.raises(BadInputError) as err:
        epoch_keys(loader(root, "raise"))
    e = err.value
    assert (e.reason, e.shard, e.key, e.field) == (f.reason, path, f.key, f.field)
    msg = str(e)
    assert msg.startswith(f"{f.reason}: shard {path}: key {f.key!r}: field {f.field}: "), msg
    if f.reason == "truncated_shard":
        assert "expected 4 samples (manifest), read 2, 2 lost" in msg


@pytest.mark.parametrize("name,workers", [(n, 0) for n in FAULTS] + [("cut_in_tar_header", 2), ("out_of_vocab", 2)])
def test_fault_under_skip_counts_reason_and_lost_samples_and_prints_the_shard_once(tmp_path, capsys, name, workers):
    root, samples, f, path = faulty(tmp_path, name)
    ld = loader(root, "skip", workers)
    seen = epoch_keys(ld)
    c = ld.counters()
    if f.shard_level:
        assert c["skipped_shards"] == c[f"skipped_shards/{f.reason}"] == 1, c
        assert c["lost_samples"] == c[f"lost_samples/{f.reason}"] == f.lost, c
        assert c["skipped_samples"] == 0, c
    else:
        assert c["skipped_samples"] == c[f"skipped_samples/{f.reason}"] == 1, c
        assert c["skipped_shards"] == c["lost_samples"] == 0, c
    assert not set(f.gone) & set(seen)
    assert set(samples) - set(f.gone) <= set(seen), "good samples lost"
    epoch_keys(ld)  # a second epoch meets the shard again (unless left out at start-up)
    if f.shard_level and not f.at_start:
        assert ld.counters()[f"skipped_shards/{f.reason}"] == 2
    # Printed by the training process (capsys does not see a forked worker's stderr), once, with the rank.
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "bad shard dropped" in ln]
    if f.shard_level:
        assert len(lines) == 1, lines
        when = "at start-up" if f.at_start else "while reading"
        assert lines[0].startswith(f"[data] rank 0: bad shard dropped {when} under data.bad_input: skip "
                                   f"({f.lost} samples lost): {f.reason}: shard {path}"), lines[0]
    else:
        assert lines == []


def test_read_shard_counts_more_samples_than_recorded_as_overfull(tmp_path):
    root, _ = make(tmp_path)
    path = shard_path(root, "lm", 0)
    with pytest.raises(BadInputError) as err:
        list(read_shard(path, expected=3))
    assert (err.value.reason, err.value.key) == ("overfull_shard", "lm-train-000000-3")
    assert len(list(read_shard(path, expected=4))) == 4


# ----- manifests -----------------------------------------------------------------------------------------
def test_writer_records_each_shards_sample_count(demo_dataset):
    from data.reader import iter_samples

    m = load_manifest(str(demo_dataset))
    for split, by_task in m.shards.items():
        for task, shards in by_task.items():
            assert m.shard_samples[split][task] == [sum(1 for _ in iter_samples(s)) for s in shards]


def test_manifest_without_shard_counts_loads_with_one_note_and_no_count_check(tmp_path, capsys):
    root, samples = make(tmp_path, shard_counts=False)
    cut_in_header(shard_path(root, "lm", 1))
    assert load_manifest(root).shard_samples == {"train": {}}
    load_manifest(root)
    err = capsys.readouterr().err
    assert err.count("records no per-shard sample counts") == 1 and "train.t2i, train.lm" in err
    ld = loader(root, "skip")
    epoch_keys(ld)
    assert ld.counters()["skipped_shards"] == 0  # the cut goes unseen: what the note warns about
    # The full check still compares each task's total.
    assert validate_main([root, "--full"]) == 1
    assert "field splits.train.samples.lm is 16 but its shards hold 14 samples" in capsys.readouterr().out


@pytest.mark.parametrize("counts,match", [
    ([4, 4, 4], r"shard_samples.lm has 3 counts for the 4 shards of .*shards.lm"),
    ([4, 4, 4, 5], r"shard_samples.lm adds up to 17 but .*samples.lm is 16"),
    ([4, 4, True, 4], r"shard_samples.lm must be a list of non-negative ints"),
])
def test_manifest_shard_counts_are_type_checked(tmp_path, counts, match):
    root, _ = make(tmp_path)
    path = os.path.join(root, "manifest.json")
    with open(path) as fh:
        doc = json.load(fh)
    doc["splits"]["train"]["shard_samples"]["lm"] = counts
    with open(path, "w") as fh:
        json.dump(doc, fh)
    with pytest.raises(ValueError, match=rf"manifest.json: field splits.train.{match}"):
        load_manifest(root)


# ----- data.max_skip_fraction ---------------------------------------------------------------------------
def lm_loader(root, workers=0, **kw) -> UnimodLoader:
    return loader(root, "skip", workers, tasks={"lm": 1.0}, **kw)


def batches_until_loss_error(ld: UnimodLoader) -> tuple[int, str]:
    n = 0
    with pytest.raises(DataLossError) as err:
        for _ in ld:
            n += 1
    return n, str(err.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_max_skip_fraction_stops_a_run_that_loses_too_much(tmp_path, workers):
    root, _ = make(tmp_path, tasks=("lm",), per_shard=50)
    path = shard_path(root, "lm", 2)
    m = members(path)[10]  # sample 5's first member: 45 of the shard's 50 samples are lost
    with open(path, "r+b") as f:
        f.truncate(m.offset + 100)
    n, msg = batches_until_loss_error(lm_loader(root, workers, max_skip_fraction=0.05))
    assert n < 200
    assert "data.max_skip_fraction 0.05 exceeded on rank 0 in epoch 0" in msg
    assert "45 never delivered by shards dropped or cut short" in msg
    assert f"Worst shards: {path}: 45 (truncated_shard 45)" in msg
    # Deterministic: the counters travel with the batches, so the same micro-batch stops it every time.
    assert batches_until_loss_error(lm_loader(root, workers, max_skip_fraction=0.05)) == (n, msg)
    assert issubclass(DataLossError, ValueError)


def test_max_skip_fraction_stops_at_start_up_when_the_check_drops_too_much(tmp_path):
    root, _ = make(tmp_path, tasks=("lm",), per_shard=50)
    random_bytes(shard_path(root, "lm", 3))
    with pytest.raises(DataLossError, match=r"exceeded at start-up on rank 0: the start-up check left out 1 of the 4 "
                                            r"shards of split 'train' \(tasks lm\), 50 of its 200 samples = 25.0%.*"
                                            r"lm-train-000003.tar: 50 \(unreadable_shard 50\)"):
        lm_loader(root, max_skip_fraction=0.2)
    assert len(lm_loader(root, max_skip_fraction=0.25)) > 0


def test_max_skip_fraction_lets_a_small_loss_through(tmp_path):
    """One bad sample in 200, read early, under the default 1%: judged over >= 100 samples, it passes."""
    def edit(key, s):
        if key == "lm-train-000000-1":
            s["ids.npy"] = s["ids.npy"].copy()
            s["ids.npy"][1] = -1
        return s
    root, samples = make(tmp_path, edit, tasks=("lm",), per_shard=50)
    c = LoaderConfig(dataset_dir=root, tasks={"lm": 1.0}, seq_len=64, micro_batch_size=1, pack=False,
                     shuffle_buffer=0, num_workers=0, bad_input="skip")
    assert c.max_skip_fraction == 0.01
    ld = UnimodLoader(c, TASKS)
    seen = epoch_keys(ld)
    assert ld.counters()["skipped_samples"] == 1 and len(seen) == 200
    # No loss allowed at all: the same sample stops the run.
    n, msg = batches_until_loss_error(lm_loader(root, max_skip_fraction=0.0))
    assert "1 were lost (1 bad samples skipped, 0 never delivered" in msg and "lm-train-000000.tar: 1 (out_of_vocab 1)" in msg


def test_max_skip_fraction_is_validated():
    for bad in (-0.1, 1.5, "0.1", True):
        with pytest.raises(ValueError, match="data.max_skip_fraction must be a number in"):
            LoaderConfig(dataset_dir="x", max_skip_fraction=bad)


# ----- python -m data.validate --full, python -m data.inspect on one shard -----------------------------
def test_full_check_finds_what_the_fast_check_misses(tmp_path, capsys):
    root, _ = make(tmp_path, out_of_vocab)
    cut_in_header(shard_path(root, "lm", 1))
    assert validate_main([root]) == 0  # first samples are fine
    assert "t2i: 4 shards ok (first sample of each checked" in capsys.readouterr().out
    assert validate_main([root, "--full"]) == 1
    out = capsys.readouterr().out
    assert "train/t2i: 4 shards, 16 samples read (manifest 16), 1 bad samples, 0 bad shards" in out
    assert "train/lm: 4 shards, 14 samples read (manifest 16), 0 bad samples, 1 bad shards" in out
    assert "  ok  t2i-train-000000.tar: 4 of 4 samples read, 0 bad" in out
    assert "  BAD t2i-train-000001.tar: 4 of 4 samples read, 1 bad" in out
    assert f"out_of_vocab: shard {shard_path(root, 't2i', 1)}: key '{BAD_KEY}': field ids.npy" in out
    assert "  BAD lm-train-000001.tar: 2 of 4 samples read" in out and "truncated_shard" in out
    with pytest.raises(BadInputError, match="out_of_vocab"):
        validate_dataset(root, full=True)


def test_full_check_compares_the_longest_sample_with_the_manifest(tmp_path, capsys):
    root, samples = make(tmp_path)
    longest = max(len(ids) for task, ids, _ in samples.values() if task == "lm")
    path = os.path.join(root, "manifest.json")
    with open(path) as fh:
        doc = json.load(fh)
    doc["splits"]["train"]["max_len"] = {"lm": longest - 1}
    with open(path, "w") as fh:
        json.dump(doc, fh)
    assert validate_main([root, "--full"]) == 1
    assert f"field splits.train.max_len.lm is {longest - 1} but sample" in capsys.readouterr().out
    with pytest.raises(ValueError, match="max_len.lm"):
        validate_dataset(root, full=True)


def test_inspect_reads_a_lone_shard_without_a_manifest(demo_dataset, tmp_path, capsys):
    from data.inspect import main as inspect_main

    m = load_manifest(str(demo_dataset))
    lone = tmp_path / "x-000000.tar"
    shutil.copyfile(m.shards["train"]["t2i"][0], lone)
    assert inspect_main([str(lone), "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "no manifest.json next to it" in out and out.count("--- ") == 2 and "task=t2i" in out
    assert inspect_main([str(demo_dataset), "--n", "1", "--split", "train", "--task", "lm"]) == 0
    assert "task=lm" in capsys.readouterr().out
