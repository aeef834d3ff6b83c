"""Atomic file writes for the library's own files (ticket files, the proxy cache): a temporary file in the
target folder, fsync, then ``os.replace``, so a crash never leaves a half-written file under the real name."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

# the temp-name pattern of every Lotus writer (lotus.safe_io.TEMP_PREFIX; this library does not import lotus)
TEMP_PREFIX = ".lotus-tmp-"


def write_atomic(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Create ``path``'s folder, call ``write(f)`` on a temporary file beside it, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name[:80]}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
