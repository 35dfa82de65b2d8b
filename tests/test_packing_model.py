"""Packed rows in the model (CPU, fp32): each sample attends only to itself, its RoPE restarts, and MoD keeps
ceil(capacity * n_routable) of *its* routable tokens, so a packed row computes what its samples compute alone.

Rows are built by hand (tests/model_helpers.py): samples back to back, position ids restarting at 0, trailing
padding continuing the last sample's positions.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, UnifiedTransformer
from tests.model_helpers import LM, MMU, T2I, layer_io, pack, sample, spans

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

S = 64
CAPACITY = {"1-3": {"t2i": 0.25, "mmu": 0.5, "lm": 0.3}}
MODES = ["dense", "mod-topk", "mod-causal"]


def make_net(mode: str) -> UnifiedTransformer:
    torch.manual_seed(0)
    mod = {} if mode == "dense" else {"capacity": CAPACITY, "routing": mode.split("-")[1]}
    net = UnifiedTransformer(ModelConfig.from_preset("debug", mod=mod)).eval()
    for layer in net.model.layers:
        if layer.mod_router is not None:  # gates far from 1 and, under causal routing, many skips
            torch.nn.init.normal_(layer.mod_router.weight, std=10.0)
    return net


def packed_rows(cfg):
    """Rows of one task each (t2i, mmu, lm), 2-3 samples per row, some padded; different kept counts per row."""
    return ([[sample(cfg, T2I, 30, 1), sample(cfg, T2I, 26, 2)],
             [sample(cfg, MMU, 40, 3), sample(cfg, MMU, 24, 4)],
             [sample(cfg, LM, 20, 5), sample(cfg, LM, 24, 6), sample(cfg, LM, 15, 7)]],
            torch.tensor([T2I, MMU, LM]))


def sample_losses(logits, ids, row_spans) -> list[float]:
    """Next-token CE of each sample over its own tokens only."""
    out = []
    for b, row in enumerate(row_spans):
        for s, e in row:
            out.append(F.cross_entropy(logits[b, s : e - 1], ids[b, s + 1 : e]).item())
    return out


@pytest.mark.parametrize("mode", MODES)
def test_packed_row_logits_equal_each_sample_alone(mode):
    net = make_net(mode)
    rows, tasks = packed_rows(net.config)
    ids, pos = pack(net.config, rows, S)
    with torch.no_grad():
        packed = net(ids, task_ids=tasks, position_ids=pos)
        for b, (samples, row) in enumerate(zip(rows, spans(rows))):
            for smp, (s, e) in zip(samples, row):
                alone = net(smp[None], task_ids=tasks[b : b + 1])
                torch.testing.assert_close(packed.logits[b, s:e], alone.logits[0], atol=1e-5, rtol=1e-5)
    if mode != "dense":
        n_routable, n_selected = packed.routing[1:, :, :2].sum((0, 1)).tolist()
        assert 0 < n_selected < n_routable  # MoD really skipped tokens


@pytest.mark.parametrize("mode", MODES)
def test_replacing_a_sample_changes_no_other_samples_loss(mode):
    net = make_net(mode)
    cfg = net.config
    rows, tasks = packed_rows(cfg)
    # The middle lm sample is replaced by a shorter, different one: the last sample moves left.
    other = [list(r) for r in rows]
    other[2][1] = sample(cfg, LM, 17, 99)
    # The first t2i sample is replaced by a longer one: the second moves right.
    other[0][0] = sample(cfg, T2I, 34, 98)
    with torch.no_grad():
        ids, pos = pack(cfg, rows, S)
        a = sample_losses(net(ids, task_ids=tasks, position_ids=pos).logits, ids, spans(rows))
        ids2, pos2 = pack(cfg, other, S)
        b = sample_losses(net(ids2, task_ids=tasks, position_ids=pos2).logits, ids2, spans(other))
    # samples in order: t2i0 t2i1 | mmu0 mmu1 | lm0 lm1 lm2; t2i0 and lm1 were replaced
    kept = [1, 2, 3, 4, 6]
    assert a[0] != b[0] and a[5] != b[5]
    torch.testing.assert_close(torch.tensor([b[i] for i in kept]), torch.tensor([a[i] for i in kept]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "one-sample-rows"])
def test_exactly_k_routable_tokens_per_sample(packed):
    """ceil(c * n_routable) routable tokens per sample and every non-routable one go through each MoD layer,
    whatever the padding or packing; the routing statistics say the same."""
    net = make_net("mod-topk")
    cfg = net.config
    v = cfg.vocab
    if packed:
        rows, tasks = packed_rows(cfg)
    else:
        rows, tasks = [[sample(cfg, T2I, 64, 1)], [sample(cfg, MMU, 47, 2)], [sample(cfg, LM, 33, 3)]], \
            torch.tensor([T2I, MMU, LM])
    ids, pos = pack(cfg, rows, S)
    image = (ids >= v.visual_start) & (ids < v.visual_end)
    text = ids < v.text_size
    routable = torch.stack([image[0], image[1], image[2] | text[2]])  # t2i, mmu: image; lm: all
    nonpad = ids != v.pad_id
    caps = [0.25, 0.5, 0.3]
    for layer_idx in (1, 2, 3):
        seen, out = layer_io(net, ids, tasks, layer_idx, position_ids=pos)
        changed = (seen["y"] != seen["x"]).any(-1)
        assert not (changed & ~nonpad).any(), "padding was processed"
        assert (changed | routable | ~nonpad).all(), "a non-routable token was skipped"
        kept_rows = []
        for b, row in enumerate(spans(rows)):
            kept = 0
            for s, e in row:
                n = int(routable[b, s:e].sum())
                k = math.ceil(caps[b] * n - 1e-9)
                assert int((changed & routable)[b, s:e].sum()) == k, f"row {b} sample {s}:{e}"
                kept += k + int((nonpad & ~routable)[b, s:e].sum())
            kept_rows.append(kept)
        assert seen["P"] == max(kept_rows)
        for b, t in enumerate(tasks.tolist()):
            n_routable, n_selected = out.routing[layer_idx, t, :2].tolist()
            assert n_routable == routable[b].sum()
            assert n_selected == sum(math.ceil(caps[b] * int(routable[b, s:e].sum()) - 1e-9)
                                     for s, e in spans(rows)[b])


def test_gathered_width_is_static_for_fixed_size_images():
    """A t2i micro-batch of fixed-size images, two per row: the same P whatever the codes or the padding."""
    net = make_net("mod-topk")
    cfg = net.config
    widths = set()
    for seed in range(3):
        rows = [[sample(cfg, T2I, 28, 10 * seed + i), sample(cfg, T2I, 28, 10 * seed + i + 5)] for i in range(2)]
        ids, pos = pack(cfg, rows, S)
        seen = {}
        h = net.model.layers[1].self_attn.register_forward_pre_hook(lambda m, a: seen.update(P=a[0].shape[1]))
        try:
            with torch.no_grad():
                net(ids, task_ids=torch.tensor([T2I, T2I]), position_ids=pos)
        finally:
            h.remove()
        widths.add(seen["P"])
    assert len(widths) == 1


@pytest.mark.parametrize("mode", MODES)
def test_pipeline_stages_compute_the_model_forward_on_packed_rows(mode):
    """The stages of train/stages.py, built from the model's pieces and loaded from the model's weights through
    the stage<->HF key mapping, compute the model's forward bit for bit; DecoderPipe rebuilds the documents from
    the position ids that travel between stages."""
    from model.transformer import stage_key_to_hf
    from train.stages import stage_specs

    net = make_net(mode)
    cfg = net.config
    if mode == "mod-causal":  # the stages route with the config's mode, as training does
        assert cfg.mod.routing == "causal"
    rows, tasks = packed_rows(cfg)
    ids, pos = pack(cfg, rows, S)
    state = net.state_dict()
    stages = [spec.build() for spec in stage_specs(cfg)]
    for i, stage in enumerate(stages):
        stage.load_state_dict({k: state[stage_key_to_hf(f"{i}.{k}", cfg.num_hidden_layers)]
                               for k in stage.state_dict()})
    with torch.no_grad():
        x = (ids, tasks, pos)
        for stage in stages:
            x = stage(x)
        want = net(ids, task_ids=tasks, position_ids=pos)
    h, aux, routing, task_ids = x  # the last stage passes its hidden states on; its head runs in the loss
    assert torch.equal(stages[-1].logits(h), want.logits)
    assert aux.shape == (1,) and torch.equal(aux[0], want.aux_loss)
    assert torch.equal(routing, want.routing.round().long()) and torch.equal(task_ids, tasks)
