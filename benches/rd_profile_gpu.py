"""Restore cost of a profile container: plain decode vs decode + inverse transform (CPU or CUDA).

SmolLM2-like (30 layers, 3 KV heads x 64) and Gemma-3-like (18 layers, 1 x 256) shapes with a
random orthonormal profile (the inverse costs the same whatever the basis). Prints ms per
restore and GB/s of the fp16 cache for ``cachegen.decode`` and ``cachegen.profile.decode``.

    python benches/rd_profile_gpu.py --device cuda --tokens 8192 32768
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import cachegen
from cachegen import profile as cp

SHAPES = {"smollm2": (30, 3, 64), "gemma3": (18, 1, 256)}


def make(model: str, tokens: int, seed: int = 0):
    L, H, D = SHAPES[model]
    rng = np.random.default_rng(seed)
    C = H * D
    bases = [np.linalg.qr(rng.normal(size=(C, C)))[0].astype(np.float32) for _ in range(2 * L)]
    prof = cp.Profile(model=model, n_layers=L, kv_heads=H, head_dim=D, rope_theta=(1e4,) * L,
                      key_basis=np.stack(bases[:L]), value_basis=np.stack(bases[L:]), sinks=1)
    kv = [(rng.normal(size=(1, H, tokens, D)).astype(np.float16), rng.normal(size=(1, H, tokens, D)).astype(np.float16))
          for _ in range(L)]
    return prof, kv


def timeit(fn, device: str, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", nargs="+", type=int, default=[1024])
    ap.add_argument("--models", nargs="+", default=list(SHAPES))
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    print("| model | tokens | device | decode ms | decode + inverse ms | inverse only ms | GB/s fp16 (with inverse) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for model in a.models:
        for T in a.tokens:
            prof, kv = make(model, T)
            data = cp.encode(kv, prof, "default")
            fp16 = sum(2 * k.size + 2 * v.size for k, v in kv)
            plain = timeit(lambda: cachegen.decode(data, device=a.device), a.device, a.reps)
            full = timeit(lambda: cp.decode(data, profiles=prof, device=a.device), a.device, a.reps)
            raw = cachegen.dispatch.decode(cachegen.dispatch.open_container(data), a.device)
            exts = cachegen.dispatch.open_container(data).header.extensions
            inv = timeit(lambda: cp.postprocess(raw, exts, prof), a.device, a.reps)
            print(f"| {model} | {T} | {a.device} | {1e3 * plain:.1f} | {1e3 * full:.1f} | {1e3 * inv:.1f} | "
                  f"{fp16 / full / 1e9:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
