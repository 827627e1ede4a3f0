"""A throwaway ``redis-server`` on a free loopback port (tests, benchmarks, examples).

    with RedisServer(maxmemory="64mb") as srv:
        backend = RedisBackend(srv.url)

Raises ``RuntimeError`` with a clear message when ``redis-server`` is not installed (Debian:
``apt-get install -y redis-server``).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Optional, Sequence

import numpy as np

__all__ = ["RedisServer", "free_port", "FakeRunner", "put_concurrently"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, port: Optional[int] = None, maxmemory: Optional[str] = None,
                 policy: str = "allkeys-lru", executable: Optional[str] = None,
                 extra_args: Sequence[str] = ()) -> None:
        self.extra_args = list(extra_args)
        self.executable = executable or shutil.which("redis-server") or (
            "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
        if self.executable is None:
            raise RuntimeError("redis-server is not installed: the Redis store tests need a real server "
                               "(Debian/Ubuntu: apt-get install -y redis-server)")
        self.port = port or free_port()
        self.maxmemory = maxmemory
        self.policy = policy
        self.proc: Optional[subprocess.Popen] = None
        self.dir: Optional[str] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        self.dir = tempfile.mkdtemp(prefix="cachegen-redis-")
        args = [self.executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no",
                "--logfile", os.path.join(self.dir, "redis.log")]
        if self.maxmemory:
            args += ["--maxmemory", self.maxmemory, "--maxmemory-policy", self.policy]
        args += self.extra_args
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = open(os.path.join(self.dir, "redis.log")).read()[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def kill(self) -> None:
        """SIGKILL (a crash, not a shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class FakeRunner:
    """A deterministic stand-in for :class:`cachegen.ort.OrtRunner` (tests, no model needed).

    The KV at position ``t`` is a smooth function of ``(token_t, t, layer)``, so restoring a chunk
    from the store or recomputing it gives the same values (a real model's KV also depends on
    the earlier tokens; the store's chained keys take care of that). ``delay_per_token_s``
    simulates compute time; ``calls`` records (kind, past tokens, new tokens).
    """

    def __init__(self, num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 8, vocab: int = 50,
                 delay_per_token_s: float = 0.0) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.dtype = np.dtype(np.float32)
        self.vocab = vocab
        self.delay = delay_per_token_s
        self.model_dir = "fake-model"
        self.calls: list[tuple[str, int, int]] = []

    def kv_for(self, ids, start: int = 0) -> list:
        ids = np.asarray(ids, dtype=np.float64).reshape(-1)
        pos = np.arange(start, start + len(ids), dtype=np.float64)
        H, D = self.num_kv_heads, self.head_dim
        out = []
        for l in range(self.num_layers):
            base = (ids[None, :, None] * 0.37 * (1 + np.arange(H))[:, None, None]
                    + pos[None, :, None] * 0.01 + np.arange(D)[None, None, :] * 0.3 + l)
            out.append((np.sin(base)[None].astype(np.float32), (2 * np.cos(1.7 * base))[None].astype(np.float32)))
        return out

    def _logits(self, kv, n: int) -> np.ndarray:
        k = np.asarray(kv[-1][0])[0, 0, -n:, :]                      # [n, D]
        return np.sin(k.sum(-1, keepdims=True) * np.arange(1, self.vocab + 1))[None].astype(np.float32)

    def prefill(self, input_ids):
        ids = np.asarray(input_ids).reshape(-1)
        self.calls.append(("prefill", 0, len(ids)))
        if self.delay:
            time.sleep(self.delay * len(ids))
        kv = self.kv_for(ids, 0)
        return self._logits(kv, len(ids)), kv

    def continue_from(self, kv, new_ids):
        ids = np.asarray(new_ids).reshape(-1)
        past = int(kv[0][0].shape[2])
        self.calls.append(("continue", past, len(ids)))
        if self.delay:
            time.sleep(self.delay * len(ids))
        new = self.kv_for(ids, past)
        full = []
        for (pk, pv), (nk, nv) in zip(kv, new):
            pk = pk.numpy() if hasattr(pk, "numpy") else np.asarray(pk)
            pv = pv.numpy() if hasattr(pv, "numpy") else np.asarray(pv)
            full.append((np.concatenate([pk.astype(np.float32), nk], 2),
                         np.concatenate([pv.astype(np.float32), nv], 2)))
        return self._logits(full, len(ids)), full


def put_concurrently(stores: Sequence, ids, kv) -> None:
    """Every store puts the same tokens at the same moment (a barrier releases them together):
    concurrent writers of one prefix, e.g. adding different quality levels."""
    import threading

    barrier = threading.Barrier(len(stores))

    def write(st) -> None:
        barrier.wait()
        st.put(ids, kv)

    threads = [threading.Thread(target=write, args=(st,)) for st in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
