import os

import numpy as np, sys
from importlib.resources import files
from cachegen.ort import OrtRunner, export_model
text = files("cachegen.data").joinpath("demo_text.txt").read_text()
for name, T in (("smollm2", 1024), ("gemma3", 1024)):
    r = OrtRunner(export_model(name, "fp32", "cpu"))
    ids = r.encode(text)
    while len(ids) < T: ids = ids + ids
    _, kv = r.prefill(ids[:T])
    d = {}
    for i, (k, v) in enumerate(kv):
        d[f"k{i}"] = np.asarray(k).astype(np.float16); d[f"v{i}"] = np.asarray(v).astype(np.float16)
    os.makedirs(".gpudata", exist_ok=True)
    np.savez_compressed(f".gpudata/{name}_1k.npz", **d)
    print(name, len(ids), [d[f"k{i}"].shape for i in (0, len(kv)-1)])
