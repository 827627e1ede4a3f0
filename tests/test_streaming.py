"""Level selection (pure planner), the bandwidth estimator, and the adaptive streaming loader on
simulated links (a sleeping backend, and a token-bucket TCP proxy in front of redis-server)."""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from cachegen.store import (TEXT, BandwidthEstimator, ChunkCosts, CostModel, KVStore, MemoryBackend,
                            RedisBackend, StreamingLoader, fingerprint_from_runner, makespan, plan_stream)
from cachegen.store.netsim import ThrottledProxy, TokenBucket
from cachegen.store.planner import DEFAULT_QUALITY
from cachegen.store.testing import FakeRunner, RedisServer

MB = 1e6
SIZES = {"high": 3 * MB, "default": 2 * MB, "small": 1 * MB}
DEC = {"high": 0.1, "default": 0.1, "small": 0.1}


def chunks(n=8, recompute=10.0, sizes=SIZES, dec=DEC):
    return [ChunkCosts(dict(sizes), dict(dec), recompute) for _ in range(n)]


# ----------------------------------------------------------------------------- pure planner

def test_makespan_pipeline_and_sequential():
    assert makespan([1, 1, 1], [0.5, 0.5, 0.5]) == pytest.approx(3.5)     # network-bound
    assert makespan([0.1, 0.1], [1, 1]) == pytest.approx(2.1)             # compute-bound
    assert makespan([0, 0], [2, 2]) == pytest.approx(4)                   # all text
    assert makespan([1, 1], [1, 1], overlap=False) == pytest.approx(4)
    assert makespan([], [], start_net=1, start_comp=2) == 2


def test_fast_link_takes_the_best_level():
    p = plan_stream(chunks(), 1e9, budget_s=2.0)
    assert p.fits and p.choices == ["high"] * 8 and p.est_s <= 2.0


def test_slower_link_mixes_lower_levels_within_budget():
    p = plan_stream(chunks(), 10 * MB, budget_s=2.0)          # high = 2.4 s of transfer: too slow
    assert p.fits and p.est_s <= 2.0 + 1e-9
    assert p.choices != ["high"] * 8 and TEXT not in p.choices
    assert DEFAULT_QUALITY["default"] <= p.quality < DEFAULT_QUALITY["high"]
    # quality never gets worse as the link gets faster, and time stays within the budget
    last = -1.0
    for bw in [2, 4, 6, 8, 10, 12, 16, 20, 50, 100]:
        p = plan_stream(chunks(), bw * MB, budget_s=2.0)
        if p.fits:                                                  # (else: the fastest plan)
            assert p.quality >= last - 1e-9 and p.est_s <= 2.0 + 1e-9
            last = p.quality
    assert last == DEFAULT_QUALITY["high"]


def test_text_fallback_when_the_link_is_slow_and_compute_is_cheap():
    p = plan_stream(chunks(recompute=0.2), 1 * MB, budget_s=2.0)
    assert p.fits and p.choices.count(TEXT) >= 6
    # text is the fallback ("best level that fits, else text"): with plenty of budget, the best level
    assert plan_stream(chunks(recompute=0.2), 1 * MB, budget_s=100).choices == ["high"] * 8
    # scored as exact, text is chosen wherever it fits
    assert plan_stream(chunks(recompute=0.2), 1 * MB, budget_s=100, quality={TEXT: 1.0}).choices == [TEXT] * 8
    # text disabled: the fastest level, and the plan says it does not fit
    p = plan_stream(chunks(recompute=0.2), 1 * MB, budget_s=2.0, allow_text=False)
    assert not p.fits and p.choices == ["small"] * 8


