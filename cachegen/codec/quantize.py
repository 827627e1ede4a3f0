"""Per-channel uniform quantization with per-chunk parameters (codec_spec/FORMAT.md, "Quantization").

For each (layer, K/V, chunk, channel): lo = min, step = (max - lo) / (2**bits - 1), both rounded
outward to the parameter dtype so every value lies in [lo, lo + step * (2**bits - 1)].
Index v = round((x - lo) / step); reconstruction x' = fl32(fl32(step * v) + lo) (no fused
multiply-add: all decoders must round the same way).
"""
from __future__ import annotations

import numpy as np

from ..format.container import PARAM_DTYPES

FP16_SAFE = 30000.0  # parameters fit in fp16 while |x| stays below this
FP32_SAFE = 1e38     # ... in fp32 (lo and the step of a range up to 2 * 1e38 stay finite)


def choose_param_dtype(max_abs: float) -> int:
    return 1 if max_abs < FP16_SAFE else 2


def _round_down(x: np.ndarray, dt: np.dtype) -> np.ndarray:
    r = x.astype(dt)
    over = r.astype(np.float64) > x
    if over.any():
        r[over] = np.nextafter(r[over], dt.type(-np.inf))
    return r


def _round_up(x: np.ndarray, dt: np.dtype) -> np.ndarray:
    r = x.astype(dt)
    under = r.astype(np.float64) < x
    if under.any():
        r[under] = np.nextafter(r[under], dt.type(np.inf))
    return r


def quantizer_params(x: np.ndarray, bits: int, param_dtype: int,
                     sharing: float = 0.0, gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """x: [channels, n] float32 -> (lo, step) in the parameter dtype, one per channel.

    The step is at least range / (2**bits - 1) so every index fits the alphabet; `sharing`
    blends it geometrically towards the largest step among the channels (see CodecConfig);
    `gain` >= 1 then widens it (fewer levels used: a fractional width).
    """
    dt = PARAM_DTYPES[param_dtype]
    lo = _round_down(x.min(axis=1).astype(np.float64), dt)
    hi = x.max(axis=1).astype(np.float64)
    step = (hi - lo.astype(np.float64)) / ((1 << bits) - 1)
    if sharing > 0 and step.size:
        top = step.max()
        if top > 0:
            step = np.maximum(step, np.maximum(step, top * 1e-12) ** (1.0 - sharing) * top ** sharing)
    if gain != 1.0:
        step = step * float(gain)
    return lo, _round_up(step, dt)


def _in_steps(x: np.ndarray, lo: np.ndarray, step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x - lo) / step in float32 (channels of step 0 divided by 1), and where step is 0."""
    lo32 = lo.astype(np.float32)[:, None]
    st32 = step.astype(np.float32)[:, None]
    safe = np.where(st32 > 0, st32, np.float32(1))
    return (x - lo32) / safe, np.broadcast_to(st32 == 0, x.shape)


def quantize(x: np.ndarray, lo: np.ndarray, step: np.ndarray, bits: int) -> np.ndarray:
    """x: [channels, n] float32 -> indices in [0, 2**bits - 1] (int32)."""
    u, zero = _in_steps(x, lo, step)
    np.rint(u, out=u)
    np.clip(u, 0, (1 << bits) - 1, out=u)
    u[zero] = 0
    return u.astype(np.int32)


def quantize_rd(x: np.ndarray, lo: np.ndarray, step: np.ndarray, bits: int, cost: np.ndarray,
                lam: float) -> np.ndarray:
    """:func:`quantize` choosing, per value, between the two levels around it the one with the
    least (error in steps)**2 + lam * cost[channel, level] (cost: [channels, 2**bits] bits)."""
    top = (1 << bits) - 1
    u, zero = _in_steps(x, lo, step)
    u = np.clip(u, 0, top)
    f = np.minimum(np.floor(u), top - 1).astype(np.int64) if top else np.zeros(u.shape, np.int64)
    d = u - f
    c = cost.astype(np.float64)
    j0 = d * d + lam * np.take_along_axis(c, f, axis=1)
    j1 = (1 - d) ** 2 + lam * np.take_along_axis(c, np.minimum(f + 1, top), axis=1)
    q = f + (j1 < j0)
    q[zero] = 0
    return q.astype(np.int32)


def token_scale_codes(x: np.ndarray) -> np.ndarray:
    """x: [channels, tokens] -> u8 codes e with 2**((e-128)/8) close to each token's RMS."""
    rms = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=0))
    with np.errstate(divide="ignore"):
        e = np.rint(8.0 * np.log2(rms)) + 128
    return np.clip(np.nan_to_num(e, nan=0, neginf=0), 0, 255).astype(np.uint8)


def dequantize(v: np.ndarray, lo: np.ndarray, step: np.ndarray,
               token_scale: np.ndarray | None = None) -> np.ndarray:
    """v: [channels, ...] integer indices -> float32, exactly fl32(fl32(step*v) + lo), then
    times the token scale (fp32, broadcast over the trailing axes) when there is one."""
    shape = (-1,) + (1,) * (v.ndim - 1)
    out = v.astype(np.float32)
    out *= step.astype(np.float32).reshape(shape)
    out += lo.astype(np.float32).reshape(shape)
    if token_scale is not None:
        out *= token_scale.astype(np.float32, copy=False)
    return out
