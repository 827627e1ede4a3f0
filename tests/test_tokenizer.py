"""The reference models' tokenizers (cachegen.ort.tokenizer) and the sanity check that guards them.

Fast tests: the check on tiny hand-made tokenizers (a char-level one must raise ModelError).
Slow tests: both real tokenizers from their GGUF files, and the same build under transformers
5.17.0 + tokenizers 0.23.2 (the release whose own GGUF route gave Gemma-3 char-level ids) in a
venv built once under the cache folder; skipped when that venv cannot be built (offline).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cachegen.errors import CacheGenError, ModelError
from cachegen.ort import tokenizer as T

REPO = Path(__file__).resolve().parents[1]


def _tiny_tokenizer(with_merges: bool):
    """A byte-level BPE over CHECK_SENTENCE's characters: with merges for every word (a sane
    tokenizer) or none at all (one token per character, like the 5.17 fault)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = [w for w, _ in pre.pre_tokenize_str(T.CHECK_SENTENCE)]
    chars = sorted({c for w in words for c in w})
    vocab = {c: i for i, c in enumerate(chars)}
    merges = []
    if with_merges:
        for w in words:
            cur = w[0]
            for c in w[1:]:
                if cur + c not in vocab:
                    merges.append((cur, c))
                    vocab[cur + c] = len(vocab)
                cur = cur + c
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False)


def test_check_passes_a_sane_tokenizer():
    tok = _tiny_tokenizer(with_merges=True)
    ids = T.check_tokenizer(tok)
    assert len(T.CHECK_SENTENCE) / len(ids) >= T.MIN_CHARS_PER_TOKEN


def test_check_rejects_char_level_tokenizer():
    tok = _tiny_tokenizer(with_merges=False)
    assert len(tok(T.CHECK_SENTENCE, add_special_tokens=False)["input_ids"]) == len(T.CHECK_SENTENCE)
    with pytest.raises(ModelError, match="char-level") as e:
        T.check_tokenizer(tok, where="unit test")
    assert isinstance(e.value, CacheGenError) and "transformers" in str(e.value)


def test_check_rejects_wrong_ids_for_a_reference_model():
    tok = _tiny_tokenizer(with_merges=True)          # sane, but not SmolLM2's vocabulary
    with pytest.raises(ModelError, match="expected 25 ids"):
        T.check_tokenizer(tok, "smollm2")


def test_check_rejects_a_tokenizer_that_does_not_round_trip():
    class Lossy:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": list(range(len(text.split())))}

        def decode(self, ids, skip_special_tokens=True):
            return "something else"

    with pytest.raises(ModelError, match="round-trip"):
        T.check_tokenizer(Lossy())


def test_check_turns_tokenizer_crashes_into_model_error():
    class Broken:
        def __call__(self, text, add_special_tokens=False):
            raise KeyError("vocab")

    with pytest.raises(ModelError, match="KeyError"):
        T.check_tokenizer(Broken())


def test_load_tokenizer_checks_the_folder(tmp_path):
    """A char-level tokenizer.json on disk is refused when loaded (what OrtRunner.tokenizer does)."""
    bad = _tiny_tokenizer(with_merges=False)
    bad.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "cachegen_tokenizer": "byte-level-bpe"}))
    with pytest.raises(ModelError, match="char-level"):
        T.load_tokenizer(tmp_path)
    assert T.load_tokenizer(tmp_path, check=False) is not None


def test_runner_refuses_char_level_tokenizer(tmp_path):
    """OrtRunner.encode raises instead of returning char-level ids."""
    from cachegen.ort.runner import OrtRunner

    hf = tmp_path / "hf"
    hf.mkdir()
    bad = _tiny_tokenizer(with_merges=False)
    bad.backend_tokenizer.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "cachegen_tokenizer": "byte-level-bpe"}))
    r = OrtRunner.__new__(OrtRunner)                 # no graph needed for the tokenizer path
    r.model_dir, r.add_bos, r._tokenizer = tmp_path, False, None
    with pytest.raises(ModelError):
        r.encode("hello world")


