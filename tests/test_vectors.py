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
import zlib
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
    assert offset == 5828
    start = 630 + offset
    assert data[start:start + 22] == bytes.fromhex("7b758d88807a7d7a819691" "838d907f7e870088898a81")
    assert data[start + 22] == 0                                             # step mode 0 (per-channel)
    assert data[start + 23:start + 27] == bytes.fromhex("0abb56c2")          # lo[0..1], payload offset 5851
    assert data[start + 23 + 32:start + 23 + 38] == bytes.fromhex("8928f52c5d29")  # step[0..2], step[0] = f16 0x2889
    with np.load(VECTORS / "token_scaled_fp16.expected.npz") as exp:
        assert exp["layer0.key"][1, 0, 74, 0].view(np.uint16) == 0x3127
    # The three separately rounded fp32 operations of section 12, step 3.
    st, lo = np.float32(np.uint16(0x2889).view(np.float16)), np.float32(np.uint16(0xBB0A).view(np.float16))
    scale = np.uint32(0x3F8B95C2).view(np.float32)
    y = np.float32(np.float32(np.float32(st * np.float32(29)) + lo) * scale)
    assert y.view(np.uint32) == 0x3E24D64A and np.float16(y).view(np.uint16) == 0x3127


# ------------------------------------------------------------------ step modes (FORMAT.md 9, 15.1 36a/36b)

