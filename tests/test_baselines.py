"""Unit tests of the rate-distortion baselines (benches/baselines.py) on random data."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location(
    "rd_baselines", Path(__file__).resolve().parents[1] / "benches" / "baselines.py")
bl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bl)


def _kv(layers=3, B=1, H=2, T=300, D=64, seed=0, trimmed=False):
    rng = np.random.default_rng(seed)
    kv = []
    for i in range(layers):
        t = 100 if (trimmed and i == 1) else T
        k = rng.standard_normal((B, H, t, D)).astype(np.float32) * (1 + i)
        k[..., 3] += 5.0  # an outlier channel, as in real keys
        v = rng.standard_normal((B, H, t, D)).astype(np.float32) * 0.5
        kv.append((k, v))
    return kv


@pytest.mark.parametrize("name", sorted(bl.BASELINES))
@pytest.mark.parametrize("trimmed", [False, True])
def test_shapes_and_finite(name, trimmed):
    kv = _kv(trimmed=trimmed)
    rest, nbytes = bl.BASELINES[name](kv)
    assert len(rest) == len(kv)
    for (k, v), (rk, rv) in zip(kv, rest):
        assert rk.shape == k.shape and rv.shape == v.shape
        assert rk.dtype == np.float32 and np.isfinite(rk).all() and np.isfinite(rv).all()
    assert isinstance(nbytes, int) and 0 < nbytes


def _max_rel_err(kv, rest):
    return max(float(np.abs(a - r).max() / np.abs(a).max()) for pair, rpair in zip(kv, rest)
               for a, r in zip(pair, rpair))


def test_fp16_and_zstd_exact_sizes():
    kv = _kv()
    n = bl.numel(kv)
    rest, nbytes = bl.fp16(kv)
    assert nbytes == 2 * n
    assert _max_rel_err(kv, rest) < 1e-3
    rest_z, nz = bl.zstd_fp16(kv)
    assert all(np.array_equal(a, b) for p, q in zip(rest, rest_z) for a, b in zip(p, q))
    assert nz < 2 * n  # random fp16 still loses some exponent entropy


def test_int8_error_and_size():
    kv = _kv(T=300)
    rest, nbytes = bl.int8_channel(kv)
    n = bl.numel(kv)
    # scales: per (layer, K/V, head, channel) per chunk; 300 tokens = 2 chunks
    n_scales = 3 * 2 * 1 * 2 * 64 * 2
    assert nbytes == n + 2 * n_scales
    for (k, v), (rk, rv) in zip(kv, rest):
        for a, r in ((k, rk), (v, rv)):
            for s in (0, 256):
                c, rc = a[:, :, s:s + 256], r[:, :, s:s + 256]
                step = np.abs(c).max(axis=2, keepdims=True) / 127
                assert (np.abs(c - rc) <= 0.5 * step * 1.002 + 1e-6).all()


def test_fp8_error_and_size():
    kv = _kv()
    rest, nbytes = bl.fp8_e4m3(kv)
    assert nbytes == bl.numel(kv) + 4 * 2 * len(kv)
    for (k, v), (rk, rv) in zip(kv, rest):
        for a, r in ((k, rk), (v, rv)):
            amax = np.abs(a).max()
            # e4m3: 3 mantissa bits -> relative error <= 2**-4 for normals; subnormals absolute
            tol = np.maximum(np.abs(a) * 2.0 ** -4, amax / 448 * 2.0 ** -9)
            assert (np.abs(a - r) <= tol * 1.001).all()


@pytest.mark.parametrize("residual", [0, 128])
def test_kivi_error_and_size(residual):
    kv = _kv(T=300, D=64)
    rest, nbytes = bl.kivi_2bit(kv, residual=residual)
    B, H, T, D = kv[0][0].shape
    nq = T - residual
    n_k_groups = math.ceil(nq / 32) * B * H * D
    n_v_groups = B * H * nq * (D // 32)
    per_tensor_q = math.ceil(B * H * nq * D * 2 / 8)
    expect = len(kv) * (2 * per_tensor_q + 4 * (n_k_groups + n_v_groups) + 2 * 2 * B * H * residual * D)
    assert nbytes == expect
    for (k, v), (rk, rv) in zip(kv, rest):
        # keys: per channel over 32-token groups; error <= half a step (+ fp16 rounding of min/scale)
        for s in range(0, nq, 32):
            c, rc = k[:, :, s:min(s + 32, nq)], rk[:, :, s:min(s + 32, nq)]
            step = (c.max(axis=2, keepdims=True) - c.min(axis=2, keepdims=True)) / 3
            assert (np.abs(c - rc) <= 0.5 * step * 1.01 + 1e-2).all()
        step = np.ptp(v[:, :, :nq].reshape(B, H, nq, 2, 32), axis=-1) / 3
        err = np.abs(v[:, :, :nq] - rv[:, :, :nq]).reshape(B, H, nq, 2, 32).max(axis=-1)
        assert (err <= 0.5 * step * 1.01 + 1e-2).all()
        if residual:
            assert np.allclose(rk[:, :, nq:], k[:, :, nq:], rtol=1e-3, atol=1e-3)


def test_lmcache_quantizer_and_bins():
    assert [bl.lmcache_bins(i, 0) for i in (0, 9, 10)] == [32, 32, 16]
    assert [bl.lmcache_bins(i, 1) for i in (0, 1, 2)] == [32, 32, 16]
    kv = _kv(layers=12, T=300)
    rest, _ = bl.lmcache(kv)
    for i, ((k, v), (rk, rv)) in enumerate(zip(kv, rest)):
        for j, (a, r) in enumerate(((k, rk), (v, rv))):
            M = bl.lmcache_bins(i, j) // 2 - 1
            amax = np.abs(a).max(axis=(1, 3), keepdims=True)  # per (layer, token) over channels
            assert (np.abs(a - r) <= 0.5 * amax / M * 1.002 + 1e-6).all()


def test_lmcache_size_accounting():
    # constant data -> every symbol identical -> entropy 0: size = CDF tables + absmaxes
    kv = [(np.ones((1, 2, 300, 8), np.float32), np.ones((1, 2, 300, 8), np.float32))]
    _, nb = bl.lmcache(kv)
    tables = 2 * 16 * 32 * 2 * 2  # 2 chunks x 16 channels x 32 bins x 2 bytes, K and V
    assert nb == tables + 2 * 300 * 2
    _, nw = bl.lmcache_whole(kv)
    assert nw == tables // 2 + 2 * 300 * 2
    # uniform random symbols over 2 values in each column -> 1 bit each
    sym = np.random.default_rng(1).integers(0, 2, size=(4096, 3))
    h = bl.entropy_bits(sym, 16)
    assert abs(h - 3 * 4096) < 3 * 4096 * 0.01


def test_lmcache_whole_not_larger_on_stationary_data():
    kv = _kv(T=1024)
    _, a = bl.lmcache(kv)
    _, b = bl.lmcache_whole(kv)
    assert b < a
