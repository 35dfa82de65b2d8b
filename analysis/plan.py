"""The MoD plan (UniMoD's layer switch) from measured redundancy, in exactly the model's `mod:` schema.

Two planners; `measure` in the analysis config picks one and the plan file records which, with its
parameters and per-layer numbers:

token_skip (default): a FLOPs budget spent where the loss cost is lowest. Per planned task t, the
  measured curves delta_t[l][c] (analysis/token_skip.py: the loss increase when layer l keeps a fraction c
  of t's routable tokens) are made non-increasing in c, and a greedy allocation starts from the dense
  model and repeatedly lowers the capacity of the layer whose next step costs the least loss per forward
  FLOP saved (ties: the bigger saving, then the deeper layer), until the task's forward FLOPs are `flops_target` below dense
  (or no step is left). Capacities are grid values, so they are what was measured, never interpolated.
  This needs no tolerance, and the number of MoD layers follows from the data rather than a rule.

arank: UniMoD's rule as published. Per planned task the round(mod_fraction * L) layers with the lowest
  ARank ratio (ties: the deeper layer first), each with capacity = its ARank ratio (ARank / positions in
  the map) clipped to [capacity_min, capacity_max] and rounded up to 0.01. ARank is a numerical rank: a
  causal softmax map with its diagonal zeroed has rank n-1 exactly, so the ratio is set by the rank's
  relative tolerance (`rank_rtol`, recorded), and at small scale it lands far from the paper's 0.2.

Capacity is a fraction of each sample's routable tokens (model/mod.py: non-routable tokens are always
kept on top of it), so neither planner needs a correction for the prompt or structural tokens. A layer
routed for several tasks is a shared MoD layer, one routed for only t a t-MoD layer.

The written file `mod_plan.yaml` is `{model: {mod: {...}}, plan: {...}}`: a run config names it as
`model.mod_plan` (read back by `model.config.read_mod_plan`, which takes `model.mod` and leaves the `plan:`
record alone), and `set_mod.txt` holds the same plan as one `model.mod={...}` override for
`python train/main.py --config X.yaml --set "$(cat set_mod.txt)"`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import yaml

from analysis.config import AnalysisConfig
from data.files import atomic_write
from model.config import ModelConfig, MoDConfig, VocabLayout

_ROUTABLE_IDS = {"image": ("image",), "text": ("text",), "all": ("text", "image")}


def nonroutable_fraction(ids: np.ndarray, routable: str, layout: VocabLayout) -> float:
    """Fraction of a sample's tokens that a task with routable kind `routable` never skips."""
    ids = np.asarray(ids)
    is_text = ids < layout.text_size
    is_image = (ids >= layout.visual_start) & (ids < layout.visual_end)
    may_skip = np.zeros(len(ids), dtype=bool)
    for kind in _ROUTABLE_IDS[routable]:
        may_skip |= is_text if kind == "text" else is_image
    return float(1.0 - may_skip.mean())


def _ceil_cent(x: float) -> float:
    # Round capacities up to 0.01: never below what was measured, and readable in YAML.
    return math.ceil(x * 100 - 1e-9) / 100


