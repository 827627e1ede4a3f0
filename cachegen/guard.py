"""Quality guard: measure what a stored cache does to the model before storing it.

A lossy cache is only as good as the model's predictions from it. ``encode_guarded`` quantizes a
cache, rebuilds the values a decoder will return and scores a short *probe* with the exact and
with the decoded cache on the caller's model: KL divergence of the next-token distributions
(exact || decoded), mean and max over the probe's positions, and top-1 agreement. While the mean
KL is over the budget (``max_kl``) it steps up to the next preset of the ladder (``default`` ->
``fine`` -> ``high`` -> ``lossless`` by default; lossless is bit-exact, so it always meets
it). The figures go into the container as an ``EXT_QUALITY`` record (format v2 JSON extension;
``cachegen.inspect(data)["extensions"]`` shows it), so a reader can see what was measured, on
what, and why this preset.

What it costs (``check="fast"``, the default): the exact cache's probe once; per preset tried,
pass 1 of the encoder (quantization: the decoded values follow from it), the rebuild and one
probe run; only the preset kept is entropy-coded, and one set of its blocks is then decoded by
the real decoder and compared bit for bit with what was measured. With ``overlap`` (default) the
model runs go to a helper thread: the exact probe while pass 1 quantizes, the decoded one while
the preset's tables are fitted (pass 2 waits for the verdict; a failed check stops the fit), so
on a machine with a spare core they hide behind the encoder's single-threaded passes; on a
saturated one they only share its time (benches/guard_notes.md). On an ``OrtRunner`` (CPU, fp32
GroupQueryAttention graph) the probe runs on max-length buffers bound as past *and* present:
no copy of the cache into new outputs, no padding of trimmed sliding layers, and the decoded
cache is rebuilt straight into them (same logits as ``continue_from``, bit for bit); the runner
keeps those buffers for its next guarded encode of the same shape (:func:`release_buffers`
drops them). The record is spliced into the header (chunks untouched). ``check="decode"``:
encode, full decode and ``continue_from`` for every preset (no shortcut, slower).

Probes (token ids the model reads after the cache):

* the tokens that follow the context (``probe_ids``), when the caller has them: the real use;
* or the context's own last tokens fed again after it (:meth:`Guard.from_context`): no extra
  text is needed, and re-reading them makes the model attend back to where they sit in the cache
  (copying), which is sensitive to exactly the errors a codec makes. Measured on the reference
  models, this probe's KL tracks the continuation's (benches/RESULTS.md, "Quality guard");
* or the prefill's own predictions (:meth:`Guard.from_prefill`): the decoded cache without its
  last tokens, then those tokens, against the logits the prefill already gave there, so there is
  no exact probe to run. A sliding layer trimmed to its window lacks positions the earlier probe
  tokens see: pass the untrimmed prefill cache too (``kv=``) and the probe takes those few
  positions from it, exact (Gemma-3).

``runner``: anything with ``continue_from(kv, ids) -> (logits [1, T, V], kv)`` (``OrtRunner``, the
store's runner protocol); logits may be numpy or torch.

    from cachegen.guard import Guard
    g = Guard.from_context(runner, context_ids, max_kl=0.01)
    cachegen.save("ctx.cgk", kv, "default", guard=g)        # steps up if "default" is not good enough
    res = g.encode(kv, "small"); res.config, res.kl_mean, res.steps
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import threading
import time
import weakref
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np

from .config import CodecConfig, get_config
from .errors import ConfigError, InputError

__all__ = ["Guard", "GuardResult", "GuardStep", "encode_guarded", "with_extensions", "quality_record",
           "release_buffers", "DEFAULT_LADDER"]

DEFAULT_LADDER = ("default", "fine", "high", "lossless")
QUALITY_SCHEMA = "cachegen.guard/1"


@dataclass
class GuardStep:
    """One preset tried: its size and what it did to the probe."""
    config: str
    bytes: Optional[int]      # None: measured from its quantized values and stepped past, never coded
    kl_mean: float
    kl_max: float
    top1: float
    passed: bool
    measured: bool            # False for lossless (bit-exact: KL 0 without running the model)
    encode_s: float           # "fast": pass 1, plus tables + rANS coding for the preset kept
    check_s: float            # rebuild (or decode) + probe with the decoded cache (+ spot check, record)
    #: what the encode stood waiting for the guard's own work (the exact probe, the check, spot
    #: check, record): with ``overlap`` the model runs share the encode's time, so less than check_s
    wait_s: float = 0.0


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

    @property
    def exposed_s(self) -> float:
        """What the guard kept the encode waiting (model runs not hidden behind its passes, spot
        check, record) + the encodes of presets stepped past. Time the overlapped runs took from
        the encode itself (shared cores) only shows against a plain encode (benches/bench_guard.py)."""
        return sum(s.wait_s for s in self.steps) + sum(s.encode_s for s in self.steps[:-1])

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


def _logits_t(x) -> "torch.Tensor":
    """Runner logits ([1, T, V] or [T, V], numpy or torch) as a float32 CPU tensor [T, V]."""
    import torch

    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    t = t.to("cpu", torch.float32)
    if t.ndim == 3:
        t = t[0]
    if t.ndim != 2:
        raise InputError(f"runner returned logits of shape {tuple(t.shape)}, expected [1, T, V] or [T, V]")
    return t


def _argmax(t) -> "torch.Tensor":
    """Row argmax of a float32 CPU tensor [T, V] (numpy's is ~6x faster than torch's here)."""
    import torch

    return torch.from_numpy(np.asarray(t.numpy().argmax(-1), dtype=np.int64))


class _Reference:
    """The exact cache's probe: log-probabilities, probabilities and top-1 per position."""

    def __init__(self, logits):
        import torch

        z = _logits_t(logits)
        self.lp = torch.log_softmax(z, dim=-1)
        self.p = self.lp.exp()
        self.top1 = _argmax(z)


