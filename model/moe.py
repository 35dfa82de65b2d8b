"""Dense-to-MoE adaptation of a SwiGLU MLP (the sparsity study's "MoE-fication" of a dense FFN).

A dense MLP `down(silu(gate(x)) * up(x))` is a sum over its F neurons, so splitting the neurons into E
disjoint groups gives E smaller MLPs ("experts") whose outputs add up to the dense output exactly. The
split follows the neuron importance (e.g. `mean|h_j| * ||W_down[:, j]||`, see `analysis/metrics.py`):
neurons sorted by importance are dealt to the experts in snake order (0..E-1, then E-1..0, ...), so
every expert receives one neuron of every importance tier and the experts start equally strong.

Shared experts (`num_shared` = S, the sparsity study's design): experts 0..S-1 run on every token at weight 1 and
get the most important neurons (`partition`); the router below chooses among the other E - S ("E" in the rest of
this paragraph means those).

Routing: a router `Linear(D, E)` (`Linear(D, E * T)` for a task-aware router: one block of E logits per task,
each token reads its own sequence's task's block, as the MoD router bank does) initialised to exactly zero;
each token runs the k experts with the
highest logits and expert e's output is weighted by the bounded gate `2 * sigmoid(r_e)` (the MoD gate of
model/mod.py). Why this gate: at zero init every weight is exactly 1.0 (sigmoid(0) = 0.5 has an exact
float), so with k = E the layer reproduces the dense MLP up to float summation order, and with k < E it
starts as the plain sum of the chosen experts; each gate depends on its own logit, so the router gets a
gradient even for k = 1 (a softmax over the chosen experts alone would be constant at k = 1, and
`E * softmax` is not exactly 1 at init for every E). With all logits equal at init, `torch.topk` breaks
the tie its own way (not necessarily the lowest indices); training the router breaks it.

A model config with a `moe` section (`MoEConfig`) builds these layers fresh (`MoEMLP.from_config`, experts
normal(0, initializer_range), router zero); the conversion below fills the same kind of module from a dense MLP:

    moe = MoEMLP.from_dense(net.model.layers[3].mlp, importance_F, num_experts=8, top_k=2)
    net.model.layers[3].mlp = moe          # DecoderLayer sees an MoEMLP and dispatches through it
    moe.freeze_experts(True)               # train the router only

The converted layer's parameter names (`mlp.router.weight`, `mlp.experts.N.gate_proj.weight`) are not
Emu3's. The HF export (model/hf.py) writes the MoE layers of `model.moe.layers` as their dense equivalent
(`merge_experts`) plus side tensors; to convert a dense checkpoint through the config, use
`UnifiedTransformer.from_hf(path, moe={...}, importance={...})` rather than `convert_mlps` in place.

Dispatch (`MoEMLP.dispatch`): the N*k token-slots are sorted by expert (one argsort), each expert runs once
on its contiguous slice, and the weighted outputs are scattered back with one index_add. torch has no
grouped GEMM on CPU (and none in the public API for this shape), so the E experts run in a Python loop over
experts, never over tokens. Padding (and MoD placeholders) take no slot: they get a zero MLP output.
A capacity limit (`capacity_factor`) lets each routed expert run at most ceil(cf * k * N / (E - S)) slots, first
come (token order) first served; the rest are dropped (Switch Transformer); shared experts have no limit.
Training adds the Switch/Mixtral load-balancing loss E_r * sum_e f_e * P_e over the E_r = E - S routed experts.

References: He et al., "Understanding and Harnessing Sparsity in Unified Multimodal Models";
Fedus et al. 2021 (Switch Transformer: capacity, load-balancing loss); Jiang et al. 2024 (Mixtral).
"""

from __future__ import annotations

import itertools
import math

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


