"""Peak memory of a training step with the full logits vs the chunked LM head + loss (model/loss.py).

One forward + backward of `UnifiedTransformer` at the emu3-1b preset's widths (hidden 2048, MLP 5632,
16/4 heads) with Emu3's real vocabulary (184,622 ids), layers reduced so that it fits a 24 GiB CPU machine,
on one micro-batch of Emu3-layout t2i rows, in two ways:

    full     out = net(ids, task_ids=...); causal_lm_loss(out.logits, labels)    (the [B,S,V] logits)
    chunked  out = net(ids, task_ids=..., labels=labels); out.loss                (what training runs)

Each way runs in a fresh process of this script, which reports its peak resident memory (VmHWM, reset with
/proc/self/clear_refs once the model and the batch are built) above what it held at that point, and on CUDA
the peak allocated bytes; the parent checks that both losses agree and writes JSON + Markdown:

    .venv/bin/python bench/loss_memory.py --out bench/results/loss_memory_cpu.json        # ~4 min on 2 cores
    python bench/loss_memory.py --device cuda --dtype bf16 --layers 16 --batch 2 --seq-len 4096 \\
        --out bench/results/loss_memory_gpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("full", "chunked")
DTYPES = ("fp32", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="emu3-1b")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (the preset's widths are kept)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2, help="rows per micro-batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one measurement, in a child
    p.add_argument("--out", help="JSON result path (.md written beside it)")
    args = p.parse_args(argv)
    if args.variant is None and args.out is None:
        p.error("--out is required")
    return args


def measure(args: argparse.Namespace) -> dict:
    """One step of `args.variant` in this process -> its peak memory above the built model and batch."""
    import torch

    from bench.mod_speed import make_batch
    from bench.report import reset_peak_rss, status_kib
    from model import ModelConfig, UnifiedTransformer
    from model.loss import causal_lm_loss

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset, num_hidden_layers=args.layers,
                                  max_position_embeddings=max(args.seq_len, 4096))
    net = UnifiedTransformer(cfg).to(device=device, dtype=dtype)
    ids, labels = make_batch(cfg, ["t2i"] * args.batch, args.seq_len)
    ids, labels = ids.to(device), labels.to(device)
    tasks = torch.zeros(args.batch, dtype=torch.long, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    if not reset_peak_rss():  # the peak RSS back to the current RSS
        raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs): this measurement needs Linux")
    base = status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    if args.variant == "full":
        out = net(ids, task_ids=tasks)
        loss = causal_lm_loss(out.logits, labels)
    else:
        out = net(ids, task_ids=tasks, labels=labels)
        loss = out.loss
    (loss + out.aux_loss).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = {"variant": args.variant, "loss": float(loss.detach()), "seconds": seconds,
              "peak_rss_above_model_bytes": status_kib("VmHWM") * 1024 - base, "rss_before_step_bytes": base,
              "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in net.parameters()
                                if p.grad is not None)}
    if device.type == "cuda":
        result["peak_cuda_above_model_bytes"] = torch.cuda.max_memory_allocated() - base_cuda
    return result


def run(args: argparse.Namespace) -> dict:
    import torch

    from bench.report import machine_info
    from model import ModelConfig
    from model.loss import chunk_columns, chunk_rows, grads_in_forward, head_loss_bytes

    base = [sys.executable, str(Path(__file__).resolve()), "--preset", args.preset, "--layers", str(args.layers),
            "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--device", args.device, "--dtype", args.dtype]
    if args.threads:
        base += ["--threads", str(args.threads)]
    runs = {}
    for variant in VARIANTS:
        print(f"[loss_memory] {variant} ...", flush=True)
        done = subprocess.run(base + ["--variant", variant], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"[loss_memory] the {variant} step failed:\n{done.stderr[-4000:]}")
        runs[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    cfg = ModelConfig.from_preset(args.preset, num_hidden_layers=args.layers)
    n, itemsize = args.batch * args.seq_len, torch.empty((), dtype={"fp32": torch.float32,
                                                                     "bf16": torch.bfloat16}[args.dtype]).element_size()
    key = "peak_cuda_above_model_bytes" if args.device.startswith("cuda") else "peak_rss_above_model_bytes"
    full, chunked = runs["full"][key], runs["chunked"][key]
    loss_diff = abs(runs["full"]["loss"] - runs["chunked"]["loss"])
    if loss_diff > 1e-4 * abs(runs["full"]["loss"]):
        raise SystemExit(f"[loss_memory] the two losses differ: {runs['full']['loss']} vs {runs['chunked']['loss']}")
    return {
        "config": {**{k: getattr(args, k) for k in ("preset", "layers", "seq_len", "batch", "device", "dtype",
                                                    "threads")},
                   "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size, "tokens": n},
        "machine": machine_info(),
        "runs": runs,
        "measured_on": key,
        "peak_full_gib": full / 2**30,
        "peak_chunked_gib": chunked / 2**30,
        "saved_gib": (full - chunked) / 2**30,
        "peak_ratio": chunked / full,
        "logits_fp32_gib": n * cfg.vocab_size * 4 / 2**30,
        "grads_in_forward": grads_in_forward(n, cfg.hidden_size, cfg.vocab_size, itemsize),
        "chunk_rows": chunk_rows(n, cfg.hidden_size, cfg.vocab_size, itemsize),
        "chunk_columns": chunk_columns(n, cfg.hidden_size, cfg.vocab_size, itemsize),
        "planner_head_loss_gib": head_loss_bytes(n, cfg.hidden_size, cfg.vocab_size, itemsize) / 2**30,
        "loss_abs_diff": loss_diff,
    }


def render(r: dict) -> str:
    c = r["config"]
    grads = r["runs"]["chunked"]["grad_bytes"] / 2**30
    if r.get("grads_in_forward"):
        chunks = f"Chunks of {r['chunk_rows']} rows, gradients computed in the forward."
    else:
        chunks = (f"Chunks of {r['chunk_columns']} vocabulary columns over all rows, forward (online log-sum-exp) "
                  f"and backward (logits recomputed).")
    lines = [
        "# Peak memory: full logits vs the chunked LM head + loss",
        "",
        f"`{c['preset']}` widths (hidden {c['hidden_size']}), {c['layers']} layers, vocabulary {c['vocab_size']:,}, "
        f"{c['batch']} x {c['seq_len']} = {c['tokens']:,} tokens, {c['dtype']} on {c['device']}; one forward + "
        f"backward each, in a fresh process; peak = {r['measured_on'].replace('_', ' ')} (above the built model "
        f"and batch, so the parameter gradients count in both).",
        "",
        "| | full logits | chunked (training's path) |",
        "|---|---|---|",
        f"| peak memory above the model (GiB) | {r['peak_full_gib']:.2f} | {r['peak_chunked_gib']:.2f} |",
        f"| loss | {r['runs']['full']['loss']:.6f} | {r['runs']['chunked']['loss']:.6f} |",
        f"| step time (s, one step, shared machine) | {r['runs']['full']['seconds']:.1f} | "
        f"{r['runs']['chunked']['seconds']:.1f} |",
        "",
        f"Saved: **{r['saved_gib']:.2f} GiB** ({100 * (1 - r['peak_ratio']):.0f}% of the step's peak above the model). "
        f"Both columns include the parameter gradients ({grads:.2f} GiB); beyond them the step needs "
        f"{r['peak_full_gib'] - grads:.2f} GiB with the full logits (fp32 logits alone: {r['logits_fp32_gib']:.2f} "
        f"GiB, plus their log-softmax and gradient) and {r['peak_chunked_gib'] - grads:.2f} GiB chunked. "
        f"{chunks} The capacity planner counts {r['planner_head_loss_gib']:.2f} GiB for the head + loss "
        f"(model/loss.py `head_loss_bytes`, the head's weight gradient included). One step per column, so the "
        f"times are rough: the chunked head does one more head matmul when it recomputes its logits.",
        "",
        f"Machine: {r['machine'].get('lscpu Model name', r['machine']['platform'])}, "
        f"{r['machine'].get('memory_gib', '?')} GiB, torch {r['machine']['torch']}, "
        f"load {r['machine']['load_average_1_5_15']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args)))
        return 0
    from bench.report import write_markdown

    result = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    text = render(result)
    write_markdown(out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
