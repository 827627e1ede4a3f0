"""KV buffers a decoder writes into: the container dtype codes as torch dtypes, and the one check
of caller buffers against a container's shape (used by ``cachegen.dispatch`` and by
``cachegen.gpu``, whose kernels write through the buffers' strides: a buffer that is too small,
of another dtype or on another device must be refused before any kernel runs)."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from .errors import InputError

TORCH_DTYPES = {1: torch.float16, 2: torch.bfloat16, 3: torch.float32}   # header dtype codes


def check_kv_buffers(header: Any, tokens: Sequence[int], buffers: Sequence[Sequence[torch.Tensor]],
                     dtype: Optional[torch.dtype] = None,
                     device: Optional[torch.device] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``buffers[i] = (k, v)`` checked against the header's layers: count, pairs, tensor, dtype
    (the header's unless given), [batch, heads, >= tokens[i], head_dim], and ``device`` if given
    (else: all on one device). Returns the pairs as tuples."""
    dt = TORCH_DTYPES[header.dtype] if dtype is None else dtype
    try:
        n = len(buffers)
    except TypeError:
        raise InputError("buffers must be a sequence of (key, value) tensor pairs") from None
    if n != len(header.layers):
        raise InputError(f"{n} buffer pairs for {len(header.layers)} layers")
    out = []
    for i, (pair, l, t) in enumerate(zip(buffers, header.layers, tokens)):
        try:
            kb, vb = pair
        except (TypeError, ValueError):
            raise InputError(f"layer {i}: expected a (key, value) buffer pair") from None
        for kvi, b in enumerate((kb, vb)):
            heads, dim = l.heads_dim(kvi)
            s = b.shape if isinstance(b, torch.Tensor) else ()
            if len(s) != 4 or b.dtype != dt or s[0] != header.batch or s[1] != heads or s[3] != dim or s[2] < t \
                    or (device is not None and b.device != device):
                where = f" on {device}" if device is not None else ""
                raise InputError(f"layer {i} {'kv'[kvi]}: buffer must be a {dt} tensor "
                                 f"[{header.batch}, {heads}, >={t}, {dim}]{where}")
        out.append((kb, vb))
    if device is None:
        devs = {b.device for p in out for b in p}
        if len(devs) != 1:
            raise InputError(f"decode_into buffers must be on one device, got {sorted(map(str, devs))}")
    return out
