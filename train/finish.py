"""Evaluation during and after training, and the end of a run once the training loop has stopped:

    whole weights gathered (once) -> HF export -> final evaluation -> summary.json

Training is complete (exit code 0) and its final checkpoint written before this starts: a stop signal from
here on is not a preemption (train/signals.py). The export is finished (the run's deliverable; its gather is
collective anyway), the final evaluation is skipped if the signal came before it started and finished if it
came during it, and the run exits 0 with status "completed". Requeueing would find the run finished and do
nothing more. A run that stopped early (exit 3, 74, 75) is neither exported nor evaluated; every run writes its
summary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from data.files import atomic_write
from train.checkpoint import describe_write_error
from train.config import RunConfig
from train.engine import Engine
from train.launch import barrier
from train.log import log
from train.metrics import DATA_TOTALS, MetricsLogger, RunTotals
from train.signals import EXIT_IO, EXIT_NONFINITE, EXIT_PREEMPTED, StopSignal

STATUS = {0: "completed", EXIT_PREEMPTED: "preempted", EXIT_NONFINITE: "stopped_nonfinite",
          EXIT_IO: "checkpoint_write_failed"}
"""summary.json's status for each exit code a started run ends with."""


class Evaluation:
    """Evaluation on the dataset's validation split (tools/evaluate.py: understanding, generation, perplexity,
    router agreement), every logging.eval_every steps before the last and once at the end. Global rank 0
    evaluates a plain, whole model: the trained one itself when it is not partitioned, else one built from the
    gathered weights; the other ranks take part in the gather and wait. Metrics go to TensorBoard (eval/*)
    with a grid of generated images, and at the end to <output_dir>/eval.json and the summary."""

    def __init__(self, cfg: RunConfig, engine: Engine, out: Path, rank: int, device: torch.device) -> None:
        self.cfg, self.engine, self.out, self.rank, self.device = cfg, engine, out, rank, device
        self._evaluator = None  # built at the first evaluation (it fits the digit judge once)

    def due(self, step: int) -> bool:
        """The last step has the final evaluation instead (logging.eval_at_end)."""
        every = self.cfg.logging.eval_every
        return bool(every) and step % every == 0 and step < self.cfg.run.max_steps

    def run(self, step: int, writer: MetricsLogger | None = None, final: bool = False,
            state: dict[str, torch.Tensor] | None = None) -> dict[str, float] | None:
        """Evaluate (collective). `writer`: the run's logger when rank 0 holds it, else one is opened for the
        eval scalars; `state`: the gathered weights when the caller has them. The metrics on rank 0."""
        model = self._whole_model(state)
        metrics = None
        if self.rank == 0:
            from tools.evaluate import EvalConfig, Evaluator
            from tools.generate import SamplingConfig

            if self._evaluator is None:
                self._evaluator = Evaluator(self.cfg.data.dataset_dir, EvalConfig(
                    max_samples=self.cfg.logging.eval_samples, sampling=SamplingConfig(seed=self.cfg.run.seed)))
            t0 = time.perf_counter()
            result = self._evaluator.run(model)
            metrics = result.metrics
            summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in
                                ("understanding/accuracy", "generation/accuracy", "text/perplexity") if k in metrics)
            log.info(f"[eval] step {step}: {summary} ({time.perf_counter() - t0:.0f} s)")
            own = writer is None
            if own:
                writer = MetricsLogger(self.out, True, 0, step, False, purge=False)
            writer.log(step, {f"eval/{k}": v for k, v in metrics.items()})
            if result.images is not None:
                writer.image("eval/samples", result.grid(), step)
            if own:
                writer.close()
            if final:
                atomic_write(self.out / "eval.json", json.dumps({"step": step, **metrics}, indent=2))
        barrier()
        return metrics

    def _whole_model(self, state: dict[str, torch.Tensor] | None) -> torch.nn.Module | None:
        """On rank 0 (None elsewhere); gathers the weights with every rank taking part when `state` is None and
        the trained module is partitioned."""
        if not self.engine.partitioned:
            return self.engine.whole_model if self.rank == 0 else None
        from model import UnifiedTransformer

        if state is None:
            state = self.engine.gather_state()
        if self.rank != 0:
            return None
        with torch.device("meta"):
            model = UnifiedTransformer(self.cfg.model)
        model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, assign=True)
        return model


def export_hf(cfg: RunConfig, path: Path, state: dict[str, torch.Tensor], rank: int) -> None:
    """Write the gathered weights (`Engine.gather_state`) as an HF Emu3 directory from rank 0."""
    if rank == 0:
        from model import UnifiedTransformer

        with torch.device("meta"):
            shell = UnifiedTransformer(cfg.model)  # only its config (and the neuron order below) is used by save_hf
        from train.moe_init import start_neuron_groups

        try:
            groups = start_neuron_groups(cfg)  # the dense MLPs in the source checkpoint's neuron order
        except (OSError, ValueError) as e:
            # init_from_hf changed since the start: expert order is as valid a dense MLP, so the export goes on
            log.warning(f"[train] {e}; MoE layers exported in expert order instead of the source's neuron order")
            groups = {}
        for layer, g in groups.items():
            shell.model.layers[layer].mlp.neuron_groups = g.tolist()
        shell.save_hf(path, state_dict=state)
        log.info(f"[train] exported HF Emu3 weights to {path}")
    barrier()