def test_infeasible_budget_returns_fastest_plan():
    # text and fetching overlap: the fastest plan recomputes some chunks while others transfer
    p = plan_stream(chunks(recompute=1.0), 1 * MB, budget_s=0.5)
    assert not p.fits
    assert 0 < p.choices.count(TEXT) < 8
    assert p.est_s < makespan([1.0] * 8, [0.1] * 8) and p.est_s < 8.0
    assert plan_stream(chunks(recompute=1.0), 1 * MB, None).est_s == pytest.approx(p.est_s)


def test_only_allowed_levels_and_latency():
    p = plan_stream(chunks(), 1e9, budget_s=2.0, levels=["default"], allow_text=False)
    assert p.choices == ["default"] * 8
    p = plan_stream(chunks(n=4), 1e9, None, latency_s=0.5, allow_text=False)
    assert p.est_s == pytest.approx(4 * 0.5 + 4 * 3e-3 + 0.1, rel=1e-3)   # 1 ms a chunk is not worth a lower level
    with pytest.raises(ValueError):
        plan_stream([ChunkCosts({})], 1e9, 1.0, allow_text=False)


def _brute(cs, bw, budget, lat=0.0):
    opts = [list(c.sizes) + ([TEXT] if math.isfinite(c.recompute_s) else []) for c in cs]
    best_fit, fastest = None, None
    for combo in itertools.product(*opts):
        net = [0.0 if o == TEXT else lat + c.sizes[o] / bw for c, o in zip(cs, combo)]
        comp = [c.recompute_s if o == TEXT else c.decode_s.get(o, 0) for c, o in zip(cs, combo)]
        t = makespan(net, comp)
        q = np.mean([DEFAULT_QUALITY[o] for o in combo])
        if t <= budget + 1e-9 and (best_fit is None or q > best_fit[0] + 1e-12):
            best_fit = (q, t)
        if fastest is None or t < fastest:
            fastest = t
    return best_fit, fastest


def test_planner_against_brute_force():
    rng = np.random.default_rng(0)
    worse = 0
    for trial in range(60):
        n = int(rng.integers(2, 6))
        cs = []
        for _ in range(n):
            base = rng.uniform(0.5, 3) * MB
            cs.append(ChunkCosts({"high": 1.5 * base, "default": base, "small": 0.6 * base},
                                 {"high": rng.uniform(0.05, 0.2), "default": 0.1, "small": 0.08},
                                 float(rng.uniform(0.1, 2.0))))
        bw = float(rng.choice([0.5, 2, 10, 50])) * MB
        budget = float(rng.uniform(0.2, 4.0))
        best_fit, fastest = _brute(cs, bw, budget)
        p = plan_stream(cs, bw, budget)
        assert p.est_s == pytest.approx(makespan(
            [0.0 if o == TEXT else c.sizes[o] / bw for c, o in zip(cs, p.choices)],
            [c.recompute_s if o == TEXT else c.decode_s[o] for c, o in zip(cs, p.choices)]))
        if best_fit is None:
            assert not p.fits
            assert p.est_s <= fastest * 1.25                       # near the fastest possible
        else:
            assert p.fits and p.est_s <= budget + 1e-9              # finds a plan when one exists
            assert p.quality >= best_fit[0] - 0.01                  # and near the best quality
            worse += p.quality < best_fit[0] - 1e-9
    assert worse <= 20


def test_bandwidth_estimator_ewma():
    b = BandwidthEstimator(100 * MB, alpha=0.5)
    b.observe(10 * MB, 1.0)                                         # 10 MB/s measured
    assert b.Bps == pytest.approx(1 / (0.5 / 10e6 + 0.5 / 100e6))   # EWMA of seconds per byte
    for _ in range(20):
        b.observe(10 * MB, 1.0)
    assert b.Bps == pytest.approx(10 * MB, rel=1e-3)
    b.observe(100, 1.0)                                             # too small to measure bandwidth
    assert b.Bps == pytest.approx(10 * MB, rel=1e-3)
    assert b.gbps == pytest.approx(0.08, rel=1e-3)


# ----------------------------------------------------------------------------- loader

