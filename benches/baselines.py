"""KV-cache round-trip baselines for the rate-distortion bench (benches/bench_rd.py).

Every baseline is a function ``kv -> (restored, nbytes)``:

* ``kv``: a list (one entry per layer) of ``(key, value)`` arrays ``[B, H, T, D]`` (numpy or
  torch, any float dtype); layers may have different ``T`` (Gemma-3 trimmed caches);
* ``restored``: the same structure as float32 numpy arrays;
* ``nbytes``: the stored size in bytes, everything needed to restore counted (scales, zero
  points, probability tables). For the entropy-coded LMCache baselines it is the exact entropy
  bound of the symbols under their own empirical per-table histograms (what an ideal coder with
  exact frequencies would reach; a real range coder is a little larger), rounded up to bytes.

Baselines (``BASELINES``):

``fp16``          raw fp16 (the reference size).
``zstd-fp16``     zstandard level 3 on the fp16 bytes, one frame per (layer, K/V) tensor.
``int8-channel``  symmetric int8, one absmax per (layer, K/V, head, channel) per 256-token chunk
                  (fp16 scales counted).
``fp8-e4m3``      torch.float8_e4m3fn with one fp32 scale per (layer, K/V) tensor (absmax/448).
``kivi-2bit``     KIVI-style asymmetric 2-bit: K per channel over groups of 32 tokens, V per token
                  over groups of 32 channels; min and scale in fp16 per group. No full-precision
                  residual window (KIVI keeps the last R tokens in fp16 while generating; a
                  stored cache has no such window). ``kivi-2bit-r128`` keeps the last 128 tokens
                  in fp16 as KIVI does (counted).
``lmcache``       LMCache's CacheGen serde as publicly described: one absmax per (layer, K/V,
                  token) over all channels (heads x head_dim), symbols ``round(x*M/absmax) + M``
                  with ``M = bins/2 - 1``; bins 32 for K layers 0-9 and V layers 0-1, 16 after;
                  per 256-token chunk one histogram per (layer, K/V, channel) -> a CDF of
                  ``bins`` 16-bit entries shipped with the chunk; absmax in fp16 per (layer, K/V,
                  token). Size = entropy bound + CDF tables + absmaxes.
``lmcache-whole`` the same with one table per (layer, K/V, channel) for the whole context (its
                  most favourable setting, as in the issue's Targets).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

KV = Sequence[Tuple[np.ndarray, np.ndarray]]
Restored = List[Tuple[np.ndarray, np.ndarray]]

__all__ = ["BASELINES", "fp16", "zstd_fp16", "int8_channel", "fp8_e4m3", "kivi_2bit", "kivi_2bit_r128",
           "lmcache", "lmcache_whole", "lmcache_bins", "entropy_bits", "numel"]


def _np(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def numel(kv: KV) -> int:
    return sum(int(np.prod(k.shape)) + int(np.prod(v.shape)) for k, v in kv)


def _map(kv: KV, fn: Callable[[np.ndarray, int, int], Tuple[np.ndarray, float]]):
    """Apply ``fn(x, layer, kv_index) -> (restored, nbytes)`` to every tensor."""
    out, total = [], 0.0
    for i, (k, v) in enumerate(kv):
        rk, bk = fn(_np(k), i, 0)
        rv, bv = fn(_np(v), i, 1)
        out.append((rk.astype(np.float32), rv.astype(np.float32)))
        total += bk + bv
    return out, int(math.ceil(total))


# ----------------------------------------------------------------------------------- simple ones
def fp16(kv: KV):
    return _map(kv, lambda x, i, j: (x.astype(np.float16).astype(np.float32), 2 * x.size))


def zstd_fp16(kv: KV, level: int = 3):
    import zstandard

    cctx = zstandard.ZstdCompressor(level=level)

    def f(x, i, j):
        h = np.ascontiguousarray(x.astype(np.float16))
        return h.astype(np.float32), len(cctx.compress(h.tobytes()))
    return _map(kv, f)


def int8_channel(kv: KV, chunk_tokens: int = 256):
    def f(x, i, j):
        B, H, T, D = x.shape
        out = np.empty_like(x)
        nbytes = x.size  # one byte per element
        for s in range(0, T, chunk_tokens):
            c = x[:, :, s:s + chunk_tokens, :]
            scale = (np.abs(c).max(axis=2, keepdims=True) / 127.0).astype(np.float16).astype(np.float32)
            nbytes += 2 * scale.size
            safe = np.where(scale == 0, 1.0, scale)
            out[:, :, s:s + chunk_tokens, :] = np.clip(np.round(c / safe), -127, 127) * scale
        return out, nbytes
    return _map(kv, f)


def fp8_e4m3(kv: KV):
    import torch

    def f(x, i, j):
        amax = float(np.abs(x).max()) if x.size else 0.0
        scale = np.float32(amax / 448.0) if amax > 0 else np.float32(1.0)
        t = torch.from_numpy(np.ascontiguousarray(x / scale)).to(torch.float8_e4m3fn)
        return t.to(torch.float32).numpy() * scale, x.size + 4
    return _map(kv, f)


# ----------------------------------------------------------------------------------- KIVI
def _asym_quant(x: np.ndarray, axis: int, bits: int) -> Tuple[np.ndarray, int]:
    """Asymmetric uniform quantization with min / scale (fp16) taken along ``axis``."""
    lo = x.min(axis=axis, keepdims=True).astype(np.float16).astype(np.float32)
    hi = x.max(axis=axis, keepdims=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).astype(np.float16).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale)
    q = np.clip(np.round((x - lo) / safe), 0, levels)
    return q * scale + lo, 2 * 2 * lo.size  # min + scale, fp16 each


def kivi_2bit(kv: KV, group: int = 32, bits: int = 2, residual: int = 0):
    def f(x, i, j):
        B, H, T, D = x.shape
        out = np.empty_like(x)
        nq = max(0, T - residual)
        meta = 0
        if j == 0:  # keys: per channel, groups of `group` tokens
            for s in range(0, nq, group):
                e = min(s + group, nq)
                out[:, :, s:e, :], m = _asym_quant(x[:, :, s:e, :], axis=2, bits=bits)
                meta += m
        else:       # values: per token, groups of `group` channels
            for s in range(0, D, group):
                out[:, :, :nq, s:s + group], m = _asym_quant(x[:, :, :nq, s:s + group], axis=3, bits=bits)
                meta += m
        out[:, :, nq:, :] = x[:, :, nq:, :].astype(np.float16).astype(np.float32)
        nres = B * H * (T - nq) * D
        return out, math.ceil(B * H * nq * D * bits / 8) + meta + 2 * nres
    return _map(kv, f)


def kivi_2bit_r128(kv: KV):
    return kivi_2bit(kv, residual=128)


# ----------------------------------------------------------------------------------- LMCache
def lmcache_bins(layer: int, kv_index: int) -> int:
    """LMCache's bin counts: 32 for K layers 0-9 and V layers 0-1, 16 after."""
    if kv_index == 0:
        return 32 if layer < 10 else 16
    return 32 if layer < 2 else 16


