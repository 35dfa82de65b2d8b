"""Pipeline parallelism: a DeepSpeed `PipelineModule` built from the one model's ordered layers.

    [EmbedPipe] -> [DecoderPipe 0] -> ... -> [DecoderPipe L-1] -> [HeadPipe]   (loss on the last stage)

Each piece reuses the model's own modules (`Embedding`, `DecoderLayer` with its MoD router bank,
`RMSNorm` + `Linear` head), so the math is the single-device model's. Between stages everything travels
as one tuple of tensors (DeepSpeed #3895, Megatron-DeepSpeed #373):

    hidden [B,S,D] float | input_ids [B,S] long | task_ids [B] long | position_ids [B,S] long |
    aux [1] float (MoD router loss so far) | routing [L,T,2] long (routable / selected counts)

The position ids also carry the packed rows' documents (they restart at 0 for each sample), so every
stage rebuilds the same document mask and per-sample MoD capacities as the single-device model
(`model.mod.row_layout`). Ids travel as integers (the engine expects a gradient for every float it
sends); the aux loss is a float on the gradient path from stage 0 on (seeded with 0 * a weight), so every
stage has a gradient to send back. Shapes are fixed per run (fixed seq_len, fixed micro-batch): the engine sends them only once.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from model.config import ModelConfig
from model.hf import iter_hf_tensors
from model.layers import Embedding, Linear, RMSNorm, rope_cos_sin
from model.loss import causal_lm_loss
from model.mod import DecoderLayer, capacity_table, routable_table, row_layout, token_kinds
from train.config import RunConfig
from train.engine import check_hf_matches, guard_nonfinite_steps, iter_hf_routers, make_optimizer, torch_dtype


class EmbedPipe(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range)
        self.num_layers, self.num_tasks = cfg.num_hidden_layers, cfg.num_tasks

    def forward(self, inputs):
        input_ids, task_ids, position_ids = inputs
        h = self.embed_tokens(input_ids)
        aux = (self.embed_tokens.weight[0, :1] * 0.0).float()  # on the graph, so stage 0 can backprop it
        routing = torch.zeros(self.num_layers, self.num_tasks, 2, dtype=torch.long, device=h.device)
        return h, input_ids, task_ids, position_ids, aux, routing


class DecoderPipe(DecoderLayer):
    """A decoder layer (with its MoD router bank) as a pipeline layer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.cfg = cfg

    def forward(self, inputs):  # noqa: D401 - DeepSpeed calls layers with one tuple
        h, input_ids, task_ids, position_ids, aux, routing = inputs
        cfg = self.cfg
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, h.dtype)
        # The documents of packed rows come from the position ids, exactly as in the single-device forward
        # (model.layers.document_ids); each stage's layer rebuilds the layout from the tensors it receives.
        layout = row_layout(token_kinds(input_ids, cfg.vocab), task_ids, position_ids,
                            routable_table(cfg, h.device))
        h, layer_aux, stats = super().forward(h, cos, sin, task_ids, layout, capacity_table(cfg, h.device),
                                              cfg.mod.routing)
        routing = routing.clone()
        routing[self.layer_idx] += stats.round().long()
        return h, input_ids, task_ids, position_ids, aux + layer_aux, routing


class HeadPipe(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, cfg.initializer_range)

    def forward(self, inputs):
        h, _, task_ids, _, aux, routing = inputs
        return self.lm_head(self.norm(h)), aux, routing, task_ids


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


def layer_specs(cfg: ModelConfig) -> list[LayerSpec]:
    return ([LayerSpec(EmbedPipe, cfg)] + [LayerSpec(DecoderPipe, cfg, i) for i in range(cfg.num_hidden_layers)]
            + [LayerSpec(HeadPipe, cfg)])


def pipe_key_to_hf(key: str, num_layers: int) -> str:
    """'0.embed_tokens.weight' -> 'model.embed_tokens.weight', '3.mlp.up_proj.weight' -> 'model.layers.2...',
    '<L+1>.norm.weight' -> 'model.norm.weight', '<L+1>.lm_head.weight' -> 'lm_head.weight'."""
    idx, rest = key.split(".", 1)
    i = int(idx)
    if i == 0:
        return f"model.{rest}"
    if i <= num_layers:
        return f"model.layers.{i - 1}.{rest}"
    return rest if rest.startswith("lm_head.") else f"model.{rest}"


def hf_key_to_pipe(key: str, num_layers: int) -> str:
    if key.startswith("model.layers."):
        i, rest = key[len("model.layers."):].split(".", 1)
        return f"{int(i) + 1}.{rest}"
    if key.startswith("model.embed_tokens."):
        return "0." + key[len("model."):]
    if key.startswith("model.norm."):
        return f"{num_layers + 1}." + key[len("model."):]
    if key.startswith("lm_head."):
        return f"{num_layers + 1}.{key}"
    raise ValueError(f"{key} is not a decoder tensor")


def build_pipeline_engine(cfg: RunConfig, ds_config: dict[str, Any], precision: str, device: torch.device):
    """-> (engine, module). Stages are split by DeepSpeed's partition method; stage 0 prints the split."""
    torch.manual_seed(cfg.run.seed)  # same init of a layer whichever stage builds it
    ckpt_interval = cfg.parallel.activation_checkpoint_interval if cfg.parallel.activation_checkpointing else 0
    module = PipelineModule(layers=layer_specs(cfg.model), loss_fn=PipeLoss(),
                            num_stages=cfg.parallel.pipeline_stages,
                            partition_method=cfg.parallel.partition_method,
                            activation_checkpoint_interval=ckpt_interval,
                            activation_checkpoint_func=_checkpoint)
    module.to(device=device, dtype=torch_dtype(precision) if precision != "fp32" else torch.float32)
    if cfg.checkpoint.init_from_hf:
        load_hf_into_pipeline(module, cfg.model, cfg.checkpoint.init_from_hf)
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


def _checkpoint(function, *args):
    """Non-reentrant recomputation: the tuple carries integer tensors, which reentrant checkpointing
    cannot give gradients to."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def load_hf_into_pipeline(module: PipelineModule, model_cfg: ModelConfig, path: str) -> None:
    check_hf_matches(model_cfg, path)
    params = dict(module.named_parameters())
    L = model_cfg.num_hidden_layers
    for key, tensor in itertools.chain(iter_hf_tensors(path), iter_hf_routers(model_cfg, path)):
        pk = hf_key_to_pipe(key, L)
        if pk in params and params[pk].shape == tensor.shape:  # this stage owns it (a router: same plan)
            params[pk].data.copy_(tensor.to(params[pk].dtype))


def consolidated_pipeline_state_dict(engine, model_cfg: ModelConfig, scratch: Path) -> dict[str, torch.Tensor] | None:
    """Whole weights under HF names on global rank 0 (None elsewhere): the first data-parallel replica of
    every stage writes its stage's tensors (safetensors) into `scratch` (a directory of the run, which every
    rank can reach), rank 0 merges them and removes it."""
    from safetensors.torch import load_file, save_file

    rank = dist.get_rank() if dist.is_initialized() else 0
    stage = engine.stage_id
    if engine.grid.get_data_parallel_id() == 0:
        scratch.mkdir(parents=True, exist_ok=True)
        state = {pipe_key_to_hf(k, model_cfg.num_hidden_layers): v.detach().cpu().contiguous()
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