def _log_probs(x) -> _Reference:
    return _Reference(x)


def _compare(ref: _Reference, logits) -> tuple[float, float, float]:
    """KL(exact || decoded) per probe position (float32 log-probabilities and a float32 cascade
    sum per position, ~1e-7 relative; mean and max in float64): mean, max; top-1 agreement."""
    import torch

    z = _logits_t(logits)
    if z.shape != ref.lp.shape:
        raise InputError(f"runner returned logits {tuple(z.shape)} for the decoded cache, {tuple(ref.lp.shape)} "
                         "for the exact one")
    top1 = float((ref.top1 == _argmax(z)).double().mean())
    lp = torch.log_softmax(z, dim=-1)
    torch.sub(ref.lp, lp, out=lp)          # in place: no more full-vocabulary arrays than needed
    kl = lp.mul_(ref.p).sum(-1).double().clamp_min(0.0)
    if not bool(torch.isfinite(kl).all()):
        return math.inf, math.inf, top1
    return float(kl.mean()), float(kl.max()), top1


def _quantize(kv: Any, cfg: CodecConfig) -> tuple[Any, list]:
    """Pass 1 of ``cachegen.encode(kv, cfg)`` (format v2, lossy): the header and each layer's
    indices and parameters, i.e. everything that fixes the decoded cache. The same steps as
    ``codec.encoder.encode_lossy_v2``; :func:`_code` finishes the container. The guard measures a
    preset from this alone (:func:`_reconstruct`) and entropy-codes only the preset it keeps."""
    from .codec import encoder as E

    return E.quantize_v2(kv, cfg)


class _Stopped(Exception):
    """Raised inside the table fit when the preset's check failed meanwhile (its tables are moot)."""


def _tables(h: Any, outs: list, cfg: CodecConfig, stop: Any = None) -> tuple:
    """The probability tables of :func:`_quantize`'s results (the encoder's own fit). ``stop``:
    asked before each (K/V, role, alphabet) class; when it says True, :class:`_Stopped` is raised
    (the guard builds a preset's tables while its check runs, and drops them if it fails)."""
    from .codec import encoder as E

    table_bits = h.table_bits

    def fit(H):
        if stop is not None and stop():
            raise _Stopped()
        return E._fit_tables_v2(H, cfg.tables_per_class, table_bits)

    return E.build_tables_v2(h, outs, fit)


def _use_tables(h: Any, tables: tuple) -> list:
    """Put :func:`_tables`' tables into the header; their units (pass 2's input)."""
    from .codec import encoder as E

    return E.set_tables(h, tables)


# Forking the workers next to a loaded model costs ~0.2-0.3 s (page tables) and halves what is
# left of pass 2 on 2 cores: it pays only when more than this much serial work remains (SmolLM2
# 4K: pass 2 ~1.6 s serial, so yes; Gemma-3 4K: ~0.4 s, so no -- a pool made its guard slower).
_FORK_PAYS_S = 0.6


def _pass2(h: Any, outs: list, tables: tuple, progress: Any = None, done: Sequence[Any] = (),
           done_s: float = 0.0) -> bytes:
    """Pass 2 (rANS streams, forked workers) + container with :func:`_tables`' tables; ``done``:
    the first chunks, already coded in ``done_s`` seconds in this process (:func:`encode_guarded`
    codes some while its probe runs); the rest stay here when forking would not pay."""
    from .api import _check_decodable
    from .codec import encoder as E
    from .format import v2 as fmt2

    units = _use_tables(h, tables)
    chunks = list(done)
    left = h.n_chunks - len(chunks)
    if left > 0:
        workers = None
        if chunks and done_s / len(chunks) * left < _FORK_PAYS_S:
            workers = 1
        chunks += E.code_chunks_v2(h, outs, units, progress, workers=workers, start=len(chunks))
    return _check_decodable(fmt2.build_container(h, chunks))


def _code(h: Any, outs: list, cfg: CodecConfig, progress: Any = None) -> bytes:
    """Tables + pass 2 (rANS streams) + container for :func:`_quantize`'s results: the bytes of
    ``cachegen.encode(kv, cfg)``."""
    return _pass2(h, outs, _tables(h, outs, cfg), progress)


class _Background:
    """``fn(*args)`` on a helper thread (the guard's model runs: ORT and torch release the GIL,
    so they use the cores the encoder's single-threaded passes leave idle). ``result()`` joins
    and re-raises; ``seconds``: the call's own wall time."""

    inline = False

    def __init__(self, fn: Any, *args: Any):
        import threading

        self._res: Any = None
        self._exc: Optional[BaseException] = None
        self.seconds = 0.0
        self._t = threading.Thread(target=self._run, args=(fn, args), name="cachegen-guard", daemon=True)
        self._t.start()

    def _run(self, fn: Any, args: tuple) -> None:
        t0 = time.perf_counter()
        try:
            self._res = fn(*args)
        except BaseException as e:          # re-raised by result() on the caller's thread
            self._exc = e
        self.seconds = time.perf_counter() - t0

    def done(self) -> bool:
        return not self._t.is_alive()

    def join(self) -> None:
        self._t.join()

    def result(self) -> Any:
        self.join()
        if self._exc is not None:
            raise self._exc
        return self._res


class _Inline(_Background):
    """The same interface, run at once on the calling thread (``Guard(overlap=False)``)."""

    inline = True

    def __init__(self, fn: Any, *args: Any):
        self._res, self._exc = None, None
        self.seconds = 0.0
        self._run(fn, args)

    def done(self) -> bool:
        return True

    def join(self) -> None:
        pass