def plan_arank(arank_ratio: Mapping[str, list[float]], source_mod: Mapping[str, Any],
               cfg: AnalysisConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (the `mod:` mapping, per-task details for the report).

    `arank_ratio[task]` is [L]; `source_mod` the checkpoint's mod section (its tasks, routable kinds and
    routing settings are kept)."""
    tasks = list(source_mod["tasks"])
    planned = _planned_tasks(tasks, arank_ratio, cfg)
    capacity: dict[int, dict[str, float]] = {}
    details: dict[str, Any] = {}
    for task in planned:
        ratio = arank_ratio[task]
        L = len(ratio)
        n_mod = min(L, max(1, round(cfg.mod_fraction * L)))
        chosen = sorted(sorted(range(L), key=lambda i: (ratio[i], -i))[:n_mod])
        per_layer = {}
        for layer in chosen:
            cap = _ceil_cent(min(max(ratio[layer], cfg.capacity_min), cfg.capacity_max))
            per_layer[layer] = cap
            capacity.setdefault(layer, {})[task] = cap
        details[task] = {"mod_layers": sorted(per_layer), "capacity": {str(k): v for k, v in per_layer.items()},
                         "lowest_arank_layers": chosen}
    return _mod_section(tasks, capacity, source_mod), details


def _envelope(curve: list[float]) -> list[float]:
    """Non-increasing in capacity and >= 0: a measured bump (noise) never makes a lower capacity look cheaper."""
    out, running = [0.0] * len(curve), 0.0
    for j in range(len(curve) - 1, -1, -1):
        running = max(running, curve[j], 0.0)
        out[j] = running
    return out


def budget_capacities(delta: list[list[float]], saved: list[list[float]], grid: list[float],
                      target: float) -> tuple[list[float], float]:
    """-> (capacity per layer, forward-FLOPs fraction saved) of one task.

    `delta[l][j]` is the loss increase of layer l at capacity grid[j], `saved[l][j]` the fraction of the
    task's dense forward FLOPs that capacity saves in that layer (layers add up: each layer's FLOPs depend
    only on its own capacity). Greedy: from capacity 1 everywhere, take the move (any layer to any lower grid
    capacity) with the least loss increase per FLOP saved (ties: the larger saving, then the deeper layer) until
    `target` is reached or no move saves more."""
    L, G = len(delta), len(grid)
    cost = [_envelope(list(row)) + [0.0] for row in delta]  # index G = capacity 1, the dense layer
    gain = [list(row) + [0.0] for row in saved]
    cur, total = [G] * L, 0.0
    while total < target - 1e-12:
        best = None
        for layer in range(L):
            for j in range(cur[layer]):
                d_gain = gain[layer][j] - gain[layer][cur[layer]]
                if d_gain <= 0:
                    continue
                # Least loss per FLOP; at equal price the bigger saving (a free layer goes all the way down),
                # then the deeper layer.
                key = ((cost[layer][j] - cost[layer][cur[layer]]) / d_gain, -d_gain, -layer)
                if best is None or key < best[0]:
                    best = (key, layer, j)
        if best is None:
            break
        _, layer, j = best
        total += gain[layer][j] - gain[layer][cur[layer]]
        cur[layer] = j
    return [1.0 if j == G else grid[j] for j in cur], total


def _mean_sample(task: str, length: float, routable_fraction: float) -> tuple[int, dict[str, int]]:
    """(S, {task: routable tokens}) of a sample of the task's mean length and routable fraction."""
    S = max(1, round(length))
    return S, {task: min(S, round(routable_fraction * S))}


def layer_savings(model_cfg: ModelConfig, task: str, seq_len: float, routable_fraction: float,
                  grid: list[float]) -> list[list[float]]:
    """[L][len(grid)]: fraction of one mean `task` sample's dense forward FLOPs (causal attention, head
    included) saved when only layer l is a MoD layer at capacity grid[j] (its router's cost included)."""
    from model.flops import flops_forward

    S, routable = _mean_sample(task, seq_len, routable_fraction)
    dense = model_cfg.replace(mod={"capacity": {}})
    base = flops_forward(dense, S, [task], routable=routable, causal_attention=True).total
    out = []
    for layer in range(model_cfg.num_hidden_layers):
        row = []
        for c in grid:
            planned = model_cfg.replace(mod={"capacity": {str(layer): {task: c}}})
            row.append(1 - flops_forward(planned, S, [task], routable=routable, causal_attention=True).total / base)
        out.append(row)
    return out


