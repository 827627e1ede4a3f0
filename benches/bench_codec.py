"""CPU codec benchmarks: encode/decode throughput (MB/s of fp16), bits per element per preset,
and the size overhead of framing + tables + stream splitting.

    python -m pytest benches/bench_codec.py --benchmark-enable      # pytest-benchmark timings
    python benches/bench_codec.py [--real] [--tokens 1024]          # a table (real = SmolLM2 KV)

Real KV: SmolLM2-135M's cache of the built-in demo text, pulled from an ORT run (the model is
exported on first use, ~40 s). Synthetic: the same shapes, random-walk data (less realistic).
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cachegen

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # tests/helpers.py

SMOL_SHAPE = dict(layers=30, heads=3, dim=64)


@functools.lru_cache(maxsize=None)
def synthetic_kv(tokens: int = 1024):
    from helpers import make_kv
    return make_kv(layers=SMOL_SHAPE["layers"], heads=SMOL_SHAPE["heads"], dim=SMOL_SHAPE["dim"],
                   tokens=tokens, seed=0)


@functools.lru_cache(maxsize=None)
def real_kv(tokens: int = 1024, model: str = "smollm2"):
    from cachegen.demo import demo_text
    from cachegen.ort import OrtRunner, export_model
    runner = OrtRunner(export_model(model, progress=False))
    ids = runner.encode(demo_text() * 4)[:tokens]
    _, kv = runner.prefill(np.asarray([ids], dtype=np.int64))
    return [(k.astype(np.float16), v.astype(np.float16)) for k, v in kv]


def fp16_bytes(kv) -> int:
    return sum(k.size * 2 + v.size * 2 for k, v in kv)


def overhead(info: dict) -> dict:
    """Framing + tables + stream splitting as a share of the entropy-coded payload; the
    quantizer side information (per-channel lo/step, token scales) reported separately."""
    b = info["breakdown"]
    payload = b["streams"]
    framing = b["header_and_index"] + b["stream_directory"]
    return {"framing_pct": 100 * framing / payload, "tables_pct": 100 * b["model_section"] / payload,
            "side_info_pct": 100 * (b["quantizer_params"] + b["token_scales"]) / payload}


@pytest.mark.parametrize("preset", ["default", "small", "cachegen-paper", "lossless"])
def test_encode(benchmark, preset):
    kv = synthetic_kv()
    data = benchmark.pedantic(cachegen.encode, args=(kv, preset), rounds=3, iterations=1)
    info = cachegen.inspect(data)
    benchmark.extra_info.update(bits_per_element=info["bits_per_element"], ratio=info["ratio_vs_fp16"])
    if info["mode"] == "lossy":
        benchmark.extra_info.update(overhead(info))
    if benchmark.stats:   # None under --benchmark-disable
        benchmark.extra_info["mb_per_s"] = fp16_bytes(kv) / benchmark.stats.stats.median / 1e6


@pytest.mark.parametrize("preset", ["default", "lossless"])
def test_decode(benchmark, preset):
    kv = synthetic_kv()
    data = cachegen.encode(kv, preset)
    out = benchmark.pedantic(cachegen.decode, args=(data,), rounds=3, iterations=1)
    assert len(out) == len(kv)
    if benchmark.stats:
        benchmark.extra_info["mb_per_s"] = fp16_bytes(kv) / benchmark.stats.stats.median / 1e6


def table(kv, label: str, presets=("default", "high", "small", "tiny", "cachegen-paper", "lossless"),
          repeats: int = 3) -> None:
    n = fp16_bytes(kv)
    print(f"\n{label}: {len(kv)} layers, {kv[0][0].shape[2]} tokens, fp16 {n / 1e6:.1f} MB; "
          f"medians of {repeats}")
    print("| preset | bits/elem | ratio vs fp16 | encode MB/s | decode MB/s | framing % | tables % | side info % |")
    print("|---|---|---|---|---|---|---|---|")
    for p in presets:
        te, td = [], []
        for _ in range(repeats):
            t = time.perf_counter(); data = cachegen.encode(kv, p); te.append(time.perf_counter() - t)
            t = time.perf_counter(); cachegen.decode(data); td.append(time.perf_counter() - t)
        info = cachegen.inspect(data)
        o = overhead(info) if info["mode"] == "lossy" else {"framing_pct": 0, "tables_pct": 0, "side_info_pct": 0}
        print(f"| {p} | {info['bits_per_element']:.3f} | {info['ratio_vs_fp16']:.2f} | "
              f"{n / np.median(te) / 1e6:.0f} | {n / np.median(td) / 1e6:.0f} | {o['framing_pct']:.2f} | "
              f"{o['tables_pct']:.2f} | {o['side_info_pct']:.2f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", action="store_true", help="also SmolLM2's real KV cache")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    table(synthetic_kv(a.tokens), "synthetic (SmolLM2 shapes)", repeats=a.repeats)
    if a.real:
        table(real_kv(a.tokens), "SmolLM2-135M real KV (demo text)", repeats=a.repeats)
