"""Size of format v2 vs v1 on a real cache, by table precision (table_bits) and channels per stream.

    python benches/bench_v2_size.py [--npz .gpudata/smollm2_1k.npz]

The npz holds a real fp16 cache (k{i}/v{i}, [1, H, T, D]), e.g. written by
``benches/bench_gpu.py --make-data`` or any ORT prefill.
"""
from __future__ import annotations

import argparse

import numpy as np

import cachegen


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--npz", default=".gpudata/smollm2_1k.npz")
    ap.add_argument("--preset", default="default")
    a = ap.parse_args(argv)
    z = np.load(a.npz)
    L = sum(1 for k in z.keys() if k.startswith("k"))
    kv = [(z[f"k{i}"].astype(np.float16), z[f"v{i}"].astype(np.float16)) for i in range(L)]
    raw = sum(k.nbytes + v.nbytes for k, v in kv)
    d1 = len(cachegen.encode(kv, a.preset, format_version=1))
    print(f"| v1 | cps 8 | {d1} | x{raw / d1:.3f} | - |")
    for tb in (12, 11, 10):
        for cps in (8, 4, 2, 1):
            cfg = cachegen.CodecConfig.from_preset(a.preset, channels_per_stream=cps, table_bits=tb)
            n = len(cachegen.encode(kv, cfg))
            print(f"| v2 P={tb} | cps {cps} | {n} | x{raw / n:.3f} | {n / d1 - 1:+.2%} |", flush=True)


if __name__ == "__main__":
    main()
