"""CPU encoder: quantize -> group -> build tables -> rANS streams -> container.

Pass 1 (per layer, in parallel): token scales, quantizer parameters, indices, symbol histograms.
Then the table dictionary (one clustering per (K/V, role, alphabet) class).
Pass 2 (per chunk, in parallel): one rANS stream per group of channels.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..config import CodecConfig
from ..errors import InputError
from ..format.container import (MODE_LOSSLESS, MODE_LOSSY, Header, LayerInfo, build_container, chunk_token_count,
                                pack_lossy_chunk)
from ..format.tables import TOKEN_SCALES, expand_counts
from . import entropy, grouping, params, quantize
from .layout import channels_first, describe, host_array, stream_groups
from .parallel import parallel_imap, parallel_map, worker_count

Progress = Optional[Callable[[int, int], None]]


def _to_f32(a: np.ndarray, bf16: bool) -> np.ndarray:
    if bf16:  # bfloat16 bit patterns -> float32 (exact)
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32, copy=False)


def _quantize_layer(state: tuple, i: int) -> dict:
    """Pass 1 for one layer: everything pass 2 and the dictionary need."""
    hosts, header, config, param_dtype = state[:4]
    pack = len(state) > 4 and bool(state[4])   # format v2 packed parameters (codec.params)
    rdo = state[5] if len(state) > 5 else None   # (lambda, costs[i][kvi] [ch, levels] bits): RD quantization
    l = header.layers[i]
    C, g, roles, batch = header.chunk_tokens, header.group_size, header.roles, header.batch
    out = {"params": {}, "exps": {}, "symbols": {}, "hists": {}, "max_abs": 0.0, "offsets": {}, "packable": pack}
    gains = config.layer_gains(len(header.layers))
    for kvi in (0, 1):
        a, bf16 = hosts[i][kvi]
        x = channels_first(_to_f32(a, bf16))
        bits = l.bits(kvi)
        levels = 1 << bits
        ch = x.shape[0]
        alph = (levels, 2 * levels - 1)
        hist = [np.zeros((ch, alph[r]), dtype=np.int64) for r in range(roles)]
        offsets = [np.arange(ch, dtype=np.int64)[:, None] * alph[r] for r in range(roles)]
        for k in range(header.n_chunks):
            n = chunk_token_count(l.tokens, k, C)
            if not n:
                break
            xk = x[:, :, k * C:k * C + n].reshape(ch, batch * n)
            lo_raw, hi_raw = float(xk.min()), float(xk.max())
            if not (np.isfinite(lo_raw) and np.isfinite(hi_raw)):
                raise InputError(f"layer {i} {'kv'[kvi]}: non-finite values (use the lossless preset)")
            out["max_abs"] = max(out["max_abs"], abs(lo_raw), abs(hi_raw))
            if header.token_scaling:
                e = quantize.token_scale_codes(xk)
                out["exps"][kvi, k] = e
                xk = xk / TOKEN_SCALES[e][None, :]
            # The parameters must hold the values actually quantized (scaled ones may still be
            # large: scale codes stop at 2**(127/8)): fp16 ones give up early (the caller redoes
            # the cache with fp32 ones); beyond fp32 parameters the cache cannot be coded.
            m = max(out["max_abs"], float(np.abs(xk).max()) if xk.size else 0.0)
            if param_dtype == 1 and m >= quantize.FP16_SAFE:
                out["max_abs"] = m
                return out
            if m >= quantize.FP32_SAFE:
                raise InputError(f"layer {i} {'kv'[kvi]}: values up to {m:.3g} in magnitude are beyond what "
                                 f"the quantizer parameters can hold (|x| < {quantize.FP32_SAFE:.0e}; "
                                 "use the lossless preset)")
            lo, step = quantize.quantizer_params(xk, bits, param_dtype, float(config.scale_sharing),
                                                 gains[kvi][i])
            if out["packable"]:
                mo = params.fit_offsets(xk, step, bits, params.FRAC_BITS, params.OFFSET_PHASES) \
                    if bool(np.all(step == step[0])) else None
                if mo is None:
                    out["packable"] = False      # the caller redoes the cache unpacked
                else:
                    out["offsets"][kvi, k] = mo
                    lo = params.lo_values(step[0], mo, params.FRAC_BITS)
            if rdo is not None and rdo[1][i][kvi] is not None:
                q = quantize.quantize_rd(xk, lo, step, bits, rdo[1][i][kvi], rdo[0]).reshape(ch, batch, n)
            else:
                q = quantize.quantize(xk, lo, step, bits).reshape(ch, batch, n)
            syms = grouping.split(q, g, levels)
            out["params"][kvi, k] = (lo, step)
            out["symbols"][kvi, k] = tuple(s.astype(np.uint16) for s in syms)
            for r in range(roles):
                if syms[r].size:
                    hist[r] += np.bincount((offsets[r] + syms[r]).ravel(),
                                           minlength=ch * alph[r]).reshape(ch, alph[r])
        out["hists"][kvi] = hist
    return out


def _code_chunk(state: tuple, k: int) -> bytes:
    """Pass 2 for one chunk: entropy-code every stream and pack the chunk."""
    header, layers_out, table_ids, freqs, cps = state
    models = [entropy.model_for(f) for f in freqs]
    roles = header.roles
    los, steps, streams, es = [], [], [], []
    for i, l in enumerate(header.layers):
        if not chunk_token_count(l.tokens, k, header.chunk_tokens):
            continue
        res = layers_out[i]
        for kvi in (0, 1):
            lo, step = res["params"][kvi, k]
            los.append(lo)
            steps.append(step)
            es.append(res["exps"].get((kvi, k)))
            a, d = (s.astype(np.int32) for s in res["symbols"][kvi, k])
            ids = table_ids[i][kvi]
            for c0, c1 in stream_groups(l.channels(kvi), cps):
                segs = []
                for c in range(c0, c1):
                    segs.append((a[c], models[ids[c, 0]]))
                    if roles == 2:
                        segs.append((d[c], models[ids[c, 1]]))
                streams.append(entropy.encode_stream(segs))
    return pack_lossy_chunk(header, k, los, steps, streams, es)


def _build_tables(header, layers_out: list, fit):
    """Tables per (K/V, role, alphabet) class: ``fit(H)`` turns the class's channel histograms
    [channels, A] into (tables, table index per channel); returns all tables and the ids."""
    roles = header.roles
    tables: list[np.ndarray] = []
    table_ids = [[np.zeros((l.channels(kvi), roles), dtype=np.uint16) for kvi in (0, 1)]
                 for l in header.layers]
    classes: dict[tuple[int, int, int], list[int]] = {}
    for i, res in enumerate(layers_out):
        for kvi in (0, 1):
            for r in range(roles):
                classes.setdefault((kvi, r, res["hists"][kvi][r].shape[1]), []).append(i)
    for (kvi, r, _a), members in sorted(classes.items()):
        H = np.concatenate([layers_out[i]["hists"][kvi][r] for i in members])
        if H.sum() == 0:       # e.g. chunks of one token have no deltas
            H[:, 0] = 1
        found, assign = fit(H)
        base = len(tables)
        tables.extend(found)
        pos = 0
        for i in members:
            ch = header.layers[i].channels(kvi)
            table_ids[i][kvi][:, r] = base + assign[pos:pos + ch]
            pos += ch
    if len(tables) > 65535:
        raise InputError("too many probability tables for the format (reduce tables_per_class)")
    return tables, table_ids


def encode_lossy(kv: Sequence[Sequence[Any]], config: CodecConfig, progress: Progress = None) -> bytes:
    infos, batch, dtype = describe(kv)
    kbits, vbits = config.layer_bits(len(infos))
    infos = [LayerInfo(l.tokens, l.k_heads, l.k_dim, l.v_heads, l.v_dim, kb, vb)
             for l, kb, vb in zip(infos, kbits, vbits)]
    header = Header(mode=MODE_LOSSY, dtype=dtype, batch=batch, chunk_tokens=config.chunk_tokens,
                    layers=infos, group_size=config.group_size,
                    channels_per_stream=config.channels_per_stream,
                    token_scaling=int(bool(config.token_scaling)))
    hosts = [tuple(host_array(t) for t in pair) for pair in kv]
    work = header.decoded_bytes()

    # Pass 1 stays in this process: it is cheap, and shipping its symbols back from workers
    # costs more than it saves (measured: 2 workers slower than 1 at 1K tokens).
    header.param_dtype = 1
    layers_out = parallel_map(_quantize_layer, (hosts, header, config, 1), range(len(infos)), 1)
    if max(r["max_abs"] for r in layers_out) >= quantize.FP16_SAFE:
        header.param_dtype = 2  # values too large for fp16 parameters: redo with fp32 ones
        layers_out = parallel_map(_quantize_layer, (hosts, header, config, 2), range(len(infos)), 1)

    header.table_counts, header.table_ids = _build_tables(
        header, layers_out, lambda H: entropy.build_dictionary(H, config.tables_per_class))
    freqs = [expand_counts(c) for c in header.table_counts]

    state = (header, layers_out, header.table_ids, freqs, config.channels_per_stream)
    payloads = []
    # one pool for every chunk (see code_chunks_v2), progress as the results come in
    for c in parallel_imap(_code_chunk, state, range(header.n_chunks), worker_count(work, header.n_chunks)):
        payloads.append(c)
        if progress:
            progress(len(payloads), header.n_chunks)
    return build_container(header, payloads)


# ------------------------------------------------------------------------------ format v2

def quantize_units(p: np.ndarray, table_bits: int) -> np.ndarray:
    """Probabilities -> integer frequencies >= 1 summing to 2**table_bits (largest remainder)."""
    p = np.asarray(p, dtype=np.float64)
    a, m = p.size, 1 << table_bits
    if a > m:
        raise InputError(f"alphabet of {a} symbols does not fit {table_bits}-bit tables")
    s = p.sum()
    q = (p / s if s > 0 else np.full(a, 1.0 / a)) * (m - a)
    f = np.floor(q).astype(np.int64)
    rem = int((m - a) - f.sum())
    if rem > 0:
        f[np.argsort(-(q - f), kind="stable")[:rem]] += 1
    return f + 1


def _fit_tables_v2(H: np.ndarray, tables_per_class: int, table_bits: int):
    """One class of v2 tables: cluster, quantize to table_bits, then give each channel the table
    that codes it in the fewest bits (unused tables dropped)."""
    H = H.astype(np.float64)
    counts, _ = entropy.build_dictionary(H, tables_per_class)
    cand = [quantize_units(c.astype(np.float64), table_bits) for c in counts]
    logp = np.log2(np.stack(cand).astype(np.float64) / (1 << table_bits))
    assign = np.argmin(H @ (-logp).T, axis=1)
    used = np.unique(assign)
    remap = np.full(len(cand), -1)
    remap[used] = np.arange(used.size)
    return [cand[j] for j in used], remap[assign]


def _code_chunk_v2(state: tuple, k: int) -> tuple[bytes, int]:
    from ..format import v2 as fmt2
    header, layers_out, freqs = state
    lay = header.layout(k)
    models = {}

    def model(t: int):
        m = models.get(t)
        if m is None:
            m = models[t] = entropy.model_for(freqs[t])
        return m

    cps, roles, packed = header.channels_per_stream, header.roles, header.packed
    los, steps, toks, streams, pstreams = [], [], [], [], []
    for (i, kvi, n) in lay.blocks:
        res = layers_out[i]
        lo, step = res["params"][kvi, k]
        los.append(lo)
        steps.append(step[:1] if header.step_mode == 1 else step)
        tok = res["exps"][kvi, k] if header.token_scaling else None
        if tok is not None:
            toks.append(tok)
        if packed is not None:
            pstreams.append(params.encode_block(
                res["offsets"][kvi, k], tok, packed.frac_bits, model(packed.lo_tables[kvi]),
                model(packed.frac_tables[kvi]) if packed.frac_bits else None,
                model(packed.tok_tables[kvi]) if tok is not None else None))
        a, d = (s.astype(np.int32) for s in res["symbols"][kvi, k])
        ids = header.table_ids[i][kvi]
        for c0, c1 in stream_groups(header.layers[i].channels(kvi), cps):
            segs = []
            for c in range(c0, c1):
                for r, sy in ((0, a), (1, d))[:roles]:
                    segs.append((sy[c], model(int(ids[c, r]))))
            streams.append(entropy.encode_stream(segs))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    if packed is not None:
        return fmt2.pack_lossy_chunk(lay, header.param_dtype, None, cat(steps), None, streams, pstreams)
    return fmt2.pack_lossy_chunk(lay, header.param_dtype, cat(los), cat(steps),
                                 cat(toks).astype(np.uint8) if toks else None, streams)


def quantize_v2(kv: Sequence[Any], config: CodecConfig, extensions: Sequence[Any] = ()) -> tuple[Any, list]:
    """Pass 1 of a format v2 lossy encode: the header (without tables) and each layer's indices
    and parameters, i.e. everything that fixes the decoded cache. Shared by
    :func:`encode_lossy_v2` and ``cachegen.guard``."""
    from ..format import v2 as fmt2
    infos, batch, dtype = describe(kv)
    kbits, vbits = config.layer_bits(len(infos))
    infos = [LayerInfo(l.tokens, l.k_heads, l.k_dim, l.v_heads, l.v_dim, kb, vb)
             for l, kb, vb in zip(infos, kbits, vbits)]
    table_bits = int(getattr(config, "table_bits", 12))
    header = fmt2.HeaderV2(mode=MODE_LOSSY, dtype=dtype, batch=batch, chunk_tokens=config.chunk_tokens,
                           layers=infos, group_size=config.group_size,
                           channels_per_stream=config.channels_per_stream,
                           token_scaling=int(bool(config.token_scaling)), table_bits=table_bits,
                           extensions=list(extensions))
    # Alphabets must fit the tables: deltas of b-bit symbols need 2**(b+1) - 1 slots.
    need = max(max(kbits), max(vbits)) + (1 if config.group_size > 1 else 0)
    if need > table_bits:
        raise InputError(f"{need}-bit alphabets need table_bits >= {need} (config has {table_bits})")
    hosts = [tuple(host_array(t) for t in pair) for pair in kv]
    pack = bool(getattr(config, "packed_params", False))
    layers_out: list = []
    for attempt in range(2):
        header.param_dtype = 1
        layers_out = parallel_map(_quantize_layer, (hosts, header, config, 1, pack), range(len(infos)), 1)
        if max(r["max_abs"] for r in layers_out) >= quantize.FP16_SAFE:
            header.param_dtype = 2
            layers_out = parallel_map(_quantize_layer, (hosts, header, config, 2, pack), range(len(infos)), 1)
        # Packed parameters need every block packable and their symbols within the tables'
        # alphabets; otherwise the cache is coded with stored parameters (same format, larger).
        if not pack or _packable(header, layers_out):
            break
        pack = False
    lam = float(getattr(config, "rd_lambda", 0.0))
    if lam > 0 and header.roles == 1:
        # RD quantization: each value's level between the two nearest, by squared error (in
        # steps) + lam * its cost in bits under the tables pass 1's histograms give; then the
        # tables are refitted to the new symbols (by the caller). Decoders see ordinary levels.
        costs = _level_costs(header, layers_out, config)
        layers_out = parallel_map(_quantize_layer, (hosts, header, config, header.param_dtype, pack, (lam, costs)),
                                  range(len(infos)), 1)
    # One step per block when every block's channels share it (scale_sharing=1), else per channel.
    shared = all(p[1].size == 0 or bool(np.all(p[1] == p[1][0]))
                 for r in layers_out for p in r["params"].values())
    header.step_mode = 1 if shared else 0
    header.packed = _PACK_PENDING if pack and shared else None
    header.dir_group = directory_group(header) if getattr(config, "compact_directory", False) else 0
    header._layouts = None
    return header, layers_out


def _level_costs(header: Any, layers_out: list, config: CodecConfig) -> list:
    """Per (layer, K/V): [channels, levels] code lengths in bits of each level under the table
    pass 1's histograms assign to the channel."""
    tb = int(getattr(config, "table_bits", 12))
    units, ids = _build_tables(header, layers_out, lambda H: _fit_tables_v2(H, config.tables_per_class, tb))
    bits = [-np.log2(u.astype(np.float64) / (1 << tb)) for u in units]
    return [[np.stack([bits[t] for t in ids[i][kvi][:, 0]]) if ids[i][kvi].size else None for kvi in (0, 1)]
            for i in range(len(header.layers))]


