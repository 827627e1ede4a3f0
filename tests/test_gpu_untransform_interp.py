"""The GPU decoder's inverse profile transform (cachegen.gpu.untransform), checked without a GPU:
Triton's CPU interpreter runs its kernels. With the stream-interleaved coefficient scratch
(default) the output must meet FORMAT_V2 6.1's tolerance with exact sinks; with the natural
order it must equal the CPU reference path bit for bit (fp16 with windowed layers, bf16 batch 2,
fp32, head_dim 16 / 32 / 64; strided destination views; each case checks its scratch layout);
the golden vector the tolerance."""
from __future__ import annotations

import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None and
                                 not (sys.platform == "linux" and platform.machine() == "x86_64"),
                                 reason="no triton wheel for this platform")]


def test_untransform_under_interpreter_matches_reference():
    script = Path(__file__).parent / "gpu_interp" / "check_untransform.py"
    env = dict(os.environ, TRITON_INTERPRET="1", CACHEGEN_WORKERS="1")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res.pop("missing-profile") == "ConfigError", res
    assert all(v is True for v in res.values()), res
