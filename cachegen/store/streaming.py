"""Bandwidth-adaptive restore of a stored prefix (CacheGen streaming) with text fallback.

:class:`StreamingLoader` looks the prompt up, plans a level per chunk with
:func:`~cachegen.store.planner.plan_stream`, and runs two stages at once:

* a fetch thread that, before each chunk, re-plans the remaining chunks with the current
  bandwidth estimate (an EWMA of measured transfer times) and the time left in the budget, then
  fetches that chunk at the chosen level (or skips it: TEXT);
* the calling thread, which decodes fetched chunks and recomputes TEXT chunks (and chunks whose
  fetch failed: missing, evicted, server down, corrupt) with the runner, after the chunks before
  them, building one cache.

The result is one cache covering the matched prefix, which the runner continues from.
"""
from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ..errors import CacheGenError
from .kvstore import KVStore, PrefixMatch, concat_kv
from .planner import TEXT, BandwidthEstimator, ChunkCosts, Plan, plan_stream

__all__ = ["CostModel", "StreamingLoader", "RestoreReport", "ChunkEvent"]

log = logging.getLogger("cachegen.store")


class CostModel:
    """Compute-side costs per chunk: decode seconds per level and recompute seconds (EWMA-updated
    from what the loader measures). Unknown decode costs are estimated from ``decode_s_per_MB``."""

    def __init__(self, recompute_s: float, decode_s: Optional[Mapping[str, float]] = None,
                 decode_s_per_MB: float = 0.0, alpha: float = 0.5) -> None:
        self.recompute_s = float(recompute_s)
        self.decode_s = dict(decode_s or {})
        self.decode_s_per_MB = decode_s_per_MB
        self.alpha = alpha

    def decode_for(self, level: str, nbytes: int) -> float:
        if level in self.decode_s:
            return self.decode_s[level]
        return self.decode_s_per_MB * nbytes / 1e6

    def observe_decode(self, level: str, seconds: float) -> None:
        old = self.decode_s.get(level)
        self.decode_s[level] = seconds if old is None else self.alpha * seconds + (1 - self.alpha) * old

    def observe_recompute(self, seconds: float) -> None:
        self.recompute_s = self.alpha * seconds + (1 - self.alpha) * self.recompute_s

    def chunk_costs(self, sizes: Mapping[str, int], allow_text: bool = True) -> ChunkCosts:
        return ChunkCosts(dict(sizes), {lv: self.decode_for(lv, b) for lv, b in sizes.items()},
                          self.recompute_s if allow_text else math.inf)


@dataclass
class ChunkEvent:
    index: int
    planned: str              # what the plan chose
    used: str                 # what restored it (TEXT if the fetch/decode failed)
    bytes: int = 0
    fetch_s: float = 0.0
    compute_s: float = 0.0    # decode or recompute
    bw_estimate_Bps: float = 0.0


@dataclass
class RestoreReport:
    prompt_tokens: int
    matched_tokens: int
    restored_tokens: int
    initial_plan: Optional[Plan]
    events: list[ChunkEvent] = field(default_factory=list)
    lookup_s: float = 0.0
    restore_s: float = 0.0    # lookup + fetch + decode + recompute of the prefix
    bytes: int = 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.events:
            out[e.used] = out.get(e.used, 0) + 1
        return out


