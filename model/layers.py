"""Llama/Emu3 decoder building blocks with HF Emu3 parameter names.

RMSNorm, rotary position embedding, grouped-query attention through
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU), SwiGLU MLP,
and the decoder block.

Packed rows: several samples (documents) may share a row. Their boundaries are defined only by the
position ids (`document_ids`): positions restart at 0 for each sample, so RoPE restarts too, and
attention is causal *and* same-document (`document_mask`). A batch whose rows each hold one document
keeps the unmasked `is_causal` path. Module names (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...) are
the checkpoint format of transformers' `Emu3ForCausalLM`, so state dicts load without renaming.
The math follows transformers' modeling_emu3 (fp32 RMSNorm statistics, rotate-half RoPE) so logits match
to float precision; HF's residual dropout is left out (Emu3 fine-tuning runs it as a no-op).

Weights are initialised inside each leaf module's own `__init__` (normal(0, std)), which is what
`deepspeed.zero.Init` needs: it partitions a module's parameters right after that module is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig


class Linear(nn.Linear):
    """Bias-free Linear initialised with normal(0, std) (HF Emu3's `_init_weights`)."""

    def __init__(self, in_features: int, out_features: int, std: float) -> None:
        self.init_std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)


class Embedding(nn.Embedding):
    def __init__(self, num_embeddings: int, embedding_dim: int, std: float) -> None:
        self.init_std = std
        super().__init__(num_embeddings, embedding_dim)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 even under bf16: the mean of squares overflows/underflows otherwise.
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables [B, S, head_dim] for absolute positions; computed in fp32, cast to `dtype`.

    Computed per forward from the positions (no buffer), so the model builds on the meta device and
    under ZeRO-3 without a buffer to materialise, and MoD layers can gather rows for kept tokens.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, S, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[B,S] position ids -> [B,S] long document index within the row (0,0,0,1,1,2,...).

    A new document starts at t=0 and wherever position_ids[b,t] != position_ids[b,t-1] + 1; trailing
    padding continues the last sample's positions, so it belongs to that sample. The one definition of a
    document boundary, used by the model, the pipeline stages and the FLOPs model."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(1) - 1


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B,S] document ids (non-decreasing along the row, or any ids for gathered tokens in row order) ->
    [B,1,S,S] bool SDPA mask, True = may attend: key at or before the query and in the same document.

    SDPA with this bool mask, not FlexAttention: torch 2.13 has no FlexAttention backward on CPU
    (NotImplementedError, eager and compiled), and SDPA with a bool mask still runs the CPU flash kernel
    (`_scaled_dot_product_flash_attention_for_cpu`, counted by FlopCounterMode), measured at demo shapes
    (hidden 256, 8/4 heads, fwd+bwd, 1 thread) within noise of `is_causal` (B=16,S=128: 23.1 vs 23.2 ms;
    B=8,S=512: 165 vs 161 ms)."""
    S = doc_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal[None] & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHSd: torch.Tensor, cos_BSd: torch.Tensor, sin_BSd: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BSd.unsqueeze(1), sin_BSd.unsqueeze(1)
    return x_BHSd * cos + _rotate_half(x_BHSd) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hd, std = cfg.hidden_size, cfg.head_dim, cfg.initializer_range
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = Linear(d, self.num_heads * hd, std)
        self.k_proj = Linear(d, self.num_kv_heads * hd, std)
        self.v_proj = Linear(d, self.num_kv_heads * hd, std)
        self.o_proj = Linear(self.num_heads * hd, d, std)

    def forward(
        self,
        x_BSD: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal self-attention. `attn_mask` (bool [B,1,S,S], True = may attend) replaces the plain
        causal mask when some keys must be hidden (packed documents, MoD's causal-routing path)."""
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.num_kv_heads != self.num_heads
        if attn_mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.initializer_range
        self.gate_proj = Linear(d, f, std)
        self.up_proj = Linear(d, f, std)
        self.down_proj = Linear(f, d, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.)). Returns the block's output
    (residual included), like HF's decoder layer."""

    def __init__(self, cfg: ModelConfig, mlp: nn.Module | None = None) -> None:
        """`mlp` replaces the dense SwiGLU MLP (an MoE layer's experts), so no dense one is built and dropped."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg) if mlp is None else mlp

    def block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn_mask: torch.Tensor | None = None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        return h + self.mlp(self.post_attention_layernorm(h))
