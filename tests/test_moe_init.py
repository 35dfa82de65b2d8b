"""The start of an MoE adaptation run (train/moe_init.py): `checkpoint.init_from_hf` (dense) + `model.moe` cuts
the dense MLPs into experts by the neuron importance of training-split calibration samples.

The importance is recomputed here apart from the analysis code: forward hooks on the dense model's own
down_proj inputs (the SwiGLU activations) in UnifiedTransformer.forward, masked to the real tokens, against
analysis/metrics.py `neuron_scores`, which runs analysis/runner.py's separate layer loop."""

from __future__ import annotations

import pytest
import torch

from tests.train_helpers import SMOKE, main_here, main_in_this_process, settings

SAMPLES = 6  # calibration samples per task


@pytest.fixture()
def in_process():
    with main_in_this_process():
        yield


def _hooked_scores(net, batches) -> torch.Tensor:
    """[L, F] mean|h_j| over real tokens * ||W_down[:, j]||, from hooks on the model's own forward."""
    L, Fn = net.config.num_hidden_layers, net.config.intermediate_size
    sums, tokens, current = torch.zeros(L, Fn, dtype=torch.float64), 0, {}

    def hook(layer):
        def pre(_module, args):
            act = args[0]  # [B, S, F]: the input of down_proj
            valid = torch.arange(act.shape[1])[None, :] < current["lengths"][:, None]
            sums[layer] += act[valid].double().abs().sum(0)
        return pre

    handles = [net.model.layers[i].mlp.down_proj.register_forward_pre_hook(hook(i)) for i in range(L)]
    try:
        with torch.no_grad():
            for b in batches:
                current["lengths"] = b.lengths
                net(b.input_ids)
                tokens += int(b.lengths.sum())
    finally:
        for h in handles:
            h.remove()
    norms = torch.stack([layer.mlp.down_proj.weight.double().norm(dim=0) for layer in net.model.layers])
    return (sums / tokens * norms).float()


def _dense_init(demo_dataset, root):
    """A random dense debug model saved as HF, and its RunConfig's model config (the smoke config's MoD plan
    dropped: the dense checkpoint a conversion starts from)."""
    from model import UnifiedTransformer
    from train.config import RunConfig

    model_cfg = RunConfig.load(SMOKE, settings(demo_dataset, root, model__mod__capacity="{}")).model
    torch.manual_seed(1234)
    net = UnifiedTransformer(model_cfg)
    net.save_hf(root / "init_hf")
    return root / "init_hf", net


def _independent_importance(net, demo_dataset, split: str, seq_len: int, tasks) -> torch.Tensor:
    from analysis.samples import load_task_samples, make_batches, open_dataset

    manifest = open_dataset(str(demo_dataset), net.config.vocab)
    per_task = []
    for task in tasks:
        samples = load_task_samples(manifest, split, task, SAMPLES)
        assert len(samples) == SAMPLES
        for s in samples:
            s.ids, s.labels = s.ids[:seq_len], s.labels[:seq_len]
        per_task.append(_hooked_scores(net.eval(), make_batches(samples, 4, net.config.vocab.pad_id, "cpu")))
    return torch.stack([s / s.sum(1, keepdim=True) for s in per_task]).mean(0)


def test_neuron_scores_equal_hooks_on_the_models_forward(demo_dataset, tmp_path):
    from analysis.metrics import measure_task, neuron_scores
    from analysis.samples import load_task_samples, make_batches, open_dataset

    _, net = _dense_init(demo_dataset, tmp_path)
    manifest = open_dataset(str(demo_dataset), net.config.vocab)
    batches = make_batches(load_task_samples(manifest, "train", "t2i", 5), 2, net.config.vocab.pad_id, "cpu")
    assert any(int(b.lengths.min()) < b.input_ids.shape[1] for b in batches)  # padding to mask out
    want = _hooked_scores(net.eval(), batches)
    got = neuron_scores(net, batches)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(measure_task(net, batches, max_tokens=8).neuron_score, got, rtol=1e-5, atol=0)


