"""An LMCache serde plugin: cachegen containers as LMCache's L2 storage format.

    import cachegen.integrations.lmcache           # registers the serde type "cachegen"
    # LMCache L2 adapter config:  {"type": "fs", "base_path": "/cache",
    #                              "serde": {"type": "cachegen", "preset": "default"}}

LMCache (v1, multiprocess mode) hands a serializer each KV chunk as a ``MemoryObj`` in its
``KV_2LTD`` layout ``[2, layers, tokens, heads * head_dim]`` (fp16/bf16) and a byte buffer
sized by :meth:`CacheGenSerializer.estimate_serialized_size`; its ``AsyncSerdeProcessor``
then narrows the buffer to the bytes actually written, so the L2 tier stores only the
compressed size. Plugins register on import (LMCache has no entry-point discovery for serde
types), through ``lmcache.v1.distributed.serde.factory.register_serde_factory``.

Serde config keys: ``preset`` (a cachegen preset, default ``"default"``), ``config`` (CodecConfig
fields overriding it), ``num_kv_heads`` (split ``heads * head_dim`` into ``[heads, head_dim]``;
optional: quantization is per channel either way), ``max_workers`` (threads, default 1).

Stored bytes: ``b"CGLM" + u32 version + u64 length`` then one cachegen container (one layer per
model layer, ``[1, heads, tokens, head_dim]`` per K/V): a plain ``cachegen.decode`` reads it
(``unwrap``). The estimate is a true upper bound (the fp16 size plus the container overhead):
should a lossy container ever exceed it, the chunk is stored lossless, which zstd bounds;
deserialize checks the frame, the container's checksums and the destination's shape and dtype
and raises on any mismatch (LMCache then treats the chunk as a miss).

Needs the ``lmcache`` package, which pins numpy <= 2.2.6: use it in its own environment
(``tests/lmcache_venv/run.sh`` builds one and runs ``tests/test_lmcache.py`` there).
"""
from __future__ import annotations

import logging
import struct
from typing import Any, Mapping, Optional

from .._deps import require
from ..errors import FormatError, InputError

require("lmcache")
import torch  # noqa: E402
from lmcache.v1.distributed.serde.async_processor import AsyncSerdeProcessor  # noqa: E402
from lmcache.v1.distributed.serde.base import Deserializer, Serializer  # noqa: E402
from lmcache.v1.distributed.serde.factory import get_registered_serde_types, register_serde_factory  # noqa: E402

__all__ = ["CacheGenSerializer", "CacheGenDeserializer", "create_serde", "wrap", "unwrap", "SERDE_TYPE"]

log = logging.getLogger("cachegen.lmcache")
SERDE_TYPE = "cachegen"
_FRAME = struct.Struct("<4sIQ")
_MAGIC, _VERSION = b"CGLM", 1
_FIXED_OVERHEAD = 64 << 10          # container header + model section of a many-layer chunk
_PER_LAYER_OVERHEAD = 4 << 10


def wrap(container: bytes) -> bytes:
    return _FRAME.pack(_MAGIC, _VERSION, len(container)) + container


def unwrap(buf: Any) -> memoryview:
    """The container inside a stored chunk (bytes-like; trailing bytes of the buffer ignored)."""
    m = memoryview(buf).cast("B")
    if len(m) < _FRAME.size:
        raise FormatError(f"cachegen/lmcache chunk of {len(m)} bytes is shorter than its frame")
    magic, version, n = _FRAME.unpack_from(m, 0)
    if magic != _MAGIC:
        raise FormatError(f"not a cachegen/lmcache chunk (magic {bytes(magic)!r})")
    if version != _VERSION:
        raise FormatError(f"cachegen/lmcache frame version {version} is not supported (this reads {_VERSION})")
    if n > len(m) - _FRAME.size:
        raise FormatError(f"cachegen/lmcache chunk says {n} bytes, {len(m) - _FRAME.size} present")
    return m[_FRAME.size:_FRAME.size + n]


def _check_2ltd(t: Any, what: str) -> None:
    if t is None:
        raise InputError(f"{what}: the MemoryObj has no tensor")
    if t.dim() != 4 or t.shape[0] != 2:
        raise InputError(f"{what}: expected the KV_2LTD layout [2, layers, tokens, heads*head_dim], "
                         f"got {tuple(t.shape)}")


