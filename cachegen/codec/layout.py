"""Normalising a KV cache to numpy, and the stream plan shared by encoder and decoders."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from ..format.container import DTYPE_BY_NAME, DTYPE_CODES, DecodeLimits, Header, LayerInfo
from . import grouping

try:  # torch is a core dependency, but keep numpy-only use possible
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore


def _dtype_name(t: Any) -> str:
    if torch is not None and isinstance(t, torch.Tensor):
        if t.device.type == "meta":   # no data to encode (torch raises NotImplementedError on read)
            raise InputError("KV tensors on the 'meta' device hold no data")
        return {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(t.dtype, str(t.dtype))
    if isinstance(t, np.ndarray):
        return t.dtype.name
    raise InputError(f"KV tensors must be numpy arrays or torch tensors, got {type(t).__name__}")


def to_float32(t: Any) -> np.ndarray:
    if torch is not None and isinstance(t, torch.Tensor):
        return t.detach().to("cpu", torch.float32).numpy()
    return np.asarray(t, dtype=np.float32)


def raw_bytes(t: Any) -> np.ndarray:
    """The tensor's elements as little-endian bytes, C order, exact (bf16 included): uint8 [..., itemsize]."""
    if torch is not None and isinstance(t, torch.Tensor):
        t = t.detach().to("cpu").contiguous()
        if t.dtype == torch.bfloat16:
            a = t.view(torch.int16).numpy()
        else:
            a = t.numpy()
    else:
        a = np.ascontiguousarray(t)
    a = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return a.view(np.uint8).reshape(a.shape + (a.dtype.itemsize,))


def host_array(t: Any) -> tuple[np.ndarray, bool]:
    """A CPU numpy view of a K/V tensor and whether it holds bfloat16 bit patterns (uint16).
    Done in the parent process: workers then only touch numpy (fork-safe)."""
    if torch is not None and isinstance(t, torch.Tensor):
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(np.uint16), True
        return t.numpy(), False
    return np.asarray(t), False


def describe(kv: Sequence[Sequence[Any]]) -> tuple[list[LayerInfo], int, int]:
    """Validate a KV cache and return (layer infos without bits, batch, dtype code)."""
    if isinstance(kv, (np.ndarray, str, bytes)) or not hasattr(kv, "__len__"):
        raise InputError("a KV cache is a sequence of (key, value) pairs, one per layer")
    if len(kv) == 0:
        raise InputError("a KV cache needs at least one layer")
    layers, batch, dtype = [], None, None
    for i, pair in enumerate(kv):
        try:
            k, v = pair
        except (TypeError, ValueError):
            raise InputError(f"layer {i}: expected a (key, value) pair") from None
        shapes = []
        for name, t in (("key", k), ("value", v)):
            dn = _dtype_name(t)
            if dn not in DTYPE_BY_NAME:
                raise InputError(f"layer {i} {name}: dtype {dn} not supported (float16, bfloat16, float32)")
            if dtype is None:
                dtype = dn
            elif dn != dtype:
                raise InputError(f"layer {i} {name}: dtype {dn} differs from {dtype}")
            shape = tuple(int(s) for s in t.shape)
            if len(shape) != 4:
                raise InputError(f"layer {i} {name}: expected [batch, heads, tokens, head_dim], got shape {shape}")
            if min(shape) < 1:
                raise InputError(f"layer {i} {name}: empty dimension in shape {shape}")
            if shape[1] > 65535 or shape[3] > 65535 or shape[2] >= 1 << 32 or shape[0] >= 1 << 32:
                raise InputError(f"layer {i} {name}: shape {shape} beyond format limits")
            shapes.append(shape)
        (kb, kh, kt, kd), (vb, vh, vt, vd) = shapes
        if kb != vb or kt != vt:
            raise InputError(f"layer {i}: key and value differ in batch or tokens ({shapes[0]} vs {shapes[1]})")
        if batch is None:
            batch = kb
        elif kb != batch:
            raise InputError(f"layer {i}: batch {kb} differs from {batch}")
        layers.append(LayerInfo(kt, kh, kd, vh, vd))
    _check_default_limits(layers, int(batch), DTYPE_BY_NAME[dtype])
    return layers, int(batch), DTYPE_BY_NAME[dtype]


def _check_default_limits(layers: list[LayerInfo], batch: int, dtype: int) -> None:
    """Refuse, before any work, a cache whose container the default decoder would refuse."""
    lim = DecodeLimits()
    if len(layers) > lim.max_layers:
        raise InputError(f"{len(layers)} layers: decoders refuse more than {lim.max_layers} (DecodeLimits.max_layers)")
    if batch > lim.max_batch:
        raise InputError(f"batch {batch}: decoders refuse more than {lim.max_batch} (DecodeLimits.max_batch)")
    for i, l in enumerate(layers):
        if l.tokens > lim.max_tokens:
            raise InputError(f"layer {i}: {l.tokens} tokens, decoders refuse more than {lim.max_tokens}")
        for kv in (0, 1):
            if l.channels(kv) > lim.max_channels:
                raise InputError(f"layer {i} {'kv'[kv]}: {l.k_heads if kv == 0 else l.v_heads} heads x "
                                 f"{l.k_dim if kv == 0 else l.v_dim} = {l.channels(kv)} channels; decoders "
                                 f"refuse more than {lim.max_channels} (DecodeLimits.max_channels)")
    total = sum(batch * l.tokens * (l.channels(0) + l.channels(1)) for l in layers) * DTYPE_CODES[dtype][1]
    if total > lim.max_output_bytes:
        raise InputError(f"the cache is {total} bytes; decoders refuse more than {lim.max_output_bytes} "
                         "(DecodeLimits.max_output_bytes)")


def channels_first(x: np.ndarray) -> np.ndarray:
    """[B, H, T, D] -> [H*D, B, T] (channel c = h * D + d)."""
    b, h, t, d = x.shape
    return np.ascontiguousarray(x.transpose(1, 3, 0, 2)).reshape(h * d, b, t)


def stream_groups(channels: int, per_stream: int) -> list[tuple[int, int]]:
    return [(s, min(s + per_stream, channels)) for s in range(0, channels, per_stream)]


def segment_counts(header: Header, n: int) -> tuple[int, int]:
    """Symbols per channel per role in a chunk of n tokens (anchors/plain, deltas)."""
    na, nd = grouping.counts(n, header.group_size)
    return header.batch * na, header.batch * nd
