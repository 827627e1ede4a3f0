"""Compact stream directory (format v2 extension EXT_COMPACT_DIR, FORMAT_V2.md 6.3): one u32
base per segment of G streams, then a u16 end-minus-base per stream, instead of a u32 per stream."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import cachegen
from cachegen import CodecConfig
from cachegen.codec import encoder as E
from cachegen.errors import CacheGenError, ConfigError, FormatError, StreamError, UnsupportedVersionError
from cachegen.format import v2 as fmt2
from cachegen.format.container import crc32
from cachegen.format.extensions import EXT_COMPACT_DIR, EXT_PACKED, EXT_QUALITY, CompactDirectory, Extension

from helpers import as_f32, make_kv

C = lambda preset="default", **kw: CodecConfig.from_preset(preset, compact_directory=True, **kw)
KV = dict(layers=3, heads=4, tokens=300, dim=16, lengths=[300, 170, 300])


def _same(a, b) -> bool:
    return all(np.array_equal(as_f32(x), as_f32(y)) for p, q in zip(a, b) for x, y in zip(p, q))


@pytest.mark.parametrize("preset,kw,batch", [("default", {}, 1), ("tiny", {"chunk_tokens": 64}, 2),
                                             ("small", {"packed_params": True}, 1),
                                             ("default", {"group_size": 4}, 1)])
def test_same_values_fewer_bytes(preset, kw, batch):
    kv = make_kv(**KV, batch=batch, seed=1)
    plain = cachegen.encode(kv, CodecConfig.from_preset(preset, **kw))
    compact = cachegen.encode(kv, C(preset, **kw))
    h = fmt2.parse_container(compact).header
    assert h.dir_group >= E.MIN_DIR_GROUP and h.dir_group & (h.dir_group - 1) == 0
    assert _same(cachegen.decode(plain), cachegen.decode(compact))
    n_dir = sum(fmt2.parse_container(plain).header.layout(k).n_dir for k in range(h.n_chunks))
    assert len(plain) - len(compact) >= n_dir     # about 2 bytes a stream, at least 1
    info = cachegen.inspect(compact)
    assert sum(info["breakdown"].values()) == len(compact)
    assert info["breakdown"]["stream_directory"] < cachegen.inspect(plain)["breakdown"]["stream_directory"] * 0.6


def test_directory_follows_the_spec():
    """Read independently: bases at dir_at, u16 entries after them; the ends equal the plain
    container's u32 directory (the stream words are the same bytes)."""
    kv = make_kv(**KV, seed=2)
    cfg = dict(chunk_tokens=64, channels_per_stream=1)
    plain = fmt2.parse_container(cachegen.encode(kv, CodecConfig.from_preset("default", **cfg)))
    data = cachegen.encode(kv, C(**cfg))
    c = fmt2.parse_container(data)
    g = c.header.dir_group
    for k in range(c.n_chunks):
        raw = bytes(c.chunk_bytes(k))
        lay = c.header.layout(k)
        n = lay.n_dir
        nseg = -(-n // g)
        bases = struct.unpack_from(f"<{nseg}I", raw, lay.dir_at)
        rel = struct.unpack_from(f"<{n}H", raw, lay.dir_at + 4 * nseg)
        assert lay.meta_size == lay.dir_at + 4 * nseg + ((2 * n + 3) & ~3)
        ends = [bases[s // g] + rel[s] for s in range(n)]
        assert ends == fmt2.chunk_view(plain, k).ends.tolist() == fmt2.chunk_view(c, k).ends.tolist()
        assert bytes(c.chunk_bytes(k)[lay.meta_size:]) == bytes(plain.chunk_bytes(k)[plain.header.layout(k).meta_size:])


def test_group_bound_and_fallback():
    # the bound: a symbol costs at most table_bits bits, so G segments of the largest stream fit u16
    kv = make_kv(layers=2, heads=4, tokens=600, dim=32, seed=3)
    c = fmt2.parse_container(cachegen.encode(kv, C(chunk_tokens=512, channels_per_stream=32)))
    g = c.header.dir_group
    most = max(int(c.header.layout(k).stream_symbols.max()) for k in range(c.n_chunks))
    assert g and g * (most * 12 / 32 + 5) <= 0xFFFF < 2 * g * (most * 12 / 32)
    # streams too long for even MIN_DIR_GROUP of them: the plain directory (same format, larger)
    data = cachegen.encode(kv, C(chunk_tokens=1024, channels_per_stream=128))
    assert fmt2.parse_container(data).header.dir_group == 0
    assert _same(cachegen.decode(data), cachegen.decode(cachegen.encode(
        kv, CodecConfig.from_preset("default", chunk_tokens=1024, channels_per_stream=128))))


def test_config_flag_is_a_bool():
    with pytest.raises(ConfigError):
        CodecConfig.from_preset("default", compact_directory="yes")


def _rewrite_records(data: bytes, records) -> bytes:
    """The container with its extension records replaced (header CRC fixed)."""
    mv = memoryview(data)
    magic, version, mode, flags, hsize, _ = fmt2._PREAMBLE.unpack_from(mv, 0)
    body = bytes(mv[16:16 + hsize])
    fixed = list(fmt2._FIXED.unpack_from(body, 0))
    old = fixed[15]
    exts = fmt2.pack_extensions(records)
    fixed[14], fixed[15] = len(records), len(exts)
    new = fmt2._FIXED.pack(*fixed) + body[fmt2._FIXED.size:hsize - old] + exts
    return fmt2._PREAMBLE.pack(magic, version, mode, flags, len(new), crc32(new)) + new + bytes(mv[16 + hsize:])


def test_forged_records_are_refused():
    kv = make_kv(**KV, seed=4)
    data = cachegen.encode(kv, C())
    g = fmt2.parse_container(data).header.dir_group
    rec = CompactDirectory(g).to_extension()
    assert fmt2.parse_container(_rewrite_records(data, [rec])).header.dir_group == g     # the rewrite itself is sound
    for payload in (struct.pack("<HH", 0, 0), struct.pack("<HH", g, 1), struct.pack("<H", g),
                    struct.pack("<HH", 40000, 0)):
        with pytest.raises(FormatError):
            fmt2.parse_container(_rewrite_records(data, [Extension(EXT_COMPACT_DIR, payload)]))
    with pytest.raises(FormatError):
        fmt2.parse_container(_rewrite_records(data, [rec, rec]))
    # another group than the chunks were written with: their metadata size no longer matches
    with pytest.raises(FormatError, match="metadata size"):
        fmt2.parse_container(_rewrite_records(data, [CompactDirectory(max(1, g // 8)).to_extension()]))
    # a lossless container may not carry it
    ll = cachegen.encode(kv, "lossless")
    with pytest.raises(FormatError, match="compact-directory"):
        fmt2.parse_container(_rewrite_records(ll, [rec]))
    with pytest.raises(CacheGenError):
        CompactDirectory(0)


def test_older_decoder_refuses_cleanly(monkeypatch):
    from cachegen.format import extensions as ext
    data = cachegen.encode(make_kv(**KV, seed=5), C())
    monkeypatch.setattr(fmt2, "check_known",
                        lambda exts: ext.check_known(exts, handled=(ext.EXT_TRANSFORM, ext.EXT_PACKED)))
    with pytest.raises(UnsupportedVersionError, match="compact-directory"):
        fmt2.parse_container(data)


def _forge_dir(data: bytes, k: int, edit) -> bytes:
    """Chunk k's directory edited by edit(bases, rel) (numpy arrays, in place); CRCs left stale."""
    c = fmt2.parse_container(data)
    lay = c.header.layout(k)
    s0 = c.payload_start + int(c.index["offset"][k])
    b = bytearray(data)
    bases = np.frombuffer(b, dtype="<u4", count=lay.n_seg, offset=s0 + lay.dir_at).copy()
    rel = np.frombuffer(b, dtype="<u2", count=lay.n_dir, offset=s0 + lay.rel_at).copy()
    edit(bases, rel)
    b[s0 + lay.dir_at:s0 + lay.rel_at] = bases.tobytes()
    b[s0 + lay.rel_at:s0 + lay.rel_at + 2 * lay.n_dir] = rel.tobytes()
    return bytes(b)


def _set(a, i, v):
    a[i] = v


def test_inconsistent_directories_raise_stream_errors(monkeypatch):
    """Past the metadata CRC (verify=False): the structural checks of section 6.3."""
    monkeypatch.setattr(E, "directory_group", lambda h: 4)     # several segments per chunk
    kv = make_kv(**KV, seed=6)
    data = cachegen.encode(kv, C(chunk_tokens=64, channels_per_stream=1))
    forged = {
        "first base": lambda b, r: _set(b, 0, 1),
        "segment join": lambda b, r: _set(b, 1, b[1] + 1),
        "decreasing": lambda b, r: _set(r, 1, r[0] - 1),
        "last end": lambda b, r: _set(r, -1, r[-1] + 1),
    }
    c = fmt2.parse_container(data)
    assert c.header.dir_group == 4 and c.header.layout(0).n_seg >= 2
    assert int(fmt2.chunk_view(c, 0).ends[0]) >= 1
    for name, edit in forged.items():
        bad = _forge_dir(data, 0, edit)
        cb = fmt2.parse_container(bad)
        with pytest.raises(StreamError):
            fmt2.chunk_view(cb, 0, verify=False)
        with pytest.raises(CacheGenError):
            cachegen.decode(bad)               # with verify: the metadata CRC first


def test_every_corrupted_directory_byte_raises():
    kv = make_kv(**KV, seed=7)
    data = cachegen.encode(kv, C(chunk_tokens=64, packed_params=True))
    c = fmt2.parse_container(data)
    lay = c.header.layout(0)
    s0 = c.payload_start + int(c.index["offset"][0])
    for p in range(s0 + lay.dir_at, s0 + lay.meta_size):
        b = bytearray(data)
        b[p] ^= 0x10
        with pytest.raises(CacheGenError):
            cachegen.decode(bytes(b))


def test_guard_keeps_the_record():
    from cachegen.guard import with_extensions
    kv = make_kv(layers=2, heads=4, tokens=600, dim=32, seed=8)
    cfg = C(packed_params=True)
    data = cachegen.encode(kv, cfg)
    out = with_extensions(data, [Extension.json(EXT_QUALITY, {"x": 1})])
    c = fmt2.parse_container(out)
    assert c.header.dir_group and [e.kind for e in c.header.extensions] == [EXT_QUALITY, EXT_PACKED, EXT_COMPACT_DIR]
    assert _same(cachegen.decode(out), cachegen.decode(data))
    assert out == cachegen.encode(kv, cfg, extensions=[Extension.json(EXT_QUALITY, {"x": 1})])


def test_profile_presets_use_it():
    from cachegen.profile import codec as pc
    assert pc.PRESET_CODEC.get("compact_directory") is True
