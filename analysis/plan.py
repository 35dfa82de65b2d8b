"""The MoD plan (UniMoD's layer switch) from measured ARank, in exactly the model's `mod:` schema.

Per planned task t (our choices where UniMoD is silent are marked):
  1. MoD layers: the round(mod_fraction * L) layers with the lowest ARank ratio for t (ties: the
     deeper layer first, since deep layers are the usual redundant ones).
  2. Capacity of such a layer: its ARank ratio (ARank / positions in the map, the "ARank normalised by
     sequence length") clipped to [capacity_min, capacity_max] and rounded up to 0.01. Capacity is a
     fraction of each sample's routable tokens (model/mod.py: non-routable tokens are always kept on top
     of it), so the ratio needs no correction for the prompt or structural tokens.
  A layer routed for several tasks is a shared MoD layer, one routed for only t a t-MoD layer.

The written file `mod_plan.yaml` is `{model: {mod: {...}}}`: a run config names it as `model.mod_plan`
(read back by `model.config.read_mod_plan`), and `set_mod.txt` holds the same plan as one
`model.mod={...}` override for `python train/main.py --config X.yaml --set "$(cat set_mod.txt)"`.
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


def plan_mod(arank_ratio: Mapping[str, list[float]], source_mod: Mapping[str, Any],
             cfg: AnalysisConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """-> (the `mod:` mapping, per-task details for the report).

    `arank_ratio[task]` is [L]; `source_mod` the checkpoint's mod section (its tasks, routable kinds and
    routing settings are kept)."""
    tasks = list(source_mod["tasks"])
    planned = list(cfg.plan_tasks) if cfg.plan_tasks is not None else [t for t in tasks if t in arank_ratio]
    capacity: dict[int, dict[str, float]] = {}
    details: dict[str, Any] = {}
    for task in planned:
        if task not in tasks or task not in arank_ratio:
            raise ValueError(f"analysis.plan_tasks: task {task!r} was not analysed (model tasks {tasks}, "
                             f"analysed {sorted(arank_ratio)})")
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
    mod = {
        "tasks": tasks,
        "capacity": {str(layer): dict(sorted(per.items(), key=lambda kv: tasks.index(kv[0])))
                     for layer, per in sorted(capacity.items())},
        "routable": dict(source_mod.get("routable") or {}),
        "aux_loss_weight": float(source_mod.get("aux_loss_weight", MoDConfig.aux_loss_weight)),
        "routing": source_mod.get("routing", "topk"),
    }
    MoDConfig(**mod)  # the plan must be one the model accepts; raises ValueError naming the field
    return mod, details


def write_plan(out_dir: str | Path, mod: Mapping[str, Any], header: str) -> tuple[Path, Path]:
    """Write `mod_plan.yaml` ({model: {mod: ...}}) and `set_mod.txt` (a --set override); -> paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    body = yaml.safe_dump({"model": {"mod": dict(mod)}}, sort_keys=False)
    comment = "".join(f"# {line}\n" for line in header.splitlines())
    plan_path = out_dir / "mod_plan.yaml"
    atomic_write(plan_path, comment + body)
    set_path = out_dir / "set_mod.txt"
    flow = yaml.safe_dump(dict(mod), default_flow_style=True, sort_keys=False, width=1 << 30).strip()
    atomic_write(set_path, f"model.mod={flow}\n")
    return plan_path, set_path


def plan_flops(model_cfg: ModelConfig, mod: Mapping[str, Any], mean_len: Mapping[str, float],
               routable_fraction: Mapping[str, float]) -> dict[str, Any]:
    """Forward FLOPs per task of a sample of its mean calibration length and mean routable fraction,
    dense vs planned (causal attention)."""
    from model.flops import flops_forward

    planned = model_cfg.replace(mod=dict(mod))
    out = {}
    for task, length in mean_len.items():
        S = max(1, round(length))
        routable = {task: min(S, round(routable_fraction[task] * S))}
        dense = flops_forward(planned, S, [task], routable=routable, dense=True, causal_attention=True).total
        mod_f = flops_forward(planned, S, [task], routable=routable, causal_attention=True).total
        out[task] = {"seq_len": S, "routable": routable[task], "dense": dense, "planned": mod_f,
                     "saved_fraction": 1 - mod_f / dense}
    return out
