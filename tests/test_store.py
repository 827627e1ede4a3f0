"""cachegen.store: chained keys, prefix matching, directory backend (atomicity, concurrency,
corruption, LRU eviction), reuse with a runner."""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import cachegen
from cachegen.store import (DirectoryBackend, Fingerprint, KVStore, MemoryBackend, chunk_hashes,
                            fingerprint_from_kv, fingerprint_from_runner, prefill_with_reuse)
from cachegen.store.entry import HEADER_BYTES, KIND_DATA, CorruptEntryError, pack_entry, unpack_entry
from cachegen.store.testing import FakeRunner, put_concurrently

C = 16  # chunk tokens in these tests (the codec handles any chunk length)


def make_store(backend, levels=("default",), chunk=C, model="fake"):
    r = FakeRunner()
    return KVStore(backend, fingerprint_from_runner(r, model, chunk_tokens=chunk), levels=levels), r


def prompt(n, seed=0):
    return np.random.default_rng(seed).integers(0, 1000, n)


def kv_close(a, b, tol):
    assert len(a) == len(b)
    for (ka, va), (kb, vb) in zip(a, b):
        ka, va, kb, vb = (torch.as_tensor(np.asarray(x, dtype=np.float32)) for x in (ka, va, kb, vb))
        assert ka.shape == kb.shape and va.shape == vb.shape
        assert float((ka - kb).abs().max()) <= tol and float((va - vb).abs().max()) <= tol


# ----------------------------------------------------------------------------- keys

def test_chunk_hashes_are_chained_and_fingerprinted():
    fp = Fingerprint("m", [(2, 8, 2, 8)] * 2, "float32", chunk_tokens=4)
    t = np.arange(13)
    h = chunk_hashes(fp, t)
    assert len(h) == 3 and len(set(h)) == 3                       # the partial tail has no key
    assert chunk_hashes(fp, t[:8]) == h[:2]                       # a prefix has the same keys
    t2 = t.copy()
    t2[1] = 99                                                    # change chunk 0 ...
    h2 = chunk_hashes(fp, t2)
    assert all(a != b for a, b in zip(h, h2))                     # ... changes every later key
    t3 = t.copy()
    t3[9] = 99                                                    # change chunk 2 only
    assert chunk_hashes(fp, t3)[:2] == h[:2] and chunk_hashes(fp, t3)[2] != h[2]
    for other in (Fingerprint("m2", [(2, 8, 2, 8)] * 2, "float32", chunk_tokens=4),
                  Fingerprint("m", [(2, 8, 2, 8)] * 3, "float32", chunk_tokens=4),
                  Fingerprint("m", [(2, 8, 2, 8)] * 2, "float16", chunk_tokens=4),
                  Fingerprint("m", [(2, 8, 2, 8)] * 2, "float32", format_version=99, chunk_tokens=4)):
        assert chunk_hashes(other, t)[0] != h[0]
    assert chunk_hashes(fp, torch.tensor(t)[None]) == h           # torch [1, T] works too
    kv = FakeRunner().kv_for(t)
    assert fingerprint_from_kv(kv, "fake", 4) == fingerprint_from_runner(FakeRunner(), "fake", 4)


# ----------------------------------------------------------------------------- matching

@pytest.mark.parametrize("backend", ["memory", "dir"])
def test_prefix_matching_full_partial_none_divergent(tmp_path, backend):
    be = MemoryBackend() if backend == "memory" else DirectoryBackend(tmp_path / "kv")
    store, r = make_store(be)
    ids = prompt(5 * C + 3)
    _, kv = r.prefill(ids)
    assert store.put(ids, kv) == 5                                 # 5 full chunks, tail not stored
    assert store.put(ids, kv) == 0                                 # already there
    # full: the same prompt, or a longer one
    assert store.lookup(ids).tokens == 5 * C
    assert store.lookup(np.concatenate([ids, prompt(40, 1)])).tokens == 5 * C
    # partial: a prompt sharing 2.5 chunks then diverging
    div = ids.copy()
    div[2 * C + 7] += 1
    m = store.lookup(div)
    assert m.tokens == 2 * C and [c.index for c in m.chunks] == [0, 1]
    # divergent at token 0 / unrelated: none
    assert store.lookup(prompt(5 * C, 7)).tokens == 0
    d0 = ids.copy()
    d0[0] += 1
    assert store.lookup(d0).tokens == 0
    # shorter than a chunk; max_tokens caps the match
    assert store.lookup(ids[:C - 1]).tokens == 0
    assert store.lookup(ids, max_tokens=3 * C + 5).tokens == 3 * C
    # another model never matches
    other = KVStore(be, fingerprint_from_runner(r, "other-model", chunk_tokens=C))
    assert other.lookup(ids).tokens == 0
    # the loaded prefix equals the original cache (lossy codec: small error)
    kv2, n = store.load(store.lookup(div))
    assert n == 2 * C
    kv_close(kv2, [(k[:, :, :n], v[:, :, :n]) for k, v in kv], 0.15)


