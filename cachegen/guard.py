"""Quality guard: measure what a stored cache does to the model before storing it.

A lossy cache is only as good as the model's predictions from it. ``encode_guarded`` encodes a
cache, decodes it again (the real decoder, so what is measured is what a reader gets) and scores
a short *probe* with the exact and with the decoded cache on the caller's model: KL divergence
of the next-token distributions (exact || decoded), mean and max over the probe's positions,
and top-1 agreement. While the mean KL is over the budget (``max_kl``) it steps up to the next
preset of the ladder (``default`` -> ``high`` -> ``lossless`` by default; lossless is bit-exact,
so it always meets it). The figures go into the container as an ``EXT_QUALITY`` record (format
v2 JSON extension; ``cachegen.inspect(data)["extensions"]`` shows it), so a reader can see what
was measured, on what, and why this preset.

Probes (token ids the model reads after the cache):

* the tokens that follow the context (``probe_ids``), when the caller has them: the real use;
* or the context's own last tokens fed again after it (:meth:`Guard.from_context`): no extra
  text is needed, and re-reading them makes the model attend back to where they sit in the cache
  (copying), which is sensitive to exactly the errors a codec makes. Measured on the reference
  models, this probe's KL tracks the continuation's (benches/RESULTS.md, "Quality guard").

``runner``: anything with ``continue_from(kv, ids) -> (logits [1, T, V], kv)`` (``OrtRunner``, the
store's runner protocol); logits may be numpy or torch.

    from cachegen.guard import Guard
    g = Guard.from_context(runner, context_ids, max_kl=0.01)
    cachegen.save("ctx.cgk", kv, "default", guard=g)        # steps up if "default" is not good enough
    res = g.encode(kv, "small"); res.config, res.kl_mean, res.steps
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

from .config import CodecConfig, get_config
from .errors import ConfigError, InputError

__all__ = ["Guard", "GuardResult", "GuardStep", "encode_guarded", "with_extensions", "quality_record",
           "DEFAULT_LADDER"]

DEFAULT_LADDER = ("default", "high", "lossless")
QUALITY_SCHEMA = "cachegen.guard/1"


@dataclass
class GuardStep:
    """One preset tried: its size and what it did to the probe."""
    config: str
    bytes: int
    kl_mean: float
    kl_max: float
    top1: float
    passed: bool
    measured: bool            # False for lossless (bit-exact: KL 0 without running the model)
    encode_s: float
    check_s: float            # decode + probe with the decoded cache


@dataclass
class GuardResult:
    data: bytes                       # the container, with its EXT_QUALITY record
    config: str                       # the preset stored
    met: bool                         # the budget holds for the stored preset
    kl_mean: float
    kl_max: float
    top1: float
    probe_tokens: int
    probe_kind: str
    max_kl: float
    steps: list[GuardStep] = field(default_factory=list)
    reference_s: float = 0.0          # the exact cache's probe (once)

    @property
    def stepped_up(self) -> int:
        return len(self.steps) - 1

    @property
    def encode_s(self) -> float:
        """Encode time of the stored preset alone (what an unguarded save would spend)."""
        return self.steps[-1].encode_s

    @property
    def guard_s(self) -> float:
        """Everything the guard adds to an unguarded encode of the stored preset."""
        return self.reference_s + sum(s.check_s for s in self.steps) + sum(s.encode_s for s in self.steps[:-1])

    def record(self) -> dict:
        return quality_record(self)


def _name(cfg: Union[str, CodecConfig]) -> str:
    return cfg if isinstance(cfg, str) else getattr(cfg, "name", None) or "custom"


def _ladder(start: Union[str, CodecConfig, None], presets: Sequence[Union[str, CodecConfig]]) -> list:
    """``start`` first, then the presets after it in ``presets`` (all of them if it is not one)."""
    presets = list(presets)
    if not presets and start is None:
        raise ConfigError("the guard needs at least one preset")
    if start is None:
        return presets
    names = [_name(p) for p in presets]
    n = _name(start)
    if n in names:
        return [start] + presets[names.index(n) + 1:]
    return [start] + presets


def _logits_np(x) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == 3:
        a = a[0]
    if a.ndim != 2:
        raise InputError(f"runner returned logits of shape {a.shape}, expected [1, T, V] or [T, V]")
    return a


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _compare(lp_ref: np.ndarray, logits: np.ndarray) -> tuple[float, float, float]:
    lp = _log_softmax(logits)
    kl = np.maximum((np.exp(lp_ref) * (lp_ref - lp)).sum(-1), 0.0)
    top1 = float((lp_ref.argmax(-1) == lp.argmax(-1)).mean())
    if not np.all(np.isfinite(kl)):
        return math.inf, math.inf, top1
    return float(kl.mean()), float(kl.max()), top1


def _encode_keep(kv: Any, cfg: CodecConfig, progress: Any = None) -> tuple[bytes, Any, list]:
    """``cachegen.encode(kv, cfg)`` (format v2, lossy), keeping pass 1's results for
    :func:`_reconstruct`: the cache a decoder will rebuild from the container.

    The same steps as ``codec.encoder.encode_lossy_v2``; the decoded values are computed from
    pass 1's indices and parameters (what the decoder's rANS streams hand back), so the guard
    need not entropy-decode the container (on the 2-core CPU, decoding costs ~50 % of encoding).
    tests/test_guard.py checks the bytes equal ``cachegen.encode`` and the values equal
    ``cachegen.decode`` bit for bit; at run time one chunk is decoded for real and compared.
    """
    from .api import _check_decodable
    from .codec import encoder as E
    from .codec.layout import describe, host_array
    from .codec.parallel import parallel_map, worker_count
    from .format import v2 as fmt2
    from .format.container import MODE_LOSSY, LayerInfo

    infos, batch, dtype = describe(kv)
    kbits, vbits = cfg.layer_bits(len(infos))
    infos = [LayerInfo(l.tokens, l.k_heads, l.k_dim, l.v_heads, l.v_dim, kb, vb)
             for l, kb, vb in zip(infos, kbits, vbits)]
    table_bits = int(getattr(cfg, "table_bits", 12))
    h = fmt2.HeaderV2(mode=MODE_LOSSY, dtype=dtype, batch=batch, chunk_tokens=cfg.chunk_tokens, layers=infos,
                      group_size=cfg.group_size, channels_per_stream=cfg.channels_per_stream,
                      token_scaling=int(bool(cfg.token_scaling)), table_bits=table_bits)
    need = max(max(kbits), max(vbits)) + (1 if cfg.group_size > 1 else 0)
    if need > table_bits:
        raise InputError(f"{need}-bit alphabets need table_bits >= {need} (config has {table_bits})")
    hosts = [tuple(host_array(t) for t in pair) for pair in kv]
    h.param_dtype = 1
    outs = parallel_map(E._quantize_layer, (hosts, h, cfg, 1), range(len(infos)), 1)
    if max(r["max_abs"] for r in outs) >= E.quantize.FP16_SAFE:
        h.param_dtype = 2
        outs = parallel_map(E._quantize_layer, (hosts, h, cfg, 2), range(len(infos)), 1)
    shared = all(p[1].size == 0 or bool(np.all(p[1] == p[1][0])) for r in outs for p in r["params"].values())
    h.step_mode = 1 if shared else 0
    units, h.table_ids = E._build_tables(h, outs, lambda H: E._fit_tables_v2(H, cfg.tables_per_class, table_bits))
    h.alphabets = np.array([u.size for u in units], dtype=np.int64)
    h.units = np.concatenate(units).astype(np.uint16)
    freqs = [u.astype(np.int64) << (24 - table_bits) for u in units]
    n2 = worker_count(h.decoded_bytes(), h.n_chunks)
    chunks: list = []
    step = max(n2, 1) * 2
    for start in range(0, h.n_chunks, step):
        ks = range(start, min(start + step, h.n_chunks))
        chunks.extend(parallel_map(E._code_chunk_v2, (h, outs, freqs), ks, min(n2, len(ks))))
        if progress:
            progress(len(chunks), h.n_chunks)
    return _check_decodable(fmt2.build_container(h, chunks)), h, outs


def _reconstruct(h: Any, outs: list) -> list:
    from .codec import grouping
    from .format.tables import TOKEN_SCALES

    batch = h.batch
    # the decoder's values: fl32(fl32(fl32(step * q) + lo) * token_scale), per chunk
    C = h.chunk_tokens
    restored = []
    for i, l in enumerate(h.layers):
        pair = []
        for kvi in (0, 1):
            heads, dim = l.heads_dim(kvi)
            # written straight in the runner's layout [B, H, T, D] (contiguous: bound without a copy)
            x = np.empty((batch, heads, l.tokens, dim), dtype=np.float32)
            levels = 1 << l.bits(kvi)
            for k in range(h.n_chunks):
                n = min(C, l.tokens - k * C)
                if n <= 0:
                    break
                lo, st = outs[i]["params"][kvi, k]
                a, d = outs[i]["symbols"][kvi, k]
                q = grouping.join(a, d, batch, n, h.group_size, levels)
                xk = q.astype(np.float32)
                st32 = st.astype(np.float32)
                xk *= (st32[:1] if h.step_mode == 1 else st32).reshape(-1, 1, 1)
                xk += lo.astype(np.float32).reshape(-1, 1, 1)
                if h.token_scaling:
                    xk *= TOKEN_SCALES[outs[i]["exps"][kvi, k]].reshape(1, batch, n)
                x[:, :, k * C:k * C + n, :] = xk.reshape(heads, dim, batch, n).transpose(2, 0, 3, 1)
            pair.append(x)
        restored.append(tuple(pair))
    return restored


def _spot_check(data: bytes, restored: list, k: Optional[int] = None, blocks: Optional[int] = 8) -> None:
    """Decode the first ``blocks`` (layer, K/V) blocks of chunk ``k`` (default: the last; all blocks
    with ``blocks=None``) with the real CPU decoder; they must equal ``restored``. A drift of the
    encoder away from this module's copy of its steps shows in any block, so a few suffice."""
    import itertools

    from .codec.decoder_v2 import decode_chunk
    from .format import v2 as fmt2

    c = fmt2.parse_container(data)
    k = c.n_chunks - 1 if k is None else k
    C = c.header.chunk_tokens
    for i, kvi, _k, n, x in itertools.islice(decode_chunk(c, k), blocks):
        mine = restored[i][kvi][:, :, k * C:k * C + n, :]
        if not np.array_equal(mine.view(np.uint32), np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)):
            raise RuntimeError(f"guard: reconstructed cache differs from the decoder (layer {i}, chunk {k}); "
                               "the encoder changed: use check='decode'")


