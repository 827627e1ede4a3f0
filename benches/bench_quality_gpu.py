"""Quality of every preset in the serving configuration: fp16 CUDA graphs, restore through StaticKV.

For each model (SmolLM2-135M, Gemma-3-270M), context length (1K, 4K) and held-out window (text
shipped with Python and onnxruntime, see ``cachegen.quality.eval_texts``: Python's reference
docs, onnxruntime's licence notices, stdlib code; never the demo text, never a hub), the context
is prefilled once with the ORT graph. The exact cache is loaded into a ``StaticKV`` (buffers
bound as past *and* present) and the continuation scored teacher-forced; then for every preset
the compressed cache is restored into the same buffers (GPU decode on CUDA) and scored again:

* Δppl (relative), mean / max KL(exact || restored) in nats, top-1 agreement over the
  continuation's positions (256 tokens);
* greedy agreement as a rate: over many windows (32 × 64 tokens at 1K by default), the mean
  fraction of tokens generated identically before the first difference, the position-wise
  agreement (fraction of the 64 positions holding the same token in both, which keeps counting
  after a flip), and how many windows are identical; where one diverges, the exact cache's
  top-2 probabilities at that step (a near-tie explains a flip that the KL figures call
  harmless);
* the noise floor of that rate: the pseudo preset ``exact-repeat`` (greedy rows only) runs the
  exact cache's generation a second time (``load`` again) and compares it with the first; on
  the fp32 CPU graphs it must be 100 %, on fp16 CUDA graphs it shows what run-to-run / path
  differences alone cost.

Codec variants (for tuning a preset) are given as ``--variant NAME=JSON``: the JSON holds
``CodecConfig`` fields overriding a base preset (``"preset"``, default ``high``), e.g.
``--variant 'k9v8={"key_bits": 9, "value_bits": 8}'``; they are measured like the presets, their
rows carry the config (``config``), and greedy rows the mean compression ratio of their windows.

Gemma-3's sliding layers are stored with their 512-token window (``window_kv``), as in the
demo. The tokenizer is checked on every run (``OrtRunner.encode`` raises ModelError on a broken
one) and the characters per token are recorded.

GPU (the H200 machine; resumable: rows already in --out are skipped):

    python benches/bench_quality_gpu.py --device cuda --out benches/quality_gpu.json

CPU end-to-end check of the script (fp32 CPU graphs, small sizes):

    python benches/bench_quality_gpu.py --device cpu --quick --out /tmp/quality_cpu.json

CPU agreement with a variant (fp32 graphs: exact-repeat must be 100 %):

    python benches/bench_quality_gpu.py --device cpu --threads 2 --models smollm2 --contexts 1024 \
        --presets exact-repeat,lossless,high,default,k9v8 --variant 'k9v8={"key_bits": 9, "value_bits": 8}' \
        --out /tmp/quality_cpu.json

Writes ``--out`` (JSON) and the same name with ``.md`` (tables). Resuming skips a row only when
its key matches: (model, context, window, preset) for the windows, (model, preset, greedy
context, tokens, windows) for greedy rows, and for both the codec config where the row records
one (older rows without ``config`` / ``token_agreement`` still load and count as done).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

MODELS = ("smollm2", "gemma3")
PRESET_ORDER = ("exact-repeat", "ulp-noise", "tiny", "small", "default", "cachegen-paper", "fine", "high", "lossless")
EXACT_REPEAT = "exact-repeat"     # greedy-only pseudo preset: the exact cache's generation run twice
# greedy-only pseudo preset: every element of the exact cache moved one ulp of its own dtype
# (random sign): the floor for any lossy cache on these graphs, since fp16 near-ties flip on it
ULP_NOISE = "ulp-noise"
FLOORS = (EXACT_REPEAT, ULP_NOISE)


def ulp_noise(kv, seed: int = 0) -> list:
    """The cache with each element one ulp up or down (seeded; signs independent per element)."""
    rng = np.random.default_rng(seed)
    out = []
    for pair in kv:
        moved = []
        for t in pair:
            a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)   # torch (CUDA) or numpy
            to = np.where(rng.random(a.shape) < 0.5, -np.inf, np.inf).astype(a.dtype)
            b = np.nextafter(a, to)
            if hasattr(t, "detach"):
                import torch
                b = torch.from_numpy(b).to(t.device)
            moved.append(b)
        out.append(tuple(moved))
    return out


def _order(p: str) -> int:
    return PRESET_ORDER.index(p) if p in PRESET_ORDER else 99


def _config_dict(cfg) -> Optional[dict]:
    from cachegen.config import get_config
    from cachegen.profile import PROFILE_PRESETS

    if cfg is None or (isinstance(cfg, str) and cfg in PROFILE_PRESETS):
        return None     # a model-profile preset: its widths live in the model's profile
    return get_config(cfg).to_dict()


def parse_variant(spec: str):
    """``NAME=JSON`` (CodecConfig fields over the preset ``"preset"``, default ``high``) -> (name, config)."""
    from cachegen.config import CodecConfig

    name, sep, js = spec.partition("=")
    if not sep or not name or name in PRESET_ORDER:
        raise SystemExit(f"--variant wants NAME=JSON with a new name, got {spec!r}")
    over = json.loads(js) if js.strip() else {}
    base = over.pop("preset", "high")
    return name, CodecConfig.from_preset(base, name=name, **over)


def log(msg: str) -> None:
    print(f"[quality_gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _np(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


class Model:
    """One exported model on one device, with a StaticKV sized for the longest run."""

    def __init__(self, name: str, device: str, capacity: int, threads: Optional[int] = None):
        from cachegen.ort import OrtRunner, export_model
        from cachegen.ort.cuda import StaticKV

        self.name, self.device = name, device
        self.precision = "fp16" if device == "cuda" else "fp32"
        self.dir = export_model(name, self.precision, device)
        self.runner = OrtRunner(self.dir, provider=device, threads=threads)
        self.skv = StaticKV(self.runner, capacity)
        self.bos = self.runner.bos_token_id if self.runner.add_bos else None

    def prefill(self, ids):
        _, kv = self.runner.prefill(ids)
        return kv

    def encode(self, kv, cfg) -> bytes:
        """``cachegen.encode``, or for a model-profile preset ("default-p", ...) the profile codec
        with this model's profile (next to the export, else the shipped one)."""
        import cachegen
        from cachegen.profile import PROFILE_PRESETS, load_for_model
        from cachegen.profile import codec as pcodec

        if isinstance(cfg, str) and cfg in PROFILE_PRESETS:
            if getattr(self, "profile", None) is None:
                self.profile = load_for_model(self.dir)
            return pcodec.encode(kv, self.profile, cfg)
        return cachegen.encode(kv, cfg)

    def logits_after(self, kv_or_data, ids: Sequence[int], length: int) -> np.ndarray:
        """Restore (exact KV via load, a container via restore), then feed ``ids``; [T, V] float32."""
        if isinstance(kv_or_data, (bytes, bytearray, memoryview)):
            self.skv.restore(bytes(kv_or_data))
        else:
            self.skv.load(kv_or_data)
        assert self.skv.length == length, (self.skv.length, length)
        return _np(self.skv.step(list(ids)))[0]

    def greedy_after(self, kv_or_data, first: Sequence[int], n: int) -> List[int]:
        if isinstance(kv_or_data, (bytes, bytearray, memoryview)):
            self.skv.restore(bytes(kv_or_data))
        else:
            self.skv.load(kv_or_data)
        return self.skv.greedy(list(first), n)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def compare(lo: np.ndarray, lr: np.ndarray, targets: Sequence[int]) -> Dict[str, float]:
    lpo, lpr = _log_softmax(lo), _log_softmax(lr)
    kl = np.maximum((np.exp(lpo) * (lpo - lpr)).sum(-1), 0.0)
    t = np.asarray(targets, dtype=np.int64)
    i = np.arange(len(t))
    ppl_o = float(np.exp(-lpo[i, t].mean()))
    ppl_r = float(np.exp(-lpr[i, t].mean()))
    return dict(ppl_exact=ppl_o, ppl_restored=ppl_r, delta_ppl_rel=(ppl_r - ppl_o) / ppl_o,
                kl_mean=float(kl.mean()), kl_max=float(kl.max()),
                top1=float((lo.argmax(-1) == lr.argmax(-1)).mean()))


