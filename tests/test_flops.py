"""Analytic FLOPs (model/flops.py) against torch's FlopCounterMode on the real model, and against hand counts.

Counting convention: FlopCounterMode's (matmuls and SDPA only, 2 FLOPs per multiply-add, SDPA over
the full score matrix, SDPA backward = torch's `sdpa_backward_flop_count`). On CPU, SDPA dispatches
to `aten._scaled_dot_product_flash_attention_for_cpu` (+ `_backward`), which FlopCounterMode's
registry does not know and cannot decompose, so it silently records 0 FLOPs for attention. Rather
than forcing the MATH backend (whose autograd backward is 4 bmms, not the 5 products torch's SDPA
formula and the GPU kernels count), we register torch's own `sdpa_flop_count` /
`sdpa_backward_flop_count` for the CPU kernel: the measurement is then exactly what FlopCounterMode
records on GPU. `test_forward_matches_math_path` checks the forward independently of that mapping,
with the MATH backend forced and no custom formula.

Batches are packed the way the loader packs them: position ids restart at 0 for every document and
trailing padding continues the last document's positions.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from model import ModelConfig, UnifiedTransformer
from model.flops import (
    Document,
    RowTokens,
    dense_flops,
    describe_microbatch,
    expert_slots,
    flops_forward,
    flops_train,
    layer_tokens,
    mfu,
    microbatch_flops,
    peak_flops,
    step_flops,
    tflops_per_device,
)

pytestmark = pytest.mark.usefixtures("one_thread")

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

# Rows as (task, [(document length, text tokens), ...], padding). A document is Emu3-like:
# <bos> text <boi> image codes <eoi>, i.e. 3 structural tokens, `text` text tokens, the rest image codes.
UNIFORM = [(T2I, [(S, 8)], 0), (T2I, [(S, 12)], 0)]
MIXED = [(T2I, [(S, 8)], 0), (MMU, [(S, 20)], 0)]
WITH_LM = [(T2I, [(S, 8)], 0), (MMU, [(50, 6)], 14), (LM, [(S, 30)], 0)]
PACKED = [(T2I, [(21, 4), (19, 5), (13, 3)], 11), (T2I, [(40, 10), (17, 2)], 7)]
PACKED_MIXED = [(T2I, [(21, 4), (19, 5)], 24), (MMU, [(30, 9), (30, 3)], 4), (LM, [(20, 5), (9, 2)], 35)]


def _batch(cfg: ModelConfig, spec, seed: int = 0):
    """-> (input_ids [B,S], position_ids [B,S], task_ids [B]) of the rows in `spec`."""
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab
    length = {sum(n for n, _ in docs) + pad for _, docs, pad in spec}
    assert len(length) == 1, length
    seq = length.pop()
    ids = torch.full((len(spec), seq), v.pad_id, dtype=torch.long)
    pos = torch.zeros(len(spec), seq, dtype=torch.long)
    for b, (_, docs, pad) in enumerate(spec):
        t = 0
        for n, text in docs:
            doc = [v.bos_id, *torch.randint(0, v.text_size, (text,), generator=g).tolist(), v.boi_id,
                   *torch.randint(v.visual_start, v.visual_end, (n - text - 3,), generator=g).tolist(), v.eoi_id]
            ids[b, t:t + n] = torch.tensor(doc)
            pos[b, t:t + n] = torch.arange(n)
            t += n
        pos[b, t:] = torch.arange(pos[b, t - 1] + 1, pos[b, t - 1] + 1 + pad)  # padding continues the last one
    return ids, pos, torch.tensor([task for task, _, _ in spec])


def _rows(spec) -> list[RowTokens]:
    """The RowLayouts of `spec`, by hand: t2i/mmu route image codes, lm routes text and image tokens."""
    return [RowTokens(task, tuple(Document(n, n - text - 3 if task in (T2I, MMU) else n - 3) for n, text in docs), pad)
            for task, docs, pad in spec]


def _measure(net: UnifiedTransformer, spec, *, train: bool, routing: str | None = None,
             mapping: dict | None = CPU_SDPA_FLOPS) -> int:
    """FlopCounterMode's count of one forward (+ backward) on the rows of `spec` (or an (ids, pos, tasks) batch)."""
    ids, pos, task_ids = spec if isinstance(spec, tuple) else _batch(net.config, spec)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        if train:
            out = net(ids, task_ids=task_ids, position_ids=pos, routing=routing)
            (out.logits.float().mean() + out.aux_loss).backward()
        else:
            with torch.no_grad():
                net(ids, task_ids=task_ids, position_ids=pos, routing=routing)
    return counter.get_total_flops()


