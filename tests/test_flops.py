"""Analytic FLOPs (model/flops.py) against torch's FlopCounterMode on the real model.

Counting convention: FlopCounterMode's (matmuls and SDPA only, 2 FLOPs per multiply-add, SDPA over
the full score matrix, SDPA backward = torch's `sdpa_backward_flop_count`). On CPU, SDPA dispatches
to `aten._scaled_dot_product_flash_attention_for_cpu` (+ `_backward`), which FlopCounterMode's
registry does not know and cannot decompose, so it silently records 0 FLOPs for attention. Rather
than forcing the MATH backend (whose autograd backward is 4 bmms, not the 5 products torch's SDPA
formula and the GPU kernels count), we register torch's own `sdpa_flop_count` /
`sdpa_backward_flop_count` for the CPU kernel: the measurement is then exactly what FlopCounterMode
records on GPU. `test_forward_matches_math_path` checks the forward independently of that mapping,
with the MATH backend forced and no custom formula.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from model import ModelConfig, UnifiedTransformer
from model.flops import (
    flops_forward,
    flops_train,
    mfu,
    peak_flops,
    step_flops,
    tflops_per_device,
)

S = 64
T2I, MMU, LM = 0, 1, 2
MOD = {"capacity": {"2-3": {"t2i": 0.25, "mmu": 0.5}}}

_aten = torch.ops.aten
CPU_SDPA_FLOPS = {
    _aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v),
}


def _ids(cfg: ModelConfig, tasks: list[int], seed: int = 0) -> torch.Tensor:
    """Mostly image tokens after a short text prefix, like an Emu3 t2i/mmu sequence."""
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab
    ids = torch.randint(v.visual_start, v.visual_end, (len(tasks), S), generator=g)
    ids[:, :8] = torch.randint(0, v.text_size, (len(tasks), 8), generator=g)
    ids[:, 0], ids[:, 8] = v.bos_id, v.boi_id
    return ids


def _measure(net: UnifiedTransformer, tasks: list[int], *, train: bool, routing: str | None = None,
             mapping: dict | None = CPU_SDPA_FLOPS) -> int:
    ids, task_ids = _ids(net.config, tasks), torch.tensor(tasks)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        if train:
            out = net(ids, task_ids=task_ids, routing=routing)
            (out.logits.float().mean() + out.aux_loss).backward()
        else:
            with torch.no_grad():
                net(ids, task_ids=task_ids, routing=routing)
    return counter.get_total_flops()


def _close(analytic: int, measured: int, tol: float = 0.02) -> None:
    assert measured > 0
    assert abs(analytic - measured) / measured < tol, f"analytic {analytic:,} vs FlopCounterMode {measured:,}"


def _net(**overrides) -> UnifiedTransformer:
    torch.manual_seed(0)
    return UnifiedTransformer(ModelConfig.from_preset("debug", **overrides)).train()


def test_dense_train_matches_flop_counter():
    net = _net()
    tasks = [T2I, MMU]
    analytic = flops_train(net.config, S, tasks).total
    _close(analytic, _measure(net, tasks, train=True))
    assert analytic == flops_train(net.config, S, tasks, dense=True).total  # no MoD layers: dense


@pytest.mark.parametrize("tasks, kept", [
    ([T2I, T2I], 16),       # uniform capacity 0.25: P = 16 of 64
    ([T2I, MMU], 32),       # mixed capacities: one gather at P = max(16, 32), padded slots masked
    ([T2I, MMU, LM], S),    # lm takes the full layer, so P = S, but the routers still run
])
def test_mod_train_matches_flop_counter(tasks, kept):
    net = _net(mod=MOD)
    cfg = net.config
    analytic = flops_train(cfg, S, tasks)
    _close(analytic.total, _measure(net, tasks, train=True))
    dense = flops_train(cfg, S, tasks, dense=True)
    B, D, L = len(tasks), cfg.hidden_size, cfg.num_hidden_layers
    # The routers (2 MoD layers, fwd + bwd = 3x) are the only extra; P shrinks the layers' linears.
    assert analytic.router == 3 * 2 * (2 * B * S * D * cfg.num_tasks)
    assert analytic.mlp == dense.mlp * ((L - 2) * S + 2 * kept) // (L * S)
    if kept < S:
        assert analytic.total < dense.total


def test_forward_matches_math_path():
    """Forward only, MATH backend, stock FlopCounterMode: SDPA decomposes into counted bmms."""
    net = _net(mod=MOD)
    tasks = [T2I, MMU]
    with sdpa_kernel(SDPBackend.MATH):
        measured = _measure(net, tasks, train=False, mapping=None)
    _close(flops_forward(net.config, S, tasks).total, measured)


def test_gqa_counts_kv_projections_with_kv_heads():
    mha, gqa = _net(num_key_value_heads=4), _net(num_key_value_heads=2)
    tasks = [T2I]
    a_mha, a_gqa = flops_forward(mha.config, S, tasks), flops_forward(gqa.config, S, tasks)
    cfg = gqa.config
    # k_proj and v_proj each lose 2 heads of width head_dim, in every layer.
    expected = cfg.num_hidden_layers * 2 * (2 * S * cfg.hidden_size * 2 * cfg.head_dim)
    assert a_mha.attn_proj - a_gqa.attn_proj == expected
    assert a_mha.attn_sdpa == a_gqa.attn_sdpa  # GQA broadcasts K/V: attention itself is unchanged
    measured_diff = _measure(mha, tasks, train=False) - _measure(gqa, tasks, train=False)
    assert measured_diff == expected


def test_recompute_adds_exactly_one_layer_forward():
    net = _net(mod=MOD)
    cfg, tasks = net.config, [T2I, MMU]
    plain = flops_train(cfg, S, tasks)
    again = flops_train(cfg, S, tasks, recompute=True)
    fwd = flops_forward(cfg, S, tasks)
    assert again.total - plain.total == fwd.layers == fwd.total - fwd.head
    net.gradient_checkpointing = True
    # torch's non-reentrant checkpoint stops recomputing once backward has every tensor it saved,
    # so by default it skips a layer's trailing matmul whose output backward never reads (down_proj
    # of a dense layer, whose output only enters a residual add). Without early stop it recomputes
    # the whole layer, which is the convention (Megatron's 4x forward) flops.py counts.
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        _close(again.total, _measure(net, tasks, train=True))
    assert plain.total < _measure(net, tasks, train=True) <= again.total


def test_full_capacity_is_dense():
    cfg = ModelConfig.from_preset("debug", mod={"capacity": {"0-3": {"t2i": 1.0, "mmu": 1.0, "lm": 1.0}}})
    tasks = [T2I, MMU, LM]
    assert flops_train(cfg, S, tasks) == flops_train(cfg, S, tasks, dense=True)
    assert step_flops(cfg, S, [tasks]).saved_pct == 0.0


def test_causal_routing_counts_full_layers_plus_routers():
    net = _net(mod={**MOD, "routing": "causal"})
    cfg, tasks = net.config, [T2I, MMU]
    analytic = flops_forward(cfg, S, tasks)
    dense = flops_forward(cfg, S, tasks, dense=True)
    assert analytic.total - dense.total == analytic.router > 0
    _close(analytic.total, _measure(net, tasks, train=False))


def test_causal_attention_counts_lower_triangle():
    cfg = ModelConfig.from_preset("debug")
    full = flops_train(cfg, S, [T2I])
    causal = flops_train(cfg, S, [T2I], causal_attention=True)
    assert causal.attn_sdpa * 2 * S == full.attn_sdpa * (S + 1)
    assert (causal.attn_proj, causal.mlp, causal.head) == (full.attn_proj, full.mlp, full.head)


def test_step_flops_per_task():
    cfg = ModelConfig.from_preset("debug", mod=MOD)
    step = step_flops(cfg, S, [[T2I, T2I], [MMU, MMU], [T2I, LM]])
    assert step.tokens == 6 * S
    assert sum(t.actual for t in step.per_task.values()) == step.actual
    assert sum(t.dense for t in step.per_task.values()) == step.dense
    assert {n: t.sequences for n, t in step.per_task.items()} == {"t2i": 3, "mmu": 2, "lm": 1}
    assert step.actual == sum(flops_train(cfg, S, mb).total for mb in ([T2I, T2I], [MMU, MMU], [T2I, LM]))
    # A t2i sequence batched with an lm one is charged the lm's P = S (padding is real compute).
    row = {mb: flops_train(cfg, S, list(mb)).total // len(mb) for mb in ((T2I, T2I), (T2I, LM))}
    assert step.per_task["t2i"].actual == 2 * row[(T2I, T2I)] + row[(T2I, LM)]
    assert row[(T2I, LM)] > row[(T2I, T2I)]
    # Task-homogeneous micro-batches: t2i (0.25) saves more than mmu (0.5); lm pays its routers.
    pure = step_flops(cfg, S, [[T2I], [MMU], [LM]]).per_task
    assert pure["t2i"].saved_pct > pure["mmu"].saved_pct > 0 > pure["lm"].saved_pct
    assert 0 < step.saved_pct < 100
    with pytest.raises(ValueError, match="'vqa'"):
        step_flops(cfg, S, [["vqa"]])


def test_emu3_8b_dense_flops_per_token():
    cfg = ModelConfig.from_preset("emu3-8b")
    with torch.device("meta"):
        net = UnifiedTransformer(cfg)
    n_matmul = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
    seq = 4096
    per_token = flops_train(cfg, seq, [T2I]).total / seq
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    # fwd 4*L*D*s of attention + bwd 10*L*D*s (torch's SDPA formulas), 6 per matmul parameter.
    assert per_token == 6 * n_matmul + 14 * L * D * seq
    torchtitan = 6 * n_matmul + 12 * L * D * seq  # its convention: backward attention = 2x forward
    print(f"\nemu3-8b at S={seq}: {per_token / 1e9:.2f} GFLOPs/token (6N = {6 * n_matmul / 1e9:.2f}, "
          f"torchtitan 6N + 12LDs = {torchtitan / 1e9:.2f}); N_matmul = {n_matmul / 1e9:.3f}B")
    assert abs(per_token - torchtitan) / torchtitan < 0.03


def test_peak_table_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Intel Xeon") is None
    assert mfu(8 * 989e12 * 0.4, 2.0, 8, 989e12) == pytest.approx(0.2)
    assert tflops_per_device(8e12, 2.0, 4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="world_size"):
        mfu(1e12, 1.0, 0, 989e12)
    with pytest.raises(ValueError, match="step_time_s"):
        tflops_per_device(1e12, 0.0, 1)
