"""Golden vectors of container format v2 (codec_spec/vectors/v2/): decode bit-exactly, never regenerate.

The same inputs as the v1 vectors (re-encoded as v2) plus v2-only ones (1 channel per stream with
8-bit tables; extension records, one of an unknown non-critical kind). Decoded by the CPU
reference, by the GPU decoder where CUDA is present, and by the GPU kernel under Triton's CPU
interpreter where triton is installed (small vectors only: the interpreter is slow).
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import cachegen
from cachegen.format import v2 as fmt2

VECTORS = Path(__file__).resolve().parent.parent / "codec_spec" / "vectors" / "v2"
MANIFEST = json.loads((VECTORS / "MANIFEST.json").read_text())
ENTRIES = {e["name"]: e for e in MANIFEST["vectors"]}
LOSSY = sorted(n for n, e in ENTRIES.items() if e["mode"] == "lossy")


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _check(decoded, name: str) -> None:
    e = ENTRIES[name]
    with np.load(VECTORS / e["expected"]) as exp:
        assert set(exp.files) == {f"layer{i}.{kv}" for i in range(len(decoded)) for kv in ("key", "value")}
        for i, pair in enumerate(decoded):
            for kv, t in zip(("key", "value"), pair):
                got, want = _as_numpy(t), exp[f"layer{i}.{kv}"]
                assert got.dtype == want.dtype and got.shape == want.shape, (name, i, kv)
                assert got.tobytes() == want.tobytes(), f"{name} layer{i}.{kv}: decoded bits differ"


def test_manifest_complete():
    assert MANIFEST["format_version"] == 2
    assert len(ENTRIES) >= 12
    listed = {e["file"] for e in ENTRIES.values()} | {e["expected"] for e in ENTRIES.values()}
    on_disk = {p.name for p in VECTORS.iterdir() if p.suffix in (".cgk", ".npz")}
    assert on_disk == listed


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_sha256_version_and_inspect(name):
    e = ENTRIES[name]
    data = (VECTORS / e["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == e["sha256"], f"{name}.cgk changed (golden vectors are frozen)"
    assert data[:4] == b"CGKV" and data[4] == 2
    info = cachegen.inspect(data, verify=not e["decode"]["partial"])
    assert info["format_version"] == 2 and info["mode"] == e["mode"]
    assert len(info["chunks"]) == e["chunks_present"]


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_decode_bit_exact(name):
    e = ENTRIES[name]
    data = (VECTORS / e["file"]).read_bytes()
    _check(cachegen.decode(data, partial=e["decode"]["partial"]), name)


def test_extensions_vector_lists_records_and_skips_unknown():
    data = (VECTORS / ENTRIES["extensions"]["file"]).read_bytes()
    info = cachegen.inspect(data)
    kinds = [x["kind"] for x in info["extensions"]]
    assert kinds == [0x0001, 0x0002, 0x0123]
    assert info["extensions"][0]["value"]["kl_mean"] == 0.0012
    assert not any(x["critical"] for x in info["extensions"])


def _set_ext_kind(data: bytes, index: int, kind: int) -> bytes:
    """Rewrite the kind of extension record `index` and fix the header CRC."""
    c = fmt2.parse_container(data)
    h = c.header
    pre, fixed = 16, 64
    n_layers, n_chunks = len(h.layers), c.n_chunks
    model_comp = struct.unpack_from("<I", data, pre + 28)[0]
    pos = pre + fixed + 16 * n_layers + fmt2.CHUNK_DT.itemsize * n_chunks + ((model_comp + 3) & ~3)
    for _ in range(index):
        n = struct.unpack_from("<I", data, pos + 4)[0]
        pos += 8 + ((n + 3) & ~3)
    b = bytearray(data)
    struct.pack_into("<H", b, pos, kind)
    hs = struct.unpack_from("<I", b, 8)[0]
    struct.pack_into("<I", b, 12, zlib.crc32(bytes(b[16:16 + hs])) & 0xFFFFFFFF)
    return bytes(b)


def test_unknown_critical_extension_is_refused():
    data = (VECTORS / ENTRIES["extensions"]["file"]).read_bytes()
    bad = _set_ext_kind(data, 2, 0x8123)
    with pytest.raises(cachegen.UnsupportedVersionError, match="extension"):
        cachegen.decode(bad)
    ok = _set_ext_kind(data, 2, 0x0456)          # still unknown, but ignorable: decodes
    _check(cachegen.decode(ok), "extensions")


def test_prefix_vector_needs_partial():
    data = (VECTORS / ENTRIES["prefix_partial"]["file"]).read_bytes()
    with pytest.raises(cachegen.FormatError):
        cachegen.decode(data)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", LOSSY)
def test_gpu_decode_bit_exact(name):
    e = ENTRIES[name]
    data = (VECTORS / e["file"]).read_bytes()   # anchor-delta vectors take dispatch's CPU fallback
    _check(cachegen.decode(data, device="cuda", partial=e["decode"]["partial"]), name)


def test_packed_params_vector_carries_its_critical_record():
    data = (VECTORS / ENTRIES["packed_params"]["file"]).read_bytes()
    info = cachegen.inspect(data)
    assert [(x["kind"], x["critical"]) for x in info["extensions"]] == [(0x8002, True)]
    assert info["breakdown"]["param_streams"] > 0 and info["breakdown"]["token_scales"] == 0
    c = fmt2.parse_container(data)
    assert c.header.packed.frac_bits == 3 and c.n_chunks == 3


def test_compact_dir_vector_carries_its_records():
    data = (VECTORS / ENTRIES["compact_dir"]["file"]).read_bytes()
    info = cachegen.inspect(data)
    assert [(x["kind"], x["critical"]) for x in info["extensions"]] == [(0x8002, True), (0x8003, True)]
    c = fmt2.parse_container(data)
    lay = c.header.layout(0)
    # segments of 3 over 6 streams a block plus a parameter stream per block: joins mid-block
    assert c.header.dir_group == 3 and lay.n_dir % 3 == 1 and lay.n_seg == -(-lay.n_dir // 3)
