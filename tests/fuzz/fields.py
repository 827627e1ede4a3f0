"""Field-targeted mutation of cachegen containers (format v1 and v2).

A container is split into its parts (preamble, fixed header, layer records, chunk index, model
section, the rest of the header, chunk payloads); mutators edit one part in a structurally
consistent way (sizes and offsets follow, the model section is re-compressed) and then either
recompute every checksum (so the edit reaches the deep checks) or leave them stale (so it must
be caught by them). Offsets come from the format modules' own struct/dtype definitions, so the
mutators follow the layout when it changes.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import zstandard

from cachegen.format import container as fmt1
try:
    from cachegen.format import v2 as fmt2
except ImportError:  # pragma: no cover - before format v2
    fmt2 = None

PRE = struct.Struct("<4sBBHII")
_ZC = zstandard.ZstdCompressor(level=3, write_content_size=True)


def crc(b) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def struct_fields(s: struct.Struct) -> list[tuple[int, str]]:
    """(offset, format char) of each field of a little-endian struct."""
    out, off = [], 0
    for ch in s.format.lstrip("<>=!@"):
        if ch.isdigit():
            raise ValueError("counted fields are not supported")
        size = struct.calcsize("<" + ch)
        out.append((off, ch))
        off += size
    return out


def align4(n: int) -> int:
    return (n + 3) & ~3


@dataclass
class Parts:
    """A container cut into its parts (bytes), enough to reassemble it with new sizes."""
    version: int
    mode: int
    fixed: bytearray
    layers: bytearray
    index: bytearray
    model: bytes               # the zstd frame (without padding)
    rest: bytes                # header bytes after the model section (v2: extension records)
    chunks: list[bytearray]    # payloads (without v2 padding)
    meta_sizes: list[int] = field(default_factory=list)   # v2: metadata bytes of each chunk

    @property
    def fixed_struct(self) -> struct.Struct:
        return fmt1._FIXED if self.version == 1 else fmt2._FIXED

    @property
    def layer_size(self) -> int:
        return fmt1.LAYER_SIZE if self.version == 1 else fmt2.LAYER_DT.itemsize

    @property
    def entry_size(self) -> int:
        return fmt1.CHUNK_ENTRY_SIZE if self.version == 1 else fmt2.CHUNK_DT.itemsize


def _model_field_indices(version: int) -> tuple[int, int]:
    """Positions of (model_raw, model_comp) in the fixed header tuple."""
    return (8, 9) if version == 1 else (13, 12)


def split(data: bytes) -> Optional[Parts]:
    """Cut a well-formed container into parts; None when it is not one (or the format is unknown)."""
    try:
        magic, version, mode, _flags, hsize, _hcrc = PRE.unpack_from(data, 0)
        if magic != b"CGKV" or version not in (1, 2) or (version == 2 and fmt2 is None):
            return None
        fs = fmt1._FIXED if version == 1 else fmt2._FIXED
        body = data[16:16 + hsize]
        f = fs.unpack_from(body, 0)
        nl, nc = (f[6], f[7]) if version == 1 else (f[9], f[10])
        ls = fmt1.LAYER_SIZE if version == 1 else fmt2.LAYER_DT.itemsize
        es = fmt1.CHUNK_ENTRY_SIZE if version == 1 else fmt2.CHUNK_DT.itemsize
        p = fs.size
        layers = bytearray(body[p:p + ls * nl])
        p += ls * nl
        index = bytearray(body[p:p + es * nc])
        p += es * nc
        ri, ci = _model_field_indices(version)
        mcomp = f[ci]
        model = bytes(body[p:p + mcomp])
        p += mcomp if version == 1 else align4(mcomp)
        rest = bytes(body[p:])
        payload = data[16 + hsize:]
        chunks, metas = [], []
        for k in range(nc):
            if version == 1:
                o, s, _ = fmt1._CHUNK.unpack_from(index, es * k)
                metas.append(0)
            else:
                e = np.frombuffer(bytes(index[es * k:es * (k + 1)]), dtype=fmt2.CHUNK_DT)[0]
                o, s = int(e["offset"]), int(e["size"])
                metas.append(int(e["meta_size"]))
            chunks.append(bytearray(payload[o:o + s]))
        return Parts(version, mode, bytearray(body[:fs.size]), layers, index, model, rest, chunks, metas)
    except (struct.error, ValueError, IndexError):
        return None


def join(p: Parts, fix: bool = True) -> bytes:
    """Reassemble: chunk offsets/sizes and header sizes follow the parts; with fix=True every
    checksum is recomputed, otherwise the old ones stay (stale where parts changed)."""
    es = p.entry_size
    fs = p.fixed_struct
    ri, ci = _model_field_indices(p.version)
    f = list(fs.unpack_from(p.fixed, 0))
    index = bytearray(p.index)
    off = 0
    for k, c in enumerate(p.chunks):
        if p.version == 1:
            _, _, old_crc = fmt1._CHUNK.unpack_from(index, es * k)
            fmt1._CHUNK.pack_into(index, es * k, off, len(c), crc(c) if fix else old_crc)
            off += len(c)
        else:
            e = np.frombuffer(bytes(index[es * k:es * (k + 1)]), dtype=fmt2.CHUNK_DT).copy()
            e["offset"], e["size"] = off, len(c)
            if fix:
                m = min(int(e["meta_size"][0]), len(c))
                if "meta_crc" in e.dtype.names:
                    e["meta_crc"] = crc(bytes(c[:m]))
                if "words_crc" in e.dtype.names:
                    e["words_crc"] = crc(bytes(c[m:]))
                if "words_sum" in e.dtype.names:
                    if p.mode == fmt1.MODE_LOSSY and (len(c) - m) % 4 == 0:
                        e["words_sum"] = fmt2.words_checksum(np.frombuffer(bytes(c[m:]), dtype="<u4"))
                    elif p.mode != fmt1.MODE_LOSSY and hasattr(fmt2, "payload_checksum"):
                        e["words_sum"] = fmt2.payload_checksum(bytes(c))
            index[es * k:es * (k + 1)] = e.tobytes()
            off += align4(len(c))
    if ci < len(f) and p.model is not None:
        f[ci] = len(p.model)
        if p.model:
            try:
                f[ri] = zstandard.get_frame_parameters(p.model[:18]).content_size
            except zstandard.ZstdError:
                pass
    if p.version == 2:
        f[-2] = off     # payload_size
    fixed = bytearray(fs.pack(*f))
    if len(p.fixed) > fs.size:
        fixed += p.fixed[fs.size:]
    model = p.model + (b"" if p.version == 1 else b"\0" * (align4(len(p.model)) - len(p.model)))
    body = bytes(fixed) + bytes(p.layers) + bytes(index) + model + p.rest
    pad = (lambda c: b"") if p.version == 1 else (lambda c: b"\0" * (align4(len(c)) - len(c)))
    payload = b"".join(bytes(c) + pad(c) for c in p.chunks)
    return PRE.pack(b"CGKV", p.version, p.mode, 0, len(body), crc(body)) + body + payload


def fix_header_crc(b: bytearray) -> None:
    size = struct.unpack_from("<I", b, 8)[0]
    if 16 + size <= len(b):
        struct.pack_into("<I", b, 12, crc(bytes(b[16:16 + size])))


# --------------------------------------------------------------------------- mutators

INTERESTING = (0, 1, 2, 3, 4, 7, 8, 15, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 1024, 2047, 2048,
               4095, 4096, 65535, 65536, (1 << 20), (1 << 24), (1 << 31) - 1, 1 << 31, (1 << 32) - 1)
_MAX = {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFFFFFF, "Q": (1 << 64) - 1}


def _value(rng, ch: str, old: int) -> int:
    r = rng.random()
    if r < 0.4:
        v = int(rng.choice(INTERESTING))
    elif r < 0.7:
        v = old + int(rng.choice([-2, -1, 1, 2]))
    elif r < 0.85:
        v = int(rng.integers(0, _MAX[ch], endpoint=True, dtype=np.uint64))
    else:
        v = old ^ (1 << int(rng.integers(0, 8 * struct.calcsize(ch))))
    return v & _MAX[ch]


def _edit_struct(rng, buf: bytearray, fields: list[tuple[int, str]], base: int = 0) -> str:
    off, ch = fields[int(rng.integers(0, len(fields)))]
    (old,) = struct.unpack_from("<" + ch, buf, base + off)
    struct.pack_into("<" + ch, buf, base + off, _value(rng, ch, old))
    return f"@{off}"


def m_fixed(rng, p: Parts) -> str:
    return "fixed" + _edit_struct(rng, p.fixed, struct_fields(p.fixed_struct))


def m_layer(rng, p: Parts) -> str:
    n = len(p.layers) // p.layer_size
    if not n:
        return "layer:none"
    i = int(rng.integers(0, n))
    lf = struct_fields(fmt1._LAYER) if p.version == 1 else \
        [(fmt2.LAYER_DT.fields[k][1], fmt2.LAYER_DT.fields[k][0].str[-2:].replace("u1", "B").replace("u2", "H")
          .replace("u4", "I").replace("u8", "Q")) for k in fmt2.LAYER_DT.names]
    return "layer" + _edit_struct(rng, p.layers, lf, i * p.layer_size)


def m_index(rng, p: Parts) -> str:
    """Edit a chunk index entry directly (offsets, sizes, meta sizes): join keeps it unless it
    recomputes offsets, so this one writes the final bytes itself (see mutate())."""
    n = len(p.index) // p.entry_size
    if not n:
        return "index:none"
    k = int(rng.integers(0, n))
    if p.version == 1:
        return "index" + _edit_struct(rng, p.index, struct_fields(fmt1._CHUNK)[:2], k * p.entry_size)
    dt = fmt2.CHUNK_DT
    flds = [(dt.fields[name][1], {"u4": "I", "u8": "Q", "u2": "H", "u1": "B"}[dt.fields[name][0].str[1:]])
            for name in dt.names if name in ("offset", "size", "meta_size")]
    return "index" + _edit_struct(rng, p.index, flds, k * p.entry_size)


def m_model(rng, p: Parts) -> str:
    """Decompress the model section, edit it (u16 fields: alphabets, counts, ids, the table
    count), re-compress; sizes in the header follow."""
    if not p.model:
        return "model:none"
    try:
        raw = bytearray(zstandard.ZstdDecompressor().decompress(p.model))
    except zstandard.ZstdError:
        return "model:bad"
    kind = rng.random()
    if kind < 0.6 and len(raw) >= 2:
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, len(raw) // 2)) * 2
            (old,) = struct.unpack_from("<H", raw, pos)
            struct.pack_into("<H", raw, pos, _value(rng, "H", old))
        what = "u16"
    elif kind < 0.75 and len(raw) >= 4:
        (old,) = struct.unpack_from("<I", raw, 0)
        struct.pack_into("<I", raw, 0, _value(rng, "I", old))
        what = "count"
    elif kind < 0.9:
        a, b = sorted(int(x) for x in rng.integers(0, len(raw) + 1, 2))
        if rng.random() < 0.5:
            del raw[a:b]
        else:
            raw[a:a] = raw[a:b]
        what = "resize"
    else:
        raw += bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        what = "append"
    p.model = _ZC.compress(bytes(raw)) if raw else b""
    return "model:" + what


def m_chunk_field(rng, p: Parts) -> str:
    """Overwrite a typed value inside a chunk (params: f16/f32 NaN, inf, negative, huge; step
    mode bytes; stream lengths; words)."""
    if not p.chunks:
        return "chunk:none"
    k = int(rng.integers(0, len(p.chunks)))
    c = p.chunks[k]
    if not c:
        return "chunk:empty"
    r = rng.random()
    meta = p.meta_sizes[k] if p.version == 2 and p.meta_sizes[k] else len(c)
    if r < 0.3:
        pos = int(rng.integers(0, max(1, min(len(c), meta) - 1)))
        v = rng.choice([np.float16(np.nan), np.float16(np.inf), np.float16(-1), np.float16(65504), np.float16(0)])
        c[pos:pos + 2] = np.array([v], np.float16).tobytes()[:len(c) - pos]
        what = "f16"
    elif r < 0.45:
        pos = int(rng.integers(0, len(c)))
        c[pos] = int(rng.choice([0, 1, 2, 255]))
        what = "byte"
    elif r < 0.8 and len(c) >= 4:
        pos = int(rng.integers(0, len(c) // 4)) * 4
        (old,) = struct.unpack_from("<I", c, pos)
        struct.pack_into("<I", c, pos, _value(rng, "I", old))
        what = "u32"
    else:
        for _ in range(int(rng.integers(1, 5))):
            pos = int(rng.integers(0, len(c)))
            c[pos] ^= 1 << int(rng.integers(0, 8))
        what = "flip"
    return f"chunk{k}:{what}"


def m_chunk_resize(rng, p: Parts) -> str:
    if not p.chunks:
        return "resize:none"
    k = int(rng.integers(0, len(p.chunks)))
    c = p.chunks[k]
    n = int(rng.choice([1, 2, 4, 8, 16]))
    if rng.random() < 0.5 and len(c) >= n:
        pos = int(rng.integers(0, len(c) - n + 1))
        del c[pos:pos + n]
        return f"resize{k}:-{n}"
    pos = int(rng.integers(0, len(c) + 1))
    c[pos:pos] = bytes(rng.integers(0, 256, n, dtype=np.uint8))
    return f"resize{k}:+{n}"


def m_reorder(rng, p: Parts) -> str:
    if len(p.chunks) < 2:
        return "reorder:none"
    i, j = (int(x) for x in rng.choice(len(p.chunks), 2, replace=False))
    p.chunks[i], p.chunks[j] = p.chunks[j], p.chunks[i]
    if p.version == 2:
        p.meta_sizes[i], p.meta_sizes[j] = p.meta_sizes[j], p.meta_sizes[i]
    return f"reorder{i}<->{j}"


def splice(rng, p: Parts, other: Parts) -> str:
    """Another seed's chunk, model section or layer records in this container."""
    r = rng.random()
    if r < 0.5 and other.chunks and p.chunks:
        k = int(rng.integers(0, len(p.chunks)))
        j = int(rng.integers(0, len(other.chunks)))
        p.chunks[k] = bytearray(other.chunks[j])
        return f"splice:chunk{k}<-{j}"
    if r < 0.75 and other.model:
        p.model = other.model
        return "splice:model"
    if len(other.layers) == len(p.layers) and other.version == p.version:
        p.layers = bytearray(other.layers)
        return "splice:layers"
    return "splice:none"


