"""Quality guard on the real models (ORT fp32 CPU graphs): its cost and how often it steps up.

For each model, context length and held-out window (cachegen.quality.eval_texts: Python's own
docs, onnxruntime's licence notices, stdlib code), the context is prefilled once; then

* ``encode_s``: plain ``cachegen.encode(kv, preset)`` (what an unguarded save costs);
* the guard (``Guard.from_context``: the context's last 32 tokens re-fed, ``max_kl``) from each
  start preset: the preset stored, its steps, and the guard's own time split into the exact
  cache's probe (``reference_s``), rebuilding + probing each decoded cache (``check_s``) and the
  encodes of presets it stepped past;
* the stored cache's KL on the 256 tokens that really follow the context (``cont_kl``), to see
  whether the probe's verdict holds on text the guard never saw.

    python benches/bench_guard.py                       # 4K: 3 windows per model, default + small
    python benches/bench_guard.py --context 1024 --windows 8
    python benches/bench_guard.py --report              # markdown table from guard_results.json
    python benches/bench_guard.py --ab f074250 --starts default,small --reps 2
        # side by side in one process: the guard of a git revision against the working tree's
        # (with and without overlap) and plain encodes, alternating; wall and CPU-time cost,
        # verdict agreement (stored under "ab"; see benches/guard_notes.md)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "guard_results.json"


def log(msg: str) -> None:
    print(f"[bench_guard {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kl_on(runner, kv, restored, cont) -> float:
    from cachegen.quality import compare_logits

    lo = runner.score(kv, cont)[:-1]
    lr = runner.score(restored, cont)[:-1]
    return float(compare_logits(lo, lr)["kl"].mean())


def run(models, context: int, windows: int, starts, max_kl: float, probe_tokens: int, cont_tokens: int,
        threads: int, out: Path, sweep_tokens=(), probe: str = "context") -> dict:
    import cachegen
    from cachegen.guard import Guard
    from cachegen.ort import OrtRunner, export_model
    from cachegen.quality import eval_texts, text_windows

    texts = eval_texts()
    order = [n for n in ("pydocs-a", "ort-notices", "code-argparse", "pydocs-b", "code-difflib") if n in texts]
    res = json.loads(out.read_text()) if out.is_file() else {"results": []}
    res["machine"] = f"{platform.node()} {os.cpu_count()} cores, ORT CPU fp32, {threads} threads"
    done = {(r["model"], r["context"], r["window"], r["start"]) for r in res["results"] if r.get("probe", "context") == probe}
    for model in models:
        runner = OrtRunner(export_model(model, "fp32", "cpu"), threads=threads)
        bos = runner.bos_token_id if runner.add_bos else None
        per_text = max(1, math.ceil(windows / len(order)))
        by_text = {name: text_windows(runner.encode(texts[name][0]), context + cont_tokens, per_text, bos=bos)
                   for name in order}
        # one window from each text first, then the next from each, ...
        wins = [(f"{name}#{j}", by_text[name][j]) for j in range(per_text) for name in order
                if j < len(by_text[name])][:windows]
        for wname, w in wins:
            if all((model, context, wname, s) in done for s in starts):
                continue
            ctx, cont = w[:context], w[context:]
            t0 = time.perf_counter()
            logits, kv = runner.prefill(ctx)
            prefill_s = time.perf_counter() - t0
            tail = logits[0, -probe_tokens:].copy()
            del logits
            full = kv                          # the prefill probe takes the positions before a window from it
            kv = runner.window_kv(kv)          # Gemma-3: sliding layers keep their 512-token window
            for start in starts:
                if (model, context, wname, start) in done:
                    continue
                # the guarded encode first, as a caller runs it right after the prefill (the plain
                # encodes fork workers; the first writes to memory after a fork pay page faults)
                g = (Guard.from_prefill(runner, ctx, tail, probe_tokens, kv=full, max_kl=max_kl) if probe == "prefill"
                     else Guard.from_context(runner, ctx, probe_tokens, max_kl=max_kl))
                t0 = time.perf_counter()
                gr = g.encode(kv, start)
                total = time.perf_counter() - t0
                t0 = time.perf_counter()
                plain = cachegen.encode(kv, start)
                enc_plain = time.perf_counter() - t0
                t0 = time.perf_counter()
                plain_stored = cachegen.encode(kv, gr.config)
                enc_stored = time.perf_counter() - t0
                restored = cachegen.decode(gr.data)
                ckl = kl_on(runner, kv, restored, cont) if cont_tokens >= 2 else None
                # shorter probes, for the start preset alone, against its continuation KL
                sweep = {}
                if sweep_tokens:
                    sweep["cont_kl"] = (ckl if gr.config == start else
                                        kl_on(runner, kv, cachegen.decode(plain), cont) if cont_tokens >= 2 else None)
                    sweep[str(probe_tokens)] = gr.steps[0].kl_mean
                    for n in sweep_tokens:
                        sg = (Guard.from_prefill(runner, ctx, tail[-n:], n, kv=full, max_kl=1e9, presets=())
                              if probe == "prefill" else Guard.from_context(runner, ctx, n, max_kl=1e9, presets=()))
                        sr = sg.encode(kv, start)
                        sweep[str(n)] = sr.kl_mean
                row = dict(model=model, context=context, window=wname, start=start, max_kl=max_kl, probe=probe,
                           probe_tokens=probe_tokens, stored=gr.config, met=gr.met, stepped_up=gr.stepped_up,
                           probe_kl=gr.kl_mean, probe_kl_max=gr.kl_max, probe_top1=gr.top1, cont_kl=ckl,
                           cont_tokens=cont_tokens, bytes=len(gr.data), plain_bytes=len(plain_stored),
                           steps=[dict(config=s.config, bytes=s.bytes, kl_mean=s.kl_mean, passed=s.passed,
                                       encode_s=s.encode_s, check_s=s.check_s) for s in gr.steps],
                           prefill_s=prefill_s, encode_start_s=enc_plain, encode_stored_s=enc_stored,
                           guarded_total_s=total, reference_s=gr.reference_s,
                           check_s=sum(s.check_s for s in gr.steps),
                           guard_overhead_s=total - enc_stored,
                           overhead_vs_encode=(total - enc_stored) / enc_stored,
                           start_probe_kl_by_tokens=sweep or None, load_avg=os.getloadavg()[0])
                res["results"].append(row)
                out.write_text(json.dumps(res, indent=1) + "\n")
                log(f"{model} {context} {wname} {start}: stored {gr.config} (steps {gr.stepped_up}) probe KL "
                    f"{gr.kl_mean:.4f} cont KL {ckl if ckl is None else round(ckl, 4)}; encode {enc_stored:.2f}s "
                    f"guard +{total - enc_stored:.2f}s ({100 * (total - enc_stored) / enc_stored:.0f}%), "
                    f"ref probe {gr.reference_s:.2f}s check {row['check_s']:.2f}s")
    return res


def cpu_s() -> float:
    """CPU seconds of this process and its (finished) forked workers."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def load_guard_at(rev: str):
    """cachegen/guard.py as of git revision ``rev``, imported as a module of the package (for
    side-by-side runs against the working tree's guard in one process), with that revision's
    encoder when it differs from the working tree's (the guard calls into its pass 2)."""
    import importlib.util
    import subprocess
    import tempfile

    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=HERE.parent, check=True,
                              capture_output=True, text=True).stdout

    def load(name: str, src: str):
        path = Path(tempfile.mkdtemp()) / (name.rsplit(".", 1)[1] + ".py")
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod

    src = show("cachegen/guard.py")
    enc = show("cachegen/codec/encoder.py")
    if enc != (HERE.parent / "cachegen/codec/encoder.py").read_text():
        load("cachegen.codec._encoder_ab", enc)
        src = src.replace("from .codec import encoder as E", "from .codec import _encoder_ab as E")
    return load("cachegen._guard_ab", src)


