"""RD quantization (CodecConfig.rd_lambda) on the profile's calibration windows, against the
alternative of widening every step by the same factor: ratio and KL per variant, so a lambda
is chosen on calibration data (the held-out check is rd_profile_heldout.py).

    python benches/rd_rdoq_calib.py gemma3 tiny-p 0,0.1,0.2 1.03,1.06
"""
import dataclasses
import sys

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import bench_rd as B  # noqa: E402
from rd_offsets_calib import calib_row  # noqa: E402

from cachegen.profile import calibration_text, shipped_profile  # noqa: E402
from cachegen.profile import codec as pc, fit  # noqa: E402


def widened(cfg, g):
    def mul(spec):
        if isinstance(spec, (int, float)):
            return min(2.0, float(spec) * g)
        return tuple(min(2.0, float(x) * g) for x in spec)
    return dataclasses.replace(cfg, key_step_gain=mul(cfg.key_step_gain), value_step_gain=mul(cfg.value_step_gain))


def main() -> None:
    model, presets = sys.argv[1], sys.argv[2].split(",")
    lams = [float(x) for x in sys.argv[3].split(",")] if len(sys.argv) > 3 else [0.0, 0.1, 0.2]
    gains = [float(x) for x in sys.argv[4].split(",")] if len(sys.argv) > 4 and sys.argv[4] else []
    runner = B.make_runner(model, threads=2)
    prof = shipped_profile(model)
    ids = runner.encode(calibration_text())[:4096]
    wins = fit._windows(runner, ids)
    print("profile", prof.hash_hex[:8], "windows", len(wins), flush=True)
    for name in presets:
        base = pc.preset_config(prof, name)
        variants = [(f"lam={x:g}", dataclasses.replace(base, rd_lambda=x)) for x in lams] + \
            [(f"gain*{g:g}", widened(dataclasses.replace(base, rd_lambda=0.0), g)) for g in gains]
        for v, cfg in variants:
            calib_row(f"{model} {name} {v}", runner, prof, wins, cfg)


if __name__ == "__main__":
    main()
