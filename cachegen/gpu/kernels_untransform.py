"""Triton kernel of the GPU inverse profile transform (cachegen.gpu.untransform)."""
from __future__ import annotations

import triton
import triton.language as tl

from .kernels import bf16_bits


@triton.jit
def untransform_store_kernel(z_ptr, md_ptr, cos_ptr, sin_ptr, sink_ptr, out_ptr, B, T, C, NS,
                             H: tl.constexpr, D: tl.constexpr, CP2: tl.constexpr, BT: tl.constexpr,
                             ROPE: tl.constexpr, SINKS: tl.constexpr, OUT_BF16: tl.constexpr,
                             UNIT_D: tl.constexpr):
    """Layer g of a group, rows r = b * T + t of its transformed slab z [G, B*T, C] (fp32,
    channel c = head * D + d): RoPE re-applied (rotate-half: x*cos + rot(x)*sin, rot(x)[d] =
    -x[d + D/2] below D/2, x[d - D/2] above), the first md[g, 5] tokens replaced by the exact
    sink values, cast, stored at out + md[g, 0] + b*sb + head*sh + t*st + d*sd."""
    g = tl.program_id(0)
    r = tl.program_id(1) * BT + tl.arange(0, BT)
    c = tl.arange(0, CP2)
    rm = r < B * T
    cm = c < C
    m = rm[:, None] & cm[None, :]
    b = r // T
    t = r - b * T
    hh = c // D
    d = c - hh * D
    zrow = z_ptr + g.to(tl.int64) * B * T * C + r.to(tl.int64)[:, None] * C
    x = tl.load(zrow + c[None, :], mask=m, other=0.0)
    if ROPE:
        half: tl.constexpr = D // 2
        d2 = tl.where(d < half, d + half, d - half)
        x2 = tl.load(zrow + (hh * D + d2)[None, :], mask=m, other=0.0)
        rot = tl.where((d < half)[None, :], -x2, x2)
        ti = t.to(tl.int64)[:, None] * D + d[None, :]
        cs = tl.load(cos_ptr + ti, mask=m, other=0.0)
        sn = tl.load(sin_ptr + ti, mask=m, other=0.0)
        x = x * cs + rot * sn
    row = md_ptr + g * 6
    if SINKS:
        ns = tl.load(row + 5)
        sm = m & (t < ns)[:, None]
        sv = tl.load(sink_ptr + ((g * B + b).to(tl.int64)[:, None] * NS + t[:, None]) * C + c[None, :],
                     mask=sm, other=0.0).to(tl.float32)
        x = tl.where(sm, sv, x)
    obase = tl.load(row + 0)
    sb = tl.load(row + 1)
    sh = tl.load(row + 2)
    st = tl.load(row + 3)
    if UNIT_D:
        sd = 1               # a compile-time unit stride lets the store vectorise
    else:
        sd = tl.load(row + 4)
    optr = out_ptr + obase + (b.to(tl.int64) * sb + t.to(tl.int64) * st)[:, None] \
        + (hh.to(tl.int64) * sh + d.to(tl.int64) * sd)[None, :]
    if OUT_BF16:
        tl.store(optr, bf16_bits(x), mask=m)
    else:
        tl.store(optr, x.to(optr.dtype.element_ty), mask=m)
