"""The training loader: exact epochs over ranks x workers, exact resume, packing and padding.

Ranks are simulated in one process: one `UnimodLoader` per rank with rank=r, world_size=2.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch

from data.layout import make_labels
from data.config import LoaderConfig
from data.loader import UnimodLoader
from tests.shard_fixtures import SHA, SMALL, write_dataset

TASKS = ["t2i", "mmu", "lm"]


def cfg(root, **kw) -> LoaderConfig:
    base = dict(dataset_dir=str(root), tasks={"t2i": 1.0, "mmu": 1.0, "lm": 1.0}, seq_len=64,
                micro_batch_size=2, pack=False, shuffle_buffer=8, seed=3, num_workers=0)
    base.update(kw)
    return LoaderConfig(**base)


def run(loader: UnimodLoader, n: int | None = None) -> list[tuple[dict, list[list[str]]]]:
    """Up to n micro-batches (default: one epoch) with the keys of their rows."""
    out = []
    for batch in loader:
        out.append((batch, loader.last_keys))
        if n is not None and len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    return root, write_dataset(str(root), shards=8, per_shard=4)


def test_epoch_sees_every_sample_once_across_2_ranks_x_2_workers(dataset):
    root, samples = dataset
    seen: list[str] = []
    lengths = []
    for rank in (0, 1):
        loader = UnimodLoader(cfg(root, num_workers=2), TASKS, rank=rank, world_size=2)
        batches = run(loader)
        lengths.append(len(batches))
        assert len(batches) == len(loader)
        for batch, keys in batches:
            assert batch["input_ids"].shape == (2, 64) and batch["labels"].shape == (2, 64)
            # Task-homogeneous: the one task id matches every row's sample.
            task = TASKS[int(batch["task_ids"][0])]
            assert torch.all(batch["task_ids"] == TASKS.index(task))
            assert all(samples[k][0] == task for row in keys for k in row)
            seen.extend(k for row in keys for k in row)
    assert lengths[0] == lengths[1] == 3 * 4 * 2  # 3 tasks x 4 batches per slot x 2 workers
    dup = [k for k, c in collections.Counter(seen).items() if c > 1]
    assert not dup, f"seen twice: {dup[:5]}"
    assert set(seen) == set(samples), f"never seen: {sorted(set(samples) - set(seen))[:5]}"


def test_packing_concatenates_whole_samples_and_pads_the_rest(dataset):
    root, samples = dataset
    tasks = ["lm", "mmu", "t2i"]  # task id = index in the model's list, not in TASKS
    loader = UnimodLoader(cfg(root, pack=True, seq_len=96, micro_batch_size=3), tasks)
    n_samples_per_row = []
    for batch, keys in run(loader, 12):
        task = tasks[int(batch["task_ids"][0])]
        assert batch["input_ids"].dtype == batch["labels"].dtype == batch["position_ids"].dtype == torch.long
        for b, row in enumerate(keys):
            ids = np.concatenate([samples[k][1] for k in row])
            labels = np.concatenate([make_labels(samples[k][1], task, samples[k][2], SMALL) for k in row])
            n = len(ids)
            assert n <= 96
            # Positions restart at every sample; the padding continues the last sample's count.
            last = len(samples[row[-1]][1])
            positions = [p for k in row[:-1] for p in range(len(samples[k][1]))] + list(range(last + 96 - n))
            assert batch["position_ids"][b].tolist() == positions
            assert np.array_equal(batch["input_ids"][b, :n].numpy(), ids)
            assert np.array_equal(batch["labels"][b, :n].numpy(), labels)
            assert torch.all(batch["input_ids"][b, n:] == SMALL.pad_id)
            assert torch.all(batch["labels"][b, n:] == -100)
            n_samples_per_row.append(len(row))
    assert max(n_samples_per_row) > 1  # packing really packed


def test_padding_puts_one_sample_per_row(dataset):
    root, samples = dataset
    loader = UnimodLoader(cfg(root, pack=False, seq_len=80), TASKS)
    for batch, keys in run(loader, 6):
        task = TASKS[int(batch["task_ids"][0])]
        for b, row in enumerate(keys):
            assert len(row) == 1
            ids = samples[row[0]][1]
            n = len(ids)
            assert np.array_equal(batch["input_ids"][b, :n].numpy(), ids)
            assert np.array_equal(batch["labels"][b, :n].numpy(), make_labels(ids, task, samples[row[0]][2], SMALL))
            assert torch.all(batch["input_ids"][b, n:] == SMALL.pad_id) and torch.all(batch["labels"][b, n:] == -100)
            if task == "t2i":  # only visual ids and the final eos are supervised
                sup = batch["labels"][b][batch["labels"][b] != -100]
                assert torch.all((sup >= SMALL.visual_start) | (sup == SMALL.eos_id))


def test_pad_to_longest_cuts_only_trailing_padding(dataset):
    """pad_to=longest: the same rows as pad_to=seq_len, cut to the longest row rounded up to pad_multiple."""
    root, samples = dataset
    full = run(UnimodLoader(cfg(root, pack=False, seq_len=80), TASKS), 12)
    cut = run(UnimodLoader(cfg(root, pack=False, seq_len=80, pad_to="longest", pad_multiple=8), TASKS), 12)
    widths = set()
    for (fb, fkeys), (cb, ckeys) in zip(full, cut):
        assert fkeys == ckeys
        longest = max(len(samples[k][1]) for row in ckeys for k in row)
        width = min(80, 8 * ((longest + 7) // 8))  # independent of batch_width
        widths.add(width)
        for name in ("input_ids", "labels", "position_ids"):
            assert cb[name].shape == (2, width)
            assert torch.equal(cb[name], fb[name][:, :width]), name
        assert torch.all(fb["input_ids"][:, width:] == SMALL.pad_id)  # only padding was cut
    assert len(widths) > 1  # the widths really vary with the data


def test_pad_to_longest_is_refused_in_pipeline_mode(tmp_path):
    from train.config import RunConfig

    doc = {"model": {"preset": "debug"}, "data": {"dataset_dir": str(tmp_path), "pad_to": "longest", "seq_len": 1024},
           "parallel": {"mode": "pipeline", "pipeline_stages": 2}}
    with pytest.raises(ValueError, match="data.pad_to='longest'.*fixed shapes"):
        RunConfig.from_dict(doc)
    with pytest.raises(ValueError, match="data.pad_to must be"):
        LoaderConfig(dataset_dir=str(tmp_path), pad_to="shortest")
    with pytest.raises(ValueError, match="data.pad_multiple"):
        LoaderConfig(dataset_dir=str(tmp_path), pad_to="longest", pad_multiple=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_gives_the_uninterrupted_batches(dataset, workers):
    root, _ = dataset
    c = cfg(root, pack=True, num_workers=workers, micro_batch_size=1, seq_len=64)
    full = UnimodLoader(c, TASKS)
    n = len(full)
    reference = run(full) + run(full, 5)  # one epoch and the start of the next
    for k in (7, n):  # mid-epoch (odd, so the next batch is worker 1's) and at the epoch boundary
        first = UnimodLoader(c, TASKS)
        head = run(first, k)
        state = first.state_dict()
        resumed = UnimodLoader(c, TASKS)
        resumed.load_state_dict(state)
        tail = (run(resumed) if k < n else []) + run(resumed, 5)
        got = head + tail
        assert len(got) == len(reference) == n + 5
        for i, ((a, ka), (b, kb)) in enumerate(zip(got, reference)):
            assert ka == kb, f"batch {i} (resumed at {k}) has other samples"
            for name in ("input_ids", "labels", "task_ids", "position_ids"):
                assert torch.equal(a[name], b[name]), f"batch {i} field {name} differs after resume at {k}"


def test_same_seed_same_batches_other_seed_or_epoch_other_order(dataset):
    root, _ = dataset
    keys = lambda c: [k for _, ks in run(UnimodLoader(c, TASKS), 10) for k in ks]  # noqa: E731
    a, b, c2 = keys(cfg(root)), keys(cfg(root)), keys(cfg(root, seed=4))
    assert a == b and a != c2
    loader = UnimodLoader(cfg(root), TASKS)
    e0 = [k for _, ks in run(loader) for k in ks]
    e1 = [k for _, ks in run(loader) for k in ks]
    assert loader.epoch == 2 and sorted(e0) == sorted(e1) and e0 != e1


def test_weights_are_passes_per_epoch(dataset):
    root, samples = dataset
    loader = UnimodLoader(cfg(root, tasks={"t2i": 1.0, "lm": 0.5}), TASKS)
    per_task = collections.Counter(TASKS[int(b["task_ids"][0])] for b, _ in run(loader))
    # 32 samples per task over 1 slot, 2 rows per batch: t2i 16 micro-batches, lm half of that.
    assert per_task == {"t2i": 16, "lm": 8}


def test_overlong_samples_rejected_by_default_truncated_on_request(tmp_path):
    long_ids = np.concatenate([[SMALL.bos_id], np.arange(100) % 256, [SMALL.eos_id]]).astype(np.int32)

    def sample_fn(task, rng):
        return long_ids, {"task": task, "tokenizer_sha256": SHA,
                          "image_hw": None, "answer_start": None, "source": "long"}
    write_dataset(str(tmp_path), tasks=("lm",), shards=1, per_shard=2, sample_fn=sample_fn)
    base = dict(tasks={"lm": 1.0}, seq_len=32, shuffle_buffer=0, micro_batch_size=1)
    with pytest.raises(ValueError, match=r"overlong.*lm-train-000000-0.*ids\.npy.*102 > data.seq_len 32"):
        run(UnimodLoader(cfg(tmp_path, **base), TASKS), 1)
    batch, keys = run(UnimodLoader(cfg(tmp_path, overlong="truncate", **base), TASKS), 1)[0]
    assert np.array_equal(batch["input_ids"][0].numpy(), long_ids[:32])
    assert batch["labels"][0, 0] == -100 and np.array_equal(batch["labels"][0, 1:].numpy(), long_ids[1:32])


def test_explicit_brace_shard_lists(dataset):
    root, samples = dataset
    shards = {t: f"{root}/{t}-train-{{000000..000007}}.tar" for t in ("t2i", "lm")}
    c = LoaderConfig(shards=shards, tasks={"t2i": 1.0, "lm": 1.0}, seq_len=64, micro_batch_size=2, pack=False,
                     num_workers=0, batches_per_epoch=32, tokenizer_sha256=samples["lm-train-000000-0"][2]["tokenizer_sha256"])
    assert len(c.shards["t2i"]) == 8
    seen = [k for _, ks in run(UnimodLoader(c, TASKS, layout=SMALL)) for row in ks for k in row]
    assert sorted(seen) == sorted(k for k in samples if not k.startswith("mmu"))


def test_config_and_setup_errors_name_the_field(dataset):
    root, _ = dataset
    with pytest.raises(ValueError, match="data.seq_len"):
        cfg(root, seq_len=0)
    with pytest.raises(ValueError, match="data.tasks.lm"):
        cfg(root, tasks={"lm": -1.0})
    with pytest.raises(ValueError, match="data.bad_input"):
        cfg(root, bad_input="ignore")
    for p in (1.5, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="data.caption_dropout must be a number in"):
            cfg(root, caption_dropout=p)
    for grid in ([8], [0, 8], "8x8", [8, True]):
        with pytest.raises(ValueError, match=r"data.image_grid must be \[h, w\]"):
            cfg(root, image_grid=grid)
    assert cfg(root, image_grid=(8, 8)).image_grid == [8, 8]
    with pytest.raises(ValueError, match="exactly one of data.dataset_dir and data.shards"):
        LoaderConfig()
    with pytest.raises(ValueError, match="data.batches_per_epoch is required"):
        LoaderConfig(shards={"t2i": "a.tar", "mmu": "b.tar", "lm": "c.tar"})
    with pytest.raises(ValueError, match="not in the model's task list"):
        UnimodLoader(cfg(root), ["t2i", "mmu"])
    # 8 shards per task cannot feed 4 ranks x 4 workers: a reader without a shard would hang DDP.
    with pytest.raises(ValueError, match="8 usable shards but 4 ranks x 4 workers"):
        UnimodLoader(cfg(root, num_workers=4), TASKS, rank=0, world_size=4)
    other = SMALL.to_dict() | {"vocab_size": 800}
    from model.config import VocabLayout
    with pytest.raises(ValueError, match="field vocab"):
        UnimodLoader(cfg(root), TASKS, layout=VocabLayout(**other))
    state = UnimodLoader(cfg(root), TASKS).state_dict()
    with pytest.raises(ValueError, match="seed=3 but this run has seed=5"):
        UnimodLoader(cfg(root, seed=5), TASKS).load_state_dict(state)


def test_dataset_from_the_real_writer_loads(demo_dataset):
    """Contract check against data/shards.py: the demo build validates and its batches decode."""
    from data.manifest import load_manifest
    from data.reader import iter_samples
    from data.validate import validate_dataset

    assert not validate_dataset(str(demo_dataset)).skipped
    manifest = load_manifest(str(demo_dataset))
    samples = {key: (ids, meta) for shards in manifest.shards["train"].values() for shard in shards
               for key, ids, meta in iter_samples(shard)}
    for task in TASKS:
        c = LoaderConfig(dataset_dir=str(demo_dataset), tasks={task: 1.0}, seq_len=512, micro_batch_size=2,
                         num_workers=0, batches_per_epoch=3)
        for batch, keys in run(UnimodLoader(c, TASKS, layout=manifest.vocab)):
            assert torch.all(batch["task_ids"] == TASKS.index(task))
            for b, row in enumerate(keys):
                labels = np.concatenate([make_labels(samples[k][0], task, samples[k][1], manifest.vocab) for k in row])
                assert np.array_equal(batch["labels"][b, :len(labels)].numpy(), labels)
                assert torch.all(batch["labels"][b, len(labels):] == -100)


# ----- packing against an independent next-fit ------------------------------------------------------------
def test_packing_emits_every_sample_once_in_stream_order(dataset):
    """pack=True over more than one pass: the first pass's keys are every key exactly once, each shard's
    keys together and in shard order (shuffle buffer off); each row holds its samples' tokens verbatim
    with positions 0..n-1 per sample and the padding continuing the last; and a row is closed only by a
    sample that would not fit (next-fit). A sample that overflows a row and is lost, cut or moved fails."""
    root, samples = dataset
    seq_len = 64
    for task in ("t2i", "lm"):
        c = cfg(root, tasks={task: 1.0}, pack=True, seq_len=seq_len, micro_batch_size=2, shuffle_buffer=0,
                batches_per_epoch=32)  # 32 samples never need more than 32 rows: one pass and then some
        rows = [(batch, b, row) for batch, keys in run(UnimodLoader(c, TASKS)) for b, row in enumerate(keys)]
        stream = [k for _, _, row in rows for k in row]
        first_pass = stream[:len([k for k in samples if k.startswith(task)])]
        assert sorted(first_pass) == sorted(k for k in samples if k.startswith(task)), "a sample lost or repeated"
        by_shard = [first_pass[i:i + 4] for i in range(0, len(first_pass), 4)]
        for block in by_shard:  # keys are "<task>-train-<shard>-<i>"; 4 per shard
            assert len({k.rsplit("-", 1)[0] for k in block}) == 1 and [k[-1] for k in block] == list("0123"), block
        for i, (batch, b, row) in enumerate(rows):
            lengths = [len(samples[k][1]) for k in row]
            n = sum(lengths)
            assert n <= seq_len
            assert batch["input_ids"][b, :n].tolist() == [t for k in row for t in samples[k][1].tolist()]
            assert torch.all(batch["input_ids"][b, n:] == SMALL.pad_id)
            want_pos = [p for m in lengths[:-1] for p in range(m)] + list(range(lengths[-1] + seq_len - n))
            assert batch["position_ids"][b].tolist() == want_pos
            if i + 1 < len(rows):  # next-fit: the row closed because the next sample did not fit
                assert n + len(samples[rows[i + 1][2][0]][1]) > seq_len


@pytest.mark.parametrize("lengths, seq_len, rows", [
    ([4, 4, 4], 10, 2),               # [4 4] [4 + trailing partial row]
    ([10, 3, 7, 5, 5, 1], 10, 4),     # [10] [3 7] [5 5] [1]
    ([6, 5, 5, 6], 10, 3),            # [6] [5 5] [6]
    ([3, 3, 3], 9, 1),                # exactly one full row, nothing open
    ([12, 2], 10, 2),                 # over-long counted as a full row (the stream rejects or cuts it)
    ([1], 10, 1),                     # only a partial row
])
def test_rows_per_sample_estimate_on_hand_counted_streams(lengths, seq_len, rows):
    from data.packing import estimate_rows_per_sample

    assert estimate_rows_per_sample(lengths, seq_len, pack=True) == pytest.approx(rows / len(lengths))
    assert estimate_rows_per_sample(lengths, seq_len, pack=False) == 1.0


# ----- caption dropout ------------------------------------------------------------------------------------
def _captioned_sample(task, rng):
    """make_sample, but every t2i caption has 1..8 tokens, so a dropped caption always shows."""
    from tests.shard_fixtures import make_sample, text_ids
    from data.layout import t2i_ids

    ids, meta = make_sample(task, rng)
    if task == "t2i":
        h, w = meta["image_hw"]
        codes = rng.integers(0, SMALL.visual_size, (h, w))
        ids = t2i_ids(rng.integers(0, 256, int(rng.integers(1, 9))).tolist(), codes, SMALL, text_ids(f"{h}*{w}"))
    return ids, meta


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    root = tmp_path_factory.mktemp("captions")
    return root, write_dataset(str(root), shards=4, per_shard=50, sample_fn=_captioned_sample)


def _uncaptioned(ids: np.ndarray) -> np.ndarray:
    """The t2i layout of the same image with caption_ids=[], built from the stored sample's pieces."""
    from data.layout import parse_image_block, t2i_ids
    from tests.shard_fixtures import text_ids

    codes, _ = parse_image_block(ids, SMALL)
    h, w = codes.shape
    return t2i_ids([], codes, SMALL, text_ids(f"{h}*{w}"))


