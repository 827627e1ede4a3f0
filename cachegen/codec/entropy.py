"""Entropy coding: probability-table dictionary and constriction's rANS coder.

Stream format (codec_spec/FORMAT.md, "ANS streams") is constriction 0.5's `AnsCoder`: 32-bit
words, 64-bit state, 24-bit precision. `lockstep_decode` re-implements the decoder in numpy one
symbol-step at a time over all streams at once, exactly as the GPU kernel does; it is the
executable reference for cachegen.gpu.
"""
from __future__ import annotations

from typing import Sequence

import constriction
import numpy as np

from ..errors import StreamError
from ..format.tables import PRECISION_BITS, TOTAL, counts_from_probabilities, expand_counts

_MASK = np.uint64(TOTAL - 1)
_PREC = np.uint64(PRECISION_BITS)
_WORD = np.uint64(32)
_LOW = np.uint64(1 << 32)


def model_for(freqs: np.ndarray):
    """A constriction model whose CDF is exactly cumsum(freqs) (see BACKGROUND: pass f - 1)."""
    return constriction.stream.model.Categorical(freqs.astype(np.float64) - 1.0, perfect=False)


# ------------------------------------------------------------------------------ dictionary

def _cluster_sums(h: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    """Sum of the rows of h in each cluster (a segmented sum: no BLAS, no scatter-add)."""
    order = np.argsort(assign, kind="stable")
    counts = np.bincount(assign, minlength=k)
    out = np.zeros((k, h.shape[1]))
    nz = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[nz]
    out[nz] = np.add.reduceat(h[order], starts, axis=0)
    return out


def _lloyd(h: np.ndarray, k: int, iterations: int) -> tuple[np.ndarray, float]:
    """Cluster histograms [N, A] into k groups minimising total cross-entropy (bits)."""
    n, a = h.shape
    tot = h.sum(axis=1)
    idx = np.arange(a, dtype=np.float64)
    w = h / np.maximum(tot, 1)[:, None]
    mean = w @ idx
    spread = np.sqrt(np.maximum(w @ (idx ** 2) - mean ** 2, 0))
    # Initial clusters: quantiles of each channel's spread, then of its mean.
    order = np.lexsort((mean, spread))
    assign = np.empty(n, dtype=np.int64)
    assign[order] = (np.arange(n) * k) // n
    for _ in range(iterations):
        sums = _cluster_sums(h, assign, k)
        sums = sums[sums.sum(axis=1) > 0]
        probs = (sums + 1e-3) / (sums + 1e-3).sum(axis=1, keepdims=True)
        ce = h @ (-np.log2(probs)).T
        new = np.argmin(ce, axis=1)
        k = sums.shape[0]
        if np.array_equal(new, assign):
            break
        assign = new
    return assign, float(ce[np.arange(n), assign].sum())


def build_dictionary(hists: np.ndarray, max_tables: int, iterations: int = 4) -> tuple[list[np.ndarray], np.ndarray]:
    """Cluster channel histograms [N, A] into tables (Lloyd on cross-entropy), choosing the
    table count that minimises coded bits + stored table bits.

    Returns (stored uint16 counts per table, table index per channel). Encoder-only heuristic:
    the decoder just reads the tables it is given.
    """
    h = hists.astype(np.float64)
    n, a = h.shape
    table_bits = 6.0 * a + 16  # rough cost of one stored table after zstd
    best = None
    k = 1
    while True:
        kk = min(k, n, max_tables)
        assign, bits = _lloyd(h, kk, iterations)
        cost = bits + table_bits * (int(assign.max()) + 1)
        if best is None or cost < best[0]:
            best = (cost, assign)
        elif cost > best[0] * 1.001:
            break
        if kk >= min(n, max_tables):
            break
        k *= 2
    assign = best[1]
    k = int(assign.max()) + 1
    sums = _cluster_sums(h, assign, k)
    sums = sums[sums.sum(axis=1) > 0]
    counts = [counts_from_probabilities(s / s.sum()) for s in sums]
    # Final assignment against the exact tables the decoder will use.
    exact = np.stack([expand_counts(c) for c in counts]).astype(np.float64) / TOTAL
    assign = np.argmin(h @ (-np.log2(exact)).T, axis=1)
    used = np.unique(assign)
    remap = np.full(len(counts), -1)
    remap[used] = np.arange(used.size)
    return [counts[i] for i in used], remap[assign]


# ------------------------------------------------------------------------------- encoding

def encode_stream(segments: Sequence[tuple[np.ndarray, object]]) -> np.ndarray:
    """Encode (symbols, model) segments into one stream that decodes them in order."""
    coder = constriction.stream.stack.AnsCoder()
    for symbols, model in reversed(segments):
        if symbols.size:
            coder.encode_reverse(symbols, model)
    return coder.get_compressed()


# ------------------------------------------------------------------------ reference decode

def decode_stream(words: np.ndarray, segments: Sequence[tuple[int, object]]) -> list[np.ndarray]:
    """Decode (count, model) segments from one stream with constriction; check it ends cleanly."""
    try:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(words, dtype=np.uint32))
        out = [coder.decode(model, n) if n else np.empty(0, dtype=np.int32) for n, model in segments]
        clean = coder.is_empty()
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except BaseException as e:  # constriction may raise or panic (PanicException) on bad data
        raise StreamError(f"ANS stream does not decode: {e}") from None
    if not clean:
        raise StreamError("ANS stream did not end in the initial state (corrupt or truncated)")
    return out