# ------------------------------------------------------------------------------ real tokenizers
def _long_text() -> str:
    """A long English text that ships with Python itself (its reference documentation)."""
    import pydoc_data.topics as topics

    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics)[:12])


_PROBE = r"""
import hashlib, json, sys
import transformers, tokenizers
from cachegen.ort import tokenizer as T
args = json.loads(sys.argv[1])
out = {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__, "models": {}}
for name, gguf in args["gguf"].items():
    tk, spec = T.build_tokenizer(gguf)
    T.save_tokenizer(tk, spec, args["dir"] + "/" + name)
    tok = T.load_tokenizer(args["dir"] + "/" + name, model=name)      # raises ModelError if wrong
    ids = tok(args["text"])["input_ids"]
    out["models"][name] = {"n": len(ids), "sha1": hashlib.sha1(json.dumps(ids).encode()).hexdigest()}
print("RESULT " + json.dumps(out))
"""


def _ggufs() -> dict:
    from cachegen.ort.export import gguf_path

    return {n: str(gguf_path(n)) for n in ("smollm2", "gemma3")}   # .ci/install installs both


def _probe(python: str, tmp: Path, env_extra: dict | None = None) -> dict:
    args = {"gguf": _ggufs(), "text": _long_text(), "dir": str(tmp)}
    env = dict(os.environ, PYTHONPATH=str(REPO), **(env_extra or {}))
    p = subprocess.run([python, "-c", _PROBE, json.dumps(args)], capture_output=True, text=True,
                       env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_reference_tokenizers_installed_version(tmp_path):
    """Both reference tokenizers pass the check with the installed transformers, and a long text
    tokenizes at a normal rate (a char-level tokenizer would give ~1 token per character)."""
    res = _probe(sys.executable, tmp_path)
    n_chars = len(_long_text())
    for name, r in res["models"].items():
        assert n_chars / r["n"] > 3.0, (name, r)


def _venv_517() -> str:
    """A venv (system site + transformers 5.17.0 / tokenizers 0.23.2 on top), built once."""
    from cachegen.ort.export import default_cache_dir

    venv = Path(os.environ.get("CACHEGEN_TF517_VENV") or default_cache_dir().parent / "venv-tf5.17.0")
    py = venv / "bin" / "python"
    ok = venv / ".cachegen-ready"
    if not ok.is_file():
        try:
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                           capture_output=True, timeout=120)
            subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                            "transformers==5.17.0", "tokenizers==0.23.2"], check=True, capture_output=True,
                           timeout=300)
        except (subprocess.SubprocessError, OSError) as e:
            pytest.skip(f"cannot build a transformers 5.17 venv here (offline?): {e}")
        ok.write_text("ok\n")
    return str(py)


@pytest.mark.slow
def test_reference_tokenizers_same_ids_on_transformers_5_17(tmp_path):
    """transformers 5.17.0 + tokenizers 0.23.2 give exactly the installed release's ids."""
    py = _venv_517()
    old = _probe(py, tmp_path / "517")
    assert (old["transformers"], old["tokenizers"]) == ("5.17.0", "0.23.2"), old
    new = _probe(sys.executable, tmp_path / "cur")
    assert old["models"] == new["models"], (old, new)


@pytest.mark.parametrize("v,ok", [("4.57.6", False), ("5.16.2", False), ("5.17.0", True), ("5.24.0", True),
                                  ("6.0.0.dev0", True)])
def test_export_refuses_transformers_too_old(monkeypatch, v, ok):
    """transformers 4.57.6 fails in onnxruntime-genai's builder (measured): a clear ModelError up front."""
    import importlib.metadata

    from cachegen.ort.export import _check_transformers

    monkeypatch.setattr(importlib.metadata, "version", lambda pkg: v)
    if ok:
        _check_transformers()
    else:
        with pytest.raises(ModelError, match="too old"):
            _check_transformers()
