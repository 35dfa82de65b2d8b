"""Console output of the training processes: one rank-aware logger for the project's own lines.

    from train.log import log
    log.info("[train] checkpoint ...")                 # printed by global rank 0 only
    log.info("[train] rank-local news", all_ranks=True)  # printed by every rank

(A stub to fix the interface; train/main.py sets the rank with `set_rank` once the process group exists.)
"""

from __future__ import annotations

import sys

_rank = 0


def set_rank(rank: int) -> None:
    global _rank
    _rank = rank


class RankLogger:
    def _emit(self, msg: str, all_ranks: bool, stream) -> None:
        if all_ranks or _rank == 0:
            print(msg, file=stream, flush=True)

    def info(self, msg: str, *, all_ranks: bool = False) -> None:
        self._emit(msg, all_ranks, sys.stdout)

    def warning(self, msg: str, *, all_ranks: bool = False) -> None:
        self._emit(msg, all_ranks, sys.stdout)

    def error(self, msg: str, *, all_ranks: bool = False) -> None:
        self._emit(msg, all_ranks, sys.stderr)


log = RankLogger()
