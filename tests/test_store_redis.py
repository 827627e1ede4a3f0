"""The Redis backend against a real redis-server (started here on a free loopback port).

CI installs redis-server (Debian package); without it these tests fail with a clear message,
they are never skipped.
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from cachegen.store import KVStore, RedisBackend, fingerprint_from_runner, prefill_with_reuse
from cachegen.store.streaming import CostModel, StreamingLoader
from cachegen.store.planner import BandwidthEstimator
from cachegen.store.testing import FakeRunner, RedisServer, free_port, put_concurrently

C = 16


def prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, 1000, n)


@pytest.fixture
def redis_server():
    with RedisServer() as srv:        # RuntimeError("redis-server is not installed ...") if missing
        yield srv


def make(url, **kw):
    r = FakeRunner()
    be = RedisBackend(url, socket_timeout=0.5, connect_timeout=0.3, **kw)
    return KVStore(be, fingerprint_from_runner(r, "fake", chunk_tokens=C), levels=("default", "small")), r


def test_redis_round_trip(redis_server):
    store, r = make(redis_server.url)
    ids = prompt(3 * C + 4)
    _, kv = r.prefill(ids)
    assert store.put(ids, kv) == 3
    # a second, independent client (another process would do the same) finds and loads it
    store2, _ = make(redis_server.url)
    m = store2.lookup(np.concatenate([ids, prompt(9, 5)]))
    assert m.tokens == 3 * C and set(m.chunks[0].levels) == {"default", "small"}
    kv2, n = store2.load(m, "default")
    assert n == 3 * C
    for (k, v), (k2, v2) in zip(kv, kv2):
        assert np.abs(k[:, :, :n] - k2.numpy()).max() < 0.15 and np.abs(v[:, :, :n] - v2.numpy()).max() < 0.3
    # reuse through the store
    _, _, info = prefill_with_reuse(r, store2, np.concatenate([ids, prompt(5, 1)]))
    assert info["reused_tokens"] == 3 * C
    # a corrupted value is a miss and is deleted on the server
    key = store2.data_key(m.chunks[1].hash, "default")
    raw = store2.backend.client.get("cachegen:" + key)
    store2.backend.client.set("cachegen:" + key, raw[:-3] + b"xyz")
    assert store2.get_chunk(m.chunks[1], "default") is None
    assert store2.backend.client.exists("cachegen:" + key) == 0


def test_redis_down_is_a_miss_not_a_crash(redis_server):
    store, r = make(redis_server.url, down_backoff_s=0.5)
    ids = prompt(4 * C)
    _, kv = r.prefill(ids)
    store.put(ids, kv)
    m = store.lookup(ids)
    assert m.tokens == 4 * C
    assert store.get_chunk(m.chunks[0], "default") is not None
    redis_server.kill()                                            # crash mid-run
    t = time.perf_counter()
    assert store.get_chunk(m.chunks[1], "default") is None         # miss, no exception
    assert store.lookup(ids).tokens == 0
    assert store.put(ids, kv) == 0
    store.backend.delete("whatever")
    _, kv2, info = prefill_with_reuse(r, store, ids)               # recompute path
    assert info["reused_tokens"] == 0 and len(kv2) == len(kv)
    assert time.perf_counter() - t < 5                             # no hang
    assert store.backend.stats["errors"] >= 1
    # streaming with the server gone mid-restore: the loader recomputes the chunks
    loader = StreamingLoader(store, r, BandwidthEstimator(1e9), CostModel(recompute_s=0.01))
    kv3, rep = loader.restore(ids)
    assert rep.restored_tokens == 0 and kv3 == []


def test_redis_killed_during_streaming_restore(redis_server):
    store, r = make(redis_server.url, down_backoff_s=0.5)
    ids = prompt(6 * C + 2)
    _, kv = r.prefill(ids)
    store.put(ids, kv)
    match = store.lookup(ids)
    assert match.tokens == 6 * C
    # kill the server after the second chunk has been fetched
    orig_fetch = store.fetch
    n_fetch = [0]

    def fetch(ref, level):
        n_fetch[0] += 1
        if n_fetch[0] == 3:
            redis_server.kill()
        return orig_fetch(ref, level)
    store.fetch = fetch
    loader = StreamingLoader(store, r, BandwidthEstimator(1e9), CostModel(recompute_s=1.0),
                             levels=["default"], allow_text=False)
    t = time.perf_counter()
    kv2, rep = loader.restore(ids)
    assert time.perf_counter() - t < 10
    assert rep.restored_tokens == 6 * C
    used = [e.used for e in rep.events]
    assert used[:2] == ["default", "default"] and set(used[2:]) == {"text"}
    ref = r.kv_for(ids[:6 * C])
    for (k, v), (k2, v2) in zip(ref, kv2):
        assert np.abs(k - k2.numpy()).max() < 0.15


def test_redis_unreachable_is_fast():
    store, r = make(f"redis://127.0.0.1:{free_port()}/0")
    t = time.perf_counter()
    for _ in range(20):
        assert store.lookup(prompt(2 * C)).tokens == 0
    assert time.perf_counter() - t < 3


def test_redis_eviction_allkeys_lru():
    # Redis' LRU clock ticks once a second and its LRU is sampled, so the phases are a second
    # apart: old prompts, then one of them read again, then enough new prompts to force eviction.
    with RedisServer(maxmemory="5mb", policy="allkeys-lru", extra_args=["--maxmemory-samples", "10"]) as srv:
        r = FakeRunner(num_layers=4, num_kv_heads=4, head_dim=64)  # raw chunks of 64 KB
        store = KVStore(RedisBackend(srv.url, socket_timeout=0.5), fingerprint_from_runner(r, "fake", chunk_tokens=C),
                        levels=("raw",))
        old = [prompt(8 * C, s) for s in range(6)]                  # 0.5 MB each
        new = [prompt(8 * C, 100 + s) for s in range(3)]      # about 6 prompts fit
        for p in old:
            store.put(p, r.prefill(p)[1])
        assert all(store.lookup(p).tokens == 8 * C for p in old)
        time.sleep(2.2)
        kv, n = store.load(store.lookup(old[0]), "raw")             # touch old[0]
        assert n == 8 * C
        time.sleep(1.1)
        for p in new:
            store.put(p, r.prefill(p)[1])
        assert store.backend.client.info("stats")["evicted_keys"] > 0
        served = {}
        for name, p in [("old0", old[0])] + [(f"old{i}", old[i]) for i in range(1, 6)] + [("new5", new[-1])]:
            m = store.lookup(p)
            kv, n = store.load(m)                                   # evicted = miss or shorter prefix
            assert n <= m.tokens
            if n:
                assert np.abs(r.kv_for(p[:n])[0][0] - kv[0][0].numpy()).max() < 0.05
            served[name] = n
        assert served["old0"] == 8 * C and served["new5"] == 8 * C, served      # recently used survive
        assert sum(served[f"old{i}"] for i in range(1, 6)) < 5 * 8 * C, served  # least recently used went
        # the streaming loader recomputes a chunk whose data was evicted after the lookup
        m = store.lookup(new[-1])
        store.backend.client.delete("cachegen:" + store.data_key(m.chunks[3].hash, "raw"))
        loader = StreamingLoader(store, r, BandwidthEstimator(1e9), CostModel(recompute_s=1.0), allow_text=False)
        kv, rep = loader.restore(new[-1])
        assert [e.used for e in rep.events][3] == "text" and rep.restored_tokens == 7 * C  # all but the last token


def test_redis_concurrent_writers_adding_different_levels_merge_the_index(redis_server):

    class SlowIndex(RedisBackend):
        def get_many(self, keys):
            v = super().get_many(keys)
            if any(k.endswith(".idx") for k in keys):
                time.sleep(0.02)
            return v

    r = FakeRunner()
    fp = fingerprint_from_runner(r, "fake", chunk_tokens=C)
    stores = [KVStore(SlowIndex(redis_server.url, socket_timeout=2), fp, levels=(lv,)) for lv in ("default", "small")]
    ids = prompt(4 * C + 1)
    _, kv = r.prefill(ids)
    put_concurrently(stores, ids, kv)
    m = KVStore(RedisBackend(redis_server.url), fp).lookup(ids)
    assert len(m) == 4 and all(set(c.levels) == {"default", "small"} for c in m.chunks)