def _net(**overrides) -> UnifiedTransformer:
    torch.manual_seed(0)
    net = UnifiedTransformer(ModelConfig.from_preset("debug", **overrides)).train()
    if net.config.mod.mod_layers():
        # Large routers so the top-k choice is not a tie between near-zero logits (FLOPs do not depend on
        # it, but the gather then exercises real, scattered indices).
        for layer in net.model.layers:
            if layer.mod_router is not None:
                torch.nn.init.normal_(layer.mod_router.weight, std=1.0)
    return net


# ----- describing a micro-batch ------------------------------------------------------------------------------
def test_describe_microbatch_reads_documents_routable_tokens_and_padding():
    cfg = ModelConfig.from_preset("debug", mod=MOD)
    for spec in (UNIFORM, WITH_LM, PACKED, PACKED_MIXED):
        assert describe_microbatch(*_batch(cfg, spec), cfg) == _rows(spec)
    rows = describe_microbatch(*_batch(cfg, PACKED), cfg)
    assert [r.padding for r in rows] == [11, 7] and [len(r.documents) for r in rows] == [3, 2]
    assert rows[0].documents[1] == Document(19, 19 - 5 - 3) and rows[0].length == S and rows[0].real_tokens == 53


# ----- FlopCounterMode equality ----------------------------------------------------------------------------
def test_dense_train_matches_flop_counter_on_packed_rows_with_padding():
    net = _net()
    cfg = net.config
    rows = describe_microbatch(*_batch(cfg, PACKED_MIXED), cfg)
    analytic = microbatch_flops(cfg, rows)
    assert analytic.total == _measure(net, PACKED_MIXED, train=True)
    assert analytic == microbatch_flops(cfg, rows, dense=True)  # no MoD layers: as run = MoD switched off
    # Masked attention over the whole row: S x S per row, whatever the documents.
    assert layer_tokens(cfg, rows) == [(S, False)] * cfg.num_hidden_layers


@pytest.mark.parametrize("spec, kept", [
    # t2i at 0.25: 3 structural + text + ceil(0.25 * image codes); P = the largest row.
    (UNIFORM, max(3 + 8 + 14, 3 + 12 + 13)),                 # ceil(.25*53) = 14, ceil(.25*49) = 13
    (MIXED, max(3 + 8 + 14, 3 + 20 + 21)),                    # mmu at 0.5: ceil(.5*41) = 21
    (WITH_LM, S),                                             # lm keeps capacity 1: its 64 real tokens
    # Per document: non-routable (3 + text) + ceil(0.25 * its image codes); 14, 11, 7 codes -> 4, 3, 2.
    (PACKED, max((3 + 4 + 4) + (3 + 5 + 3) + (3 + 3 + 2), (3 + 10 + 7) + (3 + 2 + 3))),  # 27, 12 -> 7, 3
    (PACKED_MIXED, max((3 + 4 + 4) + (3 + 5 + 3),        # t2i
                       (3 + 9 + 9) + (3 + 3 + 12),       # mmu at 0.5: 18, 24 codes -> 9, 12
                       20 + 9)),                         # lm at capacity 1: all its real tokens
])
def test_mod_train_matches_flop_counter(spec, kept):
    net = _net(mod=MOD)
    cfg = net.config
    rows = describe_microbatch(*_batch(cfg, spec), cfg)
    assert [n for n, _ in layer_tokens(cfg, rows)] == [S, S, kept, kept]
    analytic = microbatch_flops(cfg, rows)
    assert analytic.total == _measure(net, spec, train=True)
    as_dense = microbatch_flops(cfg, rows, dense=True)
    B, D, L = len(rows), cfg.hidden_size, cfg.num_hidden_layers
    # The routers (2 MoD layers, fwd + bwd = 3x, on every position) are the only extra; P shrinks the linears.
    assert analytic.router == 3 * 2 * (2 * B * S * D * cfg.num_tasks)
    assert analytic.mlp == as_dense.mlp * ((L - 2) * S + 2 * kept) // (L * S)