def lockstep_decode(words: np.ndarray, ends: np.ndarray, lengths: np.ndarray,
                    table_schedule: np.ndarray, n_symbols: np.ndarray,
                    freqs: np.ndarray, cdfs: np.ndarray, alphabet: np.ndarray) -> np.ndarray:
    """Decode all streams together, one symbol-step at a time (the GPU kernel's algorithm).

    words: all stream words; stream i occupies words[ends[i]-lengths[i] : ends[i]].
    table_schedule: int [n_streams, max_steps], the table used at each step (ignored past
    n_symbols[i]). freqs/cdfs: [n_tables, Amax(+1)] padded. Returns symbols [n_streams, max_steps].
    """
    n_streams, steps = table_schedule.shape
    words64 = words.astype(np.uint64)
    start = (ends - lengths).astype(np.int64)
    ptr = ends.astype(np.int64).copy()          # next word to read is ptr-1
    x = np.zeros(n_streams, dtype=np.uint64)
    nonempty = lengths > 0
    if nonempty.any() and (words[ends[nonempty] - 1] == 0).any():
        raise StreamError("ANS stream ends in a zero word (not a canonical stream)")
    for _ in range(2):                           # initial state: up to two words
        need = (x < _LOW) & (ptr > start)
        if need.any():
            x[need] = (x[need] << _WORD) | words64[ptr[need] - 1]
            ptr[need] -= 1
    out = np.zeros((n_streams, steps), dtype=np.int32)
    amax = freqs.shape[1]
    search_iters = int(np.ceil(np.log2(max(amax, 2)))) + 1
    for s in range(steps):
        active = s < n_symbols
        t = table_schedule[:, s]
        q = (x & _MASK).astype(np.int64)
        lo = np.zeros(n_streams, dtype=np.int64)      # invariant cdf[lo] <= q < cdf[hi]
        hi = alphabet[t].astype(np.int64)
        for _ in range(search_iters):
            mid = (lo + hi) >> 1
            go = cdfs[t, mid] <= q
            lo = np.where(go & (mid > lo), mid, lo)
            hi = np.where(go, hi, mid)
        sym = lo
        f = freqs[t, sym].astype(np.uint64)
        c = cdfs[t, sym].astype(np.uint64)
        nx = (x >> _PREC) * f + (q.astype(np.uint64) - c)
        x = np.where(active, nx, x)
        out[:, s] = np.where(active, sym, 0)
        need = active & (x < _LOW) & (ptr > start)
        if need.any():
            x[need] = (x[need] << _WORD) | words64[ptr[need] - 1]
            ptr[need] -= 1
    bad = (x != 0) | (ptr != start)
    if bad.any():
        raise StreamError(f"{int(bad.sum())} ANS stream(s) did not end in the initial state")
    return out


