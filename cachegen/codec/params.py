"""Packed quantizer parameters (format v2 extension EXT_PACKED, codec_spec/FORMAT_V2.md 6.2).

With one step per block, a channel's ``lo`` is stored as an integer offset ``m`` in units of
``step / 2**r`` (``lo = fl32(fl32(step * m) * 2**-r)``), and ``m`` and the token-scale codes are
rANS-coded in one parameter stream per block instead of 2 + 1 bytes per channel and token. On
real caches ``m >> r`` takes ~3 bits, its low r bits r, and a token code's difference to the
previous one ~3.2 (Gemma-3 ``tiny-p``, 1K: 4.5 % of the file before; rd_profile_notes.md).

``m = floor(min * 2**r / step)`` (:func:`lo_offsets`): ``lo <= min < lo + step / 2**r``, so the
grid sits within ``step / 2**r`` of the stored one of an unpacked container. :func:`fit_offsets`
(off: ``OFFSET_PHASES``) instead picks the least-squared-error offset among ``2**r`` candidates;
with one step per block most coefficient channels span much less than a step, but that did not
lower KL consistently. Why r > 0: with r = 0 the grid moves by up to half
a step, and on Gemma-3 that alone tipped a held-out window over a KL cliff (0.011 -> 0.031).

One owner for the parameter stream's symbol mapping: the encoder, the CPU decoders (through
:func:`chunk_params`) and the GPU plan use these functions.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import StreamError
from . import entropy

MAX_OFFSET = 1023        # |m >> r|: zigzag symbols stay below the format's 2047-symbol alphabets
TOKEN_START = 128        # the token code before a block's first one (its difference is coded)
FRAC_BITS = 6            # the encoder's r
# fit_offsets' candidates per channel (0 or 1: lo_offsets, m at the minimum). Measured and left
# off (RESULTS section 17): all 8 offsets of r = 3 moved held-out KL down for Gemma-3 tiny-p
# (0.0167 -> 0.0143) and default-p but up for small-p (0.0065 -> 0.0107), and on the
# calibration windows up for tiny-p (0.0171 -> 0.0186) and small-p: no consistent gain.
OFFSET_PHASES = 0


def zigzag(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.int64)
    return np.where(v >= 0, 2 * v, -2 * v - 1)


def unzigzag(s: np.ndarray) -> np.ndarray:
    s = np.asarray(s, dtype=np.int64)
    return (s >> 1) ^ -(s & 1)


def lo_offsets(xmin: np.ndarray, step: np.ndarray, frac_bits: int = FRAC_BITS) -> Optional[np.ndarray]:
    """Integer offsets m (int64) of a block's channels, ``floor(min * 2**r / step)``; 0 where
    the step is 0 (then the values must all be 0). None when the block cannot be packed
    (``|m >> r|`` over MAX_OFFSET, or a constant non-zero channel under a zero step)."""
    xmin = np.asarray(xmin, dtype=np.float64)
    st = np.asarray(step, dtype=np.float64)
    pos = st > 0
    if not pos.all() and bool((xmin[~pos] != 0).any()):
        return None
    m = np.zeros(xmin.shape, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.floor(xmin[pos] * float(1 << frac_bits) / st[pos])
    if r.size and not (np.abs(r) <= (MAX_OFFSET << frac_bits)).all():
        return None
    m[pos] = r.astype(np.int64)
    # floor of a float64 quotient can land one unit high of the exact one: keep lo <= min
    lo = lo_values(st[0] if st.size else 0.0, m, frac_bits).astype(np.float64)
    over = lo > xmin
    if over.any():
        m[over] -= 1
    return m


def fit_offsets(x: np.ndarray, step: np.ndarray, bits: int, frac_bits: int = FRAC_BITS,
                phases: int = 8) -> Optional[np.ndarray]:
    """Offsets m that place each channel's grid where its values lose least: of ``phases``
    candidates ``m0 - j * 2**r / phases`` (lo from ~min down by under a step; m0 =
    :func:`lo_offsets`), the one with the smallest squared reconstruction error after rounding
    and clipping to the 2**bits levels. Encoder-only: any m decodes (section 6.2). A channel
    narrower than the shared step otherwise gets its only level at its minimum."""
    m0 = lo_offsets(x.min(axis=1), step, frac_bits)
    if m0 is None or phases <= 1 or not x.size:
        return m0
    st = np.float32(step[0])
    if not st > 0:
        return m0
    unit = max(1, (1 << frac_bits) // phases)
    cand = m0[:, None] - unit * np.arange(phases, dtype=np.int64)[None, :]            # [ch, P]
    lo = lo_values(st, cand, frac_bits)                                               # float32
    u = (x[:, None, :] - lo[:, :, None]) / st
    np.rint(u, out=u)
    np.clip(u, 0, (1 << bits) - 1, out=u)
    rec = (u * st) + lo[:, :, None]
    err = np.square(x[:, None, :] - rec, dtype=np.float32).sum(axis=2)                # [ch, P]
    best = cand[np.arange(cand.shape[0]), np.argmin(err, axis=1)]
    if not (np.abs(best >> frac_bits) <= MAX_OFFSET).all():
        return m0
    return best


def lo_values(step: float, m: np.ndarray, frac_bits: int = FRAC_BITS) -> np.ndarray:
    """lo = fl32(fl32(step * m) * 2**-r), float32 (exact for fp16 steps: 11 + 10 + r <= 24 bits)."""
    return (np.float32(step) * np.asarray(m, dtype=np.float32)) * np.float32(2.0 ** -frac_bits)


def split_offsets(m: np.ndarray, frac_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """m -> (zigzag(m >> r), m & (2**r - 1)): the two symbol runs of a parameter stream."""
    m = np.asarray(m, dtype=np.int64)
    return zigzag(m >> frac_bits), m & ((1 << frac_bits) - 1)


def join_offsets(hi: np.ndarray, frac: Optional[np.ndarray], frac_bits: int) -> np.ndarray:
    m = unzigzag(hi) << frac_bits
    return m | np.asarray(frac, dtype=np.int64) if frac_bits else m


def token_symbols(codes: np.ndarray) -> np.ndarray:
    """Token-scale codes (u8, batch-major) -> zigzag'd differences to the previous code."""
    c = np.asarray(codes, dtype=np.int64).reshape(-1)
    return zigzag(np.diff(np.concatenate([[TOKEN_START], c])))


