"""Encode pass 2 A/B in a process that holds a model (what a serving process or bench_guard
looks like): one pool of forked workers for all chunks (HEAD) vs a pool per 2*workers chunks
(before 2026-12-03, eighth session) vs serial, alternating, on a real Gemma-3 4K prefill.

    python benches/ab_encode_fork.py [gemma3|smollm2] [tokens] [reps]
"""
import statistics, sys, time
import numpy as np
import cachegen
from cachegen.codec import encoder as E
from cachegen.codec import parallel as P
from cachegen.ort import OrtRunner, export_model
from cachegen.quality import eval_texts

model = sys.argv[1] if len(sys.argv) > 1 else "gemma3"
T = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
r = OrtRunner(export_model(model, "fp32", "cpu", progress=False), threads=2)
ids = r.encode(eval_texts()["pydocs-a"][0])[:T]
_, kv = r.prefill(ids)
kv = r.window_kv(kv)
new = E.code_chunks_v2


def grouped(header, layers_out, units, progress=None):      # the old pass 2
    freqs = [u.astype(np.int64) << (24 - header.table_bits) for u in units]
    n2 = P.worker_count(header.decoded_bytes(), header.n_chunks)
    out, step = [], max(n2, 1) * 2
    for s in range(0, header.n_chunks, step):
        ks = range(s, min(s + step, header.n_chunks))
        out.extend(P.parallel_map(E._code_chunk_v2, (header, layers_out, freqs), ks, min(n2, len(ks))))
    return out


def serial(header, layers_out, units, progress=None):
    freqs = [u.astype(np.int64) << (24 - header.table_bits) for u in units]
    return [E._code_chunk_v2((header, layers_out, freqs), k) for k in range(header.n_chunks)]


ref = cachegen.encode(kv, "default")
times = {"one pool": [], "pool per group": [], "serial": []}
for _ in range(reps):
    for name, fn in (("one pool", new), ("pool per group", grouped), ("serial", serial)):
        E.code_chunks_v2 = fn
        t = time.perf_counter()
        data = cachegen.encode(kv, "default")
        times[name].append(time.perf_counter() - t)
        assert data == ref
E.code_chunks_v2 = new
rss = int(open("/proc/self/statm").read().split()[1]) * 4096 / 1e9
print(f"{model} {T} tokens, default, workers {P.worker_count(1 << 30, 99)}, process RSS {rss:.2f} GB, {reps} reps alternating:")
for k, v in times.items():
    print(f"  {k}: median {statistics.median(v):.3f} s  (all {', '.join(f'{x:.2f}' for x in v)})")
