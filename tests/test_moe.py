"""Dense-to-MoE adaptation (model/moe.py): snake partition, exactness at full activation, training."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.layers import MLP
from model.moe import MoEMLP, convert_mlps, snake_partition
from model.transformer import UnifiedTransformer


def _mlp(dtype=torch.float64, hidden=16, width=24) -> MLP:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", hidden_size=hidden, intermediate_size=width, num_attention_heads=2,
                                  num_key_value_heads=1)
    return MLP(cfg).to(dtype)


def test_snake_partition_deals_one_neuron_per_tier_in_snake_order():
    # importance 7..0 for neurons 0..7: the ranking is neurons 0, 1, ..., 7
    groups = snake_partition(torch.arange(8, 0, -1).float(), 3)
    # tiers {0,1,2} -> experts 0,1,2; {3,4,5} -> 2,1,0; {6,7} -> 0,1
    assert [g.tolist() for g in groups] == [[0, 5, 6], [1, 4, 7], [2, 3]]
    scrambled = torch.tensor([0.1, 5.0, 3.0, 0.7, 9.0, 2.0, 4.0, 1.0])
    groups = snake_partition(scrambled, 4)
    allidx = torch.cat(groups).sort().values
    assert allidx.tolist() == list(range(8))  # disjoint and complete
    order = scrambled.argsort(descending=True).tolist()
    for e, g in enumerate(groups):  # each expert holds exactly one neuron of each tier of 4
        tiers = sorted(order.index(i) // 4 for i in g.tolist())
        assert tiers == [0, 1]
    # the strongest neuron goes to expert 0, the second tier's strongest to the last expert
    assert order[0] in groups[0].tolist() and order[4] in groups[3].tolist()


def test_snake_partition_rejects_bad_expert_counts():
    with pytest.raises(ValueError, match="num_experts"):
        snake_partition(torch.ones(4), 5)
    with pytest.raises(ValueError, match="num_experts"):
        snake_partition(torch.ones(4), 0)
    with pytest.raises(ValueError, match="top_k"):
        MoEMLP(8, [2, 2], top_k=3)


@pytest.mark.parametrize("experts", [1, 3, 4, 24])
def test_all_experts_active_reproduce_the_dense_mlp(experts):
    mlp = _mlp()
    importance = torch.rand(24, dtype=torch.float64)
    moe = MoEMLP.from_dense(mlp, importance, num_experts=experts, top_k=experts)
    assert torch.count_nonzero(moe.router.weight) == 0
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), mlp(x), rtol=0, atol=1e-12)
    # every expert is a real slice of the dense weights, sizes within one of each other
    widths = [e.gate_proj.weight.shape[0] for e in moe.experts]
    assert sum(widths) == 24 and max(widths) - min(widths) <= 1


def test_top_k_runs_exactly_the_chosen_experts():
    mlp = _mlp()
    moe = MoEMLP.from_dense(mlp, torch.rand(24, dtype=torch.float64), num_experts=4, top_k=2)
    torch.nn.init.normal_(moe.router.weight, std=1.0)  # a trained-looking router: tokens pick differently
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    x_ND = x.reshape(-1, 16)
    chosen, gates = moe.route(x_ND)
    assert chosen.shape == (21, 2) and len(set(map(tuple, chosen.tolist()))) > 1
    expect = torch.stack([sum(gates[n, s] * moe.experts[int(chosen[n, s])](x_ND[n]) for s in range(2))
                          for n in range(21)])
    torch.testing.assert_close(moe(x).reshape(-1, 16), expect, rtol=0, atol=1e-12)
    assert torch.all((gates > 0) & (gates < 2))


def test_converted_model_logits_equal_dense_at_full_activation():
    torch.manual_seed(0)
    net = UnifiedTransformer(ModelConfig.from_preset("debug")).double().eval()
    ids = torch.randint(0, net.config.vocab_size, (2, 12))
    dense = net(ids).logits
    F_ = net.config.intermediate_size
    moes = convert_mlps(net, {i: torch.rand(F_) for i in (1, 3)}, num_experts=4, top_k=4)
    assert isinstance(net.model.layers[1].mlp, MoEMLP) and not isinstance(net.model.layers[0].mlp, MoEMLP)
    torch.testing.assert_close(net(ids).logits, dense, rtol=0, atol=1e-10)
    moes[1].top_k = 1  # fewer experts: a different function
    assert not torch.allclose(net(ids).logits, dense)
    with pytest.raises(ValueError, match="layer 9"):
        convert_mlps(net, {9: torch.rand(F_)}, 2, 1)


@pytest.mark.parametrize("frozen", [True, False])
def test_trainable_with_experts_frozen_or_not(frozen):
    mlp = _mlp(torch.float32)
    moe = MoEMLP.from_dense(mlp, torch.rand(24), num_experts=4, top_k=1)
    moe.freeze_experts(frozen)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    torch.manual_seed(1)
    x = torch.randn(64, 16)
    target = mlp(x).detach()  # recover the dense layer through top-1 routing
    opt = torch.optim.Adam([p for p in moe.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (moe(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0  # gradient at k=1
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in moe.named_parameters() if not torch.equal(p, before[n])}
    assert "router.weight" in changed
    expert_changed = any(n.startswith("experts.") for n in changed)
    assert expert_changed is (not frozen)


# ----- the trainable MoE MLP (model.moe section) ------------------------------------------------------------
T2I, MMU, LM = 0, 1, 2
MOE = {"layers": ["1-2"], "num_experts": 4, "top_k": 2, "router": "task", "balance_loss_weight": 0.01}


def _trained_router_moe(router: str, capacity_factor=None, seed: int = 0, shared: int = 0) -> MoEMLP:
    """A float64 MoE MLP of 4 (+ `shared`) fresh experts (3 tasks) whose router is random, so tokens pick
    differently."""
    torch.manual_seed(seed)
    moe = MoEMLP(16, [6] * (4 + shared), top_k=2, num_tasks=3, router=router, balance_loss_weight=0.5,
                 capacity_factor=capacity_factor, num_shared=shared, init_std=0.3).double()
    torch.nn.init.normal_(moe.router.weight, std=1.0)
    return moe


def _naive(moe: MoEMLP, x, task, valid, capacity):
    """Independent reference: one token at a time in token order: the shared experts 0..S-1 at weight 1, then
    its own task's E - S logits from the raw router weight, top-k of the routed experts S.., each counting its
    slots and refusing those over `capacity`."""
    E, k, S = moe.num_experts, moe.top_k, moe.num_shared
    Er = E - S
    W = moe.router.weight
    used = [0] * E
    out = torch.zeros_like(x)
    routed, dropped = torch.zeros(3, E), torch.zeros(3, E)
    for n in range(x.shape[0]):
        if not valid[n]:
            continue
        t = int(task[n])
        for e in range(S):
            routed[t, e] += 1
            out[n] += moe.experts[e](x[n])
        block = W[t * Er:(t + 1) * Er] if moe.task_router else W
        logits = block @ x[n]
        top = logits.topk(k)
        for r, e in zip(top.values, (S + i for i in top.indices.tolist())):
            routed[t, e] += 1
            if capacity is not None and used[e] >= capacity:
                dropped[t, e] += 1
                continue
            used[e] += 1
            out[n] += 2 * torch.sigmoid(r) * moe.experts[e](x[n])
    return out, torch.stack([routed, dropped], -1)


@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("router", ["task", "shared"])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_sorted_dispatch_equals_a_per_token_reference(router, capacity_factor, shared):
    moe = _trained_router_moe(router, capacity_factor, shared=shared)
    g = torch.Generator().manual_seed(3)
    N = 40
    x = torch.randn(N, 16, generator=g, dtype=torch.float64)
    task = torch.randint(0, 3, (N,), generator=g)
    valid = torch.rand(N, generator=g) > 0.2
    y, _, stats = moe.dispatch(x, task, valid)
    cap = moe.capacity(int(valid.sum()))
    assert (cap is None) is (capacity_factor is None)
    want_y, want_stats = _naive(moe, x, task, valid, cap)
    torch.testing.assert_close(y, want_y, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.float(), want_stats)
    assert stats[..., 0].sum() == (2 + shared) * valid.sum()  # every valid token's S + k slots, padding none
    assert torch.all(stats[:, :shared, 1] == 0)  # shared experts never drop
    assert bool(stats[..., 1].sum() > 0) is (capacity_factor is not None)  # the limit really drops slots
    assert torch.all(y[~valid] == 0)
    if capacity_factor is not None:  # without capacity, the same layer drops nothing
        y_all, _, stats_all = moe.dispatch(x, task, valid, apply_capacity=False)
        assert stats_all[..., 1].sum() == 0 and not torch.allclose(y_all, y)


def test_task_router_reads_each_tokens_own_task_block():
    moe = _trained_router_moe("task")
    x = torch.randn(6, 16, dtype=torch.float64)
    for t in range(3):
        got = moe.logits(x, torch.full((6,), t))
        torch.testing.assert_close(got, x @ moe.router.weight[4 * t:4 * (t + 1)].T)
    with pytest.raises(ValueError, match="task id"):
        moe.logits(x)


@pytest.mark.parametrize("shared", [0, 2])
def test_balance_loss_matches_switch_formula_gives_router_gradient_and_ignores_padding(shared):
    """Over the 4 routed experts (shared experts, which every token runs, have no logit and no share)."""
    moe = _trained_router_moe("task", shared=shared)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(30, 16, generator=g, dtype=torch.float64)
    task = torch.randint(0, 3, (30,), generator=g)
    valid = torch.ones(30, dtype=torch.bool)
    valid[-7:] = False
    _, loss, _ = moe.dispatch(x, task, valid)
    # independent: softmax over each valid token's own task's logits, f from its top-2 choices
    W = moe.router.weight.detach()
    probs, choices = [], []
    for n in range(23):
        logits = W[4 * task[n]:4 * task[n] + 4] @ x[n]
        probs.append(logits.softmax(-1))
        choices += logits.topk(2).indices.tolist()
    f = torch.bincount(torch.tensor(choices), minlength=4).double() / len(choices)
    P = torch.stack(probs).mean(0)
    torch.testing.assert_close(loss.double(), 0.5 * 4 * (f * P).sum(), rtol=1e-6, atol=0)
    loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    # padding tokens change nothing: neither their hidden states nor their presence
    x2 = x.clone()
    x2[-7:] = 100 * torch.randn(7, 16, dtype=torch.float64)
    _, loss2, _ = moe.dispatch(x2, task, valid)
    _, loss3, _ = moe.dispatch(x[:23], task[:23])
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(loss3, loss)


@pytest.mark.parametrize("override, field", [
    ({"num_experts": 0}, "moe.num_experts"),
    ({"top_k": 5}, "moe.top_k"),
    ({"router": "per_token"}, "moe.router"),
    ({"balance_loss_weight": -1.0}, "moe.balance_loss_weight"),
    ({"capacity_factor": -0.5}, "moe.capacity_factor"),
    ({"overflow": "reroute"}, "moe.overflow"),
    ({"layers": ["3-1"]}, "moe.layers"),
    ({"layers": [7]}, "moe.layers"),
    ({"num_experts": 3}, "moe.num_experts"),  # 176 neurons do not split into 3 experts
    ({"expert_count": 3}, "model.moe.expert_count"),
])
def test_moe_config_validation_names_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        ModelConfig.from_preset("debug", moe={**MOE, **override})


def test_moe_config_layer_keys_round_trip_and_capacity_zero_means_none():
    cfg = ModelConfig.from_dict({"preset": "debug", "moe": {**MOE, "layers": ["0", "2-3"], "capacity_factor": 0}})
    assert cfg.moe.layers == [0, 2, 3] and cfg.moe.capacity_factor is None
    again = ModelConfig(**{k: v for k, v in cfg.to_dict().items()})
    assert again.moe == cfg.moe
    assert ModelConfig.from_preset("debug", moe={"layers": "1-2"}).moe.layers == [1, 2]
    assert ModelConfig.from_preset("debug").moe.layers == []


def test_a_model_without_moe_is_unchanged():
    cfg = ModelConfig.from_preset("debug")
    torch.manual_seed(0)
    plain = UnifiedTransformer(cfg)
    torch.manual_seed(0)
    empty = UnifiedTransformer(ModelConfig.from_preset("debug", moe={"layers": [], "num_experts": 8}))
    assert plain.state_dict().keys() == empty.state_dict().keys()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    a, b = plain(ids), empty(ids)
    assert torch.equal(a.logits, b.logits) and a.experts is None and b.experts is None
    assert not any(layer.is_moe for layer in plain.model.layers)


def _moe_mod_model(moe=MOE, seed=0, **mod) -> UnifiedTransformer:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_preset("debug", moe=moe, mod={"capacity": {"2-3": {"t2i": 0.5, "lm": 0.5}}, **mod})
    return UnifiedTransformer(cfg)


def test_moe_layers_built_from_config_report_experts_and_balance_loss():
    net = _moe_mod_model()
    layers = net.model.layers
    assert [layer.is_moe for layer in layers] == [False, True, True, False]
    moe = layers[1].mlp
    assert [e.gate_proj.weight.shape for e in moe.experts] == [torch.Size([44, 64])] * 4
    assert moe.router.weight.shape == (4 * 3, 64) and torch.count_nonzero(moe.router.weight) == 0
    std = torch.cat([e.up_proj.weight.flatten() for e in moe.experts]).std()
    assert 0.015 < std < 0.025  # normal(0, initializer_range)
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in net.state_dict()
    pad = net.config.vocab.pad_id
    ids = torch.randint(0, pad, (3, 10))
    ids[2, 7:] = pad
    out = net(ids, task_ids=torch.tensor([T2I, MMU, LM]))
    assert out.experts.shape == (4, 3, 4, 2)
    assert out.experts[[0, 3]].abs().sum() == 0
    # layer 1 is dense in depth: every non-padding token takes k = 2 slots; layer 2 (MoD, 50% for t2i and lm)
    # routes only the tokens it keeps (these ids are text: only lm routes them)
    torch.testing.assert_close(out.experts[1, :, :, 0].sum(-1), torch.tensor([20.0, 20.0, 14.0]))
    assert out.experts[2, MMU, :, 0].sum() == 20 and out.experts[2, T2I, :, 0].sum() == 20  # t2i routes image tokens
    assert out.experts[2, LM, :, 0].sum() == 2 * 4  # ceil(0.5 * 7) kept
    # aux_loss = MoD BCE + the MoE balance loss (>= weight * 1 per layer: E * sum f P >= 1 at uniform f)
    no_balance = _moe_mod_model(moe={**MOE, "balance_loss_weight": 0.0})
    no_balance.load_state_dict(net.state_dict())
    aux0 = no_balance(ids, task_ids=torch.tensor([T2I, MMU, LM])).aux_loss
    assert 0.02 - 1e-6 <= out.aux_loss - aux0 < 0.1


def test_full_activation_moe_layer_equals_the_dense_mlp_it_holds():
    """k = E from the config: the zero router weights every expert by 1, so the layer is a dense MLP whose
    neurons are the experts' neurons side by side (padding gets no MLP update in an MoE layer)."""
    moe_cfg = {**MOE, "top_k": 4, "layers": [1]}
    net = _moe_mod_model(moe=moe_cfg).double()
    dense = UnifiedTransformer(ModelConfig.from_preset("debug", mod=net.config.mod.to_dict())).double()
    sd = {k: v for k, v in net.state_dict().items() if ".mlp.experts." not in k and ".mlp.router." not in k}
    experts = net.model.layers[1].mlp.experts
    for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
        sd[f"model.layers.1.mlp.{name}.weight"] = torch.cat([getattr(e, name).weight for e in experts], dim)
    dense.load_state_dict(sd)
    ids = torch.randint(0, net.config.vocab.pad_id, (2, 12))
    tasks = torch.tensor([T2I, LM])
    torch.testing.assert_close(net(ids, task_ids=tasks).logits, dense(ids, task_ids=tasks).logits,
                               rtol=0, atol=1e-10)