def run_ab(models, context: int, windows: int, starts, max_kl: float, probe_tokens: int, threads: int,
           out: Path, rev: str, reps: int, variants, probe: str = "context") -> dict:
    """Side by side in one process: the guard at ``rev`` ("old"), the working tree's ("new", and
    "new-seq" = overlap=False, "new-cold" = without the probe buffers kept from the runner's last
    guarded encode) and plain encodes, alternating, ``reps`` rounds per window and start.
    Cost of a run = its wall time minus the median of the window's plain encodes, over that median."""
    import cachegen
    from cachegen import guard as G
    from cachegen.ort import OrtRunner, export_model
    from cachegen.quality import eval_texts, text_windows

    old = load_guard_at(rev)
    texts = eval_texts()
    order = [n for n in ("pydocs-a", "ort-notices", "code-argparse", "pydocs-b", "code-difflib") if n in texts]
    res = json.loads(out.read_text()) if out.is_file() else {"results": []}
    ab = res.setdefault("ab", {"rev": rev, "rows": []})
    ab["rev"] = rev
    ab["machine"] = (f"{platform.node()} {os.cpu_count()} cores (shared 2-core dev VM), ORT CPU fp32, "
                     f"{threads} threads")
    for model in models:
        runner = OrtRunner(export_model(model, "fp32", "cpu"), threads=threads)
        bos = runner.bos_token_id if runner.add_bos else None
        per_text = max(1, math.ceil(windows / len(order)))
        by_text = {name: text_windows(runner.encode(texts[name][0]), context, per_text, bos=bos) for name in order}
        wins = [(f"{name}#{j}", by_text[name][j]) for j in range(per_text) for name in order
                if j < len(by_text[name])][:windows]
        for wname, ctx in wins:
            logits, kv = runner.prefill(ctx)
            most = max([probe_tokens] + [int(v.split("@")[1]) for v in variants if "@" in v])
            tail = logits[0, -most:].copy()
            del logits
            full = kv
            kv = runner.window_kv(kv)

            def make(mod, n=probe_tokens):
                if probe == "prefill":
                    return mod.Guard.from_prefill(runner, ctx, tail[-n:], n, kv=full, max_kl=max_kl)
                return mod.Guard.from_context(runner, ctx, n, max_kl=max_kl)

            for start in starts:
                makers = {"old": lambda: make(old),
                          "new": lambda: make(G),
                          "new-seq": lambda: G.Guard.from_context(runner, ctx, probe_tokens, max_kl=max_kl,
                                                                  overlap=False),
                          # no probe buffers kept from the runner's last guarded encode
                          "new-cold": lambda: (G.release_buffers(),
                                               G.Guard.from_context(runner, ctx, probe_tokens, max_kl=max_kl))[1]}
                for v in variants:     # "new@N": the working tree's guard with an N-token probe
                    if "@" in v:
                        makers[v] = (lambda n: lambda: make(G, n))(int(v.split("@")[1]))
                runs: dict = {v: [] for v in variants}
                plain: list = []
                for rep in range(reps):
                    seq = list(variants[rep % len(variants):]) + list(variants[:rep % len(variants)])
                    for v in seq:
                        g = makers[v]()
                        c0 = cpu_s()
                        t0 = time.perf_counter()
                        gr = g.encode(kv, start)
                        t = time.perf_counter() - t0
                        runs[v].append(dict(wall_s=t, cpu_s=cpu_s() - c0, stored=gr.config,
                                            kl=[s.kl_mean for s in gr.steps],
                                            steps=[s.config for s in gr.steps], reference_s=gr.reference_s,
                                            check_s=sum(s.check_s for s in gr.steps),
                                            wait_s=sum(getattr(s, "wait_s", 0.0) for s in gr.steps),
                                            load_avg=os.getloadavg()[0]))
                        c0 = cpu_s()
                        t0 = time.perf_counter()
                        cachegen.encode(kv, gr.config)
                        plain.append(dict(config=gr.config, s=time.perf_counter() - t0, cpu_s=cpu_s() - c0,
                                          load_avg=os.getloadavg()[0]))
                row = dict(model=model, context=context, window=wname, start=start, max_kl=max_kl,
                           probe=probe, probe_tokens=probe_tokens, reps=reps, runs=runs, plain=plain,
                           date=time.strftime("%Y-%m-%d %H:%M"))
                for v in variants:
                    costs, cpu = [], []
                    for r in runs[v]:
                        same = [p for p in plain if p["config"] == r["stored"]]
                        base = float(np.median([p["s"] for p in same]))
                        costs.append((r["wall_s"] - base) / base)
                        base = float(np.median([p["cpu_s"] for p in same]))
                        cpu.append((r["cpu_s"] - base) / base)
                    row[f"cost_{v}"] = costs
                    row[f"cpu_cost_{v}"] = cpu
                ab["rows"] = [r for r in ab["rows"] if (r["model"], r["context"], r["window"], r["start"])
                              != (model, context, wname, start)] + [row]
                out.write_text(json.dumps(res, indent=1) + "\n")
                log(f"{model} {wname} {start}: " + "; ".join(
                    f"{v} {runs[v][0]['stored']} cost median {100 * float(np.median(row[f'cost_{v}'])):.0f}% "
                    f"max {100 * max(row[f'cost_{v}']):.0f}%" for v in variants)
                    + f"; plain {np.median([p['s'] for p in plain]):.2f}s load {os.getloadavg()[0]:.1f}")
    return res


