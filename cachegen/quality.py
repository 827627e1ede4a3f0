"""Quality of a KV-cache codec measured on a real model.

The context is prefilled once; its cache goes through the codec (or any ``kv -> kv`` callable)
and both the original and the restored cache are then used to

* score a continuation teacher-forced: perplexity of the continuation, KL divergence between
  the next-token distributions (original || restored) at every position, top-1 agreement;
* generate greedily: are the generated tokens identical, and how long is the common prefix?

    from cachegen.ort import export_model, OrtRunner
    from cachegen.quality import evaluate
    runner = OrtRunner(export_model("smollm2"))
    report = evaluate(runner, text, config="default")      # cachegen.encode / cachegen.decode
    report = evaluate(runner, text, lambda kv: my_round_trip(kv))
    print(report.summary())

Convention: the cache covers ``context`` (C tokens); the continuation ``x_0..x_{N-1}`` is fed
after it, and logits after ``x_i`` predict ``x_{i+1}``, so N-1 positions are scored (the
prediction of ``x_0`` comes from the prefill, which the codec does not touch). Greedy
generation feeds ``x_0`` after the cache and decodes ``generate_tokens`` tokens.
"""
from __future__ import annotations

from .errors import InputError

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Union

import numpy as np

__all__ = ["QualityReport", "evaluate", "evaluate_kv", "compare_logits", "log_softmax",
           "int8_round_trip", "identity_round_trip"]


@dataclass
class QualityReport:
    ppl_original: float
    ppl_restored: float
    delta_ppl_rel: float                 # (ppl_restored - ppl_original) / ppl_original
    kl_mean: float                       # mean over positions of KL(P_orig || P_restored), nats
    kl_max: float
    top1_agreement: float                # fraction of positions with the same argmax
    greedy_identical: bool
    greedy_match_prefix_len: int         # tokens generated identically before the first difference
    context_tokens: int = 0
    continuation_tokens: int = 0         # scored positions + 1
    generate_tokens: int = 0
    generated_original: List[int] = field(default_factory=list)
    generated_restored: List[int] = field(default_factory=list)
    config: Optional[str] = None
    fp16_bytes: Optional[int] = None     # the cache stored as fp16
    compressed_bytes: Optional[int] = None
    ratio: Optional[float] = None        # fp16_bytes / compressed_bytes
    encode_s: Optional[float] = None
    decode_s: Optional[float] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"context {self.context_tokens} tokens, continuation {self.continuation_tokens}, "
            f"greedy {self.generate_tokens}" + (f", config {self.config}" if self.config else ""),
            f"perplexity   original {self.ppl_original:.4f}  restored {self.ppl_restored:.4f}  "
            f"(rel. change {100 * self.delta_ppl_rel:+.3f}%)",
            f"KL(orig||restored)  mean {self.kl_mean:.2e}  max {self.kl_max:.2e} nats;  "
            f"top-1 agreement {100 * self.top1_agreement:.2f}%",
            f"greedy generation  identical: {self.greedy_identical}  "
            f"(common prefix {self.greedy_match_prefix_len}/{len(self.generated_original)})",
        ]
        if self.compressed_bytes is not None:
            lines.append(f"size  fp16 {self.fp16_bytes} B -> {self.compressed_bytes} B "
                         f"({self.ratio:.2f}x)")
        if self.encode_s is not None:
            lines.append(f"time  encode {self.encode_s * 1e3:.1f} ms  decode {self.decode_s * 1e3:.1f} ms")
        return "\n".join(lines)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def compare_logits(lo: np.ndarray, lr: np.ndarray, targets: Optional[Sequence[int]] = None) -> dict:
    """Compare two ``[N, V]`` logit arrays (original, restored).

    Returns kl (per position, nats), top1 agreement and, given ``targets`` (length N), the
    negative log-likelihoods of the targets under both.
    """
    lpo, lpr = log_softmax(lo), log_softmax(lr)
    kl = (np.exp(lpo) * (lpo - lpr)).sum(-1)
    kl = np.maximum(kl, 0.0)  # rounding can give -1e-17
    out = {"kl": kl, "top1": float((lo.argmax(-1) == lr.argmax(-1)).mean()) if len(lo) else 1.0}
    if targets is not None:
        t = np.asarray(targets, dtype=np.int64)
        idx = np.arange(len(t))
        out["nll_original"] = -lpo[idx, t]
        out["nll_restored"] = -lpr[idx, t]
    return out


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def identity_round_trip(kv):
    return kv