def with_extensions(data: bytes, extensions: Sequence[Any]) -> bytes:
    """The same v2 container with its extension records replaced (chunks copied unchanged, so it
    decodes to exactly the same cache); cheaper than encoding again."""
    from .format import v2 as fmt2

    if fmt2.peek_version(data) != 2:
        raise InputError("only format v2 containers carry extension records")
    c = fmt2.parse_container(data)
    c.header.extensions = list(extensions)
    chunks = [(bytes(c.chunk_bytes(k, verify=False)), int(c.index[k]["meta_size"])) for k in range(c.n_chunks)]
    return fmt2.build_container(c.header, chunks)


def quality_record(res: GuardResult) -> dict:
    """The EXT_QUALITY JSON payload for a guarded container."""
    def fin(x: float) -> Optional[float]:
        return None if not math.isfinite(x) else float(f"{float(x):.6g}")

    return {
        "schema": QUALITY_SCHEMA,
        "config": res.config,
        "met": res.met,
        "max_kl": res.max_kl,
        "kl_mean": fin(res.kl_mean),
        "kl_max": fin(res.kl_max),
        "top1": round(res.top1, 6),
        "probe": {"kind": res.probe_kind, "tokens": res.probe_tokens},
        "steps": [{"config": s.config, "bytes": s.bytes, "kl_mean": fin(s.kl_mean), "kl_max": fin(s.kl_max),
                   "top1": round(s.top1, 6), "passed": s.passed, "measured": s.measured} for s in res.steps],
    }


