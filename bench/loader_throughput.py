"""Loader throughput against what a training step consumes (prints numbers; not a test).

    .venv/bin/python bench/loader_throughput.py                      # Emu3-like 64x64-code images
    .venv/bin/python bench/loader_throughput.py --seq-len 1024 --grid 16 --micro-batch 4 --grad-accum 1

Writes shards of random samples in Emu3's layout with the real vocabulary layout (t2i and mmu with
an image of `--grid` x `--grid` codes, lm text of 200..2000 tokens), then times `UnimodLoader`:

- per worker: `num_workers=0`, everything (tar reading, checks, labels, packing, tensors) in this
  process, in tokens/s of [B, S] micro-batches (padding included: the step pays for it);
- with `--workers` DataLoader workers, the rank's total;
- resume: how fast a worker replays (fast-forwards) to the middle of an epoch.

It prints them next to one step's need per rank, tokens/step = micro_batch x seq_len x grad_accum,
for two step-time estimates from 6 x N x tokens FLOPs (N from the model itself, built on the meta
device): the emu3-8b preset on one H100 at 40% MFU, and the demo preset on this CPU at 40% of the
matmul rate measured here. Goal: the loader's per-worker rate >= 20x a step's need.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402

from data.layout import lm_ids, mmu_ids, t2i_ids  # noqa: E402
from data.config import LoaderConfig  # noqa: E402
from data.loader import UnimodLoader  # noqa: E402
from model.config import ModelConfig, VocabLayout  # noqa: E402
from model.flops import peak_flops  # noqa: E402

H100_MFU = 0.40


def write_shards(root: str, layout: VocabLayout, per_task: int, per_shard: int, grid: int, seed: int = 0) -> int:
    """Random samples of every task in Emu3's layout; returns bytes written."""
    rng = np.random.default_rng(seed)
    size = [ord(c) for c in f"{grid}*{grid}"]  # any text ids do: the loader never decodes text
    sha = "0" * 64
    names, nbytes = {}, 0
    for task in ("t2i", "mmu", "lm"):
        with wds.ShardWriter(os.path.join(root, f"{task}-train-%06d.tar"), maxcount=per_shard, verbose=0) as w:
            for n in range(per_task):
                meta = {"task": task, "tokenizer_sha256": sha, "image_hw": None, "answer_start": None, "source": "bench"}
                codes = rng.integers(0, layout.visual_size, (grid, grid))
                text = lambda lo, hi: rng.integers(0, layout.text_size, int(rng.integers(lo, hi))).tolist()  # noqa: E731
                if task == "t2i":
                    ids = t2i_ids(text(5, 60), codes, layout, size)
                    meta["image_hw"] = [grid, grid]
                elif task == "mmu":
                    ids, meta["answer_start"] = mmu_ids(text(8, 9), codes, text(5, 40), text(5, 200), layout, size)
                    meta["image_hw"] = [grid, grid]
                else:
                    ids = lm_ids(text(200, 2000), layout)
                w.write({"__key__": f"{task}-train-{n:06d}", "ids.npy": ids, "json": meta})
        names[task] = sorted(f for f in os.listdir(root) if f.startswith(f"{task}-train-"))
    for f in os.listdir(root):
        nbytes += os.path.getsize(os.path.join(root, f))
    manifest = {"format": "unimod-shards-v1", "vocab": layout.to_dict(),
                "tokenizer": {"type": "hf", "path": "tokenizer", "sha256": sha}, "image_tokenizer": None,
                "splits": {"train": {"shards": names, "samples": {t: per_task for t in names}}},
                "created_by": "bench/loader_throughput.py"}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return nbytes


def time_loader(cfg: LoaderConfig, max_batches: int) -> tuple[float, int, int, float]:
    """(seconds after the first batch, micro-batches after the first, non-pad tokens, seconds to the first)."""
    loader = UnimodLoader(cfg, ["t2i", "mmu", "lm"])
    pad = loader.layout.pad_id
    n = real = 0
    t0 = time.perf_counter()
    for batch in loader:
        if n == 0:
            t1 = time.perf_counter()  # worker start-up and the shuffle buffer's first fill end here
        else:
            real += int((batch["input_ids"] != pad).sum())
        n += 1
        if n >= max_batches:
            break
    return time.perf_counter() - t1, n - 1, real, t1 - t0


def time_resume(cfg: LoaderConfig, k: int) -> float:
    """Seconds from load_state_dict(at micro-batch k) to the first batch, i.e. the replay."""
    first = UnimodLoader(cfg, ["t2i", "mmu", "lm"])
    state = first.state_dict() | {"consumed": k}
    loader = UnimodLoader(cfg, ["t2i", "mmu", "lm"])
    loader.load_state_dict(state)
    t0 = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - t0


def n_params(preset: str, vocab: dict | None = None) -> int:
    from model.transformer import UnifiedTransformer

    cfg = ModelConfig.from_preset(preset, **({"vocab": vocab} if vocab else {}))
    with torch.device("meta"):
        return UnifiedTransformer(cfg).num_parameters()


