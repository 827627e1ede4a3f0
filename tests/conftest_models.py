"""Shared real-model fixtures for the ORT / quality tests.

The ONNX builds are cached in $CACHEGEN_CACHE_DIR (or ~/.cache/cachegen/models): the first run
builds them (about 35 s for SmolLM2 and 90 s for Gemma-3 on 2 cores), later runs reuse them.
Runners and torch reference models are cached per process (``functools.cache``), so every test
module that imports these fixtures shares one instance.
"""
from __future__ import annotations

import functools

import pytest


@functools.cache
def model_dir(name: str):
    from cachegen.ort.export import export_model

    return export_model(name, precision="fp32", provider="cpu", progress=True)


@functools.cache
def runner(name: str):
    from cachegen.ort.runner import OrtRunner

    return OrtRunner(model_dir(name), provider="cpu")


@functools.cache
def torch_model(name: str):
    from cachegen.ort.export import load_torch_model_from_dir

    return load_torch_model_from_dir(model_dir(name))


@functools.cache
def text_ids(name: str):
    from cachegen.demo import demo_text

    return tuple(runner(name).encode(demo_text()))


@pytest.fixture(scope="session")
def smollm2():
    return runner("smollm2")


@pytest.fixture(scope="session")
def gemma3():
    return runner("gemma3")


@pytest.fixture(scope="session")
def smollm2_torch():
    return torch_model("smollm2")


@pytest.fixture(scope="session")
def gemma3_torch():
    return torch_model("gemma3")
