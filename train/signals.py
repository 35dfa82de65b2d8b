"""Stop signals: SIGTERM / SIGUSR1 end a run cleanly, with a complete checkpoint or nothing to save, and exit
code 75 (EX_TEMPFAIL: run again with checkpoint.resume=auto to continue).

Who sends them: Slurm (the `--signal=USR1@300` warning without `B:`, the time limit, preemption, `scancel`),
torchrun and the deepspeed launcher when they are stopped, or a user's `kill`. Slurm and a kill of the process
group reach every process, DataLoader workers included; the workers ignore them (data/loader.py) and the
training process owns the shutdown.

`train/main.py` installs the handler first thing in `main()`. What a signal does depends on how far the run is:

  start-up, before the process group exists   the handler raises StopRequested at once: there is nothing to
                                              save, and a demo-data build or a JIT compile is not waited for.
                                              Exit 75.
  from init_distributed on                    the handler only records the signal; the ranks agree on it with
                                              an all-reduce at fixed points, so they all stop at the same step:
    before the first step                     exit 75, nothing new to save (the checkpoint resumed from, if
                                              any, is untouched).
    training                                  at the next step boundary: checkpoint that step and exit 75. A
                                              signal that arrives while a periodic checkpoint is being written
                                              lets it finish, and that checkpoint is the one to resume from.
    after the last step                       training is complete and is reported so (exit 0, summary status
                                              "completed"): the final checkpoint and the HF export are finished,
                                              the final evaluation is skipped if it had not started (the summary
                                              says so under "eval_skipped") and finished if it had.

A signal inside a long collective or a DeepSpeed call is acted on when that call returns; a launcher or Slurm
that follows SIGTERM with SIGKILL (30 s by default for torchrun, the deepspeed launcher and Slurm's KillWait)
can still cut a checkpoint short, which is why `checkpoint.save_every` matters and why a checkpoint counts only
once COMPLETE is written (train/checkpoint.py).
"""

from __future__ import annotations

import signal

# The trainer's exit codes, here because this module is the first the entry point imports (torch-free).
EXIT_CONFIG = 2      # bad configuration, or a resume that would change what the checkpoint was trained with
EXIT_NONFINITE = 3   # too many consecutive non-finite losses / gradient norms; saved only if the weights are finite
EXIT_IO = 74         # EX_IOERR: a checkpoint or config.yaml could not be written (disk full, no permission)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal (after checkpointing); run again to continue


class StopRequested(BaseException):
    """Raised by the handler during start-up. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way out swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignal:
    """Installs the SIGTERM / SIGUSR1 handler; see the module docstring for what a signal does when.

    Created in raise mode (start-up); `defer()` switches to recording before any collective exists, and
    `agreed()` is then the all-reduced answer to "did any rank get a signal?". Importing this module does
    not import torch, so that `main()` can install the handler before the slow imports.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, raise_now: bool = True) -> None:
        self.received: int | None = None
        self._raise = raise_now
        self._previous = {}
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        if self._raise:
            self._raise = False  # one exception; a second signal while it unwinds is only recorded
            raise StopRequested(signum)

    def defer(self) -> None:
        """Record signals from now on instead of raising: the process group is about to exist, and a rank that
        left on its own would leave its peers waiting in a collective. A signal received so far was raised."""
        self._raise = False

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None

    def agreed(self, device) -> bool:
        """True on every rank when any rank received a signal (collective: every rank must call it)."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        from train.launch import distributed

        if distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