def test_forward_matches_math_path():
    """Forward only, MATH backend, stock FlopCounterMode: SDPA decomposes into counted bmms."""
    net = _net(mod=MOD)
    cfg = net.config
    rows = describe_microbatch(*_batch(cfg, PACKED_MIXED), cfg)
    with sdpa_kernel(SDPBackend.MATH):
        measured = _measure(net, PACKED_MIXED, train=False, mapping=None)
    assert microbatch_flops(cfg, rows, train=False).total == measured


def test_gqa_counts_kv_projections_with_kv_heads():
    mha, gqa = _net(num_key_value_heads=4, mod=MOD), _net(num_key_value_heads=2, mod=MOD)
    rows = describe_microbatch(*_batch(gqa.config, PACKED), gqa.config)
    a_mha = microbatch_flops(mha.config, rows, train=False)
    a_gqa = microbatch_flops(gqa.config, rows, train=False)
    cfg = gqa.config
    # k_proj and v_proj each lose 2 heads of width head_dim, in every layer, on the tokens each layer ran.
    tokens = sum(n for n, _ in layer_tokens(cfg, rows)) * len(rows)
    expected = 2 * (2 * tokens * cfg.hidden_size * 2 * cfg.head_dim)
    assert a_mha.attn_proj - a_gqa.attn_proj == expected
    assert a_mha.attn_sdpa == a_gqa.attn_sdpa  # GQA broadcasts K/V: attention itself is unchanged
    assert _measure(mha, PACKED, train=False) == a_mha.total
    assert _measure(gqa, PACKED, train=False) == a_gqa.total


def test_recompute_adds_exactly_one_layer_forward():
    net = _net(mod=MOD)
    cfg = net.config
    rows = describe_microbatch(*_batch(cfg, PACKED_MIXED), cfg)
    plain = microbatch_flops(cfg, rows)
    again = microbatch_flops(cfg, rows, recompute=True)
    fwd = microbatch_flops(cfg, rows, train=False)
    assert again.total - plain.total == fwd.layers == fwd.total - fwd.head
    net.gradient_checkpointing = True
    # torch's non-reentrant checkpoint stops recomputing once backward has every tensor it saved,
    # so by default it skips a layer's trailing matmul whose output backward never reads (down_proj
    # of a dense layer, whose output only enters a residual add). Without early stop it recomputes
    # the whole layer, which is the convention (Megatron's 4x forward) flops.py counts.
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        assert _measure(net, PACKED_MIXED, train=True) == again.total
    assert plain.total < _measure(net, PACKED_MIXED, train=True) <= again.total
    base = dense_flops(cfg, rows, recompute=True).total - dense_flops(cfg, rows).total
    assert base == dense_flops(cfg, rows, train=False, include_head=False).total  # the baseline recomputes too


def test_causal_routing_counts_full_layers_plus_routers():
    net = _net(mod={**MOD, "routing": "causal"})
    cfg = net.config
    rows = describe_microbatch(*_batch(cfg, PACKED), cfg)
    analytic = microbatch_flops(cfg, rows, train=False)
    as_dense = microbatch_flops(cfg, rows, train=False, dense=True)
    assert analytic.total - as_dense.total == analytic.router > 0
    assert analytic.total == _measure(net, PACKED, train=False)
    # The routing argument of the forward overrides the config, in the count too.
    topk = _net(mod=MOD)
    assert microbatch_flops(cfg, rows, train=False, routing="topk") == microbatch_flops(topk.config, rows, train=False)
    assert microbatch_flops(topk.config, rows, train=False, routing="causal").total == \
        _measure(topk, PACKED, train=False, routing="causal")


