"""Redundancy measurements of one task's calibration samples: ARank, layer cosine, MLP neuron scores.

ARank (UniMoD, after gamma-MoD): for each layer and head, the post-softmax causal attention map A
[n, n] of one sample, its diagonal set to zero, and its matrix rank; averaged over heads, then over
samples. A low rank means many tokens attend alike, i.e. the layer's token mixing is redundant. The
map is computed here from q and k (RoPE applied, GQA heads shared as SDPA shares them), because SDPA
never returns it. Sequences longer than `arank_max_tokens` are subsampled: m evenly spaced positions
(first and last included) pick rows and columns of the full map (each row's softmax still runs over
all earlier keys), i.e. the rank of a principal m x m submatrix. `arank_ratio` is rank / m, the
sequence-length-normalised ARank the planner turns into a capacity.

Layer importance (He et al.): mean over real (non-pad) tokens of the cosine similarity between a
layer's input and output hidden states, for the whole block (x_in vs x_out), attention only (x_in vs
x_in + attn) and MLP only (x_mid vs x_mid + mlp). 1 = the layer changes nothing = most redundant.

MLP width importance of neuron j: mean over real tokens of |h_j| times ||W_down[:, j]||_2, h the
SwiGLU activation (the input of down_proj).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from analysis.runner import LayerTrace, run_hidden
from analysis.samples import Batch
from model.layers import apply_rope
from model.transformer import UnifiedTransformer


def subsample_positions(n: int, max_tokens: int) -> torch.Tensor:
    """All n positions if n <= max_tokens, else max_tokens evenly spaced ones (first and last kept)."""
    if n <= max_tokens:
        return torch.arange(n)
    return torch.linspace(0, n - 1, max_tokens).round().long().unique()


def attention_probs(attn, attn_in_SD: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor,
                    rows: torch.Tensor) -> torch.Tensor:
    """Post-softmax causal attention of one sequence for query positions `rows`: [H, m, S] fp32.

    `attn` is a `model.layers.Attention`; `attn_in_SD` its input (after input_layernorm)."""
    S = attn_in_SD.shape[0]
    H, KV, hd = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rows = rows.to(attn_in_SD.device)
    q = attn.q_proj(attn_in_SD[rows]).view(-1, H, hd).transpose(0, 1)[None]  # [1, H, m, hd]
    k = attn.k_proj(attn_in_SD).view(S, KV, hd).transpose(0, 1)[None]         # [1, KV, S, hd]
    q = apply_rope(q, cos_Sd[rows][None], sin_Sd[rows][None])[0].float()
    k = apply_rope(k, cos_Sd[None], sin_Sd[None])[0].float()
    k = k.repeat_interleave(H // KV, dim=0)  # query head h reads kv head h // (H / KV), as SDPA's enable_gqa
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)  # [H, m, S]
    future = torch.arange(S, device=rows.device)[None, :] > rows[:, None]
    return scores.masked_fill(future[None], float("-inf")).softmax(-1)


def arank(probs_Hmm: torch.Tensor, rtol: float | None = None) -> torch.Tensor:
    """Rank of each head's square attention map with its diagonal zeroed: [H] (float)."""
    m = probs_Hmm.shape[-1]
    a = probs_Hmm.float() * (1 - torch.eye(m, device=probs_Hmm.device))
    return torch.linalg.matrix_rank(a, rtol=rtol).float()


@dataclass
class TaskMeasurements:
    """One task's per-layer measurements, averaged over its calibration samples / tokens."""

    arank: list[float]
    """[L] mean ARank (heads, then samples)."""
    arank_ratio: list[float]
    """[L] mean of ARank / m per sample (m = positions in the map, after subsampling)."""
    arank_tokens: float
    """Mean m: positions per attention map after subsampling."""
    cos_block: list[float]
    cos_attn: list[float]
    cos_mlp: list[float]
    """[L] mean cosine(input, output) over real tokens, per granularity."""
    neuron_score: torch.Tensor
    """[L, F] mean|h_j| * ||W_down[:, j]||_2."""
    samples: int
    tokens: int
    mean_len: float


