"""Container layout: preamble, header, chunk index, model section, chunks.

This module is the executable mirror of codec_spec/FORMAT.md. All integers little-endian.
Every length and offset read from the data is validated here before anything is allocated
from it, so decoders (CPU, numpy lock-step, GPU) only ever see a consistent view.
"""
from __future__ import annotations

import dataclasses
import numbers
import struct
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import zstandard

from ..errors import (ChecksumError, ConfigError, FormatError, InputError, LimitExceededError,
                      UnsupportedVersionError)
from .tables import MAX_ALPHABET, TableSet, expand_tables

MAGIC = b"CGKV"
FORMAT_VERSION = 1
MODE_LOSSY = 0
MODE_LOSSLESS = 1

# dtype code -> (name, bytes per element)
DTYPE_CODES = {1: ("float16", 2), 2: ("bfloat16", 2), 3: ("float32", 4)}
DTYPE_BY_NAME = {v[0]: k for k, v in DTYPE_CODES.items()}
PARAM_DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
# Per block, how quantization steps are stored: one per channel, or one for all channels.
STEP_PER_CHANNEL, STEP_SHARED = 0, 1

_PREAMBLE = struct.Struct("<4sBBHII")        # magic, version, mode, flags, header_size, header_crc
_FIXED = struct.Struct("<BBBBIIIIIIBBH")       # see codec_spec/FORMAT.md, "Header"
_LAYER = struct.Struct("<IHHHHBBH")
_CHUNK = struct.Struct("<QII")
PREAMBLE_SIZE = _PREAMBLE.size  # 16
FIXED_SIZE = _FIXED.size        # 32
LAYER_SIZE = _LAYER.size        # 16
CHUNK_ENTRY_SIZE = _CHUNK.size  # 16


def crc32(data) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True)
class DecodeLimits:
    """Limits a decoder enforces before allocating (codec_spec/FORMAT.md, "Decoder limits").

    With the defaults, a container of S bytes declares at most ``4096 * S + 64 MiB`` of output
    (so 1 MB cannot ask for more than 4 GiB), and parsing it costs time and memory linear in S
    plus that output (FORMAT.md 15.3 gives the constants).
    """
    max_layers: int = 4096
    max_batch: int = 4096
    max_tokens: int = 1 << 24
    max_channels: int = 1 << 20          # heads * head_dim of one K or V
    max_output_bytes: int = 1 << 36      # 64 GiB of decoded cache
    max_expansion: int = 1 << 12         # decoded bytes per container byte ...
    free_output_bytes: int = 64 << 20    # ... for outputs above this size (small caches are exempt)
    max_model_bytes: int = 64 << 20      # decompressed model section
    max_table_symbols: int = 1 << 22     # symbols of all referenced tables together
    max_lockstep_steps: int = 1 << 15    # lockstep decoder: numpy steps beyond one per 256 symbols (~1 s)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ConfigError(f"DecodeLimits.{f.name} must be a non-negative int, got {v!r}")
            object.__setattr__(self, f.name, int(v))

    def output_allowed(self, container_bytes: int) -> int:
        """Most decoded bytes a container of this size may declare (the expansion check)."""
        return self.max_expansion * max(int(container_bytes), 1) + self.free_output_bytes


@dataclass(frozen=True)
class LayerInfo:
    tokens: int
    k_heads: int
    k_dim: int
    v_heads: int
    v_dim: int
    k_bits: int = 0
    v_bits: int = 0

    def channels(self, kv: int) -> int:
        return self.k_heads * self.k_dim if kv == 0 else self.v_heads * self.v_dim

    def heads_dim(self, kv: int) -> tuple[int, int]:
        return (self.k_heads, self.k_dim) if kv == 0 else (self.v_heads, self.v_dim)

    def bits(self, kv: int) -> int:
        return self.k_bits if kv == 0 else self.v_bits


@dataclass(frozen=True)
class ChunkEntry:
    offset: int
    size: int
    crc: int


