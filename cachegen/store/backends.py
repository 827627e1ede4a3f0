"""Byte stores behind one small interface: a local directory (default) and Redis.

A backend maps string keys to ``bytes``. It never raises for an unavailable or missing entry:
``get`` returns ``None`` (a miss) and ``put`` returns ``False``; integrity checking is done by
the caller (:mod:`cachegen.store.entry`), which calls ``delete`` on a corrupt entry.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ..fileio import file_mode, temp_is_abandoned, write_atomic

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["Backend", "DirectoryBackend", "RedisBackend", "MemoryBackend"]

log = logging.getLogger("cachegen.store")


class Backend:
    """Interface. Subclasses implement get/put/delete; get_many may be batched."""

    def __init__(self) -> None:
        self.stats = {"gets": 0, "hits": 0, "puts": 0, "errors": 0, "evicted": 0, "bytes_read": 0}

    def get(self, key: str) -> Optional[bytes]:
        raise NotImplementedError

    def get_many(self, keys: Sequence[str]) -> list[Optional[bytes]]:
        return [self.get(k) for k in keys]

    def put(self, key: str, data: bytes) -> bool:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def update(self, key: str, fn: Callable[[Optional[bytes]], Optional[bytes]]) -> bool:
        """Read-modify-write ``key`` atomically with respect to other ``update`` calls on the same
        store (other processes included): ``fn(old or None) -> new`` (None: leave it). Used for
        small entries several writers merge into (the chunk index). Returns False on failure."""
        with self._update_lock():
            new = fn(self.get(key))
            return True if new is None else self.put(key, new)

    def _update_lock(self):
        lk = self.__dict__.get("_ulock")
        if lk is None:
            lk = self.__dict__.setdefault("_ulock", threading.Lock())
        return lk

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MemoryBackend(Backend):
    """A dict (tests, single process)."""

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> Optional[bytes]:
        self.stats["gets"] += 1
        v = self.data.get(key)
        if v is not None:
            self.stats["hits"] += 1
            self.stats["bytes_read"] += len(v)
        return v

    def put(self, key: str, data: bytes) -> bool:
        self.stats["puts"] += 1
        self.data[key] = bytes(data)
        return True

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


class DirectoryBackend(Backend):
    """Entries as files under ``root/<2 hex>/<key>``.

    * Writes are atomic: a temp file in the same folder, fsync (optional), ``os.replace``.
      Readers see the old entry or the new one, never a half-written file, with any number of
      processes reading and writing.
    * LRU across processes: a read sets the file's mtime to now (``os.utime``); eviction deletes
      the least recently used files (oldest mtime) until the total is at most
      ``low_water * max_bytes``. Eviction runs under an ``fcntl`` lock on ``root/.evict.lock`` so
      concurrent writers do not evict twice; a reader holding a deleted file open still reads it.
    """

    def __init__(self, root: Union[str, os.PathLike], max_bytes: Optional[int] = None,
                 low_water: float = 0.9, fsync: bool = False, temp_max_age_s: float = 600.0,
                 sweep_interval_s: float = 300.0, mode: Optional[int] = None) -> None:
        super().__init__()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Entry files get ``mode`` (e.g. 0o664 for a store shared by a group), default 0o666 less
        # the umask like open(); folders made for entries get the same bits plus x where r is set.
        self.mode = None if mode is None else file_mode(mode)
        self._dir_mode = None if mode is None else self.mode | ((self.mode & 0o444) >> 2)
        self.max_bytes = max_bytes
        self.low_water = low_water
        self.fsync = fsync
        # Temp files of writers that died mid-write (SIGKILL, power loss) are removed once older
        # than temp_max_age_s: on open, then at most every sweep_interval_s from put().
        self.temp_max_age_s = temp_max_age_s
        self.sweep_interval_s = sweep_interval_s
        self._since_scan = 0
        self._approx = None  # bytes at the last scan + bytes written since
        self._next_sweep = 0.0
        self.sweep_temp_files()

    def sweep_temp_files(self) -> int:
        """Remove the temp files (names starting with '.') of dead writers: older than
        temp_max_age_s, or older than a few seconds and no longer locked by their writer
        (fileio.temp_is_abandoned); returns bytes freed."""
        freed, now = 0, time.time()
        self._next_sweep = time.monotonic() + self.sweep_interval_s
        try:
            dirs = [d.path for d in os.scandir(self.root) if d.is_dir(follow_symlinks=False)]
        except OSError:
            return 0
        for d in dirs:
            try:
                names = [e for e in os.scandir(d) if e.name.startswith(".")]
            except OSError:
                continue
            for e in names:
                try:
                    st = e.stat(follow_symlinks=False)
                    if temp_is_abandoned(e.path, st.st_mtime, self.temp_max_age_s, now):
                        os.unlink(e.path)
                        freed += st.st_size
                        self.stats["temp_removed"] = self.stats.get("temp_removed", 0) + 1
                except OSError:
                    pass
        return freed

    def path(self, key: str) -> Path:
        if not key or "/" in key or key.startswith("."):
            raise ValueError(f"bad key {key!r}")
        return self.root / key[:2] / key

    def get(self, key: str) -> Optional[bytes]:
        self.stats["gets"] += 1
        p = self.path(key)
        try:
            with open(p, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            self.stats["errors"] += 1
            log.warning("store: reading %s failed: %s", p, e)
            return None
        try:
            os.utime(p, None)  # LRU clock, visible to every process
        except OSError:
            pass
        self.stats["hits"] += 1
        self.stats["bytes_read"] += len(data)
        return data

    def put(self, key: str, data: bytes) -> bool:
        self.stats["puts"] += 1
        p = self.path(key)
        try:
            if not p.parent.is_dir():
                p.parent.mkdir(exist_ok=True)
                if self._dir_mode is not None:
                    try:
                        os.chmod(p.parent, self._dir_mode)
                    except OSError:   # made by another user at the same moment: theirs
                        pass
            write_atomic(p, data, fsync=self.fsync, prefix=".tmp.", mode=self.mode)
        except OSError as e:
            self.stats["errors"] += 1
            log.warning("store: writing %s failed: %s", p, e)
            return False
        if self.max_bytes is not None:
            self._approx = (self._approx or 0) + len(data)
            self._since_scan += 1
            if self._approx > self.max_bytes or self._since_scan >= 16:
                self.evict()
        if time.monotonic() >= self._next_sweep:
            self.sweep_temp_files()
        return True

    def delete(self, key: str) -> None:
        try:
            os.unlink(self.path(key))
        except OSError:
            pass

    def update(self, key: str, fn: Callable[[Optional[bytes]], Optional[bytes]]) -> bool:
        """Read-merge-write under an ``fcntl`` lock on ``root/.update.lock`` (held for one small
        entry's read and write; every process and thread takes it through its own open file)."""
        lockf = None
        try:
            if fcntl is not None:
                lockf = open(self.root / ".update.lock", "a+b")
                fcntl.flock(lockf, fcntl.LOCK_EX)
                new = fn(self.get(key))
                return True if new is None else self.put(key, new)
            with self._update_lock():
                new = fn(self.get(key))
                return True if new is None else self.put(key, new)
        except OSError as e:
            self.stats["errors"] += 1
            log.warning("store: update of %s failed: %s", key, e)
            return False
        finally:
            if lockf is not None:
                try:
                    fcntl.flock(lockf, fcntl.LOCK_UN)
                finally:
                    lockf.close()

    def _entries(self) -> list[tuple[float, int, str]]:
        out = []
        for d in os.scandir(self.root):
            if not d.is_dir(follow_symlinks=False):
                continue
            for e in os.scandir(d.path):
                if e.name.startswith("."):
                    # temp files of crashed writers: removed by age (sweep_temp_files)
                    try:
                        st = e.stat()
                        if time.time() - st.st_mtime > self.temp_max_age_s:
                            os.unlink(e.path)
                    except OSError:
                        pass
                    continue
                try:
                    st = e.stat()
                except OSError:
                    continue
                out.append((st.st_mtime_ns, st.st_size, e.path))
        return out

    def total_bytes(self) -> int:
        return sum(s for _, s, _ in self._entries())

    def evict(self) -> int:
        """Delete least recently used entries until under the low-water mark; returns bytes freed."""
        if self.max_bytes is None:
            return 0
        lockf = None
        try:
            if fcntl is not None:
                lockf = open(self.root / ".evict.lock", "a+b")
                fcntl.flock(lockf, fcntl.LOCK_EX)
            entries = self._entries()
            total = sum(s for _, s, _ in entries)
            freed = 0
            if total > self.max_bytes:
                target = self.low_water * self.max_bytes
                for _, size, path in sorted(entries):
                    if total - freed <= target:
                        break
                    try:
                        os.unlink(path)
                        freed += size
                        self.stats["evicted"] += 1
                    except OSError:
                        pass
            self._approx = total - freed
            self._since_scan = 0
            return freed
        finally:
            if lockf is not None:
                fcntl.flock(lockf, fcntl.LOCK_UN)
                lockf.close()


class RedisBackend(Backend):
    """Entries in Redis (``SET``/``MGET``), keys prefixed by ``prefix``.

    Never raises and never hangs: every command runs with ``socket_timeout`` and
    ``socket_connect_timeout``; any Redis or socket error counts as a miss (``get``) or a failed
    write (``put``) and marks the server down for ``down_backoff_s`` seconds, during which calls
    return at once instead of waiting for another timeout. Eviction is the server's
    (``maxmemory`` + ``maxmemory-policy allkeys-lru``); an evicted entry is simply a miss.
    """

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "cachegen:",
                 socket_timeout: float = 2.0, connect_timeout: float = 0.5, ttl_s: Optional[int] = None,
                 down_backoff_s: float = 2.0, client=None) -> None:
        super().__init__()
        import redis  # the PyPI client

        self._redis = redis
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.down_backoff_s = down_backoff_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.client = client or redis.Redis.from_url(
            url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
            retry_on_timeout=False, health_check_interval=0)

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, op: str, e: BaseException) -> None:
        self.stats["errors"] += 1
        self._down_until = time.monotonic() + self.down_backoff_s
        log.warning("store: redis %s failed (%s: %s); treating as a miss for %.1fs",
                    op, type(e).__name__, e, self.down_backoff_s)
        try:
            self.client.connection_pool.disconnect()
        except Exception:  # noqa: BLE001 - best effort
            pass

    def _errors(self) -> tuple:
        return (self._redis.exceptions.RedisError, OSError)

    def _op_failed(self, op: str, e: BaseException) -> None:
        """An error reply to one command (OOM for a value over maxmemory, a wrong-type key...)
        comes from a healthy server: count it, keep the connection, do not back off. Anything
        else (connection refused or reset, timeout, server loading) marks the server down."""
        if isinstance(e, self._redis.exceptions.ResponseError):
            self.stats["errors"] += 1
            self.stats["command_errors"] = self.stats.get("command_errors", 0) + 1
            log.warning("store: redis %s refused (%s: %s); server still up", op, type(e).__name__, e)
            try:   # a fresh connection: the server frees the refused command's query buffer with it
                self.client.connection_pool.disconnect()
            except Exception:  # noqa: BLE001 - best effort
                pass
        else:
            self._failed(op, e)

    def get(self, key: str) -> Optional[bytes]:
        return self.get_many([key])[0]

    def get_many(self, keys: Sequence[str]) -> list[Optional[bytes]]:
        self.stats["gets"] += len(keys)
        if not keys or not self._available():
            return [None] * len(keys)
        try:
            vals = self.client.mget([self.prefix + k for k in keys])
        except self._errors() as e:
            self._op_failed("MGET", e)
            return [None] * len(keys)
        out = []
        for v in vals:
            if v is not None:
                self.stats["hits"] += 1
                self.stats["bytes_read"] += len(v)
            out.append(v)
        return out

    def put(self, key: str, data: bytes) -> bool:
        self.stats["puts"] += 1
        if not self._available():
            return False
        try:
            self.client.set(self.prefix + key, bytes(data), ex=self.ttl_s)
            return True
        except self._errors() as e:
            self._op_failed("SET", e)
            return False

    def delete(self, key: str) -> None:
        if not self._available():
            return
        try:
            self.client.delete(self.prefix + key)
        except self._errors() as e:
            self._op_failed("DEL", e)

    def update(self, key: str, fn: Callable[[Optional[bytes]], Optional[bytes]], tries: int = 32) -> bool:
        """Compare-and-set: ``WATCH`` the key, read it, ``MULTI``/``SET``/``EXEC``; a concurrent
        change aborts the transaction and the merge is redone on the new value."""
        self.stats["puts"] += 1
        if not self._available():
            return False
        k = self.prefix + key
        try:
            with self.client.pipeline(transaction=True) as pipe:
                for _ in range(tries):
                    try:
                        pipe.watch(k)
                        new = fn(pipe.get(k))
                        if new is None:
                            pipe.unwatch()
                            return True
                        pipe.multi()
                        pipe.set(k, bytes(new), ex=self.ttl_s)
                        pipe.execute()
                        return True
                    except self._redis.exceptions.WatchError:
                        continue
                    finally:
                        pipe.reset()
            log.warning("store: redis update of %s kept conflicting; giving up", key)
            return False
        except self._errors() as e:
            self._op_failed("WATCH/MULTI", e)
            return False

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # noqa: BLE001
            pass
