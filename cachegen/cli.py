"""Command line: ``cachegen demo | export | encode | decode | inspect``."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np


class Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal, or when forced)."""

    def __init__(self, label: str, enabled: Optional[bool] = None) -> None:
        self.label = label
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.t0 = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        width = 30
        fill = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} chunks "
                         f"{time.perf_counter() - self.t0:5.1f}s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _load_npz(path: str) -> list:
    import torch
    with np.load(path) as z:
        names = set(z.files)
        n = 0
        while f"layer{n}.key" in names:
            n += 1
        if n == 0 or len(names) != 2 * n:
            raise SystemExit(f"{path}: expected arrays layer0.key, layer0.value, ... (got {sorted(names)[:4]}...)")
        kv = []
        for i in range(n):
            pair = []
            for part in ("key", "value"):
                a = z[f"layer{i}.{part}"]
                # bfloat16 travels in npz as its uint16 bit pattern
                pair.append(torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == np.uint16 else a)
            kv.append(tuple(pair))
    return kv


def _save_npz(path: str, kv) -> None:
    import torch
    arrays = {}
    for i, (k, v) in enumerate(kv):
        for part, t in (("key", k), ("value", v)):
            t = t.cpu()
            arrays[f"layer{i}.{part}"] = t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()
    np.savez(path, **arrays)


def cmd_encode(a: argparse.Namespace) -> int:
    import cachegen
    kv = _load_npz(a.input)
    cfg = cachegen.CodecConfig.from_dict(json.loads(a.config)) if a.config else a.preset
    t = time.perf_counter()
    n = cachegen.save(a.output, kv, cfg, progress=Progress("encode", a.progress))
    dt = time.perf_counter() - t
    info = cachegen.inspect(Path(a.output).read_bytes())
    print(f"{a.output}: {n} bytes, {info['bits_per_element']:.3f} bits/element, "
          f"{info['ratio_vs_fp16']:.2f}x vs fp16, {dt:.2f}s")
    return 0


def cmd_decode(a: argparse.Namespace) -> int:
    import cachegen
    data = Path(a.input).read_bytes()
    t = time.perf_counter()
    kv = cachegen.decode(data, a.device, decoder=a.decoder, partial=a.partial)
    dt = time.perf_counter() - t
    _save_npz(a.output, kv)
    print(f"{a.output}: {len(kv)} layers, {kv[0][0].shape[2]} tokens in layer 0, {dt:.2f}s")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    import cachegen
    info = cachegen.inspect(Path(a.input).read_bytes())
    if a.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{a.input}: cachegen v{info['format_version']} {info['mode']} {info['dtype']}, "
          f"{info['layers']} layers, batch {info['batch']}, {len(info['chunks'])} chunk(s) of "
          f"{info['chunk_tokens']} tokens{' (partial)' if info['partial'] else ''}")
    print(f"  {info['total_bytes']} bytes = {info['bits_per_element']:.3f} bits/element = "
          f"{info['ratio_vs_fp16']:.2f}x vs fp16; {info['tables']} probability tables")
    print("  breakdown: " + ", ".join(f"{k} {v}" for k, v in info["breakdown"].items()))
    print("  layer tokens   K shape  V shape  bits  bytes   bits/elem")
    for i, l in enumerate(info["per_layer"]):
        bpe = "-" if l["bits_per_element"] is None else f"{l['bits_per_element']:.3f}"
        print(f"  {i:5d} {l['tokens']:6d}  {l['k_shape'][0]}x{l['k_shape'][1]:<5d} {l['v_shape'][0]}x{l['v_shape'][1]:<5d}"
              f" {l['k_bits']}/{l['v_bits']}  {l['bytes']:8d}  {bpe}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="cachegen", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("demo", help="end-to-end demo on a real model (see 'cachegen demo --help')", add_help=False)
    sub.add_parser("export", help="build the ONNX model of a reference LLM (see 'cachegen export --help')", add_help=False)
    p = sub.add_parser("encode", help="compress a KV cache stored as .npz (layer{i}.key / layer{i}.value)")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--preset", default="default", help="preset name (cachegen.PRESETS)")
    p.add_argument("--config", default=None, help="CodecConfig as JSON instead of a preset")
    p.add_argument("--progress", action="store_true", default=None, help="force the progress bar")
    p = sub.add_parser("decode", help="decompress a .cgk file to .npz")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--device", default="cpu")
    p.add_argument("--decoder", default="auto", choices=("auto", "reference", "lockstep", "gpu"))
    p.add_argument("--partial", action="store_true", help="accept a truncated file (prefix of chunks)")
    p = sub.add_parser("inspect", help="describe a .cgk file without decoding it")
    p.add_argument("input")
    p.add_argument("--json", action="store_true")
    if argv and argv[0] == "demo":
        from .demo import main as demo_main
        return demo_main(argv[1:])
    if argv and argv[0] == "export":
        from .ort.export import main as export_main
        return export_main(argv[1:])
    a = ap.parse_args(argv)
    from .errors import CacheGenError
    try:
        return {"encode": cmd_encode, "decode": cmd_decode, "inspect": cmd_inspect}[a.cmd](a)
    except (CacheGenError, OSError) as e:
        print(f"cachegen {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
