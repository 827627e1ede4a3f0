"""Restore I/O: read a container into a reused (pinned) host buffer, copy it to the GPU in pieces,
hand the device bytes to the GPU decoder.

The floor of a restore on the H200 machine (BACKGROUND.md) is the page cache -> pinned copy
(5.1 GB/s on one thread), the pinned H2D copy (55 GB/s) and the decode kernels; a fresh
``bytes`` from ``f.read()`` plus a pageable H2D cost several times that. So, python-zstandard
style, a :class:`PinnedReader` builds its buffers once and reuses them per call:

* **read**: the file is read with ``os.preadv`` straight into a reused host buffer (pinned when
  torch has CUDA, plain otherwise), in pieces, from a small thread pool (``preadv`` releases the
  GIL, so the page-cache copies run on several cores). No mmap: a file that shrinks or changes
  while it is read raises :class:`FormatError`, never SIGBUS.
* **H2D**: each piece is copied asynchronously into a reused device ``uint8`` buffer on a copy
  stream as soon as it is in host memory, so reading piece i+1 overlaps copying piece i; one
  CUDA event per piece lets a consumer wait on exactly the bytes it needs
  (:meth:`DeviceBytes.wait`).
* **other sources**: bytes-like objects already in host memory are copied into the pinned
  buffer in the same pieces (or used directly when they already are pinned); a ``uint8`` CUDA
  tensor is used as the device bytes as it is (no copy).

The views handed out (:class:`HostBytes`, :class:`DeviceBytes`) live in the reader's buffers:
they are valid until the reader's next call (clone them to keep them). A reader serves one call
at a time (calls from several threads are serialized); use one reader per thread for
concurrency.

:func:`restore` chains read -> H2D -> decode into caller-owned buffers. The GPU decoder gets the
container parsed on the host and its bytes on the device (``payload=``, padded to whole 32-bit
words), so it does no H2D of its own. The host parses once every byte is in host memory; the
last H2D pieces may still be in flight then. Pipelining seam: a decoder with a
``decode_into_pipelined(container, bufs, *, stream, payload, wait)`` entry point is called at
that moment and calls ``wait(end)`` before it launches work that reads bytes ``[0, end)``
(overlapping its launches with the copies); a decoder with only ``decode_into`` starts after
all bytes are on the device. Bytes already on the GPU stay there: only the header (and, for
the host checks, each chunk's metadata) is copied back for the host parser.
"""
from __future__ import annotations

import bisect
import inspect
import os
import stat
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, wait as _wait_all
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .errors import FormatError, InputError, LimitExceededError
from .format.container import Container, DecodeLimits

from .dispatch import open_container as _open_container   # either format version
from .format.v2 import PREAMBLE_SIZE as _PRE, ContainerV2 as _ContainerV2, header_extent
_CONTAINERS: tuple = (Container, _ContainerV2)


def is_container(x: Any) -> bool:
    """A parsed container of any format version."""
    return isinstance(x, _CONTAINERS)

__all__ = ["SourceNotFoundError", "PinnedReader", "HostBytes", "DeviceBytes", "ReadStats", "RestoreResult", "Staged", "restore", "stage",
           "decode_staged", "default_decoder", "default_reader", "drop_page_cache", "cuda_available"]

PathLike = Union[str, "os.PathLike[str]"]
Source = Union[PathLike, bytes, bytearray, memoryview, np.ndarray, torch.Tensor]

_MiB = 1 << 20
_MIN_PIECE = 256 << 10      # adaptive pieces never get smaller (per-read overhead)
# H2D copies of a file read are queued per run of completed pieces of at least this size (and
# at the end): every copy + event costs ~60 us of host time, and the decoder waits for the whole
# payload anyway (one launch), so small files go up in one copy.
_COPY_GROUP = 8 * _MiB
OnPiece = Callable[[torch.Tensor, int, int], None]   # (buffer the piece is in, start, end)


class SourceNotFoundError(InputError, FileNotFoundError):
    """The path to restore from does not exist (an ``InputError`` and a ``FileNotFoundError``)."""


def cuda_available() -> bool:
    """True when this torch build has CUDA and sees a GPU (pinned memory and the H2D path)."""
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver install: treat as CPU-only
        return False


def _need_cuda(what: str) -> None:
    if not cuda_available():
        raise InputError(f"{what} needs CUDA, but this torch build ({torch.__version__}) has no usable CUDA device")


