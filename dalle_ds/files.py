"""Writing files so that readers never see half of one: write beside it, fsync, rename over it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def temporary_name(path: Path) -> Path:
    """A hidden name beside ``path``, unique to this writer (two jobs writing one file at once
    never share a temporary)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` writes the content to a temporary path; it then replaces ``path`` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))
