"""UniMoD the paper's way on the demo data: dense pre-training, a measured MoD plan, MoD fine-tuning, and the
quality table that says whether quality holds at the FLOPs saved (Markdown + JSON + plot).

    ./scripts/unimod_recipe.sh                      # the recipe: pretrain, analyse, fine-tune dense and UniMoD
    .venv/bin/python bench/unimod_recipe.py --rows all --seeds 0,1,2 --out bench/results/unimod_recipe_cpu.json

Steps, each skipped when its result is already there (a finished run is found by its summary.json):
  1. pretrain   train/configs/unimod_pretrain.yaml: the dense demo model (no MoD layer), exported to hf/
  2. analyse    python -m tools.analyze on the pretrained model, calibration from the train split: the MoD
                plan (analysis/plan.py, `--measure` and `--flops-target` pass through)
  3. fine-tune  train/configs/unimod_finetune.yaml from pretrain/hf, one run per row and seed:

    dense_ft        the baseline: the same fine-tune without MoD (same data order per seed)
    unimod_ft       the analysed plan, fresh task routers (gate ~1: the fine-tune starts from the dense model)
    unimod_hand_ft  the hand plan of the main job (layers 2-3, 20% of the image tokens of t2i and mmu)
    shared_ft       the analysed plan with one router shared by all tasks (same FLOPs as unimod_ft)
    unimod_scratch  the analysed plan trained from scratch for pretrain + fine-tune steps (no dense phase)
    unimod_isoflop  the analysed plan fine-tuned on the dense fine-tune's training FLOPs: more steps, as many
                    as dense_ft's FLOPs over unimod_ft's (MoD's isoFLOP comparison; needs both at seed 0)
    unimod_ft_tNN   with --sweep-targets: unimod_ft with a plan made for another FLOPs target (NN percent),
                    the quality/FLOPs trade-off

Every run evaluates at its end (understanding accuracy on the 180 validation digits, generation accuracy of
10 images per digit by the independent judge, text perplexity). FLOPs are each run's own count; a saving is
against the padding-free dense baseline of the same documents (summary.json flops_dense). Runs go `--jobs`
at a time with `--threads` each: on a 2-core CPU two one-thread runs side by side finish sooner than one
after the other, and the step times of a pair that shared the machine compare with each other only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import load_average, machine_info, publish, seed_panels  # noqa: E402

PRETRAIN_CONFIG = REPO / "train" / "configs" / "unimod_pretrain.yaml"
FINETUNE_CONFIG = REPO / "train" / "configs" / "unimod_finetune.yaml"
HAND_PLAN = 'model.mod.capacity={"2-3": {t2i: 0.2, mmu: 0.2}}'
ROWS = ("dense_ft", "unimod_ft", "unimod_hand_ft", "shared_ft", "unimod_scratch", "unimod_isoflop")
RECIPE_ROWS = ("dense_ft", "unimod_ft")
METRICS = {"understanding/accuracy": "understanding", "generation/accuracy": "generation",
           "text/perplexity": "text_ppl"}
GOAL = {"flops_saved_pct": 35.0, "max_gap_pts": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default=str(REPO / "runs" / "unimod"))
    p.add_argument("--data", default=str(REPO / "demo_data"), help="demo dataset (built if it has no manifest)")
    p.add_argument("--rows", default=",".join(RECIPE_ROWS),
                   help=f"comma list of {', '.join(ROWS)}, or all (default: the recipe's two)")
    p.add_argument("--seeds", default="0", help="fine-tune seeds, e.g. 0,1,2 (dense_ft and unimod_ft run every "
                   "seed; the other rows seed 0 unless --all-rows-seeded)")
    p.add_argument("--all-rows-seeded", action="store_true", help="run every row at every seed")
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--finetune-steps", type=int, default=1500)
    p.add_argument("--measure", default="token_skip", choices=["token_skip", "arank"])
    p.add_argument("--flops-target", type=float, default=0.4, help="the planner's per-task forward-FLOPs target")
    p.add_argument("--calib-samples", type=int, default=50, help="the analysis's calibration samples per task")
    p.add_argument("--sweep-targets", default="", help="more FLOPs targets, e.g. 0.2,0.3: a plan and a unimod_ft "
                   "row (seed 0) for each")
    add_study_options(p, "unimod_recipe.json")
    args = p.parse_args(argv)
    parse_rows_and_seeds(p, args, ROWS)
    args.sweep_targets = [float(t) for t in args.sweep_targets.split(",") if t.strip()]
    if any(not 0 < t < 1 for t in [args.flops_target, *args.sweep_targets]):
        p.error("FLOPs targets must be in (0, 1)")
    if not args.seeds or args.pretrain_steps < 1 or args.finetune_steps < 1 or args.jobs < 1:
        p.error("--seeds needs one seed; --pretrain-steps, --finetune-steps and --jobs must be >= 1")
    args.out = args.out or str(Path(args.runs_dir) / "unimod_recipe.json")
    return args


def add_study_options(p: argparse.ArgumentParser, out_name: str) -> None:
    """The options every fine-tune study shares (this one and bench/moe_adaptation.py): how runs share the
    machine, extra trainer overrides, report-only, the note and the output path."""
    p.add_argument("--jobs", type=int, default=2, help="trainer runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each trainer run")
    p.add_argument("--set", action="append", default=[], help="extra trainer override for every fine-tune")
    p.add_argument("--report-only", action="store_true", help="tabulate the runs already there")
    p.add_argument("--note", help="a remark printed under the table")
    p.add_argument("--out", default=None, help=f"JSON result path (.md and .png beside it); default "
                   f"<runs-dir>/{out_name}")


def parse_rows_and_seeds(p: argparse.ArgumentParser, args: argparse.Namespace, rows) -> None:
    """--rows (a comma list of `rows`, or all) and --seeds (a comma list of integers) into lists, in place."""
    args.rows = list(rows) if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    if unknown := [r for r in args.rows if r not in rows]:
        p.error(f"--rows: unknown {unknown}; known {list(rows)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]


# ----- running the trainer ------------------------------------------------------------------------------
def _env(threads: int) -> dict[str, str]:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    if not _has_cuda():
        env["DS_ACCELERATOR"] = "cpu"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def finished(out: Path, steps: int) -> bool:
    """A run counts as done when its summary says it completed `steps` steps and it has its evaluation."""
    try:
        s = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return s.get("status") == "completed" and s.get("steps") == steps and bool(s.get("eval"))


def train(name: str, out: Path, config: Path, steps: int, overrides: list[str], args) -> None:
    """One trainer run to completion (resumed if a checkpoint is there), its log in out/train.log."""
    if finished(out, steps):
        print(f"[{name}] done already: {out}", flush=True)
        return
    sets = [f"run.output_dir={out}", f"run.max_steps={steps}", f"data.dataset_dir={args.data}",
            "logging.progress_bar=false", "logging.eval_at_end=true", *overrides]
    cmd = [sys.executable, str(REPO / "train" / "main.py"), "--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    if not (Path(args.data) / "manifest.json").exists():
        cmd.append("--prepare-demo-data")
    out.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    (out / "load_before.json").write_text(json.dumps(load_average()))
    with open(out / "train.log", "a") as log:
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env(args.threads)).returncode
    (out / "load_after.json").write_text(json.dumps(load_average()))
    if rc != 0 or not finished(out, steps):
        raise RuntimeError(f"[{name}] train/main.py exited {rc} without a finished, evaluated run of {steps} "
                           f"steps; see {out / 'train.log'}")
    print(f"[{name}] finished in {time.perf_counter() - t0:.0f} s", flush=True)


def target_row(target: float) -> str:
    return f"unimod_ft_t{round(100 * target)}"


def analyse(args, pretrain: Path, plan_dir: Path, target: float) -> Path:
    plan = plan_dir / "mod_plan.yaml"
    hf = pretrain / "hf"
    if plan.exists() and plan.stat().st_mtime > (hf / "model.safetensors").stat().st_mtime:
        print(f"[analyse] plan there already: {plan}", flush=True)
        return plan
    cmd = [sys.executable, "-m", "tools.analyze", "--checkpoint", str(hf), "--data", args.data,
           "--out", str(plan_dir), "--no-probes", "--measure", args.measure, "--flops-target", str(target),
           "--calib-samples", str(args.calib_samples),
           "--device", "cuda" if _has_cuda() else "cpu"]
    print(f"[analyse] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, env=_env(args.threads * args.jobs))
    return plan


def row_overrides(row: str, seed: int, plan: Path, args, iso_steps: int | None = None) -> tuple[Path, int, list[str]]:
    """-> (config, steps, overrides) of one fine-tune row."""
    seeded = [f"run.seed={seed}", f"data.seed={seed}", *args.set]  # a seed is init AND data order
    common = [f"checkpoint.init_from_hf={Path(args.runs_dir) / 'pretrain' / 'hf'}", *seeded]  # this recipe's
    F = args.finetune_steps
    if row == "dense_ft":
        return FINETUNE_CONFIG, F, common
    if row == "unimod_ft":
        return FINETUNE_CONFIG, F, [f"model.mod_plan={plan}", *common]
    if row == "unimod_hand_ft":
        return FINETUNE_CONFIG, F, [HAND_PLAN, *common]
    if row == "shared_ft":
        return FINETUNE_CONFIG, F, [f"model.mod_plan={plan}", "model.mod.shared_router=true", *common]
    if row == "unimod_scratch":
        # From scratch, the same total steps as pretrain + fine-tune; the pre-training config's optimizer.
        return PRETRAIN_CONFIG, args.pretrain_steps + F, [f"model.mod_plan={plan}", "model.mod.aux_loss_weight=0.01",
                                                          "checkpoint.save_every=1000", *seeded]
    if row == "unimod_isoflop":
        return FINETUNE_CONFIG, iso_steps, [f"model.mod_plan={plan}", *common]
    raise ValueError(row)


def iso_flop_steps(runs: Path, args) -> int:
    """Fine-tune steps at which UniMoD spends dense_ft's training FLOPs (seed 0 runs)."""
    dense = json.loads((runs / "dense_ft_s0" / "summary.json").read_text())
    mod = json.loads((runs / "unimod_ft_s0" / "summary.json").read_text())
    return round(args.finetune_steps * dense["flops_actual"] / mod["flops_actual"])