def _windows(m: Model, texts: Dict[str, Any], length: int, count: int) -> List[tuple]:
    """``count`` windows of ``length`` tokens, taken round-robin over the texts."""
    from cachegen.quality import text_windows

    names = [n for n in ("pydocs-a", "ort-notices", "code-argparse", "pydocs-b", "code-difflib") if n in texts]
    per = max(1, math.ceil(count / len(names)))
    by = {n: text_windows(m.runner.encode(texts[n][0]), length, per, bos=m.bos) for n in names}
    return [(f"{n}#{j}", by[n][j]) for j in range(per) for n in names if j < len(by[n])][:count]


def run(device: str, models: Sequence[str], presets: Sequence[str], contexts: Sequence[int], windows: int,
        cont: int, greedy_windows: int, greedy_tokens: int, greedy_context: int, out: Path,
        threads: Optional[int] = None, configs: Optional[Dict[str, Any]] = None) -> dict:
    """``presets``: preset names, names of ``configs`` (name -> CodecConfig) and/or
    ``"exact-repeat"`` (greedy only: the noise floor)."""
    import cachegen
    from cachegen.quality import eval_texts, greedy_stats

    configs = dict(configs or {})
    cfg_of = {p: (None if p in FLOORS else configs.get(p, p)) for p in presets}
    cfg_dict = {p: _config_dict(c) for p, c in cfg_of.items()}
    codec_presets = [p for p in presets if p not in FLOORS]

    texts = eval_texts()
    res = json.loads(out.read_text()) if out.is_file() else {}
    res.setdefault("windows", [])
    res.setdefault("greedy", [])
    res.setdefault("tokenizer", {})
    res["meta"] = dict(
        device=device, when=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(), texts={k: v[1] for k, v in texts.items()}, continuation_tokens=cont,
        greedy=dict(windows=greedy_windows, tokens=greedy_tokens, context=greedy_context))
    try:
        import torch
        if device == "cuda":
            res["meta"]["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    # a finished row counts only where its config (when it recorded one) is the one asked for now
    def same_cfg(r) -> bool:
        return "config" not in r or r["preset"] not in cfg_dict or r["config"] == cfg_dict[r["preset"]]

    done_w = {(r["model"], r["context"], r["window"], r["preset"]) for r in res["windows"] if same_cfg(r)}
    done_g = {(r["model"], r["preset"]) for r in res["greedy"] if same_cfg(r)
              and r.get("context", greedy_context) == greedy_context and r.get("tokens", greedy_tokens) == greedy_tokens
              and r.get("requested_windows", r.get("windows")) == greedy_windows}

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=1) + "\n")
        out.with_suffix(".md").write_text(report(res) + "\n")

    for name in models:
        m = Model(name, device, capacity=max(list(contexts) + [greedy_context]) + max(cont, greedy_tokens + 1) + 8,
                  threads=threads)
        probe = texts.get("pydocs-a", next(iter(texts.values())))[0][:20000]
        n_tok = len(m.runner.encode(probe))
        res["tokenizer"][name] = dict(chars=len(probe), tokens=n_tok, chars_per_token=len(probe) / n_tok,
                                      export=str(m.dir))
        from cachegen.profile import PROFILE_PRESETS, load_for_model
        if any(p in PROFILE_PRESETS for p in codec_presets):   # which profile the -p rows used
            m.profile = load_for_model(m.dir)
            res["tokenizer"][name]["profile"] = m.profile.hash_hex
        log(f"{name} {m.precision} {device}: tokenizer {len(probe) / n_tok:.2f} chars/token")
        for C in contexts:
            for wname, w in _windows(m, texts, C + cont, windows):
                todo = [p for p in codec_presets if (name, C, wname, p) not in done_w]
                if not todo:
                    continue
                ctx, tail = w[:C], w[C:]
                kv = m.prefill(ctx)
                stored = m.runner.window_kv(kv)
                lo = m.logits_after(stored, tail, C)[:-1]
                # the StaticKV path against the plain runner (fp16 noise only)
                lref = _np(m.runner.continue_from(kv, tail)[0])[0][:-1]
                path_kl = compare(lref, lo, tail[1:])["kl_mean"]
                fp16 = m.runner.kv_nbytes_fp16(stored)
                for p in todo:
                    t0 = time.perf_counter()
                    data = m.encode(stored, cfg_of[p])
                    enc_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    lr = m.logits_after(data, tail, C)[:-1]
                    rs_s = time.perf_counter() - t0
                    row = dict(model=name, precision=m.precision, device=device, context=C, window=wname,
                               preset=p, bytes=len(data), ratio=fp16 / len(data), encode_s=enc_s,
                               restore_and_score_s=rs_s, statickv_path_kl=path_kl, config=cfg_dict[p],
                               **compare(lo, lr, tail[1:]))
                    res["windows"].append(row)
                    log(f"{name} {C} {wname} {p}: ratio {row['ratio']:.2f} dppl {100 * row['delta_ppl_rel']:+.2f}% "
                        f"KL {row['kl_mean']:.4f} top1 {row['top1']:.3f}")
                save()
        # greedy agreement over many windows
        todo = [p for p in presets if (name, p) not in done_g]
        if todo and greedy_windows > 0:
            # The exact generations first (once per window), then one preset at a time, saved
            # as it completes: a run cut short keeps every finished preset (resumable).
            wins = []
            for wname, w in _windows(m, texts, greedy_context + 1, greedy_windows):
                ctx, first = w[:greedy_context], w[greedy_context:]
                kv = m.runner.window_kv(m.prefill(ctx))
                wins.append((kv, first, m.greedy_after(kv, first, greedy_tokens)))
            log(f"{name}: {len(wins)} exact greedy runs of {greedy_tokens} tokens")
            # the noise floor, then `high` and `default` first: the targets are about them
            for p in sorted(todo, key=lambda q: (q not in FLOORS, q != "high", q != "default")):
                pairs, ratios = [], []
                for kv, first, gen_o in wins:
                    if p == EXACT_REPEAT:
                        data = kv                       # the same exact cache, loaded again
                    elif p == ULP_NOISE:
                        data = ulp_noise(kv, seed=len(pairs))
                    else:
                        data = m.encode(kv, cfg_of[p])
                        ratios.append(m.runner.kv_nbytes_fp16(kv) / len(data))
                    gen_r = m.greedy_after(data, first, greedy_tokens)
                    div = None
                    if gen_r != gen_o:
                        div = _divergence(m, kv, data, first, gen_o, gen_r, greedy_context)
                    pairs.append((gen_o, gen_r, div))
                st = greedy_stats(pairs, greedy_tokens)
                row = dict(model=name, precision=m.precision, device=device, preset=p, context=greedy_context,
                           windows=st.prompts, requested_windows=greedy_windows, tokens=st.tokens_per_prompt,
                           agreement=st.agreement, token_agreement=st.token_agreement,
                           identical=st.identical, identical_rate=st.identical_rate,
                           ratio=float(np.mean(ratios)) if ratios else None, config=cfg_dict[p],
                           divergences=[dict(position=d.position, margin=d.margin,
                                             original_top2=d.original_top2, restored_top2=d.restored_top2)
                                        for d in st.divergences],
                           summary=st.summary())
                res["greedy"].append(row)
                log(f"{name} {p}: {st.summary()}")
                save()
            del wins
    save()
    return res


