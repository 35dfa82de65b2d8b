"""A dense forward pass of `UnifiedTransformer` that can be edited and watched, layer by layer.

Edits (what the pruning probes remove, all training-free):
  - skip a whole block (its output is its input), its attention sublayer or its MLP sublayer;
  - prune MLP neurons: neuron j's SwiGLU activation h_j is zeroed, which is exactly what deleting row j
    of gate/up and column j of down would compute.
An observer sees each layer's tensors (`LayerTrace`) so the metrics need no second implementation of
the block. Without edits the result equals `UnifiedTransformer.forward` on a dense model (tested).

Losses are computed only at supervised positions: the LM head (D x V, the largest matmul for Emu3's
184k vocabulary) never runs on the prompt or padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from analysis.samples import Batch
from model.layers import rope_cos_sin
from model.loss import causal_lm_nll_per_row
from model.transformer import UnifiedTransformer

SKIP_KINDS = ("block", "attn", "mlp")


@dataclass
class Edits:
    skip: dict[int, str] = field(default_factory=dict)
    """Layer -> "block" | "attn" | "mlp": the part of that layer replaced by the identity."""
    mlp_keep: dict[int, torch.Tensor] = field(default_factory=dict)
    """Layer -> bool [F]: MLP neurons kept (False = pruned)."""

    def __post_init__(self) -> None:
        for layer, kind in self.skip.items():
            if kind not in SKIP_KINDS:
                raise ValueError(f"Edits.skip[{layer}] must be one of {SKIP_KINDS}, got {kind!r}")


@dataclass
class LayerTrace:
    """One layer's tensors in one forward (B x S x D unless noted), handed to an observer."""

    layer: int
    x_in: torch.Tensor
    """Block input (residual stream before the layer)."""
    attn_in: torch.Tensor
    """input_layernorm(x_in): what q/k/v are projected from."""
    h_mid: torch.Tensor
    """Residual stream after attention, before the MLP."""
    act: torch.Tensor | None
    """SwiGLU activation [B, S, F] (input of down_proj); None when not requested."""
    x_out: torch.Tensor
    """Block output."""
    cos: torch.Tensor
    sin: torch.Tensor
    """RoPE tables [B, S, head_dim] of this forward."""


Observer = Callable[[LayerTrace], None]


def _mlp(layer, m_in: torch.Tensor, keep: torch.Tensor | None, want_act: bool):
    mlp = layer.mlp
    if keep is None and not want_act:
        return mlp(m_in), None  # the module itself (also a converted MoEMLP)
    act = F.silu(mlp.gate_proj(m_in)) * mlp.up_proj(m_in)
    if keep is not None:
        act = act * keep.to(act.dtype)
    return mlp.down_proj(act), act


def run_hidden(net: UnifiedTransformer, input_ids: torch.Tensor, edits: Edits | None = None,
               observer: Observer | None = None, want_act: bool = False, start: int = 0,
               stop: int | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
    """[B, S] ids -> [B, S, D] hidden states after layers [start, stop) (default: all, before the final
    norm), dense, with `edits`. `x` is the input of layer `start` (default: the embeddings; required
    when start > 0), which lets a caller reuse a prefix it has already computed."""
    cfg = net.config
    edits = edits or Edits()
    B, S = input_ids.shape
    positions = torch.arange(S, device=input_ids.device).expand(B, S)
    if x is None:
        if start:
            raise ValueError("run_hidden: x (the input of layer `start`) is required when start > 0")
        x = net.model.embed_tokens(input_ids)
    cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
    layers = net.model.layers
    for i in range(start, len(layers) if stop is None else stop):
        layer = layers[i]
        skip = edits.skip.get(i)
        if skip == "block" and observer is None:
            continue
        attn_in = layer.input_layernorm(x)
        h = x if skip == "attn" else x + layer.self_attn(attn_in, cos, sin)
        act = None
        if skip == "mlp":
            out = h
        else:
            y, act = _mlp(layer, layer.post_attention_layernorm(h), edits.mlp_keep.get(i), want_act)
            out = h + y
        if skip == "block":
            out = x
        if observer is not None:
            observer(LayerTrace(i, x, attn_in, h, act, out, cos, sin))
        x = out
    return x


def sequence_nll(net: UnifiedTransformer, batch: Batch, edits: Edits | None = None, start: int = 0,
                 x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token NLL summed per row [B] (fp32) and supervised tokens per row [B], as training's loss
    counts them (labels aligned with inputs, shifted by one). `start`/`x` as in `run_hidden`."""
    h = run_hidden(net, batch.input_ids, edits, start=start, x=x)
    return causal_lm_nll_per_row(h, batch.labels, lambda x: net.lm_head(net.model.norm(x)))


def mean_nll(net: UnifiedTransformer, batches: list[Batch], edits: Edits | None = None) -> float:
    """Token-weighted mean next-token NLL over all supervised tokens of `batches`."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            nll, n = sequence_nll(net, batch, edits)
            total += float(nll.sum())
            count += int(n.sum())
    if count == 0:
        raise ValueError("no supervised token in these samples: their labels are all -100")
    return total / count
