"""Fitting and applying the per-(layer, K/V) transforms of a profile.

Forward (encode side), per layer and K/V tensor ``x`` [B, H, T, D] whose first token sits at
absolute position ``start``:

1. keys only, when the profile has a RoPE theta for the layer: undo the rotary embedding
   (positions ``start .. start+T-1``), so every token's key lives in one fixed frame;
2. when the profile has a basis for the tensor: ``c = (x - mean) @ basis`` per token over all
   heads (``H*D`` channels), coefficients ordered by decreasing calibration variance;
3. the first ``sinks`` tokens of layers that start at position 0 (attention sinks) are kept
   exactly (fp16, in the extension payload) and replaced in the coded tensor by the next token's
   coefficients, so their outlying values do not widen the shared quantizer step.

The inverse runs the steps backwards. Everything is float32 and works on numpy arrays or torch
tensors on any device (the basis is a small GEMM per token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from . import ops


@dataclass(frozen=True)
class Basis:
    """Orthonormal basis (columns, by decreasing variance) and mean of one (layer, K/V) tensor."""

    mean: np.ndarray    # [C] float32
    basis: np.ndarray   # [C, C] float32
    variance: np.ndarray  # [C] float32, calibration variance of each coefficient


def fit_basis(x_tokens: np.ndarray, center: bool = True) -> Basis:
    """PCA/KLT of ``x_tokens`` [N, C]: eigenvectors of the covariance (float64)."""
    x = np.asarray(x_tokens, dtype=np.float64)
    mean = x.mean(axis=0) if center else np.zeros(x.shape[1])
    xc = x - mean
    cov = xc.T @ xc / max(1, x.shape[0] - 1)
    w, u = np.linalg.eigh(cov)
    order = np.argsort(w)[::-1]
    w, u = w[order], u[:, order]
    # a deterministic sign per column (largest entry positive) so refits give the same basis
    sign = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    sign[sign == 0] = 1
    u = u * sign
    return Basis(mean.astype(np.float32), np.ascontiguousarray(u, dtype=np.float32),
                 np.maximum(w, 0).astype(np.float32))


def tokens_of(x: Any) -> np.ndarray:
    """[B, H, T, D] -> [B*T, H*D] float32 numpy."""
    t = ops.to_tokens(ops.as_float32(x))
    if ops.is_torch(t):
        t = t.cpu().numpy()
    return np.asarray(t).reshape(-1, t.shape[-1])


def forward_tensor(x: Any, start: int, theta: Optional[float], basis: Optional[Basis]) -> Any:
    y = ops.as_float32(x)
    if theta:
        y = ops.rope(y, start, theta, inverse=True)
    if basis is not None:
        y = ops.forward_basis(y, basis.mean, basis.basis)
    return y


def inverse_tensor(y: Any, start: int, theta: Optional[float], basis: Optional[Basis]) -> Any:
    x = ops.as_float32(y)
    if basis is not None:
        x = ops.inverse_basis(x, basis.mean, basis.basis)
    if theta:
        x = ops.rope(x, start, theta, inverse=False)
    return x


def sink_count(start: int, tokens: int, sinks: int) -> int:
    """How many of a layer's tokens are kept exact: the first ``sinks`` absolute positions, when
    the layer holds them, and never all of its tokens (the codec needs one to code)."""
    if start != 0 or sinks <= 0:
        return 0
    return max(0, min(sinks, tokens - 1))


def cut_sinks(y: Any, n: int) -> Any:
    """Replace the first ``n`` tokens of ``y`` [B, H, T, D] by token ``n`` (a copy)."""
    if n <= 0:
        return y
    if ops.is_torch(y):
        y = y.clone()
        y[:, :, :n, :] = y[:, :, n:n + 1, :]
        return y
    y = np.array(y, dtype=np.float32, copy=True)
    y[:, :, :n, :] = y[:, :, n:n + 1, :]
    return y


def fit_bases(kv_calib: Sequence[Sequence[Any]], thetas: Sequence[Optional[float]], *,
              keys: bool = True, values: bool = True, key_rope: bool = True,
              center: bool = True) -> tuple[list, list]:
    """Bases per layer for keys (after RoPE removal when ``key_rope``) and values."""
    kb, vb = [], []
    for i, (k, v) in enumerate(kv_calib):
        th = thetas[i] if key_rope else None
        kb.append(fit_basis(tokens_of(forward_tensor(k, 0, th, None)), center) if keys else None)
        vb.append(fit_basis(tokens_of(v), center) if values else None)
    return kb, vb