def run_all(args) -> None:
    runs = Path(args.runs_dir)
    pretrain = runs / "pretrain"
    train("pretrain", pretrain, PRETRAIN_CONFIG, args.pretrain_steps, [], argparse.Namespace(
        **{**vars(args), "threads": args.threads * args.jobs}))
    plan = analyse(args, pretrain, runs / "plan", args.flops_target)
    jobs = []
    for target in args.sweep_targets:
        sweep_plan = analyse(args, pretrain, runs / f"plan_t{round(100 * target)}", target)
        seeds = args.seeds if args.all_rows_seeded else args.seeds[:1]
        for seed in seeds:
            config, steps, sets = row_overrides("unimod_ft", seed, sweep_plan, args)
            jobs.append((f"{target_row(target)}_s{seed}", config, steps, sets))
    for row in args.rows:
        if row == "unimod_isoflop":
            continue
        seeds = args.seeds if row in RECIPE_ROWS or args.all_rows_seeded else args.seeds[:1]
        for seed in seeds:
            config, steps, sets = row_overrides(row, seed, plan, args)
            jobs.append((f"{row}_s{seed}", config, steps, sets))
    # Longest first: the from-scratch run would otherwise finish alone at the end.
    jobs.sort(key=lambda j: -j[2])
    with ThreadPoolExecutor(args.jobs) as pool:
        for f in [pool.submit(train, name, runs / name, config, steps, sets, args)
                  for name, config, steps, sets in jobs]:
            f.result()
    if "unimod_isoflop" in args.rows:
        iso = iso_flop_steps(runs, args)
        config, steps, sets = row_overrides("unimod_isoflop", args.seeds[0], plan, args, iso)
        train(f"unimod_isoflop_s{args.seeds[0]}", runs / f"unimod_isoflop_s{args.seeds[0]}", config, steps,
              sets, args)


