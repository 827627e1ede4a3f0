"""Rate-distortion bench: bits per KV element vs model quality, cachegen presets vs baselines.

For each model (SmolLM2-135M, Gemma-3-270M; ONNX Runtime fp32 on CPU, one thread), text domain
and context length, the context is prefilled once, its KV cache goes through every method, and
a continuation is scored with the original and the restored cache (``cachegen.quality``
conventions: Δppl relative, mean KL(orig || restored) in nats over the scored positions, top-1
agreement, whether a greedy continuation is identical). The original cache's logits and greedy
tokens are computed once per (model, domain, context) and shared by all methods.

Gemma-3: the codec and the baselines get the cache with its sliding-window layers trimmed to
their 512-token window (``OrtRunner.window_kv``, ``trim_window=True`` in ``cachegen.quality``),
which is all the model needs. ``ratio_fp16`` is against that trimmed cache in fp16;
``ratio_fp16_full`` against the untrimmed fp16 cache.

Text domains (all offline on the machine, fixed files):
  prose       /usr/share/common-licenses/GPL-3 (legal prose)
  code        the Python standard library's argparse.py
  structured  /etc/services (a port/protocol table with comments)
Held-out text for tuning (``--sensitivity`` and ``--configs``): Apache-2.0 + MPL-2.0 licence
texts followed by the stdlib's json/decoder.py, none of them in the sweep.

    pytest benches/bench_rd.py --benchmark-enable        # smoke: one preset, 256 tokens, SmolLM2
    python benches/bench_rd.py --full                    # the sweep (~30 min on 1 core)
    python benches/bench_rd.py --report                  # table + plot from rd_results.json
    python benches/bench_rd.py --sensitivity smollm2     # per-layer K/V sensitivity (one layer at a time)
    python benches/bench_rd.py --configs FILE.json       # extra CodecConfigs (list of dicts) on all domains
    python benches/bench_rd.py --profiles                # model-profile presets vs presets + LMCache
                                                         # (rd_profile_results.json, rd_profile_notes.md)

Profile methods (issue 13) need the profile next to the export: ``cachegen profile MODEL``.
``kvtc-style`` is the KVTC recipe on our codec: PCA basis per (layer, K/V) with keys before RoPE,
attention sink exact, one shared step per block (low-variance coefficients get ~0 bits), no
per-layer allocation (uniform K6/V4 widths on the coefficients; -k5v4 / -k5v3: lower rates).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "rd_results.json"
NOTES = HERE / "rd_notes.md"
PLOT = HERE / "rd_plot.png"

_spec = importlib.util.spec_from_file_location("rd_baselines", HERE / "baselines.py")
bl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bl)

MODELS = ("smollm2", "gemma3")


def _read(path: str) -> str:
    return Path(path).read_text(errors="replace")


def _stdlib(mod: str) -> str:
    spec = importlib.util.find_spec(mod)
    return Path(spec.origin).read_text()


TEXT_SOURCES: Dict[str, Callable[[], str]] = {
    "prose": lambda: _read("/usr/share/common-licenses/GPL-3"),
    "code": lambda: _stdlib("argparse"),
    "structured": lambda: _read("/etc/services"),
}
TEXT_DESCRIPTIONS = {
    "prose": "/usr/share/common-licenses/GPL-3 (legal prose)",
    "code": "Python stdlib argparse.py",
    "structured": "/etc/services (port/protocol table)",
    "heldout": "Apache-2.0 + MPL-2.0 licences + stdlib json/decoder.py (tuning only)",
}


def heldout_text() -> str:
    return (_read("/usr/share/common-licenses/Apache-2.0") + "\n" + _read("/usr/share/common-licenses/MPL-2.0")
            + "\n" + _stdlib("json.decoder"))


def codec_methods() -> Dict[str, Any]:
    """The cachegen configurations of the sweep: every preset + anchor-delta on/off variants."""
    import cachegen

    P = cachegen.PRESETS
    m: Dict[str, Any] = dict(P)
    m["cachegen-paper-g1"] = dataclasses.replace(P["cachegen-paper"], name="cachegen-paper-g1", group_size=1)
    m["default-g10"] = dataclasses.replace(P["default"], name="default-g10", group_size=10)
    return m


PROFILE_METHODS = ("default-p", "small-p", "tiny-p", "kvtc-style", "kvtc-style-k5v4", "kvtc-style-k5v3")
PROFILE_RESULTS = HERE / "rd_profile_results.json"
PROFILE_NOTES = HERE / "rd_profile_notes.md"


def profile_method_config(name: str, prof):
    """(profile, config) for a profile method."""
    import cachegen

    if name.startswith("kvtc-style"):
        kb, vb = (6, 4) if name == "kvtc-style" else (int(name[-3]), int(name[-1]))
        return cachegen.CodecConfig(name=name, key_bits=kb, value_bits=vb, group_size=1, token_scaling=True,
                                    scale_sharing=1.0)
    return name


BASELINE_METHODS = ("fp16", "zstd-fp16", "int8-channel", "fp8-e4m3", "kivi-2bit", "kivi-2bit-r128",
                    "lmcache", "lmcache-whole")
# zstd restores exactly what fp16 restores: its quality is fp16's
SAME_RESTORED = {"zstd-fp16": "fp16"}


# ------------------------------------------------------------------------------------ harness
def make_runner(model: str, threads: int = 1):
    from cachegen.ort import OrtRunner, export_model

    return OrtRunner(export_model(model, "fp32", "cpu"), threads=threads)


class Case:
    """One (model, text, context) with the original cache's outputs computed once."""

    def __init__(self, runner, model: str, domain: str, ids: Sequence[int], context: int,
                 continuation: int = 128, generate: int = 64):
        from cachegen.quality import compare_logits  # noqa: F401 (import check)

        self.runner, self.model, self.domain = runner, model, domain
        ids = [int(t) for t in ids]
        if len(ids) < context + continuation:
            raise ValueError(f"{domain}: {len(ids)} tokens < {context} + {continuation}")
        self.ctx, self.cont = ids[:context], ids[context:context + continuation]
        self.context, self.generate = context, generate
        t0 = time.perf_counter()
        _, kv_full = runner.prefill(self.ctx)
        self.prefill_s = time.perf_counter() - t0
        self.trimmed = any(w is not None for w in runner.windows)
        self.kv = runner.window_kv(kv_full) if self.trimmed else kv_full
        self.fp16_full = runner.kv_nbytes_fp16(kv_full)
        self.fp16 = runner.kv_nbytes_fp16(self.kv)
        self.numel = self.fp16 // 2
        del kv_full
        t0 = time.perf_counter()
        self.lo = runner.score(self.kv, self.cont)
        self.gen_o = runner.generate(self.cont[:1], generate, kv=self.kv, stop_at_eos=False) if generate else []
        self.original_s = time.perf_counter() - t0

    def quality(self, restored, score_only: bool = False) -> dict:
        from cachegen.quality import compare_logits

        lr = self.runner.score(restored, self.cont)
        cmp = compare_logits(self.lo[:-1], lr[:-1], self.cont[1:])
        ppl_o = math.exp(float(cmp["nll_original"].mean()))
        ppl_r = math.exp(float(cmp["nll_restored"].mean()))
        out = dict(ppl_original=ppl_o, ppl_restored=ppl_r, delta_ppl_rel=(ppl_r - ppl_o) / ppl_o,
                   kl_mean=float(cmp["kl"].mean()), kl_max=float(cmp["kl"].max()), top1=float(cmp["top1"]))
        if not score_only and self.generate:
            g = self.runner.generate(self.cont[:1], self.generate, kv=restored, stop_at_eos=False)
            pref = 0
            for a, b in zip(self.gen_o, g):
                if a != b:
                    break
                pref += 1
            out.update(greedy_identical=(g == self.gen_o), greedy_prefix=pref)
        return out

    def record(self, method: str, kind: str, nbytes: int, q: dict, **extra) -> dict:
        r = dict(model=self.model, domain=self.domain, context=self.context, method=method, kind=kind,
                 nbytes=int(nbytes), bits_per_element=8.0 * nbytes / self.numel,
                 ratio_fp16=self.fp16 / nbytes, ratio_fp16_full=self.fp16_full / nbytes,
                 trimmed=self.trimmed, continuation=len(self.cont), generate=self.generate)
        r.update(q)
        r.update(extra)
        return r

    def run_codec(self, name: str, cfg, score_only: bool = False, eval_quality: bool = True) -> dict:
        import cachegen

        t0 = time.perf_counter()
        data = cachegen.encode(self.kv, cfg)
        enc = time.perf_counter() - t0
        cfgd = cfg.to_dict() if hasattr(cfg, "to_dict") else cachegen.PRESETS[cfg].to_dict()
        if not eval_quality:   # lossless: size only (bit-exactness is the codec tests' job)
            return self.record(name, "cachegen", len(data), dict(delta_ppl_rel=0.0, kl_mean=0.0, kl_max=0.0,
                               top1=1.0, greedy_identical=True, exact=True), encode_s=enc, config=cfgd)
        t0 = time.perf_counter()
        restored = cachegen.decode(data)
        dec = time.perf_counter() - t0
        t0 = time.perf_counter()
        q = self.quality(restored, score_only)
        return self.record(name, "cachegen", len(data), q, encode_s=enc, decode_s=dec,
                           eval_s=time.perf_counter() - t0, config=cfgd)

    def run_profile(self, name: str, prof, score_only: bool = False) -> dict:
        from cachegen import profile as cp

        cfg = profile_method_config(name, prof)
        t0 = time.perf_counter()
        data = cp.encode(self.kv, prof, cfg)
        enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        restored = cp.decode(data, profiles=prof)
        dec = time.perf_counter() - t0
        t0 = time.perf_counter()
        q = self.quality(restored, score_only)
        cfgd = cp.preset_config(prof, cfg).to_dict() if isinstance(cfg, str) else cfg.to_dict()
        return self.record(name, "profile", len(data), q, encode_s=enc, decode_s=dec,
                           eval_s=time.perf_counter() - t0, config=cfgd, profile=prof.hash_hex)

    def run_baseline(self, name: str, score_only: bool = False, cache: Optional[dict] = None) -> dict:
        t0 = time.perf_counter()
        restored, nbytes = bl.BASELINES[name](self.kv)
        enc = time.perf_counter() - t0
        src = SAME_RESTORED.get(name)
        if cache is not None and src in cache:
            q = {k: v for k, v in cache[src].items()}
        else:
            t0 = time.perf_counter()
            q = self.quality(restored, score_only)
            q["eval_s"] = time.perf_counter() - t0
            if cache is not None:
                cache[name] = q
        return self.record(name, "baseline", nbytes, q, encode_s=enc)


