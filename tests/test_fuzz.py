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
        cachegen.decode(data[:4] + bytes([2]) + data[5:])
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
        cachegen.decode(data, limits=cachegen.DecodeLimits(max_expansion=1))
    with pytest.raises(cachegen.LimitExceededError):
        cachegen.decode(data, limits=cachegen.DecodeLimits(max_output_bytes=100))