@dataclass
class CacheShape:
    """The fields both format versions' headers share, and what follows from them."""
    mode: int
    dtype: int
    batch: int
    chunk_tokens: int
    layers: list[LayerInfo]
    param_dtype: int = 0
    group_size: int = 1
    channels_per_stream: int = 1
    token_scaling: int = 0   # 1: each chunk carries a u8 scale exponent per (layer, kv, batch, token)

    @property
    def max_tokens(self) -> int:
        return max(l.tokens for l in self.layers)

    @property
    def n_chunks(self) -> int:
        return -(-self.max_tokens // self.chunk_tokens)

    @property
    def roles(self) -> int:
        return 2 if self.group_size > 1 else 1

    @property
    def elem_bytes(self) -> int:
        return DTYPE_CODES[self.dtype][1]

    def decoded_bytes(self, n_chunks: Optional[int] = None) -> int:
        total = 0
        for l in self.layers:
            t = l.tokens if n_chunks is None else min(l.tokens, n_chunks * self.chunk_tokens)
            total += self.batch * t * (l.channels(0) + l.channels(1))
        return total * self.elem_bytes


@dataclass
class Header(CacheShape):
    # Model section (lossy only): stored counts per table, and per (layer, kv) the table ids,
    # shaped [channels, roles] (roles: 1 without grouping, 2 = anchor, delta).
    # A parsed header keeps only the referenced tables, in file order, with the ids remapped.
    table_counts: list[np.ndarray] = field(default_factory=list)
    table_ids: list[list[np.ndarray]] = field(default_factory=list)
    # Derived on parse: exact 24-bit frequencies and cdfs of those tables (uint32, built once).
    tables: Optional[TableSet] = field(default=None, repr=False)
    n_stored_tables: int = 0   # tables in the model section, referenced or not

    @property
    def freqs(self) -> list[np.ndarray]:
        """int64 frequencies per table (list form; built on first use from ``tables``)."""
        return self.tables.int64_lists()[0] if self.tables is not None else []

    @property
    def cdfs(self) -> list[np.ndarray]:
        return self.tables.int64_lists()[1] if self.tables is not None else []


@dataclass
class Container:
    header: Header
    chunks: list[ChunkEntry]
    data: memoryview
    payload_start: int
    partial: bool = False  # True when only a prefix of the chunks was present
    walks: dict = field(default_factory=dict, repr=False)  # parse cache: block layout -> _Walk
    limits: DecodeLimits = field(default_factory=DecodeLimits, repr=False)  # the limits it was parsed with

    @property
    def n_chunks(self) -> int:
        return len(self.chunks)

    def chunk_bytes(self, k: int, verify: bool = True) -> memoryview:
        e = self.chunks[k]
        start = self.payload_start + e.offset
        view = self.data[start:start + e.size]
        if verify and crc32(view) != e.crc:
            raise ChecksumError(f"chunk {k}: checksum mismatch")
        return view

    def tokens(self) -> list[int]:
        """Tokens of each layer covered by the chunks present."""
        n = self.n_chunks * self.header.chunk_tokens
        return [min(l.tokens, n) for l in self.header.layers]


def chunk_token_count(layer_tokens: int, chunk: int, chunk_tokens: int) -> int:
    return max(0, min(chunk_tokens, layer_tokens - chunk * chunk_tokens))


# ----------------------------------------------------------------------------------- writing

def pack_model_section(header: Header) -> bytes:
    parts = [struct.pack("<I", len(header.table_counts))]
    for c in header.table_counts:
        parts.append(struct.pack("<H", c.size))
        parts.append(np.asarray(c, dtype="<u2").tobytes())
    for per_layer in header.table_ids:
        for ids in per_layer:
            parts.append(np.ascontiguousarray(ids, dtype="<u2").tobytes())
    return b"".join(parts)


def build_container(header: Header, chunk_payloads: Sequence[bytes], zstd_level: int = 19) -> bytes:
    """Assemble a container from a header and the already-encoded chunk payloads."""
    if header.mode == MODE_LOSSY:
        raw = pack_model_section(header)
        comp = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True).compress(raw)
        model_raw, model_comp = len(raw), len(comp)
    else:
        comp, model_raw, model_comp = b"", 0, 0
    fixed = _FIXED.pack(header.dtype, header.param_dtype, header.group_size,
                        header.channels_per_stream, header.batch, header.chunk_tokens,
                        len(header.layers), len(chunk_payloads), model_raw, model_comp,
                        header.token_scaling, 0, 0)
    layers = b"".join(_LAYER.pack(l.tokens, l.k_heads, l.k_dim, l.v_heads, l.v_dim,
                                  l.k_bits, l.v_bits, 0) for l in header.layers)
    index, off = [], 0
    for k, p in enumerate(chunk_payloads):
        if len(p) >= 1 << 32:  # the chunk index stores sizes as u32
            raise InputError(f"chunk {k} would be {len(p)} bytes (over 4 GiB): use fewer tokens per chunk")
        index.append(_CHUNK.pack(off, len(p), crc32(p)))
        off += len(p)
    body = fixed + layers + b"".join(index) + comp
    pre = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, header.mode, 0, len(body), crc32(body))
    return b"".join([pre, body, *chunk_payloads])