def _dropped_keys(loader: UnimodLoader, samples) -> set[str]:
    """One epoch (padding: a sample per row); every row must be its sample as written or, t2i only, the
    same sample with an empty caption, with the labels of that layout. Returns the dropped keys."""
    dropped = set()
    for batch, keys in run(loader):
        task = TASKS[int(batch["task_ids"][0])]
        for b, (key,) in enumerate(keys):
            stored = samples[key][1]
            got = batch["input_ids"][b, :len(stored)].numpy()
            if np.array_equal(got, stored) and (len(stored) == 64 or batch["input_ids"][b, len(stored)] == SMALL.pad_id):
                continue
            assert task == "t2i", f"{task} sample {key} changed"
            short = _uncaptioned(stored)
            assert np.array_equal(batch["input_ids"][b, :len(short)].numpy(), short), key
            assert torch.all(batch["input_ids"][b, len(short):] == SMALL.pad_id)
            labels = batch["labels"][b, :len(short)].numpy()
            assert np.array_equal(labels, make_labels(short, "t2i", None, SMALL))
            h, w = samples[key][2]["image_hw"]
            assert (labels != -100).sum() == h * w + 1  # the codes and EOS, as for a captioned sample
            dropped.add(key)
    return dropped


def test_caption_dropout_rate_per_epoch_and_t2i_only(captioned):
    root, samples = captioned
    c = cfg(root, caption_dropout=0.3, micro_batch_size=4)
    loader = UnimodLoader(c, TASKS)
    epochs = [_dropped_keys(loader, samples) for _ in range(2)]
    # 200 t2i samples per epoch, Bernoulli(0.3): mean 60, sd 6.5.
    for d in epochs:
        assert abs(len(d) - 60) <= 26, len(d)
    assert epochs[0] != epochs[1]  # drawn per epoch, not once for the dataset
    assert loader.counters()["captions_dropped"] == len(epochs[0]) + len(epochs[1])
    # The draw depends on (seed, epoch, key) only: two workers reading other shard shares drop the same keys.
    assert _dropped_keys(UnimodLoader(cfg(root, caption_dropout=0.3, num_workers=2), TASKS), samples) == epochs[0]
    assert _dropped_keys(UnimodLoader(cfg(root, caption_dropout=0.3, seed=4), TASKS), samples) != epochs[0]
    assert not _dropped_keys(UnimodLoader(cfg(root), TASKS), samples)  # default 0.0: nothing dropped


def test_caption_dropout_is_identical_after_resume(captioned):
    root, _ = captioned
    c = cfg(root, caption_dropout=0.5, pack=True, micro_batch_size=2, seq_len=64)
    full = UnimodLoader(c, TASKS)
    reference = run(full)
    total = full.counters()["captions_dropped"]
    assert total > 0
    first = UnimodLoader(c, TASKS)
    head = run(first, 37)
    resumed = UnimodLoader(c, TASKS)
    resumed.load_state_dict(first.state_dict())
    got = head + run(resumed)
    assert len(got) == len(reference)
    for i, ((a, ka), (b, kb)) in enumerate(zip(got, reference)):
        assert ka == kb
        for name in ("input_ids", "labels", "position_ids"):
            assert torch.equal(a[name], b[name]), f"batch {i} field {name} differs after resume"
    assert resumed.counters()["captions_dropped"] == total
