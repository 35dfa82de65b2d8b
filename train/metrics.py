"""What a run reports: TensorBoard scalars, a metrics.jsonl twin for scripts, a console progress bar.

Only the rank that owns the loss logs (rank 0 under ZeRO, the last pipeline stage's first data-parallel
rank under PP); every other rank gets a logger whose methods do nothing. Names follow torchtitan's
where they overlap (loss, grad_norm, tokens/s, tflops, mfu %, data-loading %, memory).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from model.flops import StepFlops, mfu, peak_flops, tflops_per_device


class MetricsLogger:
    def __init__(self, output_dir: str | Path, enabled: bool, total_steps: int, start_step: int,
                 progress_bar: bool = True, purge: bool = True) -> None:
        """`purge` (the run's main logger) drops records a crashed run wrote after `start_step`; a second
        writer for the same run (evaluation at the end) passes False."""
        self.enabled = enabled
        self._writer = None
        self._bar = None
        self._jsonl = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        out = Path(output_dir)
        # purge_step hides events a crashed run logged after the checkpoint it resumes from.
        self._writer = SummaryWriter(str(out / "tensorboard"),
                                     purge_step=start_step + 1 if start_step and purge else None)
        self._jsonl_path = out / "metrics.jsonl"
        if purge:
            _truncate_jsonl(self._jsonl_path, start_step)
        self._jsonl = open(self._jsonl_path, "a")
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)
        self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")
        self._jsonl.flush()
        if self._bar is not None:
            shown = {k.split("/", 1)[1]: f"{scalars[k]:.4g}" for k in ("loss/total", "throughput/tokens_per_s")
                     if k in scalars}
            self._bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def image(self, tag: str, image_HWC, step: int) -> None:
        if self.enabled:
            self._writer.add_image(tag, image_HWC, step, dataformats="HWC")

    def text(self, tag: str, text: str, step: int) -> None:
        if self.enabled:
            self._writer.add_text(tag, text, step)

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _truncate_jsonl(path: Path, keep_until: int) -> None:
    """Keep the records of steps <= keep_until (a resumed run re-logs the steps after its checkpoint)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= keep_until]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def throughput_scalars(flops: StepFlops, flops_no_recompute: StepFlops, step_time_s: float, world_size: int,
                       samples: int, device: torch.device, peak_tflops: float | None) -> dict[str, float]:
    """tokens/s (positions, padding included) and real tokens/s, samples/s, achieved TFLOP/s per device
    (hardware work, recompute included), MFU (model FLOPs without recompute over peak), the FLOPs of the step
    as run vs the dense baseline (a dense model on the real tokens only, so MoD's saving is not padding it
    skipped), and the share of padding among the step's positions."""
    out = {
        "throughput/tokens_per_s": flops.tokens / step_time_s,
        "throughput/real_tokens_per_s": flops.real_tokens / step_time_s,
        "throughput/samples_per_s": samples / step_time_s,
        "throughput/tflops_per_device": tflops_per_device(flops.actual, step_time_s, world_size),
        "flops/actual_per_step": float(flops.actual),
        "flops/dense_per_step": float(flops.dense),
        "flops/mod_saved_pct": flops.saved_pct,
        "data/pad_pct": flops.pad_pct,
    }
    peak = peak_tflops * 1e12 if peak_tflops else None
    if peak is None and device.type == "cuda":
        peak = peak_flops(torch.cuda.get_device_name(device))
    if peak:
        out["throughput/mfu_pct"] = 100.0 * mfu(flops_no_recompute.actual, step_time_s, world_size, peak)
    return out


def memory_scalars(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {"memory/max_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory/max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    # CPU: the process's peak resident set (ru_maxrss is KiB on Linux).
    return {"memory/max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class StepTimer:
    """Wall time of a step and the part spent waiting for data (synchronising the GPU at the edges so
    asynchronous kernels are charged to the step that launched them)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.data_s = 0.0
        self._t0 = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.data_s = 0.0
        self._t0 = time.perf_counter()

    def fetch(self, it) -> Any:
        t = time.perf_counter()
        item = next(it)
        self.data_s += time.perf_counter() - t
        return item

    def stop(self) -> float:
        self._sync()
        return time.perf_counter() - self._t0
