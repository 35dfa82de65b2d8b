"""Build the DeepSpeed engine around the one model: ZeRO data parallel (mode `zero`) here, pipeline stages
in train/pipeline.py. The model stays plain PyTorch; parallelism is applied from outside.

ZeRO-3: the model is constructed under `deepspeed.zero.Init`, so each rank only ever holds its shard
(every leaf module initialises its own weights in `__init__`, which zero.Init partitions right after),
and an HF checkpoint is copied in tensor by tensor inside `GatheredParameters` (DeepSpeed #3125: no
rank materialises the whole model).

Non-finite gradients never reach the weights: an optimizer step whose global gradient norm is NaN/inf is
skipped (not applied, LR schedule not advanced, `engine.was_step_applied()` False) on every engine.
DeepSpeed's own optimizer wrappers decide it before they step (measured on DeepSpeed 0.19.8 for ZeRO-1/2/3 in
fp32 and bf16, and bf16 ZeRO-0; `guard_nonfinite_steps` pins the one switch that can turn it off). Only
ZeRO-0 in fp32 hands our torch optimizer to the engine unwrapped; there `FiniteAdamW` takes the norm itself.
"""

from __future__ import annotations

import math
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from model import UnifiedTransformer
from model.hf import iter_hf_weights
from train.config import OptimConfig, RunConfig


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
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def torch_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def build_zero_engine(cfg: RunConfig, ds_config: dict[str, Any], precision: str, device: torch.device):
    """-> (engine, model). Model built under zero.Init when the JSON asks for ZeRO-3."""
    stage = ds_config["zero_optimization"].get("stage", 0)
    torch.manual_seed(cfg.run.seed)  # identical init on every rank (zero.Init also broadcasts rank 0's)
    # No dtype= here: zero.Init derives it from the config's bf16/fp16 flags (reconcile_ds_config set them
    # from the precision). An explicit dtype is dropped on accelerators without fp16, a precedence slip in
    # DeepSpeed 0.19's _set_dtype: on CPU, float32 silently became bfloat16 parameters.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=stage == 3):
        model = UnifiedTransformer(cfg.model)
    if stage != 3:
        model.to(device)
    model.gradient_checkpointing = cfg.parallel.activation_checkpointing
    if cfg.checkpoint.init_from_hf:
        load_hf_weights(model, cfg.checkpoint.init_from_hf, zero3=stage == 3)
    opt, sched, ds_config = make_optimizer(cfg, model.named_parameters(), ds_config, device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    guard_nonfinite_steps(engine)
    from train.safe_load import install_safe_checkpoint_engine  # resume unpickles nothing but weights
    install_safe_checkpoint_engine(engine)
    return engine, model


def load_hf_weights(model: torch.nn.Module, path: str, zero3: bool) -> None:
    """Copy an HF Emu3 checkpoint into `model` (model/hf.py `iter_hf_weights` decides which tensors, routers
    included); under ZeRO-3 tensor by tensor inside GatheredParameters, rank 0 writing."""
    params = dict(model.named_parameters())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for key, tensor in iter_hf_weights(model.config, path):
        p = params[key]
        if zero3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(tensor.to(p.dtype))
        else:
            p.data.copy_(tensor.to(p.dtype))


def consolidated_state_dict(engine, model: torch.nn.Module, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Whole weights on rank 0 (None elsewhere), in the training dtype. ZeRO-3 shards are gathered one
    parameter at a time, so no rank holds more than one whole tensor beyond its shard (DeepSpeed's
    `_zero3_consolidated_16bit_state_dict` would also cast fp32 runs to 16 bits)."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if zero_stage == 3:
        state = {}
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    state[name] = p.data.detach().cpu().clone()
        return state if rank == 0 else None
    return {k: v.detach().cpu() for k, v in model.state_dict().items()} if rank == 0 else None
