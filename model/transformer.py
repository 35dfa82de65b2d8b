"""UnifiedTransformer: embed -> decoder layers (some with task-aware MoD) -> norm -> LM head.

One decoder over one vocabulary of text and image VQ tokens (Emu3). Parameter names are the HF
`Emu3ForCausalLM` state-dict keys (`model.embed_tokens.weight`, `model.layers.N...`, `model.norm.weight`,
`lm_head.weight`); MoD router banks are `model.layers.N.mod_router.weight`.

    from model import ModelConfig, UnifiedTransformer
    net = UnifiedTransformer(ModelConfig.from_preset("debug", mod={"capacity": {"2-3": {"t2i": 0.25}}}))
    out = net(input_ids, task_ids=task_ids)   # out.logits [B,S,V], out.aux_loss [], out.routing [L,T,2]

Parallelism (ZeRO-3, pipeline stages) is applied from outside by `train/`; this file is single-device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from torch import nn

from model.config import ModelConfig
from model.layers import Embedding, Linear, RMSNorm, rope_cos_sin
from model.mod import DecoderLayer, capacity_table, routable_table, row_layout, token_kinds


@dataclass
class ModelOutput:
    logits: torch.Tensor
    """[B, S, V] next-token logits."""
    aux_loss: torch.Tensor
    """Scalar: the MoD router BCE loss summed over MoD layers, already times `mod.aux_loss_weight`.
    Add it to the language-model loss."""
    routing: torch.Tensor
    """[num_layers, num_tasks, 2] float: (routable tokens, routable tokens selected) per layer and task
    in this batch. Dense layers report selected == routable."""


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
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, cfg.initializer_range)
        self.gradient_checkpointing = False
        """Recompute each decoder layer in backward (torch.utils.checkpoint, non-reentrant)."""

    def forward(
        self,
        input_ids: torch.Tensor,
        task_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        routing: str | None = None,
    ) -> ModelOutput:
        """input_ids [B,S] long; task_ids [B] long (index into config.mod.tasks; required when the model
        has MoD layers); position_ids [B,S] (default 0..S-1); routing overrides config.mod.routing.

        Packed rows: position ids restart at 0 for each sample in a row (trailing padding continues the
        last sample's positions). Each sample then attends only to itself and its RoPE restarts; MoD
        capacities apply per sample (model/mod.py)."""
        cfg = self.config
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
        h = self.model.embed_tokens(input_ids)
        kinds = token_kinds(input_ids, cfg.vocab)
        routable_tbl, cap_tbl = routable_table(cfg, device), capacity_table(cfg, device)
        # One host copy per forward (task ids, documents, routable counts) sizes every MoD gather, and the
        # document mask is built here once for every layer (None when each row is one document).
        layout = row_layout(kinds, task_ids, position_ids, routable_tbl)
        if min(layout.tasks) < 0 or max(layout.tasks) >= cfg.num_tasks:
            raise ValueError(f"task_ids must lie in [0, {cfg.num_tasks}) for tasks {cfg.mod.tasks}, got {layout.tasks}")
        if position_ids is None:
            position_ids = torch.arange(S, device=device).expand(B, S)
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, h.dtype)

        aux = h.new_zeros((), dtype=torch.float32)
        stats = []
        for layer in self.model.layers:
            args = (h, cos, sin, task_ids, layout, cap_tbl, routing)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, layer_aux, layer_stats = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)
            else:
                h, layer_aux, layer_stats = layer(*args)
            aux = aux + layer_aux
            stats.append(layer_stats)
        logits = self.lm_head(self.model.norm(h))
        return ModelOutput(logits=logits, aux_loss=aux, routing=torch.stack(stats))

    # ----- helpers used by training and tests ------------------------------------------------------
    def num_parameters(self, exclude_routers: bool = False) -> int:
        return sum(p.numel() for n, p in self.named_parameters() if not (exclude_routers and "mod_router" in n))

    def routing_summary(self, routing: torch.Tensor) -> dict[str, float]:
        """Realised fraction of routable tokens kept, per MoD layer and task present in the batch:
        {"<task>/layer_<i>": selected / routable}."""
        out = {}
        for layer in self.config.mod.mod_layers():
            for t, task in enumerate(self.config.mod.tasks):
                routable, selected = routing[layer, t].tolist()
                if routable > 0:
                    out[f"{task}/layer_{layer}"] = selected / routable
        return out

    @classmethod
    def from_hf(cls, path, mod=None, **overrides) -> "UnifiedTransformer":
        from model.hf import load_hf

        return load_hf(cls, path, mod=mod, **overrides)

    def save_hf(self, path, **kwargs) -> None:
        from model.hf import save_hf

        save_hf(self, path, **kwargs)


# ----- the model as an ordered list of pipeline layers (train/stages.py) ----------------------------------
def stage_key_to_hf(key: str, num_layers: int) -> str:
    """'0.embed_tokens.weight' -> 'model.embed_tokens.weight', '3.mlp.up_proj.weight' -> 'model.layers.2...',
    '<L+1>.norm.weight' -> 'model.norm.weight', '<L+1>.lm_head.weight' -> 'lm_head.weight'."""
    idx, rest = key.split(".", 1)
    i = int(idx)
    if i == 0:
        return f"model.{rest}"
    if i <= num_layers:
        return f"model.layers.{i - 1}.{rest}"
    return rest if rest.startswith("lm_head.") else f"model.{rest}"


def hf_key_to_stage(key: str, num_layers: int) -> str:
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