def int8_round_trip(kv):
    """A simple stand-in codec: symmetric int8 per (layer, token), like LMCache's absmax."""
    out = []
    for k, v in kv:
        pair = []
        for x in (k, v):
            a = _to_numpy(x).astype(np.float32)
            s = np.abs(a).max(axis=(1, 3), keepdims=True) / 127.0
            s[s == 0] = 1.0
            pair.append((np.round(a / s).clip(-127, 127) * s).astype(np.float32))
        out.append(tuple(pair))
    return out


def _to_numpy(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def evaluate_kv(runner, kv, restored, continuation_ids: Sequence[int], generate_tokens: int = 64
                ) -> QualityReport:
    """Compare an original cache and its restored version (see module docstring)."""
    cont = [int(t) for t in continuation_ids]
    if len(cont) < 2:
        raise InputError("the continuation needs at least 2 tokens")
    lo = runner.score(kv, cont)
    lr = runner.score(restored, cont)
    cmp = compare_logits(lo[:-1], lr[:-1], cont[1:])
    ppl_o = float(math.exp(cmp["nll_original"].mean()))
    ppl_r = float(math.exp(cmp["nll_restored"].mean()))
    gen_o: List[int] = []
    gen_r: List[int] = []
    if generate_tokens > 0:
        gen_o = runner.generate(cont[:1], generate_tokens, kv=kv, stop_at_eos=False)
        gen_r = runner.generate(cont[:1], generate_tokens, kv=restored, stop_at_eos=False)
    pref = _common_prefix(gen_o, gen_r)
    return QualityReport(
        ppl_original=ppl_o,
        ppl_restored=ppl_r,
        delta_ppl_rel=(ppl_r - ppl_o) / ppl_o,
        kl_mean=float(cmp["kl"].mean()),
        kl_max=float(cmp["kl"].max()),
        top1_agreement=cmp["top1"],
        greedy_identical=(gen_o == gen_r),
        greedy_match_prefix_len=pref,
        context_tokens=int(runner.kv_length(kv)),
        continuation_tokens=len(cont),
        generate_tokens=int(generate_tokens),
        generated_original=gen_o,
        generated_restored=gen_r,
    )


def evaluate(runner, text_or_ids: Union[str, Sequence[int]],
             codec_round_trip: Optional[Callable[[Any], Any]] = None,
             context_tokens: int = 1024, continuation_tokens: int = 128, generate_tokens: int = 64,
             *, config: Any = None, trim_window: bool = False,
             compressed_bytes: Optional[int] = None) -> QualityReport:
    """Measure the quality loss of a KV-cache round trip on ``runner``'s model.

    ``text_or_ids``: text (tokenized by the runner; BOS added for Gemma-3) or token ids; it
    must hold ``context_tokens + continuation_tokens`` tokens (the context shrinks to fit if
    the text is shorter). Give either ``codec_round_trip`` (``kv -> kv``) or ``config`` (a
    preset name or ``CodecConfig``: ``cachegen.encode`` + ``cachegen.decode`` are used and
    sizes/times are reported). ``trim_window=True`` hands the codec the cache with its
    sliding-window layers trimmed to their window (Gemma-3), which is all the model needs.
    """
    if (codec_round_trip is None) == (config is None):
        if codec_round_trip is None:
            config = "default"
        else:
            raise InputError("give either codec_round_trip or config, not both")
    ids = runner.encode(text_or_ids) if isinstance(text_or_ids, str) else [int(t) for t in text_or_ids]
    n_cont = int(continuation_tokens)
    if len(ids) < n_cont + 2:
        raise InputError(f"need more than {n_cont + 2} tokens, got {len(ids)}")
    n_ctx = min(int(context_tokens), len(ids) - n_cont)
    ctx, cont = ids[:n_ctx], ids[n_ctx:n_ctx + n_cont]

    _, kv = runner.prefill(ctx)
    if trim_window:
        kv = runner.window_kv(kv)
    enc_s = dec_s = None
    name = None
    nbytes = compressed_bytes
    if config is not None:
        import cachegen

        t0 = time.perf_counter()
        data = cachegen.encode(kv, config)
        enc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        restored = cachegen.decode(data, device="cpu")
        dec_s = time.perf_counter() - t0
        nbytes = len(data)
        name = config if isinstance(config, str) else getattr(config, "name", str(config))
    else:
        restored = codec_round_trip(kv)
    rep = evaluate_kv(runner, kv, restored, cont, generate_tokens)
    rep.context_tokens = n_ctx
    rep.config = name
    rep.encode_s, rep.decode_s = enc_s, dec_s
    rep.fp16_bytes = runner.kv_nbytes_fp16(kv)
    if nbytes is not None:
        rep.compressed_bytes = int(nbytes)
        rep.ratio = rep.fp16_bytes / max(1, int(nbytes))
    return rep


# ------------------------------------------------------------------ held-out text and greedy rates

def eval_texts() -> dict:
    """Held-out evaluation texts that ship with Python and with our dependencies (no hub, no
    demo text): name -> ``(text, source)``. Missing sources are left out."""
    import importlib.util
    from pathlib import Path

    out: dict = {}
    try:
        import pydoc_data.topics as topics      # the Python language reference, as prose

        keys = sorted(topics.topics)
        half = len(keys) // 2
        out["pydocs-a"] = ("\n\n".join(topics.topics[k] for k in keys[:half]), "pydoc_data.topics (first half)")
        out["pydocs-b"] = ("\n\n".join(topics.topics[k] for k in keys[half:]), "pydoc_data.topics (second half)")
    except ImportError:
        pass
    spec = importlib.util.find_spec("onnxruntime")
    if spec is not None and spec.origin:
        p = Path(spec.origin).parent / "ThirdPartyNotices.txt"   # licence prose shipped with onnxruntime
        if p.is_file():
            out["ort-notices"] = (p.read_text(errors="replace"), "onnxruntime/ThirdPartyNotices.txt")
    for mod in ("argparse", "difflib"):
        s = importlib.util.find_spec(mod)
        if s is not None and s.origin:
            out[f"code-{mod}"] = (Path(s.origin).read_text(), f"Python stdlib {mod}.py")
    return out


def text_windows(ids: Sequence[int], length: int, count: int, bos: Optional[int] = None) -> List[List[int]]:
    """``count`` windows of ``length`` tokens spread evenly over ``ids`` (non-overlapping where the
    text is long enough); ``bos`` is put in front of each window that does not start the text."""
    ids = [int(t) for t in ids]
    body = length - (1 if bos is not None else 0)
    if len(ids) < length:
        return []
    starts = np.linspace(0, len(ids) - length, num=count).astype(int) if count > 1 else [0]
    out = []
    for s in starts:
        if bos is None:
            out.append(ids[s:s + length])
        elif ids[s] == bos:                     # the text's own start
            out.append(ids[s:s + length])
        else:
            out.append([bos] + ids[s:s + body])
    return [w for w in out if len(w) == length]


@dataclass
class Divergence:
    """Where a greedy continuation from the restored cache first differs from the original's."""
    position: int                 # index in the generated tokens
    original_token: int
    restored_token: int
    original_top2: List[Any]      # [(token, prob), (token, prob)] of the original cache at that step
    restored_top2: List[Any]
    margin: float                 # original p(top1) - p(top2): a near-tie when small

    def explain(self, decode: Optional[Callable[[List[int]], str]] = None) -> str:
        def tok(t: int) -> str:
            return repr(decode([t])) if decode else str(t)

        (a, pa), (b, pb) = self.original_top2
        (c, pc), (d, pd) = self.restored_top2
        kind = "a near-tie" if self.margin < 0.1 else "not a near-tie"
        return (f"diverged at generated token {self.position}: the original cache's top two were {tok(a)} "
                f"p={pa:.3f} and {tok(b)} p={pb:.3f} (margin {self.margin:.3f}, {kind}); the restored "
                f"cache's {tok(c)} p={pc:.3f} and {tok(d)} p={pd:.3f}")


def _top2(logits: np.ndarray) -> List[Any]:
    lp = log_softmax(logits)
    idx = np.argsort(-lp)[:2]
    return [(int(i), float(np.exp(lp[i]))) for i in idx]


def find_divergence(runner, kv, restored, prompt_ids: Sequence[int], gen_o: Sequence[int],
                    gen_r: Sequence[int]) -> Optional[Divergence]:
    """Both caches' next-token distributions where two greedy continuations (after feeding
    ``prompt_ids``) first differ; None when they do not."""
    n = _common_prefix(gen_o, gen_r)
    if n >= min(len(gen_o), len(gen_r)):
        return None
    feed = [int(t) for t in prompt_ids] + [int(t) for t in gen_o[:n]]
    lo = runner.continue_from(kv, feed)[0]
    lr = runner.continue_from(restored, feed)[0]
    lo = np.asarray(lo if not type(lo).__module__.startswith("torch") else lo.float().cpu().numpy())[0, -1]
    lr = np.asarray(lr if not type(lr).__module__.startswith("torch") else lr.float().cpu().numpy())[0, -1]
    to, tr = _top2(lo), _top2(lr)
    return Divergence(n, int(gen_o[n]), int(gen_r[n]), to, tr, to[0][1] - to[1][1])


@dataclass
class GreedyStats:
    """Greedy agreement over many prompts: a rate, not one anecdote."""
    prompts: int
    tokens_per_prompt: int
    identical: int                    # prompts whose continuations are identical
    agreement: float                  # mean over prompts of (common prefix length / tokens)
    divergences: List[Divergence] = field(default_factory=list)
    # mean over prompts of the fraction of the ``tokens`` positions holding the same token in
    # both continuations (a position missing from either, e.g. after an EOS stop, disagrees);
    # unlike ``agreement`` it keeps counting after the first difference. None: not computed.
    token_agreement: Optional[float] = None

    @property
    def identical_rate(self) -> float:
        return self.identical / max(1, self.prompts)

    def summary(self) -> str:
        s = (f"greedy agreement {100 * self.agreement:.1f}% of {self.tokens_per_prompt}-token continuations "
             f"({self.identical}/{self.prompts} identical")
        if self.token_agreement is not None:
            s += f", {100 * self.token_agreement:.1f}% of positions agree"
        s += ")"
        if self.divergences:
            near = sum(d.margin < 0.1 for d in self.divergences)
            s += (f"; {near}/{len(self.divergences)} divergences at near-ties (original top-2 margin < 0.1, "
                  f"median margin {float(np.median([d.margin for d in self.divergences])):.3f})")
        return s


def greedy_stats(pairs: Sequence[tuple], tokens: int) -> GreedyStats:
    """``pairs``: ``(generated_original, generated_restored, divergence or None)`` per prompt."""
    agree = [_common_prefix(o, r) / max(1, tokens) for o, r, _ in pairs]
    pos = [position_agreement(o, r, tokens) for o, r, _ in pairs]
    return GreedyStats(len(pairs), tokens, sum(list(o) == list(r) for o, r, _ in pairs),
                       float(np.mean(agree)) if agree else 1.0, [d for _, _, d in pairs if d is not None],
                       float(np.mean(pos)) if pos else 1.0)


def position_agreement(a: Sequence[int], b: Sequence[int], tokens: Optional[int] = None) -> float:
    """Fraction of the first ``tokens`` positions (default: the longer sequence's length) where
    ``a`` and ``b`` hold the same token; a position that only one of them reaches disagrees."""
    n = max(len(a), len(b)) if tokens is None else int(tokens)
    if n <= 0:
        return 1.0
    same = sum(int(x) == int(y) for x, y in zip(list(a)[:n], list(b)[:n]))
    return same / n