def _divergence(m: Model, kv, data, first, gen_o, gen_r, C):
    """Top-2 of both caches at the first differing step (same tokens fed to both)."""
    from cachegen.quality import Divergence, _common_prefix, _top2

    n = _common_prefix(gen_o, gen_r)
    feed = list(first) + list(gen_o[:n])
    lo = m.logits_after(kv, feed, C)[-1]
    lr = m.logits_after(data, feed, C)[-1]
    to, tr = _top2(lo), _top2(lr)
    return Divergence(n, int(gen_o[n]), int(gen_r[n]), to, tr, to[0][1] - to[1][1])


def report(res: dict) -> str:
    meta = res.get("meta", {})
    lines = [f"Device: {meta.get('device')} {meta.get('gpu', '')}, {meta.get('when', '')}; continuation "
             f"{meta.get('continuation_tokens')} tokens; texts: "
             + "; ".join(f"{k} = {v}" for k, v in meta.get("texts", {}).items()), ""]
    for name, t in res.get("tokenizer", {}).items():
        lines.append(f"Tokenizer {name}: {t['chars_per_token']:.2f} characters per token on {t['chars']} characters.")
    lines += ["", "| model | context | preset | windows | ratio | Δppl mean | Δppl max | KL mean | KL max (of means) "
              "| top-1 | StaticKV path KL |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = res.get("windows", [])
    key = lambda r: (r["model"], r["context"], _order(r["preset"]), r["preset"])
    for k in sorted({key(r) for r in rows}):
        rs = [r for r in rows if key(r) == k]
        d = [r["delta_ppl_rel"] for r in rs]
        lines.append(f"| {k[0]} | {k[1]} | {k[3]} | {len(rs)} | {np.mean([r['ratio'] for r in rs]):.2f} | "
                     f"{100 * np.mean(d):+.2f} % | {100 * max(d, key=abs):+.2f} % | "
                     f"{np.mean([r['kl_mean'] for r in rs]):.4f} | {max(r['kl_mean'] for r in rs):.4f} | "
                     f"{100 * np.mean([r['top1'] for r in rs]):.1f} % | {max(r['statickv_path_kl'] for r in rs):.1e} |")
    g = res.get("greedy", [])
    if g:
        lines += ["", "Greedy agreement: prefix = mean fraction of the tokens generated identically before the "
                  "first difference; position-wise = mean fraction of positions holding the same token; "
                  "exact-repeat = the exact cache's generation run twice (the noise floor); "
                  "ulp-noise = the exact cache with every element moved one ulp (the floor for any lossy cache).", "",
                  "| model | preset | ratio | greedy agreement (prefix) | position-wise | identical "
                  "| divergences at near-ties (margin < 0.1) |", "|---|---|---|---|---|---|---|"]
        for r in sorted(g, key=lambda r: (r["model"], _order(r["preset"]), r["preset"])):
            dv = r["divergences"]
            near = sum(d["margin"] < 0.1 for d in dv)
            ta, ratio = r.get("token_agreement"), r.get("ratio")
            lines.append(f"| {r['model']} | {r['preset']} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                         f"{100 * r['agreement']:.1f} % of {r['windows']} × {r['tokens']} tokens | "
                         f"{'-' if ta is None else f'{100 * ta:.1f} %'} | {r['identical']}/{r['windows']} | "
                         + (f"{near}/{len(dv)} (median margin {np.median([d['margin'] for d in dv]):.3f})" if dv else "-")
                         + " |")
    cfgs = {r["preset"]: r["config"] for r in list(rows) + list(g)
            if r.get("config") and r["preset"] not in PRESET_ORDER}
    if cfgs:
        lines += ["", "Variants: " + "; ".join(f"{k} = {json.dumps(v, sort_keys=True)}" for k, v in sorted(cfgs.items()))]
    lines += ["", "Targets (issue 12): " + "; ".join(targets(res))]
    return "\n".join(lines)


def targets(res: dict) -> List[str]:
    out = []
    rows = res.get("windows", [])
    for name in sorted({r["model"] for r in rows}):
        d = [r for r in rows if r["model"] == name and r["preset"] == "default"]
        if d:
            by_c = {}
            for r in d:
                by_c.setdefault(r["context"], []).append(r)
            for C, rs in sorted(by_c.items()):
                mean_d = float(np.mean([r["delta_ppl_rel"] for r in rs]))
                kl = max(r["kl_mean"] for r in rs)
                ok = mean_d <= 0.01 and kl <= 0.01
                out.append(f"{name} {C} default Δppl mean {100 * mean_d:+.2f} % (≤ 1 %), KL max {kl:.4f} (≤ 0.01): "
                           + ("met" if ok else "NOT met"))
    g = res.get("greedy", [])
    for r in g:
        if r["preset"] == "high":
            s = (f"{r['model']} high greedy agreement {100 * r['agreement']:.1f} % (≥ 95 %): "
                 + ("met" if r["agreement"] >= 0.95 else "NOT met"))
            extra = []
            if r.get("token_agreement") is not None:
                extra.append(f"position-wise {100 * r['token_agreement']:.1f} %")
            for fl in FLOORS:
                floor = [q for q in g if q["model"] == r["model"] and q["preset"] == fl]
                if floor:
                    extra.append(f"floor {fl} {100 * floor[-1]['agreement']:.1f} %")
            out.append(s + (f" ({', '.join(extra)})" if extra else ""))
    return out


def main(argv=None) -> int:
    import cachegen

    ap = argparse.ArgumentParser(description="preset quality on the serving path (fp16 CUDA graphs + StaticKV)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--presets", default=None,
                    help="comma list (default: exact-repeat, then every preset, then every --variant); "
                         "exact-repeat and ulp-noise = the greedy floors (see the module doc)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                    help="a codec variant: CodecConfig fields over a base preset (key \"preset\", default "
                         "high), e.g. 'k9v8={\"key_bits\": 9, \"value_bits\": 8}'; repeatable")
    ap.add_argument("--contexts", default="1024,4096")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--continuation", type=int, default=256)
    ap.add_argument("--greedy-windows", type=int, default=32)
    ap.add_argument("--greedy-tokens", type=int, default=64)
    ap.add_argument("--greedy-context", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quick", action="store_true",
                    help="small sizes to check the script end to end (context 256, 2 windows, 32-token "
                         "continuation, 4 x 16 greedy, presets exact-repeat/default/high/lossless)")
    ap.add_argument("--out", required=True, help="results JSON (a .md table is written next to it)")
    ap.add_argument("--report", action="store_true", help="only rewrite the .md from --out")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.report:
        res = json.loads(out.read_text())
        out.with_suffix(".md").write_text(report(res) + "\n")
        print(report(res))
        return 0
    if a.device == "cuda":
        from cachegen.ort.cuda import cuda_provider_available
        if not cuda_provider_available():
            print("no CUDA GPU / onnxruntime CUDA provider here: use --device cpu", file=sys.stderr)
            return 2
    configs = dict(parse_variant(v) for v in a.variant)
    presets = a.presets.split(",") if a.presets else [EXACT_REPEAT] + [p for p in PRESET_ORDER if p in cachegen.PRESETS] + \
        [p for p in cachegen.PRESETS if p not in PRESET_ORDER] + list(configs)
    from cachegen.profile import PROFILE_PRESETS
    unknown = [p for p in presets if p not in FLOORS and p not in configs and p not in cachegen.PRESETS
               and p not in PROFILE_PRESETS]
    if unknown:
        print(f"unknown presets/variants: {unknown}", file=sys.stderr)
        return 2
    contexts = [int(c) for c in a.contexts.split(",")]
    windows, cont, gw, gt, gc = a.windows, a.continuation, a.greedy_windows, a.greedy_tokens, a.greedy_context
    if a.quick:
        contexts, windows, cont, gw, gt, gc = [256], 2, 32, 4, 16, 256
        if not a.presets:
            presets = [EXACT_REPEAT, "default", "high", "lossless"] + list(configs)
    res = run(a.device, a.models.split(","), presets, contexts, windows, cont, gw, gt, gc, out, a.threads, configs)
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
