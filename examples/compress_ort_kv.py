"""Prefill a prompt with ONNX Runtime, compress its KV cache with cachegen, save it.

    python examples/compress_ort_kv.py --model smollm2 --out /tmp/ctx.cgk [--text-file doc.txt]

Writes the compressed cache and, next to it, ``<out>.json`` with the model and the token ids
(so that restore_and_generate.py knows what the cache covers).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cachegen
from cachegen.demo import demo_text
from cachegen.ort import OrtRunner, export_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--text-file", default=None, help="context text (default: the demo story)")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--out", default="context.cgk")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--no-trim-window", action="store_true",
                    help="keep sliding-window layers at full length (Gemma-3)")
    a = ap.parse_args()

    runner = OrtRunner(export_model(a.model))          # builds the ONNX model once, then cached
    text = Path(a.text_file).read_text() if a.text_file else demo_text()
    ids = runner.encode(text)[: a.max_tokens]

    t = time.perf_counter()
    _, kv = runner.prefill(ids)                        # kv: [(key, value)] per layer, [1, H, T, D]
    prefill_s = time.perf_counter() - t
    if not a.no_trim_window:
        kv = runner.window_kv(kv)                      # sliding layers only need their window

    t = time.perf_counter()
    nbytes = cachegen.save(a.out, kv, config=a.preset)
    save_s = time.perf_counter() - t
    fp16 = runner.kv_nbytes_fp16(kv)
    Path(a.out + ".json").write_text(json.dumps({"model": a.model, "token_ids": ids}))
    print(f"{len(ids)} tokens prefilled in {prefill_s:.2f} s; KV fp16 {fp16 / 2**20:.2f} MiB -> "
          f"{nbytes / 2**20:.2f} MiB ({fp16 / nbytes:.2f}x) in {save_s:.2f} s: {a.out}")


if __name__ == "__main__":
    main()