def test_levels_and_raw(tmp_path):
    store, r = make_store(DirectoryBackend(tmp_path), levels=("high", "small", "raw", "lossless"))
    ids = prompt(2 * C)
    _, kv = r.prefill(ids)
    store.put(ids, kv)
    m = store.lookup(ids)
    assert set(m.chunks[0].levels) == {"high", "small", "raw", "lossless"}
    sizes = m.chunks[0].levels
    assert sizes["small"] < sizes["high"] < sizes["lossless"]
    ref = [(k[:, :, :C], v[:, :, :C]) for k, v in kv]
    kv_close(store.get_chunk(m.chunks[0], "lossless"), ref, 0.0)
    kv_close(store.get_chunk(m.chunks[0], "raw"), ref, 2e-3)      # fp16
    kv_close(store.get_chunk(m.chunks[0], "high"), ref, 0.06)
    kv_close(store.get_chunk(m.chunks[0], "small"), ref, 0.3)
    # adding a level later merges into the chunk's index
    store.put(ids, kv, levels=["default"])
    assert set(store.lookup(ids).chunks[0].levels) == {"high", "small", "raw", "lossless", "default"}
    # load with a preference list falls through to what is stored
    _, n = store.load(m, ["nope", "small"])
    assert n == 2 * C


def test_prefill_with_reuse_runs_only_the_rest(tmp_path):
    store, r = make_store(DirectoryBackend(tmp_path), levels=("lossless",))
    ids = prompt(4 * C + 5)
    logits1, kv1, info1 = prefill_with_reuse(r, store, ids, level="lossless")
    assert info1["reused_tokens"] == 0 and info1["store"] == "background"
    assert info1["store_future"].result(timeout=60) == 4           # stored off the TTFT path
    assert r.calls[-1] == ("prefill", 0, 4 * C + 5)
    # a follow-up turn: same document + a new question
    ids2 = np.concatenate([ids, prompt(20, 3)])
    logits2, kv2, info2 = prefill_with_reuse(r, store, ids2, level="lossless")
    assert info2["reused_tokens"] == 4 * C
    assert r.calls[-1] == ("continue", 4 * C, len(ids2) - 4 * C)
    ref_logits, ref_kv = FakeRunner().prefill(ids2)
    np.testing.assert_allclose(logits2[0, -1], ref_logits[0, -1], atol=1e-5)
    kv_close(kv2, ref_kv, 0.0)
    assert info2["store_future"].result(timeout=60) == 1          # chunk 4 is now complete
    # an exactly chunk-aligned, fully stored prompt still runs its last chunk (logits needed)
    ids3 = ids2[:5 * C]
    _, _, info3 = prefill_with_reuse(r, store, ids3, level="lossless")
    assert info3["reused_tokens"] == 4 * C and r.calls[-1] == ("continue", 4 * C, C)


# ----------------------------------------------------------------------------- corruption

def _data_files(root):
    return sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(".idx"))


def test_entry_header_checks():
    e = pack_entry("k1", KIND_DATA, b"payload")
    assert bytes(unpack_entry("k1", e, KIND_DATA)) == b"payload"
    for bad, key in [(e[:10], "k1"), (b"XXXX" + e[4:], "k1"), (e, "k2"), (e[:-1], "k1"),
                     (e[:-1] + b"X", "k1"), (e + b"\0", "k1")]:
        with pytest.raises(CorruptEntryError):
            unpack_entry(key, bad, KIND_DATA)
    assert issubclass(CorruptEntryError, cachegen.CacheGenError)


def test_corrupt_entries_are_misses_and_removed(tmp_path, caplog):
    root = tmp_path / "kv"
    store, r = make_store(DirectoryBackend(root), levels=("default",))
    ids = prompt(4 * C)
    _, kv = r.prefill(ids)
    store.put(ids, kv)
    m = store.lookup(ids)
    files = {p.name: p for p in _data_files(root)}
    keys = [store.data_key(c.hash, "default") for c in m.chunks]
    # chunk 0: a flipped payload byte (checksum), chunk 1: truncated, chunk 2: valid header and
    # checksum around garbage (the codec must reject it), chunk 3: a copy of chunk 0's entry
    p0 = files[keys[0]]
    b = bytearray(p0.read_bytes())
    b[HEADER_BYTES + 100] ^= 0x40
    good0 = p0.read_bytes()
    p0.write_bytes(bytes(b))
    p1 = files[keys[1]]
    p1.write_bytes(p1.read_bytes()[:-7])
    files[keys[2]].write_bytes(pack_entry(keys[2], KIND_DATA, b"CGKV" + os.urandom(500)))
    files[keys[3]].write_bytes(good0)
    for ref in m.chunks:
        assert store.get_chunk(ref, "default") is None
    assert store.stats["corrupt"] == 4
    assert not any(files[k].exists() for k in keys)                # removed, never served again
    kv2, n = store.load(store.lookup(ids))
    assert n == 0 and kv2 == []
    # a corrupt index entry ends the match there (and is removed)
    store.put(ids, kv)
    idx = root / store.index_key(m.chunks[2].hash)[:2] / store.index_key(m.chunks[2].hash)
    idx.write_bytes(b"garbage")
    assert store.lookup(ids).tokens == 2 * C and not idx.exists()


