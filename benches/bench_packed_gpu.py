"""Packed quantizer parameters (EXT_PACKED) and wider table sets on the GPU decoder, side by side.

Real 1K prefills (``.gpudata/{model}_1k.npz``, benches/h200/make_gpudata.py), tiled to each
context; each model's shipped profile, its presets as shipped and with codec fields changed
(``VARIANT = field=value,...``). Per variant: size vs fp16, the decode call (GPU time between
events around ``decode_into`` with the payload on the device, untransform included, verify on
and off; median), and the largest difference to the CPU decoder's output (the inverse transform
is float32 on both, bit-exact only up to GEMM order: FORMAT_V2.md 6.1).

    python benches/bench_packed_gpu.py --models gemma3 --preset tiny-p --tokens 1024 8192 \
        --variants shipped,packed=packed_params=1,packed64=packed_params=1+tables_per_class=64
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_decode_v2 import events_median, gemma_real, load_npz, tile  # noqa: E402

import cachegen  # noqa: E402
from cachegen.format import v2 as fmt2  # noqa: E402
from cachegen.profile import codec as pc, shipped_profile  # noqa: E402


def parse_variants(spec: str) -> list:
    out = []
    for item in spec.split(","):
        name, _, fields = item.partition("=")
        kw = {}
        for f in filter(None, fields.split("+")):
            k, _, v = f.partition("=")
            kw[k] = bool(int(v)) if k in ("packed_params", "compact_directory") else int(v)
        out.append((name, kw))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["gemma3"])
    ap.add_argument("--preset", default="tiny-p")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--variants", default="shipped,packed=packed_params=1,packed64=packed_params=1+tables_per_class=64")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from cachegen.gpu.v2 import GpuDecoder
    dev = torch.device("cuda")
    rows = []
    for model in a.models:
        prof = shipped_profile(model)
        base = load_npz(f".gpudata/{model}_1k.npz")
        for T in a.tokens:
            kv = gemma_real(f".gpudata/{model}_1k.npz", T) if model == "gemma3" else tile(base, T)
            fp16 = sum(k.nbytes + v.nbytes for k, v in kv)
            for name, kw in parse_variants(a.variants):
                kw = dict(kw)
                defer = bool(kw.pop("defer", 1))     # decoder A/B: GpuDecoder.defer (not a codec field)
                side = bool(kw.pop("side", 1))       # ... and GpuDecoder.side_stream
                after = bool(kw.pop("after", 0))     # ... and GpuDecoder.params_after
                cfg = pc.preset_config(prof, a.preset)
                cfg = dataclasses.replace(cfg, **kw) if kw else cfg
                data = pc.encode(kv, prof, cfg)
                c = fmt2.parse_container(data)
                outs = [(torch.empty(k.shape, dtype=torch.float16, device=dev),
                         torch.empty(v.shape, dtype=torch.float16, device=dev)) for k, v in kv]
                dec = GpuDecoder(dev)
                dec.defer = defer
                dec.side_stream = side
                dec.params_after = after
                dec.profiles = [prof]
                payload = torch.frombuffer(bytearray(data + b"\0" * ((-len(data)) % 4)), dtype=torch.uint8).to(dev)
                dec.decode_into(c, outs, payload=payload)     # warm-up / JIT, checked
                torch.cuda.synchronize()
                ref = pc.decode(data, profiles=prof)
                diff = max(float((o.float().cpu() - torch.as_tensor(np.asarray(r)).float()).abs().max())
                           for p, q in zip(outs, ref) for o, r in zip(p, q))
                call = events_median(lambda: dec.decode_into(c, outs, payload=payload, check=False), a.reps)
                call_nv = events_median(lambda: dec.decode_into(c, outs, payload=payload, verify=False, check=False),
                                        a.reps)
                gpu = events_median(lambda: dec.decode_into(c, outs, payload=payload, check=False), a.reps,
                                    backlog=True)
                row = dict(model=model, preset=a.preset, variant=name, fields=kw, defer=defer, tokens=T,
                           ratio=fp16 / len(data),
                           bytes=len(data), packed=c.header.packed is not None, tables=int(c.header.n_tables),
                           dir_group=c.header.dir_group,
                           call_ms=call, call_noverify_ms=call_nv, gpu_ms=gpu, max_abs_diff_vs_cpu=diff)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    # side-by-side summary
    for model in a.models:
        for T in a.tokens:
            rs = [r for r in rows if r["model"] == model and r["tokens"] == T]
            b = rs[0]
            for r in rs:
                print(f"{model} {T:>6} {r['variant']:>10}: x{r['ratio']:.3f} ({r['ratio'] / b['ratio']:.4f} of "
                      f"{b['variant']}), call {r['call_ms']:.3f} ms ({r['call_ms'] / b['call_ms']:.2f}x), "
                      f"gpu {r['gpu_ms']:.3f} ms, max diff {r['max_abs_diff_vs_cpu']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
