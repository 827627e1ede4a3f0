"""The profile record and its file format.

A profile file is an uncompressed ``.npz`` (numpy's zip of ``.npy`` arrays, read without pickle):

* ``meta``: UTF-8 JSON (uint8 array): ``format`` = "cachegen-profile", ``version`` = 1, model
  name and shapes, per-layer RoPE thetas, sink count, presets (per-layer key/value bits with the
  KL/ratio measured on the calibration windows; optional per-layer step gains ``key_gain`` /
  ``value_gain`` and ``codec`` fields such as ``chunk_tokens``, written only when set),
  calibration text hash, ``aliases`` (hashes of the profiles this one was re-tuned from);
* ``key_basis`` / ``value_basis``: float32 ``[layers, C, C]`` orthonormal bases (columns by
  decreasing calibration energy, ``C = kv_heads * head_dim``), present when the profile
  transforms keys / values.

The content hash (SHA-256 over the canonical meta JSON without the hash and the raw array
bytes) names the profile: a container stores its first 16 bytes and decoding checks them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..config import CodecConfig, normalize_gains
from ..errors import ConfigError, FormatError, UnsupportedVersionError

FORMAT_NAME = "cachegen-profile"
PROFILE_VERSION = 1
HASH_BYTES = 16
MAX_PROFILE_BYTES = 1 << 30
MAX_LAYERS = 4096
MAX_CHANNELS = 8192


@dataclass(frozen=True)
class ProfilePreset:
    """Per-layer bit widths of one profile preset, with what the fit measured."""

    key_bits: tuple
    value_bits: tuple
    calib_kl: Optional[float] = None      # mean KL on the calibration windows
    calib_ratio: Optional[float] = None   # vs the fp16 cache
    target_kl: Optional[float] = None
    # per-layer step gains (CodecConfig.key_step_gain): fractional widths; None = 1 everywhere
    key_gain: Optional[tuple] = None
    value_gain: Optional[tuple] = None
    # CodecConfig fields over the profile codec's defaults (e.g. chunk_tokens); None = none
    codec: Optional[dict] = None

    def to_dict(self) -> dict:
        d = dict(key_bits=list(self.key_bits), value_bits=list(self.value_bits), calib_kl=self.calib_kl,
                 calib_ratio=self.calib_ratio, target_kl=self.target_kl)
        # only when set, so profiles without gains keep their content hash
        if self.key_gain is not None:
            d["key_gain"] = [float(g) for g in self.key_gain]
        if self.value_gain is not None:
            d["value_gain"] = [float(g) for g in self.value_gain]
        if self.codec:
            d["codec"] = dict(sorted(self.codec.items()))
        return d


@dataclass(frozen=True)
class Profile:
    model: str
    n_layers: int
    kv_heads: int
    head_dim: int
    rope_theta: tuple                      # per layer; 0 = keys coded as they are (no RoPE removal)
    key_basis: Optional[np.ndarray]        # [L, C, C] float32 or None
    value_basis: Optional[np.ndarray]
    sinks: int = 1
    presets: Dict[str, ProfilePreset] = field(default_factory=dict)
    info: Dict[str, Any] = field(default_factory=dict)   # calibration text hash, export, timings

    @property
    def channels(self) -> int:
        return self.kv_heads * self.head_dim

    def __post_init__(self) -> None:
        C = self.channels
        if not (0 < self.n_layers <= MAX_LAYERS and 0 < C <= MAX_CHANNELS):
            raise ConfigError(f"profile shape out of range: {self.n_layers} layers, {C} channels")
        if len(self.rope_theta) != self.n_layers:
            raise ConfigError("profile: one rope theta per layer needed")
        for name in ("key_basis", "value_basis"):
            b = getattr(self, name)
            if b is not None:
                b = np.ascontiguousarray(b, dtype=np.float32)
                if b.shape != (self.n_layers, C, C) or not np.isfinite(b).all():
                    raise ConfigError(f"profile {name}: expected finite [{self.n_layers}, {C}, {C}], got {b.shape}")
                b.setflags(write=False)
                object.__setattr__(self, name, b)
        if not 0 <= int(self.sinks) <= 1024:
            raise ConfigError(f"profile sinks must be in [0, 1024], got {self.sinks}")
        for n, p in self.presets.items():
            if len(p.key_bits) != self.n_layers or len(p.value_bits) != self.n_layers:
                raise ConfigError(f"profile preset {n!r}: one bit width per layer needed")
            for g in (p.key_gain, p.value_gain):
                if g is not None:
                    if len(g) != self.n_layers:
                        raise ConfigError(f"profile preset {n!r}: one step gain per layer needed")
                    normalize_gains(tuple(g))
            if p.codec is not None:
                allowed = {"chunk_tokens", "channels_per_stream", "tables_per_class", "table_bits", "packed_params",
                           "compact_directory", "rd_lambda"}
                if not isinstance(p.codec, dict) or set(p.codec) - allowed:
                    raise ConfigError(f"profile preset {n!r}: codec fields must be among {sorted(allowed)}")
                CodecConfig(**p.codec)   # range checks
        object.__setattr__(self, "_hash", _content_hash(self))
        # one (read-only) view per layer, so device copies of a basis are made once
        object.__setattr__(self, "_views", tuple(None if b is None else tuple(b[i] for i in range(self.n_layers))
                                                 for b in (self.key_basis, self.value_basis)))

    # ---------------------------------------------------------------- identity
    @property
    def hash(self) -> bytes:
        """16-byte content hash (what a container names)."""
        return self._hash  # type: ignore[attr-defined]

    @property
    def hash_hex(self) -> str:
        return self.hash.hex()

    @property
    def aliases(self) -> tuple:
        """Hashes of earlier versions of this profile with the same transform (bases, RoPE
        thetas, sinks) and other presets: a re-tune (``cachegen profile MODEL --retune``)
        records its input's hash here, so containers written with the old presets still find
        their profile (decoding needs only the transform, which a re-tune never changes)."""
        out = []
        for a in self.info.get("aliases") or ():
            try:
                b = bytes.fromhex(str(a))
            except ValueError:
                continue
            if len(b) == HASH_BYTES:
                out.append(b)
        return tuple(out)

    def matches(self, digest: bytes) -> bool:
        """Whether a container naming ``digest`` decodes with this profile."""
        return digest == self.hash or digest in self.aliases

    def same_transform(self, other: "Profile") -> bool:
        """Same shapes, RoPE thetas, sinks and bases (what decoding uses)."""
        def eq(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> bool:
            return (a is None) == (b is None) and (a is None or np.array_equal(a, b))
        return (self.model, self.n_layers, self.kv_heads, self.head_dim, tuple(self.rope_theta), self.sinks) == \
            (other.model, other.n_layers, other.kv_heads, other.head_dim, tuple(other.rope_theta), other.sinks) \
            and eq(self.key_basis, other.key_basis) and eq(self.value_basis, other.value_basis)

    def basis(self, kvi: int, layer: int) -> Optional[np.ndarray]:
        v = self._views[kvi]  # type: ignore[attr-defined]
        return None if v is None else v[layer]

    def theta(self, layer: int) -> Optional[float]:
        t = float(self.rope_theta[layer])
        return t if t > 0 else None

    def with_presets(self, presets: Dict[str, ProfilePreset], **info: Any) -> "Profile":
        return replace(self, presets=dict(presets), info={**self.info, **info})

    def _meta(self) -> dict:
        return dict(format=FORMAT_NAME, version=PROFILE_VERSION, model=self.model, n_layers=self.n_layers,
                    kv_heads=self.kv_heads, head_dim=self.head_dim,
                    rope_theta=[float(t) for t in self.rope_theta], sinks=int(self.sinks),
                    has_key_basis=self.key_basis is not None, has_value_basis=self.value_basis is not None,
                    presets={n: p.to_dict() for n, p in sorted(self.presets.items())}, info=self.info)

    # ---------------------------------------------------------------- files
    def to_bytes(self) -> bytes:
        meta = dict(self._meta(), hash=self.hash_hex)
        arrs = {"meta": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)}
        if self.key_basis is not None:
            arrs["key_basis"] = self.key_basis
        if self.value_basis is not None:
            arrs["value_basis"] = self.value_basis
        buf = io.BytesIO()
        np.savez(buf, **arrs)
        return buf.getvalue()

    def save(self, path: os.PathLike | str) -> Path:
        from ..fileio import write_atomic

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(p, self.to_bytes())
        return p

    @classmethod
    def from_bytes(cls, data: bytes) -> "Profile":
        if len(data) > MAX_PROFILE_BYTES:
            raise FormatError(f"profile of {len(data)} bytes is larger than {MAX_PROFILE_BYTES}")
        try:
            z = np.load(io.BytesIO(bytes(data)), allow_pickle=False)
            files = set(z.files)
            if "meta" not in files:
                raise FormatError("not a cachegen profile (no meta record)")
            meta = json.loads(z["meta"].tobytes().decode("utf-8"))
        except (OSError, ValueError, zipfile.BadZipFile, UnicodeDecodeError, EOFError) as e:
            raise FormatError(f"not a cachegen profile: {e}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise FormatError("not a cachegen profile (format name)")
        if meta.get("version") != PROFILE_VERSION:
            raise UnsupportedVersionError(f"profile version {meta.get('version')!r}; this build reads {PROFILE_VERSION}")
        try:
            n, C = int(meta["n_layers"]), int(meta["kv_heads"]) * int(meta["head_dim"])
            if not (0 < n <= MAX_LAYERS and 0 < C <= MAX_CHANNELS):
                raise FormatError(f"profile shape out of range ({n} layers, {C} channels)")

            def arr(name: str, flag: str) -> Optional[np.ndarray]:
                if not meta.get(flag):
                    return None
                if name not in files:
                    raise FormatError(f"profile: {name} missing")
                a = z[name]
                if a.dtype != np.float32 or a.shape != (n, C, C):
                    raise FormatError(f"profile {name}: expected float32 [{n}, {C}, {C}], got {a.dtype} {a.shape}")
                return a

            def gains(p: dict, key: str) -> Optional[tuple]:
                g = p.get(key)
                return None if g is None else tuple(float(x) for x in g)

            presets = {str(k): ProfilePreset(tuple(int(b) for b in p["key_bits"]), tuple(int(b) for b in p["value_bits"]),
                                             p.get("calib_kl"), p.get("calib_ratio"), p.get("target_kl"),
                                             gains(p, "key_gain"), gains(p, "value_gain"),
                                             dict(p["codec"]) if p.get("codec") is not None else None)
                       for k, p in dict(meta.get("presets") or {}).items()}
            prof = cls(model=str(meta["model"]), n_layers=n, kv_heads=int(meta["kv_heads"]),
                       head_dim=int(meta["head_dim"]), rope_theta=tuple(float(t) for t in meta["rope_theta"]),
                       key_basis=arr("key_basis", "has_key_basis"), value_basis=arr("value_basis", "has_value_basis"),
                       sinks=int(meta.get("sinks", 0)), presets=presets, info=dict(meta.get("info") or {}))
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise FormatError(f"bad profile metadata: {e}") from None
        except (OSError, zipfile.BadZipFile, EOFError) as e:   # e.g. a corrupted array member (CRC)
            raise FormatError(f"corrupted profile file: {e}") from None
        if meta.get("hash") != prof.hash_hex:
            raise FormatError(f"profile content hash mismatch (file says {meta.get('hash')}, content is {prof.hash_hex})")
        return prof

    @classmethod
    def load(cls, path: os.PathLike | str) -> "Profile":
        p = Path(path)
        try:
            size = p.stat().st_size
        except OSError as e:
            raise ConfigError(f"cannot read profile {p}: {e}") from None
        if size > MAX_PROFILE_BYTES:
            raise FormatError(f"{p}: profile of {size} bytes is larger than {MAX_PROFILE_BYTES}")
        return cls.from_bytes(p.read_bytes())


def _content_hash(p: Profile) -> bytes:
    h = hashlib.sha256()
    h.update(json.dumps(p._meta(), sort_keys=True).encode())
    for b in (p.key_basis, p.value_basis):
        h.update(b"\x01" + b.tobytes() if b is not None else b"\x00")
    return h.digest()[:HASH_BYTES]


# ------------------------------------------------------------------------------------ lookup
PROFILE_FILE = "cachegen_profile.npz"
_REGISTRY: Dict[bytes, Profile] = {}


def register(profile: Profile) -> Profile:
    """Make a profile findable by hash in this process (``postprocess`` looks here first)."""
    _REGISTRY[profile.hash] = profile
    return profile


def search_paths() -> List[Path]:
    """Where profiles are looked up by hash: next to every model export in the cache directory
    (``<export>/cachegen_profile.npz``), ``$CACHEGEN_PROFILE_DIR``, and the package's data/profiles."""
    paths: List[Path] = []
    env = os.environ.get("CACHEGEN_PROFILE_DIR")
    if env:
        paths += sorted(Path(env).expanduser().glob("*.npz"))
    try:
        from ..ort.export import default_cache_dir

        paths += sorted(default_cache_dir().glob(f"*/{PROFILE_FILE}"))
    except Exception:  # pragma: no cover - the ORT layer is optional for decoding
        pass
    paths += sorted((Path(__file__).resolve().parent.parent / "data" / "profiles").glob("*.npz"))
    return paths


def find_profile(digest: bytes, extra: Sequence[Profile] = ()) -> Optional[Profile]:
    """A profile whose hash is ``digest``, else one that lists it among its aliases (each
    candidate loaded once: ``extra``, this process's registry, then the search paths)."""
    alias: Optional[Profile] = None

    def check(p: Profile) -> bool:
        nonlocal alias
        if p.hash == digest:
            return True
        if alias is None and p.matches(digest):
            alias = p
        return False

    for p in extra:
        if check(p):
            return p
    if digest in _REGISTRY:
        return _REGISTRY[digest]
    for p in list(_REGISTRY.values()):
        check(p)
    for path in search_paths():
        try:
            p = Profile.load(path)
        except (FormatError, ConfigError, UnsupportedVersionError):
            continue
        if check(p):
            return register(p)
    return None if alias is None else register(alias)
