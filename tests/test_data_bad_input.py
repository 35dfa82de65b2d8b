"""Bad input under both policies: `raise` names shard, key and field; `skip` counts and excludes.

Each test writes a small dataset (4 shards x 4 samples per task) with one defect. Bad samples sit
last in their shard so the start-up check (first sample of each shard) passes them and the training
stream must catch them; padding, micro-batch 1 and no shuffle buffer make the counts exact.
"""

from __future__ import annotations

import os
import tarfile

import numpy as np
import pytest
import webdataset as wds

from data.layout import lm_ids, parse_image_block, t2i_ids
from data.config import LoaderConfig
from data.loader import UnimodLoader
from data.manifest import load_manifest
from data.reader import BadInputError
from data.validate import validate_dataset
from tests.shard_fixtures import OTHER_SHA, SHA, SMALL, shard_path, text_ids, write_dataset

TASKS = ["t2i", "mmu", "lm"]
BAD_KEY = "t2i-train-000001-3"


def make(tmp_path, mutate=None):
    samples = write_dataset(str(tmp_path), shards=4, per_shard=4, tasks=("t2i", "lm"), mutate=mutate)
    return str(tmp_path), samples


def loader(root, policy, workers=0, tasks=None, **kw) -> UnimodLoader:
    # These datasets are a few dozen samples with one defect each: far past any sensible loss limit,
    # which tests/test_data_loss.py tests on its own (passing max_skip_fraction).
    kw.setdefault("max_skip_fraction", 1.0)
    c = LoaderConfig(dataset_dir=root, tasks=tasks or {"t2i": 1.0, "lm": 1.0}, seq_len=64, micro_batch_size=1,
                     pack=False, shuffle_buffer=0, num_workers=workers, bad_input=policy, **kw)
    return UnimodLoader(c, TASKS)


def epoch_keys(ld: UnimodLoader) -> list[str]:
    keys = []
    for _ in ld:
        keys.extend(k for row in ld.last_keys for k in row)
    return keys


def mutate_one(key: str, edit):
    def mutate(k, sample):
        return edit(sample) if k == key else sample
    return mutate


def check_both_policies(root, samples, *, reason, shard, key, field, gone, count=1, workers=0, kind="samples",
                        **loader_kw):
    """raise: the message names shard, key and field. skip: one count, and `gone` keys never appear."""
    with pytest.raises(BadInputError) as err:
        epoch_keys(loader(root, "raise", workers, **loader_kw))
    msg = str(err.value)
    assert reason in msg and shard in msg and repr(key) in msg and f"field {field}" in msg, msg
    # The structured fields survive the trip out of a worker process too.
    assert (err.value.reason, err.value.shard, err.value.key, err.value.field) == (reason, shard, key, field)
    ld = loader(root, "skip", workers, **loader_kw)
    seen = epoch_keys(ld)
    c = ld.counters()
    assert c[f"skipped_{kind}"] == count and c[f"skipped_{kind}/{reason}"] == count, c
    assert not set(gone) & set(seen)
    kept = set(samples) - set(gone)
    assert kept <= set(seen), f"good samples lost: {sorted(kept - set(seen))[:5]}"


@pytest.mark.parametrize("workers", [0, 2])
def test_token_id_out_of_vocabulary(tmp_path, workers):
    def edit(s):
        s["ids.npy"] = s["ids.npy"].copy()
        s["ids.npy"][5] = 9999
        return s
    root, samples = make(tmp_path, mutate_one(BAD_KEY, edit))
    check_both_policies(root, samples, reason="out_of_vocab", shard=shard_path(root, "t2i", 1), key=BAD_KEY,
                        field="ids.npy", gone=[BAD_KEY], workers=workers)


def test_sample_missing_a_field(tmp_path):
    def edit(s):
        del s["json"]
        return s
    root, samples = make(tmp_path, mutate_one(BAD_KEY, edit))
    check_both_policies(root, samples, reason="missing_field", shard=shard_path(root, "t2i", 1), key=BAD_KEY,
                        field="json", gone=[BAD_KEY])


