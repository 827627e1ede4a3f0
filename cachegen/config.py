"""Codec configuration and named presets.

A bit schedule says how many quantization bits each layer gets, separately for keys and values:
  * ``"8/6/4"``: the layers are split into equal consecutive groups (here thirds) and each group
    gets its width (layer i of n gets part ``i * parts // n``);
  * an ``int``: every layer the same width;
  * a sequence of ints: one width per layer (its length must equal the layer count).
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence, Union

import numpy as np

from .errors import ConfigError

BitSpec = Union[int, str, Sequence[int]]
GainSpec = Union[float, Sequence[float]]

MIN_BITS, MAX_BITS = 1, 10          # format limit: alphabets up to 2**10 levels (deltas 2**11 - 1)
MAX_CHUNK_TOKENS = 65536
MAX_GROUP_SIZE = 255
MAX_CHANNELS_PER_STREAM = 255
MAX_TABLES_PER_CLASS = 255
MAX_STEP_GAIN = 2.0                 # a gain of 2 is about one bit less than the width says


def _is_int(v: Any) -> bool:
    """An integer (Python or numpy), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _check_bits(b: Any) -> int:
    if not _is_int(b) or not MIN_BITS <= int(b) <= MAX_BITS:
        raise ConfigError(f"bit width must be an int in [{MIN_BITS}, {MAX_BITS}], got {b!r}")
    return int(b)


def normalize_bits(spec: Any) -> BitSpec:
    """Check a bit schedule's form and return it with plain ints (numpy ints accepted)."""
    if isinstance(spec, str):
        resolve_bits(spec, 3)
        return spec
    if _is_int(spec):
        return _check_bits(spec)
    if isinstance(spec, (bytes, Mapping)) or not isinstance(spec, Iterable):
        raise ConfigError(f"bad bit schedule {spec!r}: expected an int, a string like '8/6/4' or a sequence of ints")
    widths = tuple(_check_bits(b) for b in spec)
    if not widths:
        raise ConfigError("bit schedule is empty")
    return widths


