"""Golden vectors of the container format (codec_spec/vectors/): decode bit-exactly, never regenerate.

A failure here means the decoder no longer reads format v1 the way it did when the vectors were
made. Do not "fix" it by regenerating the vectors: a golden vector only changes together with a
format version bump (codec_spec/FORMAT.md, "Versioning").
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

import cachegen

SPEC = Path(__file__).resolve().parent.parent / "codec_spec"
VECTORS = SPEC / "vectors"
MANIFEST = json.loads((VECTORS / "MANIFEST.json").read_text())
ENTRIES = {e["name"]: e for e in MANIFEST["vectors"]}
LOSSY = [n for n, e in ENTRIES.items() if e["mode"] == "lossy"]
REQUIRED = {"default_fp16", "paper_fp16", "small_batch2_fp32", "hybrid_sliding_bf16", "lossless_fp16",
            "lossless_bf16", "prefix_partial", "tiny_example", "token_scaled_fp16"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.contiguous().numpy()


def _check_equal(decoded, expected: np.lib.npyio.NpzFile, name: str) -> None:
    want = {f"layer{i}.{kv}" for i in range(len(decoded)) for kv in ("key", "value")}
    assert set(expected.files) == want, f"{name}: npz members {sorted(expected.files)} != {sorted(want)}"
    for i, pair in enumerate(decoded):
        for kv, t in zip(("key", "value"), pair):
            got, exp = _as_numpy(t), expected[f"layer{i}.{kv}"]
            assert got.dtype == exp.dtype and got.shape == exp.shape, \
                f"{name} layer{i}.{kv}: {got.dtype}{got.shape} != {exp.dtype}{exp.shape}"
            # Compare bit patterns (NaN payloads, -0.0 included).
            assert got.tobytes() == exp.tobytes(), f"{name} layer{i}.{kv}: decoded bits differ"


def test_manifest_complete():
    assert MANIFEST["format_version"] == cachegen.FORMAT_VERSION == 1
    assert REQUIRED <= set(ENTRIES)
    listed = {e["file"] for e in ENTRIES.values()} | {e["expected"] for e in ENTRIES.values()}
    on_disk = {p.name for p in VECTORS.iterdir() if p.suffix in (".cgk", ".npz")}
    assert on_disk == listed, f"unlisted or missing vector files: {sorted(on_disk ^ listed)}"


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_sha256_and_version(name):
    e = ENTRIES[name]
    data = (VECTORS / e["file"]).read_bytes()
    assert len(data) == e["size"]
    assert hashlib.sha256(data).hexdigest() == e["sha256"], f"{name}.cgk changed (golden vectors are frozen)"
    assert _sha(VECTORS / e["expected"]) == e["expected_sha256"], f"{name}.expected.npz changed"
    assert e["format_version"] == 1 and data[:4] == b"CGKV" and data[4] == e["format_version"]


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_decode_bit_exact(name):
    e = ENTRIES[name]
    data = (VECTORS / e["file"]).read_bytes()
    with np.load(VECTORS / e["expected"]) as exp:
        _check_equal(cachegen.decode(data, partial=e["decode"]["partial"]), exp, name)


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_decode_lockstep_bit_exact(name):
    e = ENTRIES[name]
    data = (VECTORS / e["file"]).read_bytes()
    with np.load(VECTORS / e["expected"]) as exp:
        _check_equal(cachegen.decode(data, partial=e["decode"]["partial"], decoder="lockstep"), exp, name)


def test_prefix_partial_needs_partial_flag():
    e = ENTRIES["prefix_partial"]
    data = (VECTORS / e["file"]).read_bytes()
    with pytest.raises(cachegen.FormatError):
        cachegen.decode(data)
    info = cachegen.inspect(data)
    assert info["partial"] and len(info["chunks"]) == e["chunks_present"] == 1
    assert [l["tokens"] for l in info["per_layer"]] == e["tokens"] == [info["chunk_tokens"]] * info["layers"]


def test_manifest_metadata_matches_container():
    for name, e in ENTRIES.items():
        info = cachegen.inspect((VECTORS / e["file"]).read_bytes())
        assert (info["mode"], info["dtype"], info["layers"], info["batch"], info["chunk_tokens"]) == \
            (e["mode"], e["dtype"], e["layers"], e["batch"], e["chunk_tokens"]), name
        assert [l["tokens"] for l in info["per_layer"]] == e["tokens"], name


# ------------------------------------------------------------------ FORMAT.md worked example

def _hex_block(label: str) -> bytes:
    """Bytes of the annotated hex block `<!-- BEGIN HEX label -->` ... `<!-- END HEX -->` in FORMAT.md.

    Data lines look like `00a3: 00 40 00 bc   | comment`; offsets must run on without gaps."""
    text = (SPEC / "FORMAT.md").read_text()
    m = re.search(r"<!-- BEGIN HEX " + re.escape(label) + r" -->(.*?)<!-- END HEX -->", text, re.S)
    assert m, f"FORMAT.md has no hex block {label!r}"
    out = bytearray()
    for line in m.group(1).splitlines():
        lm = re.match(r"^([0-9a-f]{4,8}):((?: [0-9a-f]{2})+)\s*(\|.*)?$", line.strip())
        if not lm:
            continue
        assert int(lm.group(1), 16) == len(out), f"{label}: offset {lm.group(1)} out of sequence"
        out += bytes.fromhex(lm.group(2))
    assert out, f"{label}: empty hex block"
    return bytes(out)


def test_worked_example_hex_matches_vector():
    data = (VECTORS / "tiny_example.cgk").read_bytes()
    assert _hex_block("tiny_example.cgk") == data


def test_worked_example_model_section_hex():
    data = (VECTORS / "tiny_example.cgk").read_bytes()
    header_size = struct.unpack_from("<I", data, 8)[0]
    n_layers, n_chunks, raw_size, comp_size = struct.unpack_from("<IIII", data, 16 + 12)
    start = 16 + 32 + 16 * n_layers + 16 * n_chunks
    assert start + comp_size == 16 + header_size
    raw = zstandard.ZstdDecompressor().decompress(data[start:start + comp_size])
    assert len(raw) == raw_size
    assert _hex_block("tiny_example.model_section") == raw


def test_worked_example_decoded_values():
    """The decoded fp16 bit patterns quoted in FORMAT.md's worked example."""
    text = (SPEC / "FORMAT.md").read_text()
    m = re.search(r"<!-- BEGIN DECODED tiny_example -->(.*?)<!-- END DECODED -->", text, re.S)
    assert m
    rows = dict(re.findall(r"^\s*(key|value)\s*:\s*((?:[0-9a-f]{4}\s*)+)$", m.group(1), re.M))
    kv = cachegen.decode((VECTORS / "tiny_example.cgk").read_bytes())
    for name, t in zip(("key", "value"), kv[0]):
        bits = [f"{b:04x}" for b in t.view(torch.int16).numpy().view(np.uint16).ravel()]
        assert rows[name].split() == bits, name