def _flat_bytes(obj: Any) -> torch.Tensor:
    t = obj.tensor
    if t is None:
        raise InputError("the byte buffer MemoryObj has no tensor")
    return t.reshape(-1).view(torch.uint8) if t.is_contiguous() else t.contiguous().reshape(-1).view(torch.uint8)


class CacheGenSerializer(Serializer):
    def __init__(self, preset: str = "default", config: Optional[Mapping[str, Any]] = None,
                 num_kv_heads: Optional[int] = None) -> None:
        from ..config import CodecConfig

        self.codec_config = CodecConfig.from_preset(preset, **dict(config or {}))
        self.num_kv_heads = None if num_kv_heads is None else int(num_kv_heads)

    def _layers(self, t: torch.Tensor) -> list:
        _, L, T, HD = t.shape
        H = self.num_kv_heads or 1
        if HD % H:
            raise InputError(f"hidden size {HD} is not a multiple of num_kv_heads {H}")
        # [T, H*D] -> [1, H, T, D] per layer and K/V (views where possible)
        return [(t[0, i].reshape(T, H, HD // H).permute(1, 0, 2)[None],
                 t[1, i].reshape(T, H, HD // H).permute(1, 0, 2)[None]) for i in range(L)]

    def serialize(self, src: Any, dst: Any, key: Any = None) -> int:
        import cachegen

        t = src.tensor
        _check_2ltd(t, "serialize")
        out = _flat_bytes(dst)
        data = wrap(cachegen.encode(self._layers(t.detach().cpu()), self.codec_config))
        if len(data) > out.numel() and not self.codec_config.lossless:
            log.warning("cachegen serde: %d bytes over the %d-byte buffer; storing this chunk lossless",
                        len(data), out.numel())
            data = wrap(cachegen.encode(self._layers(t.detach().cpu()), "lossless"))
        if len(data) > out.numel():
            raise InputError(f"cachegen serde: {len(data)} bytes do not fit the {out.numel()}-byte buffer")
        out[:len(data)].copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return len(data)

    def estimate_serialized_size(self, layout_desc: Any) -> int:
        """An upper bound: the chunk at 2 bytes per value (lossless fallback: zstd's bound) plus
        the container overhead. Only the bytes written are stored (the buffer is narrowed)."""
        total = 0
        for shape in layout_desc.shapes:
            n = 1
            for d in shape:
                n *= int(d)
            layers = int(shape[1]) if len(shape) == 4 else 1
            raw = 2 * n
            total += raw + raw // 128 + _FIXED_OVERHEAD + _PER_LAYER_OVERHEAD * layers + _FRAME.size
        return total


class CacheGenDeserializer(Deserializer):
    def deserialize(self, src: Any, dst: Any, key: Any = None) -> None:
        import cachegen

        out = dst.tensor
        _check_2ltd(out, "deserialize")
        raw = _flat_bytes(src).numpy()
        kv = cachegen.decode(unwrap(raw))
        _, L, T, HD = out.shape
        if len(kv) != L:
            raise FormatError(f"stored chunk has {len(kv)} layers, the destination {L}")
        for i, (k, v) in enumerate(kv):
            for j, x in enumerate((k, v)):
                b, h, t, d = x.shape
                if b != 1 or t != T or h * d != HD:
                    raise FormatError(f"layer {i}: stored {tuple(x.shape)} does not fit [{T}, {HD}]")
                if x.dtype != out.dtype:
                    raise FormatError(f"layer {i}: stored {x.dtype}, destination {out.dtype}")
                out[j, i].copy_(x[0].permute(1, 0, 2).reshape(T, HD))


def create_serde(config: Mapping[str, Any]) -> AsyncSerdeProcessor:
    """The factory LMCache calls with the serde config dict."""
    known = {"type", "preset", "config", "num_kv_heads", "max_workers"}
    unknown = set(config) - known
    if unknown:
        raise InputError(f"cachegen serde: unknown config keys {sorted(unknown)}")
    ser = CacheGenSerializer(str(config.get("preset", "default")), config.get("config"),  # type: ignore[arg-type]
                             config.get("num_kv_heads"))  # type: ignore[arg-type]
    return AsyncSerdeProcessor(ser, CacheGenDeserializer(), max_workers=int(config.get("max_workers", 1)))  # type: ignore[call-overload]


if SERDE_TYPE not in get_registered_serde_types():
    register_serde_factory(SERDE_TYPE, create_serde)
