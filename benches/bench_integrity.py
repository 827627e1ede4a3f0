"""What each integrity check of format v2 catches, measured with mutations of real-statistics data.

The GPU path (``verify=True``) checks the header CRC and every chunk's *metadata* CRC on the host,
and the stream words only through the rANS end state of every stream on the device (x == 0 and
all words consumed). This script mutates the **stream words** of a container (bit flips, byte
replacements, word swaps inside a stream, word swaps across streams, zeroed runs), decodes each
mutant with the words CRC skipped -- exactly the check the GPU path makes, run by the CPU
reference (same end-state rule) -- and counts: caught by the end-state check, caught by the
index-range check, decoded *silently wrong*, or decoded identical (a mutation that changes
nothing). The words checksum (on the device with ``verify=True``; on the host with ``verify="full"``) catches them; that is
measured too.

    python benches/bench_integrity.py --n 20000 [--npz .gpudata/smollm2_1k.npz] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import cachegen  # noqa: E402
from cachegen.codec.decoder_v2 import decode_chunk  # noqa: E402
from cachegen.errors import CacheGenError, StreamError  # noqa: E402
from cachegen.format import v2 as fmt2  # noqa: E402


def make_data(npz: str | None, tokens: int):
    if npz and os.path.exists(npz):
        z = np.load(npz)
        L = sum(1 for k in z.keys() if k.startswith("k"))
        kv = [(z[f"k{i}"][:, :, :tokens].astype(np.float16), z[f"v{i}"][:, :, :tokens].astype(np.float16))
              for i in range(min(L, 4))]
        return kv, "smollm2 (4 layers of a real cache)"
    from helpers import make_kv
    return make_kv(layers=4, heads=3, tokens=tokens, dim=64, dtype="float16", seed=0), "synthetic"


def decode_words_unchecked(data: bytes, k: int):
    c = fmt2.parse_container(data)
    c.verify_chunk(k, words=False)            # header + metadata CRC, as on the GPU path
    return [x for *_, x in decode_chunk(c, k, verify=False)]


def mutate(rng, buf: bytearray, lo: int, hi: int, ends: np.ndarray, kind: str) -> bool:
    words = (hi - lo) // 4
    if words < 2:
        return False
    if kind == "bitflip":
        p = int(rng.integers(lo, hi))
        buf[p] ^= 1 << int(rng.integers(0, 8))
    elif kind == "byte":
        p = int(rng.integers(lo, hi))
        old = buf[p]
        buf[p] = (old + int(rng.integers(1, 256))) & 0xFF
    elif kind == "swap_in_stream":
        s = int(rng.integers(0, ends.size))
        a, b = (int(ends[s - 1]) if s else 0), int(ends[s])
        if b - a < 2:
            return False
        i, j = rng.choice(np.arange(a, b), size=2, replace=False)
        wi, wj = lo + 4 * int(i), lo + 4 * int(j)
        if buf[wi:wi + 4] == buf[wj:wj + 4]:
            return False
        buf[wi:wi + 4], buf[wj:wj + 4] = buf[wj:wj + 4], buf[wi:wi + 4]
    elif kind == "swap_streams":
        i, j = (int(x) for x in rng.integers(0, words, size=2))
        wi, wj = lo + 4 * i, lo + 4 * j
        if buf[wi:wi + 4] == buf[wj:wj + 4]:
            return False
        buf[wi:wi + 4], buf[wj:wj + 4] = buf[wj:wj + 4], buf[wi:wi + 4]
    elif kind == "zero_run":
        p = int(rng.integers(0, words))
        n = int(rng.integers(1, 9))
        q = lo + 4 * p
        end = min(hi, q + 4 * n)
        if not any(buf[q:end]):
            return False
        buf[q:end] = bytes(end - q)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--npz", default=".gpudata/smollm2_1k.npz")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    kv, what = make_data(a.npz, a.tokens)
    data = cachegen.encode(kv, a.preset)
    c = fmt2.parse_container(data)
    k = 0
    start = c.payload_start + int(c.index["offset"][k])
    lo, hi = start + int(c.index["meta_size"][k]), start + int(c.index["size"][k])
    ends = fmt2.chunk_view(c, k).ends.astype(np.int64)
    ref = decode_words_unchecked(data, k)
    rng = np.random.default_rng(0)
    kinds = ["bitflip", "byte", "swap_in_stream", "swap_streams", "zero_run"]
    table = {kd: Counter() for kd in kinds}
    t0 = time.time()
    done = 0
    while done < a.n:
        kd = kinds[done % len(kinds)]
        buf = bytearray(data)
        if not mutate(rng, buf, lo, hi, ends, kd):
            continue
        done += 1
        b = bytes(buf)
        try:
            out = decode_words_unchecked(b, k)
        except StreamError as e:
            table[kd]["range" if "index outside" in str(e) else "end_state"] += 1
        except CacheGenError:
            table[kd]["other_error"] += 1
        else:
            same = all(np.array_equal(x, y) for x, y in zip(out, ref))
            table[kd]["identical" if same else "SILENT_WRONG"] += 1
        try:
            fmt2.parse_container(b).verify_chunk(k, words=True)
            table[kd]["crc_missed"] += 1
        except CacheGenError:
            table[kd]["crc_caught"] += 1
    dt = time.time() - t0
    print(f"data: {what}, preset {a.preset}, chunk 0 of {len(data)} bytes: {(hi - lo) // 4} words in {ends.size} streams; "
          f"{a.n} mutations in {dt:.1f} s")
    print("| mutation | n | caught by end state | caught by index range | other error | silently wrong | identical | words checksum caught |")
    print("|---|---|---|---|---|---|---|---|")
    for kd in kinds:
        t = table[kd]
        n = sum(v for key, v in t.items() if not key.startswith("crc"))
        print(f"| {kd} | {n} | {t['end_state']} | {t['range']} | {t['other_error']} | {t['SILENT_WRONG']} | "
              f"{t['identical']} | {t['crc_caught']} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"data": what, "n": a.n, "table": {k: dict(v) for k, v in table.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
