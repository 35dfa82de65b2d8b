"""The training loop, top to bottom: data -> engine -> loss -> step -> metrics -> checkpoint.

One optimizer step = `optim.grad_accum` micro-batches per data-parallel rank. Micro-batches are
task-homogeneous (the loader's contract), so a micro-batch's loss is that task's loss. Under pipeline
parallelism DeepSpeed's `train_batch` runs the whole step and only the last stage owns the loss, so that
stage logs.

FLOPs are counted from what actually ran: every micro-batch a rank trains on is described as it is
fetched (`model.flops.describe_microbatch`: documents, routable tokens, padding), counted on that rank and
summed over ranks exactly. Under the pipeline the last stage fetches every micro-batch too (for its
labels), so it counts them and sums over its data-parallel replicas; it is also the stage that logs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from data.files import atomic_write
from data.loader import UnimodLoader
from model.loss import causal_lm_loss
from model.flops import RowTokens, StepFlops, describe_microbatch, step_flops
from train import fingerprint as fingerprints
from train.checkpoint import (EXIT_CONFIG, EXIT_IO, EXIT_NONFINITE, EXIT_PREEMPTED, CheckpointManager,
                              CheckpointWriteError, broadcast_from_rank0, describe_write_error,
                              rng_state, set_rng_state)
from train.config import RunConfig
from train.launch import DistEnv
from train.engine import apply_optim_config, consolidated_state_dict, params_finite
from train.metrics import MetricsLogger, StepTimer, memory_scalars, throughput_scalars
from train.signals import StopSignal


def _all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def _sum_exact(values: list[int], device: torch.device, group=None) -> list[int]:
    """Sum non-negative Python ints over ranks exactly. FLOPs of a large step pass float64's 2^53, and their
    sum over many ranks could pass int64's range, so each value travels as two 32-bit halves in int64."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    assert all(0 <= v < 1 << 62 for v in values), values
    halves = torch.tensor([[v >> 32 for v in values], [v & 0xFFFFFFFF for v in values]], dtype=torch.int64,
                          device=device)
    dist.all_reduce(halves, group=group)
    hi, lo = halves.tolist()
    return [(h << 32) + l for h, l in zip(hi, lo)]


_DATA_TOTALS = ("read_samples", "skipped_samples", "skipped_shards", "lost_samples", "captions_dropped")
"""Loader counters logged at every log step and kept in summary.json even when 0; the per-reason ones
(`skipped_samples/<reason>`, ...) appear once they are not."""