def drop_page_cache(path: PathLike) -> bool:
    """Evict ``path``'s pages from the OS page cache (for cold-read benchmarks): flush dirty
    pages (``fdatasync``; DONTNEED skips dirty pages), then ``posix_fadvise(DONTNEED)``.
    Returns False where the OS has no ``posix_fadvise`` (nothing dropped)."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            os.fdatasync(fd)
        except OSError:  # e.g. a read-only file system: nothing dirty to flush
            pass
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


# ----------------------------------------------------------------------------- records

@dataclass
class ReadStats:
    """What one staging call did: ``wall_s`` is the wall time of the fill (read / copy and the
    H2D copies queued on the way), ``pool_cpu_s`` the CPU time of the reader threads."""
    source: str                 # "file", "host" (copied into the buffer), "pinned" (used as is), "device"
    nbytes: int
    pieces: int = 0
    threads: int = 0
    wall_s: float = 0.0
    pool_cpu_s: float = 0.0     # CPU time of the pool threads (0 when the calling thread read)


@dataclass
class HostBytes:
    """Container bytes in host memory: ``tensor`` is a 1-D uint8 CPU tensor of ``nbytes``."""
    tensor: torch.Tensor
    pinned: bool
    stats: ReadStats

    @property
    def nbytes(self) -> int:
        return int(self.tensor.numel())

    def memoryview(self) -> memoryview:
        """A memoryview of the bytes (what the container parser reads)."""
        return memoryview(self.tensor.numpy()).cast("B")


@dataclass
class DeviceBytes:
    """Container bytes on a CUDA device: ``tensor`` (1-D uint8) is filled piece by piece on
    ``copy_stream``; ``events[i]`` is recorded after the bytes ``[0, ends[i])`` are copied.
    No events: the bytes were on the device already (ordered on the caller's current stream)."""
    tensor: torch.Tensor
    ends: list[int] = field(default_factory=list)
    events: list[Any] = field(default_factory=list)
    copy_stream: Any = None
    host: Optional[HostBytes] = None
    #: per piece (start, end) timing events when the copy was timed (``timing=True``)
    timing_events: list[tuple[Any, Any]] = field(default_factory=list)
    _release: Optional[Callable[[Any], None]] = None
    _base: Optional[torch.Tensor] = None     # the reader's whole device buffer (room for padding)

    @property
    def nbytes(self) -> int:
        return int(self.tensor.numel())

    def padded(self) -> Optional[torch.Tensor]:
        """The bytes as a view whose length is a multiple of 4 and whose start is 16-byte aligned
        (what a word-reading kernel wants; the pad bytes are not part of the container), or
        None when this tensor cannot give one without a copy."""
        n = self.nbytes
        n4 = n + (-n % 4)
        t = self._base if self._base is not None else self.tensor
        if t.data_ptr() % 16 or t.numel() < n4:
            return None
        return t[:n4]

    def wait(self, stream=None, upto: Optional[int] = None) -> None:
        """Make ``stream`` (default: the current stream) wait until bytes ``[0, upto)`` (default:
        all) are on the device. Enqueues a wait; does not block the host."""
        if not self.events:
            return
        s = stream if stream is not None else torch.cuda.current_stream(self.tensor.device)
        upto = self.nbytes if upto is None else int(upto)
        # the pieces are copied in order on one stream: the piece holding byte upto-1 suffices
        i = min(bisect.bisect_left(self.ends, upto), len(self.events) - 1)
        s.wait_event(self.events[i])

    def synchronize(self) -> None:
        """Block the host until every piece is on the device."""
        if self.events:
            self.events[-1].synchronize()

    def release(self, stream=None) -> None:
        """Tell the reader its device buffer is free once ``stream``'s work so far is done (the
        next copy into the buffer waits for it). :func:`restore` calls this after decoding."""
        if self._release is not None:
            self._release(stream if stream is not None else torch.cuda.current_stream(self.tensor.device))

    def h2d_ms(self) -> Optional[tuple[float, float]]:
        """(sum of the pieces' copy times, first copy start -> last copy end) in ms, when timed;
        synchronizes on the last piece."""
        if not self.timing_events:
            return None
        self.timing_events[-1][1].synchronize()
        busy = sum(a.elapsed_time(b) for a, b in self.timing_events)
        return busy, self.timing_events[0][0].elapsed_time(self.timing_events[-1][1])


# ----------------------------------------------------------------------------- the reader

class PinnedReader:
    """Reads containers into reused host (pinned) and device buffers, python-zstandard style:
    build one, call it many times.

    ``threads``: reader threads (``preadv`` into disjoint pieces of the buffer; 1 = read on the
    calling thread; default min(8, CPUs)). ``piece_bytes``: piece size, the unit of parallel
    reads; with ``adaptive`` (default) smaller for small sources, so that every thread gets
    one piece (never below 256 KiB). ``copy_bytes``: H2D copies of a read go per run of
    completed pieces of at least this size (default 8 MiB) and at the end. ``pin``: pin the host buffer
    (default: when CUDA is available). ``max_bytes``: largest source accepted
    (:class:`LimitExceededError` beyond; nothing is allocated for it).
    """

    def __init__(self, threads: Optional[int] = None, piece_bytes: int = 4 * _MiB, *, adaptive: bool = True,
                 pin: Optional[bool] = None, max_bytes: int = 16 << 30, copy_bytes: int = _COPY_GROUP) -> None:
        if threads is None:
            threads = max(1, min(8, os.cpu_count() or 1))
        if not isinstance(threads, int) or threads < 1 or threads > 64:
            raise InputError(f"threads must be an int in [1, 64], got {threads!r}")
        if not isinstance(piece_bytes, int) or piece_bytes < 4096:
            raise InputError(f"piece_bytes must be an int >= 4096, got {piece_bytes!r}")
        self.threads = threads
        if not isinstance(copy_bytes, int) or copy_bytes < 1:
            raise InputError(f"copy_bytes must be a positive int, got {copy_bytes!r}")
        self.piece_bytes = piece_bytes
        self.copy_bytes = copy_bytes
        self.adaptive = bool(adaptive)
        self.pin = cuda_available() if pin is None else bool(pin)
        if self.pin:
            _need_cuda("pinned host memory")
        self.max_bytes = int(max_bytes)
        self._host: Optional[torch.Tensor] = None          # reused host buffer (uint8)
        self._host_free: Optional[Any] = None              # event: last H2D out of _host done
        self._dev: dict[torch.device, torch.Tensor] = {}   # reused device buffers
        self._dev_free: dict[torch.device, Any] = {}       # event: consumer done with _dev[d]
        self._streams: dict[torch.device, Any] = {}        # copy stream per device
        self._pool: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Shut the thread pool down and drop the buffers (waits for pending copies)."""
        with self._lock:
            self._wait_host_free()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._dev_free or self._dev:
                for d in list(self._dev):
                    torch.cuda.synchronize(d)
            self._host, self._dev, self._dev_free = None, {}, {}
            self._closed = True

    def __enter__(self) -> "PinnedReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        cap = 0 if self._host is None else self._host.numel()
        return f"PinnedReader(threads={self.threads}, piece_bytes={self.piece_bytes}, pin={self.pin}, host_buffer={cap})"

    # ------------------------------------------------------------------ buffers
    def _check_open(self) -> None:
        if self._closed:
            raise InputError("PinnedReader is closed")

    def _wait_host_free(self) -> None:
        if self._host_free is not None:
            self._host_free.synchronize()   # the last H2D out of the host buffer is done
            self._host_free = None

    def _host_buffer(self, n: int) -> torch.Tensor:
        """The reused host buffer, grown (x1.25, MiB-rounded) when ``n`` does not fit."""
        self._wait_host_free()
        if self._host is None or self._host.numel() < n:
            cap = max(n, int((0 if self._host is None else self._host.numel()) * 1.25))
            cap = -(-cap // _MiB) * _MiB
            self._host = None  # free the old one first (pinned memory is precious)
            self._host = torch.empty(cap, dtype=torch.uint8, pin_memory=self.pin)
        return self._host[:n]

    def _dev_buffer(self, n: int, device: torch.device, stream) -> torch.Tensor:
        buf = self._dev.get(device)
        n = n + (-n % 4)      # room for the word padding a kernel may ask for (DeviceBytes.padded)
        if buf is None or buf.numel() < n:
            if buf is not None:
                torch.cuda.synchronize(device)  # the old buffer may still be read
            cap = max(n, int((0 if buf is None else buf.numel()) * 1.25))
            cap = -(-cap // _MiB) * _MiB
            self._dev.pop(device, None)
            buf = self._dev[device] = torch.empty(cap, dtype=torch.uint8, device=device)
            self._dev_free.pop(device, None)
        free = self._dev_free.pop(device, None)
        if free is not None:
            stream.wait_event(free)
        else:
            # no consumer said it is done: wait for everything queued on the current stream
            stream.wait_stream(torch.cuda.current_stream(device))
        return buf

    def device_copy(self, t: torch.Tensor, stream) -> torch.Tensor:
        """``t`` (uint8 on a CUDA device) copied into the reader's device buffer on ``stream``,
        as a padded, aligned view (for device bytes a kernel cannot read in place)."""
        with self._lock:
            n = t.numel()
            buf = self._dev_buffer(n, t.device, stream)
            with torch.cuda.stream(stream):
                buf[:n].copy_(t)
            return buf[:n + (-n % 4)]   # the caller records when its consumer is done (_set_dev_free)

    def _copy_stream(self, device: torch.device):
        s = self._streams.get(device)
        if s is None:
            s = self._streams[device] = torch.cuda.Stream(device)
        return s

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="cachegen-read")
        return self._pool

    # ------------------------------------------------------------------ filling
    def _ranges(self, n: int) -> list[tuple[int, int]]:
        P = self.piece_bytes
        if self.adaptive and self.threads > 1:
            want = -(-n // self.threads)     # one piece per thread (pool hand-offs cost ~50 us each)
            P = min(P, max(_MIN_PIECE, -(-want // 65536) * 65536))
        return [(a, min(a + P, n)) for a in range(0, n, P)]

    def _fill(self, job: Optional[Callable[[int, int], None]], host: torch.Tensor, on_piece: Optional[OnPiece],
              stats: ReadStats) -> None:
        """Run ``job(a, b)`` for every piece of ``host`` (on the pool when threads > 1), and
        ``on_piece(host, a, b)`` on this thread for the pieces in order as they complete.
        ``job=None``: the bytes are there already, only ``on_piece`` runs."""
        # bytes already in (pinned) memory: one piece, i.e. one H2D copy queued before the header
        # is parsed (per-piece copies and events cost ~60 us each on the host; the decode waits
        # for all of it anyway)
        ranges = [(0, host.numel())] if job is None else self._ranges(host.numel())
        stats.pieces, stats.threads = len(ranges), 1
        t0 = time.perf_counter()
        if job is None or self.threads == 1 or len(ranges) == 1:
            for a, b in ranges:
                if job is not None:
                    job(a, b)
                if on_piece is not None:
                    on_piece(host, a, b)
        else:
            def timed(a: int, b: int) -> float:
                t = time.thread_time()
                job(a, b)
                return time.thread_time() - t

            stats.threads = min(self.threads, len(ranges))
            pool = self._executor()
            futs = [pool.submit(timed, a, b) for a, b in ranges]
            try:
                for f, (a, b) in zip(futs, ranges):
                    stats.pool_cpu_s += f.result()
                    if on_piece is not None:
                        on_piece(host, a, b)
            finally:
                # never leave a job writing into the buffer (or reading a closed fd) after we return
                for f in futs:
                    f.cancel()
                _wait_all(futs)
        stats.wall_s = time.perf_counter() - t0

    def _read_file(self, path: PathLike, on_piece: Optional[OnPiece]) -> HostBytes:
        try:
            name = os.fspath(path)
            fd = os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as e:
            raise SourceNotFoundError(f"cannot open {path!r}: {e.strerror or e}") from e
        except (OSError, TypeError, ValueError) as e:
            raise InputError(f"cannot open {path!r}: {e}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{name}: not a regular file")
            n = st.st_size
            if n == 0:
                raise FormatError(f"{name}: empty file")
            if n > self.max_bytes:
                raise LimitExceededError(f"{name}: {n} bytes over the reader's limit of {self.max_bytes}")
            host = self._host_buffer(n)
            arr = host.numpy()
            stats = ReadStats("file", n)

            def job(a: int, b: int) -> None:
                mv = memoryview(arr[a:b])
                pos = a
                while pos < b:
                    got = _pread_into(fd, mv[pos - a:], pos)
                    if got <= 0:
                        raise FormatError(f"{name}: file shrank while being read (ended at byte {pos} of {n})")
                    pos += got

            self._fill(job, host, on_piece, stats)
            st2 = os.fstat(fd)
            if (st2.st_size, st2.st_mtime_ns, st2.st_ino) != (st.st_size, st.st_mtime_ns, st.st_ino):
                raise FormatError(f"{name}: file changed while being read ({st.st_size} -> {st2.st_size} bytes)")
        except OSError as e:
            raise InputError(f"reading {name} failed: {e}") from e
        finally:
            os.close(fd)
        return HostBytes(host, self.pin, stats)

    def _stage(self, source: Source, on_piece: Optional[OnPiece]) -> HostBytes:
        if isinstance(source, (str, os.PathLike)):
            return self._read_file(source, on_piece)
        if isinstance(source, torch.Tensor) and source.device.type == "cuda":
            t = _check_u8(source)
            self._limit(t.numel())
            host = self._host_buffer(t.numel())
            t0 = time.perf_counter()
            host.copy_(t)      # D2H, synchronous: a host copy for the host parser / CPU decoder
            return HostBytes(host, self.pin, ReadStats("device", t.numel(), 1, 1, time.perf_counter() - t0))
        t = _host_tensor(source)
        self._limit(t.numel())
        if self.pin and _is_pinned(t):
            stats = ReadStats("pinned", t.numel())
            self._fill(None, t, on_piece, stats)
            return HostBytes(t, True, stats)
        src = t.numpy()
        host = self._host_buffer(t.numel())
        arr = host.numpy()
        stats = ReadStats("host", t.numel())

        def job(a: int, b: int) -> None:
            np.copyto(arr[a:b], src[a:b])   # releases the GIL for large copies

        self._fill(job, host, on_piece, stats)
        return HostBytes(host, self.pin, stats)

    def _limit(self, n: int) -> None:
        if n == 0:
            raise FormatError("empty data")
        if n > self.max_bytes:
            raise LimitExceededError(f"{n} bytes over the reader's limit of {self.max_bytes}")

    # ------------------------------------------------------------------ public
    def read(self, path: PathLike) -> HostBytes:
        """Read a file into the reused host buffer (valid until this reader's next call)."""
        with self._lock:
            self._check_open()
            return self._read_file(path, None)

    def stage(self, source: Source) -> HostBytes:
        """Host bytes of ``source``: a path is read, bytes-like data is copied into the reused
        buffer unless it is pinned already (then used as is); a CUDA tensor is copied back."""
        with self._lock:
            self._check_open()
            return self._stage(source, None)

    def load(self, source: Source, device: Union[str, torch.device], *, timing: bool = False,
             on_piece: Optional[OnPiece] = None) -> DeviceBytes:
        """Bytes of ``source`` on ``device`` (a CUDA device), pipelined: each piece is copied
        on the reader's copy stream as soon as it is in host memory. Returns once the last copy
        is *queued*: consumers wait with :meth:`DeviceBytes.wait`. A uint8 CUDA tensor on
        ``device`` is returned as it is (no copy). A pinned source tensor is copied from in
        place: do not modify it before :meth:`DeviceBytes.synchronize`. ``on_piece(host, a,
        b)``: called on this thread for each piece in order once it is in host memory (``host``:
        the whole host view; bytes ``[0, b)`` are in it; copies are queued per run of pieces of
        at least ``copy_bytes``), e.g. to parse the header while the rest is read."""
        user_piece = on_piece
        with self._lock:
            self._check_open()
            dev = _cuda_device(device)
            if isinstance(source, torch.Tensor) and source.device.type == "cuda":
                t = _check_u8(source)
                if t.device != dev:
                    raise InputError(f"payload is on {t.device}, the destination on {dev}")
                return DeviceBytes(t)
            stream = self._copy_stream(dev)
            out = DeviceBytes(torch.empty(0, dtype=torch.uint8, device=dev), copy_stream=stream,
                              _release=lambda s: self._set_dev_free(dev, s))

            start = [0]     # first byte not yet copied

            def on_piece(host: torch.Tensor, a: int, b: int) -> None:
                if a == 0:  # the size is known once the source is open
                    out._base = self._dev_buffer(host.numel(), dev, stream)
                    out.tensor = out._base[:host.numel()]
                if b - start[0] < self.copy_bytes and b < host.numel():
                    if user_piece is not None:
                        user_piece(host, a, b)
                    return
                g, start[0] = start[0], b
                with torch.cuda.stream(stream):
                    e0 = None
                    if timing:
                        e0 = torch.cuda.Event(enable_timing=True)
                        e0.record(stream)
                    out.tensor[g:b].copy_(host[g:b], non_blocking=True)
                    ev = torch.cuda.Event(enable_timing=timing)
                    ev.record(stream)
                out.ends.append(b)
                out.events.append(ev)
                if e0 is not None:
                    out.timing_events.append((e0, ev))
                if user_piece is not None:
                    user_piece(host, a, b)

            try:
                host = self._stage(source, on_piece)
            finally:
                if out.events and self._host is not None:
                    self._host_free = out.events[-1]   # the next fill waits for these copies
            out.host = host
            return out

    def _set_dev_free(self, dev: torch.device, stream) -> None:
        ev = torch.cuda.Event()
        ev.record(stream)
        self._dev_free[dev] = ev
        # a decoder may still read the host copy on that stream too (e.g. async uploads of the
        # directory out of the pinned buffer): the next fill waits for the same point
        self._host_free = ev


def _pread_into(fd: int, mv: memoryview, pos: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [mv], pos)
    data = os.pread(fd, len(mv), pos)  # no preadv (macOS < 11): one extra copy
    mv[:len(data)] = data
    return len(data)


def _check_u8(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.uint8 or t.dim() != 1 or not t.is_contiguous():
        raise InputError(f"container bytes on the device must be a contiguous 1-D uint8 tensor, "
                         f"got {t.dtype} of shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise FormatError("empty data")
    return t


def _host_tensor(source: Any) -> torch.Tensor:
    """A 1-D uint8 CPU tensor viewing ``source``'s bytes (no copy)."""
    if isinstance(source, torch.Tensor):
        if source.device.type != "cpu":
            raise InputError(f"expected a CPU or CUDA tensor, got one on {source.device}")
        if source.dtype != torch.uint8 or source.dim() != 1 or not source.is_contiguous():
            raise InputError(f"container bytes must be a contiguous 1-D uint8 tensor, got {source.dtype} "
                             f"of shape {tuple(source.shape)}")
        return source
    if isinstance(source, np.ndarray):
        if not source.flags.c_contiguous:
            raise InputError("container bytes must be a contiguous array")
        arr = source.reshape(-1).view(np.uint8)
    else:
        try:
            mv = memoryview(source)
        except TypeError:
            raise InputError(f"expected a path, bytes-like data or a uint8 tensor, got {type(source).__name__}") from None
        if not mv.contiguous:
            raise InputError("container bytes must be contiguous")
        arr = np.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffers: we only ever read from them
        return torch.from_numpy(arr)


def _is_pinned(t: torch.Tensor) -> bool:
    try:
        return t.numel() > 0 and t.is_pinned()
    except Exception:
        return False


def _cuda_device(device: Union[str, torch.device, int]) -> torch.device:
    try:
        d = torch.device(device)
    except (TypeError, RuntimeError) as e:
        raise InputError(f"bad device {device!r}: {e}") from None
    if d.type != "cuda":
        raise InputError(f"the H2D path needs a CUDA device, got {d}")
    _need_cuda("copying container bytes to the GPU")
    return torch.device("cuda", d.index if d.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------- restore

@dataclass
class RestoreResult:
    """What one restore did. Times in ms; ``None`` where not measured (``timing=False``, or not
    applicable: no H2D for bytes already on the GPU, no kernels on the CPU path)."""
    tokens: list[int]
    nbytes: int
    source: str                      # "file", "host" (copied to the buffer), "pinned", "device", "container"
    path: str                        # "gpu-payload" (decoder took the device bytes), "api" (cachegen.decode_into)
    read_ms: float = 0.0             # wall time of filling the host buffer (read / copy, H2D queued on the way)
    read_cpu_ms: float = 0.0         # CPU time of the reader pool threads
    parse_ms: float = 0.0            # host: container parse
    decode_call_ms: float = 0.0      # host: wall time inside the decoder call (planning, launches, checks)
    wall_ms: float = 0.0             # the whole restore, host wall time
    host_cpu_ms: float = 0.0         # CPU time of the calling thread + the reader threads
    h2d_busy_ms: Optional[float] = None    # sum of the piece copies (CUDA events)
    h2d_span_ms: Optional[float] = None    # first copy start -> last copy end (CUDA events)
    decode_gpu_ms: Optional[float] = None  # the decoder's stream work (CUDA events around the call)
    #: ``decode_staged(defer=True)``: the decoder's device error flags, not read yet (``wait()``)
    pending: Optional["PendingCheck"] = None

    def wait(self) -> None:
        """Resolve a deferred check: wait for the decode and raise its errors (no-op if none)."""
        p, self.pending = self.pending, None
        if p is not None:
            p.resolve()


@dataclass
class PendingCheck:
    """Device-side verdict of a decode that was queued without reading it back."""
    flags: Any
    verify: Any
    raise_for: Callable[[Any, Any], None]

    def resolve(self) -> None:
        self.raise_for(self.flags, self.verify)


@dataclass
class Staged:
    """Step 1 of a restore: the container parsed on the host and, for a payload-taking GPU
    decoder, its bytes queued to the device."""
    container: Any                   # a parsed container (format v1 or v2)
    device_bytes: Optional[DeviceBytes]
    host: Optional[HostBytes]
    source: str
    parse_s: float
    timing: bool = False
    reader: Optional["PinnedReader"] = None
    t0: float = 0.0                  # perf_counter / thread_time at the start of the restore
    c0: float = 0.0


def _bufs_device(bufs: Sequence[Sequence[torch.Tensor]]) -> torch.device:
    try:
        devs = {t.device for pair in bufs for t in pair}
    except (TypeError, AttributeError):
        raise InputError("bufs must be a sequence of (key, value) tensor pairs") from None
    if len(devs) != 1:
        raise InputError(f"buffers must be on exactly one device, got {sorted(map(str, devs))}")
    return devs.pop()


_DECODERS: dict = {}
_DECODERS_LOCK = threading.Lock()


def default_decoder(device: Union[str, torch.device]) -> Any:
    """The payload-taking GPU decoder context for ``device`` (``cachegen.gpu.v2.GpuDecoder``, one
    per device, built once), or None when this build has none (``restore`` then goes through
    ``cachegen.decode_into``, whose decoder uploads the bytes itself)."""
    d = torch.device(device)
    if d.type != "cuda":
        return None
    if d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    with _DECODERS_LOCK:
        if d not in _DECODERS:
            try:  # the v2 decoder's own per-device cache (shared with cachegen.decode_into)
                from .gpu.v2 import default_decoder as _gpu_default
            except ImportError:
                _DECODERS[d] = None
            else:
                _DECODERS[d] = _gpu_default(d)
        return _DECODERS[d]


_READERS = threading.local()


def default_reader() -> PinnedReader:
    """This thread's shared reader (readers serve one call at a time)."""
    r = getattr(_READERS, "reader", None)
    if r is None:
        r = _READERS.reader = PinnedReader()
    return r


def _resolve(decoder: Any, dev: torch.device) -> Any:
    """A decoder object taking ``payload=``, or a ``cachegen.decode_into`` decoder name."""
    if decoder is None or decoder in ("auto", "gpu"):
        if dev.type == "cuda":
            d = default_decoder(dev)
            return d if d is not None else (decoder or "auto")
        return decoder or "auto"
    if isinstance(decoder, str):
        return decoder
    if not callable(getattr(decoder, "decode_into", None)):
        raise InputError(f"decoder must be a name or have decode_into(), got {type(decoder).__name__}")
    return decoder


_TAKES_VERIFY: dict = {}


def _verify_kw(fn: Callable, verify: Any) -> dict:
    """``verify=`` for a decoder entry point that takes it (one without checks by default)."""
    key = getattr(fn, "__func__", fn)
    takes = _TAKES_VERIFY.get(key)
    if takes is None:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        takes = "verify" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
        try:
            _TAKES_VERIFY[key] = takes
        except TypeError:  # unhashable callable: ask again next time
            pass
    return {"verify": verify} if takes else {}


def _parse_device_bytes(rd: PinnedReader, t: torch.Tensor, dec: Any, verify: Any,
                        limits: Optional[DecodeLimits]) -> tuple[HostBytes, Any]:
    """Container bytes that are on the GPU already: the host parser needs the header, the
    host check each chunk's metadata (``verify=True``). For a format v2 container that a
    payload decoder takes, only those come back (the payload stays on the device); otherwise
    (format v1, the CPU path, ``verify="full"``: a host CRC of every word) all of it."""
    n = t.numel()
    t0 = time.perf_counter()
    with rd._lock:
        rd._check_open()
        rd._limit(n)
        host = rd._host_buffer(n)
        head = 0
        if n >= _PRE:
            host[:_PRE].copy_(t[:_PRE])
            ext = header_extent(host[:_PRE].numpy())
            if ext is not None and ext <= n:
                head = ext
                host[_PRE:head].copy_(t[_PRE:head])
        if not head:
            host.copy_(t)
    hb = HostBytes(host, rd.pin, ReadStats("device", n, 1, 1))
    c = _open_container(hb.memoryview(), limits)
    if head:
        if isinstance(dec, str) or not _payload_ok(dec, c) or verify == "full":
            host[head:].copy_(t[head:])
        elif verify:
            offs = c.index["offset"].astype(np.int64) + c.payload_start
            for a, m in zip(offs.tolist(), c.index["meta_size"].astype(np.int64).tolist()):
                if m:
                    host[a:a + m].copy_(t[a:a + m], non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()
    hb.stats.wall_s = time.perf_counter() - t0
    return hb, c


class _EarlyParser:
    """An ``on_piece`` hook: a v2 parser reads only the header, ``[0, payload_start)``, so the
    container is parsed as soon as that much is in host memory, on the calling thread, while the
    reader threads read the rest (format v1, or a header that never completes: not parsed)."""

    def __init__(self, limits: Optional[DecodeLimits]) -> None:
        self.limits = limits
        self.head: Optional[int] = -1     # -1: preamble not seen yet; None: not a v2 container
        self.container: Any = None
        self.parse_s = 0.0

    def __call__(self, h: torch.Tensor, a: int, b: int) -> None:
        if self.container is not None or self.head is None:
            return
        if self.head == -1:
            if b < _PRE:
                return
            self.head = header_extent(h[:_PRE].numpy())
            if self.head is None:
                return
        if b >= min(self.head, h.numel()):
            t = time.perf_counter()
            self.container = _open_container(memoryview(h.numpy()).cast("B"), self.limits)
            self.parse_s = time.perf_counter() - t


def stage(source: Union[Source, Any], device: Union[str, torch.device], *, decoder: Any = "auto",
          reader: Optional[PinnedReader] = None, limits: Optional[DecodeLimits] = None,
          timing: bool = False, verify: Any = True) -> Staged:
    """Step 1 of :func:`restore`: the source's bytes in host memory (read / copied into the
    reader's buffer, or used in place), queued to ``device`` when ``decoder`` resolves to a
    payload-taking GPU decoder, and the container parsed on the host. ``verify``: what the
    decoder will check on the host (decides what comes back from device sources)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    dev = torch.device(device)
    if is_container(source):
        return Staged(source, None, None, "container", 0.0, timing, reader, t0, c0)
    rd = reader if reader is not None else default_reader()
    dec = _resolve(decoder, dev)
    dbytes: Optional[DeviceBytes] = None
    if dev.type == "cuda" and not isinstance(dec, str):
        early = _EarlyParser(limits)
        dbytes = rd.load(source, dev, timing=timing, on_piece=early)
        if dbytes.host is None:   # the bytes were on the GPU: header (+ metadata) back to the host
            host, c = _parse_device_bytes(rd, dbytes.tensor, dec, verify, limits)
            return Staged(c, dbytes, host, "device", 0.0, timing, rd, t0, c0)
        host = dbytes.host
        if early.container is not None:
            return Staged(early.container, dbytes, host, host.stats.source, early.parse_s, timing, rd, t0, c0)
        src = host.stats.source
    elif dev.type == "cpu" and not isinstance(source, (str, os.PathLike)) \
            and not (isinstance(source, torch.Tensor) and source.device.type == "cuda"):
        # the CPU decoder parses host bytes in place: no staging copy
        t_ = _host_tensor(source)
        rd._limit(t_.numel())
        host = HostBytes(t_, _is_pinned(t_), ReadStats("host-inplace", t_.numel()))
        src = "host"
    else:
        host = rd.stage(source)
        src = host.stats.source
    t = time.perf_counter()
    c = _open_container(host.memoryview(), limits)
    return Staged(c, dbytes, host, src, time.perf_counter() - t, timing, rd, t0, c0)


def _payload_ok(dec: Any, c: Any) -> bool:
    """Whether a payload-taking decoder decodes this container (else cachegen.decode_into does)."""
    from .dispatch import has_transform
    if has_transform(c) and not getattr(dec, "untransforms", False):
        return False       # model-profile containers: cachegen.decode_into transforms them back
    sup = getattr(dec, "supports", None)
    if callable(sup):
        return bool(sup(c))
    # cachegen.gpu.v2.GpuDecoder: format v2, lossy, no anchor-delta groups
    from .format.container import MODE_LOSSLESS
    return (isinstance(c, _ContainerV2) and c.header.mode != MODE_LOSSLESS
            and c.header.group_size <= 1)


def decode_staged(st: Staged, bufs: Sequence[Sequence[torch.Tensor]], *, decoder: Any = "auto",
                  stream=None, verify: Any = True, limits: Optional[DecodeLimits] = None,
                  defer: bool = False) -> RestoreResult:
    """Step 2 of :func:`restore`: decode a staged container into ``bufs``.

    ``defer=True``: with a GPU decoder that can (``decode_into(check=False)`` + ``raise_for``),
    return once the decode is queued, without waiting for its device-side checks; they are in
    ``result.pending`` and :meth:`RestoreResult.wait` reads them (the buffers must not be used
    for anything visible before that). Other decoders check before returning, as usual."""
    from . import api

    dev = _bufs_device(bufs)
    c = st.container
    res = RestoreResult(tokens=[], nbytes=len(c.data), source=st.source, path="api", parse_ms=st.parse_s * 1e3)
    if st.host is not None:
        res.read_ms, res.read_cpu_ms = st.host.stats.wall_s * 1e3, st.host.stats.pool_cpu_s * 1e3
    dbytes = st.device_bytes
    if dbytes is not None and dbytes.tensor.device != dev:
        raise InputError(f"the staged bytes are on {dbytes.tensor.device}, the buffers on {dev}")
    dec = _resolve(decoder, dev)
    rd = st.reader if st.reader is not None else default_reader()
    name = dec if isinstance(dec, str) else "auto"
    e0 = e1 = s = None
    if dev.type == "cuda":
        s = stream if stream is not None else torch.cuda.current_stream(dev)
        if st.timing:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    copied = False
    t = time.perf_counter()
    try:
        if s is None:
            res.tokens = api.decode_into(c, bufs, verify=bool(verify), limits=limits, decoder=name)
        elif not isinstance(dec, str) and _payload_ok(dec, c):
            res.path = "gpu-payload"
            from .dispatch import check_buffers, output_dtype
            bufs = check_buffers(c, bufs, dtype=output_dtype(c))   # shapes, dtype, capacity: before any kernel writes
            if dbytes is None:  # a parsed container: its bytes go up like any host bytes
                dbytes = rd.load(c.data, dev, timing=st.timing)
            payload = dbytes.padded()
            if payload is None:
                # device bytes a word-reading kernel cannot take in place (odd length, unaligned):
                # one device-to-device copy into the reader's buffer
                dbytes.wait(s)
                payload = rd.device_copy(dbytes.tensor, s)
                copied = True
            pipelined = getattr(dec, "decode_into_pipelined", None)
            lazy = bool(defer) and callable(getattr(dec, "raise_for", None))
            ck = {"check": False} if lazy else {}
            flags = None
            with torch.cuda.stream(s):
                if pipelined is not None:
                    # per-chunk entry point: the decoder waits on the bytes each launch reads
                    if e0 is not None:
                        e0.record(s)
                    flags = pipelined(c, bufs, stream=s, payload=payload, wait=lambda upto: dbytes.wait(s, upto),
                                      **ck, **_verify_kw(pipelined, verify))
                else:
                    dbytes.wait(s)  # decoding starts once every byte is on the device
                    if e0 is not None:
                        e0.record(s)
                    flags = dec.decode_into(c, bufs, stream=s, payload=payload, **ck,
                                            **_verify_kw(dec.decode_into, verify))
            if lazy and flags is not None:
                res.pending = PendingCheck(flags, verify, dec.raise_for)
            res.tokens = c.tokens()
        else:
            # cachegen.decode_into: its GPU decoder uploads the bytes itself (from the pinned buffer)
            with torch.cuda.stream(s):
                if e0 is not None:
                    e0.record(s)
                res.tokens = api.decode_into(c, bufs, verify=bool(verify), limits=limits, decoder=name)
    finally:
        if s is not None:
            if dbytes is not None:
                dbytes.release(s)   # the reader's next copy into its device buffer waits for this
            if copied:
                rd._set_dev_free(dev, s)
    if e1 is not None:
        e1.record(s)
    res.decode_call_ms = (time.perf_counter() - t) * 1e3
    if e1 is not None:
        e1.synchronize()
        res.decode_gpu_ms = e0.elapsed_time(e1)
        if dbytes is not None and res.path == "gpu-payload":
            h = dbytes.h2d_ms()
            if h is not None:
                res.h2d_busy_ms, res.h2d_span_ms = h
    res.wall_ms = (time.perf_counter() - st.t0) * 1e3
    res.host_cpu_ms = (time.thread_time() - st.c0) * 1e3 + res.read_cpu_ms
    return res


def restore(source: Union[Source, Any], bufs: Sequence[Sequence[torch.Tensor]], *, decoder: Any = "auto",
            reader: Optional[PinnedReader] = None, stream=None, verify: bool = True,
            limits: Optional[DecodeLimits] = None, timing: bool = False, defer: bool = False) -> RestoreResult:
    """Decode a container from ``source`` into caller-owned ``bufs`` ([(key, value)] per layer,
    each [B, H, >= T, D], all on one device); returns a :class:`RestoreResult` (``.tokens``:
    tokens written per layer).

    ``source``: a path (read into the reader's reused pinned buffer with parallel ``preadv``),
    bytes-like data in host memory (copied into that buffer, or used in place when pinned), a
    contiguous 1-D uint8 CUDA tensor (the bytes on the GPU already: no H2D), or a parsed
    ``Container``. CUDA buffers with a payload-taking decoder (``decoder="auto"``: the cached
    ``cachegen.gpu.GpuDecoder`` of the device, or any object with ``decode_into(container,
    bufs, *, stream, payload)``): read -> H2D pieces on the reader's copy stream -> decode on
    ``stream`` (default: the current stream), which waits on the copies' events; without one,
    or with a decoder name (``"gpu"``, ``"reference"``, ``"lockstep"``), ``cachegen.decode_into``
    on the host bytes. CPU buffers: the CPU decoder. ``timing=True`` records CUDA events and
    synchronizes at the end so that the GPU times of the result are filled in. ``defer=True``:
    the GPU decoder's device-side checks are not waited for; :meth:`RestoreResult.wait` reads
    them (see :func:`decode_staged`).
    """
    dev = _bufs_device(bufs)
    st = stage(source, dev, decoder=decoder, reader=reader, limits=limits, timing=timing, verify=verify)
    return decode_staged(st, bufs, decoder=decoder, stream=stream, verify=verify, limits=limits, defer=defer)