def test_image_grid_disagrees_with_declared_hw(tmp_path):
    def edit(s):
        h, w = s["json"]["image_hw"]
        s["json"] = dict(s["json"], image_hw=[h + 1, w])
        return s
    root, samples = make(tmp_path, mutate_one(BAD_KEY, edit))
    check_both_policies(root, samples, reason="image_grid", shard=shard_path(root, "t2i", 1), key=BAD_KEY,
                        field="json.image_hw", gone=[BAD_KEY])


def test_ragged_image_rows(tmp_path):
    def edit(s):
        ids = s["ids.npy"]
        first_visual = int(np.flatnonzero(ids >= SMALL.visual_start)[0])
        s["ids.npy"] = np.delete(ids, first_visual)  # row 1 one code short: EOLs no longer line up
        return s
    root, samples = make(tmp_path, mutate_one(BAD_KEY, edit))
    check_both_policies(root, samples, reason="image_grid", shard=shard_path(root, "t2i", 1), key=BAD_KEY,
                        field="ids.npy", gone=[BAD_KEY])


def test_sample_from_another_tokenizer_inside_a_shard(tmp_path):
    def edit(s):
        s["json"] = dict(s["json"], tokenizer_sha256=OTHER_SHA)
        return s
    root, samples = make(tmp_path, mutate_one(BAD_KEY, edit))
    check_both_policies(root, samples, reason="tokenizer_mismatch", shard=shard_path(root, "t2i", 1),
                        key=BAD_KEY, field="json.tokenizer_sha256", gone=[BAD_KEY])


def test_shard_from_another_tokenizer_caught_before_training(tmp_path):
    def edit(s):
        s["json"] = dict(s["json"], tokenizer_sha256=OTHER_SHA)
        return s
    root, samples = make(tmp_path, lambda k, s: edit(s) if k.startswith("lm-train-000002-") else s)
    bad_shard = shard_path(root, "lm", 2)
    # Raised while the loader is built, i.e. before the first step.
    with pytest.raises(BadInputError, match=rf"tokenizer_mismatch: shard {bad_shard}: key 'lm-train-000002-0': "
                                            r"field json.tokenizer_sha256"):
        loader(root, "raise")
    with pytest.raises(BadInputError, match="tokenizer_mismatch"):
        validate_dataset(root)
    gone = [k for k in samples if k.startswith("lm-train-000002-")]
    ld = loader(root, "skip")
    assert ld.counters()["skipped_shards/tokenizer_mismatch"] == 1  # before any batch
    seen = epoch_keys(ld)
    assert not set(gone) & set(seen) and set(samples) - set(gone) <= set(seen)
    assert ld.counters()["skipped_shards"] == 1 and ld.counters()["skipped_samples"] == 0


def _truncate_inside_sample_2(path: str) -> None:
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    # Members go key by key (ids.npy, json); cut inside sample 2's second member, so samples 0 and 1
    # are whole and the reader fails on sample 2.
    cut = members[5]
    assert cut.name.startswith("t2i-train-000001-2") or cut.name.startswith("lm-train-000001-2"), cut.name
    with open(path, "r+b") as f:
        f.truncate(cut.offset_data + 3)


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard(tmp_path, workers):
    root, samples = make(tmp_path)
    path = shard_path(root, "lm", 1)
    _truncate_inside_sample_2(path)
    check_both_policies(root, samples, reason="unreadable_shard", shard=path, key="lm-train-000001-1", field="tar",
                        gone=["lm-train-000001-2", "lm-train-000001-3"], kind="shards", workers=workers)


