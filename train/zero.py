"""ZeRO data parallel (mode `zero`, stages 0-3): every rank runs the whole model on its own micro-batches and
owns its loss; rank 0 logs.

ZeRO-3: the model is constructed under `deepspeed.zero.Init`, so each rank only ever holds its shard
(every leaf module initialises its own weights in `__init__`, which zero.Init partitions right after),
and an HF checkpoint is copied in tensor by tensor inside `GatheredParameters` (DeepSpeed #3125: no
rank materialises the whole model).
"""

from __future__ import annotations

from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from model import UnifiedTransformer
from model.flops import expert_slots
from model.hf import iter_hf_weights, parameter_shapes
from train.config import RunConfig
from train.engine import Batches, Engine, NonfiniteRun, StepRecord, guard_nonfinite_steps, make_optimizer
from train.launch import distributed
from train.log import log
from train.moe_init import conversion_importance


class ZeroEngine(Engine):
    def __init__(self, cfg: RunConfig, ds_config: dict[str, Any], precision: str, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.zero_stage = ds_config["zero_optimization"].get("stage", 0)
        self.ds, self.model = build_zero_engine(cfg, ds_config, precision, device)
        self.module = self.ds.module
        rank = dist.get_rank() if distributed() else 0
        self.dp_rank, self.dp_world = rank, dist.get_world_size() if distributed() else 1
        self.owns_loss = self.counts_data = True
        self.logs = rank == 0
        self.partitioned = self.zero_stage == 3

    @property
    def whole_model(self) -> torch.nn.Module | None:
        return None if self.partitioned else self.model

    def train_step(self, batches: Batches, nonfinite: NonfiniteRun, step: int) -> StepRecord:
        """Runs micro-batches until grad_accum of them had a finite loss, then the optimizer step, which the
        engine skips when the global gradient norm is not finite (train/engine.py). A micro-batch whose loss is
        not finite on any rank is skipped on every rank (no backward; its data is consumed) and replaced by the
        next one. Returns early, with no step taken, once `nonfinite` is exhausted."""
        rec = self.new_record()
        while len(rec.microbatches) < self.cfg.optim.grad_accum:
            batch, rows = next(batches)
            # With labels the model returns the loss computed in chunks, never the [B,S,V] logits.
            out = self.ds(batch["input_ids"], task_ids=batch["task_ids"], position_ids=batch["position_ids"],
                          labels=batch["labels"])
            ce = out.loss
            loss = ce + out.aux_loss
            if not _finite_everywhere(loss):
                rec.skipped_nonfinite += 1
                nonfinite.add()
                log.warning(f"[train] step {step}: non-finite loss, micro-batch skipped "
                            f"({nonfinite.in_a_row} in a row)")
                if nonfinite.exhausted:
                    return rec
                continue
            self.ds.backward(loss)
            self.ds.step()
            t = int(batch["task_ids"][0])
            rec.loss_sum[t] += ce.detach()
            rec.loss_count[t] += 1
            rec.aux_sum += out.aux_loss.detach()
            rec.routing += out.routing.detach()
            if out.experts is not None:
                rec.experts += out.experts.detach()
                rec.balance_sum += out.balance_loss.detach()
                rec.expert_slots.append(expert_slots(out.experts, self.cfg.model))  # this micro-batch's FLOPs
            rec.samples += batch["input_ids"].shape[0]
            rec.microbatches.append(rows)  # a skipped micro-batch's forward is not counted
        # The last ds.step() was the accumulation boundary: the engine applied the update or skipped it.
        rec.applied = self.ds.was_step_applied()
        if rec.applied:
            nonfinite.clear()
        else:
            nonfinite.add()
            log.warning(f"[train] step {step}: non-finite gradient norm, optimizer step skipped "
                        f"({nonfinite.in_a_row} in a row)")
        return rec

    def gather_state(self) -> dict[str, torch.Tensor]:
        return consolidated_state_dict(self.ds, self.model, self.zero_stage) or {}


def _finite_everywhere(loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite.item() >= 1


def build_zero_engine(cfg: RunConfig, ds_config: dict[str, Any], precision: str, device: torch.device):
    """-> (engine, model). Model built under zero.Init when the JSON asks for ZeRO-3."""
    stage = ds_config["zero_optimization"].get("stage", 0)
    # Before the model exists: rank 0 runs the dense checkpoint on calibration samples (train/moe_init.py).
    importance = conversion_importance(cfg, device)
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
        load_hf_weights(model, cfg.checkpoint.init_from_hf, zero3=stage == 3, importance=importance)
    compile_on, why = cfg.run.compile_on(device.type)
    if compile_on:
        from model.compile import compile_blocks

        compile_blocks(model.model.layers)
        if stage == 3:
            # Each decoder layer becomes a ZeRO-3 "leaf": its own hooks gather the whole layer and no submodule is
            # hooked. Otherwise every submodule call in the compiled block runs a ZeRO-3 hook, a graph break
            # (DeepSpeed disables compile in them), and Dynamo traces DeepSpeed's code around each one. Measured at
            # the debug preset: 48 graph breaks, Dynamo's recompile limit hit, steps slower than eager; as leaves,
            # no graph break and no recompile.
            from deepspeed.utils import set_z3_leaf_modules

            from model.mod import DecoderLayer

            set_z3_leaf_modules(model, [DecoderLayer])
    log.info(f"[train] torch.compile of the decoder blocks: {'on' if compile_on else 'off'} ({why})")
    opt, sched, ds_config = make_optimizer(cfg, model.named_parameters(), ds_config, device.type == "cuda")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config)
    guard_nonfinite_steps(engine)
    from train.safe_load import install_safe_checkpoint_engine  # resume unpickles nothing but weights
    install_safe_checkpoint_engine(engine)
    return engine, model


def load_hf_weights(model: torch.nn.Module, path: str, zero3: bool,
                    importance: dict[int, torch.Tensor] | None = None) -> None:
    """Copy an HF Emu3 checkpoint into `model` (model/hf.py `iter_hf_weights` decides which tensors, routers
    included, and cuts converted MoE layers by `importance`); under ZeRO-3 tensor by tensor inside
    GatheredParameters, rank 0 writing."""
    params = dict(model.named_parameters())
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for key, tensor in iter_hf_weights(model.config, path, parameter_shapes(model), importance=importance):
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
