"""Host side of the GPU decoder: per-stream and per-tile metadata, built once per container.

Everything here comes from chunks parsed and validated by ``cachegen.format.container``
(``parse_lossy_chunk``: CRC, parameter sanity, stream directory adding up to the chunk size),
so every offset handed to the kernels lies inside the container bytes uploaded to the GPU.
Per chunk the work is vectorized numpy over that chunk's blocks; the parts that depend only on
the chunk's layout (which layers have how many tokens) are built once per layout and reused.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..errors import StreamError
from ..format.container import Container, parse_lossy_chunk
from ..codec.layout import segment_counts
from ..format.tables import PRECISION_BITS, TOTAL

# Block metadata columns (int64 [n_blocks, BLK_COLS]).
B_LK, B_N, B_TOK0, B_FS, B_NA, B_ND, B_LEVELS, B_POFF, B_EOFF, B_NCH = range(10)
BLK_COLS = 10


@dataclass
class Plan:
    n_streams: int
    wbyte: np.ndarray      # int64 [S] byte offset of the stream's first word in the container
    wcnt: np.ndarray       # int32 [S] words
    nsym: np.ndarray       # int32 [S] symbols
    per: np.ndarray        # int32 [S] symbols per channel (batch * (na + nd))
    n_anchor: np.ndarray   # int32 [S] anchor/plain symbols per channel (batch * na)
    tbase: np.ndarray      # int32 [S] index of the stream's first table id in ids
    ids: np.ndarray        # int32 table id per (layer, kv, channel, role), flattened
    blocks: np.ndarray     # int64 [NB, BLK_COLS]
    tiles: np.ndarray      # int32 [NT, 4]: block, batch item, t0, c0
    lo: np.ndarray         # float32, per (block, channel)
    step: np.ndarray       # float32
    exps: np.ndarray       # uint8, per (block, batch, token) (empty without token scaling)
    max_steps: int         # max symbols of a stream (rows of the symbol buffer)
    max_symbol: int        # largest alphabet - 1 over all tables


def _layout(container: Container, blocks: list, cps: int, ids_off: dict, bt: int, bc: int):
    """Static per-layout arrays (independent of stream lengths and parameters)."""
    h = container.header
    R = h.roles
    nb = len(blocks)
    lk = np.array([2 * i + kv for i, kv, _ in blocks], dtype=np.int64)
    n = np.array([t for _, _, t in blocks], dtype=np.int64)
    nch = np.array([h.layers[i].channels(kv) for i, kv, _ in blocks], dtype=np.int64)
    na = np.empty(nb, dtype=np.int64)
    nd = np.empty(nb, dtype=np.int64)
    for j, (_, _, t) in enumerate(blocks):
        a, d = segment_counts(h, t)
        na[j], nd[j] = a // h.batch, d // h.batch
    levels = np.array([1 << h.layers[i].bits(kv) for i, kv, _ in blocks], dtype=np.int64)
    ns = -(-nch // cps)
    fs = np.concatenate([[0], np.cumsum(ns)[:-1]]).astype(np.int64)
    S = int(ns.sum())
    sblk = np.repeat(np.arange(nb), ns)                 # block of each stream
    sidx = np.arange(S) - fs[sblk]                      # stream index inside its block
    chans = np.minimum(cps, nch[sblk] - sidx * cps)
    per = h.batch * (na + nd)
    nsym = chans * per[sblk]
    tbase = np.array([ids_off[(i, kv)] for i, kv, _ in blocks], dtype=np.int64)[sblk] + sidx * cps * R
    poff = np.concatenate([[0], np.cumsum(nch)[:-1]]).astype(np.int64)
    ntok = h.batch * n if h.token_scaling else np.zeros(nb, dtype=np.int64)
    eoff = np.concatenate([[0], np.cumsum(ntok)[:-1]]).astype(np.int64)
    blk = np.zeros((nb, BLK_COLS), dtype=np.int64)
    blk[:, B_LK], blk[:, B_N], blk[:, B_FS] = lk, n, fs
    blk[:, B_NA], blk[:, B_ND], blk[:, B_LEVELS] = na, nd, levels
    blk[:, B_POFF], blk[:, B_EOFF], blk[:, B_NCH] = poff, eoff, nch
    # Tiles: per block, batch item, token tile, channel tile.
    nt_t = -(-n // bt)
    nt_c = -(-nch // bc)
    per_blk = h.batch * nt_t * nt_c
    tb = np.repeat(np.arange(nb), per_blk)
    r = np.arange(int(per_blk.sum())) - np.repeat(np.concatenate([[0], np.cumsum(per_blk)[:-1]]), per_blk)
    cc = r % nt_c[tb]
    r //= nt_c[tb]
    tt = r % nt_t[tb]
    bb = r // nt_t[tb]
    tiles = np.stack([tb, bb, tt * bt, cc * bc], axis=1).astype(np.int64)
    return dict(S=S, nsym=nsym, per=per[sblk], na=(h.batch * na)[sblk], tbase=tbase, blk=blk,
                tiles=tiles, nch_total=int(nch.sum()), ntok_total=int(ntok.sum()))


def build_plan(container: Container, verify: bool = True, bt: int = 32, bc: int = 256) -> Plan:
    h = container.header
    cps = h.channels_per_stream
    R = h.roles
    ids_list, ids_off, off = [], {}, 0
    for i in range(len(h.layers)):
        for kv in (0, 1):
            a = np.asarray(h.table_ids[i][kv], dtype=np.int32).reshape(-1)
            ids_off[(i, kv)] = off
            ids_list.append(a)
            off += a.size
    ids_list.append(np.zeros(cps * R, dtype=np.int32))  # padding read by short last streams
    ids = np.concatenate(ids_list)
    layouts: dict = {}
    parts = {k: [] for k in ("wbyte", "wcnt", "nsym", "per", "na", "tbase", "blk", "tiles", "lo", "step", "exps")}
    s_base = p_base = e_base = b_base = 0
    C = h.chunk_tokens
    # Chunks are validated by the container parser (checksums first, in parallel), then the plan
    # is assembled in chunk order.
    n = container.n_chunks
    if verify:   # checksums on threads (zlib releases the GIL), then parse without re-checking
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
            list(ex.map(lambda k: container.chunk_bytes(k, verify=True), range(n)))
    parsed = [parse_lossy_chunk(container, k, verify=False) for k in range(n)]
    for k in range(n):
        ch = parsed[k]
        key = tuple(ch.blocks)
        lay = layouts.get(key)
        if lay is None:
            lay = layouts[key] = _layout(container, ch.blocks, cps, ids_off, bt, bc)
        if ch.stream_lengths.size != lay["S"]:
            raise StreamError(f"chunk {k}: stream count mismatch")
        e = container.chunks[k]
        word0 = container.payload_start + e.offset + e.size - 4 * ch.words.size
        starts = ch.stream_ends - ch.stream_lengths.astype(np.int64)
        parts["wbyte"].append(word0 + 4 * starts)
        parts["wcnt"].append(ch.stream_lengths.astype(np.int64))
        parts["nsym"].append(lay["nsym"])
        parts["per"].append(lay["per"])
        parts["na"].append(lay["na"])
        parts["tbase"].append(lay["tbase"])
        blk = lay["blk"].copy()
        blk[:, B_TOK0] = k * C
        blk[:, B_FS] += s_base
        blk[:, B_POFF] += p_base
        blk[:, B_EOFF] += e_base
        parts["blk"].append(blk)
        tiles = lay["tiles"].copy()
        tiles[:, 0] += b_base
        parts["tiles"].append(tiles)
        parts["lo"].append(ch.lo_flat)
        parts["step"].append(ch.step_flat)
        if h.token_scaling:
            parts["exps"].append(ch.exp_flat)
        s_base += lay["S"]
        p_base += lay["nch_total"]
        e_base += lay["ntok_total"]
        b_base += blk.shape[0]
    cat = lambda name, dt: (np.concatenate(parts[name]).astype(dt, copy=False) if parts[name]
                            else np.zeros(0, dtype=dt))
    nsym = cat("nsym", np.int32)
    return Plan(
        n_streams=s_base, wbyte=cat("wbyte", np.int64), wcnt=cat("wcnt", np.int32), nsym=nsym,
        per=cat("per", np.int32), n_anchor=cat("na", np.int32), tbase=cat("tbase", np.int32), ids=ids,
        blocks=np.concatenate(parts["blk"]) if parts["blk"] else np.zeros((0, BLK_COLS), np.int64),
        tiles=(np.concatenate(parts["tiles"]) if parts["tiles"] else np.zeros((0, 4), np.int64)).astype(np.int32),
        lo=cat("lo", np.float32), step=cat("step", np.float32), exps=cat("exps", np.uint8),
        max_steps=int(nsym.max()) if nsym.size else 0,
        max_symbol=max(int(f.size) for f in h.freqs) - 1,
    )


MAX_LUT_ENTRIES = 1 << 20    # all tables' slots together (8 MiB as int64): lut_bits shrinks to fit


def symbol_luts(freqs: list, cdfs: list, lut_bits: int, packed: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """Per table: cdf padded to a common stride (int32 [T, stride]) and a slot LUT int32
    [T, 2**lut_bits], slot j -> (first symbol s with cdf[s] <= j*W < cdf[s+1])
    | (symbol holding the slot's last value) << 16; W = 2**(24 - lut_bits).
    packed: int64 entries, symbol | cdf << 11 | freq << 35 for a slot inside one symbol,
    first | last << 11 | 1 << 60 for a slot over several.
    Also returns the widest slot span (symbols a search may have to look through).

    Vectorized over tables (one searchsorted over all cdfs, each offset by t * 2**25), and
    bounded: with many tables lut_bits is lowered so T * 2**lut_bits <= MAX_LUT_ENTRIES (any
    lut_bits decodes the same symbols; the search covers what the LUT does not)."""
    T = len(freqs)
    while lut_bits > 1 and (T << lut_bits) > MAX_LUT_ENTRIES:
        lut_bits -= 1
    sizes = np.array([f.size for f in freqs], dtype=np.int64)
    amax = int(sizes.max())
    stride = amax + 1
    n_slots = 1 << lut_bits
    w = 1 << (PRECISION_BITS - lut_bits)
    base = np.arange(T, dtype=np.int64) << 25                       # keeps the concatenation sorted
    flat_c = np.concatenate([np.asarray(c, dtype=np.int64) for c in cdfs])   # each: A_t + 1 entries
    starts = np.concatenate([[0], np.cumsum(sizes + 1)[:-1]])
    flat_key = flat_c + np.repeat(base, sizes + 1)
    slots = (np.arange(n_slots, dtype=np.int64) * w)[None, :] + base[:, None]      # [T, n_slots]
    lo = np.searchsorted(flat_key, slots, side="right") - 1 - starts[:, None]
    hi = np.searchsorted(flat_key, slots + (w - 1), side="right") - 1 - starts[:, None]
    cdf = np.full((T, stride), TOTAL, dtype=np.int64)
    col = np.arange(stride)[None, :]
    valid = col <= sizes[:, None]
    cdf[valid] = flat_c
    span = int((hi - lo).max()) if T else 0
    if packed:
        flat_f = np.concatenate([np.asarray(f, dtype=np.int64) for f in freqs])
        fstarts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        c_lo = np.take_along_axis(cdf, lo, axis=1)
        f_lo = flat_f[np.minimum(lo + fstarts[:, None], flat_f.size - 1)]
        lut = np.where(hi > lo, lo | (hi << 11) | (1 << 60), lo | (c_lo << 11) | (f_lo << 35))
    else:
        lut = (lo | (hi << 16)).astype(np.int32)
    return cdf.astype(np.int32), lut, span
