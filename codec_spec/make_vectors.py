#!/usr/bin/env python
"""Generate the cachegen container format v1 golden vectors (codec_spec/vectors/).

Run once, commit the output; tests/test_vectors.py only reads it and never regenerates.

    python codec_spec/make_vectors.py NAME ...   # writes new vectors (never overwrites without --force)
    python codec_spec/make_vectors.py --check    # regenerate in memory, report differences
    python codec_spec/make_vectors.py --format 2 # the format v2 vectors (codec_spec/vectors/v2/)

Every input KV cache is built from a seeded numpy RNG. The .cgk bytes are whatever
``cachegen.encode`` produced when the vectors were made; the encoder is not normative (its
zstd level, table clustering and even the zstd library version can change the bytes), so a
later re-run may legitimately produce different bytes. The committed files are the reference:
a golden vector only changes together with a container format version bump
(codec_spec/FORMAT.md, "Versioning"). The exceptions so far: all vectors were regenerated with
--force by the two pre-release revisions of v1 (FORMAT.md section 17): the one that added token
scaling, and the one that added the per-block step mode byte (one shared step stored once).

Expected outputs (NAME.expected.npz) are the decoded arrays ``layer{i}.key`` / ``layer{i}.value``
with shape [batch, heads, tokens, head_dim]; float16 and float32 are stored as such, bfloat16 as
its raw uint16 bit patterns (numpy has no bfloat16).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

import cachegen
from cachegen import CodecConfig

HERE = Path(__file__).resolve().parent
OUT = HERE / "vectors"
OUT_V2 = OUT / "v2"


# ----------------------------------------------------------------------------- inputs

def smooth_channels(rng: np.random.Generator, batch: int, heads: int, tokens: int, dim: int,
                    scale: float = 1.0, outliers: int = 0, outlier_scale: float = 8.0) -> np.ndarray:
    """KV-like float32 data [B, H, T, D]: per-channel offset and scale, token-correlated noise,
    a few outlier channels (as keys have)."""
    off = rng.normal(0.0, 1.0, size=(1, heads, 1, dim))
    amp = rng.uniform(0.3, 1.5, size=(1, heads, 1, dim))
    if outliers:
        idx = rng.choice(heads * dim, size=outliers, replace=False)
        amp.reshape(-1)[idx] *= outlier_scale
    noise = rng.normal(0.0, 1.0, size=(batch, heads, tokens, dim))
    walk = np.cumsum(noise, axis=2) / np.sqrt(np.arange(1, tokens + 1))[None, None, :, None]
    x = off + amp * (0.7 * walk + 0.3 * rng.normal(0.0, 1.0, size=noise.shape))
    return (scale * x).astype(np.float32)


def layer_pair(rng, batch, heads, tokens, dim, v_heads=None, v_dim=None, **kw):
    k = smooth_channels(rng, batch, heads, tokens, dim, outliers=max(1, heads * dim // 16), **kw)
    v = smooth_channels(rng, batch, v_heads or heads, tokens, v_dim or dim, **kw)
    return k, v


def to_torch(kv, dtype):
    return [(torch.from_numpy(k).to(dtype), torch.from_numpy(v).to(dtype)) for k, v in kv]


def bf16_from_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)


# ---------------------------------------------------------------------------- vectors

def v_default_fp16():
    rng = np.random.default_rng(1001)
    # 4 layers, GQA-style 2 KV heads of dim 16, 300 tokens: chunks of 256 + 44 (partial last).
    kv = [layer_pair(rng, 1, 2, 300, 16) for _ in range(4)]
    return to_torch(kv, torch.float16), "default", {}, \
        "preset default (K 6 / V 5 bits, token scaling, shared step: step mode 1 in every block, group 1, 8 channels/stream), fp16, 4 layers, " \
        "2 chunks (256 + 44 tokens)"


def v_paper_fp16():
    rng = np.random.default_rng(1008)
    # The CacheGen paper layout: 8/6/4 bits by layer thirds, anchor-delta groups of 10, per-channel ranges.
    kv = [layer_pair(rng, 1, 2, 300, 16) for _ in range(3)]
    return to_torch(kv, torch.float16), "cachegen-paper", {}, \
        "preset cachegen-paper (8/6/4 bits by layer thirds, anchor-delta groups of 10, no token scaling, per-channel steps: step mode 0 in every block), fp16, " \
        "3 layers, 2 chunks (256 + 44 tokens)"


def v_small_batch2_fp32():
    rng = np.random.default_rng(1002)
    # Layer 1 has a huge-magnitude key channel: max |x| >= 30000 selects fp32 quantizer parameters.
    kv = [layer_pair(rng, 2, 2, 37, 8) for _ in range(3)]
    kv[1][0][:, 1, :, 3] *= 40000.0
    # Layer 2: value heads/dim differ from key heads/dim (allowed by the format).
    kv[2] = layer_pair(rng, 2, 2, 37, 8, v_heads=1, v_dim=12)
    return to_torch(kv, torch.float32), "small", {}, \
        "preset small (K 5 / V 4 bits, token scaling, shared step: step mode 1), fp32, batch 2, 37 tokens, fp32 quantizer parameters, K/V shapes differ in layer 2"


HYBRID_CONFIG = CodecConfig(name="hybrid-g1", key_bits=(8, 8, 6, 6, 5, 4), value_bits=(6, 6, 5, 5, 4, 3),
                            group_size=1, chunk_tokens=32, channels_per_stream=8, tables_per_class=4)


def v_hybrid_sliding_bf16():
    rng = np.random.default_rng(1003)
    # Gemma-like: 1 KV head of dim 32; sliding-window layers keep the last 40 tokens, full layers 80.
    pattern = ["sliding", "sliding", "full", "sliding", "sliding", "full"]
    kv = [layer_pair(rng, 1, 1, 80 if p == "full" else 40, 32) for p in pattern]
    return to_torch(kv, torch.bfloat16), HYBRID_CONFIG, {}, \
        "custom config (group_size 1, chunk 32, per-layer bits), bf16, 1 KV head x 32, layers of 40 and 80 tokens: " \
        "chunk 1 holds 8 tokens of the sliding layers, chunk 2 only the full layers"


def v_lossless_fp16():
    rng = np.random.default_rng(1004)
    kv = [layer_pair(rng, 1, 2, 300, 16) for _ in range(2)]
    t = to_torch(kv, torch.float16)
    # Special values must survive bit-exactly: inf, -inf, NaN, -0.0, subnormals, max.
    k = t[0][0]
    k[0, 0, 0, :6] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 6e-8, 65504.0],
                                  dtype=torch.float16)
    return t, "lossless", {}, "preset lossless, fp16, 2 layers, 2 chunks (256 + 44), with inf/NaN/-0/subnormal values"


LOSSLESS_C32 = CodecConfig(name="lossless-c32", lossless=True, chunk_tokens=32)


def v_lossless_bf16():
    rng = np.random.default_rng(1005)
    kv = [layer_pair(rng, 1, 1, n, 32) for n in (70, 40, 70)]
    t = to_torch(kv, torch.bfloat16)
    bits = np.array([0x7F80, 0xFF80, 0x7FC1, 0xFFC0, 0x8000, 0x0001, 0x7F7F], dtype=np.uint16)  # inf,-inf,NaNs,-0,subnormal,max
    t[0][1][0, 0, 5, :bits.size] = bf16_from_bits(bits)
    return t, LOSSLESS_C32, {}, "lossless mode, chunk 32, bf16, layers of 70/40/70 tokens (3 chunks), NaN payloads and specials"


PREFIX_CONFIG = CodecConfig(name="prefix-c64", key_bits="8/6/4", value_bits="8/6/4", group_size=10,
                            chunk_tokens=64, channels_per_stream=8)


def v_prefix_partial():
    rng = np.random.default_rng(1006)
    kv = [layer_pair(rng, 1, 2, 150, 16) for _ in range(3)]
    return to_torch(kv, torch.float16), PREFIX_CONFIG, {"truncate": "mid_chunk_1"}, \
        "3-chunk lossy container (chunk 64, 150 tokens) cut in the middle of chunk 1; decode with partial=True -> first 64 tokens"


TINY_CONFIG = CodecConfig(name="worked-example", key_bits=2, value_bits=3, group_size=2, chunk_tokens=4,
                          channels_per_stream=1, tables_per_class=1)


def v_tiny_example():
    # The worked example of FORMAT.md: 1 layer, batch 1, 1 head of dim 2, 5 tokens, 2 chunks.
    k = np.array([[[[0.0, 1.0], [0.5, 1.5], [1.0, 1.0], [1.5, 0.5], [-0.25, 2.0]]]], dtype=np.float32)
    v = np.array([[[[2.0, -1.0], [2.5, -1.0], [3.0, -0.5], [2.0, 0.0], [1.0, 1.0]]]], dtype=np.float32)
    return to_torch([(k, v)], torch.float16), TINY_CONFIG, {}, \
        "worked example of FORMAT.md: 1 layer, 1 head x 2, 5 tokens, chunk 4, group 2, 2/3 bits, fp16; " \
        "step modes 0 and 1 in one chunk"


TOKEN_SCALED_CONFIG = CodecConfig(name="token-scaled-g4", key_bits=6, value_bits=(5, 4), group_size=4,
                                  chunk_tokens=32, channels_per_stream=4, tables_per_class=4,
                                  token_scaling=True, scale_sharing=0.5)


def v_token_scaled_fp16():
    rng = np.random.default_rng(1007)
    # batch 2, 75 tokens: chunks of 32 + 32 + 11 (partial last chunk, short last group of 3).
    kv = [layer_pair(rng, 2, 2, 75, 8) for _ in range(2)]
    # Per-token magnitudes spread over a wide range of scale codes: an all-zero token (code 0),
    # a loud token (code > 200), a quiet one, and per-token gain drift.
    for k, v in kv:
        gain = np.exp(rng.normal(0.0, 0.7, size=(2, 1, 75, 1))).astype(np.float32)
        k *= gain
        v *= gain
    kv[0][0][1, :, 70, :] = 0.0
    kv[0][1][0, :, 5, :] *= 1000.0
    kv[1][0][0, :, 33, :] *= 1e-3
    return to_torch(kv, torch.float16), TOKEN_SCALED_CONFIG, {}, \
        "custom config with token_scaling=1 (K 6 bits, V 5/4 bits, group 4, scale_sharing 0.5, chunk 32, " \
        "4 channels/stream), fp16, batch 2, 2 layers x 2 heads x 8, 75 tokens (32 + 32 + 11, partial last chunk); " \
        "scale codes from 0 (an all-zero token) to > 200"


def _v2_extensions():
    from cachegen.format.extensions import EXT_QUALITY, EXT_USER, Extension
    return [Extension.json(EXT_QUALITY, {"kl_mean": 0.0012, "probe_tokens": 32, "preset": "default"}),
            Extension.json(EXT_USER, {"doc": "golden vector", "n": 3}),
            Extension(0x0123, b"an unknown, ignorable record: decoders skip it")]


V2_CPS1_CONFIG = CodecConfig(name="v2-cps1-tb8", key_bits=7, value_bits=5, token_scaling=True, scale_sharing=1.0,
                             group_size=1, chunk_tokens=64, channels_per_stream=1, tables_per_class=3, table_bits=8)


def v_v2_cps1_tb8():
    rng = np.random.default_rng(2001)
    kv = [layer_pair(rng, 1, 2, 150, 16) for _ in range(2)]
    return to_torch(kv, torch.float16), V2_CPS1_CONFIG, {}, \
        "v2 custom config: 1 channel per stream, 8-bit tables (direct lookup of 256 slots), chunk 64, K7/V5, fp16, 150 tokens (64+64+22)"


def v_v2_extensions():
    rng = np.random.default_rng(2002)
    kv = [layer_pair(rng, 1, 2, 40, 8) for _ in range(2)]
    return to_torch(kv, torch.float16), "default", {"extensions": "quality+user+unknown"}, \
        "v2 preset default with three extension records: quality (JSON), user (JSON) and an unknown non-critical kind 0x0123 that a decoder must skip"


V2_PACKED_CONFIG = CodecConfig(name="v2-packed", key_bits=6, value_bits=4, token_scaling=True, scale_sharing=1.0,
                               group_size=1, chunk_tokens=32, channels_per_stream=4, packed_params=True)


def v_v2_packed_params():
    rng = np.random.default_rng(2003)
    kv = [layer_pair(rng, 2, 2, t, 8) for t in (70, 37)]
    return to_torch(kv, torch.float16), V2_PACKED_CONFIG, {}, \
        "v2 packed parameters (extension 0x8002, FORMAT_V2.md 6.2): K6/V4, token scaling, chunk 32, 4 channels/stream, " \
        "fp16, batch 2, 2 layers x 2 heads x 8 of 70 and 37 tokens (chunks with 2 and 4 blocks, a partial last one)"


V2_COMPACT_CONFIG = CodecConfig(name="v2-compact", key_bits=6, value_bits=4, token_scaling=True, scale_sharing=1.0,
                                group_size=1, chunk_tokens=32, channels_per_stream=3, packed_params=True,
                                compact_directory=True)


def v_v2_compact_dir():
    rng = np.random.default_rng(2004)
    kv = [layer_pair(rng, 1, 2, t, 8) for t in (70, 45)]
    return to_torch(kv, torch.float16), V2_COMPACT_CONFIG, {}, \
        "v2 compact directory (extension 0x8003, FORMAT_V2.md 6.3) with g = 3 over packed parameters: K6/V4, " \
        "token scaling, chunk 32, 3 channels/stream (6 streams a block), fp16, 2 layers x 2 heads x 8 of 70 and 45 tokens"


VECTORS = {
    "default_fp16": v_default_fp16,
    "paper_fp16": v_paper_fp16,
    "small_batch2_fp32": v_small_batch2_fp32,
    "hybrid_sliding_bf16": v_hybrid_sliding_bf16,
    "lossless_fp16": v_lossless_fp16,
    "lossless_bf16": v_lossless_bf16,
    "prefix_partial": v_prefix_partial,
    "tiny_example": v_tiny_example,
    "token_scaled_fp16": v_token_scaled_fp16,
}

# Format v2 vectors (codec_spec/vectors/v2/): the v1 inputs re-encoded as v2, plus v2-only ones.
VECTORS_V2 = {**VECTORS, "cps1_tb8": v_v2_cps1_tb8, "extensions": v_v2_extensions,
              "packed_params": v_v2_packed_params, "compact_dir": v_v2_compact_dir}


# ----------------------------------------------------------------------------- output

def expected_arrays(decoded) -> dict[str, np.ndarray]:
    out = {}
    for i, (k, v) in enumerate(decoded):
        for name, t in (("key", k), ("value", v)):
            if t.dtype == torch.bfloat16:
                a = t.contiguous().view(torch.int16).numpy().view(np.uint16)
            else:
                a = t.numpy()
            out[f"layer{i}.{name}"] = np.ascontiguousarray(a)
    return out


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def config_desc(cfg) -> dict:
    if isinstance(cfg, str):
        return {"preset": cfg}  # as frozen in FROZEN_PRESETS
    return {"custom": cfg.to_dict()}


# The presets as they were when the vectors were made: the vectors are frozen artifacts, so
# later re-tuning of cachegen.PRESETS must not change what --check rebuilds.
_MODERN = dict(group_size=1, token_scaling=True, scale_sharing=1.0)
FROZEN_PRESETS = {
    "default": cachegen.CodecConfig(name="default", key_bits=6, value_bits=5, **_MODERN),
    "small": cachegen.CodecConfig(name="small", key_bits=5, value_bits=4, **_MODERN),
    "cachegen-paper": cachegen.CodecConfig(name="cachegen-paper", key_bits="8/6/4", value_bits="8/6/4",
                                           group_size=10),
    "lossless": cachegen.CodecConfig(name="lossless", lossless=True),
}


def build(name: str, version: int = 1):
    kv, cfg, extra, desc = (VECTORS if version == 1 else VECTORS_V2)[name]()
    from cachegen.codec import encoder as E, params as PR
    patches = {}   # encoder knobs of a vector as it was made, restored afterwards
    if name == "packed_params":
        # frozen as made (2026-12-04): r = 3, packed although a cache this small does not pay
        patches = {(E, "_pays"): lambda *a: True, (PR, "FRAC_BITS"): 3, (PR, "OFFSET_PHASES"): 0}
    if name == "compact_dir":
        # segments of 3 (the encoder would pick one segment for a cache this small)
        # made 2026-12-05 with r = 6 and lo at each channel's minimum
        patches = {(E, "_pays"): lambda *a: True, (E, "directory_group"): lambda h: 3,
                   (PR, "FRAC_BITS"): 6, (PR, "OFFSET_PHASES"): 0}
    saved = {k: getattr(*k) for k in patches}
    exts = _v2_extensions() if extra.get("extensions") else ()
    try:
        for (mod, attr), v in patches.items():
            setattr(mod, attr, v)
        data = cachegen.encode(kv, FROZEN_PRESETS[cfg] if isinstance(cfg, str) else cfg, format_version=version,
                               extensions=exts)
    finally:
        for (mod, attr), v in saved.items():
            setattr(mod, attr, v)
    full = cachegen.decode(data)
    # The input is decoded back and checked here so that a broken encoder cannot produce a vector.
    partial = False
    if extra.get("truncate") == "mid_chunk_1":
        info = cachegen.inspect(data)
        c1 = info["chunks"][1]
        cut = info["header_bytes"] + c1["offset"] + c1["size"] // 2
        data = data[:cut]
        partial = True
    dec = cachegen.decode(data, partial=partial)
    lossy = cachegen.inspect(data)["mode"] == "lossy"
    if lossy:   # v2's second decoder (the GPU kernel) is checked by tests/test_vectors_v2.py
        lock = cachegen.decode(data, partial=partial, decoder="lockstep") if version == 1 else dec
        for (a, b), (c, d) in zip(dec, lock):
            assert torch.equal(a.view(torch.int16) if a.dtype != torch.float32 else a.view(torch.int32),
                               c.view(torch.int16) if c.dtype != torch.float32 else c.view(torch.int32))
            assert torch.equal(b.view(torch.int16) if b.dtype != torch.float32 else b.view(torch.int32),
                               d.view(torch.int16) if d.dtype != torch.float32 else d.view(torch.int32))
    else:
        for (a, b), (c, d) in zip(dec, kv):  # lossless: bit-exact against the input
            for x, y in ((a, c), (b, d)):
                xi = x.view(torch.int16) if x.element_size() == 2 else x.view(torch.int32)
                yi = y.view(torch.int16) if y.element_size() == 2 else y.view(torch.int32)
                assert torch.equal(xi[:, :, :xi.shape[2]], yi[:, :, :xi.shape[2]]), name
    del full
    arrays = expected_arrays(dec)
    info = cachegen.inspect(data)
    entry = {
        "name": name,
        "file": f"{name}.cgk",
        "size": len(data),
        "sha256": sha256(data),
        "expected": f"{name}.expected.npz",
        "format_version": info["format_version"],
        "mode": info["mode"],
        "dtype": info["dtype"],
        "expected_encoding": "uint16 bit patterns of bfloat16" if info["dtype"] == "bfloat16" else info["dtype"],
        "decode": {"partial": partial},
        "decoders": (["reference", "lockstep"] if version == 1 else ["reference", "gpu"])
        if info["mode"] == "lossy" else ["lossless"],
        "layers": info["layers"],
        "batch": info["batch"],
        "chunk_tokens": info["chunk_tokens"],
        "chunks_present": len(info["chunks"]),
        "tokens": [l["tokens"] for l in info["per_layer"]],
        "encoder_config": config_desc(cfg),
        "description": desc,
    }
    if version == 2:
        entry["table_bits"] = info["table_bits"]
        entry["extensions"] = [{"kind": x["kind"], "critical": x["critical"], "bytes": x["bytes"]}
                               for x in info["extensions"]]
    return data, arrays, entry


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="regenerate in memory and compare, write nothing")
    ap.add_argument("--force", action="store_true",
                    help="overwrite existing vectors (only with a format version bump, see FORMAT.md section 17)")
    ap.add_argument("--format", type=int, choices=(1, 2), default=1, help="format version of the vectors")
    ap.add_argument("names", nargs="*", help="vectors to build (default: all)")
    args = ap.parse_args(argv)
    version = args.format
    table = VECTORS if version == 1 else VECTORS_V2
    out = OUT if version == 1 else OUT_V2
    names = args.names or list(table)
    out.mkdir(exist_ok=True)
    manifest_path = out / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    entries = {e["name"]: e for e in manifest.get("vectors", [])}
    status = 0
    for name in names:
        data, arrays, entry = build(name, version)
        if args.check:
            old = (out / entry["file"]).read_bytes() if (out / entry["file"]).exists() else b""
            same = old == data
            print(f"{name}: {'identical' if same else 'DIFFERS'} ({len(data)} bytes)")
            status |= not same
            continue
        if (out / entry["file"]).exists() and not args.force:
            print(f"{name}: exists, left alone (golden vectors are frozen; --force to overwrite)")
            continue
        (out / entry["file"]).write_bytes(data)
        (out / entry["expected"]).write_bytes(npz_bytes(arrays))
        entry["expected_sha256"] = sha256((out / entry["expected"]).read_bytes())
        entries[name] = entry
        print(f"{name}: {len(data)} bytes, sha256 {entry['sha256'][:16]}...")
    if not args.check:
        manifest = {
            "format": "cachegen container",
            "format_version": version,
            "spec": "codec_spec/FORMAT.md" if version == 1 else "codec_spec/FORMAT_V2.md",
            "expected_arrays": "npz members layer{i}.key / layer{i}.value, [batch, heads, tokens, head_dim]; "
                               "bfloat16 stored as uint16 bit patterns",
            "vectors": [entries[n] for n in table if n in entries],
        }
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
