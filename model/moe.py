"""Dense-to-MoE adaptation of a SwiGLU MLP (the sparsity study's "MoE-fication" of a dense FFN).

A dense MLP `down(silu(gate(x)) * up(x))` is a sum over its F neurons, so splitting the neurons into E
disjoint groups gives E smaller MLPs ("experts") whose outputs add up to the dense output exactly. The
split follows the neuron importance (e.g. `mean|h_j| * ||W_down[:, j]||`, see `analysis/metrics.py`):
neurons sorted by importance are dealt to the experts in snake order (0..E-1, then E-1..0, ...), so
every expert receives one neuron of every importance tier and the experts start equally strong.

Routing: a router `Linear(D, E)` initialised to exactly zero; each token runs the k experts with the
highest logits and expert e's output is weighted by the bounded gate `2 * sigmoid(r_e)` (the MoD gate of
model/mod.py). Why this gate: at zero init every weight is exactly 1.0 (sigmoid(0) = 0.5 has an exact
float), so with k = E the layer reproduces the dense MLP up to float summation order, and with k < E it
starts as the plain sum of the chosen experts; each gate depends on its own logit, so the router gets a
gradient even for k = 1 (a softmax over the chosen experts alone would be constant at k = 1, and
`E * softmax` is not exactly 1 at init for every E). With all logits equal at init, top-k picks experts
by index; training the router breaks the tie.

    moe = MoEMLP.from_dense(net.model.layers[3].mlp, importance_F, num_experts=8, top_k=2)
    net.model.layers[3].mlp = moe          # DecoderLayer.block calls self.mlp(...)
    moe.freeze_experts(True)               # train the router only

The converted layer's parameter names (`mlp.router.weight`, `mlp.experts.N.gate_proj.weight`) are not
Emu3's, so an HF export of a converted model is not an Emu3ForCausalLM checkpoint.

Reference: He et al., "Understanding and Harnessing Sparsity in Unified Multimodal Models".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def snake_partition(importance_F: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """Neuron indices of each expert: sort by importance (highest first), deal in snake order.

    Tier t holds the neurons ranked [t*E, (t+1)*E); even tiers go to experts 0..E-1, odd tiers to
    E-1..0. Expert sizes differ by at most one. Each expert's indices come back sorted ascending so
    the expert's weight rows keep the dense layer's order.
    """
    if importance_F.ndim != 1:
        raise ValueError(f"importance must be a 1-D tensor of per-neuron scores, got shape {tuple(importance_F.shape)}")
    F_ = importance_F.numel()
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or not 1 <= num_experts <= F_:
        raise ValueError(f"num_experts must be an integer in [1, {F_}] (the MLP's neurons), got {num_experts!r}")
    # stable sort: equal scores keep index order, so the partition is deterministic
    order = torch.sort(importance_F.detach().float().cpu(), descending=True, stable=True).indices
    rank = torch.arange(F_)
    tier, slot = rank // num_experts, rank % num_experts
    expert_of_rank = torch.where(tier % 2 == 0, slot, num_experts - 1 - slot)
    return [order[expert_of_rank == e].sort().values for e in range(num_experts)]


class Expert(nn.Module):
    """A slice of a SwiGLU MLP: the neurons `idx` of the dense layer (HF MLP parameter names)."""

    def __init__(self, hidden_size: int, width: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden_size, width, **kw)
        self.up_proj = nn.Linear(hidden_size, width, **kw)
        self.down_proj = nn.Linear(width, hidden_size, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEMLP(nn.Module):
    """Top-k of E experts cut from one dense SwiGLU MLP, with a zero-initialised router."""

    def __init__(self, hidden_size: int, expert_widths: list[int], top_k: int,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__()
        E = len(expert_widths)
        if E < 1 or any(w < 1 for w in expert_widths):
            raise ValueError(f"expert_widths must be a non-empty list of positive widths, got {expert_widths}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E:
            raise ValueError(f"top_k must be an integer in [1, {E}] (num_experts), got {top_k!r}")
        self.num_experts, self.top_k = E, top_k
        self.router = nn.Linear(hidden_size, E, bias=False, dtype=dtype, device=device)
        nn.init.zeros_(self.router.weight)
        self.experts = nn.ModuleList(Expert(hidden_size, w, dtype, device) for w in expert_widths)

    @classmethod
    def from_dense(cls, mlp: nn.Module, importance_F: torch.Tensor, num_experts: int, top_k: int) -> "MoEMLP":
        """Cut `mlp` (with `gate_proj`, `up_proj`, `down_proj`) into experts by snake partition."""
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [F,D] [F,D] [D,F]
        if importance_F.numel() != gate.shape[0]:
            raise ValueError(f"importance has {importance_F.numel()} scores but the MLP has {gate.shape[0]} neurons")
        groups = snake_partition(importance_F, num_experts)
        moe = cls(gate.shape[1], [len(g) for g in groups], top_k, dtype=gate.dtype, device=gate.device)
        with torch.no_grad():
            for expert, idx in zip(moe.experts, groups):
                idx = idx.to(gate.device)
                expert.gate_proj.weight.copy_(gate[idx])
                expert.up_proj.weight.copy_(up[idx])
                expert.down_proj.weight.copy_(down[:, idx])
        moe.neuron_groups = [g.tolist() for g in groups]  # which dense neurons each expert holds
        return moe

    def freeze_experts(self, frozen: bool = True) -> None:
        """Train the router alone (frozen=True) or router and experts together."""
        for p in self.experts.parameters():
            p.requires_grad_(not frozen)

    def route(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (chosen experts [N, k] long, their gate weights [N, k]) for N tokens."""
        top = self.router(x_ND).float().topk(self.top_k, dim=-1)  # logits [N, E] -> best k
        return top.indices, (2.0 * torch.sigmoid(top.values)).to(x_ND.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_ND = x.reshape(-1, shape[-1])
        experts_Nk, weights_Nk = self.route(x_ND)
        out = torch.zeros_like(x_ND)
        if self.top_k == self.num_experts:
            # Every token uses every expert: no dispatch, one pass per expert over all tokens.
            weight_NE = torch.zeros(x_ND.shape[0], self.num_experts, dtype=x.dtype, device=x.device)
            weight_NE.scatter_(1, experts_Nk, weights_Nk)
            for e, expert in enumerate(self.experts):
                out = out + weight_NE[:, e:e + 1] * expert(x_ND)
            return out.reshape(shape)
        for e, expert in enumerate(self.experts):
            token, slot = (experts_Nk == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            y = expert(x_ND[token]) * weights_Nk[token, slot][:, None]
            out = out.index_add(0, token, y)
        return out.reshape(shape)


def convert_mlps(net: nn.Module, importance: dict[int, torch.Tensor], num_experts: int, top_k: int,
                 freeze_experts: bool = False) -> dict[int, MoEMLP]:
    """Replace `net.model.layers[i].mlp` by an MoEMLP for every layer i in `importance` (in place).

    `importance[i]` is layer i's per-neuron score [F]. Returns the new modules by layer."""
    layers = net.model.layers
    out = {}
    for i, scores in sorted(importance.items()):
        if not 0 <= i < len(layers):
            raise ValueError(f"importance names layer {i} but the model has {len(layers)} layers")
        moe = MoEMLP.from_dense(layers[i].mlp, scores, num_experts, top_k)
        moe.freeze_experts(freeze_experts)
        layers[i].mlp = moe
        out[i] = moe
    return out
