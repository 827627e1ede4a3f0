"""A simulated link: a TCP proxy on loopback whose server-to-client direction is throttled by a
token bucket (rate from a fixed bandwidth or a time trace). Put it between a client and Redis:

    with ThrottledProxy(("127.0.0.1", redis_port), rate_Bps=1e9 / 8) as px:
        backend = RedisBackend(f"redis://127.0.0.1:{px.port}/0")
        px.set_rate(0.1e9 / 8)                      # change the link speed at any time
        px.set_trace([(0.0, 1.25e8), (2.0, 1.25e7)])  # or follow a trace (t seconds, bytes/s)

Client-to-server bytes (requests) pass unthrottled. ``latency_s`` adds a one-way delay to every
response burst. A Python proxy tops out at a few GB/s on loopback; the configured rate is an
upper bound, the measured one is what the loader sees.
"""
from __future__ import annotations

import socket
import threading
import time
from typing import Optional, Sequence

__all__ = ["TokenBucket", "ThrottledProxy"]


class TokenBucket:
    def __init__(self, rate_Bps: float, burst: int = 65536) -> None:
        self.rate = float(rate_Bps)
        self.burst = burst
        self.tokens = float(burst)
        self.t = time.perf_counter()
        self.trace: Optional[list[tuple[float, float]]] = None
        self.t0 = self.t
        self.lock = threading.Lock()

    def set_rate(self, rate_Bps: float) -> None:
        with self.lock:
            self._refill()
            self.rate = float(rate_Bps)
            self.trace = None

    def set_trace(self, trace: Sequence[tuple[float, float]], loop: bool = False) -> None:
        with self.lock:
            self._refill()
            self.trace = sorted((float(a), float(b)) for a, b in trace)
            self.loop = loop
            self.t0 = time.perf_counter()
            self.rate = self.trace[0][1]

    def _rate_now(self, now: float) -> float:
        if not self.trace:
            return self.rate
        el = now - self.t0
        if getattr(self, "loop", False) and self.trace[-1][0] > 0:
            el %= self.trace[-1][0] if len(self.trace) > 1 else 1
        r = self.trace[0][1]
        for ts, rate in self.trace:
            if el >= ts:
                r = rate
        return r

    def _refill(self) -> None:
        now = time.perf_counter()
        self.rate = self._rate_now(now)
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now

    def take(self, n: int) -> None:
        """Block until ``n`` bytes may pass."""
        while True:
            with self.lock:
                self._refill()
                if self.tokens >= n or (self.tokens >= self.burst * 0.999 and n > self.burst):
                    self.tokens -= n
                    return
                wait = (min(n, self.burst) - self.tokens) / max(self.rate, 1.0)
            time.sleep(min(max(wait, 1e-5), 0.05))


class ThrottledProxy:
    def __init__(self, target: tuple[str, int], rate_Bps: float = 1.25e9, burst: int = 65536,
                 latency_s: float = 0.0, chunk: int = 65536) -> None:
        self.target = target
        self.bucket = TokenBucket(rate_Bps, burst)
        self.latency_s = latency_s
        self.chunk = min(chunk, burst)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._th: Optional[threading.Thread] = None
        self.bytes_down = 0

    def set_rate(self, rate_Bps: float) -> None:
        self.bucket.set_rate(rate_Bps)

    def set_trace(self, trace: Sequence[tuple[float, float]], loop: bool = False) -> None:
        self.bucket.set_trace(trace, loop)

    def start(self) -> "ThrottledProxy":
        self._th = threading.Thread(target=self._accept, daemon=True, name="netsim-accept")
        self._th.start()
        return self

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                s = socket.create_connection(self.target, timeout=2)
            except OSError:
                c.close()
                continue
            for x in (c, s):
                x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                x.settimeout(None)
            self._conns += [c, s]
            threading.Thread(target=self._pipe, args=(c, s, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(s, c, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, throttle: bool) -> None:
        try:
            while not self._stop.is_set():
                data = src.recv(self.chunk)
                if not data:
                    break
                if throttle:
                    if self.latency_s:
                        time.sleep(self.latency_s)
                    mv = memoryview(data)
                    for off in range(0, len(mv), self.chunk):
                        part = mv[off:off + self.chunk]
                        self.bucket.take(len(part))
                        dst.sendall(part)
                    self.bytes_down += len(data)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for x in (src, dst):
                try:
                    x.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                x.close()

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass

    def __enter__(self) -> "ThrottledProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