def load_results(path: Path = RESULTS) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"meta": {}, "results": []}


def save_results(res: dict, path: Path = RESULTS) -> None:
    path.write_text(json.dumps(res, indent=1, sort_keys=False) + "\n")


def _meta() -> dict:
    import onnxruntime

    return dict(date=datetime.datetime.now().isoformat(timespec="seconds"), machine=platform.node(),
                cpu=platform.processor() or platform.machine(), cpu_threads_used=1,
                python=platform.python_version(), onnxruntime=onnxruntime.__version__,
                texts=TEXT_DESCRIPTIONS,
                notes="ORT fp32 CPU, 1 intra-op thread; KL nats mean over continuation-1 positions; "
                      "Gemma-3 caches trimmed to the 512 window before compression (trim_window=True)")


def sweep(plan: Sequence[tuple], methods: Optional[Sequence[str]] = None, out: Path = RESULTS,
          continuation: int = 128, generate: int = 64, log=print) -> dict:
    """``plan``: (model, context, [domains]) tuples, run in order; results appended and saved."""
    res = load_results(out)
    res["meta"] = _meta()
    done = {(r["model"], r["domain"], r["context"], r["method"]) for r in res["results"]}
    codecs = codec_methods()
    names = list(methods) if methods else list(codecs) + list(BASELINE_METHODS)
    runners: Dict[str, Any] = {}
    profiles: Dict[str, Any] = {}
    for model, context, domains in plan:
        if model not in runners:
            runners.clear()
            runners[model] = make_runner(model)
        runner = runners[model]
        if any(n in PROFILE_METHODS for n in names) and model not in profiles:
            from cachegen.profile import load_for_model

            profiles[model] = load_for_model(runner.model_dir)
        for domain in domains:
            todo = [n for n in names if (model, domain, context, n) not in done]
            if not todo:
                continue
            ids = runner.encode(TEXT_SOURCES[domain]())
            case = Case(runner, model, domain, ids, context, continuation, generate)
            log(f"[{model} {domain} {context}] prefill {case.prefill_s:.1f}s original {case.original_s:.1f}s")
            qcache: dict = {}
            for n in todo:
                t0 = time.perf_counter()
                if n in PROFILE_METHODS:
                    r = case.run_profile(n, profiles[model])
                elif n in codecs:
                    cfg = codecs[n]
                    r = case.run_codec(n, cfg, eval_quality=not cfg.lossless)
                else:
                    r = case.run_baseline(n, cache=qcache)
                r["wall_s"] = time.perf_counter() - t0
                res["results"].append(r)
                save_results(res, out)
                log(f"  {n:18s} bits/el {r['bits_per_element']:6.3f} x{r['ratio_fp16']:6.2f} "
                    f"dppl {100 * r['delta_ppl_rel']:+7.3f}% KL {r['kl_mean']:.2e} top1 {r['top1']:.3f} "
                    f"greedy {r.get('greedy_identical')} ({r['wall_s']:.1f}s)")
    return res