def _encode_keep(kv: Any, cfg: CodecConfig, progress: Any = None) -> tuple[bytes, Any, list]:
    """``cachegen.encode(kv, cfg)`` keeping pass 1's results for :func:`_reconstruct`.
    tests/test_guard.py checks the bytes equal ``cachegen.encode`` and the values equal
    ``cachegen.decode`` bit for bit; at run time one chunk is decoded for real and compared."""
    h, outs = _quantize(kv, cfg)
    return _code(h, outs, cfg, progress), h, outs


def _reconstruct(h: Any, outs: list, into: Optional[list] = None) -> list:
    """The cache a decoder rebuilds from :func:`_quantize`'s results, computed from pass 1's
    indices and parameters (what the decoder's rANS streams hand back), so the guard need not
    entropy-code nor decode anything to measure a preset. Written into ``into`` (per layer a
    (K, V) pair of float32 arrays [B, H, T_i, D], e.g. views of the probe's buffers) or into new
    arrays; returns them."""
    from .codec import grouping
    from .format.tables import TOKEN_SCALES

    B, C = h.batch, h.chunk_tokens
    # the decoder's values: fl32(fl32(fl32(step * q) + lo) * token_scale), per chunk, computed in
    # place in the target layout (the symbols are transposed, not the float values)
    restored = []
    for i, l in enumerate(h.layers):
        pair = []
        for kvi in (0, 1):
            heads, dim = l.heads_dim(kvi)
            shape = (B, heads, l.tokens, dim)
            if into is None:
                x = np.empty(shape, dtype=np.float32)
            else:
                x = into[i][kvi]
                if tuple(x.shape) != shape or x.dtype != np.float32:
                    raise InputError(f"layer {i}: buffer {tuple(x.shape)} {x.dtype}, expected {shape} float32")
            levels = 1 << l.bits(kvi)
            for k in range(h.n_chunks):
                n = min(C, l.tokens - k * C)
                if n <= 0:
                    break
                lo, st = outs[i]["params"][kvi, k]
                a, d = outs[i]["symbols"][kvi, k]
                q = a if h.group_size <= 1 else grouping.join(a, d, B, n, h.group_size, levels)
                xv = x[:, :, k * C:k * C + n, :]          # [B, heads, n, dim]; q is channel-major
                np.copyto(xv, q.reshape(heads, dim, B, n).transpose(2, 0, 3, 1), casting="unsafe")
                st32 = st.astype(np.float32)
                xv *= st32[:1].reshape(1, 1, 1, 1) if h.step_mode == 1 else st32.reshape(1, heads, 1, dim)
                xv += lo.astype(np.float32).reshape(1, heads, 1, dim)
                if h.token_scaling:
                    xv *= TOKEN_SCALES[outs[i]["exps"][kvi, k]].reshape(B, 1, n, 1)
            pair.append(x)
        restored.append(tuple(pair))
    return restored


def _spot_check(data: bytes, restored: list, k: Optional[int] = None, blocks: Optional[int] = 8,
                upto: Optional[int] = None) -> None:
    """Decode the first ``blocks`` (layer, K/V) blocks of chunk ``k`` (default: the last, or the
    one holding position ``upto - 1``; all blocks with ``blocks=None``) with the real CPU decoder;
    they must equal ``restored`` (at positions below ``upto`` when given). A drift of the encoder
    away from this module's copy of its steps shows in any block, so a few suffice."""
    import itertools

    from .codec.decoder_v2 import decode_chunk
    from .format import v2 as fmt2

    c = fmt2.parse_container(data)
    C = c.header.chunk_tokens
    if k is None:
        k = c.n_chunks - 1 if upto is None else min(c.n_chunks - 1, max(upto - 1, 0) // C)
    for i, kvi, _k, n, x in itertools.islice(decode_chunk(c, k), blocks):
        if upto is not None:
            n = min(n, upto - k * C)
            x = x[:, :, :n]
        mine = restored[i][kvi][:, :, k * C:k * C + n, :]
        if not np.array_equal(mine.view(np.uint32), np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)):
            raise RuntimeError(f"guard: reconstructed cache differs from the decoder (layer {i}, chunk {k}); "
                               "the encoder changed: use check='decode'")


