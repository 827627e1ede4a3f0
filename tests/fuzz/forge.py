"""Hand-made format v1 containers (checksums recomputed), independent of cachegen's writer:
the hostile inputs of issue 9 (resource exhaustion with valid structure) are built from these."""
from __future__ import annotations

import struct
import zlib
from typing import Sequence

import numpy as np
import zstandard

PRE = struct.Struct("<4sBBHII")
FIX = struct.Struct("<BBBBIIIIIIBBH")
LAY = struct.Struct("<IHHHHBBH")
CHK = struct.Struct("<QII")
EMPTY_BLOCK = b"\x01\x00\x00\x00\x00"   # step mode 1 (shared), lo = 0, step = 0 (fp16)


def crc(b) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def zcomp(raw: bytes, level: int = 19) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)


def model_section(tables: Sequence[np.ndarray], ids: Sequence[np.ndarray]) -> bytes:
    """tables: count arrays; ids: one u16 array per (layer, kv), layer-major, K then V."""
    parts = [struct.pack("<I", len(tables))]
    for c in tables:
        c = np.asarray(c, dtype="<u2")
        parts.append(struct.pack("<H", c.size) + c.tobytes())
    parts.extend(np.asarray(i, dtype="<u2").tobytes() for i in ids)
    return b"".join(parts)


