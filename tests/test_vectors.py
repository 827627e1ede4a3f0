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
REQUIRED = {"default_fp16", "small_batch2_fp32", "hybrid_sliding_bf16", "lossless_fp16", "lossless_bf16",
            "prefix_partial"}


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
