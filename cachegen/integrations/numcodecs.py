"""A numcodecs codec for KV-cache arrays: ``numcodecs.get_codec({"id": "cachegen_kv"})``.

    import numcodecs, zarr
    codec = numcodecs.get_codec({"id": "cachegen_kv", "preset": "default"})
    z = zarr.create_array(store, shape=(L, 2, B, H, T, D), chunks=(1, 2, B, H, 256, D),
                          dtype="float16", zarr_format=2, compressors=codec)

One call encodes one ndarray: ``[L, 2, B, H, T, D]`` (layers x key/value) becomes an L-layer
cache; ``[B, H, T, D]`` a single tensor, coded with the key bit widths (``role="value"``: the
value widths), stored as a one-layer cache whose other half is a 1-channel zero tensor
(about 1 byte per token). float16 and float32 arrays (bfloat16 has no numpy dtype).
``decode`` returns the array in its shape and dtype (``out=`` fills a given buffer). The codec
is lossy unless ``preset="lossless"``; zarr edge chunks are padded by zarr, which is fine.

The codec is registered through the ``numcodecs.codecs`` entry point (pyproject.toml), so
``numcodecs.get_codec`` finds it without ``import cachegen`` — and so does zarr when it reads
an array's metadata.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from .._deps import require
from ..errors import FormatError, InputError

numcodecs = require("numcodecs")
from numcodecs.abc import Codec as _NCCodec  # noqa: E402
from numcodecs.compat import ensure_contiguous_ndarray, ndarray_copy  # noqa: E402

__all__ = ["KVArrayCodec"]

_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
_META = "cachegen_kv"   # key of the shape record in the container's user-metadata extension


class KVArrayCodec(_NCCodec):
    """``KVArrayCodec(preset="default", config=None, role="key")``.

    ``preset``: a cachegen preset; ``config``: CodecConfig fields overriding it (JSON object);
    ``role``: for 4-D arrays, which bit schedule (``"key"`` or ``"value"``) codes the tensor."""

    codec_id = "cachegen_kv"

    def __init__(self, preset: str = "default", config: Optional[Mapping[str, Any]] = None,
                 role: str = "key") -> None:
        from ..config import CodecConfig

        if role not in ("key", "value"):
            raise InputError(f"role must be 'key' or 'value', got {role!r}")
        self.preset, self.role = str(preset), role
        self.config = dict(config or {})
        self._cfg = CodecConfig.from_preset(self.preset, **self.config)   # bad fields fail here

    def get_config(self) -> dict:
        return {"id": self.codec_id, "preset": self.preset, "config": dict(self.config), "role": self.role}

    def __repr__(self) -> str:
        return f"KVArrayCodec(preset={self.preset!r}, config={self.config!r}, role={self.role!r})"

    # -------------------------------------------------------------- encode
    def encode(self, buf: Any) -> bytes:
        import cachegen
        from ..format.extensions import EXT_USER, Extension

        a = np.asarray(buf)
        if a.dtype not in _DTYPES:
            raise InputError(f"cachegen_kv codes float16/float32 arrays, got {a.dtype}")
        if a.size == 0:
            raise InputError(f"empty array {a.shape}")
        a = np.ascontiguousarray(a)
        if a.ndim == 6:
            if a.shape[1] != 2:
                raise InputError(f"a 6-D KV array must be [layers, 2, batch, heads, tokens, head_dim], got {a.shape}")
            kv = [(a[i, 0], a[i, 1]) for i in range(a.shape[0])]
        elif a.ndim == 4:
            pad = np.zeros((a.shape[0], 1, a.shape[2], 1), dtype=a.dtype)
            kv = [(a, pad) if self.role == "key" else (pad, a)]
        else:
            raise InputError(f"expected a [B, H, T, D] or [L, 2, B, H, T, D] array, got {a.ndim}-D {a.shape}")
        # the record says how to turn the decoded cache back into this array
        rec = Extension.json(EXT_USER, {_META: {"ndim": a.ndim, "role": self.role}})
        return cachegen.encode(kv, self._cfg, extensions=[rec])

    # -------------------------------------------------------------- decode
    def decode(self, buf: Any, out: Any = None) -> np.ndarray:
        import cachegen

        data = memoryview(ensure_contiguous_ndarray(buf).view(np.uint8))
        rec = None
        for e in cachegen.inspect(data).get("extensions", []):
            v = e.get("value")
            if isinstance(v, dict) and isinstance(v.get(_META), dict):
                rec = v[_META]
        if rec is None or rec.get("ndim") not in (4, 6) or rec.get("role") not in ("key", "value"):
            raise FormatError(f"not a cachegen_kv chunk (no valid {_META} record): {rec!r}")
        kv = cachegen.decode(data)
        if kv[0][0].dtype not in (_torch().float16, _torch().float32):
            raise FormatError(f"cachegen_kv: the container holds {kv[0][0].dtype}, which has no numpy dtype")
        if rec["ndim"] == 4:
            if len(kv) != 1:
                raise FormatError(f"cachegen_kv: a 4-D chunk must be one layer, got {len(kv)}")
            dec = kv[0][0 if rec["role"] == "key" else 1].numpy()
        else:
            if any(k.shape != v.shape or k.shape != kv[0][0].shape for k, v in kv):
                raise FormatError("cachegen_kv: layers of different shapes do not form one array")
            dec = np.stack([np.stack([k.numpy(), v.numpy()]) for k, v in kv])
        return ndarray_copy(dec, out) if out is not None else dec


def _torch() -> Any:
    import torch
    return torch


numcodecs.register_codec(KVArrayCodec)