FULL_PLAN = [
    ("smollm2", 1024, ("prose", "code", "structured")),
    ("gemma3", 1024, ("prose", "code", "structured")),
    # 4K on CPU costs ~35-70 s of prefill per text and ~25 s of codec time per config (SmolLM2):
    # one domain per model keeps the whole sweep near 30 min on one core.
    ("gemma3", 4096, ("prose",)),
    ("smollm2", 4096, ("prose",)),
]


# ------------------------------------------------------------------------------------ tuning
def sensitivity(model: str, base: str = "tiny", context: int = 1024, continuation: int = 256,
                log=print) -> dict:
    """KL when only one (layer, K/V) tensor is quantized with ``base`` (the rest exact)."""
    import cachegen

    runner = make_runner(model)
    case = Case(runner, model, "heldout", runner.encode(heldout_text()), context, continuation, generate=0)
    restored = cachegen.decode(cachegen.encode(case.kv, base))
    exact = [(np.asarray(k), np.asarray(v)) for k, v in case.kv]
    out = {"model": model, "base": base, "context": context, "continuation": continuation,
           "k": [], "v": []}
    full = case.quality(restored, score_only=True)
    out["all_layers"] = full
    for i in range(len(exact)):
        for j, key in ((0, "k"), (1, "v")):
            kv = list(exact)
            pair = list(kv[i])
            pair[j] = restored[i][j].numpy()
            kv[i] = tuple(pair)
            q = case.quality(kv, score_only=True)
            out[key].append(q["kl_mean"])
        log(f"  layer {i:2d}  K {out['k'][-1]:.2e}  V {out['v'][-1]:.2e}")
    log(f"  all layers: KL {full['kl_mean']:.3e}  sum of single-layer KLs "
        f"{sum(out['k']) + sum(out['v']):.3e}")
    return out


