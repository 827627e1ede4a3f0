"""Held-out tiny-p with rounding biased toward each channel's median (an RDOQ-style deadzone,
encoder-only: the decoder is unchanged) against a uniform step gain, the other way to trade
ratio for KL. Usage: python benches/rd_deadzone_lab.py gemma3 tiny-p 0:1,0.05:1,0:1.02
(variants THETA:GAIN; bench_rd's three held-out domains, 1K context, score only)."""
import dataclasses, sys, json, os
import numpy as np
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import bench_rd as B
from cachegen import profile as cp
from cachegen.profile import codec as pc, shipped_profile
from cachegen.codec import quantize as Q
model = sys.argv[1]; preset = sys.argv[2]
variants = [tuple(map(float, v.split(":"))) for v in sys.argv[3].split(",")]  # theta:gain
orig = Q.quantize
THETA = [0.0]
def biased(x, lo, step, bits):
    th = THETA[0]
    if th == 0:
        return orig(x, lo, step, bits)
    lo32 = lo.astype(np.float32)[:, None]; st32 = step.astype(np.float32)[:, None]
    safe = np.where(st32 > 0, st32, np.float32(1))
    u = (x - lo32) / safe
    c = np.rint(np.median(u, axis=1, keepdims=True))
    d = u - c
    u = c + np.sign(d) * np.maximum(np.abs(d) - th, 0)
    np.rint(u, out=u); np.clip(u, 0, (1 << bits) - 1, out=u)
    u[np.broadcast_to(st32 == 0, u.shape)] = 0
    return u.astype(np.int32)
Q.quantize = biased
runner = B.make_runner(model, threads=2)
prof = shipped_profile(model)
base = pc.preset_config(prof, preset)
rows = {}
cases = [B.Case(runner, model, dom, runner.encode(B.TEXT_SOURCES[dom]()), 1024, 128, generate=0) for dom in ('prose', 'code', 'structured')]
for th, g in variants:
    THETA[0] = th
    cfg = base
    if g != 1.0:
        L = len(prof.presets[preset].key_bits)
        kgs, vgs = cfg.layer_gains(L)
        kg = tuple(x * g for x in kgs)
        vg = tuple(x * g for x in vgs)
        cfg = dataclasses.replace(cfg, key_step_gain=kg, value_step_gain=vg)
    for case in cases:
        data = cp.encode(case.kv, prof, cfg); rest = cp.decode(data, profiles=prof)
        q = case.quality(rest, score_only=True)
        rows.setdefault((th, g), []).append((case.fp16 / len(data), q['kl_mean'], q['delta_ppl_rel']))
    a = np.array(rows[(th, g)])
    print(f'{model} {preset} theta {th} gain {g}: x{a[:,0].mean():.3f} KL mean {a[:,1].mean():.4f} worst {a[:,1].max():.4f} dppl {100*a[:,2].mean():+.2f}%  per-domain KL {np.round(a[:,1],4).tolist()}', flush=True)