def _parse_lossy_blocks(data: bytes) -> list[dict]:
    """Walk every complete chunk of a lossy container by FORMAT.md section 9 alone (no cachegen):
    per block its chunk, layer, kv, channel count, file offset of the step-mode byte, the mode and
    the stored steps. Also checks that the parameters, directory and words fill each chunk exactly
    (the chunk size formula of section 9)."""
    header_size = struct.unpack_from("<I", data, 8)[0]
    pay = 16 + header_size
    dt, pdt, g, cps, B, C, n_layers, n_chunks, _, _, ts, _, _ = _fixed_header(data)
    layers = [struct.unpack_from("<IHHHHBBH", data, 48 + 16 * i) for i in range(n_layers)]
    p = {1: 2, 2: 4}[pdt]
    out = []
    for k in range(n_chunks):
        off, size, _ = struct.unpack_from("<QII", data, 48 + 16 * n_layers + 16 * k)
        if pay + off + size > len(data):
            break                                            # cut short (prefix_partial)
        pos, end, n_streams, fixed = pay + off, pay + off + size, 0, 0
        for i, (T, kh, kd, vh, vd, _, _, _) in enumerate(layers):
            n = max(0, min(C, T - k * C))
            if n == 0:
                continue
            for kv, ch in ((0, kh * kd), (1, vh * vd)):
                pos += ts * B * n
                mode = data[pos]
                assert mode in (0, 1)
                ns = ch if mode == 0 else 1
                steps = data[pos + 1 + ch * p:pos + 1 + (ch + ns) * p]
                out.append(dict(chunk=k, layer=i, kv=kv, channels=ch, at=pos, mode=mode, steps=steps, p=p))
                fixed += ts * B * n + 1 + (ch + ns) * p
                pos += 1 + (ch + ns) * p
                n_streams += -(-ch // cps)
        assert pos <= end
        words = struct.unpack_from(f"<{n_streams}I", data, pos)
        assert size == fixed + 4 * n_streams + 4 * sum(words)
    return out


def _rebuild(data: bytes, chunks: list[bytes]) -> bytes:
    """A container with new chunk payloads: chunk index (offsets, sizes, CRCs) and header CRC redone."""
    header_size = struct.unpack_from("<I", data, 8)[0]
    n_layers, n_chunks = _fixed_header(data)[6:8]
    header = bytearray(data[16:16 + header_size])
    assert len(chunks) == n_chunks
    off = 0
    for k, c in enumerate(chunks):
        struct.pack_into("<QII", header, 32 + 16 * n_layers + 16 * k, off, len(c), zlib.crc32(c) & 0xFFFFFFFF)
        off += len(c)
    pre = bytearray(data[:16])
    struct.pack_into("<I", pre, 12, zlib.crc32(header) & 0xFFFFFFFF)
    return bytes(pre) + bytes(header) + b"".join(chunks)


def _chunks(data: bytes) -> list[bytes]:
    header_size = struct.unpack_from("<I", data, 8)[0]
    n_layers, n_chunks = _fixed_header(data)[6:8]
    out = []
    for k in range(n_chunks):
        off, size, _ = struct.unpack_from("<QII", data, 48 + 16 * n_layers + 16 * k)
        out.append(data[16 + header_size + off:16 + header_size + off + size])
    return out


def _restore_as_mode0(data: bytes) -> bytes:
    """The container with every step-mode-1 block re-stored as step mode 0 (its step repeated per
    channel), chunk index and CRCs redone: valid by FORMAT.md section 9, same decoded output."""
    chunks = [bytearray(c) for c in _chunks(data)]
    starts = [len(data) - sum(len(c) for c in chunks[k:]) for k in range(len(chunks))]
    for blk in reversed(_parse_lossy_blocks(data)):             # back to front: offsets stay valid
        if blk["mode"] != 1:
            continue
        c, at = chunks[blk["chunk"]], blk["at"] - starts[blk["chunk"]]
        s_at = at + 1 + blk["channels"] * blk["p"]
        c[at] = 0
        c[s_at:s_at + blk["p"]] = blk["steps"] * blk["channels"]
    return _rebuild(data, [bytes(c) for c in chunks])


def test_vectors_cover_both_step_modes():
    modes = {}
    for name in LOSSY:
        blocks = _parse_lossy_blocks((VECTORS / ENTRIES[name]["file"]).read_bytes())
        assert blocks, name
        modes[name] = {b["mode"] for b in blocks}
        for b in blocks:
            vals = [b["steps"][j:j + b["p"]] for j in range(0, len(b["steps"]), b["p"])]
            # the reference encoder's rule (FORMAT.md 18): mode 1 iff all steps bitwise equal
            assert b["mode"] == 0 and len(vals) == b["channels"] and len(set(vals)) > 1 or \
                b["mode"] == 1 and len(vals) == 1, (name, b)
    assert set().union(*modes.values()) == {0, 1}
    assert modes["default_fp16"] == modes["small_batch2_fp32"] == {1}        # scale_sharing 1
    assert modes["paper_fp16"] == modes["token_scaled_fp16"] == {0}          # scale_sharing 0 / 0.5
    assert modes["tiny_example"] == {0, 1}                                   # both in one chunk (19.1)
    tiny = _parse_lossy_blocks((VECTORS / "tiny_example.cgk").read_bytes())
    assert [(b["chunk"], b["kv"], b["mode"], b["at"]) for b in tiny] == \
        [(0, 0, 0, 0x9B), (0, 1, 1, 0xA4), (1, 0, 1, 0xCB), (1, 1, 1, 0xD2)]


@pytest.mark.parametrize("decoder", ["reference", "lockstep"])
@pytest.mark.parametrize("bad", [2, 0x80, 0xFF])
def test_unknown_step_mode_rejected(decoder, bad):
    data = (VECTORS / "tiny_example.cgk").read_bytes()
    for blk in _parse_lossy_blocks(data):
        chunks = _chunks(data)
        k = blk["chunk"]
        start = len(data) - sum(len(c) for c in chunks[k:])     # file offset of chunk k
        c = bytearray(chunks[k])
        c[blk["at"] - start] = bad
        chunks[k] = bytes(c)
        bad_data = _rebuild(data, chunks)                       # CRCs fixed: only the mode is wrong
        with pytest.raises(cachegen.FormatError, match="unknown step mode"):
            cachegen.decode(bad_data, decoder=decoder)          # verify (CRC checks) on, the default


def test_step_mode_0_with_equal_steps_decodes_identically():
    """A decoder must accept either mode in any block (FORMAT.md 9): re-store every mode-1 block of
    tiny_example with mode 0 and its step repeated per channel; the output must not change."""
    data = (VECTORS / "tiny_example.cgk").read_bytes()
    widened = _restore_as_mode0(data)
    assert len(widened) == len(data) + 3 * 2                    # three mode-1 blocks of 2 channels, f16
    assert {b["mode"] for b in _parse_lossy_blocks(widened)} == {0}
    with np.load(VECTORS / "tiny_example.expected.npz") as exp:
        for decoder in ("reference", "lockstep"):
            _check_equal(cachegen.decode(widened, decoder=decoder), exp, "tiny_example (mode 0)")


@pytest.mark.parametrize("keep", [0, 1, 4, 6])
def test_truncated_parameters_rejected(keep):
    """Check 36a: chunk 1 of tiny_example cut to `keep` bytes (inside the first block's step mode,
    lo or step), chunk size and CRCs fixed."""
    data = (VECTORS / "tiny_example.cgk").read_bytes()
    chunks = _chunks(data)
    chunks[1] = chunks[1][:keep]
    with pytest.raises(cachegen.FormatError, match="truncated parameters"):
        cachegen.decode(_rebuild(data, chunks))


def test_inspect_counts_stored_step_mode():
    """inspect()'s byte accounting follows the stored step-mode byte, not the step values: a
    mode-0 block with equal steps (valid, FORMAT.md 9) still counts N_ch stored steps."""
    data = (VECTORS / "tiny_example.cgk").read_bytes()
    assert sum(l["bytes"] for l in cachegen.inspect(data)["per_layer"]) == len(data) - 155
    widened = _restore_as_mode0(data)
    info = cachegen.inspect(widened)
    assert sum(l["bytes"] for l in info["per_layer"]) == len(widened) - info["header_bytes"]
