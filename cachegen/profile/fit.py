"""Fitting a profile on a calibration text with the model itself (benches/rd_profile_notes.md).

1. Prefill the calibration text (up to ``max_tokens``, minus the tuning windows), remove RoPE from the keys (positions
   0..T-1, the model's per-layer theta), and fit one orthonormal basis per (layer, K/V) over all
   heads: eigenvectors of the *uncentred* second-moment matrix (centring measured worse: it makes
   the per-token scales of outlying tokens, e.g. the attention sink, swing).
2. Bit allocation (``allocate=True``): on a calibration window, for every (layer, K/V) tensor and
   width 2..9, the coded size and MSE of that tensor alone in the transform domain, and (mean
   over the calibration windows) the KL when only that tensor is quantized at 5 bits (KL is close to additive over tensors). Each
   tensor then takes ``argmin_b  s * mse(b)/mse(5) + lambda * bytes(b)/fp16_bytes``; lambda is
   bisected per preset so that the mean KL measured on the calibration windows (the real codec,
   the real model) meets the preset's target. ``default-p`` targets 0.9x the KL that the profile-free
   ``default`` preset gets on the same windows, so it is never worse than ``default`` there.
   The bases are fitted on the calibration tokens outside those windows (``basis_ids``), so
   the windows are held out from the bases and their KL predicts unseen text.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import InputError
from . import codec as pcodec
from . import transform as tf
from .modelinfo import model_info
from .profile import Profile, ProfilePreset

# name -> KL target on the calibration windows (None: that of the standard "default" preset)
PRESET_TARGETS: Dict[str, Optional[float]] = {"default-p": None, "small-p": 0.006, "tiny-p": 0.02}
# The tuning windows are out of sample for the bases (basis_ids), so their KL predicts held-out
# KL; default-p aims at 0.9x the standard default's KL there (a margin for window-to-window
# variance, set before looking at held-out results). With in-sample windows (bases fitted on
# the whole text, profiles before format 2026-12-02) held-out KL came out ~1.5x higher and the
# margin was 0.6.
DEFAULT_MARGIN = 0.9
IN_SAMPLE_MARGIN = 0.6      # bases="in-sample": bases fitted on the whole text, windows included
# How the bases are fitted: on the calibration tokens outside the tuning windows ("holdout"), on
# all of them ("in-sample", the method before 2026-12-02), or tuned as "holdout" and then
# refitted on all of them ("cross-fit").
BASES = ("holdout", "in-sample", "cross-fit")
# without allocation: uniform widths (coefficients need about one bit less than raw channels)
UNIFORM_PRESETS = {"default-p": (7, 5), "small-p": (6, 4), "tiny-p": (5, 3)}
BREF = 5
BISECTIONS = 9      # of log lambda over [1e-4, 3]: steps of ~0.02 in log lambda
BITS = tuple(range(2, 10))
# The allocation's widths. 0.5 = half bits too (a width w is coded with ceil(w) bits and the
# step of w bits, config.width_to_bits): measured on Gemma-3's calibration windows it lands on
# worse points than whole bits (tiny-p x8.12 at KL 0.0200 vs x7.99 at 0.0169 and a curve slope
# that puts whole bits at ~x8.26 for 0.0200): the finer choice exploits the errors of the
# additive per-tensor KL model. So whole bits, then a uniform trim (TRIM_GAINS).
WIDTH_STEP = 1.0
# Codec settings of the profile presets over config._MODERN (stored per preset when set).
# Measured and left off (2026-12-03): 1,024-token chunks with one channel per stream (as many
# streams of the same length for the GPU decoder, whose kernel was even faster: 0.48 vs 0.59 ms
# at 8K SmolLM2 on the H200) gave +9-13 % ratio on the calibration windows but did not hold on
# held-out text: the shared step of 1,024 tokens follows the block's outliers, so KL rose
# 1.9x from calibration to held-out (0.9x with 256) -- SmolLM2 default-p x5.01 at KL 0.0026,
# Gemma-3 default-p x5.53 at 0.0093 / tiny-p x7.58 at 0.0151 (benches/rd_profile_notes.md).
PROFILE_CODEC: dict = {}


def _codec_fields() -> Optional[dict]:
    """PROFILE_CODEC as a preset stores it (None when empty: older profiles keep their hash)."""
    return dict(PROFILE_CODEC) or None
# After the lambda search: one step gain for every tensor, the largest of these whose measured
# KL still meets the target (a move along the real curve, not the per-tensor model).
TRIM_GAINS = (1.04, 1.08, 1.12, 1.17, 1.22, 1.28, 1.35)


def widths(step: float = WIDTH_STEP) -> tuple:
    n = int(round((max(BITS) - min(BITS)) / step)) + 1
    return tuple(min(BITS) + i * step for i in range(n))


def width_config(name: str, kw: Sequence[float], vw: Sequence[float]):
    """CodecConfig of per-layer (fractional) widths, plus the (bits, gains) it stores."""
    import cachegen
    from ..config import width_to_bits

    kb, kg = zip(*(width_to_bits(w) for w in kw))
    vb, vg = zip(*(width_to_bits(w) for w in vw))
    gains = {}
    if any(g != 1.0 for g in kg):
        gains["key_step_gain"] = kg
    if any(g != 1.0 for g in vg):
        gains["value_step_gain"] = vg
    cfg = cachegen.CodecConfig(name=name, key_bits=kb, value_bits=vb,
                               **{**pcodec._MODERN, **PROFILE_CODEC}, **gains)
    return cfg, kb, vb, (kg if "key_step_gain" in gains else None), (vg if "value_step_gain" in gains else None)

Log = Optional[Callable[[str], None]]


@dataclass
class _Window:
    kv: list
    cont: list
    lo: np.ndarray
    fp16: int


def _log(log: Log, msg: str) -> None:
    if log:
        log(msg)


def fit_bases(runner: Any, ids: Sequence[int], info) -> tuple[np.ndarray, np.ndarray]:
    _, kv = runner.prefill(list(ids))
    kb, vb = tf.fit_bases(kv, info.rope_theta, key_rope=True, center=False)
    return (np.stack([b.basis for b in kb]).astype(np.float32), np.stack([b.basis for b in vb]).astype(np.float32))


def _window(runner: Any, ids: Sequence[int]) -> _Window:
    ctx, cont = list(ids[:-128]), list(ids[-128:])
    _, kv = runner.prefill(ctx)
    if any(w is not None for w in runner.windows):
        kv = runner.window_kv(kv)
    kv = [(np.asarray(k, dtype=np.float32), np.asarray(v, dtype=np.float32)) for k, v in kv]
    return _Window(kv, cont, runner.score(kv, cont), runner.kv_nbytes_fp16(kv))


def _kl(runner: Any, w: _Window, restored) -> float:
    from ..quality import compare_logits

    lr = runner.score(restored, w.cont)
    return float(compare_logits(w.lo[:-1], lr[:-1])["kl"].mean())


def _round_trip(profile: Profile, kv, cfg) -> tuple[int, list]:
    data = pcodec.encode(kv, profile, cfg)
    out = pcodec.decode(data, profiles=[profile])
    return len(data), [(k.numpy(), v.numpy()) for k, v in out]


def _tensor_rd(profile: Profile, w: _Window, ws: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Coded size and MSE of each (layer, K/V) tensor alone at each width of ``ws``."""
    import cachegen

    starts = pcodec.layer_starts(w.kv)
    coeffs, _ = pcodec.forward(w.kv, profile, starts)
    L = len(coeffs)
    rate = np.zeros((L, 2, len(ws)))
    mse = np.zeros_like(rate)
    for i, pair in enumerate(coeffs):
        n = tf.sink_count(starts[i], pair[0].shape[2], profile.sinks)
        for j, y in enumerate(pair):
            for x, wd in enumerate(ws):
                cfg = width_config("fit", [wd], [wd])[0]
                data = cachegen.encode([(y, y)], cfg)     # the tensor twice: half is its size
                d = cachegen.decode(data)[0][0].numpy()
                rate[i, j, x] = len(data) / 2
                mse[i, j, x] = float(np.mean((d[:, :, n:] - y[:, :, n:]) ** 2))
    return rate, mse