def test_capacity_drops_in_training_routing_only():
    net = _moe_mod_model(moe={**MOE, "capacity_factor": 0.5})
    with torch.no_grad():
        for layer in net.model.layers:
            if layer.is_moe:
                torch.nn.init.normal_(layer.mlp.router.weight, std=1.0)
    ids = torch.randint(0, net.config.vocab.pad_id, (2, 16))
    tasks = torch.tensor([MMU, MMU])
    topk = net(ids, task_ids=tasks)
    causal = net(ids, task_ids=tasks, routing="causal")
    # capacity 0.5 * k * N / E = N / 4 slots per expert for 2N slots: at least half of them dropped
    assert topk.experts[1, MMU, :, 1].sum() >= 16
    assert causal.experts[..., 1].sum() == 0


# ----- HF checkpoint round trip (model/hf.py: dense equivalent + moe.safetensors) ---------------------------
def _randomise_routers(net: UnifiedTransformer, seed: int = 5) -> None:
    """Trained-looking MoE and MoD routers: far from their init, so a fresh router would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("router.weight"):
                p.copy_(torch.randn(p.shape, generator=g))


def _assert_same_model(a: UnifiedTransformer, b: UnifiedTransformer, ids, tasks) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert a.config.moe == b.config.moe and a.config.mod == b.config.mod
    out_a, out_b = a(ids, task_ids=tasks), b(ids, task_ids=tasks)
    assert torch.equal(out_a.logits, out_b.logits) and torch.equal(out_a.experts, out_b.experts)


def test_moe_checkpoint_round_trips_bit_for_bit_and_loads_in_transformers(tmp_path):
    from safetensors import safe_open
    from transformers import Emu3ForCausalLM

    moe = {**MOE, "capacity_factor": 1.25}  # fresh experts, task router
    torch.manual_seed(0)
    net = UnifiedTransformer(ModelConfig.from_preset("debug", moe=moe)).eval()
    _randomise_routers(net)
    net.save_hf(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        dense_up = f.get_tensor("model.layers.1.mlp.up_proj.weight")
    assert not [k for k in keys if ".mlp.experts." in k or ".mlp.router." in k]
    F_ = net.config.intermediate_size
    assert dense_up.shape == (F_, 64)
    # fresh experts sit side by side in expert order
    assert torch.equal(dense_up[44:88], net.model.layers[1].mlp.experts[1].up_proj.weight)
    with safe_open(str(tmp_path / "hf" / "moe.safetensors"), "pt") as f:
        names = ("expert_neurons", "router.weight")
        assert sorted(f.keys()) == [f"model.layers.{i}.mlp.{n}" for i in (1, 2) for n in names]

    back = UnifiedTransformer.from_hf(tmp_path / "hf").eval()
    assert back.config.moe.capacity_factor == 1.25 and back.config.moe.router == "task"
    ids = torch.randint(0, net.config.vocab.pad_id, (3, 16))
    with torch.no_grad():
        _assert_same_model(net, back, ids, torch.tensor([T2I, MMU, LM]))  # training routing: capacity applies
    # transformers loads it (the dense equivalent: a different function at k < E, but a valid Emu3 model)
    hf = Emu3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.isfinite(hf(ids).logits).all()


def test_transformers_computes_the_k_equals_e_moe_model(tmp_path):
    from transformers import Emu3ForCausalLM

    torch.manual_seed(0)
    net = UnifiedTransformer(ModelConfig.from_preset("debug", moe={**MOE, "top_k": 4, "router": "shared"})).eval()
    net.save_hf(tmp_path / "hf")
    hf = Emu3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, net.config.vocab.pad_id, (2, 16))  # no padding: an MoE layer gives padding no MLP update
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, net(ids).logits, atol=1e-5, rtol=1e-5)


def test_mod_and_moe_model_round_trips(tmp_path):
    net = _moe_mod_model().eval()
    _randomise_routers(net)
    net.save_hf(tmp_path / "hf")
    back = UnifiedTransformer.from_hf(tmp_path / "hf").eval()
    assert back.config.mod.capacity == net.config.mod.capacity
    ids = torch.randint(0, net.config.vocab.pad_id, (3, 16))
    with torch.no_grad():
        _assert_same_model(net, back, ids, torch.tensor([T2I, MMU, LM]))


def test_converting_a_dense_checkpoint_is_exact_at_k_equals_e_and_exports_the_dense_mlp_again(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    UnifiedTransformer(ModelConfig.from_preset("debug")).save_hf(tmp_path / "dense")
    dense = UnifiedTransformer.from_hf(tmp_path / "dense", dtype=torch.float64).eval()
    F_ = dense.config.intermediate_size
    importance = {1: torch.rand(F_, generator=torch.Generator().manual_seed(1))}
    full = {"layers": [1, 3], "num_experts": 4, "top_k": 4, "router": "task"}
    conv = UnifiedTransformer.from_hf(tmp_path / "dense", moe=full, importance=importance, dtype=torch.float64).eval()
    assert [layer.is_moe for layer in conv.model.layers] == [False, True, False, True]
    # layer 1 by the given importance, layer 3 by equal importance (index order dealt in snake order)
    for i, scores in ((1, importance[1]), (3, torch.zeros(F_))):
        groups = snake_partition(scores, 4)
        assert conv.model.layers[i].mlp.neuron_groups == [g.tolist() for g in groups]
        assert torch.equal(conv.model.layers[i].mlp.experts[2].down_proj.weight,
                           dense.model.layers[i].mlp.down_proj.weight[:, groups[2]])
        assert torch.count_nonzero(conv.model.layers[i].mlp.router.weight) == 0
    ids = torch.randint(0, dense.config.vocab.pad_id, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(conv(ids).logits, dense(ids).logits, rtol=0, atol=1e-10)
        sparse = UnifiedTransformer.from_hf(tmp_path / "dense", moe={**full, "top_k": 1}, dtype=torch.float64)
        assert not torch.allclose(sparse(ids).logits, dense(ids).logits)
    # The export puts every neuron back where it came from: the Emu3 side is the dense checkpoint again.
    conv.save_hf(tmp_path / "conv", dtype=torch.float32)
    before = load_file(str(tmp_path / "dense" / "model.safetensors"))
    after = load_file(str(tmp_path / "conv" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    again = UnifiedTransformer.from_hf(tmp_path / "conv", dtype=torch.float64)
    assert again.model.layers[1].mlp.neuron_groups == conv.model.layers[1].mlp.neuron_groups
    assert all(torch.equal(v, conv.state_dict()[k]) for k, v in again.state_dict().items())


def test_moe_checkpoint_policy_follows_the_mod_routers(tmp_path):
    """A config without the checkpoint's MoE layers loads their dense equivalent (routers left out, as MoD
    banks are); another E re-cuts the dense MLP with a fresh router; another task list drops a task router."""
    torch.manual_seed(0)
    net = UnifiedTransformer(ModelConfig.from_preset("debug", moe={**MOE, "top_k": 4})).double().eval()
    net.save_hf(tmp_path / "hf")
    ids = torch.randint(0, net.config.vocab.pad_id, (2, 12))
    dense = UnifiedTransformer.from_hf(tmp_path / "hf", moe={"layers": []}).double().eval()
    assert not any(layer.is_moe for layer in dense.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, net(ids).logits, rtol=0, atol=1e-10)

    _randomise_routers(net)
    net.save_hf(tmp_path / "trained")
    router = net.model.layers[1].mlp.router.weight.float()
    kept = UnifiedTransformer.from_hf(tmp_path / "trained", moe={**MOE, "layers": [1]})
    assert torch.equal(kept.model.layers[1].mlp.router.weight, router) and not kept.model.layers[2].is_moe
    other_e = UnifiedTransformer.from_hf(tmp_path / "trained", moe={**MOE, "num_experts": 2, "top_k": 2})
    assert torch.count_nonzero(other_e.model.layers[1].mlp.router.weight) == 0
    other_tasks = UnifiedTransformer.from_hf(tmp_path / "trained", mod={"tasks": ["mmu", "t2i", "lm"]})
    assert torch.count_nonzero(other_tasks.model.layers[1].mlp.router.weight) == 0
    with pytest.raises(ValueError, match="importance names layer 0"):
        UnifiedTransformer.from_hf(tmp_path / "trained", importance={0: torch.rand(176)})
    with pytest.raises(ValueError, match=r"importance\[1\] has shape \(5,\)"):
        UnifiedTransformer.from_hf(tmp_path / "trained", importance={1: torch.rand(5)})
    # an MoE made in place (convert_mlps) is not in model.moe.layers: no HF layout, a clear error
    plain = UnifiedTransformer(ModelConfig.from_preset("debug"))
    convert_mlps(plain, {0: torch.rand(176)}, num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="outside model.moe.layers"):
        plain.save_hf(tmp_path / "inplace")


def test_trainer_loader_fills_moe_layers_through_iter_hf_weights(tmp_path):
    """train/zero.py `load_hf_weights` (not partitioned here) reads an MoE checkpoint and converts a dense one
    (every expert and router filled, the fresh routers with zeros) through the one reader."""
    from train.zero import load_hf_weights

    net = _moe_mod_model().eval()
    _randomise_routers(net)
    net.save_hf(tmp_path / "hf")
    target = _moe_mod_model(seed=1)
    load_hf_weights(target, str(tmp_path / "hf"), zero3=False)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in target.state_dict().items())

    torch.manual_seed(0)
    UnifiedTransformer(ModelConfig.from_preset("debug")).save_hf(tmp_path / "dense")
    target = _moe_mod_model(moe={**MOE, "top_k": 4}, seed=1)
    load_hf_weights(target, str(tmp_path / "dense"), zero3=False)
    ref = UnifiedTransformer.from_hf(tmp_path / "dense", moe={**MOE, "top_k": 4}, mod=target.config.mod.to_dict())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in target.state_dict().items() if "mod_router" not in k)
    assert all(torch.count_nonzero(target.model.layers[i].mlp.router.weight) == 0 for i in (1, 2))


def test_an_expert_without_slots_still_gets_a_gradient():
    """ZeRO-3 reduces every parameter's gradient on every rank: an expert no token chose must still get one
    (zero), not None, and the output must be unchanged by it."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", moe={"layers": "1", "num_experts": 4, "top_k": 1, "router": "shared"})
    net = UnifiedTransformer(cfg)
    moe = net.model.layers[1].mlp
    fixed = torch.tensor([10.0, 0.0, -10.0, -10.0])  # every token's first choice is expert 0
    moe.router.register_forward_hook(lambda module, args, logits: logits * 0 + fixed)
    ids = torch.randint(0, 256, (2, 16))
    out = net(ids, labels=ids)
    (out.loss + out.aux_loss).backward()
    slots = out.experts[1, :, :, 0].sum(0)
    assert slots[0] == 2 * 16 and slots[1:].sum() == 0, slots
    for e in (1, 2, 3):
        for name, p in moe.experts[e].named_parameters():
            assert p.grad is not None and torch.count_nonzero(p.grad) == 0, (e, name)
    assert torch.count_nonzero(moe.experts[0].up_proj.weight.grad) > 0


