"""cachegen.io: reused host staging buffers, parallel reads, H2D in pieces, restore from a path,
bytes or device bytes; StaticKV's restore paths (with a stand-in ORT session on the CPU).

CPU tests run everywhere; the CUDA ones are marked gpu and skip without a GPU.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import cachegen
from cachegen import io as cio
from cachegen.errors import CacheGenError, FormatError, InputError, LimitExceededError
from cachegen.io import _open_container as parse_container   # either format version
from helpers import make_kv

CUDA = cio.cuda_available()
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def case():
    """(kv, container bytes): 3 layers, 700 tokens (last chunk partial), fp16."""
    kv = make_kv(layers=3, heads=2, dim=16, tokens=700, seed=1, torch_out=True)
    return kv, cachegen.encode(kv, "default")


@pytest.fixture(scope="module")
def ref(case):
    return cachegen.decode(case[1])


def _bufs(device="cpu", cap=800, layers=3):
    return [(torch.zeros(1, 2, cap, 16, dtype=torch.float16, device=device),
             torch.zeros(1, 2, cap, 16, dtype=torch.float16, device=device)) for _ in range(layers)]


def _same(bufs, ref):
    return all(torch.equal(b[:, :, :r.shape[2]].cpu().view(torch.int16), r.view(torch.int16))
               for pair, rpair in zip(bufs, ref) for b, r in zip(pair, rpair))


def _write(tmp_path, data, name="c.cgk"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ----------------------------------------------------------------------------- reading

@pytest.mark.parametrize("threads", [1, 2, 4, 8])
@pytest.mark.parametrize("size", [1, 4095, 4096, 4097, 3 * 4096 + 17, 100_000])
def test_read_exact_bytes(tmp_path, threads, size):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    p = _write(tmp_path, data)
    with cio.PinnedReader(threads=threads, piece_bytes=4096) as r:
        h = r.read(p)
        assert h.nbytes == size and bytes(h.memoryview()) == data
        assert h.stats.source == "file" and h.stats.pieces == -(-size // 4096)
        assert h.stats.threads == (1 if threads == 1 or size <= 4096 else min(threads, h.stats.pieces))


def test_adaptive_pieces_split_small_files_across_threads(tmp_path):
    data = os.urandom(3_000_000)
    p = _write(tmp_path, data)
    r = cio.PinnedReader(threads=8, piece_bytes=4 << 20)
    h = r.read(p)
    assert bytes(h.memoryview()) == data
    assert h.stats.pieces == 8 and h.stats.threads == 8      # one piece per thread
    small = r.read(_write(tmp_path, data[:1_000_000], "small"))
    assert small.stats.pieces == -(-1_000_000 // (256 << 10))     # 256 KiB floor
    fixed = cio.PinnedReader(threads=8, piece_bytes=4 << 20, adaptive=False).read(p)
    assert fixed.stats.pieces == 1 and bytes(fixed.memoryview()) == data
    assert cio.PinnedReader().threads == max(1, min(8, os.cpu_count() or 1))


def test_buffer_reused_and_grown(tmp_path):
    a, b, c = (np.full(n, i, np.uint8).tobytes() for i, n in ((1, 300_000), (2, 100_000), (3, 3_000_000)))
    r = cio.PinnedReader(threads=2, piece_bytes=65536)
    h1 = r.read(_write(tmp_path, a, "a"))
    ptr = h1.tensor.data_ptr()
    h2 = r.read(_write(tmp_path, b, "b"))
    assert h2.tensor.data_ptr() == ptr and bytes(h2.memoryview()) == b   # same buffer, no allocation
    h3 = r.read(_write(tmp_path, c, "c"))
    assert bytes(h3.memoryview()) == c and r._host.numel() >= len(c)
    r.close()
    with pytest.raises(InputError, match="closed"):
        r.read(tmp_path / "a")


def test_read_bad_paths(tmp_path):
    r = cio.PinnedReader(threads=2)
    with pytest.raises(InputError):
        r.read(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):     # the same error, for callers that expect an OSError
        r.read(tmp_path / "missing")
    with pytest.raises(InputError, match="regular"):
        r.read(tmp_path)
    with pytest.raises(FormatError, match="empty"):
        r.read(_write(tmp_path, b""))
    with pytest.raises(InputError):
        r.read(123456789)  # an fd number is not a path we accept... nor silently read
    small = cio.PinnedReader(max_bytes=1000)
    with pytest.raises(LimitExceededError):
        small.read(_write(tmp_path, b"x" * 1001, "big"))
    assert small._host is None          # refused before allocating
    with pytest.raises(InputError):
        cio.PinnedReader(threads=0)
    with pytest.raises(InputError):
        cio.PinnedReader(piece_bytes=10)


def test_read_sparse_file_over_limit_allocates_nothing(tmp_path):
    p = tmp_path / "sparse"
    with open(p, "wb") as f:
        f.truncate(1 << 40)             # 1 TiB of holes
    r = cio.PinnedReader()
    with pytest.raises(LimitExceededError):
        r.read(p)
    assert r._host is None


@pytest.mark.parametrize("threads", [1, 4])
def test_file_shrinking_while_read_is_formaterror(tmp_path, monkeypatch, threads):
    data = os.urandom(64 * 4096)
    p = _write(tmp_path, data)
    orig = cio._pread_into
    calls = [0]
    lock = threading.Lock()

    def shrinking(fd, mv, pos):
        with lock:
            calls[0] += 1
            if calls[0] == 2:
                os.truncate(p, 5000)    # another process truncates the file mid-read
        return orig(fd, mv, pos)
    monkeypatch.setattr(cio, "_pread_into", shrinking)
    r = cio.PinnedReader(threads=threads, piece_bytes=4096)
    with pytest.raises(FormatError, match="shrank|changed"):
        r.read(p)
    # the reader still works afterwards
    monkeypatch.setattr(cio, "_pread_into", orig)
    p.write_bytes(data)
    assert bytes(r.read(p).memoryview()) == data


def test_file_rewritten_while_read_is_formaterror(tmp_path, monkeypatch):
    data = os.urandom(16 * 4096)
    p = _write(tmp_path, data)
    orig = cio._pread_into
    done = [False]

    def rewriting(fd, mv, pos):
        n = orig(fd, mv, pos)
        if not done[0]:
            done[0] = True
            with open(p, "r+b") as f:   # same size, new contents (in place, not an atomic replace)
                f.write(b"\0" * 4096)
            st = os.stat(p)
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return n
    monkeypatch.setattr(cio, "_pread_into", rewriting)
    with pytest.raises(FormatError, match="changed"):
        cio.PinnedReader(threads=1, piece_bytes=4096).read(p)


def test_truncated_or_corrupt_container_files_raise_cachegenerror(tmp_path, case):
    _, data = case
    r = cio.PinnedReader(threads=2, piece_bytes=4096)
    rng = np.random.default_rng(0)
    cuts = [1, 10, 40, len(data) // 3, len(data) - 1]
    for n in cuts:
        with pytest.raises(CacheGenError):
            cio.restore(_write(tmp_path, data[:n], f"cut{n}"), _bufs(), reader=r)
    for i in range(8):
        b = bytearray(data)
        for pos in rng.integers(0, len(b), 3):
            b[pos] ^= 1 << int(rng.integers(0, 8))
        try:
            cio.restore(_write(tmp_path, bytes(b), f"flip{i}"), _bufs(), reader=r)
        except CacheGenError:
            pass   # a flip in a quantizer value may decode; anything else must be ours


# ----------------------------------------------------------------------------- staging

def test_stage_host_sources(case):
    _, data = case
    r = cio.PinnedReader(threads=4, piece_bytes=4096)
    arr = np.frombuffer(data, np.uint8)
    for src in (data, bytearray(data), memoryview(data), arr, torch.from_numpy(arr.copy()),
                arr.reshape(-1, 2) if arr.size % 2 == 0 else arr):
        h = r.stage(src)
        assert bytes(h.memoryview()) == data
        assert h.stats.source == "host"
    for bad in (12, object(), np.zeros((4, 4), np.uint8)[:, ::2], torch.zeros(8, dtype=torch.int32),
                torch.zeros((2, 4), dtype=torch.uint8)):
        with pytest.raises(InputError):
            r.stage(bad)
    with pytest.raises(FormatError):
        r.stage(b"")


@pytest.mark.skipif(CUDA, reason="checks the CPU-only behaviour")
def test_cuda_parts_raise_inputerror_without_cuda(case):
    r = cio.PinnedReader()
    assert r.pin is False
    with pytest.raises(InputError, match="CUDA"):
        r.load(case[1], "cuda")
    with pytest.raises(InputError, match="CUDA"):
        cio.PinnedReader(pin=True)
    with pytest.raises(InputError):
        r.load(case[1], "cpu")


def _resident_pages(path) -> int | None:
    """Pages of `path` in the page cache (mincore on a fresh read-only mapping); None where
    that cannot be asked."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    try:
        if libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            return None
    finally:
        libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    return sum(v & 1 for v in vec)