STRUCTURED: list[tuple[str, Callable]] = [
    ("fixed", m_fixed), ("layer", m_layer), ("index", m_index), ("model", m_model),
    ("chunk_field", m_chunk_field), ("chunk_resize", m_chunk_resize), ("reorder", m_reorder),
]


def raw_mutation(rng, data: bytes) -> tuple[bytes, str]:
    b = bytearray(data)
    r = rng.random()
    if r < 0.35:
        for _ in range(int(rng.integers(1, 9))):
            b[int(rng.integers(0, len(b)))] ^= 1 << int(rng.integers(0, 8))
        return bytes(b), "raw:flip"
    if r < 0.6:
        return bytes(b[:int(rng.integers(0, len(b)))]), "raw:truncate"
    if r < 0.8:
        p = int(rng.integers(0, len(b)))
        if rng.random() < 0.5:
            b[p:p] = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        else:
            del b[p:p + int(rng.integers(1, 9))]
        return bytes(b), "raw:indel"
    # header bytes with only the header checksum recomputed
    hs = struct.unpack_from("<I", b, 8)[0] if len(b) >= 16 else 0
    for _ in range(int(rng.integers(1, 4))):
        p = int(rng.integers(16, max(17, min(len(b), 16 + hs))))
        if p < len(b):
            b[p] = int(rng.integers(0, 256))
    fix_header_crc(b)
    return bytes(b), "raw:header+crc"


