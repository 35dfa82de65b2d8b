"""Pipeline stages: the model's ordered pieces (`model.transformer.pieces`) as DeepSpeed pipeline layers.

    [EmbedPipe] -> [DecoderPipe 0] -> ... -> [DecoderPipe L-1] -> [HeadPipe]

Each pipeline layer holds the model's own modules under the model's own names (`embed_tokens`; a
`DecoderLayer` with its MoD router bank; `norm` + `lm_head`), so DeepSpeed names a parameter
`<piece index>.<the model's name inside the piece>` and `model.transformer.stage_key_to_hf` maps it back.
The math is the single-device model's: the decoder layers read the `LayerContext` the model's prologue
builds (`model.transformer.layer_context`). Between stages everything travels as one tuple of tensors
(DeepSpeed #3895, Megatron-DeepSpeed #373):

    hidden [B,S,D] float | input_ids [B,S] long | task_ids [B] long | position_ids [B,S] long |
    aux [A] float | routing [L,T,4] long (counts, columns model.mod.ROUTING_STATS) [| experts [L,T,E,2] long]

aux[0] is the aux loss so far, as the model's `ModelOutput.aux_loss` sums it (MoD router losses plus MoE balance
losses); a model with MoE layers (`moe.layers`) has A = 2, aux[1] being the MoE balance part of aux[0] (for
logging it apart, as `ModelOutput.balance_loss`), and carries the expert slot counts (columns
model.moe.EXPERT_STATS), each stage adding its own layers' rows. A dense model's tuple has A = 1 and no expert
counts: its stages send what they sent before MoE existed.

The position ids also carry the packed rows' documents (they restart at 0 for each sample), so every stage
rebuilds the same document mask and per-sample MoD capacities as the single-device model, once per
micro-batch (`StageContext`). Ids travel as integers (the engine expects a gradient for every float it
sends); the aux loss is a float on the gradient path from stage 0 on (seeded with 0 * a weight), so every
stage has a gradient to send back (the MoE balance loss rides in it, so the routers get its gradient as in the
model); the counts travel as integers, which need no gradient. Shapes are fixed per run (fixed seq_len, fixed
micro-batch, expert counts for every layer and expert whatever the batch routed): the engine sends them only
once. The last stage returns (hidden [B,S,D], aux, routing, task_ids[, experts]) to the loss function,
which runs the head with the labels (`HeadPipe.loss`).
"""

from __future__ import annotations

import weakref

import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn

from model.config import ModelConfig
from model.hf import iter_hf_weights, parameter_shapes
from model.layers import Embedding, RMSNorm
from model.mod import ROUTING_STATS, DecoderLayer, LayerContext
from model.moe import EXPERT_STATS
from model.transformer import (LMHead, UnifiedTransformer, head_loss, hf_key_to_stage, layer_context, pieces,
                               stage_key_to_hf)


class StageContext:
    """The decoder layers' `LayerContext`, built once per micro-batch by the first decoder layer of a stage
    and reused by the stage's later layers (one device->host copy per stage and micro-batch, not one per
    layer).

    A stage's layers pass the id tensors (input_ids, task_ids, position_ids) on unchanged, so within a stage
    every layer of one micro-batch sees the very tensor objects the stage received: the context is found by
    their identity. Non-reentrant activation checkpointing (`checkpoint_fn`) recomputes a layer with the same
    argument objects, so the recompute in backward finds its micro-batch's context as well. Several
    micro-batches are in flight in the pipeline schedule, hence one entry per micro-batch, dropped when its
    id tensors are freed."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self._entries: dict[tuple, tuple[tuple[weakref.ref, ...], LayerContext]] = {}
        self.builds = 0
        """How many contexts were built (tests count them)."""

    def __repr__(self) -> str:  # LayerSpec prints its arguments
        return "StageContext()"

    def get(self, input_ids: torch.Tensor, task_ids: torch.Tensor, position_ids: torch.Tensor,
            dtype: torch.dtype) -> LayerContext:
        ids = (input_ids, task_ids, position_ids)
        key = (*map(id, ids), dtype)
        entry = self._entries.get(key)
        if entry is not None and all(ref() is t for ref, t in zip(entry[0], ids)):
            return entry[1]
        ctx = layer_context(self.cfg, input_ids, task_ids, position_ids, self.cfg.mod.routing, dtype)
        self.builds += 1

        def drop(_, key=key) -> None:
            current = self._entries.get(key)
            if current is not None and any(ref() is None for ref in current[0]):
                del self._entries[key]

        self._entries[key] = (tuple(weakref.ref(t, drop) for t in ids), ctx)
        return ctx


class EmbedPipe(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range)
        self.num_layers, self.num_tasks = cfg.num_hidden_layers, cfg.num_tasks
        self.num_experts = cfg.moe.num_experts if cfg.moe.layers else None  # None: no expert counts travel

    def forward(self, inputs):
        input_ids, task_ids, position_ids = inputs
        h = self.embed_tokens(input_ids)
        n_aux = 1 if self.num_experts is None else 2  # [aux loss] or [aux loss, of which MoE balance]
        aux = (self.embed_tokens.weight[0, :n_aux] * 0.0).float()  # on the graph, so stage 0 can backprop it
        routing = torch.zeros(self.num_layers, self.num_tasks, len(ROUTING_STATS), dtype=torch.long, device=h.device)
        if self.num_experts is None:
            return h, input_ids, task_ids, position_ids, aux, routing
        experts = torch.zeros(self.num_layers, self.num_tasks, self.num_experts, len(EXPERT_STATS), dtype=torch.long,
                              device=h.device)
        return h, input_ids, task_ids, position_ids, aux, routing, experts


class DecoderPipe(DecoderLayer):
    """A decoder layer (with its MoD router bank) as a pipeline layer. `contexts` is shared by the decoder
    layers of one stage (`stage_specs`); a layer built alone gets its own."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, contexts: StageContext | None = None) -> None:
        super().__init__(cfg, layer_idx)
        self.contexts = contexts if contexts is not None else StageContext(cfg)

    def forward(self, inputs):  # noqa: D401 - DeepSpeed calls layers with one tuple
        h, input_ids, task_ids, position_ids, aux, routing, *experts = inputs
        ctx = self.contexts.get(input_ids, task_ids, position_ids, h.dtype)
        h, layer_aux, stats, layer_experts, balance = super().forward(h, ctx, return_experts=True)
        routing = routing.clone()
        routing[self.layer_idx] += stats.round().long()
        if not experts:  # a dense model: aux [1]
            return h, input_ids, task_ids, position_ids, aux + layer_aux, routing
        (experts,) = experts
        if layer_experts is None:  # a dense MLP in an MoE model: no slots, no balance loss
            balance = torch.zeros_like(layer_aux)
        else:
            experts = experts.clone()
            experts[self.layer_idx, :, :layer_experts.shape[1]] += layer_experts.round().long()
        # layer_aux holds the balance loss already (the model's sum): the routers get its gradient through aux[0],
        # and aux[1] only reports it (the loss never reads it).
        aux = aux + torch.stack([layer_aux.float(), balance.float()])
        return h, input_ids, task_ids, position_ids, aux, routing, experts