def _sensitivity(runner: Any, profile: Profile, w: _Window, log: Log) -> np.ndarray:
    import cachegen

    cfg = cachegen.CodecConfig(name="fit", key_bits=BREF, value_bits=BREF, **pcodec._MODERN)
    _, rest = _round_trip(profile, w.kv, cfg)
    s = np.zeros((len(w.kv), 2))
    for i in range(len(w.kv)):
        for j in (0, 1):
            kv = list(w.kv)
            pair = list(kv[i])
            pair[j] = rest[i][j]
            kv[i] = tuple(pair)
            s[i, j] = _kl(runner, w, kv)
        _log(log, f"  sensitivity layer {i}: K {s[i, 0]:.2e} V {s[i, 1]:.2e}")
    return s


def allocation(sens: np.ndarray, rate: np.ndarray, mse: np.ndarray, lam: float, fp16: int,
               ws: Sequence[float] = BITS) -> tuple:
    """Per-tensor widths (of ``ws``, the last axis of ``rate``/``mse``) minimising
    ``s * mse(w)/mse(BREF) + lam * bytes(w)/fp16`` (Lagrangian)."""
    ws = list(ws)
    ref = ws.index(BREF)
    kb, vb = [], []
    for i in range(sens.shape[0]):
        for j, out in ((0, kb), (1, vb)):
            d = sens[i, j] * mse[i, j] / max(mse[i, j, ref], 1e-30)
            cost = d + lam * rate[i, j] / fp16
            out.append(ws[int(np.argmin(cost))])
    return tuple(kb), tuple(vb)


