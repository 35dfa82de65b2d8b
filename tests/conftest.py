"""Shared pytest fixtures.

`demo_dataset` (data tests): the embedded digits demo, built once per test session through the
real CLI (`python -m data.prepare demo`), so every test that needs real shards shares one build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_module(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repository root, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    """Directory of the demo dataset built with default settings by `python -m data.prepare demo`."""
    out = tmp_path_factory.mktemp("demo") / "digits"
    proc = run_module("data.prepare", "demo", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def one_thread():
    """One torch thread for the test: the debug model's matmuls are tiny, and on a shared 2-core machine a
    second thread only adds contention (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind():
    """A finished run removes DeepSpeed's /dev/shm workspace itself (train/launch.py remove_shm_workspace); the
    ranks this suite kills on purpose (stop-signal and crash tests) cannot. Their workspaces, ~70 MB of RAM each,
    are removed when the session ends: the ones of this user created during the session, by this suite's runs."""
    import time

    start = time.time()
    yield
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"):
        try:
            if path.stat().st_mtime >= start:
                path.unlink()
        except OSError:  # gone already, or not ours to remove
            pass
