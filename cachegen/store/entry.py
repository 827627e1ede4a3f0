"""Stored entries: a 64-byte header (magic, kind, key digest, length, checksum) + payload.

Header layout (little-endian)::

    0   4  magic b"CGSE"
    4   1  entry format version (1)
    5   1  kind: 0 = chunk data, 1 = chunk index (JSON)
    6   2  reserved (0)
    8  32  BLAKE2b-256 of the storage key: an entry copied/renamed under another key is rejected
   40   8  payload length
   48  16  BLAKE2b-128 of the payload

A bad header, key, length or checksum raises :class:`CorruptEntryError` (a ``CacheGenError``),
which the store treats as a miss and deletes the entry.

Chunk data payloads are either a cachegen container (every codec preset, lossless included) or,
for the level ``"raw"``, the chunk's KV as plain fp16 (the uncompressed baseline).
"""
from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Sequence

import numpy as np
import torch

from ..dispatch import open_container
from ..errors import CacheGenError, FormatError

__all__ = ["CorruptEntryError", "pack_entry", "unpack_entry", "KIND_DATA", "KIND_INDEX",
           "encode_raw", "decode_raw", "HEADER_BYTES", "check_chunk_container"]

MAGIC = b"CGSE"
VERSION = 1
KIND_DATA, KIND_INDEX = 0, 1
_HDR = struct.Struct("<4sBBH32sQ16s")
HEADER_BYTES = _HDR.size  # 64


class CorruptEntryError(FormatError):
    """A stored entry's header, key or checksum does not match (it is dropped, never served)."""


def key_digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode(), digest_size=32).digest()


def _sum(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=16).digest()


def pack_entry(key: str, kind: int, payload: bytes) -> bytes:
    return _HDR.pack(MAGIC, VERSION, kind, 0, key_digest(key), len(payload), _sum(payload)) + bytes(payload)


def unpack_entry(key: str, data: bytes, kind: int) -> memoryview:
    """Check an entry read back under ``key``; return its payload (a view into ``data``)."""
    if data is None or len(data) < HEADER_BYTES:
        raise CorruptEntryError(f"entry {key}: truncated header ({0 if data is None else len(data)} bytes)")
    magic, ver, k, _res, kd, n, cs = _HDR.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptEntryError(f"entry {key}: bad magic {magic!r}")
    if ver != VERSION:
        raise CorruptEntryError(f"entry {key}: entry version {ver}, expected {VERSION}")
    if k != kind:
        raise CorruptEntryError(f"entry {key}: kind {k}, expected {kind}")
    if kd != key_digest(key):
        raise CorruptEntryError(f"entry {key}: stored under another key")
    if len(data) - HEADER_BYTES != n:
        raise CorruptEntryError(f"entry {key}: payload {len(data) - HEADER_BYTES} bytes, header says {n}")
    payload = memoryview(data)[HEADER_BYTES:]
    if _sum(payload) != cs:
        raise CorruptEntryError(f"entry {key}: checksum mismatch")
    return payload


def pack_index(info: dict[str, Any]) -> bytes:
    return json.dumps(info, sort_keys=True, separators=(",", ":")).encode()


MAX_INDEX_BYTES = 64 << 10   # an index entry lists a few levels: a few hundred bytes


def _no_constant(name: str) -> None:
    raise ValueError(f"non-finite number {name} in the index")