def plan_token_skip(curves: Mapping[str, list[list[float]]], savings: Mapping[str, list[list[float]]],
                    source_mod: Mapping[str, Any], cfg: AnalysisConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (the `mod:` mapping, per-task details). `curves[task]` is token_skip_curves' delta [L][1 + G]
    (capacity 0 first, then `cfg.capacity_grid`), `savings[task]` layer_savings' [L][G]."""
    tasks = list(source_mod["tasks"])
    planned = _planned_tasks(tasks, curves, cfg)
    capacity: dict[int, dict[str, float]] = {}
    details: dict[str, Any] = {}
    for task in planned:
        caps, saved = budget_capacities([row[1:] for row in curves[task]], savings[task], cfg.capacity_grid,
                                        cfg.flops_target)
        routed = {layer: c for layer, c in enumerate(caps) if c < 1.0}
        for layer, c in routed.items():
            capacity.setdefault(layer, {})[task] = c
        details[task] = {"mod_layers": sorted(routed), "capacity": {str(k): v for k, v in routed.items()},
                         "forward_flops_saved": saved, "target_reached": saved >= cfg.flops_target - 1e-12}
    return _mod_section(tasks, capacity, source_mod), details


def _planned_tasks(tasks: list[str], measured: Mapping[str, Any], cfg: AnalysisConfig) -> list[str]:
    planned = list(cfg.plan_tasks) if cfg.plan_tasks is not None else [t for t in tasks if t in measured]
    for task in planned:
        if task not in tasks or task not in measured:
            raise ValueError(f"analysis.plan_tasks: task {task!r} was not analysed (model tasks {tasks}, "
                             f"analysed {sorted(measured)})")
    return planned


def _mod_section(tasks: list[str], capacity: dict[int, dict[str, float]], source_mod: Mapping[str, Any]) -> dict:
    mod = {
        "tasks": tasks,
        "capacity": {str(layer): dict(sorted(per.items(), key=lambda kv: tasks.index(kv[0])))
                     for layer, per in sorted(capacity.items())},
        "routable": dict(source_mod.get("routable") or {}),
        "aux_loss_weight": float(source_mod.get("aux_loss_weight", MoDConfig.aux_loss_weight)),
        "routing": source_mod.get("routing", "topk"),
    }
    MoDConfig(**mod)  # the plan must be one the model accepts; raises ValueError naming the field
    return mod


def plan_stability(plans: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per task: the MoD layers each plan (e.g. the full calibration set's and each half's) picks, and the
    smallest Jaccard overlap of any two of them (1 = all pick the same layers; two empty sets count as 1)."""
    names = list(plans)
    tasks = sorted({t for p in plans.values() for t in p})
    out: dict[str, Any] = {}
    for task in tasks:
        layers = {n: set(plans[n].get(task, {}).get("mod_layers", [])) for n in names}
        overlaps = [len(a & b) / len(a | b) if a | b else 1.0
                    for i, a in enumerate(layers.values()) for b in list(layers.values())[i + 1:]]
        out[task] = {**{n: sorted(v) for n, v in layers.items()}, "jaccard": min(overlaps, default=1.0),
                     "capacity": {n: plans[n].get(task, {}).get("capacity", {}) for n in names}}
    return out


def write_plan(out_dir: str | Path, mod: Mapping[str, Any], header: str,
               record: Mapping[str, Any] | None = None) -> tuple[Path, Path]:
    """Write `mod_plan.yaml` ({model: {mod: ...}, plan: record}) and `set_mod.txt` (a --set override);
    -> paths. `record` says how the plan was made: measure, parameters, per-layer numbers, stability."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"model": {"mod": dict(mod)}}
    if record is not None:
        doc["plan"] = _plain(record)
    body = yaml.safe_dump(doc, sort_keys=False, width=120)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    plan_path = out_dir / "mod_plan.yaml"
    atomic_write(plan_path, comment + body)
    set_path = out_dir / "set_mod.txt"
    flow = yaml.safe_dump(dict(mod), default_flow_style=True, sort_keys=False, width=1 << 30).strip()
    atomic_write(set_path, f"model.mod={flow}\n")
    return plan_path, set_path


def _plain(x: Any) -> Any:
    """YAML-safe copy: numpy scalars to floats, floats rounded to 6 significant digits, tuples to lists."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(f"{float(x):.6g}")
    return x


def plan_flops(model_cfg: ModelConfig, mod: Mapping[str, Any], mean_len: Mapping[str, float],
               routable_fraction: Mapping[str, float]) -> dict[str, Any]:
    """Forward FLOPs per task of a sample of its mean calibration length and mean routable fraction,
    dense vs planned (causal attention)."""
    from model.flops import flops_forward

    planned = model_cfg.replace(mod=dict(mod))
    out = {}
    for task, length in mean_len.items():
        S, routable = _mean_sample(task, length, routable_fraction[task])
        dense = flops_forward(planned, S, [task], routable=routable, dense=True, causal_attention=True).total
        mod_f = flops_forward(planned, S, [task], routable=routable, causal_attention=True).total
        out[task] = {"seq_len": S, "routable": routable[task], "dense": dense, "planned": mod_f,
                     "saved_fraction": 1 - mod_f / dense}
    return out
