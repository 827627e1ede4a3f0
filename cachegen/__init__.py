"""cachegen: compress, store and restore LLM KV caches (CacheGen-style codec).

    data = cachegen.encode(kv, "default")      # kv: [(key, value)] per layer, [B, H, T, D]
    kv2 = cachegen.decode(data)                # torch tensors, same layout and dtype

``import cachegen`` loads only the exception hierarchy and the configuration; the codec (numpy,
torch, constriction) is imported on first use of one of its names (PEP 562 module __getattr__).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (CacheGenError, ChecksumError, ConfigError, FormatError, InputError,  # noqa: F401
                     LimitExceededError, MissingDependencyError, StreamError, UnsupportedVersionError)
from .config import PRESETS, CodecConfig, get_config  # noqa: F401

__version__ = "0.1.0"

# name -> module that defines it, imported when the name is first looked up
_LAZY = {
    "DecodeLimits": ".format.container",
    "FORMAT_VERSION": ".format.container",
    **{name: ".api" for name in ("Codec", "decode", "decode_into", "encode", "get_codec", "inspect",
                                 "load", "register_codec", "save")},
}

__all__ = sorted({"CacheGenError", "ChecksumError", "ConfigError", "FormatError", "InputError",
                  "LimitExceededError", "MissingDependencyError", "StreamError",
                  "UnsupportedVersionError", "PRESETS", "CodecConfig", "get_config", "__version__",
                  *_LAZY})

if TYPE_CHECKING:  # static checkers and IDEs see the real names
    from .api import (Codec, decode, decode_into, encode, get_codec, inspect, load,  # noqa: F401
                      register_codec, save)
    from .format.container import FORMAT_VERSION, DecodeLimits  # noqa: F401


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'cachegen' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod, __name__), name)
    globals()[name] = value          # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
