"""cachegen.decode / decode_into of a transform-coded (model profile) container: the inverse
transform is applied, or a clear error raised — never coefficients returned as if they were K/V."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cachegen
from cachegen.errors import ConfigError
from cachegen.profile import decode as profile_decode, encode as profile_encode

from helpers import make_kv
from test_profile import D, H, L, _profile


def _bits(t):
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


def test_plain_decode_applies_the_profile_or_refuses():
    p = _profile()
    kv = make_kv(layers=L, heads=H, dim=D, tokens=200, dtype="float16", seed=5)
    data = profile_encode(kv, p, "default-p")
    with pytest.raises(ConfigError, match="profile"):
        cachegen.decode(data)
    ref = profile_decode(data, profiles=p)
    got = cachegen.decode(data, profiles=p)
    for (a, b), (c, d) in zip(ref, got):
        assert np.array_equal(_bits(a), _bits(c)) and np.array_equal(_bits(b), _bits(d))
    bufs = [(torch.full((1, H, 256, D), 9.0, dtype=torch.float16), torch.full((1, H, 256, D), 9.0, dtype=torch.float16))
            for _ in range(L)]
    with pytest.raises(ConfigError):
        cachegen.decode_into(data, bufs)
    cachegen.decode_into(data, bufs, profiles=p)
    for (kb, vb), (a, b) in zip(bufs, ref):
        assert np.array_equal(_bits(kb[:, :, :200]), _bits(a)) and np.array_equal(_bits(vb[:, :, :200]), _bits(b))
        assert bool((kb[:, :, 200:] == 9.0).all())