@dataclass
class Guard:
    """A quality budget and the probe to check it with (see the module docstring)."""
    runner: Any
    probe_ids: Sequence[int]
    max_kl: float = 0.01
    presets: Sequence[Union[str, CodecConfig]] = DEFAULT_LADDER
    probe_kind: str = "continuation"
    #: "fast": the decoded cache is rebuilt from the encoder's own indices (one chunk decoded
    #: for real as a check); "decode": the whole container is decoded (slower, no shortcut)
    check: str = "fast"
    meta: dict = field(default_factory=dict)      # extra JSON recorded with the figures (e.g. the model)

    def __post_init__(self) -> None:
        ids = [int(t) for t in np.asarray(self.probe_ids).reshape(-1)]
        if not ids:
            raise InputError("the guard's probe needs at least one token")
        self.probe_ids = ids
        if not (isinstance(self.max_kl, (int, float)) and math.isfinite(self.max_kl) and self.max_kl >= 0):
            raise ConfigError(f"max_kl must be a finite number >= 0, got {self.max_kl!r}")
        if self.check not in ("fast", "decode"):
            raise ConfigError(f"check must be 'fast' or 'decode', got {self.check!r}")
        if not hasattr(self.runner, "continue_from"):
            raise InputError("the guard's runner needs continue_from(kv, ids) -> (logits, kv)")
        for p in self.presets:
            get_config(p)

    @classmethod
    def from_context(cls, runner: Any, context_ids: Sequence[int], probe_tokens: int = 32, **kw: Any) -> "Guard":
        """Probe with the context's own last ``probe_tokens`` tokens, fed again after the cache."""
        ids = [int(t) for t in np.asarray(context_ids).reshape(-1)]
        n = min(int(probe_tokens), len(ids))
        if n < 1:
            raise InputError("the context has no tokens to probe with")
        return cls(runner, ids[-n:], probe_kind="context_tail", **kw)

    def probe_digest(self) -> str:
        return hashlib.sha1(np.asarray(self.probe_ids, dtype=np.int64).tobytes()).hexdigest()[:16]

    def encode(self, kv: Any, config: Union[str, CodecConfig, None] = None, extensions: Sequence[Any] = (),
               progress: Any = None) -> GuardResult:
        return encode_guarded(kv, self, config=config, extensions=extensions, progress=progress)