def run_configs(configs: Sequence[dict], plan: Sequence[tuple], out: Path, score_only: bool = False,
                continuation: int = 128, generate: int = 64, log=print) -> List[dict]:
    """Evaluate extra CodecConfigs (dicts) on a plan; results appended under kind 'custom'."""
    import cachegen

    res = load_results(out)
    cfgs = [cachegen.CodecConfig.from_dict(c) for c in configs]
    for model, context, domains in plan:
        runner = make_runner(model)
        for domain in domains:
            text = heldout_text() if domain == "heldout" else TEXT_SOURCES[domain]()
            case = Case(runner, model, domain, runner.encode(text), context, continuation,
                        0 if score_only else generate)
            for cfg in cfgs:
                n_layers = len(case.kv)
                try:
                    cfg.layer_bits(n_layers)
                except Exception:
                    continue
                r = case.run_codec(cfg.name, cfg, score_only=score_only)
                r["kind"] = "custom"
                res["results"].append(r)
                save_results(res, out)
                log(f"  [{model} {domain} {context}] {cfg.name:24s} bits/el {r['bits_per_element']:6.3f} "
                    f"x{r['ratio_fp16']:6.2f} dppl {100 * r['delta_ppl_rel']:+7.3f}% KL {r['kl_mean']:.2e} "
                    f"top1 {r['top1']:.3f} greedy {r.get('greedy_identical')}")
    return res["results"]


