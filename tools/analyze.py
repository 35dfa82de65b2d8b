"""Redundancy analysis of a checkpoint: plans the MoD layers (UniMoD's layer switch) and probes pruning.

    python -m tools.analyze --checkpoint runs/smoke/hf --data demo_data --out plans/smoke/
    python -m tools.analyze --checkpoint runs/demo --data demo_data --out plans/demo/ --calib-samples 50
    python train/main.py --config train/configs/demo.yaml --set "$(cat plans/demo/set_mod.txt)"

Per task, on `--calib-samples` samples of the TRAIN split: ARank per layer, cosine importance (block,
attention, MLP), loss increase when each part is skipped, MLP neuron scores, and the token-skip curves the
plan is made from (`--measure token_skip`, analysis/token_skip.py; `--measure arank` for UniMoD's ARank
rule), each half of the calibration set planned on its own as a stability check; task interaction and the
pruning probes are evaluated on `--eval-samples` VALIDATION samples. Writes to `--out`:

    mod_plan.yaml      {model: {mod: ...}, plan: {...}}: the plan in the model's schema (ModelConfig.from_dict
                       accepts it) and its record: measure, parameters, per-layer numbers, stability
    set_mod.txt        the same plan as one `--set model.mod={...}` override for train/main.py
    measurements.json  every measurement, its definition, and the plan's FLOPs per task
    probes.md          the pruning probes' table: per task and edit, removed compute, loss and (demo data) the
                       evaluator's understanding / generation accuracy of the edited model
    heatmaps.png, interaction.png, probes.png

`--checkpoint` is an HF directory (e.g. a run's hf/), a run directory, a checkpoints/ root or a
step_NNNNNNNN directory. Definitions: analysis/metrics.py (ARank, cosine, neuron score),
analysis/plan.py (layer choice and capacity), analysis/probes.py (skip loss, interaction, probes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from analysis import plots, probes
from analysis.checkpoint import load_dense
from analysis.config import AnalysisConfig
from analysis.metrics import measure_task
from analysis.plan import (layer_savings, nonroutable_fraction, plan_arank, plan_flops, plan_stability,
                           plan_token_skip, write_plan)
from analysis.runner import mean_nll
from analysis.samples import load_task_samples, make_batches, open_dataset
from analysis.token_skip import token_skip_curves
from data.files import atomic_write

DEFINITIONS = {
    "arank": "mean over samples of the mean over heads of rank(post-softmax causal attention map, diagonal zeroed)",
    "arank_ratio": "mean over samples of ARank / m, m = positions in the map (sequence length, or arank_max_tokens "
                   "evenly spaced positions of a longer sequence: a principal submatrix of the full map)",
    "cos_block/cos_attn/cos_mlp": "mean over real tokens of cosine(layer input, output) for the whole block, "
                                  "attention only (x vs x+attn), MLP only (h vs h+mlp); 1 = changes nothing",
    "skip_delta": "calibration loss increase when that one block / attention / MLP is replaced by the identity",
    "interaction": "blocks[A][B] / width[A][B]: validation loss increase of task B when A's most redundant blocks "
                   "are skipped / MLP neurons with A's lowest scores are pruned, for every task",
    "neuron_score": "mean over real tokens of |h_j| (SwiGLU activation) times ||W_down[:, j]||_2",
    "removed_compute": "fraction of the task's dense forward FLOPs (causal attention, LM head included) removed",
    "loss": "mean next-token NLL over the supervised tokens of the task's samples (training's labels)",
}


def run_analysis(checkpoint: str, data: str, out: str, cfg: AnalysisConfig, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, log=print) -> dict[str, Any]:
    t0 = time.perf_counter()
    loaded = load_dense(checkpoint, device, dtype)
    net, mc = loaded.net, loaded.net.config
    manifest = open_dataset(data, mc.vocab)
    cfg.check_model(mc.num_hidden_layers, mc.mod.tasks)
    available = set(manifest.shards.get("train", {}))
    missing = [t for t in (cfg.tasks or []) if t not in available]
    if missing:
        raise ValueError(f"{data}/manifest.json: field splits.train.shards has no task {missing[0]!r} (--tasks)")
    tasks = [t for t in (cfg.tasks or mc.mod.tasks) if t in available]
    if not tasks:
        raise ValueError(f"{data}/manifest.json: the train split holds none of the model's tasks {mc.mod.tasks}")
    L = mc.num_hidden_layers
    log(f"analyze: {loaded.description}; {L} layers; tasks {tasks}")

    calib, halves, evals, routable_fraction, eval_len = {}, {}, {}, {}, {}
    for task in tasks:
        samples = load_task_samples(manifest, "train", task, cfg.calib_samples)
        if len(samples) < 2:
            raise ValueError(f"{data}/manifest.json: the train split holds {len(samples)} {task} sample(s); the "
                             "plan's stability check needs at least 2 calibration samples per task (one per half)")
        # Two disjoint halves (alternate samples) for the plan's stability check.
        halves[task] = [make_batches(samples[i::2], cfg.batch_size, mc.vocab.pad_id, device) for i in (0, 1)]
        routable_fraction[task] = float(np.mean([1.0 - nonroutable_fraction(s.ids, mc.mod.routable[task], mc.vocab)
                                                 for s in samples]))
        calib[task] = make_batches(samples, cfg.batch_size, mc.vocab.pad_id, device)
        held_out = load_task_samples(manifest, "validation", task, cfg.eval_samples)
        evals[task] = make_batches(held_out, cfg.batch_size, mc.vocab.pad_id, device)
        eval_len[task] = sum(len(s.ids) for s in held_out) / len(held_out)
    log(f"analyze: samples loaded ({time.perf_counter() - t0:.1f}s)")

    measures = {t: measure_task(net, calib[t], cfg.arank_max_tokens, cfg.rank_rtol) for t in tasks}
    calib_loss = {t: mean_nll(net, calib[t]) for t in tasks}
    eval_loss = {t: mean_nll(net, evals[t]) for t in tasks}
    skip = probes.skip_deltas(net, calib, calib_loss)
    n_inter = cfg.interaction_layers or max(1, L // 4)
    inter = probes.interaction(net, measures, evals, eval_loss, min(n_inter, L), cfg.interaction_width)
    log(f"analyze: measurements done ({time.perf_counter() - t0:.1f}s)")

    mod, plan_details, record = make_plan(net, cfg, tasks, measures, halves, routable_fraction, loaded.source_mod)
    flops = plan_flops(mc, mod, {t: measures[t].mean_len for t in tasks}, routable_fraction)
    log(f"analyze: plan made by {cfg.measure} ({time.perf_counter() - t0:.1f}s)")

    report: dict[str, Any] = {
        "checkpoint": loaded.description, "data": str(data), "tasks": tasks, "num_layers": L,
        "config": {k: v for k, v in vars(cfg).items()}, "definitions": DEFINITIONS,
        "calibration": {t: {"split": "train", "samples": measures[t].samples, "tokens": measures[t].tokens,
                            "mean_len": measures[t].mean_len, "arank_positions_mean": measures[t].arank_tokens,
                            "routable_fraction": routable_fraction[t],
                            "loss": calib_loss[t]} for t in tasks},
        "evaluation": {t: {"split": "validation", "samples": sum(int(b.lengths.numel()) for b in evals[t]),
                           "mean_len": eval_len[t], "loss": eval_loss[t]} for t in tasks},
        "layers": {t: {"arank": m.arank, "arank_ratio": m.arank_ratio, "cos_block": m.cos_block,
                       "cos_attn": m.cos_attn, "cos_mlp": m.cos_mlp,
                       "skip_delta": skip[t]} for t, m in measures.items()},
        "neuron_score_summary": {t: {"per_layer_mean": m.neuron_score.mean(1).tolist(),
                                     "per_layer_max": m.neuron_score.max(1).values.tolist()}
                                 for t, m in measures.items()},
        "interaction": inter,
        "plan": {"mod": mod, "per_task": plan_details, "forward_flops": flops, "record": record},
    }
    if cfg.probes:
        compute = probes.ComputeModel(net, eval_len)
        max_layers = min(L, cfg.prune_max_layers or max(1, L // 2))
        accuracy = probe_accuracy(net, data, cfg)
        if accuracy is not None:
            for t in tasks:
                report["evaluation"][t].update(accuracy(t))
        report["probes"] = {
            "depth_pruning": probes.depth_pruning(net, measures, evals, eval_loss, compute, max_layers, accuracy),
            "width_pruning": probes.width_pruning(net, measures, evals, eval_loss, compute, cfg.width_fractions,
                                                  accuracy),
            "moe": probes.moe_probe(net, measures, evals, eval_loss, cfg.moe_experts, cfg.moe_top_k,
                                    cfg.moe_layers if cfg.moe_layers is not None else list(range(L)), accuracy),
        }
        log(f"analyze: probes done ({time.perf_counter() - t0:.1f}s)")

    out_dir = Path(out)
    rule = (f"capacities chosen greedily by the measured loss increase per forward FLOP saved until each task's "
            f"forward FLOPs are {cfg.flops_target:.0%} below dense" if cfg.measure == "token_skip" else
            f"the {cfg.mod_fraction:.0%} of layers with the lowest ARank (rtol {cfg.rank_rtol}), capacity = "
            f"ARank/length clipped to [{cfg.capacity_min}, {cfg.capacity_max}]")
    header = (f"MoD plan written by `python -m tools.analyze` from {loaded.description}\n"
              f"data {data}; tasks {tasks}; {cfg.calib_samples} calibration samples per task (train split)\n"
              f"measure {cfg.measure}: {rule}\n"
              f"plan: below, how it was measured (parameters, per-layer numbers, stability over two halves of "
              f"the calibration set)\n"
              f"use: python train/main.py --config X.yaml --set \"$(cat {out_dir / 'set_mod.txt'})\"")
    plan_path, set_path = write_plan(out_dir, mod, header, record)
    atomic_write(out_dir / "measurements.json", json.dumps(report, indent=1))
    if cfg.probes:
        atomic_write(out_dir / "probes.md", probe_tables(report))
    panels = {"ARank / length": {t: m.arank_ratio for t, m in measures.items()},
              "cosine block": {t: m.cos_block for t, m in measures.items()},
              "cosine attention": {t: m.cos_attn for t, m in measures.items()},
              "cosine MLP": {t: m.cos_mlp for t, m in measures.items()},
              "loss +, block skipped": {t: skip[t]["block"] for t in tasks},
              "loss +, attention skipped": {t: skip[t]["attn"] for t in tasks},
              "loss +, MLP skipped": {t: skip[t]["mlp"] for t in tasks},
              "planned capacity": {t: [mod["capacity"].get(str(i), {}).get(t, 1.0) for i in range(L)] for t in tasks}}
    plots.layer_task_heatmaps(panels, tasks, out_dir / "heatmaps.png")
    plots.interaction_heatmaps(inter, tasks, out_dir / "interaction.png")
    if cfg.probes:
        plots.probe_curves(report["probes"]["depth_pruning"], report["probes"]["width_pruning"], tasks,
                           out_dir / "probes.png")
    log(f"analyze: wrote {plan_path}, {set_path}, measurements.json and plots to {out_dir} "
        f"({time.perf_counter() - t0:.1f}s)")
    for t in tasks:
        log(f"  {t}: MoD layers {plan_details.get(t, {}).get('mod_layers', [])} capacity "
            f"{plan_details.get(t, {}).get('capacity', {})}; planned forward FLOPs -{flops[t]['saved_fraction']:.1%}; "
            f"halves agree on layers (Jaccard) {record['stability'].get(t, {}).get('jaccard', 1.0):.2f}")
    return report


def probe_accuracy(net, data: str, cfg: AnalysisConfig):
    """task -> the evaluator's accuracy of `net` as it is at the call (None: off, or data without the demo's
    labels, where only the loss measures a probe)."""
    if not cfg.probe_accuracy:
        return None
    from data.manifest import load_manifest
    from tools.evaluate import EvalConfig, Evaluator

    if not isinstance(load_manifest(data).doc.get("demo"), dict):
        return None  # no digit labels to judge by; and building an Evaluator would load the image tokenizer

    evaluator = Evaluator(data, EvalConfig(max_samples=cfg.eval_samples, images_per_digit=cfg.accuracy_images_per_digit,
                                           batch_size=max(cfg.batch_size, 16)))
    if not evaluator.demo:
        return None
    return lambda task: evaluator.task_accuracy(net, task)


_ACCURACY = {"understanding/accuracy": "understanding %", "generation/accuracy": "generation %"}


def probe_tables(report: dict[str, Any]) -> str:
    """The pruning probes as Markdown: per task, each edit's removed compute, loss increase and (where measured)
    the evaluator's accuracy, against the unedited model's first."""
    pr, ev = report["probes"], report["evaluation"]
    acc_keys = [k for k in _ACCURACY if any(k in ev[t] for t in ev)]
    head = ["task", "edit", "removed compute", "loss", "loss +", *(_ACCURACY[k] for k in acc_keys)]
    counts = ", ".join(f"{t} {ev[t]['samples']}" for t in ev)
    lines = [f"# Pruning probes of {report['checkpoint']}", "",
             f"Loss on {counts} validation samples; accuracy "
             "(where shown) by tools/evaluate.py on the validation split, each row on the edited model.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(task: str, edit: str, r: dict[str, Any]) -> None:
        accs = [f"{100 * r[k]:.1f}" if k in r else "-" for k in acc_keys]
        removed = f"{100 * r['removed_compute']:.1f}%" if "removed_compute" in r else "-"
        lines.append(f"| {task} | {edit} | {removed} | {r['loss']:.4f} | {r.get('delta_loss', 0.0):+.4f} | "
                     + " | ".join(accs) + (" |" if accs else "|"))

    for task in ev:
        row(task, "none (dense)", ev[task])
        for kind, rows in pr["depth_pruning"].get(task, {}).items():
            for r in rows:
                row(task, f"{kind} skipped in layers {r['layers']}", r)
        for r in pr["width_pruning"].get(task, []):
            row(task, f"{100 * r['fraction']:.1f}% of MLP neurons pruned", r)
        moe = pr["moe"]
        for r in moe["results"].get(task, []):
            row(task, f"MoE top-{r['top_k']} of {moe['num_experts']} (zero router, untrained)", r)
    return "\n".join(lines) + "\n"


def make_plan(net, cfg: AnalysisConfig, tasks: list[str], measures: dict, halves: dict,
              routable_fraction: dict[str, float], source_mod: dict) -> tuple[dict, dict, dict]:
    """-> (the `mod:` mapping, per-task details, the plan's record: measure, parameters, per-layer numbers
    and the plans the two calibration halves give on their own)."""
    params: dict[str, Any] = {"calib_samples": cfg.calib_samples, "calib_split": "train"}
    if cfg.measure == "token_skip":
        grid = list(cfg.capacity_grid)
        per_half: dict[str, list] = {}
        for t in tasks:
            per_half[t] = [token_skip_curves(net, half, t, grid) for half in halves[t]]
        curves, per_layer = {}, {}
        for t in tasks:  # the whole calibration set: the halves' curves weighted by their supervised tokens
            (da, _, na), (db, _, nb) = per_half[t]
            curves[t] = ((np.array(da) * na + np.array(db) * nb) / (na + nb)).tolist()
        savings = {t: layer_savings(net.config, t, measures[t].mean_len, routable_fraction[t], grid) for t in tasks}
        mod, details = plan_token_skip(curves, savings, source_mod, cfg)
        halves_plans = {name: plan_token_skip({t: per_half[t][i][0] for t in tasks}, savings, source_mod, cfg)[1]
                        for i, name in enumerate(("half_a", "half_b"))}
        params.update(flops_target=cfg.flops_target, capacity_grid=grid)
        for t in tasks:
            per_layer[t] = {"capacity": [0.0, *grid], "delta_loss": curves[t],
                            "dense_loss": sum(h[1] * h[2] for h in per_half[t]) / sum(h[2] for h in per_half[t]),
                            "forward_flops_saved": savings[t]}
    else:
        mod, details = plan_arank({t: m.arank_ratio for t, m in measures.items()}, source_mod, cfg)
        halves_plans = {}
        for i, name in enumerate(("half_a", "half_b")):
            ratio = {t: measure_task(net, halves[t][i], cfg.arank_max_tokens, cfg.rank_rtol).arank_ratio for t in tasks}
            halves_plans[name] = plan_arank(ratio, source_mod, cfg)[1]
        params.update(rank_rtol=cfg.rank_rtol, arank_max_tokens=cfg.arank_max_tokens, mod_fraction=cfg.mod_fraction,
                      capacity_min=cfg.capacity_min, capacity_max=cfg.capacity_max)
        per_layer = {t: {"arank": m.arank, "arank_ratio": m.arank_ratio} for t, m in measures.items()}
    stability = plan_stability({"full": details, **halves_plans})
    record = {"measure": cfg.measure, "parameters": params, "per_task": details, "per_layer": per_layer,
              "stability": stability}
    return mod, details, record


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="HF directory, run directory, checkpoints/ root or step dir")
    p.add_argument("--data", required=True, help="dataset directory (manifest.json); train split = calibration")
    p.add_argument("--out", required=True, help="directory for the plan, measurements and plots")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice); tiny models on a "
                   "busy CPU run faster with 1")
    p.add_argument("--tasks", type=_names)
    p.add_argument("--calib-samples", type=int, default=AnalysisConfig.calib_samples)
    p.add_argument("--eval-samples", type=int, default=AnalysisConfig.eval_samples)
    p.add_argument("--batch-size", type=int, default=AnalysisConfig.batch_size)
    p.add_argument("--arank-max-tokens", type=int, default=AnalysisConfig.arank_max_tokens)
    p.add_argument("--rank-rtol", type=float)
    p.add_argument("--measure", choices=["token_skip", "arank"], default=AnalysisConfig.measure,
                   help="what the plan is made from (analysis/plan.py)")
    p.add_argument("--flops-target", type=float, default=AnalysisConfig.flops_target,
                   help="token_skip: fraction of each planned task's dense forward FLOPs to remove")
    p.add_argument("--capacity-grid", type=_floats, default=None, help="token_skip: capacities measured, "
                   "e.g. 0.1,0.2,0.3,0.5")
    p.add_argument("--mod-fraction", type=float, default=AnalysisConfig.mod_fraction)
    p.add_argument("--capacity-min", type=float, default=AnalysisConfig.capacity_min)
    p.add_argument("--capacity-max", type=float, default=AnalysisConfig.capacity_max)
    p.add_argument("--plan-tasks", type=_names, help="tasks that get MoD layers, e.g. t2i,mmu (default: all)")
    p.add_argument("--prune-max-layers", type=int)
    p.add_argument("--width-fractions", type=_floats, default=None, help="e.g. 0.125,0.25,0.5")
    p.add_argument("--interaction-layers", type=int)
    p.add_argument("--interaction-width", type=float, default=AnalysisConfig.interaction_width)
    p.add_argument("--moe-experts", type=int, default=AnalysisConfig.moe_experts)
    p.add_argument("--moe-top-k", type=_ints, default=None, help="e.g. 1,2,4")
    p.add_argument("--moe-layers", type=_ints, default=None, help="e.g. 4,5,6 (default: all)")
    p.add_argument("--no-probes", action="store_true", help="skip the depth/width/MoE pruning probes")
    p.add_argument("--no-probe-accuracy", action="store_true", help="score the probes by loss only, not also by "
                   "the evaluator's understanding / generation accuracy")
    p.add_argument("--accuracy-images-per-digit", type=int, default=AnalysisConfig.accuracy_images_per_digit)
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        cfg = AnalysisConfig(
            tasks=args.tasks, calib_samples=args.calib_samples, eval_samples=args.eval_samples,
            batch_size=args.batch_size, arank_max_tokens=args.arank_max_tokens, rank_rtol=args.rank_rtol,
            measure=args.measure, flops_target=args.flops_target,
            **({"capacity_grid": args.capacity_grid} if args.capacity_grid else {}),
            mod_fraction=args.mod_fraction, capacity_min=args.capacity_min, capacity_max=args.capacity_max,
            plan_tasks=args.plan_tasks, prune_max_layers=args.prune_max_layers,
            interaction_layers=args.interaction_layers, interaction_width=args.interaction_width,
            moe_experts=args.moe_experts, moe_layers=args.moe_layers, probes=not args.no_probes,
            probe_accuracy=not args.no_probe_accuracy, accuracy_images_per_digit=args.accuracy_images_per_digit,
            **({"width_fractions": args.width_fractions} if args.width_fractions else {}),
            **({"moe_top_k": args.moe_top_k} if args.moe_top_k else {}),
        )
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        run_analysis(args.checkpoint, args.data, args.out, cfg, args.device, dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
