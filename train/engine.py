"""Build the DeepSpeed engine around the one model: ZeRO data parallel (mode `zero`) here, pipeline stages
in train/pipeline.py. The model stays plain PyTorch; parallelism is applied from outside.

ZeRO-3: the model is constructed under `deepspeed.zero.Init`, so each rank only ever holds its shard
(every leaf module initialises its own weights in `__init__`, which zero.Init partitions right after),
and an HF checkpoint is copied in tensor by tensor inside `GatheredParameters` (DeepSpeed #3125: no
rank materialises the whole model).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import deepspeed
import torch

from model import ModelConfig, UnifiedTransformer
from model.hf import config_from_hf, iter_hf_tensors
from train.config import OptimConfig, RunConfig


def param_groups(named_params, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices; never decay norms or MoD routers (a decayed router drifts toward
    gate 1 and loses its ranking). Decided by name, since ZeRO-3 flattens partitioned shapes."""
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        if "norm" in name.rsplit(".", 2)[-2] or ".mod_router." in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(optim: OptimConfig, max_steps: int):
    """Linear warmup to 1, then cosine to min_lr_ratio at max_steps (a multiplier of optim.lr)."""

    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / (optim.warmup_steps + 1)
        span = max(1, max_steps - optim.warmup_steps)
        progress = min(1.0, (step - optim.warmup_steps) / span)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_optimizer(cfg: RunConfig, named_params, ds_config: dict[str, Any], on_gpu: bool):
    groups = param_groups(named_params, cfg.optim.weight_decay)
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device") in ("cpu", "nvme")
    kw = dict(lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    if offload:
        # ZeRO-Offload steps the optimizer on the CPU; DeepSpeed's vectorised CPU Adam is the fast path.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    else:
        # torch's AdamW (fused on GPU) avoids JIT-compiling DeepSpeed's fused_adam (95 s on CPU).
        opt = torch.optim.AdamW(groups, fused=on_gpu, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, cfg.run.max_steps))
    return opt, sched


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
    opt, sched = make_optimizer(cfg, model.named_parameters(), ds_config, device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    return engine, model


def check_hf_matches(model_cfg: ModelConfig, path: str) -> None:
    theirs, _ = config_from_hf(path)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads"):
        if theirs[key] != getattr(model_cfg, key):
            raise ValueError(f"checkpoint.init_from_hf={path}: {key}={theirs[key]} but model.{key}="
                             f"{getattr(model_cfg, key)}")
    if theirs["_vocab_size"] != model_cfg.vocab_size:
        raise ValueError(f"checkpoint.init_from_hf={path}: vocab_size={theirs['_vocab_size']} but the model's "
                         f"vocabulary layout has {model_cfg.vocab_size}")


def iter_hf_routers(model_cfg: ModelConfig, path: str):
    """Yield (key, tensor) of the MoD router banks `save_hf` writes beside the HF weights
    (mod_routers.safetensors), when the checkpoint's task list is this run's: a UniMoD checkpoint (e.g. a
    previous run's hf/ export) then keeps its trained routers. A plain Emu3 checkpoint has none, and a
    different task list would score the wrong tasks, so routers then start fresh."""
    from safetensors import safe_open

    from model.hf import ROUTERS_FILE

    file = Path(path) / ROUTERS_FILE
    theirs, _ = config_from_hf(path)
    if not file.exists() or (theirs.get("mod") or {}).get("tasks") != list(model_cfg.mod.tasks):
        return
    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            yield key, f.get_tensor(key)


def load_hf_weights(model: torch.nn.Module, path: str, zero3: bool) -> None:
    """Copy an HF Emu3 checkpoint into `model`; routers come from its mod_routers.safetensors when it has
    them for this run's tasks and MoD layers, else keep their fresh init."""
    check_hf_matches(model.config, path)
    params = dict(model.named_parameters())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    seen = set()
    routers = ((k, t) for k, t in iter_hf_routers(model.config, path)
               if k in params and tuple(getattr(params[k], "ds_shape", params[k].shape)) == tuple(t.shape))
    for key, tensor in itertools.chain(iter_hf_tensors(path), routers):
        if key not in params:
            raise ValueError(f"checkpoint.init_from_hf={path}: tensor {key} has no place in the model")
        p = params[key]
        seen.add(key)
        if zero3:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(tensor.to(p.dtype))
        else:
            p.data.copy_(tensor.to(p.dtype))
    missing = sorted(k for k in params if k not in seen and ".mod_router." not in k)
    if missing:
        raise ValueError(f"checkpoint.init_from_hf={path}: missing tensors {missing[:5]}")


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
