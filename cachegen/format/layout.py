"""The chunk -> block -> stream layout: the one place it is computed.

A chunk holds, for every layer with tokens in it, a K block then a V block (layer order). A
block of ``ch`` channels is cut into ``ceil(ch / cps)`` streams of ``cps`` consecutive channels;
a stream holds its channels one after the other, each channel's symbols batch-major then token
order (anchors before deltas when anchor-delta grouping is on). Format v2 places every section
of a lossy chunk at an offset that follows from this layout alone (codec_spec/FORMAT.md,
"v2 chunk layout"), so parsers take ``np.frombuffer`` views at those offsets.

Used by the encoder, the CPU decoders, the GPU plan and ``inspect``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np

STEP_PER_CHANNEL, STEP_SHARED = 0, 1


def chunk_token_count(layer_tokens: int, chunk: int, chunk_tokens: int) -> int:
    return max(0, min(chunk_tokens, layer_tokens - chunk * chunk_tokens))


def group_counts(n: int, g: int) -> tuple[int, int]:
    """(anchor/plain, delta) symbols per batch item and channel for a block of n tokens."""
    if g <= 1:
        return n, 0
    na = -(-n // g)
    return na, n - na


def _align4(n: int) -> int:
    return (n + 3) & ~3


@dataclass(frozen=True)
class ChunkLayout:
    """Where everything of one (v2) lossy chunk lies, and which streams carry which channels.

    All arrays are per block (``nb`` blocks) or per stream (``n_streams``); offsets are bytes
    from the chunk start. The parameter arrays of all blocks lie back to back: block j's ``lo``
    values are elements ``ch_off[j] : ch_off[j] + nch[j]`` of the chunk's lo array.
    """
    blocks: tuple[tuple[int, int, int], ...]   # (layer, kv, tokens) per block
    nch: np.ndarray           # int64 [nb] channels per block
    ch_off: np.ndarray        # int64 [nb] first channel of the block in the chunk's lo array
    step_off: np.ndarray      # int64 [nb] first step element of the block
    tok_off: np.ndarray       # int64 [nb] first token-scale code of the block (batch * tokens each)
    first_stream: np.ndarray  # int64 [nb+1] streams of block j: first_stream[j]:first_stream[j+1]
    stream_block: np.ndarray  # int64 [S] block of each stream
    stream_c0: np.ndarray     # int64 [S] first channel of each stream inside its block
    stream_nch: np.ndarray    # int64 [S] channels of each stream
    stream_symbols: np.ndarray  # int64 [S] symbols of each stream
    n_anchor: np.ndarray      # int64 [nb] anchor/plain symbols per channel (batch * na)
    n_delta: np.ndarray       # int64 [nb] delta symbols per channel (batch * nd)
    lo_at: int                # byte offsets of the sections
    step_at: int
    tok_at: int
    dir_at: int
    meta_size: int            # bytes before the stream words (parameters + directory)
    total_channels: int
    total_steps: int
    total_tok: int
    # Packed parameters (EXT_PACKED): no lo / token-scale sections; the directory lists the
    # S data streams, then one parameter stream per block (its lo offsets, then token codes).
    packed: bool = False
    # Compact directory (EXT_COMPACT_DIR): 0 = one u32 cumulative end per stream; G > 0 = one u32
    # base per segment of G streams (at dir_at), then a u16 end-minus-base per stream (at rel_at).
    dir_group: int = 0

    @property
    def n_dir(self) -> int:
        """Directory entries: the data streams, plus one parameter stream per block if packed."""
        return self.n_streams + (self.nb if self.packed else 0)

    @property
    def n_seg(self) -> int:
        """Segments of a compact directory (0 for a plain one)."""
        return -(-self.n_dir // self.dir_group) if self.dir_group else 0

    @property
    def rel_at(self) -> int:
        """Byte offset of a compact directory's u16 entries (== dir_at for a plain one)."""
        return self.dir_at + 4 * self.n_seg

    @property
    def n_streams(self) -> int:
        return int(self.stream_block.size)

    @property
    def nb(self) -> int:
        return len(self.blocks)


def chunk_blocks(layer_tokens: Sequence[int], k: int, chunk_tokens: int) -> tuple[tuple[int, int, int], ...]:
    out = []
    for i, t in enumerate(layer_tokens):
        n = chunk_token_count(t, k, chunk_tokens)
        if n:
            out.extend((i, kv, n) for kv in (0, 1))
    return tuple(out)


