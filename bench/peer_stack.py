"""Our stack vs the one Emu3's authors use: transformers' `Emu3ForCausalLM` under DeepSpeed ZeRO-3
against our `UnifiedTransformer` under the same ZeRO-3 config, dense and with the demo UniMoD plan.

Same shapes (a preset), batch, precision and launcher for all; each variant is one multi-process job
of bench/peer_step.py (warm-up steps, then timed steps), and the variants alternate over `--rounds`
(order reversed every other round) so drift on a shared machine hits them alike. Reports median step
time, tokens/s and peak memory (max RSS per rank on CPU, max allocated on GPU), and the ratios:

    speed-up = their dense step time / our step time     (goal: dense >= 1.0, UniMoD >= 1.5)
    memory   = our peak / their peak

    # CPU (2 processes, gloo, fp32; ~5 min):
    .venv/bin/python bench/peer_stack.py --out bench/results/peer_cpu.json
    # GPU node (8 GPUs, bf16; Emu3-like shapes):
    python bench/peer_stack.py --launcher torchrun --nproc 8 --preset emu3-1b --mod-layers 8-15 \\
        --seq-len 4096 --micro-batch 2 --dtype bf16 --threads 0 --ds-config ds_configs/zero3_bf16.json \\
        --out bench/results/peer_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import bar_panels, machine_info, publish  # noqa: E402

# name -> bench/peer_step.py arguments
VARIANTS = {
    "hf_dense": ["--model", "hf"],
    "ours_dense": ["--model", "ours"],
    "ours_unimod": ["--model", "ours", "--mod", "demo"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launcher", default="deepspeed", choices=("deepspeed", "torchrun"))
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) on this machine")
    p.add_argument("--preset", default="demo")
    p.add_argument("--mod-layers", help="UniMoD layer range when the preset is not 8 layers deep")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (0: leave torch's default)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2, help="each variant runs once per round")
    p.add_argument("--ds-config", default=str(REPO / "ds_configs" / "zero3_cpu.json"))
    p.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: s.split(","))
    p.add_argument("--out", required=True, help="JSON path (.md and .png written next to it)")
    args = p.parse_args(argv)
    if unknown := set(args.variants) - set(VARIANTS):
        p.error(f"--variants: unknown {sorted(unknown)}; known {list(VARIANTS)}")
    if args.rounds < 1 or args.nproc < 1:
        p.error("--rounds and --nproc must be >= 1")
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_variant(args: argparse.Namespace, name: str, out: Path) -> dict:
    bin_dir = Path(sys.executable).parent
    port = str(free_port())
    if args.launcher == "deepspeed":
        launch = [str(bin_dir / "deepspeed"), "--num_gpus", str(args.nproc), "--master_port", port]
    else:
        launch = [str(bin_dir / "torchrun"), "--nproc_per_node", str(args.nproc), "--master_port", port]
    cmd = [*launch, str(REPO / "bench" / "peer_step.py"), *VARIANTS[name],
           "--preset", args.preset, "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
           "--dtype", args.dtype, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--ds-config", args.ds_config, "--out", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.checkpointing:
        cmd.append("--checkpointing")
    if args.mod_layers and "--mod" in VARIANTS[name]:
        cmd += ["--mod-layers", args.mod_layers]
    env = os.environ.copy()
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    if args.threads:  # one rank per core: keep OpenMP from oversubscribing the shared cores
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{name}: {' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    print(next((l for l in proc.stdout.splitlines() if l.lstrip().startswith("[peer]") or "] [peer]" in l), name), flush=True)
    return json.loads(out.read_text())


def summarise(runs: dict[str, list[dict]]) -> dict[str, dict]:
    s = {}
    for name, rs in runs.items():
        step = statistics.median(r["median_step_s"] for r in rs)
        s[name] = {
            "median_step_s": step,
            "min_step_s": min(r["min_step_s"] for r in rs),
            "per_round_median_step_s": [r["median_step_s"] for r in rs],
            "tokens_per_s": rs[0]["tokens_per_step"] / step,
            "peak_rss_gib": max(max(r["max_rss_gib_by_rank"]) for r in rs),
            "peak_rss_above_start_gib": max(max(a - b for a, b in zip(r["max_rss_gib_by_rank"], r["rss_before_build_gib_by_rank"]))
                                            for r in rs),
            "gpu_peak_allocated_gib": (max(max(r["gpu_max_allocated_gib_by_rank"]) for r in rs)
                                       if rs[0]["gpu_max_allocated_gib_by_rank"] else None),
            "parameters": rs[0]["parameters"],
            "flops_per_step": rs[0]["flops_per_step"],
            "tflops_per_device": rs[0]["flops_per_step"] / (step * rs[0]["world_size"]) / 1e12,
            "mfu": statistics.median(r["mfu"] for r in rs) if rs[0]["mfu"] is not None else None,
            "zero3_partitioned": all(r["zero3_partitioned"] for r in rs),
            "final_loss": rs[-1]["final_loss"],
        }
    return s


def ratios(s: dict[str, dict]) -> dict[str, float]:
    if "hf_dense" not in s:
        return {}
    base = s["hf_dense"]
    out = {}
    for name in s:
        if name == "hf_dense":
            continue
        out[f"{name}_speedup_vs_hf_dense"] = base["median_step_s"] / s[name]["median_step_s"]
        out[f"{name}_speedup_vs_hf_dense_min"] = base["min_step_s"] / s[name]["min_step_s"]
        out[f"{name}_peak_rss_ratio_vs_hf_dense"] = s[name]["peak_rss_gib"] / base["peak_rss_gib"]
        out[f"{name}_peak_rss_above_start_ratio_vs_hf_dense"] = (s[name]["peak_rss_above_start_gib"]
                                                                  / base["peak_rss_above_start_gib"])
        if base["gpu_peak_allocated_gib"]:
            out[f"{name}_gpu_memory_ratio_vs_hf_dense"] = s[name]["gpu_peak_allocated_gib"] / base["gpu_peak_allocated_gib"]
    return out


def plot(s: dict[str, dict], png: Path) -> None:
    names = list(s)
    panels = [(title, [s[n][key] for n in names]) for title, key in [
        ("median step time (s)", "median_step_s"), ("tokens/s", "tokens_per_s"), ("peak RSS per rank (GiB)", "peak_rss_gib")]]
    bar_panels(png, names, panels, ["#777777", "#1f77b4", "#2ca02c"][: len(names)], height=3.2)


def markdown(result: dict, png_name: str) -> str:
    st, s = result["setting"], result["summary"]
    lines = [f"# Peer: HF Emu3ForCausalLM + ZeRO-3 vs ours + ZeRO-3 ({st['device_kind']})", "",
             f"Preset `{st['preset']}`, {st['nproc']} ranks via `{st['launcher']}`, {st['dtype']}, seq_len "
             f"{st['seq_len']} x micro-batch {st['micro_batch']} per rank (rank tasks: t2i, mmu), activation "
             f"checkpointing {'on' if st['checkpointing'] else 'off'}, {st['threads'] or 'default'} thread(s) per rank, "
             f"{st['warmup']} warm-up + {st['steps']} timed steps x {st['rounds']} rounds, torch AdamW, `{st['ds_config']}`.", "",
             "| variant | parameters | FLOPs/step | median step (s) | min step (s) | tokens/s | TFLOP/s/rank | MFU | "
             "speed-up vs HF dense | peak RSS/rank (GiB) | RSS above start (GiB) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = s.get("hf_dense")
    for n, x in s.items():
        sp = f"{base['median_step_s'] / x['median_step_s']:.2f}x" if base else "-"
        mfu = f"{100 * x['mfu']:.1f}%" if x["mfu"] is not None else "-"
        lines.append(f"| {n} | {x['parameters'] / 1e6:.2f}M | {x['flops_per_step']:.3e} | {x['median_step_s']:.3f} | "
                     f"{x['min_step_s']:.3f} | {x['tokens_per_s']:.0f} | {x['tflops_per_device']:.4f} | {mfu} | {sp} | "
                     f"{x['peak_rss_gib']:.2f} | {x['peak_rss_above_start_gib']:.2f} |")
    lines += ["", "Ratios:", ""] + [f"- {k}: {v:.3f}" for k, v in result["ratios"].items()]
    lines += ["", f"Load average before / after: {result['load_before']} / {result['load_after']}", "",
              f"![peer]({png_name})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from bench.report import load_average

    load_before = load_average()
    runs: dict[str, list[dict]] = {n: [] for n in args.variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = args.variants if r % 2 == 0 else args.variants[::-1]
            for name in order:
                runs[name].append(run_variant(args, name, Path(tmp) / f"{name}_{r}.json"))
    summary = summarise(runs)
    result = {
        "setting": {k: v for k, v in vars(args).items() if k != "out"} | {
            "device_kind": "GPU" if runs[args.variants[0]][0]["device"].startswith("cuda") else "CPU"},
        "machine": machine_info(),
        "load_before": load_before,
        "load_after": load_average(),
        "runs": runs,
        "summary": summary,
        "ratios": ratios(summary),
    }
    publish(args.out, result, lambda png: plot(summary, png), markdown)
    return result


if __name__ == "__main__":
    main()