class HeadPipe(nn.Module):
    """The final norm and the LM head. Its forward passes the last hidden states on: the head itself runs in
    the loss function (train/pipeline.py `PipelineLoss`, through `loss`), the only place that has the labels,
    so the [B,S,V] logits are never materialised (model/loss.py `linear_cross_entropy`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, cfg.initializer_range)

    def forward(self, inputs):
        h, _, task_ids, _, aux, routing, *experts = inputs  # experts: [counts] in a model with MoE layers
        return h, aux, routing, task_ids, *experts

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[B,S,D] last hidden states (this layer's first output) -> [B,S,V] logits (UnifiedTransformer.head)."""
        return self.lm_head(self.norm(h))

    def loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean next-token CE over the supervised positions (UnifiedTransformer.head_loss)."""
        return head_loss(self.norm, self.lm_head, h, labels)


def stage_specs(cfg: ModelConfig) -> list[LayerSpec]:
    """One LayerSpec per piece of `model.transformer.pieces`, in its order. The decoder layers share one
    StageContext: a process builds only its own stage's layers, so they are the layers of one stage."""
    contexts = StageContext(cfg)
    specs = []
    for piece in pieces(cfg.num_hidden_layers):
        if piece.kind == "embed":
            specs.append(LayerSpec(EmbedPipe, cfg))
        elif piece.kind == "layer":
            specs.append(LayerSpec(DecoderPipe, cfg, piece.layer_idx, contexts))
        else:
            specs.append(LayerSpec(HeadPipe, cfg))
    return specs


def checkpoint_fn(function, *args):
    """Non-reentrant recomputation: the tuple carries integer tensors, which reentrant checkpointing
    cannot give gradients to."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)


def load_hf_into_stages(module: PipelineModule, model_cfg: ModelConfig, path: str,
                        importance: dict[int, torch.Tensor] | None = None) -> None:
    """Copy an HF Emu3 checkpoint into this process's stages, through `iter_hf_weights` (the one reader and
    router policy of the single-device and ZeRO-3 loads; converted MoE layers cut by `importance`). A stage
    parameter left unfilled is an error, except a router bank the policy leaves at its fresh init (a checkpoint
    without this run's routers)."""
    L = model_cfg.num_hidden_layers
    params = dict(module.named_parameters())
    filled = set()
    with torch.device("meta"):
        whole = parameter_shapes(UnifiedTransformer(model_cfg))
    for key, tensor in iter_hf_weights(model_cfg, path, whole, importance=importance):
        pk = hf_key_to_stage(key, L)
        if pk not in params:
            continue  # another stage's tensor
        if tuple(tensor.shape) != tuple(params[pk].shape):
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, stage parameter {pk} "
                             f"{tuple(params[pk].shape)}")
        params[pk].data.copy_(tensor.to(params[pk].dtype))
        filled.add(pk)
    unfilled = sorted(k for k in params if k not in filled and ".mod_router." not in stage_key_to_hf(k, L))
    if unfilled:
        raise ValueError(f"{path}: no checkpoint tensor for stage parameters {unfilled[:5]}")