def cpu_matmul_flops(n: int = 1024, reps: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--grid", type=int, default=64, help="image side in codes (Emu3: 64 for 512 px)")
    p.add_argument("--samples", type=int, default=300, help="samples per task")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=200, help="micro-batches timed per run at most")
    p.add_argument("--pack", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--demo-tokens", type=int, default=4 * 1024,
                   help="tokens per step per rank of the demo run (its step is smaller than the 8B one)")
    p.add_argument("--out", help="also write the numbers as JSON here")
    args = p.parse_args()
    result: dict = {"setting": vars(args)}

    layout = VocabLayout()  # Emu3's real id ranges
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        nbytes = write_shards(root, layout, args.samples, per_shard=max(1, args.samples // 8), grid=args.grid)
        print(f"wrote {3 * args.samples} samples, {nbytes / 1e6:.1f} MB in {time.perf_counter() - t0:.1f} s "
              f"(image grid {args.grid}x{args.grid}, seq_len {args.seq_len}, pack={args.pack})")
        base = dict(dataset_dir=root, tasks={"t2i": 1.0, "mmu": 1.0, "lm": 1.0}, seq_len=args.seq_len,
                    micro_batch_size=args.micro_batch, pack=args.pack, shuffle_buffer=100, overlong="truncate")
        tok_per_batch = args.micro_batch * args.seq_len

        sec, n, real, first = time_loader(LoaderConfig(**base, num_workers=0), args.batches)
        per_worker = n * tok_per_batch / sec
        result["per_worker"] = {"micro_batches": n, "seconds": sec, "tokens_per_s": per_worker,
                                "non_pad_fraction": real / (n * tok_per_batch), "first_batch_s": first}
        print(f"loader, 1 worker (in process): {n} micro-batches in {sec:.2f} s = {n / sec:.1f} batches/s, "
              f"{per_worker / 1e6:.3f} M tokens/s ({real / (n * tok_per_batch):.0%} non-pad); "
              f"first batch after {first:.2f} s")
        if args.workers > 0:
            sec_w, n_w, _, first_w = time_loader(LoaderConfig(**base, num_workers=args.workers), args.batches)
            result["workers"] = {"workers": args.workers, "micro_batches": n_w, "seconds": sec_w,
                                 "tokens_per_s": n_w * tok_per_batch / sec_w, "first_batch_s": first_w}
            print(f"loader, {args.workers} workers: {n_w} micro-batches in {sec_w:.2f} s = "
                  f"{n_w * tok_per_batch / sec_w / 1e6:.3f} M tokens/s per rank; first batch after {first_w:.2f} s "
                  f"(on {os.cpu_count()} cores shared with the main process)")
        ld = UnimodLoader(LoaderConfig(**base, num_workers=0), ["t2i", "mmu", "lm"])
        k = len(ld) // 2
        sec_r = time_resume(LoaderConfig(**base, num_workers=0), k)
        result["resume"] = {"micro_batch": k, "of": len(ld), "seconds": sec_r}
        print(f"resume: replay to micro-batch {k} of {len(ld)} took {sec_r:.2f} s ({k / sec_r:.0f} batches/s)")

    tokens_step = args.micro_batch * args.seq_len * args.grad_accum
    print(f"\none step per rank: micro_batch {args.micro_batch} x seq_len {args.seq_len} x grad_accum "
          f"{args.grad_accum} = {tokens_step} tokens")
    h100 = peak_flops("H100")
    n8b = n_params("emu3-8b")
    step_8b = 6 * n8b * tokens_step / (H100_MFU * h100)
    cpu = cpu_matmul_flops()
    n_demo = n_params("demo")
    step_demo = 6 * n_demo * args.demo_tokens / (H100_MFU * cpu)
    # The need in tokens/s, MFU x peak / (6 N), does not depend on the step's size; the step time does.
    for name, n_p, tokens, step, where in (
            ("emu3-8b", n8b, tokens_step, step_8b, f"1 H100 at {H100_MFU:.0%} MFU of {h100 / 1e12:.0f} TFLOP/s"),
            ("demo", n_demo, args.demo_tokens, step_demo, f"this CPU at 40% of {cpu / 1e9:.0f} GFLOP/s measured")):
        need = tokens / step
        result.setdefault("need", {})[name] = {
            "params": n_p, "tokens_per_step": tokens, "step_s": step, "where": where, "need_tokens_per_s": need,
            "loader_per_worker_over_need": per_worker / need}
        print(f"{name:8s} N={n_p / 1e9:.3f}B  {tokens} tokens/step: {step:7.3f} s/step on {where}: "
              f"needs {need / 1e3:8.1f} k tokens/s -> loader per worker = {per_worker / need:7.1f}x (goal >= 20x)")
    if args.out:
        result["cpu_matmul_flops"] = cpu
        result["load_average"] = list(os.getloadavg())
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
