"""Pipeline stages: the model's own pieces as DeepSpeed pipeline layers.

    [EmbedPipe] -> [DecoderPipe 0] -> ... -> [DecoderPipe L-1] -> [HeadPipe]

Each piece reuses the model's own modules (`Embedding`, `DecoderLayer` with its MoD router bank,
`RMSNorm` + `Linear` head), so the math is the single-device model's. Between stages everything travels
as one tuple of tensors (DeepSpeed #3895, Megatron-DeepSpeed #373):

    hidden [B,S,D] float | input_ids [B,S] long | task_ids [B] long | position_ids [B,S] long |
    aux [1] float (MoD router loss so far) | routing [L,T,2] long (routable / selected counts)

The position ids also carry the packed rows' documents (they restart at 0 for each sample), so every
stage rebuilds the same document mask and per-sample MoD capacities as the single-device model
(`model.mod.row_layout`). Ids travel as integers (the engine expects a gradient for every float it
sends); the aux loss is a float on the gradient path from stage 0 on (seeded with 0 * a weight), so every
stage has a gradient to send back. Shapes are fixed per run (fixed seq_len, fixed micro-batch): the engine
sends them only once. The last stage returns (logits, aux, routing, task_ids) to the loss function.
"""

from __future__ import annotations

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from model.config import ModelConfig
from model.hf import iter_hf_weights
from model.layers import Embedding, Linear, RMSNorm, rope_cos_sin
from model.mod import DecoderLayer, capacity_table, routable_table, row_layout, token_kinds
from model.transformer import hf_key_to_stage


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


def stage_specs(cfg: ModelConfig) -> list[LayerSpec]:
    return ([LayerSpec(EmbedPipe, cfg)] + [LayerSpec(DecoderPipe, cfg, i) for i in range(cfg.num_hidden_layers)]
            + [LayerSpec(HeadPipe, cfg)])


def checkpoint_fn(function, *args):
    """Non-reentrant recomputation: the tuple carries integer tensors, which reentrant checkpointing
    cannot give gradients to."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def load_hf_into_stages(module: PipelineModule, model_cfg: ModelConfig, path: str) -> None:
    params = dict(module.named_parameters())
    L = model_cfg.num_hidden_layers
    for key, tensor in iter_hf_weights(model_cfg, path):
        pk = hf_key_to_stage(key, L)
        if pk in params:  # this stage owns it
            params[pk].data.copy_(tensor.to(params[pk].dtype))
