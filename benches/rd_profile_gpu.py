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
    from cachegen import dispatch
    print("coefficients = the fused decoder alone (fp32 coefficients out); generic = coefficients + "
          "profile.postprocess (torch ops per layer) + copy into the buffers; on-device = GpuDecoder's "
          "untransform path into the buffers (cachegen.gpu.untransform); max err = |on-device - generic| / "
          "(2^-10 max(1, |generic|))\n")
    print("| model | tokens | device | coefficients ms | generic ms | on-device ms | on-device GB/s fp16 | max err / tol |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for model in a.models:
        for T in a.tokens:
            prof, kv = make(model, T)
            data = cp.encode(kv, prof, "default")
            c = dispatch.open_container(data)
            exts = c.header.extensions
            fp16 = sum(2 * k.size + 2 * v.size for k, v in kv)
            dev = torch.device(a.device)
            bufs = [(torch.empty(k.shape, dtype=torch.float16, device=dev), torch.empty(v.shape, dtype=torch.float16, device=dev))
                    for k, v in kv]

            def generic():
                dispatch.copy_into(bufs, cp.postprocess(dispatch.decode(c, dev), exts, prof))
            coeffs = timeit(lambda: dispatch.decode(c, dev), a.device, a.reps)
            gen = timeit(generic, a.device, a.reps)
            ref = [(k.clone(), v.clone()) for k, v in bufs]
            if dev.type == "cuda":
                from cachegen.gpu.v2 import GpuDecoder
                dec = GpuDecoder(dev)
                dec.profiles = [prof]
                ondev = timeit(lambda: dec.decode_into(c, bufs), a.device, a.reps)
                err = max(float(((x.float() - y.float()).abs() / (2.0 ** -10 * y.float().abs().clamp(min=1.0))).max())
                          for p, q in zip(bufs, ref) for x, y in zip(p, q))
                print(f"| {model} | {T} | {a.device} | {1e3 * coeffs:.2f} | {1e3 * gen:.2f} | {1e3 * ondev:.2f} | "
                      f"{fp16 / ondev / 1e9:.1f} | {err:.3f} |", flush=True)
            else:
                print(f"| {model} | {T} | {a.device} | {1e3 * coeffs:.1f} | {1e3 * gen:.1f} | - | - | - |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