# ----------------------------------------------------------------------------------- parsing

def _need(cond: bool, msg: str, exc=FormatError) -> None:
    if not cond:
        raise exc(msg)


def _byte_view(data) -> memoryview:
    """A flat byte view of any buffer; a non-contiguous one (e.g. a strided numpy view) is copied."""
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    try:
        mv = data if isinstance(data, memoryview) else memoryview(data)
    except TypeError:
        raise FormatError(f"expected bytes-like data, got {type(data).__name__}") from None
    if not mv.contiguous:
        mv = memoryview(mv.tobytes())
    if mv.format != "B" or mv.ndim != 1:
        try:
            mv = mv.cast("B")
        except (TypeError, ValueError) as e:
            raise FormatError(f"buffer cannot be read as bytes: {e}") from None
    return mv


def parse_container(data, limits: Optional[DecodeLimits] = None, partial: bool = False) -> Container:
    """Parse and validate everything but the chunk contents.

    With ``partial=True`` a container cut short after its header is accepted and only the
    complete chunks present are exposed (a prefix of the cache).
    """
    limits = DecodeLimits() if limits is None else limits
    if not isinstance(limits, DecodeLimits):
        raise ConfigError(f"limits must be a DecodeLimits, got {type(limits).__name__}")
    data = _byte_view(data)
    _need(len(data) >= PREAMBLE_SIZE, f"data too short for a container ({len(data)} bytes)")
    magic, version, mode, flags, header_size, header_crc = _PREAMBLE.unpack_from(data, 0)
    _need(magic == MAGIC, "not a cachegen container (bad magic)")
    _need(version == FORMAT_VERSION,
          f"container format version {version} is not supported (this decoder reads {FORMAT_VERSION})",
          UnsupportedVersionError)
    _need(mode in (MODE_LOSSY, MODE_LOSSLESS), f"unknown mode {mode}")
    _need(flags == 0, f"reserved flags set ({flags:#x})")
    _need(FIXED_SIZE <= header_size <= len(data) - PREAMBLE_SIZE, "header size out of range (truncated?)")
    body = data[PREAMBLE_SIZE:PREAMBLE_SIZE + header_size]
    _need(crc32(body) == header_crc, "header checksum mismatch", ChecksumError)

    (dtype, param_dtype, group_size, cps, batch, chunk_tokens, n_layers, n_chunks,
     model_raw, model_comp, token_scaling, res8, res16) = _FIXED.unpack_from(body, 0)
    _need(res8 == 0 and res16 == 0, "reserved header field is not zero")
    _need(token_scaling in (0, 1), f"unknown token scaling mode {token_scaling}")
    _need(dtype in DTYPE_CODES, f"unknown dtype code {dtype}")
    _need(1 <= n_layers <= limits.max_layers, f"layer count {n_layers} outside [1, {limits.max_layers}]",
          LimitExceededError if n_layers > limits.max_layers else FormatError)
    _need(batch >= 1, "batch is zero")
    _need(batch <= limits.max_batch, f"batch {batch} over limit {limits.max_batch}", LimitExceededError)
    _need(1 <= chunk_tokens <= 65536, f"chunk_tokens {chunk_tokens} outside [1, 65536]")
    _need(1 <= group_size <= 255, f"group_size {group_size} invalid")
    expect = FIXED_SIZE + LAYER_SIZE * n_layers + CHUNK_ENTRY_SIZE * n_chunks + model_comp
    _need(header_size == expect, f"header size {header_size} != {expect} implied by its counts")

    layers = []
    for i in range(n_layers):
        t, kh, kd, vh, vd, kb, vb, res = _LAYER.unpack_from(body, FIXED_SIZE + i * LAYER_SIZE)
        _need(res == 0, f"layer {i}: reserved field not zero")
        _need(1 <= t <= limits.max_tokens, f"layer {i}: token count {t} outside [1, {limits.max_tokens}]",
              LimitExceededError if t > limits.max_tokens else FormatError)
        for h, d in ((kh, kd), (vh, vd)):
            _need(h >= 1 and d >= 1, f"layer {i}: zero heads or head_dim")
            _need(h * d <= limits.max_channels, f"layer {i}: {h}x{d} channels over limit", LimitExceededError)
        if mode == MODE_LOSSY:
            _need(1 <= kb <= 10 and 1 <= vb <= 10, f"layer {i}: bit widths {kb}/{vb} outside [1, 10]")
        else:
            _need(kb == 0 and vb == 0, f"layer {i}: lossless layers carry no bit widths")
        layers.append(LayerInfo(t, kh, kd, vh, vd, kb, vb))

    header = Header(mode=mode, dtype=dtype, batch=batch, chunk_tokens=chunk_tokens, layers=layers,
                    param_dtype=param_dtype, group_size=group_size, channels_per_stream=cps,
                    token_scaling=token_scaling)
    _need(n_chunks == header.n_chunks, f"chunk count {n_chunks} != {header.n_chunks} implied by tokens")
    if mode == MODE_LOSSY:
        _need(param_dtype in PARAM_DTYPES, f"unknown parameter dtype code {param_dtype}")
        _need(1 <= cps <= 255, f"channels_per_stream {cps} invalid")
    else:
        _need(param_dtype == 0 and cps == 0 and group_size == 1 and model_raw == 0 and model_comp == 0
              and token_scaling == 0,
              "lossless header carries lossy fields")

    full_bytes = header.decoded_bytes()
    _need(full_bytes <= limits.max_output_bytes,
          f"decoded cache would take {full_bytes} bytes (limit {limits.max_output_bytes})", LimitExceededError)

    chunks, pos, off = [], FIXED_SIZE + LAYER_SIZE * n_layers, 0
    for k in range(n_chunks):
        o, s, c = _CHUNK.unpack_from(body, pos + k * CHUNK_ENTRY_SIZE)
        _need(o == off, f"chunk {k}: offset {o} != {off} (chunks must be contiguous)")
        chunks.append(ChunkEntry(o, s, c))
        off += s
    payload_start = PREAMBLE_SIZE + header_size
    available = len(data) - payload_start
    is_partial = False
    if off != available:
        _need(partial and off > available,
              f"payload is {available} bytes, chunk index says {off}" + ("" if off < available else " (truncated?)"))
        chunks = [e for e in chunks if e.offset + e.size <= available]
        _need(len(chunks) >= 1, "no complete chunk present")
        is_partial = True

    if mode == MODE_LOSSY:
        _parse_model_section(header, body[pos + n_chunks * CHUNK_ENTRY_SIZE:], model_raw, model_comp, limits)

    decoded = header.decoded_bytes(len(chunks))
    _need(decoded <= limits.output_allowed(len(data)),
          f"decoded size {decoded} exceeds {limits.max_expansion}x the container size "
          f"(+{limits.free_output_bytes} bytes; DecodeLimits.max_expansion)", LimitExceededError)
    return Container(header, chunks, data, payload_start, is_partial, limits=limits)


