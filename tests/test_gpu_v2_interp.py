"""The v2 GPU kernel's exact arithmetic, checked without a GPU: Triton's CPU interpreter runs it
on small caches and must match the CPU reference bit for bit (fp16/bf16/fp32, batch 2, windowed
layers, per-channel steps, strided destination views) and catch every corrupted stream word
through the on-device words checksum. Skips where triton is not installed (the [gpu] extra)."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

# triton comes with the test extra (Linux x86_64); elsewhere there is no wheel to run it with.
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None and
                                 not (sys.platform == "linux" and platform.machine() == "x86_64"),
                                 reason="no triton wheel for this platform")]


@pytest.mark.parametrize("kernel", ["nested", "nested-wide", "flat"])
def test_kernel_under_interpreter_matches_reference_and_catches_corruption(kernel):
    script = Path(__file__).parent / "gpu_interp" / "check_v2.py"
    full = kernel == "nested"      # the default decoder; the others are checked on decode and streams
    n_corrupt = 10 if full else 4
    env = dict(os.environ, TRITON_INTERPRET="1", N_CORRUPT=str(n_corrupt), CACHEGEN_WORKERS="1", KERNEL=kernel,
               DECODE_ONLY="0" if full else "1")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    corrupt = res.pop("corrupt")
    if full:
        meta = res.pop("meta_crc")
        assert meta["clean_exact"] and meta["meta0"] > 2 * 256, meta     # several device CRC segments
        assert meta["caught"] == {"ChecksumError": 6}, meta
        assert res.pop("silent_case") in ("ChecksumError", "not found")
    assert all(res.values()), res
    assert corrupt.get("none", 0) == 0 and sum(corrupt.values()) == n_corrupt, corrupt
