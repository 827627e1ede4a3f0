"""Smoke-run every example on the small model so they cannot rot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*args: str, timeout: int = 600) -> str:
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{args[0]} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_compress_then_restore_and_generate(tmp_path):
    out = tmp_path / "ctx.cgk"
    run("examples/compress_ort_kv.py", "--model", "smollm2", "--out", str(out), "--max-tokens", "300")
    assert out.exists() and out.stat().st_size > 0
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["model"] == "smollm2" and len(meta["token_ids"]) == 300
    text = run("examples/restore_and_generate.py", "--cache", str(out), "-n", "8", "--compare")
    assert text.strip()


def test_measure_quality_json():
    text = run("examples/measure_quality.py", "--model", "smollm2", "--context-tokens", "256",
               "--continuation-tokens", "32", "--generate-tokens", "8", "--json")
    report = json.loads(text[text.index("{"):])
    assert report["kl_mean"] >= 0 and report["ratio"] > 2


def test_chat_reuse_redis_second_process_reuses_prefix():
    text = run("examples/chat_reuse_redis.py", "--tokens", "512", "--new-tokens", "4")
    assert "reused" in text.lower()
