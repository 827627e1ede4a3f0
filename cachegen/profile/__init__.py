"""Model profiles: calibrated transforms that make a KV cache cheaper to code (issue 13).

    from cachegen.profile import fit_profile, Profile, encode, decode
    prof = fit_profile("smollm2", runner)              # or Profile.load(path) / load_for_model(...)
    data = encode(kv, prof, "default-p")               # format v2 + a critical EXT_TRANSFORM record
    kv2 = decode(data, profiles=prof)                  # CPU or device="cuda"

A decoder that only has the raw container output calls ``postprocess(kv, extensions, profiles)``.
Measured on/off results: benches/rd_profile_notes.md.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Optional

from .profile import (PROFILE_FILE, PROFILE_VERSION, Profile, ProfilePreset, find_profile,  # noqa: F401
                      register, search_paths)
from .codec import (apply_inverse, decode, encode, layer_starts, needs_profile, postprocess,  # noqa: F401
                    preset_config)

PROFILE_PRESETS = ("default-p", "small-p", "tiny-p")


def calibration_text() -> str:
    """The shipped calibration text (CC0, written for this project; never an evaluation text)."""
    return resources.files("cachegen").joinpath("data/calibration_text.txt").read_text(encoding="utf-8")


def fit_profile(model_name: str, runner: Any, text: Optional[str] = None, **kw: Any) -> Profile:
    """Fit a profile with the model itself (see cachegen.profile.fit)."""
    from .fit import fit_profile as _fit

    return _fit(model_name, runner, text, **kw)


def profile_path(model_dir: Any) -> Path:
    """Where a model export's profile is stored: next to the export."""
    return Path(model_dir) / PROFILE_FILE


def shipped_profile(model_name: str) -> Optional[Profile]:
    """The profile shipped in the package for a reference model (``data/profiles/<name>.npz``),
    or None. A profile depends only on the model's weights, so it serves every export of them."""
    f = resources.files("cachegen").joinpath(f"data/profiles/{model_name}.npz")
    if not f.is_file():
        return None
    p = Profile.load(Path(str(f)))
    return p if p.model == model_name else None


def load_for_model(model_dir: Any) -> Profile:
    """The profile stored next to a model export (``cachegen profile MODEL`` writes it), else
    the one shipped for that reference model."""
    from ..errors import ConfigError

    p = profile_path(model_dir)
    if p.is_file():
        return register(Profile.load(p))
    from ..ort.export import read_export_meta

    name = read_export_meta(model_dir).get("model")
    shipped = shipped_profile(name) if isinstance(name, str) else None
    if shipped is None:
        raise ConfigError(f"no profile at {p} and none shipped for this model: run `cachegen profile MODEL` first")
    return register(shipped)


def main(argv: Optional[list] = None) -> int:
    from .cli import main as _main

    return _main(argv)