def test_num_parameters_counts_routers_and_active_experts():
    """Against arithmetic on the config: E experts of F/E neurons hold the dense MLP's 3*D*F; one token uses
    top_k of them; routers are D x E*T (task) and D x T (MoD bank) and drop out with exclude_routers."""
    cfg = ModelConfig.from_preset("debug", mod={"capacity": {"2": {"t2i": 0.5}}},
                                  moe={"layers": [1, 3], "num_experts": 4, "top_k": 1, "router": "task"})
    D, F_, T = cfg.hidden_size, cfg.intermediate_size, cfg.num_tasks
    with torch.device("meta"):
        net, dense = UnifiedTransformer(cfg), UnifiedTransformer(cfg.replace(moe={"layers": []}))
    routers = 2 * D * 4 * T
    assert net.num_parameters() == dense.num_parameters() + routers
    assert net.num_parameters(exclude_routers=True) == dense.num_parameters() - D * T  # MoD bank out too
    assert net.num_parameters(active=True) == net.num_parameters() - 2 * 3 * D * F_ * 3 // 4
    assert dense.num_parameters(active=True) == dense.num_parameters()


def test_partition_gives_the_shared_experts_the_most_important_neurons():
    from model.moe import partition

    importance = torch.tensor([5.0, 11, 0, 9, 3, 10, 1, 8, 2, 7, 4, 6])  # neuron j's score
    groups = partition(importance, num_experts=4, num_shared=1)  # 3 neurons per expert
    assert groups[0].tolist() == [1, 3, 5]  # the three most important (11, 10, 9), index order
    # The rest by importance: neurons 7 9 11 | 0 10 4 | 8 6 2 (scores 8 7 6 | 5 4 3 | 2 1 0), dealt in snake order
    # to the routed experts 1, 2, 3: tier 0 -> 1 2 3, tier 1 -> 3 2 1, tier 2 -> 1 2 3.
    assert [g.tolist() for g in groups[1:]] == [sorted([7, 4, 8]), sorted([9, 10, 6]), sorted([11, 0, 2])]
    assert [g.tolist() for g in partition(importance, 4)] == [g.tolist() for g in snake_partition(importance, 4)]
    with pytest.raises(ValueError, match="num_shared"):
        partition(importance, 4, 4)
    with pytest.raises(ValueError, match="equal experts"):
        partition(torch.rand(10), 4, 1)