# ----------------------------------------------------------------------------- eviction

def test_directory_lru_eviction(tmp_path):
    be = DirectoryBackend(tmp_path / "kv")
    be.put("aa", b"x" * 1000)
    be.put("bb", b"x" * 1000)
    be.put("cc", b"x" * 1000)
    be.put("dd", b"x" * 1000)
    old = time.time() - 100
    for i, k in enumerate(["aa", "bb", "cc", "dd"]):
        os.utime(be.path(k), (old + i, old + i))
    assert be.get("aa") is not None                                 # touch: aa is now the newest
    be.max_bytes = 2500
    be.low_water = 1.0
    be.evict()
    assert be.get("bb") is None and be.get("cc") is None            # the two least recently used
    assert be.get("aa") is not None and be.get("dd") is not None
    assert be.total_bytes() <= 2500 and be.stats["evicted"] == 2


def test_store_full_keeps_recent_prompts(tmp_path):
    store, r = make_store(DirectoryBackend(tmp_path / "kv", max_bytes=60_000), levels=("default",))
    prompts = [prompt(4 * C, s) for s in range(12)]
    for p in prompts:
        store.put(p, r.prefill(p)[1])
        time.sleep(0.01)
    assert store.backend.total_bytes() <= 60_000
    assert store.lookup(prompts[-1]).tokens == 4 * C                # the newest survives whole
    assert store.lookup(prompts[0]).tokens == 0                     # the oldest went first
    # whatever survives of an old prompt is a consistent prefix or nothing, and loads
    for p in prompts:
        m = store.lookup(p)
        kv, n = store.load(m)
        assert n <= m.tokens


# ----------------------------------------------------------------------------- concurrency

def _worker(root, wid, rounds, q):
    try:
        store, r = make_store(DirectoryBackend(root, max_bytes=400_000), levels=("default",))
        rng = np.random.default_rng(wid)
        hits = 0
        for i in range(rounds):
            seed = int(rng.integers(0, 6))                          # 6 shared prompts, contended
            ids = prompt(int(rng.integers(1, 5)) * C + 3, seed)
            m = store.lookup(ids)
            kv, n = store.load(m)
            if n:
                hits += 1
                kv_close(kv, [(k[:, :, :n], v[:, :, :n]) for k, v in r.kv_for(ids[:n])], 0.15)
            store.put(ids, r.prefill(ids)[1], start_chunk=n // C)
        q.put(("ok", wid, hits, store.stats["corrupt"]))
    except BaseException as e:  # noqa: BLE001
        import traceback
        q.put(("err", wid, traceback.format_exc(), 0))


def test_concurrent_writers_and_readers(tmp_path):
    root = tmp_path / "kv"
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(root), w, 25, q)) for w in range(4)]
    for p in procs:
        p.start()
    res = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    errs = [r for r in res if r[0] != "ok"]
    assert not errs, errs[0][2]
    assert sum(r[2] for r in res) > 0                               # they did share entries
    assert sum(r[3] for r in res) == 0                              # no torn/corrupt reads
    assert not [p for p in root.rglob(".tmp.*")]                    # no temp files left
    assert DirectoryBackend(root).total_bytes() <= 400_000 + 4 * 20_000


# ----------------------------------------------------------------------------- index merge

class _SlowIndexReads(DirectoryBackend):
    """Reads of index entries take a while: two writers' read-modify-write cycles overlap."""

    def get(self, key):
        v = super().get(key)
        if key.endswith(".idx"):
            time.sleep(0.02)
        return v


@pytest.mark.parametrize("rounds", [3])
def test_concurrent_writers_adding_different_levels_merge_the_index(tmp_path, rounds):
    ids = prompt(4 * C + 1)
    for rnd in range(rounds):
        root = tmp_path / f"r{rnd}"
        stores = [make_store(_SlowIndexReads(root), levels=(lv,))[0] for lv in ("default", "small")]
        _, kv = FakeRunner().prefill(ids)
        put_concurrently(stores, ids, kv)
        m = make_store(DirectoryBackend(root), levels=("default",))[0].lookup(ids)
        assert len(m) == 4
        for ref in m.chunks:
            assert set(ref.levels) == {"default", "small"}, ref.levels   # neither level's listing lost


def test_index_merge_keeps_other_levels_and_replaces_a_corrupt_index(tmp_path):
    st, r = make_store(DirectoryBackend(tmp_path), levels=("default",))
    ids = prompt(2 * C + 1)
    _, kv = r.prefill(ids)
    st.put(ids, kv)
    st.put(ids, kv, levels=("small",))
    assert all(set(c.levels) == {"default", "small"} for c in st.lookup(ids).chunks)
    h = st.lookup(ids).chunks[0].hash
    st.backend.put(st.index_key(h), b"garbage")
    st.put(ids, kv, levels=("raw",), skip_existing=False)
    assert set(st.lookup(ids).chunks[0].levels) == {"raw"}     # a corrupt index is replaced, not merged
