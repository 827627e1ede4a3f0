"""Rate-distortion sweep on your own KV cache: size vs error for several presets (``cachegen rd``).

    res = sweep(kv, ["high", "default", "small", "tiny"])      # kv: [(key, value)] per layer
    print(format_table(res)); plot(res, "rd.png")

Per preset: compressed bytes, ratio vs fp16, bits per value, encode/decode time and the
reconstruction error (relative RMS error of keys and of values, worst absolute error). With a
``runner`` (an ``OrtRunner`` of the model the cache came from) and ``heldout`` token ids (the
tokens that follow the cached context), also the model-level quality of the restored cache:
mean/max KL to the original cache's next-token distributions, relative perplexity change and
top-1 agreement (teacher-forced, :func:`cachegen.quality.evaluate_kv`).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .errors import InputError

__all__ = ["RDPoint", "RDResult", "sweep", "format_table", "plot", "DEFAULT_PRESETS"]

DEFAULT_PRESETS = ("high", "fine", "default", "small", "tiny", "cachegen-paper", "lossless")


@dataclass
class RDPoint:
    preset: str
    bytes: int
    ratio_vs_fp16: float
    bits_per_value: float
    key_rel_rmse: float          # sqrt(sum (K' - K)^2 / sum K^2) over all layers
    value_rel_rmse: float
    max_abs_error: float
    encode_s: float
    decode_s: float
    kl_mean: Optional[float] = None
    kl_max: Optional[float] = None
    delta_ppl_rel: Optional[float] = None
    top1_agreement: Optional[float] = None


@dataclass
class RDResult:
    layers: int
    tokens: int                  # the longest layer's
    values: int                  # elements in the cache (keys + values)
    fp16_bytes: int
    dtype: str
    points: list[RDPoint] = field(default_factory=list)
    model: Optional[str] = None
    heldout_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _np32(x: Any) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _dtype_name(x: Any) -> str:
    return str(getattr(x, "dtype", "?")).replace("torch.", "")


def sweep(kv: Sequence[Sequence[Any]], presets: Optional[Sequence[Any]] = None, *, runner: Any = None,
          heldout: Optional[Sequence[int]] = None, model: Optional[str] = None,
          progress: Optional[Callable[[int, int], None]] = None) -> RDResult:
    """Encode + decode ``kv`` with each preset (names or CodecConfigs) and measure it."""
    import cachegen

    presets = list(presets or DEFAULT_PRESETS)
    cfgs = [cachegen.get_config(p) for p in presets]       # unknown names fail before any work
    if not kv:
        raise InputError("the KV cache has no layers")
    if (runner is None) != (heldout is None):
        raise InputError("model quality needs both a runner and the held-out token ids")
    if heldout is not None and len(heldout) < 2:
        raise InputError("the held-out continuation needs at least 2 tokens")
    if runner is not None and len(kv) != int(runner.num_layers):
        raise InputError(f"the cache has {len(kv)} layers, the model {runner.num_layers}")
    orig = [(_np32(k), _np32(v)) for k, v in kv]
    values = sum(k.size + v.size for k, v in orig)
    res = RDResult(layers=len(orig), tokens=max(k.shape[2] for k, _ in orig), values=values,
                   fp16_bytes=2 * values, dtype=_dtype_name(kv[0][0]), model=model,
                   heldout_tokens=0 if heldout is None else len(heldout))
    ksq = sum(float(np.square(k, dtype=np.float64).sum()) for k, _ in orig)
    vsq = sum(float(np.square(v, dtype=np.float64).sum()) for _, v in orig)
    # one small encode first, so the first preset's time does not include one-off start-up costs
    cachegen.decode(cachegen.encode([(k[:, :, :16], v[:, :, :16]) for k, v in kv[:1]], cfgs[0]))
    for n, (name, cfg) in enumerate(zip(presets, cfgs)):
        if progress:
            progress(n, len(cfgs))
        t = time.perf_counter()
        data = cachegen.encode(kv, cfg)
        enc_s = time.perf_counter() - t
        t = time.perf_counter()
        restored = cachegen.decode(data)
        dec_s = time.perf_counter() - t
        kerr = verr = 0.0
        worst = 0.0
        for (k, v), (k2, v2) in zip(orig, restored):
            dk, dv = _np32(k2) - k, _np32(v2) - v
            kerr += float(np.square(dk, dtype=np.float64).sum())
            verr += float(np.square(dv, dtype=np.float64).sum())
            worst = max(worst, float(np.abs(dk).max(initial=0)), float(np.abs(dv).max(initial=0)))
        p = RDPoint(preset=name if isinstance(name, str) else cfg.name, bytes=len(data),
                    ratio_vs_fp16=2 * values / len(data), bits_per_value=8 * len(data) / values,
                    key_rel_rmse=math.sqrt(kerr / ksq) if ksq else 0.0,
                    value_rel_rmse=math.sqrt(verr / vsq) if vsq else 0.0, max_abs_error=worst,
                    encode_s=enc_s, decode_s=dec_s)
        if runner is not None:
            from .quality import evaluate_kv
            q = evaluate_kv(runner, kv, restored, [int(t) for t in heldout], generate_tokens=0)
            p.kl_mean, p.kl_max = q.kl_mean, q.kl_max
            p.delta_ppl_rel, p.top1_agreement = q.delta_ppl_rel, q.top1_agreement
        res.points.append(p)
    if progress:
        progress(len(cfgs), len(cfgs))
    return res


def format_table(res: RDResult) -> str:
    q = any(p.kl_mean is not None for p in res.points)
    head = (f"{res.layers} layers, {res.tokens} tokens, {res.values} values ({res.dtype}); "
            f"fp16 size {res.fp16_bytes} bytes" + (f"; quality on {res.heldout_tokens} held-out tokens "
                                                     f"of {res.model}" if q else ""))
    cols = f"{'preset':<16}{'bytes':>11}{'ratio':>8}{'bits/val':>9}{'K rel.err':>11}{'V rel.err':>11}" \
           f"{'max |err|':>11}{'enc s':>7}{'dec s':>7}"
    if q:
        cols += f"{'KL mean':>10}{'KL max':>10}{'dppl %':>9}{'top-1 %':>9}"
    lines = [head, cols]
    for p in sorted(res.points, key=lambda p: -p.bytes):
        s = (f"{p.preset:<16}{p.bytes:>11}{p.ratio_vs_fp16:>8.2f}{p.bits_per_value:>9.3f}"
             f"{p.key_rel_rmse:>11.2e}{p.value_rel_rmse:>11.2e}{p.max_abs_error:>11.2e}"
             f"{p.encode_s:>7.2f}{p.decode_s:>7.2f}")
        if q and p.kl_mean is not None:
            s += (f"{p.kl_mean:>10.2e}{p.kl_max:>10.2e}{100 * p.delta_ppl_rel:>+9.3f}"
                  f"{100 * p.top1_agreement:>9.2f}")
        lines.append(s)
    return "\n".join(lines)


def _label_all(ax, pts, ys) -> None:
    for p, y in zip(pts, ys):
        ax.annotate(p.preset, (p.bits_per_value, y), textcoords="offset points", xytext=(5, 4), fontsize=8)


def plot(res: RDResult, path: str, title: Optional[str] = None) -> None:
    """Draw the rate-distortion picture: reconstruction error vs bits per value, and with quality
    results also mean KL and perplexity change vs bits per value. Presets are points (they are
    not one family, so no lines join them); exact (lossless) presets are listed in a note."""
    from ._deps import require

    mpl = require("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    q = any(p.kl_mean is not None for p in res.points)
    pts = sorted(res.points, key=lambda p: p.bits_per_value)
    lossy = [p for p in pts if p.key_rel_rmse > 0 or p.value_rel_rmse > 0]
    exact = [p for p in pts if p not in lossy]
    n = 3 if q else 1
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.6), squeeze=False)
    ax = axes[0][0]
    x = [p.bits_per_value for p in lossy]
    ax.plot(x, [p.key_rel_rmse for p in lossy], "o", ms=7, label="keys")
    ax.plot(x, [p.value_rel_rmse for p in lossy], "s", ms=7, label="values")
    _label_all(ax, lossy, [max(p.key_rel_rmse, p.value_rel_rmse) for p in lossy])
    ax.set_yscale("log")
    ax.set_xlabel("bits per value (compressed size / values)")
    ax.set_ylabel("relative RMS error")
    ax.set_title("reconstruction error")
    ax.legend(loc="upper right", fontsize=8)
    if q:
        qp = [p for p in lossy if p.kl_mean is not None]
        xs = [p.bits_per_value for p in qp]
        ax2 = axes[0][1]
        kl = [max(p.kl_mean, 1e-12) for p in qp]
        ax2.plot(xs, kl, "o", ms=7, color="C2")
        _label_all(ax2, qp, kl)
        ax2.set_yscale("log")
        ax2.set_xlabel("bits per value")
        ax2.set_ylabel("mean KL(original || restored), nats")
        ax2.set_title(f"next-token KL ({res.model}, {res.heldout_tokens} held-out tokens)", fontsize=10)
        ax3 = axes[0][2]
        dp = [100 * p.delta_ppl_rel for p in qp]
        ax3.plot(xs, dp, "s", ms=7, color="C3")
        _label_all(ax3, qp, dp)
        ax3.axhline(0, color="k", lw=0.6, alpha=0.5)
        ax3.set_xlabel("bits per value")
        ax3.set_ylabel("perplexity change (%)")
        ax3.set_title("perplexity change", fontsize=10)
    for row in axes:
        for a in row:
            a.grid(True, which="both", alpha=0.3)
            lo, hi = a.get_xlim()
            a.set_xlim(lo, hi + 0.2 * (hi - lo))        # room for the labels of the right-most points
    note = "; ".join(f"{p.preset}: {p.bits_per_value:.2f} bits/value, exact" for p in exact)
    fig.suptitle((title or f"cachegen rate-distortion: {res.layers} layers x {res.tokens} tokens "
                           f"({res.dtype}); fp16 = 16 bits/value") + (f"\n{note}" if note else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main_rd(a: Any) -> int:
    """``cachegen rd`` (arguments parsed by cachegen.cli)."""
    import json

    from . import cli
    from .npz import read_kv_npz

    presets = [p.strip() for p in a.presets.split(",") if p.strip()] if a.presets else list(DEFAULT_PRESETS)
    if not presets:
        raise cli.CliError("--presets is empty", cli.EXIT_USAGE)
    import cachegen
    for p in presets:
        cachegen.get_config(p)
    if a.plot:
        from ._deps import require
        require("matplotlib")
    if a.input != "-":
        cli._check_input(a.input)
    arrays = read_kv_npz(cli._read_input(a.input), a.input)
    runner = None
    if a.model:
        if arrays.heldout is None:
            raise cli.CliError(f"{a.input}: --model needs the held-out token ids that follow the cached context "
                               "(an int array 'heldout' in the npz)", cli.EXIT_DATA)
        cli._check_model_env(a.model, "fp32", "cpu", a.cache_dir)
        from .ort.export import export_model
        from .ort.runner import OrtRunner
        runner = OrtRunner(export_model(a.model, "fp32", "cpu", cache_dir=a.cache_dir, progress=False), "cpu")
    bar = cli.Progress("rd", a.progress, unit="preset")
    try:
        res = sweep(arrays.kv, presets, runner=runner, heldout=arrays.heldout if runner else None,
                    model=a.model, progress=bar)
    finally:
        bar.close()
    if a.plot:
        try:
            plot(res, a.plot)
        except OSError as e:
            raise cli.CliError(f"{a.plot}: cannot write ({e.strerror or e})", cli.EXIT_ENV) from None
    if a.json:
        print(json.dumps(res.to_dict(), indent=1))
    else:
        print(format_table(res))
        if a.plot:
            print(f"plot written to {a.plot}")
    return cli.EXIT_OK
