"""Shared test helpers: realistic-looking synthetic KV caches."""
from __future__ import annotations

import numpy as np
import torch


def make_kv(layers=4, batch=1, heads=2, tokens=300, dim=16, dtype="float16", seed=0,
            lengths=None, v_heads=None, v_dim=None, torch_out=False):
    """Correlated-in-time, channel-offset data like real K/V (per-channel means, outliers)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(layers):
        t = tokens if lengths is None else lengths[i]
        pair = []
        for h, d in ((heads, dim), (v_heads or heads, v_dim or dim)):
            mean = rng.normal(size=(1, h, 1, d)) * 2
            scale = np.exp(rng.normal(size=(1, h, 1, d)) * 0.7)
            walk = np.cumsum(rng.normal(size=(batch, h, t, d)) * 0.2, axis=2)
            x = mean + scale * (rng.normal(size=(batch, h, t, d)) + walk)
            pair.append(x.astype(np.float32))
        out.append(pair)
    if torch_out or dtype == "bfloat16":
        tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
        return [(torch.from_numpy(k).to(tdt), torch.from_numpy(v).to(tdt)) for k, v in out]
    return [(k.astype(dtype), v.astype(dtype)) for k, v in out]


def as_f32(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float32).numpy()
    return np.asarray(t, dtype=np.float32)
