"""Format v2 GPU decoder: correctness vs the CPU reference and throughput on real KV statistics.

    python benches/bench_decode_v2.py --npz .gpudata/smollm2_1k.npz --tokens 1024 8192 32768 \
        --cps 2 4 8 --table-bits 12 --out $OUT/decode_v2.json

The npz holds a real 1K-token fp16 cache (k{i}/v{i}); longer contexts tile it along tokens
(every chunk is a real chunk). ``--gemma`` adds a synthetic Gemma-3-270M-shaped cache (18 layers,
1 KV head, head_dim 256, 15 sliding layers of 512 tokens). Figures: kernel = one launch with the
payload already on the device (CUDA events, median); host = CPU time of decode_into's host part
(parse + CRC of metadata + plan + launch); e2e = bytes in pinned host memory -> KV in the
destination buffers (wall clock, synchronized). GB/s = fp16 output bytes / time.
kernel = GPU time of a decode_into(verify=False) call with its launches queued behind a GPU
sleep (so the host's launch speed does not bound it); call = the same between events without
the backlog (bounded by the host when its launches are slower than the GPU); verified = GPU
time with the device checks (words sums, metadata CRCs).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import cachegen  # noqa: E402
from cachegen.format import v2 as fmt2  # noqa: E402


def load_npz(path: str):
    z = np.load(path)
    L = sum(1 for k in z.keys() if k.startswith("k"))
    return [(z[f"k{i}"].astype(np.float16), z[f"v{i}"].astype(np.float16)) for i in range(L)]


def tile(kv, tokens: int):
    out = []
    for k, v in kv:
        reps = -(-tokens // k.shape[2])
        out.append((np.tile(k, (1, 1, reps, 1))[:, :, :tokens], np.tile(v, (1, 1, reps, 1))[:, :, :tokens]))
    return out


def gemma_real(path: str, tokens: int):
    """A real Gemma-3 cache (npz of a 1K prefill, sliding layers already cut to their 512-token
    window), tiled to `tokens`: full-attention layers (every 6th) hold `tokens`, the others
    min(512, tokens)."""
    base = load_npz(path)
    out = []
    for i, (k, v) in enumerate(base):
        T = tokens if (i % 6) == 5 else min(512, tokens)
        (tk, tv), = tile([(k, v)], T)
        out.append((tk, tv))
    return out


def gemma_like(tokens: int, seed: int = 0):
    from helpers import make_kv
    lengths = [tokens if (i % 6) == 5 else min(512, tokens) for i in range(18)]
    return make_kv(layers=18, heads=1, tokens=tokens, dim=256, dtype="float16", lengths=lengths, seed=seed)


def bits(t):
    return t.detach().cpu().view(torch.int16).numpy()


def events_median(fn, reps: int, backlog: bool = False) -> float:
    """Median ms between events around fn(). backlog: queue a ~5 ms GPU sleep first, so every
    launch of fn() is queued before the GPU reaches the first event: the figure is then the GPU
    time of fn's work alone, not bounded by how fast the host launches it."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if backlog:
            torch.cuda._sleep(10_000_000)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def run_case(name, kv, cfg, dec_args, reps, check_ref, rows, kernels=("nested",)):
    from cachegen.gpu.v2 import GpuDecoder
    data = cachegen.encode(kv, cfg)
    c = fmt2.parse_container(data)
    fp16 = sum(k.nbytes + v.nbytes for k, v in kv)
    dev = torch.device("cuda")
    outs = [(torch.empty(k.shape, dtype=torch.float16, device=dev), torch.empty(v.shape, dtype=torch.float16, device=dev))
            for k, v in kv]
    ref = cachegen.decode(data) if check_ref else None
    for (block, nw), kern in [(d, k) for d in dec_args for k in kernels]:
        dec = GpuDecoder(dev, block=block, num_warps=nw, kernel=kern)
        pad = (-len(data)) % 4
        payload = torch.frombuffer(bytearray(data + b"\0" * pad), dtype=torch.uint8).to(dev)
        for o in outs:
            o[0].fill_(0)
            o[1].fill_(0)
        dec.decode_into(c, outs, payload=payload)          # warm-up / JIT
        torch.cuda.synchronize()
        exact = None if ref is None else all(np.array_equal(bits(a), bits(r)) for p, q in zip(outs, ref)
                                             for a, r in zip(p, q))
        call_ms = events_median(lambda: dec.decode_into(c, outs, payload=payload, verify=False, check=False), reps)
        k_ms = events_median(lambda: dec.decode_into(c, outs, payload=payload, verify=False, check=False), reps,
                             backlog=True)
        ver_ms = events_median(lambda: dec.decode_into(c, outs, payload=payload, check=False), reps, backlog=True)
        # host part: parse + CRC + plan + launch (payload on device), then the sync
        host, cpu, parts = [], [], []
        for _ in range(reps):
            t0, p0 = time.perf_counter(), time.process_time()
            cc = fmt2.parse_container(data)
            dec.decode_into(cc, outs, payload=payload, check=False)
            t1, p1 = time.perf_counter(), time.process_time()
            torch.cuda.synchronize()
            host.append((t1 - t0) * 1e3)
            cpu.append((p1 - p0) * 1e3)
            parts.append(dec.last_timing)
        pinned = torch.empty(len(data), dtype=torch.uint8, pin_memory=True)
        pinned.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
        pv = memoryview(pinned.numpy())
        e2e = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            dec.decode_into(pv, outs)
            e2e.append((time.perf_counter() - t0) * 1e3)
        row = dict(case=name, tokens=int(max(k.shape[2] for k, _ in kv)), cps=cfg.channels_per_stream,
                   chunk=cfg.chunk_tokens,
                   table_bits=cfg.table_bits, kernel=kern, block=block, warps=nw, fp16_mb=fp16 / 1e6,
                   comp_mb=len(data) / 1e6, ratio=fp16 / len(data), streams=int(dec.plan(c).n_streams),
                   kernel_ms=k_ms, kernel_gbs=fp16 / k_ms / 1e6, call_ms=call_ms, verified_gpu_ms=ver_ms, host_ms=statistics.median(host),
                   host_cpu_ms=statistics.median(cpu), e2e_ms=statistics.median(e2e),
                   e2e_gbs=fp16 / statistics.median(e2e) / 1e6, exact=exact,
                   host_parts={f: statistics.median(getattr(t, f) for t in parts)
                               for f in ("verify_ms", "plan_ms", "stage_ms", "lut_ms", "launch_ms", "total_ms")})
        rows.append(row)
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--npz", default=".gpudata/smollm2_1k.npz")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--cps", type=int, nargs="+", default=[4])
    ap.add_argument("--chunk", type=int, nargs="+", default=[256],
                    help="chunk tokens; with as many values as --cps they pair up (cps[i], chunk[i]), else every combination")
    ap.add_argument("--table-bits", type=int, nargs="+", default=[12])
    ap.add_argument("--sweep", default="64x2", help="BLOCKxWARPS list, comma separated")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--kernels", default="nested", help="GpuDecoder kernels to compare, comma separated (nested,flat)")
    ap.add_argument("--gemma", action="store_true", help="add Gemma-3: real (--gemma-npz) or synthetic")
    ap.add_argument("--gemma-npz", default=".gpudata/gemma3_1k.npz")
    ap.add_argument("--check-max", type=int, default=8192, help="check vs CPU reference up to this many tokens")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dec_args = [tuple(int(x) for x in s.split("x")) for s in a.sweep.split(",")]
    rows: list = []
    kernels = tuple(a.kernels.split(","))
    base = load_npz(a.npz) if os.path.exists(a.npz) else None
    for T in a.tokens:
        pairs = (list(zip(a.cps, a.chunk)) if len(a.cps) == len(a.chunk) and len(a.cps) > 1
                 else [(c, k) for c in a.cps for k in a.chunk])
        for cps, chunk in pairs:
            for tb in a.table_bits:
                cfg = cachegen.CodecConfig.from_preset("default", channels_per_stream=cps, table_bits=tb,
                                                       chunk_tokens=chunk)
                if base is not None:
                    run_case("smollm2", tile(base, T), cfg, dec_args, a.reps, T <= a.check_max, rows, kernels)
                if a.gemma and os.path.exists(a.gemma_npz):
                    run_case("gemma3", gemma_real(a.gemma_npz, T), cfg, dec_args, a.reps, T <= a.check_max, rows, kernels)
                elif a.gemma:
                    run_case("gemma3-shape", gemma_like(T), cfg, dec_args, a.reps, T <= a.check_max, rows, kernels)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    print("\n| case | tokens | cps | chunk | tb | kernel | block x warps | ratio | streams | kernel ms | kernel GB/s | verified GPU ms | call ms | host ms (cpu) | e2e ms | e2e GB/s | exact |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['tokens']} | {r['cps']} | {r.get('chunk', 256)} | {r['table_bits']} | {r['kernel']} | {r['block']}x{r['warps']} | {r['ratio']:.2f} | "
              f"{r['streams']} | {r['kernel_ms']:.3f} | {r['kernel_gbs']:.0f} | {r['verified_gpu_ms']:.3f} | {r['call_ms']:.3f} | {r['host_ms']:.2f} ({r['host_cpu_ms']:.2f}) | "
              f"{r['e2e_ms']:.2f} | {r['e2e_gbs']:.1f} | {r['exact']} |")


if __name__ == "__main__":
    main()
