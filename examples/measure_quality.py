"""Quality of a cachegen preset on your own text: perplexity / KL / greedy agreement.

    python examples/measure_quality.py --model smollm2 --preset default --text-file my.txt
    python examples/measure_quality.py --model gemma3 --preset small --json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from cachegen.demo import demo_text
from cachegen.ort import OrtRunner, export_model
from cachegen.quality import evaluate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--preset", default="default", help="a cachegen preset (see cachegen.PRESETS)")
    ap.add_argument("--text-file", default=None, help="default: the built-in demo story")
    ap.add_argument("--context-tokens", type=int, default=1024)
    ap.add_argument("--continuation-tokens", type=int, default=128)
    ap.add_argument("--generate-tokens", type=int, default=64)
    ap.add_argument("--trim-window", action="store_true",
                    help="compress only the window of sliding-window layers (Gemma-3)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    runner = OrtRunner(export_model(a.model, progress=not a.json))
    text = Path(a.text_file).read_text() if a.text_file else demo_text()
    rep = evaluate(runner, text, config=a.preset, context_tokens=a.context_tokens,
                   continuation_tokens=a.continuation_tokens, generate_tokens=a.generate_tokens,
                   trim_window=a.trim_window)
    print(json.dumps(rep.to_dict(), indent=2) if a.json else rep.summary())


if __name__ == "__main__":
    main()
