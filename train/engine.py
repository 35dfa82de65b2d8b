"""The engine contract both parallel modes share, and the optimizer pieces both build on.

    Engine  (here: the contract), built by train/loop.py build_engine(cfg, ds_config, precision, device)
        ZeroEngine      (train/zero.py)      ZeRO 0-3 data parallel around the one model
        PipelineEngine  (train/pipeline.py)  the model's layers as pipeline stages (train/stages.py)

An engine runs one optimizer step over `optim.grad_accum` micro-batches and returns what the step recorded
(`train_step` -> StepRecord); it says which ranks own the loss (`owns_loss`: every rank under ZeRO, the last
stage under the pipeline), which one logs (`logs`), and which ranks count what was read (`counts_data`: the
loss owners, which fetch every micro-batch); it sums a record over the loss owners (`reduce`) and exact
integers over the counting ranks (`sum_counted`); and it gathers the whole weights under HF names
(`gather_state`). Checkpoints save and load through the DeepSpeed engine it holds (`ds`). The parallelism is
applied from outside: the model itself stays plain PyTorch.

Non-finite gradients never reach the weights: an optimizer step whose global gradient norm is NaN/inf is
skipped (not applied, LR schedule not advanced, `engine.was_step_applied()` False) on every engine.
DeepSpeed's own optimizer wrappers decide it before they step (measured on DeepSpeed 0.19.8 for ZeRO-1/2/3 in
fp32 and bf16, and bf16 ZeRO-0; `guard_nonfinite_steps` pins the one switch that can turn it off). Only
ZeRO-0 in fp32 hands our torch optimizer to the engine unwrapped; there `FiniteAdamW` takes the norm itself.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, Iterator

import torch
import torch.distributed as dist

from model.flops import RowTokens, StepFlops
from model.mod import ROUTING_STATS
from model.moe import EXPERT_STATS
from train.config import OptimConfig, RunConfig
from train.launch import distributed

Batches = Iterator[tuple[dict[str, torch.Tensor], list[RowTokens]]]
"""(micro-batch on the device, its rows described for the FLOPs count), endlessly."""


@dataclasses.dataclass
class StepRecord:
    """What one optimizer step produced on this rank; `Engine.reduce` sums it over the loss owners."""

    loss_sum: torch.Tensor    # [T] summed micro-batch cross-entropies per task (the aux loss is not in them)
    loss_count: torch.Tensor  # [T] micro-batches per task
    aux_sum: torch.Tensor     # [] summed aux losses (MoD router losses plus MoE balance losses)
    routing: torch.Tensor     # [L, T, 4] token counts, columns model.mod.ROUTING_STATS
    experts: torch.Tensor | None = None
    """[L, T, E, 2] token-slot counts of the MoE layers, columns model.moe.EXPERT_STATS (None: no MoE layers)."""
    balance_sum: torch.Tensor | None = None
    """[] summed MoE balance losses (part of aux_sum; None: no MoE layers)."""
    expert_slots: list[dict[int, list[int]]] = dataclasses.field(default_factory=list)
    """Each trained micro-batch's slots per expert of each MoE layer (model.flops `expert_slots`, for its FLOPs)."""
    samples: int = 0
    """Samples this data-parallel replica trained on."""
    skipped_nonfinite: int = 0
    """Micro-batches skipped for a non-finite loss."""
    applied: bool = True
    """The optimizer step was applied (False: skipped for a non-finite global gradient norm)."""
    microbatches: list[list[RowTokens]] = dataclasses.field(default_factory=list)
    """What each micro-batch trained on here held (for its FLOPs); empty on middle pipeline stages."""
    step_s: float = 0.0
    data_s: float = 0.0
    """Wall time of the step, and the part of it spent waiting for data."""
    flops: StepFlops | None = None
    flops_model: StepFlops | None = None
    """The global step's FLOPs with recompute as configured and without it (for MFU), on the counting ranks."""

    @property
    def microbatch_count(self) -> float:
        return max(1.0, float(self.loss_count.sum()))

    @property
    def total_loss(self) -> float:
        """The loss that was trained on: mean cross-entropy plus mean aux loss over the micro-batches."""
        n = self.microbatch_count
        return float(self.loss_sum.sum()) / n + float(self.aux_sum) / n

    def task_losses(self, tasks: list[str]) -> dict[str, float]:
        """Mean cross-entropy per task that had micro-batches in this step (without the aux loss)."""
        return {task: float(self.loss_sum[t] / self.loss_count[t]) for t, task in enumerate(tasks)
                if self.loss_count[t] > 0}


