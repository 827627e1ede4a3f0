"""End-to-end demo: a real model's KV cache compressed, saved, loaded and reused.

    python -m cachegen.demo --model smollm2 --preset default
    (or ``cachegen demo`` once wired in the CLI)

Steps: export/load the model (cached ONNX build), prefill a ~1.5K-token text, compress the KV
cache with cachegen and write it to a file, load it back, then answer a question about the
text from the restored cache. Reported: sizes (fp16 vs compressed), encode/decode times, time
to first token from the restored cache vs recomputing the prefill, quality of the restored
cache (perplexity / KL on the held-out end of the text, greedy generation identical or not),
and the generated answer.
"""
from __future__ import annotations

from .errors import ConfigError
from .fileio import write_atomic

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

__all__ = ["run_demo", "demo_text", "DEMO_QUESTION", "main"]

DEMO_QUESTION = ("\n\nQuestion: During the great storm, who held a blanket against the broken "
                 "pane of the lantern room?\nAnswer: It was")


def demo_text() -> str:
    """The built-in demo text (an original story, ~1.3K words, ~1.6K tokens)."""
    try:
        from importlib.resources import files

        return (files("cachegen") / "data" / "demo_text.txt").read_text(encoding="utf-8")
    except (FileNotFoundError, ModuleNotFoundError, TypeError):  # pragma: no cover
        return (Path(__file__).parent / "data" / "demo_text.txt").read_text(encoding="utf-8")


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, fsync=False)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def run_demo(model: str = "smollm2", text: Optional[str] = None, preset: str = "default",
             device: str = "cpu", out_path: Optional[str] = None, as_json: bool = False,
             max_new_tokens: int = 40, heldout_tokens: int = 128, trim_window: bool = True,
             precision: Optional[str] = None, cache_dir: Optional[str] = None,
             question: Optional[str] = None, quiet: bool = False, greedy_prompts: int = 8,
             greedy_tokens: int = 16) -> dict:
    """Run the demo and print its report (JSON with ``as_json``); returns the results as a dict.

    ``model``: "smollm2" | "gemma3"; ``preset``: a cachegen preset name; ``device``: "cpu" |
    "cuda" (ONNX Runtime provider; fp32 graph on CPU, fp16 on CUDA unless ``precision``);
    ``out_path``: where the compressed cache is written (default: a temp folder); ``text``:
    context text (default: the built-in story; then ``question`` defaults to one about it);
    ``heldout_tokens``: tokens at the end of the text kept out of the cache and used to
    measure perplexity/KL; ``trim_window``: compress only the window of sliding-window layers
    (Gemma-3), which is all the model ever reads. Greedy agreement is a rate over
    ``greedy_prompts`` prompts (the question, then prefixes of the held-out text) of
    ``greedy_tokens`` tokens each; where a continuation diverges, the report shows both caches'
    top-2 probabilities at that step (usually a near-tie that the tiniest change flips).
    """
    import numpy as np

    import cachegen
    from .ort.export import export_model
    from .ort.runner import OrtRunner
    from .quality import evaluate_kv, find_divergence, greedy_stats

    def say(msg: str) -> None:
        if not quiet and not as_json:
            print(msg, file=sys.stderr, flush=True)

    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    precision = precision or ("fp32" if device == "cpu" else "fp16")
    builtin = text is None
    text = demo_text() if builtin else text
    question = question if question is not None else (DEMO_QUESTION if builtin else "\n\n")

    t0 = time.perf_counter()
    model_dir = export_model(model, precision=precision, provider=device, cache_dir=cache_dir,
                             progress=not quiet and not as_json)
    runner = OrtRunner(model_dir, provider=device)
    setup_s = time.perf_counter() - t0

    ids = runner.encode(text)
    q_ids = runner.tokenizer(question, add_special_tokens=False)["input_ids"]
    if not q_ids:
        q_ids = ids[-1:]
    held = min(int(heldout_tokens), max(0, len(ids) // 4))
    ctx = ids[:len(ids) - held] if held >= 2 else ids
    held_ids = ids[len(ids) - held:] if held >= 2 else []
    say(f"[demo] {model}: context {len(ctx)} tokens, held out {len(held_ids)}, question {len(q_ids)}")

    # 1. prefill the context (the work a cache hit saves)
    t = time.perf_counter()
    _, kv = runner.prefill(ctx)
    prefill_s = time.perf_counter() - t
    fp16_full = runner.kv_nbytes_fp16(kv)
    kv_c = runner.window_kv(kv) if trim_window else kv
    fp16_stored = runner.kv_nbytes_fp16(kv_c)

    # 2. compress + save
    say(f"[demo] encoding the KV cache with preset {preset!r}")
    t = time.perf_counter()
    data = cachegen.encode(kv_c, preset)
    encode_s = time.perf_counter() - t
    if out_path is None:
        out = Path(tempfile.gettempdir()) / f"cachegen_demo_{model}_{preset}.cgk"
    else:
        out = Path(out_path)
    _write_atomic(out, data)
    nbytes = out.stat().st_size

    # 3. load + decode (the restore path), then time to first token from it
    t = time.perf_counter()
    restored = cachegen.load(out, device=device)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    lg_r, _ = runner.continue_from(restored, q_ids)
    first_r = int(np.argmax(lg_r[0, -1]))
    ttft_cont_s = time.perf_counter() - t
    ttft_restored_s = load_s + ttft_cont_s

    # baseline: recompute the whole prefill (context + question)
    t = time.perf_counter()
    lg_f, _ = runner.prefill(list(ctx) + list(q_ids))
    first_f = int(np.argmax(lg_f[0, -1]))
    ttft_recompute_s = time.perf_counter() - t

    # 4. generate from the restored cache and from the original one
    say(f"[demo] generating {max_new_tokens} tokens from the restored cache")
    t = time.perf_counter()
    gen_r = runner.generate(q_ids, max_new_tokens, kv=restored)
    gen_s = time.perf_counter() - t
    gen_o = runner.generate(q_ids, max_new_tokens, kv=kv)

    # 5. quality on the held-out end of the text
    quality = None
    if len(held_ids) >= 2:
        # the held-out tokens follow the context directly; teacher-forced
        rep = evaluate_kv(runner, kv, restored, held_ids, generate_tokens=0)
        quality = {k: getattr(rep, k) for k in ("ppl_original", "ppl_restored", "delta_ppl_rel",
                                                 "kl_mean", "kl_max", "top1_agreement")}
    prefix = 0
    for a, b in zip(gen_o, gen_r):
        if a != b:
            break
        prefix += 1
    answer_div = find_divergence(runner, kv, restored, q_ids, gen_o, gen_r) if gen_o != gen_r else None

    # 6. greedy agreement as a rate: the question, then prefixes of the held-out text
    say(f"[demo] greedy agreement over {greedy_prompts} prompts x {greedy_tokens} tokens")
    prompts = [list(q_ids)]
    if len(held_ids) >= 2 and greedy_prompts > 1:
        cuts = np.linspace(1, len(held_ids), num=greedy_prompts - 1).astype(int)
        prompts += [list(held_ids[:c]) for c in cuts]
    pairs = []
    for pr in prompts[:max(1, greedy_prompts)]:
        go = runner.generate(pr, greedy_tokens, kv=kv, stop_at_eos=False)
        gr = runner.generate(pr, greedy_tokens, kv=restored, stop_at_eos=False)
        pairs.append((go, gr, find_divergence(runner, kv, restored, pr, go, gr) if go != gr else None))
    gstats = greedy_stats(pairs, greedy_tokens)

    result = {
        "model": model,
        "model_dir": str(model_dir),
        "device": device,
        "precision": precision,
        "preset": preset,
        "context_tokens": len(ctx),
        "question_tokens": len(q_ids),
        "layers": runner.num_layers,
        "kv_heads": runner.num_kv_heads,
        "head_dim": runner.head_dim,
        "trim_window": bool(trim_window and any(w is not None for w in runner.windows)),
        "sizes": {
            "fp16_bytes_full": fp16_full,
            "fp16_bytes_stored": fp16_stored,
            "compressed_bytes": nbytes,
            "ratio_vs_fp16": fp16_stored / nbytes,
            "ratio_vs_fp16_full": fp16_full / nbytes,
            "bits_per_value": 8.0 * nbytes / (fp16_stored / 2),
        },
        "times_s": {
            "setup": setup_s,
            "prefill_context": prefill_s,
            "encode": encode_s,
            "load_decode": load_s,
            "ttft_restored": ttft_restored_s,
            "ttft_recompute": ttft_recompute_s,
            "generate_restored": gen_s,
        },
        "quality": quality,
        "first_token_same": first_r == first_f,
        "greedy_identical": gen_o == gen_r,
        "greedy_match_prefix_len": prefix,
        "answer_divergence": answer_div.explain(runner.decode) if answer_div else None,
        "greedy": {"prompts": gstats.prompts, "tokens": gstats.tokens_per_prompt,
                   "agreement": gstats.agreement, "identical": gstats.identical,
                   "summary": gstats.summary(),
                   "divergences": [d.explain(runner.decode) for d in gstats.divergences]},
        "generated_restored": runner.decode(gen_r),
        "generated_original": runner.decode(gen_o),
        "generated_tokens": len(gen_r),
        "file": str(out),
    }
    if as_json:
        print(json.dumps(result, indent=2))
    elif not quiet:
        print(format_report(result))
    return result


def format_report(r: dict) -> str:
    s, t, q = r["sizes"], r["times_s"], r["quality"]
    lines = [
        f"cachegen demo: {r['model']} ({r['layers']} layers, {r['kv_heads']} KV heads, head_dim "
        f"{r['head_dim']}), {r['device']} {r['precision']}, preset '{r['preset']}'",
        f"  context            {r['context_tokens']} tokens (+ {r['question_tokens']}-token question)",
        "  size",
        f"    KV fp16          {_fmt_bytes(s['fp16_bytes_full'])}"
        + (f"  (sliding layers trimmed to their window: {_fmt_bytes(s['fp16_bytes_stored'])})"
           if r["trim_window"] else ""),
        f"    compressed       {_fmt_bytes(s['compressed_bytes'])}  -> {s['ratio_vs_fp16']:.2f}x vs fp16"
        + (f" ({s['ratio_vs_fp16_full']:.2f}x vs the full fp16 cache)" if r["trim_window"] else "")
        + f", {s['bits_per_value']:.2f} bits/value",
        "  time",
        f"    encode           {1e3 * t['encode']:.1f} ms",
        f"    load + decode    {1e3 * t['load_decode']:.1f} ms",
        f"    TTFT restored    {1e3 * t['ttft_restored']:.1f} ms  (load+decode, then the question)",
        f"    TTFT recompute   {1e3 * t['ttft_recompute']:.1f} ms  (prefill context + question)",
    ]
    if q:
        lines += [
            "  quality (held-out end of the text, teacher-forced)",
            f"    perplexity       {q['ppl_original']:.4f} -> {q['ppl_restored']:.4f} "
            f"({100 * q['delta_ppl_rel']:+.3f}%)",
            f"    KL               mean {q['kl_mean']:.2e}  max {q['kl_max']:.2e} nats; "
            f"top-1 agreement {100 * q['top1_agreement']:.1f}%",
        ]
    g = r["greedy"]
    lines += [f"  greedy generation  {100 * g['agreement']:.1f}% of tokens agree with the uncompressed "
              f"cache's before any divergence, over {g['prompts']} prompts x {g['tokens']} tokens "
              f"({g['identical']}/{g['prompts']} identical)"]
    lines += [f"    {d}" for d in g["divergences"][:3]]
    if r["greedy_identical"]:
        lines.append(f"  answer ({r['generated_tokens']} tokens): the same as from the uncompressed cache")
    else:
        lines.append(f"  answer: the first {r['greedy_match_prefix_len']} of {r['generated_tokens']} tokens as "
                     f"from the uncompressed cache, then it "
                     + (r["answer_divergence"] or "diverged"))
    lines += [
        "  answer from the restored cache:",
        "    " + r["generated_restored"].strip().replace("\n", "\n    "),
    ]
    if not r["greedy_identical"]:
        lines += ["  answer from the original cache:",
                  "    " + r["generated_original"].strip().replace("\n", "\n    ")]
    lines.append(f"  compressed cache written to {r['file']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="cachegen end-to-end demo on a real model")
    ap.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--text", "--text-file", dest="text_file", default=None, metavar="FILE",
                    help="use this text file instead of the built-in text")
    ap.add_argument("--out", dest="out_path", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--no-trim-window", action="store_true")
    ap.add_argument("--greedy-prompts", type=int, default=8, help="prompts of the greedy agreement rate")
    ap.add_argument("--greedy-tokens", type=int, default=16, help="tokens generated per prompt")
    ap.add_argument("--json", dest="as_json", action="store_true")
    a = ap.parse_args(argv)
    text = Path(a.text_file).read_text() if a.text_file else None
    run_demo(model=a.model, text=text, preset=a.preset, device=a.device, out_path=a.out_path,
             as_json=a.as_json, max_new_tokens=a.max_new_tokens, trim_window=not a.no_trim_window,
             greedy_prompts=a.greedy_prompts, greedy_tokens=a.greedy_tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
