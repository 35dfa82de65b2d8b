"""UnifiedTransformer: embed -> decoder layers (some with task-aware MoD) -> norm -> LM head.

One decoder over one vocabulary of text and image VQ tokens (Emu3). Parameter names are the HF
`Emu3ForCausalLM` state-dict keys (`model.embed_tokens.weight`, `model.layers.N...`, `model.norm.weight`,
`lm_head.weight`); MoD router banks are `model.layers.N.mod_router.weight`.

    from model import ModelConfig, UnifiedTransformer
    net = UnifiedTransformer(ModelConfig.from_preset("debug", mod={"capacity": {"2-3": {"t2i": 0.25}}}))
    out = net(input_ids, task_ids=task_ids)   # out.logits [B,S,V], out.aux_loss [], out.routing [L,T,4] (model/mod.py ROUTING_STATS)
                                              # out.experts [L,T,E,2] or None (MoE layers, model/moe.py EXPERT_STATS)
    out = net(input_ids, task_ids=task_ids, labels=labels)  # out.loss [] (mean next-token CE), out.logits None
    (out.loss + out.aux_loss).backward()

The forward is three pieces, in order: `prologue` (embedding + the `LayerContext` every layer shares),
the decoder layers, `head` (or, given labels, `head_loss`: the LM head and the loss in chunks, never the
whole [B,S,V] logits; model/loss.py `linear_cross_entropy`). `pieces` lists the same order with each piece's HF names; the pipeline stages
of `train/stages.py` are built from it and run the same prologue code (`layer_context`). Parallelism
(ZeRO-3, pipeline stages) is applied from outside by `train/`; this file is single-device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.utils.checkpoint
from torch import nn

from model.config import ModelConfig
from model.layers import Embedding, Linear, RMSNorm, rope_cos_sin
from model.loss import IGNORE_INDEX, linear_cross_entropy, next_token_targets
from model.mod import DecoderLayer, LayerContext, capacity_table, routable_table, row_layout, token_kinds


class ModelOutput(NamedTuple):
    """A NamedTuple rather than a dataclass: DeepSpeed's ZeRO-3 module hooks walk tuples (namedtuples
    included), lists and dicts to find the output tensors; a dataclass hides them from those hooks."""

    logits: torch.Tensor | None
    # [B, S, V] next-token logits; None when the forward was given labels (it returns `loss` instead).
    aux_loss: torch.Tensor
    # Scalar: the MoD router BCE loss summed over MoD layers, already times `mod.aux_loss_weight`, plus the
    # MoE load-balancing loss of MoE layers, times `moe.balance_loss_weight`. Add it to the language-model loss.
    routing: torch.Tensor
    # [num_layers, num_tasks, 4] float token counts per layer and task in this batch, columns
    # model.mod.ROUTING_STATS: routable, selected, router_on (logit > 0), agree (r > 0 == top-k). Dense
    # layers, and tasks with capacity 1 in a MoD layer, report every column equal to routable.
    loss: torch.Tensor | None = None
    # Scalar fp32: the mean next-token cross-entropy over supervised positions, when the forward was given
    # labels (aux loss not included); else None.
    experts: torch.Tensor | None = None
    # [num_layers, num_tasks, E, 2] float token-slot counts of the MoE layers (E: the most experts of any MoE
    # layer), columns model.moe.EXPERT_STATS: routed, dropped (over capacity, not run); dense-MLP layers are 0.
    # None when the model has no MoE layer. The MoE balance loss is inside aux_loss.
    balance_loss: torch.Tensor | None = None
    # Scalar fp32: the part of aux_loss that is the MoE load-balancing loss (summed over MoE layers, already
    # times `moe.balance_loss_weight`), for logging it apart; None when the model has no MoE layer.


def layer_context(cfg: ModelConfig, input_ids: torch.Tensor, task_ids: torch.Tensor | None,
                  position_ids: torch.Tensor | None, routing: str | None, dtype: torch.dtype) -> LayerContext:
    """The prologue's per-forward work apart from the embedding: RoPE tables, the rows' layout (documents,
    routable tokens, with the one device->host copy of a forward) and the capacity table, for every
    decoder layer. Validates task ids and the routing mode. `dtype` is the hidden states' dtype."""
    B, S = input_ids.shape
    device = input_ids.device
    if task_ids is None:
        if cfg.mod.mod_layers():
            raise ValueError("task_ids is required: this model has MoD layers routed per task")
        task_ids = torch.zeros(B, dtype=torch.long, device=device)
    if task_ids.shape != (B,):
        raise ValueError(f"task_ids must have shape [{B}], got {tuple(task_ids.shape)}")
    routing = routing or cfg.mod.routing
    if routing not in ("topk", "causal"):
        raise ValueError(f"routing must be 'topk' or 'causal', got {routing!r}")
    # The document mask is built here once for every layer (None when each row is one document).
    layout = row_layout(token_kinds(input_ids, cfg.vocab), task_ids, position_ids, routable_table(cfg, device))
    if min(layout.tasks) < 0 or max(layout.tasks) >= cfg.num_tasks:
        raise ValueError(f"task_ids must lie in [0, {cfg.num_tasks}) for tasks {cfg.mod.tasks}, got {layout.tasks}")
    if position_ids is None:
        position_ids = torch.arange(S, device=device).expand(B, S)
    cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, dtype)
    return LayerContext(cos=cos, sin=sin, task_ids=task_ids, layout=layout, cap_tbl=capacity_table(cfg, device),
                        routing=routing)