def fit_profile(model_name: str, runner: Any, text: Optional[str] = None, *, allocate: bool = True,
                bases: str = "holdout",
                max_tokens: int = 4096, sinks: int = 1, targets: Optional[Dict[str, Optional[float]]] = None,
                log: Log = None, margin: Optional[float] = None, width_step: float = WIDTH_STEP,
                trim: bool = True) -> Profile:
    """Fit a profile for ``runner``'s model on ``text`` (default: the shipped calibration text).

    ``allocate=False`` skips the model-in-the-loop bit allocation (seconds instead of minutes):
    the presets then use uniform widths (UNIFORM_PRESETS)."""
    from . import calibration_text

    import cachegen

    t_start = time.time()
    text = calibration_text() if text is None else text
    info = model_info(runner.model_dir, model_name)
    ids = runner.encode(text)[:max_tokens]
    if len(ids) < 16:
        raise InputError(f"calibration text too short ({len(ids)} tokens)")
    if bases not in BASES:
        raise InputError(f"bases must be one of {BASES}, got {bases!r}")
    holdout = bases != "in-sample"
    bids = basis_ids(ids) if holdout else list(ids)
    _log(log, f"[profile {model_name}] fitting bases on {len(bids)} of {len(ids)} calibration tokens "
              f"({'tuning windows left out' if holdout else 'tuning windows included'})")
    kb, vb = fit_bases(runner, bids, info)
    base = Profile(model=model_name, n_layers=info.n_layers, kv_heads=info.kv_heads, head_dim=info.head_dim,
                   rope_theta=tuple(info.rope_theta), key_basis=kb, value_basis=vb, sinks=sinks,
                   presets={n: ProfilePreset((k,) * info.n_layers, (v,) * info.n_layers)
                            for n, (k, v) in UNIFORM_PRESETS.items()},
                   info=dict(calibration_sha256=hashlib.sha256(text.encode()).hexdigest(),
                             calibration_tokens=len(ids), model_dir=str(runner.model_dir.name)))
    if not allocate:
        return base.with_presets(base.presets, fit_seconds=round(time.time() - t_start, 1), allocated=False)

    if margin is None:
        margin = DEFAULT_MARGIN if holdout else IN_SAMPLE_MARGIN
    tuned = tune_presets(base, runner, text, targets=targets, log=log, _ids=ids, _t0=t_start,
                         margin=margin, width_step=width_step, trim=trim)
    if bases == "cross-fit":
        # Cross-fit: the allocation was chosen with bases that never saw the tuning windows (so
        # its KL predicts unseen text); the shipped bases then use every calibration token,
        # which can only fit unseen text as well or better.
        _log(log, f"[profile {model_name}] final bases on all {len(ids)} calibration tokens")
        kb, vb = fit_bases(runner, ids, info)
        tuned = replace(tuned, key_basis=kb, value_basis=vb, info={**tuned.info, "final_bases": "all"})
    return tuned