# ------------------------------------------------------------------------------------ report
def _agg(rows: List[dict]) -> dict:
    g = [r.get("greedy_identical") for r in rows if r.get("greedy_identical") is not None]
    return dict(n=len(rows), bits=float(np.mean([r["bits_per_element"] for r in rows])),
                ratio=float(np.mean([r["ratio_fp16"] for r in rows])),
                ratio_full=float(np.mean([r["ratio_fp16_full"] for r in rows])),
                dppl=float(np.mean([r["delta_ppl_rel"] for r in rows])),
                dppl_max=float(np.max([r["delta_ppl_rel"] for r in rows])),
                kl=float(np.mean([r["kl_mean"] for r in rows])),
                kl_max=float(np.max([r["kl_mean"] for r in rows])),
                top1=float(np.mean([r["top1"] for r in rows])),
                greedy=f"{sum(bool(x) for x in g)}/{len(g)}")


def report(res: dict, notes: Path = NOTES, plot: Path = PLOT,
           kinds=("cachegen", "baseline", "custom", "profile")) -> str:
    rows = [r for r in res["results"] if r["kind"] in kinds and r["domain"] != "heldout"]
    meta = res.get("meta", {})
    lines = ["# Rate–distortion results (benches/bench_rd.py)", "",
             f"Machine `{meta.get('machine')}` ({meta.get('cpu')}), {meta.get('date')}; "
             f"ONNX Runtime {meta.get('onnxruntime')} fp32 CPU, 1 thread. {meta.get('notes', '')}.", "",
             "Texts: " + "; ".join(f"{k}: {v}" for k, v in (meta.get("texts") or TEXT_DESCRIPTIONS).items()) + ".",
             "", "Columns: bits per KV element (of the cache handed to the codec), ratio vs that cache in "
             "fp16 (Gemma-3: also vs the untrimmed fp16 cache), Δppl relative (mean and worst over domains), "
             "KL(orig‖restored) nats (mean, worst domain), top-1 agreement, greedy-64 identical (domains). "
             "Continuation 128 tokens (127 scored): KL below ~1e-3 and Δppl below ~0.3% are within "
             "noise of one text.", ""]
    for model in MODELS:
        for context in sorted({r["context"] for r in rows if r["model"] == model}):
            sub = [r for r in rows if r["model"] == model and r["context"] == context]
            if not sub:
                continue
            doms = sorted({r["domain"] for r in sub})
            lines += [f"## {model}, context {context} ({', '.join(doms)})", "",
                      "| method | bits/el | ×fp16 | " + ("×fp16 untrimmed | " if model == "gemma3" else "")
                      + "Δppl mean | Δppl worst | KL mean | KL worst | top-1 | greedy |",
                      "|---|---:|---:|" + ("---:|" if model == "gemma3" else "") + "---:|---:|---:|---:|---:|---:|"]
            methods = []
            for r in sub:
                if r["method"] not in methods:
                    methods.append(r["method"])
            aggs = [(m, _agg([r for r in sub if r["method"] == m])) for m in methods]
            aggs.sort(key=lambda t: -t[1]["bits"])
            for m, a in aggs:
                lines.append(f"| {m} | {a['bits']:.3f} | {a['ratio']:.2f} | "
                             + (f"{a['ratio_full']:.2f} | " if model == "gemma3" else "")
                             + f"{100 * a['dppl']:+.2f}% | {100 * a['dppl_max']:+.2f}% | {a['kl']:.4f} | "
                             f"{a['kl_max']:.4f} | {100 * a['top1']:.1f}% | {a['greedy']} |")
            lines.append("")
    scr = res.get("screening") or []
    if scr:
        lines += ["## Tuning screen (held-out text, 1K context, 128-token continuation, score only)", "",
                  "| model | config | bits/el | ×fp16 | Δppl | KL | top-1 |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in sorted(scr, key=lambda r: (r["model"], -r["bits_per_element"])):
            lines.append(f"| {r['model']} | {r['method']} | {r['bits_per_element']:.3f} | {r['ratio_fp16']:.2f} | "
                         f"{100 * r['delta_ppl_rel']:+.2f}% | {r['kl_mean']:.4f} | {100 * r['top1']:.1f}% |")
        lines.append("")
    sens = res.get("sensitivity") or {}
    for key, sv in sens.items():
        lines += [f"## Per-layer sensitivity {key} (KL when only that tensor is quantized; held-out text, "
                  f"{sv['context']} ctx, {sv['continuation']}-token continuation)", "",
                  f"All layers together: KL {sv['all_layers']['kl_mean']:.4f}; sum of single-layer KLs "
                  f"{sum(sv['k']) + sum(sv['v']):.4f} (KL is close to additive over layers).", "",
                  "| layer | " + " | ".join(str(i) for i in range(len(sv["k"]))) + " |",
                  "|---|" + "---:|" * len(sv["k"]),
                  "| K ×1e-4 | " + " | ".join(f"{1e4 * x:.1f}" for x in sv["k"]) + " |",
                  "| V ×1e-4 | " + " | ".join(f"{1e4 * x:.1f}" for x in sv["v"]) + " |", ""]
    text = "\n".join(lines) + "\n"
    marker = "<!-- analysis (kept when the report is regenerated) -->"
    if notes is not None:
        old = notes.read_text() if notes.is_file() else ""
        if marker in old:
            text += "\n" + marker + old.split(marker, 1)[1]
        notes.write_text(text)
    if plot is not None:
        make_plot(rows, plot)
    return text


def make_plot(rows: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 6), squeeze=False)
    methods = []
    for r in rows:
        if r["method"] not in methods:
            methods.append(r["method"])
    cmap = plt.get_cmap("tab20")
    for ax, model in zip(axes[0], models):
        for mi, m in enumerate(methods):
            for context, marker in ((1024, "o"), (4096, "s")):
                sel = [r for r in rows if r["model"] == model and r["method"] == m and r["context"] == context]
                if not sel:
                    continue
                a = _agg(sel)
                kl = max(a["kl"], 1e-8)
                kind = sel[0]["kind"]
                ax.scatter(a["bits"], kl, marker=marker if kind != "baseline" else ("^" if context == 1024 else "v"),
                           color=cmap(mi % 20), s=45, edgecolors="k" if kind == "baseline" else "none",
                           label=m if context == 1024 or not any(
                               r["context"] == 1024 and r["method"] == m and r["model"] == model for r in rows) else None)
                ax.annotate(m, (a["bits"], kl), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bits per KV element (log2)")
        ax.set_ylabel("mean KL(orig || restored), nats (1e-8 = exact)")
        ax.set_title(f"{model}: mean over domains (o/^ 1K ctx, s/v 4K; baselines = triangles)")
        ax.axhline(0.02, color="gray", ls="--", lw=0.8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------ pytest
def test_rd_smoke(benchmark):
    """One preset through the harness on 256 tokens of SmolLM2 (benchmarked: encode+decode+score)."""
    import cachegen

    runner = make_runner("smollm2")
    ids = runner.encode(TEXT_SOURCES["prose"]())
    case = Case(runner, "smollm2", "prose", ids, 256, continuation=32, generate=8)

    def once():
        return case.run_codec("default", cachegen.PRESETS["default"])

    r = benchmark.pedantic(once, rounds=1, iterations=1)
    assert r["ratio_fp16"] > 2.5 and r["kl_mean"] < 0.05
    b = case.run_baseline("lmcache")
    assert 3 < b["ratio_fp16"] < 8


# ------------------------------------------------------------------------------------ CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="run the full sweep (FULL_PLAN)")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--contexts", nargs="*", type=int, default=None)
    ap.add_argument("--domains", nargs="*", default=None)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--report", action="store_true", help="only rebuild rd_notes.md / rd_plot.png")
    ap.add_argument("--sensitivity", nargs="*", default=None, metavar="MODEL")
    ap.add_argument("--sens-base", default="tiny")
    ap.add_argument("--configs", type=Path, default=None, help="JSON list of CodecConfig dicts to evaluate")
    ap.add_argument("--score-only", action="store_true", help="--configs: no greedy generation")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--profiles", action="store_true",
                    help="profile presets + presets + LMCache baselines, 3 domains, both models, 1K")
    args = ap.parse_args(argv)
    if args.profiles:
        out = args.out or PROFILE_RESULTS
        if not args.report:
            methods = args.methods or (["default", "small", "tiny", "high"] + list(PROFILE_METHODS)
                                       + ["lmcache", "lmcache-whole", "fp16"])
            plan = [(m, 1024, tuple(args.domains or ("prose", "code", "structured"))) for m in (args.models or MODELS)]
            sweep(plan, methods, out, log=print)
        res = load_results(out)
        print(report(res, notes=PROFILE_NOTES, plot=HERE / "rd_profile_plot.png"))
        # the main plot: the older sweep with these rows layered on top (same method names replaced)
        old = load_results(RESULTS)
        new_keys = {(r["model"], r["domain"], r["context"], r["method"]) for r in res["results"]}
        merged = [r for r in old["results"] if (r["model"], r["domain"], r["context"], r["method"]) not in new_keys]
        make_plot([r for r in merged + res["results"] if r["domain"] != "heldout"], PLOT)
        return 0
    args.out = args.out or RESULTS
    log = lambda s: print(s, flush=True)  # noqa: E731
    if args.sensitivity is not None:
        res = load_results(args.out)
        sens = res.setdefault("sensitivity", {})
        for m in args.sensitivity or MODELS:
            log(f"sensitivity {m} (base {args.sens_base})")
            sens[f"{m}/{args.sens_base}"] = sensitivity(m, args.sens_base, log=log)
            save_results(res, args.out)
        return 0
    if args.configs is not None:
        plan = [(m, c, tuple(args.domains or ("prose", "code", "structured")))
                for m in (args.models or MODELS) for c in (args.contexts or [1024])]
        run_configs(json.loads(args.configs.read_text()), plan, args.out, args.score_only, log=log)
        if args.out == RESULTS:
            report(load_results(args.out))
        return 0
    if not args.report:
        if args.full:
            plan = FULL_PLAN
        else:
            plan = [(m, c, tuple(args.domains or ("prose",))) for c in (args.contexts or [1024])
                    for m in (args.models or ["smollm2"])]
        t0 = time.perf_counter()
        sweep(plan, args.methods, args.out, log=log)
        log(f"sweep done in {time.perf_counter() - t0:.0f}s")
    print(report(load_results(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