MIN_DIR_GROUP = 8    # below this a segment's u32 base costs more than the u16 entries save


def directory_group(header: Any) -> int:
    """Streams per segment of a compact directory (EXT_COMPACT_DIR), 0 when it cannot be used:
    the largest power of two whose segments cannot span over 65535 words, by a bound on each
    stream's words that holds before coding (a symbol costs at most table_bits bits, as every
    frequency is at least 1 of 2**table_bits; plus the rANS start, final state and word rounding),
    so the layout is fixed before pass 2 codes the chunks in parallel."""
    from ..format.extensions import CompactDirectory
    from ..format.layout import chunk_layouts
    most = 0
    for lay in chunk_layouts(header):
        sym = lay.stream_symbols
        m = int(sym.max()) if sym.size else 0
        if header.packed is not None and lay.nb:
            per = lay.nch * (2 if params.FRAC_BITS else 1)
            if header.token_scaling:
                per = per + header.batch * np.array([t for _, _, t in lay.blocks], dtype=np.int64)
            m = max(m, int(per.max()))
        most = max(most, m)
    words = -(-most * (header.table_bits * 64 + 1) // (32 * 64)) + 5
    g = CompactDirectory.MAX_GROUP
    while g >= MIN_DIR_GROUP and g * words > 0xFFFF:
        g //= 2
    return g if g >= MIN_DIR_GROUP else 0


# Placeholder until the tables are built (build_tables_v2 fills in the table ids).
_PACK_PENDING = "pending"


def _packable(header: Any, layers_out: list) -> bool:
    if not all(r["packable"] for r in layers_out):
        return False
    cap = min(2047, 1 << header.table_bits)
    hists = _param_hists(header, layers_out)
    if params.FRAC_BITS > header.table_bits or any(h.size > cap for h in hists):
        return False
    return _pays(header, layers_out, hists)


def _pays(header: Any, layers_out: list, hists: list) -> bool:
    """Packing only where it pays: the coded symbols (ideal entropy), their tables (2 bytes a
    symbol, before zstd) and a directory entry + final state per block, against the stored
    sections (a small cache can lose: its parameter tables cost more than they save)."""
    pbytes = 2 if header.param_dtype == 1 else 4
    n_blocks = sum(len(r["offsets"]) for r in layers_out)
    stored = pbytes * int(hists[0].sum() + hists[1].sum()) + (int(hists[4].sum() + hists[5].sum())
                                                             if header.token_scaling else 0)
    cost = 8.5 * n_blocks
    for h in hists[:6 if header.token_scaling else 4]:
        p = h[h > 0] / h.sum()
        cost += float(h.sum() * -(p * np.log2(p)).sum()) / 8 + 2 * h.size
    return cost < stored


def _param_hists(header: Any, layers_out: list) -> list:
    """Symbol counts of the packed parameters: [offsets K, offsets V, low bits K, low bits V,
    token differences K, token differences V] (the tables build_tables_v2 adds, in its order)."""
    out: list = [None] * 6
    for kvi in (0, 1):
        ms = [m for r in layers_out for (kv, _k), m in r["offsets"].items() if kv == kvi]
        ts = [e for r in layers_out for (kv, _k), e in r["exps"].items() if kv == kvi] if header.token_scaling else []
        hi, fr, tk = params.block_histograms(ms, ts, params.FRAC_BITS)
        out[kvi], out[2 + kvi], out[4 + kvi] = (h if h.size else np.ones(1, np.int64) for h in (hi, fr, tk))
    return out


def build_tables_v2(header: Any, layers_out: list, fit) -> tuple:
    """The probability tables of pass 1's results: ``fit(H)`` per (K/V, role, alphabet) class
    of channel histograms, then (packed parameters) per K/V one table for the offsets, one for
    their low bits and one for the token-code differences. -> (units, table ids, PackedParams or None)."""
    from ..format.extensions import NO_TABLE, PackedParams
    units, ids = _build_tables(header, layers_out, fit)
    packed = None
    if header.packed is not None:
        hists = _param_hists(header, layers_out)
        if not header.token_scaling:
            hists = hists[:4]
        base = len(units)
        units = list(units) + [quantize_units(h.astype(np.float64), header.table_bits) for h in hists]
        if len(units) > 65535:
            raise InputError("too many probability tables for the format (reduce tables_per_class)")
        tt = (base + 4, base + 5) if header.token_scaling else (NO_TABLE, NO_TABLE)
        packed = PackedParams((base, base + 1), (base + 2, base + 3), tt, params.FRAC_BITS)
    return units, ids, packed


def set_tables(header: Any, tables: tuple) -> list:
    """Put :func:`build_tables_v2`'s tables into the header; returns their units (pass 2's input)."""
    units, header.table_ids, header.packed = tables
    header._layouts = None          # the packed flag changes the chunk layout
    header.alphabets = np.array([u.size for u in units], dtype=np.int64)
    header.units = np.concatenate(units).astype(np.uint16)
    return units


def encode_lossy_v2(kv: Sequence[Sequence[Any]], config: CodecConfig, progress: Progress = None,
                    extensions: Sequence[Any] = ()) -> bytes:
    from ..format import v2 as fmt2
    header, layers_out = quantize_v2(kv, config, extensions)
    units = set_tables(header, build_tables_v2(
        header, layers_out, lambda H: _fit_tables_v2(H, config.tables_per_class, header.table_bits)))
    return fmt2.build_container(header, code_chunks_v2(header, layers_out, units, progress))


def code_chunks_v2(header: Any, layers_out: list, units: list, progress: Progress = None,
                   workers: Optional[int] = None, stop: Optional[Callable[[], bool]] = None,
                   start: int = 0) -> list:
    """Pass 2: the rANS streams of chunks ``start ..`` on one pool of forked workers. A pool per
    few chunks (before) forked 4x as often, and a fork of a process holding a model is slow: a
    4K Gemma-3 encode next to its ORT session (2.7 GB) took 1.57 s that way, 0.79 s with one
    pool, 0.68 s serial (2 cores; benches/ab_encode_fork.py).

    ``workers``: at most this many (1: in this process, e.g. next to a model run on another
    thread, which ORT runs without the GIL). ``stop``: asked after each chunk; True ends the
    pass there (the chunks coded so far are returned: a caller may go on from ``start + len``)."""
    freqs = [u.astype(np.int64) << (24 - header.table_bits) for u in units]
    n2 = worker_count(header.decoded_bytes(), header.n_chunks - start)
    if workers is not None:
        n2 = max(1, min(n2, int(workers)))
    chunks: list = []
    for c in parallel_imap(_code_chunk_v2, (header, layers_out, freqs), range(start, header.n_chunks), n2):
        chunks.append(c)
        if progress:
            progress(start + len(chunks), header.n_chunks)
        if stop is not None and stop():
            break
    return chunks


def encode_lossless_v2(kv: Sequence[Sequence[Any]], config: CodecConfig, progress: Progress = None,
                       extensions: Sequence[Any] = ()) -> bytes:
    """Lossless mode in a v2 container: the v1 chunk payload (byte-shuffled slices, one zstd
    frame per chunk), no metadata section, extension records allowed."""
    from ..format import v2 as fmt2
    from .lossless import chunk_payloads
    infos, batch, dtype = describe(kv)
    header = fmt2.HeaderV2(mode=MODE_LOSSLESS, dtype=dtype, batch=batch, chunk_tokens=config.chunk_tokens,
                           layers=infos, channels_per_stream=0, step_mode=0, extensions=list(extensions))
    return fmt2.build_container(header, [(p, 0) for p in chunk_payloads(kv, infos, config, progress)])
