"""Pipeline parallelism (mode `pipeline`): a DeepSpeed `PipelineModule` over the stages of train/stages.py.

DeepSpeed's `train_batch` runs the whole optimizer step: the first stage feeds the micro-batches in, the last
stage fetches the same ones for their labels and owns the loss (`PipelineLoss`, which records what the step
trained on as it goes), and its first data-parallel replica logs. The whole weights are gathered from the
stages through a scratch directory of the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule

from model.config import ModelConfig
from model.flops import RowTokens, expert_slots
from model.transformer import stage_key_to_hf
from train.config import RunConfig
from train.engine import (Batches, Engine, NonfiniteRun, StepRecord, guard_nonfinite_steps,
                          make_optimizer, torch_dtype)
from train.launch import distributed
from train.log import log
from train.stages import HeadPipe, checkpoint_fn, load_hf_into_stages, stage_specs


class PipelineLoss:
    """The last stage's loss: next-token CE + aux (MoD router losses and MoE balance losses, train/stages.py). The
    CE runs the last stage's LM head on the hidden states in chunks (`HeadPipe.loss`; `head` is set on the last
    stage when the engine is built), so the [B,S,V] logits never exist. While a step runs (`record` set by the
    engine) it also records each micro-batch's CE under its task (without the aux loss), the aux loss, the routing
    counts and, in a model with MoE layers, the balance loss, the expert slot counts and the slots each expert ran
    (their FLOPs; `model_cfg` set by the engine), as the ZeRO engine records them from the model's output."""

    def __init__(self) -> None:
        self.record: StepRecord | None = None
        self.head: HeadPipe | None = None
        self.model_cfg: ModelConfig | None = None

    def __call__(self, outputs, labels):
        h, aux, routing, task_ids, *experts = outputs  # experts: [counts [L,T,E,2]] in a model with MoE layers
        ce = self.head.loss(h, labels)
        loss = ce + aux[0]  # aux[0] is the whole aux loss; aux[1], in an MoE model, its balance part
        rec = self.record
        if rec is not None and experts:
            # Every micro-batch fed counts its FLOPs (`rec.microbatches`), a skipped one too: one entry each.
            rec.expert_slots.append(expert_slots(experts[0], self.model_cfg))
        if not torch.isfinite(loss.detach()):
            # The pipeline engine steps inside train_batch; the best we can do is a zero contribution.
            if rec is not None:
                rec.skipped_nonfinite += 1
            return torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * 0.0
        if rec is not None:
            t = int(task_ids[0])
            rec.loss_sum[t] += ce.detach()
            rec.loss_count[t] += 1
            rec.aux_sum += aux.detach()[0]
            rec.routing += routing.to(rec.routing.dtype)
            if experts:
                rec.experts += experts[0].to(rec.experts.dtype)
                rec.balance_sum += aux.detach()[1]
        return loss