class _Accumulator:
    """Observer that sums every measurement over the calibration batches of one task."""

    def __init__(self, net: UnifiedTransformer, max_tokens: int, rtol: float | None) -> None:
        L, Fn = net.config.num_hidden_layers, net.config.intermediate_size
        self.net, self.max_tokens, self.rtol = net, max_tokens, rtol
        self.rank_sum, self.ratio_sum = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64)
        self.cos_sum = torch.zeros(3, L, dtype=torch.float64)
        self.act_sum = torch.zeros(L, Fn, dtype=torch.float64)
        self.m_sum, self.samples, self.tokens = 0.0, 0, 0
        self.lengths: torch.Tensor | None = None

    def __call__(self, t: LayerTrace) -> None:
        lengths = self.lengths
        valid = torch.arange(t.x_in.shape[1], device=lengths.device)[None, :] < lengths[:, None]  # [B, S]
        pairs = ((t.x_in, t.x_out), (t.x_in, t.h_mid), (t.h_mid, t.x_out))
        for g, (a, b) in enumerate(pairs):
            self.cos_sum[g, t.layer] += F.cosine_similarity(a[valid].float(), b[valid].float(), dim=-1).sum().item()
        self.act_sum[t.layer] += t.act[valid].float().abs().sum(0).double().cpu()
        attn = self.net.model.layers[t.layer].self_attn
        for b, n in enumerate(lengths.tolist()):
            rows = subsample_positions(n, self.max_tokens)
            probs = attention_probs(attn, t.attn_in[b, :n], t.cos[b, :n], t.sin[b, :n], rows)
            ranks = arank(probs[:, :, rows.to(probs.device)], self.rtol)
            self.rank_sum[t.layer] += ranks.mean().item()
            self.ratio_sum[t.layer] += ranks.mean().item() / len(rows)
            if t.layer == 0:
                self.m_sum += len(rows)


def measure_task(net: UnifiedTransformer, batches: list[Batch], max_tokens: int = 256,
                 rtol: float | None = None) -> TaskMeasurements:
    """ARank, cosine importance and MLP neuron scores of one task's calibration batches."""
    acc = _Accumulator(net, max_tokens, rtol)
    with torch.inference_mode():
        for batch in batches:
            acc.lengths = batch.lengths
            run_hidden(net, batch.input_ids, observer=acc, want_act=True)
            acc.samples += int(batch.lengths.numel())
            acc.tokens += int(batch.lengths.sum())
    if acc.samples == 0:
        raise ValueError("measure_task needs at least one calibration sample")
    n, tok = acc.samples, acc.tokens
    return TaskMeasurements(
        arank=(acc.rank_sum / n).tolist(), arank_ratio=(acc.ratio_sum / n).tolist(), arank_tokens=acc.m_sum / n,
        cos_block=(acc.cos_sum[0] / tok).tolist(), cos_attn=(acc.cos_sum[1] / tok).tolist(),
        cos_mlp=(acc.cos_sum[2] / tok).tolist(),
        neuron_score=_neuron_score(acc.act_sum, tok, net),
        samples=n, tokens=tok, mean_len=tok / n,
    )


def _neuron_score(act_sum_LF: torch.Tensor, tokens: int, net: UnifiedTransformer) -> torch.Tensor:
    """[L, F] mean|h_j| * ||W_down[:, j]||_2 from the summed |h_j| over `tokens` real tokens."""
    down_norm = torch.stack([layer.mlp.down_proj.weight.float().norm(dim=0).cpu() for layer in net.model.layers])
    return (act_sum_LF / max(tokens, 1)).float() * down_norm


def neuron_scores(net: UnifiedTransformer, batches: list[Batch]) -> torch.Tensor:
    """[L, F] MLP neuron scores (mean|h_j| * ||W_down[:, j]||_2 over the batches' real tokens) of a dense model,
    without the rest of `measure_task` (ARank and cosines cost far more than one forward)."""
    L, Fn = net.config.num_hidden_layers, net.config.intermediate_size
    act_sum, tokens = torch.zeros(L, Fn, dtype=torch.float64), 0

    def observe(t: LayerTrace) -> None:
        valid = torch.arange(t.x_in.shape[1], device=lengths.device)[None, :] < lengths[:, None]
        act_sum[t.layer] += t.act[valid].float().abs().sum(0).double().cpu()

    with torch.inference_mode():
        for batch in batches:
            lengths = batch.lengths
            run_hidden(net, batch.input_ids, observer=observe, want_act=True)
            tokens += int(lengths.sum())
    if tokens == 0:
        raise ValueError("neuron_scores needs at least one calibration token")
    return _neuron_score(act_sum, tokens, net)


def combine_task_scores(scores: list[torch.Tensor]) -> torch.Tensor:
    """One [L, F] importance from per-task [L, F] neuron scores: each normalised to sum 1 per layer, then
    averaged over tasks, so no task dominates by the scale of its activations (the order that splits a dense
    MLP into experts serving every task)."""
    if not scores:
        raise ValueError("combine_task_scores needs the scores of at least one task")
    return torch.stack([s / s.sum(1, keepdim=True).clamp_min(1e-30) for s in scores]).mean(0)
