"""Our training step against transformers' `Emu3ForCausalLM`, side by side in one process (no DeepSpeed):
dense and MoD, eager and `torch.compile`d, the same weights and the same Emu3-layout batch.

Each variant is the model as a user builds and trains it:

    hf_eager             Emu3ForCausalLM(attn_implementation="sdpa"), our weights loaded into it (the names
                         are the same); loss = model(input_ids=ids, labels=labels).loss
    hf_compiled          torch.compile of that model (recorded as failed, with the error, if it does not compile)
    ours_dense           net = UnifiedTransformer(cfg); out = net(ids, task_ids=..., labels=labels);
                         loss = out.loss + out.aux_loss
    ours_mod             the same net with MoD capacity --capacity for every token of the t2i task
                         (routable "all") in --mod-layers (default: the last half)
    ours_*_compiled      the same after model/compile.py `compile_blocks(net.model.layers)`

A step is zero_grad + forward + loss + backward. After --warmup steps of each, the variants alternate over
--repeats (order reversed every other repeat, so drift on a shared machine hits them alike); reported are
the medians, tokens/s, achieved TFLOP/s (and MFU on CUDA) from model/flops.py's count on that very batch,
the speed-ups against hf_eager, and

    flops_ratio = dense FLOPs / MoD FLOPs                 (model/flops.py `microbatch_flops`)
    R           = (ours_dense time / ours_mod time) / flops_ratio, eager and compiled   (goal >= 1.0)

Peak memory: every variant again in a fresh process of this script (`--memory-probe VARIANT`): it builds
that model and the batch, runs the warm-up, and reports the peak of one more step above the memory in use
just before it (CPU: VmHWM after resetting it through /proc/self/clear_refs, free heap trimmed first; CUDA:
torch.cuda.max_memory_allocated after reset_peak_memory_stats): what a step needs on top of the model,
compiled code and caches, which a compiled variant's warm-up grows. Goals: ours dense >= 1.10x and ours MoD
>= 1.85x HF dense's speed, R >= 1.0, ours' peak memory <= HF's. The two dense models' first-step losses
(1e-5 relative in fp32) and every parameter's gradient norm (1e-4) must agree: the check that they are the
same network (`loss_check`; the loss alone barely sees the weights at initialisation).

    # CPU, the reference shapes (hidden 512, 8 layers, GQA 8/2, FFN 1408, vocabulary 4096, S 2048 x B 2, fp32):
    .venv/bin/python bench/hf_side_by_side.py --threads 1 --out bench/results/side_by_side_cpu.json
    # GPU: the reference shapes in bf16, and the ~1B preset (real Emu3 vocabulary) with flash SDPA:
    python bench/hf_side_by_side.py --device cuda --dtype bf16 --out bench/results/side_by_side_gpu.json
    python bench/hf_side_by_side.py --device cuda --dtype bf16 --preset emu3-1b --seq-len 4096 --batch 4 \\
        --sdpa flash --variants ours_dense,ours_dense_compiled,ours_mod,ours_mod_compiled \\
        --out bench/results/mfu_emu3_1b_gpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from bench.mod_speed import make_batch  # noqa: E402
from bench.report import (bar_panels, load_average, machine_info, publish, release_free_heap,  # noqa: E402
                          reset_peak_rss, rss_kib, status_kib)
from model import PRESETS, ModelConfig, UnifiedTransformer  # noqa: E402
from model.flops import describe_microbatch, mfu, microbatch_flops, peak_flops  # noqa: E402

VARIANTS = ("hf_eager", "hf_compiled", "ours_dense", "ours_dense_compiled", "ours_mod", "ours_mod_compiled")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SDPA = ("auto", "flash", "efficient", "math", "cudnn")
GOALS = {"dense_speedup": 1.10, "mod_speedup": 1.85, "R": 1.0, "memory_ratio": 1.0}
# hf_eager and ours_dense, same weights, first step: the losses and every parameter's gradient norm must agree
# to these relative tolerances (the same network computing the same thing).
TOLERANCE = {"fp32": {"loss": 1e-5, "grad_norm": 1e-4}, "bf16": {"loss": 1e-2, "grad_norm": 5e-2}}
# The default shapes ("reference"): the demo preset made wider, with a 4096-id vocabulary.
REFERENCE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=1408, vocab_size=4096)
PROBE_TAG = "MEMORY_PROBE "


def small_vocab(vocab_size: int) -> dict[str, int]:
    """model/config.py's small layout (256 text ids, the 8 structural ids) with visual codes up to `vocab_size`."""
    if vocab_size <= 264:
        raise ValueError(f"--vocab-size must exceed the 264 text and structural ids, got {vocab_size}")
    return dict(text_size=256, pad_id=256, bos_id=257, eos_id=258, boi_id=259, eoi_id=260, img_id=261,
                eol_id=262, eof_id=263, visual_start=264, visual_size=vocab_size - 264, vocab_size=vocab_size)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="reference", choices=["reference", *PRESETS],
                   help="reference = demo preset at hidden 512, 8 layers, GQA 8/2, FFN 1408, vocabulary 4096; "
                        "a model preset keeps its own vocabulary unless --vocab-size is given")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--vocab-size", type=int, help="small vocabulary layout (256 text ids, 8 structural) of this size")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=2, help="t2i sequences per micro-batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--sdpa", default="auto", choices=SDPA,
                   help="SDPA backend for every step (torch.nn.attention.sdpa_kernel); auto = torch's choice")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compilation happens here)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant, interleaved")
    p.add_argument("--variants", default=",".join(VARIANTS), type=lambda s: [v for v in s.split(",") if v])
    p.add_argument("--mod-layers", default="last-half", help='"last-half" or an inclusive range such as "4-7"')
    p.add_argument("--capacity", type=float, default=0.2, help="MoD capacity of the t2i task in --mod-layers")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant peak-memory processes")
    p.add_argument("--memory-probe", metavar="VARIANT", help=argparse.SUPPRESS)  # internal: one variant's memory
    p.add_argument("--out", help="JSON path (.md and .png written next to it); required unless probing")
    args = p.parse_args(argv)
    if unknown := [v for v in args.variants if v not in VARIANTS]:
        p.error(f"--variants: unknown {unknown}; known {list(VARIANTS)}")
    if not args.variants:
        p.error("--variants names no variant")
    if not 0.0 < args.capacity < 1.0:
        p.error(f"--capacity must be in (0, 1), got {args.capacity}")
    if args.warmup < 1 or args.repeats < 1:
        p.error("--warmup and --repeats must be >= 1 (the first warm-up step gives the loss check, and compiles)")
    if args.memory_probe is None and not args.out:
        p.error("--out is required")
    if args.memory_probe is not None and args.memory_probe not in VARIANTS:
        p.error(f"--memory-probe: unknown variant {args.memory_probe}")
    return args


