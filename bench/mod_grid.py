"""MoD realisation grid: bench/mod_speed.py over sequence lengths, capacities and MoD layer counts.

One factor at a time around a base setting (t2i, S=1024, capacity 0.2, MoD in the last half of the
layers), each setting timed by `mod_speed.main` (dense and MoD steps alternating, warm-up excluded),
collected into one JSON with a Markdown table and a plot of R = time ratio / FLOPs ratio per setting.

    .venv/bin/python bench/mod_grid.py --threads 1 --out bench/results/mod_grid_cpu.json       # ~5 min
    python bench/mod_grid.py --device cuda --dtype bf16 --preset emu3-1b --seq-lens 2048,4096,8192 \\
        --base-seq-len 4096 --out bench/results/mod_grid_h100.json

`--layers` takes MoD layer counts; n means the last n layers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import mod_speed  # noqa: E402
from bench.report import load_average, machine_info, publish  # noqa: E402
from model import ModelConfig  # noqa: E402

ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
floats = lambda s: [float(x) for x in s.split(",")]  # noqa: E731


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--task", default="t2i")
    p.add_argument("--seq-lens", type=ints, default=[512, 1024, 2048])
    p.add_argument("--capacities", type=floats, default=[0.1, 0.2, 0.5])
    p.add_argument("--layers", type=ints, help="MoD layer counts (last n layers); default L/4, L/2, 3L/4")
    p.add_argument("--base-seq-len", type=int, default=1024)
    p.add_argument("--base-capacity", type=float, default=0.2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--threads", type=int)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def settings(args: argparse.Namespace) -> list[dict]:
    """Unique (seq_len, capacity, n_layers) triples, one factor varied at a time."""
    L = ModelConfig.from_preset(args.preset).num_hidden_layers
    layer_counts = args.layers or sorted({max(1, L // 4), L // 2, (3 * L) // 4})
    base = dict(seq_len=args.base_seq_len, capacity=args.base_capacity, n_layers=L // 2)
    grid = [dict(base, seq_len=s, factor="seq_len") for s in args.seq_lens]
    grid += [dict(base, capacity=c, factor="capacity") for c in args.capacities]
    grid += [dict(base, n_layers=n, factor="mod_layers") for n in layer_counts]
    seen, out = set(), []
    for g in grid:
        key = (g["seq_len"], g["capacity"], g["n_layers"])
        if key in seen:  # the base appears in every factor; time it once, list it under each
            next(o for o in out if (o["seq_len"], o["capacity"], o["n_layers"]) == key)["factors"].append(g["factor"])
            continue
        seen.add(key)
        out.append({**{k: g[k] for k in ("seq_len", "capacity", "n_layers")}, "factors": [g["factor"]],
                    "mod_layers": f"{L - g['n_layers']}-{L - 1}"})
    return out


def run_one(args: argparse.Namespace, s: dict, tmp: str) -> dict:
    argv = ["--preset", args.preset, "--task", args.task, "--seq-len", str(s["seq_len"]),
            "--capacity", str(s["capacity"]), "--mod-layers", s["mod_layers"], "--device", args.device,
            "--dtype", args.dtype, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
            "--out", str(Path(tmp) / "one.json")]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    load0 = load_average()
    r = mod_speed.main(argv)
    return {**s, "load_before": load0, "load_after": load_average(),
            "flops_ratio": r["flops_ratio"], "flops_ratio_causal_attention": r["flops_ratio_causal_attention"],
            "time_ratio": r["time_ratio"], "R": r["R"], "R_causal_attention": r["R_causal_attention"],
            "R_other_estimators": r["R_other_estimators"], "median_s": r["median_s"],
            "image_tokens_per_sequence": r["image_tokens_per_sequence"],
            "flops_total": {k: v["total"] for k, v in r["flops"].items()},
            "mod_saved_vs_dense_baseline_pct": r["mod_saved_vs_dense_baseline_pct"]}


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    factors = [("seq_len", "sequence length"), ("capacity", "capacity"), ("mod_layers", "MoD layers (last n)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4), sharey=True)
    for ax, (factor, label) in zip(axes, factors):
        sub = sorted((r for r in rows if factor in r["factors"]), key=lambda r: r[{"mod_layers": "n_layers"}.get(factor, factor)])
        x = [r[{"mod_layers": "n_layers"}.get(factor, factor)] for r in sub]
        for key, style, name in (("R", "o-", "R (wall median)"), ("R_causal_attention", "s--", "R causal-aware"),
                                 (None, "^:", "R (CPU-time median)")):
            y = [r[key] if key else r["R_other_estimators"].get("cpu_median", float("nan")) for r in sub]
            ax.plot(x, y, style, label=name)
        ax.axhline(0.95, color="green", lw=0.8, label="goal 0.95")
        ax.axhline(0.76, color="red", lw=0.8, label="UniMoD paper 0.76")
        ax.set_xlabel(label)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("R = time ratio / FLOPs ratio")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def markdown(result: dict, png_name: str) -> str:
    lines = [f"# MoD realisation grid ({result['device']}, {result['dtype']}, preset {result['preset']}, "
             f"task {result['task']}, {result['threads']} thread(s))", "",
             "Command: `" + result["command"] + "`", "",
             "| S | capacity | MoD layers | varied | FLOPs ratio | time ratio | R | R causal-aware | R CPU-time (median/min) "
             "| dense s | MoD s | load |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        o = r["R_other_estimators"]
        lines.append(f"| {r['seq_len']} | {r['capacity']} | {r['mod_layers']} | {', '.join(r['factors'])} | "
                     f"{r['flops_ratio']:.3f} | {r['time_ratio']:.3f} | **{r['R']:.3f}** | {r['R_causal_attention']:.3f} | "
                     f"{o.get('cpu_median', float('nan')):.3f} / {o.get('cpu_min', float('nan')):.3f} | "
                     f"{r['median_s']['dense']:.3f} | {r['median_s']['mod']:.3f} | {r['load_before'][0]} |")
    lines += ["", f"Median R over the grid: wall {result['median_R']:.3f}, causal-aware "
              f"{result['median_R_causal_attention']:.3f}, CPU-time {result['median_R_cpu_time']:.3f}.", "",
              f"![R per setting]({png_name})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    grid = settings(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, s in enumerate(grid):
            print(f"--- [{i + 1}/{len(grid)}] S={s['seq_len']} capacity={s['capacity']} MoD layers {s['mod_layers']}", flush=True)
            rows.append(run_one(args, s, tmp))
    result = {
        "preset": args.preset, "task": args.task, "device": args.device, "dtype": args.dtype,
        "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
        "command": " ".join(["bench/mod_grid.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine_info(),
        "rows": rows,
        "median_R": statistics.median(r["R"] for r in rows),
        "median_R_causal_attention": statistics.median(r["R_causal_attention"] for r in rows),
        "median_R_cpu_time": statistics.median(r["R_other_estimators"].get("cpu_median", float("nan")) for r in rows),
    }
    publish(args.out, result, lambda png: plot(rows, png), markdown)
    return result


if __name__ == "__main__":
    main()
