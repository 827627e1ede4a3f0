"""Per-chunk level selection for streaming a stored KV cache (pure functions, no I/O).

Each chunk can be fetched at one of its stored levels (bytes over the link, then a decode on
the compute side) or recomputed from its tokens ("text": nothing to fetch, a prefill of the
chunk after the chunks before it). Fetching and computing are two pipeline stages: while chunk
``i`` is decoded or recomputed, chunk ``i + 1`` is already on the wire. So the time to restore
the prefix (the part of TTFT this plan controls) is the makespan of a two-stage flow shop::

    net_end[i]  = net_end[i-1] + net[i]                       net[i]  = latency + bytes / bandwidth (0 for text)
    comp_end[i] = max(comp_end[i-1], net_end[i]) + comp[i]    comp[i] = decode_s (or recompute_s for text)

(``overlap=False`` gives the plain sum instead.) :func:`plan_stream` picks an option per chunk:

* with a budget: the highest total quality whose makespan *plus* ``tail_s`` (what follows the
  restore on the critical path: the prefill of the prompt's suffix) fits the budget -- CacheGen's
  rule "the best level whose transfer fits at the measured bandwidth, else text" -- found greedily:
  start from the best option everywhere, then repeatedly apply the single-chunk change that
  saves the most time per unit of quality lost, until the plan fits; if no plan fits, the
  fastest plan found (``fits=False``);
* without a budget (or when none fits): the fastest plan (steepest descent on the makespan from
  the best-quality plan; ties keep the better quality, and a quality loss must buy at least
  ``min_gain`` of a chunk's mean time -- a lower level does not speed up a decode-bound stream).

Codec levels get a quality score (defaults below, or measured ones passed in ``quality``).
Recomputing from text is exact, but by default it is scored *below* every level: CacheGen's rule
is "the best level whose transfer fits, else text" -- text is the fallback that takes the link off
the critical path, not an upgrade (scored as exact, it was picked whenever the prediction said it
"fit", and one mispredicted recompute on a loaded CPU costs seconds). Pass ``quality={TEXT: 1.0}``
to prefer exact recompute when it fits. Raw fp16 is near-exact (0.999) but 4x the bytes of
"default"; the loader leaves it out unless it is asked for by name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["TEXT", "ChunkCosts", "Plan", "plan_stream", "makespan", "DEFAULT_QUALITY", "BandwidthEstimator"]

TEXT = "text"

#: Utility of a chunk restored at each level (1.0 = exact). Only the order and the rough gaps
#: matter to the planner; pass measured values (e.g. 1 - normalized KL) to calibrate.
DEFAULT_QUALITY: dict[str, float] = {TEXT: 0.9, "raw": 0.999, "lossless": 0.999, "high": 0.998, "fine": 0.995,
                                     "default": 0.99, "cachegen-paper": 0.99, "small": 0.97}
_UNKNOWN_QUALITY = 0.95


@dataclass(frozen=True)
class ChunkCosts:
    """What one chunk costs at each option."""
    sizes: Mapping[str, int]                                  # level -> bytes to transfer
    decode_s: Mapping[str, float] = field(default_factory=dict)  # level -> decode seconds (missing: 0)
    recompute_s: float = math.inf                             # text fallback; inf = not allowed


@dataclass
class Plan:
    choices: list[str]        # per chunk: a level name or TEXT
    est_s: float              # estimated makespan (seconds after start)
    fits: bool                # est_s <= budget (True when no budget)
    quality: float            # mean per-chunk quality
    net_s: float = 0.0        # estimated seconds on the link
    comp_s: float = 0.0       # estimated seconds of decode + recompute

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.choices:
            out[c] = out.get(c, 0) + 1
        return out


def _options(c: ChunkCosts, allowed: Optional[Sequence[str]], allow_text: bool) -> list[str]:
    opts = [lv for lv in c.sizes if allowed is None or lv in allowed]
    if allow_text and math.isfinite(c.recompute_s):
        opts.append(TEXT)
    return opts


def _stage_times(c: ChunkCosts, opt: str, bw: float, latency: float) -> tuple[float, float]:
    if opt == TEXT:
        return 0.0, float(c.recompute_s)
    return latency + c.sizes[opt] / bw, float(c.decode_s.get(opt, 0.0))


def makespan(net: Sequence[float], comp: Sequence[float], overlap: bool = True,
             start_net: float = 0.0, start_comp: float = 0.0) -> float:
    """Finish time of the two-stage pipeline (or of the plain sequence with ``overlap=False``)."""
    if not overlap:
        return max(start_net, start_comp) + float(sum(net) + sum(comp))
    tn, tc = start_net, start_comp
    for a, b in zip(net, comp):
        tn += a
        tc = max(tc, tn) + b
    return max(tc, tn) if len(net) else max(start_net, start_comp)


def _batch_makespan(N: np.ndarray, P: np.ndarray, overlap: bool, s_net: float, s_comp: float) -> np.ndarray:
    """Makespans of many plans at once: N, P are [plans, chunks]."""
    if not overlap:
        return max(s_net, s_comp) + N.sum(1) + P.sum(1)
    tn = np.full(N.shape[0], s_net)
    tc = np.full(N.shape[0], s_comp)
    for j in range(N.shape[1]):
        tn = tn + N[:, j]
        tc = np.maximum(tc, tn) + P[:, j]
    return np.maximum(tc, tn)


def plan_stream(chunks: Sequence[ChunkCosts], bandwidth_Bps: float, budget_s: Optional[float] = None, *,
                quality: Optional[Mapping[str, float]] = None, levels: Optional[Sequence[str]] = None,
                allow_text: bool = True, latency_s: float = 0.0, overlap: bool = True,
                start_net_s: float = 0.0, start_comp_s: float = 0.0, tail_s: float = 0.0,
                min_gain: float = 0.2) -> Plan:
    """Choose a level (or TEXT) per chunk. See the module docstring.

    ``bandwidth_Bps``: bytes per second; ``latency_s``: per-request overhead; ``levels``: the
    levels allowed (default: all stored); ``start_*_s``: when each stage becomes free (used when
    re-planning the rest of a stream; the budget is measured from the same origin); ``tail_s``:
    seconds after the restore that the budget must also cover (the suffix prefill). ``est_s``
    includes it.
    """
    n = len(chunks)
    tail_s = max(0.0, float(tail_s))
    if n == 0:
        t = max(start_net_s, start_comp_s) + tail_s
        return Plan([], t, budget_s is None or t <= budget_s, 1.0)
    if budget_s is not None:
        budget_s = budget_s - tail_s
    if not bandwidth_Bps > 0:
        bandwidth_Bps = 1e-9
    qmap = dict(DEFAULT_QUALITY)
    if quality:
        qmap.update(quality)
    opts = [_options(c, levels, allow_text) for c in chunks]
    for i, o in enumerate(opts):
        if not o:
            raise ValueError(f"chunk {i}: no level allowed and no text fallback")
    m = max(len(o) for o in opts)
    # [n, m] tables; padded options are unusable (inf time, -inf quality)
    NET = np.full((n, m), np.inf)
    CMP = np.full((n, m), np.inf)
    Q = np.full((n, m), -np.inf)
    for i, (c, o) in enumerate(zip(chunks, opts)):
        for j, name in enumerate(o):
            NET[i, j], CMP[i, j] = _stage_times(c, name, bandwidth_Bps, latency_s)
            Q[i, j] = qmap.get(name, _UNKNOWN_QUALITY)
    rows = np.arange(n)
    # best-quality start; among equal quality the faster option
    cur = np.array([max(range(len(o)), key=lambda j, i=i: (Q[i, j], -(NET[i, j] + CMP[i, j])))
                    for i, o in enumerate(opts)])
    cand_i = np.repeat(rows, m)
    cand_j = np.tile(np.arange(m), n)
    valid = np.isfinite(Q[cand_i, cand_j])
    cand_i, cand_j = cand_i[valid], cand_j[valid]

    def evaluate(c: np.ndarray) -> float:
        return float(_batch_makespan(NET[rows, c][None], CMP[rows, c][None], overlap, start_net_s, start_comp_s)[0])

    def candidates(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        Nb = np.broadcast_to(NET[rows, c], (len(cand_i), n)).copy()
        Pb = np.broadcast_to(CMP[rows, c], (len(cand_i), n)).copy()
        k = np.arange(len(cand_i))
        Nb[k, cand_i] = NET[cand_i, cand_j]
        Pb[k, cand_i] = CMP[cand_i, cand_j]
        return _batch_makespan(Nb, Pb, overlap, start_net_s, start_comp_s), Q[cand_i, cand_j] - Q[cand_i, c[cand_i]]

    best_q = cur.copy()
    t = evaluate(cur)
    eps = 1e-12
    if budget_s is not None:
        while t > budget_s + eps:
            ts, dq = candidates(cur)
            gain = t - ts
            ok = gain > eps
            if not ok.any():
                break
            loss = -dq
            # changes that lose no quality first, then most time saved per quality lost
            score = np.where(loss <= eps, np.inf, gain / np.maximum(loss, eps))
            score = np.where(ok, score, -np.inf)
            best = np.flatnonzero(score == score.max())
            b = best[np.argmax(gain[best])]
            cur[cand_i[b]] = cand_j[b]
            t = float(ts[b])
        if t <= budget_s + eps:
            return _finish(cur, t, True, opts, NET, CMP, Q, rows, tail_s)
    # fastest plan: steepest descent on the makespan from the best-quality plan. A change that
    # loses quality must save at least ``min_gain`` of a chunk's mean time: when decoding, not
    # the link, is the bottleneck, a smaller level saves next to nothing (and cost estimates are
    # noisier than that), so the better level is kept.
    # (two starts: the best-quality plan and the per-chunk cheapest options; the faster result
    # wins, ties to the better quality)
    def descend(c: np.ndarray) -> tuple[np.ndarray, float]:
        t = evaluate(c)
        while True:
            ts, dq = candidates(c)
            gain = t - ts
            need = np.where(dq < -1e-12, min_gain * t / n, 1e-9)
            ok = gain > need
            if not ok.any():
                return c, t
            g = np.where(ok, gain, -np.inf)
            top = g.max()
            best = np.flatnonzero(g >= top - 1e-9)
            b = best[np.argmax(dq[best])]
            c[cand_i[b]] = cand_j[b]
            t = float(ts[b])

    cheap = np.array([min(range(len(o)), key=lambda j, i=i: (NET[i, j] + CMP[i, j], -Q[i, j]))
                      for i, o in enumerate(opts)])
    results = [descend(best_q.copy()), descend(cheap)]
    results.sort(key=lambda r: r[1])
    cur, t = results[0]
    for c2, t2 in results[1:]:
        if t2 <= t + min_gain * t / n and Q[rows, c2].sum() > Q[rows, cur].sum():
            cur, t = c2, t2
    return _finish(cur, t, budget_s is None or t <= budget_s + eps, opts, NET, CMP, Q, rows, tail_s)


def _finish(cur, t, fits, opts, NET, CMP, Q, rows, tail_s=0.0) -> Plan:
    return Plan([opts[i][j] for i, j in enumerate(cur)], t + tail_s, fits, float(Q[rows, cur].mean()),
                float(NET[rows, cur].sum()), float(CMP[rows, cur].sum()))


class BandwidthEstimator:
    """Bandwidth estimate from measured transfers: an EWMA of *seconds per byte* (so a slow
    sample pulls the estimate down at once, which is what a deadline needs; an EWMA of bytes/s
    would be dominated by the fast samples). ``observe(nbytes, seconds)`` after each transfer;
    transfers smaller than ``min_bytes`` are ignored (they measure latency, not bandwidth)."""

    def __init__(self, initial_Bps: float, alpha: float = 0.5, min_bytes: int = 4096,
                 latency_s: float = 0.0) -> None:
        if not initial_Bps > 0:
            raise ValueError("initial bandwidth must be > 0")
        self._spb = 1.0 / float(initial_Bps)
        self.latency_s = float(latency_s)   # per-request round trip (EWMA of small requests)
        self.alpha = alpha
        self.min_bytes = min_bytes
        self.samples: list[tuple[int, float]] = []

    @property
    def Bps(self) -> float:
        return 1.0 / self._spb

    def observe(self, nbytes: int, seconds: float) -> float:
        if nbytes >= self.min_bytes and seconds > 0:
            self.samples.append((nbytes, seconds))
            self._spb = self.alpha * (seconds / nbytes) + (1 - self.alpha) * self._spb
        return self.Bps

    def observe_latency(self, seconds: float) -> float:
        """A small request's round trip (e.g. the index lookup): the per-request latency."""
        if seconds >= 0:
            self.latency_s = self.alpha * seconds + (1 - self.alpha) * self.latency_s
        return self.latency_s

    @property
    def gbps(self) -> float:
        return self.Bps * 8 / 1e9
