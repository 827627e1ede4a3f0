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

    python benches/bench_streaming.py [--deadline-min 20] [--only smollm2-2048] [--report]
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
TRACE = ("trace 1->0.05->1 Gbps", [(0.0, 1 * GBPS), (0.2, 0.05 * GBPS), (3.0, 1 * GBPS)])

#: (model, context tokens, links, methods, stored levels); sized for ~20 min on 2 loaded CPU cores
PLAN = [
    ("smollm2", 2048, ("0.1", "1", "10", "trace"), "all", LEVELS),
    ("smollm2", 1024, ("0.1", "1", "10"), "all", LEVELS),
    ("gemma3", 1024, ("0.1", "1", "10"), "all", LEVELS),
    ("smollm2", 4096, ("0.1", "1"), "short", ("default", "small", "raw")),
    ("gemma3", 4096, ("1",), "short", ("default", "small", "raw")),
    ("smollm2", 8192, ("1",), "short", ("default", "small", "raw")),
]


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


def _methods(kind: str, budget: float, levels) -> list:
    m = [("adaptive budget", dict(levels=None, allow_text=True, budget_s=budget)),
         ("adaptive fastest", dict(levels=None, allow_text=True, budget_s=None))]
    fixed = [lv for lv in levels if lv != "raw"] if kind == "all" else ["default"]
    m += [(f"fixed {lv}", dict(levels=[lv], allow_text=False, budget_s=None)) for lv in fixed]
    m += [("raw fp16", dict(levels=["raw"], allow_text=False, budget_s=None))]
    return m


def run_config(runner, model: str, tokens: int, links, kind: str, levels, question: int = 32,
               budget_frac: float = 0.5, srv=None, log=print) -> dict:
    from cachegen.quality import compare_logits
    from cachegen.store import RecomputeModel

    fp = fingerprint_from_runner(runner, f"{model}-fp32")
    ids = _demo_ids(runner, tokens + question)
    ctx, q = ids[:tokens], ids[tokens:]
    C = fp.chunk_tokens
    n_chunks = tokens // C

    # ---- reference: full recompute of context + question (= the "full recompute" TTFT)
    t = time.perf_counter()
    full_logits, full_kv = runner.prefill(ids)
    full_s = time.perf_counter() - t
    ref_q = np.asarray(full_logits)[0, tokens:]
    ref_kv = [(k[:, :, :tokens], v[:, :, :tokens]) for k, v in full_kv]
    del full_kv
    # ---- recompute cost model from two measurements: a chunk at 0 and one at the end
    t = time.perf_counter()
    runner.prefill(ctx[:C])
    t0 = time.perf_counter() - t
    pos = tokens - C
    t = time.perf_counter()
    runner.continue_from([(k[:, :, :pos], v[:, :, :pos]) for k, v in ref_kv], ctx[pos:])
    t1 = time.perf_counter() - t
    rmodel = dict(chunk_tokens=C, t_at_0=t0, pos=pos, t_at_pos=t1)

    # ---- store once (cached between runs: encoding is slow on 2 CPU cores)
    store_dir = Path(os.environ.get("CACHEGEN_BENCH_STORE", Path.home() / ".cache" / "cachegen" / "bench_store")) / f"{model}-{tokens}"
    dstore = KVStore(DirectoryBackend(store_dir), fp, levels=levels)
    t = time.perf_counter()
    dstore.put(ctx, ref_kv)
    put_s = time.perf_counter() - t
    m = dstore.lookup(ctx)
    assert m.tokens == n_chunks * C, m.tokens
    dec = {}
    for lv in levels:
        dstore.get_chunk(m.chunks[-1], lv)
        t = time.perf_counter()
        dstore.get_chunk(m.chunks[-1], lv)
        dec[lv] = time.perf_counter() - t
    sizes = {lv: int(np.mean([c.levels[lv] for c in m.chunks])) for lv in levels}
    log(f"# {model} fp32 CPU, context {tokens} ({n_chunks} chunks) + question {len(q)}; full prefill "
        f"{full_s:.2f} s; recompute chunk {t0:.2f} s @0, {t1:.2f} s @{pos}; store put {put_s:.1f} s")
    log(f"# per chunk: bytes {sizes}, decode s { {k: round(v, 3) for k, v in dec.items()} }")

    budget = budget_frac * full_s
    rows = [{"model": model, "tokens": tokens, "link": "any", "method": "full recompute", "ttft_s": full_s,
             "restore_s": 0.0, "MB": 0.0, "chunks": {TEXT: n_chunks}, "kl_mean": 0.0, "top1": 1.0,
             "budget_s": None, "speedup_vs_recompute": 1.0}]
    log(_fmt(rows[-1]))
    import redis
    cl = redis.Redis.from_url(srv.url)
    cl.flushall()
    _copy_to_redis(store_dir, cl)
    with ThrottledProxy(("127.0.0.1", srv.port), rate_Bps=10 * GBPS, burst=262144) as px:
        store = KVStore(RedisBackend(f"redis://127.0.0.1:{px.port}/0", socket_timeout=60), fp, levels=levels)
        specs = [TRACE if l == "trace" else (f"{l} Gbps", [(0.0, float(l) * GBPS)]) for l in links]
        for link, tr in specs:
            for name, kw in _methods(kind, budget, levels):
                px.set_trace(tr)
                bw = BandwidthEstimator(tr[0][1])     # a prior: the link's nominal speed
                costs = CostModel(RecomputeModel.calibrate(**rmodel), decode_s=dict(dec), level_bytes=sizes)
                loader = StreamingLoader(store, runner, bw, costs, **kw)
                t = time.perf_counter()
                logits, _, rep = loader.prefill(ids)
                ttft = time.perf_counter() - t
                cmp = compare_logits(ref_q, np.asarray(logits)[0])
                rows.append({"model": model, "tokens": tokens, "link": link, "method": name, "ttft_s": ttft,
                             "restore_s": rep.restore_s, "suffix_s": rep.suffix_s, "MB": rep.bytes / 1e6,
                             "chunks": rep.counts(), "kl_mean": float(np.mean(cmp["kl"])), "top1": cmp["top1"],
                             "budget_s": kw["budget_s"], "speedup_vs_recompute": full_s / ttft,
                             "bw_final_gbps": bw.gbps})
                log(_fmt(rows[-1]))
    cl.close()
    return {"model": model, "tokens": tokens, "question": len(q), "full_prefill_s": full_s, "budget_s": budget,
            "chunk_bytes": sizes, "decode_s": dec, "recompute_model": rmodel, "rows": rows}