def with_extensions(data: bytes, extensions: Sequence[Any]) -> bytes:
    """The same v2 container with its extension records replaced: byte for byte what encoding
    with these ``extensions`` gives, without re-assembling it. The records end the header and
    chunk offsets count from the payload start, so only the fixed part's ``ext_count`` and
    ``ext_size``, the records and the header CRC change; the rest is copied once."""
    from .format import v2 as fmt2
    from .format.container import crc32
    from .errors import ChecksumError

    if fmt2.peek_version(data) != 2:
        raise InputError("only format v2 containers carry extension records")
    mv = fmt2.as_bytes_view(data)
    if len(mv) < fmt2._PREAMBLE.size + fmt2._FIXED.size:
        raise InputError("container truncated")
    magic, version, mode, flags, hsize, crc = fmt2._PREAMBLE.unpack_from(mv, 0)
    p0 = fmt2._PREAMBLE.size
    body = mv[p0:p0 + hsize]
    if len(body) != hsize or hsize < fmt2._FIXED.size or crc32(body) != crc:
        raise ChecksumError("container header is truncated or its checksum does not match")
    fixed = list(fmt2._FIXED.unpack_from(body, 0))
    old_size = fixed[15]                           # ext_count, ext_size: fields 14 and 15
    if old_size > hsize - fmt2._FIXED.size:
        raise InputError("container header: extension section larger than the header")
    # The packed-parameters and compact-directory records belong to the coded chunks, not to
    # the caller: kept (last, where the encoder puts them).
    from .format.extensions import LAYOUT_KINDS
    old = fmt2._parse_extensions(body[hsize - old_size:hsize], fixed[14])
    extensions = [e for e in extensions if e.kind not in LAYOUT_KINDS] + [e for e in old if e.kind in LAYOUT_KINDS]
    exts = fmt2.pack_extensions(list(extensions))
    fixed[14], fixed[15] = len(extensions), len(exts)
    new_body = fmt2._FIXED.pack(*fixed) + bytes(body[fmt2._FIXED.size:hsize - old_size]) + exts
    pre = fmt2._PREAMBLE.pack(magic, version, mode, flags, len(new_body), crc32(new_body))
    return b"".join((pre, new_body, mv[p0 + hsize:]))


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
    #: the exact cache's logits for the probe, when the caller has them (:meth:`from_prefill`):
    #: the probe is then the cache's last ``len(probe_ids)`` tokens, fed again after the rest
    reference: Any = None
    context_len: Optional[int] = None       # with ``reference``: the context's length (every layer's)
    #: with ``reference``: the untrimmed exact cache (the prefill's), from which a probe of a cache
    #: whose sliding layers are trimmed takes the positions just before their window (kept by
    #: reference, not copied)
    exact_kv: Any = None
    #: ``check="fast"``: run the model on a helper thread while the encoder quantizes and fits
    #: its tables (the exact probe during pass 1, the decoded one during the table fit); False:
    #: everything in turn on the calling thread
    overlap: bool = True

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
        if self.reference is not None:
            ref = _logits_t(self.reference)
            if ref.shape[0] != len(self.probe_ids):
                raise InputError(f"reference logits for {ref.shape[0]} positions, the probe has {len(self.probe_ids)}")
            self.reference = ref.clone()

    @classmethod
    def from_prefill(cls, runner: Any, context_ids: Sequence[int], logits: Any, probe_tokens: int = 16,
                     kv: Any = None, **kw: Any) -> "Guard":
        """Probe with the prefill's own predictions: the decoded cache without its last
        ``probe_tokens`` positions, then those tokens fed again, scored against the prefill's
        logits there (``logits``: the prefill's [1, T, V] or [T, V], or only its last rows). The
        exact side costs nothing, and 16 tokens judge as well as 32 here (verdict = the
        continuation's in 9/9 SmolLM2 windows at 16; cost 21 % of a 4K encode warm, vs 42-44 %
        for the 32-token context probe: benches/guard_notes.md), hence the default. The model
        reads ``T - probe_tokens`` decoded positions (the last ones are recomputed from them,
        as after a real reload). ``kv``: the prefill's untrimmed cache, needed when the cache to
        encode has sliding-window layers trimmed to their window (Gemma-3): those lack the
        ``probe_tokens - 1`` positions before the window that the early probe tokens see, and the
        probe takes them from ``kv``, exact (a reader never needs them: every position after the
        context sees only the stored window)."""
        ids = [int(t) for t in np.asarray(context_ids).reshape(-1)]
        n = min(int(probe_tokens), len(ids) - 1)
        if n < 1:
            raise InputError("the context needs at least two tokens to probe its tail")
        lg = _logits_t(logits)
        if lg.shape[0] < n:
            raise InputError(f"{lg.shape[0]} rows of prefill logits, the probe needs the last {n}")
        return cls(runner, ids[-n:], probe_kind="prefill_tail", reference=lg[-n:], context_len=len(ids),
                   exact_kv=kv, **kw)

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


def _host_f32(x: Any) -> np.ndarray:
    """A float32 numpy copy of a K/V array (numpy or torch, any device, bf16 included)."""
    from .codec.encoder import _to_f32
    from .codec.layout import host_array

    return np.array(_to_f32(*host_array(x)), dtype=np.float32)


def _cut(kv: list, cut: int, lead: list) -> list:
    """``kv`` without its last ``cut`` positions, with each layer's exact lead positions
    (:func:`_lead_of`) put in front: what a prefill-tail probe reads."""
    kv = [(k[:, :, :k.shape[2] - cut], v[:, :, :v.shape[2] - cut]) for k, v in kv]
    if not lead or all(ld is None for ld in lead):
        return kv
    return [(k, v) if ld is None else tuple(np.concatenate([ld[j], _host_f32(x)], axis=2) for j, x in ((0, k), (1, v)))
            for (k, v), ld in zip(kv, lead)]


class _RunnerProbe:
    """Scores the probe after caches of one shape with ``runner.continue_from`` (any runner).
    :meth:`targets`: arrays holding the exact cache, to overwrite with decoded values. ``cut``:
    the probe reads the cache without its last ``cut`` positions."""

    def __init__(self, runner: Any, ids: Sequence[int], kv: Any = None, cut: int = 0):
        self.runner, self.ids, self._targets, self._kv, self.cut = runner, list(ids), None, kv, cut
        self.lead: list = []

    def set_lead(self, lead: list) -> None:
        """Exact positions to put before each layer's cut cache (:func:`_lead_of`)."""
        self.lead = lead

    def score_exact(self, kv: Any):
        self._kv = kv
        return _log_probs(self.runner.continue_from(kv, self.ids)[0])

    def targets(self) -> list:
        if self._targets is None:
            self._targets = [tuple(_host_f32(t) for t in pair) for pair in self._kv]
        return self._targets

    def score_targets(self):
        kv = self.targets()
        if self.cut:
            kv = _cut(kv, self.cut, self.lead)
        return self.runner.continue_from(kv, self.ids)[0]


_GQA_GRAPHS: dict = {}