# ----- the table ----------------------------------------------------------------------------------------
def _run_record(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line).get("time/step_s") for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    steps = [t for t in steps if t is not None]
    # summary.json counts what its last attempt trained: a run resumed at its last step (e.g. only to evaluate)
    # has no FLOPs of its own, and none are shown rather than a wrong count.
    counted = s.get("steps_this_run", s["steps"]) == s["steps"] and s["flops_dense"] > 0
    rec = {"run": out.name, "steps": s["steps"], "flops_actual": s["flops_actual"] if counted else None,
           "flops_dense": s["flops_dense"] if counted else None,
           "saved_vs_padding_free_dense_pct": 100 * (1 - s["flops_actual"] / s["flops_dense"]) if counted else None,
           "pad_pct": s.get("pad_pct"), "step_time_median_s": statistics.median(steps) if steps else None,
           "train_wall_s": s.get("wall_time_s")}
    for key, name in METRICS.items():
        rec[name] = s["eval"].get(key)
    for side in ("before", "after"):
        f = out / f"load_{side}.json"
        rec[f"load_{side}"] = json.loads(f.read_text()) if f.exists() else None
    return rec


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarise(runs: Path, rows: list[str]) -> dict:
    table = {}
    for row in ("pretrain", *rows):
        outs = sorted(p for p in runs.glob(f"{row}_s*") if p.name[len(row) + 2:].isdigit()) \
            if row != "pretrain" else [runs / "pretrain"]
        recs = [_run_record(o) for o in outs if (o / "summary.json").exists() and
                json.loads((o / "summary.json").read_text()).get("eval")]
        if not recs:
            continue
        agg = {"seeds": len(recs), "runs": recs}
        for key in ("understanding", "generation", "text_ppl", "flops_actual", "saved_vs_padding_free_dense_pct",
                    "step_time_median_s", "steps"):
            vals = [r[key] for r in recs if r[key] is not None]
            if vals:
                agg[key], agg[f"{key}_sd"] = _mean_sd(vals)
        table[row] = agg
    return table


