"""GPU decoder (cachegen.gpu): bit-identical to the CPU decoders, corrupt input -> CacheGenError.

Every test needs a CUDA device and is skipped without one (run them on the H100 machine).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cachegen
from cachegen.format.container import parse_container, parse_lossy_chunk

from helpers import make_kv

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    given = None

VECTORS = Path(__file__).resolve().parent.parent / "codec_spec" / "vectors"


def _manifest():
    return json.loads((VECTORS / "MANIFEST.json").read_text())["vectors"]


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy()
    return t.view(torch.int32).numpy()


def _same(a, b) -> None:
    assert len(a) == len(b)
    for i, (pa, pb) in enumerate(zip(a, b)):
        for kv, x, y in zip("kv", pa, pb):
            assert x.dtype == y.dtype and tuple(x.shape) == tuple(y.shape), (i, kv, x.shape, y.shape)
            assert np.array_equal(_bits(x), _bits(y)), f"layer {i} {kv}: decoded bits differ"


def _encode_v1(kv, cfg):
    """This module tests the v1 GPU path (parse_container is v1's parser); v2 has test_gpu_v2."""
    return cachegen.encode(kv, cfg, format_version=1)


def _cfg(preset: str, **kw):
    return dataclasses.replace(cachegen.get_config(preset), **kw)


# ------------------------------------------------------------------------------ golden vectors

@pytest.mark.parametrize("entry", _manifest(), ids=lambda e: e["name"])
def test_vectors_bit_exact_on_gpu(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    partial = entry["decode"]["partial"]
    got = cachegen.decode(data, device="cuda", partial=partial)
    assert all(t.is_cuda for p in got for t in p)
    with np.load(VECTORS / entry["expected"]) as exp:
        for i, pair in enumerate(got):
            for name, t in zip(("key", "value"), pair):
                e = exp[f"layer{i}.{name}"]
                g = _bits(t)
                assert g.shape == e.shape and g.tobytes() == e.tobytes(), f"{entry['name']} layer{i}.{name}"


@pytest.mark.parametrize("entry", _manifest(), ids=lambda e: e["name"])
def test_vectors_decode_into_larger_buffers(entry):
    data = (VECTORS / entry["file"]).read_bytes()
    partial = entry["decode"]["partial"]
    ref = cachegen.decode(data, partial=partial)
    bufs = [tuple(torch.full((k.shape[0], k.shape[1], k.shape[2] + 37, k.shape[3]), float("nan"),
                             dtype=k.dtype, device="cuda") for k in pair) for pair in ref]
    tokens = cachegen.decode_into(data, bufs, partial=partial)
    assert tokens == [p[0].shape[2] for p in ref]
    _same(ref, [tuple(b[:, :, :t] for b in pair) for pair, t in zip(bufs, tokens)])
    for pair, t in zip(bufs, tokens):
        for b in pair:
            assert torch.isnan(b[:, :, t:].float()).all(), "decode_into wrote past the layer's tokens"


# ---------------------------------------------------------------------------- random configs

PRESETS = ["default", "cachegen-paper", "tiny", "high", "small"]


def _roundtrip(layers, batch, heads, tokens, dim, dtype, preset, chunk, cps, seed, v_dim=None, lengths=None):
    kv = make_kv(layers=layers, batch=batch, heads=heads, tokens=tokens, dim=dim, dtype=dtype, seed=seed,
                 torch_out=True, v_dim=v_dim, lengths=lengths)
    data = _encode_v1(kv, _cfg(preset, chunk_tokens=chunk, channels_per_stream=cps))
    ref = cachegen.decode(data)
    got = cachegen.decode(data, device="cuda")
    _same(ref, got)
    return data, ref


if given is not None:
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(layers=st.integers(1, 3), batch=st.integers(1, 2), heads=st.integers(1, 3),
           tokens=st.integers(1, 70), dim=st.integers(1, 20), dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
           preset=st.sampled_from(PRESETS), chunk=st.sampled_from([1, 7, 16, 64]), cps=st.integers(1, 12),
           seed=st.integers(0, 2**16))
    def test_random_configs_match_cpu(layers, batch, heads, tokens, dim, dtype, preset, chunk, cps, seed):
        _roundtrip(layers, batch, heads, tokens, dim, dtype, preset, chunk, cps, seed)


def test_mixed_shapes_and_lengths():
    # different V head_dim, per-layer lengths (sliding-window style), anchor-delta groups
    for preset in ("default", "cachegen-paper"):
        _roundtrip(4, 2, 2, 300, 16, "float16", preset, 64, 8, 1, v_dim=24, lengths=[300, 40, 300, 129])


def test_larger_cache_many_chunks():
    _roundtrip(6, 1, 3, 1100, 64, "float16", "default", 256, 8, 2)
    _roundtrip(3, 1, 1, 700, 256, "bfloat16", "cachegen-paper", 256, 8, 3)


def test_prefix_partial_container():
    kv = make_kv(layers=3, tokens=200, dim=16, torch_out=True, seed=5)
    data = _encode_v1(kv, _cfg("default", chunk_tokens=64))
    c = parse_container(data)
    for k in (1, 2, 3):
        end = c.payload_start + c.chunks[k - 1].offset + c.chunks[k - 1].size
        cut = data[:end + (5 if k < c.n_chunks else 0)]
        ref = cachegen.decode(cut, partial=True)
        got = cachegen.decode(cut, device="cuda", partial=True)
        assert got[0][0].shape[2] == min(200, 64 * k)
        _same(ref, got)


def test_decode_into_static_cache_and_prefix():
    kv = make_kv(layers=2, tokens=150, dim=8, torch_out=True, seed=6)
    data = _encode_v1(kv, _cfg("default", chunk_tokens=64))
    bufs = [(torch.zeros(1, 2, 512, 8, dtype=torch.float16, device="cuda"),
             torch.zeros(1, 2, 512, 8, dtype=torch.float16, device="cuda")) for _ in range(2)]
    c = parse_container(data)
    cut = data[:c.payload_start + c.chunks[1].offset + c.chunks[1].size]
    assert cachegen.decode_into(cut, bufs, partial=True) == [128, 128]
    ref = cachegen.decode(cut, partial=True)
    _same(ref, [tuple(b[:, :, :128] for b in p) for p in bufs])


# ----------------------------------------------------------------------------- corrupt inputs

def _stream_region(data: bytes):
    """(start, end) byte ranges of the stream words of each chunk."""
    c = parse_container(data)
    out = []
    for k in range(c.n_chunks):
        ch = parse_lossy_chunk(c, k)
        e = c.chunks[k]
        end = c.payload_start + e.offset + e.size
        out.append((end - 4 * ch.words.size, end))
    return out


def _cpu_outcome(data):
    try:
        return cachegen.decode(data, verify=False, decoder="lockstep")
    except cachegen.CacheGenError:
        return None


def test_bit_flips_in_streams_behave_like_cpu():
    rng = np.random.default_rng(7)
    for preset in ("default", "cachegen-paper"):
        kv = make_kv(layers=2, tokens=100, dim=16, torch_out=True, seed=8)
        data = _encode_v1(kv, _cfg(preset, chunk_tokens=32))
        regions = _stream_region(data)
        raised = 0
        for trial in range(40):
            a, b = regions[trial % len(regions)]
            buf = bytearray(data)
            for _ in range(int(rng.integers(1, 4))):
                pos = int(rng.integers(a, b))
                buf[pos] ^= 1 << int(rng.integers(0, 8))
            bad = bytes(buf)
            ref = _cpu_outcome(bad)
            if ref is None:
                with pytest.raises(cachegen.CacheGenError):
                    cachegen.decode(bad, device="cuda", verify=False)
                raised += 1
            else:
                _same(ref, cachegen.decode(bad, device="cuda", verify=False))
            # with the CRC on, the flip is a ChecksumError before any kernel runs
            with pytest.raises(cachegen.ChecksumError):
                cachegen.decode(bad, device="cuda")
        assert raised >= 30, raised
    torch.cuda.synchronize()  # the context survived


def _rewrite_lengths(data: bytes, k: int, fn) -> bytes:
    """Change chunk k's stream directory (total kept, so the parser accepts it)."""
    c = parse_container(data)
    ch = parse_lossy_chunk(c, k)
    e = c.chunks[k]
    end = c.payload_start + e.offset + e.size
    dir_start = end - 4 * ch.words.size - 4 * ch.stream_lengths.size
    lengths = fn(ch.stream_lengths.astype(np.int64).copy())
    assert lengths.sum() == ch.stream_lengths.sum()
    buf = bytearray(data)
    buf[dir_start:dir_start + 4 * lengths.size] = lengths.astype("<u4").tobytes()
    return bytes(buf)


def test_shifted_stream_boundaries_raise():
    kv = make_kv(layers=2, tokens=80, dim=16, torch_out=True, seed=9)
    data = _encode_v1(kv, _cfg("default", chunk_tokens=32))

    def shift(L):
        L[0] -= 1
        L[1] += 1
        return L

    def empty_first(L):
        L[1] += L[0]
        L[0] = 0
        return L

    def all_in_last(L):
        L[-1] += L[:-1].sum()
        L[:-1] = 0
        return L

    for fn in (shift, empty_first, all_in_last):
        bad = _rewrite_lengths(data, 1, fn)
        assert _cpu_outcome(bad) is None
        with pytest.raises(cachegen.StreamError):
            cachegen.decode(bad, device="cuda", verify=False)
    torch.cuda.synchronize()


def test_truncated_and_garbage_streams_raise():
    kv = make_kv(layers=2, tokens=64, dim=16, torch_out=True, seed=10)
    data = _encode_v1(kv, _cfg("default", chunk_tokens=32))
    with pytest.raises(cachegen.FormatError):
        cachegen.decode(data[:-3], device="cuda")
    (a, b), = _stream_region(data)[-1:]
    rng = np.random.default_rng(11)
    for fill in (b"\x00", b"\xff", None):
        buf = bytearray(data)
        buf[a:b] = (fill * (b - a)) if fill else rng.integers(0, 256, b - a, dtype=np.uint8).tobytes()
        with pytest.raises(cachegen.CacheGenError):
            cachegen.decode(bytes(buf), device="cuda", verify=False)
    torch.cuda.synchronize()


def test_out_of_range_delta_index_raises():
    # Anchor-delta: a delta symbol that joins to an index outside [0, L-1] must raise, like the CPU.
    kv = make_kv(layers=1, tokens=40, dim=8, torch_out=True, seed=12)
    data = _encode_v1(kv, _cfg("cachegen-paper", chunk_tokens=40))
    rng = np.random.default_rng(13)
    regions = _stream_region(data)
    seen = 0
    for trial in range(200):
        a, b = regions[0]
        buf = bytearray(data)
        pos = int(rng.integers(a, b))
        buf[pos] ^= 1 << int(rng.integers(0, 8))
        bad = bytes(buf)
        try:
            cachegen.decode(bad, verify=False, decoder="lockstep")
            cpu_err = None
        except cachegen.CacheGenError as e:
            cpu_err = e
        if cpu_err is not None and "outside" in str(cpu_err):
            seen += 1
            with pytest.raises(cachegen.StreamError):
                cachegen.decode(bad, device="cuda", verify=False)
    torch.cuda.synchronize()