def partition(importance_F: torch.Tensor, num_experts: int, num_shared: int = 0) -> list[torch.Tensor]:
    """Neuron indices of each expert, shared experts first: the `num_shared` * F/E most important neurons are
    dealt in snake order to the shared experts (which every token runs), the rest in snake order to the routed
    ones. Without shared experts this is `snake_partition`. With them, F must split into equal experts."""
    if not num_shared:
        return snake_partition(importance_F, num_experts)
    F_ = importance_F.numel()
    if isinstance(num_shared, bool) or not isinstance(num_shared, int) or not 0 < num_shared < num_experts \
            or F_ % num_experts:
        raise ValueError(f"num_shared must be an integer in [0, {num_experts}) and the {F_} neurons must split into "
                         f"{num_experts} equal experts, got num_shared={num_shared!r}")
    scores = importance_F.detach().float().cpu()
    order = torch.sort(scores, descending=True, stable=True).indices
    top, rest = order[:num_shared * (F_ // num_experts)], order[num_shared * (F_ // num_experts):]
    shared = [top[g].sort().values for g in snake_partition(scores[top], num_shared)]
    routed = [rest[g].sort().values for g in snake_partition(scores[rest], num_experts - num_shared)]
    return shared + routed


def expert_neuron_groups(moe: "MoEMLP") -> torch.Tensor:
    """[E, F/E] long: the dense neuron indices of each expert's rows, in the expert's row order. An MoE cut
    from a dense MLP (`from_dense`) recorded them (`neuron_groups`); fresh experts sit side by side in expert
    order (expert e holds neurons [e*w, (e+1)*w)). Experts must be equally wide (the config's MoE layers are)."""
    widths = [e.gate_proj.weight.shape[0] for e in moe.experts]
    groups = getattr(moe, "neuron_groups", None)
    if groups is None:
        starts = [0] + list(itertools.accumulate(widths))
        groups = [list(range(a, b)) for a, b in zip(starts, starts[1:])]
    if len(set(len(g) for g in groups)) != 1 or [len(g) for g in groups] != widths:
        raise ValueError(f"experts of widths {widths} (groups {[len(g) for g in groups]}) are not equally wide")
    return torch.tensor(groups, dtype=torch.long)


def merge_experts(pieces: list[torch.Tensor], groups_EW: torch.Tensor, dim: int) -> torch.Tensor:
    """The dense weight whose neurons `groups_EW[e]` are expert e's: pieces [w, D] (gate/up, dim 0) or
    [D, w] (down, dim 1) per expert. The dense SwiGLU MLP of this weight equals the sum of all experts with
    gate 1 (the MoE layer at k = E with a zero router). Inverse of `cut_experts`; values are copied, not
    computed, so a merge and a cut give the experts back bit for bit."""
    cat = torch.cat(pieces, dim)
    dense = torch.empty_like(cat)
    index = groups_EW.reshape(-1).to(cat.device)
    return dense.index_copy_(dim, index, cat)


def cut_experts(dense: torch.Tensor, groups_EW: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """Expert e's slice of a dense weight: neurons `groups_EW[e]` along `dim` (0 for gate/up [F, D], 1 for
    down [D, F]), contiguous copies."""
    return [dense.index_select(dim, g.to(dense.device)).contiguous() for g in groups_EW]


# Columns of an MoE layer's statistics (`MoEMLP.dispatch`, `ModelOutput.experts` [L, T, E, 2]), token-slot
# counts per task and expert:
#   routed    slots the router sent to the expert (non-padding tokens' top-k choices)
#   dropped   of those, slots over the expert's capacity: not run (0 without a capacity limit)
EXPERT_STATS = ("routed", "dropped")


def routed_load(slots_E: torch.Tensor, num_shared: int) -> tuple[torch.Tensor, float] | None:
    """One layer's and task's slot counts per expert [E] -> (each routed expert's share of the routed slots
    [E - S], the busiest one's share x (E - S): 1.0 is a perfect balance); None without a routed slot. Shared
    experts run every token, so they have no load to balance. What training logs as moe/load and moe/max_load
    and the evaluator as experts/max_load."""
    routed = slots_E[num_shared:].double()
    total = routed.sum()
    if total <= 0:
        return None
    shares = routed / total
    return shares, float(shares.max()) * len(shares)


class _ZeroLinear(nn.Linear):
    """Bias-free Linear initialised to exactly zero (in reset_parameters, where deepspeed.zero.Init expects
    a leaf module's init)."""

    def __init__(self, in_features: int, out_features: int, dtype=None, device=None) -> None:
        super().__init__(in_features, out_features, bias=False, dtype=dtype, device=device)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


class Expert(nn.Module):
    """A slice of a SwiGLU MLP (HF MLP parameter names): the neurons `idx` of a dense layer (`from_dense`), or
    a freshly initialised one, normal(0, std), when `std` is given."""

    def __init__(self, hidden_size: int, width: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, std: float | None = None) -> None:
        super().__init__()
        if std is None:
            kw = dict(bias=False, dtype=dtype, device=device)
            self.gate_proj = nn.Linear(hidden_size, width, **kw)
            self.up_proj = nn.Linear(hidden_size, width, **kw)
            self.down_proj = nn.Linear(width, hidden_size, **kw)
        else:
            from model.layers import Linear  # init inside the leaf module, as the dense MLP does

            self.gate_proj = Linear(hidden_size, width, std)
            self.up_proj = Linear(hidden_size, width, std)
            self.down_proj = Linear(width, hidden_size, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEMLP(nn.Module):
    """S shared experts (every token runs them) and top-k of E - S routed experts, with a zero-initialised router
    (shared, or one block of E - S logits per task). Experts 0..S-1 are the shared ones.

    `forward(x)` is the drop-in MLP (every token valid, task 0, no capacity); decoder layers call `dispatch`,
    which also takes each token's task and validity and returns the balance loss and statistics."""

    def __init__(self, hidden_size: int, expert_widths: list[int], top_k: int, *, num_tasks: int = 1,
                 router: str = "shared", balance_loss_weight: float = 0.0, capacity_factor: float | None = None,
                 num_shared: int = 0, init_std: float | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        E = len(expert_widths)
        if E < 1 or any(w < 1 for w in expert_widths):
            raise ValueError(f"expert_widths must be a non-empty list of positive widths, got {expert_widths}")
        if isinstance(num_shared, bool) or not isinstance(num_shared, int) or not 0 <= num_shared < E:
            raise ValueError(f"num_shared must be an integer in [0, {E}) (num_experts), got {num_shared!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= E - num_shared:
            raise ValueError(f"top_k must be an integer in [1, {E - num_shared}] (the routed experts), got {top_k!r}")
        if router not in ("task", "shared"):
            raise ValueError(f"router must be 'task' or 'shared', got {router!r}")
        self.num_experts, self.top_k, self.num_tasks, self.num_shared = E, top_k, num_tasks, num_shared
        self.task_router = router == "task"
        self.balance_loss_weight = balance_loss_weight
        self.capacity_factor = capacity_factor or None
        # Row t*E_r + r of the weight is task t's logit for routed expert r (expert S + r).
        self.router = _ZeroLinear(hidden_size, (E - num_shared) * (num_tasks if self.task_router else 1), dtype,
                                  device)
        self.experts = nn.ModuleList(Expert(hidden_size, w, dtype, device, init_std) for w in expert_widths)

    @classmethod
    def from_config(cls, cfg) -> "MoEMLP":
        """A fresh MoE MLP for a layer of `cfg.moe.layers` (cfg: model.config.ModelConfig)."""
        moe = cfg.moe
        width = cfg.intermediate_size // moe.num_experts  # divisibility checked by ModelConfig
        return cls(cfg.hidden_size, [width] * moe.num_experts, moe.top_k, num_tasks=cfg.num_tasks,
                   router=moe.router, balance_loss_weight=moe.balance_loss_weight,
                   capacity_factor=moe.capacity_factor, num_shared=moe.shared_experts, init_std=cfg.initializer_range)

    @classmethod
    def from_dense(cls, mlp: nn.Module, importance_F: torch.Tensor, num_experts: int, top_k: int,
                   **kwargs) -> "MoEMLP":
        """Cut `mlp` (with `gate_proj`, `up_proj`, `down_proj`) into experts by `partition` (the most important
        neurons to the `num_shared` shared experts, if any). `kwargs`: the router and loss settings of `__init__`
        (num_tasks, router, balance_loss_weight, capacity_factor, num_shared)."""
        gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight  # [F,D] [F,D] [D,F]
        if importance_F.numel() != gate.shape[0]:
            raise ValueError(f"importance has {importance_F.numel()} scores but the MLP has {gate.shape[0]} neurons")
        groups = partition(importance_F, num_experts, kwargs.get("num_shared", 0))
        moe = cls(gate.shape[1], [len(g) for g in groups], top_k, dtype=gate.dtype, device=gate.device, **kwargs)
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

    def logits(self, x_ND: torch.Tensor, task_N: torch.Tensor | None = None) -> torch.Tensor:
        """-> [N, E - S] logits of the routed experts (fp32, or fp64 for fp64 inputs), each token's own task's
        block for a task-aware router."""
        r = self.router(x_ND)
        if self.task_router:
            if task_N is None:
                raise ValueError("a task-aware MoE router needs each token's task id")
            N, E_r = r.shape[0], self.num_experts - self.num_shared
            r = r.view(N, -1, E_r).gather(1, task_N.view(N, 1, 1).expand(N, 1, E_r)).squeeze(1)
        return r.to(torch.promote_types(r.dtype, torch.float32))  # at least fp32: top-k and softmax under bf16

    def route(self, x_ND: torch.Tensor, task_N: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (the chosen routed experts' indices among all E [N, k] long, their gate weights [N, k]) for N
        tokens (the shared experts, 0..S-1, run on every token besides)."""
        chosen, gate = self._choose(self.logits(x_ND, task_N))
        return chosen + self.num_shared, gate.to(x_ND.dtype)

    def _choose(self, logits_NE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [N, E - S] -> (the k best routed experts [N, k], numbered 0..E-S-1, their bounded gates
        2 * sigmoid(r) [N, k])."""
        top = logits_NE.topk(self.top_k, dim=-1)
        return top.indices, 2.0 * torch.sigmoid(top.values)

    def capacity(self, n_valid: int) -> int | None:
        """Token-slots one routed expert may run in a call on `n_valid` non-padding tokens; None = no limit.
        Shared experts have no limit: every token runs them."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * self.top_k * n_valid / (self.num_experts - self.num_shared) - 1e-9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y, _, _ = self.dispatch(x.reshape(-1, shape[-1]), task_N=None, apply_capacity=False)
        return y.reshape(shape)

    def dispatch(self, x_ND: torch.Tensor, task_N: torch.Tensor | None = None, valid_N: torch.Tensor | None = None,
                 apply_capacity: bool = True, num_tasks: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_ND [N, D] (normed hidden states), task_N [N] long (None: task 0), valid_N [N] bool (None: all;
        False = padding or an MoD placeholder: no slot, zero output, not in the loss or the statistics).
        -> (y [N, D], weighted balance loss [] fp32, statistics [num_tasks, E, 2] float (`EXPERT_STATS`)).

        One device->host copy per call (the per-expert slot counts that size the slices)."""
        N, D = x_ND.shape
        E, k, Sh = self.num_experts, self.top_k, self.num_shared
        T = num_tasks or self.num_tasks
        dev = x_ND.device
        if task_N is None:
            task_N = torch.zeros(N, dtype=torch.long, device=dev)
        logits_NE = self.logits(x_ND, task_N)
        chosen_Nk, gate_Nk = self._choose(logits_NE)
        # Slots (one per token and expert it runs): each shared expert once per token, gate 1, then each token's
        # k routed experts, token-major. Routed expert r is expert Sh + r.
        gate_S = torch.cat([gate_Nk.new_ones(Sh * N), gate_Nk.reshape(-1)])
        expert_S = torch.cat([torch.arange(Sh, device=dev).repeat_interleave(N), chosen_Nk.reshape(-1) + Sh])
        token_S = torch.cat([torch.arange(N, device=dev).repeat(Sh), torch.arange(N, device=dev).repeat_interleave(k)])
        if valid_N is not None:
            # Invalid tokens' slots go to a bucket E after every expert: sorted last, never run.
            expert_S = torch.where(valid_N[token_S], expert_S, E)
        # Stable: within an expert, slots keep token order, so capacity is first come, first served.
        order = expert_S.argsort(stable=True)
        counts = torch.bincount(expert_S, minlength=E + 1)  # [E+1]
        host = counts.tolist()
        n_valid = (N * (Sh + k) - host[E]) // (Sh + k)
        cap = self.capacity(n_valid) if apply_capacity else None
        starts = [0, *itertools.accumulate(host[:E])]  # expert e's slots sit at order[starts[e]:...]
        run = [host[e] if cap is None or e < Sh else min(host[e], cap) for e in range(E)]

        pieces_idx, pieces_y = [], []
        idle = x_ND.new_zeros(())
        for e, expert in enumerate(self.experts):
            if run[e] == 0:
                # An expert without slots here still runs, on zero rows: its parameters get a (zero) gradient on
                # every rank, which ZeRO-3's gradient reduction expects (the MoD routers' `0 * sum` for the same
                # reason); it costs no FLOPs and adds exactly 0 to the output.
                idle = idle + expert(x_ND[:0]).sum()
                continue
            sel = order[starts[e]:starts[e] + run[e]]  # expert e's slots, token order
            tok = token_S[sel]
            pieces_idx.append(tok)
            pieces_y.append(expert(x_ND[tok]) * gate_S[sel, None].to(x_ND.dtype))
        y = x_ND.new_zeros(N, D) + idle
        if pieces_idx:
            y = y.index_add(0, torch.cat(pieces_idx), torch.cat(pieces_y))

        # Statistics: routed and dropped slots per (task, expert), over valid slots only (a shared expert's
        # "routed" slots are every valid token).
        valid_S = expert_S < E
        key_S = task_N[token_S] * E + expert_S.clamp_max(E - 1)
        routed = torch.zeros(T * E, device=dev).index_add_(0, key_S, valid_S.float())
        dropped = torch.zeros(T * E, device=dev)
        if cap is not None and any(host[e] > cap for e in range(Sh, E)):
            rank_S = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=dev))
            start_S = torch.tensor(starts, device=dev)[expert_S.clamp_max(E - 1)]
            over_S = valid_S & (expert_S >= Sh) & (rank_S - start_S >= cap)
            dropped.index_add_(0, key_S, over_S.float())
        stats = torch.stack([routed, dropped], dim=1).view(T, E, 2)
        return y, self._balance_loss(logits_NE, counts[Sh:E], valid_N, n_valid), stats

    def _balance_loss(self, logits_NE, routed_counts_E, valid_N, n_valid) -> torch.Tensor:
        """weight * E_r * sum_e f_e * P_e over valid tokens and the E_r routed experts (Switch Transformer eq. 4,
        top-k slots for f; `routed_counts_E` [E_r]: valid slots per routed expert)."""
        zero = logits_NE.new_zeros(())
        if self.balance_loss_weight == 0 or n_valid == 0:
            return zero
        f_E = routed_counts_E.float() / (n_valid * self.top_k)
        prob_NE = logits_NE.softmax(dim=-1)
        if valid_N is not None:
            prob_NE = prob_NE * valid_N[:, None]
        P_E = prob_NE.sum(0) / n_valid
        return self.balance_loss_weight * logits_NE.shape[-1] * (f_E * P_E).sum()


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
