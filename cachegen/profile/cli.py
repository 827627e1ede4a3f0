"""``cachegen profile MODEL``: fit (or show) the profile of a reference model export."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional


DESCRIPTION = ("Fit a model profile (per-layer PCA bases with keys before RoPE, exact attention sink, "
               "bit allocation for the default-p/small-p/tiny-p presets) on the shipped calibration text "
               "and store it next to the model export (<export>/cachegen_profile.npz).")


def build_parser() -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog="cachegen profile", description=DESCRIPTION))


def add_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap.add_argument("model", help="reference model name (smollm2, gemma3)")
    ap.add_argument("--text", type=Path, default=None, help="calibration text file (default: the shipped one)")
    ap.add_argument("--out", type=Path, default=None, help="profile file (default: <export>/cachegen_profile.npz)")
    ap.add_argument("--no-allocate", action="store_true", help="skip the bit allocation (uniform presets; fast)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--show", action="store_true", help="print the stored profile and exit")
    ap.add_argument("--force", action="store_true", help="refit even if a profile exists")
    ap.add_argument("--retune", action="store_true",
                    help="re-run only the bit allocation of the stored (or shipped) profile: bases and "
                         "sensitivities kept, the old hash recorded as an alias so existing containers still decode")
    ap.add_argument("--margin", type=float, default=None,
                    help="default-p's calibration KL target as a fraction of default's (default: 0.9, "
                         "0.6 with --in-sample bases; --retune: the stored profile's)")
    ap.add_argument("--width-step", type=float, default=None, choices=(0.5, 1.0),
                    help="allocation width step in bits (default 1; 0.5 = half bits through step gains, measured worse)")
    ap.add_argument("--only", nargs="+", default=None, metavar="PRESET",
                    help="--retune: re-tune only these presets (the others kept as stored)")
    ap.add_argument("--target", action="append", default=[], metavar="PRESET=KL",
                    help="--retune: a preset's calibration KL target (default: small-p 0.006, tiny-p 0.02; "
                         "default-p follows --margin); implies --only for the presets named")
    ap.add_argument("--trim", action=argparse.BooleanOptionalAction, default=None,
                    help="the uniform step-gain trim after the bit allocation (default: on; --retune: "
                         "as the stored profile was tuned)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--cross-fit", action="store_true",
                   help="tune the allocation with the held-out bases, then refit the bases on the whole text")
    g.add_argument("--in-sample", action="store_true",
                   help="fit the bases on the whole calibration text, tuning windows included (the "
                        "method of the profiles fitted before 2026-12-02; default: windows held out of the bases)")
    return ap


def main(argv: Optional[list] = None) -> int:
    return run(build_parser().parse_args(argv))


def _targets(items: list) -> Optional[dict]:
    """--target PRESET=KL items as {preset: KL}; None (after a message) when one is malformed.
    Only presets with a fixed calibration target take one (default-p follows --margin)."""
    from .fit import PRESET_TARGETS

    fixed = [n for n, t in PRESET_TARGETS.items() if t is not None]
    given = {}
    for t in items:
        name, _, val = t.partition("=")
        try:
            kl = float(val)
        except ValueError:
            kl = float("nan")
        if not kl > 0 or name not in fixed:
            print(f"--target wants PRESET=KL with KL > 0 for {' or '.join(fixed)}, got {t!r}", file=sys.stderr)
            return None
        given[name] = kl
    return given


def run(a: argparse.Namespace) -> int:
    from ..ort import OrtRunner, export_model
    from . import fit_profile, profile_path
    from .profile import Profile

    given = _targets(a.target)
    if given is None:
        return 2
    if given and not a.retune:
        print("--target goes with --retune", file=sys.stderr)
        return 2
    model_dir = export_model(a.model, "fp32", "cpu", progress=not a.show)
    out = a.out or profile_path(model_dir)
    if a.show or (out.is_file() and not a.force and not a.retune):
        if not out.is_file():
            print(f"no profile at {out}", file=sys.stderr)
            return 1
        p = Profile.load(out)
        print(json.dumps(dict(path=str(out), hash=p.hash_hex, model=p.model, layers=p.n_layers, sinks=p.sinks,
                              presets={n: q.to_dict() for n, q in p.presets.items()},
                              info={k: v for k, v in p.info.items() if not k.startswith("sensitivity")}), indent=1))
        return 0
    runner = OrtRunner(model_dir, threads=a.threads)
    text = a.text.read_text() if a.text else None
    if a.retune:
        from . import load_for_model
        from .fit import DEFAULT_MARGIN, PRESET_TARGETS, WIDTH_STEP, tune_presets

        old = Profile.load(out) if out.is_file() else load_for_model(model_dir)
        targets = None
        only = list(dict.fromkeys((a.only or []) + list(given)))
        if only:
            unknown = set(only) - set(PRESET_TARGETS)
            if unknown:
                print(f"unknown presets {sorted(unknown)}; known: {sorted(PRESET_TARGETS)}", file=sys.stderr)
                return 2
            targets = {n: given.get(n, PRESET_TARGETS[n]) for n in only}
        # what the stored profile was tuned with, unless given: a plain --retune re-tunes the
        # same way (recorded since 2026-12-03; older profiles fall back to the fit's defaults)
        margin = a.margin if a.margin is not None else float(old.info.get("margin", DEFAULT_MARGIN))
        width_step = a.width_step if a.width_step is not None else float(old.info.get("width_step", WIDTH_STEP))
        trim = a.trim if a.trim is not None else bool(old.info.get("trim", True))
        print(f"[profile {a.model}] re-tuning {old.hash_hex[:12]}: margin {margin}, width step {width_step}, "
              f"trim {'on' if trim else 'off'}", flush=True)
        new = tune_presets(old, runner, text, log=lambda s: print(s, flush=True), targets=targets,
                           margin=margin, width_step=width_step, trim=trim)
        # the old containers decode with the new profile only if the transform is unchanged
        # (tune_presets never touches it; checked, since an alias is a promise)
        if not new.same_transform(old):
            raise RuntimeError("re-tune changed the profile's transform")
        aliases = sorted({*(x.hex() for x in old.aliases), old.hash_hex} - {new.hash_hex})
        new = new.with_presets(new.presets, aliases=aliases, retuned_from=old.hash_hex)
        new.save(out)
        print(f"profile {new.hash_hex} (retuned from {old.hash_hex}) -> {out}")
        return 0
    bases = "cross-fit" if a.cross_fit else "in-sample" if a.in_sample else "holdout"
    kw = {} if a.margin is None else {"margin": a.margin}
    if a.width_step is not None:
        kw["width_step"] = a.width_step
    if a.trim is not None:
        kw["trim"] = a.trim
    p = fit_profile(a.model, runner, text, allocate=not a.no_allocate, bases=bases,
                    log=lambda s: print(s, flush=True), **kw)
    p.save(out)
    print(f"profile {p.hash_hex} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