def resolve_bits(spec: BitSpec, n_layers: int) -> list[int]:
    """Turn a bit schedule into one width per layer."""
    if n_layers < 1:
        raise ConfigError("a KV cache needs at least one layer")
    if isinstance(spec, str):
        try:
            parts = [int(p) for p in spec.split("/")]
        except ValueError:
            raise ConfigError(f"bad bit schedule {spec!r}: expected e.g. '8/6/4'") from None
        for p in parts:
            _check_bits(p)
        return [parts[i * len(parts) // n_layers] for i in range(n_layers)]
    if _is_int(spec):
        return [_check_bits(spec)] * n_layers
    widths = list(normalize_bits(spec))  # type: ignore[arg-type]
    if len(widths) != n_layers:
        raise ConfigError(f"bit schedule has {len(widths)} entries for {n_layers} layers")
    return widths


def normalize_gains(spec: Any) -> GainSpec:
    """Check a step-gain schedule: one number in [1, MAX_STEP_GAIN] or one per layer."""
    def one(g: Any) -> float:
        if isinstance(g, (bool, np.bool_)) or not isinstance(g, numbers.Real) or not np.isfinite(float(g)) \
                or not 1.0 <= float(g) <= MAX_STEP_GAIN:
            raise ConfigError(f"step gain must be a number in [1, {MAX_STEP_GAIN}], got {g!r}")
        return float(g)
    if isinstance(spec, numbers.Real) and not isinstance(spec, (bool, np.bool_)):
        return one(spec)
    if isinstance(spec, (str, bytes, Mapping)) or not isinstance(spec, Iterable):
        raise ConfigError(f"bad step-gain schedule {spec!r}: expected a number or a sequence of numbers")
    gains = tuple(one(g) for g in spec)
    if not gains:
        raise ConfigError("step-gain schedule is empty")
    return gains


def resolve_gains(spec: GainSpec, n_layers: int) -> list[float]:
    if isinstance(spec, float):
        return [spec] * n_layers
    if len(spec) != n_layers:
        raise ConfigError(f"step-gain schedule has {len(spec)} entries for {n_layers} layers")
    return list(spec)


def width_to_bits(width: float) -> tuple[int, float]:
    """A fractional width ``w`` as the codec's (alphabet bits, step gain): ``ceil(w)`` bits with
    the step of ``w`` bits, ``range / (2**w - 1)`` (``gain = (2**ceil(w) - 1) / (2**w - 1)``)."""
    b = int(np.ceil(width - 1e-9))
    _check_bits(b)
    return b, float((2.0 ** b - 1) / (2.0 ** width - 1))


@dataclass(frozen=True)
class CodecConfig:
    """Everything the encoder needs to know; the decoder reads all it needs from the container."""

    name: str = "custom"
    lossless: bool = False
    key_bits: BitSpec = "8/6/4"
    value_bits: BitSpec = "8/6/4"
    # Anchor-delta grouping: the first token of every group of `group_size` is coded on its own,
    # the others as differences to it (in the quantized domain). 1 switches grouping off.
    group_size: int = 10
    chunk_tokens: int = 256
    # Channels whose symbols share one ANS stream; fewer = more parallel streams, more overhead.
    channels_per_stream: int = 8
    # Probability tables the encoder may build per (alphabet, K/V) class; each channel picks one.
    tables_per_class: int = 16
    # How quantization steps are shared across the channels of one (layer, K/V, chunk):
    # 0 = each channel's own range / (2**bits - 1); 1 = the widest channel's step for all (equal
    # absolute error everywhere, like a per-layer scale); in between = geometric blend.
    # Encoder-only: the container stores each channel's step either way.
    scale_sharing: float = 0.0
    # Divide each token's vector (per layer, K/V, batch item) by a stored power-of-2**(1/8) close
    # to its RMS before quantizing: per-token magnitude, per-channel offsets.
    token_scaling: bool = False
    zstd_level: int = 3  # lossless mode only
    # Format v2: probability tables quantized to 2**table_bits (GPU direct lookup; 12 costs ~0.2%).
    table_bits: int = 12
    # Step gains per (layer, K/V): the step the width gives, times this (1 .. 2; one number or
    # one per layer). Fractional widths for a bit allocation (``width_to_bits``); encoder-only:
    # the container stores the steps, every decoder reads them as they are.
    key_step_gain: GainSpec = 1.0
    value_step_gain: GainSpec = 1.0
    # Format v2: each channel's lo as an integer multiple of the block's step and the token-scale
    # codes rANS-coded in one parameter stream per block (extension EXT_PACKED) instead of
    # stored as 2 + 1 bytes per channel and token. Needs one step per block (scale_sharing 1);
    # a cache that cannot be packed (an offset beyond +-1023 steps) is written unpacked.
    packed_params: bool = False
    # Format v2: each chunk's stream directory as u16 ends relative to one u32 base per segment of
    # streams (extension EXT_COMPACT_DIR) instead of a u32 per stream: ~2 bytes a stream less,
    # decoded values unchanged. Used where a bound on the stream sizes allows it.
    compact_directory: bool = False
    # Format v2 encoder: rate-distortion quantization. Each value takes, of the two levels around
    # it, the one with the least (error in steps)**2 + rd_lambda * its code length in bits under
    # the tables of a first pass; the tables are then refitted. 0 = the nearest level. Encoder-
    # only (any decoder reads the levels as usual); about twice the quantization time.
    rd_lambda: float = 0.0

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ConfigError(f"config {self.name!r}: {msg}")

        for fname, lo, hi in (("group_size", 1, MAX_GROUP_SIZE), ("chunk_tokens", 1, MAX_CHUNK_TOKENS),
                              ("channels_per_stream", 1, MAX_CHANNELS_PER_STREAM),
                              ("tables_per_class", 1, MAX_TABLES_PER_CLASS), ("zstd_level", -7, 22),
                              ("table_bits", 1, 12)):
            v = getattr(self, fname)
            if not _is_int(v) or not lo <= int(v) <= hi:
                bad(f"{fname} must be an int in [{lo}, {hi}], got {v!r}")
            object.__setattr__(self, fname, int(v))   # numpy ints become plain ints (JSON, hashing)
        for fname in ("lossless", "token_scaling", "packed_params", "compact_directory"):   # a truthy string must not switch a mode on
            v = getattr(self, fname)
            if not isinstance(v, (bool, np.bool_)):
                bad(f"{fname} must be a bool, got {v!r}")
            object.__setattr__(self, fname, bool(v))
        if not isinstance(self.name, str):
            bad(f"name must be a string, got {self.name!r}")
        v = self.scale_sharing
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not 0.0 <= float(v) <= 1.0:
            bad(f"scale_sharing must be a number in [0, 1], got {v!r}")
        object.__setattr__(self, "scale_sharing", float(v) if isinstance(v, np.floating) else (int(v) if _is_int(v) else v))
        v = self.rd_lambda
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real) or not 0.0 <= float(v) <= 1.0:
            bad(f"rd_lambda must be a number in [0, 1], got {v!r}")
        object.__setattr__(self, "rd_lambda", float(v))
        if self.rd_lambda > 0 and not self.lossless and self.group_size > 1:
            bad("rd_lambda needs group_size=1 (anchor-delta symbols are quantized to the nearest level)")
        if self.packed_params and not self.lossless and float(self.scale_sharing) != 1.0:
            bad("packed_params needs one step per block (scale_sharing=1)")
        # Validate the schedules early (against an arbitrary layer count for strings/ints).
        for fname in ("key_bits", "value_bits"):
            object.__setattr__(self, fname, normalize_bits(getattr(self, fname)))
        for fname in ("key_step_gain", "value_step_gain"):
            object.__setattr__(self, fname, normalize_gains(getattr(self, fname)))

    def layer_gains(self, n_layers: int) -> tuple[list[float], list[float]]:
        return resolve_gains(self.key_step_gain, n_layers), resolve_gains(self.value_step_gain, n_layers)

    def layer_bits(self, n_layers: int) -> tuple[list[int], list[int]]:
        return resolve_bits(self.key_bits, n_layers), resolve_bits(self.value_bits, n_layers)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("key_bits", "value_bits", "key_step_gain", "value_step_gain"):
            if not isinstance(d[k], (str, int, float)):
                d[k] = list(d[k])
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CodecConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config fields: {sorted(unknown)}")
        d = dict(d)
        for k in ("key_bits", "value_bits", "key_step_gain", "value_step_gain"):
            if isinstance(d.get(k), list):
                d[k] = tuple(d[k])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_preset(cls, preset: str = "default", **overrides: Any) -> "CodecConfig":
        """A preset with some fields changed: ``from_preset("default", key_bits=8)`` keeps every
        other field of ``default`` (plain ``CodecConfig(...)`` starts from the paper layout).
        Unless ``name`` is given, the result is named e.g. ``"default+key_bits"``."""
        base = get_config(preset)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ConfigError(f"unknown config fields: {sorted(unknown)}")
        for k in ("key_bits", "value_bits", "key_step_gain", "value_step_gain"):
            if isinstance(overrides.get(k), list):
                overrides[k] = tuple(overrides[k])
        if overrides and "name" not in overrides:
            overrides["name"] = base.name + "+" + ",".join(sorted(overrides))
        return dataclasses.replace(base, **overrides)


# Presets measured on SmolLM2-135M and Gemma-3-270M (benches/RESULTS.md): per-token scaling with
# one shared step per (layer, K/V, chunk) beats per-channel ranges at every rate; anchor-delta
# grouping costs ~4-6% size on real caches, so only the paper preset keeps it. Keys are the
# sensitive half on Gemma-3 (QK-normed keys), so every preset gives keys more bits than values.
# 4 channels per stream: twice the independent rANS chains of 8 for the GPU decoder, whose
# symbol step is latency-bound (8K SmolLM2 on the H200: kernel 0.59 ms at 4 vs 1.10 at 8,
# RESULTS §10/§11) for +0.7 % size (x3.395 vs x3.418; Gemma-3 x4.261 vs x4.291)
_MODERN = dict(group_size=1, token_scaling=True, scale_sharing=1.0, channels_per_stream=4)
PRESETS: dict[str, CodecConfig] = {
    "default": CodecConfig(name="default", key_bits=7, value_bits=5, **_MODERN),
    # `high`: near-lossless, for identical greedy output (issue 12): the format's widest
    # alphabets and per-channel steps; 64-token greedy continuations identical in 31/32
    # (SmolLM2, 98.3 %) and 30/32 (Gemma-3, 95.8 %) windows on the CPU at x1.62 / x1.64
    # (benches/greedy_notes.md). `fine` is the former `high` (x2.57 / x2.94, 79 % / 51 %).
    "high": CodecConfig(name="high", key_bits=10, value_bits=10, **{**_MODERN, "scale_sharing": 0.0}),
    "fine": CodecConfig(name="fine", key_bits=8, value_bits=7, **_MODERN),
    "small": CodecConfig(name="small", key_bits=6, value_bits=4, **_MODERN),
    "tiny": CodecConfig(name="tiny", key_bits=5, value_bits=3, **_MODERN),
    # The CacheGen paper's layout (8/6/4 bits by layer thirds, anchor-delta groups of 10,
    # per-channel ranges), kept verbatim even as "default" moves.
    "cachegen-paper": CodecConfig(name="cachegen-paper", key_bits="8/6/4", value_bits="8/6/4",
                                  group_size=10),
    "lossless": CodecConfig(name="lossless", lossless=True),
}


def get_config(config: Union[str, CodecConfig, None]) -> CodecConfig:
    if config is None:
        return PRESETS["default"]
    if isinstance(config, CodecConfig):
        return config
    if isinstance(config, str):
        try:
            return PRESETS[config]
        except KeyError:
            raise ConfigError(f"unknown preset {config!r}; known: {sorted(PRESETS)}") from None
    raise ConfigError(f"config must be a preset name or a CodecConfig, got {type(config).__name__}")