def container(*, mode: int = 0, dtype: int = 1, param_dtype: int = 1, group: int = 1, cps: int = 1,
              batch: int = 1, chunk_tokens: int = 256, layers=((1, 1, 1, 1, 1, 1, 1),),
              model_raw: bytes = b"", chunks: Sequence[bytes] = (), token_scaling: int = 0) -> bytes:
    """layers: (tokens, k_heads, k_dim, v_heads, v_dim, k_bits, v_bits). model_raw: the
    uncompressed model section (lossy)."""
    n_chunks = -(-max(l[0] for l in layers) // chunk_tokens)
    comp = zcomp(model_raw) if mode == 0 else b""
    fixed = FIX.pack(dtype, param_dtype if mode == 0 else 0, group, cps if mode == 0 else 0, batch,
                     chunk_tokens, len(layers), n_chunks, len(model_raw) if mode == 0 else 0, len(comp),
                     token_scaling, 0, 0)
    lay = b"".join(LAY.pack(*l, 0) for l in layers)
    idx, off = [], 0
    for k in range(n_chunks):
        cb = chunks[k] if k < len(chunks) else b""
        idx.append(CHK.pack(off, len(cb), crc(cb)))
        off += len(cb)
    body = fixed + lay + b"".join(idx) + comp
    return PRE.pack(b"CGKV", 1, mode, 0, len(body), crc(body)) + body + b"".join(chunks)


def rle_zstd_frame(n: int) -> bytes:
    """A valid zstd frame of n zero bytes made of RLE blocks (4 bytes per 128 KiB)."""
    blocks, left = [], n
    while left:
        s = min(left, 1 << 17)
        left -= s
        blocks.append(struct.pack("<I", (s << 3) | 2 | (left == 0))[:3] + b"\0")
    return b"\x28\xb5\x2f\xfd\xe0" + struct.pack("<Q", n) + b"".join(blocks)


def empty_stream_chunk(blocks: int) -> bytes:
    """A lossy chunk of `blocks` one-channel blocks (cps 1) whose streams are all empty."""
    return EMPTY_BLOCK * blocks + b"\0" * (4 * blocks)


# ------------------------------------------------------------------ the forged set (issue 9)

def tables_x_layers(L: int = 4096, NT: int = 65535) -> bytes:
    """D1: many layers x many unreferenced tables (139 KB)."""
    raw = model_section([np.ones(2, np.uint16)] * NT, [np.zeros(1, np.uint16)] * (2 * L))
    return container(layers=[(1, 1, 1, 1, 1, 1, 1)] * L, model_raw=raw, chunks=[empty_stream_chunk(2 * L)])


def models_per_chunk(n: int = 100) -> bytes:
    """D2: 65535 tables, n one-token chunks (3.5 KB)."""
    raw = model_section([np.ones(2, np.uint16)] * 65535, [np.zeros(1, np.uint16)] * 2)
    return container(layers=[(n, 1, 1, 1, 1, 1, 1)], chunk_tokens=1, model_raw=raw,
                     chunks=[empty_stream_chunk(2)] * n)


def model_section_bomb() -> bytes:
    """D3: a legal 62.5 MiB model section of unreferenced 2047-symbol tables (5.6 KB)."""
    tables = [np.ones(2047, np.uint16)] * 15999 + [np.ones(2, np.uint16)]
    raw = model_section(tables, [np.full(1, 15999, np.uint16)] * 2)
    return container(layers=[(1, 1, 1, 1, 1, 1, 1)], chunk_tokens=1, model_raw=raw, chunks=[empty_stream_chunk(2)])


def padded_tables() -> bytes:
    """D4: 65534 two-symbol tables + one 2047-symbol table (171 B)."""
    raw = model_section([np.ones(2, np.uint16)] * 65534 + [np.ones(2047, np.uint16)], [np.zeros(1, np.uint16)] * 2)
    return container(layers=[(1, 1, 1, 1, 1, 1, 1)], chunk_tokens=1, model_raw=raw, chunks=[empty_stream_chunk(2)])


def lockstep_steps(tokens: int = 1 << 24, chunk_tokens: int = 65536) -> bytes:
    """D4: one channel, long chunks, empty streams: few streams, many symbols each (8.8 KB)."""
    raw = model_section([np.ones(2, np.uint16)], [np.zeros(1, np.uint16)] * 2)
    n = -(-tokens // chunk_tokens)
    return container(layers=[(tokens, 1, 1, 1, 1, 1, 1)], chunk_tokens=chunk_tokens, model_raw=raw,
                     chunks=[empty_stream_chunk(2)] * n)


def many_referenced_tables(n_tables: int = 2100, alphabet: int = 2047) -> bytes:
    """Referenced tables holding more than max_table_symbols (2100 x 2047 > 2^22)."""
    bits = 10 if alphabet == 1024 else None
    ch = n_tables
    ids = np.arange(n_tables, dtype=np.uint16)
    # role 1 (deltas of 10-bit symbols) has alphabet 2047: group_size 2, so roles = 2
    tables = [np.ones(1024, np.uint16)] + [np.ones(alphabet, np.uint16)] * n_tables
    per = np.stack([np.zeros(ch, np.uint16), ids + 1], axis=1).reshape(-1)
    raw = model_section(tables, [per, per])
    del bits
    return container(layers=[(2, 1, ch, 1, ch, 10, 10)], group=2, chunk_tokens=2, model_raw=raw, chunks=[b""])


def lossless_rle(batch: int = 8, tokens: int = 1 << 24, dim: int = 64, chunk_tokens: int = 65536) -> bytes:
    """D5: a 1 MB lossless container of RLE frames that declares 32 GiB."""
    per_chunk = batch * chunk_tokens * 2 * dim * 2
    n = -(-tokens // chunk_tokens)
    return container(mode=1, batch=batch, chunk_tokens=chunk_tokens, layers=[(tokens, 1, dim, 1, dim, 0, 0)],
                     chunks=[rle_zstd_frame(per_chunk)] * n)


FORGED = {"tables_x_layers": tables_x_layers, "models_per_chunk": models_per_chunk,
          "model_section_bomb": model_section_bomb, "padded_tables": padded_tables,
          "lockstep_steps": lockstep_steps, "many_referenced_tables": many_referenced_tables,
          "lossless_rle": lossless_rle}


def referenced_tables(T: int = 65535) -> bytes:
    """T distinct referenced two-symbol tables (one per channel, K and V share them): ~0.9 MB for
    T = 65535, 256 KB of output. Cheap for the CPU decoders; a per-table GPU lookup table of
    2^12 int64 slots would take T x 32 KiB."""
    ids = np.arange(T, dtype=np.uint16)
    raw = model_section([np.ones(2, np.uint16)] * T, [ids, ids])
    blk = b"\x01" + b"\0\0" * T + b"\0\0"          # shared step, lo = 0 per channel, step 0
    return container(layers=[(1, 1, T, 1, T, 1, 1)], model_raw=raw, chunks=[blk * 2 + b"\0\0\0\0" * (2 * T)])


FORGED["referenced_tables"] = referenced_tables


# ------------------------------------------------------------------------ format v2 variants

def v2_container(layers, n_tables: int, table_ids, chunk_tokens: int = 256, alphabet: int = 2,
                 table_bits: int = 12, big_last: int = 0) -> bytes:
    """A v2 container of empty streams (lo = step = 0) with n_tables tables, written with the
    v2 module's own packers (the hostile part is in the counts, not the bytes)."""
    from cachegen.format import v2 as fmt2
    from cachegen.format.container import LayerInfo
    alph = np.full(n_tables, alphabet, dtype=np.int64)
    if big_last:
        alph[-1] = big_last
    units = np.concatenate([np.full(a, (1 << table_bits) // a, np.uint16) + np.eye(1, a, 0, dtype=np.uint16)[0]
                            * ((1 << table_bits) - a * ((1 << table_bits) // a)) for a in alph])
    h = fmt2.HeaderV2(mode=0, dtype=1, batch=1, chunk_tokens=chunk_tokens,
                      layers=[LayerInfo(*l) for l in layers], param_dtype=1, group_size=1,
                      channels_per_stream=1, token_scaling=0, table_bits=table_bits,
                      alphabets=alph, units=units.astype(np.uint16), table_ids=table_ids)
    chunks = []
    for k in range(h.n_chunks):
        lay = h.layout(k)
        chunks.append(fmt2.pack_lossy_chunk(lay, 1, np.zeros(lay.total_channels), np.zeros(lay.total_steps), None,
                                            [np.zeros(0, np.uint32)] * lay.n_streams))
    return fmt2.build_container(h, chunks)


def v2_tables_x_layers(L: int = 4096, NT: int = 65535) -> bytes:
    z = np.zeros((1, 1), np.uint16)
    return v2_container([(1, 1, 1, 1, 1, 1, 1)] * L, NT, [[z, z] for _ in range(L)])


def v2_models_per_chunk(n: int = 100) -> bytes:
    z = np.zeros((1, 1), np.uint16)
    return v2_container([(n, 1, 1, 1, 1, 1, 1)], 65535, [[z, z]], chunk_tokens=1)


def v2_padded_tables() -> bytes:
    z = np.zeros((1, 1), np.uint16)
    return v2_container([(1, 1, 1, 1, 1, 1, 1)], 65535, [[z, z]], chunk_tokens=1, big_last=2047)


def v2_lockstep_steps(tokens: int = 1 << 24, chunk_tokens: int = 65536) -> bytes:
    z = np.zeros((1, 1), np.uint16)
    return v2_container([(tokens, 1, 1, 1, 1, 1, 1)], 1, [[z, z]], chunk_tokens=chunk_tokens)


def v2_referenced_tables(T: int = 65535) -> bytes:
    ids = np.arange(T, dtype=np.uint16)[:, None]
    return v2_container([(1, 1, T, 1, T, 1, 1)], T, [[ids, ids]])


FORGED_V2 = {"v2_tables_x_layers": v2_tables_x_layers, "v2_models_per_chunk": v2_models_per_chunk,
             "v2_padded_tables": v2_padded_tables, "v2_lockstep_steps": v2_lockstep_steps,
             "v2_referenced_tables": v2_referenced_tables}
