"""Transform coding as pre/post-processing around the standard codec.

``encode`` applies a profile's forward transform (RoPE removal of keys, per-layer basis, exact
attention sinks) and codes the coefficients with ``cachegen.encode``, adding one critical
``EXT_TRANSFORM`` record; ``postprocess`` undoes it after any decoder (CPU or GPU).

EXT_TRANSFORM payload (little-endian, codec_spec/FORMAT.md "Transform extension"):

    magic   4 bytes  b"CGTF"
    version u8       1
    dtype   u8       original dtype code (1 fp16, 2 bf16, 3 fp32): the output is cast back to it
    layers  u16      L (must equal the container's and the profile's layer count)
    batch   u16      B
    hash    16 bytes profile content hash
    L x { start i64: absolute position of the layer's first token; sinks u16: tokens kept exact }
    then, per layer with sinks > 0: key then value of those tokens, fp16 [B, H, sinks, D]
"""
from __future__ import annotations

import struct
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from ..config import _MODERN, CodecConfig, get_config  # _MODERN: the presets' stream layout, one owner
from ..errors import ConfigError, FormatError, InputError
from ..format.extensions import EXT_TRANSFORM, Extension, find
from . import ops, transform as tf
from .profile import Profile, ProfilePreset, find_profile

MAGIC = b"CGTF"
PAYLOAD_VERSION = 1
_HEAD = struct.Struct("<4sBBHH16s")
_LAYER = struct.Struct("<qH")
_DTYPES = {"float16": 1, "bfloat16": 2, "float32": 3}
MAX_START = 1 << 40

ProfileArg = Union[Profile, Sequence[Profile], None]


def preset_config(profile: Profile, preset: str) -> CodecConfig:
    """The per-layer CodecConfig of a profile preset (e.g. "default-p")."""
    try:
        p = profile.presets[preset]
    except KeyError:
        raise ConfigError(f"profile {profile.model}/{profile.hash_hex[:12]} has no preset {preset!r}; "
                          f"known: {sorted(profile.presets)}") from None
    return config_of(preset, p)


# Codec fields of every profile preset over _MODERN (a preset's own codec fields win). Measured
# on held-out text (benches/RESULTS.md section 16, 2026-12-04): packed parameters (r = 6) and 64
# tables per class: Gemma-3 tiny-p x7.74 -> x7.98 at KL 0.0169 -> 0.0167, default-p x5.45 ->
# x5.57 (KL 0.0054 -> 0.0056); r = 3 gave x8.03 but moved default-p's KL to 0.0102. GPU decode
# of an 8K Gemma-3 tiny-p cache 0.72 -> ~1.0 ms (H200), 0.86 ms with the parameter pass deferred.
# The compact directory (RESULTS section 17) changes no decoded value: ~2 bytes a stream less,
# Gemma-3 tiny-p x7.98 -> x8.04, SmolLM2 tiny-p x7.74 -> x7.80.
PRESET_CODEC: dict = dict(packed_params=True, tables_per_class=64, compact_directory=True)   # packed offsets use r = 6 (codec.params)


def config_of(name: str, p: ProfilePreset) -> CodecConfig:
    """The CodecConfig of a ProfilePreset: its widths, step gains and codec fields over _MODERN
    and PRESET_CODEC."""
    gains = {}
    if p.key_gain is not None:
        gains["key_step_gain"] = tuple(p.key_gain)
    if p.value_gain is not None:
        gains["value_step_gain"] = tuple(p.value_gain)
    return CodecConfig(name=name, key_bits=tuple(p.key_bits), value_bits=tuple(p.value_bits),
                       **{**_MODERN, **PRESET_CODEC, **(p.codec or {})}, **gains)


def _dtype_code(t: Any) -> int:
    if ops.is_torch(t):
        import torch

        name = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}.get(t.dtype)
    else:
        name = np.asarray(t).dtype.name
    if name not in _DTYPES:
        raise InputError(f"KV dtype {name} not supported (float16, bfloat16, float32)")
    return _DTYPES[name]


