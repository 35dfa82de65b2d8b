"""Analytic FLOPs of the unified decoder: dense, and as actually run under task-aware MoD.

Counts exactly the matrix products the model runs, in the convention of
`torch.utils.flop_counter.FlopCounterMode` (2 FLOPs per multiply-add; element-wise work such as
norms, RoPE, softmax, gates, top-k and gather/scatter counts zero):

- per decoder layer on n tokens of one sequence: q/k/v/o projections `2n*D*(2*H*hd + 2*KV*hd)`
  (K/V counted with the KV heads of GQA, unlike Megatron's integer division), SDPA
  `4*H*hd*n^2`, SwiGLU MLP `2n*3*D*F`;
- the router bank of a MoD layer, `Linear(D, T)` on all S tokens: `2*S*D*T`;
- the LM head `Linear(D, V)` on all S tokens: `2*S*D*V` (the embedding lookup is free).

Under MoD a micro-batch runs each MoD layer once on a gathered `[B, P, D]` tensor with
`P = max_b P_b`, `P_b = S if capacity == 1 else ceil(capacity * S)` (`model.mod.tokens_kept`), so
every sequence of the micro-batch pays for P tokens: the padding of a mixed-task micro-batch is real
compute and is counted. In `causal` routing mode (sampling) layers mask instead of gathering, so they cost S.

Training = forward + backward. Backward of a matmul is 2x its forward (input and weight
gradients). Backward of SDPA follows torch's `sdpa_backward_flop_count` (the flash/efficient
kernels recompute the scores: 5 products instead of 2, i.e. 2.5x forward). Full activation
recomputation adds one more forward of the decoder layers (routers included), never of the head;
torch's non-reentrant checkpoint may stop a little earlier (it skips a trailing matmul whose output
backward never reads), so `recompute=True` is the conventional upper bound of the hardware's work.

`causal_attention=False` (the default) is FlopCounterMode's convention: the whole n x n score
matrix. `causal_attention=True` counts only the lower triangle with its diagonal, n(n+1)/2 scores,
i.e. what a causal kernel needs; report it separately, never mix the two in one comparison.

References: Megatron-LM's `num_floating_point_operations`, torchtitan's `get_num_flop_per_token`
and MFU, torch/utils/flop_counter.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

from model.config import ModelConfig
from model.mod import tokens_kept  # the model's own P, so the count can never drift from what runs


@dataclass(frozen=True)
class FlopsBreakdown:
    """FLOPs by component; plain Python ints, so sums over steps stay exact."""

    attn_proj: int = 0
    """q, k, v and o projections of every layer that ran."""
    attn_sdpa: int = 0
    """Scaled-dot-product attention (Q K^T and P V) of every layer that ran."""
    mlp: int = 0
    """SwiGLU gate, up and down projections."""
    router: int = 0
    """MoD router banks, Linear(D, num_tasks) on all tokens of every MoD layer."""
    head: int = 0
    """LM head, Linear(D, vocab) on all tokens."""

    @property
    def layers(self) -> int:
        """Everything a decoder layer does (what activation recomputation repeats)."""
        return self.attn_proj + self.attn_sdpa + self.mlp + self.router

    @property
    def total(self) -> int:
        return self.layers + self.head

    def __add__(self, other: "FlopsBreakdown") -> "FlopsBreakdown":
        return FlopsBreakdown(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def without_head(self) -> "FlopsBreakdown":
        return dataclasses.replace(self, head=0)

    def to_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


@dataclass(frozen=True)
class TaskFlops:
    """Training FLOPs of one task's sequences within a step."""

    sequences: int
    """How many sequences of this task the step held."""
    actual: int
    """FLOPs as run (MoD layers on P gathered tokens, routers included)."""
    dense: int
    """FLOPs of the same sequences with every layer on all tokens and no routers."""

    @property
    def saved_pct(self) -> float:
        return 100.0 * (1.0 - self.actual / self.dense) if self.dense else 0.0


