"""Mutation fuzzing of the decoders: every input must decode or raise CacheGenError.

    python tests/fuzz/mutate.py --iterations 20000 --seed 1
"""
from __future__ import annotations

import argparse
import struct
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cachegen  # noqa: E402
from cachegen.format.container import PREAMBLE_SIZE  # noqa: E402
from helpers import make_kv  # noqa: E402


def seeds(format_version: int = 1) -> list[bytes]:
    """Small containers of one format version (the offsets in tests/test_fuzz.py are v1's)."""
    kv = make_kv(layers=2, batch=1, heads=1, tokens=40, dim=8, seed=1, lengths=[40, 12])
    small = cachegen.CodecConfig(chunk_tokens=16, channels_per_stream=3)
    return [cachegen.encode(kv, cfg, format_version=format_version)
            for cfg in ("default", "cachegen-paper", small, "lossless")]


def fix_header_crc(b: bytearray) -> None:
    size = struct.unpack_from("<I", b, 8)[0]
    if PREAMBLE_SIZE + size <= len(b):
        struct.pack_into("<I", b, 12, zlib.crc32(bytes(b[PREAMBLE_SIZE:PREAMBLE_SIZE + size])) & 0xFFFFFFFF)


def mutate(data: bytes, rng: np.random.Generator) -> tuple[bytes, bool]:
    """Returns (mutated bytes, verify flag). Mix of mutations aimed at every layer."""
    b = bytearray(data)
    kind = rng.integers(0, 7)
    header_end = PREAMBLE_SIZE + struct.unpack_from("<I", data, 8)[0]
    if kind == 0:                                   # random bit flips anywhere
        for _ in range(rng.integers(1, 9)):
            p = rng.integers(0, len(b))
            b[p] ^= 1 << rng.integers(0, 8)
    elif kind == 1:                                 # truncation
        b = b[:rng.integers(0, len(b))]
    elif kind == 2:                                 # header field forging with a valid CRC
        for _ in range(rng.integers(1, 4)):
            p = rng.integers(PREAMBLE_SIZE, header_end)
            b[p] = rng.integers(0, 256)
        fix_header_crc(b)
    elif kind == 3:                                 # 32-bit field set to an extreme value
        p = rng.integers(PREAMBLE_SIZE, max(PREAMBLE_SIZE + 1, header_end - 4))
        struct.pack_into("<I", b, p, int(rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 24])))
        fix_header_crc(b)
    elif kind == 4:                                 # payload corruption, CRC not checked
        for _ in range(rng.integers(1, 5)):
            p = rng.integers(header_end, len(b))
            b[p] = rng.integers(0, 256)
        return bytes(b), False
    elif kind == 5:                                 # insert / delete bytes
        p = rng.integers(0, len(b))
        if rng.integers(0, 2):
            b[p:p] = bytes(rng.integers(0, 256, rng.integers(1, 9), dtype=np.uint8))
        else:
            del b[p:p + rng.integers(1, 9)]
    else:                                           # random garbage with a valid magic
        b = bytearray(b"CGKV" + bytes(rng.integers(0, 256, rng.integers(0, 400), dtype=np.uint8)))
    return bytes(b), True


def run(iterations: int, seed: int, decoders=("reference", "lockstep"), quiet: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    base = seeds(1) + seeds(2)
    stats = {"decoded": 0, "rejected": 0}
    t0 = time.perf_counter()
    for it in range(iterations):
        data, verify = mutate(base[it % len(base)], rng)
        dec = decoders[it % len(decoders)]
        partial = bool(rng.integers(0, 2))
        try:
            out = cachegen.decode(data, decoder=dec, verify=verify, partial=partial)
            assert isinstance(out, list) and all(len(p) == 2 for p in out)
            stats["decoded"] += 1
        except cachegen.CacheGenError:
            stats["rejected"] += 1
        except Exception as e:  # anything else is a bug
            raise AssertionError(f"iteration {it} ({dec}, verify={verify}): {type(e).__name__}: {e}") from e
    stats["seconds"] = time.perf_counter() - t0
    if not quiet:
        print(stats)
    return stats


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    run(a.iterations, a.seed, quiet=False)
