"""Console output of the training processes: one rank-aware logger for the project's own lines.

    from train.log import log
    log.info("[train] checkpoint ...")                   # printed by global rank 0 only
    log.info("[train] rank-local news", all_ranks=True)  # printed by every rank that calls it
    log.warning(...)                                     # stdout, like info
    log.error("error: ...", all_ranks=True)              # stderr

Every rank runs the same code, so a line meant once per job is printed by rank 0 alone; a line about this
rank's own state (an error it hit, the summary of the rank that owns the loss) passes `all_ranks=True`, and in a
job of several processes it starts with `[rank N] ` so that the merged log of a launcher or of Slurm says whose
it is. Messages keep their own tags (`[train]`, `[eval]`, `error:`): scripts and tests look for them.

Built on the standard `logging` module (logger "train"): its own handler and no propagation, so our lines are
printed once whatever handlers DeepSpeed or a user's code add to the root logger, and a user can still silence
or redirect them with `logging.getLogger("train")`. The handler looks up sys.stdout / sys.stderr at each line
(not when it is built), so a redirection made later (pytest's capture, contextlib.redirect_stdout) is honoured,
and flushes each line, so a rank that is killed has printed what it logged.

train/main.py calls `set_rank` as soon as the launcher's variables are read (before the process group exists);
until then the process counts as rank 0 of 1.
"""

from __future__ import annotations

import logging
import sys

LOGGER_NAME = "train"


class _Rank(logging.Filter):
    """Drops rank-0-only records on the other ranks and gives each record its `rank_prefix`."""

    def __init__(self) -> None:
        super().__init__()
        self.rank = 0
        self.world_size = 1

    def filter(self, record: logging.LogRecord) -> bool:
        all_ranks = getattr(record, "all_ranks", False)
        if not all_ranks and self.rank != 0:
            return False
        record.rank_prefix = f"[rank {self.rank}] " if all_ranks and self.world_size > 1 else ""
        return True


class _Console(logging.Handler):
    """Errors to stderr, everything else to stdout, each line flushed."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's contract: a failed line is reported, never raised
            self.handleError(record)


_rank = _Rank()
_logger = logging.getLogger(LOGGER_NAME)
_logger.setLevel(logging.INFO)
_logger.propagate = False
_logger.addFilter(_rank)
_handler = _Console()
_handler.setFormatter(logging.Formatter("%(rank_prefix)s%(message)s"))
_logger.addHandler(_handler)


def set_rank(rank: int, world_size: int | None = None) -> None:
    """This process's global rank (and, when given, the job's world size, which decides the `[rank N] `
    prefix). Called by train/main.py once the launcher's variables are read."""
    _rank.rank = rank
    if world_size is not None:
        _rank.world_size = world_size


class RankLogger:
    """`info`, `warning` (stdout) and `error` (stderr) of one message; rank 0 only unless `all_ranks`."""

    def info(self, msg: str, *, all_ranks: bool = False) -> None:
        _logger.info(msg, extra={"all_ranks": all_ranks})

    def warning(self, msg: str, *, all_ranks: bool = False) -> None:
        _logger.warning(msg, extra={"all_ranks": all_ranks})

    def error(self, msg: str, *, all_ranks: bool = False) -> None:
        _logger.error(msg, extra={"all_ranks": all_ranks})


log = RankLogger()
