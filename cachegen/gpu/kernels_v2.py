"""Triton kernel of the format v2 GPU decoder: rANS decode + dequantize + store, fused.

One lane per stream. A lane reads its own directory entry and quantizer parameters from the
container bytes on the device (no host-built per-stream offsets), decodes its symbols with
constriction's exact arithmetic (64-bit state, 32-bit words, 24-bit precision) through a direct
lookup table of 2**table_bits slots (v2 tables are quantized to table_bits, so a slot never spans
two symbols: no search), dequantizes exactly fl32(fl32(fl32(step * v) + lo) * token_scale) (the
launch turns FMA contraction off) and stores the destination dtype at [b, h, token, d] of the
caller's tensor, whatever its strides. Symbols never touch memory.

Every read is bounded: directory entries are checked against the chunk's word count before use
(a bad one sets the lane's error flag and the lane decodes nothing), words are read only inside
the stream, table ids and alphabets were validated on the host. A lane that does not end in the
initial state (x == 0, all words consumed) or meets non-finite parameters sets its error flag.

Latency, not bandwidth, bounds a lane: its symbols form one dependency chain (state -> LUT
entry -> state). The loop is software-pipelined so that this chain is the only memory latency a
step waits on: the next renormalization word, the token scale and the next LUT entry are loaded
a step before they are used (in-order issue would otherwise stall on each in turn). The words
checksum is a separate, coalesced pass (``v2_words_sum_kernel``): once the directory checks
pass, the lanes' word ranges tile the chunk's word area, so summing the area is the same sum,
and it keeps two 64-bit multiplies per step out of the chain.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .kernels import bf16_bits

# Block table columns (int64 [n_blocks, BCOLS]).
(C_CHUNK, C_LK, C_N, C_TOK0, C_NCH, C_CHOFF, C_STEPOFF, C_TOKOFF, C_SCHUNK, C_STEPAT, C_TOKAT,
 C_DIRAT, C_META, C_IDS, C_RELAT) = range(15)
BCOLS = 15


@triton.jit
def _u16_at(u32_ptr, a, m):
    """The little-endian u16 at (even) byte address a of the u32 word buffer, as int64."""
    w = tl.load(u32_ptr + a // 4, mask=m, other=0).to(tl.uint32)
    return ((w >> ((a % 4) * 8).to(tl.uint32)) & 0xFFFF).to(tl.int64)


@triton.jit
def _dir_bounds(u32_ptr, dbase, rel_b, i, m, DG: tl.constexpr):
    """(begin, end, bad) word bounds of directory entry i. DG = 0: the plain directory of u32
    cumulative ends at word dbase (rel_b unused; bad is all False). DG > 0: a compact one
    (FORMAT_V2.md 6.3): u32 segment bases at word dbase, u16 ends-minus-base at byte rel_b; bad:
    the first base is not 0, or a segment does not start where the entry before it ends."""
    if DG == 0:
        e_end = tl.load(u32_ptr + dbase + i, mask=m, other=0).to(tl.uint32).to(tl.int64)
        e_beg = tl.load(u32_ptr + dbase + i - 1, mask=m & (i > 0), other=0).to(tl.uint32).to(tl.int64)
        bad = i < 0
    else:
        g = i // DG
        first = (i % DG) == 0
        base = tl.load(u32_ptr + dbase + g, mask=m, other=0).to(tl.uint32).to(tl.int64)
        e_end = base + _u16_at(u32_ptr, rel_b + 2 * i, m)
        relp = _u16_at(u32_ptr, rel_b + 2 * i - 2, m & (i > 0))
        basep = tl.load(u32_ptr + dbase + g - 1, mask=m & first & (i > 0), other=0).to(tl.uint32).to(tl.int64)
        e_beg = tl.where(first, base, base + relp)
        bad = (first & (i > 0) & (basep + relp != base)) | ((i == 0) & (base != 0))
    return e_beg, e_end, bad


@triton.jit
def _mix(w, i, k1, k2):
    """cachegen.format.v2.words_checksum's per-word term (uint64 arithmetic wraps)."""
    v = w | (i << 32)
    v = v * k1
    v = v ^ (v >> 29)
    v = v * k2
    return v ^ (v >> 32)


@triton.jit
def _stream_open(u32_ptr, wb, ptr, ok):
    """A lane's rANS state from the end of its stream (words [wb, wb + ptr)): the last word must
    be non-zero (else bad), then one or two words make the state. -> (x, ptr, wp, bad), wp the
    next word a renormalization consumes."""
    wp = u32_ptr + wb + ptr - 1
    last = tl.load(wp, mask=ok & (ptr > 0), other=0).to(tl.uint32).to(tl.uint64)
    bad = (ptr > 0) & (last == 0)
    x = tl.zeros_like(ptr).to(tl.uint64)
    for _k in tl.static_range(2):
        need = ((x >> 32) == 0) & (ptr > 0)
        w = tl.load(wp, mask=need, other=0).to(tl.uint32).to(tl.uint64)
        x = tl.where(need, (x << 32) | w, x)
        ptr = ptr - need.to(tl.int32)
        wp = wp - need.to(tl.int32)
    return x, ptr, wp, bad