class SlowBackend(MemoryBackend):
    """A link: every get takes len/rate seconds; rate can follow a schedule by call count."""

    def __init__(self, rate_Bps):
        super().__init__()
        self.rate = rate_Bps
        self.schedule = None
        self.n_data_gets = 0

    def get(self, key):
        v = super().get(key)
        if v is not None and not key.endswith(".idx"):
            self.n_data_gets += 1
            if self.schedule:
                self.rate = self.schedule(self.n_data_gets)
            time.sleep(len(v) / self.rate)
        return v


C = 32


def _setup(rate, delay=0.0, levels=("high", "default", "small")):
    r = FakeRunner(num_layers=4, num_kv_heads=2, head_dim=16, delay_per_token_s=delay)
    be = SlowBackend(rate)
    store = KVStore(be, fingerprint_from_runner(r, "fake", chunk_tokens=C), levels=levels)
    ids = np.random.default_rng(1).integers(0, 500, 10 * C + 1)
    store.put(ids, r.prefill(ids)[1])
    r.calls.clear()
    return store, r, be, ids


def _check_kv(r, ids, kv, n, tol=0.3):
    ref = r.kv_for(ids[:n])
    for (k, v), (k2, v2) in zip(ref, kv):
        assert k2.shape[2] == n
        assert np.abs(k - np.asarray(k2)).max() < tol and np.abs(v - np.asarray(v2)).max() < 2 * tol


def test_loader_fast_link_fetches_best_level():
    store, r, be, ids = _setup(rate=1e9, delay=5e-3)                 # recompute: 160 ms a chunk
    loader = StreamingLoader(store, r, BandwidthEstimator(1e9), CostModel(recompute_s=1.0), budget_s=0.5)
    logits, kv, rep = loader.prefill(ids)
    assert rep.counts() == {"high": 10} and rep.restored_tokens == 10 * C
    assert rep.bytes == sum(c.levels["high"] for c in store.lookup(ids).chunks)
    assert r.calls == [("continue", 10 * C, 1)]                     # only the last token is computed
    _check_kv(r, ids, kv, 10 * C + 1, 0.1)


def test_loader_slow_link_recomputes_text():
    store, r, be, ids = _setup(rate=20e3, delay=1e-4)               # 20 KB/s, recompute 3 ms a chunk
    loader = StreamingLoader(store, r, BandwidthEstimator(20e3), CostModel(recompute_s=C * 1e-4), budget_s=0.5)
    t = time.perf_counter()
    kv, rep = loader.restore(ids)
    assert rep.counts().get(TEXT, 0) >= 8                           # a chunk or two may still fit on the link
    assert time.perf_counter() - t < 1.0
    _check_kv(r, ids, kv, 10 * C, 0.3)
    loader = StreamingLoader(store, r, BandwidthEstimator(20e3), CostModel(recompute_s=C * 1e-4), budget_s=0.5,
                             quality={TEXT: 1.0})                   # text scored as exact: all text
    kv, rep = loader.restore(ids)
    assert rep.counts() == {TEXT: 10}
    _check_kv(r, ids, kv, 10 * C, 1e-6)                             # recomputed = exact


def test_loader_adapts_when_bandwidth_drops():
    store, r, be, ids = _setup(rate=50e6, delay=2e-4)              # recompute ~6.4 ms / chunk
    size = store.lookup(ids).chunks[0].levels
    be.schedule = lambda n: 50e6 if n <= 3 else 100e3              # the link collapses after 3 chunks
    loader = StreamingLoader(store, r, BandwidthEstimator(50e6, alpha=0.7), CostModel(recompute_s=C * 2e-4),
                             budget_s=0.3, quality={TEXT: 0.9})     # prefer fetching while it is fast
    kv, rep = loader.restore(ids)
    used = [e.used for e in rep.events]
    assert used[:3] == ["high"] * 3
    assert used.count(TEXT) >= 3 and used[4] != "high"             # switched to recompute / smaller
    assert rep.restore_s < 0.45                                     # about the 0.3 s budget (vs 1 s+ fixed)
    assert rep.events[-1].bw_estimate_Bps < 5e6                     # it noticed
    _check_kv(r, ids, kv, 10 * C, 0.3)
    assert size["small"] < size["high"]


