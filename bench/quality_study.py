"""Dense vs UniMoD vs shared-router MoD on the demo set: the UniMoD paper's table on our data.

Trains the three variants with the real trainer (`train/main.py`, one process each, same seed, same
number of steps, run one after another so they never share the CPU), evaluates each at the end
(`logging.eval_at_end`), and tabulates training FLOPs, wall time, understanding accuracy, generation
accuracy and text perplexity:

    dense          the demo preset with every MoD capacity removed (model.mod.capacity={})
    unimod         train/configs/demo.yaml as is: task-aware routers, capacity 0.2 t2i / 0.3 mmu in 4-7
    shared_router  the same plan with one router shared by all tasks (model.mod.shared_router=true)

    .venv/bin/python bench/quality_study.py --steps 200 --out bench/results/quality_study_cpu.json
    .venv/bin/python bench/quality_study.py --report-only --out bench/results/quality_study_cpu.json

The goal from the issue: UniMoD within 1 point of dense (understanding and generation accuracy) at
>= 35% fewer training FLOPs, and better than the shared-router ablation. The verdict is computed and
printed, not asserted: this is a benchmark.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import load_average, machine_info, publish  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "dense": ["model.mod.capacity={}"],
    "unimod": [],
    "shared_router": ["model.mod.shared_router=true"],
}
METRICS = ("understanding/accuracy", "generation/accuracy", "text/perplexity", "text/perplexity_topk")
CHANCE = 0.1  # ten digits: answering or drawing one digit for every prompt scores 10% on either accuracy


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "train" / "configs" / "demo.yaml"))
    p.add_argument("--data", default=str(REPO / "demo_data"), help="demo dataset (built if it has no manifest)")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="OMP_NUM_THREADS of the trainer (0: torch's default). One thread keeps a shared 2-core "
                        "machine from oversubscribing, where OpenMP's spinning threads slow a step 10x")
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "bench_quality"), help="trainer output dirs")
    p.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    p.add_argument("--set", action="append", default=[], help="extra trainer override for every variant")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from the runs already there")
    p.add_argument("--note", help="a remark printed under the table (e.g. the load each run saw)")
    p.add_argument("--out", required=True, help="JSON result path (the .md and .png go next to it)")
    args = p.parse_args(argv)
    if unknown := set(args.variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(unknown)}; known {list(VARIANTS)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def train_variant(args: argparse.Namespace, name: str) -> float:
    """One trainer run to completion; returns its wall time including start-up and evaluation."""
    out = Path(args.runs_dir) / name
    cmd = [sys.executable, str(REPO / "train" / "main.py"), "--config", args.config, "--resume", "none"]
    overrides = [f"run.output_dir={out}", f"run.max_steps={args.steps}", f"run.seed={args.seed}",
                 f"data.dataset_dir={args.data}", "logging.eval_at_end=true", "logging.eval_every=0",
                 "logging.progress_bar=false", "checkpoint.save_every=0", "checkpoint.export_hf=false",
                 *VARIANTS[name], *args.set]
    for o in overrides:
        cmd += ["--set", o]
    if not (Path(args.data) / "manifest.json").exists():
        cmd.append("--prepare-demo-data")
    out.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    env = os.environ | {"DS_ACCELERATOR": "cpu"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with open(out / "bench_train.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    (out / "bench_load_after.json").write_text(json.dumps(load_average()))
    if rc != 0:
        raise RuntimeError(f"{name}: train/main.py exited {rc}; see {out / 'bench_train.log'}")
    return wall


def collect(args: argparse.Namespace, name: str, process_wall: float | None) -> dict:
    out = Path(args.runs_dir) / name
    summary = json.loads((out / "summary.json").read_text())
    if summary.get("status") != "completed" or summary.get("steps") != args.steps:
        raise RuntimeError(f"{out / 'summary.json'}: status {summary.get('status')!r} after {summary.get('steps')} "
                           f"steps, expected a completed run of {args.steps}")
    ev = json.loads((out / "eval.json").read_text())
    load = {k: json.loads((out / f"bench_load_{k}.json").read_text()) if (out / f"bench_load_{k}.json").exists() else None
            for k in ("before", "after")}
    # Logged step times (every log_every steps): their median and minimum resist load spikes better
    # than the run's total wall time does.
    steps = [json.loads(line).get("time/step_s") for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps = [t for t in steps if t is not None]
    return {
        "load_average_before_after": [load["before"], load["after"]],
        "step_time_median_s": statistics.median(steps) if steps else None,
        "step_time_min_s": min(steps) if steps else None,
        "overrides": VARIANTS[name],
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "flops_actual": summary["flops_actual"],
        "flops_dense": summary["flops_dense"],
        "mod_flops_saved_pct": summary["mod_flops_saved_pct"],
        "train_wall_time_s": summary["wall_time_s"],
        "process_wall_time_s": process_wall,
        "tokens_per_s": summary["tokens_per_s"],
        "loss_final": summary["loss_final"],
        "loss_final_per_task": summary.get("loss_final_per_task"),
        "eval": {k: ev.get(k) for k in METRICS},
        "router_agreement": {k: v for k, v in ev.items() if k.startswith("router/agreement/layer_")},
    }


def verdict(r: dict[str, dict]) -> dict[str, object]:
    """The issue's goal, checked point by point (accuracies in points = percent)."""
    if not {"dense", "unimod"} <= r.keys():
        return {}
    d, u = r["dense"], r["unimod"]
    pts = lambda run, k: 100 * run["eval"][k]  # noqa: E731
    saved = 100 * (1 - u["flops_actual"] / d["flops_actual"])
    out: dict[str, object] = {
        "flops_saved_vs_dense_pct": saved,
        # Same seed, same data order: the dense run's padding-free baseline is the strongest honest one.
        "flops_saved_vs_padding_free_dense_pct": 100 * (1 - u["flops_actual"] / d["flops_dense"]),
        "flops_goal_met (>= 35%)": saved >= 35,
        "understanding_gap_pts": pts(u, "understanding/accuracy") - pts(d, "understanding/accuracy"),
        "generation_gap_pts": pts(u, "generation/accuracy") - pts(d, "generation/accuracy"),
        "perplexity_ratio_unimod_over_dense": u["eval"]["text/perplexity"] / d["eval"]["text/perplexity"],
    }
    if d["step_time_median_s"] and u["step_time_median_s"]:
        out["step_time_ratio_dense_over_unimod (median logged)"] = d["step_time_median_s"] / u["step_time_median_s"]
        out["R_in_trainer (time ratio / FLOPs ratio)"] = (out["step_time_ratio_dense_over_unimod (median logged)"]
                                                          / (d["flops_actual"] / u["flops_actual"]))
    out["within_1pt_of_dense"] = out["understanding_gap_pts"] >= -1 and out["generation_gap_pts"] >= -1
    # A comparison of models that have not learned the task says nothing about MoD: flag it.
    best = max(max(x["eval"]["understanding/accuracy"], x["eval"]["generation/accuracy"]) for x in r.values())
    out["any_variant_above_chance (> 15%)"] = best > CHANCE + 0.05
    if "shared_router" in r:
        s = r["shared_router"]
        out["unimod_minus_shared_understanding_pts"] = pts(u, "understanding/accuracy") - pts(s, "understanding/accuracy")
        out["unimod_minus_shared_generation_pts"] = pts(u, "generation/accuracy") - pts(s, "generation/accuracy")
        out["better_than_shared_router"] = (out["unimod_minus_shared_understanding_pts"]
                                            + out["unimod_minus_shared_generation_pts"]) > 0
    return out


