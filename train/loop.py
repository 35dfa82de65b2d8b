"""The training loop: one `train_step` that reads top to bottom, and `fit`, the run around it.

    data -> engine (micro-batches, loss, backward, optimizer step) -> reduce -> FLOPs -> metrics -> checkpoint

One optimizer step = `optim.grad_accum` micro-batches per data-parallel rank. Micro-batches are
task-homogeneous (the loader's contract), so a micro-batch's loss is that task's loss. How the step runs is
the engine's (train/engine.py: ZeRO in train/zero.py, the pipeline in train/pipeline.py, where only the last
stage owns the loss and so logs). Periodic actions own their cadence (`StepLog.due`, `Evaluation.due`, the
checkpoint's `save_every`); the end of the run (export, final evaluation, summary) is train/finish.py's.

FLOPs are counted from what actually ran: every micro-batch a rank trains on is described as it is
fetched (`model.flops.describe_microbatch`: documents, routable tokens, padding), counted on that rank and
summed over ranks exactly. Under the pipeline the last stage fetches every micro-batch too (for its
labels), so it counts them and sums over its data-parallel replicas; it is also the stage that logs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Iterator

import torch

from data.files import atomic_write
from data.loader import UnimodLoader
from data.reader import REASONS
from model.flops import RowTokens, StepFlops, describe_microbatch, step_flops
from train import fingerprint as fingerprints
from train.checkpoint import (CheckpointManager, CheckpointWriteError, broadcast_from_rank0, describe_write_error,
                              rng_state, set_rng_state)
from train.config import RunConfig
from train.engine import Engine, NonfiniteRun, StepRecord, apply_optim_config, params_finite
from train.finish import Evaluation, export_and_evaluate, write_summary
from train.launch import DistEnv
from train.log import log, set_rank
from train.metrics import DATA_TOTALS, MetricsLogger, RunTotals, StepLog, StepTimer
from train.signals import EXIT_CONFIG, EXIT_IO, EXIT_NONFINITE, EXIT_PREEMPTED, StopSignal


def build_engine(cfg: RunConfig, ds_config: dict[str, Any], precision: str, device: torch.device) -> Engine:
    """The engine of the run's mode (imported here, so that only a run that builds one imports deepspeed)."""
    if cfg.parallel.mode == "pipeline":
        from train.pipeline import PipelineEngine

        return PipelineEngine(cfg, ds_config, precision, device)
    from train.zero import ZeroEngine

    return ZeroEngine(cfg, ds_config, precision, device)


