"""Held-out ratio + KL of presets (bench_rd's three domains, 1K context, 128 continuation tokens,
score only; ORT fp32 CPU). A method is a preset name, or ``PRESET@VAR`` with VAR a key of the
JSON object of CodecConfig overrides given third; ``PROF=path.npz`` evaluates another profile.

    python benches/rd_profile_heldout.py smollm2 default,default-p
    PROF=/tmp/p.npz python benches/rd_profile_heldout.py smollm2 default-p,default-p@l \
        '{"l": {"channels_per_stream": 16, "tables_per_class": 32}}'
"""
import dataclasses, sys, json
import numpy as np
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))
import bench_rd as B
from cachegen import profile as cp
from cachegen.profile import codec as pc, shipped_profile
import cachegen
model = sys.argv[1]; methods = sys.argv[2].split(',')
extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
runner = B.make_runner(model, threads=2)
import os
from cachegen.profile.profile import Profile
prof = Profile.load(os.environ["PROF"]) if os.environ.get("PROF") else shipped_profile(model)
print('profile', prof.hash_hex[:8])
rows = {}
for dom in ('prose', 'code', 'structured'):
    case = B.Case(runner, model, dom, runner.encode(B.TEXT_SOURCES[dom]()), 1024, 128, generate=0)
    for m in methods:
        name, _, var = m.partition('@')
        if name.endswith('-p'):
            cfg = pc.preset_config(prof, name)
            if var:
                cfg = dataclasses.replace(cfg, **extra[var])
            data = cp.encode(case.kv, prof, cfg)
            rest = cp.decode(data, profiles=prof)
        else:
            data = cachegen.encode(case.kv, name); rest = cachegen.decode(data)
        q = case.quality(rest, score_only=True)
        rows.setdefault(m, []).append((case.fp16 / len(data), q['kl_mean'], q['delta_ppl_rel']))
        print(dom, m, round(case.fp16 / len(data), 3), round(q['kl_mean'], 5), flush=True)
for m, v in rows.items():
    a = np.array(v)
    print(f'{model} {m}: x{a[:,0].mean():.3f} KL mean {a[:,1].mean():.4f} worst {a[:,1].max():.4f} dppl {100*a[:,2].mean():+.2f}%')