@pytest.mark.parametrize("content", [b"", b"<html>not found</html>\n" * 50, "empty tar"])
def test_empty_or_non_tar_shard_caught_before_training(tmp_path, content):
    root, samples = make(tmp_path)
    path = shard_path(root, "t2i", 3)
    if content == "empty tar":
        os.remove(path)
        with wds.TarWriter(path):
            pass
    else:
        with open(path, "wb") as f:
            f.write(content)
    reason = "unreadable_shard" if content and content != "empty tar" else "empty_shard"
    with pytest.raises(BadInputError, match=rf"{reason}: shard {path}: key None: field tar"):
        loader(root, "raise")
    ld = loader(root, "skip")
    assert ld.counters()[f"skipped_shards/{reason}"] == 1
    gone = [k for k in samples if k.startswith("t2i-train-000003-")]
    seen = epoch_keys(ld)
    assert not set(gone) & set(seen) and set(samples) - set(gone) <= set(seen)


def test_pipe_urls_refused_unless_allowed(tmp_path):
    root, samples = make(tmp_path)
    spec = {"lm": f"pipe:cat {root}/lm-train-{{000000..000003}}.tar"}
    with pytest.raises(ValueError, match=r"data.shards.lm: 'pipe:cat .*allow_pipe"):
        LoaderConfig(shards=spec, tasks={"lm": 1.0}, batches_per_epoch=4)
    c = LoaderConfig(shards=spec, tasks={"lm": 1.0}, batches_per_epoch=4, allow_pipe=True, seq_len=64,
                     micro_batch_size=4, pack=False, shuffle_buffer=0, num_workers=0)
    seen = epoch_keys(UnimodLoader(c, TASKS, layout=SMALL))
    assert sorted(seen) == sorted(k for k in samples if k.startswith("lm-"))
    # A manifest is data: it may never name a command or a path outside the dataset.
    import json
    with open(os.path.join(root, "manifest.json")) as f:
        doc = json.load(f)
    for name in ("pipe:rm -rf ~", "../elsewhere.tar", "/etc/passwd"):
        doc["splits"]["train"]["shards"]["lm"][0] = name
        with open(os.path.join(root, "manifest.json"), "w") as f:
            json.dump(doc, f)
        with pytest.raises(ValueError, match="must be a plain path relative to the dataset directory"):
            load_manifest(root)


def test_skip_counters_survive_resume(tmp_path):
    """Counters restored from state plus the workers' replay equal an uninterrupted run's, not double."""
    def edit(s):
        s["ids.npy"] = s["ids.npy"].copy()
        s["ids.npy"][2] = -1
        return s
    root, _ = make(tmp_path, lambda k, s: edit(s) if k.endswith("-3") and "-00000" in k else s)
    full = loader(root, "skip", 2)
    epoch_keys(full)
    expected = full.counters()
    assert expected["skipped_samples/out_of_vocab"] == 8  # the last sample of each of the 8 shards
    first = loader(root, "skip", 2)
    for i, _ in enumerate(first):
        if i == 12:
            break
    resumed = loader(root, "skip", 2)
    resumed.load_state_dict(first.state_dict())
    epoch_keys(resumed)
    assert resumed.counters() == expected


# ----- over-long image samples, seq_len vs the manifest, image format vs the config ----------------------
def test_overlong_image_sample_is_never_cut_even_under_truncate(tmp_path):
    """overlong: truncate cuts lm only; a t2i sample over seq_len is a bad input under both policies."""
    def edit(s):
        codes, _ = parse_image_block(s["ids.npy"], SMALL)
        h, w = codes.shape
        s["ids.npy"] = t2i_ids([ord("x")] * 80, codes, SMALL, text_ids(f"{h}*{w}"))  # > 64 tokens
        return s
    root, samples = make(tmp_path, mutate_one(BAD_KEY, edit))
    check_both_policies(root, samples, reason="overlong", shard=shard_path(root, "t2i", 1), key=BAD_KEY,
                        field="ids.npy", gone=[BAD_KEY], overlong="truncate")
    with pytest.raises(BadInputError, match="t2i samples are never cut, whatever data.overlong says"):
        epoch_keys(loader(root, "raise", overlong="truncate"))


