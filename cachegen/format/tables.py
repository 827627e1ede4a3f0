"""Probability tables: stored as 16-bit counts, expanded by one exact integer rule to the
24-bit frequencies the ANS coder uses (codec_spec/FORMAT.md, "Table expansion")."""
from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class TableSet:
    """The tables a container references, expanded once per file, back to back, in uint32.

    Table j holds ``alphabet[j]`` symbols; its frequencies are ``freq[start[j]:start[j+1]]`` and
    its cdf (``alphabet[j] + 1`` entries, the last = 2**24) is ``cdf[start[j] + j : start[j+1] + j + 1]``.
    Only referenced tables are kept (ids are remapped by the parser), so memory is bounded by the
    ids and limits, not by what a hostile model section declares.
    """
    alphabet: np.ndarray      # int64 [T]
    start: np.ndarray         # int64 [T + 1]
    freq: np.ndarray          # uint32 [sum A]
    cdf: np.ndarray           # uint32 [sum A + T]
    _views: dict = field(default_factory=dict, repr=False)
    models: dict = field(default_factory=dict, repr=False)   # table -> constriction model (lazy)

    def __len__(self) -> int:
        return int(self.alphabet.size)

    @property
    def cdf_start(self) -> np.ndarray:
        return self.start[:-1] + np.arange(len(self), dtype=np.int64)

    def freqs_of(self, j: int) -> np.ndarray:
        return self.freq[self.start[j]:self.start[j + 1]]

    def cdf_of(self, j: int) -> np.ndarray:
        return self.cdf[self.start[j] + j:self.start[j + 1] + j + 1]

    def int64_lists(self) -> tuple[list, list]:
        """Per-table int64 freqs and cdfs (for code written against lists of arrays, e.g. the GPU LUT
        builder); built once, for referenced tables only."""
        if "i64" not in self._views:
            f64, c64 = self.freq.astype(np.int64), self.cdf.astype(np.int64)
            s = self.start.tolist()
            self._views["i64"] = ([f64[s[j]:s[j + 1]] for j in range(len(self))],
                                  [c64[s[j] + j:s[j + 1] + j + 1] for j in range(len(self))])
        return self._views["i64"]


def _segments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment id of each element, start of each segment) for segments of the given lengths."""
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.repeat(np.arange(lengths.size, dtype=np.int64), lengths), starts


def expand_tables(counts_flat: np.ndarray, alphabet: np.ndarray) -> TableSet:
    """Vectorized expand_counts for many tables at once (same integer rule, bit-exact).

    counts_flat: the stored counts of the tables back to back; alphabet: their sizes (each >= 1,
    each table's counts summing to >= 1: the caller has checked)."""
    a = np.asarray(alphabet, dtype=np.int64)
    c = np.asarray(counts_flat, dtype=np.int64)
    seg, starts = _segments(a)
    n = np.add.reduceat(c, starts) if a.size else np.zeros(0, np.int64)
    f = 1 + (c * (TOTAL - a)[seg]) // n[seg]
    # The remainder goes to the first symbol with the largest count of each table.
    cmax = np.maximum.reduceat(c, starts) if a.size else c
    idx = np.arange(c.size, dtype=np.int64)
    first = np.minimum.reduceat(np.where(c == cmax[seg], idx, c.size), starts) if a.size else idx
    sums = np.add.reduceat(f, starts) if a.size else n
    f[first] += TOTAL - sums
    incl = np.cumsum(f)
    within = incl - np.repeat(incl[starts] - f[starts], a) if a.size else incl
    cdf = np.zeros(c.size + a.size, dtype=np.uint32)
    pos = np.arange(c.size, dtype=np.int64) + seg + 1      # element s of table j -> cdf slot s + 1
    cdf[pos] = within
    return TableSet(alphabet=a, start=np.concatenate([starts, [c.size]]).astype(np.int64),
                    freq=f.astype(np.uint32), cdf=cdf)
