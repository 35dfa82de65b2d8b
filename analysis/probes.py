"""Training-free probes: loss when a layer is skipped, task interaction, depth/width pruning, MoE.

Every probe edits the dense model (analysis/runner.py) and measures the per-task teacher-forced loss
(mean next-token NLL over the supervised tokens that training supervises; perplexity = exp(loss)).
Which parts to remove is decided from calibration data (TRAIN split); quality is measured on
evaluation samples (VALIDATION split), except `skip_deltas`, a calibration-side importance measure.

Removed compute is the fraction of a task's dense forward FLOPs (model/flops.py, causal attention,
LM head included) at its mean evaluation length that the edit removes.

Task interaction (our definition): sequences hold one task each, so routing a layer for task A's
sequences cannot change task B's activations; the interaction lives in the shared weights. Row A,
column B of each matrix is the loss increase of task B when the model is pruned by task A's
measurements, applied to every task:
  - `blocks`: task A's `interaction_layers` most redundant blocks (highest block cosine) skipped;
  - `width`: in every MLP, the `interaction_width` fraction of neurons with the lowest task-A scores
    pruned.
The diagonal is A's own cost; an off-diagonal entry well above it says that what A finds redundant,
B needs, so those layers should be A-only MoD layers rather than shared ones.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch

from analysis.metrics import TaskMeasurements, combine_task_scores
from analysis.runner import SKIP_KINDS, Edits, mean_nll, run_hidden, sequence_nll
from analysis.samples import Batch
from model.flops import flops_forward
from model.moe import convert_mlps
from model.transformer import UnifiedTransformer

Batches = Mapping[str, list[Batch]]
Accuracy = Callable[[str], dict[str, float]]
"""task -> the evaluator's accuracy of the model as it is now (tools/evaluate.py `Evaluator.task_accuracy`)."""


@contextmanager
def weight_edits(net: UnifiedTransformer, skip: Mapping[int, str] = {},
                 mlp_keep: Mapping[int, torch.Tensor] = {}) -> Iterator[None]:
    """The model's own weights edited in place to compute what `Edits(skip, mlp_keep)` makes analysis/runner.py
    compute, so that every forward path (the evaluator's cached sampling too) runs the pruned model: a skipped
    attention gets a zero o_proj and a skipped MLP a zero down_proj (the sublayer then adds exactly 0 to the
    residual stream; a skipped block is both), a pruned neuron a zero down_proj column (its activation then
    adds exactly 0). The weights are restored on exit."""
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def zero(w: torch.Tensor, cols: torch.Tensor | None = None) -> None:
        saved.append((w, w.detach().clone()))
        with torch.no_grad():
            if cols is None:
                w.zero_()
            else:
                w[:, cols] = 0
    try:
        for i, kind in skip.items():
            layer = net.model.layers[i]
            if kind in ("block", "attn"):
                zero(layer.self_attn.o_proj.weight)
            if kind in ("block", "mlp"):
                zero(layer.mlp.down_proj.weight)
        for i, keep in mlp_keep.items():
            zero(net.model.layers[i].mlp.down_proj.weight, ~keep.to(torch.bool))
        yield
    finally:
        with torch.no_grad():
            for w, original in reversed(saved):
                w.copy_(original)


def _scored(net: UnifiedTransformer, accuracy: Accuracy | None, task: str, skip: Mapping[int, str] = {},
            mlp_keep: Mapping[int, torch.Tensor] = {}) -> dict[str, float]:
    """The evaluator's accuracy of `task` on the model pruned by the edits ({} without an evaluator)."""
    if accuracy is None:
        return {}
    with weight_edits(net, skip, mlp_keep):
        return accuracy(task)


def _quality(loss: float, base: float) -> dict[str, float]:
    return {"loss": loss, "ppl": math.exp(min(loss, 80.0)), "delta_loss": loss - base}


def redundancy_order(m: TaskMeasurements, kind: str) -> list[int]:
    """Layers from most to least redundant at granularity `kind` (highest cosine first)."""
    cos = {"block": m.cos_block, "attn": m.cos_attn, "mlp": m.cos_mlp}[kind]
    return sorted(range(len(cos)), key=lambda i: (-cos[i], i))