def test_seq_len_shorter_than_the_manifests_longest_sample_fails_at_build(demo_dataset):
    """The real writer records each task's longest sample; the loader refuses a data.seq_len below it."""
    from data.reader import iter_samples

    manifest = load_manifest(str(demo_dataset))
    longest = {t: max(len(ids) for s in shards for _, ids, _ in iter_samples(s))
               for t, shards in manifest.shards["train"].items()}

    def build(**kw):
        c = LoaderConfig(dataset_dir=str(demo_dataset), micro_batch_size=1, num_workers=0, validate_on_start=False, **kw)
        return UnimodLoader(c, TASKS)

    n = longest["mmu"]
    with pytest.raises(ValueError, match=rf"data.seq_len {n - 1} is shorter than the longest mmu sample of split "
                                         rf"'train': {n} tokens \(field splits.train.max_len.mmu of .*manifest.json\); "
                                         rf"raise data.seq_len to >= {n} \(mmu samples are never cut"):
        build(tasks={"t2i": 1.0, "mmu": 1.0}, seq_len=n - 1)
    build(tasks={"t2i": 1.0, "mmu": 1.0}, seq_len=n)
    n = longest["lm"]
    with pytest.raises(ValueError, match=r"longest lm sample.*or set data.overlong: truncate"):
        build(tasks={"lm": 1.0}, seq_len=n - 1)
    build(tasks={"lm": 1.0}, seq_len=n - 1, overlong="truncate")  # text may be cut


def test_dataset_in_another_image_format_refused_at_build(demo_dataset):
    """data.image_grid against the demo's grey8 8x8 grid: refused before the first step, under either policy."""
    manifest = load_manifest(str(demo_dataset))
    for policy in ("raise", "skip"):
        c = LoaderConfig(dataset_dir=str(demo_dataset), tasks={"t2i": 1.0, "mmu": 1.0}, seq_len=128,
                         num_workers=0, image_grid=[16, 16], bad_input=policy)
        with pytest.raises(BadInputError) as err:
            UnimodLoader(c, TASKS)
        e = err.value
        assert (e.reason, e.field, e.shard) == ("image_format", "json.image_hw", manifest.shards["train"]["t2i"][0])
        assert repr(e.key) in str(e) and "8x8 code grid but data.image_grid is [16, 16]" in str(e)
    c = LoaderConfig(dataset_dir=str(demo_dataset), tasks={"t2i": 1.0}, seq_len=128, num_workers=0, image_grid=[8, 8],
                     batches_per_epoch=2)
    assert len(list(UnimodLoader(c, TASKS))) == 2


def test_image_of_another_grid_inside_a_shard(tmp_path):
    """The per-sample check: one 4x3 image among 3x3 ones, past the start-up check."""
    def fixed_grid(task, rng, hw=(3, 3)):
        meta = {"task": task, "tokenizer_sha256": SHA, "image_hw": list(hw), "answer_start": None, "source": "grid"}
        if task == "lm":
            return lm_ids([ord("a")] * 5, SMALL), dict(meta, image_hw=None)
        codes = rng.integers(0, SMALL.visual_size, hw)
        return t2i_ids([ord("c")], codes, SMALL, text_ids(f"{hw[0]}*{hw[1]}")), meta

    rng = np.random.default_rng(1)

    def edit(s):
        s["ids.npy"], s["json"] = fixed_grid("t2i", rng, (4, 3))
        return s
    samples = write_dataset(str(tmp_path), shards=4, per_shard=4, tasks=("t2i", "lm"), sample_fn=fixed_grid,
                            mutate=mutate_one(BAD_KEY, edit))
    check_both_policies(str(tmp_path), samples, reason="image_format", shard=shard_path(str(tmp_path), "t2i", 1),
                        key=BAD_KEY, field="json.image_hw", gone=[BAD_KEY], image_grid=[3, 3])
