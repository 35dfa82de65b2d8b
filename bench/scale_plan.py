"""Scale on paper: the capacity planner (tools/capacity.py) for the Emu3-8B UniMoD run and its dense twin,
on 1, 4 and 16 nodes of 8 x 80 GB GPUs, ZeRO-3 and pipeline parallel, in one table.

The dense twin is the same run config with the MoD capacities removed (`model.mod.capacity={}`), so
memory, FLOPs and step time differ only by MoD. Step times assume the planner's MFU on an H100's
dense bf16 peak; they are estimates from FLOPs, not measurements.

    .venv/bin/python bench/scale_plan.py --out bench/results/scale_plan_emu3_8b.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import write_markdown  # noqa: E402
from train.config import RunConfig  # noqa: E402
from tools.capacity import GiB, format_plan, plan  # noqa: E402

ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "train" / "configs" / "emu3_8b_unimod.yaml"))
    p.add_argument("--nodes", type=ints, default=[1, 4, 16])
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--pipeline-stages", type=int, default=4)
    p.add_argument("--assumed-mfu", type=float, default=0.4)
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def one_plan(cfg: RunConfig, args: argparse.Namespace, nodes: int):
    return plan(cfg, nodes=nodes, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib,
                assumed_mfu=args.assumed_mfu)


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
    for mode, style in (("zero", "-"), ("pipeline", "--")):
        for variant, marker in (("dense", "s"), ("unimod", "o")):
            sub = [r for r in rows if r["mode"] == mode and r["variant"] == variant]
            x = [r["gpus"] for r in sub]
            a1.plot(x, [r["tokens_per_s"] / 1e3 for r in sub], style, marker=marker, label=f"{variant} {mode}")
            a2.plot(x, [r["memory_per_gpu_gib"] for r in sub], style, marker=marker, label=f"{variant} {mode}")
    a2.axhline(rows[0]["gpu_memory_gib"], color="red", lw=0.8, label="GPU memory")
    for ax, title in ((a1, "tokens/s (thousands, planner estimate)"), (a2, "memory per GPU (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("GPUs (8 per node)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    layouts = {"zero": ["parallel.mode=zero", "parallel.pipeline_stages=1"],
               "pipeline": ["parallel.mode=pipeline", f"parallel.pipeline_stages={args.pipeline_stages}"]}
    variants = {"unimod": [], "dense": ["model.mod.capacity={}"]}
    configs = {(mode, name): RunConfig.load(args.config, layout + extra)
               for mode, layout in layouts.items() for name, extra in variants.items()}
    rows, texts = [], {}
    for nodes in args.nodes:
        for mode in layouts:
            for name in variants:
                p = one_plan(configs[mode, name], args, nodes)
                texts[f"{name} {mode} {nodes} node(s)"] = format_plan(p)
                rows.append({
                    "variant": name, "mode": mode, "nodes": nodes, "gpus": p.num_gpus,
                    "pipeline_stages": p.pipeline_stages, "data_parallel": p.data_parallel,
                    "params_total": p.params_total, "memory_per_gpu_gib": p.total_bytes_per_gpu / GiB,
                    "memory_terms_gib": {k: v / GiB for k, v in p.memory_per_gpu.items()},
                    "gpu_memory_gib": p.gpu_memory_gib, "fits": p.fits,
                    "global_batch": p.global_batch, "tokens_per_step": p.tokens_per_step,
                    "flops_per_step": p.flops_mod, "step_time_s": p.step_time_mod_s, "tokens_per_s": p.tokens_per_s_mod,
                    "notes": p.notes,
                })
    for r in rows:  # UniMoD's planned speed-up over its dense twin at the same layout
        twin = next(d for d in rows if d["variant"] == "dense" and d["mode"] == r["mode"] and d["nodes"] == r["nodes"])
        r["speedup_vs_dense"] = twin["step_time_s"] / r["step_time_s"]
        r["flops_saved_vs_dense_pct"] = 100 * (1 - r["flops_per_step"] / twin["flops_per_step"])
    cfg = configs["zero", "unimod"]
    result = {"config": str(Path(args.config).relative_to(REPO)) if Path(args.config).is_relative_to(REPO) else args.config,
              "seq_len": cfg.data.seq_len, "micro_batch_size": cfg.data.micro_batch_size,
              "grad_accum": cfg.optim.grad_accum, "precision": cfg.parallel.precision,
              "activation_checkpointing": cfg.parallel.activation_checkpointing, "assumed_mfu": args.assumed_mfu,
              "rows": rows, "plans": texts}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot(rows, out.with_suffix(".png"))
    lines = [f"# Scale on paper: Emu3-8B UniMoD vs dense ({result['config']})", "",
             f"seq_len {result['seq_len']}, micro-batch {result['micro_batch_size']}, grad_accum {result['grad_accum']}, "
             f"{result['precision']}, activation checkpointing {'on' if result['activation_checkpointing'] else 'off'}, "
             f"{args.gpus_per_node} x {args.gpu_memory_gib:.0f} GiB GPUs per node, pipeline = {args.pipeline_stages} stages "
             f"+ ZeRO-1; step time at {100 * args.assumed_mfu:.0f}% MFU of the H100 bf16 peak (an estimate).", "",
             "Command: `.venv/bin/python bench/scale_plan.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
             "| nodes | GPUs | mode | variant | memory/GPU (GiB) | fits | global batch (tokens) | FLOPs/step | step (s) | "
             "tokens/s | vs dense |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mode = "ZeRO-3" if r["mode"] == "zero" else f"PP{r['pipeline_stages']} x DP{r['data_parallel']}"
        lines.append(f"| {r['nodes']} | {r['gpus']} | {mode} | {r['variant']} | {r['memory_per_gpu_gib']:.1f} | "
                     f"{'yes' if r['fits'] else 'NO'} | {r['tokens_per_step']:,} | {r['flops_per_step']:.3e} | "
                     f"{r['step_time_s']:.2f} | {r['tokens_per_s']:,.0f} | {r['speedup_vs_dense']:.2f}x |")
    lines += ["", f"![scale]({out.with_suffix('.png').name})", "", "## Planner output per row", ""]
    for k, t in texts.items():
        lines += [f"<details><summary>{k}</summary>", "", "```", t, "```", "", "</details>", ""]
    text = "\n".join(lines)
    write_markdown(out.with_suffix(".md"), text)
    print("\n".join(lines[: 8 + len(rows)]))
    return result


if __name__ == "__main__":
    main()
