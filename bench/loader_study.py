"""Loader throughput against a step's need, for the emu3-8b and the demo shapes: runs
bench/loader_throughput.py once per shape (its CLI unchanged, `--out` JSON) and tabulates the two.

    .venv/bin/python bench/loader_study.py --out bench/results/loader_cpu.json        # ~2 min

- emu3-8b shapes: seq_len 4096, 64x64-code images (512 px), micro-batch 1 x grad_accum 8; the need is
  an Emu3-8B step on one H100 at 40% MFU.
- demo shapes: train/configs/demo.yaml's seq_len 352, micro-batch 8, 16x16-code images; the need is
  a demo-preset step on this CPU at 40% of its measured matmul rate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.report import machine_info, write_markdown  # noqa: E402

# shape name -> (loader_throughput.py arguments, the preset whose need applies to these shapes)
SHAPES = {
    "emu3-8b": (["--seq-len", "4096", "--grid", "64", "--micro-batch", "1", "--grad-accum", "8"], "emu3-8b"),
    "demo": (["--seq-len", "352", "--grid", "16", "--micro-batch", "8", "--grad-accum", "1", "--demo-tokens", "2816"], "demo"),
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=200, help="samples per task written per shape")
    p.add_argument("--batches", type=int, default=150)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (extra, _) in SHAPES.items():
            js = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, str(REPO / "bench" / "loader_throughput.py"), *extra, "--samples", str(args.samples),
                   "--batches", str(args.batches), "--workers", str(args.workers), "--out", str(js)]
            print(f"[{name}] {' '.join(cmd)}", flush=True)
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{name}: loader_throughput.py exited {proc.returncode}:\n{proc.stderr[-3000:]}")
            print(proc.stdout, flush=True)
            runs[name] = json.loads(js.read_text()) | {"stdout": proc.stdout}

    rows = []
    for name, (_, preset) in SHAPES.items():
        r = runs[name]
        need = r["need"][preset]
        rows.append({"shapes": name, "tokens_per_step": need["tokens_per_step"],
                     "per_worker_tokens_per_s": r["per_worker"]["tokens_per_s"],
                     "workers_tokens_per_s": r.get("workers", {}).get("tokens_per_s"),
                     "non_pad_fraction": r["per_worker"]["non_pad_fraction"],
                     "resume_s": r["resume"]["seconds"], "need_where": need["where"], "step_s": need["step_s"],
                     "need_tokens_per_s": need["need_tokens_per_s"], "headroom": need["loader_per_worker_over_need"]})
    result = {"machine": machine_info(), "rows": rows, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["per_worker_tokens_per_s"] / 1e3 for r in rows], 0.4, label="loader, 1 worker")
    ax.bar([i + 0.2 for i in x], [r["need_tokens_per_s"] / 1e3 for r in rows], 0.4, label="a step's need")
    ax.set_yscale("log")
    ax.set_xticks(list(x), [f"{r['shapes']} ({r['headroom']:.0f}x)" for r in rows])
    ax.set_ylabel("k tokens/s per rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)

    lines = ["# Data loader throughput against a step's need", "",
             "Command: `.venv/bin/python bench/loader_study.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`", "",
             "| shapes | tokens/step/rank | loader 1 worker (k tok/s) | loader "
             f"{args.workers} workers (k tok/s) | non-pad | resume replay (s) | step estimate | need (k tok/s) | headroom (goal >= 20x) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        w = f"{r['workers_tokens_per_s'] / 1e3:.0f}" if r["workers_tokens_per_s"] else "-"
        lines.append(f"| {r['shapes']} | {r['tokens_per_step']} | {r['per_worker_tokens_per_s'] / 1e3:.0f} | {w} | "
                     f"{r['non_pad_fraction']:.0%} | {r['resume_s']:.2f} | {r['step_s']:.3f} s ({r['need_where']}) | "
                     f"{r['need_tokens_per_s'] / 1e3:.1f} | **{r['headroom']:.0f}x** |")
    lines += ["", f"![loader]({out.with_suffix('.png').name})", ""]
    write_markdown(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
