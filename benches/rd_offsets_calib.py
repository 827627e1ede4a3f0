"""Packed-offset encoders on the profile's calibration windows (not the held-out text): the
KL and ratio of each preset with lo at each channel's minimum (r = 6, the encoder of
2026-12-04) and with fitted offsets (params.fit_offsets) at r = 3 / 6. Used to pick the encoder
on calibration data (RESULTS section 17); the held-out check is rd_profile_heldout.py.

    python benches/rd_offsets_calib.py gemma3 default-p,small-p,tiny-p
"""
import sys

import numpy as np

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import bench_rd as B  # noqa: E402

from cachegen.codec import params  # noqa: E402
from cachegen.profile import calibration_text, shipped_profile  # noqa: E402
from cachegen.profile import codec as pc, fit  # noqa: E402

VARIANTS = {"r6-min": (6, 0), "r3-fit": (3, 8), "r6-fit8": (6, 8)}


def calib_row(label: str, runner, prof, wins, cfg) -> None:
    """Print one encoder variant's mean ratio and KL over the calibration windows."""
    kls, ratios = [], []
    for w in wins:
        nb, rest = fit._round_trip(prof, w.kv, cfg)
        kls.append(fit._kl(runner, w, rest))
        ratios.append(w.fp16 / nb)
    print(f"{label}: x{np.mean(ratios):.3f} calib KL {np.mean(kls):.4f} "
          f"({' / '.join(f'{k:.4f}' for k in kls)})", flush=True)


def main() -> None:
    model, presets = sys.argv[1], sys.argv[2].split(",")
    runner = B.make_runner(model, threads=2)
    prof = shipped_profile(model)
    ids = runner.encode(calibration_text())[:4096]
    wins = fit._windows(runner, ids)
    print("profile", prof.hash_hex[:8], "windows", len(wins), flush=True)
    saved = params.FRAC_BITS, params.OFFSET_PHASES
    for name in presets:
        cfg = pc.preset_config(prof, name)
        for v, (r, ph) in VARIANTS.items():
            params.FRAC_BITS, params.OFFSET_PHASES = r, ph
            calib_row(f"{model} {name} {v}", runner, prof, wins, cfg)
    params.FRAC_BITS, params.OFFSET_PHASES = saved


if __name__ == "__main__":
    main()
