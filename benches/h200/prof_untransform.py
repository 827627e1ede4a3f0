"""Where a model-profile restore's GPU time goes (device-only, payload already on the GPU):
coefficients decode (token-major scratch vs head-major fp32), finish (bmm + RoPE/store), the
whole decode_into, the plain v2 default for comparison, and a torch.profiler kernel table."""
import sys, time
import numpy as np
import torch
sys.path.insert(0, "benches")
from bench_decode_v2 import load_npz, tile, gemma_real  # noqa: E402
import cachegen  # noqa: E402
from cachegen import profile as cp  # noqa: E402
from cachegen.profile import shipped_profile  # noqa: E402
from cachegen.format import v2 as fmt2  # noqa: E402
from cachegen.gpu.v2 import GpuDecoder  # noqa: E402
from cachegen.gpu.untransform import Untransformer  # noqa: E402

dev = torch.device("cuda")


def ev_ms(fn, reps=20):
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)   # backlog: GPU time, not host launch speed
        a.record(); fn(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    return float(np.median(ts))


def on_dev(data):
    n = -(-len(data) // 16) * 16
    p = torch.zeros(n, dtype=torch.uint8, device=dev)
    p[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    return p


def main():
    for model in sys.argv[1:] or ["smollm2", "gemma3"]:
        npz = f".gpudata/{model}_1k.npz"
        T = 8192
        prof = shipped_profile(model)
        kv = tile(load_npz(npz), T) if model == "smollm2" else gemma_real(npz, T)
        fp16 = sum(2 * k.size + 2 * v.size for k, v in kv)
        t = time.time(); data = cp.encode(kv, prof, "default-p"); enc = time.time() - t
        plain = cachegen.encode(kv, "default")
        c, cpl = fmt2.parse_container(data), fmt2.parse_container(plain)
        pay, paypl = on_dev(data), on_dev(plain)
        dec = GpuDecoder(dev); dec.profiles = [prof]
        bufs = [(torch.empty(k.shape, dtype=torch.float16, device=dev), torch.empty(v.shape, dtype=torch.float16, device=dev)) for k, v in kv]
        ut = Untransformer(dev); ut.profiles = [prof]
        prep = ut.prepare(c)
        views, slabs = ut.scratch_views(prep, 1)
        hm = [(torch.empty(k.shape, dtype=torch.float32, device=dev), torch.empty(v.shape, dtype=torch.float32, device=dev)) for k, v in kv]
        r = {}
        r["plain default decode"] = ev_ms(lambda: dec.decode_into(cpl, bufs, payload=paypl, verify=False))
        un = Untransformer(dev); un.profiles = [prof]; un.interleave = False
        pn = un.prepare(c)
        vn, _ = un.scratch_views(pn, 1)
        r["coeffs token-major"] = ev_ms(lambda: dec.decode_into(c, vn, payload=pay, verify=False, coefficients=True,
                                                                _trusted=True))
        r["coeffs head-major"] = ev_ms(lambda: dec.decode_into(c, hm, payload=pay, verify=False, coefficients=True))
        r["coeffs interleaved (ut views)"] = ev_ms(lambda: dec.decode_into(c, views, payload=pay, verify=False,
                                                                           coefficients=True, _trusted=True))
        r["finish"] = ev_ms(lambda: ut.finish(prep, slabs, bufs))
        bas = [(slab, ut._basis_t(prep, g)) for g, slab in zip(prep.groups, slabs) if g.basis]
        outs = [torch.empty_like(s_) for s_, _ in bas]
        torch.backends.cuda.matmul.allow_tf32 = False
        r["bmm ieee only"] = ev_ms(lambda: [torch.bmm(s_, b_, out=o_) for (s_, b_), o_ in zip(bas, outs)])
        torch.backends.cuda.matmul.allow_tf32 = True
        r["bmm tf32 only"] = ev_ms(lambda: [torch.bmm(s_, b_, out=o_) for (s_, b_), o_ in zip(bas, outs)])
        torch.backends.cuda.matmul.allow_tf32 = False
        r["copy slabs (bw ref)"] = ev_ms(lambda: [o_.copy_(s_) for (s_, _), o_ in zip(bas, outs)])
        r["full profile decode"] = ev_ms(lambda: dec.decode_into(c, bufs, payload=pay, verify=False))
        dec._untransformer.interleave = False
        r["full, natural-order scratch"] = ev_ms(lambda: dec.decode_into(c, bufs, payload=pay, verify=False))
        dec._untransformer.interleave = True
        kv32 = [(k.astype(np.float32), v.astype(np.float32)) for k, v in kv]
        p32 = cachegen.encode(kv32, "default")
        c32, pay32 = fmt2.parse_container(p32), on_dev(p32)
        b32 = [(torch.empty(k.shape, dtype=torch.float32, device=dev), torch.empty(v.shape, dtype=torch.float32, device=dev)) for k, v in kv]
        r["plain default, fp32 out"] = ev_ms(lambda: dec.decode_into(c32, b32, payload=pay32, verify=False))
        torch.cuda.synchronize()
        for nm, fn in (("host: prepare", lambda: ut.prepare(c)), ("host: views", lambda: ut.scratch_views(prep, 1)),
                       ("host: finish", lambda: ut.finish(prep, slabs, bufs)),
                       ("host: full decode_into", lambda: dec.decode_into(c, bufs, payload=pay, verify=False, check=False)),
                       ("host: plain decode_into", lambda: dec.decode_into(cpl, bufs, payload=paypl, verify=False, check=False))):
            ts = []
            for _ in range(20):
                torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
            r[nm] = float(np.median(ts)) * 1e3
        # interleaved vs natural-order scratch, in units of the spec tolerance
        dec.decode_into(c, bufs, payload=pay, verify=False); a = [x.float().clone() for pr in bufs for x in pr]
        dec._untransformer.interleave = False
        dec.decode_into(c, bufs, payload=pay, verify=False); b_ = [x.float() for pr in bufs for x in pr]
        dec._untransformer.interleave = True
        worst = max(float((torch.abs(x - y) / (2.0 ** -10 * torch.clamp(torch.abs(y), min=1))).max()) for x, y in zip(a, b_))
        print(f"interleaved vs natural scratch: max |diff| / tolerance = {worst:.4f}")
        r["full verified"] = ev_ms(lambda: dec.decode_into(c, bufs, payload=pay))
        print(f"== {model} {T} tok: profile {len(data)/1e6:.2f} MB (x{fp16/len(data):.2f}), plain {len(plain)/1e6:.2f} MB, "
              f"groups {[(g.kvi, len(g.layers), g.tokens, g.basis, g.theta) for g in prep.groups]}, encode {enc:.1f} s")
        for k, v in r.items():
            print(f"  {k:24s} {v:7.3f} ms  {fp16 / v / 1e6:7.1f} GB/s")
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CUDA]) as pr:
            for _ in range(5):
                dec.decode_into(c, bufs, payload=pay, verify=False)
            torch.cuda.synchronize()
        print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
