"""Time to first token on a CUDA GPU, three ways, plus TPOT and peak GPU memory.

(The issue-11 restore benchmark, per source of the bytes -- file warm/cold, pinned, on the GPU --
with the I/O breakdown, is benches/bench_restore.py; this one keeps the raw-fp16 baseline, TPOT
and memory.)

    python benches/bench_ttft.py [--models gemma3 smollm2] [--out ttft.json]
    python -m pytest benches/bench_ttft.py --benchmark-enable          # pytest-benchmark entries

(a) recompute: ORT CUDA fp16 prefill of the context (builder graph: logits for every position),
    then argmax of the last row;
(b) raw: fp16 KV file read from local disk into a pinned host buffer (allocated beforehand), one
    H2D copy, scattered into the static IOBinding buffers (D2D), then one decode step;
(c) restore: compressed file read from local disk into ``bytes``, ``StaticKV.restore(bytes)``
    (staged through cachegen.io's reused pinned buffer, H2D, GPU decode straight into the buffers
    bound to the session: parse + checks + plan + kernels + error check), then one decode step.
"warm" reads come from the page cache; "cold" reads drop the file's pages first
(posix_fadvise DONTNEED; the VM's virtual disk behind it). Gemma-3's files hold its windowed
cache (sliding layers: last 512 tokens), both raw and compressed.
TPOT: mean time per token of 32 greedy steps after the restore (static shared buffers).
Memory: torch.cuda.max_memory_allocated (our buffers, decoder scratch) and device memory in use
(cudaMemGetInfo: CUDA context + ORT arena + torch pool), each mode in its own process, contexts
in increasing order (ORT's arena only grows, so the value after a context is that context's peak).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("TTFT_WORK", "/tmp/cachegen_ttft"))
CONTEXTS = {"gemma3": [1024, 4096, 8192, 16384], "smollm2": [1024, 4096, 8128]}
TPOT_TOKENS = 32
PROVIDER_OPTS = {"arena_extend_strategy": "kSameAsRequested"}


def _runner(model):
    from cachegen.ort import OrtRunner, export_model
    return OrtRunner(export_model(model, "fp16", "cuda", progress=False), provider="cuda",
                     provider_options=PROVIDER_OPTS)


def _ids(r, n):
    from cachegen.demo import demo_text
    ids = r.encode(demo_text())
    body = ids[1:] if r.add_bos else ids
    while len(ids) < n:
        ids = ids + body
    return ids[:n]


def _sync():
    import torch
    torch.cuda.synchronize()


def _med(xs):
    return statistics.median(xs)


def _mem():
    import torch
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**20


def _drop(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------- workers

def prep(model):
    """Prefill each context once, write raw + compressed files and the reference greedy tokens."""
    import torch
    import cachegen
    from cachegen.ort.cuda import StaticKV
    r = _runner(model)
    WORK.mkdir(parents=True, exist_ok=True)
    ids = _ids(r, max(CONTEXTS[model]) + 1)
    out = {}
    for T in CONTEXTS[model]:
        _, kv = r._run(r._ids_array(ids[:T]), None, 0)
        kvw = r.window_kv(kv)
        s = StaticKV(r, T + TPOT_TOKENS + 8)
        s.load(kvw)
        ref = s.greedy(ids[T:T + 1], TPOT_TOKENS)
        host = [(k.cpu(), v.cpu()) for k, v in kvw]
        t0 = time.perf_counter()
        data = cachegen.encode(host, "default")
        t_enc = time.perf_counter() - t0
        (WORK / f"{model}_{T}.cgk").write_bytes(data)
        with open(WORK / f"{model}_{T}.raw", "wb") as f:
            for k, v in host:
                f.write(k.contiguous().numpy().tobytes())
                f.write(v.contiguous().numpy().tobytes())
        full = sum(2 * (k.numel() + v.numel()) for k, v in kv)
        out[T] = dict(comp_bytes=len(data), raw_bytes=os.path.getsize(WORK / f"{model}_{T}.raw"),
                      full_fp16_bytes=full, encode_s=t_enc, ref_tokens=ref,
                      tokens_per_layer=[int(k.shape[2]) for k, _ in host])
        del kv, kvw, s, host
        torch.cuda.empty_cache()
        print(f"prep {model} {T}: comp {len(data)/1e6:.2f} MB raw {out[T]['raw_bytes']/1e6:.2f} MB "
              f"enc {t_enc:.1f}s", flush=True)
    (WORK / f"{model}_prep.json").write_text(json.dumps(out))


def worker(model, mode, reps):
    import torch
    from cachegen.ort.cuda import StaticKV
    torch.cuda.init()
    m0 = _mem()
    r = _runner(model)
    _sync()
    m_model = _mem()
    meta = json.loads((WORK / f"{model}_prep.json").read_text())
    ids = _ids(r, max(CONTEXTS[model]) + 1)
    rows = []
    for T in CONTEXTS[model]:
        torch.cuda.reset_peak_memory_stats()
        nxt = ids[T:T + 1]
        row = dict(model=model, mode=mode, tokens=T)
        if mode == "recompute":
            arr = r._ids_array(ids[:T])

            def once():
                t = time.perf_counter()
                lg, kv = r._run(arr, None, 0)
                tok = int(lg[0, -1].argmax())
                dt = (time.perf_counter() - t) * 1e3
                del lg, kv
                return dt, tok
            for _ in range(2):
                once()
            ts = [once()[0] for _ in range(reps)]
            row["ttft_ms"] = _med(ts)
            row["ttft_all"] = ts
        elif mode == "raw":
            path = WORK / f"{model}_{T}.raw"
            n = os.path.getsize(path)
            pinned = torch.empty(n, dtype=torch.uint8).pin_memory()
            pin_np = pinned.numpy()
            stage = torch.empty(n, dtype=torch.uint8, device="cuda")
            s = StaticKV(r, T + 8)
            toks = meta[str(T)]["tokens_per_layer"]
            H, D = r.num_kv_heads, r.head_dim

            def once(cold):
                if cold:
                    _drop(path)
                _sync()
                t = time.perf_counter()
                with open(path, "rb", buffering=0) as f:
                    got = f.readinto(memoryview(pin_np))
                assert got == n
                t1 = time.perf_counter()
                stage.copy_(pinned, non_blocking=True)
                h = stage.view(torch.float16)
                off = 0
                views = s._views(toks)
                for (bk, bv), t_l in zip(views, toks):
                    m = H * t_l * D
                    bk[:, :, :t_l].copy_(h[off:off + m].view(1, H, t_l, D)); off += m
                    bv[:, :, :t_l].copy_(h[off:off + m].view(1, H, t_l, D)); off += m
                s.length = T
                _sync()
                t2 = time.perf_counter()
                tok = int(s.step(nxt)[0, -1].argmax())
                t3 = time.perf_counter()
                return dict(read=(t1 - t) * 1e3, h2d=(t2 - t1) * 1e3, step=(t3 - t2) * 1e3, total=(t3 - t) * 1e3), tok
            for _ in range(2):
                once(False)
            for cold in (False, True):
                rs = [once(cold)[0] for _ in range(reps)]
                tag = "cold" if cold else "warm"
                row[f"ttft_ms_{tag}"] = _med([x["total"] for x in rs])
                for k in ("read", "h2d", "step"):
                    row[f"{k}_ms_{tag}"] = _med([x[k] for x in rs])
            row["ttft_ms"] = row["ttft_ms_warm"]
            row["file_bytes"] = n
        else:  # restore
            path = WORK / f"{model}_{T}.cgk"
            n = os.path.getsize(path)
            s = StaticKV(r, T + TPOT_TOKENS + 8)

            def once(cold, verify):
                if cold:
                    _drop(path)
                _sync()
                t = time.perf_counter()
                with open(path, "rb") as f:
                    data = f.read()
                t1 = time.perf_counter()
                s.restore(data, verify=verify)
                _sync()
                t2 = time.perf_counter()
                tok = int(s.step(nxt)[0, -1].argmax())
                t3 = time.perf_counter()
                return dict(read=(t1 - t) * 1e3, decode=(t2 - t1) * 1e3, step=(t3 - t2) * 1e3, total=(t3 - t) * 1e3), tok
            for _ in range(2):
                once(False, True)
            for cold, verify in ((False, True), (False, False), (True, True)):
                rs = [once(cold, verify)[0] for _ in range(reps)]
                tag = ("cold" if cold else "warm") + ("" if verify else "_noverify")
                row[f"ttft_ms_{tag}"] = _med([x["total"] for x in rs])
                for k in ("read", "decode", "step"):
                    row[f"{k}_ms_{tag}"] = _med([x[k] for x in rs])
            row["ttft_ms"] = row["ttft_ms_warm"]
            row["file_bytes"] = n
            # TPOT after the restore, static shared buffers
            s.restore(open(path, "rb").read())
            lg = s.step(nxt)
            toks = [int(lg[0, -1].argmax())]
            step_ms = []
            for _ in range(TPOT_TOKENS):
                t = time.perf_counter()
                lg = s.step([toks[-1]])
                toks.append(int(lg[0, -1].argmax()))
                step_ms.append((time.perf_counter() - t) * 1e3)
            row["tpot_ms"] = statistics.mean(step_ms)
            row["tpot_median_ms"] = _med(step_ms)
            ref = meta[str(T)]["ref_tokens"]
            row["greedy_agree_vs_fp16"] = sum(a == b for a, b in zip(toks[:TPOT_TOKENS], ref)) / len(ref)
            row["greedy_prefix_vs_fp16"] = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), len(ref))
            # TPOT of the chained-present mode (runner.generate) for comparison
            import cachegen
            kv = cachegen.decode(open(path, "rb").read(), device="cuda")
            _sync()
            t = time.perf_counter()
            g1 = r.generate(nxt, 1, kv=kv, stop_at_eos=False)
            t1 = time.perf_counter()
            g = r.generate(nxt, TPOT_TOKENS + 1, kv=kv, stop_at_eos=False)
            t2 = time.perf_counter()
            row["tpot_chained_ms"] = ((t2 - t1) - (t1 - t)) * 1e3 / TPOT_TOKENS
            del kv
        _sync()
        row["torch_peak_MB"] = torch.cuda.max_memory_allocated() / 2**20
        row["device_used_MB"] = _mem()
        row["device_used_over_model_MB"] = row["device_used_MB"] - m_model
        row["model_loaded_MB"] = m_model - m0
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                          if not isinstance(v, list)}), flush=True)
    with open(WORK / f"{model}_{mode}.json", "w") as f:
        json.dump(rows, f)


# ---------------------------------------------------------------------------------- driver

def _sub(*args, timeout=900):
    cmd = [sys.executable, __file__, *args]
    print("+", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, timeout=timeout)
    return p.returncode


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["gemma3", "smollm2"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benches" / "ttft_results_run.json"))
    ap.add_argument("--prep", default=None)
    ap.add_argument("--worker", nargs=2, default=None)
    ap.add_argument("--skip-prep", action="store_true")
    a = ap.parse_args()
    if a.prep:
        return prep(a.prep)
    if a.worker:
        return worker(a.worker[0], a.worker[1], a.reps)
    import torch
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [], "prep": {}}
    for model in a.models:
        if not a.skip_prep:
            _sub("--prep", model)
        for mode in ("restore", "raw", "recompute"):
            rc = _sub("--worker", model, mode, "--reps", str(a.reps))
            p = WORK / f"{model}_{mode}.json"
            if rc == 0 and p.exists():
                results["rows"] += json.loads(p.read_text())
        pp = WORK / f"{model}_prep.json"
        if pp.exists():
            results["prep"][model] = json.loads(pp.read_text())
    Path(a.out).write_text(json.dumps(results, indent=1))
    table(results)


def table(results):
    by = {}
    for r in results["rows"]:
        by.setdefault((r["model"], r["tokens"]), {})[r["mode"]] = r
    print("model tokens | recompute | raw warm cold | restore warm noverify cold | decode_ms step_ms | "
          "TPOT static chained | peak torch/device MB (rec, raw, rest) | comp MB | agree")
    for (m, T), d in sorted(by.items()):
        rc, rw, rs = d.get("recompute", {}), d.get("raw", {}), d.get("restore", {})
        f = lambda x, k: f"{x[k]:.2f}" if k in x else "-"
        pm = " ".join(f"{x.get('torch_peak_MB', 0):.0f}/{x.get('device_used_MB', 0):.0f}" for x in (rc, rw, rs))
        comp = results["prep"].get(m, {}).get(str(T), {}).get("comp_bytes", 0) / 1e6
        print(f"{m} {T} | {f(rc, 'ttft_ms')} | {f(rw, 'ttft_ms_warm')} {f(rw, 'ttft_ms_cold')} | "
              f"{f(rs, 'ttft_ms_warm')} {f(rs, 'ttft_ms_warm_noverify')} {f(rs, 'ttft_ms_cold')} | "
              f"{f(rs, 'decode_ms_warm')} {f(rs, 'step_ms_warm')} | {f(rs, 'tpot_ms')} {f(rs, 'tpot_chained_ms')} | "
              f"{pm} | {comp:.2f} | {rs.get('greedy_agree_vs_fp16', '-')}", flush=True)


# ---------------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
    import torch as _torch
    _cuda = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    pytest = None
    _cuda = False

if pytest is not None:
    @pytest.mark.skipif(not _cuda, reason="needs a CUDA GPU")
    @pytest.mark.parametrize("model", ["gemma3", "smollm2"])
    @pytest.mark.parametrize("mode", ["recompute", "restore"])
    def test_ttft_4k(benchmark, model, mode):
        from cachegen.ort.cuda import StaticKV, cuda_provider_available
        import cachegen
        if not cuda_provider_available():
            pytest.skip("needs onnxruntime's CUDA provider")
        r = _runner(model)
        T = 4096
        ids = _ids(r, T + 1)
        arr = r._ids_array(ids[:T])
        if mode == "recompute":
            def run():
                lg, _ = r._run(arr, None, 0)
                return int(lg[0, -1].argmax())
        else:
            _, kv = r._run(arr, None, 0)
            data = cachegen.encode([(k.cpu(), v.cpu()) for k, v in r.window_kv(kv)], "default")
            s = StaticKV(r, T + 8)

            def run():
                s.restore(data)
                return int(s.step(ids[T:T + 1])[0, -1].argmax())
        benchmark(run)


if __name__ == "__main__":
    sys.exit(main())