def report_ab(res: dict) -> str:
    ab = res.get("ab")
    if not ab or not ab.get("rows"):
        return ""
    rows = ab["rows"]
    variants = [k[5:] for k in rows[0] if k.startswith("cost_")]
    lines = [f"Side by side (one process, alternating; guard at {ab['rev']} = old): {ab.get('machine', '?')}", "",
             "Cost = wall time over the median plain encode of the preset stored (same window), minus 1; "
             "CPU = the same with CPU seconds (process + forked workers).", "",
             "| model | start | windows x reps | plain encode (median) | load avg | "
             + " | ".join(f"{v}: cost median, max (CPU median)" for v in variants)
             + " | verdicts old = new (max KL rel. diff) |",
             "|---|---|---|---|---|" + "---|" * len(variants) + "---|"]
    for m, s in sorted({(r["model"], r["start"]) for r in rows}):
        rs = [r for r in rows if (r["model"], r["start"]) == (m, s)]
        cells = []
        for v in variants:
            c = [x for r in rs for x in r[f"cost_{v}"]]
            cpu = [x for r in rs for x in r.get(f"cpu_cost_{v}", [])]
            cells.append(f"{100 * float(np.median(c)):.0f} %, {100 * max(c):.0f} %"
                         + (f" ({100 * float(np.median(cpu)):.0f} %)" if cpu else ""))
        agree = n = 0
        rel = 0.0
        if "old" in variants:
            for r in rs:
                for v in variants:
                    if v == "old":
                        continue
                    for a, b in zip(r["runs"]["old"], r["runs"][v]):
                        n += 1
                        d = [abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a["kl"], b["kl"])]
                        rel = max([rel] + d)
                        agree += a["steps"] == b["steps"] and a["stored"] == b["stored"] and max(d) <= 1e-4
        loads = [x["load_avg"] for r in rs for v in variants for x in r["runs"][v]]
        lines.append(f"| {m} | {s} | {len(rs)} x {rs[0]['reps']} | "
                     f"{float(np.median([p['s'] for r in rs for p in r['plain']])):.2f} s | "
                     f"{min(loads):.1f}-{max(loads):.1f} | " + " | ".join(cells) + f" | {agree}/{n} ({rel:.1e}) |")
    return "\n".join(lines)