def _presents_from_gqa(runner: Any) -> bool:
    """Whether every ``present`` output of the runner's graph comes from a GroupQueryAttention
    node: those read the past from, and append to, one buffer bound as both (buffer sharing)."""
    path = Path(runner.model_dir) / "model.onnx"
    key = str(path)
    ops = (getattr(runner, "_meta", None) or {}).get("present_ops")
    if isinstance(ops, list) and ops:       # recorded by export_model: no onnx import (1.5 s)
        return ops == ["GroupQueryAttention"]
    if key not in _GQA_GRAPHS:
        try:
            import onnx

            g = onnx.load(key, load_external_data=False).graph
            made = {o: n.op_type for n in g.node for o in n.output}
            names = [n for pair in runner.layout.present_names for n in pair]
            _GQA_GRAPHS[key] = bool(names) and all(made.get(n) == "GroupQueryAttention" for n in names)
        except Exception:          # no onnx package, unreadable graph: use the plain path
            _GQA_GRAPHS[key] = False
    return _GQA_GRAPHS[key]


def _shared_buffers_fit(runner: Any, kv: Any) -> bool:
    """The shared-buffer probe applies: an OrtRunner on the CPU with an fp32 GQA graph, and a
    batch-1 cache of the graph's layers, heads and head size."""
    import sys

    mod = sys.modules.get("cachegen.ort.runner")
    if mod is None or not isinstance(runner, mod.OrtRunner):
        return False
    if runner.provider != "cpu" or np.dtype(runner.dtype) != np.float32 or not isinstance(runner.vocab_size, int):
        return False
    if len(kv) != runner.num_layers:
        return False
    for k, v in kv:
        s = tuple(k.shape)
        if len(s) != 4 or s != tuple(v.shape) or s[0] != 1 or s[1] != runner.num_kv_heads or s[3] != runner.head_dim:
            return False
    return _presents_from_gqa(runner)


def _shared_probe_class():
    from .ort.cuda import StaticKV

    class _SharedBufferProbe(StaticKV):
        """The probe on an ORT GQA graph: one max-length buffer per layer bound as past *and*
        present (``StaticKV``), so a run neither copies the 4K cache into new presents nor pads
        windowed layers; the decoded cache is rebuilt straight into the buffers. The logits are
        bit-identical to ``continue_from``'s (tests/test_guard.py). Buffers start uninitialised
        except where a windowed layer's front is read as the padded runner's zeros (nothing writes
        there later, so the probe is reused by the runner's next guarded encode of this shape)."""

        reusable = True

        def __init__(self, runner: Any, kv: Any, ids: Sequence[int], cut: int = 0):
            import torch

            from .ort.cuda import _TORCH

            self.ids, self.cut = list(ids), cut
            self.tokens = [int(k.shape[2]) for k, _ in kv]
            self.T = max(self.tokens)
            super().__init__(runner, self.T - cut + len(self.ids), zero=False)
            for pair, t in zip(self.kv, self.tokens):
                for b in pair:      # a windowed layer's front is read as the padded runner's zeros
                    b[:, :, :self.T - t].zero_()
            # one logits buffer for every run of the probe (StaticKV.step reuses what it finds here)
            self._logits = {len(self.ids): torch.empty((1, len(self.ids), runner.vocab_size),
                                                       dtype=_TORCH[np.dtype(runner._logits_dtype)])}
            self._views(self.tokens)          # refuses badly trimmed layers

        def score_exact(self, kv: Any):
            self.load(kv)
            return _log_probs(self.score_targets())

        def set_lead(self, lead: list) -> None:
            """Exact positions just before each trimmed layer's window, written into the buffer's
            front there; ``None`` for a layer puts the zeros back (a reused probe)."""
            import torch

            for pair, t, ld in zip(self.kv, self.tokens, lead or [None] * len(self.tokens)):
                if t >= self.T:
                    continue
                for b, x in zip(pair, ld or (None, None)):
                    n = self.cut if x is None else x.shape[2]
                    dst = b[:, :, max(0, self.T - t - n):self.T - t]
                    if x is None:
                        dst.zero_()
                    else:
                        dst.copy_(torch.from_numpy(np.ascontiguousarray(x)).to(dst.dtype))

        def targets(self) -> list:
            # StaticKV's views run to the buffer's end: a layer of t tokens is [T - t, T)
            return [(k[:, :, :t].numpy(), v[:, :, :t].numpy()) for (k, v), t in zip(self._views(self.tokens), self.tokens)]

        def score_targets(self):
            self.reset(self.T - self.cut)         # a cut probe overwrites the cache's last positions
            return self.step(self.ids)

    return _SharedBufferProbe


#: per runner, the shared-buffer probe of its last guarded encode, kept for the next one of the
#: same shape (no new max-length buffers to fault in and zero, no new IO binding): the memory of
#: one cache per runner, freed with the runner or by :func:`release_buffers`
_IDLE_PROBES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_IDLE_LOCK = threading.Lock()


def release_buffers(runner: Any = None) -> None:
    """Drop the probe buffers the guard keeps for ``runner`` (all runners by default)."""
    with _IDLE_LOCK:
        if runner is None:
            _IDLE_PROBES.clear()
        else:
            _IDLE_PROBES.pop(runner, None)


def _make_probe(runner: Any, kv: Any, ids: Sequence[int], fast: bool, cut: int = 0):
    if fast and _shared_buffers_fit(runner, kv):
        tokens = [int(k.shape[2]) for k, _ in kv]
        try:
            with _IDLE_LOCK:
                pr = _IDLE_PROBES.pop(runner, None)     # checked out: one guarded encode at a time uses it
        except TypeError:                               # a runner that cannot be weakly referenced
            pr = None
        if pr is not None and pr.tokens == tokens and pr.cut == cut and len(pr.ids) == len(ids):
            pr.ids = [int(t) for t in ids]
            return pr
        del pr                                          # its buffers go before new ones are made
        return _shared_probe_class()(runner, kv, ids, cut)
    return _RunnerProbe(runner, ids, kv, cut)