def run_all(plan=PLAN, out_json: str = "benches/streaming_results.json", deadline_min: float = 20.0,
            only: str | None = None) -> dict:
    from cachegen.ort import OrtRunner, export_model

    t_start = time.time()
    out = {"date": time.strftime("%Y-%m-%d %H:%M"), "loadavg_start": os.getloadavg(), "configs": [],
           "skipped": []}
    runners: dict = {}
    with RedisServer(maxmemory="4gb") as srv:
        for model, tokens, links, kind, levels in plan:
            tag = f"{model}-{tokens}"
            if only and tag not in only.split(","):
                continue
            if (time.time() - t_start) / 60 > deadline_min:
                out["skipped"].append(tag)
                print(f"# skipped {tag}: past the {deadline_min} min deadline", file=sys.stderr)
                continue
            if model not in runners:
                runners.clear()
                runners[model] = OrtRunner(export_model(model, "fp32", "cpu"))
            t = time.time()
            cfg = run_config(runners[model], model, tokens, links, kind, levels, srv=srv,
                             log=lambda s: print(s, file=sys.stderr, flush=True))
            cfg["wall_s"] = time.time() - t
            cfg["loadavg_after"] = os.getloadavg()
            out["configs"].append(cfg)
            out["loadavg_end"] = os.getloadavg()
            out["total_s"] = time.time() - t_start
            Path(out_json).write_text(json.dumps(out, indent=1))
    out["loadavg_end"] = os.getloadavg()
    Path(out_json).write_text(json.dumps(out, indent=1))
    return out


def _fmt(r: dict) -> str:
    ch = ",".join(f"{k}:{v}" for k, v in sorted(r["chunks"].items()))
    return (f"| {r['model']} | {r['tokens']} | {r['link']} | {r['method']} | {r['ttft_s']:.2f} | "
            f"{r['speedup_vs_recompute']:.2f}x | {r['MB']:.1f} | {r['kl_mean']:.4f} | {r['top1']:.3f} | {ch} |")


def table(out: dict) -> str:
    lines = ["| model | context | link | method | TTFT s | vs recompute | MB | KL mean | top-1 | chunks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for cfg in out["configs"]:
        for r in cfg["rows"]:
            lines.append(_fmt(r))
    return "\n".join(lines)


def plot(out: dict, path: str = "benches/streaming_plot.png") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfgs = out["configs"]
    names = list(dict.fromkeys(r["method"] for c in cfgs for r in c["rows"] if r["method"] != "full recompute"))
    colors = {m: f"C{i}" for i, m in enumerate(names)}
    fig, axes = plt.subplots(1, len(cfgs), figsize=(3.6 * len(cfgs), 3.6), squeeze=False)
    for ax, cfg in zip(axes[0], cfgs):
        rows = [r for r in cfg["rows"] if r["link"].endswith("Gbps") and not r["link"].startswith("trace")]
        for meth in dict.fromkeys(r["method"] for r in rows):
            pts = sorted((float(r["link"].split()[0]), r["ttft_s"]) for r in rows if r["method"] == meth)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=meth, ms=4, color=colors[meth])
        ax.axhline(cfg["full_prefill_s"], color="k", ls="--", lw=1, label="full recompute")
        ax.axhline(cfg["budget_s"], color="r", ls=":", lw=1, label="budget (0.5x recompute)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"{cfg['model']} {cfg['tokens']} tokens", fontsize=9)
        ax.set_xlabel("link Gbps")
    axes[0][0].set_ylabel("TTFT s")
    axes[0][0].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
    ap.add_argument("--json", default="benches/streaming_results.json")
    ap.add_argument("--deadline-min", type=float, default=20.0, help="skip configs that would start later")
    ap.add_argument("--only", default=None, help="comma list of model-tokens, e.g. smollm2-2048")
    ap.add_argument("--report", action="store_true", help="only print the table / redraw the plot from --json")
    a = ap.parse_args()
    out = json.loads(Path(a.json).read_text()) if a.report else run_all(out_json=a.json, deadline_min=a.deadline_min,
                                                                          only=a.only)
    print(table(out))
    plot(out)