class PipelineEngine(Engine):
    def __init__(self, cfg: RunConfig, ds_config: dict[str, Any], precision: str, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.ds, self.module = build_pipeline_engine(cfg, ds_config, precision, device)
        self.loss_fn: PipelineLoss = self.module.loss_fn
        self.loss_fn.model_cfg = cfg.model
        grid = self.ds.grid
        self.dp_rank, self.dp_world = grid.get_data_parallel_id(), grid.get_data_parallel_world_size()
        self.owns_loss = self.counts_data = self.ds.is_last_stage()
        self.logs = self.owns_loss and self.dp_rank == 0
        self.partitioned = True
        self.loss_group = self.data_group = grid.get_data_parallel_group()  # the last stage's replicas
        self.scratch = Path(cfg.run.output_dir) / ".gather"

    def train_step(self, batches: Batches, nonfinite: NonfiniteRun, step: int) -> StepRecord:
        """One train_batch: DeepSpeed runs every micro-batch and the step. The loss turns a non-finite loss into
        a zero contribution and counts it; the engine skips the step on a non-finite global gradient norm."""
        rec = self.loss_fn.record = self.new_record()
        try:
            self.ds.train_batch(data_iter=_StageInputs(batches, rec.microbatches))
        finally:
            self.loss_fn.record = None
        rec.samples += self.cfg.data.micro_batch_size * self.cfg.optim.grad_accum
        # Only the last stage counted the non-finite micro-batches; every stage learns the count and whether
        # the step was applied (the engine decides from the norm over all stages, so they agree anyway).
        flags = torch.tensor([float(rec.skipped_nonfinite), float(not self.ds.was_step_applied())],
                             device=self.device)
        if distributed():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        rec.skipped_nonfinite = int(flags[0].item())
        rec.applied = flags[1].item() == 0
        if rec.applied and rec.skipped_nonfinite == 0:
            nonfinite.clear()
            return rec
        if not rec.applied:
            log.warning(f"[train] step {step}: non-finite gradient norm, optimizer step skipped")
        nonfinite.add(rec.skipped_nonfinite + (0 if rec.applied else 1))
        return rec

    def gather_state(self) -> dict[str, torch.Tensor]:
        return consolidated_pipeline_state_dict(self.ds, self.cfg.model, self.scratch) or {}


class _StageInputs:
    """Our (batch, rows) stream as the ((inputs...), labels) tuples the pipeline engine expects, noting what
    each micro-batch held (for the FLOPs count). DeepSpeed reads it on the first and the last stage only."""

    def __init__(self, batches: Batches, microbatches: list[list[RowTokens]]) -> None:
        self.batches, self.microbatches = batches, microbatches

    def __iter__(self):
        return self

    def __next__(self):
        b, rows = next(self.batches)
        self.microbatches.append(rows)
        return (b["input_ids"], b["task_ids"], b["position_ids"]), b["labels"]


def build_pipeline_engine(cfg: RunConfig, ds_config: dict[str, Any], precision: str, device: torch.device):
    """-> (DeepSpeed engine, PipelineModule). Stages are split by DeepSpeed's partition method (logged)."""
    from train.moe_init import conversion_importance

    importance = conversion_importance(cfg, device)  # before the stages exist (rank 0 runs the dense checkpoint)
    torch.manual_seed(cfg.run.seed)  # same init of a layer whichever stage builds it
    ckpt_interval = cfg.parallel.activation_checkpoint_interval if cfg.parallel.activation_checkpointing else 0
    module = PipelineModule(layers=stage_specs(cfg.model), loss_fn=PipelineLoss(),
                            num_stages=cfg.parallel.pipeline_stages,
                            partition_method=cfg.parallel.partition_method,
                            activation_checkpoint_interval=ckpt_interval,
                            activation_checkpoint_func=checkpoint_fn)
    module.to(device=device, dtype=torch_dtype(precision) if precision != "fp32" else torch.float32)
    heads = [f for f in module.forward_funcs if isinstance(f, HeadPipe)]
    if heads:  # the last stage: its loss function runs this head (PipelineLoss)
        module.loss_fn.head = heads[0]
    if cfg.checkpoint.init_from_hf:
        load_hf_into_stages(module, cfg.model, cfg.checkpoint.init_from_hf, importance)
    compile_on, why = cfg.run.compile_on(device.type)
    if compile_on:
        from torch._functorch import config as functorch_config

        from model.compile import compile_blocks
        from train.stages import DecoderPipe

        # DeepSpeed's pipeline engine backpropagates each float output of a stage on its own, all but the last with
        # retain_graph=True, which a compiled backward that donates its saved buffers refuses.
        functorch_config.donated_buffer = False
        compile_blocks(f for f in module.forward_funcs if isinstance(f, DecoderPipe))  # this stage's layers
    log.info(f"[train] torch.compile of the decoder blocks: {'on' if compile_on else 'off'} ({why})")
    opt, sched, ds_config = make_optimizer(cfg, module.named_parameters(), ds_config, device.type == "cuda",
                                           norm_group=module._grid.get_pipe_parallel_group())
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched, config=ds_config)
    guard_nonfinite_steps(engine)
    from train.safe_load import install_safe_checkpoint_engine  # resume unpickles nothing but weights
    install_safe_checkpoint_engine(engine)
    parts, L = module.parts, cfg.model.num_hidden_layers
    names = ["embed"] + [f"layer{i}" for i in range(L)] + ["norm+head"]
    split = ", ".join(f"stage {s}: {names[parts[s]]}..{names[parts[s + 1] - 1]}" for s in range(len(parts) - 1))
    log.info(f"[train] pipeline partition ({cfg.parallel.partition_method}): {split}")
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