class NonfiniteRun:
    """Non-finite events (skipped micro-batches, skipped optimizer steps) in a row since the last step that
    trained on every micro-batch; the run stops once `limit` of them come in a row
    (checkpoint.max_consecutive_nonfinite)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def add(self, n: int = 1) -> None:
        self.in_a_row += n

    def clear(self) -> None:
        self.in_a_row = 0

    @property
    def exhausted(self) -> bool:
        return self.in_a_row >= self.limit


class Engine(abc.ABC):
    """One contract for ZeRO and the pipeline (module docstring). Set by the implementations: `ds` (the
    DeepSpeed engine), `module` (the trained module: checkpoints save it, `params_finite` checks it),
    `owns_loss`, `logs`, `counts_data`, `dp_rank`/`dp_world` (this rank's data-parallel replica: what the
    loader reads), `partitioned` (no rank holds the whole model: evaluation needs `gather_state`), and the
    process groups `loss_group` (the loss owners) and `data_group` (the counting ranks; None: the world)."""

    ds: Any
    module: torch.nn.Module
    owns_loss: bool
    logs: bool
    counts_data: bool
    dp_rank: int
    dp_world: int
    partitioned: bool
    loss_group: Any = None
    data_group: Any = None

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    def new_record(self) -> StepRecord:
        T, L = self.cfg.model.num_tasks, self.cfg.model.num_hidden_layers
        zeros = lambda *shape: torch.zeros(shape, device=self.device)  # noqa: E731
        rec = StepRecord(zeros(T), zeros(T), zeros(), zeros(L, T, len(ROUTING_STATS)))
        if self.cfg.model.moe.layers:  # every rank holds the same shapes, so `reduce` packs the same length
            rec.experts, rec.balance_sum = zeros(L, T, self.cfg.model.moe.num_experts, len(EXPERT_STATS)), zeros()
        return rec

    @abc.abstractmethod
    def train_step(self, batches: Batches, nonfinite: NonfiniteRun, step: int) -> StepRecord:
        """Optimizer step `step` over grad_accum micro-batches from `batches`, non-finite losses and gradient
        norms counted in `nonfinite`. Every rank calls it."""

    @abc.abstractmethod
    def gather_state(self) -> dict[str, torch.Tensor]:
        """The whole weights under HF names on rank 0 ({} on the other ranks, which all take part)."""

    @property
    def whole_model(self) -> torch.nn.Module | None:
        """The trained model itself when this rank holds all of it as one plain model (None otherwise)."""
        return None

    def reduce(self, rec: StepRecord) -> StepRecord:
        """`rec` with its losses, aux loss, routing and expert counts summed over the loss owners (as it is
        elsewhere). `expert_slots` stays this rank's: the FLOPs are counted per rank and summed (`sum_counted`)."""
        if not (self.owns_loss and distributed() and dist.get_world_size(self.loss_group) > 1):
            return rec
        parts = [rec.loss_sum, rec.loss_count, rec.aux_sum.reshape(1), rec.routing]
        if rec.experts is not None:
            parts += [rec.balance_sum.reshape(1), rec.experts]
        packed = torch.cat([p.flatten() for p in parts])
        dist.all_reduce(packed, group=self.loss_group)
        summed = [p.view_as(old) for p, old in zip(packed.split([p.numel() for p in parts]), parts)]
        moe = dict(balance_sum=summed[4].reshape(()), experts=summed[5]) if rec.experts is not None else {}
        return dataclasses.replace(rec, loss_sum=summed[0], loss_count=summed[1], aux_sum=summed[2].reshape(()),
                                   routing=summed[3], **moe)

    def sum_counted(self, values: list[int]) -> list[int]:
        """Sum non-negative Python ints exactly over the counting ranks (a collective over them; call it on
        those only). FLOPs of a large step pass float64's 2^53, and their sum over many ranks could pass int64's
        range, so each value travels as two 32-bit halves in int64."""
        if not distributed():
            return list(values)
        assert self.counts_data and all(0 <= v < 1 << 62 for v in values), values
        halves = torch.tensor([[v >> 32 for v in values], [v & 0xFFFFFFFF for v in values]], dtype=torch.int64,
                              device=self.device)
        dist.all_reduce(halves, group=self.data_group)
        hi, lo = halves.tolist()
        return [(h << 32) + l for h, l in zip(hi, lo)]


# ----- the optimizer, its schedule and its guard against non-finite steps ------------------------------------
def param_groups(named_params, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices; never decay norms or MoD routers (a decayed router drifts toward
    gate 1 and loses its ranking). Decided by name, since ZeRO-3 flattens partitioned shapes. "decays" marks
    the group for `apply_optim_config` (a resumed run may change optim.weight_decay)."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if "norm" in name.rsplit(".", 2)[-2] or ".mod_router." in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "decays": True},
            {"params": no_decay, "weight_decay": 0.0, "decays": False}]


