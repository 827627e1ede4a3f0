"""Streaming a stored KV cache over a simulated link: TTFT and quality.

A real model (SmolLM2-135M through ONNX Runtime, CPU) prefills a long context once; its cache is
stored per 256-token chunk at the levels small / default / high (cachegen) and raw (fp16) in a
real redis-server. The loader then restores it through a token-bucket TCP proxy in front of
Redis (cachegen.store.netsim) at 0.1 / 1 / 10 Gbps and along a changing-bandwidth trace, and the
runner answers a question after it. Reported per link and method:

* TTFT: restore (lookup + fetch + decode / recompute) + the question's prefill -> first token;
* quality of the answer's next-token distributions vs the exact cache (cachegen.quality): mean
  KL (nats) and top-1 agreement over the question tokens.

Methods: adaptive (planner + EWMA bandwidth, TTFT budget), each fixed level, raw fp16 KV, full
recompute (prefill of the whole prompt, no store).

    python benches/bench_streaming.py [--tokens 2048] [--budget-frac 0.5] [--model smollm2]
    pytest benches/bench_streaming.py --benchmark-enable       # microbenchmarks (planner, restore)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from cachegen.store import (TEXT, BandwidthEstimator, ChunkCosts, CostModel, DirectoryBackend, KVStore,
                            RedisBackend, StreamingLoader, fingerprint_from_runner, plan_stream)
from cachegen.store.netsim import ThrottledProxy
from cachegen.store.testing import FakeRunner, RedisServer

LEVELS = ("high", "default", "small", "raw")
GBPS = 1e9 / 8  # bytes/s per Gbps


def _demo_ids(runner, n: int) -> np.ndarray:
    text = (Path(__file__).resolve().parents[1] / "cachegen" / "data" / "demo_text.txt").read_text()
    ids = runner.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return np.asarray(ids[:n], dtype=np.int64)


def _copy_to_redis(store_dir: Path, client, prefix: str = "cachegen:") -> int:
    n = 0
    for sub in store_dir.iterdir():
        if sub.is_dir():
            for f in sub.iterdir():
                if not f.name.startswith("."):
                    client.set(prefix + f.name, f.read_bytes())
                    n += 1
    return n


def run_table(model: str = "smollm2", tokens: int = 2048, question: int = 64, budget_frac: float = 0.5,
              links=(0.1, 1.0, 10.0), trace=True, out_json: str | None = None) -> list[dict]:
    from cachegen.ort import OrtRunner, export_model
    from cachegen.quality import evaluate_kv

    runner = OrtRunner(export_model(model, "fp32", "cpu"))
    fp = fingerprint_from_runner(runner, f"{model}-fp32")
    ids = _demo_ids(runner, tokens + question)
    ctx, q = ids[:tokens], ids[tokens:]
    C = fp.chunk_tokens
    n_chunks = tokens // C

    # ---- reference: full recompute (the prompt is context + question)
    t = time.perf_counter()
    _, full_kv = runner.prefill(ids)
    full_s = time.perf_counter() - t
    ref_kv = [(k[:, :, :tokens], v[:, :, :tokens]) for k, v in full_kv]

    # ---- store once (cached between runs: encoding the high level is slow on 2 CPU cores)
    store_dir = Path(os.environ.get("CACHEGEN_BENCH_STORE", Path.home() / ".cache" / "cachegen" / "bench_store")) / f"{model}-{tokens}"
    dstore = KVStore(DirectoryBackend(store_dir), fp, levels=LEVELS)
    t = time.perf_counter()
    dstore.put(ctx, ref_kv)
    put_s = time.perf_counter() - t
    m = dstore.lookup(ctx)
    assert m.tokens == n_chunks * C, m.tokens
    dec = {}
    for lv in LEVELS:
        t = time.perf_counter()
        dstore.get_chunk(m.chunks[1], lv)
        dec[lv] = time.perf_counter() - t
    recompute_chunk = full_s * C / len(ids)
    sizes = {lv: int(np.mean([c.levels[lv] for c in m.chunks])) for lv in LEVELS}
    print(f"# {model} fp32 CPU, context {tokens} tokens ({n_chunks} chunks) + question {len(q)}; "
          f"full prefill {full_s:.2f} s; store put {put_s:.1f} s", file=sys.stderr)
    print(f"# per chunk: bytes {sizes}, decode s { {k: round(v, 3) for k, v in dec.items()} }, "
          f"recompute ~{recompute_chunk:.3f} s", file=sys.stderr)

    budget = budget_frac * full_s
    rows = []
    with RedisServer(maxmemory="2gb") as srv:
        import redis
        _copy_to_redis(store_dir, redis.Redis.from_url(srv.url))
        with ThrottledProxy(("127.0.0.1", srv.port), rate_Bps=10 * GBPS, burst=262144) as px:
            store = KVStore(RedisBackend(f"redis://127.0.0.1:{px.port}/0", socket_timeout=30), fp, levels=LEVELS)
            link_specs = [(f"{g:g} Gbps", [(0.0, g * GBPS)]) for g in links]
            if trace:
                link_specs.append(("trace 1->0.05->1 Gbps", [(0.0, 1 * GBPS), (0.2, 0.05 * GBPS), (3.0, 1 * GBPS)]))
            methods = [(f"adaptive {budget_frac:g}x", dict(levels=None, allow_text=True, budget_s=budget)),
                       ("adaptive 0.2x", dict(levels=None, allow_text=True, budget_s=0.2 * full_s)),
                       ("adaptive fast", dict(levels=None, allow_text=True, budget_s=None))]
            methods += [(f"fixed {lv}", dict(levels=[lv], allow_text=False, budget_s=None)) for lv in ("high", "default", "small")]
            methods += [("raw fp16", dict(levels=["raw"], allow_text=False, budget_s=None))]
            for link, tr in link_specs:
                for name, kw in methods:
                    px.set_trace(tr)
                    bw = BandwidthEstimator(tr[0][1])     # a prior: the link's nominal speed
                    costs = CostModel(recompute_s=recompute_chunk, decode_s=dict(dec))
                    loader = StreamingLoader(store, runner, bw, costs, **kw)
                    t = time.perf_counter()
                    logits, kv_all, rep = loader.prefill(ids)
                    ttft = time.perf_counter() - t
                    restored = [(k[:, :, :tokens], v[:, :, :tokens]) for k, v in kv_all]
                    qr = evaluate_kv(runner, ref_kv, restored, q, generate_tokens=0)
                    rows.append({"link": link, "method": name, "ttft_s": ttft, "restore_s": rep.restore_s,
                                 "MB": rep.bytes / 1e6, "chunks": rep.counts(), "kl_mean": qr.kl_mean,
                                 "top1": qr.top1_agreement, "budget_s": kw["budget_s"],
                                 "speedup_vs_recompute": full_s / ttft})
                    print(_fmt(rows[-1]), file=sys.stderr, flush=True)
                rows.append({"link": link, "method": "full recompute", "ttft_s": full_s, "restore_s": 0.0, "MB": 0.0,
                             "chunks": {TEXT: n_chunks}, "kl_mean": 0.0, "top1": 1.0, "budget_s": None,
                             "speedup_vs_recompute": 1.0})
    if out_json:
        Path(out_json).write_text(json.dumps({"model": model, "tokens": tokens, "question": len(q),
                                              "full_prefill_s": full_s, "budget_s": budget, "chunk_bytes": sizes,
                                              "decode_s": dec, "rows": rows}, indent=1))
    return rows


def _fmt(r: dict) -> str:
    ch = ",".join(f"{k}:{v}" for k, v in sorted(r["chunks"].items()))
    return (f"| {r['link']:<22} | {r['method']:<14} | {r['ttft_s']:7.2f} | {r['speedup_vs_recompute']:5.2f}x | "
            f"{r['MB']:7.1f} | {r['kl_mean']:.4f} | {r['top1']:.3f} | {ch} |")


def print_table(rows: list[dict]) -> None:
    print("| link                   | method         | TTFT s  | vs rec | MB      | KL mean | top-1 | chunks |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_fmt(r))


# ------------------------------------------------------------------ pytest-benchmark

def test_bench_plan_stream_32_chunks(benchmark):
    cs = [ChunkCosts({"high": 3e6, "default": 2e6, "small": 1.2e6, "raw": 6e6},
                     {"high": 0.5, "default": 0.5, "small": 0.5, "raw": 0.05}, 1.3) for _ in range(32)]
    p = benchmark(plan_stream, cs, 0.1 * GBPS, 12.0)
    assert p.fits


def test_bench_restore_throttled_redis_fake_model(benchmark):
    C = 64
    r = FakeRunner(num_layers=8, num_kv_heads=4, head_dim=64)
    with RedisServer() as srv, ThrottledProxy(("127.0.0.1", srv.port), rate_Bps=1 * GBPS) as px:
        store = KVStore(RedisBackend(f"redis://127.0.0.1:{px.port}/0"), fingerprint_from_runner(r, "fake", C),
                        levels=("default", "raw"))
        ids = np.arange(8 * C + 1) % 700
        store.put(ids, r.prefill(ids)[1])
        loader = StreamingLoader(store, r, BandwidthEstimator(1 * GBPS), CostModel(recompute_s=0.05), budget_s=0.5)
        kv, rep = benchmark(loader.restore, ids)
        assert rep.restored_tokens == 8 * C


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--question", type=int, default=64)
    ap.add_argument("--budget-frac", type=float, default=0.5, help="adaptive TTFT budget, fraction of full recompute")
    ap.add_argument("--links", default="0.1,1,10")
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = run_table(a.model, a.tokens, a.question, a.budget_frac, tuple(float(x) for x in a.links.split(",")),
                     not a.no_trace, a.json)
    print_table(rows)