class StreamingLoader:
    """Restore the stored prefix of a prompt under a TTFT budget.

    ``runner``: object with ``prefill(ids) -> (logits, kv)`` and ``continue_from(kv, ids) ->
    (logits, kv)`` (e.g. :class:`cachegen.ort.OrtRunner`); ``bandwidth``: a
    :class:`BandwidthEstimator` (kept and updated across calls); ``costs``: a :class:`CostModel`;
    ``budget_s``: seconds for the restore (None: as fast as possible); ``levels``: the levels
    allowed (None: all stored; one level = a fixed-level loader); ``allow_text``: whether the
    plan may recompute chunks (failed fetches are always recomputed).
    """

    def __init__(self, store: KVStore, runner: Any, bandwidth: BandwidthEstimator, costs: CostModel,
                 budget_s: Optional[float] = None, levels: Optional[Sequence[str]] = None,
                 allow_text: bool = True, quality: Optional[Mapping[str, float]] = None,
                 latency_s: float = 0.0, overlap: bool = True, prefetch: int = 2, replan: bool = True) -> None:
        self.store, self.runner, self.bw, self.costs = store, runner, bandwidth, costs
        self.budget_s, self.levels, self.allow_text = budget_s, levels, allow_text
        self.quality, self.latency_s, self.overlap = quality, latency_s, overlap
        self.prefetch = max(1, prefetch)
        self.replan = replan

    def plan(self, match: PrefixMatch, start: int = 0, elapsed: float = 0.0, comp_backlog: float = 0.0) -> Plan:
        chunks = [self.costs.chunk_costs({lv: b for lv, b in r.levels.items()
                                          if self.levels is None or lv in self.levels}, self.allow_text)
                  for r in match.chunks[start:]]
        for i, c in enumerate(chunks):
            if not c.sizes and not math.isfinite(c.recompute_s):  # nothing allowed: must recompute
                chunks[i] = ChunkCosts({}, {}, self.costs.recompute_s)
        return plan_stream(chunks, self.bw.Bps, self.budget_s, quality=self.quality, allow_text=True,
                           latency_s=self.latency_s, overlap=self.overlap,
                           start_net_s=elapsed, start_comp_s=elapsed + comp_backlog)

    def restore(self, tokens: Any, max_tokens: Optional[int] = None) -> tuple[Any, RestoreReport]:
        """Restore the longest stored prefix of ``tokens`` (default: all but the last token).
        Returns ``(kv, report)``; ``kv`` is ``[]`` when nothing is stored."""
        ids = np.asarray(tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens).reshape(-1)
        t0 = time.perf_counter()
        match = self.store.lookup(ids, max_tokens=len(ids) - 1 if max_tokens is None else max_tokens)
        rep = RestoreReport(len(ids), match.tokens, 0, None, lookup_s=time.perf_counter() - t0)
        n = len(match)
        if n == 0:
            rep.restore_s = time.perf_counter() - t0
            return [], rep
        first = self.plan(match, 0, time.perf_counter() - t0)
        rep.initial_plan = first
        q: "queue.Queue" = queue.Queue(maxsize=self.prefetch)
        backlog = [0.0]  # estimated compute seconds queued but not done
        lock = threading.Lock()
        stop = threading.Event()

        def fetcher() -> None:
            plan = first
            for i, ref in enumerate(match.chunks):
                if stop.is_set():
                    return
                if self.replan and i > 0:
                    with lock:
                        bl = backlog[0]
                    plan = self.plan(match, i, time.perf_counter() - t0, bl)
                    choice = plan.choices[0]
                else:
                    choice = plan.choices[i]
                ev = ChunkEvent(i, choice, choice, bw_estimate_Bps=self.bw.Bps)
                payload = None
                if choice != TEXT:
                    ts = time.perf_counter()
                    try:
                        payload = self.store.fetch(ref, choice)
                    except Exception as e:  # noqa: BLE001 - a backend bug must not kill the restore
                        log.warning("store: fetch of chunk %d failed: %s", i, e)
                        payload = None
                    ev.fetch_s = time.perf_counter() - ts
                    if payload is None:
                        ev.used = TEXT
                    else:
                        ev.bytes = len(payload)
                        self.bw.observe(len(payload), ev.fetch_s)
                with lock:
                    backlog[0] += (self.costs.recompute_s if ev.used == TEXT
                                   else self.costs.decode_for(choice, ev.bytes))
                while not stop.is_set():
                    try:
                        q.put((ev, payload), timeout=0.1)
                        break
                    except queue.Full:
                        continue

        th = threading.Thread(target=fetcher, name="cachegen-fetch", daemon=True)
        th.start()
        parts: list = []      # caches of consecutive chunks, concatenated lazily
        C = match.chunk_tokens
        try:
            for i in range(n):
                ev, payload = q.get()
                tc = time.perf_counter()
                kv = None
                if payload is not None:
                    try:
                        kv = self.store.decode_chunk(payload, ev.used)
                        if any(int(k.shape[2]) != C for k, _ in kv):
                            raise CacheGenError("chunk has the wrong number of tokens")
                        self.costs.observe_decode(ev.used, time.perf_counter() - tc)
                    except CacheGenError as e:
                        self.store.drop(self.store.data_key(match.chunks[i].hash, ev.used), e)
                        kv, ev.used = None, TEXT
                if kv is not None:
                    parts.append(kv)
                else:
                    tr = time.perf_counter()
                    chunk_ids = ids[i * C:(i + 1) * C]
                    if parts:
                        past = concat_kv(parts)
                        _, full = self.runner.continue_from(past, chunk_ids)
                    else:
                        _, full = self.runner.prefill(chunk_ids)
                    parts = [full]
                    self.costs.observe_recompute(time.perf_counter() - tr)
                ev.compute_s = time.perf_counter() - tc
                with lock:
                    backlog[0] = max(0.0, backlog[0] - (self.costs.recompute_s if ev.used == TEXT
                                                        else self.costs.decode_for(ev.used, ev.bytes)))
                rep.events.append(ev)
                rep.bytes += ev.bytes
        finally:
            stop.set()
            th.join(timeout=5)
        kv = concat_kv(parts)
        rep.restored_tokens = n * C
        rep.restore_s = time.perf_counter() - t0
        return kv, rep

    def prefill(self, tokens: Any) -> tuple[Any, Any, RestoreReport]:
        """Restore the stored prefix, then run the rest of the prompt. Returns
        ``(logits of the rest, kv of the whole prompt, report)``; ``report.restore_s`` is the
        restore part, the total is measured by the caller."""
        ids = np.asarray(tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens).reshape(-1)
        kv, rep = self.restore(ids)
        if rep.restored_tokens:
            logits, full = self.runner.continue_from(kv, ids[rep.restored_tokens:])
        else:
            logits, full = self.runner.prefill(ids)
        return logits, full, rep
