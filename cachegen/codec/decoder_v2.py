"""CPU reference decoder for format v2 (constriction decodes every stream).

Work items are whole chunks; constriction models are built once per container and only for
the tables a chunk references (cached on the container), so cost is linear in the bytes.
Output: float32 blocks [B, H, n, D], exactly fl32(fl32(fl32(step * v) + lo) * token_scale).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ..errors import StreamError
from ..format.tables import TOKEN_SCALES
from ..format.v2 import ContainerV2, chunk_view
from . import entropy, grouping, params

Block = tuple[int, int, int, int, np.ndarray]  # (layer, kv, chunk, n, x float32 [B, H, n, D])


def _models(c: ContainerV2) -> dict:
    return c.cache.setdefault("models", {})


def _model(c: ContainerV2, t: int):
    m = _models(c)
    mod = m.get(t)
    if mod is None:
        mod = m[t] = entropy.model_for(c.header.table_freqs24(t))
    return mod


def decode_chunk(c: ContainerV2, k: int, verify: bool = True) -> Iterator[Block]:
    h = c.header
    v = chunk_view(c, k, verify)
    lay = v.layout
    R = h.roles
    lo_all, tok_all = params.chunk_params(c, v, _models(c))
    st_all = v.step.astype(np.float32)
    for j, (i, kvi, n) in enumerate(lay.blocks):
        layer = h.layers[i]
        ch = int(lay.nch[j])
        na, nd = int(lay.n_anchor[j]), int(lay.n_delta[j])
        ids = h.table_ids[i][kvi]
        anchors = np.empty((ch, na), dtype=np.int32)
        deltas = np.empty((ch, nd), dtype=np.int32)
        for s in range(int(lay.first_stream[j]), int(lay.first_stream[j + 1])):
            c0 = int(lay.stream_c0[s])
            c1 = c0 + int(lay.stream_nch[s])
            segs = []
            for cc in range(c0, c1):
                segs.append((na, _model(c, int(ids[cc, 0]))))
                if R == 2:
                    segs.append((nd, _model(c, int(ids[cc, 1]))))
            start = int(v.ends[s - 1]) if s else 0
            out = entropy.decode_stream(v.words[start:int(v.ends[s])], segs)
            anchors[c0:c1] = out[0::R]
            if R == 2:
                deltas[c0:c1] = out[1::2]
        levels = 1 << layer.bits(kvi)
        q = grouping.join(anchors, deltas, h.batch, n, h.group_size, levels)
        if q.size and (int(q.min()) < 0 or int(q.max()) >= levels):
            raise StreamError(f"chunk {k} layer {i}: reconstructed index outside [0, {levels - 1}]")
        a = int(lay.ch_off[j])
        lo = lo_all[a:a + ch]
        st = st_all[int(lay.step_off[j]):int(lay.step_off[j]) + (1 if h.step_mode == 1 else ch)]
        x = q.astype(np.float32)
        x *= np.broadcast_to(st, (ch,)).reshape(ch, 1, 1)
        x += lo.reshape(ch, 1, 1)
        if h.token_scaling:
            e = tok_all[int(lay.tok_off[j]):int(lay.tok_off[j]) + h.batch * n]
            x *= TOKEN_SCALES[e].reshape(1, h.batch, n)
        heads, dim = layer.heads_dim(kvi)
        yield i, kvi, k, n, x.reshape(heads, dim, h.batch, n).transpose(2, 0, 3, 1)