def verdict(table: dict) -> dict:
    """The issue's goal, computed: UniMoD fine-tune within 1 point of dense fine-tune on understanding and
    generation at >= 35% fewer training FLOPs than the padding-free dense model, and ahead of the shared router."""
    d, u = table.get("dense_ft"), table.get("unimod_ft")
    if not d or not u:
        return {}
    out = {
        "flops_saved_vs_dense_ft_actual_pct": 100 * (1 - u["flops_actual"] / d["flops_actual"]),
        "flops_saved_vs_padding_free_dense_pct": u["saved_vs_padding_free_dense_pct"],
        "understanding_gap_pts": 100 * (d["understanding"] - u["understanding"]),
        "generation_gap_pts": 100 * (d["generation"] - u["generation"]),
        "text_ppl_ratio": u["text_ppl"] / d["text_ppl"],
        "step_time_ratio_dense_over_unimod": (d["step_time_median_s"] / u["step_time_median_s"]
                                              if u.get("step_time_median_s") else None),
    }
    out["flops_goal_met"] = out["flops_saved_vs_padding_free_dense_pct"] >= GOAL["flops_saved_pct"]
    out["quality_goal_met"] = max(out["understanding_gap_pts"], out["generation_gap_pts"]) <= GOAL["max_gap_pts"]
    if s := table.get("shared_ft"):
        out["unimod_minus_shared_pts"] = {"understanding": 100 * (u["understanding"] - s["understanding"]),
                                          "generation": 100 * (u["generation"] - s["generation"])}
        out["ahead_of_shared_router"] = all(v >= 0 for v in out["unimod_minus_shared_pts"].values())
    return out