def test_run_start_converts_a_dense_checkpoint_by_training_split_importance(in_process, demo_dataset, tmp_path,
                                                                           monkeypatch):
    """A run with init_from_hf (dense) + model.moe at k < E: the importance file holds the training-split
    importance computed independently here; the first training forward is the model `from_hf` cuts with that
    importance (not with index order); the export records the same partition; a second start reuses the file."""
    from safetensors.torch import load_file

    from model import UnifiedTransformer
    from model.hf import MOE_FILE
    from model.moe import snake_partition
    from train.config import RunConfig
    from train.moe_init import IMPORTANCE_FILE

    init, net = _dense_init(demo_dataset, tmp_path)
    moe = '{layers: "2-3", num_experts: 4, top_k: 2, router: task}'
    out = tmp_path / "run"
    seen = []
    real = UnifiedTransformer.forward

    def spy(self, input_ids, task_ids=None, position_ids=None, routing=None, labels=None):
        o = real(self, input_ids, task_ids=task_ids, position_ids=position_ids, routing=routing, labels=labels)
        if labels is not None and not seen:
            seen.append(dict(input_ids=input_ids.clone(), task_ids=task_ids.clone(),
                             position_ids=position_ids.clone(), labels=labels.clone(), loss=o.loss.item()))
        return o

    monkeypatch.setattr(UnifiedTransformer, "forward", spy)
    fields = dict(model__mod__capacity="{}", model__moe=moe, checkpoint__init_from_hf=init,
                  checkpoint__moe_calibration_samples=SAMPLES, checkpoint__export_hf="true",
                  logging__eval_at_end="false")
    assert main_here(demo_dataset, out, run__max_steps=1, **fields) == 0
    cfg = RunConfig.load(out / "config.yaml")

    file = out / IMPORTANCE_FILE
    imp = load_file(str(file))["importance"]
    tasks = [t for t, w in cfg.data.tasks.items() if w > 0]
    want = _independent_importance(net, demo_dataset, "train", cfg.data.seq_len, tasks)
    torch.testing.assert_close(imp, want, rtol=1e-4, atol=1e-9)
    # The validation split would rank the neurons otherwise: the test tells the splits apart.
    assert not torch.allclose(imp, _independent_importance(net, demo_dataset, "validation", cfg.data.seq_len, tasks),
                              rtol=1e-3, atol=0)

    # The trainer's first forward is the model cut by that importance (k < E: the partition decides the loss).
    first = seen[0]
    batch = {k: first[k] for k in ("input_ids", "task_ids", "position_ids", "labels")}
    moe_dict = cfg.model.moe.to_dict()
    layers = cfg.model.moe.layers
    by_importance = UnifiedTransformer.from_hf(init, moe=moe_dict, importance={i: imp[i] for i in layers})
    by_index = UnifiedTransformer.from_hf(init, moe=moe_dict)
    with torch.no_grad():
        assert by_importance(**batch).loss.item() == pytest.approx(first["loss"], rel=1e-6)
        assert by_index(**batch).loss.item() != pytest.approx(first["loss"], rel=1e-4)

    # The export writes each expert's source neurons: the snake partition of the importance.
    saved = load_file(str(out / "hf" / MOE_FILE))
    for i in layers:
        assert torch.equal(saved[f"model.layers.{i}.mlp.expert_neurons"], torch.stack(snake_partition(imp[i], 4)))

    # A second start from the same checkpoint and data reuses the file rather than recomputing it.
    stamp = file.stat().st_mtime_ns
    out2 = tmp_path / "run2"
    out2.mkdir()
    (out2 / IMPORTANCE_FILE).write_bytes(file.read_bytes())
    import train.moe_init as moe_init

    monkeypatch.setattr(moe_init, "calibrate", lambda *a, **k: pytest.fail("recomputed a valid importance file"))
    from tests.train_helpers import release_process_group

    release_process_group()
    assert main_here(demo_dataset, out2, run__max_steps=1, **{**fields, "checkpoint__export_hf": "false"}) == 0
    assert file.stat().st_mtime_ns == stamp


def test_calibration_needs_a_manifest(demo_dataset, tmp_path):
    from train.config import RunConfig

    doc = settings(demo_dataset, tmp_path, model__moe='{layers: "1", num_experts: 2, top_k: 1}',
                   checkpoint__init_from_hf=str(tmp_path / "hf"), data__dataset_dir="null",
                   data__shards='{t2i: ["x.tar"], mmu: ["y.tar"], lm: ["z.tar"]}', data__batches_per_epoch=10)
    with pytest.raises(ValueError, match="checkpoint.moe_calibration_samples=64 .* data.dataset_dir"):
        RunConfig.load(SMOKE, doc)


def test_a_failed_calibration_raises_and_writes_nothing(demo_dataset, tmp_path, monkeypatch):
    """Rank 0's calibration error is raised after the barrier (so no rank waits on a file that never comes), and
    no importance file is left for a restart to trust."""
    import train.moe_init as moe_init
    from train.config import RunConfig

    init, _ = _dense_init(demo_dataset, tmp_path)
    cfg = RunConfig.load(SMOKE, settings(demo_dataset, tmp_path / "run", model__mod__capacity="{}",
                                         model__moe='{layers: "1", num_experts: 2, top_k: 1}',
                                         checkpoint__init_from_hf=str(init)))

    def broken(*_a, **_k):
        raise ValueError("shard x: sample y: field ids is broken")

    monkeypatch.setattr(moe_init, "calibrate", broken)
    with pytest.raises(ValueError, match="field ids is broken"):
        moe_init.conversion_importance(cfg, torch.device("cpu"))
    assert not (tmp_path / "run" / moe_init.IMPORTANCE_FILE).exists()


def test_export_goes_on_when_the_source_checkpoint_changed(demo_dataset, tmp_path):
    """The export asks init_from_hf for the source neuron order; a directory that no longer holds a checkpoint
    costs only that order (expert order is as valid a dense MLP), not the export."""
    from model import UnifiedTransformer
    from train.config import RunConfig
    from train.finish import export_hf

    gone = tmp_path / "init_hf"
    gone.mkdir()  # exists, but holds no checkpoint any more
    cfg = RunConfig.load(SMOKE, settings(demo_dataset, tmp_path / "run", model__mod__capacity="{}",
                                         model__moe='{layers: "1", num_experts: 2, top_k: 1}',
                                         checkpoint__init_from_hf=str(gone)))
    torch.manual_seed(0)
    net = UnifiedTransformer(cfg.model)
    export_hf(cfg, tmp_path / "hf", net.state_dict(), rank=0)
    back = UnifiedTransformer.from_hf(tmp_path / "hf")
    for k, v in net.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