def lr_lambda(optim: OptimConfig, max_steps: int):
    """Linear warmup to 1, then cosine to min_lr_ratio at max_steps (a multiplier of optim.lr)."""

    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        span = max(1, max_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose global gradient norm is not finite, and clips by that norm otherwise.

    For the one engine DeepSpeed does not wrap (ZeRO-0 in fp32), where the engine would clip and step
    whatever the gradients hold. The engine reads `overflow` after `step()` (True: no LR-schedule step,
    `was_step_applied()` False) and `_global_grad_norm` for `get_global_grad_norm()`. Gradients here are the
    data-parallel all-reduced ones (identical on every replica); under the pipeline each stage holds its own
    layers', so the squared norms are summed over `norm_group` (the ranks of one pipeline). The clipping is
    done here rather than by the engine because the engine clips before `step()` with a norm it discards, and
    an inf norm would zero the gradients it then applies (`make_optimizer` turns the engine's clipping off).
    """

    def __init__(self, params, *, max_norm: float, norm_group=None, **kw) -> None:
        super().__init__(params, **kw)
        self.max_norm, self.norm_group = max_norm, norm_group
        self.overflow = False
        self._global_grad_norm: float | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        # A squared norm past float32's range counts as non-finite too: such a step is no step to take.
        sq = torch.nn.utils.get_total_norm(grads).float().square() if grads else torch.zeros((), device=device)
        if self.norm_group is not None:
            dist.all_reduce(sq, group=self.norm_group)
        norm = float(sq.sqrt())
        self.overflow = not math.isfinite(norm)
        self._global_grad_norm = float("inf") if self.overflow else norm
        if self.overflow:
            return None
        if self.max_norm > 0 and norm > self.max_norm:
            torch._foreach_mul_(grads, self.max_norm / (norm + 1e-6))
        return super().step(closure)


def _unwrapped(ds_config: dict[str, Any]) -> bool:
    """DeepSpeed hands the client optimizer to the engine as it is: no ZeRO, no fp16/bf16 wrapper."""
    return (ds_config.get("zero_optimization", {}).get("stage", 0) == 0
            and not ds_config.get("bf16", {}).get("enabled") and not ds_config.get("fp16", {}).get("enabled"))


def make_optimizer(cfg: RunConfig, named_params, ds_config: dict[str, Any], on_gpu: bool, norm_group=None):
    """-> (optimizer, LambdaLR, the DeepSpeed config to initialize with). `norm_group`: the ranks of one
    pipeline (see FiniteAdamW); None under ZeRO."""
    groups = param_groups(named_params, cfg.optim.weight_decay)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    kw = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    if offload:
        # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed's vectorised CPU Adam is the fast path.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    elif _unwrapped(ds_config):
        opt = FiniteAdamW(groups, max_norm=cfg.optim.grad_clip, norm_group=norm_group, fused=on_gpu, **kw)
        ds_config = {**ds_config, "gradient_clipping": 0.0}  # FiniteAdamW clips (see there)
    else:
        # torch's AdamW (fused on GPU) avoids JIT-compiling DeepSpeed's fused_adam (95 s on CPU).
        opt = torch.optim.AdamW(groups, fused=on_gpu, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, cfg.run.max_steps))
    return opt, sched, ds_config


def guard_nonfinite_steps(engine) -> None:
    """Make sure `engine.step()` skips a step with a non-finite global gradient norm (module docstring)."""
    # Imported here: this module holds the contract too, which the loop reads without DeepSpeed.
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    if isinstance(opt, DeepSpeedZeroOptimizer):
        # ZeRO-1/2 test for inf/NaN only with this on (fp16, or bf16.check_grad_overflow), or through the norm
        # while zero_optimization.compute_grad_norm is on: pin it, whatever the JSON says.
        opt.check_grad_overflow = True
    elif not isinstance(opt, (FiniteAdamW, DeepSpeedZeroOptimizer_Stage3, BF16_Optimizer, FP16_Optimizer,
                              FP16_UnfusedOptimizer)):
        raise RuntimeError(f"DeepSpeed wrapped the optimizer in {type(opt).__name__}, which this trainer does not "
                           f"know to skip steps with non-finite gradients; use ZeRO 0-3 with fp32, bf16 or fp16")


def apply_optim_config(engine, optim: OptimConfig, max_steps: int) -> None:
    """After loading a checkpoint: make the optimizer and the LambdaLR follow this run's optim section and
    run.max_steps from the resumed step on. A loaded state brings back the checkpoint's lr, betas, eps, weight
    decay and the schedule's base lrs, and the schedule function itself is not saved at all. Unchanged
    settings give the loaded values again."""
    sched = engine.lr_scheduler
    groups = sched.optimizer.param_groups
    f = lr_lambda(optim, max_steps)
    sched.lr_lambdas = [f] * len(groups)
    sched.base_lrs = [optim.lr] * len(groups)
    for g in groups:
        g["initial_lr"] = optim.lr
        g["lr"] = optim.lr * f(sched.last_epoch)
        g["betas"], g["eps"] = tuple(optim.betas), optim.eps
        if g.get("decays", g["weight_decay"] > 0):  # a checkpoint from before "decays" existed: by value
            g["weight_decay"] = optim.weight_decay
    sched._last_lr = [g["lr"] for g in groups]


def params_finite(module: torch.nn.Module) -> bool:
    """Whether every weight on every rank is finite (ZeRO-3: each rank checks its own partition)."""
    params = list(module.parameters())
    ok = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in params)
    flag = torch.tensor([1.0 if ok else 0.0], device=params[0].device if params else "cpu")
    if distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]