# ----- independent hand counts ---------------------------------------------------------------------------------
def _by_hand_train(n: int, *, D=64, F=176, L=4, H=4, KV=2, hd=16, V=776) -> int:
    """Forward + backward of a dense debug-preset model on one sequence of n tokens, from the formulas:
    per layer q, k, v, o and the three MLP matmuls (2 FLOPs per multiply-add, backward 2x), attention
    2 products of n x n x hd per head forward and 5 backward, head D x V on every token."""
    linear = 2 * n * (D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F)
    attention = (2 + 5) * H * (2 * n * n * hd)
    return L * (3 * linear + attention) + 3 * 2 * n * D * V


def test_dense_baseline_by_hand_two_documents_and_padding():
    """Documents of 5 and 3 tokens plus 2 padding: the baseline is the two documents alone, no padding."""
    cfg = ModelConfig.from_preset("debug")
    v = cfg.vocab
    ids = torch.tensor([[v.bos_id, 11, 12, 13, v.eos_id, v.bos_id, 21, v.eos_id, v.pad_id, v.pad_id]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])
    rows = describe_microbatch(ids, pos, torch.tensor([LM]), cfg)
    assert rows == [RowTokens(LM, ((5, 3), (3, 1)), padding=2)]
    by_hand = _by_hand_train(5) + _by_hand_train(3)
    assert _by_hand_train(5) == 7_109_120  # the formula itself, evaluated once by hand (see its docstring)
    assert dense_flops(cfg, rows).total == by_hand
    step = step_flops(cfg, [rows])
    assert step.dense == by_hand
    assert (step.tokens, step.real_tokens, step.pad_tokens) == (10, 8, 2) and step.pad_pct == 20.0
    # The dense model as run pays for the padding and for 10 x 10 attention: more than the baseline.
    assert step.actual == _by_hand_train(10) and step.saved_pct == pytest.approx(100 * (1 - _by_hand_train(10) / by_hand))
    assert step.saved_pct < 0
    # ... which FlopCounterMode confirms, each document run alone through the real model.
    net = _net()
    alone = 0
    for a, b in ((0, 5), (5, 8)):
        with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
            net(ids[:, a:b], position_ids=pos[:, a:b]).logits.float().mean().backward()
        alone += counter.get_total_flops()
    assert alone == by_hand


def test_capacity_applies_per_document_not_per_row():
    """t2i at capacity 0.25 in layers 2-3; a row of two documents with 5 and 3 image codes keeps
    ceil(1.25) + ceil(0.75) = 3 of them (a per-row count would keep ceil(0.25 * 8) = 2), plus its 4
    structural and 2 text tokens: K = 9 of 16 positions."""
    cfg = ModelConfig.from_preset("debug", mod=MOD)
    v = cfg.vocab
    c = v.visual_start
    ids = torch.tensor([[v.bos_id, 1, v.boi_id, c, c + 1, c + 2, c + 3, c + 4,
                         v.bos_id, 2, v.boi_id, c, c + 1, c + 2, v.pad_id, v.pad_id]])
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]])
    rows = describe_microbatch(ids, pos, torch.tensor([T2I]), cfg)
    assert rows == [RowTokens(T2I, ((8, 5), (6, 3)), padding=2)]
    assert [n for n, _ in layer_tokens(cfg, rows)] == [16, 16, 9, 9]
    D, F, H, KV, hd, T = 64, 176, 4, 2, 16, 3
    per_layer_fwd = lambda n: 2 * n * (D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * F) + 4 * H * hd * n * n  # noqa: E731
    fwd = 2 * per_layer_fwd(16) + 2 * per_layer_fwd(9) + 2 * (2 * 16 * D * T) + 2 * 16 * D * v.vocab_size
    assert microbatch_flops(cfg, rows, train=False).total == fwd
    assert _measure(_net(mod=MOD), (ids, pos, torch.tensor([T2I])), train=False) == fwd  # the model agrees


