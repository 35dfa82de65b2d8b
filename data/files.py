"""Writing files so that a crash never leaves a half-written one where a reader looks."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: str | os.PathLike, content: str | bytes) -> None:
    """Write a temporary file beside `path`, fsync it and rename it over `path`: readers see the old file or
    the whole new one, never a part. On failure the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
