"""Model fingerprints and chained chunk hashes.

The key of chunk ``k`` of a prompt is ``h_k = H(h_{k-1} || tokens of chunk k)`` with
``h_{-1} = H(fingerprint)``: it names the whole token prefix up to the end of chunk ``k`` *and*
the model/codec it was computed with, so two prompts share ``h_k`` exactly when they share
their first ``(k + 1) * chunk_tokens`` tokens and were run on the same model.
H is BLAKE2b-256; tokens are hashed as little-endian int64.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from ..format.container import FORMAT_VERSION

__all__ = ["Fingerprint", "chunk_hashes", "fingerprint_from_kv", "fingerprint_from_runner"]

_DTYPE_NAMES = {"float16": "float16", "half": "float16", "bfloat16": "bfloat16", "float32": "float32",
                "float": "float32"}


def _dtype_name(dt: Any) -> str:
    s = str(dt).replace("torch.", "")
    if s not in _DTYPE_NAMES:
        try:
            s = np.dtype(dt).name
        except TypeError:
            pass
    return _DTYPE_NAMES.get(s, s)


@dataclass(frozen=True)
class Fingerprint:
    """What a stored KV cache is only valid for.

    ``layer_shapes``: per layer ``(k_heads, k_dim, v_heads, v_dim)``. ``chunk_tokens`` is part of
    the identity because the chunk grid defines the keys.
    """
    model_id: str
    layer_shapes: tuple[tuple[int, int, int, int], ...]
    dtype: str
    format_version: int = FORMAT_VERSION
    chunk_tokens: int = 256
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_shapes", tuple(tuple(int(x) for x in s) for s in self.layer_shapes))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        if self.chunk_tokens < 1:
            raise ValueError("chunk_tokens must be >= 1")

    def to_json(self) -> str:
        return json.dumps({"model_id": self.model_id, "layer_shapes": [list(s) for s in self.layer_shapes],
                           "dtype": self.dtype, "format_version": self.format_version,
                           "chunk_tokens": self.chunk_tokens, "extra": [list(e) for e in self.extra]},
                          sort_keys=True, separators=(",", ":"))

    @property
    def digest(self) -> bytes:
        return hashlib.blake2b(b"cachegen-store-fp\0" + self.to_json().encode(), digest_size=32).digest()

    @property
    def num_layers(self) -> int:
        return len(self.layer_shapes)


def fingerprint_from_kv(kv: Sequence[Sequence[Any]], model_id: str, chunk_tokens: int = 256,
                        dtype: Optional[str] = None) -> Fingerprint:
    shapes = tuple((int(k.shape[1]), int(k.shape[3]), int(v.shape[1]), int(v.shape[3])) for k, v in kv)
    return Fingerprint(model_id, shapes, dtype or _dtype_name(kv[0][0].dtype), chunk_tokens=chunk_tokens)


def fingerprint_from_runner(runner: Any, model_id: Optional[str] = None, chunk_tokens: int = 256) -> Fingerprint:
    """Fingerprint of an ``OrtRunner``-like object (``num_layers``, ``num_kv_heads``, ``head_dim``,
    ``dtype``); ``model_id`` defaults to the runner's model folder name."""
    if model_id is None:
        model_id = str(getattr(runner, "model_dir", "model")).rstrip("/").split("/")[-1]
    h, d = int(runner.num_kv_heads), int(runner.head_dim)
    return Fingerprint(model_id, tuple((h, d, h, d) for _ in range(int(runner.num_layers))),
                       _dtype_name(runner.dtype), chunk_tokens=chunk_tokens)


def _token_bytes(tokens: Any) -> np.ndarray:
    if type(tokens).__module__.startswith("torch"):
        tokens = tokens.detach().cpu().numpy()
    a = np.asarray(tokens)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1:
        raise ValueError(f"tokens must be 1-D (or [1, T]), got shape {a.shape}")
    return np.ascontiguousarray(a, dtype="<i8")


def chunk_hashes(fp: Fingerprint, tokens: Any, max_chunks: Optional[int] = None) -> list[bytes]:
    """Chained hashes of the full chunks of ``tokens`` (a trailing partial chunk gets none)."""
    a = _token_bytes(tokens)
    C = fp.chunk_tokens
    n = len(a) // C
    if max_chunks is not None:
        n = min(n, max_chunks)
    out = []
    h = fp.digest
    for k in range(n):
        h = hashlib.blake2b(h + a[k * C:(k + 1) * C].tobytes(), digest_size=32).digest()
        out.append(h)
    return out
