"""Host-side cost of the GPU decoder's call, measured on a CPU: GpuDecoder.decode_into of a model-profile
container with every Triton kernel and the GEMM stubbed out (Triton's interpreter mode, a CPU device),
so what is timed is our Python: plan lookups, per-call metadata, LUT caches, buffer checks, the
untransformer's groups. On the H200 host this is part of the decoder call (RESULTS §17: the 8K
restore is host-bound); kernel launches and CUDA API calls are not in it.

    TRITON_INTERPRET=1 python benches/prof_host_decoder.py --model gemma3 --tokens 8128 [--profile]

Needs ``.gpudata/{model}_1k.npz`` (benches/h200/make_gpudata.py).
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


class _Stub:
    """A launched kernel that does nothing, counting its launches."""
    launches = 0

    def __getitem__(self, grid):
        return self

    def __call__(self, *a, **k):
        _Stub.launches += 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gemma3")
    ap.add_argument("--tokens", type=int, default=8128)
    ap.add_argument("--preset", default="tiny-p")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="cProfile the calls (by own time)")
    a = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("run with TRITON_INTERPRET=1 (the decoder accepts a CPU device only then)")
    import torch
    from bench_decode_v2 import gemma_real, load_npz, tile
    import cachegen.gpu.kernels_untransform as kut
    import cachegen.gpu.kernels_v2 as kv2
    import cachegen.gpu.untransform as ut
    from cachegen.format import v2 as fmt2
    from cachegen.gpu.v2 import GpuDecoder
    from cachegen.profile import codec as pc, shipped_profile

    for mod in (kv2, kut):
        for name in dir(mod):
            if name.endswith("_kernel"):
                setattr(mod, name, _Stub())
    ut.torch = _TorchNoBmm(torch)
    src = os.path.join(".gpudata", f"{a.model}_1k.npz")
    kv = gemma_real(src, a.tokens) if a.model == "gemma3" else tile(load_npz(src), a.tokens)
    prof = shipped_profile(a.model)
    data = pc.encode(kv, prof, pc.preset_config(prof, a.preset))
    c = fmt2.parse_container(data)
    bufs = [(torch.empty(k.shape, dtype=torch.float16), torch.empty(v.shape, dtype=torch.float16)) for k, v in kv]
    dec = GpuDecoder("cpu")
    dec.profiles = [prof]
    payload = torch.frombuffer(bytearray(data + b"\0" * ((-len(data)) % 4)), dtype=torch.uint8)

    def once():
        dec.decode_into(c, bufs, payload=payload, check=False)

    once()
    _Stub.launches = 0
    once()
    n_launch = _Stub.launches
    ts = []
    for _ in range(a.reps):
        t = time.perf_counter()
        once()
        ts.append(time.perf_counter() - t)
    print(f"{a.model} {a.tokens} tokens, {a.preset}: {n_launch} kernel launches per call; host Python of the call "
          f"(kernels and GEMMs stubbed) median {statistics.median(ts) * 1e3:.3f} ms, min {min(ts) * 1e3:.3f} ms")
    if a.profile:
        pr = cProfile.Profile()
        pr.runcall(lambda: [once() for _ in range(a.reps)])
        pstats.Stats(pr).sort_stats("tottime").print_stats(20)
    return 0


class _TorchNoBmm:
    """torch, with bmm returning its first operand (the untransform GEMM is device work)."""

    def __init__(self, torch):
        self._t = torch

    def bmm(self, x, b):
        return x

    def __getattr__(self, name):
        return getattr(self._t, name)


if __name__ == "__main__":
    sys.exit(main())