def test_drop_page_cache(tmp_path):
    p = _write(tmp_path, os.urandom(64 * 4096))
    cio.PinnedReader().read(p)
    before = _resident_pages(p)
    if before is None or before == 0:
        pytest.skip("page residency cannot be observed here (no mincore, or no page cache: tmpfs/overlay)")
    assert cio.drop_page_cache(p) is True
    after = _resident_pages(p)
    if after == before:
        pytest.skip("this file system ignores POSIX_FADV_DONTNEED")
    assert after < before / 4


def test_early_parser_parses_once_the_header_is_in(case):
    """The hook that parses a v2 header while the rest is still being read."""
    _, data = case
    c = parse_container(data)
    head = c.payload_start
    buf = torch.zeros(len(data), dtype=torch.uint8)     # filled piece by piece below
    src = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    ep = cio._EarlyParser(None)
    seen = []
    for a in range(0, len(data), 4096):
        b = min(a + 4096, len(data))
        buf[a:b] = src[a:b]
        ep(buf, a, b)
        seen.append(ep.container is not None)
        if b < head:
            assert ep.container is None
    assert ep.container is not None and seen.index(True) == (head - 1) // 4096   # the piece completing the header
    assert ep.container.tokens() == c.tokens() and ep.parse_s > 0
    v1 = bytearray(data)
    v1[4] = 1                                            # not a v2 preamble: never parsed early
    ep1 = cio._EarlyParser(None)
    ep1(torch.frombuffer(v1, dtype=torch.uint8), 0, len(v1))
    assert ep1.container is None and ep1.head is None
    bad = bytearray(data)
    bad[20] ^= 0xFF                                      # header checksum: raised at once
    with pytest.raises(CacheGenError):
        cio._EarlyParser(None)(torch.frombuffer(bad, dtype=torch.uint8), 0, len(bad))


