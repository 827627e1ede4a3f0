"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Optional, Union


def write_atomic(path: Union[str, os.PathLike], data: bytes, fsync: bool = True,
                 prefix: Optional[str] = None) -> None:
    """Write to a temp file in the same folder, then rename over `path`; on any failure the
    temp file is removed and an existing `path` is left untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix if prefix is not None else f".{path.name}.", suffix=".tmp",
                               dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if prefix is None:
        remove_stale_temps(path)


STALE_TEMP_S = 600.0   # a temp file this old belongs to a writer that died (SIGKILL, power loss)


def remove_stale_temps(path: Union[str, os.PathLike], max_age_s: float = STALE_TEMP_S) -> int:
    """Delete the temp files that writes of `path` by killed processes left behind (their
    default names, older than max_age_s). Returns how many were removed."""
    path = Path(path)
    n, now = 0, time.time()
    head = f".{path.name}."
    try:
        entries = [e for e in os.scandir(path.parent) if e.name.startswith(head) and e.name.endswith(".tmp")]
    except OSError:
        return 0
    for e in entries:
        try:
            if now - e.stat(follow_symlinks=False).st_mtime > max_age_s:
                os.unlink(e.path)
                n += 1
        except OSError:
            pass
    return n