def flops_context(runs: Path, data: str) -> dict:
    """The saving's ceiling on this data and the plan's saving at Emu3-8B shapes (analytic, model/flops.py)."""
    import yaml

    from analysis.samples import load_task_samples
    from data.manifest import load_manifest
    from model.config import ModelConfig, read_mod_plan
    from model.flops import flops_forward

    plan_file = runs / "plan" / "mod_plan.yaml"
    meas = json.loads((runs / "plan" / "measurements.json").read_text())
    mod = read_mod_plan(plan_file)
    pre_cfg = yaml.safe_load((runs / "pretrain" / "config.yaml").read_text())
    model = ModelConfig.from_dict({**pre_cfg["model"], "mod": {**pre_cfg["model"]["mod"], **mod}})
    passes = pre_cfg["data"]["tasks"]
    manifest = load_manifest(data)
    L = model.num_hidden_layers
    shares, per_task = {}, {}
    for task in meas["calibration"]:
        # The analysis's own count of the plan on the task's mean calibration sample (analysis/plan.py plan_flops)
        planned = meas["plan"]["forward_flops"][task]
        S, routable = planned["seq_len"], planned["routable"]

        def saved(cfg: ModelConfig) -> float:
            return 1 - flops_forward(cfg, S, [task], routable={task: routable}, causal_attention=True).total \
                / planned["dense"]

        tiny = 1e-9  # keeps ceil(1e-9 * n) = 1 routable token: "all but one" is as far as a capacity goes
        own = [li for li in range(L) if model.mod.capacity_of(li, task) < 1.0]  # the task's own MoD layers
        per_task[task] = {
            "seq_len": S, "routable": routable, "planned_saved": planned["saved_fraction"],
            "ceiling_plan_layers": saved(model.replace(mod={"capacity": {str(li): {task: tiny} for li in own}})),
            "ceiling_every_layer": saved(model.replace(mod={"capacity": {f"0-{L - 1}": {task: tiny}}}))}
        shares[task] = passes.get(task, 0.0) * sum(len(s.ids) for s in load_task_samples(manifest, "train", task,
                                                                                           1 << 40))
    total = sum(shares.values())
    mix = {k: v / total for k, v in shares.items()}
    out = {"per_task": per_task, "token_mix": mix}
    for key in ("planned_saved", "ceiling_plan_layers", "ceiling_every_layer"):
        out[key] = sum(mix[t] * per_task[t][key] for t in mix)
    out["emu3_8b"] = emu3_saving(mod, L)
    return out


def emu3_saving(mod: dict, demo_layers: int) -> dict:
    """The plan's capacities on Emu3-8B (32 layers: demo layer l covers layers l*32/L .. (l+1)*32/L - 1) for one
    Emu3-shaped sample per task: a 512x512 image is 64x64 VQ codes plus an EOL per row (t2i: 32 caption tokens;
    mmu: 16 question + 32 answer tokens), plain text 4,096 tokens."""
    from model.config import ModelConfig
    from model.flops import flops_forward

    L8 = 32
    cap = {}
    for layer, per in mod["capacity"].items():
        lo, hi = int(layer) * L8 // demo_layers, (int(layer) + 1) * L8 // demo_layers - 1
        cap[f"{lo}-{hi}"] = per
    cfg = ModelConfig.from_preset("emu3-8b", mod={**mod, "capacity": cap})
    codes = 64 * 64
    shapes = {"t2i": (1 + 32 + 3 + codes + 64 + 2, codes), "mmu": (1 + 3 + codes + 64 + 2 + 16 + 32, codes),
              "lm": (4096, 4096)}
    out = {"capacity": cap}
    for task, (S, routable) in shapes.items():
        if task not in cfg.mod.tasks:
            continue
        dense = flops_forward(cfg, S, [task], routable={task: routable}, dense=True, causal_attention=True).total
        planned = flops_forward(cfg, S, [task], routable={task: routable}, causal_attention=True).total
        out[task] = {"seq_len": S, "routable": routable, "saved": 1 - planned / dense}
    return out