def _stack_experts(per_layer: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Per-layer MoE counts [T, E_l, 2] (None for dense MLPs) -> [L, T, max E_l, 2], or None without MoE."""
    present = [e for e in per_layer if e is not None]
    if not present:
        return None
    T, E = present[0].shape[0], max(e.shape[1] for e in present)
    out = present[0].new_zeros(len(per_layer), T, E, 2)
    for i, e in enumerate(per_layer):
        if e is not None:
            out[i, :, :e.shape[1]] = e
    return out


class LMHead(Linear):
    """Linear(D, vocab), which can also return the summed next-token loss of its input without materialising
    the logits (`linear_cross_entropy`). The loss is computed inside this module's own forward, so DeepSpeed
    ZeRO-3 has gathered the weight for it, as for a plain call."""

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., D] -> logits [..., V]; with target [...] (IGNORE_INDEX = no loss) -> the summed CE, fp32 []."""
        if target is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, target)


def head_loss(norm: nn.Module, lm_head: LMHead, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (fp32) over the supervised positions of `labels` [B,S] (aligned with the
    inputs, model/loss.py) from the last hidden states h [B,S,D]; 0 when nothing is supervised. Shared by the
    model and the pipeline's last stage."""
    target = next_token_targets(labels)
    return lm_head(norm(h), target) / (target != IGNORE_INDEX).sum().clamp_min(1)


class Backbone(nn.Module):
    """The `model.` prefix of the HF checkpoint: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.initializer_range)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class UnifiedTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = LMHead(cfg.hidden_size, cfg.vocab_size, cfg.initializer_range)
        self.gradient_checkpointing = False
        """Recompute each decoder layer in backward (torch.utils.checkpoint, non-reentrant)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        routing: str | None = None,
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B,S] long; task_ids [B] long (index into config.mod.tasks; required when the model
        has MoD layers); position_ids [B,S] (default 0..S-1); routing overrides config.mod.routing; labels
        [B,S] long aligned with input_ids (-100 = not supervised; model/loss.py): return `loss` computed in
        chunks instead of the logits.

        Packed rows: position ids restart at 0 for each sample in a row (trailing padding continues the
        last sample's positions). Each sample then attends only to itself and its RoPE restarts; MoD
        capacities apply per sample (model/mod.py)."""
        h, ctx = self.prologue(input_ids, task_ids, position_ids, routing)
        aux = h.new_zeros((), dtype=torch.float32)
        stats, experts, balance = [], [], []
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, layer_aux, layer_stats, layer_experts, layer_balance = torch.utils.checkpoint.checkpoint(
                    layer, h, ctx, return_experts=True, use_reentrant=False)
            else:
                h, layer_aux, layer_stats, layer_experts, layer_balance = layer(h, ctx, return_experts=True)
            aux = aux + layer_aux
            stats.append(layer_stats)
            experts.append(layer_experts)
            if layer_balance is not None:
                balance.append(layer_balance.float())
        out = dict(aux_loss=aux, routing=torch.stack(stats), experts=_stack_experts(experts),
                   balance_loss=torch.stack(balance).sum() if balance else None)
        if labels is not None:
            return ModelOutput(logits=None, loss=self.head_loss(h, labels), **out)
        return ModelOutput(logits=self.head(h), **out)

    def prologue(self, input_ids: torch.Tensor, task_ids: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, routing: str | None = None
                 ) -> tuple[torch.Tensor, LayerContext]:
        """-> (embeddings h [B,S,D], the context every decoder layer reads)."""
        h = self.model.embed_tokens(input_ids)
        return h, layer_context(self.config, input_ids, task_ids, position_ids, routing, h.dtype)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """[B,S,D] last hidden states -> [B,S,V] logits."""
        return self.lm_head(self.model.norm(h))

    def head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """[B,S,D] last hidden states, [B,S] labels -> mean next-token CE over supervised positions (fp32),
        the head run in chunks (model/loss.py `linear_cross_entropy`)."""
        return head_loss(self.model.norm, self.lm_head, h, labels)

    # ----- helpers used by training and tests ------------------------------------------------------
    def num_parameters(self, exclude_routers: bool = False, active: bool = False) -> int:
        """Parameters of the model. `exclude_routers`: without the MoD router banks and MoE routers (what the
        Emu3 checkpoint holds). `active`: those one token uses, an MoE layer's experts counting (shared + top_k) / E
        of theirs (E equally wide experts)."""
        total = sum(p.numel() for n, p in self.named_parameters()
                    if not (exclude_routers and (".mod_router." in n or ".mlp.router." in n)))
        if active:
            moe = self.config.moe
            for i in moe.layers:
                experts = sum(p.numel() for p in self.model.layers[i].mlp.experts.parameters())
                total -= experts * (moe.num_experts - moe.active_experts) // moe.num_experts
        return total

    @classmethod
    def from_hf(cls, path, mod=None, moe=None, importance=None, **overrides) -> "UnifiedTransformer":
        """model/hf.py `load_hf`: `mod` / `moe` add or replace the MoD / MoE plan (a dense checkpoint's MLPs
        are cut into experts by `importance`, {layer: [F] neuron scores}, default equal importance)."""
        from model.hf import load_hf

        return load_hf(cls, path, mod=mod, moe=moe, importance=importance, **overrides)

    def save_hf(self, path, **kwargs) -> None:
        from model.hf import save_hf

        save_hf(self, path, **kwargs)

    def compile_blocks(self, dynamic: bool | None = None) -> None:
        """torch.compile each decoder layer's dense compute in place (model/compile.py `compile_blocks`)."""
        from model.compile import compile_blocks

        compile_blocks(self.model.layers, dynamic=dynamic)


# ----- the model as an ordered list of pieces (pipeline layers, train/stages.py) --------------------------
@dataclass(frozen=True)
class Piece:
    """One entry of the model's ordered layer list."""

    kind: str
    """"embed" (the prologue's embedding), "layer" (a decoder layer) or "head" (final norm + LM head)."""
    layer_idx: int | None
    """The decoder layer's index for kind "layer", else None."""
    hf_prefixes: dict[str, str]
    """Prefix of a parameter name inside the piece -> its HF prefix: the piece holds the model's own modules
    under these names, so a pipeline layer built for it names its parameters `<piece index>.<name>`."""


def pieces(num_layers: int) -> list[Piece]:
    """embed, layer 0 .. layer L-1, head: the order of the forward."""
    return ([Piece("embed", None, {"embed_tokens.": "model.embed_tokens."})]
            + [Piece("layer", i, {"": f"model.layers.{i}."}) for i in range(num_layers)]
            + [Piece("head", None, {"norm.": "model.norm.", "lm_head.": "lm_head."})])


def stage_key_to_hf(key: str, num_layers: int) -> str:
    """'0.embed_tokens.weight' -> 'model.embed_tokens.weight', '3.mlp.up_proj.weight' -> 'model.layers.2...',
    '<L+1>.norm.weight' -> 'model.norm.weight', '<L+1>.lm_head.weight' -> 'lm_head.weight'."""
    idx, rest = key.split(".", 1)
    all_pieces = pieces(num_layers)
    if not (idx.isdigit() and int(idx) < len(all_pieces)):
        raise ValueError(f"{key} is not a pipeline parameter of a {num_layers}-layer model")
    for local, hf in all_pieces[int(idx)].hf_prefixes.items():
        if rest.startswith(local):
            return hf + rest[len(local):]
    raise ValueError(f"{key} is not a pipeline parameter of a {num_layers}-layer model")


def hf_key_to_stage(key: str, num_layers: int) -> str:
    """The inverse of `stage_key_to_hf`; ValueError for a key outside the decoder."""
    for i, piece in enumerate(pieces(num_layers)):
        for local, hf in piece.hf_prefixes.items():
            if key.startswith(hf):
                return f"{i}.{local}{key[len(hf):]}"
    raise ValueError(f"{key} is not a decoder tensor")
