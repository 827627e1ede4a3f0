"""CPU decoders for lossy containers.

* ``reference``: constriction decodes each stream (the CPU reference).
* ``lockstep``: numpy, all streams of a chunk one symbol-step at a time (the GPU algorithm).
Both produce bit-identical float32 reconstructions. Work is split into items of
(chunk, first block, end block) that can run on separate cores.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import StreamError
from ..format.container import Container, LossyChunk, chunk_blocks, parse_lossy_chunk
from ..format.tables import TOKEN_SCALES
from . import entropy, grouping, quantize
from .layout import segment_counts, stream_groups

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


def _stream_words(chunk: LossyChunk, si: int) -> np.ndarray:
    return chunk.words[chunk.stream_ends[si] - chunk.stream_lengths[si]:chunk.stream_ends[si]]


def decode_reference(container: Container, item: tuple[int, int, int], verify: bool = True,
                     models: list | None = None) -> Iterator[Block]:
    h = container.header
    k, b0, b1 = item
    if models is None:
        models = [entropy.model_for(f) for f in h.freqs]
    chunk = parse_lossy_chunk(container, k, verify)
    roles = h.roles
    for b in range(b0, b1):
        i, kvi, n = chunk.blocks[b]
        layer = h.layers[i]
        na, nd = segment_counts(h, n)
        ids = h.table_ids[i][kvi]
        ch = layer.channels(kvi)
        anchors = np.empty((ch, na), dtype=np.int32)
        deltas = np.empty((ch, nd), dtype=np.int32)
        for s, (c0, c1) in enumerate(stream_groups(ch, h.channels_per_stream)):
            segs = []
            for c in range(c0, c1):
                segs.append((na, models[ids[c, 0]]))
                if roles == 2:
                    segs.append((nd, models[ids[c, 1]]))
            out = entropy.decode_stream(_stream_words(chunk, chunk.first_stream[b] + s), segs)
            anchors[c0:c1] = out[0::roles]
            if roles == 2:
                deltas[c0:c1] = out[1::2]
        v = grouping.join(anchors, deltas, h.batch, n, h.group_size, 1 << layer.bits(kvi))
        yield _finish_block(container, chunk, b, v)


def chunk_schedule(container: Container, chunk: LossyChunk, b0: int = 0, b1: int | None = None):
    """For the streams of blocks [b0, b1): the table of every symbol-step, symbol counts, plans."""
    h = container.header
    b1 = len(chunk.blocks) if b1 is None else b1
    plans, n_syms, rows = [], [], []
    for b in range(b0, b1):
        i, kvi, n = chunk.blocks[b]
        na, nd = segment_counts(h, n)
        ids = h.table_ids[i][kvi]
        for s, (c0, c1) in enumerate(stream_groups(h.layers[i].channels(kvi), h.channels_per_stream)):
            tables = []
            for c in range(c0, c1):
                tables.append(np.full(na, ids[c, 0], dtype=np.int32))
                if h.roles == 2:
                    tables.append(np.full(nd, ids[c, 1], dtype=np.int32))
            t = np.concatenate(tables)
            plans.append((b, c0, c1, na, nd, t))
            n_syms.append(t.size)
            rows.append(chunk.first_stream[b] + s)
    steps = max(n_syms) if n_syms else 0
    sched = np.zeros((len(plans), steps), dtype=np.int32)
    for r, p in enumerate(plans):
        sched[r, :p[5].size] = p[5]
    return sched, np.array(n_syms, dtype=np.int64), plans, np.array(rows, dtype=np.int64)


def decode_lockstep(container: Container, item: tuple[int, int, int], verify: bool = True,
                    tables=None) -> Iterator[Block]:
    h = container.header
    k, b0, b1 = item
    F, Cd, A = tables if tables is not None else entropy.padded_tables(h.freqs, h.cdfs)
    chunk = parse_lossy_chunk(container, k, verify)
    sched, n_syms, plans, rows = chunk_schedule(container, chunk, b0, b1)
    syms = entropy.lockstep_decode(chunk.words, chunk.stream_ends[rows], chunk.stream_lengths[rows],
                                   sched, n_syms, F, Cd, A)
    per_block: dict[int, list] = {}
    for r, (b, c0, c1, na, nd, _) in enumerate(plans):
        seg = syms[r, :(c1 - c0) * (na + nd)].reshape(c1 - c0, na + nd)
        per_block.setdefault(b, []).append((seg[:, :na], seg[:, na:]))
    for b in range(b0, b1):
        parts = per_block[b]
        i, kvi, n = chunk.blocks[b]
        anchors = np.concatenate([p[0] for p in parts])
        deltas = np.concatenate([p[1] for p in parts])
        v = grouping.join(anchors, deltas, h.batch, n, h.group_size, 1 << h.layers[i].bits(kvi))
        yield _finish_block(container, chunk, b, v)
