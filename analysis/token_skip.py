"""Token-skip curves: what one task loses when a layer processes only a fraction of its routable tokens.

For task t, layer l and capacity c, the layer runs as a MoD layer would on every calibration sample: all
non-routable tokens plus `routable_kept(c, n_routable)` of the sample's routable ones go through it, the
others ride the residual stream, and a skipped token is invisible to attention in that layer (it is
hidden as a key, as model/mod.py's gathered attention hides it). Every other layer stays dense. The
measure is the increase of the task's mean next-token loss over the dense model (nats):

    delta[l][c] = loss(layer l at capacity c) - loss(dense)         c in the grid, plus 0 (skip them all)

No tolerance enters it: it is a loss difference, measured. The tokens kept are those whose update the
dense layer makes largest (||block(x) - x||), the training-free stand-in for a router. A router trained
with the layer does at least as well for the loss it is trained on, so a curve is an upper bound of what a
fine-tune loses at that capacity before it adapts; its use is to compare layers and capacities with each
other (analysis/plan.py), not to predict the fine-tuned loss.

Cost: per task, layers x (grid + 1) forward passes of the layers from l on, over the calibration
batches; the prefix up to layer l is computed once per layer.
"""

from __future__ import annotations

import torch

from analysis.runner import run_hidden
from analysis.samples import Batch
from model.layers import rope_cos_sin
from model.loss import causal_lm_nll_per_row
from model.mod import KIND_PAD, routable_table, token_kinds, topk_per_document
from model.transformer import UnifiedTransformer


def _mod_layer(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, routable: torch.Tensor,
               nonpad: torch.Tensor, score: torch.Tensor, capacity: float) -> torch.Tensor:
    """Layer `layer` on x [B,S,D] as a MoD layer keeping the top `capacity` of each row's routable tokens
    by `score` [B,S] (one sample per row; the model's own selection, model/mod.py `topk_per_document`);
    skipped tokens keep x and are hidden as keys (each query still sees itself)."""
    B, S, _ = x.shape
    cap = torch.full((B,), capacity, dtype=torch.float64, device=x.device)
    doc_ids = torch.zeros(B, S, dtype=torch.long, device=x.device)
    keep = (nonpad & ~routable) | topk_per_document(score, routable, cap, doc_ids, single_document=True)
    eye = torch.eye(S, dtype=torch.bool, device=x.device)
    mask = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()[None, None] & (keep[:, None, None, :] | eye)
    y = layer.block(x, cos, sin, mask)
    return torch.where(keep[..., None], y, x)


@torch.inference_mode()
def token_skip_curves(net: UnifiedTransformer, batches: list[Batch], task: str,
                      grid: list[float]) -> tuple[list[list[float]], float, int]:
    """-> (delta [L][len(grid) + 1]: loss increase at capacity 0 then at each grid value, dense loss,
    supervised tokens). `task` names the model's task whose routable kind applies (`mod.routable`)."""
    if not batches:
        raise ValueError(f"token_skip_curves: no {task} calibration batch")
    cfg = net.config
    t = cfg.mod.tasks.index(task)
    table = routable_table(cfg, batches[0].input_ids.device)
    L = cfg.num_hidden_layers
    capacities = [0.0, *grid]
    nll = torch.zeros(L, len(capacities), dtype=torch.float64)
    base, count = 0.0, 0
    head = lambda h: net.lm_head(net.model.norm(h))  # noqa: E731
    for batch in batches:
        ids = batch.input_ids
        B, S = ids.shape
        kinds = token_kinds(ids, cfg.vocab).long()
        routable, nonpad = table[t][kinds], kinds != KIND_PAD
        positions = torch.arange(S, device=ids.device).expand(B, S)
        x = net.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        dense_nll, n = causal_lm_nll_per_row(run_hidden(net, ids, x=x), batch.labels, head)
        base += float(dense_nll.sum())
        count += int(n.sum())
        for layer_idx, layer in enumerate(net.model.layers):
            dense_out = layer.block(x, cos, sin)
            score = (dense_out - x).float().norm(dim=-1)
            for j, c in enumerate(capacities):
                h = _mod_layer(layer, x, cos, sin, routable, nonpad, score, c)
                h = run_hidden(net, ids, start=layer_idx + 1, x=h)
                nll[layer_idx, j] += float(causal_lm_nll_per_row(h, batch.labels, head)[0].sum())
            x = dense_out  # the dense prefix, one layer on
    if count == 0:
        raise ValueError(f"token_skip_curves: no supervised token in the {task} calibration samples")
    dense = base / count
    return (nll / count - dense).tolist(), dense, count