def layer_starts(kv: Sequence[Sequence[Any]], position_offset: int = 0) -> list[int]:
    """Absolute position of each layer's first token: the cache ends at the same position in
    every layer (trimmed sliding-window layers hold the last tokens)."""
    total = max(int(k.shape[2]) for k, _ in kv)
    return [int(position_offset) + total - int(k.shape[2]) for k, _ in kv]


def _check_fits(kv: Sequence[Sequence[Any]], profile: Profile) -> None:
    if isinstance(kv, (np.ndarray, str, bytes)) or not hasattr(kv, "__len__"):
        raise InputError("a KV cache is a sequence of (key, value) pairs, one per layer")
    if len(kv) != profile.n_layers:
        raise InputError(f"cache has {len(kv)} layers, profile {profile.model} expects {profile.n_layers}")
    for i, pair in enumerate(kv):
        try:
            k, v = pair
        except (TypeError, ValueError):
            raise InputError(f"layer {i}: expected a (key, value) pair") from None
        for name, t in (("key", k), ("value", v)):
            s = tuple(int(x) for x in t.shape)
            if len(s) != 4 or s[1] != profile.kv_heads or s[3] != profile.head_dim:
                raise InputError(f"layer {i} {name}: shape {s} does not fit the profile "
                                 f"([B, {profile.kv_heads}, T, {profile.head_dim}])")
        if tuple(k.shape) != tuple(v.shape):
            raise InputError(f"layer {i}: key {tuple(k.shape)} and value {tuple(v.shape)} differ")
        if int(k.shape[2]) < 1 or int(k.shape[0]) < 1:
            raise InputError(f"layer {i}: empty tensor")


def forward(kv: Sequence[Sequence[Any]], profile: Profile, starts: Sequence[int]):
    """Coefficients to code (float32, same layout) and the exact sink tokens per layer."""
    coeffs, sinks = [], []
    for i, (k, v) in enumerate(kv):
        n = tf.sink_count(starts[i], int(k.shape[2]), profile.sinks)
        yk = tf.forward_tensor(k, starts[i], profile.theta(i), _basis(profile, 0, i))
        yv = tf.forward_tensor(v, starts[i], None, _basis(profile, 1, i))
        if n:
            sinks.append((_host_f16(k[:, :, :n]), _host_f16(v[:, :, :n])))
            yk, yv = tf.cut_sinks(yk, n), tf.cut_sinks(yv, n)
        else:
            sinks.append(None)
        coeffs.append((yk, yv))
    return coeffs, sinks


_ZEROS: dict = {}


def _basis(profile: Profile, kvi: int, layer: int) -> Optional[tf.Basis]:
    b = profile.basis(kvi, layer)
    if b is None:
        return None
    z = _ZEROS.get(b.shape[0])
    if z is None:
        z = _ZEROS[b.shape[0]] = np.zeros(b.shape[0], dtype=np.float32)
        z.setflags(write=False)
    return tf.Basis(z, b, z[:0])


def _host_f16(x: Any) -> np.ndarray:
    if ops.is_torch(x):
        import torch

        return x.detach().to("cpu", torch.float16).numpy()
    return np.asarray(x, dtype=np.float16)


def encode(kv: Sequence[Sequence[Any]], profile: Profile, config: Union[str, CodecConfig] = "default-p", *,
           position_offset: int = 0, starts: Optional[Sequence[int]] = None,
           extensions: Iterable[Extension] = (), progress: Any = None) -> bytes:
    """Compress ``kv`` in the profile's transform domain (format v2 + EXT_TRANSFORM).

    ``config``: a profile preset name ("default-p", ...), a standard preset name or a CodecConfig
    (its bit widths then apply to the coefficients). ``position_offset``: absolute position of
    the cache's first token (0 for a cache prefilled from the start); ``starts`` overrides the
    per-layer first positions entirely."""
    import cachegen

    _check_fits(kv, profile)
    if starts is None:
        starts = layer_starts(kv, position_offset)
    starts = [int(s) for s in starts]
    if len(starts) != len(kv) or any(not 0 <= s < MAX_START for s in starts):
        raise InputError(f"starts must be one position in [0, 2**40) per layer, got {starts[:4]}...")
    if isinstance(config, str) and config in profile.presets:
        cfg = preset_config(profile, config)
    else:
        cfg = get_config(config)
    if cfg.lossless:
        raise ConfigError("a profile transform is lossy: use cachegen.encode(kv, 'lossless') instead")
    dtype = _dtype_code(kv[0][0])
    batch = int(kv[0][0].shape[0])
    coeffs, sinks = forward(kv, profile, starts)
    payload = pack_payload(profile, dtype, batch, starts, sinks)
    exts = [e for e in extensions if e.kind != EXT_TRANSFORM] + [Extension(EXT_TRANSFORM, payload)]
    return cachegen.encode(coeffs, cfg, progress=progress, extensions=exts)


