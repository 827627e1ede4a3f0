"""GPU decoder for format v2: a reusable context (python-zstandard style).

``GpuDecoder(device)`` keeps, per cache *shape* (layers, tokens, chunking), the stream and block
tables on the device, so restoring another cache of the same shape costs the host only: parse the
header (vectorized), upload a few per-chunk words, build the lookup tables on the device from the
table section, the launches, one error read. The chunks are checked on the device: each chunk's
metadata CRC-32 (zlib's, segments in parallel then combined by linearity: the host CRC of 1.4 MB
of metadata at 8K SmolLM2 cost 0.7 ms of the restore's host time), every stream's rANS end state,
and each chunk's words checksum in a coalesced pass (all also on the host with ``verify="full"``). Lookup
tables are cached by the table section's content, per-call words go through one pinned buffer.

    dec = GpuDecoder("cuda")
    dec.decode_into(data, bufs)                   # data: bytes / memoryview / parsed ContainerV2
    dec.decode_into(c, bufs, payload=dev_bytes)   # the container's bytes already on the GPU
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..buffers import check_kv_buffers
from ..errors import ChecksumError, InputError, LimitExceededError, StreamError
from ..format import v2 as fmt2
from ..format.container import MODE_LOSSLESS
from ..format.tables import TOKEN_SCALES
BCOLS = 15     # block table columns: see kernels_v2
MAX_LUT_ENTRIES = 1 << 22   # referenced tables x 2**table_bits slots (32 MiB of int64): legit files use < 2**22
_K1, _K2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9   # words checksum constants (format.v2)
WSUM_BLOCK = 1024   # words per program of the checksum pass
_SERIAL_CRC_BYTES = 512 << 10  # metadata CRCs below this run on the calling thread
_CRC_TASKS = 4                  # metadata CRCs above it: this many pool tasks

Verify = Union[bool, str]

# Tunables (H200 sweep: benches/gpu_notes.md).
BLOCK = 32
NUM_WARPS = 1
KERNELS = ("nested", "nested-wide", "flat")


@dataclass
class HostTiming:
    """Host wall time of the parts of one ``decode_into`` call, in ms (``total_ms`` excludes
    the final error read, which waits for the kernels)."""
    verify_ms: float = 0.0    # host CRCs (verify="full" only: the metadata CRCs run on the device)
    plan_ms: float = 0.0      # shape plan lookup (built on the first call of a shape)
    stage_ms: float = 0.0     # per-call words through the pinned buffer
    lut_ms: float = 0.0       # LUT cache lookup (built on a miss)
    launch_ms: float = 0.0    # buffers + both kernel launches + the flag reduction
    total_ms: float = 0.0


@dataclass
class ShapePlan:
    """Device tables that depend only on the cache's shape (not on its bytes)."""
    n_streams: int
    sblk: torch.Tensor     # int32 [S] global block of each stream
    ssic: torch.Tensor     # int32 [S] stream index inside its chunk
    sc0: torch.Tensor      # int32 [S] first channel of the stream in its block
    snch: torch.Tensor     # int32 [S] channels of the stream
    blocks: torch.Tensor   # int64 [NB, BCOLS]
    n_blocks: int
    nsym: np.ndarray       # int64 [S] symbols of each stream (host copy)
    chunk_streams: np.ndarray  # int64 [n_chunks + 1] first stream of each chunk (streams are chunk-major)
    steps: dict            # BLOCK -> int32 device tensor: longest stream of each program
    # Packed parameters (EXT_PACKED): the parameter-stream pass decodes each block's lo offsets
    # and token codes into scratch arrays, which the decode kernel then reads instead of the chunk.
    packed: bool = False
    bic: Optional[torch.Tensor] = None     # int32 [NB] block index inside its chunk
    lob: Optional[torch.Tensor] = None     # int64 [n_chunks] first lo of each chunk in the scratch
    tkb: Optional[torch.Tensor] = None     # int64 [n_chunks] first token code of each chunk in the scratch
    lo_total: int = 0
    tok_total: int = 0
    max_nch: int = 0
    max_ntok: int = 0
    max_elems: int = 0      # packed: the most elements (batch * tokens * channels) of one block
    last_dir: Optional[np.ndarray] = None   # int64 [n_chunks] byte offset of the last data-stream entry
    last_rel: Optional[np.ndarray] = None   # compact directory: byte offset of that entry's u16 (last_dir: its base)

    def program_steps(self, block: int, device) -> torch.Tensor:
        t = self.steps.get(block)
        if t is None:
            nprog = -(-self.n_streams // block)
            pad = nprog * block - self.n_streams
            m = np.pad(self.nsym, (0, pad)).reshape(nprog, block).max(axis=1) if nprog else np.zeros(1, np.int64)
            t = self.steps[block] = torch.from_numpy(m.astype(np.int32)).to(device)
        return t


def _shape_key(h: fmt2.HeaderV2, n_chunks: int) -> tuple:
    return (tuple((l.tokens, l.k_heads, l.k_dim, l.v_heads, l.v_dim) for l in h.layers), h.batch,
            h.chunk_tokens, h.channels_per_stream, h.group_size, h.param_dtype, h.step_mode,
            h.token_scaling, n_chunks, h.packed is not None, h.dir_group)


def _ids_bases(h: fmt2.HeaderV2) -> np.ndarray:
    """u16 index of each (layer, kv)'s first table id inside the id section."""
    counts = [l.channels(kv) * h.roles for l in h.layers for kv in (0, 1)]
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def build_shape_plan(h: fmt2.HeaderV2, n_chunks: int, device: torch.device) -> ShapePlan:
    ids_b = _ids_bases(h)
    rows, sblk, ssic, sc0, snch, nsym = [], [], [], [], [], []
    nb = 0
    layouts: dict = {}
    for k in range(n_chunks):
        lay = h.layout(k)
        key = id(lay)
        if key not in layouts:
            blk = np.zeros((lay.nb, BCOLS), dtype=np.int64)
            lk = np.array([2 * i + kv for i, kv, _ in lay.blocks], dtype=np.int64)
            blk[:, 1] = lk
            blk[:, 2] = [t for _, _, t in lay.blocks]
            blk[:, 4] = lay.nch
            blk[:, 5] = lay.ch_off
            blk[:, 6] = lay.step_off
            blk[:, 7] = lay.tok_off
            blk[:, 8] = lay.n_streams
            blk[:, 9] = lay.step_at
            blk[:, 10] = lay.tok_at
            blk[:, 11] = lay.dir_at
            blk[:, 12] = lay.meta_size
            blk[:, 13] = ids_b[lk]
            blk[:, 14] = lay.rel_at
            sic = np.arange(lay.n_streams, dtype=np.int64)
            layouts[key] = (blk, lay.stream_block, sic, lay.stream_c0, lay.stream_nch, lay.stream_symbols)
        blk, sb, sic, c0, nch, ns = layouts[key]
        b = blk.copy()
        b[:, 0] = k
        b[:, 3] = k * h.chunk_tokens
        rows.append(b)
        sblk.append(sb + nb)
        ssic.append(sic)
        sc0.append(c0)
        snch.append(nch)
        nsym.append(ns)
        nb += b.shape[0]
    cat = lambda xs, dt: torch.from_numpy(np.concatenate(xs).astype(dt)).to(device)
    S = int(sum(x.size for x in sblk))
    plan = ShapePlan(S, cat(sblk, np.int32), cat(ssic, np.int32), cat(sc0, np.int32), cat(snch, np.int32),
                     cat(rows, np.int64).reshape(-1, BCOLS), nb,
                     np.concatenate(nsym).astype(np.int64) if nsym else np.zeros(0, np.int64),
                     np.concatenate([[0], np.cumsum([x.size for x in sblk])]).astype(np.int64), {})
    if h.packed is not None and n_chunks:
        lays = [h.layout(k) for k in range(n_chunks)]
        lo_n = np.array([l.total_channels for l in lays], dtype=np.int64)
        tok_n = np.array([l.total_tok for l in lays], dtype=np.int64)
        plan.packed = True
        plan.bic = cat([np.arange(l.nb) for l in lays], np.int32)
        plan.lob = torch.from_numpy(np.concatenate([[0], np.cumsum(lo_n)[:-1]]).astype(np.int64)).to(device)
        plan.tkb = torch.from_numpy(np.concatenate([[0], np.cumsum(tok_n)[:-1]]).astype(np.int64)).to(device)
        plan.lo_total, plan.tok_total = int(lo_n.sum()), int(tok_n.sum())
        plan.max_nch = max(int(l.nch.max()) for l in lays)
        plan.max_ntok = max(h.batch * max(t for _, _, t in l.blocks) for l in lays) if h.token_scaling else 0
        plan.max_elems = h.batch * max(int(c * t) for l in lays for c, (_, _, t) in zip(l.nch.tolist(), l.blocks))
        if h.dir_group:   # the last data stream's segment base and u16 entry (section 6.3)
            g = h.dir_group
            plan.last_dir = np.array([l.dir_at + 4 * ((l.n_streams - 1) // g) for l in lays], dtype=np.int64)
            plan.last_rel = np.array([l.rel_at + 2 * (l.n_streams - 1) for l in lays], dtype=np.int64)
        else:
            plan.last_dir = np.array([l.dir_at + 4 * (l.n_streams - 1) for l in lays], dtype=np.int64)
    return plan


def build_lut(units: torch.Tensor, alphabets: torch.Tensor, table_bits: int) -> torch.Tensor:
    """Direct decode table int64 [T * 2**table_bits] on the device: slot -> sym | f << 11 | off << 24.

    Each table's frequencies sum to 2**table_bits, so repeating every symbol f times lays the
    tables out slot by slot, back to back (no host sync: the output size is known)."""
    T = int(alphabets.numel())
    M = 1 << table_bits
    u = units.to(torch.int64)
    starts = torch.cumsum(alphabets.to(torch.int64), 0) - alphabets.to(torch.int64)
    tab = torch.repeat_interleave(torch.arange(T, device=u.device), alphabets.to(torch.int64), output_size=int(u.numel()))
    sym = torch.arange(u.numel(), device=u.device) - starts[tab]
    csum = torch.cumsum(u, 0) - u                       # global exclusive cumsum
    cdf = csum - (tab * M)                              # each table's cdf (tables sum to M)
    rep = lambda a: torch.repeat_interleave(a, u, output_size=T * M)
    slot = torch.arange(T * M, device=u.device) % M
    return rep(sym) | (rep(u) << 11) | ((slot - rep(cdf)) << 24)


DQ_BLOCK = 1024    # elements per program of v2_dequant_kernel
SYM_SLOTS = 256    # compact LUT: symbols per table row of the (f, cdf) array
CRC_SEG = 256      # bytes per segment of the device metadata CRC (segments run in parallel)


def _crc_table() -> np.ndarray:
    """zlib's reflected CRC-32 table (polynomial 0xEDB88320)."""
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(0xEDB88320), t >> 1).astype(np.uint32)
    return t


def _crc_shift_matrix(nbytes: int, table: np.ndarray) -> np.ndarray:
    """Column b = the CRC register 1 << b after nbytes zero bytes (linear in the register)."""
    r = (np.uint32(1) << np.arange(32, dtype=np.uint32)).astype(np.uint32)
    for _ in range(nbytes):
        r = table[r & 0xFF] ^ (r >> 8)
    return r.astype(np.uint32)


def build_lut8(units: torch.Tensor, alphabets: torch.Tensor, table_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact decode tables for alphabets of at most 256 symbols: uint8 [T * 2**table_bits]
    slot -> symbol, and int32 [T * 256] symbol -> f | cdf << 13. 1 byte per slot instead of 8
    keeps the slot tables of a whole file in L1 (32 tables of 2**12 slots: 128 KiB vs 1 MiB);
    the chain then takes two small dependent loads instead of one that misses L1."""
    T = int(alphabets.numel())
    M = 1 << table_bits
    a = alphabets.to(torch.int64)
    u = units.to(torch.int64)
    starts = torch.cumsum(a, 0) - a
    tab = torch.repeat_interleave(torch.arange(T, device=u.device), a, output_size=int(u.numel()))
    sym = torch.arange(u.numel(), device=u.device) - starts[tab]
    csum = torch.cumsum(u, 0) - u
    cdf = csum - (tab * M)
    lut = torch.repeat_interleave(sym, u, output_size=T * M).to(torch.uint8)
    fc = torch.zeros(T * SYM_SLOTS, dtype=torch.int32, device=u.device)
    fc[tab * SYM_SLOTS + sym] = (u | (cdf << 13)).to(torch.int32)
    return lut, fc


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="cachegen-crc")
        return _POOL


def _has_transform(h: fmt2.HeaderV2) -> bool:
    from ..format.extensions import EXT_TRANSFORM, find
    return find(list(getattr(h, "extensions", []) or []), EXT_TRANSFORM) is not None


def supports(c: fmt2.ContainerV2) -> bool:
    """Whether the fused kernel decodes this container (v2, lossy, no anchor-delta grouping)."""
    return isinstance(c, fmt2.ContainerV2) and c.header.mode != MODE_LOSSLESS and c.header.group_size == 1


class GpuDecoder:
    """Reusable v2 GPU decoder context for one CUDA device."""

    supports = staticmethod(supports)
    untransforms = True    # model-profile containers come back transformed (io.restore's payload path)

    def __init__(self, device: Any = "cuda", block: Optional[int] = None, num_warps: Optional[int] = None,
                 pipeline: bool = False, kernel: str = "nested"):
        if kernel not in KERNELS:
            raise InputError(f"GpuDecoder kernel must be one of {KERNELS}, got {kernel!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # "cuda" and "cuda:0" compare unequal: pin the index so device checks hold.
            self.device = torch.device("cuda", torch.cuda.current_device())
        # A CPU device is accepted only under Triton's interpreter (TRITON_INTERPRET=1), which the
        # tests use to run the kernel's exact arithmetic without a GPU.
        if self.device.type != "cuda" and not (self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            raise InputError(f"GpuDecoder needs a CUDA device, got {self.device}")
        self.block = block
        self.num_warps = num_warps
        # False (default): decode_into_pipelined waits for all bytes, then one launch. Per-group
        # launches measured slower on the H200 (2026-12-02, 8K SmolLM2: 8.7 vs 3.4 ms of decode
        # stream time): each group is bound by the same serial per-stream symbol chain as the
        # whole cache, and the groups run one after another on the decode stream.
        self.pipeline = pipeline
        # "nested" (default): channel / batch-row / token loops, the symbol step carries only the
        # chain, compact LUT (build_lut8) where every alphabet fits a byte; "nested-wide": the
        # same loops on the 8-byte LUT; "flat": the previous single loop (A/B on the device).
        self.kernel = kernel
        # Packed parameters into a float32 destination (model-profile coefficients): the data
        # kernel stores fl32(step * v) while the parameter pass runs on a side stream, then
        # v2_dequant_kernel adds lo and applies the token scale (False: the serial order, A/B).
        self.defer = True
        self.side_stream = True     # False: deferred, but the parameter pass on the decode stream (A/B)
        # True: on the side stream, the parameter pass is launched after the data kernel (which
        # then gets the SMs first; A/B for the 8K call on an idle GPU, RESULTS 17)
        self.params_after = False
        self._side: Optional[torch.cuda.Stream] = None
        self._plans: dict = {}
        self._scales = None
        self._crc: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._luts: dict = {}
        self._lut_last: Optional[tuple] = None   # (units, alphabets, table_ids, key) of the last call
        self._plut_last: Optional[tuple] = None  # (units, (table_bits, tables), key): _param_lut's
        self._pin: Optional[torch.Tensor] = None
        self._pin_ev = None
        self.last_timing: Optional[HostTiming] = None
        self._untransformer = None
        # Profile objects searched (before the registry and search paths) for model-profile
        # containers' profiles
        self.profiles: list = []

    # ---------------------------------------------------------------- host checks
    def verify(self, c: fmt2.ContainerV2, words: bool = False) -> None:
        """Chunk CRCs on threads (zlib releases the GIL): metadata always, words when asked."""
        n = c.n_chunks
        if n == 0:
            return
        if not words and (int(c.index["meta_size"].sum()) < _SERIAL_CRC_BYTES or (os.cpu_count() or 1) < 4):
            tasks = 1        # little metadata or few CPUs: one thread beats handing tasks to a pool
        else:
            # metadata only: a few tasks of several chunks each (one task per chunk costs more in
            # pool hand-offs than the CRCs: H200 host, 2026-12-02, 32 tasks 0.8 ms, serial 0.7)
            tasks = n if words else min(_CRC_TASKS, n)
        bounds = np.linspace(0, n, tasks + 1).astype(int).tolist()

        def run(a: int, b: int) -> None:
            for k in range(a, b):
                c.verify_chunk(k, words=words)
        if tasks == 1:
            run(0, n)
            return
        ex = _pool()
        list(ex.map(run, bounds[:-1], bounds[1:]))

    def plan(self, c: fmt2.ContainerV2) -> ShapePlan:
        key = _shape_key(c.header, c.n_chunks)
        p = self._plans.get(key)
        if p is None:
            if len(self._plans) > 16:
                self._plans.clear()
            p = self._plans[key] = build_shape_plan(c.header, c.n_chunks, self.device)
        return p

    def _tables(self, h: fmt2.HeaderV2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(alphabets, units, remapped ids) of the referenced tables only, bounded in LUT size."""
        ids = np.concatenate([a.reshape(-1) for per in h.table_ids for a in per]).astype(np.int64)
        used, remap = np.unique(ids, return_inverse=True)
        if (used.size << h.table_bits) > MAX_LUT_ENTRIES:
            raise LimitExceededError(f"{used.size} referenced tables of 2**{h.table_bits} slots exceed the GPU "
                                     f"lookup-table bound ({MAX_LUT_ENTRIES} entries)")
        starts = h.table_starts
        alph = h.alphabets[used].astype(np.int64)
        idx = np.concatenate([np.arange(starts[t], starts[t + 1]) for t in used.tolist()]) if used.size else \
            np.zeros(0, np.int64)
        return alph, h.units[idx].astype(np.int64), remap.astype(np.int32).reshape(-1)

    def _lut(self, h: fmt2.HeaderV2) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(LUT, table ids, compact (f, cdf) array or None) on the device, cached by the table section's content: caches encoded
        with the same tables (one model profile, one preset) reuse them without a rebuild."""
        # The parse memoizes the model section (read-only arrays shared by every cache of one
        # model and preset): the same objects again mean the same content, so skip the hash.
        last = self._lut_last
        same = (last is not None and h.units is last[0] and h.alphabets is last[1] and not h.units.flags.writeable
                and h.table_bits == last[3][0]
                and len(h.table_ids) == len(last[2]) and all(a is b for a, b in zip(h.table_ids, last[2])))
        if same:
            key = last[3]
        else:
            dig = hashlib.blake2b(h.units.tobytes(), digest_size=16)
            dig.update(h.alphabets.tobytes())
            for per in h.table_ids:
                for a in per:
                    dig.update(np.ascontiguousarray(a).tobytes())
            key = (h.table_bits, dig.digest(), self.kernel == "nested")   # compact or 8-byte LUT
            self._lut_last = (h.units, h.alphabets, tuple(h.table_ids), key)
        hit = self._luts.get(key)
        if hit is None:
            alph_r, units_r, ids_r = self._tables(h)
            alph = torch.from_numpy(alph_r).to(self.device, non_blocking=True)
            units = torch.from_numpy(units_r).to(self.device, non_blocking=True)
            ids = torch.from_numpy(ids_r).to(self.device, non_blocking=True)
            lut8 = fc = None
            if self.kernel == "nested" and (alph_r.size == 0 or int(alph_r.max()) <= SYM_SLOTS):
                lut8, fc = build_lut8(units, alph, h.table_bits)
            hit = (build_lut(units, alph, h.table_bits) if lut8 is None else lut8, ids, fc)
            if len(self._luts) >= 8:
                self._luts.pop(next(iter(self._luts)))
            self._luts[key] = hit
        return hit

    def _param_lut(self, h: fmt2.HeaderV2) -> torch.Tensor:
        """8-byte LUT of the packed-parameter tables (lo K, lo V[, tokens K, tokens V]), cached
        by their content like the data tables."""
        pk = h.packed
        # rows 0-1 offsets (K, V), 2-3 low bits, 4-5 token differences (absent ones: row 0 again)
        tabs = list(pk.lo_tables) + (list(pk.frac_tables) if pk.frac_bits else list(pk.lo_tables)) + \
            (list(pk.tok_tables) if h.token_scaling else list(pk.lo_tables))
        # the memoized model section again (read-only, shared) and the same table numbers: the
        # same content, so skip the gather and the hash (as _lut does)
        last = self._plut_last
        if last is not None and h.units is last[0] and not h.units.flags.writeable and last[1] == (h.table_bits, tabs):
            key = last[2]
            hit = self._luts.get(key)
            if hit is not None:
                return hit
        starts = h.table_starts
        alph = h.alphabets[tabs].astype(np.int64)
        units = np.concatenate([h.units[starts[t]:starts[t + 1]] for t in tabs]).astype(np.int64)
        key = ("params", h.table_bits, hashlib.blake2b(units.tobytes() + alph.tobytes(), digest_size=16).digest())
        self._plut_last = (h.units, (h.table_bits, tabs), key)
        hit = self._luts.get(key)
        if hit is None:
            hit = build_lut(torch.from_numpy(units).to(self.device), torch.from_numpy(alph).to(self.device),
                            h.table_bits)
            if len(self._luts) >= 8:
                self._luts.pop(next(iter(self._luts)))
            self._luts[key] = hit
        return hit

    def _crc_consts(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._crc is None:
            t = _crc_table()
            self._crc = (torch.from_numpy(t.view(np.int32).copy()).to(self.device),
                         torch.from_numpy(_crc_shift_matrix(CRC_SEG, t).view(np.int32).copy()).to(self.device))
        return self._crc

    def _stage(self, meta: np.ndarray) -> torch.Tensor:
        """Per-call int64 words to the device through one reused pinned buffer (a fresh pinned
        allocation per call costs more than the whole host plan)."""
        n = meta.size
        if self.device.type != "cuda":
            return torch.from_numpy(meta)
        if self._pin is None or self._pin.numel() < n:
            self._pin = torch.empty(max(n, 4096), dtype=torch.int64, pin_memory=True)
            self._pin_ev = None
        if self._pin_ev is not None:
            self._pin_ev.synchronize()       # the previous call's copy has left the buffer
        self._pin.numpy()[:n] = meta
        out = self._pin[:n].to(self.device, non_blocking=True)
        self._pin_ev = torch.cuda.Event()
        self._pin_ev.record()
        return out

    @staticmethod
    def _groups(c: fmt2.ContainerV2, p: ShapePlan, split: bool, group_bytes: Optional[int]) -> list:
        """(first stream, end stream, payload bytes needed) per launch: one launch for all
        streams, or (pipelined) one per run of chunks of about ``group_bytes``."""
        if p.n_streams == 0:
            return []
        ends = c.payload_start + c.index["offset"].astype(np.int64) + c.index["size"].astype(np.int64)
        if not split or c.n_chunks <= 1:
            return [(0, p.n_streams, int(ends[-1]))]
        g = group_bytes or max(4 << 20, -(-int(ends[-1]) // 8))
        out, k0 = [], 0
        for k in range(c.n_chunks):
            if k == c.n_chunks - 1 or ends[k] - (ends[k0 - 1] if k0 else c.payload_start) >= g:
                out.append((int(p.chunk_streams[k0]), int(p.chunk_streams[k + 1]), int(ends[k])))
                k0 = k + 1
        return [x for x in out if x[1] > x[0]]

    def decode_into_pipelined(self, data: Any, bufs: Sequence[Sequence[torch.Tensor]], *,
                              wait: Callable[[Optional[int]], None], verify: Verify = True,
                              payload: Optional[torch.Tensor] = None, stream: Optional[torch.cuda.Stream] = None,
                              check: bool = True, group_bytes: Optional[int] = None) -> Optional[torch.Tensor]:
        """:meth:`decode_into` while the payload is still being copied: chunk groups are
        launched as their bytes arrive (``cachegen.io.restore`` passes the copy's events) when
        the decoder was built with ``pipeline=True``; by default (slower per-group launches, see
        ``__init__``) it waits for every byte first, then decodes in one launch."""
        if not self.pipeline:
            wait(None)
            wait = None
        return self.decode_into(data, bufs, verify=verify, payload=payload, stream=stream, check=check,
                                wait=wait, group_bytes=group_bytes)

    # ---------------------------------------------------------------- decode
    def upload(self, c: fmt2.ContainerV2, stream: Optional[torch.cuda.Stream] = None) -> torch.Tensor:
        """The container's bytes as a device uint8 tensor (length padded to a multiple of 4)."""
        end = c.end
        raw = np.frombuffer(c.data[:end], dtype=np.uint8)
        pad = (-end) % 4
        dev = torch.empty(end + pad, dtype=torch.uint8, device=self.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")    # read-only buffer: only copied to the device
            src = torch.from_numpy(raw)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            dev[:end].copy_(src, non_blocking=src.is_pinned())
        return dev

    def decode_into(self, data: Any, bufs: Sequence[Sequence[torch.Tensor]], *, verify: Verify = True,
                    payload: Optional[torch.Tensor] = None, stream: Optional[torch.cuda.Stream] = None,
                    check: bool = True, wait: Optional[Callable[[Optional[int]], None]] = None,
                    group_bytes: Optional[int] = None, coefficients: bool = False,
                    _trusted: bool = False) -> Optional[torch.Tensor]:
        """Decode into CUDA tensors bufs[i] = (k, v) [B, H, >=T, D] of the container's dtype
        (of the original cache's dtype for a model-profile container: its coefficients are
        decoded into a scratch and transformed back on the device, ``cachegen.gpu.untransform``).

        verify: True = header and chunk index checked by the host parse, each chunk's metadata
        CRC-32 and stream words checksum on the device (and every stream's rANS end state);
        "full" = metadata and words checked on the host too; False = structure and end states
        only.
        payload: the container's bytes already on this device (uint8, at least as long as the
        container): no copy. check=False returns the device error flags without synchronizing.
        coefficients: a model-profile container's coefficients as stored (fp32 buffers), without
        the inverse transform (the CPU decoders' raw output; ``cachegen.dispatch`` uses it).
        wait: pipelining with a copy still in flight: ``wait(upto)`` must make the decode stream
        wait until payload bytes ``[0, upto)`` are on the device (``None``: all of them); the
        streams are then launched per group of chunks of about ``group_bytes`` (default: an
        eighth of the payload, at least 4 MiB), each after the wait for its bytes.
        _trusted: internal (the untransformer's scratch views, shaped for its store pattern):
        skip the buffer shape checks.
        """
        from .kernels_v2 import (v2_decode_kernel, v2_decode_nested_kernel, v2_dequant_kernel, v2_meta_crc_fin_kernel,
                                 v2_meta_crc_seg_kernel, v2_params_kernel, v2_words_sum_kernel)

        c = data if isinstance(data, fmt2.ContainerV2) else fmt2.parse_container(data)
        h = c.header
        if not coefficients and _has_transform(h):
            return self._decode_transformed(c, bufs, verify=verify, payload=payload, stream=stream, check=check,
                                            wait=wait, group_bytes=group_bytes)
        if h.mode == MODE_LOSSLESS:
            raise InputError("GpuDecoder decodes lossy containers (lossless ones decode on the CPU)")
        if h.group_size > 1:
            raise InputError("GpuDecoder: anchor-delta containers (group_size > 1) decode on the CPU")
        if not _trusted:
            check_kv_buffers(h, c.tokens(), bufs, device=self.device)
        tm = HostTiming()
        t0 = time.perf_counter()
        if verify == "full":
            self.verify(c, words=True)    # everything on the host too (the device checks still run)
        t1 = time.perf_counter()
        p = self.plan(c)
        tm.verify_ms, tm.plan_ms = (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
        dev = self.device
        if payload is None:
            payload = self.upload(c, stream)
        elif payload.device != dev or payload.dtype != torch.uint8 or payload.dim() != 1:
            raise InputError("payload must be a 1-D uint8 tensor on the decoder's device")
        if payload.numel() < c.end:
            raise InputError(f"payload has {payload.numel()} bytes, the container {c.end}")
        if payload.numel() % 4:
            raise InputError("payload length must be a multiple of 4 bytes (pad it)")
        if dev.type == "cuda" and payload.data_ptr() % 16:
            raise InputError("payload must be 16-byte aligned")
        flat = [t for pair in bufs for t in pair]
        base = flat[0]
        esz = base.element_size()
        bf16 = base.dtype == torch.bfloat16
        # per buffer: element offset from the first, 4 strides, head dim (lists, then one array:
        # per-item numpy stores cost more than the rest of the host plan)
        offs = np.array([t.data_ptr() for t in flat], dtype=np.int64) - base.data_ptr()
        if (offs % esz).any():
            raise InputError("decode buffers must be element-aligned with each other")
        host = np.empty((len(flat), 6), dtype=np.int64)
        host[:, 0] = offs // esz
        host[:, 1:5] = [t.stride() for t in flat]
        host[:, 5] = [t.shape[3] for t in flat]
        cb = c.payload_start + c.index["offset"].astype(np.int64)
        msz = c.index["meta_size"].astype(np.int64)
        total_words = (c.index["size"].astype(np.int64) - msz) // 4
        chunk = np.stack([cb, total_words,
                          c.index["words_sum"].view(np.int64), (cb + msz) // 4, msz,
                          c.index["meta_crc"].astype(np.int64)])
        packed = p.packed
        if h.dir_group and self.kernel == "flat":
            raise InputError("the flat kernel does not decode compact-directory containers (use 'nested')")
        if packed:
            if self.kernel == "flat":
                raise InputError("the flat kernel does not decode packed-parameter containers (use 'nested')")
            # The data streams end where the directory's last data entry says (the parameter
            # streams follow): read here, bounded by the chunk's words so no lane reads past it.
            raw = np.frombuffer(c.data, dtype=np.uint8)
            at = cb[:, None] + p.last_dir[:c.n_chunks, None] + np.arange(4)
            cw_data = raw[at].astype(np.int64) @ (1 << (8 * np.arange(4, dtype=np.int64)))
            if p.last_rel is not None:
                at = cb[:, None] + p.last_rel[:c.n_chunks, None] + np.arange(2)
                cw_data = cw_data + raw[at].astype(np.int64) @ np.array([1, 256], dtype=np.int64)
            cw_data = np.minimum(cw_data, total_words)
            chunk = np.concatenate([chunk, cw_data[None]])
        # [bases | strides (row-major [nf, 4]) | head dims | chunk words]: each field a contiguous
        # slice on the device (no copy kernels)
        meta = np.concatenate([host[:, 0], host[:, 1:5].reshape(-1), host[:, 5], chunk.reshape(-1)])
        scales = self._scales
        if scales is None:
            scales = self._scales = torch.from_numpy(TOKEN_SCALES.astype(np.float32)).to(dev)
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            t1 = time.perf_counter()
            md = self._stage(meta)
            tm.stage_ms = (time.perf_counter() - t1) * 1e3
            nf = len(flat)
            obase = md[:nf]
            strides = md[nf:5 * nf].view(nf, 4)
            hdim = md[5 * nf:6 * nf]
            cbase = md[6 * nf:6 * nf + c.n_chunks]
            cwords = md[6 * nf + c.n_chunks:6 * nf + 2 * c.n_chunks]
            stored = md[6 * nf + 2 * c.n_chunks:6 * nf + 3 * c.n_chunks]
            nk = c.n_chunks
            wbase = md[6 * nf + 3 * nk:6 * nf + 4 * nk]
            msize = md[6 * nf + 4 * nk:6 * nf + 5 * nk]
            mcrc = md[6 * nf + 5 * nk:6 * nf + 6 * nk]
            cw_dec = md[6 * nf + 6 * nk:6 * nf + 7 * nk] if packed else cwords
            # Tables and ids come from the host parse (the model section is zstd-compressed, small).
            # Only referenced tables get LUT slots (a file may list many it never uses).
            t1 = time.perf_counter()
            lut, ids, fc = self._lut(h)
            t2 = time.perf_counter()
            tm.lut_ms = (t2 - t1) * 1e3
            par = payload.view(torch.float16 if h.param_dtype == 1 else torch.float32)
            # one zeroed scratch: flags [failed streams, words-sum mismatches, metadata CRC
            # mismatches] (counted by the kernels' atomics) then the per-chunk words sums
            scratch = torch.zeros(3 + c.n_chunks, dtype=torch.int64, device=dev)
            err, sums = scratch[:1], scratch[3:]
            block = self.block or BLOCK
            nw = self.num_warps or NUM_WARPS
            u32 = payload.view(torch.int32)
            nested = self.kernel != "flat"
            steps = None if nested else p.program_steps(block, dev)
            out = base.view(torch.int16) if bf16 else base
            lo_src, u8_src, lob, tkb = par, payload, cbase, cbase
            defer = bool(packed and nested and self.defer and base.dtype == torch.float32)
            side = None
            late = False
            if packed:
                # lo offsets and token codes first: one lane per block, into scratch arrays
                if wait is not None:
                    wait(None)
                    wait = None
                lo_src = torch.empty(max(p.lo_total, 1), dtype=torch.float32, device=dev)
                u8_src = torch.empty(max(p.tok_total, 1), dtype=torch.uint8, device=dev)
                lob, tkb = p.lob, p.tkb
                plut = self._param_lut(h)
                if defer and dev.type == "cuda" and self.side_stream:   # concurrently with the data kernel
                    if self._side is None:
                        self._side = torch.cuda.Stream(dev)
                    side = self._side
                    side.wait_stream(torch.cuda.current_stream(dev))

                def launch_params() -> None:
                    with (torch.cuda.stream(side) if side is not None else contextlib.nullcontext()):
                        v2_params_kernel[(-(-p.n_blocks // 32),)](
                            u32, par, p.blocks, p.bic, cbase, cwords, plut, lo_src, lob, u8_src, tkb,
                            err, p.n_blocks, h.batch, p.max_nch, p.max_ntok, TB=h.table_bits,
                            PSZ=2 if h.param_dtype == 1 else 4, HAS_TS=bool(h.token_scaling),
                            FRAC=h.packed.frac_bits, BLOCK=32, DG=h.dir_group, num_warps=1, enable_fp_fusion=False)

                if side is not None:
                    for t in (lo_src, u8_src, scratch, payload, plut):
                        t.record_stream(side)
                # the data kernel does not read the pass's output when deferred: it may go first
                late = side is not None and self.params_after
                if not late:
                    launch_params()
            try:
                for s0, s1, upto in self._groups(c, p, wait is not None, group_bytes):
                    if wait is not None:
                        wait(upto)
                    p0 = s0 // block
                    consts = dict(TB=h.table_bits, PSZ=2 if h.param_dtype == 1 else 4, SHARED=h.step_mode == 1,
                                  HAS_TS=bool(h.token_scaling), OUT_BF16=bf16, BLOCK=block, num_warps=nw,
                                  enable_fp_fusion=False)
                    if nested:
                        v2_decode_nested_kernel[(-(-s1 // block) - p0,)](
                            u32, ids, par, u8_src, lo_src, lob, tkb, p.sblk, p.ssic, p.sc0, p.snch, p.blocks,
                            cbase, cw_dec, lut, lut if fc is None else fc, scales, out, obase, strides, hdim,
                            err, s0, s1, p0, h.batch, LUT8=fc is not None, PKD=packed, DG=h.dir_group, DEFER=defer,
                            **consts)
                    else:
                        v2_decode_kernel[(-(-s1 // block) - p0,)](
                            u32, ids, par, payload, p.sblk, p.ssic, p.sc0, p.snch, steps, p.blocks,
                            cbase, cwords, lut, scales, out, obase, strides, hdim,
                            err, s0, s1, p0, h.batch, **consts)
                if late:
                    launch_params()
            finally:   # joined even when a launch raises: its scratch must outlive the side work
                if side is not None:
                    torch.cuda.current_stream(dev).wait_stream(side)
            if defer:   # lo and the token scales, once the parameter pass is done (joined above)
                v2_dequant_kernel[(p.n_blocks, -(-p.max_elems // DQ_BLOCK))](
                    out, p.blocks, lo_src, lob, u8_src, tkb, scales, obase, strides, hdim, h.batch,
                    HAS_TS=bool(h.token_scaling), BLOCK=DQ_BLOCK, num_warps=4, enable_fp_fusion=False)
            if wait is not None:
                wait(None)   # the checksum pass reads every chunk
            if verify and c.n_chunks:
                # Per-chunk words checksums: one coalesced pass over each chunk's word area.
                max_words = int(chunk[1].max())
                if max_words:
                    v2_words_sum_kernel[(c.n_chunks, -(-max_words // WSUM_BLOCK))](
                        u32, wbase, cwords, sums, _K1, _K2, BLOCKW=WSUM_BLOCK, num_warps=4)
                # Chunk metadata CRC-32s on the device (the host parse checked the header and
                # chunk index): segments in parallel, then one lane per chunk combines them and
                # compares both checks with the stored values.
                tab, mat = self._crc_consts()
                maxs = int(msz.max()) // CRC_SEG
                segs = torch.empty(max(c.n_chunks * maxs, 1), dtype=torch.int32, device=dev)
                if maxs:
                    v2_meta_crc_seg_kernel[(c.n_chunks, -(-maxs // 64))](
                        u32, cbase, msize, tab, segs, maxs, SEGW=CRC_SEG // 4, BLOCK=64, num_warps=2)
                v2_meta_crc_fin_kernel[(-(-c.n_chunks // 32),)](
                    payload, cbase, msize, mcrc, tab, mat, segs, scratch, sums, stored, c.n_chunks, maxs,
                    SEG=CRC_SEG, BLOCK=32, num_warps=1)
            flags = scratch[:3]
            tm.launch_ms = (time.perf_counter() - t2) * 1e3
        tm.total_ms = (time.perf_counter() - t0) * 1e3
        self.last_timing = tm     # host-side breakdown of this call (before the error read)
        if not check:
            return flags
        self.raise_for(flags, verify)
        return None

    def _decode_transformed(self, c: fmt2.ContainerV2, bufs: Sequence[Sequence[torch.Tensor]], *, verify: Verify,
                            payload: Optional[torch.Tensor], stream: Optional[torch.cuda.Stream], check: bool,
                            wait: Optional[Callable[[Optional[int]], None]],
                            group_bytes: Optional[int]) -> Optional[torch.Tensor]:
        """Model-profile container: coefficients into the untransformer's token-major scratch,
        then its GEMM + RoPE/sinks/store kernels into ``bufs``, all queued on one stream."""
        from .untransform import Untransformer
        if self._untransformer is None:
            self._untransformer = Untransformer(self.device)
        ut = self._untransformer
        ut.profiles = list(self.profiles)
        prep = ut.prepare(c)
        # the caller's buffers, of the original cache's dtype: the store kernel writes through
        # their strides, so they are checked here like a plain container's
        check_kv_buffers(c.header, c.tokens(), bufs, dtype=prep.out_dtype, device=self.device)
        views, slabs = ut.scratch_views(prep, c.header.batch)
        flags = self.decode_into(c, views, verify=verify, payload=payload, stream=stream, check=False, wait=wait,
                                 group_bytes=group_bytes, coefficients=True, _trusted=True)
        ut.finish(prep, slabs, bufs, stream)
        if not check:
            return flags
        self.raise_for(flags, verify)
        return None

    @staticmethod
    def raise_for(flags: torch.Tensor, verify: Verify = True) -> None:
        """Read the device error flags of a ``decode_into(check=False)`` call (waits for its
        kernels) and raise what they say: ``StreamError`` / ``ChecksumError``."""
        nbad, nsum, nmeta = (int(x) for x in flags.tolist())
        if nmeta and verify:
            raise ChecksumError(f"{nmeta} chunk(s): metadata checksum mismatch")
        if nbad:
            raise StreamError(f"{nbad} stream(s) failed on the GPU (corrupt directory, parameters or "
                              "rANS stream not ending in its initial state)")
        if nsum and verify:
            raise ChecksumError(f"{nsum} chunk(s): stream words checksum mismatch")


_DEFAULT: dict = {}


def default_decoder(device: Any) -> GpuDecoder:
    dev = torch.device(device)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    d = _DEFAULT.get(dev)
    if d is None:
        d = _DEFAULT[dev] = GpuDecoder(dev)
    return d