@triton.jit
def v2_decode_kernel(u32_ptr, ids_ptr, par_ptr, u8_ptr,
                     sblk_ptr, ssic_ptr, sc0_ptr, snch_ptr, steps_ptr, blk_ptr, cbase_ptr, cwords_ptr,
                     lut_ptr, scale_ptr, out_ptr, obase_ptr, ostride_ptr, hdim_ptr, err_ptr,
                     lane0, lane_end, p0, batch,
                     TB: tl.constexpr, PSZ: tl.constexpr, SHARED: tl.constexpr, HAS_TS: tl.constexpr,
                     OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    # Streams [lane0, lane_end): one launch per chunk group when decoding is pipelined with
    # the copy (program p0 + i covers streams (p0 + i) * BLOCK ...; lanes outside are masked).
    pid = tl.program_id(0) + p0
    lane = pid * BLOCK + tl.arange(0, BLOCK)
    m = (lane >= lane0) & (lane < lane_end)
    blk = tl.load(sblk_ptr + lane, mask=m, other=0).to(tl.int64)
    sic = tl.load(ssic_ptr + lane, mask=m, other=0).to(tl.int64)
    c0 = tl.load(sc0_ptr + lane, mask=m, other=0)
    nchs = tl.load(snch_ptr + lane, mask=m, other=0)
    row = blk_ptr + blk * 15
    k = tl.load(row + 0, mask=m, other=0)
    lk = tl.load(row + 1, mask=m, other=0)
    n = tl.load(row + 2, mask=m, other=1).to(tl.int32)
    tok0 = tl.load(row + 3, mask=m, other=0)
    ch_off = tl.load(row + 5, mask=m, other=0)
    step_off = tl.load(row + 6, mask=m, other=0)
    tok_off = tl.load(row + 7, mask=m, other=0)
    s_chunk = tl.load(row + 8, mask=m, other=1)
    step_at = tl.load(row + 9, mask=m, other=0)
    tok_at = tl.load(row + 10, mask=m, other=0)
    dir_at = tl.load(row + 11, mask=m, other=0)
    meta = tl.load(row + 12, mask=m, other=0)
    ids_base = tl.load(row + 13, mask=m, other=0)
    cbase = tl.load(cbase_ptr + k, mask=m, other=0)          # chunk's first byte in the blob
    cwords = tl.load(cwords_ptr + k, mask=m, other=0)        # words in the chunk's stream area

    # Directory: cumulative word ends; checked before any word is read.
    d0 = (cbase + dir_at) // 4 + sic
    e_end = tl.load(u32_ptr + d0, mask=m, other=0).to(tl.uint32).to(tl.int64)
    e_beg = tl.load(u32_ptr + d0 - 1, mask=m & (sic > 0), other=0).to(tl.uint32).to(tl.int64)
    bad = m & ((e_beg > e_end) | (e_end > cwords) | ((sic == s_chunk - 1) & (e_end != cwords)))
    ok = m & (bad == 0)
    wb = (cbase + meta) // 4 + e_beg
    ptr = tl.where(ok, e_end - e_beg, 0).to(tl.int32)
    per = batch * n
    nsym = tl.where(ok, nchs * per, 0)

    last = tl.load(u32_ptr + wb + ptr - 1, mask=ok & (ptr > 0), other=0).to(tl.uint32).to(tl.uint64)
    bad = bad | ((ptr > 0) & (last == 0))
    x = tl.zeros([BLOCK], dtype=tl.uint64)
    for _k in tl.static_range(2):
        need = ((x >> 32) == 0) & (ptr > 0)
        w = tl.load(u32_ptr + wb + ptr - 1, mask=need, other=0).to(tl.uint32).to(tl.uint64)
        x = tl.where(need, (x << 32) | w, x)
        ptr = ptr - need.to(tl.int32)
    # The next word a renormalization consumes, loaded ahead (a masked load keeps `other`).
    wnext = tl.load(u32_ptr + wb + ptr - 1, mask=ok & (ptr > 0), other=0)

    # Per-channel state, reloaded when a channel ends.
    j = tl.zeros([BLOCK], dtype=tl.int32)
    bi = tl.zeros([BLOCK], dtype=tl.int32)
    t = tl.zeros([BLOCK], dtype=tl.int32)
    optr = out_ptr + tl.load(obase_ptr + lk, mask=m, other=0)
    sb = tl.load(ostride_ptr + lk * 4, mask=m, other=0)
    sh = tl.load(ostride_ptr + lk * 4 + 1, mask=m, other=0)
    stt = tl.load(ostride_ptr + lk * 4 + 2, mask=m, other=0)
    sd = tl.load(ostride_ptr + lk * 4 + 3, mask=m, other=0)
    hd = tl.load(hdim_ptr + lk, mask=m, other=1).to(tl.int32)
    pbase = (cbase // PSZ) + ch_off
    sbase = ((cbase + step_at) // PSZ) + step_off
    c = c0
    tid = tl.load(ids_ptr + ids_base + c, mask=ok, other=0)
    lo = tl.load(par_ptr + pbase + c, mask=ok, other=0.0).to(tl.float32)
    if SHARED:
        st = tl.load(par_ptr + sbase, mask=ok, other=0.0).to(tl.float32)
    else:
        st = tl.load(par_ptr + sbase + c, mask=ok, other=0.0).to(tl.float32)
    pbad = (lo != lo) | (st != st) | (tl.abs(lo) == float("inf")) | (tl.abs(st) == float("inf")) | (st < 0)
    bad = bad | (ok & pbad)
    hh = c // hd
    cofs = hh.to(tl.int64) * sh + (c - hh * hd).to(tl.int64) * sd
    row0 = cofs + tok0 * stt            # offset of (b = 0, token 0) of the current channel
    o = row0
    tbase = (cbase + tok_at) + tok_off
    # Token scales: the scale of this step, and the code of the step after (p = b * n + t cycles
    # with period batch * n, whatever the channel).
    live = ok & (nsym > 0)
    if HAS_TS:
        sc = tl.load(scale_ptr + tl.load(u8_ptr + tbase, mask=live, other=0).to(tl.int32))
        p2 = 1 % per
        ecn = tl.load(u8_ptr + tbase + p2, mask=live, other=0).to(tl.int32)
    e = tl.load(lut_ptr + (tid << TB) + ((x & 0xFFFFFF).to(tl.int32) >> (24 - TB)), mask=live, other=0)
    n_steps = tl.load(steps_ptr + pid)      # the program's longest stream (host, per shape)
    for s in range(0, n_steps):
        active = s < nsym
        # rANS step through the LUT entry loaded last step, then renormalize with the word
        # loaded last step.
        q = (x & 0xFFFFFF).to(tl.int32)
        sym = (e & 0x7FF).to(tl.int32)
        f = ((e >> 11) & 0x1FFF).to(tl.uint64)
        off = ((e >> 24) & 0xFFF).to(tl.uint64)
        nx = (x >> 24) * (f << (24 - TB)) + ((off << (24 - TB)) | (q & ((1 << (24 - TB)) - 1)).to(tl.uint64))
        x = tl.where(active, nx, x)
        need = active & ((x >> 32) == 0) & (ptr > 0)
        x = tl.where(need, (x << 32) | wnext.to(tl.uint32).to(tl.uint64), x)
        ptr = ptr - need.to(tl.int32)
        wnext = tl.load(u32_ptr + wb + ptr - 1, mask=need & (ptr > 0), other=wnext)
        val = sym.to(tl.float32) * st
        val = val + lo
        if HAS_TS:
            val = val * sc
        if OUT_BF16:
            tl.store(optr + o, bf16_bits(val), mask=active)
        else:
            tl.store(optr + o, val.to(optr.dtype.element_ty), mask=active)
        # Advance (channel-major; batch-major then token inside a channel).
        t = t + 1
        o = o + stt
        wt = t == n
        t = tl.where(wt, 0, t)
        bi = bi + wt.to(tl.int32)
        wc = bi == batch
        bi = tl.where(wc, 0, bi)
        chg = wc & (s + 1 < nsym)
        j = j + wc.to(tl.int32)
        c = c0 + j
        tid = tl.where(chg, tl.load(ids_ptr + ids_base + c, mask=chg, other=0), tid)
        lo = tl.where(chg, tl.load(par_ptr + pbase + c, mask=chg, other=0.0).to(tl.float32), lo)
        if not SHARED:
            st = tl.where(chg, tl.load(par_ptr + sbase + c, mask=chg, other=0.0).to(tl.float32), st)
        pb = (lo != lo) | (st != st) | (tl.abs(lo) == float("inf")) | (tl.abs(st) == float("inf")) | (st < 0)
        bad = bad | (chg & pb)
        hh = c // hd
        cofs = tl.where(chg, hh.to(tl.int64) * sh + (c - hh * hd).to(tl.int64) * sd, cofs)
        # next batch row of the same channel, or the next channel's first row
        row0 = tl.where(wc, cofs + tok0 * stt, tl.where(wt, row0 + sb, row0))
        o = tl.where(wt, row0, o)
        nxt = active & (s + 1 < nsym)
        e = tl.load(lut_ptr + (tid << TB) + ((x & 0xFFFFFF).to(tl.int32) >> (24 - TB)), mask=nxt, other=0)
        if HAS_TS:
            sc = tl.load(scale_ptr + ecn)
            p2 = p2 + 1
            p2 = tl.where(p2 == per, 0, p2)
            ecn = tl.load(u8_ptr + tbase + p2, mask=nxt, other=0).to(tl.int32)
    bad = bad | (ok & ((x != 0) | (ptr != 0)))
    # failed streams of this program into flags[0] (one atomic per program, no reduction launch)
    tl.atomic_add(err_ptr, tl.sum((m & bad).to(tl.int64), axis=0))


@triton.jit
def v2_words_sum_kernel(u32_ptr, wbase_ptr, cwords_ptr, sums_ptr, k1, k2, BLOCKW: tl.constexpr):
    """sums[chunk] += sum of mix(word_i, i) over one BLOCKW slice of the chunk's word area."""
    k = tl.program_id(0)
    j = tl.program_id(1)
    wbase = tl.load(wbase_ptr + k)
    cw = tl.load(cwords_ptr + k)
    i = j * BLOCKW + tl.arange(0, BLOCKW)
    msk = i < cw
    w = tl.load(u32_ptr + wbase + i, mask=msk, other=0).to(tl.uint32).to(tl.uint64)
    v = tl.where(msk, _mix(w, i.to(tl.uint64), k1, k2), 0)
    part = tl.sum(v, axis=0)
    if j * BLOCKW < cw:
        tl.atomic_add(sums_ptr + k, part.to(tl.int64, bitcast=True))


@triton.jit
def v2_decode_nested_kernel(u32_ptr, ids_ptr, par_ptr, u8_ptr, lo_ptr, lob_ptr, tkb_ptr,
                            sblk_ptr, ssic_ptr, sc0_ptr, snch_ptr, blk_ptr, cbase_ptr, cwords_ptr,
                            lut_ptr, fc_ptr, scale_ptr, out_ptr, obase_ptr, ostride_ptr, hdim_ptr, err_ptr,
                            lane0, lane_end, p0, batch,
                            TB: tl.constexpr, PSZ: tl.constexpr, SHARED: tl.constexpr, HAS_TS: tl.constexpr,
                            OUT_BF16: tl.constexpr, BLOCK: tl.constexpr, LUT8: tl.constexpr,
                            PKD: tl.constexpr, DG: tl.constexpr = 0, DEFER: tl.constexpr = False):
    """The same decode as ``v2_decode_kernel`` (same arguments less ``steps_ptr``, same
    arithmetic, same checks, bit-identical output), with the channel / batch-row / token walk
    as three nested loops instead of one flat loop: the per-symbol step then carries only the
    rANS chain, the renormalization, the dequantize and the store (pointers advanced in place),
    and the channel switch (table id, parameters, their checks, the head/dim division and the
    output row) runs once per channel instead of being computed and masked at every symbol.
    The ncu profile of the flat loop counted 157 instructions per symbol step.

    LUT8: the compact tables of ``build_lut8`` (uint8 slot -> symbol, int32 symbol -> f | cdf << 13
    at fc_ptr); otherwise the 8-byte entries of ``build_lut`` (fc_ptr unused). The chain step is
    the same arithmetic: x' = (x >> 24) * f' + q - cdf', with q the state's low 24 bits.

    DEFER (packed, float32 output only): store fl32(step * v) and leave the lo offset and the
    token scale to ``v2_dequant_kernel``, so that this kernel need not wait for the parameter
    pass (which then runs on a side stream, concurrently); same arithmetic, same result.

    PKD (packed parameters): lo comes from lo_ptr (float32, ``v2_params_kernel``'s output, chunk k
    from lob[k]) and the token codes from u8_ptr = its code scratch (chunk k from tkb[k]);
    otherwise lo_ptr is par_ptr and u8_ptr the container bytes (lob_ptr, tkb_ptr unused)."""
    pid = tl.program_id(0) + p0
    lane = pid * BLOCK + tl.arange(0, BLOCK)
    m = (lane >= lane0) & (lane < lane_end)
    blk = tl.load(sblk_ptr + lane, mask=m, other=0).to(tl.int64)
    sic = tl.load(ssic_ptr + lane, mask=m, other=0).to(tl.int64)
    c0 = tl.load(sc0_ptr + lane, mask=m, other=0)
    nchs = tl.load(snch_ptr + lane, mask=m, other=0)
    row = blk_ptr + blk * 15
    k = tl.load(row + 0, mask=m, other=0)
    lk = tl.load(row + 1, mask=m, other=0)
    n = tl.load(row + 2, mask=m, other=1).to(tl.int32)
    tok0 = tl.load(row + 3, mask=m, other=0)
    ch_off = tl.load(row + 5, mask=m, other=0)
    step_off = tl.load(row + 6, mask=m, other=0)
    tok_off = tl.load(row + 7, mask=m, other=0)
    s_chunk = tl.load(row + 8, mask=m, other=1)
    step_at = tl.load(row + 9, mask=m, other=0)
    tok_at = tl.load(row + 10, mask=m, other=0)
    dir_at = tl.load(row + 11, mask=m, other=0)
    meta = tl.load(row + 12, mask=m, other=0)
    ids_base = tl.load(row + 13, mask=m, other=0)
    cbase = tl.load(cbase_ptr + k, mask=m, other=0)
    cwords = tl.load(cwords_ptr + k, mask=m, other=0)

    rel_at = tl.load(row + 14, mask=m, other=0)
    e_beg, e_end, dbad = _dir_bounds(u32_ptr, (cbase + dir_at) // 4, cbase + rel_at, sic, m, DG)
    bad = m & (dbad | (e_beg > e_end) | (e_end > cwords) | ((sic == s_chunk - 1) & (e_end != cwords)))
    ok = m & (bad == 0)
    wb = (cbase + meta) // 4 + e_beg
    ptr = tl.where(ok, e_end - e_beg, 0).to(tl.int32)
    nch_eff = tl.where(ok, nchs, 0)
    per = batch * n

    x, ptr, wp, lbad = _stream_open(u32_ptr, wb, ptr, ok)
    bad = bad | lbad
    wnext = tl.load(wp, mask=ok & (ptr > 0), other=0)

    optr = out_ptr + tl.load(obase_ptr + lk, mask=m, other=0)
    sb = tl.load(ostride_ptr + lk * 4, mask=m, other=0)
    sh = tl.load(ostride_ptr + lk * 4 + 1, mask=m, other=0)
    stt = tl.load(ostride_ptr + lk * 4 + 2, mask=m, other=0)
    sd = tl.load(ostride_ptr + lk * 4 + 3, mask=m, other=0)
    hd = tl.load(hdim_ptr + lk, mask=m, other=1).to(tl.int32)
    if PKD:
        pbase = tl.load(lob_ptr + k, mask=m, other=0) + ch_off
        tbase = tl.load(tkb_ptr + k, mask=m, other=0) + tok_off
    else:
        pbase = (cbase // PSZ) + ch_off
        tbase = (cbase + tok_at) + tok_off
    sbase = ((cbase + step_at) // PSZ) + step_off
    if SHARED:
        st = tl.load(par_ptr + sbase, mask=ok, other=0.0).to(tl.float32)
    lmask = (1 << (24 - TB)) - 1
    cmax = tl.max(nch_eff, axis=0)
    nmax = tl.max(tl.where(ok, n, 0), axis=0)
    for j in range(0, cmax):
        c = c0 + j
        cact = j < nch_eff
        tid = tl.load(ids_ptr + ids_base + c, mask=cact, other=0)
        if DEFER:
            lo = tl.zeros([BLOCK], dtype=tl.float32)
        else:
            lo = tl.load(lo_ptr + pbase + c, mask=cact, other=0.0).to(tl.float32)
        if not SHARED:
            st = tl.load(par_ptr + sbase + c, mask=cact, other=0.0).to(tl.float32)
        pb = (lo != lo) | (st != st) | (tl.abs(lo) == float("inf")) | (tl.abs(st) == float("inf")) | (st < 0)
        bad = bad | (cact & pb)
        hh = c // hd
        crow = optr + (hh.to(tl.int64) * sh + (c - hh * hd).to(tl.int64) * sd + tok0 * stt)
        lrow = lut_ptr + (tid << TB)
        if LUT8:
            frow = fc_ptr + tid * 256
            symc = tl.load(lrow + ((x & 0xFFFFFF).to(tl.int32) >> (24 - TB)), mask=cact, other=0).to(tl.int32)
            e = tl.load(frow + symc, mask=cact, other=0)
        else:
            e = tl.load(lrow + ((x & 0xFFFFFF).to(tl.int32) >> (24 - TB)), mask=cact, other=0)
        if HAS_TS and not DEFER:
            sc = tl.load(scale_ptr + tl.load(u8_ptr + tbase, mask=cact, other=0).to(tl.int32))
            p2 = 1 % per
            ecn = tl.load(u8_ptr + tbase + p2, mask=cact, other=0).to(tl.int32)
        for b in range(0, batch):
            op = crow + b * sb
            for t in range(0, nmax):
                active = cact & (t < n)
                q = (x & 0xFFFFFF).to(tl.int32)
                if LUT8:
                    sym = symc
                    f = (e & 0x1FFF).to(tl.uint64)
                    nx = (x >> 24) * (f << (24 - TB)) + (q - ((e >> 13) << (24 - TB))).to(tl.uint64)
                else:
                    sym = (e & 0x7FF).to(tl.int32)
                    f = ((e >> 11) & 0x1FFF).to(tl.uint64)
                    off = ((e >> 24) & 0xFFF).to(tl.uint64)
                    nx = (x >> 24) * (f << (24 - TB)) + ((off << (24 - TB)) | (q & lmask).to(tl.uint64))
                x = tl.where(active, nx, x)
                need = active & ((x >> 32) == 0) & (ptr > 0)
                x = tl.where(need, (x << 32) | wnext.to(tl.uint32).to(tl.uint64), x)
                ptr = ptr - need.to(tl.int32)
                wp = wp - need.to(tl.int32)
                wnext = tl.load(wp, mask=need & (ptr > 0), other=wnext)
                val = sym.to(tl.float32) * st
                if not DEFER:
                    val = val + lo
                    if HAS_TS:
                        val = val * sc
                if OUT_BF16:
                    tl.store(op, bf16_bits(val), mask=active)
                else:
                    tl.store(op, val.to(op.dtype.element_ty), mask=active)
                op += stt
                # A lane past its own n (shorter block) keeps its entry: its next batch row
                # starts from the same state, so a masked load must not clobber it.
                if LUT8:
                    symn = tl.load(lrow + ((x & 0xFFFFFF).to(tl.int32) >> (24 - TB)), mask=active,
                                   other=0).to(tl.int32)
                    symc = tl.where(active, symn, symc)
                    e = tl.where(active, tl.load(frow + symc, mask=active, other=0), e)
                else:
                    e = tl.where(active, tl.load(lrow + ((x & 0xFFFFFF).to(tl.int32) >> (24 - TB)),
                                                 mask=active, other=0), e)
                if HAS_TS and not DEFER:
                    sc = tl.where(active, tl.load(scale_ptr + ecn), sc)
                    p2n = p2 + 1
                    p2 = tl.where(active, tl.where(p2n == per, 0, p2n), p2)
                    ecn = tl.where(active, tl.load(u8_ptr + tbase + p2, mask=active, other=0).to(tl.int32), ecn)
    bad = bad | (ok & ((x != 0) | (ptr != 0)))
    # failed streams of this program into flags[0] (one atomic per program, no reduction launch)
    tl.atomic_add(err_ptr, tl.sum((m & bad).to(tl.int64), axis=0))


@triton.jit
def _wide_step(lut_ptr, row, x, ptr, wp, active, TB: tl.constexpr):
    """One rANS symbol of LUT row ``row`` (8-byte entries of ``build_lut``) for the active lanes,
    renormalizing from ``wp`` (the next word, read downwards): -> (symbol, x, ptr, wp)."""
    q = (x & 0xFFFFFF).to(tl.int32)
    e = tl.load(lut_ptr + (row << TB) + (q >> (24 - TB)), mask=active, other=0)
    sym = (e & 0x7FF).to(tl.int32)
    f = ((e >> 11) & 0x1FFF).to(tl.uint64)
    off = ((e >> 24) & 0xFFF).to(tl.uint64)
    lmask = (1 << (24 - TB)) - 1
    nx = (x >> 24) * (f << (24 - TB)) + ((off << (24 - TB)) | (q & lmask).to(tl.uint64))
    x = tl.where(active, nx, x)
    need = active & ((x >> 32) == 0) & (ptr > 0)
    w = tl.load(wp, mask=need, other=0).to(tl.uint32).to(tl.uint64)
    x = tl.where(need, (x << 32) | w, x)
    return sym, x, ptr - need.to(tl.int32), wp - need.to(tl.int32)


@triton.jit
def v2_params_kernel(u32_ptr, par_ptr, blk_ptr, bic_ptr, cbase_ptr, cwt_ptr, lut_ptr,
                     lo_ptr, lob_ptr, tok_ptr, tkb_ptr, err_ptr, n_blocks, batch, max_nch, max_ntok,
                     TB: tl.constexpr, PSZ: tl.constexpr, HAS_TS: tl.constexpr, FRAC: tl.constexpr,
                     BLOCK: tl.constexpr, DG: tl.constexpr = 0):
    """Packed parameters (EXT_PACKED): one lane per block decodes its parameter stream (the
    directory entry after the chunk's data streams) through the 8-byte LUT of the parameter
    tables (rows: offsets K, V, low bits K, V, tokens K, V): the channels' zigzag'd m >> FRAC,
    then their low FRAC bits, stored as lo = fl32(fl32(step * m) * 2**-FRAC) at lo[lob[k] +
    ch_off + c], then the token codes (zigzag'd differences from 128) at tok[tkb[k] + tok_off + t].
    Same checks as the decode kernel: directory entries inside the chunk's words (cwt: all of
    them), the last one ending them, the stream ending in x == 0 with every word consumed, each
    token code inside [0, 255]. A failed lane counts into err[0] and writes nothing."""
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = b < n_blocks
    row = blk_ptr + b.to(tl.int64) * 15
    k = tl.load(row + 0, mask=m, other=0)
    lk = tl.load(row + 1, mask=m, other=0)
    n = tl.load(row + 2, mask=m, other=0).to(tl.int32)
    nch = tl.load(row + 4, mask=m, other=0).to(tl.int32)
    ch_off = tl.load(row + 5, mask=m, other=0)
    step_off = tl.load(row + 6, mask=m, other=0)
    tok_off = tl.load(row + 7, mask=m, other=0)
    s_chunk = tl.load(row + 8, mask=m, other=1)
    step_at = tl.load(row + 9, mask=m, other=0)
    dir_at = tl.load(row + 11, mask=m, other=0)
    meta = tl.load(row + 12, mask=m, other=0)
    bic = tl.load(bic_ptr + b, mask=m, other=0).to(tl.int64)
    nbk = tl.load(bic_ptr + b + 1, mask=m & (b + 1 < n_blocks), other=0)   # 0: b is its chunk's last block
    cbase = tl.load(cbase_ptr + k, mask=m, other=0)
    cwt = tl.load(cwt_ptr + k, mask=m, other=0)
    rel_at = tl.load(row + 14, mask=m, other=0)
    # the block's parameter stream: directory entry s_chunk + bic (after the data streams)
    e_beg, e_end, dbad = _dir_bounds(u32_ptr, (cbase + dir_at) // 4, cbase + rel_at, s_chunk + bic, m, DG)
    bad = m & (dbad | (e_beg > e_end) | (e_end > cwt) | ((nbk == 0) & (e_end != cwt)))
    ok = m & (bad == 0)
    wb = (cbase + meta) // 4 + e_beg
    ptr = tl.where(ok, e_end - e_beg, 0).to(tl.int32)
    x, ptr, wp, lbad = _stream_open(u32_ptr, wb, ptr, ok)
    bad = bad | lbad
    kv = (lk % 2).to(tl.int64)
    st = tl.load(par_ptr + ((cbase + step_at) // PSZ) + step_off, mask=ok, other=0.0).to(tl.float32)
    lob = tl.load(lob_ptr + k, mask=m, other=0) + ch_off
    # pass 1: the high parts (kept as m >> FRAC in the scratch, as float32: |m >> FRAC| <= 1023)
    for j in range(0, max_nch):
        active = ok & (j < nch)
        sym, x, ptr, wp = _wide_step(lut_ptr, kv, x, ptr, wp, active, TB)
        mv = (sym >> 1) ^ (0 - (sym & 1))
        if FRAC > 0:
            tl.store(lo_ptr + lob + j, mv.to(tl.float32), mask=active)
        else:
            tl.store(lo_ptr + lob + j, st * mv.to(tl.float32), mask=active)
    if FRAC > 0:
        # pass 2: the low bits; m = (hi << FRAC) | frac, lo = fl32(fl32(step * m) * 2**-FRAC)
        for j in range(0, max_nch):
            active = ok & (j < nch)
            sym, x, ptr, wp = _wide_step(lut_ptr, (kv + 2), x, ptr, wp, active, TB)
            hi = tl.load(lo_ptr + lob + j, mask=active, other=0.0).to(tl.int32)
            mm = (hi * (1 << FRAC)) | sym
            tl.store(lo_ptr + lob + j, (st * mm.to(tl.float32)) * (1.0 / (1 << FRAC)), mask=active)
    if HAS_TS:
        tot = kv + 4
        tkb = tl.load(tkb_ptr + k, mask=m, other=0) + tok_off
        ntok = batch * n
        prev = tl.full([BLOCK], 128, dtype=tl.int32)
        for t in range(0, max_ntok):
            active = ok & (t < ntok)
            sym, x, ptr, wp = _wide_step(lut_ptr, tot, x, ptr, wp, active, TB)
            prev = tl.where(active, prev + ((sym >> 1) ^ (0 - (sym & 1))), prev)
            bad = bad | (active & ((prev < 0) | (prev > 255)))
            tl.store(tok_ptr + tkb + t, prev.to(tl.uint8), mask=active)
    bad = bad | (ok & ((x != 0) | (ptr != 0)))
    tl.atomic_add(err_ptr, tl.sum((m & bad).to(tl.int64), axis=0))


@triton.jit
def v2_dequant_kernel(out_ptr, blk_ptr, lo_ptr, lob_ptr, tok_ptr, tkb_ptr, scale_ptr, obase_ptr, ostride_ptr,
                      hdim_ptr, batch, HAS_TS: tl.constexpr, BLOCK: tl.constexpr):
    """The rest of a deferred (DEFER) decode: out = fl32(out + lo) * token scale, in place, for the
    elements of block program_id(0) (float32 output). Element e of the block: channel e % nch
    (fastest: coalesced in a token-major destination), batch row and token (e // nch)."""
    bi = tl.program_id(0).to(tl.int64)
    row = blk_ptr + bi * 15
    k = tl.load(row + 0)
    lk = tl.load(row + 1)
    n = tl.load(row + 2)
    tok0 = tl.load(row + 3)
    nch = tl.load(row + 4)
    ch_off = tl.load(row + 5)
    tok_off = tl.load(row + 7)
    e = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < nch * batch * n
    c = e % nch
    p = e // nch                 # b * n + t, as the token codes are ordered
    b = p // n
    t = p - b * n
    hd = tl.load(hdim_ptr + lk).to(tl.int64)
    sb = tl.load(ostride_ptr + lk * 4)
    sh = tl.load(ostride_ptr + lk * 4 + 1)
    stt = tl.load(ostride_ptr + lk * 4 + 2)
    sd = tl.load(ostride_ptr + lk * 4 + 3)
    hh = c // hd
    op = out_ptr + tl.load(obase_ptr + lk) + b * sb + hh * sh + (c - hh * hd) * sd + (tok0 + t) * stt
    val = tl.load(op, mask=m, other=0.0)
    lo = tl.load(lo_ptr + tl.load(lob_ptr + k) + ch_off + c, mask=m, other=0.0)
    val = val + lo
    if HAS_TS:
        code = tl.load(tok_ptr + tl.load(tkb_ptr + k) + tok_off + p, mask=m, other=0).to(tl.int32)
        val = val * tl.load(scale_ptr + code, mask=m, other=1.0)
    tl.store(op, val, mask=m)


@triton.jit
def v2_meta_crc_seg_kernel(u32_ptr, cbase_ptr, msize_ptr, tab_ptr, seg_ptr, maxs,
                           SEGW: tl.constexpr, BLOCK: tl.constexpr):
    """CRC-32 register of each whole SEGW-word segment of chunk k's metadata, from register 0
    (no pre/post inversion): seg[k, s]. The chunk's CRC follows from these by linearity
    (``v2_meta_crc_fin_kernel``), so the segments run in parallel."""
    k = tl.program_id(0)
    s = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cb = tl.load(cbase_ptr + k)
    ms = tl.load(msize_ptr + k)
    live = s < ms // (SEGW * 4)
    base = cb // 4 + s.to(tl.int64) * SEGW
    r = tl.zeros([BLOCK], dtype=tl.uint32)
    for w in range(0, SEGW):
        word = tl.load(u32_ptr + base + w, mask=live, other=0).to(tl.uint32, bitcast=True)
        for b in tl.static_range(4):
            idx = ((r ^ (word >> (8 * b))) & 0xFF).to(tl.int32)
            r = tl.load(tab_ptr + idx).to(tl.uint32, bitcast=True) ^ (r >> 8)
    tl.store(seg_ptr + k * maxs + s, r.to(tl.int32, bitcast=True), mask=live)


@triton.jit
def v2_meta_crc_fin_kernel(u8_ptr, cbase_ptr, msize_ptr, stored_ptr, tab_ptr, mat_ptr, seg_ptr, flags_ptr,
                           sums_ptr, wstored_ptr, n_chunks, maxs, SEG: tl.constexpr, BLOCK: tl.constexpr):
    """Chunk k's metadata CRC-32 (zlib's) from its segment registers: r <- shift(r) ^ seg[s]
    over the whole segments (shift = SEG zero bytes, a 32x32 GF(2) matrix: column b at
    mat[b]), then the tail bytes one by one. Counts into flags[2] the chunks whose CRC differs
    from the stored meta_crc, into flags[1] those whose words sum (sums, from
    ``v2_words_sum_kernel`` earlier on the stream) differs from the stored one."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = k < n_chunks
    cb = tl.load(cbase_ptr + k, mask=m, other=0)
    ms = tl.load(msize_ptr + k, mask=m, other=0)
    nseg = ms // SEG
    r = tl.full([BLOCK], 0xFFFFFFFF, dtype=tl.uint32)
    for s in range(0, maxs):
        live = m & (s < nseg)
        sg = tl.load(seg_ptr + k * maxs + s, mask=live, other=0).to(tl.uint32, bitcast=True)
        acc = tl.zeros([BLOCK], dtype=tl.uint32)
        for b in tl.static_range(32):
            col = tl.load(mat_ptr + b).to(tl.uint32, bitcast=True)
            acc = acc ^ tl.where(((r >> b) & 1) != 0, col, 0)
        r = tl.where(live, acc ^ sg, r)
    t0 = cb + nseg * SEG
    nt = ms - nseg * SEG
    for i in range(0, SEG):
        t = m & (i < nt)
        byte = tl.load(u8_ptr + t0 + i, mask=t, other=0).to(tl.uint32)
        nr = tl.load(tab_ptr + ((r ^ byte) & 0xFF).to(tl.int32)).to(tl.uint32, bitcast=True) ^ (r >> 8)
        r = tl.where(t, nr, r)
    crc = (r ^ 0xFFFFFFFF).to(tl.int64)
    stored = tl.load(stored_ptr + k, mask=m, other=0)
    tl.atomic_add(flags_ptr + 2, tl.sum((m & (crc != stored)).to(tl.int64), axis=0))
    ws = tl.load(sums_ptr + k, mask=m, other=0)
    wst = tl.load(wstored_ptr + k, mask=m, other=0)
    tl.atomic_add(flags_ptr + 1, tl.sum((m & (ws != wst)).to(tl.int64), axis=0))