def plot(r: dict[str, dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(r)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    panels = [("training TFLOPs", lambda x: x["flops_actual"] / 1e12),
              ("understanding acc. (%)", lambda x: 100 * x["eval"]["understanding/accuracy"]),
              ("generation acc. (%)", lambda x: 100 * x["eval"]["generation/accuracy"]),
              ("text perplexity", lambda x: x["eval"]["text/perplexity"])]
    for ax, (title, f) in zip(axes, panels):
        vals = [f(r[n]) for n in names]
        ax.bar(names, vals, color=["#777777", "#1f77b4", "#ff7f0e"][: len(names)])
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.3g}", ha="center", va="bottom", fontsize=8)
        if "acc." in title:
            ax.axhline(100 * CHANCE, color="red", lw=0.8, ls="--", label="chance")
            ax.legend(fontsize=7)
        if "perplexity" in title:
            ax.set_yscale("log")  # early-training perplexities span orders of magnitude
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown(result: dict, png_name: str) -> str:
    r, v = result["runs"], result["verdict"]
    rows = ["| variant | steps | train FLOPs (TFLOP) | saved vs dense | wall time (s) | step median / min (s) | tokens/s | understanding acc. | "
            "generation acc. | text ppl (causal) | text ppl (top-k) | final loss | load at start |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, x in r.items():
        e = x["eval"]
        rows.append(f"| {n} | {x['steps']} | {x['flops_actual'] / 1e12:.1f} | {x['mod_flops_saved_pct']:.1f}% | "
                    f"{x['train_wall_time_s']:.0f} | {x['step_time_median_s']:.2f} / {x['step_time_min_s']:.2f} | {x['tokens_per_s']:.0f} | {100 * e['understanding/accuracy']:.1f}% | "
                    f"{100 * e['generation/accuracy']:.1f}% | {e['text/perplexity']:.2f} | "
                    f"{e['text/perplexity_topk']:.2f} | {x['loss_final']:.3f} | "
                    f"{(x.get('load_average_before_after') or [None])[0] or '-'} |")
    lines = [f"# Dense vs UniMoD vs shared-router MoD on the demo set ({result['steps']} steps each)", "",
             "Command: `" + result["command"] + "`", "",
             *rows, "", "Verdict against the issue's goal (computed, not asserted):", ""]
    lines += [f"- {k}: {(f'{val:.4g}' if isinstance(val, float) else val)}" for k, val in v.items()]
    if result.get("note"):
        lines += ["", result["note"]]
    lines += ["", f"![quality study]({png_name})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    walls: dict[str, float | None] = {}
    for name in args.variants:
        if not args.report_only:
            walls[name] = train_variant(args, name)
            print(f"[{name}] done in {walls[name]:.0f} s", flush=True)
    prior = {}
    if args.report_only and Path(args.out).exists():
        prior = json.loads(Path(args.out).read_text())
    runs = {n: collect(args, n, walls.get(n, prior.get("runs", {}).get(n, {}).get("process_wall_time_s")))
            for n in args.variants}
    result = {
        "steps": args.steps,
        "seed": args.seed,
        "trainer_threads": args.threads or prior.get("trainer_threads"),
        "config": os.path.relpath(args.config, REPO),
        "command": prior.get("command") or " ".join([".venv/bin/python bench/quality_study.py", *sys.argv[1:]]),
        "machine": prior.get("machine") or machine_info(),
        "runs": runs,
        "verdict": verdict(runs),
        "note": args.note or prior.get("note"),
    }
    publish(args.out, result, lambda png: plot(runs, png), markdown)
    return result


if __name__ == "__main__":
    main()
