"""GPU decoder benchmarks (needs CUDA): throughput in GB/s of fp16 output, kernel vs end to end,
vs the CPU decoder and vs a device-to-device copy of the same bytes; a tuning sweep.

    python benches/bench_gpu.py [--tokens 1024 4096 8192 16384 32768] [--sweep]   # tables
    python -m pytest benches/bench_gpu.py --benchmark-enable                        # pytest-benchmark

Data: real KV caches (SmolLM2-135M and Gemma-3-270M, 1,024 tokens of the built-in demo text,
ORT fp32 on CPU, cast to fp16, encoded with the "default" preset) stored as containers in
.gpudata/{model}_1k_default.cgk (make them with --make-data on a machine with the ORT models).
Longer caches are built by repeating those real chunks (compressed bytes, tables and statistics
of the real cache; only the chunk order repeats). Gemma-3's sliding-window layers (5 of 6)
keep 512 tokens, as a windowed cache stores them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cachegen
from cachegen.format.container import (Header, LayerInfo, build_container, chunk_blocks, pack_lossy_chunk,
                                       parse_container, parse_lossy_chunk)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / ".gpudata"
MODELS = {
    # name: (layers, kv heads, head_dim, sliding layers (index -> window))
    "smollm2": (30, 3, 64, {}),
    "gemma3": (18, 1, 256, {i: 512 for i in range(18) if (i + 1) % 6 != 0}),
}
for _cps in (1, 2, 4):  # SmolLM2 re-encoded with fewer channels per stream (more, shorter streams)
    MODELS[f"smollm2cps{_cps}"] = MODELS["smollm2"]


def make_data(tokens: int = 1024) -> None:
    from importlib.resources import files
    from cachegen.ort import OrtRunner, export_model
    text = files("cachegen.data").joinpath("demo_text.txt").read_text()
    DATA.mkdir(exist_ok=True)
    for name in MODELS:
        r = OrtRunner(export_model(name, "fp32", "cpu"))
        ids = r.encode(text)
        while len(ids) < tokens:
            ids = ids + ids
        _, kv = r.prefill(ids[:tokens])
        kv16 = [(torch.as_tensor(np.asarray(k)).half(), torch.as_tensor(np.asarray(v)).half()) for k, v in kv]
        (DATA / f"{name}_1k_default.cgk").write_bytes(cachegen.encode(kv16, "default"))


def source_container(model: str) -> bytes:
    p = DATA / f"{model}_1k_default.cgk"
    if p.exists():
        return p.read_bytes()
    # Fallback: synthetic data of the model's shape (less realistic statistics).
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_kv
    L, H, D, _ = MODELS[model]
    return cachegen.encode(make_kv(layers=L, heads=H, dim=D, tokens=1024, seed=0, torch_out=True), "default")


def extend_container(src: bytes, tokens: int, windows: dict) -> bytes:
    """A container of `tokens` tokens built from the real chunks of `src` (repeated in order);
    layer i holds min(tokens, windows[i]) tokens when it has a window."""
    c = parse_container(src)
    h = c.header
    C = h.chunk_tokens
    full = [k for k in range(c.n_chunks) if all(n == C for _, _, n in chunk_blocks(h, k))]
    assert full, "source needs at least one full chunk"
    layers = [dataclasses.replace(l, tokens=min(tokens, windows.get(i, tokens))) for i, l in enumerate(h.layers)]
    nh = dataclasses.replace(h, layers=layers)
    src_chunks = {k: parse_lossy_chunk(c, k) for k in full}
    payloads = []
    for k in range(nh.n_chunks):
        ch = src_chunks[full[k % len(full)]]
        lo, step, streams, exps = [], [], [], []
        for (i, kv, n) in chunk_blocks(nh, k):
            b = ch.blocks.index((i, kv, C))
            assert n == C, "token counts must be multiples of the chunk size"
            s0 = ch.first_stream[b]
            s1 = ch.first_stream[b + 1] if b + 1 < len(ch.blocks) else ch.stream_lengths.size
            lo.append(ch.lo[b])
            step.append(ch.step[b])
            exps.append(ch.token_exp[b])
            for s in range(s0, s1):
                streams.append(ch.words[ch.stream_ends[s] - ch.stream_lengths[s]:ch.stream_ends[s]])
        payloads.append(pack_lossy_chunk(nh, k, lo, step, streams, exps))
    return build_container(nh, payloads, zstd_level=3)


def fp16_bytes(c) -> int:
    h = c.header
    return sum(h.batch * t * (l.channels(0) + l.channels(1)) for l, t in zip(h.layers, c.tokens())) * 2


def cuda_time(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


def wall_time(fn, reps: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def measure(model: str, tokens: int, cpu: bool = False, **launch_kw) -> dict:
    from cachegen import gpu
    dev = torch.device("cuda")
    data = extend_container(source_container(model), tokens, MODELS[model][3])
    c = parse_container(data)
    nbytes = fp16_bytes(c)
    out = gpu._alloc(c, dev)
    prep_kw = {k: launch_kw.pop(k) for k in ("packed",) if k in launch_kw}
    prep_kw.update({k: launch_kw[k] for k in ("lut_bits", "tile_t", "tile_c", "block") if k in launch_kw})
    t0 = time.perf_counter()
    prep = gpu.prepare(c, dev, **prep_kw)
    torch.cuda.synchronize()
    t_prep = (time.perf_counter() - t0) * 1e3
    gpu.launch(prep, out, c, **launch_kw)  # checks errors once
    ref = None
    if cpu:
        t0 = time.perf_counter()
        ref = cachegen.decode(data)
        t_cpu = (time.perf_counter() - t0) * 1e3
        for (a, b), (x, y) in zip(ref, out):
            assert torch.equal(a.view(torch.int16), x.cpu().view(torch.int16))
            assert torch.equal(b.view(torch.int16), y.cpu().view(torch.int16))
    else:
        t_cpu = float("nan")
    k_ms = cuda_time(lambda: gpu.launch(prep, out, c, check=False, **launch_kw))
    flat = torch.empty(nbytes // 2, dtype=torch.float16, device=dev).normal_()
    dst = torch.empty_like(flat)
    copy_ms = cuda_time(lambda: dst.copy_(flat))
    e2e_ms = wall_time(lambda: cachegen.decode(data, device="cuda"))
    e2e_nv_ms = wall_time(lambda: cachegen.decode(data, device="cuda", verify=False))
    # host-side breakdown (new chunk parser): container parse, plan (chunk parse + CRC), LUTs
    from cachegen.gpu.plan import build_plan, symbol_luts
    t_parse = wall_time(lambda: parse_container(data))
    t_plan = wall_time(lambda: build_plan(c, True, gpu.TILE_T, gpu.TILE_C))
    t_plan_nv = wall_time(lambda: build_plan(c, False, gpu.TILE_T, gpu.TILE_C))
    t_lut = wall_time(lambda: symbol_luts(c.header.freqs, c.header.cdfs, gpu.LUT_BITS, gpu.PACKED))
    t_prep2 = wall_time(lambda: gpu.prepare(c, dev))
    blob = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    h2d_ms = cuda_time(lambda: blob.to(dev), reps=10)
    return dict(model=model, tokens=tokens, fp16_MB=nbytes / 1e6, comp_MB=len(data) / 1e6,
                ratio=nbytes / len(data), kernel_ms=k_ms, kernel_GBs=nbytes / k_ms / 1e6,
                e2e_ms=e2e_ms, e2e_GBs=nbytes / e2e_ms / 1e6, e2e_noverify_ms=e2e_nv_ms,
                parse_ms=t_parse, plan_ms=t_plan, plan_noverify_ms=t_plan_nv, lut_ms=t_lut,
                prep_ms=t_prep2, prep_first_ms=t_prep, h2d_ms=h2d_ms,
                copy_ms=copy_ms, copy_GBs=2 * nbytes / copy_ms / 1e6, cpu_ms=t_cpu,
                cpu_GBs=nbytes / t_cpu / 1e6 if cpu else float("nan"))


def phase_split(model: str, tokens: int) -> tuple[float, float]:
    """Kernel times of the two phases separately (ms)."""
    from cachegen import gpu
    from cachegen.gpu import kernels
    dev = torch.device("cuda")
    data = extend_container(source_container(model), tokens, MODELS[model][3])
    c = parse_container(data)
    out = gpu._alloc(c, dev)
    prep = gpu.prepare(c, dev)
    orig = kernels.dequant_kernel
    t_all = cuda_time(lambda: gpu.launch(prep, out, c, check=False))

    class _Skip:
        def __getitem__(self, grid):
            return lambda *a, **k: None
    kernels.dequant_kernel = _Skip()
    try:
        t1 = cuda_time(lambda: gpu.launch(prep, out, c, check=False))
    finally:
        kernels.dequant_kernel = orig
    return t1, t_all - t1


def _table(rows, cols):
    print(" | ".join(f"{k:>10}" for k in cols))
    for r in rows:
        print(" | ".join(f"{r[k]:>10.3f}" if isinstance(r[k], float) else f"{r[k]:>10}" for k in cols))


# ------------------------------------------------------------------------------ pytest-benchmark

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("tokens", [1024, 8192])
def test_gpu_decode_kernel(benchmark, model, tokens):
    from cachegen import gpu
    data = extend_container(source_container(model), tokens, MODELS[model][3])
    c = parse_container(data)
    out = gpu._alloc(c, "cuda")
    prep = gpu.prepare(c, torch.device("cuda"))

    def run():
        gpu.launch(prep, out, c, check=False)
        torch.cuda.synchronize()
    benchmark(run)


@needs_cuda
@pytest.mark.parametrize("model", list(MODELS))
def test_gpu_decode_end_to_end(benchmark, model):
    data = extend_container(source_container(model), 8192, MODELS[model][3])

    def run():
        cachegen.decode(data, device="cuda")
        torch.cuda.synchronize()
    benchmark(run)


def sweep(models, tokens: int = 8192) -> None:
    """Kernel-only time of the variants (LUT layout/size, search, lanes per program) at 8K."""
    from cachegen import gpu
    dev = torch.device("cuda")
    rows = []
    for model in models:
        data = extend_container(source_container(model), tokens, MODELS[model][3])
        c = parse_container(data)
        nbytes = fp16_bytes(c)
        out = gpu._alloc(c, dev)
        variants = [(p, lb, sw, bl, nw) for p in (True, False) for lb in (8, 10, 12) for sw in (True, False)
                    for bl, nw in ((32, 1), (64, 2))]
        if model != "smollm2":
            variants = [v for v in variants if v[0] and v[2] and v[3] == 32]
        for packed, lb, sw, bl, nw in variants:
            prep = gpu.prepare(c, dev, lut_bits=lb, block=bl, packed=packed)
            kw = dict(lut_bits=lb, search_while=sw, block=bl, num_warps=nw)
            gpu.launch(prep, out, c, **kw)
            ms = cuda_time(lambda: gpu.launch(prep, out, c, check=False, **kw), reps=10)
            rows.append(dict(model=model, packed=int(packed), lut=lb, srch="while" if sw else "fixed", block=bl,
                             iters=prep.search_iters, kernel_ms=ms, GBs=nbytes / ms / 1e6))
        t1, t2 = phase_split(model, tokens)
        print(f"phase split {model} {tokens}: ans {t1:.3f} ms, dequant {t2:.3f} ms (default variant)", flush=True)
    _table(rows, ["model", "packed", "lut", "srch", "block", "iters", "kernel_ms", "GBs"])


def dq_sweep(model: str = "smollm2", tokens: int = 8192) -> None:
    """Dequant-kernel variants (tile shape, warps): time of phase 2 alone."""
    from cachegen import gpu
    from cachegen.gpu import kernels
    dev = torch.device("cuda")
    data = extend_container(source_container(model), tokens, MODELS[model][3])
    c = parse_container(data)
    nbytes = fp16_bytes(c)
    out = gpu._alloc(c, dev)
    rows = []
    for bt, bc, nw in ((8, 256, 4), (8, 256, 8), (4, 256, 4), (4, 256, 2), (2, 256, 2), (2, 256, 1), (1, 256, 1), (16, 256, 8)):
        prep = gpu.prepare(c, dev, tile_t=bt, tile_c=bc)
        kw = dict(tile_t=bt, tile_c=bc, dq_warps=nw)
        gpu.launch(prep, out, c, **kw)
        t_all = cuda_time(lambda: gpu.launch(prep, out, c, check=False, **kw), reps=10)
        orig = kernels.dequant_kernel

        class _Skip:
            def __getitem__(self, grid):
                return lambda *a, **k: None
        kernels.dequant_kernel = _Skip()
        try:
            t1 = cuda_time(lambda: gpu.launch(prep, out, c, check=False, **kw), reps=10)
        finally:
            kernels.dequant_kernel = orig
        rows.append(dict(bt=bt, bc=bc, warps=nw, all_ms=t_all, ans_ms=t1, dq_ms=t_all - t1,
                         dq_GBs=nbytes / (t_all - t1) / 1e6))
    _table(rows, ["bt", "bc", "warps", "all_ms", "ans_ms", "dq_ms", "dq_GBs"])
    best = min(rows, key=lambda r: r["dq_ms"])
    gpu.TILE_T, gpu.TILE_C, gpu.DQ_WARPS = best["bt"], best["bc"], best["warps"]
    print(f"using tile {best['bt']}x{best['bc']}, {best['warps']} warps", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="*", default=[1024, 4096, 8192, 16384, 32768])
    ap.add_argument("--models", nargs="*", default=["smollm2", "gemma3"])
    ap.add_argument("--cpu-max", type=int, default=4096, help="run the CPU decoder up to this many tokens")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--make-data", action="store_true")
    ap.add_argument("--dq-sweep", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.dq_sweep:
        dq_sweep()
    if a.make_data:
        make_data()
        return
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    if a.sweep:
        sweep(a.models + [m for m in ("smollm2cps4", "smollm2cps2", "smollm2cps1") if (DATA / f"{m}_1k_default.cgk").exists()])
    rows = []
    for model in a.models:
        for t in a.tokens:
            rows.append(measure(model, t, cpu=t <= a.cpu_max))
            print(rows[-1], flush=True)
    _table(rows, ["model", "tokens", "fp16_MB", "comp_MB", "ratio", "kernel_ms", "kernel_GBs", "e2e_ms",
                  "e2e_GBs", "e2e_noverify_ms", "prep_ms", "parse_ms", "plan_ms", "plan_noverify_ms", "lut_ms",
                  "h2d_ms", "copy_GBs", "cpu_ms", "cpu_GBs"])
    if a.json:
        import json
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