def _keep_probe(runner: Any, probe: Any) -> None:
    """Hand a shared-buffer probe back for the runner's next guarded encode."""
    if getattr(probe, "reusable", False):
        try:
            with _IDLE_LOCK:
                _IDLE_PROBES[runner] = probe
        except TypeError:
            pass


def _reference_probe(guard: "Guard", kv: Any, fast: bool):
    """(probe, exact reference, cut) for ``guard`` on ``kv``."""
    if guard.reference is None:
        probe = _make_probe(guard.runner, kv, guard.probe_ids, fast)
        return probe, probe.score_exact(kv), 0
    n = len(guard.probe_ids)
    tokens = [int(k.shape[2]) for k, _ in kv]
    T = guard.context_len or max(tokens)
    lead = _lead_of(guard, tokens, T, n)
    probe = _make_probe(guard.runner, kv, guard.probe_ids, fast, cut=n)
    probe.set_lead(lead)
    return probe, _Reference(guard.reference), n


def _lead_of(guard: "Guard", tokens: Sequence[int], T: int, n: int) -> list:
    """Per layer, None or the exact (key, value) positions ``[T - t - m, T - t)`` of a layer
    holding its last ``t < T`` tokens (``m = min(n, T - t)``), from ``guard.exact_kv``: a probe
    that re-reads the last ``n`` positions sees up to ``n - 1`` positions before a trimmed
    sliding layer's window, and the cut cache keeps the layer at its window length."""
    if max(tokens) > T:
        raise InputError(f"the cache holds {max(tokens)} tokens, the prefill-tail probe's context {T}")
    if all(t == T for t in tokens):
        return [None] * len(tokens)
    full = guard.exact_kv
    if full is None:
        raise InputError(f"a prefill-tail probe needs every layer to hold the whole context ({T} tokens), got "
                         f"{sorted(set(tokens))}: pass the untrimmed prefill cache (Guard.from_prefill(..., kv=)) "
                         "for sliding-window layers trimmed to their window, or use Guard.from_context")
    if len(full) != len(tokens):
        raise InputError(f"the untrimmed cache has {len(full)} layers, the cache to encode {len(tokens)}")
    out: list = []
    for i, ((fk, fv), t) in enumerate(zip(full, tokens)):
        if t == T:
            out.append(None)
            continue
        if fk.shape[2] != T or fv.shape[2] != T:
            raise InputError(f"layer {i} of the untrimmed cache has {fk.shape[2]} tokens, the context {T}")
        m = min(n, T - t)
        out.append(tuple(_host_f32(x[:, :, T - t - m:T - t]) for x in (fk, fv)))
    return out


def _probe_compare(probe: Any, ref: "_Reference") -> tuple[float, float, float]:
    """The probe on the decoded cache (already in the probe's buffers), compared with the exact."""
    return _compare(ref, probe.score_targets())


def _check_failed(job: _Background, max_kl: float) -> bool:
    """Whether ``job`` (a :func:`_probe_compare`) is done and over the budget (or raised)."""
    if not job.done():
        return False
    try:
        return not job.result()[0] <= max_kl
    except BaseException:
        return True


