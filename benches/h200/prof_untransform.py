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
    r["coeffs token-major"] = ev_ms(lambda: dec.decode_into(c, views, payload=pay, verify=False, coefficients=True))
    r["coeffs head-major"] = ev_ms(lambda: dec.decode_into(c, hm, payload=pay, verify=False, coefficients=True))
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
