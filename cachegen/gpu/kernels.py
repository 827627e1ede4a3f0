"""Triton kernels of the GPU decoder.

Phase 1 (``ans_decode_kernel``): one lane per ANS stream, the arithmetic of
``cachegen.codec.entropy.lockstep_decode`` exactly (64-bit state, 32-bit words, 24-bit
precision). Symbols go to a buffer laid out [step, stream], so the lanes of a warp store
consecutive bytes at every step. Every read is bounded: words only inside the stream
(the pointer never goes below the stream's first word), tables only at ids/symbols the host
validated (a symbol found by the search is always < the table's alphabet). A stream that does
not end in the initial state sets its error flag.

Phase 2 (``dequant_kernel``): one program per (block, batch item, token tile, channel tile):
gathers symbols, undoes anchor-delta grouping, checks the index range, dequantizes exactly
fl32(fl32(fl32(step * v) + lo) * token_scale) (the launch turns FMA contraction off) and
stores the destination dtype (round to nearest even) at [b, h, token, d] of the caller's
tensor, whatever its strides.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bf16_bits(xv):
    """fp32 -> bf16 bit patterns (int16), round to nearest even; NaNs stay quiet NaNs. Shared by
    both format versions' kernels (the destination is the bf16 buffer viewed as int16)."""
    u = xv.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)
    return r.to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _word(words_ptr, wb, idx, mask):
    """Word idx of the stream starting at word wb of the aligned word buffer, as uint64."""
    return tl.load(words_ptr + wb + idx, mask=mask, other=0).to(tl.uint32).to(tl.uint64)


@triton.jit
def _search(crow, q, lo, hi, search_iters, SEARCH_WHILE: tl.constexpr):
    """Largest s in [lo, hi] with cdf[s] <= q (binary search over the row crow of the cdf)."""
    if SEARCH_WHILE:
        while tl.max(hi - lo, axis=0) > 0:
            mid = (lo + hi + 1) >> 1
            go = tl.load(crow + mid, mask=hi > lo, other=0) <= q
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
    else:
        for _it in range(search_iters):
            mid = (lo + hi + 1) >> 1
            go = tl.load(crow + mid, mask=hi > lo, other=0) <= q
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid - 1)
    return lo


