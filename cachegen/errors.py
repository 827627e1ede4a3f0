"""The exception hierarchy. Every problem with input data raises a CacheGenError."""
from __future__ import annotations


class CacheGenError(ValueError):
    """Base class for every error cachegen raises on bad input or bad data."""


class FormatError(CacheGenError):
    """The bytes are not a well-formed cachegen container (bad magic, truncated, inconsistent)."""


class ChecksumError(FormatError):
    """A header or chunk checksum does not match its bytes."""


class UnsupportedVersionError(FormatError):
    """The container was written by a newer, incompatible format version."""


class LimitExceededError(FormatError):
    """The data asks for more than a decoder limit allows (size, shape, expansion)."""


class StreamError(FormatError):
    """An entropy-coded stream did not decode cleanly (wrong length or final state)."""


class ModelError(CacheGenError):
    """A model export or its tokenizer is unusable (e.g. the tokenizer splits text into characters)."""


class ConfigError(CacheGenError):
    """A codec configuration is invalid."""


class InputError(CacheGenError):
    """The KV cache handed to the encoder is malformed (shape, dtype, non-finite values)."""


class MissingDependencyError(CacheGenError, ImportError):
    """An optional dependency (a pip extra such as ``cachegen[ort]``) is not installed.

    Also an ImportError, so ``except ImportError`` keeps working for callers that probe."""
