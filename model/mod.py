"""Task-aware Mixture-of-Depths (UniMoD) around the Emu3 decoder block.

A MoD layer owns a router bank `mod_router = Linear(hidden, num_tasks)`: every token gets one score per
task and each sequence reads its own task's column (`mod.shared_router` makes it one shared column, the
ablation UniMoD compares against).

Capacity is per sample, over its routable tokens. A row may pack several samples (documents, defined by
the position ids: `model.layers.document_ids`). In MoD layer l a sample of task t with capacity
c = capacity[l][t] < 1 keeps
  - all of its non-routable, non-padding tokens (structural tokens always; text tokens for tasks that
    route only image tokens), and
  - exactly k = ceil(c * n_routable) of its n_routable routable tokens (0 if it has none): the top-k by
    its task's router logit *within that sample* (`routable_kept`),
so `{t2i: 0.2}` means "keep 20% of each t2i sample's image tokens, plus its prompt and structure",
whatever the row length, padding or packing. Padding is never processed. A sample whose task has
capacity 1 in the layer keeps every non-padding token.

The layer gathers P = max_b K_b tokens per row (K_b = tokens row b keeps); a row keeping fewer fills its
remaining slots with placeholders sorted after every kept token, in a document of their own, with a zero
gate, so no kept token sees them and their update is dropped. For a task-homogeneous micro-batch of
fixed-size images P is the same every step (static shapes for ZeRO-3 prefetch and pipeline stages). The
host-side counts that size P come from one device->host copy per forward (`RowLayout`, inside the
`LayerContext` every layer of a forward shares); layers differ only in their capacities. When every row of
the micro-batch has capacity 1 in a layer, it runs as a plain layer.

Kept tokens keep their order, their own RoPE positions and their sample boundaries: they attend causally,
within their own sample, among the kept tokens only. The update of a routed token is scaled by a bounded
gate g = 2*sigmoid(r) (~1 at init with small router weights, so a dense checkpoint starts unchanged);
non-routable tokens take the plain update. An auxiliary BCE loss teaches sigmoid(r) to predict the
per-sample top-k membership, so sampling can route causally (r > 0) without seeing future tokens
(`routing="causal"`, which respects the same sample boundaries).

References: Raposo et al. 2024 (Mixture-of-Depths), UniMoD (arXiv 2502.06474).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import ModelConfig, VocabLayout
from model.layers import Block, Linear, document_ids, document_mask
from model.moe import MoEMLP

# Token kinds, computed once per forward from the ids and the vocabulary layout.
KIND_PAD, KIND_STRUCTURAL, KIND_TEXT, KIND_IMAGE = 0, 1, 2, 3
# Columns of a layer's routing statistics (`ModelOutput.routing` [L, T, 4], token counts per task):
#   routable     tokens the task may skip in this layer (its sequences routed here, padding excluded)
#   selected     routable tokens that went through the layer as run (top-k, or r > 0 under causal routing)
#   router_on    routable tokens whose router logit is > 0: what causal routing (sampling) would keep
#   agree        routable tokens where (r > 0) equals top-k membership: how well the causal router has
#                learnt to predict top-k (the aux loss's target); under causal routing all of them
# A sequence whose task takes the full layer counts its routable tokens in all four columns.
ROUTING_STATS = ("routable", "selected", "router_on", "agree")
_ROUTABLE_KINDS = {"image": (KIND_IMAGE,), "text": (KIND_TEXT,), "all": (KIND_TEXT, KIND_IMAGE)}


def token_kinds(input_ids: torch.Tensor, vocab: VocabLayout) -> torch.Tensor:
    """[B,S] ids -> [B,S] int8 kind (pad / structural / text / image)."""
    kinds = torch.full_like(input_ids, KIND_STRUCTURAL, dtype=torch.int8)
    kinds[input_ids < vocab.text_size] = KIND_TEXT
    kinds[(input_ids >= vocab.visual_start) & (input_ids < vocab.visual_end)] = KIND_IMAGE
    kinds[input_ids == vocab.pad_id] = KIND_PAD
    return kinds


def routable_table(cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """[num_tasks, 4] bool: may a token of kind k be skipped in a sequence of task t."""
    table = torch.zeros(cfg.num_tasks, 4, dtype=torch.bool)
    for t, task in enumerate(cfg.mod.tasks):
        for kind in _ROUTABLE_KINDS[cfg.mod.routable[task]]:
            table[t, kind] = True
    return table.to(device)


def capacity_table(cfg: ModelConfig, device: torch.device) -> torch.Tensor:
    """[num_layers, num_tasks] float capacities (1.0 = full layer)."""
    table = torch.ones(cfg.num_hidden_layers, cfg.num_tasks, dtype=torch.float64)
    for layer, per_task in cfg.mod.capacity.items():
        for task, cap in per_task.items():
            table[layer, cfg.mod.tasks.index(task)] = cap
    return table.to(device)


def routable_kept(capacity: float, n_routable: int) -> int:
    """Routable tokens a sample with `n_routable` of them keeps in a layer where its task has `capacity`:
    all if capacity >= 1, else ceil(capacity * n_routable) (0 when it has none)."""
    if n_routable <= 0:
        return 0
    return n_routable if capacity >= 1.0 else math.ceil(capacity * n_routable - 1e-9)


@dataclass
class RowLayout:
    """The rows' documents and token counts, computed once per forward (`row_layout`) and shared by every
    layer: all layers see the same documents and routable tokens, only their capacities differ."""

    doc_ids: torch.Tensor
    """[B,S] long document index within the row (`model.layers.document_ids`)."""
    attn_mask: torch.Tensor | None
    """[B,1,S,S] bool causal & same-document mask; None when every row is one document (plain causal)."""
    routable: torch.Tensor
    """[B,S] bool: the token's kind may be routed for its row's task (padding never is)."""
    nonpad: torch.Tensor
    """[B,S] bool: not padding."""
    tasks: list[int]
    """Task id of each row (host copy)."""
    n_nonpad: list[int]
    """Per row: non-padding tokens."""
    n_routable_docs: list[list[int]]
    """Per row, per document: routable tokens."""

    @property
    def single_document(self) -> bool:
        return self.attn_mask is None

    def kept_per_row(self, capacities: list[float]) -> list[int]:
        """K_b: tokens row b keeps in a layer with these per-task capacities (all non-padding tokens when
        its task's capacity is >= 1, else its non-routable tokens plus `routable_kept` per document)."""
        out = []
        for b, t in enumerate(self.tasks):
            docs = self.n_routable_docs[b]
            if capacities[t] >= 1.0:
                out.append(self.n_nonpad[b])
            else:
                out.append(self.n_nonpad[b] - sum(docs) + sum(routable_kept(capacities[t], n) for n in docs))
        return out


@dataclass
class LayerContext:
    """What a decoder layer reads besides its hidden states, the same for every layer of one forward: built
    once per forward by `model.transformer.layer_context` (the model's prologue; each pipeline stage builds
    it once per micro-batch) and handed to each layer."""

    cos: torch.Tensor
    """[B,S,head_dim] RoPE cos of each token's position (in the hidden states' dtype)."""
    sin: torch.Tensor
    """[B,S,head_dim] RoPE sin."""
    task_ids: torch.Tensor
    """[B] long: each row's task (index into `mod.tasks`)."""
    layout: RowLayout
    """The rows' documents, routable tokens and host-side counts (`row_layout`)."""
    cap_tbl: torch.Tensor
    """[num_layers, num_tasks] float64 capacities (`capacity_table`)."""
    routing: str
    """"topk" (training) or "causal" (sampling-time decisions, `DecoderLayer._forward_causal`)."""


def row_layout(kinds: torch.Tensor, task_ids: torch.Tensor, position_ids: torch.Tensor | None,
               routable_tbl: torch.Tensor) -> RowLayout:
    """Documents, masks and the host counts every layer needs, with one device->host copy.

    position_ids None means one document per row. Task ids outside the table are clamped for the lookup
    only; the caller validates `RowLayout.tasks`."""
    B, S = kinds.shape
    rows = torch.arange(B, device=kinds.device)[:, None]
    routable = routable_tbl[task_ids.clamp(0, routable_tbl.shape[0] - 1)][rows, kinds.long()]
    nonpad = kinds != KIND_PAD
    if position_ids is None:
        doc = torch.zeros(B, S, dtype=torch.long, device=kinds.device)
        per_doc = routable.sum(1, keepdim=True)
    else:
        doc = document_ids(position_ids)
        per_doc = torch.zeros(B, S, dtype=torch.long, device=kinds.device).scatter_add_(1, doc, routable.long())
    host = torch.cat([task_ids[:, None], nonpad.sum(1, keepdim=True), doc[:, -1:] + 1, per_doc], 1).tolist()
    single = all(h[2] == 1 for h in host)
    return RowLayout(doc_ids=doc, attn_mask=None if single else document_mask(doc), routable=routable,
                     nonpad=nonpad, tasks=[h[0] for h in host], n_nonpad=[h[1] for h in host],
                     n_routable_docs=[h[3:3 + h[2]] for h in host])


def topk_per_document(r: torch.Tensor, routable: torch.Tensor, capacity: torch.Tensor, doc_ids: torch.Tensor,
                      single_document: bool) -> torch.Tensor:
    """[B,S] bool: the routable tokens each document keeps, its top ceil(capacity * n_routable) by logit r.

    r [B,S] float; routable [B,S] bool; capacity [B] float64 (the row's task's capacity; rows with
    capacity >= 1 must have no routable token here); doc_ids [B,S] non-decreasing along each row.
    Ties go to the earlier token. Two stable sorts (by logit, then by document) rank the routable tokens
    inside each document; a row of one document needs only the first."""
    B, S = r.shape
    n_doc = torch.zeros(B, S, dtype=torch.long, device=r.device).scatter_add_(1, doc_ids, routable.long())
    k_doc = torch.ceil(capacity[:, None] * n_doc - 1e-9).long()  # [B,S]: k of document d at column d
    key = torch.where(routable, -r, torch.full_like(r, math.inf))  # routable first, best logit first
    order = key.argsort(dim=1, stable=True)
    if not single_document:
        order = order.gather(1, doc_ids.gather(1, order).argsort(dim=1, stable=True))
    slot = torch.arange(S, device=r.device).expand(B, S)
    rank = torch.empty_like(order).scatter_(1, order, slot)  # position of each token in the sorted row
    if not single_document:
        # Documents are contiguous, so document d's tokens fill sorted slots [start_d, start_d + len_d).
        length = torch.zeros_like(n_doc).scatter_add_(1, doc_ids, torch.ones_like(doc_ids))
        start = length.cumsum(1) - length
        rank = rank - start.gather(1, doc_ids)
    return routable & (rank < k_doc.gather(1, doc_ids))


class DecoderLayer(Block):
    """The Emu3 decoder block plus, in MoD layers, the task router bank (`mod_router`), and in MoE layers
    (`moe.layers`, or an MLP converted by `model.moe.convert_mlps`) a mixture of experts as its `mlp`.

    An MoE layer does not run `Block.block` (which `model.compile` compiles for dense layers): its MLP needs
    each token's task and validity and returns a loss and statistics, and its dispatch reads host-side slot
    counts, which would break a graph anyway. It runs the same math eagerly (`_moe_block`)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, MoEMLP.from_config(cfg) if cfg.moe.is_moe_layer(layer_idx) else None)
        self.layer_idx = layer_idx
        self.num_tasks = cfg.num_tasks
        self.capacities = [cfg.mod.capacity_of(layer_idx, t) for t in range(cfg.num_tasks)]
        self.is_mod = cfg.mod.is_mod_layer(layer_idx)
        self.aux_loss_weight = cfg.mod.aux_loss_weight
        self.shared_router = cfg.mod.shared_router
        n_scores = 1 if self.shared_router else cfg.num_tasks
        self.mod_router = Linear(cfg.hidden_size, n_scores, cfg.mod.router_init_std) if self.is_mod else None

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoEMLP)

    def forward(self, x: torch.Tensor, ctx: LayerContext, return_experts: bool = False):
        """x [B,S,D] -> (x_out [B,S,D], weighted aux loss [], stats [num_tasks, 4] (`ROUTING_STATS` counts));
        with `return_experts` a fourth and fifth item: the MoE layer's slot counts [num_tasks, E, 2]
        (`EXPERT_STATS`) and its weighted balance loss [] (both None for a dense MLP). The aux loss includes the
        MoE balance loss.

        `ctx` (`LayerContext`) is built once per forward and shared by every layer."""
        moe = [] if self.is_moe else None  # the MoE MLP's (balance loss, stats), appended by `_run_block`
        x_out, aux, stats = self._forward(x, ctx, moe)
        experts = balance = None
        if moe:
            balance, experts = moe[0]
            aux = aux + balance
        return (x_out, aux, stats, experts, balance) if return_experts else (x_out, aux, stats)

    def _run_block(self, moe: list | None, x, cos, sin, attn_mask, task_ids, valid, apply_capacity):
        """`Block.block` (compiled when `model.compile` installed it), or for an MoE MLP the same math with the
        tokens' tasks: x [B,P,D], task_ids [B] (each row's task), valid [B,P] bool (tokens that take expert
        slots). Appends (balance loss, stats) to `moe`."""
        if moe is None:
            return self.block(x, cos, sin, attn_mask)
        B, P, D = x.shape
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        y, loss, stats = self.mlp.dispatch(
            self.post_attention_layernorm(h).reshape(B * P, D), task_ids[:, None].expand(B, P).reshape(-1),
            valid.reshape(-1), apply_capacity=apply_capacity, num_tasks=self.num_tasks)
        moe.append((loss, stats))
        return h + y.view(B, P, D)

    def _forward(self, x: torch.Tensor, ctx: LayerContext, moe: list | None):
        cos, sin, task_ids, layout = ctx.cos, ctx.sin, ctx.task_ids, ctx.layout
        routable = layout.routable
        n_routable = routable.sum(1).to(torch.float32)
        zero = x.new_zeros((), dtype=torch.float32)
        # Expert capacity is a training-time limit (routing "topk"); sampling never drops a token's experts, so
        # cached decoding (model/generation.py) equals the full forward.
        train_routing = ctx.routing != "causal"
        if not self.is_mod:
            y = self._run_block(moe, x, cos, sin, layout.attn_mask, task_ids, layout.nonpad, train_routing)
            return y, zero, self._stats(task_ids, n_routable, n_routable)

        r, r_all = self.router_logits(x, task_ids)
        capacity = ctx.cap_tbl[self.layer_idx][task_ids]  # [B] float64
        routed_seq = capacity < 1.0  # [B] on device: sequences routed here
        routable = routable & routed_seq[:, None]
        if ctx.routing == "causal":
            return self._forward_causal(x, cos, sin, task_ids, layout, r, routable, n_routable, moe)
        if all(self.capacities[t] >= 1.0 for t in layout.tasks):
            # Full layer for every sequence; keep the router in the graph so every rank produces a
            # gradient for it (ZeRO-3 reduces every parameter on every rank).
            return (self._run_block(moe, x, cos, sin, layout.attn_mask, task_ids, layout.nonpad, True),
                    zero + 0.0 * r_all.sum(), self._stats(task_ids, n_routable, n_routable))

        B, S, D = x.shape
        selected = topk_per_document(r.detach(), routable, capacity, layout.doc_ids, layout.single_document)
        keep = selected | (layout.nonpad & ~routable)  # [B,S]
        kept = layout.kept_per_row(self.capacities)  # host: K_b, the number of True in keep[b]
        P = max(1, max(kept))
        # Kept tokens first in sequence order, then the rest (placeholders), each group in order.
        pos = torch.arange(S, device=x.device)
        order = torch.where(keep, pos, pos + S).sort(dim=1).values[:, :P]  # [B,P]
        valid = None
        if all(k == P for k in kept):
            idx = order
        else:
            valid = order < S
            idx = torch.where(valid, order, order - S)

        idx_D = idx[..., None].expand(B, P, D)
        x_sel = x.gather(1, idx_D)
        cos_sel = cos.gather(1, idx[..., None].expand(B, P, cos.shape[-1]))
        sin_sel = sin.gather(1, idx[..., None].expand(B, P, sin.shape[-1]))
        mask = None
        if not layout.single_document:
            # Causal by gathered order and same document; placeholders get a document of their own, so
            # no kept token can see them. One document per row needs no mask: placeholders come after
            # every kept token, so plain causal attention already hides them (and the fast kernel runs).
            doc_sel = layout.doc_ids.gather(1, idx)
            if valid is not None:
                doc_sel = torch.where(valid, doc_sel, S)
            mask = document_mask(doc_sel)
        valid_sel = torch.ones_like(idx, dtype=torch.bool) if valid is None else valid  # kept tokens: never padding
        y = self._run_block(moe, x_sel, cos_sel, sin_sel, mask, task_ids, valid_sel, True)

        r_sel = r.gather(1, idx)
        routed_sel = routable.gather(1, idx)
        gate = torch.where(routed_sel, 2.0 * torch.sigmoid(r_sel), torch.ones_like(r_sel))
        if valid is not None:
            gate = gate * valid  # a placeholder's update is dropped
        x_out = x.scatter(1, idx_D, x_sel + (y - x_sel) * gate[..., None].to(x.dtype))

        aux = self._aux_loss(r, selected, routable, r_all)
        n_selected = torch.where(routed_seq, selected.sum(1).to(torch.float32), n_routable)
        on = (r.detach() > 0) & routable
        n_on = torch.where(routed_seq, on.sum(1).to(torch.float32), n_routable)
        n_agree = torch.where(routed_seq, ((on == selected) & routable).sum(1).to(torch.float32), n_routable)
        return x_out, aux, self._stats(task_ids, n_routable, n_selected, n_on, n_agree)

    def router_logits(self, x: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (r [B,S] fp32: each sequence's own task's router logit, r_all [B,S,columns] raw bank output).
        Every task's score comes from one small matmul, so the graph is the same for every batch."""
        B, S, _ = x.shape
        r_all = self.mod_router(x)
        column = torch.zeros_like(task_ids) if self.shared_router else task_ids
        return r_all.gather(-1, column.view(B, 1, 1).expand(B, S, 1)).squeeze(-1).float(), r_all

    def _forward_causal(self, x, cos, sin, task_ids, layout, r, routable, n_routable, moe=None):
        """Sampling-time routing: a routable token goes through the layer iff its logit > 0, a decision
        that depends on nothing after it. Runs on the full sequence with skipped tokens masked out as
        keys (and other documents hidden), so the result equals gathering the kept tokens (the KV cache
        of model/generation.py relies on it)."""
        B, S, _ = x.shape
        keep = (~routable | (r > 0)) & layout.nonpad  # [B,S]
        base = layout.attn_mask
        if base is None:
            base = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()[None, None]
        eye = torch.eye(S, dtype=torch.bool, device=x.device)
        mask = base & (keep[:, None, None, :] | eye)  # [B,1,S,S]
        y = self._run_block(moe, x, cos, sin, mask, task_ids, keep, False)  # skipped tokens take no expert slot
        gate = torch.where(routable, 2.0 * torch.sigmoid(r), torch.ones_like(r)) * keep
        x_out = x + (y - x) * gate[..., None].to(x.dtype)
        n_selected = (keep & routable).sum(1).to(torch.float32)
        n_selected = torch.where(routable.any(1), n_selected, n_routable)
        zero = x.new_zeros((), dtype=torch.float32)
        # Causal routing keeps exactly the tokens with r > 0: router_on = selected, and all agree.
        return x_out, zero, self._stats(task_ids, n_routable, n_selected, n_selected, n_routable)

    def _aux_loss(self, r, selected, routable, r_all) -> torch.Tensor:
        """BCE(sigmoid(r), per-document top-k membership) over routable tokens: trains the causal router."""
        if self.aux_loss_weight == 0:
            return 0.0 * r_all.sum()
        target = selected.to(r.dtype)
        bce = F.binary_cross_entropy_with_logits(r, target, reduction="none")
        denom = routable.sum().clamp_min(1)
        return self.aux_loss_weight * (bce * routable).sum() / denom + 0.0 * r_all.sum()

    def _stats(self, task_ids, n_routable, n_selected, n_on=None, n_agree=None) -> torch.Tensor:
        """Per-row counts [B] summed per task -> [num_tasks, len(ROUTING_STATS)]. A layer (or row) that
        routes nothing passes n_selected = n_routable and leaves the router columns equal to it."""
        n_on = n_selected if n_on is None else n_on
        n_agree = n_routable if n_agree is None else n_agree
        stats = torch.zeros(self.num_tasks, len(ROUTING_STATS), device=n_routable.device, dtype=torch.float32)
        return stats.index_add(0, task_ids, torch.stack([n_routable, n_selected, n_on, n_agree], dim=1).detach())