def padded_tables(freqs: Sequence[np.ndarray], cdfs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    amax = max(f.size for f in freqs)
    F = np.zeros((len(freqs), amax), dtype=np.int64)
    C = np.full((len(freqs), amax + 1), TOTAL, dtype=np.int64)
    A = np.zeros(len(freqs), dtype=np.int64)
    for i, (f, c) in enumerate(zip(freqs, cdfs)):
        F[i, :f.size] = f
        C[i, :c.size] = c
        A[i] = f.size
    return F, C, A


# -------------------------------------------------------------- lock-step over flat tables

def table_keys(tables) -> np.ndarray:
    """Monotone search keys over all tables' cdfs: table j's cdf entries offset by j * 2**25, so
    one searchsorted finds, for (table t, quantile q), the s with cdf_t[s] <= q < cdf_t[s+1]."""
    keys = tables.models.get("_keys")
    if keys is None:
        n = tables.cdf.size
        tab = np.repeat(np.arange(len(tables), dtype=np.int64), tables.alphabet + 1)
        keys = tables.models["_keys"] = (tab << np.int64(PRECISION_BITS + 1)) + tables.cdf.astype(np.int64)
        assert keys.size == n
    return keys


def lockstep_decode_flat(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                         n_symbols: np.ndarray, sym_offset: np.ndarray, schedule: np.ndarray,
                         tables) -> np.ndarray:
    """The GPU kernel's algorithm over flat data: every stream advances one symbol per step.

    Stream i owns words[starts[i] : starts[i] + lengths[i]] and decodes n_symbols[i] symbols
    into out[sym_offset[i] : + n_symbols[i]], symbol s with table schedule[sym_offset[i] + s]
    (an index into ``tables``, a TableSet). Streams are ordered longest first, so each step works
    on a prefix of them: work is O(symbols) plus O(1) numpy calls per step (the caller bounds the
    number of steps). Returns int16 symbols (alphabets are <= 2047).
    """
    order = np.argsort(-np.asarray(n_symbols, dtype=np.int64), kind="stable")
    nsym = np.asarray(n_symbols, dtype=np.int64)[order]
    start = np.asarray(starts, dtype=np.int64)[order]
    ptr = start + np.asarray(lengths, dtype=np.int64)[order]   # next word to read is ptr-1
    soff = np.asarray(sym_offset, dtype=np.int64)[order]
    total = int(nsym.sum())
    out = np.zeros(total, dtype=np.int16)
    n = nsym.size
    if n == 0:
        return out
    w64 = np.asarray(words).astype(np.uint64)
    nonempty = ptr > start
    if nonempty.any() and (w64[ptr[nonempty] - 1] == 0).any():
        raise StreamError("ANS stream ends in a zero word (not a canonical stream)")
    x = np.zeros(n, dtype=np.uint64)
    for _ in range(2):                           # initial state: up to two words
        need = np.flatnonzero((x < _LOW) & (ptr > start))
        if need.size:
            x[need] = (x[need] << _WORD) | w64[ptr[need] - 1]
            ptr[need] -= 1
    keys = table_keys(tables)
    cbase = tables.cdf_start
    cdf, freq = tables.cdf, tables.freq
    shift = np.int64(PRECISION_BITS + 1)
    steps = int(nsym[0])
    # active[s] = streams with more than s symbols (nsym is descending: a prefix of them).
    active = np.searchsorted(-nsym, -np.arange(steps, dtype=np.int64), side="left")
    for s in range(steps):
        na = int(active[s])
        xs = x[:na]
        at = soff[:na] + s
        t = schedule[at].astype(np.int64)
        q = (xs & _MASK).astype(np.int64)
        pos = np.searchsorted(keys, (t << shift) + q, side="right") - 1
        sym = pos - cbase[t]
        f = freq[pos - t].astype(np.uint64)              # freq index = cdf index - table index
        nx = (xs >> _PREC) * f + (q - cdf[pos].astype(np.int64)).astype(np.uint64)
        x[:na] = nx
        out[at] = sym
        need = np.flatnonzero((nx < _LOW) & (ptr[:na] > start[:na]))
        if need.size:
            x[need] = (x[need] << _WORD) | w64[ptr[need] - 1]
            ptr[need] -= 1
    bad = (x != 0) | (ptr != start)
    if bad.any():
        raise StreamError(f"{int(bad.sum())} ANS stream(s) did not end in the initial state")
    return out
