"""The model-profile golden vector (codec_spec/vectors/v2/profile/, FORMAT_V2.md section 6.1).

The dequantized coefficients are the bit-exact part of the format; the reconstruction (inverse
basis, RoPE re-applied to keys, exact sink tokens, cast) is float post-processing, checked
against the committed output within the spec's tolerance, and against an independent float64
implementation written from the spec text (not from cachegen's code).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import cachegen
from cachegen import dispatch

HERE = Path(__file__).resolve().parent.parent / "codec_spec" / "vectors" / "v2" / "profile"
M = json.loads((HERE / "MANIFEST.json").read_text())
NAME = M["name"]


def _read(suffix: str) -> bytes:
    return (HERE / f"{NAME}{suffix}").read_bytes()


def _profile():
    from cachegen.profile import Profile
    return Profile.from_bytes(_read(".profile.npz"))


def _within(got: np.ndarray, ref: np.ndarray) -> bool:
    """FORMAT_V2.md 6.1 Conformance: |x - ref| <= 2**-10 * max(1, |ref|) per element."""
    g, r = got.astype(np.float64), ref.astype(np.float64)
    return bool((np.abs(g - r) <= 2.0 ** -10 * np.maximum(1.0, np.abs(r))).all())


def test_files_frozen():
    for n, e in M["files"].items():
        b = (HERE / n).read_bytes()
        assert len(b) == e["size"] and hashlib.sha256(b).hexdigest() == e["sha256"], f"{n} changed (frozen)"


def test_coefficients_bit_exact():
    c = dispatch.open_container(_read(".cgk"))
    assert dispatch.has_transform(c)
    coeffs = dispatch.decode(c, torch.device("cpu"), "reference", True)
    with np.load(HERE / f"{NAME}.coeffs.npz") as exp:
        for i, (k, v) in enumerate(coeffs):
            for kv, t in (("key", k), ("value", v)):
                w = exp[f"layer{i}.{kv}"]
                assert t.numpy().dtype == w.dtype and t.numpy().tobytes() == w.tobytes(), (i, kv)


def test_output_within_tolerance_and_needs_the_profile():
    data = _read(".cgk")
    out = cachegen.decode(data, "cpu", profiles=[_profile()])
    with np.load(HERE / f"{NAME}.expected.npz") as exp:
        for i, (k, v) in enumerate(out):
            for kv, t in (("key", k), ("value", v)):
                assert t.dtype == torch.float16
                assert _within(t.numpy(), exp[f"layer{i}.{kv}"]), (i, kv)
    with pytest.raises(cachegen.CacheGenError):   # the profile is not shipped or registered
        cachegen.decode(data, "cpu")


def _spec_reconstruction(coeffs, prof, record) -> list:
    """Section 6.1 steps 1-4 in float64, from the spec text."""
    out = []
    sinks = record.sink_arrays(prof)
    for l, (yk, yv) in enumerate(coeffs):
        res = []
        for kvi, y in enumerate((yk, yv)):
            y = y.astype(np.float64)
            B, H, T, D = y.shape
            U = (prof.key_basis if kvi == 0 else prof.value_basis)[l].astype(np.float64)
            tok = y.transpose(0, 2, 1, 3).reshape(B, T, H * D)
            x = np.einsum("btj,cj->btc", tok, U).reshape(B, T, H, D).transpose(0, 2, 1, 3).copy()
            th = prof.rope_theta[l]
            if kvi == 0 and th > 0:
                i = np.arange(D // 2)
                a = (record.starts[l] + np.arange(T))[:, None] * th ** (-2.0 * i / D)[None, :]
                lo, hi = x[..., :D // 2].copy(), x[..., D // 2:].copy()
                x[..., :D // 2] = lo * np.cos(a) - hi * np.sin(a)
                x[..., D // 2:] = hi * np.cos(a) + lo * np.sin(a)
            n = record.sinks[l]
            if n:
                x[:, :, :n] = sinks[l][kvi].astype(np.float64)
            res.append(x.astype(np.float16))
        out.append(res)
    return out


def test_independent_reconstruction_within_tolerance():
    from cachegen.format.extensions import EXT_TRANSFORM, find
    from cachegen.profile.codec import TransformRecord
    c = dispatch.open_container(_read(".cgk"))
    rec = TransformRecord(find(list(c.header.extensions), EXT_TRANSFORM).payload)
    prof = _profile()
    assert rec.hash == prof.hash and rec.starts == [0] * M["layers"] and rec.sinks == [M["sinks"]] * M["layers"]
    with np.load(HERE / f"{NAME}.coeffs.npz") as cz:
        coeffs = [(cz[f"layer{i}.key"], cz[f"layer{i}.value"]) for i in range(M["layers"])]
    mine = _spec_reconstruction(coeffs, prof, rec)
    with np.load(HERE / f"{NAME}.expected.npz") as exp:
        for i, (k, v) in enumerate(mine):
            for kv, t in (("key", k), ("value", v)):
                assert _within(t, exp[f"layer{i}.{kv}"]), (i, kv)


@pytest.mark.gpu
def test_gpu_output_within_tolerance():
    """The GPU decoder's on-device inverse transform (cachegen.gpu.untransform) meets the same
    conformance rule, through decode and through decode_into strided views."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    data = _read(".cgk")
    out = cachegen.decode(data, "cuda", profiles=[_profile()])
    big = [(torch.full((k.shape[0], k.shape[1], k.shape[2] + 5, k.shape[3]), 7.0, dtype=k.dtype, device="cuda"),
            torch.full((v.shape[0], v.shape[1], v.shape[2] + 5, v.shape[3]), 7.0, dtype=v.dtype, device="cuda"))
           for k, v in out]
    cachegen.decode_into(data, [(k[:, :, 5:], v[:, :, 5:]) for k, v in big], profiles=[_profile()])
    with np.load(HERE / f"{NAME}.expected.npz") as exp:
        for i, ((k, v), (bk, bv)) in enumerate(zip(out, big)):
            for kv, t, b in (("key", k, bk), ("value", v, bv)):
                assert t.device.type == "cuda" and t.dtype == torch.float16
                assert _within(t.cpu().numpy(), exp[f"layer{i}.{kv}"]), (i, kv)
                assert _within(b[:, :, 5:].cpu().numpy(), exp[f"layer{i}.{kv}"]), (i, kv)
                assert bool((b[:, :, :5] == 7.0).all())