WINDOW_STARTS = (0, 2048)   # tuning windows: 1,024-token contexts + 128-token continuations
WINDOW_LEN = 1152


def basis_ids(ids: Sequence[int]) -> List[int]:
    """The calibration tokens the bases are fitted on: those outside the tuning windows, so that
    the bit allocation is tuned on windows the bases never saw (held-out-like), when the text
    leaves at least 1,024 such tokens; else all of it (short custom texts)."""
    ids = list(ids)
    keep = [True] * len(ids)
    for s in WINDOW_STARTS:
        if s + WINDOW_LEN <= len(ids):
            keep[s:s + WINDOW_LEN] = [False] * WINDOW_LEN
    rest = [t for t, k in zip(ids, keep) if k]
    return rest if len(rest) >= 1024 else ids


def _windows(runner: Any, ids: Sequence[int]) -> List[_Window]:
    """Calibration windows: 1,024-token contexts + 128-token continuations."""
    wins = [_window(runner, ids[s:s + WINDOW_LEN]) for s in WINDOW_STARTS if s + WINDOW_LEN <= len(ids)]
    if not wins:
        n = len(ids)
        if n < 160:
            raise InputError(f"calibration text too short for bit allocation ({n} tokens)")
        wins = [_window(runner, ids[:n])]
    return wins