@dataclass
class Mutant:
    data: bytes
    name: str          # mutator and detail
    fixed: bool        # checksums recomputed: any decode result is legitimate
    verify: bool = True


def mutate(rng, seed: bytes, parts: Optional[Parts], others: list[Parts]) -> Mutant:
    """One mutant: ~30% raw byte-level, ~70% field-targeted on the parsed parts."""
    if parts is None or rng.random() < 0.3:
        d, name = raw_mutation(rng, seed)
        return Mutant(d, name, fixed=name == "raw:header+crc")
    p = Parts(parts.version, parts.mode, bytearray(parts.fixed), bytearray(parts.layers), bytearray(parts.index),
              parts.model, parts.rest, [bytearray(c) for c in parts.chunks], list(parts.meta_sizes))
    if others and rng.random() < 0.12:
        name = splice(rng, p, others[int(rng.integers(0, len(others)))])
    else:
        mname, fn = STRUCTURED[int(rng.integers(0, len(STRUCTURED)))]
        name = fn(rng, p)
        if rng.random() < 0.25:                          # a second edit somewhere else
            name += "+" + STRUCTURED[int(rng.integers(0, len(STRUCTURED)))][1](rng, p)
    fix = rng.random() < 0.85
    d = join(p, fix)
    if "index" in name:          # join recomputes offsets and sizes: put the edited entries back
        b = bytearray(d)
        at = 16 + p.fixed_struct.size + len(p.layers)
        if at + len(p.index) <= len(b):
            b[at:at + len(p.index)] = p.index
            fix_header_crc(b)
        d = bytes(b)
    if not fix:                  # stale checksums everywhere: the old header CRC too
        d = d[:12] + seed[12:16] + d[16:]
    return Mutant(d, name, fixed=fix)
