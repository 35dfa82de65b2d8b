"""Training step time with and without `torch.compile` of the decoder blocks (`run.compile`, model/compile.py).

Runs train/main.py on a run config (default: the README's main job, train/configs/demo.yaml) for a number of
steps with `run.compile` false and true, alternating which goes first in each repeat so that drift on a shared
machine hits both alike, and reads each step's `time/step_s` from the run's metrics.jsonl:

    step time    median over the steps after --warmup (the compiled run's first steps include the compile)
    paired       median over those steps of compiled / eager time of the same step: both runs train on the same
                 micro-batches in the same order (task and width differ from step to step), so this ratio
                 compares like with like
    compile      the compiled run's time above its median step, summed over all steps, less the same for the eager
                 run: Dynamo + Inductor compiling the block's graphs (in step 1, and at the first micro-batch of
                 packed rows, whose masked graph is the second one), wherever they land
    recompiles   "Recompiling function" lines of TORCH_LOGS=recompiles over the whole run (0 expected)
    loss         mean loss/total of the last 50 steps: the two runs' step losses agree to round-off at first and
                 drift apart as round-off compounds over hundreds of steps, so only their level compares

Each compiled run gets an empty Inductor cache (TORCHINDUCTOR_CACHE_DIR in a temporary directory), so its first
step shows the compile a user's first run pays; `--warm-cache` keeps the user's cache instead.

    .venv/bin/python bench/compile_speed.py --dataset demo_data --out bench/results/compile_cpu
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from bench.report import load_average, machine_info, write_markdown  # noqa: E402


def one_run(args, compiled: bool, scratch: Path) -> dict:
    out = scratch / f"run_{'compiled' if compiled else 'eager'}_{time.time_ns()}"
    sets = {
        "data.dataset_dir": args.dataset, "run.output_dir": out, "run.device": "cpu", "run.max_steps": args.steps,
        "run.compile": str(compiled).lower(), "logging.log_every": 1, "logging.eval_every": 0,
        "logging.eval_at_end": "false", "logging.progress_bar": "false", "checkpoint.save_every": 0,
        "checkpoint.export_hf": "false", "checkpoint.resume": "none",
    }
    cmd = [sys.executable, str(REPO / "train" / "main.py"), "--config", str(args.config)]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    for item in args.set:
        cmd += ["--set", item]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_LOGS": "recompiles", "PYTHONUNBUFFERED": "1"}
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = str(args.threads)
    cache = None
    if compiled and not args.warm_cache:
        cache = tempfile.TemporaryDirectory(prefix="inductor_", dir=scratch)
        env["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if cache is not None:
        cache.cleanup()
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"train/main.py exited {proc.returncode}:\n{' '.join(cmd)}\n{log[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["time/step_s"] for r in records]
    after = steps[args.warmup:]
    return {
        "compiled": compiled,
        "wall_s": wall,
        "first_step_s": steps[0],
        "above_median_s": sum(steps) - len(steps) * statistics.median(after),
        "total_step_s": sum(steps),
        "median_step_s": statistics.median(after),
        "mean_step_s": statistics.fmean(after),
        "steps_s": steps,
        "losses": [r["loss/total"] for r in records],
        "loss_last_50_mean": statistics.fmean(r["loss/total"] for r in records[-50:]),
        "recompiles": log.count("Recompiling function"),
        "compile_log_line": next((line.strip() for line in log.splitlines() if "torch.compile of the decoder" in line),
                                 None),
        "load_average_1_5_15": load_average(),
    }


def paired(eager: dict, compiled: dict, warmup: int) -> float:
    """Median over the steps after `warmup` of compiled / eager time of the same step."""
    return statistics.median(k / e for e, k in zip(eager["steps_s"][warmup:], compiled["steps_s"][warmup:]))


def render(result: dict) -> str:
    c, rows = result["config"], result["repeats"]
    lines = [
        "# torch.compile of the decoder blocks: training step time on CPU",
        "",
        f"`{c['config']}` through train/main.py ({c['steps']} steps per run, step times after the first "
        f"{c['warmup']} steps; {c['threads'] or 'default'} torch thread(s); runs alternate, each compiled run with "
        f"{'a warm' if c['warm_cache'] else 'an empty'} Inductor cache). The 2-core machine is shared with other "
        "jobs, so single numbers are noisy: compare within a repeat.",
        "",
        "| repeat | eager step (ms, median) | compiled step (ms, median) | compiled / eager (paired) "
        "| first step (s, eager / compiled) | compile (s) | recompiles (eager / compiled) "
        "| loss, last 50 steps (eager / compiled) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        e, k = r["eager"], r["compiled"]
        lines.append(f"| {i + 1} | {1e3 * e['median_step_s']:.1f} | {1e3 * k['median_step_s']:.1f} | "
                     f"{paired(e, k, c['warmup']):.3f} | {e['first_step_s']:.2f} / {k['first_step_s']:.2f} | "
                     f"{k['above_median_s'] - e['above_median_s']:.1f} | {e['recompiles']} / {k['recompiles']} | "
                     f"{e['loss_last_50_mean']:.4f} / {k['loss_last_50_mean']:.4f} |")
    s = result["summary"]
    payback = (f"which {s['breakeven_steps']} steps pay back" if s["breakeven_steps"] is not None
               else "never paid back at this speed")
    agree = [next((i for i, (a, b) in enumerate(zip(r["eager"]["losses"], r["compiled"]["losses"]))
                   if abs(a - b) > 1e-4), len(r["eager"]["losses"])) for r in rows]
    lines += [
        "",
        f"Median over repeats: eager **{1e3 * s['eager_median_step_s']:.1f} ms**, compiled "
        f"**{1e3 * s['compiled_median_step_s']:.1f} ms** per step; compiled / eager step by step "
        f"**{s['ratio']:.3f}** ({s['speedup_pct']:+.1f}% speed). The compile costs {s['compile_s']:.1f} s "
        f"(median), {payback}.",
        "",
        f"Losses: the two runs train on the same micro-batches; their step losses agree within 1e-4 for the first "
        f"{min(agree)} steps, then drift apart as the compiled kernels' different summation order compounds, so "
        "only the level of the last steps compares.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Machine: {result['machine'].get('lscpu Model name', '?')}, {result['machine'].get('cpu_count')} cores, "
        f"torch {result['machine']['torch']}, deepspeed {result['machine'].get('deepspeed')}; load before "
        f"{result['machine']['load_average_1_5_15']}.",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "train" / "configs" / "demo.yaml"))
    p.add_argument("--dataset", default="demo_data", help="data.dataset_dir (python -m data.prepare demo --out ...)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the step time (compile, warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs (0: torch's default)")
    p.add_argument("--warm-cache", action="store_true", help="keep the user's Inductor cache for compiled runs")
    p.add_argument("--set", action="append", default=[], help="extra train/main.py overrides")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "compile_cpu"),
                   help="writes OUT.json and OUT.md")
    args = p.parse_args()
    args.threads = args.threads or None
    machine = machine_info()
    repeats = []
    with tempfile.TemporaryDirectory(prefix="compile_speed_") as scratch:
        for i in range(args.repeats):
            order = (False, True) if i % 2 == 0 else (True, False)
            rep = {}
            for compiled in order:
                rep["compiled" if compiled else "eager"] = r = one_run(args, compiled, Path(scratch))
                print(f"[compile_speed] repeat {i + 1} {'compiled' if compiled else 'eager'}: median step "
                      f"{1e3 * r['median_step_s']:.1f} ms, first step {r['first_step_s']:.2f} s, "
                      f"{r['recompiles']} recompiles, mean loss of the last 50 steps {r['loss_last_50_mean']:.4f}",
                      flush=True)
            repeats.append(rep)
    eager = statistics.median(r["eager"]["median_step_s"] for r in repeats)
    comp = statistics.median(r["compiled"]["median_step_s"] for r in repeats)
    compile_s = statistics.median(r["compiled"]["above_median_s"] - r["eager"]["above_median_s"] for r in repeats)
    ratio = statistics.median(paired(r["eager"], r["compiled"], args.warmup) for r in repeats)
    saved = eager * (1.0 - ratio)
    summary = {"eager_median_step_s": eager, "compiled_median_step_s": comp, "ratio": ratio,
               "speedup_pct": 100.0 * (1.0 / ratio - 1.0), "compile_s": compile_s,
               "breakeven_steps": round(compile_s / saved) if saved > 0 else None}
    result = {
        "config": {"config": os.path.relpath(args.config, REPO), "dataset": args.dataset, "steps": args.steps,
                   "warmup": args.warmup, "repeats": args.repeats, "threads": args.threads,
                   "warm_cache": args.warm_cache, "set": args.set},
        "command": " ".join(["python", "bench/compile_speed.py", *sys.argv[1:]]),
        "machine": machine,
        "repeats": repeats,
        "summary": summary,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    text = render(result)
    write_markdown(out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