# ------------------------------------------------------------------ token scaling (FORMAT.md 9, 12, 19.5)

def _fixed_header(data: bytes) -> tuple:
    """(dtype, param_dtype, group_size, cps, batch, chunk_tokens, n_layers, n_chunks, model_raw,
    model_comp, token_scaling, reserved8, reserved16) of FORMAT.md section 6.1."""
    return struct.unpack_from("<BBBBIIIIIIBBH", data, 16)


def test_token_scale_table_matches_spec():
    from cachegen.format.tables import TOKEN_SCALE_FRACTIONS, token_scale_table

    text = (SPEC / "FORMAT.md").read_text()
    sec = text[text.index("### 12.1 The token scale table"):text.index("## 13. Lossless chunk payload")]
    rows = re.findall(r"^\| (\d) \| `0x([0-9A-F]{8})` \| ([0-9.]+) \|$", sec, re.M)
    assert [int(j) for j, _, _ in rows] == list(range(8))
    frac = [int(b, 16) for _, b, _ in rows]
    assert tuple(frac) == tuple(TOKEN_SCALE_FRACTIONS)
    for j, (_, b, val) in enumerate(rows):
        f = np.uint32(int(b, 16)).view(np.float32)
        assert float(f) == float(val)
        # the binary32 nearest to 2**(j/8)
        assert abs(float(f) - 2.0 ** (j / 8)) <= 2.0 ** -24
    table = token_scale_table()
    bits = np.array([frac[e & 7] + ((e >> 3) - 16) * (1 << 23) for e in range(256)], dtype=np.uint32)
    assert table.dtype == np.float32 and table.view(np.uint32).tolist() == bits.tolist()
    assert table[128] == 1.0 and table[0] == 2.0 ** -16 and table.view(np.uint32)[255] == 0x476AC0C7