@pytest.mark.parametrize("shared, top_k", [(1, 3), (2, 2), (3, 1)])
def test_shared_and_routed_experts_all_active_reproduce_the_dense_mlp(shared, top_k):
    mlp = _mlp()
    importance = torch.rand(24, dtype=torch.float64)
    moe = MoEMLP.from_dense(mlp, importance, num_experts=4, top_k=top_k, num_shared=shared)
    assert moe.router.weight.shape == (4 - shared, 16)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(moe(x), mlp(x), rtol=0, atol=1e-12)
    top = importance.argsort(descending=True)[:6 * shared]
    assert sorted(sum((g for g in moe.neuron_groups[:shared]), [])) == sorted(top.tolist())


def test_shared_experts_config_and_active_parameters():
    cfg = ModelConfig.from_preset("debug", moe={"layers": [1], "num_experts": 4, "top_k": 1, "shared_experts": 2})
    assert (cfg.moe.routed_experts, cfg.moe.active_experts) == (2, 3)
    with torch.device("meta"):
        net, dense = UnifiedTransformer(cfg), UnifiedTransformer(cfg.replace(moe={"layers": []}))
    D, F_ = cfg.hidden_size, cfg.intermediate_size
    assert net.model.layers[1].mlp.router.weight.shape == (2 * cfg.num_tasks, D)
    assert net.num_parameters(active=True) == dense.num_parameters() + 2 * cfg.num_tasks * D - 3 * D * F_ // 4
    for bad, field in (({"shared_experts": 4}, "moe.shared_experts"), ({"shared_experts": 3, "top_k": 2}, "moe.top_k"),
                       ({"shared_experts": -1}, "moe.shared_experts")):
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            ModelConfig.from_preset("debug", moe={"layers": [1], "num_experts": 4, "top_k": 1, **bad})


