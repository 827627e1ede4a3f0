"""Run the v2 GPU kernel under Triton's CPU interpreter and compare with the CPU reference.

Run as a subprocess by tests/test_gpu_v2_interp.py (TRITON_INTERPRET must be set before triton
is imported). Prints one JSON line: per case, exact (bool) and what corrupt inputs raised.
"""
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
from cachegen.format import v2 as fmt2  # noqa: E402
from cachegen.gpu.v2 import GpuDecoder  # noqa: E402
from helpers import make_kv  # noqa: E402


KERNEL = os.environ.get("KERNEL", "nested")    # GpuDecoder(kernel=...): each is checked


def bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


def run(cfg, dtype, **kw):
    kv = make_kv(layers=2, heads=1, tokens=kw.pop("tokens", 40), dim=8, dtype=dtype, **kw)
    data = cachegen.encode(kv, cfg)
    ref = cachegen.decode(data)
    cap = 8
    big = [(torch.full((a.shape[0], a.shape[1], a.shape[2] + cap, a.shape[3]), -7.0, dtype=a.dtype),
            torch.full((b.shape[0], b.shape[1], b.shape[2] + cap, b.shape[3]), -7.0, dtype=b.dtype)) for a, b in ref]
    views = [(k[:, :, cap:], v[:, :, cap:]) for k, v in big]   # strided views at an offset
    dec = GpuDecoder("cpu", kernel=KERNEL)
    dec.decode_into(data, views)
    exact = all(np.array_equal(bits(x), bits(r)) for p, q in zip(views, ref) for x, r in zip(p, q))
    untouched = all(bool((k[:, :, :cap] == -7.0).all()) for k, _ in big)
    return data, exact and untouched


def corrupt_counts(dec, data, lo, hi, rng, verify=True) -> dict:
    """Flip one random bit in bytes [lo, hi) N_CORRUPT times: what each decode raised ("none": silent)."""
    caught = {}
    for _ in range(int(os.environ.get("N_CORRUPT", "12"))):
        b = bytearray(data)
        p = int(rng.integers(lo, hi))
        b[p] ^= 1 << int(rng.integers(0, 8))
        bufs = [(torch.empty_like(k), torch.empty_like(v)) for k, v in cachegen.decode(data)]
        try:
            dec.decode_into(bytes(b), bufs, verify=verify)
            caught["none"] = caught.get("none", 0) + 1
        except cachegen.CacheGenError as err:
            caught[type(err).__name__] = caught.get(type(err).__name__, 0) + 1
    return caught


