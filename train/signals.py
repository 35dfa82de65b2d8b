"""Stop signals: SIGTERM / SIGUSR1 end a run cleanly with a checkpoint and exit code 75 (EX_TEMPFAIL)."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopSignal:
    """SIGTERM / SIGUSR1 (Slurm's preemption and `--signal` warnings) request a checkpoint and a clean
    exit at the next step boundary; ranks agree on it with an all-reduce so they all save the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