@lru_cache(maxsize=256)
def _build(blocks: tuple, channels: tuple, batch: int, group_size: int, cps: int, param_bytes: int,
           step_mode: int, token_scaling: int, packed: bool = False, dir_group: int = 0) -> ChunkLayout:
    nb = len(blocks)
    nch = np.array([channels[i][kv] for i, kv, _ in blocks], dtype=np.int64)
    n = np.array([t for _, _, t in blocks], dtype=np.int64)
    na = np.empty(nb, dtype=np.int64)
    nd = np.empty(nb, dtype=np.int64)
    for j, t in enumerate(n.tolist()):
        na[j], nd[j] = group_counts(t, group_size)
    ch_off = np.concatenate([[0], np.cumsum(nch)[:-1]]).astype(np.int64) if nb else np.zeros(0, np.int64)
    total_ch = int(nch.sum())
    if step_mode == STEP_SHARED:
        step_off, total_steps = np.arange(nb, dtype=np.int64), nb
    else:
        step_off, total_steps = ch_off.copy(), total_ch
    ntok = batch * n if token_scaling else np.zeros(nb, dtype=np.int64)
    tok_off = np.concatenate([[0], np.cumsum(ntok)[:-1]]).astype(np.int64) if nb else np.zeros(0, np.int64)
    total_tok = int(ntok.sum())
    ns = -(-nch // cps)
    first = np.concatenate([[0], np.cumsum(ns)]).astype(np.int64)
    S = int(first[-1])
    sblk = np.repeat(np.arange(nb, dtype=np.int64), ns)
    sidx = np.arange(S, dtype=np.int64) - first[sblk]
    c0 = sidx * cps
    snch = np.minimum(cps, nch[sblk] - c0)
    ssym = snch * batch * (na + nd)[sblk]
    lo_at = 0
    step_at = lo_at + (0 if packed else param_bytes * total_ch)
    tok_at = step_at + param_bytes * total_steps
    dir_at = _align4(tok_at + (0 if packed else total_tok))
    n_dir = S + (nb if packed else 0)
    if dir_group:
        meta = dir_at + 4 * (-(-n_dir // dir_group)) + _align4(2 * n_dir)
    else:
        meta = dir_at + 4 * n_dir
    for a in (nch, ch_off, step_off, tok_off, first, sblk, c0, snch, ssym, na, nd):
        a.setflags(write=False)
    return ChunkLayout(blocks, nch, ch_off, step_off, tok_off, first, sblk, c0, snch, ssym,
                       batch * na, batch * nd, lo_at, step_at, tok_at, dir_at, meta, total_ch,
                       total_steps, total_tok, bool(packed), int(dir_group))


def _key(h) -> tuple:
    return (tuple(l.tokens for l in h.layers), h.chunk_tokens,
            tuple((l.channels(0), l.channels(1)) for l in h.layers), h.batch, h.group_size,
            h.channels_per_stream, 2 if h.param_dtype == 1 else 4, h.step_mode, h.token_scaling,
            getattr(h, "packed", None) is not None, int(getattr(h, "dir_group", 0) or 0))


def chunk_layouts(header) -> list[ChunkLayout]:
    """The layout of every chunk of a (v2) header, computed once per distinct block set
    (a long cache has only a handful of distinct ones), and memoized per cache shape
    (restoring another cache of the same shape costs a dict lookup)."""
    return list(_chunk_layouts(*_key(header))[0])


def chunk_meta_sizes(header) -> np.ndarray:
    """Each chunk's metadata size implied by the layout (read-only int64 array, memoized)."""
    return _chunk_layouts(*_key(header))[1]


@lru_cache(maxsize=64)
def _chunk_layouts(tokens: tuple, C: int, channels: tuple, batch: int, group_size: int, cps: int, pb: int,
                   step_mode: int, token_scaling: int, packed: bool = False, dir_group: int = 0) -> tuple:
    T = np.array(tokens, dtype=np.int64)
    ks = np.arange(-(-int(T.max()) // C), dtype=np.int64)
    n = np.clip(T[None, :] - ks[:, None] * C, 0, C)          # [chunks, layers] tokens per block
    distinct: dict = {}
    out = []
    for r in map(tuple, n.tolist()):
        lay = distinct.get(r)
        if lay is None:
            blocks = tuple((i, kv, t) for i, t in enumerate(r) if t for kv in (0, 1))
            lay = distinct[r] = _build(blocks, channels, batch, group_size, cps, pb, step_mode, token_scaling,
                                       packed, dir_group)
        out.append(lay)
    meta = np.array([lay.meta_size for lay in out], dtype=np.int64)
    meta.setflags(write=False)
    return tuple(out), meta


def chunk_layout(header, k: int) -> ChunkLayout:
    """The layout of lossy chunk k of a (v2) header (memoized on the header)."""
    cache = getattr(header, "_layouts", None)
    if cache is None or len(cache) <= k:
        cache = chunk_layouts(header)
        try:
            header._layouts = cache
        except AttributeError:
            pass
    return cache[k]


def stream_groups(channels: int, per_stream: int) -> list[tuple[int, int]]:
    return [(s, min(s + per_stream, channels)) for s in range(0, channels, per_stream)]
