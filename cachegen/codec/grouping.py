"""Anchor-delta token grouping (codec_spec/FORMAT.md, "Symbol layout").

Within a chunk, tokens are cut into groups of `g`; the first token of each group is the anchor.
Grouping works on quantization indices, so it is lossless given the indices: anchors are coded
as indices in [0, L-1], the other tokens as (index - anchor index) + (L-1) in [0, 2L-2].
"""
from __future__ import annotations

import numpy as np


def split(v: np.ndarray, g: int, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """v: [channels, batch, n] indices -> (anchor symbols [channels, batch*na],
    delta symbols [channels, batch*nd]), each b-major then token order."""
    c, b, n = v.shape
    if g <= 1:
        return v.reshape(c, b * n), np.empty((c, 0), dtype=v.dtype)
    anchors = v[:, :, ::g]
    na = anchors.shape[2]
    pad = na * g - n
    if pad:
        full = np.empty((c, b, na * g), dtype=v.dtype)
        full[:, :, :n] = v
        full[:, :, n:] = anchors[:, :, -1:]
    else:
        full = v
    grouped = full.reshape(c, b, na, g)
    deltas = grouped[:, :, :, 1:] - grouped[:, :, :, :1] + (levels - 1)
    deltas = deltas.reshape(c, b, na * (g - 1))
    if pad:
        deltas = deltas[:, :, :n - na]
    return np.ascontiguousarray(anchors).reshape(c, b * na), np.ascontiguousarray(deltas).reshape(c, -1)


def counts(n: int, g: int) -> tuple[int, int]:
    """(anchors, deltas) per batch item for a chunk of n tokens."""
    if g <= 1:
        return n, 0
    na = -(-n // g)
    return na, n - na


def join(anchors: np.ndarray, deltas: np.ndarray, batch: int, n: int, g: int, levels: int) -> np.ndarray:
    """Inverse of split: -> indices [channels, batch, n] (int32; may leave [0, L-1] on bad data)."""
    c = anchors.shape[0]
    if g <= 1:
        return anchors.reshape(c, batch, n).astype(np.int32, copy=False)
    na, nd = counts(n, g)
    a = anchors.reshape(c, batch, na).astype(np.int32, copy=False)
    d = deltas.reshape(c, batch, nd).astype(np.int32, copy=False)
    full = np.empty((c, batch, na, g), dtype=np.int32)
    full[:, :, :, 0] = a
    rest = np.empty((c, batch, na * (g - 1)), dtype=np.int32)
    rest[:, :, :nd] = d
    rest[:, :, nd:] = levels - 1
    full[:, :, :, 1:] = rest.reshape(c, batch, na, g - 1) + (a[:, :, :, None] - (levels - 1))
    return full.reshape(c, batch, na * g)[:, :, :n]