def _fmt(agg: dict, key: str, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    if key not in agg:
        return "-"
    v, sd = agg[key] * scale, agg.get(f"{key}_sd")
    return f"{v:.{digits}f}" + (f" ± {sd * scale:.{digits}f}" if sd is not None else "") + unit


def render(result: dict, png: str) -> str:
    t, v, fc = result["table"], result["verdict"], result.get("flops_context") or {}
    lines = ["# UniMoD recipe on the demo data: dense pre-training, measured plan, MoD fine-tuning", "",
             f"Command: `{result['command']}`", "",
             f"Pre-training {result['pretrain_steps']} steps (dense); fine-tunes {result['finetune_steps']} steps "
             f"from it; plan: `{result['plan']['capacity']}` ({result['plan']['measure']}, target "
             f"{result['plan']['flops_target']}). Mean ± sample standard deviation over seeds where n > 1.", "",
             *[f"{row}: the plan for that target, `{cap}`." for row, cap in result.get("sweep_plans", {}).items()],
             "", "| row | seeds | steps | understanding % | generation % | text ppl | train FLOPs (TFLOP) | "
             "saved vs padding-free dense | step median (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for row, agg in t.items():
        lines.append(f"| {row} | {agg['seeds']} | {agg['steps']:.0f} | {_fmt(agg, 'understanding', 100)} | "
                     f"{_fmt(agg, 'generation', 100)} | {_fmt(agg, 'text_ppl', digits=3)} | "
                     f"{_fmt(agg, 'flops_actual', 1e-12, 2)} | {_fmt(agg, 'saved_vs_padding_free_dense_pct', unit='%')} | "
                     f"{_fmt(agg, 'step_time_median_s', digits=3)} |")
    lines += ["", "Verdict against the goal (computed, not asserted): UniMoD fine-tune within "
              f"{GOAL['max_gap_pts']} point of dense fine-tune on understanding and generation at >= "
              f"{GOAL['flops_saved_pct']:.0f}% fewer training FLOPs than the padding-free dense model, ahead of the "
              "shared router.", ""]
    for k, val in v.items():
        lines.append(f"- {k}: {round(val, 4) if isinstance(val, float) else val}")
    if fc:
        lines += ["", "FLOPs context (analytic, forward, per mean calibration sample; training mix = passes x "
                  "train-split tokens per task):", "",
                  f"- token mix of training: {', '.join(f'{k} {x:.1%}' for k, x in fc['token_mix'].items())}",
                  f"- the plan's saving on this mix: {fc['planned_saved']:.1%}; its ceiling (every routable token "
                  f"skipped in each task's MoD layers of the plan): {fc['ceiling_plan_layers']:.1%}; every routable "
                  f"token skipped in every layer: {fc['ceiling_every_layer']:.1%}",
                  f"- the same plan at Emu3-8B shapes (layers {', '.join(fc['emu3_8b']['capacity'])}): " +
                  ", ".join(f"{k} -{fc['emu3_8b'][k]['saved']:.1%} ({fc['emu3_8b'][k]['seq_len']} tokens)"
                            for k in ("t2i", "mmu", "lm") if k in fc["emu3_8b"])]
    if result.get("note"):
        lines += ["", result["note"]]
    lines += ["", f"![unimod recipe]({png})"]
    return "\n".join(lines)


def draw(table: dict, png: Path) -> None:
    seed_panels(png, table, [("understanding", "understanding accuracy (%)", 100),
                             ("generation", "generation accuracy, judge (%)", 100)],
                lambda r: r["flops_actual"] / 1e12 if r.get("flops_actual") is not None else None,
                "training FLOPs of the run (TFLOP)", "UniMoD recipe on the demo data")


def _without_note(argv: list[str]) -> list[str]:
    """The command line for the report, the --note text left out (it is printed under the table)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--note":
            skip = True
        elif not a.startswith("--note="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    runs = Path(args.runs_dir)
    t0 = time.perf_counter()
    if not args.report_only:
        run_all(args)
    table = summarise(runs, [*args.rows, *(target_row(t) for t in args.sweep_targets)])
    meas = json.loads((runs / "plan" / "measurements.json").read_text())
    rec = meas["plan"]["record"]
    result = {
        "command": " ".join(["bench/unimod_recipe.py", *_without_note(argv if argv is not None else sys.argv[1:])]),
        "pretrain_steps": args.pretrain_steps, "finetune_steps": args.finetune_steps,
        "plan": {"capacity": meas["plan"]["mod"]["capacity"], "measure": rec["measure"],
                 "flops_target": rec["parameters"].get("flops_target"), "stability": rec["stability"]},
        "sweep_plans": {target_row(t): json.loads((runs / f"plan_t{round(100 * t)}" / "measurements.json").read_text())
                        ["plan"]["mod"]["capacity"] for t in args.sweep_targets},
        "table": table, "verdict": verdict(table), "flops_context": flops_context(runs, args.data),
        "wall_s": time.perf_counter() - t0, "machine": machine_info(), "note": args.note,
    }
    publish(args.out, result, lambda png: draw(table, png), render)
    return result


if __name__ == "__main__":
    main()
