"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
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