class Trainer:
    def __init__(self, cfg: RunConfig, ds_config: dict[str, Any], env: DistEnv, device: torch.device,
                 precision: str) -> None:
        set_rank(env.rank, env.world_size)  # the console logger's (train/log.py); also for a Trainer built outside main
        self.cfg, self.env, self.device, self.precision = cfg, env, device, precision
        self.out = Path(cfg.run.output_dir)
        self.fingerprint = fingerprints.fingerprint(cfg, world_size=env.world_size,
                                                    zero_stage=ds_config["zero_optimization"].get("stage", 0),
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
        self.engine = build_engine(cfg, ds_config, precision, device)
        self.loader = UnimodLoader(cfg.data, tasks=cfg.model.mod.tasks, rank=self.engine.dp_rank,
                                   world_size=self.engine.dp_world, layout=cfg.model.vocab)
        self.ckpt = CheckpointManager(self.out / "checkpoints", cfg.checkpoint.keep_last, env.rank)
        self.evaluation = Evaluation(cfg, self.engine, self.out, env.rank, device)
        self.nonfinite = NonfiniteRun(cfg.checkpoint.max_consecutive_nonfinite)
        self.timer = StepTimer(device)
        self.totals = RunTotals()
        self.step = 0
        self.last_loss: dict[str, float] = {}
        self.first_loss: float | None = None

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
            log.info(f"[train] {where} has no {fingerprints.FINGERPRINT} (written before fingerprints): resuming "
                     f"without checking that this run's configuration matches it")
        elif comparison.shape or comparison.refused:
            raise ValueError(comparison.error(where))
        else:
            for c in comparison.accepted:
                log.info(f"[train] resuming with an accepted change (checkpoint.accept_changes) {c}")
            for name in comparison.unused_accepts:
                log.info(f"[train] note: checkpoint.accept_changes names {name}, which did not change")
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

            state = load(self.engine.ds, plan, self.ckpt)
        else:
            state = self.ckpt.load(self.engine.ds, plan.load_dir, plan.tag)
        self.step = int(state["step"])
        # Another data-parallel size: the loader restarts the epoch at the same global position.
        self.loader.load_state_dict(state["loader"], elastic=plan.changed)
        set_rng_state(state["rng"])
        self.last_loss = state.get("last_loss", {})
        self.first_loss = state.get("first_loss")
        # The loaded optimizer and LR schedule carry the checkpoint's lr/betas/decay/schedule: this run's
        # (changed ones accepted by _check_resume) apply from the resumed step on.
        apply_optim_config(self.engine.ds, self.cfg.optim, self.cfg.run.max_steps)
        log.info(f"[train] resumed from {plan.state_dir} at step {self.step}")

    def save(self, prune: bool = True) -> bool:
        """Checkpoint the current step unless a weight is non-finite (such a model is never saved: False).
        Raises CheckpointWriteError when it could not be written (fit exits EXIT_IO)."""
        if not params_finite(self.engine.module):
            log.warning(f"[train] the model has non-finite weights at step {self.step}: not saving it; "
                        f"{self.ckpt.latest() or 'no checkpoint'} stays the latest")
            return False
        state = {"loader": self.loader.state_dict(), "rng": rng_state(), "last_loss": self.last_loss,
                 "first_loss": self.first_loss}
        tag = self.ckpt.save(self.engine.ds, self.step, state, self.fingerprint, prune=prune)
        log.info(f"[train] checkpoint {self.out / 'checkpoints' / tag}")
        return True

    # ----- one optimizer step -------------------------------------------------------------------------------
    def train_step(self, batches) -> StepRecord | None:
        """Optimizer step `self.step + 1`, every rank taking part. Returns its record summed over the loss
        owners, or None when no step was taken: the engine skipped it for a non-finite gradient norm (it is taken
        again with the next micro-batches), or `self.nonfinite` is exhausted (fit stops the run)."""
        self.timer.start()
        rec = self.engine.train_step(batches, self.nonfinite, self.step + 1)  # micro-batches, loss, update
        rec.step_s, rec.data_s = self.timer.stop(), self.timer.data_s
        self.totals.skipped_nonfinite += rec.skipped_nonfinite
        self.totals.skipped_steps += not rec.applied
        if self.nonfinite.exhausted or not rec.applied:
            return None
        self.step += 1

        rec = self.engine.reduce(rec)  # the ranks that do not own the loss keep their zeros
        rec.flops, rec.flops_model = self._step_flops(rec)
        self.last_loss.update(rec.task_losses(self.cfg.model.mod.tasks))
        self.last_loss["total"] = rec.total_loss
        if self.first_loss is None:
            self.first_loss = rec.total_loss
        self.totals.add_step(rec)
        return rec

    def _step_flops(self, rec: StepRecord) -> tuple[StepFlops | None, StepFlops | None]:
        """The global step's FLOPs (recompute as configured; and without it, for MFU) on the ranks that count
        them (None elsewhere, and for no tokens)."""
        if not self.engine.counts_data:
            return None, None
        counted = []
        for recompute in (self.cfg.parallel.activation_checkpointing, False):
            # MoE layers: the slots each expert ran in each micro-batch (its forward's counts), not k per token.
            local = (step_flops(self.cfg.model, rec.microbatches, recompute=recompute,
                                expert_slots=rec.expert_slots or None) if rec.microbatches else None)
            counted.append(local or StepFlops(actual=0, dense=0, tokens=0, real_tokens=0))
        with_rc, without = counted
        actual, actual_model, dense, dense_model, tokens, real = self.engine.sum_counted(
            [with_rc.actual, without.actual, with_rc.dense, without.dense, with_rc.tokens, with_rc.real_tokens])
        if tokens == 0:
            return None, None
        return (StepFlops(actual=actual, dense=dense, tokens=tokens, real_tokens=real),
                StepFlops(actual=actual_model, dense=dense_model, tokens=tokens, real_tokens=real))

    def _data_counters(self) -> dict[str, int] | None:
        """The loader's counters (data/loader.py `counters()`: samples read, skipped and lost per reason,
        shards dropped, captions dropped) summed over the ranks that read data: every rank under ZeRO, the last
        stage's data-parallel replicas under the pipeline (the first stage reads the same micro-batches). A
        collective over those ranks; None on the others."""
        if not self.engine.counts_data:
            return None
        keys = list(DATA_TOTALS) + [f"{kind}/{reason}" for kind in ("skipped_samples", "skipped_shards",
                                                                     "lost_samples") for reason in REASONS]
        mine = self.loader.counters()
        return dict(zip(keys, self.engine.sum_counted([int(mine.get(k, 0)) for k in keys])))

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
            log.error(f"error: {error}")
            return code
        start_step = self.step
        if start_step >= cfg.run.max_steps and _summary_status(self.out) == "completed":
            # A finished run (e.g. the demo run again): nothing to train, keep its summary as it is. One that
            # trained to the end but was killed before its summary goes on to the export and evaluation.
            if self.engine.logs:
                log.info(f"[train] {self.out} already reached run.max_steps={cfg.run.max_steps}; its summary:\n"
                         f"{(self.out / 'summary.json').read_text()}", all_ranks=True)
            return 0
        if stop.agreed(self.device):
            # Built and resumed, not yet trained: the checkpoint resumed from (if any) is still the newest.
            if self.engine.logs:
                log.info(f"[train] stop signal before the first step: exiting with code {EXIT_PREEMPTED}, nothing "
                         f"new to save (resume with checkpoint.resume=auto)", all_ranks=True)
                if not (self.out / "summary.json").exists():  # an earlier attempt's summary still describes the run
                    self._write_summary(EXIT_PREEMPTED, start_step, 0.0,
                                        notes={"stopped_during": "startup", "signal": stop.name})
            return EXIT_PREEMPTED

        t_run = time.perf_counter()
        exit_code = self._train(stop)
        data_counters = self._data_counters()
        eval_metrics, notes = None, {}
        if exit_code == 0:
            eval_metrics, notes = export_and_evaluate(cfg, self.engine, self.evaluation, self.out, self.env.rank,
                                                      self.step, stop, self.device)
        if self.engine.logs:
            self._write_summary(exit_code, start_step, time.perf_counter() - t_run, eval_metrics, data_counters,
                                notes)
        return exit_code

    def _train(self, stop: StopSignal) -> int:
        """The steps from the resumed one to run.max_steps and the final checkpoint; -> the exit code."""
        cfg = self.cfg
        metrics = MetricsLogger(self.out, self.engine.logs, cfg.run.max_steps, self.step, cfg.logging.progress_bar)
        step_log = StepLog(metrics, cfg, self.env.world_size, self.device)
        save_every = cfg.checkpoint.save_every
        data = self._batches()
        batches = self.timer.timed(data)
        try:
            while self.step < cfg.run.max_steps:
                rec = self.train_step(batches)
                if self.nonfinite.exhausted:
                    log.warning(f"[train] {self.nonfinite.in_a_row} consecutive non-finite losses or gradient norms "
                                f"at step {self.step + 1}: stopping; lower optim.lr (resuming with a new value needs "
                                f"--set checkpoint.accept_changes=[optim.lr]) or check the data")
                    # Saved only if the weights are finite, never over a complete checkpoint of this step, and
                    # without pruning: the checkpoints before the trouble stay.
                    self.save(prune=False)
                    return EXIT_NONFINITE
                if rec is None:
                    continue  # the step is taken again with the next micro-batches

                step_log.add(rec)
                if step_log.due(self.step):
                    counters = self._data_counters()  # a collective: before the ranks that do not log leave
                    if self.engine.logs:
                        step_log.write(self.step, rec, self.engine.ds.get_lr()[0],
                                       # ZeRO-0 fp32: FiniteAdamW's, which the engine reads
                                       self.engine.ds.get_global_grad_norm(),
                                       rec.samples * self.engine.dp_world, counters)
                metrics.advance()

                # The last step is not a stop: training is complete and the end of the run applies.
                last = self.step >= cfg.run.max_steps
                if not last and stop.agreed(self.device):
                    log.info(f"[train] stop signal received: checkpointing at step {self.step} and exiting with "
                             f"code {EXIT_PREEMPTED} (resume with checkpoint.resume=auto)")
                    self.save()
                    return EXIT_PREEMPTED
                if save_every and self.step % save_every == 0:
                    if not self.save():  # non-finite weights: nothing this run does from here can be kept
                        return EXIT_NONFINITE
                    if not last and stop.agreed(self.device):
                        # It arrived while this checkpoint was written (the workers kept running): that one is
                        # complete and is the one to resume from; a second save would only spend the grace time.
                        log.info(f"[train] stop signal received while checkpointing step {self.step}: that "
                                 f"checkpoint is complete; exiting with code {EXIT_PREEMPTED} (resume with "
                                 f"checkpoint.resume=auto)")
                        return EXIT_PREEMPTED
                if self.evaluation.due(self.step):
                    self.evaluation.run(self.step, writer=metrics if self.engine.logs else None)
            if self.ckpt.latest() != f"step_{self.step:08d}" and not self.save():
                return EXIT_NONFINITE
            return 0
        except CheckpointWriteError as e:
            log.error(f"[train] error: {e}; exiting with code {EXIT_IO}")
            return EXIT_IO
        finally:
            data.close()  # shuts the loader's workers down in order (they ignore stop signals: data/loader.py)
            metrics.close()

    def _write_summary(self, exit_code: int, start_step: int, wall_s: float, eval_metrics=None,
                       data_counters=None, notes=None) -> None:
        write_summary(self.cfg, self.out, exit_code=exit_code, step=self.step, start_step=start_step,
                      totals=self.totals, wall_s=wall_s, first_loss=self.first_loss, last_loss=self.last_loss,
                      world_size=self.env.world_size, precision=self.precision, device=self.device,
                      eval_metrics=eval_metrics, data_counters=data_counters, notes=notes)


def _summary_status(out: Path) -> str | None:
    try:
        return json.loads((out / "summary.json").read_text()).get("status")
    except (OSError, ValueError):
        return None