# ----------------------------------------------------------------------------- restore (CPU)

def test_restore_cpu_all_sources(tmp_path, case, ref):
    _, data = case
    p = _write(tmp_path, data)
    r = cio.PinnedReader(threads=4, piece_bytes=4096)
    c = parse_container(data)
    for src, kind in ((p, "file"), (str(p), "file"), (data, "host"), (bytearray(data), "host"),
                      (memoryview(data), "host"), (torch.frombuffer(bytearray(data), dtype=torch.uint8), "host"),
                      (c, "container")):
        bufs = _bufs()
        res = cio.restore(src, bufs, reader=r)
        assert res.tokens == [700] * 3 and res.source == kind and res.path == "api"
        assert res.nbytes == len(data) and res.wall_ms > 0 and res.host_cpu_ms >= 0
        assert _same(bufs, ref)
        assert all(not b[:, :, 700:].any() for pair in bufs for b in pair)   # nothing past the tokens


def test_restore_cpu_decoder_names_and_bad_arguments(tmp_path, case, ref):
    _, data = case
    for name in ("reference", "lockstep"):
        bufs = _bufs()
        cio.restore(data, bufs, decoder=name)
        assert _same(bufs, ref)
    with pytest.raises(InputError):
        cio.restore(data, [(torch.zeros(1), torch.zeros(1, device="meta"))])
    with pytest.raises(InputError):
        cio.restore(data, 5)
    with pytest.raises(InputError):
        cio.restore(data, _bufs(), decoder=object())
    with pytest.raises(InputError):
        cio.restore(data, _bufs(cap=600))          # too small: the API's shape check
    with pytest.raises(InputError):
        cio.restore(data, _bufs(layers=2))


