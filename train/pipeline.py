"""Pipeline parallelism: a DeepSpeed `PipelineModule` over the stages of train/stages.py, the loss on the last
stage, and the gather of the whole weights from the stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule

from model.config import ModelConfig
from model.loss import causal_lm_loss
from model.transformer import stage_key_to_hf
from train.config import RunConfig
from train.engine import guard_nonfinite_steps, make_optimizer, torch_dtype
from train.stages import checkpoint_fn, load_hf_into_stages, stage_specs


class PipeLoss:
    """Loss on the last stage: next-token CE + MoD aux. Also records per-task losses and routing counts
    into the step record the trainer attaches (only the last stage owns them)."""

    def __init__(self) -> None:
        self.record = None

    def __call__(self, outputs, labels):
        logits, aux, routing, task_ids = outputs
        ce = causal_lm_loss(logits, labels)
        loss = ce + aux.sum()
        rec = self.record
        if not torch.isfinite(loss.detach()):
            # The pipeline engine steps inside train_batch; the best we can do is a zero contribution.
            if rec is not None:
                rec.skipped_nonfinite += 1
            return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
        if rec is not None:
            t = int(task_ids[0])
            rec.loss_sum[t] += ce.detach()
            rec.loss_count[t] += 1
            rec.aux_sum += aux.detach().sum()
            rec.routing += routing.to(rec.routing.dtype)
        return loss


class PipelineStepStats:
    """Attach a StepRecord to the pipeline's loss function for the duration of one train_batch."""

    def __init__(self, loss_fn: PipeLoss) -> None:
        self.loss_fn = loss_fn

    @classmethod
    def attach(cls, engine, rec) -> "PipelineStepStats":
        loss_fn = engine.module.loss_fn
        loss_fn.record = rec
        return cls(loss_fn)

    def detach(self) -> None:
        self.loss_fn.record = None


def build_pipeline_engine(cfg: RunConfig, ds_config: dict[str, Any], precision: str, device: torch.device):
    """-> (engine, module). Stages are split by DeepSpeed's partition method; stage 0 prints the split."""
    torch.manual_seed(cfg.run.seed)  # same init of a layer whichever stage builds it
    ckpt_interval = cfg.parallel.activation_checkpoint_interval if cfg.parallel.activation_checkpointing else 0
    module = PipelineModule(layers=stage_specs(cfg.model), loss_fn=PipeLoss(),
                            num_stages=cfg.parallel.pipeline_stages,
                            partition_method=cfg.parallel.partition_method,
                            activation_checkpoint_interval=ckpt_interval,
                            activation_checkpoint_func=checkpoint_fn)
    module.to(device=device, dtype=torch_dtype(precision) if precision != "fp32" else torch.float32)
    if cfg.checkpoint.init_from_hf:
        load_hf_into_stages(module, cfg.model, cfg.checkpoint.init_from_hf)
    opt, sched, ds_config = make_optimizer(cfg, module.named_parameters(), ds_config, device.type == "cuda",
                                           norm_group=module._grid.get_pipe_parallel_group())
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_config)
    guard_nonfinite_steps(engine)
    from train.safe_load import install_safe_checkpoint_engine  # resume unpickles nothing but weights
    install_safe_checkpoint_engine(engine)
    if engine.global_rank == 0:
        parts = module.parts
        L = cfg.model.num_hidden_layers
        names = ["embed"] + [f"layer{i}" for i in range(L)] + ["norm+head"]
        split = ", ".join(f"stage {s}: {names[parts[s]]}..{names[parts[s + 1] - 1]}" for s in range(len(parts) - 1))
        print(f"[train] pipeline partition ({cfg.parallel.partition_method}): {split}", flush=True)
    return engine, module


def consolidated_pipeline_state_dict(engine, model_cfg: ModelConfig, scratch: Path) -> dict[str, torch.Tensor] | None:
    """Whole weights under HF names on global rank 0 (None elsewhere): the first data-parallel replica of
    every stage writes its stage's tensors (safetensors) into `scratch` (a directory of the run, which every
    rank can reach), rank 0 merges them and removes it."""
    from safetensors.torch import load_file, save_file

    rank = dist.get_rank() if dist.is_initialized() else 0
    stage = engine.stage_id
    if engine.grid.get_data_parallel_id() == 0:
        scratch.mkdir(parents=True, exist_ok=True)
        state = {stage_key_to_hf(k, model_cfg.num_hidden_layers): v.detach().cpu().contiguous()
                 for k, v in engine.module.state_dict().items()}
        save_file(state, str(scratch / f"stage{stage}.safetensors"))
    if dist.is_initialized():
        dist.barrier()
    merged = None
    if rank == 0:
        merged = {}
        for s in range(engine.num_stages):
            merged.update(load_file(str(scratch / f"stage{s}.safetensors")))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
    return merged