def encode_guarded(kv: Any, guard: Guard, config: Union[str, CodecConfig, None] = None,
                   extensions: Sequence[Any] = (), progress: Any = None) -> GuardResult:
    """Encode ``kv`` at the first preset of the ladder (``config``, then ``guard.presets`` after it)
    whose decoded cache keeps the probe's mean KL within ``guard.max_kl``; returns the container
    with an EXT_QUALITY record of the figures. If no preset meets the budget (a ladder without
    lossless), the last one is stored and ``met`` is False.

    ``check="fast"``: a preset is measured from its quantized values (pass 1) rebuilt as the
    decoder would; only the preset kept is entropy-coded, and one block set of the container is
    then decoded for real and compared. The exact cache's probe runs once."""
    with _one_blas_thread():
        return _encode_guarded(kv, guard, config, extensions, progress)


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    """numpy's BLAS (OpenBLAS: 2 threads on 2 cores, spinning after each call) on one thread
    while the guard runs: its table fit runs next to the probe's ORT run, and the two thread pools
    fought for the cores (4K Gemma-3, 2 cores: table fit 0.07 s alone, 0.26-0.34 s next to the
    probe, 0.14 s with one BLAS thread; the probe 0.30 -> 0.25 s). The limit is process-wide (one
    BLAS pool): other threads' numpy products also run on one thread meanwhile. Without
    threadpoolctl (declared, but a performance aid only) nothing is limited."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _encode_guarded(kv: Any, guard: Guard, config: Union[str, CodecConfig, None],
                    extensions: Sequence[Any], progress: Any) -> GuardResult:
    import cachegen
    from .format.extensions import EXT_QUALITY, Extension

    ladder = _ladder(config, guard.presets)
    fast = guard.check == "fast"
    run = _Background if (fast and guard.overlap) else _Inline
    probe, lp_ref, reference_s, cut = None, None, 0.0, 0
    ref_job = None
    jobs: list = []
    steps: list[GuardStep] = []
    data = b""
    try:
        for i, p in enumerate(ladder):
            cfg = get_config(p)
            name = _name(p) if isinstance(p, str) else cfg.name
            last = i == len(ladder) - 1
            if cfg.lossless:       # bit-exact by construction (checked by the codec's tests)
                t0 = time.perf_counter()
                data = cachegen.encode(kv, cfg, progress)
                steps.append(GuardStep(name, len(data), 0.0, 0.0, 1.0, True, False, time.perf_counter() - t0, 0.0))
                break
            wait_s = 0.0
            if lp_ref is None and ref_job is None:
                # the exact cache's probe does not depend on the encode: it runs on a helper thread
                # while pass 1 quantizes (fast) or before the encode (decode)
                ref_job = run(_reference_probe, guard, kv, fast)
                jobs.append(ref_job)
            nbytes = None
            if fast:
                t0 = time.perf_counter()
                h, outs = _quantize(kv, cfg)
                enc_s = time.perf_counter() - t0
                if lp_ref is None:
                    t0 = time.perf_counter()
                    probe, lp_ref, cut = ref_job.result()
                    wait_s += time.perf_counter() - t0 + (ref_job.seconds if ref_job.inline else 0.0)
                    reference_s = ref_job.seconds
                # the decoded cache rebuilt into the probe's buffers here (numpy: it would contend
                # for the GIL), its probe run on the helper thread while the preset's tables are
                # fitted (pass 2 waits for the verdict; a failed check stops the fit, drops them)
                t0 = time.perf_counter()
                _reconstruct(h, outs, probe.targets())
                rebuild_s = time.perf_counter() - t0
                wait_s += rebuild_s
                check = run(_probe_compare, probe, lp_ref)
                jobs.append(check)
                t0 = time.perf_counter()
                tables = None
                try:
                    tables = _tables(h, outs, cfg, stop=None if last else lambda: _check_failed(check, guard.max_kl))
                except _Stopped:
                    pass
                # the probe still running: code the first chunks meanwhile, in this process (ORT
                # runs the probe without the GIL, and a fork next to a running model is avoided),
                # until the probe is done; kept if it passed (_pass2 codes the rest), dropped if
                # not. The probe's time hides behind pass 2 instead of adding to it.
                done: list = []
                done_s = 0.0
                if tables is not None and not check.done():
                    from .codec import encoder as E

                    t1 = time.perf_counter()
                    done = E.code_chunks_v2(h, outs, _use_tables(h, tables), progress if last else None,
                                            workers=1, stop=check.done)
                    done_s = time.perf_counter() - t1
                enc_s += time.perf_counter() - t0
                t0 = time.perf_counter()
                klm, klx, top1 = check.result()
                wait_s += time.perf_counter() - t0 + (check.seconds if check.inline else 0.0)
                check_s = rebuild_s + check.seconds
                passed = klm <= guard.max_kl
                if passed or last:
                    t0 = time.perf_counter()
                    if tables is None:
                        tables = _tables(h, outs, cfg)
                    data = _pass2(h, outs, tables, progress, done=done, done_s=done_s)
                    enc_s += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    _spot_check(data, probe.targets(), upto=max(int(k.shape[2]) for k, _ in kv) - cut if cut else None)
                    dt = time.perf_counter() - t0
                    check_s += dt
                    wait_s += dt
                    nbytes = len(data)
                del h, outs, tables
            else:
                if lp_ref is None:
                    probe, lp_ref, cut = ref_job.result()
                    reference_s = ref_job.seconds
                    wait_s += reference_s
                t0 = time.perf_counter()
                data = cachegen.encode(kv, cfg, progress)
                enc_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                dec = cachegen.decode(data, "cpu")
                if cut:
                    dec = _cut(dec, cut, probe.lead)
                lg, _ = guard.runner.continue_from(dec, guard.probe_ids)
                klm, klx, top1 = _compare(lp_ref, lg)
                check_s = time.perf_counter() - t0
                wait_s += check_s
                passed, nbytes = klm <= guard.max_kl, len(data)
            steps.append(GuardStep(name, nbytes, klm, klx, top1, passed, True, enc_s, check_s, wait_s))
            if passed:
                break
    finally:
        for j in jobs:           # never leave a model run going behind an error
            j.join()
    _keep_probe(guard.runner, probe)
    del probe
    last_step = steps[-1]
    res = GuardResult(data=b"", config=last_step.config, met=last_step.passed, kl_mean=last_step.kl_mean,
                      kl_max=last_step.kl_max, top1=last_step.top1, probe_tokens=len(guard.probe_ids),
                      probe_kind=guard.probe_kind, max_kl=float(guard.max_kl), steps=steps, reference_s=reference_s)
    rec = quality_record(res)
    rec["probe"]["sha1"] = guard.probe_digest()
    if guard.meta:
        rec["meta"] = dict(guard.meta)
    t0 = time.perf_counter()
    exts = [e for e in extensions if getattr(e, "kind", None) != EXT_QUALITY]
    res.data = with_extensions(data, exts + [Extension.json(EXT_QUALITY, rec)])
    dt = time.perf_counter() - t0
    steps[-1].check_s += dt
    steps[-1].wait_s += dt
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
    :meth:`for_context` makes the :class:`Guard` with the context's last ``probe_tokens``;
    :meth:`for_prefill`, when the caller also has the prefill's logits, the cheaper prefill-tail
    probe of ``prefill_tokens`` (no exact probe run: benches/guard_notes.md)."""
    runner: Any
    max_kl: float = 0.01
    presets: Sequence[Union[str, CodecConfig]] = DEFAULT_LADDER
    probe_tokens: int = 32
    check: str = "fast"
    prefill_tokens: int = 16

    def for_context(self, context_ids: Sequence[int]) -> Guard:
        return Guard.from_context(self.runner, context_ids, self.probe_tokens, max_kl=self.max_kl,
                                  presets=self.presets, check=self.check)

    def for_prefill(self, context_ids: Sequence[int], logits: Any, kv: Any = None) -> Guard:
        return Guard.from_prefill(self.runner, context_ids, logits, self.prefill_tokens, kv=kv, max_kl=self.max_kl,
                                  presets=self.presets, check=self.check)


