"""Entropy-coding layer: exact tables, symbol-exact rANS round trips, lock-step == constriction."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cachegen.codec import entropy
from cachegen.format.tables import TOTAL, cdf_of, expand_counts, TOKEN_SCALES, TOKEN_SCALE_FRACTIONS
from cachegen.errors import FormatError, StreamError


def test_expand_counts_is_exact_and_keeps_every_symbol():
    rng = np.random.default_rng(0)
    for a in (1, 2, 16, 511, 2047):
        c = rng.integers(0, 65536, a).astype(np.uint16)
        c[rng.integers(0, a)] = 1
        f = expand_counts(c)
        assert f.sum() == TOTAL and f.min() >= 1 and f.size == a
    with pytest.raises(FormatError):
        expand_counts(np.zeros(5, np.uint16))
    with pytest.raises(FormatError):
        expand_counts(np.ones(2048, np.uint16))


def test_constriction_uses_our_integer_table_exactly():
    """One-symbol probe: encoding symbol s from state 0 leaves state cdf[s] (see BACKGROUND)."""
    f = expand_counts(np.array([5, 0, 1000, 3, 65535, 7], np.uint16))
    cdf = cdf_of(f)
    model = entropy.model_for(f)
    for s in range(f.size):
        words = entropy.encode_stream([(np.array([s], np.int32), model)])
        state = 0
        for w in words[::-1]:
            state = (state << 32) | int(w)
        assert state == cdf[s]


def _random_case(rng, n_streams):
    tables = [expand_counts((rng.integers(0, 256, rng.integers(2, 40)) ** 2 + 1).astype(np.uint16))
              for _ in range(5)]
    models = [entropy.model_for(f) for f in tables]
    streams, plans = [], []
    for _ in range(n_streams):
        segs = []
        for _ in range(rng.integers(1, 4)):
            t = int(rng.integers(0, len(tables)))
            p = tables[t] / TOTAL
            segs.append((rng.choice(p.size, size=int(rng.integers(0, 300)), p=p).astype(np.int32), t))
        streams.append(entropy.encode_stream([(s, models[t]) for s, t in segs]))
        plans.append(segs)
    return tables, models, streams, plans


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_symbol_exact_round_trip_reference_and_lockstep(seed):
    rng = np.random.default_rng(seed)
    tables, models, streams, plans = _random_case(rng, 6)
    for words, segs in zip(streams, plans):
        out = entropy.decode_stream(words, [(s.size, models[t]) for s, t in segs])
        for o, (s, _) in zip(out, segs):
            assert np.array_equal(o, s)
    F, C, A = entropy.padded_tables(tables, [cdf_of(f) for f in tables])
    lengths = np.array([w.size for w in streams], np.int64)
    words = np.concatenate(streams) if lengths.sum() else np.zeros(0, np.uint32)
    sched_len = [sum(s.size for s, _ in segs) for segs in plans]
    sched = np.zeros((len(plans), max(max(sched_len), 1)), np.int32)
    for r, segs in enumerate(plans):
        sched[r, :sched_len[r]] = np.concatenate([np.full(s.size, t) for s, t in segs]) if sched_len[r] else []
    syms = entropy.lockstep_decode(words, np.cumsum(lengths), lengths, sched, np.array(sched_len), F, C, A)
    for r, segs in enumerate(plans):
        want = np.concatenate([s for s, _ in segs]) if sched_len[r] else np.zeros(0, np.int32)
        assert np.array_equal(syms[r, :sched_len[r]], want)


def test_truncated_or_extended_streams_are_rejected():
    rng = np.random.default_rng(3)
    tables, models, streams, plans = _random_case(rng, 3)
    words, segs = next((w, s) for w, s in zip(streams, plans) if w.size >= 3)
    spec = [(s.size, models[t]) for s, t in segs]
    for bad in (words[1:], np.concatenate([[123], words]), np.concatenate([words, [0]])):
        with pytest.raises(StreamError):
            entropy.decode_stream(bad, spec)


def test_token_scale_table_is_exact_powers():
    assert TOKEN_SCALES[128] == 1.0 and TOKEN_SCALES[136] == 2.0 and TOKEN_SCALES[120] == 0.5
    assert np.all(np.diff(TOKEN_SCALES) > 0)
    frac = np.array(TOKEN_SCALE_FRACTIONS, np.uint32).view(np.float32)
    assert np.array_equal(frac, np.float32(2.0) ** (np.arange(8, dtype=np.float64) / 8).astype(np.float32))


def test_dictionary_prefers_fewer_tables_when_channels_agree():
    rng = np.random.default_rng(1)
    p = np.exp(-np.abs(np.arange(31) - 15) / 3.0)
    p /= p.sum()
    H = np.stack([rng.multinomial(2000, p) for _ in range(64)])
    counts, assign = entropy.build_dictionary(H, 16)
    assert len(counts) <= 2 and assign.max() < len(counts)
    q = np.exp(-np.abs(np.arange(31) - 3) / 1.0)
    q /= q.sum()
    H2 = np.concatenate([H, np.stack([rng.multinomial(2000, q) for _ in range(64)])])
    counts2, assign2 = entropy.build_dictionary(H2, 16)
    assert len(counts2) >= 2 and len(set(assign2[:64]) & set(assign2[64:])) == 0
