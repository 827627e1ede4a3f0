"""Extension records of format v2: typed metadata carried in the checksummed header.

A record is ``kind`` (u16) + payload bytes. Bit 15 of ``kind`` marks it **critical**: a decoder
that does not know a critical kind must refuse the container (it changes how the cache is
reconstructed, e.g. a transform); unknown non-critical kinds are skipped. So later features
(a transform, recorded quality, user metadata) need no format version bump
(codec_spec/FORMAT.md, "Extension records").
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from ..errors import FormatError, InputError, UnsupportedVersionError

CRITICAL = 0x8000

EXT_QUALITY = 0x0001      # JSON: quality measured when the container was written (cachegen.guard)
EXT_USER = 0x0002         # JSON: free-form user metadata
EXT_TRANSFORM = 0x8001    # critical: model profile / transform to undo after dequantization
EXT_PACKED = 0x8002       # critical: lo and token-scale codes entropy-coded in per-block streams
EXT_COMPACT_DIR = 0x8003  # critical: stream directory as u16 ends relative to per-segment u32 bases

# Records that describe how the chunks were coded: written by the encoder from the header
# (format.v2), kept as they are when a caller's records are swapped in (guard.with_extensions).
LAYOUT_KINDS = (EXT_PACKED, EXT_COMPACT_DIR)

KNOWN_KINDS = {EXT_QUALITY: "quality", EXT_USER: "user", EXT_TRANSFORM: "transform",
               EXT_PACKED: "packed-params", EXT_COMPACT_DIR: "compact-directory"}
NO_TABLE = 0xFFFF

MAX_EXTENSION_BYTES = 1 << 20     # one record's payload
MAX_EXTENSIONS = 64
MAX_JSON_DEPTH = 16


@dataclass(frozen=True)
class Extension:
    kind: int
    payload: bytes

    def __post_init__(self) -> None:
        if isinstance(self.kind, bool) or not isinstance(self.kind, int) or not 0 < self.kind <= 0xFFFF:
            raise InputError(f"extension kind must be an int in [1, 65535], got {self.kind!r}")
        if not isinstance(self.payload, (bytes, bytearray, memoryview)):
            raise InputError("extension payload must be bytes")
        object.__setattr__(self, "payload", bytes(self.payload))
        if len(self.payload) > MAX_EXTENSION_BYTES:
            raise InputError(f"extension payload of {len(self.payload)} bytes over {MAX_EXTENSION_BYTES}")

    @property
    def critical(self) -> bool:
        return bool(self.kind & CRITICAL)

    @property
    def name(self) -> str:
        return KNOWN_KINDS.get(self.kind, f"unknown-{self.kind:#06x}")

    @classmethod
    def json(cls, kind: int, obj: Any) -> "Extension":
        """A record whose payload is compact UTF-8 JSON (finite numbers only)."""
        try:
            data = json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise InputError(f"extension payload is not JSON-serialisable: {e}") from None
        return cls(kind, data)

    def as_json(self) -> Any:
        """The payload parsed as JSON, with limits (no NaN/Infinity, bounded depth)."""
        return parse_json(self.payload, what=self.name)


def parse_json(raw: bytes, what: str = "extension") -> Any:
    def bad_const(c: str) -> Any:
        raise FormatError(f"{what}: non-finite number {c} in JSON")

    text = bytes(raw)
    depth = 0
    for ch in text:       # cheap nesting bound before the recursive parser sees it
        if ch in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise FormatError(f"{what}: JSON nested deeper than {MAX_JSON_DEPTH}")
        elif ch in (0x5D, 0x7D):
            depth -= 1
    try:
        return json.loads(text.decode("utf-8"), parse_constant=bad_const)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"{what}: payload is not valid JSON ({e})") from None


@dataclass(frozen=True)
class PackedParams:
    """Payload of the packed-parameters record (codec_spec/FORMAT_V2.md section 6.2): which
    tables code each block's parameter stream, per K/V. A channel's lo is ``step * m / 2**r``
    (``r = frac_bits``); ``lo_tables`` code zigzag(m >> r), ``frac_tables`` the low r bits of m
    (NO_TABLE when r = 0), ``tok_tables`` the zigzag'd token-scale code differences (NO_TABLE
    without token scales)."""
    lo_tables: tuple[int, int]
    frac_tables: tuple[int, int]
    tok_tables: tuple[int, int]
    frac_bits: int

    SIZE = 16
    MAX_FRAC_BITS = 8
    _FMT = "<6HB3x"

    def to_extension(self) -> Extension:
        return Extension(EXT_PACKED, struct.pack(self._FMT, *self.lo_tables, *self.frac_tables, *self.tok_tables,
                                                 self.frac_bits))

    @classmethod
    def from_extension(cls, e: Extension) -> "PackedParams":
        if len(e.payload) != cls.SIZE:
            raise FormatError(f"packed-params record of {len(e.payload)} bytes (expected {cls.SIZE})")
        if any(e.payload[13:16]):
            raise FormatError("packed-params record: reserved bytes not zero")
        a = struct.unpack(cls._FMT, e.payload)
        if a[6] > cls.MAX_FRAC_BITS:
            raise FormatError(f"packed-params record: frac_bits {a[6]} over {cls.MAX_FRAC_BITS}")
        return cls((a[0], a[1]), (a[2], a[3]), (a[4], a[5]), a[6])


@dataclass(frozen=True)
class CompactDirectory:
    """Payload of the compact-directory record (codec_spec/FORMAT_V2.md section 6.3): each
    chunk's directory is one u32 base per segment of ``group`` consecutive streams, then one u16
    per stream: its end minus its segment's base (a u32 entry per stream was 1.5 % of a 1K
    Gemma-3 ``tiny-p`` file)."""
    group: int

    SIZE = 4
    MAX_GROUP = 1 << 15
    _FMT = "<HH"

    def __post_init__(self) -> None:
        if not 1 <= self.group <= self.MAX_GROUP:
            raise InputError(f"compact directory: group {self.group} outside [1, {self.MAX_GROUP}]")

    def to_extension(self) -> Extension:
        return Extension(EXT_COMPACT_DIR, struct.pack(self._FMT, self.group, 0))

    @classmethod
    def from_extension(cls, e: Extension) -> "CompactDirectory":
        if len(e.payload) != cls.SIZE:
            raise FormatError(f"compact-directory record of {len(e.payload)} bytes (expected {cls.SIZE})")
        group, res = struct.unpack(cls._FMT, e.payload)
        if res:
            raise FormatError("compact-directory record: reserved field not zero")
        if not 1 <= group <= cls.MAX_GROUP:
            raise FormatError(f"compact-directory record: group {group} outside [1, {cls.MAX_GROUP}]")
        return cls(group)


def check_known(exts: Iterable[Extension],
                handled: Iterable[int] = (EXT_TRANSFORM, EXT_PACKED, EXT_COMPACT_DIR)) -> None:
    """Refuse a container with a critical record this decoder cannot apply."""
    ok = set(handled)
    for e in exts:
        if e.critical and e.kind not in ok:
            raise UnsupportedVersionError(
                f"container needs extension {e.name} ({e.kind:#06x}), which this decoder does not support")


def find(exts: Iterable[Extension], kind: int) -> Optional[Extension]:
    for e in exts:
        if e.kind == kind:
            return e
    return None


def describe(exts: Iterable[Extension]) -> list[dict[str, Any]]:
    """For inspect(): kind, name, critical, size, and the parsed JSON where the kind is JSON."""
    out = []
    for e in exts:
        d: dict[str, Any] = {"kind": e.kind, "name": e.name, "critical": e.critical, "bytes": len(e.payload)}
        if e.kind in (EXT_QUALITY, EXT_USER):
            try:
                d["value"] = e.as_json()
            except FormatError as err:
                d["error"] = str(err)
        out.append(d)
    return out