def build_configs(args: argparse.Namespace) -> tuple[ModelConfig, ModelConfig]:
    """(dense, MoD) configs: the same shapes; MoD keeps --capacity of every t2i token in --mod-layers."""
    base = "demo" if args.preset == "reference" else args.preset
    shape = dict(REFERENCE) if args.preset == "reference" else {}
    for key, value in (("hidden_size", args.hidden_size), ("num_hidden_layers", args.layers),
                       ("num_attention_heads", args.heads), ("num_key_value_heads", args.kv_heads),
                       ("intermediate_size", args.intermediate_size), ("vocab_size", args.vocab_size)):
        if value is not None:
            shape[key] = value
    if "vocab_size" in shape:
        shape["vocab"] = small_vocab(shape.pop("vocab_size"))
    shape["max_position_embeddings"] = max(args.seq_len, PRESETS[base]["max_position_embeddings"])
    dense = ModelConfig.from_preset(base, **shape)
    L = dense.num_hidden_layers
    layers = f"{L // 2}-{L - 1}" if args.mod_layers == "last-half" else args.mod_layers
    mod = ModelConfig.from_preset(base, **shape, mod={"capacity": {layers: {"t2i": args.capacity}},
                                                      "routable": {"t2i": "all"}})
    return dense, mod


# ----- the variants: a module and its loss, as a user writes them ----------------------------------------
class Batch:
    def __init__(self, cfg: ModelConfig, batch: int, seq_len: int, device: torch.device) -> None:
        ids, labels = make_batch(cfg, ["t2i"] * batch, seq_len)  # Emu3-layout t2i rows, padding -> -100
        self.ids, self.labels = ids.to(device), labels.to(device)
        self.task_ids = torch.full((batch,), cfg.mod.tasks.index("t2i"), device=device)


