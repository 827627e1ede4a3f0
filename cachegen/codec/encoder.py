"""CPU encoder: quantize -> group -> build tables -> rANS streams -> container."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..config import CodecConfig
from ..errors import InputError
from ..format.container import MODE_LOSSY, Header, LayerInfo, build_container, pack_lossy_chunk, chunk_token_count
from ..format.tables import TOKEN_SCALES, expand_counts
from . import entropy, grouping, quantize
from .layout import channels_first, describe, segment_counts, stream_groups, to_float32

Progress = Optional[Callable[[int, int], None]]


def encode_lossy(kv: Sequence[Sequence[Any]], config: CodecConfig, progress: Progress = None) -> bytes:
    infos, batch, dtype = describe(kv)
    kbits, vbits = config.layer_bits(len(infos))
    infos = [LayerInfo(l.tokens, l.k_heads, l.k_dim, l.v_heads, l.v_dim, kb, vb)
             for l, kb, vb in zip(infos, kbits, vbits)]
    C, g = config.chunk_tokens, config.group_size
    header = Header(mode=MODE_LOSSY, dtype=dtype, batch=batch, chunk_tokens=C, layers=infos,
                    group_size=g, channels_per_stream=config.channels_per_stream,
                    token_scaling=int(bool(config.token_scaling)))
    roles = header.roles

    # Pass 1: quantize every (layer, kv, chunk); collect per-channel symbol histograms.
    arrays, max_abs = [], 0.0
    for i, (k, v) in enumerate(kv):
        pair = []
        for name, t in (("key", k), ("value", v)):
            x = to_float32(t)
            if not np.isfinite(x).all():
                raise InputError(f"layer {i} {name}: non-finite values (use the lossless preset)")
            max_abs = max(max_abs, float(np.abs(x).max()))
            pair.append(channels_first(x))
        arrays.append(pair)
    header.param_dtype = quantize.choose_param_dtype(max_abs)

    params = {}     # (layer, kv, chunk) -> (lo, step)
    exps = {}       # (layer, kv, chunk) -> u8 token scale codes [batch * n]
    symbols = {}    # (layer, kv, chunk) -> (anchors, deltas) uint16 [channels, n]
    hists = {}      # (layer, kv) -> [roles] of [channels, A] counts
    for i, l in enumerate(infos):
        for kvi in (0, 1):
            x, bits = arrays[i][kvi], l.bits(kvi)
            levels = 1 << bits
            ch = x.shape[0]
            alph = [levels, 2 * levels - 1]
            hist = [np.zeros((ch, alph[r]), dtype=np.int64) for r in range(roles)]
            for k in range(header.n_chunks):
                n = chunk_token_count(l.tokens, k, C)
                if not n:
                    break
                xk = x[:, :, k * C:k * C + n]
                if header.token_scaling:
                    e = quantize.token_scale_codes(xk.reshape(ch, -1))
                    exps[i, kvi, k] = e
                    xk = xk / TOKEN_SCALES[e].reshape(1, batch, n)
                lo, step = quantize.quantizer_params(xk.reshape(ch, -1), bits, header.param_dtype,
                                                     float(config.scale_sharing))
                q = quantize.quantize(xk.reshape(ch, -1), lo, step, bits).reshape(xk.shape)
                a, d = grouping.split(q, g, levels)
                params[i, kvi, k] = (lo, step)
                symbols[i, kvi, k] = (a.astype(np.uint16), d.astype(np.uint16))
                for r, s in enumerate((a, d)[:roles]):
                    if s.size:
                        hist[r] += np.bincount((np.arange(ch)[:, None] * alph[r] + s).ravel(),
                                               minlength=ch * alph[r]).reshape(ch, alph[r])
            hists[i, kvi] = hist
        arrays[i] = None  # free as we go

    # Table dictionary: one set of tables per (kv, role, alphabet) class, chosen per channel.
    table_counts: list[np.ndarray] = []
    table_ids = [[np.zeros((l.channels(kvi), roles), dtype=np.uint16) for kvi in (0, 1)] for l in infos]
    classes: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for (i, kvi), hist in hists.items():
        for r in range(roles):
            classes.setdefault((kvi, r, hist[r].shape[1]), []).append((i, r))
    for (kvi, r, a), members in sorted(classes.items()):
        H = np.concatenate([hists[i, kvi][rr] for i, rr in members])
        if H.sum() == 0:       # e.g. chunks of one token have no deltas
            H[:, 0] = 1
        counts, assign = entropy.build_dictionary(H, config.tables_per_class)
        base = len(table_counts)
        table_counts.extend(counts)
        pos = 0
        for i, rr in members:
            ch = infos[i].channels(kvi)
            table_ids[i][kvi][:, rr] = base + assign[pos:pos + ch]
            pos += ch
    if len(table_counts) > 65535:
        raise InputError("too many probability tables for the format (reduce tables_per_class)")
    header.table_counts, header.table_ids = table_counts, table_ids
    models = [entropy.model_for(expand_counts(c)) for c in table_counts]

    # Pass 2: entropy-code each chunk's streams.
    payloads = []
    for k in range(header.n_chunks):
        los, steps, streams, es = [], [], [], []
        for i, l in enumerate(infos):
            if not chunk_token_count(l.tokens, k, C):
                continue
            for kvi in (0, 1):
                lo, step = params.pop((i, kvi, k))
                a, d = symbols.pop((i, kvi, k))
                los.append(lo)
                es.append(exps.pop((i, kvi, k), None))
                steps.append(step)
                ids = table_ids[i][kvi]
                a = a.astype(np.int32)
                d = d.astype(np.int32)
                for c0, c1 in stream_groups(l.channels(kvi), config.channels_per_stream):
                    segs = []
                    for c in range(c0, c1):
                        segs.append((a[c], models[ids[c, 0]]))
                        if roles == 2:
                            segs.append((d[c], models[ids[c, 1]]))
                    streams.append(entropy.encode_stream(segs))
        payloads.append(pack_lossy_chunk(header, k, los, steps, streams, es))
        if progress:
            progress(k + 1, header.n_chunks)
    return build_container(header, payloads)
