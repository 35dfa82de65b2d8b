"""Does an MoE MLP cost what its active experts cost? MoEMLP's sorted dispatch (model/moe.py) against the dense
SwiGLU MLP of the same active width, forward + backward, measured in one process.

    .venv/bin/python bench/moe_speed.py --out bench/results/moe_speed_cpu.json               # 2-core CPU, ~3 min
    python bench/moe_speed.py --device cuda --dtype bf16 --shapes emu3-1b,emu3-8b --tokens 8192 \\
        --out bench/results/moe_speed_gpu.json

Per shape (hidden D, MLP width F of a preset) and top-k of E experts, on N tokens of 3 tasks:

    dense_full     the dense MLP, width F
    dense_active   a dense MLP of width F * k / E: what the experts a token uses cost, the ideal
    moe            MoEMLP.dispatch (task-aware router, no capacity limit): router, one argsort, E expert slices
                   run one after the other (a Python loop over experts, never over tokens), one index_add

    overhead = time(moe) / time(dense_active)      1.0 = dispatch is free; the FLOPs ratio of the two is ~1
    speedup  = time(dense_full) / time(moe)        what the MoE layer saves against the dense MLP it replaces

The three alternate per repeat (drift hits all alike) and the medians of wall time are reported, with this
process's CPU time beside them for a shared CPU. A zero router would send every token to the same k experts;
the router here is random (std 1), so the slots spread over the experts as in a trained model.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import bar_panels, machine_info, publish  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.layers import MLP  # noqa: E402
from model.moe import MoEMLP  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="demo,emu3-1b", help="model presets whose hidden and MLP width are used")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", default="1,2,4", help="comma list of active experts")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=str(REPO / "runs" / "bench" / "moe_speed.json"))
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.top_k = [int(k) for k in args.top_k.split(",") if k.strip()]
    if any(not 1 <= k <= args.experts for k in args.top_k):
        p.error(f"--top-k values must be in [1, --experts={args.experts}]")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(shape: str, E: int, k: int, args) -> dict:
    device, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cfg = ModelConfig.from_preset(shape)
    D, Fn, T = cfg.hidden_size, cfg.intermediate_size, 3
    if Fn % E:
        raise ValueError(f"{shape}: {E} experts do not divide the MLP width {Fn}")
    torch.manual_seed(0)
    full = MLP(cfg).to(device, dtype)
    active = MLP(cfg.replace(intermediate_size=Fn * k // E)).to(device, dtype)
    moe = MoEMLP.from_dense(full, torch.rand(Fn), E, k, num_tasks=T, router="task").to(device, dtype)
    with torch.no_grad():
        moe.router.weight.normal_(0.0, 1.0)
    x = torch.randn(args.tokens, D, device=device, dtype=dtype, requires_grad=True)
    task = torch.randint(0, T, (args.tokens,), device=device)

    def dense_step(mlp):
        def step():
            mlp.zero_grad(set_to_none=True)
            mlp(x).float().square().mean().backward()
        return step

    def moe_step():
        moe.zero_grad(set_to_none=True)
        y, _, _ = moe.dispatch(x, task, apply_capacity=False)
        y.float().square().mean().backward()

    steps = {"dense_full": dense_step(full), "dense_active": dense_step(active), "moe": moe_step}
    for _ in range(args.warmup):
        for s in steps.values():
            s()
    _sync(device)
    wall = {n: [] for n in steps}
    cpu = {n: [] for n in steps}
    for _ in range(args.repeats):
        for name, s in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            s()
            _sync(device)
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
    with torch.no_grad():
        chosen, _ = moe.route(x, task)
        load = torch.bincount(chosen.reshape(-1), minlength=E).float()
    med = {n: statistics.median(v) for n, v in wall.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    # forward+backward matmul FLOPs: 3 matmuls of 2*N*D*width each way, x3 (forward, two backward)
    flops = {"dense_full": 18 * args.tokens * D * Fn, "dense_active": 18 * args.tokens * D * Fn * k // E}
    flops["moe"] = flops["dense_active"] + 3 * 2 * args.tokens * D * E * T  # + the router, all task blocks
    return {"shape": shape, "hidden": D, "mlp_width": Fn, "experts": E, "top_k": k, "tokens": args.tokens,
            "wall_median_s": med, "cpu_median_s": med_cpu, "flops": flops,
            "overhead": med["moe"] / med["dense_active"], "overhead_cpu": med_cpu["moe"] / med_cpu["dense_active"],
            "speedup_vs_full": med["dense_full"] / med["moe"],
            "busiest_expert_x_E": float(load.max() / load.mean())}


def render(result: dict, png: str) -> str:
    lines = ["# MoE dispatch against the dense MLP of the same active width", "",
             f"`{result['command']}`; {result['device']} {result['dtype']}, {result['threads']} thread(s); forward + "
             "backward medians.", "",
             "| shape (D, F) | k of E | tokens | dense F (ms) | dense F·k/E (ms) | MoE (ms) | overhead (wall / cpu) | "
             "speed-up vs dense F | busiest expert x E |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        m = r["wall_median_s"]
        lines.append(f"| {r['shape']} ({r['hidden']}, {r['mlp_width']}) | {r['top_k']} of {r['experts']} | "
                     f"{r['tokens']} | {1e3 * m['dense_full']:.2f} | {1e3 * m['dense_active']:.2f} | "
                     f"{1e3 * m['moe']:.2f} | {r['overhead']:.2f} / {r['overhead_cpu']:.2f} | "
                     f"{r['speedup_vs_full']:.2f} | {r['busiest_expert_x_E']:.2f} |")
    lines += ["", "overhead = MoE time / dense-at-active-width time (1.0: the dispatch costs nothing beyond the "
              "experts' matmuls; the router adds under 1% of the FLOPs at these shapes).", "", f"![moe speed]({png})"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(shape, args.experts, k, args) for shape in args.shapes for k in args.top_k]
    result = {"command": " ".join(["bench/moe_speed.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": args.device, "dtype": args.dtype, "threads": args.threads, "rows": rows,
              "machine": machine_info()}
    names = [f"{r['shape']} k{r['top_k']}" for r in rows]
    publish(args.out, result, lambda png: bar_panels(
        png, names, [("MoE time / dense at active width", [r["overhead"] for r in rows]),
                     ("dense full width time / MoE time", [r["speedup_vs_full"] for r in rows])],
        ["tab:blue"] * len(rows), label_rotation=30), render)
    return result


if __name__ == "__main__":
    main()