def ours_loss(net, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(LM loss, loss to train on) of our model: the chunked head loss of `labels=`, plus the routers' aux loss."""
    out = net(b.ids, task_ids=b.task_ids, labels=b.labels)
    return out.loss, out.loss + out.aux_loss


def hf_loss(model, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers shifts the labels itself (aligned with the inputs like ours, -100 ignored), mean CE in fp32."""
    loss = model(input_ids=b.ids, labels=b.labels, use_cache=False).loss
    return loss, loss


class Step:
    """One training step of a variant: zero grads, forward, loss, backward, synchronised. Returns the LM loss."""

    def __init__(self, module: torch.nn.Module, loss_fn: Callable, batch: Batch, sdpa: str) -> None:
        self.module, self.loss_fn, self.batch, self.sdpa = module, loss_fn, batch, sdpa

    def __call__(self) -> torch.Tensor:
        self.module.zero_grad(set_to_none=True)
        with sdpa_context(self.sdpa):
            lm, loss = self.loss_fn(self.module, self.batch)
            loss.backward()
        if self.batch.ids.device.type == "cuda":
            torch.cuda.synchronize(self.batch.ids.device)
        return lm.detach()


def sdpa_context(name: str):
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}[name])


class NotAvailable(Exception):
    """A variant this installation cannot build (e.g. model/compile.py missing)."""


def build_module(name: str, dense: ModelConfig, mod: ModelConfig, state: dict | None,
                 device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The variant's module in train mode on `device`/`dtype`, with `state` (our dense weights) loaded when
    given; MoD router banks, which the dense weights lack, start from the same seed in every MoD variant."""
    torch.manual_seed(1)
    if name.startswith("hf_"):
        from transformers import Emu3ForCausalLM

        from model.hf import hf_text_config

        with torch.device(device):
            module = Emu3ForCausalLM._from_config(hf_text_config(dense), attn_implementation="sdpa")
        module.config.use_cache = False
        if state is not None:
            module.load_state_dict(state, strict=True)  # our names are Emu3ForCausalLM's
    else:
        with torch.device(device):
            module = UnifiedTransformer(mod if name.startswith("ours_mod") else dense)
        if state is not None:
            missing, unexpected = module.load_state_dict(state, strict=False)
            assert not unexpected and all(".mod_router." in k for k in missing), (missing, unexpected)
    module = module.to(device=device, dtype=dtype).train()
    if name.endswith("_compiled"):
        if name.startswith("hf_"):
            return torch.compile(module)
        try:
            from model.compile import compile_blocks
        except ImportError as e:
            raise NotAvailable(f"not available: model/compile.py compile_blocks cannot be imported ({e})") from None
        compile_blocks(module.model.layers)
    return module


def grad_norms(module: torch.nn.Module) -> dict[str, float]:
    """{parameter name: norm of its gradient} after a step: a fingerprint of the whole network (every weight's
    gradient depends on every other weight), far more sensitive than the loss at initialisation, where every
    small-init model predicts about uniformly."""
    return {n.removeprefix("_orig_mod."): float(p.grad.float().norm()) for n, p in module.named_parameters()
            if p.grad is not None}


def _error(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


# ----- timing -------------------------------------------------------------------------------------------
def time_variants(args, dense: ModelConfig, mod: ModelConfig, batch: Batch, device: torch.device) -> dict[str, dict]:
    """Build every variant from one set of weights, warm each up (recording its first loss), then time them
    interleaved. A compiled variant that fails to build or compile is recorded with its error and skipped."""
    torch.manual_seed(0)
    with torch.device(device):
        source = UnifiedTransformer(dense)
    state = {k: v.detach().float() for k, v in source.state_dict().items()}
    del source
    out: dict[str, dict] = {}
    steps: dict[str, Step] = {}
    for name in args.variants:
        t0 = time.perf_counter()
        try:
            module = build_module(name, dense, mod, state, device, DTYPES[args.dtype])
            step = Step(module, hf_loss if name.startswith("hf_") else ours_loss, batch, args.sdpa)
            first = step()  # compiles, for a compiled variant
            grads = grad_norms(module)
            for _ in range(args.warmup - 1):
                step()
        except NotAvailable as e:
            out[name] = {"status": "not available", "error": str(e)}
        except Exception as e:  # noqa: BLE001 - a compiled variant may fail: recorded, the others go on
            if not name.endswith("_compiled"):
                raise
            out[name] = {"status": "failed", "error": _error(e)}
        else:
            steps[name] = step
            out[name] = {"status": "ok", "first_loss": float(first), "first_grad_norms": grads,
                         "parameters": sum(p.numel() for p in module.parameters()),
                         "build_and_warmup_s": time.perf_counter() - t0, "times_s": [], "cpu_times_s": []}
        print(f"[side-by-side] {name}: {out[name]['status']} after {time.perf_counter() - t0:.1f} s"
              + (f" ({out[name]['error'].splitlines()[0]})" if "error" in out[name] else ""), flush=True)
    for r in range(args.repeats):
        order = list(steps) if r % 2 == 0 else list(steps)[::-1]
        for name in order:
            w0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            out[name]["times_s"].append(time.perf_counter() - w0)
            out[name]["cpu_times_s"].append(time.process_time() - c0)
    return out


# ----- memory: one variant per fresh process ------------------------------------------------------------
def memory_probe(args: argparse.Namespace) -> dict:
    """Peak memory of one training step of one variant above the memory in use just before it (model, batch,
    compiled code and caches, after the warm-up; gradients freed, as the step's zero_grad frees them): what the
    step itself needs (activations, gradients, temporaries). Weights are this process's own random init: a
    step's memory does not depend on their values (an MoD layer keeps the same number of tokens whatever
    they are). Also recorded: the warm-up's peak (compilation included) above the RSS once model and batch
    were built."""
    name, device, dtype = args.memory_probe, torch.device(args.device), DTYPES[args.dtype]
    dense, mod = build_configs(args)
    batch = Batch(mod, args.batch, args.seq_len, device)
    step = Step(build_module(name, dense, mod, None, device, dtype),
                hf_loss if name.startswith("hf_") else ours_loss, batch, args.sdpa)
    cuda = device.type == "cuda"
    release_free_heap()
    build_kib = rss_kib()
    resettable = reset_peak_rss()
    peak_kib = lambda: status_kib("VmHWM") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    for _ in range(args.warmup):
        step()
    warm_kib = peak_kib()
    step.module.zero_grad(set_to_none=True)
    release_free_heap()
    if cuda:
        torch.cuda.synchronize(device)
        before_alloc = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    before_kib = rss_kib()
    reset_peak_rss()
    step()
    step_kib = peak_kib()
    result = {
        "method": "VmHWM after /proc/self/clear_refs" if resettable
                  else "ru_maxrss (not resettable: may include the build's and warm-up's peaks)",
        "rss_after_build_mib": build_kib / 1024,
        "rss_before_step_mib": before_kib / 1024,
        "rss_peak_step_above_before_mib": (step_kib - before_kib) / 1024,
        "rss_peak_warmup_above_build_mib": (warm_kib - build_kib) / 1024,
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        result |= {"cuda_before_step_gib": before_alloc / 2**30, "cuda_peak_step_gib": peak / 2**30,
                   "cuda_peak_step_above_before_gib": (peak - before_alloc) / 2**30}
    return result


def run_probe(argv: list[str], name: str, threads: int | None) -> dict:
    env = os.environ.copy()
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--memory-probe", name],
                          cwd=REPO, env=env, capture_output=True, text=True)
    line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith(PROBE_TAG)), None)
    if proc.returncode != 0 or line is None:
        return {"error": f"memory probe exited {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"}
    return json.loads(line[len(PROBE_TAG):])


def headline_memory(m: dict | None) -> float | None:
    """The number the memory goals compare, in MiB: the peak a step needs above the memory in use before it
    (CUDA: allocated; CPU: resident)."""
    if not m or "error" in m:
        return None
    return m["cuda_peak_step_above_before_gib"] * 1024 if "cuda_peak_step_gib" in m else m["rss_peak_step_above_before_mib"]


# ----- the report ---------------------------------------------------------------------------------------
def summarise(args, variants: dict[str, dict], flops: dict, batch_tokens: int, device: torch.device) -> dict:
    peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    for name, v in variants.items():
        if v["status"] != "ok":
            continue
        v["median_s"], v["min_s"] = statistics.median(v["times_s"]), min(v["times_s"])
        v["cpu_median_s"] = statistics.median(v["cpu_times_s"])
        v["tokens_per_s"] = batch_tokens / v["median_s"]
        v["flops_per_step"] = flops["mod" if name.startswith("ours_mod") else "dense"]["total"]
        v["tflops_per_s"] = v["flops_per_step"] / v["median_s"] / 1e12
        v["mfu"] = mfu(v["flops_per_step"], v["median_s"], 1, peak) if peak else None
    ok = {n: v for n, v in variants.items() if v["status"] == "ok"}
    for base in ("hf_eager", "hf_compiled"):
        if base not in ok:
            continue
        for name, v in ok.items():
            v[f"speedup_vs_{base}"] = ok[base]["median_s"] / v["median_s"]
            v[f"speedup_vs_{base}_min"] = ok[base]["min_s"] / v["min_s"]
            mine, theirs = headline_memory(v.get("memory")), headline_memory(ok[base].get("memory"))
            v[f"memory_ratio_vs_{base}"] = mine / theirs if mine is not None and theirs else None
    flops_ratio = flops["dense"]["total"] / flops["mod"]["total"]
    R = {}
    for kind, (d, m) in {"eager": ("ours_dense", "ours_mod"), "compiled": ("ours_dense_compiled", "ours_mod_compiled")}.items():
        if d in ok and m in ok:
            R[kind] = {"time_ratio": ok[d]["median_s"] / ok[m]["median_s"],
                       "R": ok[d]["median_s"] / ok[m]["median_s"] / flops_ratio,
                       "R_min": ok[d]["min_s"] / ok[m]["min_s"] / flops_ratio,
                       "R_cpu_time": ok[d]["cpu_median_s"] / ok[m]["cpu_median_s"] / flops_ratio}
    loss_check = None
    if "hf_eager" in ok and "ours_dense" in ok:
        hf, ours = ok["hf_eager"]["first_loss"], ok["ours_dense"]["first_loss"]
        rel = abs(hf - ours) / abs(hf)
        g_hf, g_ours = ok["hf_eager"]["first_grad_norms"], ok["ours_dense"]["first_grad_norms"]
        if set(g_hf) != set(g_ours):
            grad_rel, worst = math.inf, sorted(set(g_hf) ^ set(g_ours))[0]
        else:
            grad_rel, worst = max((abs(g_hf[k] - g_ours[k]) / max(abs(g_hf[k]), 1e-30), k) for k in g_hf)
        tol = TOLERANCE[args.dtype]
        loss_check = {"hf_eager": hf, "ours_dense": ours, "rel_diff": rel, "tolerance": tol["loss"],
                      "grad_norm_max_rel_diff": grad_rel, "grad_norm_worst_parameter": worst,
                      "grad_norm_tolerance": tol["grad_norm"],
                      "ok": rel <= tol["loss"] and grad_rel <= tol["grad_norm"]}
    goals = []
    for name, v in ok.items():
        if name.startswith("ours_") and "speedup_vs_hf_eager" in v:
            goal = GOALS["mod_speedup" if name.startswith("ours_mod") else "dense_speedup"]
            goals.append({"metric": f"{name} speed-up vs hf_eager", "value": v["speedup_vs_hf_eager"], "goal": goal,
                          "met": v["speedup_vs_hf_eager"] >= goal})
    for kind, r in R.items():
        goals.append({"metric": f"R ({kind})", "value": r["R"], "goal": GOALS["R"], "met": r["R"] >= GOALS["R"]})
    for name, v in ok.items():
        if name.startswith("ours_") and v.get("memory_ratio_vs_hf_eager") is not None:
            goals.append({"metric": f"{name} peak memory / hf_eager's", "value": v["memory_ratio_vs_hf_eager"],
                          "goal": GOALS["memory_ratio"], "met": v["memory_ratio_vs_hf_eager"] <= GOALS["memory_ratio"],
                          "at_most": True})
    return {"flops_ratio": flops_ratio, "R": R, "loss_check": loss_check, "goals": goals}


def plot(result: dict, png: Path) -> None:
    ok = {n: v for n, v in result["variants"].items() if v["status"] == "ok"}
    names = list(ok)
    colours = ["#777777" if n.startswith("hf_") else "#2ca02c" if n.startswith("ours_mod") else "#1f77b4" for n in names]
    mem = [headline_memory(ok[n].get("memory")) or 0.0 for n in names]
    bar_panels(png, names, [("median step time (s)", [ok[n]["median_s"] for n in names]),
                            ("peak memory of a step (MiB; CUDA: allocated)", mem)], colours, height=3.4,
               label_rotation=20)


def markdown(result: dict, png_name: str) -> str:
    st, m = result["setting"], result["model"]
    f = lambda x, fmt="{:.3f}": "-" if x is None else fmt.format(x)  # noqa: E731
    lines = [f"# Side by side: ours vs transformers' Emu3ForCausalLM ({result['device_name']})", "",
             f"Preset `{st['preset']}` (hidden {m['hidden_size']}, {m['num_hidden_layers']} layers, "
             f"{m['num_attention_heads']}/{m['num_key_value_heads']} heads, FFN {m['intermediate_size']}, vocabulary "
             f"{m['vocab']['vocab_size']}), t2i S = {st['seq_len']} x B = {st['batch']}, {st['dtype']} on "
             f"{st['device']}, SDPA {st['sdpa']}, {result['threads']} thread(s); MoD: capacity {st['capacity']} of all "
             f"tokens in layers {result['mod_layers']}. A step = forward + loss + backward; {st['warmup']} warm-up, "
             f"medians of {st['repeats']} interleaved repeats.", "",
             "| variant | median step (s) | min (s) | tokens/s | TFLOP/s | MFU | speed-up vs hf_eager (goal) | "
             "vs hf_compiled | peak memory of a step | memory vs hf_eager | first loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in result["variants"].items():
        if v["status"] != "ok":
            lines.append(f"| {name} | {v['status']} | | | | | | | | | |")
            continue
        goal = GOALS["mod_speedup"] if name.startswith("ours_mod") else GOALS["dense_speedup"]
        sp = f"{v['speedup_vs_hf_eager']:.2f}x" if "speedup_vs_hf_eager" in v else "-"
        if name.startswith("ours_") and "speedup_vs_hf_eager" in v:
            sp += f" (>= {goal:.2f}x)"
        mem = v.get("memory") or {}
        mem_txt = ("-" if not mem else "error" if "error" in mem else
                   f"{headline_memory(mem):.0f} MiB (of {mem['cuda_peak_step_gib']:.2f} GiB)" if "cuda_peak_step_gib" in mem
                   else f"{headline_memory(mem):.0f} MiB")
        lines.append(f"| {name} | {v['median_s']:.4f} | {v['min_s']:.4f} | {v['tokens_per_s']:.0f} | "
                     f"{v['tflops_per_s']:.3f} | {f(v['mfu'], '{:.1%}')} | {sp} | "
                     f"{f(v.get('speedup_vs_hf_compiled'), '{:.2f}x')} | {mem_txt} | "
                     f"{f(v.get('memory_ratio_vs_hf_eager'), '{:.2f}')} | {v['first_loss']:.6f} |")
    lines += ["", f"FLOPs per step (model/flops.py, this batch): dense {result['flops']['dense']['total']:.4e}, MoD "
              f"{result['flops']['mod']['total']:.4e}; flops_ratio = {result['flops_ratio']:.3f}.", ""]
    for kind, r in result["R"].items():
        lines.append(f"- R ({kind}) = ({r['time_ratio']:.3f} time ratio) / {result['flops_ratio']:.3f} = **{r['R']:.3f}** "
                     f"(goal >= {GOALS['R']}); from the fastest repeats {r['R_min']:.3f}, from CPU time {r['R_cpu_time']:.3f}")
    lc = result["loss_check"]
    if lc:
        lines.append(f"- same network ({'ok' if lc['ok'] else 'MISMATCH'}): first-step loss hf_eager {lc['hf_eager']:.7f}, "
                     f"ours_dense {lc['ours_dense']:.7f}, relative difference {lc['rel_diff']:.1e} (tolerance "
                     f"{lc['tolerance']:.0e}); gradient norms of every parameter within {lc['grad_norm_max_rel_diff']:.1e} "
                     f"(tolerance {lc['grad_norm_tolerance']:.0e}; worst {lc['grad_norm_worst_parameter']})")
    lines += ["", "| goal | value | target | met |", "|---|---|---|---|"]
    for g in result["goals"]:
        lines.append(f"| {g['metric']} | {g['value']:.3f} | {'<=' if g.get('at_most') else '>='} {g['goal']} | "
                     f"{'yes' if g['met'] else 'no'} |")
    for name, v in result["variants"].items():
        if "error" in v:
            lines += ["", f"{name} ({v['status']}): `{v['error'].splitlines()[0][:300]}`"]
    mem_method = next((v["memory"]["method"] for v in result["variants"].values()
                       if v.get("memory") and "method" in v["memory"]), None)
    if mem_method:
        lines += ["", f"Peak memory of a step: each variant in a fresh process, the peak of one step after the warm-up "
                      f"above the memory in use just before it (model, batch, compiled code; gradients freed): on CPU the "
                      f"resident set ({mem_method}, free heap trimmed first), on CUDA the allocated memory "
                      f"(the step's absolute peak in brackets)."]
    lines += ["", f"Load average before / after: {result['load_before']} / {result['load_after']}", "",
              f"![side by side]({png_name})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(PROBE_TAG + json.dumps(memory_probe(args)), flush=True)
        return {}
    device = torch.device(args.device)
    dense, mod = build_configs(args)
    batch = Batch(mod, args.batch, args.seq_len, device)
    positions = torch.arange(args.seq_len).expand(args.batch, args.seq_len)
    rows = describe_microbatch(batch.ids, positions, batch.task_ids, mod)
    flops = {"dense": microbatch_flops(dense, rows).to_dict(), "mod": microbatch_flops(mod, rows).to_dict()}
    load_before = load_average()

    variants = time_variants(args, dense, mod, batch, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_memory:
        for name, v in variants.items():
            if v["status"] == "ok":
                v["memory"] = run_probe(argv, name, args.threads)
                print(f"[side-by-side] memory {name}: {v['memory']}", flush=True)

    result = {
        "setting": {k: v for k, v in vars(args).items() if k not in ("out", "memory_probe")},
        "model": {k: v for k, v in dense.to_dict().items() if k != "mod"},
        "mod_layers": mod.mod.mod_layers(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "threads": torch.get_num_threads(),
        "machine": machine_info(),
        "load_before": load_before,
        "load_after": load_average(),
        "tokens_per_step": args.batch * args.seq_len,
        "routable_tokens_per_sequence": [sum(d.routable for d in r.documents) for r in rows],
        "padding_per_sequence": [r.padding for r in rows],
        "flops": flops,
        "flops_causal_attention": {"dense": microbatch_flops(dense, rows, causal_attention=True).total,
                                   "mod": microbatch_flops(mod, rows, causal_attention=True).total},
        "goals_targets": GOALS,
        "variants": variants,
    }
    result |= summarise(args, variants, flops, args.batch * args.seq_len, device)
    publish(args.out, result, lambda png: plot(result, png), markdown)
    return result


if __name__ == "__main__":
    main()
