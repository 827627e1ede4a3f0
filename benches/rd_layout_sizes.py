"""Sizes of profile presets under KL-neutral stream layouts (channels per stream, tables per
class) on bench_rd's three held-out domains at 1K; the decoded cache of one variant is checked
bit-identical to the shipped layout's (so KL does not move).

    python benches/rd_layout_sizes.py gemma3 tiny-p,default-p
"""
import dataclasses, sys, json, time
import numpy as np
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))
import bench_rd as B
from cachegen import profile as cp
from cachegen.profile import codec as pc, shipped_profile
import cachegen
model = sys.argv[1]; presets = sys.argv[2].split(',')
variants = [(4, 16), (8, 16), (4, 32), (8, 32), (16, 16), (16, 32), (32, 32), (64, 64)]
runner = B.make_runner(model, threads=2)
prof = shipped_profile(model)
out = {}
for dom in ('prose', 'code', 'structured'):
    ids = runner.encode(B.TEXT_SOURCES[dom]())[:1024]
    _, kvf = runner.prefill(ids)
    kv = runner.window_kv(kvf)
    fp16 = runner.kv_nbytes_fp16(kv)
    for p in presets:
        base = pc.preset_config(prof, p)
        ref = None
        for cps, tb in variants:
            cfg = dataclasses.replace(base, channels_per_stream=cps, tables_per_class=tb)
            data = cp.encode(kv, prof, cfg)
            if ref is None:
                ref = cp.decode(data, profiles=prof)
            elif (cps, tb) in ((16, 32),):
                dec = cp.decode(data, profiles=prof)
                same = all(np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and np.array_equal(np.asarray(a[1]), np.asarray(b[1])) for a, b in zip(ref, dec))
                assert same, 'decoded differs'
            out.setdefault(p, {}).setdefault(f'{cps}/{tb}', []).append(fp16 / len(data))
for p, d in out.items():
    base = np.mean(d['4/16'])
    print(model, p, ' '.join(f'{k}: x{np.mean(v):.3f} ({100*(np.mean(v)/base-1):+.2f}%)' for k, v in d.items()))