def test_shared_experts_checkpoint_converts_round_trips_and_exports_the_dense_mlp(tmp_path):
    """A dense checkpoint converted with shared experts (the most important neurons shared) computes the dense
    model with every expert active, round-trips bit for bit, and exports the dense MLP again; a checkpoint with
    another number of shared experts is converted again from its dense equivalent."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    dense = UnifiedTransformer(cfg)
    dense.save_hf(tmp_path / "dense")
    F_ = cfg.intermediate_size
    importance = {1: torch.rand(F_), 3: torch.rand(F_)}
    moe = {"layers": [1, 3], "num_experts": 4, "top_k": 2, "shared_experts": 2, "router": "task"}
    net = UnifiedTransformer.from_hf(tmp_path / "dense", moe=moe, importance=importance)
    ids = torch.randint(0, 200, (2, 12))
    tasks = torch.tensor([0, 2])
    with torch.no_grad():
        torch.testing.assert_close(net(ids, task_ids=tasks).logits, dense(ids, task_ids=tasks).logits,
                                   rtol=1e-5, atol=1e-5)
    top = importance[3].argsort(descending=True)[:F_ // 2]
    assert sorted(net.model.layers[3].mlp.neuron_groups[0] + net.model.layers[3].mlp.neuron_groups[1]) == \
        sorted(top.tolist())
    _randomise_routers(net)
    net.save_hf(tmp_path / "moe")
    _assert_same_model(UnifiedTransformer.from_hf(tmp_path / "moe"), net, ids, tasks)
    dense_state, saved = load_file(str(tmp_path / "dense" / "model.safetensors")), load_file(
        str(tmp_path / "moe" / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in dense_state.items())  # the experts merge back to the dense MLP
    other = UnifiedTransformer.from_hf(tmp_path / "moe", moe={**moe, "shared_experts": 1})
    assert torch.count_nonzero(other.model.layers[1].mlp.router.weight) == 0  # converted again: a fresh router