@dataclasses.dataclass
class StepRecord:
    """What one optimizer step produced on this rank (reduced across ranks before logging)."""

    loss_sum: torch.Tensor    # [T] summed micro-batch losses per task
    loss_count: torch.Tensor  # [T] micro-batches per task
    aux_sum: torch.Tensor     # [] summed aux losses
    routing: torch.Tensor     # [L, T, 2] routable / selected tokens
    samples: int = 0
    skipped_nonfinite: int = 0
    """Micro-batches skipped for a non-finite loss."""
    applied: bool = True
    """The optimizer step was applied (False: skipped for a non-finite global gradient norm)."""
    microbatches: list[list[RowTokens]] = dataclasses.field(default_factory=list)
    """What each micro-batch trained on here held (for its FLOPs); empty on middle pipeline stages."""


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: dict[str, Any], env: DistEnv, device: torch.device,
                 precision: str) -> None:
        self.cfg, self.ds_config, self.env, self.device, self.precision = cfg, ds_config, env, device, precision
        self.out = Path(cfg.run.output_dir)
        self.pipeline = cfg.parallel.mode == "pipeline"
        self.stages = cfg.parallel.pipeline_stages if self.pipeline else 1
        self.dp_world = env.world_size // self.stages
        self.zero_stage = ds_config["zero_optimization"].get("stage", 0)
        T, L = cfg.model.num_tasks, cfg.model.num_hidden_layers
        self._zeros = lambda: StepRecord(torch.zeros(T, device=device), torch.zeros(T, device=device),
                                         torch.zeros((), device=device), torch.zeros(L, T, 2, device=device))
        self.fingerprint = fingerprints.fingerprint(cfg, world_size=env.world_size, zero_stage=self.zero_stage,
                                                    precision=precision)
        self.cfg_as_given = cfg  # what config.yaml records (self.cfg gets checkpoint.resume pinned below)
        # A resume this run may not make is found before any engine exists (so a shape change never reaches
        # torch) and reported by fit() as exit 2 on every rank: main.py maps only its own start-up errors to 2.
        self.refusal: str | None = None
        try:
            cfg = self.cfg = self._check_resume()
        except ValueError as e:
            self.refusal = str(e)
            return

        # Resuming on another layout (world size, mode, stages, ZeRO stage) converts the checkpoint here, before
        # the engine exists: DeepSpeed reads "load_universal" at initialize (train/elastic.py).
        from train.elastic import before_engine

        try:  # a refused layout change is the same on every rank: exit 2 like the checks above
            self.resume_plan = before_engine(cfg, ds_config, env.rank, env.world_size)
        except ValueError as e:
            self.refusal = str(e)
            return
        if self.pipeline:
            from train.pipeline import build_pipeline_engine

            self.engine, self.model = build_pipeline_engine(cfg, ds_config, precision, device)
            self.dp_rank = self.engine.grid.get_data_parallel_id()
            self.logs_here = self.engine.is_last_stage() and self.dp_rank == 0
        else:
            from train.engine import build_zero_engine

            self.engine, self.model = build_zero_engine(cfg, ds_config, precision, device)
            self.dp_rank = env.rank
            self.logs_here = env.rank == 0
        self.loader = UnimodLoader(cfg.data, tasks=cfg.model.mod.tasks, rank=self.dp_rank,
                                   world_size=self.dp_world, layout=cfg.model.vocab)
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.checkpoint.keep_last, env.rank)
        self.step = 0
        self.last_loss: dict[str, float] = {}
        self.first_loss: float | None = None
        self._evaluator = None  # built at the first evaluation (it fits the digit judge once)

    # ----- data ------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[tuple[dict[str, torch.Tensor], list[RowTokens]]]:
        """(batch on the device, its rows described for the FLOPs count, read from the host copy)."""
        model_cfg = self.cfg.model
        while True:  # epochs follow one another; the loader's state says where we are
            for batch in self.loader:
                rows = describe_microbatch(batch["input_ids"], batch["position_ids"], batch["task_ids"], model_cfg)
                yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}, rows

    # ----- resume ------------------------------------------------------------------------------------------
    def _check_resume(self) -> RunConfig:
        """Rank 0 picks the checkpoint to resume (ranks with a stale view of a shared filesystem could see
        another `latest`) and compares its fingerprint with this run's; every rank gets rank 0's answer.
        Returns the config with checkpoint.resume pinned to that checkpoint ("none" when there is none), so
        every later reader (elastic resume, the load) takes the same one. Raises ValueError naming each change
        this run may not make (layout changes are train/elastic.py's to judge)."""
        cfg = self.cfg
        answer: tuple[Any, ...] = ("none",)
        if self.env.rank == 0:
            try:
                found = CheckpointManager.resolve(cfg.checkpoint.resume, self.out / "checkpoints")
                if found is not None:
                    saved = fingerprints.read(found[0] / found[1])
                    answer = ("found", found, None if saved is None else
                              fingerprints.compare(saved, self.fingerprint, cfg.checkpoint.accept_changes))
            except ValueError as e:
                answer = ("error", str(e))
        answer = broadcast_from_rank0(answer)
        if answer[0] == "error":
            raise ValueError(answer[1])
        if answer[0] == "none":
            return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume="none"))
        (root, tag), comparison = answer[1], answer[2]
        where = f"checkpoint {root / tag}"
        if comparison is None:
            if self.env.rank == 0:
                print(f"[train] {where} has no {fingerprints.FINGERPRINT} (written before fingerprints): resuming "
                      f"without checking that this run's configuration matches it", flush=True)
        elif comparison.shape or comparison.refused:
            raise ValueError(comparison.error(where))
        elif self.env.rank == 0:
            for c in comparison.accepted:
                print(f"[train] resuming with an accepted change (checkpoint.accept_changes) {c}", flush=True)
            for name in comparison.unused_accepts:
                print(f"[train] note: checkpoint.accept_changes names {name}, which did not change", flush=True)
        return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=str(root / tag)))

    def _write_configs(self) -> str | None:
        """Rank 0 writes the resolved config as config.yaml and as configs/config_<n>.yaml, n counting this
        output directory's starts, so a restart never loses an earlier start's config (a config.yaml from before
        configs/ existed becomes config_000). Both atomically: a full disk leaves the previous config.yaml
        whole. Returns the error (the same on every rank), None when written."""
        error = None
        if self.env.rank == 0:
            import yaml

            path = self.out / "config.yaml"
            try:
                history = self.out / "configs"
                history.mkdir(parents=True, exist_ok=True)
                starts = sorted(history.glob("config_*.yaml"))
                if not starts and path.exists():
                    atomic_write(history / "config_000.yaml", path.read_text())
                    starts = [history / "config_000.yaml"]
                text = yaml.safe_dump(self.cfg_as_given.to_dict(), sort_keys=False)
                path = history / f"config_{len(starts):03d}.yaml"
                atomic_write(path, text)
                path = self.out / "config.yaml"
                atomic_write(path, text)
            except OSError as e:
                error = f"the run's config was not saved: {describe_write_error(e, path)}"
        return broadcast_from_rank0(error)

    def _resume(self) -> None:
        plan = self.resume_plan
        if plan is None:
            return
        if plan.changed:
            from train.elastic import load

            state = load(self.engine, plan, self.ckpt)
        else:
            state = self.ckpt.load(self.engine, plan.load_dir, plan.tag)
        self.step = int(state["step"])
        # Another data-parallel size: the loader restarts the epoch at the same global position.
        self.loader.load_state_dict(state["loader"], elastic=plan.changed)
        set_rng_state(state["rng"])
        self.last_loss = state.get("last_loss", {})
        self.first_loss = state.get("first_loss")
        # The loaded optimizer and LR schedule carry the checkpoint's lr/betas/decay/schedule: this run's
        # (changed ones accepted by _check_resume) apply from the resumed step on.
        apply_optim_config(self.engine, self.cfg.optim, self.cfg.run.max_steps)
        if self.env.rank == 0:
            print(f"[train] resumed from {plan.state_dir} at step {self.step}", flush=True)

    def _save(self, prune: bool = True) -> bool:
        """Checkpoint the current step unless a weight is non-finite (such a model is never saved: False).
        Raises CheckpointWriteError when it could not be written (fit exits EXIT_IO)."""
        if not params_finite(self.engine.module):
            self.log.print(f"[train] the model has non-finite weights at step {self.step}: not saving it; "
                           f"{self.ckpt.latest() or 'no checkpoint'} stays the latest")
            return False
        state = {"loader": self.loader.state_dict(), "rng": rng_state(), "last_loss": self.last_loss,
                 "first_loss": self.first_loss}
        tag = self.ckpt.save(self.engine, self.step, state, self.fingerprint, prune=prune)
        self.log.print(f"[train] checkpoint {self.out / 'checkpoints' / tag}")
        return True

    # ----- one optimizer step -------------------------------------------------------------------------------
    def _zero_step(self, it, timer: StepTimer, rec: StepRecord, consecutive: int) -> int:
        """Runs micro-batches until grad_accum of them had a finite loss, then the optimizer step, which the
        engine skips when the global gradient norm is not finite (train/engine.py). `consecutive` counts the
        non-finite events (skipped micro-batches and steps) since the last applied step; returns it updated
        (0 after an applied step), early once it reaches checkpoint.max_consecutive_nonfinite."""
        cfg, engine = self.cfg, self.engine
        done = 0
        while done < cfg.optim.grad_accum:
            batch, rows = timer.fetch(it)
            out = engine(batch["input_ids"], task_ids=batch["task_ids"], position_ids=batch["position_ids"])
            ce = causal_lm_loss(out.logits, batch["labels"])
            loss = ce + out.aux_loss
            finite = _all_reduce(torch.isfinite(loss.detach()).float().reshape(1), dist.ReduceOp.MIN)
            if finite.item() < 1:
                # Skip the micro-batch on every rank (no backward, no step); its data is consumed.
                rec.skipped_nonfinite += 1
                consecutive += 1
                self.log.print(f"[train] step {self.step + 1}: non-finite loss, micro-batch skipped "
                               f"({consecutive} in a row)")
                if consecutive >= cfg.checkpoint.max_consecutive_nonfinite:
                    return consecutive
                continue
            engine.backward(loss)
            engine.step()
            t = int(batch["task_ids"][0])
            rec.loss_sum[t] += ce.detach()
            rec.loss_count[t] += 1
            rec.aux_sum += out.aux_loss.detach()
            rec.routing += out.routing.detach()
            rec.samples += batch["input_ids"].shape[0]
            rec.microbatches.append(rows)  # a skipped micro-batch's forward is not counted
            done += 1
        # The last engine.step() was the accumulation boundary: the engine applied the update or skipped it.
        rec.applied = engine.was_step_applied()
        if rec.applied:
            return 0
        consecutive += 1
        self.log.print(f"[train] step {self.step + 1}: non-finite gradient norm, optimizer step skipped "
                       f"({consecutive} in a row)")
        return consecutive

    def _pipeline_step(self, it, timer: StepTimer, rec: StepRecord, consecutive: int) -> int:
        """One train_batch (DeepSpeed runs every micro-batch and the step). PipeLoss on the last stage turns a
        non-finite loss into a zero contribution and counts it; the engine skips the step on a non-finite
        global gradient norm. Returns `consecutive` (see _zero_step) updated."""
        from train.pipeline import PipelineStepStats

        stats = PipelineStepStats.attach(self.engine, rec)
        timed = _TimedIter(it, timer, rec.microbatches)
        self.engine.train_batch(data_iter=timed)
        stats.detach()
        rec.samples += self.cfg.data.micro_batch_size * self.cfg.optim.grad_accum
        # Only the last stage counted the non-finite micro-batches; every stage learns the count and whether
        # the step was applied (the engine decides from the norm over all stages, so they agree anyway).
        flags = _all_reduce(torch.tensor([float(rec.skipped_nonfinite), float(not self.engine.was_step_applied())],
                                         device=self.device), dist.ReduceOp.MAX)
        rec.skipped_nonfinite = int(flags[0].item())
        rec.applied = flags[1].item() == 0
        if rec.applied and rec.skipped_nonfinite == 0:
            return 0
        if not rec.applied:
            self.log.print(f"[train] step {self.step + 1}: non-finite gradient norm, optimizer step skipped")
        return consecutive + rec.skipped_nonfinite + (0 if rec.applied else 1)

    def _step_flops(self, rec: StepRecord) -> tuple[StepFlops | None, StepFlops | None]:
        """The global step's FLOPs (recompute as configured; and without it, for MFU) on the ranks that count
        them: every rank under ZeRO, the last stage under the pipeline (None elsewhere, and for no tokens)."""
        if self.pipeline and not self.engine.is_last_stage():
            return None, None
        counted = []
        for recompute in (self.cfg.parallel.activation_checkpointing, False):
            local = step_flops(self.cfg.model, rec.microbatches, recompute=recompute) if rec.microbatches else None
            counted.append(local or StepFlops(actual=0, dense=0, tokens=0, real_tokens=0))
        with_rc, without = counted
        group = self.engine.grid.get_data_parallel_group() if self.pipeline else None
        actual, actual_model, dense, dense_model, tokens, real = _sum_exact(
            [with_rc.actual, without.actual, with_rc.dense, without.dense, with_rc.tokens, with_rc.real_tokens],
            self.device, group)
        if tokens == 0:
            return None, None
        return (StepFlops(actual=actual, dense=dense, tokens=tokens, real_tokens=real),
                StepFlops(actual=actual_model, dense=dense_model, tokens=tokens, real_tokens=real))

    # ----- the run -------------------------------------------------------------------------------------------
    def fit(self, stop: StopSignal | None = None) -> int:
        """Train to run.max_steps; returns the exit code. `stop` is main()'s handler (installed at the start of
        start-up); without one, fit installs its own for its duration. What a signal does in each phase is
        described in train/signals.py."""
        own_stop = stop is None
        stop = stop or StopSignal(raise_now=False)
        try:
            return self._fit(stop)
        finally:
            if own_stop:
                stop.restore()

    def _fit(self, stop: StopSignal) -> int:
        cfg = self.cfg
        error, code = self.refusal, EXIT_CONFIG
        if error is None:
            error, code = self._write_configs(), EXIT_IO
        if error is None:
            try:
                self._resume()
            except ValueError as e:  # the loader's own check: the batch order would change
                error, code = str(e), EXIT_CONFIG
        if error is not None:
            if self.env.rank == 0:
                print(f"error: {error}", file=sys.stderr, flush=True)
            return code
        start_step = self.step
        if start_step >= cfg.run.max_steps and _summary_status(self.out) == "completed":
            # A finished run (e.g. the demo run again): nothing to train, keep its summary as it is. One that
            # trained to the end but was killed before its summary goes on to the export and evaluation below.
            if self.logs_here:
                print(f"[train] {self.out} already reached run.max_steps={cfg.run.max_steps}; its summary:",
                      flush=True)
                print((self.out / "summary.json").read_text(), flush=True)
            return 0
        if stop.agreed(self.device):
            # Built and resumed, not yet trained: the checkpoint resumed from (if any) is still the newest.
            if self.logs_here:
                print(f"[train] stop signal before the first step: exiting with code {EXIT_PREEMPTED}, nothing new "
                      f"to save (resume with checkpoint.resume=auto)", flush=True)
                if not (self.out / "summary.json").exists():  # an earlier attempt's summary still describes the run
                    self._write_summary(_ZERO_TOTALS, 0.0, EXIT_PREEMPTED, start_step,
                                        notes={"stopped_during": "startup", "signal": stop.name})
            return EXIT_PREEMPTED
        self.log = MetricsLogger(self.out, self.logs_here, cfg.run.max_steps, start_step, cfg.logging.progress_bar)
        it = self._batches()
        timer = StepTimer(self.device)
        t_run = time.perf_counter()
        totals = dict(_ZERO_TOTALS)
        exit_code = 0
        consecutive = 0
        try:
            while self.step < cfg.run.max_steps:
                rec = self._zeros()
                timer.start()
                step_fn = self._pipeline_step if self.pipeline else self._zero_step
                consecutive = step_fn(it, timer, rec, consecutive)
                step_s = timer.stop()
                totals["skipped_nonfinite"] += rec.skipped_nonfinite
                totals["skipped_steps"] += not rec.applied
                if consecutive >= cfg.checkpoint.max_consecutive_nonfinite:
                    self.log.print(f"[train] {consecutive} consecutive non-finite losses or gradient norms at step "
                                   f"{self.step + 1}: stopping; lower optim.lr (resuming with a new value needs "
                                   f"--set checkpoint.accept_changes=[optim.lr]) or check the data")
                    # Saved only if the weights are finite, never over a complete checkpoint of this step, and
                    # without pruning: the checkpoints before the trouble stay.
                    self._save(prune=False)
                    exit_code = EXIT_NONFINITE
                    break
                if not rec.applied:
                    continue  # the step is taken again with the next micro-batches
                self.step += 1

                # Reduce what this step did across ranks (loss owners only matter for logging).
                packed = torch.cat([rec.loss_sum, rec.loss_count, rec.aux_sum.reshape(1), rec.routing.flatten()])
                if not self.pipeline:
                    _all_reduce(packed)
                elif self.engine.is_last_stage() and self.dp_world > 1:
                    # Only the last stage holds losses: sum its data-parallel replicas.
                    dist.all_reduce(packed, group=self.engine.grid.get_data_parallel_group())
                T = cfg.model.num_tasks
                loss_sum, loss_count = packed[:T], packed[T:2 * T]
                aux_sum, routing = packed[2 * T], packed[2 * T + 1:].view_as(rec.routing)
                flops, flops_model = self._step_flops(rec)
                n_micro = max(1.0, float(loss_count.sum()))
                total_loss = float(loss_sum.sum()) / n_micro + float(aux_sum) / n_micro
                for t, task in enumerate(cfg.model.mod.tasks):
                    if loss_count[t] > 0:
                        self.last_loss[task] = float(loss_sum[t] / loss_count[t])
                self.last_loss["total"] = total_loss
                if self.first_loss is None:
                    self.first_loss = total_loss
                if flops is not None:
                    totals["tokens"] += flops.tokens
                    totals["real_tokens"] += flops.real_tokens
                    totals["actual"] += flops.actual
                    totals["dense"] += flops.dense
                totals["train_s"] += step_s

                if self.step % cfg.logging.log_every == 0 or self.step == cfg.run.max_steps:
                    self._log_step(step_s, timer.data_s, total_loss, loss_sum, loss_count, aux_sum, n_micro,
                                   routing, flops, flops_model, rec.samples * self.dp_world)
                self.log.advance()

                # The last step is not a stop: training is complete and the end-of-run phase below applies.
                last = self.step >= cfg.run.max_steps
                if not last and stop.agreed(self.device):
                    self.log.print(f"[train] stop signal received: checkpointing at step {self.step} and exiting "
                                   f"with code {EXIT_PREEMPTED} (resume with checkpoint.resume=auto)")
                    self._save()
                    exit_code = EXIT_PREEMPTED
                    break
                if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                    if not self._save():  # non-finite weights: nothing this run does from here can be kept
                        exit_code = EXIT_NONFINITE
                        break
                    if not last and stop.agreed(self.device):
                        # It arrived while this checkpoint was written (the workers kept running): that one is
                        # complete and is the one to resume from; a second save would only spend the grace time.
                        self.log.print(f"[train] stop signal received while checkpointing step {self.step}: that "
                                       f"checkpoint is complete; exiting with code {EXIT_PREEMPTED} (resume with "
                                       f"checkpoint.resume=auto)")
                        exit_code = EXIT_PREEMPTED
                        break
                if cfg.logging.eval_every and self.step % cfg.logging.eval_every == 0 and self.step < cfg.run.max_steps:
                    self.evaluate()
            else:
                if self.ckpt.latest() != f"step_{self.step:08d}" and not self._save():
                    exit_code = EXIT_NONFINITE
        except CheckpointWriteError as e:
            self.log.print(f"[train] error: {e}; exiting with code {EXIT_IO}")
            exit_code = EXIT_IO
        finally:
            it.close()  # shuts the loader's workers down in order (they ignore stop signals: data/loader.py)
            self.log.close()
        data_counters = self._data_counters()

        # Training is complete and its final checkpoint too: a stop signal from here on is not a preemption.
        # The export is finished (the run's deliverable; its gather is collective anyway), the final evaluation
        # is skipped if the signal came before it started and finished if it came during it, and the run
        # exits 0 with status "completed". Requeueing would find the run finished and do nothing more.
        eval_metrics, notes = None, {}
        if exit_code == 0 and (cfg.checkpoint.export_hf or cfg.logging.eval_at_end):
            partitioned = self.pipeline or self.zero_stage == 3
            # Gathered once, for both the export and the final evaluation (which needs it only when the
            # trained module is partitioned).
            state = self._gathered_state() if cfg.checkpoint.export_hf or partitioned else None
            if cfg.checkpoint.export_hf:
                self.export_hf(self.out / "hf", state)
            if cfg.logging.eval_at_end and stop.agreed(self.device):
                notes["eval_skipped"] = (f"stop signal before the final evaluation; run it with python -m "
                                         f"tools.evaluate --checkpoint {self.out} --out {self.out / 'eval.json'}")
                if self.env.rank == 0:
                    print(f"[train] training is complete; {notes['eval_skipped']}", flush=True)
            elif cfg.logging.eval_at_end:
                if self.env.rank == 0:
                    print("[train] final evaluation (a stop signal from now on waits for it to finish)", flush=True)
                eval_metrics = self.evaluate(final=True, state=state)
        if self.logs_here:  # the loss owner: rank 0, or the last pipeline stage's first replica
            notes["data"] = {k: v for k, v in (data_counters or {}).items() if k in _DATA_TOTALS or v}
            self._write_summary(totals, time.perf_counter() - t_run, exit_code, start_step, eval_metrics, notes)
        return exit_code

    # ----- evaluation (tools/evaluate.py: understanding, generation, perplexity, router agreement) ----------
    def _gathered_state(self) -> dict[str, torch.Tensor]:
        """The whole weights under HF names on rank 0 ({} on the other ranks, which all take part in the
        gather from the ZeRO-3 or pipeline shards)."""
        if self.pipeline:
            from train.pipeline import consolidated_pipeline_state_dict

            state = consolidated_pipeline_state_dict(self.engine, self.cfg.model, self.out / ".gather")
        else:
            state = consolidated_state_dict(self.engine, self.model, self.zero_stage)
        return state if self.env.rank == 0 else {}

    def evaluate(self, final: bool = False, state: dict[str, torch.Tensor] | None = None) -> dict[str, float] | None:
        """Evaluate on the dataset's validation split. The evaluating rank holds a plain, whole model: the
        trained module itself when it is not partitioned, else one built from `state` (the gathered weights,
        gathered here with every rank taking part when None; the others wait). Metrics go to TensorBoard
        (eval/*) with a grid of generated images, and at the end to <output_dir>/eval.json and the summary."""
        cfg = self.cfg
        whole = not self.pipeline and self.zero_stage != 3
        if whole:
            model = self.model if self.env.rank == 0 else None
        else:
            from model import UnifiedTransformer

            if state is None:
                state = self._gathered_state()
            model = None
            if self.env.rank == 0:
                with torch.device("meta"):
                    model = UnifiedTransformer(cfg.model)
                model.load_state_dict({k: v.to(self.device) for k, v in state.items()}, assign=True)
        metrics = None
        if self.env.rank == 0:
            from tools.evaluate import EvalConfig, Evaluator
            from tools.generate import SamplingConfig

            if self._evaluator is None:
                self._evaluator = Evaluator(cfg.data.dataset_dir, EvalConfig(
                    max_samples=cfg.logging.eval_samples, images_per_digit=cfg.logging.eval_images_per_digit,
                    sampling=SamplingConfig(seed=cfg.run.seed)))
            t0 = time.perf_counter()
            result = self._evaluator.run(model)
            metrics = result.metrics
            summary = ", ".join(f"{k}={metrics[k]:.4g}" for k in
                                ("understanding/accuracy", "generation/accuracy", "text/perplexity") if k in metrics)
            print(f"[eval] step {self.step}: {summary} ({time.perf_counter() - t0:.0f} s)", flush=True)
            writer = MetricsLogger(self.out, True, 0, self.step, False, purge=False) if final or not self.logs_here \
                else self.log
            writer.log(self.step, {f"eval/{k}": v for k, v in metrics.items()})
            if result.images is not None:
                writer.image("eval/samples", result.grid(), self.step)
            if writer is not self.log:
                writer.close()
            if final:
                atomic_write(self.out / "eval.json", json.dumps({"step": self.step, **metrics}, indent=2))
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        return metrics

    def _data_counters(self) -> dict[str, int] | None:
        """The loader's counters (data/loader.py `counters()`: samples read, skipped and lost per reason,
        shards dropped, captions dropped) summed over the ranks that read data: every rank under ZeRO, the last
        stage's data-parallel replicas under the pipeline (the first stage reads the same micro-batches). A
        collective over those ranks; None on the others."""
        if self.pipeline and not self.engine.is_last_stage():
            return None
        from data.validate import REASONS

        keys = list(_DATA_TOTALS) + [f"{kind}/{reason}" for kind in ("skipped_samples", "skipped_shards",
                                                                      "lost_samples") for reason in REASONS]
        mine = self.loader.counters()
        group = self.engine.grid.get_data_parallel_group() if self.pipeline else None
        return dict(zip(keys, _sum_exact([int(mine.get(k, 0)) for k in keys], self.device, group)))

    def _log_step(self, step_s, data_s, total_loss, loss_sum, loss_count, aux_sum, n_micro, routing, flops,
                  flops_model, samples) -> None:
        counters = self._data_counters()  # a collective: before the ranks that do not log leave
        if not self.logs_here:
            return
        cfg = self.cfg
        scalars = {"loss/total": total_loss, "mod/aux_loss": float(aux_sum) / n_micro,
                   "optim/lr": self.engine.get_lr()[0], "time/step_s": step_s,
                   "time/data_pct": 100.0 * data_s / step_s if step_s > 0 else 0.0}
        grad_norm = self.engine.get_global_grad_norm()  # ZeRO-0 fp32: FiniteAdamW's, which the engine reads
        if grad_norm is not None:
            scalars["optim/grad_norm"] = float(grad_norm)
        for t, task in enumerate(cfg.model.mod.tasks):
            if loss_count[t] > 0:
                scalars[f"loss/{task}"] = float(loss_sum[t] / loss_count[t])
        if flops is not None:
            scalars.update(throughput_scalars(flops, flops_model, step_s, self.env.world_size, samples,
                                              self.device, cfg.logging.peak_tflops))
        for layer in cfg.model.mod.mod_layers():
            for t, task in enumerate(cfg.model.mod.tasks):
                n_routable, n_selected = routing[layer, t].tolist()
                if n_routable > 0:
                    scalars[f"mod/capacity/{task}/layer_{layer}"] = n_selected / n_routable
        scalars.update(memory_scalars(self.device))
        # Cumulative over the run and summed over the ranks that read data. captions_dropped shows that
        # classifier-free-guidance dropout (data.caption_dropout) is live; the skip and loss counters make data
        # dropped under data.bad_input: skip visible per reason (data.max_skip_fraction bounds them).
        for key, value in (counters or {}).items():
            if key in _DATA_TOTALS or value:
                scalars[f"data/{key}"] = float(value)
        self.log.log(self.step, scalars)

    def _write_summary(self, totals, wall_s, exit_code, start_step, eval_metrics=None, notes=None) -> None:
        world = self.env.world_size
        train_s = max(totals["train_s"], 1e-9)
        summary = {
            "status": {0: "completed", EXIT_PREEMPTED: "preempted", EXIT_NONFINITE: "stopped_nonfinite",
                       EXIT_IO: "checkpoint_write_failed"}[exit_code],
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "tokens": totals["tokens"],
            "real_tokens": totals["real_tokens"],
            "pad_pct": 100.0 * (1 - totals["real_tokens"] / totals["tokens"]) if totals["tokens"] else 0.0,
            "loss_first": self.first_loss,
            "loss_final": self.last_loss.get("total"),
            "loss_final_per_task": {k: v for k, v in self.last_loss.items() if k != "total"},
            "tokens_per_s": totals["tokens"] / train_s,
            "real_tokens_per_s": totals["real_tokens"] / train_s,
            "tflops_per_device": totals["actual"] / train_s / world / 1e12,
            "flops_actual": totals["actual"],
            "flops_dense": totals["dense"],  # the dense baseline: real tokens only, each document alone
            "mod_flops_saved_pct": 100.0 * (1 - totals["actual"] / totals["dense"]) if totals["dense"] else 0.0,
            "skipped_nonfinite_microbatches": totals["skipped_nonfinite"],
            "skipped_nonfinite_steps": totals["skipped_steps"],
            "wall_time_s": wall_s,
            "world_size": world,
            "mode": self.cfg.parallel.mode,
            "precision": self.precision,
            "device": str(self.device),
        }
        if eval_metrics is None and exit_code == 0 and self.cfg.logging.eval_at_end and (self.out / "eval.json").exists():
            eval_metrics = json.loads((self.out / "eval.json").read_text())  # evaluated on another rank
            eval_metrics.pop("step", None)
        if eval_metrics is not None:
            summary["eval"] = {k: v for k, v in eval_metrics.items() if not k.startswith("router/")}
        summary.update(notes or {})  # data counters; how a stop signal shaped this attempt (stopped_during, eval_skipped)
        path = self.out / "summary.json"
        try:
            atomic_write(path, json.dumps(summary, indent=2))
        except OSError as e:  # a full disk must not turn the run's exit code into a traceback
            print(f"[train] error: {describe_write_error(e, path)}; the summary is only printed", flush=True)
        print(json.dumps(summary, indent=2), flush=True)

    def export_hf(self, path: Path, state: dict[str, torch.Tensor]) -> None:
        """Write the gathered weights (`_gathered_state`) as an HF Emu3 directory from rank 0."""
        if self.env.rank == 0:
            from model import UnifiedTransformer

            with torch.device("meta"):
                shell = UnifiedTransformer(self.cfg.model)  # only its config is used by save_hf
            shell.save_hf(path, state_dict=state)
            print(f"[train] exported HF Emu3 weights to {path}", flush=True)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()


def _summary_status(out: Path) -> str | None:
    try:
        return json.loads((out / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


_ZERO_TOTALS = {"tokens": 0, "real_tokens": 0, "actual": 0, "dense": 0, "train_s": 0.0, "skipped_nonfinite": 0,
                "skipped_steps": 0}


class _TimedIter:
    """Wraps the batch iterator for DeepSpeed's train_batch so data wait time is measured, notes what each
    micro-batch held (for the FLOPs count), and turns our dict batches into the ((inputs...), labels) tuples
    the pipeline engine expects. DeepSpeed reads it on the first and the last stage only."""

    def __init__(self, it, timer: StepTimer, microbatches: list[list[RowTokens]]) -> None:
        self.it, self.timer, self.microbatches = it, timer, microbatches

    def __iter__(self):
        return self

    def __next__(self):
        b, rows = self.timer.fetch(self.it)
        self.microbatches.append(rows)
        return (b["input_ids"], b["task_ids"], b["position_ids"]), b["labels"]
