"""CPU decoders for lossy containers.

* ``decode_reference``: constriction decodes each stream (the CPU reference).
* ``decode_lockstep``: numpy, all streams of a chunk one symbol-step at a time (the GPU algorithm).
Both produce bit-identical float32 reconstructions; ``api`` converts to the stored dtype.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..errors import StreamError
from ..format.container import Container, LossyChunk, parse_lossy_chunk
from ..format.tables import TOKEN_SCALES
from . import entropy, grouping, quantize
from .layout import segment_counts, stream_groups

Sink = Callable[[int, int, int, int, np.ndarray], None]  # (layer, kv, chunk, n, x [B,H,n,D] f32)


def _finish_block(container: Container, chunk: LossyChunk, b: int, v: np.ndarray, sink: Sink) -> None:
    """v: [channels, batch, n] indices -> check range, dequantize, hand [B, H, n, D] to sink."""
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
    sink(i, kvi, chunk.index, n, x.reshape(heads, dim, h.batch, n).transpose(2, 0, 3, 1))


def decode_reference(container: Container, sink: Sink, verify: bool = True) -> None:
    h = container.header
    models = [entropy.model_for(f) for f in h.freqs]
    for k in range(container.n_chunks):
        chunk = parse_lossy_chunk(container, k, verify)
        for b, (i, kvi, n) in enumerate(chunk.blocks):
            layer = h.layers[i]
            levels = 1 << layer.bits(kvi)
            na, nd = segment_counts(h, n)
            ids = h.table_ids[i][kvi]
            ch = layer.channels(kvi)
            anchors = np.empty((ch, na), dtype=np.int32)
            deltas = np.empty((ch, nd), dtype=np.int32)
            for s, (c0, c1) in enumerate(stream_groups(ch, h.channels_per_stream)):
                si = chunk.first_stream[b] + s
                words = chunk.words[chunk.stream_ends[si] - chunk.stream_lengths[si]:chunk.stream_ends[si]]
                segs = []
                for c in range(c0, c1):
                    segs.append((na, models[ids[c, 0]]))
                    if h.roles == 2:
                        segs.append((nd, models[ids[c, 1]]))
                out = entropy.decode_stream(words, segs)
                for j, c in enumerate(range(c0, c1)):
                    anchors[c] = out[j * h.roles]
                    if h.roles == 2:
                        deltas[c] = out[j * 2 + 1]
            v = grouping.join(anchors, deltas, h.batch, n, h.group_size, levels)
            _finish_block(container, chunk, b, v, sink)


def chunk_schedule(container: Container, chunk: LossyChunk) -> tuple[np.ndarray, np.ndarray, list]:
    """Per stream: the table of every symbol-step, the symbol count, and how steps map back."""
    h = container.header
    plans, n_syms = [], []
    for b, (i, kvi, n) in enumerate(chunk.blocks):
        na, nd = segment_counts(h, n)
        ids = h.table_ids[i][kvi]
        for c0, c1 in stream_groups(h.layers[i].channels(kvi), h.channels_per_stream):
            tables = []
            for c in range(c0, c1):
                tables.append(np.full(na, ids[c, 0], dtype=np.int32))
                if h.roles == 2:
                    tables.append(np.full(nd, ids[c, 1], dtype=np.int32))
            t = np.concatenate(tables)
            plans.append((b, c0, c1, na, nd, t))
            n_syms.append(t.size)
    steps = max(n_syms) if n_syms else 0
    sched = np.zeros((len(plans), steps), dtype=np.int32)
    for r, p in enumerate(plans):
        sched[r, :p[5].size] = p[5]
    return sched, np.array(n_syms, dtype=np.int64), plans


def decode_lockstep(container: Container, sink: Sink, verify: bool = True) -> None:
    h = container.header
    F, Cd, A = entropy.padded_tables(h.freqs, h.cdfs)
    for k in range(container.n_chunks):
        chunk = parse_lossy_chunk(container, k, verify)
        sched, n_syms, plans = chunk_schedule(container, chunk)
        if len(plans) != chunk.stream_lengths.size:
            raise StreamError("stream count mismatch")
        syms = entropy.lockstep_decode(chunk.words, chunk.stream_ends, chunk.stream_lengths,
                                       sched, n_syms, F, Cd, A)
        per_block: dict[int, list] = {}
        for r, (b, c0, c1, na, nd, _) in enumerate(plans):
            per = na + nd
            seg = syms[r, :(c1 - c0) * per].reshape(c1 - c0, per)
            per_block.setdefault(b, []).append((seg[:, :na], seg[:, na:]))
        for b, parts in per_block.items():
            i, kvi, n = chunk.blocks[b]
            anchors = np.concatenate([p[0] for p in parts])
            deltas = np.concatenate([p[1] for p in parts])
            v = grouping.join(anchors, deltas, h.batch, n, h.group_size, 1 << h.layers[i].bits(kvi))
            _finish_block(container, chunk, b, v, sink)