# ------------------------------------------------------------------------------------ payload
def pack_payload(profile: Profile, dtype: int, batch: int, starts: Sequence[int],
                 sinks: Sequence[Optional[tuple]]) -> bytes:
    if not 0 < batch < 1 << 16:
        raise InputError(f"batch {batch} out of range for the transform record")
    parts = [_HEAD.pack(MAGIC, PAYLOAD_VERSION, dtype, len(starts), batch, profile.hash)]
    for s, sk in zip(starts, sinks):
        parts.append(_LAYER.pack(int(s), 0 if sk is None else int(sk[0].shape[2])))
    for sk in sinks:
        if sk is not None:
            parts += [np.ascontiguousarray(sk[0], dtype="<f2").tobytes(),
                      np.ascontiguousarray(sk[1], dtype="<f2").tobytes()]
    return b"".join(parts)


class TransformRecord:
    """A parsed EXT_TRANSFORM payload."""

    def __init__(self, payload: bytes, profile_for_shapes: Optional[Profile] = None) -> None:
        b = bytes(payload)
        if len(b) < _HEAD.size:
            raise FormatError("transform record too short")
        magic, ver, dtype, L, batch, digest = _HEAD.unpack_from(b, 0)
        if magic != MAGIC:
            raise FormatError("transform record: bad magic")
        if ver != PAYLOAD_VERSION:
            raise FormatError(f"transform record version {ver} not supported (this build: {PAYLOAD_VERSION})")
        if dtype not in (1, 2, 3) or L == 0 or batch == 0:
            raise FormatError("transform record: bad dtype, layer count or batch")
        off = _HEAD.size
        if len(b) < off + L * _LAYER.size:
            raise FormatError("transform record: layer table cut short")
        self.dtype, self.n_layers, self.batch, self.hash = dtype, L, batch, digest
        self.starts, self.sinks = [], []
        for i in range(L):
            s, n = _LAYER.unpack_from(b, off + i * _LAYER.size)
            if not 0 <= s < MAX_START:
                raise FormatError(f"transform record: layer {i} start {s} out of range")
            self.starts.append(int(s))
            self.sinks.append(int(n))
        self._data = b
        self._sink_off = off + L * _LAYER.size

    def sink_arrays(self, profile: Profile) -> list:
        H, D, B = profile.kv_heads, profile.head_dim, self.batch
        need = sum(2 * B * H * n * D * 2 for n in self.sinks)
        if len(self._data) != self._sink_off + need:
            raise FormatError(f"transform record: {len(self._data) - self._sink_off} sink bytes, expected {need}")
        out, off = [], self._sink_off
        for n in self.sinks:
            if not n:
                out.append(None)
                continue
            size = B * H * n * D * 2
            k = np.frombuffer(self._data, dtype="<f2", count=size // 2, offset=off).reshape(B, H, n, D)
            v = np.frombuffer(self._data, dtype="<f2", count=size // 2, offset=off + size).reshape(B, H, n, D)
            off += 2 * size
            out.append((k, v))
        return out


def _profiles_list(profiles: Any) -> list:
    if profiles is None:
        return []
    if isinstance(profiles, Profile):
        return [profiles]
    if isinstance(profiles, dict):
        return list(profiles.values())
    return list(profiles)


def needs_profile(extensions: Iterable[Extension]) -> bool:
    return find(list(extensions), EXT_TRANSFORM) is not None


def postprocess(kv: Sequence[Sequence[Any]], extensions: Iterable[Extension], profiles: ProfileArg = None):
    """Undo the transform of a decoded container (no-op when it has no EXT_TRANSFORM record).

    ``kv``: the decoder's output (torch tensors on CPU or CUDA, or numpy); ``extensions``: the
    container's ``header.extensions``; ``profiles``: a Profile or several (else the process
    registry and the search paths of ``cachegen.profile.find_profile`` are tried). Returns new
    tensors of the original dtype on the same device. Raises ConfigError when the profile the
    container names cannot be found, FormatError when the record does not fit the cache."""
    ext = find(list(extensions), EXT_TRANSFORM)
    if ext is None:
        return kv
    rec = TransformRecord(ext.payload)
    prof = find_profile(rec.hash, _profiles_list(profiles))
    if prof is None:
        raise ConfigError(f"this container was coded with model profile {rec.hash.hex()}, which is not "
                          "available: pass profiles=Profile.load(path) or run `cachegen profile MODEL` "
                          "(profiles are looked up in cachegen.profile.search_paths())")
    return apply_inverse(kv, rec, prof)


def apply_inverse(kv: Sequence[Sequence[Any]], record: Union[TransformRecord, Iterable[Extension], bytes],
                  profile: Profile):
    """Inverse transform with an explicit profile (``record``: parsed record, the container's
    extensions, or the raw payload)."""
    if isinstance(record, (bytes, bytearray, memoryview)):
        record = TransformRecord(bytes(record))
    elif not isinstance(record, TransformRecord):
        ext = find(list(record), EXT_TRANSFORM)
        if ext is None:
            raise FormatError("no transform record among the container's extensions")
        record = TransformRecord(ext.payload)
    if not profile.matches(record.hash):
        raise ConfigError(f"container needs profile {record.hash.hex()}, got {profile.hash_hex}")
    if len(kv) != record.n_layers or len(kv) != profile.n_layers:
        raise FormatError(f"transform record for {record.n_layers} layers, cache has {len(kv)}")
    sinks = record.sink_arrays(profile)
    out = []
    for i, (yk, yv) in enumerate(kv):
        if int(yk.shape[0]) != record.batch or int(yk.shape[1]) != profile.kv_heads \
                or int(yk.shape[3]) != profile.head_dim:
            raise FormatError(f"layer {i}: decoded shape {tuple(yk.shape)} does not fit the profile")
        n = record.sinks[i]
        if n and (n >= int(yk.shape[2]) or record.starts[i] != 0):
            raise FormatError(f"layer {i}: {n} sink tokens do not fit {int(yk.shape[2])} tokens")
        k = tf.inverse_tensor(yk, record.starts[i], profile.theta(i), _basis(profile, 0, i))
        v = tf.inverse_tensor(yv, record.starts[i], None, _basis(profile, 1, i))
        if n:
            sk, sv = sinks[i]
            k, v = _put(k, sk), _put(v, sv)
        out.append((_cast(k, record.dtype), _cast(v, record.dtype)))
    return out


def _put(x: Any, exact: np.ndarray) -> Any:
    n = exact.shape[2]
    if ops.is_torch(x):
        import torch

        x[:, :, :n, :] = torch.as_tensor(exact.astype(np.float32), device=x.device)
    else:
        x[:, :, :n, :] = exact.astype(np.float32)
    return x


def _cast(x: Any, dtype: int) -> Any:
    if ops.is_torch(x):
        import torch

        return x.to({1: torch.float16, 2: torch.bfloat16, 3: torch.float32}[dtype]).contiguous()
    if dtype == 2:
        import torch

        return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)
    return np.ascontiguousarray(x, dtype={1: np.float16, 3: np.float32}[dtype])


def decode(data: Any, profiles: ProfileArg = None, device: Any = "cpu", **kw: Any):
    """``cachegen.decode`` + ``postprocess``: torch tensors of the original dtype on ``device``."""
    from .. import dispatch

    c = dispatch.open_container(data, kw.get("limits"), kw.get("partial", False))
    exts = list(getattr(c.header, "extensions", []) or [])
    # the raw decoder output (coefficients), so this works whether or not cachegen.decode
    # itself applies the transform
    kv = dispatch.decode(c, dispatch.resolve_device(device), kw.get("decoder", "auto"), kw.get("verify", True))
    return postprocess(kv, exts, profiles)