@dataclass(frozen=True)
class StepFlops:
    """Training FLOPs of one optimizer step (the micro-batches given to `step_flops`)."""

    actual: int
    """FLOPs as run: what TFLOP/s and MFU are computed from."""
    dense: int
    """Dense-equivalent FLOPs of the same tokens (no MoD skipping, no routers)."""
    tokens: int
    """Tokens processed (sequences x seq_len), for FLOPs per token and tokens/s."""
    per_task: dict[str, TaskFlops] = field(default_factory=dict)
    """Task name -> its sequences' share; the shares sum to `actual` and `dense`."""

    @property
    def saved_pct(self) -> float:
        """Percent of the dense FLOPs that MoD skipped (negative if routers cost more than skipped)."""
        return 100.0 * (1.0 - self.actual / self.dense) if self.dense else 0.0


# ----- per-sequence building blocks -----------------------------------------------------------------
def _sdpa(cfg: ModelConfig, n: int, causal: bool, backward: bool) -> int:
    # torch's sdpa_flop_count: two [n, hd] x [hd, n]-sized products per query head (GQA broadcasts
    # K/V to every query head); sdpa_backward_flop_count: five such products.
    products = 5 if backward else 2
    per_product = cfg.num_attention_heads * cfg.head_dim * (n * (n + 1) if causal else 2 * n * n)
    return products * per_product