def test_loader_missing_and_corrupt_chunks_are_recomputed():
    store, r, be, ids = _setup(rate=1e9, levels=("default",))
    m = store.lookup(ids)
    del be.data[store.data_key(m.chunks[2].hash, "default")]        # evicted after the lookup
    k5 = store.data_key(m.chunks[5].hash, "default")                # garbage with a valid envelope
    from cachegen.store.entry import KIND_DATA, pack_entry
    be.data[k5] = pack_entry(k5, KIND_DATA, b"CGKV" + bytes(300))
    loader = StreamingLoader(store, r, BandwidthEstimator(1e9), CostModel(recompute_s=10.0), budget_s=None)
    kv, rep = loader.restore(ids)
    used = [e.used for e in rep.events]
    assert used[2] == TEXT and used[5] == TEXT and used.count("default") == 8
    assert k5 not in be.data and store.stats["corrupt"] == 1
    assert ("continue", 2 * C, C) in r.calls and ("continue", 5 * C, C) in r.calls
    _check_kv(r, ids, kv, 10 * C, 0.15)


def test_loader_nothing_stored():
    store, r, be, ids = _setup(rate=1e9)
    loader = StreamingLoader(store, r, BandwidthEstimator(1e9), CostModel(recompute_s=1.0))
    logits, kv, rep = loader.prefill(ids[::-1].copy())
    assert rep.restored_tokens == 0 and r.calls == [("prefill", 0, len(ids))]


# ----------------------------------------------------------------------------- simulated TCP link

def test_token_bucket_rate():
    b = TokenBucket(10e6, burst=65536)
    t = time.perf_counter()
    for _ in range(32):
        b.take(65536)                                               # 2 MB at 10 MB/s
    dt = time.perf_counter() - t
    assert 0.15 < dt < 0.4


def test_throttled_redis_link_and_bandwidth_estimate():
    with RedisServer() as srv, ThrottledProxy(("127.0.0.1", srv.port), rate_Bps=20e6) as px:
        r = FakeRunner(num_layers=4, num_kv_heads=4, head_dim=64)
        store = KVStore(RedisBackend(f"redis://127.0.0.1:{px.port}/0", socket_timeout=5),
                        fingerprint_from_runner(r, "fake", chunk_tokens=C), levels=("raw",))
        ids = np.random.default_rng(0).integers(0, 500, 8 * C + 1)
        store.put(ids, r.prefill(ids)[1])
        bw = BandwidthEstimator(1e9, alpha=0.5)
        loader = StreamingLoader(store, r, bw, CostModel(recompute_s=100.0), allow_text=False)
        t = time.perf_counter()
        kv, rep = loader.restore(ids)
        dt = time.perf_counter() - t
        assert rep.counts() == {"raw": 8}
        assert rep.bytes / dt == pytest.approx(20e6, rel=0.5)       # the link's speed
        assert bw.Bps == pytest.approx(20e6, rel=0.5)               # and the estimate follows it
        px.set_rate(5e6)
        t = time.perf_counter()
        loader.restore(ids)
        assert rep.bytes / (time.perf_counter() - t) == pytest.approx(5e6, rel=0.5)
        assert bw.Bps < 10e6


# ----------------------------------------------------------------------------- cost models