def unpack_index(key: str, payload: memoryview) -> dict[str, Any]:
    """Parse an index entry strictly (bounded size, no Infinity/NaN, no nesting beyond its shape):
    anything else is a CorruptEntryError (a miss; the caller deletes the entry). The entry
    checksum is unkeyed, so whoever can write to the backend can forge a well-checksummed one."""
    try:
        if len(payload) > MAX_INDEX_BYTES:
            raise ValueError(f"{len(payload)} bytes (at most {MAX_INDEX_BYTES})")
        d = json.loads(bytes(payload).decode(), parse_constant=_no_constant)
        if not isinstance(d, dict) or not isinstance(d.get("levels"), dict):
            raise ValueError("no levels")
        levels = {}
        for k, v in d["levels"].items():
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 63:
                raise ValueError(f"level {k!r}: size {v!r} is not a byte count")
            levels[str(k)] = v
        tokens = d.get("tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 < tokens < 1 << 32:
            raise ValueError(f"bad token count {tokens!r}")
        d["levels"], d["tokens"] = levels, tokens
        return d
    except (ValueError, TypeError, UnicodeDecodeError, RecursionError, OverflowError) as e:
        raise CorruptEntryError(f"index entry {key}: {type(e).__name__}: {str(e)[:200]}") from None


_CONTAINER_DTYPES = {1: "float16", 2: "bfloat16", 3: "float32"}


def check_chunk_container(key: str, payload: Any, layer_shapes: Sequence[Sequence[int]], dtype: str,
                          tokens: int, batch: int = 1) -> None:
    """Before a stored container is decoded: its layers, heads, head_dim, dtype, batch and tokens
    must be the fingerprint's (a checksummed entry can still hold another cache's shapes)."""
    try:
        h = open_container(payload).header
    except CacheGenError as e:
        raise CorruptEntryError(f"entry {key}: {e}") from None
    shapes = [(l.k_heads, l.k_dim, l.v_heads, l.v_dim) for l in h.layers]
    want = [tuple(int(x) for x in s) for s in layer_shapes]
    if shapes != want:
        raise CorruptEntryError(f"entry {key}: layer shapes {shapes[:2]}... differ from the fingerprint's")
    got = _CONTAINER_DTYPES.get(h.dtype)
    if got != dtype:
        raise CorruptEntryError(f"entry {key}: dtype {got}, the fingerprint says {dtype}")
    if h.batch != batch or any(l.tokens != tokens for l in h.layers):
        raise CorruptEntryError(f"entry {key}: batch {h.batch} / tokens {[l.tokens for l in h.layers][:2]}..., "
                                f"expected batch {batch} and {tokens} tokens per layer")


_RAW = struct.Struct("<4sII")  # magic, layers, tokens


def encode_raw(kv: Sequence[Sequence[Any]]) -> bytes:
    """Chunk KV as plain fp16 (layer by layer, key then value, each [B, H, T, D] C-order)."""
    parts = []
    T = int(kv[0][0].shape[2])
    for k, v in kv:
        for x in (k, v):
            if isinstance(x, torch.Tensor):
                x = x.detach().to("cpu", torch.float16).numpy()
            parts.append(np.ascontiguousarray(x, dtype=np.float16).tobytes())
    return _RAW.pack(b"RAW1", len(kv), T) + b"".join(parts)


def decode_raw(payload: Any, layer_shapes: Sequence[Sequence[int]], batch: int = 1,
               dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    buf = memoryview(payload)
    if len(buf) < _RAW.size:
        raise CorruptEntryError("raw payload truncated")
    magic, L, T = _RAW.unpack_from(buf, 0)
    if magic != b"RAW1" or L != len(layer_shapes):
        raise CorruptEntryError("raw payload does not match the model fingerprint")
    need = sum(batch * T * (kh * kd + vh * vd) for kh, kd, vh, vd in layer_shapes) * 2
    if len(buf) - _RAW.size != need:
        raise CorruptEntryError(f"raw payload has {len(buf) - _RAW.size} bytes, expected {need}")
    arr = np.frombuffer(buf, dtype=np.float16, offset=_RAW.size)
    out, off = [], 0
    for kh, kd, vh, vd in layer_shapes:
        pair = []
        for h, d in ((kh, kd), (vh, vd)):
            n = batch * h * T * d
            pair.append(torch.from_numpy(arr[off:off + n].reshape(batch, h, T, d).copy()).to(dtype))
            off += n
        out.append((pair[0], pair[1]))
    return out
