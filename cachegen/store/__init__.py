"""Store compressed KV caches by token prefix, share them (directory or Redis), and restore them
over a link of changing speed (CacheGen streaming with text fallback).

    fp = fingerprint_from_runner(runner, "smollm2-fp32")
    store = KVStore(DirectoryBackend("/tmp/kv"), fp, levels=("default",))
    logits, kv, info = prefill_with_reuse(runner, store, prompt_ids)   # reuse + store

    loader = StreamingLoader(store, runner, BandwidthEstimator(1.25e8), CostModel(recompute_s=0.5),
                             budget_s=2.0)
    logits, kv, report = loader.prefill(prompt_ids)                  # adaptive restore
"""
from .backends import Backend, DirectoryBackend, MemoryBackend, RedisBackend  # noqa: F401
from .entry import CorruptEntryError  # noqa: F401
from .keys import Fingerprint, chunk_hashes, fingerprint_from_kv, fingerprint_from_runner  # noqa: F401
from .kvstore import ChunkRef, KVStore, PrefixMatch, concat_kv, prefill_with_reuse, slice_kv  # noqa: F401
from .planner import (DEFAULT_QUALITY, TEXT, BandwidthEstimator, ChunkCosts, Plan, makespan,  # noqa: F401
                      plan_stream)
from .streaming import ChunkEvent, CostModel, RecomputeModel, RestoreReport, StreamingLoader  # noqa: F401
