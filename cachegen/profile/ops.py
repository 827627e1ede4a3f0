"""Device-agnostic tensor math of the profile transforms (numpy arrays or torch tensors, CPU or CUDA).

Layout everywhere: one K or V tensor of a layer, ``[B, H, T, D]``. The transform works on the
flattened per-token vector ``[H*D]`` (channel ``h*D + d``), so it sees all heads of a layer at once.
"""
from __future__ import annotations

from typing import Any

import numpy as np

try:  # torch is a core dependency, but keep numpy-only use possible
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore


def is_torch(x: Any) -> bool:
    return torch is not None and isinstance(x, torch.Tensor)


def as_float32(x: Any) -> Any:
    """A float32 version of a K/V tensor (torch stays torch on its device)."""
    if is_torch(x):
        return x.detach().to(torch.float32)
    return np.asarray(x, dtype=np.float32)


_DEVICE_COPIES: dict = {}   # (id(array), device) -> (array, tensor): bases are uploaded once per device


def _like(a: np.ndarray, x: Any) -> Any:
    """Host numpy constant ``a`` as an array usable with ``x`` (same library, device, float32)."""
    if not is_torch(x):
        return np.asarray(a, dtype=np.float32)
    key = (id(a), str(x.device))
    hit = _DEVICE_COPIES.get(key)
    if hit is not None and hit[0] is a:
        return hit[1]
    t = torch.from_numpy(np.array(a, dtype=np.float32, copy=True)).to(x.device)
    if len(_DEVICE_COPIES) >= 512:
        _DEVICE_COPIES.clear()
    if not a.flags.writeable:        # only immutable arrays (profile bases) are safe to cache
        _DEVICE_COPIES[key] = (a, t)
    return t


def rope_angles(x: Any, start: int, theta: float, dim: int) -> tuple[Any, Any]:
    """cos/sin ``[T, dim]`` (float32, rotate-half layout) for positions ``start .. start+T-1``.

    Angles are formed in float64 so long positions keep their precision; the inverse on decode
    uses the same function, so the round trip is exact up to float32 rounding.
    """
    T = x.shape[2]
    half = dim // 2
    inv = 1.0 / (float(theta) ** (np.arange(half, dtype=np.float64) * 2.0 / dim))
    if is_torch(x):
        pos = torch.arange(start, start + T, dtype=torch.float64, device=x.device)
        ang = pos[:, None] * torch.as_tensor(inv, device=x.device)[None, :]
        ang = torch.cat([ang, ang], dim=1)
        return torch.cos(ang).to(torch.float32), torch.sin(ang).to(torch.float32)
    pos = np.arange(start, start + T, dtype=np.float64)
    ang = pos[:, None] * inv[None, :]
    ang = np.concatenate([ang, ang], axis=1)
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


def _rotate_half(x: Any) -> Any:
    h = x.shape[-1] // 2
    if is_torch(x):
        return torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope(x: Any, start: int, theta: float, inverse: bool = False) -> Any:
    """Apply (or undo, ``inverse``) rotary embedding, HF rotate-half convention, on ``[B,H,T,D]``."""
    D = x.shape[-1]
    cos, sin = rope_angles(x, start, theta, D)
    if inverse:
        sin = -sin
    return x * cos + _rotate_half(x) * sin


def to_tokens(x: Any) -> Any:
    """[B, H, T, D] -> [B, T, H*D]."""
    B, H, T, D = x.shape
    if is_torch(x):
        return x.permute(0, 2, 1, 3).reshape(B, T, H * D)
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(B, T, H * D)


def from_tokens(y: Any, H: int, D: int) -> Any:
    """[B, T, H*D] -> [B, H, T, D] (contiguous)."""
    B, T, _ = y.shape
    if is_torch(y):
        return y.reshape(B, T, H, D).permute(0, 2, 1, 3).contiguous()
    return np.ascontiguousarray(y.reshape(B, T, H, D).transpose(0, 2, 1, 3))


def forward_basis(x: Any, mean: np.ndarray, basis: np.ndarray) -> Any:
    """Coefficients ``(x - mean) @ basis`` per token, returned in the [B, H, T, D] layout."""
    B, H, T, D = x.shape
    t = to_tokens(x) - _like(mean, x)
    return from_tokens(t @ _like(basis, x), H, D)


def inverse_basis(y: Any, mean: np.ndarray, basis: np.ndarray) -> Any:
    """Undo :func:`forward_basis`: ``y @ basis.T + mean`` (the basis is orthonormal)."""
    B, H, T, D = y.shape
    t = to_tokens(y) @ _like(basis, y).T
    return from_tokens(t + _like(mean, y), H, D)
