"""cachegen: compress, store and restore LLM KV caches (CacheGen-style codec).

    data = cachegen.encode(kv, "default")      # kv: [(key, value)] per layer, [B, H, T, D]
    kv2 = cachegen.decode(data)                # torch tensors, same layout and dtype
"""
from .errors import (CacheGenError, ChecksumError, ConfigError, FormatError, InputError,  # noqa: F401
                     LimitExceededError, StreamError, UnsupportedVersionError)
from .config import PRESETS, CodecConfig, get_config  # noqa: F401
from .format.container import DecodeLimits, FORMAT_VERSION  # noqa: F401
from .api import (Codec, decode, decode_into, encode, get_codec, inspect, load, register_codec,  # noqa: F401
                  save)

__version__ = "0.1.0"
