"""Probability tables: stored as 16-bit counts, expanded by one exact integer rule to the
24-bit frequencies the ANS coder uses (codec_spec/FORMAT.md, "Table expansion")."""
from __future__ import annotations

import numpy as np

from ..errors import FormatError

PRECISION_BITS = 24
TOTAL = 1 << PRECISION_BITS
MAX_ALPHABET = 2047  # deltas of 10-bit symbols: 2 * 1024 - 1


def expand_counts(counts: np.ndarray) -> np.ndarray:
    """Stored counts (uint16, any sum >= 1) -> frequencies f >= 1 with sum(f) == 2**24.

    f_s = 1 + counts_s * (2**24 - A) // N, then the remainder goes to the first symbol with the
    largest count. Pure integer arithmetic: every decoder (CPU, numpy, GPU) gets the same table.
    """
    c = np.asarray(counts, dtype=np.int64)
    a = c.size
    if not 1 <= a <= MAX_ALPHABET:
        raise FormatError(f"table alphabet size {a} outside [1, {MAX_ALPHABET}]")
    n = int(c.sum())
    if n < 1:
        raise FormatError("probability table has all-zero counts")
    f = 1 + (c * (TOTAL - a)) // n
    f[int(np.argmax(c))] += TOTAL - int(f.sum())
    return f


def cdf_of(freqs: np.ndarray) -> np.ndarray:
    """Left cumulative frequencies with a final TOTAL entry: cdf[s] <= q < cdf[s+1] selects s."""
    out = np.zeros(freqs.size + 1, dtype=np.int64)
    np.cumsum(freqs, out=out[1:])
    return out


def counts_from_probabilities(p: np.ndarray) -> np.ndarray:
    """Encoder helper: scale a probability vector to uint16 counts (largest = 65535)."""
    p = np.asarray(p, dtype=np.float64)
    m = p.max()
    if not np.isfinite(m) or m <= 0:
        return np.ones(p.size, dtype=np.uint16)
    return np.clip(np.rint(p / m * 65535.0), 0, 65535).astype(np.uint16)


# Per-token scales (token_scaling = 1): an 8-bit exponent code e stands for 2**((e - 128) / 8).
# The eight fractional powers are fixed fp32 bit patterns, so every decoder builds the same table.
TOKEN_SCALE_FRACTIONS = (0x3F800000, 0x3F8B95C2, 0x3F9837F0, 0x3FA5FED7,
                         0x3FB504F3, 0x3FC5672A, 0x3FD744FD, 0x3FEAC0C7)


def token_scale_table() -> np.ndarray:
    """float32[256]: scale for each exponent code (exact: fraction times a power of two)."""
    frac = np.array(TOKEN_SCALE_FRACTIONS, dtype=np.uint32).view(np.float32)
    e = np.arange(256) - 128
    return np.ldexp(frac[e % 8], e // 8).astype(np.float32)


TOKEN_SCALES = token_scale_table()
