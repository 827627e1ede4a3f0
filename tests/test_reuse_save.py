"""prefill_with_reuse(save=...): storing off the time-to-first-token path."""
from __future__ import annotations

import logging
import os
import threading
import time

import numpy as np
import pytest

import cachegen
from cachegen.codec.parallel import parallel_map
from cachegen.store import KVStore, MemoryBackend, fingerprint_from_runner, prefill_with_reuse
from cachegen.store.testing import FakeRunner

C = 16
PUT_DELAY = 0.4


class SlowBackend(MemoryBackend):
    """A backend whose writes take PUT_DELAY seconds (a slow disk or a far Redis)."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail

    def put(self, key, data):
        time.sleep(PUT_DELAY)
        if self.fail:
            raise RuntimeError("disk on fire")
        return super().put(key, data)


def _store(backend):
    r = FakeRunner()
    return KVStore(backend, fingerprint_from_runner(r, "fake", chunk_tokens=C), levels=("lossless",)), r


def _ids(n):
    return np.random.default_rng(0).integers(0, 1000, n)


def test_background_is_the_default_and_off_the_ttft_path():
    store, r = _store(SlowBackend())
    ids = _ids(2 * C + 3)
    t = time.perf_counter()
    logits, kv, info = prefill_with_reuse(r, store, ids, level="lossless")
    returned = time.perf_counter() - t
    assert info["store"] == "background" and info["chunks_written"] is None
    assert returned < PUT_DELAY and info["store_s"] < PUT_DELAY      # 2 chunks x 2 entries are still being written
    assert info["store_future"].result(timeout=60) == 2
    assert store.lookup(ids).tokens == 2 * C
    _, _, info2 = prefill_with_reuse(r, store, ids, level="lossless")
    assert info2["reused_tokens"] == 2 * C


def test_sync_and_off():
    store, r = _store(SlowBackend())
    ids = _ids(2 * C + 3)
    _, _, info = prefill_with_reuse(r, store, ids, level="lossless", save=False)
    assert info["store"] == "off" and info["store_future"] is None and store.lookup(ids).tokens == 0
    _, _, info = prefill_with_reuse(r, store, ids, level="lossless", save="sync")
    assert info["chunks_written"] == 2 and info["store_s"] >= 2 * PUT_DELAY
    assert store.lookup(ids).tokens == 2 * C
    with pytest.raises(cachegen.ConfigError):
        prefill_with_reuse(r, store, ids, save="later")


def test_background_failure_is_kept_and_logged(caplog):
    store, r = _store(SlowBackend(fail=True))
    with caplog.at_level(logging.WARNING, logger="cachegen.store"):
        _, _, info = prefill_with_reuse(r, store, _ids(C + 1), level="lossless")
        with pytest.raises(RuntimeError, match="disk on fire"):
            info["store_future"].result(timeout=60)
        deadline = time.time() + 5
        while "background save failed" not in caplog.text and time.time() < deadline:
            time.sleep(0.01)
    assert "background save failed: RuntimeError: disk on fire" in caplog.text


def test_background_saves_keep_order():
    store, r = _store(MemoryBackend())
    futures = [prefill_with_reuse(r, store, _ids(C * (k + 1) + 1), level="lossless")[2]["store_future"]
               for k in range(3)]
    # one writer thread: the second call found nothing stored yet or only part; every chunk ends up stored once
    assert sum(f.result(timeout=60) for f in futures) == 3
    assert store.lookup(_ids(3 * C + 1)).tokens == 3 * C


def test_parallel_map_stays_in_process_off_the_main_thread():
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("pids", parallel_map(lambda s, i: os.getpid(), None,
                                                                            range(4), 2)))
    th.start()
    th.join(60)
    assert out["pids"] == [os.getpid()] * 4