def guard_chunks(policy: GuardPolicy, tokens: Sequence[int], kv: Any, chunk_tokens: int, start_chunk: int,
                 n_chunks: int, level: str, logits: Any = None) -> tuple[str, dict[int, bytes], GuardResult]:
    """The store's guarded write: chunks ``start_chunk..n_chunks-1`` of ``kv`` are encoded one by
    one (one container each) at ``level``, then the next preset of the ladder, until the whole
    prefix cache (chunks before ``start_chunk`` as given, the new ones as a reader will decode
    them) keeps the probe (the prefix's last tokens, fed again) within the budget.

    ``logits``: the prefill's logits over ``tokens`` (row j = the prediction after token j), at
    least for the prefix's last ``policy.prefill_tokens``: the probe is then the prefix's last
    tokens fed again after the rest of it, scored against those rows (no exact probe run).

    Returns ``(level stored, {chunk: container with its EXT_QUALITY record}, result)``."""
    import cachegen
    from .format.extensions import EXT_QUALITY, Extension

    C = int(chunk_tokens)
    end = n_chunks * C
    ids = [int(t) for t in np.asarray(tokens).reshape(-1)[:end]]

    def cut(x, a, b):
        return x[:, :, a:b]

    prefix = [(cut(k, 0, end), cut(v, 0, end)) for k, v in kv]
    t0 = time.perf_counter()
    if logits is None:
        g = policy.for_context(ids)
        probe = _make_probe(g.runner, prefix, g.probe_ids, g.check == "fast")
        lp_ref = probe.score_exact(prefix)
    else:
        lg = _logits_t(logits)
        # rows are the prompt's last ones (all of them, usually): row r = position first + r
        first = len(np.asarray(tokens).reshape(-1)) - lg.shape[0]
        n = min(int(policy.prefill_tokens), end - 1)
        if first < 0 or first > end - n:
            raise InputError(f"{lg.shape[0]} rows of prefill logits for {first + lg.shape[0]} tokens do not cover "
                             f"positions {end - n}..{end - 1}, the stored prefix's last {n}")
        g = policy.for_prefill(ids, lg[:end - first])
        probe, lp_ref, _ = _reference_probe(g, prefix, g.check == "fast")
        if hasattr(probe, "load"):             # the shared buffers hold the exact prefix before the rebuild
            probe.load(prefix)
    fast = g.check == "fast"
    reference_s = time.perf_counter() - t0
    steps: list[GuardStep] = []
    payloads: dict[int, bytes] = {}
    ladder = _ladder(level, g.presets)
    for j, p in enumerate(ladder):
        cfg = get_config(p)
        payloads = {}
        chunks = {k: [(cut(kk, k * C, (k + 1) * C), cut(vv, k * C, (k + 1) * C)) for kk, vv in prefix]
                  for k in range(start_chunk, n_chunks)}
        t0 = time.perf_counter()
        if cfg.lossless or not fast:
            payloads = {k: cachegen.encode(ch, cfg) for k, ch in chunks.items()}
            keep = None
        else:
            keep = {k: _quantize(ch, cfg) for k, ch in chunks.items()}
        enc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if cfg.lossless:
            klm, klx, top1, measured = 0.0, 0.0, 1.0, False
        else:
            targets = probe.targets()          # the exact prefix; the new chunks are overwritten

            def into(k: int, toks: list) -> list:
                return [(tk[:, :, k * C:k * C + t], tv[:, :, k * C:k * C + t]) for (tk, tv), t in zip(targets, toks)]

            for k in chunks:
                if keep is not None:
                    h, outs = keep[k]
                    _reconstruct(h, outs, into(k, [l.tokens for l in h.layers]))
                else:
                    dec = cachegen.decode(payloads[k], "cpu")
                    for (tk, tv), (dk, dv) in zip(into(k, [int(x.shape[2]) for x, _ in dec]), dec):
                        tk[...] = dk.numpy()
                        tv[...] = dv.numpy()
            klm, klx, top1 = _compare(lp_ref, probe.score_targets())
            measured = True
        passed = klm <= g.max_kl
        check_s = time.perf_counter() - t0
        if keep is not None and (passed or j == len(ladder) - 1):
            t0 = time.perf_counter()
            payloads = {k: _code(*keep[k], cfg) for k in keep}
            enc_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            lastk = max(keep)
            _spot_check(payloads[lastk], into(lastk, [l.tokens for l in keep[lastk][0].layers]))
            check_s += time.perf_counter() - t0
        keep = None
        steps.append(GuardStep(p if isinstance(p, str) else cfg.name,
                               sum(len(x) for x in payloads.values()) if payloads else None,
                               klm, klx, top1, passed, measured, enc_s, check_s))
        if passed:
            break
    _keep_probe(g.runner, probe)
    del probe
    last_step = steps[-1]
    res = GuardResult(data=b"", config=last_step.config, met=last_step.passed, kl_mean=last_step.kl_mean,
                      kl_max=last_step.kl_max, top1=last_step.top1, probe_tokens=len(g.probe_ids),
                      probe_kind=g.probe_kind, max_kl=float(g.max_kl), steps=steps, reference_s=reference_s)
    rec = quality_record(res)
    rec["probe"]["sha1"] = g.probe_digest()
    rec["scope"] = {"chunks": [start_chunk, n_chunks], "chunk_tokens": C}
    ext = Extension.json(EXT_QUALITY, rec)
    return last_step.config, {k: with_extensions(d, [ext]) for k, d in payloads.items()}, res
