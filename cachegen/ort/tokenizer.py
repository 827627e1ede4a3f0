"""The reference models' tokenizers, built from their GGUF files by us, and checked.

Why not ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``: what transformers builds from a
GGUF changed between releases, and some releases get Gemma-3 wrong. Measured with
transformers 5.17.0 + tokenizers 0.23.2: the GGUF route gives a *Unigram* model (the GGUF has
no merges; 5.17 scores pieces instead of merging them), which splits words differently, and
``save_pretrained`` writes it with ``tokenizer_class: GemmaTokenizer``; loading that folder
rebuilds a BPE from the vocabulary with *no merges*, i.e. one token per character (a
35,149-character text became 35,150 tokens). transformers 5.24 rebuilds the merges from the
vocabulary order and gets it right.

So the tokenizer is built here from the GGUF metadata with the ``tokenizers`` library only,
the same way on every transformers version:

* Gemma-3 (``tokenizer.ggml.model = llama``, sentencepiece BPE): byte-fallback BPE whose merges
  are recovered from the vocabulary, best first in file order (Gemma's scores are -index, and
  the file order is the merge order); tokens made only of spaces are respelled with U+2581;
  spaces become U+2581 in a normalizer; BOS is added by a post-processor.
* SmolLM2 (``gpt2``): byte-level BPE with the file's merges, the GPT-2 split regex after
  single digits (llama.cpp's ``smollm`` pre-tokenizer).

Control tokens (GGUF token type 3) become special added tokens, user-defined ones (type 4,
e.g. Gemma's runs of newlines) plain added tokens, both matched whole. The folder is written
as ``tokenizer.json`` + ``tokenizer_config.json`` with ``tokenizer_class:
PreTrainedTokenizerFast``, which every transformers release loads as it is (no class of its
own rebuilding it), and :func:`load_tokenizer` builds ``PreTrainedTokenizerFast`` from the file
directly.

:func:`check_tokenizer` runs at export and whenever a tokenizer is loaded: a fixed sentence
must give the known ids (reference models) or at least 2.5 characters per token (any other
model), and must decode back to itself; otherwise :class:`~cachegen.errors.ModelError`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ..errors import ModelError

__all__ = ["CHECK_SENTENCE", "EXPECTED_IDS", "TokenizerSpec", "build_tokenizer", "save_tokenizer",
           "load_tokenizer", "check_tokenizer", "tokenizer_versions"]

#: Plain English with digits, punctuation, a contraction and a double space.
CHECK_SENTENCE = "The quick brown fox jumps over the lazy dog; it's 2026, and  42 cats sleep."

#: The ids of :data:`CHECK_SENTENCE` (no special tokens), from this module's tokenizers (same on
#: transformers 5.17.0 and 5.24.0). Gemma-3: identical to transformers 5.24's GGUF route on this
#: sentence and on 5 long texts (GPL-3: 7,563 tokens). SmolLM2: 5.24's route differs only where
#: whitespace precedes a digit ("  42": it gives [216, 216, 36, 34], llama.cpp's smollm rule and
#: this module [256, 36, 34]); on a numeric table the model's NLL is 2.4 % lower with this
#: module's split, on prose and code equal.
EXPECTED_IDS: dict[str, tuple[int, ...]] = {
    "smollm2": (504, 2365, 6354, 16438, 27003, 690, 260, 23790, 2767, 43, 357, 506, 216, 34, 32, 34, 38,
                28, 284, 256, 36, 34, 7680, 2801, 30),
    "gemma3": (818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236793, 625, 236789, 236751, 236743,
               236778, 236771, 236778, 236825, 236764, 532, 138, 236812, 236778, 22797, 6745, 236761),
}

# A char-level tokenizer gives ~1 char/token; real BPE on English ~4-5.
MIN_CHARS_PER_TOKEN = 2.5

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4


@dataclass(frozen=True)
class TokenizerSpec:
    """What a tokenizer needs besides its ``tokenizer.json``."""
    bos_token: Optional[str]
    eos_token: Optional[str]
    unk_token: Optional[str]
    pad_token: Optional[str]
    add_bos: bool
    kind: str                     # "sentencepiece-bpe" | "byte-level-bpe"


def tokenizer_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("transformers", "tokenizers"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            out.append(f"{pkg} not installed")
    return ", ".join(out)


# ----------------------------------------------------------------------------------- GGUF -> tokenizers
def _gguf_tokenizer_fields(path: os.PathLike | str) -> dict[str, Any]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    out: dict[str, Any] = {}
    for key, field in r.fields.items():
        if key.startswith("tokenizer.ggml.") or key == "general.architecture":
            out[key] = field.contents()
    return out


def _merges_from_vocab(tokens: Sequence[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of every token into two vocabulary pieces, best first: tokens in file order,
    and within a token the longer left piece first (what transformers 5.24 derives)."""
    merges = []
    for tok in tokens:
        for i in range(len(tok) - 1, 0, -1):
            left, right = tok[:i], tok[i:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def build_tokenizer(gguf: os.PathLike | str):
    """``(tokenizers.Tokenizer, TokenizerSpec)`` for the tokenizer a GGUF file describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    f = _gguf_tokenizer_fields(gguf)
    kind = f.get("tokenizer.ggml.model")
    tokens = list(f["tokenizer.ggml.tokens"])
    types = list(f.get("tokenizer.ggml.token_type") or [1] * len(tokens))

    def special(key: str) -> Optional[str]:
        i = f.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos, unk, pad = (special(k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id",
                                                "padding_token_id"))
    if kind == "llama":
        # sentencepiece BPE (Gemma): the file spells a token of 2+ spaces with real spaces
        tokens = ["\u2581" * len(t) if (" " in t and not t.strip()) else t for t in tokens]
        vocab = {t: i for i, t in enumerate(tokens)}
        model = models.BPE(vocab=vocab, merges=_merges_from_vocab(tokens, vocab), unk_token=unk,
                           fuse_unk=True, byte_fallback=True, dropout=None)
        tk = Tokenizer(model)
        tk.normalizer = normalizers.Replace(" ", "\u2581")
        tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
        add_bos = bool(f.get("tokenizer.ggml.add_bos_token", True))
        spec_kind = "sentencepiece-bpe"
    elif kind == "gpt2":
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
        tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
        splits = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if f.get("tokenizer.ggml.pre") == "smollm":
            splits.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tk.pre_tokenizer = pre_tokenizers.Sequence(splits)
        tk.decoder = decoders.ByteLevel()
        tk.post_processor = processors.ByteLevel(trim_offsets=False)
        add_bos = bool(f.get("tokenizer.ggml.add_bos_token", False))
        spec_kind = "byte-level-bpe"
    else:
        raise ModelError(f"{gguf}: GGUF tokenizer model {kind!r} is not supported (llama, gpt2)")
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    tk.add_special_tokens(control)
    tk.add_tokens(user)
    if add_bos and bos is not None:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokens.index(bos))])
    if tk.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ModelError(f"{gguf}: tokenizer has {tk.get_vocab_size(with_added_tokens=True)} entries, "
                         f"the file {len(tokens)}")
    return tk, TokenizerSpec(bos, eos, unk, pad, add_bos, spec_kind)


def save_tokenizer(tk, spec: TokenizerSpec, out: os.PathLike | str) -> None:
    """Write ``tokenizer.json`` + a ``tokenizer_config.json`` that every transformers loads as is."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec.bos_token, "eos_token": spec.eos_token,
        "unk_token": spec.unk_token, "pad_token": spec.pad_token,
        "add_bos_token": spec.add_bos, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "cachegen_tokenizer": spec.kind,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    # an older folder's files would otherwise win over tokenizer.json in some releases
    for stale in ("tokenizer.model", "special_tokens_map.json"):
        try:
            (out / stale).unlink()
        except FileNotFoundError:
            pass


def load_tokenizer(folder: os.PathLike | str, model: Optional[str] = None, check: bool = True):
    """A ``transformers.PreTrainedTokenizerFast`` over ``folder/tokenizer.json`` (offline), checked
    with :func:`check_tokenizer` unless ``check=False``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(folder)
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if (folder / "tokenizer.json").is_file() and cfg.get("cachegen_tokenizer"):
        kw = {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)}
        tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                      clean_up_tokenization_spaces=False, **kw)
    else:  # a folder not written by us (another model's export)
        tok = AutoTokenizer.from_pretrained(str(folder))
    if check:
        check_tokenizer(tok, model, where=str(folder))
    return tok


# ----------------------------------------------------------------------------------- sanity check
def check_tokenizer(tok, model: Optional[str] = None, where: str = "") -> list[int]:
    """Raise :class:`ModelError` unless ``tok`` tokenizes :data:`CHECK_SENTENCE` sensibly.

    ``tok``: anything called like a transformers tokenizer (``tok(text, add_special_tokens=False)
    ["input_ids"]``, ``tok.decode(ids)``). For a reference model (``model`` in
    :data:`EXPECTED_IDS`) the ids must be exactly the known ones; otherwise at least
    :data:`MIN_CHARS_PER_TOKEN` characters per token. The ids must decode back to the sentence.
    Returns the ids.
    """
    at = f" ({where})" if where else ""
    try:
        ids = [int(i) for i in tok(CHECK_SENTENCE, add_special_tokens=False)["input_ids"]]
        back = tok.decode(ids, skip_special_tokens=True)
    except ModelError:
        raise
    except Exception as e:  # a broken tokenizer can fail in many ways; report them as one
        raise ModelError(f"tokenizer{at} failed on a test sentence: {type(e).__name__}: {e}") from e
    n = len(CHECK_SENTENCE)
    versions = tokenizer_versions()
    if not ids or n / len(ids) < MIN_CHARS_PER_TOKEN:
        raise ModelError(
            f"tokenizer{at} splits text into {len(ids)} tokens for {n} characters "
            f"({n / max(1, len(ids)):.2f} chars/token; char-level or broken) with {versions}; "
            f"re-export the model (cachegen export --force) and report these versions")
    want = EXPECTED_IDS.get(model or "")
    if want is not None and tuple(ids) != want:
        raise ModelError(
            f"{model} tokenizer{at} gives {len(ids)} ids {ids[:12]}... for the test sentence, "
            f"expected {len(want)} ids {list(want[:12])}... with {versions}; re-export the model "
            f"(cachegen export {model} --force)")
    if back != CHECK_SENTENCE:
        raise ModelError(f"tokenizer{at} does not round-trip: {CHECK_SENTENCE!r} -> {back!r} with {versions}")
    return ids