def main():
    out = {}
    cases = {
        "default-fp16": ("default", "float16", {}),
        # batch 2 with chunks of 16, 16 and 8 tokens: lanes of one program run different n, and a
        # lane past its n must keep its state for its next batch row (a nested-kernel bug once)
        "small-bf16-batch2": (cachegen.CodecConfig.from_preset("small", chunk_tokens=16), "bfloat16", {"batch": 2}),
        "high-fp32-windowed": ("high", "float32", {"lengths": [40, 17]}),
        "cps3-perchannel-steps": (cachegen.CodecConfig.from_preset("default", channels_per_stream=3, chunk_tokens=16,
                                                                  scale_sharing=0.0, token_scaling=False), "float16", {}),
    }
    if KERNEL != "flat":   # packed parameters (EXT_PACKED): the nested kernel after the parameter pass
        from cachegen.codec import encoder as E
        E._pays = lambda *a: True      # these caches are too small for packing to pay: pack anyway
        P = lambda preset, **kw: cachegen.CodecConfig.from_preset(preset, packed_params=True, **kw)
        cases.update({
            "packed-fp16": (P("default"), "float16", {}),
            "packed-bf16-batch2-windowed": (P("small", chunk_tokens=16), "bfloat16", {"batch": 2, "lengths": [40, 23]}),
            "packed-fp32-no-token-scales": (P("tiny", token_scaling=False, chunk_tokens=16), "float32", {}),
            # float32 destination: the deferred order (data kernel, then v2_dequant_kernel)
            "packed-fp32-deferred-batch2-windowed": (P("default", chunk_tokens=16), "float32",
                                                     {"batch": 2, "lengths": [40, 23]}),
        })
        # compact directory (EXT_COMPACT_DIR) with tiny segments (the encoder would pick one
        # segment here): bases, u16 entries inside a word, segment joins; 3 is legal, not a power of 2
        C = lambda preset, pk=False, **kw: cachegen.CodecConfig.from_preset(preset, compact_directory=True,
                                                                            packed_params=pk, **kw)
        groups = {"compact-g2-fp16": 2, "packed-compact-g3-bf16-batch2-windowed": 3, "compact-g1-cps3": 1}
        cases.update({
            "compact-g2-fp16": (C("default"), "float16", {}),
            "packed-compact-g3-bf16-batch2-windowed": (C("small", True, chunk_tokens=16), "bfloat16",
                                                       {"batch": 2, "lengths": [40, 23]}),
            "compact-g1-cps3": (C("default", channels_per_stream=3, chunk_tokens=16), "float16", {}),
        })
    datas = {}
    for name, (cfg, dt, kw) in cases.items():
        if "compact" in name:
            E.directory_group = lambda h, g=groups[name]: g
        data, ok = run(cfg, dt, **kw)
        h = fmt2.parse_container(data).header
        assert (h.packed is not None) == name.startswith("packed"), name
        assert h.dir_group == (groups[name] if "compact" in name else 0), name
        out[name] = ok
        datas[name] = data
    # Pipelined: chunk groups launched as their bytes "arrive" (every chunk its own group),
    # each after a wait for exactly the bytes it reads; bit-exact with one launch.
    data = datas["cps3-perchannel-steps"]
    c = fmt2.parse_container(data)
    ref = cachegen.decode(data)
    bufs = [(torch.empty_like(k), torch.empty_like(v)) for k, v in ref]
    waits = []
    GpuDecoder("cpu", block=4, pipeline=True, kernel=KERNEL).decode_into_pipelined(data, bufs, wait=waits.append, group_bytes=1)
    ends = [c.payload_start + int(o) + int(z) for o, z in zip(c.index["offset"], c.index["size"])]
    out["pipelined"] = (all(np.array_equal(bits(x), bits(r)) for p, q in zip(bufs, ref) for x, r in zip(p, q))
                        and waits == ends + [None] and c.n_chunks > 2)
    # Corrupt stream words: the device words checksum (verify=True) must catch every one.
    data = datas["default-fp16"]
    c = fmt2.parse_container(data)
    s = c.payload_start + int(c.index["offset"][0]) + int(c.index["meta_size"][0])
    e = c.payload_start + int(c.index["offset"][0]) + int(c.index["size"][0])
    rng = np.random.default_rng(0)
    dec = GpuDecoder("cpu", kernel=KERNEL)
    out["corrupt"] = corrupt_counts(dec, data, s, e, rng)
    if KERNEL != "flat":
        # packed: a flipped bit anywhere in chunk 0 (step, directory, data or parameter words)
        # must end in a cachegen error, never a silent or out-of-bounds decode
        data = datas["packed-fp16"]
        c = fmt2.parse_container(data)
        s0 = c.payload_start + int(c.index["offset"][0])
        e0 = s0 + int(c.index["size"][0])
        out["packed_corrupt_none"] = corrupt_counts(dec, data, s0, e0, rng).get("none", 0) == 0
        # the same for a compact directory (bases and u16 entries among the flipped bytes)
        data = datas["packed-compact-g3-bf16-batch2-windowed"]
        c = fmt2.parse_container(data)
        s0 = c.payload_start + int(c.index["offset"][0])
        lay = c.header.layout(0)
        out["compact_corrupt_none"] = corrupt_counts(dec, data, s0 + lay.dir_at, s0 + lay.meta_size + 8,
                                                     rng).get("none", 0) == 0
        # without the metadata CRC: the kernels' own directory checks (bases, joins, bounds) or
        # the streams' end states must catch a flipped base or entry (padding excluded)
        out["compact_unverified_none"] = corrupt_counts(dec, data, s0 + lay.dir_at, s0 + lay.rel_at + 2 * lay.n_dir,
                                                        rng, verify=False).get("none", 0) == 0
    if os.environ.get("DECODE_ONLY") == "1":   # the metadata CRC and the words sum do not depend on KERNEL
        print(json.dumps(out))
        return
    # Metadata (parameters, token scales, directory) is checked by the device CRC-32: a clean
    # cache whose metadata spans several CRC segments decodes, every flipped metadata bit raises
    # ChecksumError (not some other error first).
    kv = make_kv(layers=1, heads=1, tokens=260, dim=64, dtype="float16", seed=3)
    mdata = cachegen.encode(kv, "default")
    mc = fmt2.parse_container(mdata)
    mref = cachegen.decode(mdata)
    mbufs = [(torch.empty_like(k), torch.empty_like(v)) for k, v in mref]
    dec.decode_into(mdata, mbufs, verify=True)
    meta_ok = all(np.array_equal(bits(x), bits(r)) for p, q in zip(mbufs, mref) for x, r in zip(p, q))
    m0 = int(mc.index["meta_size"][0])
    meta_caught = {}
    for t in range(int(os.environ.get("N_META", "6"))):
        b = bytearray(mdata)
        k = int(rng.integers(0, mc.n_chunks))
        cs = mc.payload_start + int(mc.index["offset"][k])
        b[cs + int(rng.integers(0, int(mc.index["meta_size"][k])))] ^= 1 << int(rng.integers(0, 8))
        try:
            dec.decode_into(bytes(b), mbufs, verify=True)
            meta_caught["none"] = meta_caught.get("none", 0) + 1
        except cachegen.CacheGenError as err:
            meta_caught[type(err).__name__] = meta_caught.get(type(err).__name__, 0) + 1
    out["meta_crc"] = dict(clean_exact=meta_ok, meta0=m0, caught=meta_caught)
    # A corruption the rANS end state misses (rANS resynchronizes: ~5% of word edits decode to a
    # wrong cache with a clean end state): found with the CPU reference, then the device words
    # checksum must reject it.
    from cachegen.codec.decoder_v2 import decode_chunk
    silent = None
    for t in range(3000):
        b = bytearray(data)
        p = int(rng.integers(s, e))
        b[p] ^= 1 << int(rng.integers(0, 8))
        cb = fmt2.parse_container(bytes(b))
        try:
            list(decode_chunk(cb, 0, verify=False))
        except cachegen.CacheGenError:
            continue
        silent = bytes(b)
        break
    if silent is not None:
        bufs = [(torch.empty_like(k), torch.empty_like(v)) for k, v in cachegen.decode(data)]
        try:
            dec.decode_into(silent, bufs, verify=True)
            out["silent_case"] = "missed"
        except cachegen.ChecksumError:
            out["silent_case"] = "ChecksumError"
        except cachegen.CacheGenError as err:
            out["silent_case"] = type(err).__name__
    else:
        out["silent_case"] = "not found"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
