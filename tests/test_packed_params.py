"""Packed quantizer parameters (format v2 extension EXT_PACKED, FORMAT_V2.md 6.2): lo offsets and
token-scale codes rANS-coded in one parameter stream per block."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import cachegen
from cachegen import CodecConfig
from cachegen.codec import params, quantize
from cachegen.errors import CacheGenError, ConfigError, FormatError, UnsupportedVersionError
from cachegen.format import v2 as fmt2
from cachegen.format.extensions import EXT_PACKED, NO_TABLE, PackedParams

from helpers import as_f32, make_kv

P = lambda preset="default", **kw: CodecConfig.from_preset(preset, packed_params=True, **kw)
# Packing pays only past a few thousand channels and tokens (the parameter tables cost bytes):
# the caches here are large enough that the encoder packs them.
BIG = dict(layers=2, heads=4, tokens=600, dim=32)


def _err(kv, rest):
    return max(float(np.abs(as_f32(a) - as_f32(b)).max()) for p, q in zip(kv, rest) for a, b in zip(p, q))


@pytest.mark.parametrize("preset,kw,heads", [("default", {}, 4), ("tiny", {"chunk_tokens": 64}, 4),
                                             ("small", {"token_scaling": False}, 8), ("default", {"table_bits": 10}, 4)])
def test_round_trip_smaller_and_as_accurate(preset, kw, heads):
    kv = make_kv(layers=3, heads=heads, tokens=300, dim=16, lengths=[300, 170, 300], seed=1)
    plain = cachegen.encode(kv, CodecConfig.from_preset(preset, **kw))
    packed = cachegen.encode(kv, P(preset, **kw))
    c = fmt2.parse_container(packed)
    assert c.header.packed is not None and c.header.packed.frac_bits == params.FRAC_BITS
    assert len(packed) < len(plain)
    e_plain, e_packed = _err(kv, cachegen.decode(plain)), _err(kv, cachegen.decode(packed))
    # the grid moves by less than step / 2**r: the error bound barely changes
    assert e_packed <= e_plain * 1.25 + 1e-6
    info = cachegen.inspect(packed)
    assert info["breakdown"]["token_scales"] == 0 and info["breakdown"]["param_streams"] > 0
    assert sum(info["breakdown"].values()) == len(packed)


def test_decoded_values_follow_the_spec_formula():
    """lo = fl32(fl32(step * m) * 2**-r), then the usual reconstruction (section 10)."""
    kv = make_kv(**BIG, seed=2)
    data = cachegen.encode(kv, P("default", chunk_tokens=32))
    c = fmt2.parse_container(data)
    v = fmt2.chunk_view(c, 0)
    assert v.lo is None and v.tok is None and v.param_ends.size == v.layout.nb
    lo, tok = params.chunk_params(c, v, {})
    # independently: decode the block streams with the spec's symbol mapping
    pk = c.header.packed
    st = np.float32(v.step[0])
    start = int(v.ends[-1])
    from cachegen.codec import entropy
    models = lambda t: entropy.model_for(c.header.table_freqs24(t))
    nch = int(v.layout.nch[0])
    out = entropy.decode_stream(v.words[start:int(v.param_ends[0])],
                                [(nch, models(pk.lo_tables[0])), (nch, models(pk.frac_tables[0])),
                                 (32, models(pk.tok_tables[0]))])
    hi = out[0].astype(np.int64)
    m = (((hi >> 1) ^ -(hi & 1)) << pk.frac_bits) | out[1]
    assert np.array_equal(lo[:nch], (st * m.astype(np.float32)) * np.float32(2.0 ** -pk.frac_bits))
    d = out[2].astype(np.int64)
    assert np.array_equal(tok[:32], 128 + np.cumsum((d >> 1) ^ -(d & 1)))


def test_offsets_keep_lo_below_min_and_indices_in_range():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x = rng.normal(size=(16, 40)) * rng.uniform(0.01, 100) + rng.normal() * 50
        step = np.full(16, np.float16((x.max(1) - x.min(1)).max() / 7 * 1.02).astype(np.float64))
        m = params.lo_offsets(x.min(1), step)
        assert m is not None
        lo = params.lo_values(step[0], m).astype(np.float64)
        assert (lo <= x.min(1)).all() and (x.min(1) - lo < step[0] / 2 ** params.FRAC_BITS + 1e-9).all()
    assert params.lo_offsets(np.array([5000.0]), np.array([1.0])) is None           # |m >> r| > 1023


def test_fitted_offsets_never_lose_to_the_minimum():
    """fit_offsets: lo in (min - step, min], indices in range, squared error <= that of lo = min
    (the first candidate), and strictly less on channels narrower than the step."""
    rng = np.random.default_rng(1)
    bits, r = 3, 3
    for _ in range(50):
        x = (rng.normal(size=(16, 64)) * rng.uniform(0.01, 1.0, size=(16, 1))).astype(np.float32)
        st = np.float16((x.max(1) - x.min(1)).max() / ((1 << bits) - 1) * 1.01)
        step = np.full(16, st, dtype=np.float16)
        m0, m = params.lo_offsets(x.min(1), step, r), params.fit_offsets(x, step, bits, r, 1 << r)
        lo0, lo = (params.lo_values(step[0], v, r) for v in (m0, m))
        assert (lo <= x.min(1)).all() and (x.min(1) - lo < np.float32(st) * (1 + 1e-6)).all()
        err = lambda lo_: ((x - quantize.dequantize(quantize.quantize(x, lo_, step, bits), lo_, step)) ** 2).sum(1)
        e0, e = err(lo0), err(lo)
        assert (e <= e0 * (1 + 1e-6) + 1e-12).all()
        narrow = (x.max(1) - x.min(1)) < np.float32(st) / 2
        if narrow.any():
            assert e[narrow].sum() < e0[narrow].sum()
    assert params.lo_offsets(np.array([1.0]), np.array([0.0])) is None              # constant non-zero
    assert params.lo_offsets(np.array([0.0]), np.array([0.0])).tolist() == [0]


def test_unpackable_cache_falls_back_to_stored_parameters():
    kv = make_kv(layers=2, heads=1, tokens=40, dim=8, seed=3)
    kv[1] = (kv[1][0] + np.float16(3000.0), kv[1][1])     # offsets far beyond 1023 steps
    data = cachegen.encode(kv, P("tiny"))
    c = fmt2.parse_container(data)
    assert c.header.packed is None
    assert _err(kv, cachegen.decode(data)) <= _err(kv, cachegen.decode(cachegen.encode(kv, "tiny"))) + 1e-3


def test_packs_only_where_it_pays():
    """A tiny cache without token scales: the parameter tables would cost more than they save."""
    kv = make_kv(layers=3, heads=2, tokens=300, dim=16, lengths=[300, 170, 300], seed=1)
    cfg = P("small", token_scaling=False)
    data = cachegen.encode(kv, cfg)
    assert fmt2.parse_container(data).header.packed is None
    assert len(data) <= len(cachegen.encode(kv, CodecConfig.from_preset("small", token_scaling=False)))


def test_config_needs_shared_steps():
    with pytest.raises(ConfigError, match="scale_sharing"):
        CodecConfig.from_preset("high", packed_params=True)
    with pytest.raises(ConfigError):
        CodecConfig.from_preset("default", packed_params="yes")


def _rewrite_record(data: bytes, payload: bytes) -> bytes:
    """The container with its packed-params record's payload replaced (header CRC fixed)."""
    from cachegen.format.container import crc32
    mv = memoryview(data)
    magic, version, mode, flags, hsize, _ = fmt2._PREAMBLE.unpack_from(mv, 0)
    body = bytearray(mv[16:16 + hsize])
    i = bytes(body).rfind(struct.pack("<HHI", EXT_PACKED, 0, 16))
    assert i > 0
    body[i + 8:i + 24] = payload
    return fmt2._PREAMBLE.pack(magic, version, mode, flags, hsize, crc32(bytes(body))) + bytes(body) + bytes(mv[16 + hsize:])


