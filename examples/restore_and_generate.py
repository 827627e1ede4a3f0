"""Load a compressed KV cache written by compress_ort_kv.py and continue generating from it.

    python examples/restore_and_generate.py --cache /tmp/ctx.cgk --prompt "\n\nIn short," -n 40
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cachegen
from cachegen.ort import OrtRunner, export_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="context.cgk")
    ap.add_argument("--prompt", default="\n\nIn short, this text is about",
                    help="text fed after the cached context (at least one token)")
    ap.add_argument("-n", "--max-new-tokens", type=int, default=40)
    ap.add_argument("--compare", action="store_true",
                    help="also recompute the prefill from the saved token ids and compare")
    a = ap.parse_args()

    info = json.loads(Path(a.cache + ".json").read_text())
    runner = OrtRunner(export_model(info["model"], progress=False))
    prompt = runner.tokenizer(a.prompt.encode().decode("unicode_escape"),
                              add_special_tokens=False)["input_ids"]

    t = time.perf_counter()
    kv = cachegen.load(a.cache, device="cpu")         # torch tensors, [1, H, T, D] per layer
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    tokens = runner.generate(prompt, a.max_new_tokens, kv=kv)
    gen_s = time.perf_counter() - t
    print(f"loaded {runner.kv_length(kv)} cached tokens in {load_s * 1e3:.0f} ms; "
          f"generated {len(tokens)} tokens in {gen_s:.2f} s")
    print(repr(a.prompt) + " ->", runner.decode(tokens))

    if a.compare:
        _, ref_kv = runner.prefill(info["token_ids"])
        ref = runner.generate(prompt, a.max_new_tokens, kv=ref_kv)
        same = 0
        while same < min(len(ref), len(tokens)) and ref[same] == tokens[same]:
            same += 1
        print(f"recomputed cache generates the same tokens: {ref == tokens} "
              f"(common prefix {same}/{len(ref)})")


if __name__ == "__main__":
    main()
