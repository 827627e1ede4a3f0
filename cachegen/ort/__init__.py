"""ONNX Runtime side of cachegen: export the reference models and run them with explicit KV.

``export_model``/``load_tokenizer`` live in :mod:`cachegen.ort.export`, ``OrtRunner`` in
:mod:`cachegen.ort.runner`; both are importable from here (lazily, so that
``python -m cachegen.ort.export`` does not import itself twice).
"""
from __future__ import annotations

__all__ = ["export_model", "load_tokenizer", "model_cache_path", "OrtRunner"]


def __getattr__(name):
    if name in ("export_model", "load_tokenizer", "model_cache_path"):
        from . import export

        return getattr(export, name)
    if name == "OrtRunner":
        from .runner import OrtRunner

        return OrtRunner
    raise AttributeError(name)
