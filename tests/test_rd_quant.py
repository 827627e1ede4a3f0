"""Rate-distortion quantization (CodecConfig.rd_lambda): an encoder-only choice between the two
levels around each value; every decoder reads the result as ordinary levels."""
from __future__ import annotations

import numpy as np
import pytest

import cachegen
from cachegen import CodecConfig
from cachegen.codec import quantize
from cachegen.errors import ConfigError
from cachegen.format import v2 as fmt2

from helpers import as_f32, make_kv


def _levels(seed=0, ch=6, n=500, bits=3):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(3, size=(ch, n)) * rng.uniform(0.2, 2.0, size=(ch, 1))).astype(np.float32)
    lo, step = quantize.quantizer_params(x, bits, 2)
    return x, lo, step


def test_zero_lambda_is_the_nearest_level():
    x, lo, step = _levels()
    cost = np.random.default_rng(1).uniform(0, 12, size=(x.shape[0], 8))
    assert np.array_equal(quantize.quantize_rd(x, lo, step, 3, cost, 0.0), quantize.quantize(x, lo, step, 3))


def test_choice_is_one_of_the_two_levels_and_minimises_the_cost():
    x, lo, step = _levels(seed=2)
    rng = np.random.default_rng(3)
    cost = rng.uniform(0, 12, size=(x.shape[0], 8))
    lam = 0.3
    q = quantize.quantize_rd(x, lo, step, 3, cost, lam)
    u = np.clip((x - lo.astype(np.float32)[:, None]) / step.astype(np.float32)[:, None], 0, 7)
    assert ((q >= 0) & (q <= 7)).all()
    assert (np.abs(q - u) < 1 + 1e-5).all()              # never beyond the neighbouring levels
    f = np.minimum(np.floor(u), 6)
    for cand in (f, f + 1):                              # no other neighbour costs less
        c = cand.astype(np.int64)
        j_c = (u - c) ** 2 + lam * np.take_along_axis(cost, c, axis=1)
        j_q = (u - q) ** 2 + lam * np.take_along_axis(cost, q.astype(np.int64), axis=1)
        assert (j_q <= j_c + 1e-6).all()


def test_constant_channel_and_one_bit():
    x = np.zeros((2, 10), dtype=np.float32)
    x[1] = np.linspace(-1, 1, 10)
    lo, step = quantize.quantizer_params(x, 1, 2)
    q = quantize.quantize_rd(x, lo, step, 1, np.array([[0.0, 9.0], [9.0, 0.0]]), 1.0)
    assert q[0].tolist() == [0] * 10 and set(q[1].tolist()) <= {0, 1}


@pytest.mark.parametrize("preset", ["default", "tiny"])
def test_smaller_streams_any_decoder_reads_them(preset):
    kv = make_kv(layers=3, heads=4, tokens=400, dim=32, seed=5)
    base = CodecConfig.from_preset(preset, group_size=1)
    plain = cachegen.encode(kv, base)
    rd = cachegen.encode(kv, CodecConfig.from_preset(preset, group_size=1, rd_lambda=0.1))
    assert len(rd) < len(plain)
    c = fmt2.parse_container(rd)
    assert not [e for e in c.header.extensions if e.kind & 0x8000 and e.kind not in (0x8002, 0x8003)]
    out = cachegen.decode(rd)
    # each value within one step of its nearest level's reconstruction: the error at most 1.5 steps
    ref = cachegen.decode(plain)
    for (k, v), (k0, v0), (ka, va) in zip(out, ref, kv):
        for a, b, x in ((k, k0, ka), (v, v0, va)):
            e_rd = np.abs(as_f32(a) - as_f32(x)).max()
            e_0 = np.abs(as_f32(b) - as_f32(x)).max()
            assert e_rd <= 3.0 * e_0 + 1e-6


def test_config_range():
    for bad in (-0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises(ConfigError):
            CodecConfig(rd_lambda=bad)
    assert CodecConfig(rd_lambda=np.float32(0.25), group_size=1).rd_lambda == 0.25
    with pytest.raises(ConfigError, match="group_size"):     # refused, not silently ignored
        CodecConfig(rd_lambda=0.1, group_size=10)
