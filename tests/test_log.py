"""train/log.py: rank 0 prints the run's lines, `all_ranks` lines come from every rank with a `[rank N] ` prefix in
a job of several processes, errors go to stderr, and the streams are looked up per line (pytest's capture)."""

from __future__ import annotations

import pytest

from train import log as log_module
from train.log import log, set_rank


@pytest.fixture(autouse=True)
def rank_restored():
    saved = (log_module._rank.rank, log_module._rank.world_size)
    yield
    set_rank(*saved)


def test_rank0_lines_and_all_rank_lines(capsys):
    set_rank(1, 4)
    log.info("[train] once per job")
    log.warning("[train] once per job too")
    log.info("[train] mine", all_ranks=True)
    log.error("error: mine", all_ranks=True)
    out, err = capsys.readouterr()
    assert out == "[rank 1] [train] mine\n" and err == "[rank 1] error: mine\n"

    set_rank(0)  # the world size stays as set
    log.info("[train] once per job")
    log.error("error: bad", all_ranks=True)
    out, err = capsys.readouterr()
    assert out == "[train] once per job\n" and err == "[rank 0] error: bad\n"


def test_one_process_has_no_prefix(capsys):
    set_rank(0, 1)
    log.warning("[train] note", all_ranks=True)
    log.error("error: x")
    out, err = capsys.readouterr()
    assert out == "[train] note\n" and err == "error: x\n"
