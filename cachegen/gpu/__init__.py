"""GPU decoders (Triton), writing straight into the caller's tensors.

* format v2: ``cachegen.gpu.v2.GpuDecoder`` -- one fused launch (rANS decode + dequantize +
  store), a reusable per-device context; the path ``cachegen.decode``/``decode_into`` take.
* format v1 (this module): ``decode_gpu`` and ``decode_gpu_into``, two launches, described below.

Both are called by ``cachegen.dispatch`` (which handles lossless containers on the CPU); this
package never imports the API.

Bit-identical to the CPU decoders: the kernels run ``lockstep_decode``'s integer arithmetic and
the exact fp32 dequantization (no FMA contraction), then round to the stored dtype.

Two launches per container, whatever its number of chunks:
1. ``ans_decode_kernel``: one lane per stream of every chunk -> symbols [max_steps, streams]
   (uint8, or int16 when an alphabet has more than 256 symbols);
2. ``dequant_kernel``: tiles of [tokens, channels] -> anchor-delta join, range check,
   dequantize, store in [B, H, T, D].
Errors (a stream not ending in its initial state, an index out of range) are flags read back
after the launches and raised as ``StreamError``; the destination is then partly written.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..errors import InputError, StreamError
from ..format.container import MODE_LOSSLESS, Container
from ..format.tables import TOKEN_SCALES
from .plan import BLK_COLS, Plan, build_plan, symbol_luts

_TORCH_DTYPES = {1: torch.float16, 2: torch.bfloat16, 3: torch.float32}

# Tunables (measured on the H100: benches/gpu_notes.md).
LUT_BITS = 8
PACKED = True
BLOCK = 32          # streams per program of the ANS kernel
NUM_WARPS = 1
SEARCH_WHILE = True
TILE_T = 2
TILE_C = 256
DQ_WARPS = 2


@dataclass
class Prepared:
    """Everything the two launches need, on the device."""
    plan: Plan
    blob: torch.Tensor
    arrays: dict
    sym_dtype: torch.dtype
    search_iters: int
    packed: bool
    lut_bits: int = LUT_BITS     # as built (symbol_luts lowers it when there are many tables)


def _dev(a: np.ndarray, device, dtype=None) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def prepare(container: Container, device, verify: bool = True, lut_bits: Optional[int] = None,
            tile_t: Optional[int] = None, tile_c: Optional[int] = None, block: Optional[int] = None,
            packed: Optional[bool] = None) -> Prepared:
    """Host work (parse + validate chunks, build metadata) and the uploads."""
    lut_bits = LUT_BITS if lut_bits is None else lut_bits
    tile_t = TILE_T if tile_t is None else tile_t
    tile_c = TILE_C if tile_c is None else tile_c
    block = BLOCK if block is None else block
    packed = PACKED if packed is None else packed
    h = container.header
    plan = build_plan(container, verify, tile_t, tile_c)
    cdf, lut, span = symbol_luts(h.freqs, h.cdfs, lut_bits, packed)
    end = container.payload_start + sum(e.size for e in container.chunks)
    raw = np.frombuffer(container.data[container.payload_start:end], dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffer: only copied to the device
        blob = torch.from_numpy(raw).to(device)
    nprog = -(-plan.n_streams // block)
    pad = nprog * block - plan.n_streams
    steps = np.pad(plan.nsym, (0, pad)).reshape(nprog, block).max(axis=1) if nprog else np.zeros(0, np.int32)
    # Stream words as aligned 32-bit words: one copy of the payload per byte alignment in use
    # (chunks start at any byte), each stream indexed into the copy that aligns it.
    rel = plan.wbyte - container.payload_start
    mis = rel % 4
    segs, seg_base, off = [], np.zeros(4, dtype=np.int64), 0
    for al in np.unique(mis) if mis.size else []:
        nw = (raw.size - int(al)) // 4
        segs.append(blob[int(al):int(al) + 4 * nw].clone().view(torch.int32))
        seg_base[al] = off
        off += nw
    words = torch.cat(segs) if segs else torch.zeros(1, dtype=torch.int32, device=device)
    a = {
        "wbyte": _dev(seg_base[mis] + (rel - mis) // 4, device),
        "wcnt": _dev(plan.wcnt, device), "nsym": _dev(plan.nsym, device), "per": _dev(plan.per, device),
        "na": _dev(plan.n_anchor, device), "tbase": _dev(plan.tbase, device), "ids": _dev(plan.ids, device),
        "lut": _dev(lut, device), "cdf": _dev(cdf, device), "steps": _dev(steps.astype(np.int32), device),
        "tiles": _dev(plan.tiles, device), "blocks": _dev(plan.blocks, device),
        "lo": _dev(plan.lo, device), "step": _dev(plan.step, device),
        "exps": _dev(plan.exps if plan.exps.size else np.zeros(1, np.uint8), device),
        "scales": _dev(TOKEN_SCALES.astype(np.float32), device),
        "cdf_stride": cdf.shape[1],
    }
    sym_dtype = torch.uint8 if plan.max_symbol < 256 else torch.int16
    search_iters = int(np.ceil(np.log2(span + 1))) if span > 0 else 0
    return Prepared(plan, words, a, sym_dtype, search_iters, packed, int(lut.shape[1]).bit_length() - 1)


def launch(prep: Prepared, bufs: Sequence[Sequence[torch.Tensor]], container: Container, *,
           block: Optional[int] = None, num_warps: Optional[int] = None, search_while: Optional[bool] = None,
           lut_bits: Optional[int] = None, tile_t: Optional[int] = None, tile_c: Optional[int] = None,
           dq_warps: Optional[int] = None, check: bool = True) -> Optional[torch.Tensor]:
    """The two kernel launches. With check=True, synchronizes and raises StreamError on bad data;
    otherwise returns the (device) error flags without synchronizing."""
    from .kernels import ans_decode_kernel, dequant_kernel

    block = BLOCK if block is None else block
    num_warps = NUM_WARPS if num_warps is None else num_warps
    search_while = SEARCH_WHILE if search_while is None else search_while
    lut_bits = prep.lut_bits        # the LUT fixes it (the argument is kept for old callers)
    tile_t = TILE_T if tile_t is None else tile_t
    tile_c = TILE_C if tile_c is None else tile_c
    dq_warps = DQ_WARPS if dq_warps is None else dq_warps

    h = container.header
    plan, a = prep.plan, prep.arrays
    device = prep.blob.device
    S = plan.n_streams
    flat = [t for pair in bufs for t in pair]
    base = flat[0]
    esz = base.element_size()
    bf16 = base.dtype == torch.bfloat16
    obase = torch.tensor([(t.data_ptr() - base.data_ptr()) // esz for t in flat], dtype=torch.int64)
    strides = torch.tensor([list(t.stride()) for t in flat], dtype=torch.int64)
    hdim = torch.tensor([t.shape[3] for t in flat], dtype=torch.int64)
    obase, strides, hdim = obase.to(device), strides.to(device), hdim.to(device)

    sym = torch.empty((max(plan.max_steps, 1), max(S, 1)), dtype=prep.sym_dtype, device=device)
    err1 = torch.zeros(max(S, 1), dtype=torch.int8, device=device)
    nt = plan.tiles.shape[0]
    err2 = torch.zeros(max(nt, 1), dtype=torch.int8, device=device)
    nprog = -(-S // block)
    if nprog:
        ans_decode_kernel[(nprog,)](
            prep.blob, a["wbyte"], a["wcnt"], a["nsym"], a["per"], a["na"], a["tbase"], a["ids"],
            a["lut"], a["cdf"], a["steps"], sym, err1, S, a["cdf_stride"], prep.search_iters,
            CPS=h.channels_per_stream, ROLES=h.roles, LUT_BITS=lut_bits, SEARCH_WHILE=search_while, PACKED=prep.packed,
            BLOCK=block, num_warps=num_warps)
    if nt:
        dequant_kernel[(nt,)](
            sym, S, a["tiles"], a["blocks"], base.view(torch.int16) if bf16 else base, obase, strides, hdim, a["lo"], a["step"], a["exps"],
            a["scales"], err2, h.batch, CPS=h.channels_per_stream, G=h.group_size,
            HAS_TS=bool(h.token_scaling), OUT_BF16=bf16, BLK_COLS=BLK_COLS, BT=tile_t, BC=tile_c, num_warps=dq_warps,
            enable_fp_fusion=False)
    if not check:
        return torch.stack([err1.any(), err2.any()])
    e1, e2 = bool(err1.any()), bool(err2.any())
    if e1:
        raise StreamError(f"{int(err1.sum())} ANS stream(s) did not end in the initial state (corrupt or truncated)")
    if e2:
        raise StreamError("reconstructed quantization index outside [0, 2**bits - 1]")
    return None


def _alloc(container: Container, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    h = container.header
    dt = _TORCH_DTYPES[h.dtype]
    out = []
    for l, t in zip(h.layers, container.tokens()):
        out.append((torch.empty((h.batch, l.k_heads, t, l.k_dim), dtype=dt, device=device),
                    torch.empty((h.batch, l.v_heads, t, l.v_dim), dtype=dt, device=device)))
    return out


def decode_gpu(container: Container, device, verify: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode a parsed container into new tensors on `device` (a CUDA device)."""
    device = torch.device(device)
    if container.header.mode == MODE_LOSSLESS:
        raise InputError("lossless containers decode on the CPU (cachegen.dispatch copies them to the GPU)")
    bufs = _alloc(container, device)
    launch(prepare(container, device, verify), bufs, container)
    return bufs


def decode_gpu_into(container: Container, bufs: Sequence[Sequence[torch.Tensor]], verify: bool = True) -> None:
    """Decode into caller-owned tensors [B, H, capacity, D] (shapes and dtype checked by the API)."""
    bufs = [tuple(p) for p in bufs]
    devices = {t.device for p in bufs for t in p}
    if len(devices) != 1:
        raise InputError(f"decode_into buffers must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if container.header.mode == MODE_LOSSLESS:
        raise InputError("lossless containers decode on the CPU (cachegen.dispatch copies them to the GPU)")
    launch(prepare(container, device, verify), bufs, container)


__all__ = ["decode_gpu", "decode_gpu_into", "prepare", "launch"]