def inflate_model_section(comp: memoryview, raw_size: int, limits: DecodeLimits) -> bytes:
    """The model section's single zstd frame (both format versions), decompressed to exactly
    its declared size, which the limits bound before anything is decompressed."""
    _need(0 < raw_size <= limits.max_model_bytes, f"model section size {raw_size} out of range", LimitExceededError)
    try:
        params = zstandard.get_frame_parameters(bytes(comp[:18]))
    except zstandard.ZstdError as e:
        raise FormatError(f"model section is not a zstd frame: {e}") from None
    _need(params.content_size == raw_size, "model section frame does not declare its exact size")
    try:
        obj = zstandard.ZstdDecompressor().decompressobj()
        raw = obj.decompress(bytes(comp))
        clean = obj.eof and not obj.unused_data
    except zstandard.ZstdError as e:
        raise FormatError(f"model section does not decompress: {e}") from None
    _need(clean, "model section must be exactly one zstd frame")
    _need(len(raw) == raw_size, "model section decompressed to the wrong size")
    return raw


def _parse_model_section(header: Header, comp: memoryview, raw_size: int, comp_size: int,
                         limits: DecodeLimits) -> None:
    """Decompress and check the model section; expand only the referenced tables.

    Cost: one pass over the section (a Python step per stored table, numpy over the ids), then
    the referenced tables' symbols (at most ``limits.max_table_symbols``) in uint32.
    """
    _need(len(comp) == comp_size, "model section size mismatch")
    raw = inflate_model_section(comp, raw_size, limits)
    _need(raw_size >= 4, "model section truncated")
    (n_tables,) = struct.unpack_from("<I", raw, 0)
    _need(1 <= n_tables <= 65535, f"table count {n_tables} outside [1, 65535]")
    # Table records: u16 alphabet then its counts. Every field is a u16 from offset 4, so walk
    # them in u16 units; one Python step per table (<= 65535), never per (layer, table).
    u16 = np.frombuffer(raw, dtype="<u2", count=(raw_size - 4) // 2, offset=4)
    n16 = u16.size
    heads = np.empty(n_tables, dtype=np.int64)
    p, mv = 0, memoryview(raw)[4:]
    for t in range(n_tables):
        _need(p < n16, "model section truncated")
        a = mv[2 * p] | (mv[2 * p + 1] << 8)
        _need(1 <= a <= MAX_ALPHABET, f"table {t}: alphabet {a} outside [1, {MAX_ALPHABET}]")
        heads[t] = p
        p += 1 + a
        _need(p <= n16, "model section truncated")
    alph = u16[heads].astype(np.int64)
    # Each table needs a non-zero count: one bool per u16 (not an int64 copy of the section).
    nz = u16[:p] != 0
    nz[heads] = False
    has = np.logical_or.reduceat(nz, heads + 1)
    del nz
    if not bool(has.all()):
        raise FormatError(f"table {int(np.argmin(has))}: probability table has all-zero counts")

    # Table ids: all (layer, kv) lists back to back, checked at once.
    roles = header.roles
    chans = np.array([l.channels(kv) for l in header.layers for kv in (0, 1)], dtype=np.int64)
    bits = np.array([l.bits(kv) for l in header.layers for kv in (0, 1)], dtype=np.int64)
    n_ids = int(chans.sum()) * roles
    ids_at = 4 + 2 * p
    _need(ids_at + 2 * n_ids <= raw_size, "model section truncated")
    _need(ids_at + 2 * n_ids == raw_size, "model section has trailing bytes")
    ids = np.frombuffer(raw, dtype="<u2", count=n_ids, offset=ids_at).reshape(-1, roles)
    lkv_of_row = np.repeat(np.arange(chans.size), chans)

    def where(row: int) -> str:
        j = int(lkv_of_row[row])
        return f"layer {j // 2} {'KV'[j % 2]}"

    too_big = ids >= n_tables
    if too_big.any():
        raise FormatError(f"{where(int(np.argmax(too_big.any(axis=1))))}: table id out of range")
    levels = (1 << bits)[lkv_of_row]
    for r in range(roles):
        bad = alph[ids[:, r]] != (levels if r == 0 else 2 * levels - 1)
        if bad.any():
            row = int(np.argmax(bad))
            raise FormatError(f"{where(row)}: table alphabet does not match "
                              f"{int(bits[lkv_of_row[row]])}-bit symbols")

    # Keep only the referenced tables (in file order) and remap the ids to them.
    used = np.zeros(n_tables, dtype=bool)
    used[ids.reshape(-1)] = True
    ref = np.flatnonzero(used)
    n_sym = int(alph[ref].sum())
    _need(n_sym <= limits.max_table_symbols,
          f"referenced tables hold {n_sym} symbols (limit {limits.max_table_symbols})", LimitExceededError)
    remap = np.cumsum(used, dtype=np.int64) - 1
    new_ids = remap[ids].astype(np.uint16)
    starts = heads[ref] + 1
    excl = np.concatenate([[0], np.cumsum(alph[ref])[:-1]]).astype(np.int64)
    gather = np.arange(n_sym, dtype=np.int64) + np.repeat(starts - excl, alph[ref])
    counts_flat = u16[gather].copy()     # copies: the decompressed section is freed after parsing
    tables = expand_tables(counts_flat, alph[ref])
    bounds = np.concatenate([[0], np.cumsum(chans)]).tolist()
    per = [new_ids[bounds[j]:bounds[j + 1]] for j in range(chans.size)]
    header.table_ids = [per[2 * i:2 * i + 2] for i in range(len(header.layers))]
    header.table_counts = [counts_flat[tables.start[j]:tables.start[j + 1]] for j in range(len(tables))]
    header.tables = tables
    header.n_stored_tables = n_tables

# ------------------------------------------------------------------------------ lossy chunks

@dataclass
class LossyChunk:
    """A validated view of one lossy chunk."""
    index: int
    # One entry per (layer, kv) with tokens in this chunk, in stream order.
    blocks: list[tuple[int, int, int]]          # (layer, kv, tokens in chunk)
    token_exp: list[Optional[np.ndarray]]       # uint8 [batch * tokens] scale codes, or None
    lo: list[np.ndarray]                        # float32 [channels]
    step_modes: list[int]                       # STEP_PER_CHANNEL or STEP_SHARED per block
    step: list[np.ndarray]                      # float32 [channels]
    stream_lengths: np.ndarray                  # uint32 [n_streams], in words
    stream_ends: np.ndarray                     # int64 [n_streams], exclusive end word index
    words: np.ndarray                           # uint32, all streams back to back
    first_stream: list[int]                     # index of each block's first stream
    # The same parameters for all blocks back to back (lo/step float32, token codes uint8).
    lo_flat: Optional[np.ndarray] = None
    step_flat: Optional[np.ndarray] = None
    exp_flat: Optional[np.ndarray] = None


def chunk_blocks(header: Header, k: int) -> list[tuple[int, int, int]]:
    out = []
    for i, l in enumerate(header.layers):
        n = chunk_token_count(l.tokens, k, header.chunk_tokens)
        if n:
            out.extend((i, kv, n) for kv in (0, 1))
    return out


def pack_lossy_chunk(header: Header, k: int, lo: Sequence[np.ndarray], step: Sequence[np.ndarray],
                     streams: Sequence[np.ndarray], token_exp: Sequence[np.ndarray] = ()) -> bytes:
    pdt = PARAM_DTYPES[header.param_dtype]
    parts = []
    for j, (a, b) in enumerate(zip(lo, step)):
        if header.token_scaling:
            parts.append(np.asarray(token_exp[j], dtype=np.uint8).tobytes())
        steps = np.asarray(b, dtype=pdt)
        shared = steps.size > 0 and bool(np.all(steps.view(f"u{pdt.itemsize}") == steps.view(f"u{pdt.itemsize}")[0]))
        parts.append(bytes([STEP_SHARED if shared else STEP_PER_CHANNEL]))
        parts.append(np.asarray(a, dtype=pdt).tobytes())
        parts.append(steps[:1].tobytes() if shared else steps.tobytes())
    parts.append(np.array([s.size for s in streams], dtype="<u4").tobytes())
    parts.extend(np.asarray(s, dtype="<u4").tobytes() for s in streams)
    return b"".join(parts)


def _gather_index(starts: Sequence[int], lengths: Sequence[int]) -> np.ndarray:
    """Byte indices of several [start, start + length) ranges, concatenated."""
    lens = np.asarray(lengths, dtype=np.int64)
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    excl = np.cumsum(lens) - lens
    return np.arange(total, dtype=np.int64) + np.repeat(np.asarray(starts, dtype=np.int64) - excl, lens)


@dataclass
class _Walk:
    """Where everything of a chunk's parameter area lies, given its blocks and step modes."""
    mode_pos: np.ndarray
    modes: np.ndarray
    lo_idx: np.ndarray
    step_idx: np.ndarray
    exp_idx: Optional[np.ndarray]
    step_reps: Optional[list]
    bounds: list
    e_bounds: list
    end: int
    first: list
    n_streams: int


def _walk_blocks(h: Header, blocks: list, raw, size: int, k: int) -> _Walk:
    """Walk the blocks with integer arithmetic only, checking bounds and step modes in block order."""
    isz = PARAM_DTYPES[h.param_dtype].itemsize
    pos, first, n_streams, exps, modes, mode_pos = 0, [], 0, [], [], []
    lo_at, step_at, chans = [], [], []
    for (i, kv, n) in blocks:
        ch = h.layers[i].channels(kv)
        if h.token_scaling:
            nt = h.batch * n
            _need(pos + nt <= size, f"chunk {k}: truncated token scales")
            exps.append((pos, nt))
            pos += nt
        _need(pos + 1 <= size, f"chunk {k}: truncated parameters")
        mode = raw[pos]
        _need(mode in (STEP_PER_CHANNEL, STEP_SHARED), f"chunk {k}: unknown step mode {mode}")
        mode_pos.append(pos)
        pos += 1
        modes.append(mode)
        n_steps = ch if mode == STEP_PER_CHANNEL else 1
        _need(pos + (ch + n_steps) * isz <= size, f"chunk {k}: truncated parameters")
        lo_at.append(pos)
        step_at.append((pos + ch * isz, n_steps))
        chans.append(ch)
        pos += (ch + n_steps) * isz
        first.append(n_streams)
        n_streams += -(-ch // h.channels_per_stream)
    reps = None
    if any(m == STEP_SHARED for m in modes):   # one stored step stands for the block's channels
        reps = []
        for m, c in zip(modes, chans):
            reps.extend((c,) if m == STEP_SHARED else (1,) * c)
    return _Walk(
        mode_pos=np.array(mode_pos, dtype=np.int64), modes=np.array(modes, dtype=np.uint8),
        lo_idx=_gather_index(lo_at, [c * isz for c in chans]),
        step_idx=_gather_index([o for o, _ in step_at], [m * isz for _, m in step_at]),
        exp_idx=_gather_index([p for p, _ in exps], [m for _, m in exps]) if h.token_scaling else None,
        step_reps=reps,
        bounds=np.concatenate([[0], np.cumsum(chans)]).tolist() if blocks else [0],
        e_bounds=np.concatenate([[0], np.cumsum([m for _, m in exps])]).tolist() if exps else [0],
        end=pos, first=first, n_streams=n_streams)


def parse_lossy_chunk(container: Container, k: int, verify: bool = True) -> LossyChunk:
    h = container.header
    raw = container.chunk_bytes(k, verify)
    size = len(raw)
    pdt = PARAM_DTYPES[h.param_dtype]
    blocks = chunk_blocks(h, k)
    u8 = np.frombuffer(raw, dtype=np.uint8)
    # Chunks with the same blocks and step modes share one walk: check that this chunk's mode
    # bytes are the cached ones (one gather) and reuse it; otherwise walk the blocks.
    key = tuple(blocks)
    w = container.walks.get(key)
    if w is None or w.end > size or not np.array_equal(u8[w.mode_pos], w.modes):
        w = container.walks[key] = _walk_blocks(h, blocks, raw, size, k)
    lo_all = u8[w.lo_idx].view(pdt).astype(np.float32)
    st_raw = u8[w.step_idx].view(pdt).astype(np.float32)
    _need(bool(np.isfinite(lo_all).all() and np.isfinite(st_raw).all() and (st_raw >= 0).all()),
          f"chunk {k}: invalid quantizer parameters")
    st_all = np.repeat(st_raw, w.step_reps) if w.step_reps is not None else st_raw
    if w.exp_idx is not None:
        e_all = u8[w.exp_idx]
        exps = [e_all[a:b] for a, b in zip(w.e_bounds[:-1], w.e_bounds[1:])]
    else:
        exps = [None] * len(blocks)
    lo = [lo_all[a:b] for a, b in zip(w.bounds[:-1], w.bounds[1:])]
    step = [st_all[a:b] for a, b in zip(w.bounds[:-1], w.bounds[1:])]
    modes, first, n_streams, pos = w.modes.tolist(), w.first, w.n_streams, w.end
    _need(pos + 4 * n_streams <= size, f"chunk {k}: truncated stream directory")
    lengths = np.frombuffer(raw, dtype="<u4", count=n_streams, offset=pos)
    pos += 4 * n_streams
    total_words = int(lengths.sum(dtype=np.int64))
    _need(pos + 4 * total_words == size, f"chunk {k}: stream lengths do not add up to the chunk size")
    words = np.frombuffer(raw, dtype="<u4", count=total_words, offset=pos)
    ends = np.cumsum(lengths, dtype=np.int64)
    return LossyChunk(k, blocks, exps, lo, modes, step, lengths, ends, words, first,
                      lo_all, st_all, e_all if w.exp_idx is not None else None)
