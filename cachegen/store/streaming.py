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

__all__ = ["RecomputeModel", "CostModel", "StreamingLoader", "RestoreReport", "ChunkEvent"]

log = logging.getLogger("cachegen.store")


class RecomputeModel:
    """Seconds to prefill tokens after a context: attention makes a chunk at position ``pos``
    cost more than one at the start. For ``n`` tokens after ``pos`` tokens of context::

        seconds(n, pos) = scale * (n / chunk_tokens) * (fixed_s + per_ctx_token_s * pos)

    ``fixed_s``: a chunk of ``chunk_tokens`` tokens from an empty cache; ``per_ctx_token_s``:
    what each token of context before it adds (attention over it). :meth:`calibrate` gets both
    from two prefill measurements; ``scale`` is an EWMA of measured / predicted (it follows CPU
    contention as the stream runs, see :meth:`observe`)."""

    def __init__(self, fixed_s: float, per_ctx_token_s: float = 0.0, chunk_tokens: int = 256,
                 alpha: float = 0.5) -> None:
        self.fixed_s = max(0.0, float(fixed_s))
        self.per_ctx_token_s = max(0.0, float(per_ctx_token_s))
        self.chunk_tokens = int(chunk_tokens)
        self.alpha = alpha
        self.scale = 1.0

    @classmethod
    def calibrate(cls, chunk_tokens: int, t_at_0: float, pos: int, t_at_pos: float, **kw) -> "RecomputeModel":
        """From two measurements of a ``chunk_tokens``-token prefill: from an empty cache
        (``t_at_0``) and after ``pos`` tokens of context (``t_at_pos``)."""
        if pos <= 0:
            raise ValueError("the second measurement needs a context (pos > 0)")
        return cls(t_at_0, max(0.0, (t_at_pos - t_at_0) / pos), chunk_tokens, **kw)

    @classmethod
    def measure(cls, runner: Any, ids: Sequence[int], chunk_tokens: int = 256, pos: Optional[int] = None,
                **kw) -> "RecomputeModel":
        """Calibrate with ``runner``: prefill a chunk, then a chunk after ``pos`` tokens (default:
        the rest of ``ids`` rounded down to chunks)."""
        ids = np.asarray(ids).reshape(-1)
        C = chunk_tokens
        pos = pos if pos is not None else max(C, (len(ids) - C) // C * C)
        runner.prefill(ids[:C])                               # warm-up
        _, kv = runner.prefill(ids[:pos])
        t = time.perf_counter()
        runner.prefill(ids[:C])
        t0 = time.perf_counter() - t
        t = time.perf_counter()
        runner.continue_from(kv, ids[pos:pos + C])
        t1 = time.perf_counter() - t
        return cls.calibrate(C, t0, pos, t1, **kw)

    def predict(self, n_tokens: int, pos: int) -> float:
        return self.scale * self._base(n_tokens, pos)

    def _base(self, n_tokens: int, pos: int) -> float:
        return (n_tokens / self.chunk_tokens if self.chunk_tokens > 0 else 1.0) * (self.fixed_s + self.per_ctx_token_s * pos)

    def chunk_s(self, pos: int) -> float:
        return self.predict(self.chunk_tokens, pos)

    def observe(self, n_tokens: int, pos: int, seconds: float) -> None:
        base = self._base(n_tokens, pos)
        if base > 0 and seconds > 0:
            self.scale = self.alpha * (seconds / base) + (1 - self.alpha) * self.scale


class CostModel:
    """Compute-side costs per chunk, updated from what the loader measures as the stream runs:

    * decode: an EWMA of *seconds per byte* per level (``decode_s`` / ``decode_s_per_MB`` are
      priors); a level not measured yet takes its prior times the measured/prior ratio of the
      levels that were (CPU contention slows every decode alike);
    * recompute: a :class:`RecomputeModel` (a float = the same cost at every position).
    """

    def __init__(self, recompute_s: "float | RecomputeModel", decode_s: Optional[Mapping[str, float]] = None,
                 decode_s_per_MB: float = 0.0, alpha: float = 0.5,
                 level_bytes: Optional[Mapping[str, int]] = None) -> None:
        self.recompute = (recompute_s if isinstance(recompute_s, RecomputeModel)
                          else RecomputeModel(float(recompute_s), 0.0, 0, alpha))  # chunk size: the loader's
        self.decode_s = dict(decode_s or {})      # priors, seconds per chunk
        self.level_bytes = dict(level_bytes or {})  # bytes those priors were measured at
        self.decode_s_per_MB = decode_s_per_MB
        self.alpha = alpha
        self.spb: dict[str, float] = {}          # measured seconds per byte (EWMA) per level
        self.ratio = 1.0                          # measured / prior, EWMA over all levels

    @property
    def recompute_s(self) -> float:
        """Recompute seconds of a chunk at position 0 (compatibility)."""
        return self.recompute.chunk_s(0)

    def recompute_for(self, pos: int, n_tokens: Optional[int] = None) -> float:
        """Seconds to recompute ``n_tokens`` (default: a chunk) after ``pos`` tokens."""
        return self.recompute.predict(self.recompute.chunk_tokens if n_tokens is None else n_tokens, pos)

    def _prior(self, level: str, nbytes: int) -> Optional[float]:
        if level in self.decode_s:
            ref = self.level_bytes.get(level)
            return self.decode_s[level] * (nbytes / ref if ref else 1.0)
        if self.decode_s_per_MB:
            return self.decode_s_per_MB * nbytes / 1e6
        return None

    def decode_for(self, level: str, nbytes: int) -> float:
        if level in self.spb:
            return self.spb[level] * nbytes
        prior = self._prior(level, nbytes)
        if prior is not None:
            return prior * self.ratio
        if self.spb:                               # another level's measured rate
            return float(np.mean(list(self.spb.values()))) * nbytes
        return 0.0

    def observe_decode(self, level: str, seconds: float, nbytes: int = 0) -> None:
        if nbytes <= 0:
            ref = self.level_bytes.get(level)
            if not ref:
                old = self.decode_s.get(level)
                self.decode_s[level] = seconds if old is None else self.alpha * seconds + (1 - self.alpha) * old
                return
            nbytes = ref
        rate = seconds / nbytes
        old = self.spb.get(level)
        self.spb[level] = rate if old is None else self.alpha * rate + (1 - self.alpha) * old
        prior = self._prior(level, nbytes)
        if prior:
            self.ratio = self.alpha * (seconds / prior) + (1 - self.alpha) * self.ratio

    def observe_recompute(self, seconds: float, pos: int = 0, n_tokens: Optional[int] = None) -> None:
        self.recompute.observe(self.recompute.chunk_tokens if n_tokens is None else n_tokens, pos, seconds)

    def chunk_costs(self, sizes: Mapping[str, int], allow_text: bool = True, pos: int = 0) -> ChunkCosts:
        return ChunkCosts(dict(sizes), {lv: self.decode_for(lv, b) for lv, b in sizes.items()},
                          self.recompute_for(pos) if allow_text else math.inf)


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
    suffix_s: float = 0.0     # prefill of the rest of the prompt (StreamingLoader.prefill)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.events:
            out[e.used] = out.get(e.used, 0) + 1
        return out


class StreamingLoader:
    """Restore the stored prefix of a prompt under a TTFT budget.

    ``runner``: object with ``prefill(ids) -> (logits, kv)`` and ``continue_from(kv, ids) ->
    (logits, kv)`` (e.g. :class:`cachegen.ort.OrtRunner`); ``bandwidth``: a
    :class:`BandwidthEstimator` (kept and updated across calls: every fetched chunk updates it,
    and the rest of the stream is re-planned with it before each fetch, so a link slower than
    estimated is corrected mid-stream); ``costs``: a :class:`CostModel` (decode and recompute
    costs, also updated from measurements as the stream runs).

    ``budget_s``: the TTFT budget in seconds, from the call to the first token: lookup, fetch,
    decode, recompute *and* the prefill of the prompt's suffix after the restored prefix (its
    predicted cost is reserved; ``count_suffix=False`` leaves it out) (None: as fast as possible).
    ``safety``: the plan aims at ``safety * budget`` (estimates are noisy).
    ``levels``: the levels allowed (None: all stored except those in ``exclude``, by default raw
    fp16 -- near-exact but 4x the bytes of "default"; name "raw" to allow it; one level = a
    fixed-level loader); ``allow_text``: whether the plan may recompute chunks (failed fetches
    are always recomputed). ``latency_s``: per-request latency prior (the index lookup's round
    trip updates it).
    """

    def __init__(self, store: KVStore, runner: Any, bandwidth: BandwidthEstimator, costs: CostModel,
                 budget_s: Optional[float] = None, levels: Optional[Sequence[str]] = None,
                 allow_text: bool = True, quality: Optional[Mapping[str, float]] = None,
                 latency_s: float = 0.0, overlap: bool = True, prefetch: int = 2, replan: bool = True,
                 exclude: Sequence[str] = ("raw",), count_suffix: bool = True, safety: float = 0.9) -> None:
        self.store, self.runner, self.bw, self.costs = store, runner, bandwidth, costs
        self.budget_s, self.levels, self.allow_text = budget_s, levels, allow_text
        self.quality, self.overlap = quality, overlap
        self.exclude = tuple(exclude)
        self.count_suffix, self.safety = count_suffix, safety
        if latency_s:
            self.bw.latency_s = max(self.bw.latency_s, latency_s)
        self.prefetch = max(1, prefetch)
        self.replan = replan
        if self.costs.recompute.chunk_tokens <= 0:          # a constant recompute cost: per chunk
            self.costs.recompute.chunk_tokens = store.chunk_tokens

    def _allowed(self, lv: str) -> bool:
        return lv in self.levels if self.levels is not None else lv not in self.exclude

    def _sizes(self, levels: Mapping[str, int]) -> dict[str, int]:
        out = {lv: b for lv, b in levels.items() if self._allowed(lv)}
        if not out and self.levels is None:      # only excluded levels stored (e.g. raw only): use them
            out = dict(levels)
        return out

    def plan(self, match: PrefixMatch, start: int = 0, elapsed: float = 0.0, comp_backlog: float = 0.0,
             suffix_tokens: int = 0) -> Plan:
        C = match.chunk_tokens
        chunks = [self.costs.chunk_costs(self._sizes(r.levels), self.allow_text, pos=r.index * C)
                  for r in match.chunks[start:]]
        for i, c in enumerate(chunks):
            if not c.sizes and not math.isfinite(c.recompute_s):  # nothing allowed: must recompute
                chunks[i] = ChunkCosts({}, {}, self.costs.recompute_for((start + i) * C))
        tail = self.costs.recompute_for(match.tokens, suffix_tokens) if suffix_tokens > 0 else 0.0
        budget = None if self.budget_s is None else self.safety * self.budget_s
        return plan_stream(chunks, self.bw.Bps, budget, quality=self.quality, allow_text=True,
                           latency_s=self.bw.latency_s, overlap=self.overlap,
                           start_net_s=elapsed, start_comp_s=elapsed + comp_backlog, tail_s=tail)

    def restore(self, tokens: Any, max_tokens: Optional[int] = None,
                suffix_tokens: Optional[int] = None) -> tuple[Any, RestoreReport]:
        """Restore the longest stored prefix of ``tokens`` (default: all but the last token).
        Returns ``(kv, report)``; ``kv`` is ``[]`` when nothing is stored. ``suffix_tokens``: the
        tokens that will be prefilled after the restore (default: the rest of ``tokens`` when
        ``count_suffix``), whose cost the budget reserves."""
        ids = np.asarray(tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens).reshape(-1)
        t0 = time.perf_counter()
        match = self.store.lookup(ids, max_tokens=len(ids) - 1 if max_tokens is None else max_tokens)
        rep = RestoreReport(len(ids), match.tokens, 0, None, lookup_s=time.perf_counter() - t0)
        self.bw.observe_latency(rep.lookup_s)
        n = len(match)
        if n == 0:
            rep.restore_s = time.perf_counter() - t0
            return [], rep
        if suffix_tokens is None:
            suffix_tokens = len(ids) - match.tokens if self.count_suffix else 0
        C = match.chunk_tokens
        first = self.plan(match, 0, time.perf_counter() - t0, suffix_tokens=suffix_tokens)
        rep.initial_plan = first
        q: "queue.Queue" = queue.Queue(maxsize=self.prefetch)
        backlog = [0.0]  # estimated compute seconds queued but not done
        lock = threading.Lock()
        stop = threading.Event()

        def est(i: int, used: str, nbytes: int) -> float:
            return self.costs.recompute_for(i * C) if used == TEXT else self.costs.decode_for(used, nbytes)

        def fetcher() -> None:
            plan = first
            for i, ref in enumerate(match.chunks):
                if stop.is_set():
                    return
                if self.replan and i > 0:
                    with lock:
                        bl = backlog[0]
                    plan = self.plan(match, i, time.perf_counter() - t0, bl, suffix_tokens)
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
                        lat = self.bw.latency_s
                        self.bw.observe(len(payload), max(ev.fetch_s - lat, 0.5 * ev.fetch_s))
                with lock:
                    backlog[0] += est(i, ev.used, ev.bytes)
                while not stop.is_set():
                    try:
                        q.put((ev, payload), timeout=0.1)
                        break
                    except queue.Full:
                        continue

        th = threading.Thread(target=fetcher, name="cachegen-fetch", daemon=True)
        th.start()
        parts: list = []      # caches of consecutive chunks, concatenated lazily
        try:
            for i in range(n):
                ev, payload = q.get()
                tc = time.perf_counter()
                planned_cost = est(i, ev.used, ev.bytes)
                kv = None
                if payload is not None:
                    try:
                        kv = self.store.decode_chunk(payload, ev.used)
                        if any(int(k.shape[2]) != C for k, _ in kv):
                            raise CacheGenError("chunk has the wrong number of tokens")
                        self.costs.observe_decode(ev.used, time.perf_counter() - tc, ev.bytes)
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
                    self.costs.observe_recompute(time.perf_counter() - tr, i * C, len(chunk_ids))
                ev.compute_s = time.perf_counter() - tc
                with lock:
                    backlog[0] = max(0.0, backlog[0] - planned_cost)
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
        restore part, ``report.suffix_s`` the rest's prefill (its measured cost updates the
        recompute model)."""
        ids = np.asarray(tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens).reshape(-1)
        kv, rep = self.restore(ids)
        t = time.perf_counter()
        if rep.restored_tokens:
            logits, full = self.runner.continue_from(kv, ids[rep.restored_tokens:])
        else:
            logits, full = self.runner.prefill(ids)
        rep.suffix_s = time.perf_counter() - t
        n_new = len(ids) - rep.restored_tokens
        if n_new > 0:
            self.costs.observe_recompute(rep.suffix_s, rep.restored_tokens, n_new)
        return logits, full, rep
