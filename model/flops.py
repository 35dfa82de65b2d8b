"""Analytic FLOPs of the unified decoder, from a micro-batch's actual structure: as run, and the honest
dense baseline a MoD saving is measured against.

Counts exactly the matrix products the model runs, in the convention of
`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add; element-wise work such as
norms, RoPE, softmax, masks, gates, top-k and gather/scatter counts zero):

- per decoder layer on n tokens of one row: q/k/v/o projections `2n*D*(2*H*hd + 2*KV*hd)`
  (K/V counted with the KV heads of GQA, unlike Megatron's integer division), SDPA
  `4*H*hd*n^2`, SwiGLU MLP `2n*3*D*F`;
- the router bank of a MoD layer, `Linear(D, T)` on all S positions of a row: `2*S*D*T`;
- the LM head `Linear(D, V)` on all S positions: `2*S*D*V` (the embedding lookup is free);
- an MoE layer (`moe.layers`, model/moe.py) replaces the SwiGLU MLP term by its router
  `Linear(D, E*T)` (`E` for a shared router) on the n positions the layer runs, `2n*D*E*T` (counted as
  `router`), plus each expert's SwiGLU on the token-slots it actually ran, `2*slots_e*3*D*(F/E)` (counted
  as `mlp`; padding, MoD placeholders and slots dropped over capacity take none). Routing is
  data-dependent, so the exact count takes the forward's slot counts (`expert_slots`, from
  `ModelOutput.experts`); without them every token the layer keeps (non-padding, MoD-kept) is counted
  with k slots: exact with `routing="topk"` and no capacity limit (all experts are F/E wide, so which
  experts ran does not matter), an upper bound with a capacity limit or causal routing.

A micro-batch is described by `describe_microbatch` as one `RowTokens` per row: its task, its packed
documents (position ids restart at 0 for each; `model.layers.document_ids`), each with its non-padding
tokens and how many of them its task may skip (`model.mod.token_kinds`, `mod.routable`), and its padding
tokens (`pad_id`, wherever they sit). What the model runs on it (`microbatch_flops`):

- a dense layer runs on all S positions of every row (document-masked attention is still one S x S SDPA
  per row for FlopCounterMode, whatever the mask);
- a MoD layer (`routing="topk"`): row b keeps K_b = the sum over its documents of the non-routable tokens
  plus `routable_kept(capacity, n_routable)` routable ones (per document, never over the row), or all its
  non-padding tokens when its task has capacity >= 1 there; padding is never kept. The layer runs once on
  P = max_b K_b gathered positions per row, so every row pays for P (a mixed-task micro-batch's slack is
  real compute and is counted). If every row has capacity >= 1 in that layer it is a plain layer on S;
- `routing="causal"` (sampling) masks inside full-length layers: S per row plus the router.

The dense baseline (`dense_flops`, `StepFlops.dense`) is what a dense model must spend on the real tokens
only: every document processed alone, without padding: layers and head on its n tokens, attention n x n.
MoD's saving, `StepFlops.saved_pct = 1 - actual / dense`, is measured against it, so skipping padding
(which a dense model could skip just as well) earns MoD nothing. The same number for a dense model that
trains on padded or packed rows is negative (it pays for padding and for S x S attention over documents
that only need n x n): that is the honest cost of the batch layout, reported separately as
`StepFlops.pad_pct`.

Training = forward + backward. Backward of a matmul is 2x its forward (input and weight
gradients). Backward of SDPA follows torch's `sdpa_backward_flop_count` (the flash/efficient
kernels recompute the scores: 5 products instead of 2, i.e. 2.5x forward). Full activation
recomputation adds one more forward of the decoder layers (routers included), never of the head;
torch's non-reentrant checkpoint may stop a little earlier (it skips a trailing matmul whose output
backward never reads), so `recompute=True` is the conventional upper bound of the hardware's work.
The dense baseline takes the same `recompute` setting as the count it is compared with.

`causal_attention=False` (the default) is FlopCounterMode's convention: the whole n x n score
matrix. `causal_attention=True` counts only the lower triangle with its diagonal, n(n+1)/2 scores,
i.e. what a causal kernel needs; report it separately, never mix the two in one comparison.

References: Megatron-LM's `num_floating_point_operations`, torchtitan's `get_num_flop_per_token`
and MFU, torch/utils/flop_counter.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, Sequence

from model.config import ModelConfig
# The model's own rule for how many routable tokens a document keeps, so the count can never drift.
from model.mod import routable_kept


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs by component; plain Python ints, so sums over steps stay exact."""

    attn_proj: int = 0
    """q, k, v and o projections of every layer that ran."""
    attn_sdpa: int = 0
    """Scaled-dot-product attention (Q K^T and P V) of every layer that ran."""
    mlp: int = 0
    """SwiGLU gate, up and down projections (MoE layers: of the experts, on the slots they ran)."""
    router: int = 0
    """MoD router banks, Linear(D, num_tasks) on all positions of every MoD layer, and MoE routers."""
    head: int = 0
    """LM head, Linear(D, vocab) on all positions."""

    @property
    def layers(self) -> int:
        """Everything a decoder layer does (what activation recomputation repeats)."""
        return self.attn_proj + self.attn_sdpa + self.mlp + self.router

    @property
    def total(self) -> int:
        return self.layers + self.head

    def __add__(self, other: "FlopsBreakdown") -> "FlopsBreakdown":
        return FlopsBreakdown(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def __mul__(self, k: int) -> "FlopsBreakdown":
        return FlopsBreakdown(*(k * v for v in dataclasses.astuple(self)))

    __rmul__ = __mul__

    def without_head(self) -> "FlopsBreakdown":
        return dataclasses.replace(self, head=0)

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


# ----- what a micro-batch holds --------------------------------------------------------------------------
class Document(NamedTuple):
    """One packed sample of a row."""

    tokens: int
    """Its non-padding tokens (what a dense model must process)."""
    routable: int
    """How many of them its task may skip in a MoD layer (`mod.routable`; never structural tokens)."""


@dataclass(frozen=True)
class RowTokens:
    """One row of a micro-batch, as the FLOPs model needs it."""

    task: int
    """Task id (index into `mod.tasks`) of every document in the row."""
    documents: tuple[Document, ...]
    """The row's documents in order (documents of padding only are left out)."""
    padding: int = 0
    """Padding tokens of the row (never kept by MoD, never counted by the dense baseline)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "documents", tuple(Document(*d) for d in self.documents))
        if self.padding < 0 or any(d.tokens <= 0 or not 0 <= d.routable <= d.tokens for d in self.documents):
            raise ValueError(f"RowTokens needs padding >= 0 and documents with 0 <= routable <= tokens, tokens > 0; "
                             f"got {self}")
        if self.length == 0:
            raise ValueError("RowTokens must hold at least one position")

    @classmethod
    def single(cls, task: int, seq_len: int, routable: int | None = None, padding: int = 0) -> "RowTokens":
        """A row of one document of `seq_len - padding` tokens, `routable` of them routable (all by default)."""
        n = seq_len - padding
        return cls(task, ((n, n if routable is None else routable),), padding)

    @property
    def real_tokens(self) -> int:
        return sum(d.tokens for d in self.documents)

    @property
    def length(self) -> int:
        """Positions of the row (S): real tokens plus padding."""
        return self.real_tokens + self.padding


def describe_microbatch(input_ids, position_ids, task_ids, cfg: ModelConfig) -> list[RowTokens]:
    """[B,S] ids, [B,S] position ids, [B] task ids -> one `RowTokens` per row (host-side, cheap: pass the
    loader's CPU tensors; device tensors are copied to the host once)."""
    import torch

    from model.layers import document_ids
    from model.mod import KIND_PAD, routable_table, token_kinds

    ids, pos, tasks = input_ids.detach().cpu(), position_ids.detach().cpu(), task_ids.detach().cpu()
    if ids.dim() != 2 or pos.shape != ids.shape or tasks.shape != ids.shape[:1]:
        raise ValueError(f"describe_microbatch: input_ids and position_ids must be [B,S] and task_ids [B], got "
                         f"{tuple(ids.shape)}, {tuple(pos.shape)}, {tuple(tasks.shape)}")
    B, S = ids.shape
    kinds = token_kinds(ids, cfg.vocab).long()
    real = kinds != KIND_PAD
    routable = routable_table(cfg, torch.device("cpu"))[tasks][torch.arange(B)[:, None], kinds] & real
    docs = document_ids(pos)  # 0, 1, ... within each row
    n_tokens = torch.zeros(B, S, dtype=torch.long).scatter_add_(1, docs, real.long()).tolist()
    n_routable = torch.zeros(B, S, dtype=torch.long).scatter_add_(1, docs, routable.long()).tolist()
    n_docs, padding = (docs[:, -1] + 1).tolist(), (~real).sum(1).tolist()
    return [RowTokens(int(tasks[b]), tuple(Document(n, r) for n, r in zip(n_tokens[b][:n_docs[b]],
                                                                          n_routable[b][:n_docs[b]]) if n > 0),
                      padding[b])
            for b in range(B)]


# ----- building blocks ------------------------------------------------------------------------------------
def _sdpa(cfg: ModelConfig, n: int, causal: bool, products: int) -> int:
    # torch's sdpa_flop_count: two [n, hd] x [hd, n]-sized products per query head (GQA broadcasts K/V to
    # every query head); sdpa_backward_flop_count: five such products.
    return products * cfg.num_attention_heads * cfg.head_dim * (n * (n + 1) if causal else 2 * n * n)


class _Passes(NamedTuple):
    """How many times each kind of work runs: forward, + backward, + recomputation."""

    layer_linear: int  # multiples of a layer's (and router's) forward matmuls
    head_linear: int   # multiples of the head's forward matmul
    sdpa_products: int  # [n, hd] x [hd, n] products per query head

    @classmethod
    def of(cls, train: bool, recompute: bool) -> "_Passes":
        if not train:
            return cls(1, 1, 2)
        return cls(3 + recompute, 3, 2 + 5 + 2 * recompute)


def _layer(cfg: ModelConfig, n: int, causal: bool, passes: _Passes, mlp: bool = True) -> FlopsBreakdown:
    """One decoder layer (no router) on n tokens of one row; without its dense MLP for an MoE layer."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q_width, kv_width = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return FlopsBreakdown(
        attn_proj=passes.layer_linear * (2 * n * d * (q_width + 2 * kv_width) + 2 * n * q_width * d),
        attn_sdpa=_sdpa(cfg, n, causal, passes.sdpa_products),
        mlp=passes.layer_linear * 2 * n * 3 * d * cfg.intermediate_size if mlp else 0,
    )


def _moe_router(cfg: ModelConfig, n: int, passes: _Passes) -> FlopsBreakdown:
    return _router(cfg, n, passes, cfg.moe.routed_experts * (cfg.num_tasks if cfg.moe.router == "task" else 1))


def _moe_experts(cfg: ModelConfig, slots: int, passes: _Passes) -> FlopsBreakdown:
    """The experts of one MoE layer on `slots` token-slots (all experts are intermediate_size / E wide)."""
    width = cfg.intermediate_size // cfg.moe.num_experts
    return FlopsBreakdown(mlp=passes.layer_linear * 2 * slots * 3 * cfg.hidden_size * width)


def expert_slots(experts, cfg: ModelConfig) -> dict[int, list[int]]:
    """`ModelOutput.experts` [L, T, E, 2] (one micro-batch's forward) -> {MoE layer: slots each expert ran}, the
    `expert_slots` argument of `microbatch_flops`: routed minus dropped, summed over tasks."""
    run = (experts[..., 0] - experts[..., 1]).sum(1).round().long().tolist()  # [L][E]
    return {i: run[i][:cfg.moe.num_experts] for i in cfg.moe.layers}


def _nominal_slots(cfg: ModelConfig, rows: Sequence[RowTokens], layer: int, routing: str) -> int:
    """S + k slots (shared and routed experts) for every token an MoE layer keeps (see the module docstring:
    exact for top-k routing without a capacity limit, an upper bound otherwise)."""
    mod = cfg.mod
    if routing != "causal" and mod.is_mod_layer(layer) and any(mod.capacity_of(layer, r.task) < 1.0 for r in rows):
        kept = sum(row_kept(cfg, r, layer) for r in rows)
    else:
        kept = sum(r.real_tokens for r in rows)
    return cfg.moe.active_experts * kept


def _check_expert_slots(cfg: ModelConfig, slots: Mapping[int, Sequence[int]]) -> None:
    if set(slots) != set(cfg.moe.layers):
        raise ValueError(f"expert_slots must give the slot counts of exactly the MoE layers {cfg.moe.layers}, "
                         f"got layers {sorted(slots)}")
    for layer, counts in slots.items():
        if len(counts) != cfg.moe.num_experts or any(isinstance(c, bool) or not isinstance(c, int) or c < 0
                                                     for c in counts):
            raise ValueError(f"expert_slots[{layer}] must hold {cfg.moe.num_experts} slot counts >= 0 (one per "
                             f"expert), got {counts!r}")


def _router(cfg: ModelConfig, n: int, passes: _Passes, columns: int | None = None) -> FlopsBreakdown:
    """A router Linear(D, columns) on n positions; by default a MoD router bank (one column per task, or one)."""
    if columns is None:
        columns = 1 if cfg.mod.shared_router else cfg.num_tasks
    return FlopsBreakdown(router=passes.layer_linear * 2 * n * cfg.hidden_size * columns)


def _head(cfg: ModelConfig, n: int, passes: _Passes) -> FlopsBreakdown:
    return FlopsBreakdown(head=passes.head_linear * 2 * n * cfg.hidden_size * cfg.vocab_size)


def _check_rows(cfg: ModelConfig, rows: Sequence[RowTokens], where: str) -> int:
    """-> S, the common length of the rows."""
    if len(rows) == 0:
        raise ValueError(f"{where}: a micro-batch needs at least one row")
    lengths = {r.length for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"{where}: rows of one micro-batch must have the same length, got {sorted(lengths)}")
    for r in rows:
        if isinstance(r.task, bool) or not isinstance(r.task, int) or not 0 <= r.task < cfg.num_tasks:
            raise ValueError(f"{where}: task id {r.task!r} is not an index into mod.tasks {cfg.mod.tasks}")
    return lengths.pop()


def row_kept(cfg: ModelConfig, row: RowTokens, layer: int) -> int:
    """K_b: positions of `row` a MoD layer keeps (`routing="topk"`, some row of the batch routed there)."""
    cap = cfg.mod.capacity_of(layer, row.task)
    if cap >= 1.0:
        return row.real_tokens
    return sum(d.tokens - d.routable + routable_kept(cap, d.routable) for d in row.documents)


def layer_tokens(cfg: ModelConfig, rows: Sequence[RowTokens], *, dense: bool = False,
                 routing: str | None = None) -> list[tuple[int, bool]]:
    """Per layer: (positions every row of the micro-batch runs the layer on, whether a router bank runs)."""
    S = _check_rows(cfg, rows, "layer_tokens")
    mod, routing = cfg.mod, routing or cfg.mod.routing
    out = []
    for layer in range(cfg.num_hidden_layers):
        routed = not dense and mod.is_mod_layer(layer)
        if not routed or routing == "causal" or all(mod.capacity_of(layer, r.task) >= 1.0 for r in rows):
            out.append((S, routed))
        else:
            out.append((max(1, max(row_kept(cfg, r, layer) for r in rows)), True))  # as model.mod gathers
    return out


# ----- public API -----------------------------------------------------------------------------------------
def microbatch_flops(
    cfg: ModelConfig, rows: Sequence[RowTokens], *, train: bool = True, recompute: bool = False,
    dense: bool = False, causal_attention: bool = False, include_head: bool = True, routing: str | None = None,
    expert_slots: Mapping[int, Sequence[int]] | None = None,
) -> FlopsBreakdown:
    """FLOPs the model runs on one micro-batch of `rows` (every row pays the same; see the module docstring).

    `train` counts forward + backward (+ one layer forward when `recompute`); `dense=True` counts the same
    model with MoD and MoE switched off on the same rows (all layers on all S positions, padding included,
    dense MLPs, no routers): what a dense twin runs. `routing` overrides `cfg.mod.routing` (as the model's
    forward does). `expert_slots` ({MoE layer: token-slots each expert ran in this micro-batch}, e.g.
    `expert_slots(out.experts, cfg)`) makes an MoE model's count exact; None counts k slots per kept token.
    """
    passes = _Passes.of(train, recompute and train)
    S = _check_rows(cfg, rows, "microbatch_flops")
    moe_layers = set() if dense else set(cfg.moe.layers)
    if expert_slots is not None and moe_layers:
        _check_expert_slots(cfg, expert_slots)
    per_row = FlopsBreakdown()
    experts = FlopsBreakdown()  # the experts' work is known per micro-batch, not per row
    for layer, (n, routed) in enumerate(layer_tokens(cfg, rows, dense=dense, routing=routing)):
        per_row += _layer(cfg, n, causal_attention, passes, mlp=layer not in moe_layers)
        if routed:
            per_row += _router(cfg, S, passes)
        if layer in moe_layers:
            per_row += _moe_router(cfg, n, passes)
            slots = (sum(expert_slots[layer]) if expert_slots is not None
                     else _nominal_slots(cfg, rows, layer, routing or cfg.mod.routing))
            experts += _moe_experts(cfg, slots, passes)
    if include_head:
        per_row += _head(cfg, S, passes)
    return len(rows) * per_row + experts


def dense_flops(
    cfg: ModelConfig, rows: Sequence[RowTokens], *, train: bool = True, recompute: bool = False,
    causal_attention: bool = False, include_head: bool = True,
) -> FlopsBreakdown:
    """The dense baseline of these rows: every document alone, n tokens each, no padding, no routers."""
    passes = _Passes.of(train, recompute and train)
    out = FlopsBreakdown()
    for row in rows:
        for doc in row.documents:
            out += cfg.num_hidden_layers * _layer(cfg, doc.tokens, causal_attention, passes)
            if include_head:
                out += _head(cfg, doc.tokens, passes)
    return out


@dataclass(frozen=True)
class TaskFlops:
    """Training FLOPs of one task's rows within a step."""

    rows: int
    """How many rows of this task the step held."""
    documents: int
    """How many documents (packed samples) those rows held."""
    actual: int
    """FLOPs as run (MoD layers on P gathered tokens, routers included): each row's share of its micro-batch."""
    dense: int
    """Dense baseline of those documents (each alone, no padding)."""

    @property
    def saved_pct(self) -> float:
        return 100.0 * (1.0 - self.actual / self.dense) if self.dense else 0.0


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs of one optimizer step (the micro-batches given to `step_flops`)."""

    actual: int
    """FLOPs as run: what TFLOP/s and MFU are computed from."""
    dense: int
    """Dense baseline: a dense model on the real tokens only (every document alone, no padding, no routers)."""
    tokens: int
    """Positions processed, padding included (rows x S), for tokens/s."""
    real_tokens: int
    """Non-padding tokens among them."""
    per_task: dict[str, TaskFlops] = field(default_factory=dict)
    """Task name -> its rows' share; the shares sum to `actual` and `dense`."""

    @property
    def pad_tokens(self) -> int:
        return self.tokens - self.real_tokens

    @property
    def pad_pct(self) -> float:
        """Percent of the processed positions that were padding."""
        return 100.0 * self.pad_tokens / self.tokens if self.tokens else 0.0

    @property
    def saved_pct(self) -> float:
        """Percent of the dense baseline that this step did not spend. Negative when the step cost more
        than a padding-free dense model: routers without skipping, or a dense model paying for padding and
        for S x S attention over packed documents; honest, not a bug."""
        return 100.0 * (1.0 - self.actual / self.dense) if self.dense else 0.0


def step_flops(
    cfg: ModelConfig, microbatches: Sequence[Sequence[RowTokens]], *, recompute: bool = False,
    causal_attention: bool = False, expert_slots: Sequence[Mapping[int, Sequence[int]] | None] | None = None,
) -> StepFlops:
    """Training FLOPs of a step made of these micro-batches (each a list of `RowTokens`, e.g. from
    `describe_microbatch`): actual, dense baseline, tokens and padding, split by task.

    Pass one rank's micro-batches for that rank's FLOPs, or every rank's for the global step. `expert_slots`:
    one `microbatch_flops` expert_slots per micro-batch (MoE models; None = k slots per kept token).
    """
    if len(microbatches) == 0:
        raise ValueError("step_flops: microbatches must hold at least one micro-batch")
    if expert_slots is not None and len(expert_slots) != len(microbatches):
        raise ValueError(f"step_flops: expert_slots has {len(expert_slots)} entries for {len(microbatches)} "
                         f"micro-batches")
    kw = dict(train=True, recompute=recompute, causal_attention=causal_attention)
    actual = dense = tokens = real = 0
    per_task: dict[str, list[int]] = {}
    for m, rows in enumerate(microbatches):
        slots = None if expert_slots is None else expert_slots[m]
        mb_actual = microbatch_flops(cfg, rows, expert_slots=slots, **kw).total
        row_actual = mb_actual // len(rows)  # every row of a micro-batch pays the same
        for row in rows:
            row_dense = dense_flops(cfg, [row], **kw).total
            acc = per_task.setdefault(cfg.mod.tasks[row.task], [0, 0, 0, 0])
            acc[0] += 1
            acc[1] += len(row.documents)
            acc[2] += row_actual
            acc[3] += row_dense
            dense += row_dense
            tokens += row.length
            real += row.real_tokens
        actual += mb_actual
    return StepFlops(actual=actual, dense=dense, tokens=tokens, real_tokens=real,
                     per_task={name: TaskFlops(*acc) for name, acc in per_task.items()})


# ----- conveniences for benches and analyses: rows of one document each ----------------------------------------
def _single_rows(cfg: ModelConfig, seq_len: int, task_ids: Sequence[int | str],
                 routable: int | Sequence[int] | Mapping[str, int] | None) -> list[RowTokens]:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if len(task_ids) == 0:
        raise ValueError("task_ids must name the task of at least one sequence")
    tasks = [_task_index(cfg, t, f"task_ids[{i}]") for i, t in enumerate(task_ids)]
    if routable is None or isinstance(routable, int):
        counts = [routable] * len(tasks)
    elif isinstance(routable, Mapping):
        counts = [routable.get(cfg.mod.tasks[t]) for t in tasks]
    else:
        counts = list(routable)
        if len(counts) != len(tasks):
            raise ValueError(f"routable has {len(counts)} counts for {len(tasks)} sequences")
    for c in counts:
        if c is not None and not 0 <= c <= seq_len:
            raise ValueError(f"routable counts must lie in [0, seq_len={seq_len}], got {c}")
    return [RowTokens.single(t, seq_len, c) for t, c in zip(tasks, counts)]


def _task_index(cfg: ModelConfig, task: int | str, where: str) -> int:
    tasks = cfg.mod.tasks
    if isinstance(task, str):
        if task not in tasks:
            raise ValueError(f"{where}: task {task!r} is not in mod.tasks {tasks}")
        return tasks.index(task)
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(tasks):
        raise ValueError(f"{where}: task id {task!r} is not an index into mod.tasks {tasks}")
    return task


def flops_forward(
    cfg: ModelConfig, seq_len: int, task_ids: Sequence[int | str], *, routable=None, dense: bool = False,
    causal_attention: bool = False, include_head: bool = True,
) -> FlopsBreakdown:
    """Forward FLOPs of a micro-batch of `len(task_ids)` rows, each one document of `seq_len` tokens, no padding.

    `routable`: routable tokens per row (an int for all, one per row, or {task: count}); None = all
    `seq_len` tokens routable, the most a capacity can skip (for a real batch use `describe_microbatch`).
    `dense=True` counts the model with MoD switched off (here equal to the dense baseline: no padding)."""
    rows = _single_rows(cfg, seq_len, task_ids, routable)
    return microbatch_flops(cfg, rows, train=False, dense=dense, causal_attention=causal_attention,
                            include_head=include_head)


def flops_train(
    cfg: ModelConfig, seq_len: int, task_ids: Sequence[int | str], *, routable=None, dense: bool = False,
    recompute: bool = False, causal_attention: bool = False, include_head: bool = True,
) -> FlopsBreakdown:
    """Forward + backward FLOPs (+ one layer forward when `recompute`) of the micro-batch `flops_forward` describes."""
    rows = _single_rows(cfg, seq_len, task_ids, routable)
    return microbatch_flops(cfg, rows, train=True, recompute=recompute, dense=dense,
                            causal_attention=causal_attention, include_head=include_head)


# ----- throughput and MFU ----------------------------------------------------------------------------
# Peak dense bf16 tensor-core FLOP/s per device (vendor datasheets, no sparsity). Matched in order
# against a substring of `torch.cuda.get_device_name()`, so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),   # SXM5; reported as "NVIDIA H100 80GB HBM3"
    ("H800", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),   # SXM4 and PCIe share the tensor-core peak
    ("A800", 312e12),
    ("L40S", 362e12),
    ("MI300X", 1307e12),
    ("MI250X", 383e12),
)


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a device by (a substring of) its name; None when unknown."""
    name = device_name.lower()
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in name:
            return peak
    return None


def tflops_per_device(flops_per_step: float, step_time_s: float, world_size: int) -> float:
    """Achieved TFLOP/s per device, with `flops_per_step` the FLOPs of the whole global step."""
    _check_rate_args(step_time_s, world_size)
    return flops_per_step / (step_time_s * world_size) / 1e12


def mfu(flops_per_step: float, step_time_s: float, world_size: int, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation in [0, 1]: achieved FLOP/s over the devices' peak.

    `flops_per_step` is the global step's FLOPs (all ranks); count it with `recompute=False` so
    recomputation is not credited as useful work (MFU, not hardware FLOPs utilisation).
    """
    _check_rate_args(step_time_s, world_size)
    if not peak_flops_per_device > 0:
        raise ValueError(f"peak_flops_per_device must be > 0, got {peak_flops_per_device!r}")
    return flops_per_step / (step_time_s * world_size * peak_flops_per_device)


def _check_rate_args(step_time_s: float, world_size: int) -> None:
    if not step_time_s > 0:
        raise ValueError(f"step_time_s must be > 0, got {step_time_s!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
