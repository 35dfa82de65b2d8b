"""Task-aware Mixture-of-Depths (UniMoD) around the Emu3 decoder block.

A MoD layer owns a router bank `mod_router = Linear(hidden, num_tasks)`: every token gets one score per
task and each sequence reads its own task's column (`mod.shared_router` makes it one shared column, the
ablation UniMoD compares against). For a sequence of task t in layer l the layer processes
P = ceil(capacity[l][t] * S) of its S positions; the rest ride the residual stream unchanged.

Which positions fill the P slots (a priority order, highest first):
  1. non-routable tokens (structural tokens always; text tokens for tasks that route only image tokens),
  2. routable tokens by router logit,
  3. padding (skipped before anything else: it carries no loss).
Capacity is a fraction of the *sequence* (not of the routable tokens), so P depends only on
(layer, task, S): shapes are static between steps, which ZeRO-3 prefetching and pipeline stages need, and
the FLOPs saved are exactly those the capacity table promises. A capacity must leave room for a task's
non-routable tokens; when it does not, the latest of them are skipped (and no routable token is kept,
which the routing statistics show).

Kept tokens keep their order and absolute RoPE positions and attend causally among themselves only. The
update of a routed token is scaled by a bounded gate g = 2*sigmoid(r) (~1 at init with small router
weights, so a dense checkpoint starts unchanged); non-routable tokens take the plain update. An auxiliary
BCE loss teaches sigmoid(r) to predict top-k membership, so sampling can route causally (r > 0) without
seeing future tokens (`routing="causal"`).

References: Raposo et al. 2024 (Mixture-of-Depths), UniMoD (arXiv 2502.06474); see docs in shared/.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.config import ModelConfig, VocabLayout
from model.layers import Block, Linear

# Token kinds, computed once per forward from the ids and the vocabulary layout.
KIND_PAD, KIND_STRUCTURAL, KIND_TEXT, KIND_IMAGE = 0, 1, 2, 3
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


def tokens_kept(capacity: float, seq_len: int) -> int:
    """P = number of positions a layer processes per sequence at this capacity (static)."""
    return seq_len if capacity >= 1.0 else max(1, math.ceil(capacity * seq_len - 1e-9))


class DecoderLayer(Block):
    """The Emu3 decoder block plus, in MoD layers, the task router bank (`mod_router`)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg)
        self.layer_idx = layer_idx
        self.num_tasks = cfg.num_tasks
        self.capacities = [cfg.mod.capacity_of(layer_idx, t) for t in range(cfg.num_tasks)]
        self.is_mod = cfg.mod.is_mod_layer(layer_idx)
        self.aux_loss_weight = cfg.mod.aux_loss_weight
        self.shared_router = cfg.mod.shared_router
        n_scores = 1 if self.shared_router else cfg.num_tasks
        self.mod_router = Linear(cfg.hidden_size, n_scores, cfg.mod.router_init_std) if self.is_mod else None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kinds: torch.Tensor,
        task_ids: torch.Tensor,
        routable_tbl: torch.Tensor,
        cap_tbl: torch.Tensor,
        routing: str = "topk",
        tasks_host: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B,S,D] -> (x_out [B,S,D], weighted aux loss [], stats [num_tasks, 2] = (routable, selected)).

        `routable_tbl` [T,4] and `cap_tbl` [L,T] come from `routable_table` / `capacity_table`, built
        once per forward on the device.
        `tasks_host` is task_ids as a Python list; pass it so the layer need not copy task_ids to the
        host (a device sync per layer) to size its gather."""
        B, S, _ = x.shape
        routable = routable_tbl[task_ids][torch.arange(B, device=x.device)[:, None], kinds.long()]  # [B,S]
        n_routable = routable.sum(1).to(torch.float32)
        zero = x.new_zeros((), dtype=torch.float32)
        if not self.is_mod:
            return self.block(x, cos, sin), zero, self._stats(task_ids, n_routable, n_routable)

        r, r_all = self.router_logits(x, task_ids)
        if tasks_host is None:
            tasks_host = task_ids.tolist()
        caps = [self.capacities[t] for t in tasks_host]
        routed_seq = cap_tbl[self.layer_idx][task_ids] < 1.0  # [B] on device: sequences routed here
        routable = routable & routed_seq[:, None]
        if routing == "causal":
            return self._forward_causal(x, cos, sin, kinds, task_ids, r, routable, n_routable)
        if all(c >= 1.0 for c in caps):
            # Full layer for every sequence; keep the router in the graph so every rank produces a
            # gradient for it (ZeRO-3 reduces every parameter on every rank).
            return self.block(x, cos, sin), zero + 0.0 * r_all.sum(), self._stats(task_ids, n_routable, n_routable)

        kept = [tokens_kept(c, S) for c in caps]
        P = max(kept)
        # Priority: non-routable first (earlier ones first, should they not all fit), then routable by
        # router logit, padding last. float64 keeps the position tie-break exact next to any logit.
        pos = torch.arange(S, device=x.device, dtype=torch.float64)
        priority = torch.where(routable, r.detach().double(), 1e12 - pos)
        priority = torch.where(kinds == KIND_PAD, -1e12 - pos, priority)
        uniform = len(set(kept)) == 1
        top = priority.topk(P, dim=1, sorted=not uniform).indices  # [B,P]; best first when sorted
        valid = None
        if uniform:
            idx = top.sort(dim=1).values  # restore sequence order
        else:
            # A sequence with a smaller P than the micro-batch's fills its extra slots with placeholders.
            # Sorting them after every kept token (key + S) lets plain causal attention hide them from
            # the kept tokens, so no mask is needed and the flash kernel still applies; their own
            # outputs are dropped by a zero gate.
            rank_ok = torch.arange(P, device=x.device)[None, :] < torch.tensor(kept, device=x.device)[:, None]
            key = torch.where(rank_ok, top, top + S).sort(dim=1).values
            valid = key < S
            idx = torch.where(valid, key, key - S)

        idx_D = idx[..., None].expand(B, P, x.shape[-1])
        x_sel = x.gather(1, idx_D)
        cos_sel = cos.gather(1, idx[..., None].expand(B, P, cos.shape[-1]))
        sin_sel = sin.gather(1, idx[..., None].expand(B, P, sin.shape[-1]))
        y = self.block(x_sel, cos_sel, sin_sel)

        r_sel = r.gather(1, idx)
        routed_sel = routable.gather(1, idx)
        if valid is not None:
            routed_sel = routed_sel & valid
        gate = torch.where(routed_sel, 2.0 * torch.sigmoid(r_sel), torch.ones_like(r_sel))
        if valid is not None:
            gate = gate * valid
        x_out = x.scatter(1, idx_D, x_sel + (y - x_sel) * gate[..., None].to(x.dtype))

        selected = torch.zeros_like(routable).scatter(1, idx, routed_sel)
        aux = self._aux_loss(r, selected, routable, r_all)
        n_selected = torch.where(routed_seq, selected.sum(1).to(torch.float32), n_routable)
        return x_out, aux, self._stats(task_ids, n_routable, n_selected)

    def router_logits(self, x: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (r [B,S] fp32: each sequence's own task's router logit, r_all [B,S,columns] raw bank output).
        Every task's score comes from one small matmul, so the graph is the same for every batch."""
        B, S, _ = x.shape
        r_all = self.mod_router(x)
        column = torch.zeros_like(task_ids) if self.shared_router else task_ids
        return r_all.gather(-1, column.view(B, 1, 1).expand(B, S, 1)).squeeze(-1).float(), r_all

    def _forward_causal(self, x, cos, sin, kinds, task_ids, r, routable, n_routable):
        """Sampling-time routing: a routable token goes through the layer iff its logit > 0, a decision
        that depends on nothing after it. Runs on the full sequence with skipped tokens masked out as
        keys, so the result equals gathering the kept tokens (the KV cache of issue 6 relies on it)."""
        B, S, _ = x.shape
        keep = (~routable | (r > 0)) & (kinds != KIND_PAD)  # [B,S]
        causal = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        eye = torch.eye(S, dtype=torch.bool, device=x.device)
        mask = (causal[None] & (keep[:, None, :] | eye))[:, None]
        y = self.block(x, cos, sin, mask)
        gate = torch.where(routable, 2.0 * torch.sigmoid(r), torch.ones_like(r)) * keep
        x_out = x + (y - x) * gate[..., None].to(x.dtype)
        n_selected = (keep & routable).sum(1).to(torch.float32)
        n_selected = torch.where(routable.any(1), n_selected, n_routable)
        zero = x.new_zeros((), dtype=torch.float32)
        return x_out, zero, self._stats(task_ids, n_routable, n_selected)

    def _aux_loss(self, r, selected, routable, r_all) -> torch.Tensor:
        """BCE(sigmoid(r), top-k membership) over routable tokens: trains the causal router."""
        if self.aux_loss_weight == 0:
            return 0.0 * r_all.sum()
        target = selected.to(r.dtype)
        bce = F.binary_cross_entropy_with_logits(r, target, reduction="none")
        denom = routable.sum().clamp_min(1)
        return self.aux_loss_weight * (bce * routable).sum() / denom + 0.0 * r_all.sum()

    def _stats(self, task_ids, n_routable, n_selected) -> torch.Tensor:
        stats = torch.zeros(self.num_tasks, 2, device=n_routable.device, dtype=torch.float32)
        return stats.index_add(0, task_ids, torch.stack([n_routable, n_selected], dim=1).detach())
