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
            kv = runner.window_kv(kv)          # Gemma-3: sliding layers keep their 512-token window
            for start in starts:
                if (model, context, wname, start) in done:
                    continue
                # the guarded encode first, as a caller runs it right after the prefill (the plain
                # encodes fork workers; the first writes to memory after a fork pay page faults)
                g = (Guard.from_prefill(runner, ctx, tail, probe_tokens, max_kl=max_kl) if probe == "prefill"
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
                        sg = (Guard.from_prefill(runner, ctx, tail[-n:], n, max_kl=1e9, presets=())
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
                         "(Guard.from_prefill; full-attention caches only: not Gemma-3's trimmed sliding layers)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if not a.report:
        run(a.models.split(","), a.context, a.windows, a.starts.split(","), a.max_kl, a.probe_tokens,
            a.cont_tokens, a.threads, out, [int(x) for x in a.probe_sweep.split(",") if x], a.probe)
    print(report(json.loads(out.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
