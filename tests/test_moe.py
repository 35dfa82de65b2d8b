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
