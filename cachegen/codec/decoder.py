"""CPU decoders for lossy containers.

* ``reference``: constriction decodes each stream (the CPU reference).
* ``lockstep``: numpy, all streams of a chunk one symbol-step at a time (the GPU algorithm).
Both produce bit-identical float32 reconstructions. Work is split into items of
(chunk, first block, end block) that can run on separate cores.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import FormatError, LimitExceededError, StreamError
from ..format.container import Container, DecodeLimits, LossyChunk, chunk_blocks, parse_lossy_chunk
from ..format.tables import TOKEN_SCALES
from . import entropy, grouping, quantize
from .layout import segment_counts

Block = tuple[int, int, int, int, np.ndarray]  # (layer, kv, chunk, n, x float32 [B, H, n, D])


def work_items(container: Container, pieces_per_chunk: int = 1) -> list[tuple[int, int, int]]:
    items = []
    for k in range(container.n_chunks):
        nb = len(chunk_blocks(container.header, k))
        p = max(1, min(pieces_per_chunk, nb))
        bounds = [nb * j // p for j in range(p + 1)]
        items.extend((k, bounds[j], bounds[j + 1]) for j in range(p) if bounds[j] < bounds[j + 1])
    return items


def _finish_block(container: Container, chunk: LossyChunk, b: int, v: np.ndarray) -> Block:
    """v: [channels, batch, n] indices -> check range, dequantize -> [B, H, n, D] float32."""
    h = container.header
    i, kvi, n = chunk.blocks[b]
    layer = h.layers[i]
    levels = 1 << layer.bits(kvi)
    if v.size and (int(v.min()) < 0 or int(v.max()) >= levels):
        raise StreamError(f"chunk {chunk.index} layer {i}: reconstructed index outside [0, {levels - 1}]")
    e = chunk.token_exp[b]
    ts = None if e is None else TOKEN_SCALES[e].reshape(1, h.batch, n)
    x = quantize.dequantize(v, chunk.lo[b], chunk.step[b], ts)
    heads, dim = layer.heads_dim(kvi)
    return i, kvi, chunk.index, n, x.reshape(heads, dim, h.batch, n).transpose(2, 0, 3, 1)


def models_for(container: Container, ids) -> dict:
    """constriction models of the given tables, built once per container (cached on its tables)."""
    ts = container.header.tables
    cache = ts.models
    for t in ids:
        t = int(t)
        if t not in cache:
            try:
                cache[t] = entropy.model_for(ts.freqs_of(t))
            except ValueError as e:   # constriction refuses the table (cannot happen for A >= 2)
                raise FormatError(f"table {t}: not usable by the entropy coder: {e}") from None
    return cache


def decode_reference(container: Container, item: tuple[int, int, int], verify: bool = True,
                     models: dict | None = None) -> Iterator[Block]:
    h = container.header
    k, b0, b1 = item
    chunk = parse_lossy_chunk(container, k, verify)
    roles = h.roles
    for b in range(b0, b1):
        i, kvi, n = chunk.blocks[b]
        layer = h.layers[i]
        na, nd = segment_counts(h, n)
        ids = h.table_ids[i][kvi]
        # Only this block's tables; each model is built once per container, not per work item.
        m = models if models is not None else models_for(container, np.unique(ids))
        ch = layer.channels(kvi)
        anchors = np.empty((ch, na), dtype=np.int32)
        deltas = np.empty((ch, nd), dtype=np.int32)
        # Per-stream Python work is the cost floor of this decoder: plain lists, no per-stream numpy.
        id0 = ids[:, 0].tolist()
        id1 = ids[:, 1].tolist() if roles == 2 else None
        cps = h.channels_per_stream
        fs = chunk.first_stream[b]
        n_s = -(-ch // cps)
        ends = chunk.stream_ends[fs:fs + n_s].tolist()
        lens = chunk.stream_lengths[fs:fs + n_s].tolist()
        words = chunk.words
        for s in range(n_s):
            c0 = s * cps
            c1 = min(c0 + cps, ch)
            if roles == 2:
                segs = [x for c in range(c0, c1) for x in ((na, m[id0[c]]), (nd, m[id1[c]]))]
            else:
                segs = [(na, m[id0[c]]) for c in range(c0, c1)]
            out = entropy.decode_stream(words[ends[s] - lens[s]:ends[s]], segs)
            anchors[c0:c1] = out[0::roles]
            if roles == 2:
                deltas[c0:c1] = out[1::2]
        v = grouping.join(anchors, deltas, h.batch, n, h.group_size, 1 << layer.bits(kvi))
        yield _finish_block(container, chunk, b, v)


LOCKSTEP_SYMBOLS_PER_STEP = 256   # past max_lockstep_steps, each step must yield this many symbols


def lockstep_cost(container: Container) -> tuple[int, int]:
    """(numpy steps, symbols) the lock-step decoder needs for the chunks present, from the header
    alone: per work item, steps = its longest stream (channels per stream * batch * tokens)."""
    h = container.header
    cached = container.walks.get("_lockstep_cost")
    if cached is not None:
        return cached
    C, K = h.chunk_tokens, container.n_chunks
    T = np.array([l.tokens for l in h.layers], dtype=np.int64)
    w = np.array([max(min(h.channels_per_stream, l.channels(0)), min(h.channels_per_stream, l.channels(1)))
                  for l in h.layers], dtype=np.int64) * h.batch
    steps = 0
    per = max(1, (1 << 20) // T.size)
    for k0 in range(0, K, per):                 # [chunks x layers] in slices of ~2^20 cells
        k = np.arange(k0, min(K, k0 + per), dtype=np.int64)[:, None]
        n = np.clip(T[None, :] - k * C, 0, C)
        steps += 2 * int((n * w[None, :]).max(axis=1).sum())   # two work items per chunk
    symbols = h.decoded_bytes(K) // h.elem_bytes
    container.walks["_lockstep_cost"] = (steps, symbols)
    return steps, symbols


def check_lockstep_cost(container: Container) -> None:
    limits = container.limits
    steps, symbols = lockstep_cost(container)
    allowed = limits.max_lockstep_steps + symbols // LOCKSTEP_SYMBOLS_PER_STEP
    if steps > allowed:
        raise LimitExceededError(
            f"the lock-step decoder would take {steps} numpy steps for {symbols} symbols (limit "
            f"{allowed}: DecodeLimits.max_lockstep_steps + 1 per {LOCKSTEP_SYMBOLS_PER_STEP} symbols); "
            f"it is the step-by-step reference of the GPU algorithm: use decoder='reference'")


def decode_lockstep(container: Container, item: tuple[int, int, int], verify: bool = True,
                    tables=None) -> Iterator[Block]:
    """The GPU algorithm in numpy for the blocks of one work item: all their streams advance one
    symbol per step. Cost: O(symbols) element work + O(1) numpy calls per step, the steps bounded
    by check_lockstep_cost; tables are the container's flat uint32 ones (no padding)."""
    h = container.header
    k, b0, b1 = item
    check_lockstep_cost(container)
    ts = h.tables
    chunk = parse_lossy_chunk(container, k, verify)
    cps = h.channels_per_stream
    sched, starts, lengths, nsym, soff, metas = [], [], [], [], [], []
    base = 0
    for b in range(b0, b1):
        i, kvi, n = chunk.blocks[b]
        na, nd = segment_counts(h, n)
        per = na + nd
        ids = h.table_ids[i][kvi]
        ch = ids.shape[0]
        # The block's symbols channel-major (its streams back to back): na of role 0, nd of role 1.
        reps = np.tile(np.array([na, nd][:h.roles], dtype=np.int64), ch)
        sched.append(np.repeat(ids.reshape(-1), reps))
        c0 = np.arange(0, ch, cps, dtype=np.int64)
        c1 = np.minimum(c0 + cps, ch)
        rows = chunk.first_stream[b] + np.arange(c0.size)
        starts.append(chunk.stream_ends[rows] - chunk.stream_lengths[rows])
        lengths.append(chunk.stream_lengths[rows].astype(np.int64))
        nsym.append((c1 - c0) * per)
        soff.append(base + c0 * per)
        metas.append((b, base, ch, na, per))
        base += ch * per
    cat = lambda xs, dt: np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dt)
    syms = entropy.lockstep_decode_flat(chunk.words, cat(starts, np.int64), cat(lengths, np.int64),
                                        cat(nsym, np.int64), cat(soff, np.int64), cat(sched, np.uint16), ts)
    for b, off, ch, na, per in metas:
        i, kvi, n = chunk.blocks[b]
        seg = syms[off:off + ch * per].reshape(ch, per)
        v = grouping.join(seg[:, :na], seg[:, na:], h.batch, n, h.group_size, 1 << h.layers[i].bits(kvi))
        yield _finish_block(container, chunk, b, v)