def width_masks(scores_LF: torch.Tensor, fraction: float, device) -> dict[int, torch.Tensor]:
    """Per layer, keep all but the floor(fraction * F) neurons with the lowest scores."""
    L, Fn = scores_LF.shape
    n_drop = int(fraction * Fn)
    masks = {}
    for layer in range(L):
        keep = torch.ones(Fn, dtype=torch.bool)
        keep[torch.sort(scores_LF[layer], stable=True).indices[:n_drop]] = False
        masks[layer] = keep.to(device)
    return masks


class ComputeModel:
    """Per-task dense forward FLOPs split by layer part, to express an edit as removed compute."""

    def __init__(self, net: UnifiedTransformer, mean_len: Mapping[str, float]) -> None:
        cfg, L = net.config, net.config.num_hidden_layers
        self.num_layers = L
        self.parts = {}
        for task, length in mean_len.items():
            f = flops_forward(cfg, max(1, round(length)), [0], dense=True, causal_attention=True)
            self.parts[task] = {"attn": (f.attn_proj + f.attn_sdpa) / L, "mlp": f.mlp / L, "total": f.total}

    def removed(self, task: str, skip: Mapping[int, str] = {}, mlp_fraction: float = 0.0) -> float:
        """Fraction of `task`'s forward FLOPs removed by skipping `skip` and pruning `mlp_fraction`
        of the neurons of every MLP."""
        p = self.parts[task]
        flops = sum(p["attn"] * (kind in ("block", "attn")) + p["mlp"] * (kind in ("block", "mlp"))
                    for kind in skip.values())
        return (flops + mlp_fraction * p["mlp"] * self.num_layers) / p["total"]


def skip_deltas(net: UnifiedTransformer, calib: Batches, base: Mapping[str, float]) -> dict[str, dict[str, list[float]]]:
    """Loss increase per task when each layer's block / attention / MLP alone is skipped: [task][kind][L].

    Sweeps the layers in order keeping each batch's input of the current layer, so skipping layer i
    recomputes only layers i..L-1 (half the work of L full forwards), holding one layer's hidden
    states of the calibration set at a time."""
    L = net.config.num_hidden_layers
    out: dict[str, dict[str, list[float]]] = {}
    with torch.inference_mode():
        for task, batches in calib.items():
            xs = [net.model.embed_tokens(b.input_ids) for b in batches]  # input of layer i, per batch
            out[task] = {kind: [] for kind in SKIP_KINDS}
            for i in range(L):
                for kind in SKIP_KINDS:
                    total, count = 0.0, 0
                    for b, x in zip(batches, xs):
                        nll, n = sequence_nll(net, b, Edits(skip={i: kind}), start=i, x=x)
                        total, count = total + float(nll.sum()), count + int(n.sum())
                    out[task][kind].append(total / max(count, 1) - base[task])
                xs = [run_hidden(net, b.input_ids, start=i, stop=i + 1, x=x) for b, x in zip(batches, xs)]
    return out


def depth_pruning(net: UnifiedTransformer, measures: Mapping[str, TaskMeasurements], evals: Batches,
                  base: Mapping[str, float], compute: ComputeModel, max_layers: int,
                  accuracy: Accuracy | None = None) -> dict[str, Any]:
    """Per task and granularity: drop its n most redundant parts, n = 1..max_layers. With `accuracy`, each row
    also holds the evaluator's accuracy of that task on the pruned model."""
    out: dict[str, Any] = {}
    for task, batches in evals.items():
        out[task] = {}
        for kind in SKIP_KINDS:
            order = redundancy_order(measures[task], kind)
            rows = []
            for n in range(1, max_layers + 1):
                skip = {i: kind for i in order[:n]}
                loss = mean_nll(net, batches, Edits(skip=skip))
                rows.append({"n": n, "layers": sorted(skip), "removed_compute": compute.removed(task, skip),
                             **_quality(loss, base[task]), **_scored(net, accuracy, task, skip=skip)})
            out[task][kind] = rows
    return out