def token_codes(symbols: np.ndarray) -> np.ndarray:
    """Inverse of :func:`token_symbols`; StreamError when a code leaves [0, 255]."""
    c = TOKEN_START + np.cumsum(unzigzag(symbols))
    if c.size and (int(c.min()) < 0 or int(c.max()) > 255):
        raise StreamError("parameter stream: token-scale code outside [0, 255]")
    return c.astype(np.uint8)


def encode_block(m: np.ndarray, tok: Optional[np.ndarray], frac_bits: int, lo_model, frac_model,
                 tok_model) -> np.ndarray:
    """One block's parameter stream: zigzag(m >> r) of its channels, then their low r bits, then
    its token-code differences."""
    hi, fr = split_offsets(m, frac_bits)
    segs = [(hi.astype(np.int32), lo_model)]
    if frac_bits:
        segs.append((fr.astype(np.int32), frac_model))
    if tok is not None:
        segs.append((token_symbols(tok).astype(np.int32), tok_model))
    return entropy.encode_stream(segs)


def decode_block(words: np.ndarray, nch: int, ntok: int, frac_bits: int, lo_model, frac_model,
                 tok_model) -> tuple[np.ndarray, Optional[np.ndarray]]:
    segs = [(nch, lo_model)] + ([(nch, frac_model)] if frac_bits else []) + ([(ntok, tok_model)] if ntok else [])
    out = entropy.decode_stream(words, segs)
    m = join_offsets(out[0], out[1] if frac_bits else None, frac_bits)
    return m, (token_codes(out[-1]) if ntok else None)


def chunk_params(c, v, models: dict) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """(lo float32 [total_channels], token codes u8 [total_tok] or None) of a v2 chunk view:
    the stored sections, or for a packed chunk its decoded parameter streams. ``models``: a
    cache table id -> constriction model (kept per container by the caller)."""
    lay = v.layout
    if not lay.packed:
        return v.lo.astype(np.float32), v.tok
    h = c.header
    p = h.packed

    def model(t: int):
        mod = models.get(t)
        if mod is None:
            mod = models[t] = entropy.model_for(h.table_freqs24(t))
        return mod

    lo = np.empty(lay.total_channels, dtype=np.float32)
    tok = np.empty(lay.total_tok, dtype=np.uint8) if lay.total_tok else None
    st = v.step.astype(np.float32)
    ends = v.param_ends.astype(np.int64)
    start = int(v.ends[-1]) if v.ends.size else 0
    for j, (_i, kvi, n) in enumerate(lay.blocks):
        nch = int(lay.nch[j])
        ntok = h.batch * n if lay.total_tok else 0
        m, t = decode_block(v.words[start:int(ends[j])], nch, ntok, p.frac_bits, model(p.lo_tables[kvi]),
                            model(p.frac_tables[kvi]) if p.frac_bits else None,
                            model(p.tok_tables[kvi]) if ntok else None)
        start = int(ends[j])
        a = int(lay.ch_off[j])
        lo[a:a + nch] = lo_values(st[int(lay.step_off[j])], m, p.frac_bits)
        if ntok:
            b = int(lay.tok_off[j])
            tok[b:b + ntok] = t
    return lo, tok


def block_histograms(m_blocks: Sequence[np.ndarray], tok_blocks: Sequence[Optional[np.ndarray]], frac_bits: int):
    """Symbol counts of the offsets (high part, low r bits) and token differences of some blocks
    (for the tables)."""
    parts = [split_offsets(m, frac_bits) for m in m_blocks]
    hi = np.bincount(np.concatenate([p[0] for p in parts])) if parts else np.zeros(0, np.int64)
    fr = np.bincount(np.concatenate([p[1] for p in parts]), minlength=1 << frac_bits) if parts else \
        np.zeros(1 << frac_bits, np.int64)
    ts = [token_symbols(t) for t in tok_blocks if t is not None]
    tk = np.bincount(np.concatenate(ts)) if ts else np.zeros(0, np.int64)
    return hi, fr, tk
