"""Format v2 GPU decoder (cachegen.gpu.v2): bit-exact vs the CPU reference, errors, fuzz."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cachegen
from cachegen.format import v2 as fmt2
from helpers import make_kv

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
import triton  # noqa: E402,F401  (the GPU decoder needs it on a CUDA machine)

from cachegen.gpu.v2 import GpuDecoder  # noqa: E402


def _bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


CASES = [
    dict(cfg="default", dtype="float16"),
    dict(cfg="small", dtype="bfloat16"),
    dict(cfg="high", dtype="float32"),
    dict(cfg="tiny", dtype="float16", batch=2),
    dict(cfg="default", dtype="float16", lengths=[300, 120, 300]),
    dict(cfg=cachegen.CodecConfig.from_preset("default", channels_per_stream=1), dtype="float16"),
    dict(cfg=cachegen.CodecConfig.from_preset("default", channels_per_stream=3, chunk_tokens=100), dtype="float16"),
    dict(cfg=cachegen.CodecConfig.from_preset("default", scale_sharing=0.5, token_scaling=False), dtype="float16"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{getattr(c['cfg'], 'name', c['cfg'])}-{c['dtype']}")
def test_gpu_matches_cpu_reference(case):
    kv = make_kv(layers=3, heads=3, tokens=300, dim=32, dtype=case["dtype"], batch=case.get("batch", 1),
                 lengths=case.get("lengths"), seed=7)
    data = cachegen.encode(kv, case["cfg"])
    assert fmt2.peek_version(data) == 2
    ref = cachegen.decode(data)
    gpu = cachegen.decode(data, device="cuda")
    for (rk, rv), (gk, gv) in zip(ref, gpu):
        assert np.array_equal(_bits(rk), _bits(gk)) and np.array_equal(_bits(rv), _bits(gv))


def test_decode_into_strided_views_and_reuse():
    kv = make_kv(layers=2, heads=3, tokens=500, dim=64, dtype="float16", seed=3)
    data = cachegen.encode(kv, "default")
    ref = cachegen.decode(data)
    dec = GpuDecoder("cuda")
    cap = 700
    big = [(torch.full((1, 3, cap, 64), float("nan"), dtype=torch.float16, device="cuda"),
            torch.full((1, 3, cap, 64), float("nan"), dtype=torch.float16, device="cuda")) for _ in range(2)]
    views = [(k[:, :, 100:600], v[:, :, 100:600]) for k, v in big]
    for _ in range(2):  # second call reuses the shape plan
        dec.decode_into(data, views)
    for (k, v), (rk, rv) in zip(big, ref):
        assert np.array_equal(_bits(k[:, :, 100:600]), _bits(rk))
        assert torch.isnan(k[:, :, :100]).all() and torch.isnan(k[:, :, 600:]).all()


def test_payload_already_on_device():
    kv = make_kv(layers=2, heads=2, tokens=300, dim=16, dtype="float16", seed=5)
    data = cachegen.encode(kv, "default")
    c = fmt2.parse_container(data)
    pad = (-len(data)) % 4
    dev = torch.frombuffer(bytearray(data + b"\0" * pad), dtype=torch.uint8).cuda()
    out = [(torch.empty_like(torch.as_tensor(k)).cuda(), torch.empty_like(torch.as_tensor(v)).cuda()) for k, v in kv]
    GpuDecoder("cuda").decode_into(c, out, payload=dev)
    ref = cachegen.decode(data)
    for (k, v), (rk, rv) in zip(out, ref):
        assert np.array_equal(_bits(k), _bits(rk))


def test_corrupt_streams_raise_not_silent():
    kv = make_kv(layers=2, heads=2, tokens=300, dim=16, dtype="float16", seed=9)
    data = bytearray(cachegen.encode(kv, "default"))
    c = fmt2.parse_container(bytes(data))
    s = c.payload_start + int(c.index["offset"][0]) + int(c.index["meta_size"][0])
    rng = np.random.default_rng(0)
    caught = 0
    for trial in range(50):
        bad = bytearray(data)
        p = int(rng.integers(s, s + 400))
        bad[p] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(cachegen.CacheGenError):
            cachegen.decode(bytes(bad), device="cuda", verify="full")
        try:   # without the host CRC of the words, the rANS end state must catch it
            out = cachegen.decode(bytes(bad), device="cuda", verify=True)
        except cachegen.CacheGenError:
            caught += 1
            continue
        ref = cachegen.decode(bytes(data))
        # not caught: then it must not differ silently from what the CPU reference says
        with pytest.raises(cachegen.CacheGenError):
            cachegen.decode(bytes(bad), verify=False)
        del out, ref
    assert caught >= 45


def test_fuzz_gpu_mutations_end_in_cachegen_error():
    """Random byte edits anywhere: CacheGenError or a decode that equals the CPU reference's."""
    kv = make_kv(layers=2, heads=2, tokens=260, dim=16, dtype="float16", seed=11)
    data = cachegen.encode(kv, "small")
    rng = np.random.default_rng(1)
    n = 2000
    outcomes = {"error": 0, "same": 0}
    for i in range(n):
        bad = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            p = int(rng.integers(0, len(bad)))
            bad[p] = int(rng.integers(0, 256))
        try:
            g = cachegen.decode(bytes(bad), device="cuda", verify=False)
        except cachegen.CacheGenError:
            outcomes["error"] += 1
            continue
        r = cachegen.decode(bytes(bad), verify=False)
        for (gk, gv), (rk, rv) in zip(g, r):
            assert np.array_equal(_bits(gk), _bits(rk)) and np.array_equal(_bits(gv), _bits(rv))
        outcomes["same"] += 1
    assert outcomes["error"] > n // 2