def entropy_bits(symbols: np.ndarray, n_symbols: int) -> float:
    """Sum over columns of ``symbols [N, C]`` of the empirical entropy bound (bits)."""
    N, C = symbols.shape
    if N == 0:
        return 0.0
    counts = np.zeros((C, n_symbols), dtype=np.int64)
    np.add.at(counts, (np.broadcast_to(np.arange(C), (N, C)), symbols), 1)
    p = counts / N
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(counts > 0, counts * np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return float(h.sum())


def _lmcache(kv: KV, chunk_tokens: int | None):
    def f(x, i, j):
        B, H, T, D = x.shape
        bins = lmcache_bins(i, j)
        M = bins // 2 - 1
        # LMCache layout: [tokens, heads * head_dim] per layer (batch items are separate tokens)
        flat = np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(B * T, H * D))
        absmax = np.abs(flat).max(axis=1, keepdims=True).astype(np.float16).astype(np.float32)
        safe = np.where(absmax == 0, 1.0, absmax)
        q = np.clip(np.round(flat * (M / safe)), -M, M)
        rest = (q * (safe / M) * (absmax != 0)).reshape(B, T, H, D).transpose(0, 2, 1, 3)
        sym = (q + M).astype(np.int64)
        bits = 0.0
        step = chunk_tokens or max(1, B * T)
        n_tables = 0
        for s in range(0, B * T, step):
            bits += entropy_bits(sym[s:s + step], bins)
            n_tables += H * D
        bits += n_tables * bins * 16      # 16-bit CDF entries, `bins` per (layer, channel) table
        bits += B * T * 16                # fp16 absmax per (layer, K/V, token)
        return rest, bits / 8
    return _map(kv, f)


def lmcache(kv: KV):
    return _lmcache(kv, 256)


def lmcache_whole(kv: KV):
    return _lmcache(kv, None)


BASELINES: Dict[str, Callable[[KV], Tuple[Restored, int]]] = {
    "fp16": fp16,
    "zstd-fp16": zstd_fp16,
    "int8-channel": int8_channel,
    "fp8-e4m3": fp8_e4m3,
    "kivi-2bit": kivi_2bit,
    "kivi-2bit-r128": kivi_2bit_r128,
    "lmcache": lmcache,
    "lmcache-whole": lmcache_whole,
}