def test_full_capacity_is_dense():
    cfg = ModelConfig.from_preset("debug", mod={"capacity": {"0-3": {"t2i": 1.0, "mmu": 1.0, "lm": 1.0}}})
    rows = _rows(WITH_LM)
    assert microbatch_flops(cfg, rows) == microbatch_flops(cfg, rows, dense=True)
    assert step_flops(cfg, [_rows(UNIFORM)]).saved_pct == 0.0  # full rows, no padding: as run = baseline


def test_causal_attention_counts_lower_triangle():
    cfg = ModelConfig.from_preset("debug")
    full = flops_train(cfg, S, [T2I])
    causal = flops_train(cfg, S, [T2I], causal_attention=True)
    assert causal.attn_sdpa * 2 * S == full.attn_sdpa * (S + 1)
    assert (causal.attn_proj, causal.mlp, causal.head) == (full.attn_proj, full.mlp, full.head)
    rows = _rows(PACKED)
    full_b, causal_b = dense_flops(cfg, rows), dense_flops(cfg, rows, causal_attention=True)
    squares = sum(n * n for r in rows for n, _ in r.documents)
    triangles = sum(n * (n + 1) // 2 for r in rows for n, _ in r.documents)
    assert causal_b.attn_sdpa * squares == full_b.attn_sdpa * triangles


def test_step_flops_per_task_padding_and_saving():
    cfg = ModelConfig.from_preset("debug", mod=MOD)
    mbs = [_rows(UNIFORM), _rows(PACKED), _rows(WITH_LM)]
    step = step_flops(cfg, mbs)
    assert step.tokens == 7 * S and step.real_tokens == 7 * S - (11 + 7 + 14)
    assert step.pad_pct == pytest.approx(100 * 32 / (7 * S))
    assert step.actual == sum(microbatch_flops(cfg, mb).total for mb in mbs)
    assert step.dense == sum(dense_flops(cfg, mb).total for mb in mbs)
    assert sum(t.actual for t in step.per_task.values()) == step.actual
    assert sum(t.dense for t in step.per_task.values()) == step.dense
    assert {n: (t.rows, t.documents) for n, t in step.per_task.items()} == {"t2i": (5, 8), "mmu": (1, 1), "lm": (1, 1)}
    # A t2i row batched with an lm one is charged the lm row's P (slack is real compute).
    assert microbatch_flops(cfg, _rows(WITH_LM)).total // 3 > microbatch_flops(cfg, _rows(UNIFORM)).total // 2
    # Task-homogeneous full rows: t2i (0.25) saves more than mmu (0.5); lm only pays its routers.
    pure = step_flops(cfg, [[r] for r in _rows([(T2I, [(S, 8)], 0), (MMU, [(S, 8)], 0), (LM, [(S, 8)], 0)])]).per_task
    assert pure["t2i"].saved_pct > pure["mmu"].saved_pct > 0 > pure["lm"].saved_pct
    assert 0 < step.saved_pct < 100
    # Padding and document masking flatter nothing: a dense model on the same rows saves a negative amount.
    dense_cfg = ModelConfig.from_preset("debug")
    assert step_flops(dense_cfg, [_rows(PACKED)]).saved_pct < 0
    with pytest.raises(ValueError, match="'vqa'"):
        flops_train(cfg, S, ["vqa"])
    with pytest.raises(ValueError, match="same length"):
        microbatch_flops(cfg, [_rows(UNIFORM)[0], RowTokens(T2I, ((10, 5),))])


def test_convenience_rows_keep_their_meaning():
    """flops_train(cfg, S, tasks, routable=...) is a micro-batch of one-document rows without padding."""
    cfg = ModelConfig.from_preset("debug", mod=MOD)
    got = flops_train(cfg, S, [T2I, MMU], routable={"t2i": 50, "mmu": 40})
    assert got == microbatch_flops(cfg, [RowTokens(T2I, ((S, 50),)), RowTokens(MMU, ((S, 40),))])
    assert flops_forward(cfg, S, [T2I]) == microbatch_flops(cfg, [RowTokens.single(T2I, S)], train=False)
    assert flops_train(cfg, S, [T2I], dense=True) == dense_flops(cfg, [RowTokens.single(T2I, S)])


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


# ----- MoE MLPs: routers plus the experts on the slots they ran -------------------------------------------------
def _moe_net(moe: dict, **overrides) -> UnifiedTransformer:
    net = _net(moe=moe, **overrides)
    with torch.no_grad():  # routers that really choose, so experts get uneven loads (and capacity drops)
        for layer in net.model.layers:
            if layer.is_moe:
                torch.nn.init.normal_(layer.mlp.router.weight, std=1.0)
    return net


@pytest.mark.parametrize("moe, mod, spec", [
    ({"layers": [1, 3], "num_experts": 4, "top_k": 1, "router": "shared"}, None, WITH_LM),
    ({"layers": ["0-3"], "num_experts": 8, "top_k": 2, "router": "task"}, None, PACKED_MIXED),
    ({"layers": [0, 2], "num_experts": 4, "top_k": 2, "router": "task", "capacity_factor": 0.6}, None, MIXED),
    ({"layers": ["1-3"], "num_experts": 4, "top_k": 2, "router": "task", "capacity_factor": 0.8}, MOD, PACKED_MIXED),
    ({"layers": [0, 3], "num_experts": 8, "top_k": 2, "shared_experts": 2, "router": "task",
      "capacity_factor": 0.7}, None, MIXED),
])
@pytest.mark.parametrize("train", [False, True])
def test_moe_matches_flop_counter(moe, mod, spec, train):
    net = _moe_net(moe, **({"mod": mod} if mod else {}))
    cfg = net.config
    ids, pos, tasks = _batch(cfg, spec)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        with torch.set_grad_enabled(train):
            out = net(ids, task_ids=tasks, position_ids=pos)
            if train:
                (out.logits.float().mean() + out.aux_loss).backward()
    slots = expert_slots(out.experts, cfg)
    rows = describe_microbatch(ids, pos, tasks, cfg)
    analytic = microbatch_flops(cfg, rows, train=train, expert_slots=slots)
    assert analytic.total == counter.get_total_flops()
    dropped = int(out.experts[..., 1].sum())
    assert (dropped > 0) is ("capacity_factor" in moe)  # the capacity cases really drop slots
    nominal = microbatch_flops(cfg, rows, train=train)  # k slots per kept token
    assert (nominal == analytic) is (dropped == 0)
    assert nominal.mlp - analytic.mlp == (3 if train else 1) * 2 * dropped * 3 * cfg.hidden_size * (
        cfg.intermediate_size // cfg.moe.num_experts)
    # Routers: E - S (or (E - S)*T) columns on the positions each MoE layer runs, never on fewer.
    E_cols = cfg.moe.routed_experts * (cfg.num_tasks if cfg.moe.router == "task" else 1)
    moe_router = sum(n for i, (n, _) in enumerate(layer_tokens(cfg, rows)) if i in cfg.moe.layers)
    mod_router = microbatch_flops(cfg, rows, train=train, dense=True).router  # 0: dense twin has none
    assert mod_router == 0
    as_mod_only = microbatch_flops(ModelConfig.from_preset("debug", **({"mod": mod} if mod else {})), rows, train=train)
    assert analytic.router - as_mod_only.router == (3 if train else 1) * 2 * len(rows) * moe_router * cfg.hidden_size * E_cols


def test_moe_flops_arguments_are_checked():
    cfg = ModelConfig.from_preset("debug", moe={"layers": [1], "num_experts": 4, "top_k": 2})
    rows = _rows(UNIFORM)
    with pytest.raises(ValueError, match="MoE layers"):
        microbatch_flops(cfg, rows, expert_slots={2: [1, 1, 1, 1]})
    with pytest.raises(ValueError, match=r"expert_slots\[1\]"):
        microbatch_flops(cfg, rows, expert_slots={1: [1, 1]})
    with pytest.raises(ValueError, match="micro-batches"):
        step_flops(cfg, [rows], expert_slots=[])
    # per micro-batch slot counts flow through step_flops
    slots = {1: [10, 20, 30, 40]}
    assert step_flops(cfg, [rows], expert_slots=[slots]).actual == microbatch_flops(cfg, rows, expert_slots=slots).total