def test_forged_records_are_refused():
    kv = make_kv(**BIG, seed=4)
    data = cachegen.encode(kv, P())
    pk = fmt2.parse_container(data).header.packed
    bad = {
        "table": PackedParams((9999, pk.lo_tables[1]), pk.frac_tables, pk.tok_tables, pk.frac_bits),
        "frac alphabet": PackedParams(pk.lo_tables, (pk.lo_tables[0], pk.frac_tables[1]), pk.tok_tables, pk.frac_bits),
        "no tok table": PackedParams(pk.lo_tables, pk.frac_tables, (NO_TABLE, NO_TABLE), pk.frac_bits),
    }
    for name, p in bad.items():
        with pytest.raises(FormatError):
            fmt2.parse_container(_rewrite_record(data, p.to_extension().payload))
    raw = bytearray(pk.to_extension().payload)
    raw[6 * 2] = 9                                                     # frac_bits over 8
    with pytest.raises(FormatError):
        fmt2.parse_container(_rewrite_record(data, bytes(raw)))
    raw = bytearray(pk.to_extension().payload)
    raw[15] = 1                                                        # reserved byte
    with pytest.raises(FormatError):
        fmt2.parse_container(_rewrite_record(data, bytes(raw)))


def test_older_decoder_refuses_cleanly(monkeypatch):
    """A decoder without EXT_PACKED sees an unknown critical record (no silent misread)."""
    from cachegen.format import extensions as ext
    kv = make_kv(**BIG, seed=5)
    data = cachegen.encode(kv, P())
    monkeypatch.setattr(fmt2, "check_known", lambda exts: ext.check_known(exts, handled=(ext.EXT_TRANSFORM,)))
    with pytest.raises(UnsupportedVersionError, match="packed-params"):
        fmt2.parse_container(data)


def test_every_corrupted_byte_of_a_chunk_raises():
    kv = make_kv(**BIG, seed=6)
    data = cachegen.encode(kv, P("default", chunk_tokens=32))
    c = fmt2.parse_container(data)
    s0 = c.payload_start + int(c.index["offset"][0])
    rng = np.random.default_rng(1)
    for p in rng.choice(np.arange(s0, s0 + int(c.index["size"][0])), 60, replace=False):
        b = bytearray(data)
        b[int(p)] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(CacheGenError):
            cachegen.decode(bytes(b))


def test_guard_keeps_the_record_when_it_adds_quality():
    from cachegen.format.extensions import EXT_QUALITY, Extension
    from cachegen.guard import with_extensions
    kv = make_kv(**BIG, seed=7)
    data = cachegen.encode(kv, P())
    out = with_extensions(data, [Extension.json(EXT_QUALITY, {"x": 1})])
    c = fmt2.parse_container(out)
    assert c.header.packed is not None and [e.kind for e in c.header.extensions] == [EXT_QUALITY, EXT_PACKED]
    assert all(np.array_equal(as_f32(a), as_f32(b)) for p, q in zip(cachegen.decode(out), cachegen.decode(data))
               for a, b in zip(p, q))
    # byte for byte what encoding with that record gives
    assert out == cachegen.encode(kv, P(), extensions=[Extension.json(EXT_QUALITY, {"x": 1})])