@triton.jit
def ans_decode_kernel(words_ptr, wbyte_ptr, wcnt_ptr, nsym_ptr, per_ptr, na_ptr, tbase_ptr,
                      ids_ptr, lut_ptr, cdf_ptr, steps_ptr, sym_ptr, err_ptr,
                      n_streams, cdf_stride, search_iters,
                      CPS: tl.constexpr, ROLES: tl.constexpr, LUT_BITS: tl.constexpr,
                      SEARCH_WHILE: tl.constexpr, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    lane = pid * BLOCK + tl.arange(0, BLOCK)
    m = lane < n_streams
    wb = tl.load(wbyte_ptr + lane, mask=m, other=0)
    ptr = tl.load(wcnt_ptr + lane, mask=m, other=0)
    nsym = tl.load(nsym_ptr + lane, mask=m, other=0)
    per = tl.load(per_ptr + lane, mask=m, other=1)
    na = tl.load(na_ptr + lane, mask=m, other=0)
    tb = tl.load(tbase_ptr + lane, mask=m, other=0)

    last = _word(words_ptr, wb, ptr - 1, ptr > 0)
    bad = (ptr > 0) & (last == 0)
    x = tl.zeros([BLOCK], dtype=tl.uint64)
    for _k in tl.static_range(2):
        need = ((x >> 32) == 0) & (ptr > 0)
        w = _word(words_ptr, wb, ptr - 1, need)
        x = tl.where(need, (x << 32) | w, x)
        ptr = ptr - need.to(tl.int32)

    j = tl.zeros([BLOCK], dtype=tl.int32)
    pos = tl.zeros([BLOCK], dtype=tl.int32)
    n_steps = tl.load(steps_ptr + pid)
    srow = lane.to(tl.int64)            # symbol buffer offset of (step s, this stream)
    tid = tl.load(ids_ptr + tb, mask=m, other=0)
    for s in range(0, n_steps):
        active = s < nsym
        q = (x & 0xFFFFFF).to(tl.int32)
        crow = cdf_ptr + tid * cdf_stride
        if PACKED:
            # One 8-byte LUT entry: symbol | cdf << 11 | freq << 35 | ambiguous << 60; an
            # ambiguous slot (several symbols) holds (first, last) symbol and is searched.
            e = tl.load(lut_ptr + tid * (1 << LUT_BITS) + (q >> (24 - LUT_BITS)))
            lo = (e & 0x7FF).to(tl.int32)
            c0 = ((e >> 11) & 0xFFFFFF).to(tl.int32)
            f = ((e >> 35) & 0x1FFFFFF).to(tl.int32)
            amb = ((e >> 60) & 1) != 0
            hi = tl.where(amb, c0, lo)
            lo = _search(crow, q, lo, hi, search_iters, SEARCH_WHILE)
            ca = tl.load(crow + lo, mask=amb, other=0)
            cb = tl.load(crow + lo + 1, mask=amb, other=0)
            c0 = tl.where(amb, ca, c0)
            c1 = c0 + tl.where(amb, cb - ca, f)
        else:
            e = tl.load(lut_ptr + tid * (1 << LUT_BITS) + (q >> (24 - LUT_BITS)))
            lo = e & 0xFFFF
            hi = e >> 16
            lo = _search(crow, q, lo, hi, search_iters, SEARCH_WHILE)
            c0 = tl.load(crow + lo)
            c1 = tl.load(crow + lo + 1)
        nx = (x >> 24) * (c1 - c0).to(tl.uint64) + (q - c0).to(tl.uint64)
        x = tl.where(active, nx, x)
        tl.store(sym_ptr + srow, lo.to(sym_ptr.dtype.element_ty), mask=m & active)
        srow = srow + n_streams
        need = active & ((x >> 32) == 0) & (ptr > 0)
        w = _word(words_ptr, wb, ptr - 1, need)     # only refilling lanes touch memory
        x = tl.where(need, (x << 32) | w, x)
        ptr = ptr - need.to(tl.int32)
        pos = pos + 1
        wrap = pos == per
        j = j + wrap.to(tl.int32)
        pos = tl.where(wrap, 0, pos)
        # Table of the next symbol: changes only at a channel (or anchor/delta) boundary.
        if ROLES == 2:
            chg = (wrap | (pos == na)) & (s + 1 < nsym)
            role = (pos >= na).to(tl.int32)
        else:
            chg = wrap & (s + 1 < nsym)
            role = 0
        tid = tl.where(chg, tl.load(ids_ptr + tb + j * ROLES + role, mask=chg, other=0), tid)
    bad = bad | (x != 0) | (ptr != 0)
    tl.store(err_ptr + lane, bad.to(tl.int8), mask=m)


@triton.jit
def dequant_kernel(sym_ptr, n_streams, tiles_ptr, blk_ptr, out_ptr, obase_ptr, ostride_ptr, hdim_ptr,
                   lo_ptr, step_ptr, exp_ptr, scale_ptr, err_ptr, batch,
                   CPS: tl.constexpr, G: tl.constexpr, HAS_TS: tl.constexpr, OUT_BF16: tl.constexpr, BLK_COLS: tl.constexpr,
                   BT: tl.constexpr, BC: tl.constexpr):
    pid = tl.program_id(0)
    blk = tl.load(tiles_ptr + pid * 4)
    b = tl.load(tiles_ptr + pid * 4 + 1).to(tl.int64)
    t0 = tl.load(tiles_ptr + pid * 4 + 2)
    c0 = tl.load(tiles_ptr + pid * 4 + 3)
    row = blk_ptr + blk.to(tl.int64) * BLK_COLS
    lk = tl.load(row + 0)
    n = tl.load(row + 1).to(tl.int32)
    tok0 = tl.load(row + 2)
    fs = tl.load(row + 3)
    na = tl.load(row + 4).to(tl.int32)
    nd = tl.load(row + 5).to(tl.int32)
    levels = tl.load(row + 6).to(tl.int32)
    poff = tl.load(row + 7)
    eoff = tl.load(row + 8)
    nch = tl.load(row + 9).to(tl.int32)

    t = (t0 + tl.arange(0, BT))[:, None]
    c = (c0 + tl.arange(0, BC))[None, :]
    msk = (t < n) & (c < nch)
    stream = fs + c // CPS
    jj = c % CPS
    per = batch * (na + nd)
    bi = b.to(tl.int32)
    if G == 1:
        row_i = jj * per + bi * n + t
        v = tl.load(sym_ptr + row_i.to(tl.int64) * n_streams + stream, mask=msk, other=0).to(tl.int32)
    else:
        g = t // G
        r = t - g * G
        ra = jj * per + bi * na + g
        rd = jj * per + batch * na + bi * nd + (t - g - 1)
        a = tl.load(sym_ptr + ra.to(tl.int64) * n_streams + stream, mask=msk, other=0).to(tl.int32)
        d = tl.load(sym_ptr + rd.to(tl.int64) * n_streams + stream, mask=msk & (r > 0), other=0).to(tl.int32)
        v = tl.where(r == 0, a, d - (levels - 1) + a)
    bad = msk & ((v < 0) | (v >= levels))
    nbad = tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0)
    tl.store(err_ptr + pid, (nbad > 0).to(tl.int8))

    lo = tl.load(lo_ptr + poff + c, mask=c < nch, other=0.0)
    st = tl.load(step_ptr + poff + c, mask=c < nch, other=0.0)
    xv = v.to(tl.float32) * st
    xv = xv + lo
    if HAS_TS:
        e = tl.load(exp_ptr + eoff + bi * n + t, mask=t < n, other=0).to(tl.int32)
        xv = xv * tl.load(scale_ptr + e)
    optr = out_ptr + tl.load(obase_ptr + lk)   # element offset of this (layer, kv) tensor
    sb = tl.load(ostride_ptr + lk * 4)
    sh = tl.load(ostride_ptr + lk * 4 + 1)
    stt = tl.load(ostride_ptr + lk * 4 + 2)
    sd = tl.load(ostride_ptr + lk * 4 + 3)
    hd = tl.load(hdim_ptr + lk).to(tl.int32)
    hh = c // hd
    dd = c - hh * hd
    off = b * sb + hh.to(tl.int64) * sh + (tok0 + t.to(tl.int64)) * stt + dd.to(tl.int64) * sd
    if OUT_BF16:
        tl.store(optr + off, bf16_bits(xv), mask=msk)
    else:
        tl.store(optr + off, xv.to(optr.dtype.element_ty), mask=msk)
