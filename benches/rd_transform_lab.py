"""Research harness for issue 13 (transform coding): measure each profile technique on/off.

Not a pytest bench: a script whose numbers go into benches/rd_profile_notes.md. KV dumps and the
original logits are cached under $CACHEGEN_LAB_DIR (default /work/team/kvcache/D) so a variant
costs one encode + decode + one teacher-forced score.

    python benches/rd_transform_lab.py prep smollm2          # dump calibration + eval caches
    python benches/rd_transform_lab.py grid smollm2 ...      # variants x bit pairs on the eval windows

Calibration (fit) text: cachegen/data/calibration_text.txt (shipped, CC0). Eval windows: the
bench_rd sweep domains (prose GPL-3, code argparse.py, structured /etc/services), 1,024-token
context, 128-token continuation; tuning windows: two 1,024-token windows of the calibration text.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
LAB = Path(os.environ.get("CACHEGEN_LAB_DIR", "/work/team/kvcache/D"))
_spec = importlib.util.spec_from_file_location("bench_rd", HERE / "bench_rd.py")
rd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rd)

CTX, CONT = 1024, 128
_RUNNERS: dict = {}


def runner(model: str):
    if model not in _RUNNERS:
        _RUNNERS.clear()
        _RUNNERS[model] = rd.make_runner(model)
    return _RUNNERS[model]


def calib_ids(model: str) -> list:
    from cachegen.profile import calibration_text
    return runner(model).encode(calibration_text())


def _save_kv(path: Path, kv, **extra) -> None:
    arrs = {}
    for i, (k, v) in enumerate(kv):
        arrs[f"k{i}"] = np.asarray(k, dtype=np.float32)
        arrs[f"v{i}"] = np.asarray(v, dtype=np.float32)
    np.savez(path, **arrs, **extra)


def _load_kv(path: Path):
    z = np.load(path)
    n = sum(1 for f in z.files if f.startswith("k") and f[1:].isdigit())
    kv = [(z[f"k{i}"], z[f"v{i}"]) for i in range(n)]
    return kv, {f: z[f] for f in z.files if not (f[:1] in "kv" and f[1:].isdigit())}


def calib_kv(model: str):
    p = LAB / f"{model}_calib.npz"
    if not p.is_file():
        r = runner(model)
        ids = calib_ids(model)
        t0 = time.perf_counter()
        _, kv = r.prefill(ids)
        print(f"calib prefill {len(ids)} tokens {time.perf_counter() - t0:.1f}s", flush=True)
        _save_kv(p, kv)
    return _load_kv(p)[0]


def windows(model: str) -> dict:
    """name -> (ctx ids, cont ids)."""
    r = runner(model)
    out = {}
    for d in ("prose", "code", "structured"):
        ids = r.encode(rd.TEXT_SOURCES[d]())
        out[d] = (ids[:CTX], ids[CTX:CTX + CONT])
    cid = calib_ids(model)
    out["calib0"] = (cid[:CTX], cid[CTX:CTX + CONT])
    out["calib1"] = (cid[2048:2048 + CTX], cid[2048 + CTX:2048 + CTX + CONT])
    return out


class Case:
    def __init__(self, model: str, name: str):
        self.model, self.name = model, name
        p = LAB / f"{model}_{name}.npz"
        r = runner(model)
        ctx, cont = windows(model)[name]
        self.cont = cont
        if not p.is_file():
            _, kv = r.prefill(ctx)
            if any(w is not None for w in r.windows):
                kv = r.window_kv(kv)
            lo = r.score(kv, cont)
            _save_kv(p, kv, lo=lo)
        self.kv, extra = _load_kv(p)
        self.lo = extra["lo"]
        self.total = max(k.shape[2] for k, _ in self.kv)
        self.starts = [self.total - k.shape[2] for k, _ in self.kv]
        self.fp16 = r.kv_nbytes_fp16(self.kv)

    def kl(self, restored) -> dict:
        from cachegen.quality import compare_logits
        lr = runner(self.model).score(restored, self.cont)
        c = compare_logits(self.lo[:-1], lr[:-1], self.cont[1:])
        return dict(kl=float(c["kl"].mean()), top1=float(c["top1"]),
                    dnll=float(c["nll_restored"].mean() - c["nll_original"].mean()))


def prep(model: str) -> None:
    calib_kv(model)
    for name in windows(model):
        t0 = time.perf_counter()
        Case(model, name)
        print(f"{model} {name} ready {time.perf_counter() - t0:.1f}s", flush=True)


# ------------------------------------------------------------------ variants
VARIANTS = {
    # name: (pca_k, pca_v, key_rope, center, sinks)
    "raw": (False, False, False, True, 0),
    "rope": (False, False, True, True, 0),
    "pca": (True, True, False, True, 0),
    "pcaK": (True, False, False, True, 0),
    "pcaV": (False, True, False, True, 0),
    "pca+rope": (True, True, True, True, 0),
    "pca+rope-nocenter": (True, True, True, False, 0),
    "sink1": (False, False, False, True, 1),
    "sink4": (False, False, False, True, 4),
    "pca+rope+sink1": (True, True, True, True, 1),
    "pca+rope+sink4": (True, True, True, True, 4),
}
_FITS: dict = {}


def parse_variant(name: str) -> tuple:
    """'raw' or '+'-joined flags: pca (K and V), pcaK, pcaV, rope, nc (no centering), sinkN."""
    if name in VARIANTS:
        return VARIANTS[name]
    pk = pv = rope = False
    center, sinks = True, 0
    for f in name.split("+"):
        if f == "pca":
            pk = pv = True
        elif f == "pcaK":
            pk = True
        elif f == "pcaV":
            pv = True
        elif f == "rope":
            rope = True
        elif f == "nc":
            center = False
        elif f.startswith("sink"):
            sinks = int(f[4:])
        elif f != "raw":
            raise ValueError(f"unknown flag {f!r}")
    VARIANTS[name] = (pk, pv, rope, center, sinks)
    return VARIANTS[name]


def model_info(model: str):
    from cachegen.profile.modelinfo import model_info as mi
    return mi(runner(model).model_dir, model)


def fitted(model: str, var: str):
    from cachegen.profile import transform as tf
    pk, pv, rope, center, _ = parse_variant(var)
    key = (model, pk, pv, rope, center)
    if key not in _FITS:
        if not (pk or pv):
            _FITS[key] = ([None] * model_info(model).n_layers,) * 2
        else:
            kb, vb = tf.fit_bases(calib_kv(model), model_info(model).rope_theta, keys=pk, values=pv,
                                  key_rope=rope, center=center)
            _FITS[key] = (kb, vb)
    return _FITS[key]


def code(case: "Case", var: str, kbits, vbits, cfg_extra=None):
    """Transform, encode with the standard codec, decode, invert; returns (nbytes, restored)."""
    import dataclasses
    import cachegen
    from cachegen.profile import transform as tf
    pk, pv, rope, center, sinks = parse_variant(var)
    kb, vb = fitted(case.model, var)
    th = model_info(case.model).rope_theta
    coeffs, exact, extra_bytes = [], [], 0
    for i, (k, v) in enumerate(case.kv):
        t = th[i] if rope else None
        yk = tf.forward_tensor(k, case.starts[i], t, kb[i])
        yv = tf.forward_tensor(v, case.starts[i], None, vb[i])
        n = tf.sink_count(case.starts[i], k.shape[2], sinks)
        if n:
            exact.append((i, n, k[:, :, :n].astype(np.float16), v[:, :, :n].astype(np.float16)))
            extra_bytes += 2 * 2 * k[:, :, :n].size
            yk, yv = tf.cut_sinks(yk, n), tf.cut_sinks(yv, n)
        coeffs.append((yk, yv))
    cfg = cachegen.CodecConfig(name="lab", key_bits=kbits if isinstance(kbits, int) else tuple(kbits),
                               value_bits=vbits if isinstance(vbits, int) else tuple(vbits),
                               group_size=1, token_scaling=True, scale_sharing=1.0, **(cfg_extra or {}))
    data = cachegen.encode(coeffs, cfg)
    dec = cachegen.decode(data)
    out = []
    for i, (yk, yv) in enumerate(dec):
        t = th[i] if rope else None
        k = tf.inverse_tensor(yk.numpy(), case.starts[i], t, kb[i])
        v = tf.inverse_tensor(yv.numpy(), case.starts[i], None, vb[i])
        out.append([k, v])
    for i, n, ke, ve in exact:
        out[i][0][:, :, :n] = ke
        out[i][1][:, :, :n] = ve
    return len(data) + extra_bytes, [tuple(p) for p in out]


def log_row(row: dict) -> None:
    with open(LAB / "lab_results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def grid(model: str, variants, bitpairs, cases, tag: str = "") -> None:
    cs = [Case(model, c) for c in cases]
    for var in variants:
        for kbits, vbits in bitpairs:
            rows = []
            for c in cs:
                t0 = time.perf_counter()
                nb, rest = code(c, var, kbits, vbits)
                q = c.kl(rest)
                row = dict(model=model, case=c.name, var=var, kbits=kbits, vbits=vbits, tag=tag,
                           nbytes=nb, bits=16.0 * nb / c.fp16, ratio=c.fp16 / nb, **q,
                           s=round(time.perf_counter() - t0, 1))
                log_row(row)
                rows.append(row)
            print(f"{model} {var:22s} K{kbits}V{vbits} x{np.mean([r['ratio'] for r in rows]):5.2f} "
                  f"bits {np.mean([r['bits'] for r in rows]):.3f} KL {np.mean([r['kl'] for r in rows]):.4f} "
                  "[" + " ".join("%.4f" % r["kl"] for r in rows) + f"] {rows[-1]['s']}s", flush=True)


# ------------------------------------------------------------------ allocation
def coefficients(case: "Case", var: str):
    """The coded tensors of a variant (sinks cut) and the exact cache, per layer."""
    from cachegen.profile import transform as tf
    pk, pv, rope, center, sinks = parse_variant(var)
    kb, vb = fitted(case.model, var)
    th = model_info(case.model).rope_theta
    out = []
    for i, (k, v) in enumerate(case.kv):
        yk = tf.forward_tensor(k, case.starts[i], th[i] if rope else None, kb[i])
        yv = tf.forward_tensor(v, case.starts[i], None, vb[i])
        n = tf.sink_count(case.starts[i], k.shape[2], sinks)
        out.append((tf.cut_sinks(yk, n), tf.cut_sinks(yv, n), n))
    return out


def tensor_rd(case: "Case", var: str, bits=range(2, 10)) -> dict:
    """Per (layer, K/V) tensor and bit width: coded bytes (alone, [(X, X)] halved) and MSE."""
    import cachegen
    co = coefficients(case, var)
    rate = np.zeros((len(co), 2, max(bits) + 1))
    mse = np.zeros_like(rate)
    for i, (yk, yv, n) in enumerate(co):
        for j, y in enumerate((yk, yv)):
            for b in bits:
                cfg = cachegen.CodecConfig(name="lab", key_bits=b, value_bits=b, group_size=1,
                                           token_scaling=True, scale_sharing=1.0)
                data = cachegen.encode([(y, y)], cfg)
                d = cachegen.decode(data)[0][0].numpy()
                rate[i, j, b] = len(data) / 2
                mse[i, j, b] = float(np.mean((d[:, :, n:] - y[:, :, n:]) ** 2))
    return dict(rate=rate, mse=mse)


def sensitivity(case: "Case", var: str, bref: int = 5) -> np.ndarray:
    """KL when only one tensor is coded at ``bref`` bits (the rest exact): [layers, 2]."""
    nb, rest = code(case, var, bref, bref)
    s = np.zeros((len(case.kv), 2))
    for i in range(len(case.kv)):
        for j in (0, 1):
            kv = [tuple(p) for p in case.kv]
            pair = list(kv[i])
            pair[j] = rest[i][j]
            kv[i] = tuple(pair)
            s[i, j] = case.kl(kv)["kl"]
    return s


def allocate(sens: np.ndarray, rd: dict, lam: float, bref: int = 5, bmin: int = 2, bmax: int = 9):
    """Per tensor: argmin_b sens * mse(b)/mse(bref) + lam * rate(b) (KL ~ additive, ~ MSE)."""
    rate, mse = rd["rate"], rd["mse"]
    kb, vb = [], []
    for i in range(sens.shape[0]):
        for j, out in ((0, kb), (1, vb)):
            bs = np.arange(bmin, bmax + 1)
            cost = sens[i, j] * mse[i, j, bs] / max(mse[i, j, bref], 1e-30) + lam * rate[i, j, bs]
            out.append(int(bs[np.argmin(cost)]))
    return kb, vb


def fit_alloc(model: str, var: str, bref: int = 5) -> dict:
    p = LAB / f"{model}_alloc_{var}_{bref}.npz"
    if p.is_file():
        z = np.load(p)
        return dict(sens=z["sens"], rate=z["rate"], mse=z["mse"])
    c = Case(model, "calib0")
    t0 = time.perf_counter()
    rd_ = tensor_rd(c, var)
    print(f"tensor rd {time.perf_counter() - t0:.0f}s", flush=True)
    sens = sensitivity(c, var, bref)
    print(f"sensitivity {time.perf_counter() - t0:.0f}s", flush=True)
    np.savez(p, sens=sens, **rd_)
    return dict(sens=sens, **rd_)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd")
    ap.add_argument("model")
    a, rest = ap.parse_known_args(argv)
    if a.cmd == "prep":
        prep(a.model)
    elif a.cmd == "grid":
        g = argparse.ArgumentParser()
        g.add_argument("--vars", nargs="+", default=["raw"])
        g.add_argument("--bits", nargs="+", default=["7/5"])
        g.add_argument("--cases", nargs="+", default=["prose", "code", "structured"])
        g.add_argument("--tag", default="")
        b = g.parse_args(rest)
        pairs = [tuple(int(x) for x in s.split("/")) for s in b.bits]
        grid(a.model, b.vars, pairs, b.cases, b.tag)
    elif a.cmd == "alloc":
        g = argparse.ArgumentParser()
        g.add_argument("--var", default="pca+rope+nc+sink1")
        g.add_argument("--lams", nargs="+", type=float, default=[1e-6])
        g.add_argument("--cases", nargs="+", default=["prose", "code", "structured"])
        g.add_argument("--bref", type=int, default=5)
        g.add_argument("--tag", default="alloc")
        b = g.parse_args(rest)
        fa = fit_alloc(a.model, b.var, b.bref)
        cs = [Case(a.model, c) for c in b.cases]
        for lam in b.lams:
            kb, vb = allocate(fa["sens"], fa, lam, b.bref)
            rows = []
            for c in cs:
                nb, rest_ = code(c, b.var, kb, vb)
                q = c.kl(rest_)
                row = dict(model=a.model, case=c.name, var=b.var, kbits=kb, vbits=vb, lam=lam, tag=b.tag,
                           nbytes=nb, bits=16.0 * nb / c.fp16, ratio=c.fp16 / nb, **q)
                log_row(row)
                rows.append(row)
            print(f"{a.model} {b.var} lam {lam:.2e} K{kb} V{vb} x{np.mean([r['ratio'] for r in rows]):5.2f} "
                  f"bits {np.mean([r['bits'] for r in rows]):.3f} KL {np.mean([r['kl'] for r in rows]):.4f} "
                  "[" + " ".join("%.4f" % r["kl"] for r in rows) + "]", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
