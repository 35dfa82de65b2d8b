"""Redundancy analysis (analysis/, tools/analyze.py): each metric on a tiny model with a known answer,
the plan through the config loader, and the CLI end to end on the demo data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from analysis import probes
from analysis.checkpoint import load_dense
from analysis.config import AnalysisConfig
from analysis.metrics import arank, attention_probs, measure_task, subsample_positions
from analysis.plan import budget_capacities, nonroutable_fraction, plan_arank, plan_stability, write_plan
from analysis.token_skip import token_skip_curves
from analysis.runner import Edits, mean_nll, run_hidden
from analysis.samples import Batch, load_task_samples, make_batches, open_dataset
from model.config import ModelConfig, read_mod_plan
from model.layers import apply_rope, rope_cos_sin
from model.transformer import UnifiedTransformer
from tests.conftest import run_module
from train.config import RunConfig

IDENTITY = 2  # the layer made an identity in the known-answer tests


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _net(identity: int | None = None, seed: int = 0) -> UnifiedTransformer:
    torch.manual_seed(seed)
    net = UnifiedTransformer(ModelConfig.from_preset("debug", initializer_range=0.2)).eval()
    if identity is not None:
        layer = net.model.layers[identity]
        with torch.no_grad():  # attention and MLP both add exactly zero: the block is the identity
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return net


def _batches(net, n_batches=2, B=3, S=24, seed=0) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, net.config.vocab.text_size, (B, S), generator=g)
        lengths = torch.tensor([S - 5 * r for r in range(B)])
        labels = ids.clone()
        for r, n in enumerate(lengths.tolist()):
            ids[r, n:] = net.config.vocab.pad_id
            labels[r, n:] = -100
        labels[:, 0] = -100
        out.append(Batch(ids, labels, lengths))
    return out


# ----- runner ----------------------------------------------------------------------------------------
def test_unedited_runner_equals_the_model_forward():
    net = _net()
    ids = torch.randint(0, net.config.vocab_size, (2, 17))
    with torch.no_grad():
        ours = net.lm_head(net.model.norm(run_hidden(net, ids)))
        torch.testing.assert_close(ours, net(ids).logits, rtol=1e-5, atol=1e-5)
        # resuming from a layer's input gives the same result as the full pass
        x2 = run_hidden(net, ids, stop=2)
        torch.testing.assert_close(run_hidden(net, ids, start=2, x=x2), run_hidden(net, ids))


def test_runner_edits_remove_exactly_the_named_parts():
    net = _net()
    ids = torch.randint(0, net.config.vocab_size, (1, 9))
    with torch.no_grad():
        full = run_hidden(net, ids)
        x1 = run_hidden(net, ids, stop=1)
        # skipping block 1 = feeding layer 1's input straight to layer 2
        torch.testing.assert_close(run_hidden(net, ids, Edits(skip={1: "block"})), run_hidden(net, ids, start=2, x=x1))
        # pruning every neuron of a layer = skipping its MLP
        keep = torch.zeros(net.config.intermediate_size, dtype=torch.bool)
        torch.testing.assert_close(run_hidden(net, ids, Edits(mlp_keep={3: keep})), run_hidden(net, ids, Edits(skip={3: "mlp"})))
        assert not torch.allclose(run_hidden(net, ids, Edits(skip={0: "attn"})), full)
    with pytest.raises(ValueError, match="Edits.skip"):
        Edits(skip={0: "everything"})


# ----- ARank -------------------------------------------------------------------------------------------
def test_arank_known_answers():
    n = 10
    sink = torch.zeros(n, n)
    sink[:, 0] = 1.0  # every token attends only to token 0: rank 1 after the diagonal is zeroed
    assert arank(sink[None]).tolist() == [1.0]
    causal = torch.ones(n, n).tril()
    uniform = causal / causal.sum(1, keepdim=True)  # uniform over the past: rank n - 1 without the diagonal
    assert arank(uniform[None]).tolist() == [n - 1.0]
    assert arank(torch.eye(n)[None]).tolist() == [0.0]  # attending only to oneself leaves nothing
    assert arank(torch.stack([sink, uniform])).tolist() == [1.0, n - 1.0]  # one rank per head


def test_attention_maps_match_sdpa_including_gqa_and_subsampling():
    net = _net()
    attn = net.model.layers[1].self_attn
    assert attn.num_heads != attn.num_kv_heads  # the debug preset uses GQA
    S, cfg = 20, net.config
    x = torch.randn(S, cfg.hidden_size)
    cos, sin = rope_cos_sin(torch.arange(S)[None], cfg.head_dim, cfg.rope_theta, x.dtype)
    with torch.no_grad():
        probs = attention_probs(attn, x, cos[0], sin[0], torch.arange(S))  # [H, S, S]
        q = attn.q_proj(x).view(1, S, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).view(1, S, attn.num_kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).view(1, S, attn.num_kv_heads, -1).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[0]
        mine = probs @ v[0].repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=0)
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)
        rows = subsample_positions(S, 7)
        torch.testing.assert_close(attention_probs(attn, x, cos[0], sin[0], rows), probs[:, rows])
    assert torch.allclose(probs.sum(-1), torch.ones(())) and probs.triu(1).abs().max() == 0


def test_subsample_positions():
    assert subsample_positions(5, 8).tolist() == [0, 1, 2, 3, 4]
    pos = subsample_positions(1000, 64)
    assert len(pos) == 64 and pos[0] == 0 and pos[-1] == 999 and torch.all(pos[1:] > pos[:-1])


# ----- layer importance, neuron scores, probes ------------------------------------------------------------
def test_identity_layer_has_cosine_one_no_skip_cost_and_is_picked_first():
    net = _net(identity=IDENTITY)
    batches = _batches(net)
    m = measure_task(net, batches, max_tokens=16)
    for cos in (m.cos_block, m.cos_attn, m.cos_mlp):
        assert cos[IDENTITY] == pytest.approx(1.0, abs=1e-6)
        assert max(c for i, c in enumerate(cos) if i != IDENTITY) < 0.999
    for kind in ("block", "attn", "mlp"):
        assert probes.redundancy_order(m, kind)[0] == IDENTITY
    assert len(m.arank) == 4 and all(0 < r <= 1 for r in m.arank_ratio)
    assert m.samples == 6 and m.tokens == 2 * (24 + 19 + 14)
    assert m.arank_tokens == pytest.approx((16 + 16 + 14) / 3)  # 24 and 19 subsampled to 16

    base = {"lm": mean_nll(net, batches)}
    deltas = probes.skip_deltas(net, {"lm": batches}, base)["lm"]
    for kind in ("block", "attn", "mlp"):
        assert deltas[kind][IDENTITY] == pytest.approx(0.0, abs=1e-5)
        assert all(abs(d) > 1e-4 for i, d in enumerate(deltas[kind]) if i != IDENTITY)
    # the sweep's prefix reuse agrees with a plain full forward per edit
    assert deltas["block"][0] == pytest.approx(mean_nll(net, batches, Edits(skip={0: "block"})) - base["lm"], abs=1e-5)

    compute = probes.ComputeModel(net, {"lm": 20.0})
    depth = probes.depth_pruning(net, {"lm": m}, {"lm": batches}, base, compute, max_layers=2)["lm"]
    assert depth["block"][0]["layers"] == [IDENTITY] and depth["block"][0]["delta_loss"] == pytest.approx(0, abs=1e-5)
    assert abs(depth["block"][1]["delta_loss"]) > 1e-4
    p = compute.parts["lm"]
    assert depth["block"][0]["removed_compute"] == pytest.approx((p["attn"] + p["mlp"]) / p["total"])

    inter = probes.interaction(net, {"a": m, "b": m}, {"a": batches, "b": batches}, {"a": base["lm"], "b": base["lm"]},
                               n_layers=1, width=0.25)
    assert inter["blocks_skipped"] == {"a": [IDENTITY], "b": [IDENTITY]}
    assert all(abs(v) < 1e-5 for row in inter["blocks"].values() for v in row.values())


def test_neuron_scores_and_width_pruning_known_answer():
    net = _net()
    Fn = net.config.intermediate_size
    dead = torch.arange(0, Fn, 2)  # half the neurons of every layer write nothing (zero W_down column)
    with torch.no_grad():
        for layer in net.model.layers:
            layer.mlp.down_proj.weight[:, dead] = 0
    batches = _batches(net)
    m = measure_task(net, batches, max_tokens=16)
    assert torch.all(m.neuron_score[:, dead] == 0) and torch.all(m.neuron_score[:, 1::2] > 0)
    # one score by hand: mean |h_j| over real tokens times ||W_down[:, j]||
    layer, j = 1, 3
    acts = []
    hook = lambda mod, inp, out: acts.append(inp[0])  # noqa: E731 - down_proj's input is h
    handle = net.model.layers[layer].mlp.down_proj.register_forward_hook(hook)
    with torch.no_grad():
        for b in batches:
            net(b.input_ids)
    handle.remove()
    real = [a[r, :n, j] for a, b in zip(acts, batches) for r, n in enumerate(b.lengths.tolist())]
    by_hand = torch.cat(real).abs().mean() * net.model.layers[layer].mlp.down_proj.weight[:, j].norm()
    assert m.neuron_score[layer, j].item() == pytest.approx(by_hand.item(), rel=1e-4)

    base = {"lm": mean_nll(net, batches)}
    compute = probes.ComputeModel(net, {"lm": 20.0})
    rows = probes.width_pruning(net, {"lm": m}, {"lm": batches}, base, compute, [0.5, 0.75])["lm"]
    assert rows[0]["delta_loss"] == pytest.approx(0.0, abs=1e-6)  # exactly the dead neurons went
    assert abs(rows[1]["delta_loss"]) > 1e-4  # live neurons went: the function changes (random weights: either way)
    p = compute.parts["lm"]
    assert rows[0]["removed_compute"] == pytest.approx(0.5 * 4 * p["mlp"] / p["total"])

    moe = probes.moe_probe(net, {"lm": m}, {"lm": batches}, base, num_experts=4, top_ks=[2, 4], layers=[0, 3])
    res = {r["top_k"]: r for r in moe["results"]["lm"]}
    assert res[4]["delta_loss"] == pytest.approx(0.0, abs=1e-5)  # all experts: the dense model
    assert type(net.model.layers[0].mlp).__name__ == "MLP"  # dense MLPs restored


# ----- plan ------------------------------------------------------------------------------------------
def test_plan_picks_lowest_arank_half_and_sets_capacity(tmp_path):
    cfg = AnalysisConfig(capacity_min=0.125, capacity_max=0.9)
    ratio = {"t2i": [0.9, 0.5, 0.05, 0.3, 0.95, 0.2, 0.8, 0.97],
             "mmu": [0.99, 0.99, 0.99, 0.95, 0.4, 0.4, 0.4, 0.95], "lm": [1.0] * 8}
    source = ModelConfig.from_preset("demo").mod.to_dict()
    mod, details = plan_arank(ratio, source, cfg)
    # t2i: 4 lowest = layers 2, 5, 3, 1; capacity = ratio (a fraction of routable tokens), >= 0.125, up to 0.01
    assert details["t2i"]["mod_layers"] == [1, 2, 3, 5]
    assert {k: v["t2i"] for k, v in mod["capacity"].items() if "t2i" in v} == {"1": 0.5, "2": 0.13, "3": 0.3, "5": 0.2}
    # mmu: the 0.95 tie of layers 3 and 7 goes to the deeper; 0.95 is clipped to capacity_max
    assert details["mmu"]["lowest_arank_layers"] == [4, 5, 6, 7]
    assert details["mmu"]["capacity"] == {"4": 0.4, "5": 0.4, "6": 0.4, "7": 0.9}
    # lm: ARank ratio 1.0 everywhere: its ties go to the deepest layers, clipped to capacity_max
    assert details["lm"]["capacity"] == {"4": 0.9, "5": 0.9, "6": 0.9, "7": 0.9}

    plan_path, set_path = write_plan(tmp_path, mod, "test plan\nsecond line")
    assert plan_path.read_text().startswith("# test plan\n# second line\n")
    loaded = read_mod_plan(plan_path)
    built = ModelConfig.from_dict({"preset": "demo", "mod": loaded})
    assert built.mod.mod_layers() == [1, 2, 3, 4, 5, 6, 7]
    assert built.mod.capacity_of(2, "t2i") == 0.13 and built.mod.capacity_of(2, "mmu") == 1.0
    assert built.mod.to_dict()["capacity"] == mod["capacity"]
    assert built.mod.routable == ModelConfig.from_preset("demo").mod.routable

    from train.config import apply_overrides  # what `train/main.py --set "$(cat set_mod.txt)"` does
    doc = apply_overrides({"model": {"preset": "demo"}}, [set_path.read_text().strip()])
    assert ModelConfig.from_dict(doc["model"]).mod.to_dict() == built.mod.to_dict()

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"mod": mod, "preset": "demo"}}))
    with pytest.raises(ValueError, match="exactly a model"):
        read_mod_plan(bad)


def test_budget_capacities_spend_the_flops_target_where_the_loss_cost_is_lowest():
    grid = [0.1, 0.2, 0.5]
    # delta[l][j]: loss increase of layer l at grid[j]; layer 0 costly, layer 2 free, layer 1 in between with a
    # noisy bump (0.5 costs more than 0.2) that the envelope flattens
    delta = [[5.0, 4.0, 2.0], [0.3, 0.1, 0.2], [0.0, 0.0, 0.0]]
    saved = [[0.18, 0.16, 0.10]] * 3  # every layer saves the same FLOPs at the same capacity
    caps, total = budget_capacities(delta, saved, grid, target=0.18)
    assert caps == [1.0, 1.0, 0.1] and total == pytest.approx(0.18)  # the free layer, all the way down
    caps, total = budget_capacities(delta, saved, grid, target=0.30)
    # then layer 1: its envelope is [0.3, 0.2, 0.2]; per FLOP 0.2/0.10 at 0.5 or 0.2/0.16 at 0.2 -> 0.2
    assert caps == [1.0, 0.2, 0.1] and total == pytest.approx(0.34)
    caps, total = budget_capacities(delta, saved, grid, target=0.99)  # unreachable: everything at the floor
    assert caps == [0.1, 0.1, 0.1] and total == pytest.approx(0.54)
    # ties go to the deeper layer
    caps, _ = budget_capacities([[0.0] * 3] * 3, saved, grid, target=0.1)
    assert caps == [1.0, 1.0, 0.1]


def test_token_skip_layer_equals_the_models_mod_layer():
    """analysis/token_skip.py's masked simulation of a MoD layer computes what model/mod.py's gathered layer
    computes when the router ranks tokens like the score (router weights tiny: gate 2*sigmoid(r) ~ 1)."""
    from analysis.token_skip import _mod_layer
    from model.mod import KIND_IMAGE, KIND_PAD, token_kinds
    from tests.model_helpers import layer_io, sample

    cfg = ModelConfig.from_preset("debug", mod={"capacity": {"2": {"t2i": 0.25}}, "router_init_std": 1e-7})
    torch.manual_seed(0)
    net = UnifiedTransformer(cfg).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([sample(cfg, 0, 40, n_text=5, generator=g) for _ in range(3)])
    ids[2, 30:] = cfg.vocab.pad_id
    tasks = torch.zeros(3, dtype=torch.long)
    seen, _ = layer_io(net, ids, tasks, 2)
    layer = net.model.layers[2]
    kinds = token_kinds(ids, cfg.vocab)
    cos, sin = rope_cos_sin(torch.arange(40).expand(3, 40), cfg.head_dim, cfg.rope_theta, torch.float32)
    with torch.no_grad():
        score = layer.router_logits(seen["x"], tasks)[0]
        ours = _mod_layer(layer, seen["x"], cos, sin, kinds == KIND_IMAGE, kinds != KIND_PAD, score, 0.25)
    real = (seen["y"] != seen["x"]).any(-1)
    assert torch.equal((ours != seen["x"]).any(-1), real)  # the same tokens went through the layer
    torch.testing.assert_close(ours, seen["y"], atol=2e-6, rtol=1e-5)


def _trained_with_identity_layers(manifest, layers: list[int], steps: int = 120) -> UnifiedTransformer:
    """A debug-size dense model trained briefly on the demo's three tasks, with `layers` held at the identity
    (attention and MLP outputs zero, frozen): skipping any token there costs nothing, and skipping tokens in
    the trained layers costs (a random model's loss can even fall when a layer is skipped)."""
    torch.manual_seed(0)
    net = UnifiedTransformer(ModelConfig.from_preset("debug", vocab=manifest.vocab.to_dict()))
    frozen = [net.model.layers[i].self_attn.o_proj.weight for i in layers] + \
             [net.model.layers[i].mlp.down_proj.weight for i in layers]
    with torch.no_grad():
        for w in frozen:
            w.zero_()
            w.requires_grad_(False)
    samples = [s for t in ("t2i", "mmu", "lm") for s in load_task_samples(manifest, "train", t, 24)]
    batches = make_batches(samples, 8, net.config.vocab.pad_id, "cpu")
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        b = batches[step % len(batches)]
        loss = F.cross_entropy(net(b.input_ids).logits[:, :-1].flatten(0, 1), b.labels[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_token_skip_plan_routes_the_redundant_layers_the_same_way_every_time(demo_dataset, tmp_path):
    """Known answer: layers 1 and 3 made identities cost no loss at any capacity, so a FLOPs target that they
    can meet routes exactly them at the lowest capacity, for every task; the curves say so (0 there, > 0
    elsewhere at capacity 0), the plan is the same twice, and each half of the calibration set (and another
    calibration size) picks the same layers."""
    manifest = open_dataset(str(demo_dataset), ModelConfig.from_dict(
        {"preset": "debug", "vocab": json.loads((demo_dataset / "manifest.json").read_text())["vocab"]}).vocab)
    net = _trained_with_identity_layers(manifest, [1, 3])
    batches = make_batches(load_task_samples(manifest, "train", "t2i", 6), 3, net.config.vocab.pad_id, "cpu")
    delta, dense, count = token_skip_curves(net, batches, "t2i", [0.25, 0.5])
    assert count > 0 and math.isfinite(dense)
    assert all(abs(v) < 1e-5 for i in (1, 3) for v in delta[i])
    assert all(delta[i][0] > 0.01 for i in (0, 2))  # skipping every image token of a trained layer costs

    def plan(samples, out):
        proc = run_module("tools.analyze", "--checkpoint", str(hf), "--data", str(demo_dataset), "--out", str(out),
                          "--device", "cpu", "--calib-samples", str(samples), "--batch-size", "4", "--no-probes",
                          "--flops-target", "0.2", "--capacity-grid", "0.125,0.25,0.5", "--threads", "1", timeout=240)
        assert proc.returncode == 0, proc.stderr
        return (out / "mod_plan.yaml").read_text(), yaml.safe_load((out / "mod_plan.yaml").read_text())

    hf = tmp_path / "identity_hf"
    net.save_hf(hf)
    text_a, doc = plan(6, tmp_path / "p1")
    text_b, _ = plan(6, tmp_path / "p2")
    assert text_a.split("\nmodel:", 1)[1] == text_b.split("\nmodel:", 1)[1]  # same checkpoint and data: same file
    mod, record = doc["model"]["mod"], doc["plan"]
    assert mod["capacity"] == {"1": {t: 0.125 for t in ("t2i", "mmu", "lm")}, "3": {t: 0.125 for t in ("t2i", "mmu", "lm")}}
    assert record["measure"] == "token_skip" and record["parameters"]["flops_target"] == 0.2
    assert record["parameters"]["capacity_grid"] == [0.125, 0.25, 0.5]
    assert len(record["per_layer"]["t2i"]["delta_loss"]) == 4 and record["per_layer"]["t2i"]["capacity"][0] == 0.0
    for t in ("t2i", "mmu", "lm"):
        assert record["stability"][t]["full"] == [1, 3] and record["per_task"][t]["target_reached"]
    # Each half of the calibration set alone: where the trained layers clearly cost (t2i: > 0.1 nats at every
    # capacity) the halves pick the same layers. (mmu's answers are learnt so well that skipping image tokens
    # in layer 2 measures ~0 there, a tie with the identity layers that either half may break its own way.)
    st = record["stability"]["t2i"]
    assert st["half_a"] == st["half_b"] == [1, 3] and st["jaccard"] == 1.0
    _, other = plan(10, tmp_path / "p3")  # a different calibration set
    assert other["model"]["mod"]["capacity"] == mod["capacity"]
    assert read_mod_plan(tmp_path / "p1" / "mod_plan.yaml") == mod  # the record is not part of the plan


def test_plan_stability_reports_the_smallest_overlap():
    plans = {"full": {"t2i": {"mod_layers": [1, 2, 3]}, "mmu": {"mod_layers": []}},
             "half_a": {"t2i": {"mod_layers": [2, 3]}, "mmu": {"mod_layers": []}},
             "half_b": {"t2i": {"mod_layers": [1, 3]}, "mmu": {"mod_layers": []}}}
    st = plan_stability(plans)
    assert st["t2i"]["jaccard"] == pytest.approx(1 / 3)  # the halves share layer 3 of {1, 2, 3}
    assert st["t2i"]["half_a"] == [2, 3] and st["mmu"]["jaccard"] == 1.0


def test_plan_files_must_hold_a_model_mod_mapping(tmp_path):
    f = tmp_path / "mod_plan.yaml"
    f.write_text(yaml.safe_dump({"model": {"mod": {"capacity": {"1": {"t2i": 0.5}}}}, "plan": {"measure": "x"}}))
    assert read_mod_plan(f) == {"capacity": {"1": {"t2i": 0.5}}}
    for bad in ({"model": {"mod": {}}, "other": 1}, {"model": {"mod": {}}, "plan": [1]}, {"plan": {}}):
        f.write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match="model: {mod"):
            read_mod_plan(f)


def test_nonroutable_fraction():
    layout = ModelConfig.from_preset("debug").vocab
    v = layout.visual_start
    ids = np.array([layout.bos_id, 5, 6, layout.boi_id, v, v + 1, v + 2, layout.eoi_id, layout.eos_id, 7])
    assert nonroutable_fraction(ids, "image", layout) == pytest.approx(0.7)
    assert nonroutable_fraction(ids, "text", layout) == pytest.approx(0.7)
    assert nonroutable_fraction(ids, "all", layout) == pytest.approx(0.4)


def test_config_errors_name_the_field():
    for kwargs, field in [({"calib_samples": 0}, "calib_samples"), ({"capacity_min": 0.95}, "capacity_min"),
                          ({"width_fractions": [1.5]}, "width_fractions"), ({"moe_top_k": [5]}, "moe_top_k"),
                          ({"mod_fraction": 0}, "mod_fraction"), ({"arank_max_tokens": 1}, "arank_max_tokens")]:
        with pytest.raises(ValueError, match=field):
            AnalysisConfig(**kwargs)
    assert AnalysisConfig(moe_experts=8).moe_top_k == [1, 4, 8]
    with pytest.raises(ValueError, match="moe_layers names layer 7"):
        AnalysisConfig(moe_layers=[7]).check_model(4, ["t2i"])


# ----- data and checkpoints -------------------------------------------------------------------------------
def _demo_model(dataset, tmp_path):
    vocab = json.loads((dataset / "manifest.json").read_text())["vocab"]
    torch.manual_seed(0)
    net = UnifiedTransformer(ModelConfig.from_preset("debug", vocab=vocab, mod={"capacity": {"3": {"t2i": 0.5}}}))
    hf = tmp_path / "hf"
    net.save_hf(hf)
    return net, hf


def test_calibration_comes_from_train_and_vocab_is_checked(demo_dataset, tmp_path):
    net, _ = _demo_model(demo_dataset, tmp_path)
    manifest = open_dataset(str(demo_dataset), net.config.vocab)
    samples = load_task_samples(manifest, "train", "mmu", 8)
    assert len(samples) == 8 and all("-train-" in s.shard for s in samples)
    assert len({s.shard for s in samples}) == min(8, len(manifest.shards["train"]["mmu"]))  # round-robin
    batches = make_batches(samples, 3, net.config.vocab.pad_id, "cpu")
    assert [b.input_ids.shape[0] for b in batches] == [3, 3, 2]
    assert all((b.labels != -100).sum() > 0 for b in batches)
    other = ModelConfig.from_preset("debug").vocab
    with pytest.raises(ValueError, match="field vocab.text_size"):
        open_dataset(str(demo_dataset), other)


def test_load_dense_from_run_checkpoint_drops_routers(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", mod={"capacity": {"2-3": {"t2i": 0.25}}})
    net = UnifiedTransformer(cfg)
    tag = tmp_path / "run" / "checkpoints" / "step_00000010"
    tag.mkdir(parents=True)
    # a ZeRO-0 DeepSpeed checkpoint as the trainer writes it (module states + COMPLETE marker)
    torch.save({"module": net.state_dict()}, tag / "mp_rank_00_model_states.pt")
    (tag / "COMPLETE").write_text("10\n")
    data = {"dataset_dir": str(tmp_path / "data"), "seq_len": 256}
    run = RunConfig.from_dict({"model": cfg.to_dict(), "data": data})
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(run.to_dict()))  # as the trainer writes it
    loaded = load_dense(tmp_path / "run")
    assert loaded.net.config.mod.mod_layers() == [] and loaded.source_mod["capacity"] == {"2": {"t2i": 0.25},
                                                                                          "3": {"t2i": 0.25}}
    assert not any("mod_router" in k for k in loaded.net.state_dict())
    torch.testing.assert_close(loaded.net.model.layers[2].mlp.up_proj.weight, net.model.layers[2].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="does not exist"):
        load_dense(tmp_path / "nowhere")


def test_cli_end_to_end_on_the_demo_data(demo_dataset, tmp_path):
    net, hf = _demo_model(demo_dataset, tmp_path)
    out = tmp_path / "plan"
    proc = run_module("tools.analyze", "--checkpoint", str(hf), "--data", str(demo_dataset), "--out", str(out),
                      "--device", "cpu", "--calib-samples", "4", "--eval-samples", "3", "--batch-size", "4",
                      "--arank-max-tokens", "48", "--moe-experts", "2", "--width-fractions", "0.5",
                      "--prune-max-layers", "1", "--accuracy-images-per-digit", "1", "--threads", "1", timeout=240)
    assert proc.returncode == 0, proc.stderr
    for name in ("mod_plan.yaml", "set_mod.txt", "measurements.json", "heatmaps.png", "interaction.png", "probes.png",
                 "probes.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "heatmaps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "measurements.json").read_text())
    tasks = ["t2i", "mmu", "lm"]
    assert report["tasks"] == tasks
    assert all(report["calibration"][t]["split"] == "train" and report["calibration"][t]["samples"] == 4 for t in tasks)
    assert all(report["evaluation"][t]["split"] == "validation" for t in tasks)
    assert report["calibration"]["t2i"]["arank_positions_mean"] == 48  # demo t2i samples (85-90 tokens) subsampled to 48
    for t in tasks:
        lay = report["layers"][t]
        assert len(lay["arank"]) == 4 and len(lay["skip_delta"]["mlp"]) == 4
        assert all(math.isfinite(v) for v in lay["cos_block"])
    assert set(report["interaction"]["blocks"]) == set(tasks)
    assert set(report["probes"]["depth_pruning"]["mmu"]) == {"block", "attn", "mlp"}
    # The probes' rows carry the evaluator's accuracy of their own task beside the loss (lm: loss only).
    own = {"mmu": "understanding/accuracy", "t2i": "generation/accuracy"}
    pr = report["probes"]
    for t in tasks:
        rows = [*(r for rs in pr["depth_pruning"][t].values() for r in rs), *pr["width_pruning"][t],
                *pr["moe"]["results"][t]]
        for r in [report["evaluation"][t], *rows]:
            assert {k for k in r if k.endswith("/accuracy")} == ({own[t]} if t in own else set()), (t, r)
            assert all(0.0 <= r[k] <= 1.0 for k in r if k.endswith("/accuracy"))
    table = (out / "probes.md").read_text()
    assert "| understanding % | generation % |" in table and "| mmu | none (dense) |" in table
    assert len([line for line in table.splitlines() if line.startswith("| t2i |")]) == 1 + 3 + 1 + 2
    mod = read_mod_plan(out / "mod_plan.yaml")
    assert mod == report["plan"]["mod"]
    built = ModelConfig.from_dict({**{k: v for k, v in net.config.to_dict().items() if k != "mod"}, "mod": mod})
    assert built.mod.tasks == tasks and built.mod.mod_layers()  # half the layers per task, some capacity < 1
    for t, d in report["plan"]["per_task"].items():
        assert d["mod_layers"] and 0 < d["forward_flops_saved"]  # token_skip (the default) routed something
    assert report["plan"]["record"]["measure"] == "token_skip"
    # the source checkpoint's own MoD plan is not what was analysed (dense) nor copied into the plan
    assert report["plan"]["mod"]["routable"] == net.config.mod.routable


def test_arank_plans_record_their_tolerance_and_stability(demo_dataset, tmp_path):
    """--measure arank: UniMoD's rule, with the rank tolerance it hinges on recorded beside the per-layer ARank,
    and the halves of the calibration set planned on their own."""
    from tools.analyze import run_analysis

    _, hf = _demo_model(demo_dataset, tmp_path)
    cfg = AnalysisConfig(measure="arank", rank_rtol=1e-2, calib_samples=6, eval_samples=3, batch_size=3,
                         arank_max_tokens=32, probes=False)
    report = run_analysis(str(hf), str(demo_dataset), str(tmp_path / "plan"), cfg, log=lambda *_: None)
    record = yaml.safe_load((tmp_path / "plan" / "mod_plan.yaml").read_text())["plan"]
    assert record["measure"] == "arank"
    assert record["parameters"]["rank_rtol"] == 0.01 and record["parameters"]["mod_fraction"] == 0.5
    for t in ("t2i", "mmu", "lm"):
        assert len(record["per_layer"][t]["arank_ratio"]) == 4
        assert len(record["stability"][t]["full"]) == 2  # half of 4 layers, from all samples and from each half
        assert len(record["stability"][t]["half_a"]) == len(record["stability"][t]["half_b"]) == 2
        # the plan file's numbers are the measurements' (rounded to 6 significant digits for YAML)
        assert record["per_layer"][t]["arank_ratio"] == pytest.approx(report["layers"][t]["arank_ratio"], rel=1e-5)


def test_probe_edits_run_the_pruned_model_on_every_path(demo_dataset, tmp_path):
    """`weight_edits` makes the model's own forward compute analysis/runner.py's Edits (skips and masked neurons),
    the width probe's accuracy is the evaluator's accuracy of a model physically cut to the kept neurons, and
    every weight is restored afterwards."""
    from tools.evaluate import EvalConfig, Evaluator

    _demo_model(demo_dataset, tmp_path)
    net = load_dense(tmp_path / "hf").net
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ids = torch.randint(0, net.config.vocab.text_size, (2, 20))
    keep = probes.width_masks(torch.rand(4, net.config.intermediate_size), 0.5, "cpu")
    for skip, mlp_keep in (({1: "block", 2: "attn", 3: "mlp"}, {}), ({}, keep)):
        with torch.no_grad():
            with probes.weight_edits(net, skip, mlp_keep):
                got = net(ids).logits
            want = net.lm_head(net.model.norm(run_hidden(net, ids, Edits(skip=skip, mlp_keep=mlp_keep))))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(net(ids).logits, want, atol=1e-3)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())

    evaluator = Evaluator(demo_dataset, EvalConfig(max_samples=6, images_per_digit=1, batch_size=16))
    manifest = open_dataset(str(demo_dataset), net.config.vocab)
    measures, evals, base = {}, {}, {}
    for task in ("mmu", "t2i"):
        calib = make_batches(load_task_samples(manifest, "train", task, 4), 4, net.config.vocab.pad_id, "cpu")
        measures[task] = measure_task(net, calib, max_tokens=16)
        evals[task] = make_batches(load_task_samples(manifest, "validation", task, 3), 4, net.config.vocab.pad_id, "cpu")
        base[task] = mean_nll(net, evals[task])
    compute = probes.ComputeModel(net, {"mmu": 60.0, "t2i": 80.0})
    rows = probes.width_pruning(net, measures, evals, base, compute, [0.5],
                                accuracy=lambda task: evaluator.task_accuracy(net, task))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    F_ = net.config.intermediate_size
    for task, metric in (("mmu", "understanding/accuracy"), ("t2i", "generation/accuracy")):
        masks = probes.width_masks(measures[task].neuron_score, 0.5, "cpu")
        cut = UnifiedTransformer(net.config.replace(intermediate_size=F_ // 2))
        state = dict(net.state_dict())
        for i, m in masks.items():
            pre = f"model.layers.{i}.mlp."
            state[pre + "gate_proj.weight"] = state[pre + "gate_proj.weight"][m]
            state[pre + "up_proj.weight"] = state[pre + "up_proj.weight"][m]
            state[pre + "down_proj.weight"] = state[pre + "down_proj.weight"][:, m]
        cut.load_state_dict(state)
        assert rows[task][0][metric] == evaluator.task_accuracy(cut, task)[metric], task


def test_probe_accuracy_only_on_data_with_the_demos_labels(demo_dataset, tmp_path, monkeypatch):
    """Without the demo's digit labels the probes are scored by loss only, and no Evaluator (which would load
    the dataset's image tokenizer) is built."""
    import tools.evaluate
    from tests.shard_fixtures import write_dataset
    from tools.analyze import probe_accuracy

    write_dataset(str(tmp_path / "plain"))
    net, _ = _demo_model(demo_dataset, tmp_path)
    monkeypatch.setattr(tools.evaluate, "Evaluator", lambda *a, **k: pytest.fail("built an Evaluator"))
    assert probe_accuracy(net, str(tmp_path / "plain"), AnalysisConfig()) is None
    assert probe_accuracy(net, str(demo_dataset), AnalysisConfig(probe_accuracy=False)) is None
