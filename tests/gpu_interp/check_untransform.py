"""Run the GPU decoder's inverse profile transform under Triton's CPU interpreter (run as a
subprocess by tests/test_gpu_untransform_interp.py). Prints one JSON line per case: bit-exact vs
the CPU reference path (same torch fp32 ops on the CPU), destination rows outside the views
untouched; and the golden vector within FORMAT_V2 6.1's tolerance."""
from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import triton_interp  # noqa: E402

if not triton_interp.enable():
    sys.exit("this Triton has no interpreter hook we know (the test extra pins triton 3.6)")

import cachegen  # noqa: E402
from cachegen.gpu.v2 import GpuDecoder  # noqa: E402
from cachegen.profile import decode, encode  # noqa: E402
from helpers import make_kv  # noqa: E402
from cachegen.profile import Profile  # noqa: E402
from test_profile import H, L, D, _profile  # noqa: E402


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _wide_profile(dim: int, heads: int = 2) -> Profile:
    """test_profile's synthetic profile with a serving-size head_dim."""
    from cachegen.profile import ProfilePreset
    from cachegen.profile import transform as tf
    thetas = (1e4, 1e6, 1e4)
    calib = make_kv(layers=L, heads=heads, dim=dim, tokens=400, dtype="float32", seed=100)
    kb, vb = tf.fit_bases(calib, thetas, key_rope=True, center=False)
    return Profile(model="synthetic", n_layers=L, kv_heads=heads, head_dim=dim, rope_theta=thetas,
                   key_basis=np.stack([b.basis for b in kb]), value_basis=np.stack([b.basis for b in vb]),
                   sinks=1, presets={"default-p": ProfilePreset((7,) * L, (6,) * L)})


def within_tolerance(ref, got) -> bool:
    """FORMAT_V2 6.1: |decoded - reference| <= 2^-10 * max(1, |reference|), plus one unit in
    the last place of the output dtype (the GEMM sums in another order, so a value near a
    rounding boundary may round the other way)."""
    r, g = ref.double(), got.double()
    ulp = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23}[ref.dtype]
    return bool((torch.abs(g - r) <= (2.0 ** -10 + ulp) * torch.clamp(torch.abs(r), min=1.0)).all())


def main():
    out = {}
    p = _profile()
    pw = _wide_profile(64)
    # stream-interleaved scratch (the default): the bmm sums in another order than the
    # reference's matmul, so the spec's tolerance (sinks exact); natural order: bit-exact
    cases = {"fp16-windowed": ("float16", [200, 90, 200], 1, p, True),
             "bf16-batch2": ("bfloat16", None, 2, p, True),
             "fp32": ("float32", None, 1, p, True),
             "d64-fp16-windowed": ("float16", [200, 90, 200], 1, pw, True),
             "d32-h3-fp32": ("float32", None, 1, _wide_profile(32, heads=3), True),
             "natural-fp16-windowed": ("float16", [200, 90, 200], 1, p, False),
             "natural-bf16-batch2": ("bfloat16", None, 2, p, False)}
    for name, (dt, lengths, batch, pr, inter) in cases.items():
        kv = make_kv(layers=L, heads=pr.kv_heads, dim=pr.head_dim, tokens=200, dtype=dt, seed=9, lengths=lengths,
                     batch=batch)
        data = encode(kv, pr, "default-p")
        ref = decode(data, profiles=pr)
        cap = 7
        big = [tuple(torch.full((r.shape[0], r.shape[1], r.shape[2] + cap, r.shape[3]), -7.0, dtype=r.dtype)
                     for r in pair) for pair in ref]
        views = [(k[:, :, cap:], v[:, :, cap:]) for k, v in big]
        dec = GpuDecoder("cpu")
        dec.profiles = [pr]
        from cachegen.gpu.untransform import Untransformer
        ut = dec._untransformer = Untransformer("cpu")
        ut.interleave = inter
        dec.decode_into(data, views)
        prep = next(iter(ut._prep.values()))
        if any(ut._geometry(prep, g)[1] > 0 for g in prep.groups) != inter:
            out[name] = "scratch layout not the one asked for"
            continue
        if inter:
            good = all(within_tolerance(x, y) for a, b in zip(ref, views) for x, y in zip(a, b))
            # sink tokens are copied, never computed: exact (windowed layers have none)
            good &= all(torch.equal(bits(x[:, :, :n]), bits(y[:, :, :n]))
                        for a, b, n in zip(ref, views, prep.record.sinks) for x, y in zip(a, b))
        else:
            good = all(torch.equal(bits(x), bits(y)) for a, b in zip(ref, views) for x, y in zip(a, b))
        untouched = all(bool((t[:, :, :cap] == -7.0).all()) for pair in big for t in pair)
        out[name] = good and untouched
    # the golden vector (codec_spec/vectors/v2/profile) through the same path
    vec = os.path.join(os.path.dirname(os.path.dirname(HERE)), "codec_spec", "vectors", "v2", "profile")
    man = json.load(open(os.path.join(vec, "MANIFEST.json")))
    from cachegen.profile import Profile
    prof = Profile.from_bytes(open(os.path.join(vec, man["name"] + ".profile.npz"), "rb").read())
    data = open(os.path.join(vec, man["name"] + ".cgk"), "rb").read()
    ref = cachegen.decode(data, profiles=[prof])
    bufs = [(torch.empty_like(k), torch.empty_like(v)) for k, v in ref]
    dec = GpuDecoder("cpu")
    dec.profiles = [prof]
    dec.decode_into(data, bufs)
    with np.load(os.path.join(vec, man["name"] + ".expected.npz")) as exp:
        ok = True
        for i, (k, v) in enumerate(bufs):
            for kvn, t in (("key", k), ("value", v)):
                g, r = t.numpy().astype(np.float64), exp[f"layer{i}.{kvn}"].astype(np.float64)
                ok &= bool((np.abs(g - r) <= 2.0 ** -10 * np.maximum(1.0, np.abs(r))).all())
    out["golden-vector"] = ok
    # a container whose profile nobody has: ConfigError before any kernel runs
    try:
        GpuDecoder("cpu").decode_into(data, bufs)
        out["missing-profile"] = "no error"
    except cachegen.CacheGenError as e:
        out["missing-profile"] = type(e).__name__
    print(json.dumps(out))


if __name__ == "__main__":
    main()
