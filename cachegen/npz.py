"""KV caches as ``.npz`` files (what ``cachegen encode/decode/rd`` read and write).

Layout: ``layer{i}.key`` / ``layer{i}.value`` arrays ``[batch, heads, tokens, head_dim]`` for
i = 0..L-1 (layers may differ in tokens and shape), or one array ``kv`` ``[L, 2, B, H, T, D]``.
bfloat16 travels as its uint16 bit pattern. Optional int arrays: ``tokens`` (the ids the cache
covers) and ``heldout`` (ids that follow them: the text ``cachegen rd --model`` scores).
"""
from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Optional, Sequence, Union

import numpy as np

from .errors import InputError

__all__ = ["KVArrays", "read_kv_npz", "write_kv_npz"]

_LAYER = re.compile(r"layer(\d+)\.(key|value)$")
_EXTRA = ("tokens", "heldout")


@dataclass
class KVArrays:
    kv: list                                  # [(key, value)] per layer: numpy, or torch for bf16
    tokens: Optional[np.ndarray] = None
    heldout: Optional[np.ndarray] = None
    names: list = field(default_factory=list)


def _bf16(a: np.ndarray) -> Any:
    import torch
    return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)


def read_kv_npz(src: Union[str, bytes, BinaryIO], label: str = "input") -> KVArrays:
    """Read a KV cache from an .npz path, its bytes or a binary file. Raises InputError."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    try:
        z = np.load(src, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{label}: not a readable .npz file ({e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise InputError(f"{label}: a single .npy array, expected an .npz archive")
    with z:
        names = list(z.files)
        try:
            arrays = {n: z[n] for n in names}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise InputError(f"{label}: damaged .npz member ({e})") from None
    out = KVArrays(kv=[], names=names)
    for n in _EXTRA:
        if n in arrays:
            a = arrays.pop(n)
            if a.dtype.kind not in "iu":
                raise InputError(f"{label}: '{n}' must hold integer token ids, got {a.dtype}")
            setattr(out, n, a.reshape(-1).astype(np.int64))
    if "kv" in arrays:
        a = arrays.pop("kv")
        if arrays:
            raise InputError(f"{label}: 'kv' together with other arrays {sorted(arrays)[:4]}")
        if a.ndim != 6 or a.shape[1] != 2:
            raise InputError(f"{label}: 'kv' must be [layers, 2, batch, heads, tokens, head_dim], got {a.shape}")
        conv = _bf16 if a.dtype == np.uint16 else (lambda x: x)
        out.kv = [(conv(a[i, 0]), conv(a[i, 1])) for i in range(a.shape[0])]
        return out
    found: dict[int, dict[str, np.ndarray]] = {}
    for n, a in arrays.items():
        m = _LAYER.match(n)
        if m is None:
            raise InputError(f"{label}: unexpected array {n!r}; expected layer0.key, layer0.value, ... "
                             f"(or one 'kv' array), plus optional {list(_EXTRA)}")
        found.setdefault(int(m.group(1)), {})[m.group(2)] = a
    if not found:
        raise InputError(f"{label}: no KV arrays (expected layer0.key, layer0.value, ...)")
    n_layers = max(found) + 1
    for i in range(n_layers):
        if set(found.get(i, {})) != {"key", "value"}:
            raise InputError(f"{label}: layer {i} needs both layer{i}.key and layer{i}.value")
    for i in range(n_layers):
        pair = []
        for part in ("key", "value"):
            a = found[i][part]
            pair.append(_bf16(a) if a.dtype == np.uint16 else a)
        out.kv.append(tuple(pair))
    return out


def write_kv_npz(dst: Union[str, BinaryIO], kv: Sequence[Sequence[Any]],
                 tokens: Optional[Sequence[int]] = None, heldout: Optional[Sequence[int]] = None) -> None:
    """Write ``[(key, value)]`` (numpy or torch, any device) as ``layer{i}.key/value``."""
    arrays: dict[str, np.ndarray] = {}
    for i, (k, v) in enumerate(kv):
        for part, t in (("key", k), ("value", v)):
            if type(t).__module__.startswith("torch"):
                import torch
                t = t.detach().cpu()
                t = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
            arrays[f"layer{i}.{part}"] = np.asarray(t)
    if tokens is not None:
        arrays["tokens"] = np.asarray(tokens, dtype=np.int64)
    if heldout is not None:
        arrays["heldout"] = np.asarray(heldout, dtype=np.int64)
    np.savez(dst, **arrays)