def encode_guarded(kv: Any, guard: Guard, config: Union[str, CodecConfig, None] = None,
                   extensions: Sequence[Any] = (), progress: Any = None) -> GuardResult:
    """Encode ``kv`` at the first preset of the ladder (``config``, then ``guard.presets`` after it)
    whose decoded cache keeps the probe's mean KL within ``guard.max_kl``; returns the container
    with an EXT_QUALITY record of the figures. If no preset meets the budget (a ladder without
    lossless), the last one is stored and ``met`` is False."""
    import cachegen
    from .format.extensions import EXT_QUALITY, Extension

    ladder = _ladder(config, guard.presets)
    t0 = time.perf_counter()
    ref_logits, _ = guard.runner.continue_from(kv, guard.probe_ids)
    lp_ref = _log_softmax(_logits_np(ref_logits))
    reference_s = time.perf_counter() - t0
    steps: list[GuardStep] = []
    data = b""
    for i, p in enumerate(ladder):
        cfg = get_config(p)
        fast = guard.check == "fast" and not cfg.lossless
        t0 = time.perf_counter()
        if fast:
            data, h, outs = _encode_keep(kv, cfg, progress)
        else:
            data = cachegen.encode(kv, cfg, progress)
        enc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if cfg.lossless:       # bit-exact by construction (checked by the codec's tests)
            klm, klx, top1, measured = 0.0, 0.0, 1.0, False
        else:
            if fast:
                restored = _reconstruct(h, outs)
                del outs
                _spot_check(data, restored)
            else:
                restored = cachegen.decode(data, "cpu")
            lg, _ = guard.runner.continue_from(restored, guard.probe_ids)
            klm, klx, top1 = _compare(lp_ref, _logits_np(lg))
            measured = True
        passed = klm <= guard.max_kl
        steps.append(GuardStep(_name(p) if isinstance(p, str) else cfg.name, len(data), klm, klx, top1, passed,
                               measured, enc_s, time.perf_counter() - t0))
        if passed:
            break
    last = steps[-1]
    res = GuardResult(data=b"", config=last.config, met=last.passed, kl_mean=last.kl_mean, kl_max=last.kl_max,
                      top1=last.top1, probe_tokens=len(guard.probe_ids), probe_kind=guard.probe_kind,
                      max_kl=float(guard.max_kl), steps=steps, reference_s=reference_s)
    rec = quality_record(res)
    rec["probe"]["sha1"] = guard.probe_digest()
    if guard.meta:
        rec["meta"] = dict(guard.meta)
    t0 = time.perf_counter()
    exts = [e for e in extensions if getattr(e, "kind", None) != EXT_QUALITY]
    res.data = with_extensions(data, exts + [Extension.json(EXT_QUALITY, rec)])
    steps[-1].check_s += time.perf_counter() - t0
    return res


def step_counts(results: Sequence[GuardResult]) -> dict:
    """How often a batch of guarded encodes stepped up, and to what (for reports)."""
    out: dict = {"n": len(results), "stepped_up": 0, "stored": {}}
    for r in results:
        out["stepped_up"] += r.stepped_up > 0
        out["stored"][r.config] = out["stored"].get(r.config, 0) + 1
    return out


def result_dict(res: GuardResult) -> dict:
    d = asdict(res)
    d.pop("data")
    d["bytes"] = len(res.data)
    return d


