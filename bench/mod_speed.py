"""MoD speed benchmark: does skipping tokens save as much time as it saves FLOPs?

Times one training step (forward + backward) of a dense model and of the same model with task-aware
MoD in some layers, on Emu3-like sequences (a text prompt, then an image block of visual codes with
EOL columns, padded to the sequence length), and compares the measured speed-up with the analytic
FLOPs ratio of `model/flops.py` on that very batch (`describe_microbatch`: its routable tokens and padding):

    flops_ratio = dense FLOPs / MoD FLOPs      (the ideal speed-up; both as run, padding included)
    time_ratio  = dense time  / MoD time       (medians over repeats, warm-up excluded)
    R           = time_ratio / flops_ratio     (1.0 = MoD as fast as its FLOPs; UniMoD's own: ~0.76)

The result also gives MoD's saving against the dense baseline (a dense model on the real tokens only,
`model.flops.dense_flops`), the number training reports as `flops/mod_saved_pct`.

Dense and MoD steps alternate, so drift on a shared machine hits both alike. `--profile` adds a
torch.profiler breakdown of one step of each, with MoD's routing ops (top-k, sort, gather, scatter,
masks) grouped, to show where any gap between the two ratios goes.

    # CPU, a few minutes on 2 cores (the numbers in bench/README.md):
    .venv/bin/python bench/mod_speed.py --out bench/results/mod_speed_cpu.json --profile
    # GPU:
    python bench/mod_speed.py --device cuda --dtype bf16 --preset emu3-1b --seq-len 4096 --batch 4 \\
        --out bench/results/mod_speed_h100.json --profile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from data.layout import IGNORE_INDEX, lm_ids, mmu_ids, t2i_ids  # noqa: E402
from model import ModelConfig, UnifiedTransformer  # noqa: E402
from model.flops import dense_flops, describe_microbatch, microbatch_flops  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# aten op names (profiler keys "aten::<name>") by what they do. MoD's routing ops also run, to a
# small degree, in the dense model (token kinds, routable masks), so compare the groups between runs.
OP_GROUPS = {
    "mod_routing": {"topk", "sort", "gather", "scatter", "scatter_", "scatter_add", "scatter_add_",
                    "masked_fill", "masked_fill_", "where", "eye", "tril", "logical_and", "logical_or",
                    "logical_not", "bitwise_and", "bitwise_or", "bitwise_not", "eq", "lt", "ge", "arange",
                    "sigmoid", "sigmoid_backward", "binary_cross_entropy_with_logits", "nonzero", "index",
                    "index_put_", "_local_scalar_dense", "item", "index_add", "full_like", "ones_like"},
    "attention": {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
                  "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
                  "_flash_attention_forward", "_flash_attention_backward", "_efficient_attention_forward",
                  "_efficient_attention_backward"},
    "matmul": {"mm", "addmm", "bmm", "matmul", "linear"},
    "copy": {"copy_", "_to_copy", "clone", "contiguous", "cat", "fill_", "zero_", "zeros", "empty", "to"},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", help="model preset (model/config.py PRESETS)")
    p.add_argument("--hidden-size", type=int, help="override the preset's hidden_size")
    p.add_argument("--intermediate-size", type=int, help="override the preset's intermediate_size")
    p.add_argument("--layers", type=int, help="override the preset's num_hidden_layers")
    p.add_argument("--heads", type=int, help="override the preset's num_attention_heads")
    p.add_argument("--kv-heads", type=int, help="override the preset's num_key_value_heads")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch")
    p.add_argument("--task", default="t2i", type=lambda s: s.split(","),
                   help="task of the sequences, or a comma list (t2i,mmu) assigned to them in turn")
    p.add_argument("--capacity", default="0.2", type=lambda s: [float(c) for c in s.split(",")],
                   help="MoD capacity per task in --task (0.2 = skip 80%% of tokens); one value for all")
    p.add_argument("--mod-layers", default="last-half", help='"last-half" or an inclusive range "4-7"')
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--checkpointing", action="store_true", help="activation recomputation per layer")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--profile", action="store_true", help="torch.profiler breakdown of one step of each")
    p.add_argument("--out", required=True, help="JSON result path")
    args = p.parse_args(argv)
    if len(args.capacity) == 1:
        args.capacity = args.capacity * len(args.task)
    if len(args.capacity) != len(args.task):
        p.error(f"--capacity has {len(args.capacity)} values for {len(args.task)} tasks in --task")
    if not all(0.0 < c < 1.0 for c in args.capacity):
        p.error(f"--capacity values must be in (0, 1) for a MoD comparison, got {args.capacity}")
    if set(args.task) - {"t2i", "mmu", "lm"}:
        p.error(f"--task must name t2i, mmu or lm, got {args.task}")
    if args.warmup < 0 or args.repeats < 1:
        p.error("--warmup must be >= 0 and --repeats >= 1")
    return args


def build_configs(args: argparse.Namespace) -> tuple[ModelConfig, ModelConfig]:
    overrides = {k: v for k, v in {
        "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
    }.items() if v is not None}
    overrides["max_position_embeddings"] = max(args.seq_len, ModelConfig.from_preset(args.preset).max_position_embeddings)
    dense = ModelConfig.from_preset(args.preset, **overrides)
    L = dense.num_hidden_layers
    layers = f"{L // 2}-{L - 1}" if args.mod_layers == "last-half" else args.mod_layers
    mod = ModelConfig.from_preset(args.preset, **overrides,
                                  mod={"capacity": {layers: dict(zip(args.task, args.capacity))}})
    return dense, mod


def make_batch(cfg: ModelConfig, tasks: list[str], seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One Emu3-layout sequence per task filling `seq_len` (square code grid as large as fits), plus labels."""
    v, rng = cfg.vocab, np.random.default_rng(seed)
    text = lambda n: rng.integers(0, v.text_size, n)  # noqa: E731
    ids_rows = []
    for task in tasks:
        if task == "lm":
            ids = lm_ids(text(seq_len - 2), v)
        else:
            prompt, size_ids = 32, text(3)
            side = int((np.sqrt(4 * (seq_len - prompt - 16) + 1) - 1) / 2)  # side * (side + 1) fits
            codes = rng.integers(0, v.visual_size, (side, side))
            if task == "t2i":
                ids = t2i_ids(text(prompt), codes, v, size_ids)
            else:
                ids, _ = mmu_ids(text(prompt // 2), codes, text(prompt // 4), text(prompt // 4), v, size_ids)
        row = np.full(seq_len, v.pad_id, dtype=np.int64)
        row[: len(ids)] = ids
        ids_rows.append(row)
    ids = torch.from_numpy(np.stack(ids_rows))
    labels = ids.clone()
    labels[labels == v.pad_id] = IGNORE_INDEX
    return ids, labels


class Step:
    """One training step of `net` (zero grads, forward with the chunked loss as training runs it, backward),
    synchronised for timing."""

    def __init__(self, net: UnifiedTransformer, ids: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor):
        self.net, self.ids, self.labels, self.task_ids = net, ids, labels, task_ids

    def __call__(self) -> None:
        self.net.zero_grad(set_to_none=True)
        out = self.net(self.ids, task_ids=self.task_ids, labels=self.labels)
        (out.loss + out.aux_loss).backward()
        _sync(self.ids.device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(steps: dict[str, Step], warmup: int, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall-clock seconds per step, and this process's CPU seconds (which, with one thread, other
    processes on a shared machine cannot inflate the way they inflate wall time)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {clock: {name: [] for name in steps} for clock in ("wall", "cpu")}
    for _ in range(repeats):
        for name, step in steps.items():
            w0, c0 = time.perf_counter(), time.process_time()
            step()
            times["wall"][name].append(time.perf_counter() - w0)
            times["cpu"][name].append(time.process_time() - c0)
    return times


def profile_step(step: Step, device: torch.device) -> dict[str, object]:
    """Self time per op group and the top ops, over one step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
    use_cuda = device.type == "cuda"
    rows = []
    for e in prof.key_averages():
        if e.device_type != DeviceType.CPU:  # kernel rows: their time is already in their op's self time
            continue
        us = e.self_device_time_total if use_cuda else e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, us / 1e3, e.count))
    groups = {g: 0.0 for g in (*OP_GROUPS, "other")}
    for key, ms, _ in rows:
        groups[_group(key)] += ms
    rows.sort(key=lambda r: -r[1])
    return {
        "clock": "device self time" if use_cuda else "CPU self time",
        "total_ms": sum(ms for _, ms, _ in rows),
        "groups_ms": groups,
        "top_ops": [{"op": k, "ms": round(ms, 3), "calls": c, "group": _group(k)} for k, ms, c in rows[:25]],
    }


def _group(op: str) -> str:
    name = op.removeprefix("aten::")
    for group, names in OP_GROUPS.items():
        if name in names:
            return group
    return "other"


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    dense_cfg, mod_cfg = build_configs(args)
    names = [args.task[b % len(args.task)] for b in range(args.batch)]
    tasks = [mod_cfg.mod.tasks.index(t) for t in names]
    ids, labels = make_batch(mod_cfg, names, args.seq_len)
    ids, labels = ids.to(device), labels.to(device)
    task_ids = torch.tensor(tasks, device=device)

    steps = {}
    for name, cfg in (("dense", dense_cfg), ("mod", mod_cfg)):
        torch.manual_seed(0)
        net = UnifiedTransformer(cfg).to(device=device, dtype=dtype).train()
        net.gradient_checkpointing = args.checkpointing
        steps[name] = Step(net, ids, labels, task_ids)

    positions = torch.arange(args.seq_len).expand(len(tasks), args.seq_len)
    rows = describe_microbatch(ids, positions, task_ids, mod_cfg)  # one sample per row, then padding
    flops = {name: microbatch_flops(cfg, rows, recompute=args.checkpointing)
             for name, cfg in (("dense", dense_cfg), ("mod", mod_cfg))}
    flops_causal = {name: microbatch_flops(cfg, rows, recompute=args.checkpointing, causal_attention=True)
                    for name, cfg in (("dense", dense_cfg), ("mod", mod_cfg))}
    baseline = dense_flops(mod_cfg, rows, recompute=args.checkpointing)
    times = time_alternating(steps, args.warmup, args.repeats)
    median = {name: statistics.median(ts) for name, ts in times["wall"].items()}
    flops_ratio = flops["dense"].total / flops["mod"].total
    time_ratio = median["dense"] / median["mod"]
    # Secondary estimators for a noisy shared machine: noise only ever adds time, so the fastest
    # repeat is the least disturbed; CPU time is immune to being descheduled (with --threads 1).
    ratio_of = lambda clock, stat: stat(times[clock]["dense"]) / stat(times[clock]["mod"])  # noqa: E731
    result: dict[str, object] = {
        "setting": {**{k: v for k, v in vars(args).items() if k != "out"},
                    "mod_layers": mod_cfg.mod.mod_layers(), "model": {k: v for k, v in dense_cfg.to_dict().items()
                                                                      if k not in ("vocab", "mod")}},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count()},
        "tasks": names,
        "image_tokens_per_sequence": ((ids >= mod_cfg.vocab.visual_start) & (ids < mod_cfg.vocab.visual_end)).sum(1).tolist(),
        "routable_tokens_per_sequence": [sum(d.routable for d in r.documents) for r in rows],
        "padding_per_sequence": [r.padding for r in rows],
        "flops": {name: f.to_dict() for name, f in flops.items()},
        "flops_dense_baseline": baseline.to_dict(),
        # What training logs as flops/mod_saved_pct: against a dense model on the real tokens only.
        "mod_saved_vs_dense_baseline_pct": 100 * (1 - flops["mod"].total / baseline.total),
        "times_s": times,
        "median_s": median,
        "tflops_per_s": {name: flops[name].total / median[name] / 1e12 for name in median},
        "flops_ratio": flops_ratio,
        # Causal kernels skip the upper triangle: the ratio a causal-aware count predicts.
        "flops_ratio_causal_attention": flops_causal["dense"].total / flops_causal["mod"].total,
        "time_ratio": time_ratio,
        "R": time_ratio / flops_ratio,
        "R_causal_attention": time_ratio / (flops_causal["dense"].total / flops_causal["mod"].total),
        "R_other_estimators": {"wall_min": ratio_of("wall", min) / flops_ratio,
                               "cpu_median": ratio_of("cpu", statistics.median) / flops_ratio,
                               "cpu_min": ratio_of("cpu", min) / flops_ratio},
    }
    if args.profile:
        result["profile"] = {name: profile_step(step, device) for name, step in steps.items()}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    _report(result)
    return result


def _report(r: dict) -> None:
    m, f = r["median_s"], r["flops"]
    print(f"dense: {f['dense']['total'] / 1e12:.3f} TFLOP/step, median {m['dense']:.3f} s")
    print(f"mod:   {f['mod']['total'] / 1e12:.3f} TFLOP/step, median {m['mod']:.3f} s "
          f"({r['mod_saved_vs_dense_baseline_pct']:.1f}% fewer FLOPs than the padding-free dense baseline)")
    print(f"FLOPs ratio (dense/mod) {r['flops_ratio']:.3f} (causal-aware {r['flops_ratio_causal_attention']:.3f})   "
          f"time ratio {r['time_ratio']:.3f}   R = {r['R']:.3f} (causal-aware {r['R_causal_attention']:.3f})")
    print("R by other estimators: " + ", ".join(f"{k} {v:.3f}" for k, v in r["R_other_estimators"].items()))
    for name, prof in r.get("profile", {}).items():
        groups = ", ".join(f"{g} {ms:.1f}" for g, ms in prof["groups_ms"].items())
        print(f"profile {name} ({prof['clock']}, ms): total {prof['total_ms']:.1f}: {groups}")


if __name__ == "__main__":
    main()