def test_reader_serves_threads_one_at_a_time(tmp_path):
    """Calls from several threads are serialized (the buffer grows under one of them while the
    others wait): every call returns a whole file, none fails."""
    files = [_write(tmp_path, bytes([i]) * (50_000 * (i + 1)), f"f{i}") for i in range(6)]
    r = cio.PinnedReader(threads=2, piece_bytes=4096)
    errors = []

    def work(i):
        try:
            for _ in range(10):
                n = r.read(files[i]).nbytes
                if n != 50_000 * (i + 1):
                    errors.append((i, n))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((i, repr(e)))
    ts = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors


# ----------------------------------------------------------------------------- StaticKV (stand-in session)

class _FakeBinding:
    def bind_input(self, *a):
        pass

    def bind_output(self, *a):
        pass


def _fake_runner(layers=3, heads=2, dim=16, windows=None, dtype=np.float16):
    names = [(f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(layers)]
    pres = [(f"present.{i}.key", f"present.{i}.value") for i in range(layers)]
    return SimpleNamespace(device_id=0, provider="cpu", dtype=np.dtype(dtype), num_kv_heads=heads, head_dim=dim,
                           num_layers=layers, windows=windows or [None] * layers,
                           session=SimpleNamespace(io_binding=lambda: _FakeBinding()),
                           layout=SimpleNamespace(past_names=names, present_names=pres))


def test_statickv_restore_paths_cpu(tmp_path, case, ref):
    from cachegen.ort.cuda import StaticKV
    _, data = case
    p = _write(tmp_path, data)
    for src in (p, str(p), data, memoryview(data), parse_container(data)):
        s = StaticKV(_fake_runner(), 720)
        assert s.restore(src) == 700
        assert _same(s.kv, ref)
        if not cio.is_container(src):
            assert s.last_restore is not None and s.last_restore.tokens == [700] * 3
    s = StaticKV(_fake_runner(layers=2), 720)
    with pytest.raises(InputError, match="layers"):
        s.restore(p)
    with pytest.raises(InputError, match="capacity"):
        StaticKV(_fake_runner(), 600).restore(p)
    with pytest.raises(InputError):
        StaticKV(_fake_runner(), 720).restore(tmp_path / "missing.cgk")


def test_statickv_dtype_mismatch_casts(tmp_path, case, ref):
    from cachegen.ort.cuda import StaticKV
    _, data = case
    s = StaticKV(_fake_runner(dtype=np.float32), 720)
    assert s.restore(_write(tmp_path, data)) == 700
    for (k, v), (rk, rv) in zip(s.kv, ref):
        assert torch.equal(k[:, :, :700], rk.float()) and torch.equal(v[:, :, :700], rv.float())


# ----------------------------------------------------------------------------- CUDA

@gpu
@needs_cuda
@pytest.mark.parametrize("threads", [1, 4])
def test_load_file_to_device_in_pieces(tmp_path, threads):
    data = os.urandom(10 * 65536 + 123)
    p = _write(tmp_path, data)
    r = cio.PinnedReader(threads=threads, piece_bytes=65536, copy_bytes=65536)
    assert r.pin
    d = r.load(p, "cuda", timing=True)
    assert len(d.events) == 11 and d.ends[-1] == len(data) and d.ends == sorted(d.ends)
    assert d.host.pinned and d.host.tensor.is_pinned()
    s = torch.cuda.Stream()
    d.wait(s, upto=65536)  # only the first piece
    with torch.cuda.stream(s):
        first = d.tensor[:65536].clone()
    s.synchronize()
    assert first.cpu().numpy().tobytes() == data[:65536]
    d.synchronize()
    assert d.tensor.cpu().numpy().tobytes() == data
    busy, span = d.h2d_ms()
    assert 0 < busy <= span + 1e-3
    # the next load reuses both buffers and waits for this one's consumer
    d.release(torch.cuda.current_stream())
    ptr = d.tensor.data_ptr()
    d2 = r.load(_write(tmp_path, data[::-1], "rev"), "cuda")
    d2.synchronize()
    assert d2.tensor.data_ptr() == ptr and d2.tensor.cpu().numpy().tobytes() == data[::-1]


@gpu
@needs_cuda
def test_load_file_coalesces_copies(tmp_path):
    data = os.urandom(20 << 20)
    r = cio.PinnedReader(threads=4, piece_bytes=8 << 20)     # 4 pieces of 5 MiB, copies per >= 8 MiB
    seen = []
    d = r.load(_write(tmp_path, data), "cuda", on_piece=lambda h, a, b: seen.append((a, b)))
    assert d.ends == [10 << 20, 20 << 20] and len(seen) == 4 and seen[-1][1] == len(data)
    d.synchronize()
    assert d.tensor.cpu().numpy().tobytes() == data


@gpu
@needs_cuda
def test_load_sources_to_device(case):
    _, data = case
    r = cio.PinnedReader(threads=2, piece_bytes=8192)
    for src in (data, bytearray(data), np.frombuffer(data, np.uint8)):
        d = r.load(src, "cuda")
        d.synchronize()
        assert d.host.stats.source == "host" and d.tensor.cpu().numpy().tobytes() == data
    pinned = torch.frombuffer(bytearray(data), dtype=torch.uint8).pin_memory()
    d = r.load(pinned, "cuda")
    d.synchronize()
    assert d.host.stats.source == "pinned" and d.host.tensor.data_ptr() == pinned.data_ptr()  # used in place
    assert d.tensor.cpu().numpy().tobytes() == data
    on_dev = torch.frombuffer(bytearray(data), dtype=torch.uint8).cuda()
    d = r.load(on_dev, "cuda")
    assert d.tensor is on_dev and not d.events      # no copy
    with pytest.raises(InputError):
        r.load(on_dev.view(torch.int8), "cuda")
    with pytest.raises(InputError):
        r.load(on_dev[::2], "cuda")


class _PayloadDecoder:
    """A payload-taking decoder for the tests: checks it got the container's bytes on the
    device (after the events it was told to wait on) as GpuDecoder wants them (length a
    multiple of 4, 16-byte aligned), then decodes with the API."""

    def __init__(self, expect, pipelined=False):
        self.expect = expect          # the container's bytes
        self.calls = []
        self.host_seen = []           # the host copy the decoder was given (bytes of c.data)
        if pipelined:
            self.decode_into_pipelined = self._pipelined

    def supports(self, c):
        return True

    @staticmethod
    def _check(payload, n):
        assert payload.is_cuda and payload.dtype == torch.uint8 and payload.dim() == 1
        assert payload.numel() == n + (-n % 4) and payload.data_ptr() % 16 == 0

    def decode_into(self, c, bufs, *, stream=None, payload=None, verify=True):
        stream.synchronize()
        n = len(c.data)
        self._check(payload, n)
        assert payload[:n].cpu().numpy().tobytes() == self.expect
        assert bytes(c.data[:c.payload_start]) == self.expect[:c.payload_start]
        if verify:   # what GpuDecoder checks on the host: each chunk's metadata CRC
            for k in range(c.n_chunks):
                c.verify_chunk(k, words=verify == "full")
        self.calls.append(("decode_into", verify))
        self.host_seen.append(bytes(c.data))
        cachegen.decode_into(c.data if verify == "full" else self.expect, bufs)

    def _pipelined(self, c, bufs, *, stream, payload, wait):
        self._check(payload, len(c.data))
        for end in (c.payload_start, len(c.data) // 2, len(c.data)):
            wait(end)
            stream.synchronize()
            assert payload[:end].cpu().numpy().tobytes() == self.expect[:end]
        self.calls.append(("pipelined", None))
        cachegen.decode_into(self.expect, bufs)


@gpu
@needs_cuda
@pytest.mark.parametrize("pipelined", [False, True])
def test_restore_with_payload_decoder(tmp_path, case, ref, pipelined):
    _, data = case
    p = _write(tmp_path, data)
    dec = _PayloadDecoder(data, pipelined)
    r = cio.PinnedReader(threads=4, piece_bytes=4096)
    on_dev = torch.frombuffer(bytearray(data), dtype=torch.uint8).cuda()
    # the same bytes at an odd offset of a bigger device tensor: copied once on the device
    big = torch.zeros(len(data) + 9, dtype=torch.uint8, device="cuda")
    big[1:1 + len(data)] = on_dev
    odd = big[1:1 + len(data)]
    pinned = torch.frombuffer(bytearray(data), dtype=torch.uint8).pin_memory()
    srcs = ((p, "file"), (data, "host"), (pinned, "pinned"), (on_dev, "device"), (odd, "device"))
    for src, kind in srcs:
        bufs = _bufs("cuda")
        res = cio.restore(src, bufs, decoder=dec, reader=r, timing=True, verify=False)
        assert res.path == "gpu-payload" and res.source == kind and res.tokens == [700] * 3
        assert res.decode_gpu_ms is not None and (kind == "device") == (res.h2d_busy_ms is None)
        torch.cuda.synchronize()
        assert _same(bufs, ref)
    assert dec.calls == [("pipelined", None) if pipelined else ("decode_into", False)] * len(srcs)


@gpu
@needs_cuda
def test_restore_default_decoder_all_sources(tmp_path, case, ref):
    _, data = case
    p = _write(tmp_path, data)
    on_dev = torch.frombuffer(bytearray(data), dtype=torch.uint8).cuda()
    pinned = torch.frombuffer(bytearray(data), dtype=torch.uint8).pin_memory()
    for src in (p, data, pinned, on_dev, parse_container(data)):
        bufs = _bufs("cuda")
        res = cio.restore(src, bufs, timing=True)
        torch.cuda.synchronize()
        assert res.tokens == [700] * 3 and _same(bufs, ref)


@gpu
@needs_cuda
def test_restore_back_to_back_without_sync(tmp_path):
    """Two restores queued back to back from one reader: the second's copies must not overwrite
    the bytes the first decode still reads."""
    kvs = [make_kv(layers=3, heads=2, dim=16, tokens=700, seed=s, torch_out=True) for s in (5, 6)]
    datas = [cachegen.encode(kv, "default") for kv in kvs]
    refs = [cachegen.decode(d) for d in datas]
    paths = [_write(tmp_path, d, f"{i}.cgk") for i, d in enumerate(datas)]
    r = cio.PinnedReader(threads=2, piece_bytes=4096)
    out = [_bufs("cuda"), _bufs("cuda")]
    for _ in range(3):
        for p, b in zip(paths, out):
            cio.restore(p, b, reader=r)
        torch.cuda.synchronize()
        assert _same(out[0], refs[0]) and _same(out[1], refs[1])


@gpu
@needs_cuda
def test_entry_read_into_pinned_buffer_is_restored_in_place(tmp_path, case, ref):
    """The store hook: a file holding a container after its own header (a store entry) is read
    into the reader's pinned buffer; the container's slice of it is used in place (no copy)."""
    _, data = case
    p = _write(tmp_path, b"ENTRY-HEADER-17b" + data)
    r = cio.PinnedReader(threads=2, piece_bytes=8192)
    h = r.read(p)
    inner = h.memoryview()[16:]
    bufs = _bufs("cuda")
    res = cio.restore(inner, bufs, reader=r)
    torch.cuda.synchronize()
    assert res.source == "pinned" and _same(bufs, ref)


@gpu
@needs_cuda
@pytest.mark.parametrize("verify", [False, True, "full"])
def test_device_bytes_only_header_and_metadata_come_back(case, ref, verify):
    """Bytes on the GPU: the host gets the header (and, for verify=True, each chunk's metadata),
    not the payload; verify="full" (a host CRC of every word) brings everything back."""
    _, data = case
    r = cio.PinnedReader(threads=2, piece_bytes=8192)
    r.stage(b"\xaa" * len(data))                    # mark the reused host buffer
    dec = _PayloadDecoder(data)
    on_dev = torch.frombuffer(bytearray(data), dtype=torch.uint8).cuda()
    bufs = _bufs("cuda")
    res = cio.restore(on_dev, bufs, decoder=dec, reader=r, verify=verify)
    torch.cuda.synchronize()
    assert res.source == "device" and _same(bufs, ref)
    seen = dec.host_seen[-1]
    c = parse_container(data)
    head = c.payload_start
    assert seen[:head] == data[:head]
    if verify == "full":
        assert seen == data
        return
    meta = np.zeros(len(data), bool)
    for k in range(c.n_chunks):
        a = head + int(c.index["offset"][k])
        meta[a:a + int(c.index["meta_size"][k])] = True
    body = np.frombuffer(seen, np.uint8)[head:]
    want = np.frombuffer(data, np.uint8)[head:]
    m = meta[head:]
    assert np.array_equal(body[m], want[m]) == bool(verify)
    assert (body[~m] == 0xAA).all()                  # the stream words never left the device


@gpu
@needs_cuda
def test_payload_path_checks_buffers_first(case):
    _, data = case
    dec = _PayloadDecoder(data)
    for bad in (_bufs("cuda", cap=600), _bufs("cuda", layers=2),
                [(k.float(), v.float()) for k, v in _bufs("cuda")]):
        with pytest.raises(InputError):
            cio.restore(data, bad, decoder=dec)
    assert dec.calls == []


@pytest.mark.slow
def test_statickv_real_model_cpu_restore_from_path_continues_like_load(tmp_path):
    """A real ORT session (SmolLM2, CPU fp32): restore from a file through cachegen.io, then
    greedy, equals loading the CPU-decoded cache."""
    from conftest_models import runner, text_ids
    from cachegen.ort.cuda import StaticKV
    r = runner("smollm2")
    ids = list(text_ids("smollm2"))[:301]
    _, kv = r.prefill(ids[:300])
    kv = [(torch.as_tensor(np.asarray(k)), torch.as_tensor(np.asarray(v))) for k, v in kv]
    data = cachegen.encode(kv, "default")
    p = _write(tmp_path, data)
    a = StaticKV(r, 340)
    assert a.restore(p) == 300 and a.last_restore.source == "file"
    b = StaticKV(r, 340)
    b.load(cachegen.decode(data))
    assert a.greedy(ids[300:301], 8) == b.greedy(ids[300:301], 8)


@gpu
@needs_cuda
def test_restore_deferred_checks(tmp_path, case, ref):
    """defer=True: the restore returns once queued; the device-side verdict comes from wait()."""
    _, data = case
    bufs = _bufs("cuda")
    res = cio.restore(data, bufs, defer=True)
    assert res.pending is not None
    res.wait()
    assert res.pending is None and _same(bufs, ref)
    # a flipped byte in the last chunk's stream words: the host checks pass, the device's fail
    bad = bytearray(data)
    bad[-3] ^= 0x5A
    res = cio.restore(bytes(bad), _bufs("cuda"), defer=True)
    with pytest.raises(cachegen.CacheGenError):
        res.wait()
    with pytest.raises(cachegen.CacheGenError):   # the same file without defer raises at once
        cio.restore(bytes(bad), _bufs("cuda"))