def test_recompute_model_grows_with_position_and_calibrates_from_two_points():
    from cachegen.store import RecomputeModel
    m = RecomputeModel.calibrate(256, 0.5, 2048, 1.3)               # 0.5 s at 0, 1.3 s after 2048
    assert m.fixed_s == pytest.approx(0.5) and m.per_ctx_token_s == pytest.approx(0.8 / 2048)
    assert m.chunk_s(0) == pytest.approx(0.5) and m.chunk_s(2048) == pytest.approx(1.3)
    assert m.chunk_s(4096) == pytest.approx(2.1)                    # linear in the context
    assert m.predict(64, 2048) == pytest.approx(1.3 / 4)            # a quarter chunk
    m.observe(256, 2048, 2.6)                                       # twice as slow (contention)
    assert m.scale == pytest.approx(1.5) and m.chunk_s(0) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        RecomputeModel.calibrate(256, 0.5, 0, 1.0)
    # the planner sees later chunks as dearer to recompute: text goes to the early chunks
    cm = CostModel(RecomputeModel(0.1, 0.4 / 256, 256))
    cs = [cm.chunk_costs({"default": 2 * MB}, pos=i * 256) for i in range(4)]
    assert [round(c.recompute_s, 3) for c in cs] == [0.1, 0.5, 0.9, 1.3]
    p = plan_stream(cs, 2 * MB, budget_s=2.2)
    assert p.fits and p.choices == [TEXT, TEXT, "default", "default"]


def test_recompute_model_measured_with_a_runner():
    from cachegen.store import RecomputeModel
    r = FakeRunner(num_layers=2, num_kv_heads=1, head_dim=8, delay_per_token_s=1e-4)
    m = RecomputeModel.measure(r, np.arange(4 * 32) % 50, chunk_tokens=32)
    assert m.fixed_s > 0 and m.chunk_s(96) >= m.chunk_s(0)


def test_decode_cost_per_byte_follows_measurements():
    cm = CostModel(1.0, decode_s={"default": 0.2, "high": 0.3}, level_bytes={"default": 1_000_000, "high": 2_000_000})
    assert cm.decode_for("default", 2_000_000) == pytest.approx(0.4)   # prior, per byte
    cm.observe_decode("default", 0.6, 1_000_000)                    # 3x slower than the prior
    assert cm.decode_for("default", 1_000_000) == pytest.approx(0.6)
    assert cm.decode_for("high", 2_000_000) == pytest.approx(0.3 * 2.0)  # unmeasured level: prior x ratio (EWMA 1->2)
    for _ in range(10):
        cm.observe_decode("default", 0.1, 1_000_000)
    assert cm.decode_for("default", 1_000_000) == pytest.approx(0.1, rel=0.01)


def test_budget_counts_the_suffix_and_raw_is_opt_in():
    cs = chunks(n=4, recompute=10.0, sizes={"raw": 8 * MB, "default": 2 * MB, "small": 1 * MB},
                dec={"raw": 0.01, "default": 0.1, "small": 0.1})
    p = plan_stream(cs, 20 * MB, budget_s=2.0)
    assert p.fits and p.est_s <= 2.0 + 1e-9
    # with a 1.2 s suffix prefill on the critical path the restore gets 0.8 s: lower levels
    p2 = plan_stream(cs, 20 * MB, budget_s=2.0, tail_s=1.2)
    assert p2.fits and 1.2 <= p2.est_s <= 2.0 + 1e-9
    assert p2.quality < p.quality
    assert not plan_stream(cs, 20 * MB, budget_s=1.0, tail_s=1.2).fits
    # raw is left out unless named
    store, r, be, ids = _setup(rate=1e9, levels=("default", "raw"))
    loader = StreamingLoader(store, r, BandwidthEstimator(1e9), CostModel(recompute_s=1.0), budget_s=5.0,
                             allow_text=False)
    assert set(loader.restore(ids)[1].counts()) == {"default"}
    loader = StreamingLoader(store, r, BandwidthEstimator(1e9), CostModel(recompute_s=1.0), budget_s=5.0,
                             levels=["raw"], allow_text=False)
    assert set(loader.restore(ids)[1].counts()) == {"raw"}
