"""ONNX Runtime side of cachegen: export the reference models and run them with explicit KV."""
from __future__ import annotations

from .export import export_model, load_tokenizer, model_cache_path  # noqa: F401

__all__ = ["export_model", "load_tokenizer", "model_cache_path", "OrtRunner"]


def __getattr__(name):  # lazy: importing the runner pulls in onnxruntime
    if name == "OrtRunner":
        from .runner import OrtRunner

        return OrtRunner
    raise AttributeError(name)