def export_and_evaluate(cfg: RunConfig, engine: Engine, evaluation: Evaluation, out: Path, rank: int, step: int,
                        stop: StopSignal, device: torch.device) -> tuple[dict[str, float] | None, dict[str, Any]]:
    """After a completed training: the HF export and the final evaluation, as configured, under the stop-signal
    rules of the module docstring (collective). -> (the final metrics on rank 0, notes for the summary)."""
    eval_metrics, notes = None, {}
    if not (cfg.checkpoint.export_hf or cfg.logging.eval_at_end):
        return eval_metrics, notes
    # Gathered once, for both the export and the final evaluation (which needs it only when the trained module is
    # partitioned).
    state = engine.gather_state() if cfg.checkpoint.export_hf or engine.partitioned else None
    if cfg.checkpoint.export_hf:
        export_hf(cfg, out / "hf", state, rank)
    if cfg.logging.eval_at_end and stop.agreed(device):
        notes["eval_skipped"] = (f"stop signal before the final evaluation; run it with python -m "
                                 f"tools.evaluate --checkpoint {out} --out {out / 'eval.json'}")
        log.info(f"[train] training is complete; {notes['eval_skipped']}")
    elif cfg.logging.eval_at_end:
        log.info("[train] final evaluation (a stop signal from now on waits for it to finish)")
        eval_metrics = evaluation.run(step, final=True, state=state)
    return eval_metrics, notes


def write_summary(cfg: RunConfig, out: Path, *, exit_code: int, step: int, start_step: int, totals: RunTotals,
                  wall_s: float, first_loss: float | None, last_loss: dict[str, float], world_size: int,
                  precision: str, device: torch.device, eval_metrics: dict[str, float] | None = None,
                  data_counters: dict[str, int] | None = None, notes: dict[str, Any] | None = None) -> None:
    """<output_dir>/summary.json (and printed), by the logging rank. Never raises for a full disk."""
    train_s = max(totals.train_s, 1e-9)
    summary = {
        "status": STATUS[exit_code],
        "steps": step,
        "steps_this_run": step - start_step,
        "tokens": totals.tokens,
        "real_tokens": totals.real_tokens,
        "pad_pct": 100.0 * (1 - totals.real_tokens / totals.tokens) if totals.tokens else 0.0,
        "loss_first": first_loss,
        "loss_final": last_loss.get("total"),
        "loss_final_per_task": {k: v for k, v in last_loss.items() if k != "total"},
        "tokens_per_s": totals.tokens / train_s,
        "real_tokens_per_s": totals.real_tokens / train_s,
        "tflops_per_device": totals.actual / train_s / world_size / 1e12,
        "flops_actual": totals.actual,
        "flops_dense": totals.dense,  # the dense baseline: real tokens only, each document alone
        "mod_flops_saved_pct": 100.0 * (1 - totals.actual / totals.dense) if totals.dense else 0.0,
        "skipped_nonfinite_microbatches": totals.skipped_nonfinite,
        "skipped_nonfinite_steps": totals.skipped_steps,
        "wall_time_s": wall_s,
        "world_size": world_size,
        "mode": cfg.parallel.mode,
        "precision": precision,
        "device": str(device),
    }
    if eval_metrics is None and exit_code == 0 and cfg.logging.eval_at_end and (out / "eval.json").exists():
        eval_metrics = json.loads((out / "eval.json").read_text())  # evaluated on another rank
        eval_metrics.pop("step", None)
    if eval_metrics is not None:
        summary["eval"] = {k: v for k, v in eval_metrics.items() if not k.startswith("router/")}
    if data_counters is not None:
        summary["data"] = {k: v for k, v in data_counters.items() if k in DATA_TOTALS or v}
    summary.update(notes or {})  # how a stop signal shaped this attempt (stopped_during, eval_skipped)
    path = out / "summary.json"
    try:
        atomic_write(path, json.dumps(summary, indent=2))
    except OSError as e:  # a full disk must not turn the run's exit code into a traceback
        log.error(f"[train] error: {describe_write_error(e, path)}; the summary is only printed", all_ranks=True)
    # The loss owner prints it (rank 0, or the last pipeline stage's first replica); the JSON starts on a line of
    # its own, after the header that carries the rank, so it can be copied as it is.
    log.info(f"[train] summary ({path}):\n{json.dumps(summary, indent=2)}", all_ranks=True)
