"""Questions over one long document, answered by two separate processes sharing KV through Redis.

Process A reads the document + question 1: nothing is stored, it prefills everything and stores
the document's KV (compressed with cachegen, per 256-token chunk) in Redis. Process B, a fresh
interpreter that shares nothing with A but the Redis server, gets the document + question 2:
it finds the stored prefix, loads and decodes it, prefills only the rest, and answers faster.

    python examples/chat_reuse_redis.py                      # starts its own redis-server
    python examples/chat_reuse_redis.py --redis redis://host:6379/0 --level small --tokens 3000
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "cachegen" / "data" / "demo_text.txt"


def turn(name: str, url: str, question: str, tokens: int, level: str, new_tokens: int, out) -> None:
    import numpy as np

    from cachegen.ort import OrtRunner, export_model
    from cachegen.store import KVStore, RedisBackend, fingerprint_from_runner, prefill_with_reuse

    runner = OrtRunner(export_model("smollm2", "fp32", "cpu"))
    store = KVStore(RedisBackend(url), fingerprint_from_runner(runner, "smollm2-fp32"), levels=(level,))
    doc = runner.encode(DOC.read_text())
    while len(doc) < tokens:
        doc = doc + doc
    ids = np.asarray(doc[:tokens] + runner.encode(f"\n\nQuestion: {question}\nAnswer:"), dtype=np.int64)
    t0 = time.perf_counter()
    logits, kv, info = prefill_with_reuse(runner, store, ids, level=level, save=False)
    first = int(np.argmax(logits[0, -1]))
    ttft = time.perf_counter() - t0
    rest = runner.generate([first], new_tokens - 1, kv=kv) if new_tokens > 1 else []
    t1 = time.perf_counter()
    written = store.put(ids, kv, start_chunk=info["reused_tokens"] // store.chunk_tokens)
    store_s = time.perf_counter() - t1
    out.put({"name": name, "prompt": len(ids), "reused": info["reused_tokens"], "ttft_s": ttft,
             "load_s": info["load_s"], "compute_s": info["compute_s"], "stored_chunks": written,
             "store_s": store_s, "answer": runner.decode([first] + list(rest)).strip()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--redis", default=None, help="Redis URL (default: start a local redis-server)")
    ap.add_argument("--tokens", type=int, default=2048, help="document tokens")
    ap.add_argument("--level", default="default", help="cachegen preset for the stored KV")
    ap.add_argument("--new-tokens", type=int, default=24)
    a = ap.parse_args()
    server = None
    if a.redis is None:
        from cachegen.store.testing import RedisServer
        server = RedisServer().start()
        a.redis = server.url
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    try:
        res = []
        for name, question in [("A", "What is this text about?"), ("B", "Summarize the main point in one sentence.")]:
            p = ctx.Process(target=turn, args=(name, a.redis, question, a.tokens, a.level, a.new_tokens, q))
            p.start()
            r = q.get(timeout=900)
            p.join()
            res.append(r)
            print(f"process {r['name']} (pid {p.pid}): prompt {r['prompt']} tokens, reused {r['reused']} from Redis, "
                  f"TTFT {r['ttft_s']:.2f} s (load {r['load_s']:.2f} s + compute {r['compute_s']:.2f} s); "
                  f"stored {r['stored_chunks']} chunks in {r['store_s']:.2f} s")
            print(f"    answer: {r['answer']!r}")
        print(f"TTFT with the prefix shared through Redis: {res[1]['ttft_s']:.2f} s vs {res[0]['ttft_s']:.2f} s "
              f"({res[0]['ttft_s'] / res[1]['ttft_s']:.1f}x faster)")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
