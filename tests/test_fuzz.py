"""Corrupt, truncated, forged and oversized inputs only ever raise CacheGenError."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import cachegen
from cachegen.format.container import PREAMBLE_SIZE, FIXED_SIZE, parse_container

from fuzz.mutate import fix_header_crc, run, seeds


def test_mutation_fuzz_few_thousand():
    stats = run(3000, seed=12345)
    assert stats["rejected"] > 2000          # nearly everything is caught by checks and checksums


def _forge(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    fix_header_crc(b)
    return bytes(b)


LAYER0 = PREAMBLE_SIZE + FIXED_SIZE


@pytest.mark.parametrize("offset, fmt, value, exc", [
    (LAYER0, "<I", 1 << 24, cachegen.FormatError),                    # tokens: huge cache from tiny file
    (LAYER0, "<I", (1 << 32) - 1, cachegen.LimitExceededError),       # over max_tokens
    (LAYER0 + 4, "<H", 65535, cachegen.FormatError),                   # heads
    (PREAMBLE_SIZE + 4, "<I", 5000, cachegen.LimitExceededError),      # batch
    (PREAMBLE_SIZE + 4, "<I", 0, cachegen.FormatError),
    (PREAMBLE_SIZE + 12, "<I", 100000, cachegen.LimitExceededError),   # layer count
    (PREAMBLE_SIZE + 8, "<I", 0, cachegen.FormatError),                # chunk tokens
])
def test_forged_header_fields_are_rejected_before_allocation(offset, fmt, value, exc):
    data = seeds()[0]
    with pytest.raises(exc):
        cachegen.decode(_forge(data, offset, fmt, value))


def test_bad_magic_version_and_checksums():
    data = seeds()[0]
    with pytest.raises(cachegen.FormatError, match="magic"):
        cachegen.decode(b"XXXX" + data[4:])
    with pytest.raises(cachegen.UnsupportedVersionError):
        cachegen.decode(data[:4] + bytes([3]) + data[5:])     # 2 is format v2 now
    b = bytearray(data)
    b[PREAMBLE_SIZE + 3] ^= 1
    with pytest.raises(cachegen.ChecksumError):
        cachegen.decode(bytes(b))
    b = bytearray(data)
    b[-3] ^= 0x10
    with pytest.raises(cachegen.ChecksumError):
        cachegen.decode(bytes(b))
    for junk in (b"", b"CG", b"CGKV", data[:PREAMBLE_SIZE + 5], data + b"\0"):
        with pytest.raises(cachegen.FormatError):
            cachegen.decode(junk)
    with pytest.raises(cachegen.FormatError):
        cachegen.decode(12345)


def test_corrupt_stream_words_are_caught_without_checksum():
    data = seeds()[0]
    c = parse_container(data)
    rng = np.random.default_rng(0)
    caught = 0
    for _ in range(200):
        b = bytearray(data)
        p = int(rng.integers(c.payload_start, len(b)))
        b[p] ^= 1 << int(rng.integers(0, 8))
        for dec in ("reference", "lockstep"):
            try:
                cachegen.decode(bytes(b), decoder=dec, verify=False)
            except cachegen.CacheGenError:
                caught += 1
    assert caught > 100   # the ANS end-state and index-range checks catch most single flips


def test_expansion_limit_is_configurable():
    data = seeds()[0]
    with pytest.raises(cachegen.LimitExceededError):
        cachegen.decode(data, limits=cachegen.DecodeLimits(max_expansion=1, free_output_bytes=0))
    with pytest.raises(cachegen.LimitExceededError):
        cachegen.decode(data, limits=cachegen.DecodeLimits(max_output_bytes=100))


def test_field_targeted_campaign_both_formats():
    """A few thousand field-targeted mutants (tests/fuzz/fields.py) of v1 and v2 seeds; the full
    campaign is `python -m tests.fuzz.campaign --n 100000` (benches/RESULTS.md)."""
    from fuzz import campaign, fields
    seeds = campaign.make_seeds()
    versions = {d[4] for _, d in seeds}
    assert {1, 2} <= versions or versions == {1}
    for name, d in seeds:                     # the splitter knows every seed's layout exactly
        p = fields.split(d)
        assert p is not None and fields.join(p) == d, name
    res = campaign.run(3000, workers=2, seed=7, timeout=20.0)
    assert res["n_bugs"] == 0, res["bugs"][:5]
    out = res["outcomes"]
    assert out.get("decoded:same", 0) > 50 and out.get("decoded:other", 0) > 20   # deep checks reached
    for cls in ("ChecksumError", "FormatError", "StreamError"):
        assert out.get(f"rejected:{cls}", 0) > 10
    assert {"fixed", "layer", "index", "model", "chunk", "resize", "reorder", "splice", "raw",
            "store_index"} <= set(res["by_mutator"])
    assert res["worst_time_s"] < 2.0 and res["worst_rss_growth_mb"] < 256
