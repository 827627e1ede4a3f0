"""Atomic file writes: a reader sees the old file or the new one, never half of one."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

from .errors import ConfigError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: age only
    fcntl = None  # type: ignore[assignment]


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (/proc), else by
    setting and restoring it (a brief race with other threads creating files)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode(mode: Optional[int] = None) -> int:
    """The mode a new file gets: ``mode`` as given, or what ``open()`` would give (0o666 less
    the umask); mkstemp alone gives 0o600, which locks out every other user of a shared store."""
    if mode is None:
        return 0o666 & ~current_umask()
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777:
        raise ConfigError(f"file mode must be an int in [0, 0o7777], got {mode!r}")
    return mode


def write_atomic(path: Union[str, os.PathLike], data: bytes, fsync: bool = True,
                 prefix: Optional[str] = None, mode: Optional[int] = None) -> None:
    """Write to a temp file in the same folder, then rename over `path`; on any failure the
    temp file is removed and an existing `path` is left untouched. The file gets ``mode``
    (default: 0o666 less the umask, like ``open()``)."""
    path = Path(path)
    perm = file_mode(mode)
    fd, tmp = tempfile.mkstemp(prefix=prefix if prefix is not None else f".{path.name}.", suffix=".tmp",
                               dir=str(path.parent))
    try:
        _hold(fd)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), perm)
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
UNLOCKED_TEMP_S = 2.0  # ... and one this old whose writer's lock is gone (the writer died)


def _hold(fd: int) -> None:
    """A writer holds an flock on its temp file while writing: a sweeper that can take the lock
    knows the writer is gone (the kernel drops the lock with the process), whatever the age."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass


def temp_is_abandoned(path: Union[str, os.PathLike], mtime: float, max_age_s: float = STALE_TEMP_S,
                      now: Optional[float] = None) -> bool:
    """Whether a temp file belongs to a dead writer: older than max_age_s, or older than a few
    seconds and not locked by a live writer (see _hold)."""
    age = (time.time() if now is None else now) - mtime
    if age > max_age_s:
        return True
    if age <= UNLOCKED_TEMP_S or fcntl is None:
        return False
    try:
        with open(path, "rb") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)   # released on close
            return True
    except OSError:          # locked by its writer (or gone): leave it
        return False


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
            if temp_is_abandoned(e.path, e.stat(follow_symlinks=False).st_mtime, max_age_s, now):
                os.unlink(e.path)
                n += 1
        except OSError:
            pass
    return n
