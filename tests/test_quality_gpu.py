"""Preset quality in the serving configuration (benches/bench_quality_gpu.py).

GPU test (the H200 machine; skipped without CUDA + onnxruntime's CUDA provider): both models'
fp16 CUDA graphs, caches restored through StaticKV (GPU decode into the bound buffers),
4 held-out windows x 1K context x 256-token continuation; ``default`` must keep the mean Δppl
within 1 % and every window's mean KL within 0.01, ``high`` a greedy agreement of at least 95 %
over 16 windows x 64 tokens. The full table (every preset, 1K and 4K, 32 greedy windows) is the
bench's job.

CPU test: the same script end to end on the fp32 CPU graphs at toy sizes (SmolLM2 only).
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cachegen.ort.cuda import cuda_provider_available

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_quality_gpu", HERE.parent / "benches" / "bench_quality_gpu.py")
bq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bq)


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not cuda_provider_available(), reason="needs a CUDA GPU and onnxruntime's CUDA execution provider")
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_presets_on_fp16_cuda_graphs(tmp_path, model):
    out = tmp_path / "q.json"
    res = bq.run("cuda", [model], ["default", "high"], [1024], windows=4, cont=256, greedy_windows=16,
                 greedy_tokens=64, greedy_context=1024, out=out)
    assert res["tokenizer"][model]["chars_per_token"] > 3.0          # not char-level
    rows = [r for r in res["windows"] if r["preset"] == "default"]
    assert len(rows) == 4
    assert max(r["statickv_path_kl"] for r in rows) < 1e-3
    mean_dppl = float(np.mean([r["delta_ppl_rel"] for r in rows]))
    assert mean_dppl <= 0.01, rows
    assert max(r["kl_mean"] for r in rows) <= 0.01, rows
    high = [r for r in res["greedy"] if r["preset"] == "high"][0]
    assert high["windows"] == 16 and high["agreement"] >= 0.95, high


@pytest.mark.slow
def test_quality_script_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "sub" / "q.json"
    res = bq.run("cpu", ["smollm2"], ["default", "lossless"], [128], windows=1, cont=16, greedy_windows=2,
                 greedy_tokens=8, greedy_context=128, out=out, threads=2)
    saved = json.loads(out.read_text())
    assert saved["windows"] == res["windows"] and len(res["windows"]) == 2
    lossless = [r for r in res["windows"] if r["preset"] == "lossless"][0]
    assert lossless["kl_mean"] == 0.0 and lossless["delta_ppl_rel"] == 0.0 and lossless["top1"] == 1.0
    default = [r for r in res["windows"] if r["preset"] == "default"][0]
    assert 0.0 < default["kl_mean"] < 0.1 and default["statickv_path_kl"] < 1e-6
    g = {r["preset"]: r for r in res["greedy"]}
    assert g["lossless"]["agreement"] == 1.0 and g["lossless"]["identical"] == 2
    md = out.with_suffix(".md").read_text()
    assert "| smollm2 | 128 | default | 1 |" in md and "greedy agreement" in md
    # resumable: a second run finds every row done and adds none
    again = bq.run("cpu", ["smollm2"], ["default", "lossless"], [128], windows=1, cont=16, greedy_windows=2,
                   greedy_tokens=8, greedy_context=128, out=out, threads=2)
    assert len(again["windows"]) == 2 and len(again["greedy"]) == 2
