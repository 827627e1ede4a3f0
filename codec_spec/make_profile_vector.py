#!/usr/bin/env python
"""Generate the model-profile golden vector (codec_spec/vectors/v2/profile/): a format v2
container with a transform record (FORMAT_V2.md section 6.1) and the profile it names.

    python codec_spec/make_profile_vector.py            # writes it (never overwrites without --force)
    python codec_spec/make_profile_vector.py --check    # rebuild in memory, report what differs

Run once, commit the output; tests/test_vectors_profile.py only reads it. Files:

* ``transform_fp16.cgk``: the container (default preset bit widths on the coefficients);
* ``transform_fp16.profile.npz``: the profile it names (``cachegen.profile.Profile.from_bytes``);
* ``transform_fp16.coeffs.npz``: the dequantized coefficients (float32), the bit-exact part
  (sections 7-10): a conforming decoder reproduces them bit for bit;
* ``transform_fp16.expected.npz``: the reconstructed cache (float16, section 6.1 steps 1-4) as
  the reference decoder computed it: a conforming decoder matches it within the tolerance of
  section 6.1 ("Conformance"), not bit for bit.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "vectors" / "v2" / "profile"
NAME = "transform_fp16"
LAYERS, HEADS, DIM, TOKENS = 2, 2, 8, 40
THETAS = (10000.0, 0.0)          # layer 0: keys coded before RoPE; layer 1: as they are
SINKS = 2


def _orthonormal(rng: np.random.Generator, n: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.sign(np.diag(r))[None, :]).astype(np.float32)


def build() -> dict[str, bytes]:
    import cachegen.profile as cp
    from cachegen import dispatch
    sys.path.insert(0, str(HERE))
    from make_vectors import smooth_channels

    rng = np.random.default_rng(20261202)
    C = HEADS * DIM
    prof = cp.Profile(model="golden-vector", n_layers=LAYERS, kv_heads=HEADS, head_dim=DIM,
                      rope_theta=THETAS,
                      key_basis=np.stack([_orthonormal(rng, C) for _ in range(LAYERS)]),
                      value_basis=np.stack([_orthonormal(rng, C) for _ in range(LAYERS)]), sinks=SINKS)
    kv = [(torch.from_numpy(smooth_channels(rng, 1, HEADS, TOKENS, DIM, outliers=2)).half(),
           torch.from_numpy(smooth_channels(rng, 1, HEADS, TOKENS, DIM)).half()) for _ in range(LAYERS)]
    data = cp.encode(kv, prof, "default")
    c = dispatch.open_container(data)
    coeffs = dispatch.decode(c, torch.device("cpu"), "reference", True)
    out = cachegen_decode(data, prof)

    def npz(pairs) -> bytes:
        b = io.BytesIO()
        np.savez(b, **{f"layer{i}.{n}": t.numpy() for i, p in enumerate(pairs) for n, t in zip(("key", "value"), p)})
        return b.getvalue()
    return {f"{NAME}.cgk": data, f"{NAME}.profile.npz": prof.to_bytes(), f"{NAME}.coeffs.npz": npz(coeffs),
            f"{NAME}.expected.npz": npz(out)}


def cachegen_decode(data: bytes, prof):
    import cachegen
    return cachegen.decode(data, "cpu", profiles=[prof])


def manifest(files: dict[str, bytes]) -> dict:
    return {"format_version": 2, "spec": "codec_spec/FORMAT_V2.md section 6.1",
            "name": NAME, "layers": LAYERS, "heads": HEADS, "head_dim": DIM, "tokens": TOKENS,
            "rope_theta": list(THETAS), "sinks": SINKS, "preset": "default",
            "tolerance": "coefficients bit-exact; output |x - ref| <= 2**-10 * max(1, |ref|) per element",
            "files": {n: {"size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for n, b in sorted(files.items())}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    files = build()
    if a.check:
        old = json.loads((OUT / "MANIFEST.json").read_text())["files"]
        new = manifest(files)["files"]
        diff = [n for n in new if old.get(n, {}).get("sha256") != new[n]["sha256"]]
        print("identical" if not diff else f"differ: {diff} (the encoder is not normative)")
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    if (OUT / "MANIFEST.json").exists() and not a.force:
        print("vector exists (use --force to overwrite: golden vectors are frozen)", file=sys.stderr)
        return 1
    for n, b in files.items():
        (OUT / n).write_bytes(b)
    (OUT / "MANIFEST.json").write_text(json.dumps(manifest(files), indent=1) + "\n")
    print(f"wrote {len(files)} files to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