def test_vector_coverage_token_scaling_and_paper():
    for name in ("default_fp16", "small_batch2_fp32", "token_scaled_fp16"):
        h = _fixed_header((VECTORS / ENTRIES[name]["file"]).read_bytes())
        assert h[10] == 1 and h[11] == 0 and h[12] == 0, name
    for name in ("paper_fp16", "hybrid_sliding_bf16", "prefix_partial", "tiny_example", "lossless_fp16",
                 "lossless_bf16"):
        assert _fixed_header((VECTORS / ENTRIES[name]["file"]).read_bytes())[10] == 0, name
    e = ENTRIES["token_scaled_fp16"]
    h = _fixed_header((VECTORS / e["file"]).read_bytes())
    assert h[4] == e["batch"] == 2 and h[2] > 1
    assert all(t % e["chunk_tokens"] for t in e["tokens"])            # partial last chunk
    e = ENTRIES["paper_fp16"]
    assert e["encoder_config"] == {"preset": "cachegen-paper"}
    assert _fixed_header((VECTORS / e["file"]).read_bytes())[2] == 10  # anchor-delta groups of 10
    assert ENTRIES["default_fp16"]["encoder_config"] == {"preset": "default"}


def test_token_scaled_worked_element():
    """FORMAT.md section 19.5: chunk 2 of token_scaled_fp16 and one dequantized element."""
    data = (VECTORS / "token_scaled_fp16.cgk").read_bytes()
    header_size = struct.unpack_from("<I", data, 8)[0]
    n_layers, n_chunks = _fixed_header(data)[6:8]
    assert 16 + header_size == 630
    offset, size, _ = struct.unpack_from("<QII", data, 16 + 32 + 16 * n_layers + 16 * 2)
    assert offset == 5820
    start = 630 + offset
    assert data[start:start + 22] == bytes.fromhex("7b758d88807a7d7a819691" "838d907f7e870088898a81")
    assert data[start + 22:start + 26] == bytes.fromhex("0abb56c2")
    assert data[start + 22 + 32:start + 22 + 34] == bytes.fromhex("8928")    # step[0] = f16 0x2889
    with np.load(VECTORS / "token_scaled_fp16.expected.npz") as exp:
        assert exp["layer0.key"][1, 0, 74, 0].view(np.uint16) == 0x3127
    # The three separately rounded fp32 operations of section 12, step 3.
    st, lo = np.float32(np.uint16(0x2889).view(np.float16)), np.float32(np.uint16(0xBB0A).view(np.float16))
    scale = np.uint32(0x3F8B95C2).view(np.float32)
    y = np.float32(np.float32(np.float32(st * np.float32(29)) + lo) * scale)
    assert y.view(np.uint32) == 0x3E24D64A and np.float16(y).view(np.uint16) == 0x3127