def width_pruning(net: UnifiedTransformer, measures: Mapping[str, TaskMeasurements], evals: Batches,
                  base: Mapping[str, float], compute: ComputeModel, fractions: list[float],
                  accuracy: Accuracy | None = None) -> dict[str, Any]:
    """Per task: prune each fraction of every MLP's neurons by that task's scores (with `accuracy`, also the
    evaluator's accuracy of the task on the pruned model)."""
    device = net.lm_head.weight.device
    out: dict[str, Any] = {}
    for task, batches in evals.items():
        rows = []
        for frac in fractions:
            masks = width_masks(measures[task].neuron_score, frac, device)
            loss = mean_nll(net, batches, Edits(mlp_keep=masks))
            kept = float(torch.stack(list(masks.values())).float().mean())
            rows.append({"fraction": frac, "removed_compute": compute.removed(task, mlp_fraction=1 - kept),
                         **_quality(loss, base[task]), **_scored(net, accuracy, task, mlp_keep=masks)})
        out[task] = rows
    return out


def interaction(net: UnifiedTransformer, measures: Mapping[str, TaskMeasurements], evals: Batches,
                base: Mapping[str, float], n_layers: int, width: float) -> dict[str, Any]:
    """`blocks[A][B]` and `width[A][B]`: task B's loss increase when pruned by task A's measurements."""
    device = net.lm_head.weight.device
    blocks: dict[str, dict[str, float]] = {}
    widths: dict[str, dict[str, float]] = {}
    chosen: dict[str, list[int]] = {}
    for a in measures:
        skip = {i: "block" for i in redundancy_order(measures[a], "block")[:n_layers]}
        chosen[a] = sorted(skip)
        masks = width_masks(measures[a].neuron_score, width, device)
        blocks[a] = {b: mean_nll(net, evals[b], Edits(skip=skip)) - base[b] for b in evals}
        widths[a] = {b: mean_nll(net, evals[b], Edits(mlp_keep=masks)) - base[b] for b in evals}
    return {"blocks": blocks, "width": widths, "blocks_skipped": chosen, "n_layers": n_layers,
            "width_fraction": width}


def moe_probe(net: UnifiedTransformer, measures: Mapping[str, TaskMeasurements], evals: Batches,
              base: Mapping[str, float], num_experts: int, top_ks: list[int], layers: list[int],
              accuracy: Accuracy | None = None) -> dict[str, Any]:
    """Convert the chosen MLPs to MoE (snake partition by neuron score, zero router) and measure each
    task's loss at each top-k, without training. The dense MLPs are put back afterwards.

    Importance for the partition: each task's neuron scores normalised to sum 1 per layer, averaged
    over tasks, so no task dominates by scale. With the router at zero every token picks the same
    experts, so top-k < E here is a fixed-subset baseline that router training improves on (bench/moe_adaptation.py
    trains it). With `accuracy`, each row also holds the evaluator's accuracy of the task on the converted model."""
    Fn = net.config.intermediate_size
    if num_experts > Fn:
        raise ValueError(f"analysis.moe_experts = {num_experts} exceeds the MLP width {Fn}")
    scores = combine_task_scores([m.neuron_score for m in measures.values()])  # [L, F]
    originals = {i: net.model.layers[i].mlp for i in layers}
    out: dict[str, Any] = {"num_experts": num_experts, "layers": layers, "results": {t: [] for t in evals}}
    try:
        moes = convert_mlps(net, {i: scores[i] for i in layers}, num_experts, top_k=num_experts)
        for k in top_ks:
            for moe in moes.values():
                moe.top_k = k
            for task, batches in evals.items():
                loss = mean_nll(net, batches)
                out["results"][task].append({"top_k": k, "active_mlp_fraction": k / num_experts,
                                             **_quality(loss, base[task]), **_scored(net, accuracy, task)})
    finally:
        for i, mlp in originals.items():
            net.model.layers[i].mlp = mlp
    return out