def report(res: dict) -> str:
    rows = res["results"]
    lines = [f"Machine: {res.get('machine', '?')}", "",
             "| model | probe | context | start | windows | stored (count) | stepped up | probe KL max | cont KL max "
             "| cont KL > max_kl | guard cost / encode time (median, max) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r["model"], r.get("probe", "context"), r["context"], r["start"]) for r in rows})
    for m, pk, c, s in keys:
        rs = [r for r in rows if (r["model"], r.get("probe", "context"), r["context"], r["start"]) == (m, pk, c, s)]
        stored: dict = {}
        for r in rs:
            stored[r["stored"]] = stored.get(r["stored"], 0) + 1
        # the guard's own cost, timed inside the same call: the exact cache's probe + rebuilding and
        # probing each decoded cache + the encodes of presets stepped past, over the stored preset's encode
        ov = [(r["reference_s"] + r["check_s"] + sum(st["encode_s"] for st in r["steps"][:-1]))
              / r["steps"][-1]["encode_s"] for r in rs]
        ck = [r["cont_kl"] for r in rs if r["cont_kl"] is not None]
        over = sum(k > r["max_kl"] for r, k in zip(rs, ck))
        lines.append(f"| {m} | {pk} | {c} | {s} | {len(rs)} | " + ", ".join(f"{k} ({v})" for k, v in sorted(stored.items()))
                     + f" | {sum(r['stepped_up'] > 0 for r in rs)}/{len(rs)} | {max(r['probe_kl'] for r in rs):.4f} | "
                     + (f"{max(ck):.4f} | {over}/{len(ck)}" if ck else "- | -")
                     + f" | {100 * float(np.median(ov)):.0f} %, {100 * max(ov):.0f} % |")
    sw = [r for r in rows if r.get("start_probe_kl_by_tokens") and r["start_probe_kl_by_tokens"].get("cont_kl")]
    if sw:
        lines += ["", "Probe length: the start preset's probe KL against its 256-token continuation KL "
                  "(ratio = probe / continuation; verdict = same side of max_kl)", "",
                  "| model | probe | tokens | windows x starts | ratio min | ratio median | ratio max | verdict agrees |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, pk in sorted({(r["model"], r.get("probe", "context")) for r in sw}):
            rs = [r for r in sw if (r["model"], r.get("probe", "context")) == (m, pk)]
            ns = sorted({int(k) for r in rs for k in r["start_probe_kl_by_tokens"] if k != "cont_kl"})
            for n in ns:
                pairs = [(r["start_probe_kl_by_tokens"][str(n)], r["start_probe_kl_by_tokens"]["cont_kl"], r["max_kl"])
                         for r in rs if str(n) in r["start_probe_kl_by_tokens"]]
                ratio = [a / b for a, b, _ in pairs]
                agree = sum((a <= t) == (b <= t) for a, b, t in pairs)
                lines.append(f"| {m} | {pk} | {n} | {len(pairs)} | {min(ratio):.2f} | {float(np.median(ratio)):.2f} | "
                             f"{max(ratio):.2f} | {agree}/{len(pairs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--starts", default="default,small")
    ap.add_argument("--max-kl", type=float, default=0.01)
    ap.add_argument("--probe-tokens", type=int, default=32)
    ap.add_argument("--cont-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--probe-sweep", default="8,16", help="also probe the start preset with these many tokens "
                    "(not timed), to compare each with its continuation KL; '' to skip")
    ap.add_argument("--probe", choices=("context", "prefill"), default="context",
                    help="context: the context's last tokens fed again after the cache (Guard.from_context); "
                         "prefill: the cache without its last tokens + those tokens, against the prefill's logits "
                         "(Guard.from_prefill with the untrimmed cache: Gemma-3's trimmed sliding layers take the "
                         "positions before their window from it)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--ab", metavar="REV", help="side by side in one process: the guard of git revision REV "
                    "(old) against the working tree's (new, new-seq = overlap=False) and plain encodes")
    ap.add_argument("--reps", type=int, default=3, help="--ab: rounds per window and start")
    ap.add_argument("--variants", default="old,new,new-seq", help="--ab: which guards to run (new@N: the "
                    "working tree's with an N-token probe)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.ab and not a.report:
        run_ab(a.models.split(","), a.context, a.windows, a.starts.split(","), a.max_kl, a.probe_tokens,
               a.threads, out, a.ab, a.reps, a.variants.split(","), a.probe)
        print(report_ab(json.loads(out.read_text())))
        return 0
    if not a.report:
        run(a.models.split(","), a.context, a.windows, a.starts.split(","), a.max_kl, a.probe_tokens,
            a.cont_tokens, a.threads, out, [int(x) for x in a.probe_sweep.split(",") if x], a.probe)
    res = json.loads(out.read_text())
    print(report(res))
    if res.get("ab"):
        print("\n" + report_ab(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
