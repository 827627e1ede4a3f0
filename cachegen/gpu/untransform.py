"""Model-profile containers restored on the GPU without a host round trip.

A profile container (``cachegen.profile``: EXT_TRANSFORM) stores per-token coefficients of an
orthonormal basis over heads x head_dim, keys before RoPE, the first tokens exact. The generic
path (``cachegen.decode`` + ``profile.postprocess``) allocates the coefficients, runs ~10 torch
ops per layer and K/V, then copies into the caller's buffers. Here instead:

1. the fused decoder writes the coefficients into a token-major fp32 scratch (strided views),
   one slab per *group* of layers that share (K/V, tokens, start, RoPE theta, basis or not);
2. one fp32 batched GEMM per group multiplies by the bases (``y @ basis.T``; IEEE fp32, TF32
   off whatever the process setting, so the output meets FORMAT_V2 §6.1's tolerance);
3. one Triton kernel per group re-applies RoPE (cos/sin tables formed in float64 like the
   reference, cached per shape), puts the exact sink tokens back, casts to the output dtype and
   stores straight into the caller's strided buffers.

The arithmetic is the CPU reference's (``profile.codec.apply_inverse``): same fp32 products and
sums per element (GEMM summation order aside), same rotate-half RoPE, round-to-nearest cast.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..buffers import TORCH_DTYPES
from ..errors import ConfigError, FormatError, InputError

_ROPE_CACHE = 16     # (start, tokens, theta, dim) tables kept per device
_META_CACHE = 8      # staged metadata + sinks kept per (record, buffers)
_PREP_CACHE = 8      # prepared plans kept per transform record


@dataclass
class Group:
    """Layers of one K/V side decoded into one scratch slab and transformed together."""
    kvi: int
    layers: list
    tokens: int
    start: int
    theta: Optional[float]
    basis: bool


@dataclass
class Prepared:
    """What one restore of a profile container needs: the record, its profile, the groups."""
    record: Any
    profile: Any
    groups: list
    out_dtype: torch.dtype
    key: tuple = ()
    cps: int = 8                      # the container's channels per stream
    views: Optional[tuple] = None     # (scratch address, batch) -> decoder views and slabs, cached


class Untransformer:
    """Per-device state: bases stacked per group on the device, RoPE tables, the scratch."""

    def __init__(self, device: Any):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # tensors report cuda:N: compare like with like in finish()'s buffer check
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._bases: dict = {}            # (profile hash, kvi, layers) -> fp32 [G, C, C] = basis^T
        self._rope: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._scratch: Optional[torch.Tensor] = None
        self.profiles: list = []          # extra Profile objects searched before the registry
        self._pin: Optional[torch.Tensor] = None
        self._pin_ev = None
        self._meta: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._prep: "OrderedDict[tuple, Prepared]" = OrderedDict()
        # basis groups' coefficients stored stream-interleaved (see scratch_views); False: the
        # natural channel order (A/B)
        self.interleave = True

    # ------------------------------------------------------------------ plan
    def prepare(self, c: Any) -> Prepared:
        from ..format.extensions import EXT_TRANSFORM, find
        from ..profile.codec import TransformRecord
        from ..profile.profile import find_profile

        ext = find(list(c.header.extensions), EXT_TRANSFORM)
        h = c.header
        toks = c.tokens()
        # a restore of the same cache shape with the same record (and so the same profile, by
        # content hash) reuses its plan, views and staged metadata: no per-layer host work
        pkey = (bytes(ext.payload), tuple(toks), tuple((l.heads_dim(0), l.heads_dim(1)) for l in h.layers), h.batch)
        hit = self._prep.get(pkey)
        if hit is not None:
            self._prep.move_to_end(pkey)
            return hit
        rec = TransformRecord(ext.payload)
        prof = find_profile(rec.hash, self.profiles)
        if prof is None:
            raise ConfigError(f"this container was coded with model profile {rec.hash.hex()}, which is not "
                              "available: register it (cachegen.profile) or run `cachegen profile MODEL`")
        if rec.n_layers != len(h.layers) or prof.n_layers != len(h.layers) or rec.batch != h.batch:
            raise FormatError(f"transform record for {rec.n_layers} layers / batch {rec.batch}, "
                              f"container has {len(h.layers)} / {h.batch}")
        H, D = prof.kv_heads, prof.head_dim
        groups: "OrderedDict[tuple, Group]" = OrderedDict()
        for i, l in enumerate(h.layers):
            for kvi in (0, 1):
                if l.heads_dim(kvi) != (H, D):
                    raise FormatError(f"layer {i}: coded shape {l.heads_dim(kvi)} does not fit the profile ({H}, {D})")
                n = rec.sinks[i]
                if n and (n >= toks[i] or rec.starts[i] != 0):
                    raise FormatError(f"layer {i}: {n} sink tokens do not fit {toks[i]} tokens")
                theta = prof.theta(i) if kvi == 0 else None
                theta = float(theta) if theta else None
                key = (kvi, toks[i], rec.starts[i], theta, prof.basis(kvi, i) is not None)
                g = groups.get(key)
                if g is None:
                    g = groups[key] = Group(kvi, [], toks[i], rec.starts[i], theta, key[4])
                g.layers.append(i)
        p = Prepared(rec, prof, list(groups.values()), TORCH_DTYPES[rec.dtype], pkey, int(h.channels_per_stream))
        self._prep[pkey] = p
        while len(self._prep) > _PREP_CACHE:
            self._prep.popitem(last=False)
        return p

    def _geometry(self, p: Prepared, g: Group) -> tuple[int, int]:
        """(row width R, stream groups Gc) of a group's scratch. A basis group's coefficients are
        stored stream-interleaved: channel c = s * cps + j of stream s at row offset s + j * Gc
        (Gc = ceil(C / cps)), so the decoder's lanes, one stream each, store to adjacent words
        instead of words cps apart (measured on the H200, 8K SmolLM2: fp32 coefficient stores
        made the decode 1.86 ms vs 1.10 for the same cache to fp16); the bmm undoes the order
        through the basis rows (``_basis_t``). Basis-less groups keep the natural order: their
        slab is read by the store kernel directly."""
        C = p.profile.kv_heads * p.profile.head_dim
        if not (g.basis and self.interleave) or C % p.cps:
            # (a padded row would hold stale words the GEMM multiplies: NaN * 0 is NaN)
            return C, 0
        gc = -(-C // p.cps)
        return gc * p.cps, gc

    def scratch_views(self, p: Prepared, batch: int) -> tuple[list, list]:
        """Coefficient views for the decoder, per layer ([B, H, T, D], or [B, Gc, T, cps] for an
        interleaved group), and the slab [G, B*T, R] of each group."""
        H, D = p.profile.kv_heads, p.profile.head_dim
        geo = [self._geometry(p, g) for g in p.groups]
        need = sum(len(g.layers) * batch * g.tokens * R for g, (R, _) in zip(p.groups, geo))
        if self._scratch is None or self._scratch.numel() < need:
            self._scratch = None
            try:
                self._scratch = torch.empty(max(need, 1), dtype=torch.float32, device=self.device)
            except RuntimeError as e:
                from ..errors import LimitExceededError
                raise LimitExceededError(f"cannot allocate the coefficient scratch ({4 * need} bytes): {e}") from None
        vkey = (self._scratch.data_ptr(), batch, self.interleave)
        if p.views is not None and p.views[0] == vkey:
            return p.views[1], p.views[2]
        views: list = [[None, None] for _ in range(p.record.n_layers)]
        slabs, off = [], 0
        for g, (R, gc) in zip(p.groups, geo):
            T = g.tokens
            n = len(g.layers) * batch * T * R
            slab = self._scratch[off:off + n].view(len(g.layers), batch * T, R)
            off += n
            for j, i in enumerate(g.layers):
                if gc:
                    # the decoder splits channel c into (c // cps, c % cps) by the view's last dim
                    views[i][g.kvi] = slab[j].as_strided((batch, gc, T, p.cps), (T * R, 1, R, gc))
                else:
                    views[i][g.kvi] = slab[j].view(batch, T, H, D).permute(0, 2, 1, 3)
            slabs.append(slab)
        views = [tuple(v) for v in views]
        p.views = (vkey, views, slabs)
        return views, slabs

    def _basis_t(self, p: Prepared, g: Group) -> torch.Tensor:
        """[G, R, C] fp32: basis^T per layer, rows in the scratch's channel order."""
        R, gc = self._geometry(p, g)
        key = (p.profile.hash, g.kvi, tuple(g.layers), R, gc, p.cps)
        t = self._bases.get(key)
        if t is None:
            arr = np.stack([p.profile.basis(g.kvi, i).T for i in g.layers]).astype(np.float32)
            if gc:
                C = arr.shape[1]
                c = np.arange(C)
                perm = np.zeros((arr.shape[0], R, C), dtype=np.float32)
                perm[:, c // p.cps + (c % p.cps) * gc, :] = arr
                arr = perm
            t = torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)
            if len(self._bases) >= 64:
                self._bases.clear()
            self._bases[key] = t
        return t

    def _rope_tables(self, start: int, tokens: int, theta: float, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin fp32 [T, D] exactly as ``profile.ops.rope_angles`` forms them (float64 angles)."""
        key = (start, tokens, theta, dim)
        hit = self._rope.get(key)
        if hit is not None:
            self._rope.move_to_end(key)
            return hit
        half = dim // 2
        # formed on the device (no host copy to wait on): the reference's float64 formula
        inv = 1.0 / (float(theta) ** (torch.arange(half, dtype=torch.float64, device=self.device) * 2.0 / dim))
        pos = torch.arange(start, start + tokens, dtype=torch.float64, device=self.device)
        ang = pos[:, None] * inv[None, :]
        ang = torch.cat([ang, ang], dim=1)
        hit = (torch.cos(ang).to(torch.float32).contiguous(), torch.sin(ang).to(torch.float32).contiguous())
        self._rope[key] = hit
        while len(self._rope) > _ROPE_CACHE:
            self._rope.popitem(last=False)
        return hit

    # ------------------------------------------------------------------ run
    def _stage(self, host: np.ndarray) -> torch.Tensor:
        """int64 words to the device through one reused pinned buffer, without a host sync (a
        pageable copy would wait for the decode queued before it)."""
        if self.device.type != "cuda":
            return torch.from_numpy(host)
        n = host.size
        if self._pin is None or self._pin.numel() < n:
            self._pin = torch.empty(max(n, 1024), dtype=torch.int64, pin_memory=True)
            self._pin_ev = None
        if self._pin_ev is not None:
            self._pin_ev.synchronize()       # the previous call's copy has left the buffer
        self._pin.numpy()[:n] = host
        out = self._pin[:n].to(self.device, non_blocking=True)
        self._pin_ev = torch.cuda.Event()
        self._pin_ev.record()
        return out

    def _metadata(self, p: Prepared, bufs: Sequence[Sequence[torch.Tensor]], base: torch.Tensor) -> tuple:
        """Staged per-group metadata (output offset, 4 strides, sink count per layer) and exact
        sink tokens, cached per (record, buffer addresses and strides): a restore into the same
        bound buffers reuses the device copy instead of re-packing it on the host."""
        rec, prof = p.record, p.profile
        esz = base.element_size()
        key = (p.key, tuple((t.data_ptr(), t.stride()) for pair in bufs for t in pair))
        hit = self._meta.get(key)
        if hit is not None:
            self._meta.move_to_end(key)
            return hit
        H, D = prof.kv_heads, prof.head_dim
        C, B = H * D, rec.batch
        sinks = rec.sink_arrays(prof) if any(rec.sinks) else None
        ns_max = max(rec.sinks) if sinks is not None else 0
        # one upload: per group [G, 6], then its sink tokens token-major [G, B, ns_max, C] (fp16 bits)
        parts, offs, o, unit = [], [], 0, []
        for g in p.groups:
            G = len(g.layers)
            meta = np.empty((G, 6), dtype=np.int64)
            for j, i in enumerate(g.layers):
                t = bufs[i][g.kvi]
                meta[j, 0] = (t.data_ptr() - base.data_ptr()) // esz
                meta[j, 1:5] = t.stride()
                meta[j, 5] = rec.sinks[i]
            unit.append(bool((meta[:, 4] == 1).all()))
            parts.append(meta.reshape(-1))
            so = None
            if sinks is not None and any(rec.sinks[i] for i in g.layers):
                sk = np.zeros((G, B, ns_max, C), dtype=np.float16)
                for j, i in enumerate(g.layers):
                    n = rec.sinks[i]
                    if n:
                        sk[j, :, :n] = sinks[i][g.kvi].transpose(0, 2, 1, 3).reshape(B, n, C)
                words = np.zeros(-(-sk.nbytes // 8), dtype=np.int64)
                words.view(np.uint8)[:sk.nbytes] = sk.view(np.uint8).reshape(-1)
                so = (o + G * 6, sk.size)
                parts.append(words)
            offs.append((o, so))
            o += sum(x.size for x in parts[len(parts) - (2 if so else 1):])
        hit = (self._stage(np.concatenate(parts)), offs, unit, ns_max)
        self._meta[key] = hit
        while len(self._meta) > _META_CACHE:
            self._meta.popitem(last=False)
        return hit

    def finish(self, p: Prepared, slabs: Sequence[torch.Tensor], bufs: Sequence[Sequence[torch.Tensor]],
               stream: Optional[torch.cuda.Stream] = None) -> None:
        """Bases (IEEE fp32 bmm), RoPE, sinks, cast and store into ``bufs`` (queued on ``stream``);
        ``bufs`` already checked against the container (``buffers.check_kv_buffers``)."""
        from .kernels_untransform import untransform_store_kernel

        rec, prof = p.record, p.profile
        H, D = prof.kv_heads, prof.head_dim
        C = H * D
        B = rec.batch
        base = bufs[0][0]
        esz = base.element_size()
        for pair in bufs:
            for t in pair:
                if (t.data_ptr() - base.data_ptr()) % esz:   # offsets are counted in elements of base
                    raise InputError("decode buffers must be element-aligned with each other")
        md_all, offs, unit, ns_max = self._metadata(p, bufs, base)
        ctx = torch.cuda.stream(stream) if stream is not None and self.device.type == "cuda" else contextlib.nullcontext()
        old_tf32 = torch.backends.cuda.matmul.allow_tf32
        out = base.view(torch.int16) if base.dtype == torch.bfloat16 else base
        with ctx:
            torch.backends.cuda.matmul.allow_tf32 = False   # IEEE fp32: the conformance tolerance assumes it
            try:
                for g, slab, (mo, so), ud in zip(p.groups, slabs, offs, unit):
                    G = len(g.layers)
                    md = md_all[mo:mo + 6 * G]
                    if g.theta is not None:
                        cos, sin = self._rope_tables(g.start, g.tokens, g.theta, D)
                    else:
                        cos = sin = slab
                    sk = md_all[so[0]:].view(torch.float16)[:so[1]] if so else slab
                    z = torch.bmm(slab, self._basis_t(p, g)) if g.basis else slab
                    BT = 16
                    grid = (G, -(-(B * g.tokens) // BT))
                    untransform_store_kernel[grid](
                        z, md, cos, sin, sk, out, B, g.tokens, C, ns_max,
                        H=H, D=D, CP2=triton_next_pow2(C), BT=BT, ROPE=g.theta is not None, SINKS=so is not None,
                        OUT_BF16=base.dtype == torch.bfloat16, UNIT_D=ud, num_warps=4, enable_fp_fusion=False)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old_tf32


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())