@dataclass
class GuardPolicy:
    """A guard without its probe, for callers that have the context's tokens at hand (the store):
    :meth:`for_context` makes the :class:`Guard` with the context's last ``probe_tokens``."""
    runner: Any
    max_kl: float = 0.01
    presets: Sequence[Union[str, CodecConfig]] = DEFAULT_LADDER
    probe_tokens: int = 32
    check: str = "fast"

    def for_context(self, context_ids: Sequence[int]) -> Guard:
        return Guard.from_context(self.runner, context_ids, self.probe_tokens, max_kl=self.max_kl,
                                  presets=self.presets, check=self.check)


def guard_chunks(policy: GuardPolicy, tokens: Sequence[int], kv: Any, chunk_tokens: int, start_chunk: int,
                 n_chunks: int, level: str) -> tuple[str, dict[int, bytes], GuardResult]:
    """The store's guarded write: chunks ``start_chunk..n_chunks-1`` of ``kv`` are encoded one by
    one (one container each) at ``level``, then the next preset of the ladder, until the whole
    prefix cache (chunks before ``start_chunk`` as given, the new ones as a reader will decode
    them) keeps the probe (the prefix's last tokens, fed again) within the budget.

    Returns ``(level stored, {chunk: container with its EXT_QUALITY record}, result)``."""
    from .format.extensions import EXT_QUALITY, Extension

    C = int(chunk_tokens)
    end = n_chunks * C
    ids = [int(t) for t in np.asarray(tokens).reshape(-1)[:end]]
    g = policy.for_context(ids)

    def cut(x, a, b):
        return x[:, :, a:b]

    prefix = [(cut(k, 0, end), cut(v, 0, end)) for k, v in kv]
    t0 = time.perf_counter()
    lp_ref = _log_softmax(_logits_np(g.runner.continue_from(prefix, g.probe_ids)[0]))
    reference_s = time.perf_counter() - t0
    steps: list[GuardStep] = []
    payloads: dict[int, bytes] = {}
    for p in _ladder(level, g.presets):
        cfg = get_config(p)
        payloads = {}
        t0 = time.perf_counter()
        keep = {}
        for k in range(start_chunk, n_chunks):
            chunk = [(cut(kk, k * C, (k + 1) * C), cut(vv, k * C, (k + 1) * C)) for kk, vv in prefix]
            if cfg.lossless:
                import cachegen
                payloads[k] = cachegen.encode(chunk, cfg)
            else:
                payloads[k], h, outs = _encode_keep(chunk, cfg)
                keep[k] = (h, outs)
        enc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if cfg.lossless:
            klm, klx, top1, measured = 0.0, 0.0, 1.0, False
        else:
            restored = []
            recs = {k: _reconstruct(*keep[k]) for k in keep}
            last = max(recs)
            _spot_check(payloads[last], recs[last])
            for i, (kk, vv) in enumerate(prefix):
                parts_k = [np.asarray(cut(kk, 0, start_chunk * C), dtype=np.float32)]
                parts_v = [np.asarray(cut(vv, 0, start_chunk * C), dtype=np.float32)]
                for k in range(start_chunk, n_chunks):
                    parts_k.append(recs[k][i][0])
                    parts_v.append(recs[k][i][1])
                restored.append((np.concatenate(parts_k, 2), np.concatenate(parts_v, 2)))
            klm, klx, top1 = _compare(lp_ref, _logits_np(g.runner.continue_from(restored, g.probe_ids)[0]))
            measured = True
        steps.append(GuardStep(p if isinstance(p, str) else cfg.name, sum(len(x) for x in payloads.values()),
                               klm, klx, top1, klm <= g.max_kl, measured, enc_s, time.perf_counter() - t0))
        if steps[-1].passed:
            break
    last_step = steps[-1]
    res = GuardResult(data=b"", config=last_step.config, met=last_step.passed, kl_mean=last_step.kl_mean,
                      kl_max=last_step.kl_max, top1=last_step.top1, probe_tokens=len(g.probe_ids),
                      probe_kind="context_tail", max_kl=float(g.max_kl), steps=steps, reference_s=reference_s)
    rec = quality_record(res)
    rec["probe"]["sha1"] = g.probe_digest()
    rec["scope"] = {"chunks": [start_chunk, n_chunks], "chunk_tokens": C}
    ext = Extension.json(EXT_QUALITY, rec)
    return last_step.config, {k: with_extensions(d, [ext]) for k, d in payloads.items()}, res