def _layer_forward(cfg: ModelConfig, n: int, causal: bool) -> FlopsBreakdown:
    """One decoder layer on n tokens of one sequence (no router)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    q_width, kv_width = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    return FlopsBreakdown(
        attn_proj=2 * n * d * (q_width + 2 * kv_width) + 2 * n * q_width * d,
        attn_sdpa=_sdpa(cfg, n, causal, backward=False),
        mlp=2 * n * 3 * d * cfg.intermediate_size,
    )


def _backward(cfg: ModelConfig, fwd: FlopsBreakdown, layer_tokens: Sequence[int], causal: bool) -> FlopsBreakdown:
    """Backward of a forward whose layers ran on `layer_tokens[i]` tokens (per sequence)."""
    return FlopsBreakdown(
        attn_proj=2 * fwd.attn_proj,
        attn_sdpa=sum(_sdpa(cfg, n, causal, backward=True) for n in layer_tokens),
        mlp=2 * fwd.mlp,
        router=2 * fwd.router,
        head=2 * fwd.head,
    )


def _task_index(cfg: ModelConfig, task: int | str, where: str) -> int:
    tasks = cfg.mod.tasks
    if isinstance(task, str):
        if task not in tasks:
            raise ValueError(f"{where}: task {task!r} is not in mod.tasks {tasks}")
        return tasks.index(task)
    if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < len(tasks):
        raise ValueError(f"{where}: task id {task!r} is not an index into mod.tasks {tasks}")
    return task


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")


def _layer_tokens(cfg: ModelConfig, seq_len: int, tasks: Sequence[int], dense: bool) -> list[tuple[int, bool]]:
    """Per layer: (tokens each sequence of the micro-batch pays for, whether a router bank runs)."""
    mod = cfg.mod
    out = []
    for layer in range(cfg.num_hidden_layers):
        routed = not dense and mod.is_mod_layer(layer)
        if not routed or mod.routing == "causal":
            # Causal routing masks inside a full-length layer, so only the router is extra.
            out.append((seq_len, routed))
        else:
            out.append((max(tokens_kept(mod.capacity_of(layer, t), seq_len) for t in tasks), True))
    return out


def _per_sequence(
    cfg: ModelConfig, seq_len: int, task_ids: Sequence[int | str], *, dense: bool, causal_attention: bool,
    include_head: bool, train: bool, recompute: bool,
) -> FlopsBreakdown:
    """FLOPs one sequence of this micro-batch pays for; every sequence in it pays the same."""
    _check_seq_len(seq_len)
    if len(task_ids) == 0:
        raise ValueError("task_ids must name the task of at least one sequence")
    tasks = [_task_index(cfg, t, f"task_ids[{i}]") for i, t in enumerate(task_ids)]
    plan = _layer_tokens(cfg, seq_len, tasks, dense)
    fwd = FlopsBreakdown()
    for n, routed in plan:
        fwd += _layer_forward(cfg, n, causal_attention)
        if routed:
            columns = 1 if cfg.mod.shared_router else cfg.num_tasks
            fwd += FlopsBreakdown(router=2 * seq_len * cfg.hidden_size * columns)
    if include_head:
        fwd += FlopsBreakdown(head=2 * seq_len * cfg.hidden_size * cfg.vocab_size)
    if not train:
        return fwd
    total = fwd + _backward(cfg, fwd, [n for n, _ in plan], causal_attention)
    return total + fwd.without_head() if recompute else total


def _times(b: FlopsBreakdown, k: int) -> FlopsBreakdown:
    return FlopsBreakdown(*(k * v for v in dataclasses.astuple(b)))


# ----- public API ------------------------------------------------------------------------------------
def flops_forward(
    cfg: ModelConfig, seq_len: int, task_ids: Sequence[int | str], *, dense: bool = False,
    causal_attention: bool = False, include_head: bool = True,
) -> FlopsBreakdown:
    """Forward FLOPs of one micro-batch of `len(task_ids)` sequences of `seq_len` tokens.

    `task_ids` are task indices (or names) of `cfg.mod.tasks`, one per sequence; `dense=True` counts
    the model with MoD switched off (all layers on all tokens, no routers).
    """
    per_seq = _per_sequence(cfg, seq_len, task_ids, dense=dense, causal_attention=causal_attention,
                            include_head=include_head, train=False, recompute=False)
    return _times(per_seq, len(task_ids))


def flops_train(
    cfg: ModelConfig, seq_len: int, task_ids: Sequence[int | str], *, dense: bool = False,
    recompute: bool = False, causal_attention: bool = False, include_head: bool = True,
) -> FlopsBreakdown:
    """Forward + backward FLOPs of one micro-batch (+ one layer forward when `recompute`)."""
    per_seq = _per_sequence(cfg, seq_len, task_ids, dense=dense, causal_attention=causal_attention,
                            include_head=include_head, train=True, recompute=recompute)
    return _times(per_seq, len(task_ids))


def step_flops(
    cfg: ModelConfig, seq_len: int, task_ids_per_microbatch: Sequence[Sequence[int | str]], *,
    recompute: bool = False, causal_attention: bool = False,
) -> StepFlops:
    """Training FLOPs of a step made of these micro-batches, actual and dense, split by task.

    Pass one rank's micro-batches for that rank's FLOPs, or every rank's for the global step.
    A sequence's share is what its row of the micro-batch cost, so in a mixed-task micro-batch a
    low-capacity task is charged for the padding up to the micro-batch's P.
    """
    if len(task_ids_per_microbatch) == 0:
        raise ValueError("task_ids_per_microbatch must hold at least one micro-batch")
    actual = dense = tokens = 0
    per_task: dict[str, list[int]] = {}
    for m, task_ids in enumerate(task_ids_per_microbatch):
        if len(task_ids) == 0:
            raise ValueError(f"task_ids_per_microbatch[{m}] is empty")
        kw = dict(recompute=recompute, causal_attention=causal_attention, include_head=True, train=True)
        row_actual = _per_sequence(cfg, seq_len, task_ids, dense=False, **kw).total
        row_dense = _per_sequence(cfg, seq_len, task_ids, dense=True, **kw).total
        for t in task_ids:
            name = cfg.mod.tasks[_task_index(cfg, t, f"task_ids_per_microbatch[{m}]")]
            acc = per_task.setdefault(name, [0, 0, 0])
            acc[0] += 1
            acc[1] += row_actual
            acc[2] += row_dense
        actual += row_actual * len(task_ids)
        dense += row_dense * len(task_ids)
        tokens += seq_len * len(task_ids)
    return StepFlops(
        actual=actual, dense=dense, tokens=tokens,
        per_task={name: TaskFlops(*acc) for name, acc in per_task.items()},
    )


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