def tune_presets(profile: Profile, runner: Any, text: Optional[str] = None, *,
                 targets: Optional[Dict[str, Optional[float]]] = None, log: Log = None,
                 max_tokens: int = 4096, remeasure: bool = False, margin: float = DEFAULT_MARGIN,
                 width_step: float = WIDTH_STEP, trim: bool = True, _ids: Optional[Sequence[int]] = None,
                 _t0: Optional[float] = None) -> Profile:
    """(Re)run the bit allocation of a profile's presets (bases unchanged). The per-tensor
    sensitivities stored in ``profile.info`` are reused when present."""
    from . import calibration_text

    import cachegen

    t_start = time.time() if _t0 is None else _t0
    base = profile
    ids = list(_ids) if _ids is not None else runner.encode(calibration_text() if text is None else text)[:max_tokens]
    wins = _windows(runner, ids)
    model_name = profile.model
    _log(log, f"[profile {model_name}] per-tensor rate/MSE and sensitivity on {len(wins)} window(s)")
    ws = widths(width_step)
    rate, mse = _tensor_rd(base, wins[0], ws)
    if (not remeasure and "sensitivity_k" in profile.info
            and len(profile.info["sensitivity_k"]) == profile.n_layers):
        sens = np.stack([np.asarray(profile.info["sensitivity_k"]), np.asarray(profile.info["sensitivity_v"])], axis=1)
    else:   # mean over the calibration windows: one window's ranking transfers poorly (Gemma-3)
        sens = np.mean([_sensitivity(runner, base, w, log) for w in wins], axis=0)

    memo: Dict[tuple, tuple] = {}   # the presets' bisections share their first steps

    def measure(cfg) -> tuple[float, float]:
        key = (tuple(cfg.key_bits), tuple(cfg.value_bits), cfg.key_step_gain, cfg.value_step_gain,
               cfg.chunk_tokens, cfg.channels_per_stream)
        if key in memo:
            return memo[key]
        kls, ratios = [], []
        for w in wins:
            nb, rest = _round_trip(base, w.kv, cfg)
            kls.append(_kl(runner, w, rest))
            ratios.append(w.fp16 / nb)
        memo[key] = (float(np.mean(kls)), float(np.mean(ratios)))
        return memo[key]

    def std_default_kl() -> float:
        kls = []
        for w in wins:
            rest = cachegen.decode(cachegen.encode(w.kv, "default"))
            kls.append(_kl(runner, w, [(k.numpy(), v.numpy()) for k, v in rest]))
        return float(np.mean(kls))

    presets: Dict[str, ProfilePreset] = dict(profile.presets)
    fp16 = wins[0].fp16
    for name, target in (targets or PRESET_TARGETS).items():
        if target is None:
            target = margin * std_default_kl()
            _log(log, f"  {name}: target = {margin} x KL of 'default' on the calibration windows = {target:.4f}")
        lo, hi = math.log(1e-4), math.log(3.0)   # log lambda: small = more bits
        best = None
        for _ in range(BISECTIONS):
            mid = 0.5 * (lo + hi)
            cfg, kbits, vbits, kg, vg = width_config(name, *allocation(sens, rate, mse, math.exp(mid), fp16, ws))
            kl, ratio = measure(cfg)
            _log(log, f"  {name}: lambda {math.exp(mid):.2e} -> x{ratio:.2f} KL {kl:.4f}")
            if kl <= target:
                lo = mid
                if best is None or ratio > best.calib_ratio:
                    best = ProfilePreset(kbits, vbits, kl, ratio, target, kg, vg, _codec_fields())
            else:
                hi = mid
        if best is None:   # nothing met the target: the most precise allocation tried
            cfg, kbits, vbits, kg, vg = width_config(name, *allocation(sens, rate, mse, math.exp(lo), fp16, ws))
            kl, ratio = measure(cfg)
            best = ProfilePreset(kbits, vbits, kl, ratio, target, kg, vg, _codec_fields())
        elif trim and best.key_gain is None and best.value_gain is None:
            L = len(best.key_bits)
            for g in TRIM_GAINS:   # KL grows with the gain: stop at the first miss
                trial = replace(best, key_gain=(g,) * L, value_gain=(g,) * L)
                kl, ratio = measure(pcodec.config_of(name, trial))
                _log(log, f"  {name}: trim gain {g:.2f} -> x{ratio:.2f} KL {kl:.4f}")
                if kl > target:
                    break
                if ratio > best.calib_ratio:
                    best = replace(trial, calib_kl=kl, calib_ratio=ratio)
        presets[name] = best
        _log(log, f"  {name}: K{list(best.key_bits)} V{list(best.value_bits)} x{best.calib_ratio:.2f} "
                  f"KL {best.calib_kl:.4f}" + ("" if best.key_gain is None and best.value_gain is None
                                               else " (fractional widths)"))
    return base.with_presets(presets, fit_seconds=round(time.time() - t_start, 1), allocated=True,
                             width_step=width_step, trim=trim, margin=margin, codec=dict(PROFILE_CODEC),
                             allocation_targets={**dict(profile.info.get("allocation_targets") or {}),
                                                 **(targets or PRESET_TARGETS)},
                             sensitivity_k=[float(x) for x in sens[:, 0]],
                             sensitivity_v=[float(x) for x in sens[:, 1]])
