"""What a run reports: TensorBoard scalars, a metrics.jsonl twin for scripts, a console progress bar; the
scalars of a step (`StepLog`), the run's totals for summary.json (`RunTotals`), and the step timer.

Only the rank that owns the loss logs (rank 0 under ZeRO, the last pipeline stage's first data-parallel
rank under PP); every other rank gets a logger whose methods do nothing. Names follow torchtitan's
where they overlap (loss, grad_norm, tokens/s, tflops, mfu %, data-loading %, memory).
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from data.files import atomic_write
from model.flops import StepFlops, mfu, peak_flops, tflops_per_device
from model.moe import routed_load

DATA_TOTALS = ("read_samples", "skipped_samples", "skipped_shards", "lost_samples", "captions_dropped")
"""Loader counters logged at every log step and kept in summary.json even when 0; the per-reason ones
(`skipped_samples/<reason>`, ...) appear once they are not."""


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
    atomic_write(path, "".join(line + "\n" for line in kept))


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

    def timed(self, it: Iterator[Any]) -> Iterator[Any]:
        """`it`, the wait for each of its items counted in `data_s`."""
        while True:
            t = time.perf_counter()
            item = next(it)
            self.data_s += time.perf_counter() - t
            yield item

    def stop(self) -> float:
        self._sync()
        return time.perf_counter() - self._t0


class StepLog:
    """The scalars of a step, every logging.log_every steps and at the last one, written by the logging rank."""

    # Record fields the mod/ and moe/ scalars read, summed over every step since the previous line: MoD routing
    # counts, MoE slot counts, MoE balance losses and the micro-batches they are summed over.
    WINDOW = ("routing", "experts", "balance_sum", "loss_count")

    def __init__(self, logger: MetricsLogger, cfg, world_size: int, device: torch.device) -> None:
        self.logger, self.cfg, self.world_size, self.device = logger, cfg, world_size, device
        self.window: dict[str, torch.Tensor] = {}  # WINDOW fields summed over the steps since the last line

    def due(self, step: int) -> bool:
        return step % self.cfg.logging.log_every == 0 or step == self.cfg.run.max_steps

    def add(self, rec) -> None:
        """Every applied step joins the window the next line reports, so a task that is rare in the mix still
        shows its routers and experts (a logged step holds one task's micro-batches, often)."""
        for name in self.WINDOW:
            value = getattr(rec, name)
            if value is not None:
                self.window[name] = value.clone() if name not in self.window else self.window[name] + value

    def _take_window(self, rec) -> dict[str, torch.Tensor]:
        """The window's sums (this step's own record if no step was added since the last line); a new window."""
        window = self.window or {name: getattr(rec, name) for name in self.WINDOW if getattr(rec, name) is not None}
        self.window = {}
        return window

    def write(self, step: int, rec, lr: float, grad_norm: float | None, samples: int,
              data_counters: Mapping[str, int] | None) -> None:
        """`rec`: the step's record summed over the loss owners (train/engine.py); `samples`: over the whole
        data-parallel world; `data_counters`: the loader's, summed over the ranks that read data."""
        cfg = self.cfg
        scalars = {"loss/total": rec.total_loss, "mod/aux_loss": float(rec.aux_sum) / rec.microbatch_count,
                   "optim/lr": lr, "time/step_s": rec.step_s,
                   "time/data_pct": 100.0 * rec.data_s / rec.step_s if rec.step_s > 0 else 0.0}
        if grad_norm is not None:
            scalars["optim/grad_norm"] = float(grad_norm)
        scalars.update({f"loss/{task}": loss for task, loss in rec.task_losses(cfg.model.mod.tasks).items()})
        if rec.flops is not None:
            scalars.update(throughput_scalars(rec.flops, rec.flops_model, rec.step_s, self.world_size, samples,
                                              self.device, cfg.logging.peak_tflops))
        # mod/* and moe/*: counts over every step since the previous line (`add`), not only this one.
        window = self._take_window(rec)
        routing = window["routing"]
        for layer in cfg.model.mod.mod_layers():
            for t, task in enumerate(cfg.model.mod.tasks):
                n_routable, n_selected, n_on, n_agree = routing[layer, t].tolist()
                if n_routable > 0:
                    scalars[f"mod/capacity/{task}/layer_{layer}"] = n_selected / n_routable
                    if cfg.model.mod.capacity_of(layer, t) < 1.0:
                        # The routers learning: the share of routable tokens a causal decision (r > 0, what
                        # sampling uses) would keep, and how often it agrees with the top-k that trains.
                        # (The evaluator logs the same two on validation data as router/...)
                        scalars[f"mod/causal_keep/{task}/layer_{layer}"] = n_on / n_routable
                        scalars[f"mod/agreement/{task}/layer_{layer}"] = n_agree / n_routable
        scalars.update(self._moe_scalars(window))
        scalars.update(memory_scalars(self.device))
        # Cumulative over the run. captions_dropped shows that classifier-free-guidance dropout
        # (data.caption_dropout) is live; the skip and loss counters make data dropped under data.bad_input: skip
        # visible per reason (data.max_skip_fraction bounds them).
        for key, value in (data_counters or {}).items():
            if key in DATA_TOTALS or value:
                scalars[f"data/{key}"] = float(value)
        self.logger.log(step, scalars)

    def _moe_scalars(self, window: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """moe/*: slot counts and the balance loss over the window (`_take_window`), per MoE layer and task
        present, over the routed experts (shared experts run every token, so they have no load to balance): each
        routed expert's share of the task's run-or-dropped routed slots (`load`, tagged by its index among all E),
        the dropped share (over capacity), and the busiest one's share times E - S (`max_load`: 1.0 is a
        perfect balance)."""
        experts = window.get("experts")
        if experts is None:
            return {}
        balance, n = float(window["balance_sum"]), float(window["loss_count"].sum())
        moe = self.cfg.model.moe
        S, E = moe.shared_experts, moe.num_experts
        out = {"moe/balance_loss": balance / max(n, 1.0)}
        for layer in moe.layers:
            for t, task in enumerate(self.cfg.model.mod.tasks):
                load = routed_load(experts[layer, t, :E, 0], S)  # over every slot asked for: run or dropped
                if load is None:
                    continue
                shares, max_load = load
                for e, share in enumerate(shares.tolist(), start=S):
                    out[f"moe/load/{task}/layer_{layer}/expert_{e}"] = share
                dropped, routed = sum(experts[layer, t, S:E, 1].tolist()), sum(experts[layer, t, S:E, 0].tolist())
                out[f"moe/dropped/{task}/layer_{layer}"] = dropped / routed
                out[f"moe/max_load/{task}/layer_{layer}"] = max_load
        return out


@dataclasses.dataclass
class RunTotals:
    """What this attempt trained, for summary.json: tokens (positions, padding included) and real tokens, FLOPs
    as run and of the dense baseline, training time, and the non-finite micro-batches and steps skipped."""

    tokens: int = 0
    real_tokens: int = 0
    actual: int = 0
    dense: int = 0
    train_s: float = 0.0
    skipped_nonfinite: int = 0
    skipped_steps: int = 0

    def add_step(self, rec) -> None:
        """An applied step (`rec.flops` is the global step's, on the ranks that count it)."""
        if rec.flops is not None:
            self.tokens += rec.flops.tokens
            self.real_tokens += rec.flops.real_tokens
            self.actual += rec.flops.actual
            self.dense += rec.flops.dense
        self.train_s += rec.step_s
