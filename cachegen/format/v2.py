"""Format v2: a container laid out for the GPU (codec_spec/FORMAT.md, "Format version 2").

Differences from v1:
* every section is 4-byte aligned and lies at an offset that follows from the header alone
  (``cachegen.format.layout``), so a parser takes ``np.frombuffer`` views, no per-block walk;
* the probability tables are plain u16 frequencies in units of 2**(24 - table_bits) (each >= 1,
  summing to 2**table_bits), so a decoder can index a direct lookup table of 2**table_bits slots;
  shipped once per file, uncompressed, inside the checksummed header;
* each chunk index entry carries two CRC-32s: one of the chunk's metadata (quantizer parameters,
  token scales, stream directory) and one of its stream words, so a GPU decoder can check the
  small part on the host and rely on the rANS end-state check (plus an optional pass) for the rest;
* extension records (``cachegen.format.extensions``) for metadata and later features.

All integers little-endian. Every size and offset is validated before anything is allocated.
"""
from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import zstandard

from ..errors import (ChecksumError, FormatError, InputError, LimitExceededError, StreamError,
                      UnsupportedVersionError)
from .container import (DTYPE_CODES, MAGIC, CacheShape, inflate_model_section, MODE_LOSSLESS, MODE_LOSSY, PARAM_DTYPES, DecodeLimits,
                        LayerInfo, crc32)
from .extensions import (EXT_COMPACT_DIR, EXT_PACKED, LAYOUT_KINDS, MAX_EXTENSIONS, NO_TABLE, CompactDirectory,
                         Extension, PackedParams, check_known, find)
from .layout import STEP_PER_CHANNEL, STEP_SHARED, ChunkLayout, chunk_layout, chunk_layouts, chunk_meta_sizes, chunk_token_count
from .tables import MAX_ALPHABET, PRECISION_BITS

VERSION = 2
MAX_TABLE_BITS = 12
MIN_TABLE_BITS = 1

_PREAMBLE = struct.Struct("<4sBBHII")
_FIXED = struct.Struct("<BBBBBBHIIIIIIIIIIQQ")
PREAMBLE_SIZE = _PREAMBLE.size      # 16
FIXED_SIZE = _FIXED.size            # 64
LAYER_DT = np.dtype([("tokens", "<u4"), ("k_heads", "<u2"), ("k_dim", "<u2"), ("v_heads", "<u2"),
                     ("v_dim", "<u2"), ("k_bits", "u1"), ("v_bits", "u1"), ("res", "<u2")])
CHUNK_DT = np.dtype([("offset", "<u8"), ("size", "<u4"), ("meta_size", "<u4"), ("meta_crc", "<u4"),
                     ("res", "<u4"), ("words_sum", "<u8")])
_EXT = struct.Struct("<HHI")
assert FIXED_SIZE == 64 and LAYER_DT.itemsize == 16 and CHUNK_DT.itemsize == 32


def _align4(n: int) -> int:
    return (n + 3) & ~3


_K1 = np.uint64(0x9E3779B97F4A7C15)
_K2 = np.uint64(0xBF58476D1CE4E5B9)


def words_checksum(words: np.ndarray) -> int:
    """The stream-words checksum of a chunk (FORMAT_V2.md, "Words checksum"): the sum mod 2**64
    of mix(w_i | i << 32) over the chunk's words, mix = a splitmix64-style bijective finalizer.
    Order-free (a GPU computes it from the words each stream reads anyway) yet position-aware,
    and any change of a single word always changes it (mix is a bijection)."""
    w = np.asarray(words, dtype="<u4")
    v = w.astype(np.uint64) | (np.arange(w.size, dtype=np.uint64) << np.uint64(32))
    with np.errstate(over="ignore"):
        v *= _K1
        v ^= v >> np.uint64(29)
        v *= _K2
        v ^= v >> np.uint64(32)
    return int(v.sum(dtype=np.uint64))


def _need(cond: bool, msg: str, exc=FormatError) -> None:
    if not cond:
        raise exc(msg)


@dataclass
class HeaderV2(CacheShape):
    step_mode: int = STEP_SHARED
    table_bits: int = 0
    # Tables: alphabet size of each, and all frequencies (table_bits units) back to back.
    alphabets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    units: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint16))
    # Table id per (layer, kv): [channels, roles] uint16.
    table_ids: list[list[np.ndarray]] = field(default_factory=list)
    extensions: list[Extension] = field(default_factory=list)
    # Packed parameters (EXT_PACKED, section 6.2): lo and token-scale codes in per-block streams.
    packed: Optional[PackedParams] = None
    # Compact directory (EXT_COMPACT_DIR, section 6.3): streams per segment, 0 = plain u32 ends.
    dir_group: int = 0
    version: int = VERSION
    model_section_bytes: int = 0     # stored (compressed, padded) size; set by the parser
    _layouts: Optional[list] = field(default=None, repr=False, compare=False)   # layout memo
    _starts: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    @property
    def n_tables(self) -> int:
        return int(self.alphabets.size)

    @property
    def table_starts(self) -> np.ndarray:
        """Offset of each table's first frequency in ``units`` (computed once: O(T))."""
        st = self._starts
        if st is None or st.size != self.alphabets.size + 1:
            st = self._starts = np.concatenate([[0], np.cumsum(self.alphabets)]).astype(np.int64)
        return st

    def table_freqs24(self, t: int) -> np.ndarray:
        """Exact 24-bit frequencies of table t (int64), as the rANS coder uses them."""
        s = self.table_starts
        return self.units[s[t]:s[t + 1]].astype(np.int64) << (PRECISION_BITS - self.table_bits)

    def layout(self, k: int) -> ChunkLayout:
        return chunk_layout(self, k)


@dataclass
class ContainerV2:
    header: HeaderV2
    index: np.ndarray          # CHUNK_DT [n_chunks present]
    data: memoryview
    payload_start: int
    partial: bool = False
    cache: dict = field(default_factory=dict, repr=False)   # decoder contexts (models, plans)

    @property
    def version(self) -> int:
        return VERSION

    @property
    def n_chunks(self) -> int:
        return int(self.index.size)

    def tokens(self) -> list[int]:
        n = self.n_chunks * self.header.chunk_tokens
        return [min(l.tokens, n) for l in self.header.layers]

    @property
    def end(self) -> int:
        """Bytes from the file start to the end of the last chunk present."""
        return self.payload_start + (int(self.index["offset"][-1]) + int(self.index["size"][-1]) if self.index.size else 0)

    def chunk_start(self, k: int) -> int:
        return self.payload_start + int(self.index["offset"][k])

    def chunk_bytes(self, k: int, verify: bool = True) -> memoryview:
        e = self.index[k]
        s = self.payload_start + int(e["offset"])
        view = self.data[s:s + int(e["size"])]
        if verify:
            self.verify_chunk(k, view)
        return view

    def verify_chunk(self, k: int, view: Optional[memoryview] = None, words: bool = True) -> None:
        e = self.index[k]
        if view is None:
            s = self.payload_start + int(e["offset"])
            view = self.data[s:s + int(e["size"])]
        m = int(e["meta_size"])
        if crc32(view[:m]) != int(e["meta_crc"]):
            raise ChecksumError(f"chunk {k}: metadata checksum mismatch")
        if words:
            if self.header.mode == MODE_LOSSY:
                ok = words_checksum(np.frombuffer(view[m:], dtype="<u4")) == int(e["words_sum"])
            else:   # lossless chunks: the same sum over the payload's whole words, then its tail bytes
                ok = payload_checksum(view) == int(e["words_sum"])
            if not ok:
                raise ChecksumError(f"chunk {k}: stream checksum mismatch")


# ----------------------------------------------------------------------------------- writing

def payload_checksum(payload) -> int:
    """Lossless chunks: words_checksum of the payload padded with zero bytes to whole words."""
    b = bytes(payload)
    return words_checksum(np.frombuffer(b + b"\0" * (_align4(len(b)) - len(b)), dtype="<u4"))


def pack_tables(alphabets: Sequence[int], units: np.ndarray) -> bytes:
    a = np.asarray(alphabets, dtype="<u2").tobytes()
    a += b"\0" * (_align4(len(a)) - len(a))
    u = np.asarray(units, dtype="<u2").tobytes()
    u += b"\0" * (_align4(len(u)) - len(u))
    return a + u


def pack_ids(table_ids: Sequence[Sequence[np.ndarray]]) -> bytes:
    raw = b"".join(np.ascontiguousarray(ids, dtype="<u2").tobytes() for per in table_ids for ids in per)
    return raw + b"\0" * (_align4(len(raw)) - len(raw))


def pack_extensions(exts: Sequence[Extension]) -> bytes:
    if len(exts) > MAX_EXTENSIONS:
        raise InputError(f"{len(exts)} extension records (at most {MAX_EXTENSIONS})")
    out = []
    for e in exts:
        p = e.payload
        out.append(_EXT.pack(e.kind, 0, len(p)) + p + b"\0" * (_align4(len(p)) - len(p)))
    return b"".join(out)


def pack_lossy_chunk(lay: ChunkLayout, param_dtype: int, lo: Optional[np.ndarray], step: np.ndarray,
                     tok: Optional[np.ndarray], streams: Sequence[np.ndarray],
                     param_streams: Sequence[np.ndarray] = ()) -> tuple[bytes, int]:
    """-> (chunk bytes, meta_size). lo/step/tok: flat arrays in layout order; streams: u32 words.
    A packed layout takes no lo/tok (they are coded in ``param_streams``, one per block)."""
    pdt = PARAM_DTYPES[param_dtype]
    step = np.asarray(step, dtype=pdt)
    if lay.packed:
        if len(param_streams) != lay.nb:
            raise InputError("packed chunk needs one parameter stream per block")
    else:
        lo = np.asarray(lo, dtype=pdt)
        if lo.size != lay.total_channels or param_streams:
            raise InputError("chunk parameters do not match its layout")
    if step.size != lay.total_steps or len(streams) != lay.n_streams:
        raise InputError("chunk parameters do not match its layout")
    meta = bytearray(lay.meta_size)
    if not lay.packed:
        meta[lay.lo_at:lay.step_at] = lo.tobytes()
    meta[lay.step_at:lay.step_at + step.nbytes] = step.tobytes()
    if lay.total_tok and not lay.packed:
        meta[lay.tok_at:lay.tok_at + lay.total_tok] = np.asarray(tok, dtype=np.uint8).tobytes()
    allstreams = list(streams) + list(param_streams)
    lengths = np.array([s.size for s in allstreams], dtype=np.int64)
    ends = np.cumsum(lengths)
    if ends.size and ends[-1] >= 1 << 32:
        raise InputError("chunk has more than 2**32 stream words: use fewer tokens per chunk")
    meta[lay.dir_at:lay.meta_size] = directory_bytes(lay, ends)
    words = b"".join(np.asarray(s, dtype="<u4").tobytes() for s in allstreams)
    return bytes(meta) + words, lay.meta_size


def directory_bytes(lay: ChunkLayout, ends: np.ndarray) -> bytes:
    """A chunk's stream directory (section 8 / 6.3) from the cumulative word ends of its streams."""
    ends = np.asarray(ends, dtype=np.int64)
    if not lay.dir_group:
        return ends.astype("<u4").tobytes()
    g = lay.dir_group
    starts = np.concatenate([[0], ends[:-1]])
    bases = starts[::g]                      # each segment's base: where its first stream starts
    rel = ends - np.repeat(bases, g)[:ends.size]
    if rel.size and int(rel.max()) > 0xFFFF:   # the encoder's bound (codec.encoder) rules this out
        raise InputError(f"a directory segment of {g} streams spans over 65535 words: use a smaller group")
    out = bases.astype("<u4").tobytes() + rel.astype("<u2").tobytes()
    return out + b"\0" * (_align4(len(out)) - len(out))


def _extensions_of(h: HeaderV2) -> list[Extension]:
    """The header's records, with the packed-parameters and compact-directory records matching
    ``h.packed`` and ``h.dir_group``."""
    out = [e for e in h.extensions if e.kind not in LAYOUT_KINDS]
    if h.packed is not None:
        out.append(h.packed.to_extension())
    if h.dir_group:
        out.append(CompactDirectory(h.dir_group).to_extension())
    return out


def build_container(header: HeaderV2, chunks: Sequence[tuple[bytes, int]]) -> bytes:
    """Assemble a v2 container: header (with tables, ids, extensions) then the chunks."""
    h = header
    lossy = h.mode == MODE_LOSSY
    if lossy:   # the model section: tables + ids, one zstd frame (declared size), padded to 4
        raw_model = pack_tables(h.alphabets, h.units) + pack_ids(h.table_ids)
        comp = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(raw_model)
        model_raw, model_comp = len(raw_model), len(comp)
        model = comp + b"\0" * (_align4(len(comp)) - len(comp))
    else:
        model, model_raw, model_comp = b"", 0, 0
    ext_list = _extensions_of(h)
    exts = pack_extensions(ext_list)
    index = np.zeros(len(chunks), dtype=CHUNK_DT)
    off = 0
    for k, (p, meta) in enumerate(chunks):
        if len(p) >= 1 << 32:
            raise InputError(f"chunk {k} would be {len(p)} bytes (over 4 GiB): use fewer tokens per chunk")
        mv = memoryview(p)
        ws = words_checksum(np.frombuffer(mv[meta:], dtype="<u4")) if lossy else payload_checksum(mv)
        index[k] = (off, len(p), meta, crc32(mv[:meta]), 0, ws)
        off += _align4(len(p))
    payload_size = off
    fixed = _FIXED.pack(h.dtype, h.param_dtype, h.group_size, h.token_scaling, h.step_mode, h.table_bits,
                        h.channels_per_stream, h.batch, h.chunk_tokens, len(h.layers), len(chunks),
                        h.n_tables if lossy else 0, model_comp, model_raw, len(ext_list), len(exts), 0,
                        payload_size, 0)
    layers = np.zeros(len(h.layers), dtype=LAYER_DT)
    for i, l in enumerate(h.layers):
        layers[i] = (l.tokens, l.k_heads, l.k_dim, l.v_heads, l.v_dim, l.k_bits, l.v_bits, 0)
    body = fixed + layers.tobytes() + index.tobytes() + model + exts
    pre = _PREAMBLE.pack(MAGIC, VERSION, h.mode, 0, len(body), crc32(body))
    parts = [pre, body]
    for p, _ in chunks:
        parts.append(p)
        parts.append(b"\0" * (_align4(len(p)) - len(p)))
    return b"".join(parts)


# ----------------------------------------------------------------------------------- parsing

def as_bytes_view(data) -> memoryview:
    if isinstance(data, memoryview):
        mv = data
    else:
        try:
            mv = memoryview(data)
        except TypeError:
            raise FormatError(f"expected bytes-like data, got {type(data).__name__}") from None
    if not mv.c_contiguous:      # e.g. a strided numpy view: copy, as v1's parser does
        mv = memoryview(mv.tobytes())
    if mv.format != "B" or mv.ndim != 1:
        try:
            mv = mv.cast("B")
        except TypeError:
            raise FormatError("container data must be a contiguous bytes-like object") from None
    return mv


def header_extent(prefix) -> Optional[int]:
    """Bytes from the file start to the payload start when ``prefix`` (at least PREAMBLE_SIZE
    bytes) begins a v2 container, else None: lets a reader parse the header before the rest of
    the file has arrived (the parser itself reports what is wrong with anything else)."""
    mv = as_bytes_view(prefix)
    if len(mv) < _PREAMBLE.size:
        return None
    magic, version, _mode, _flags, header_size, _crc = _PREAMBLE.unpack_from(mv, 0)
    return _PREAMBLE.size + header_size if magic == MAGIC and version == VERSION else None


def peek_version(data) -> int:
    mv = as_bytes_view(data)
    _need(len(mv) >= _PREAMBLE.size, f"data too short for a container ({len(mv)} bytes)")
    _need(bytes(mv[:4]) == MAGIC, "not a cachegen container (bad magic)")
    return mv[4]


def parse_container(data, limits: Optional[DecodeLimits] = None, partial: bool = False) -> ContainerV2:
    limits = limits or DecodeLimits()
    mv = as_bytes_view(data)
    _need(len(mv) >= _PREAMBLE.size, f"data too short for a container ({len(mv)} bytes)")
    magic, version, mode, flags, header_size, header_crc = _PREAMBLE.unpack_from(mv, 0)
    _need(magic == MAGIC, "not a cachegen container (bad magic)")
    _need(version == VERSION, f"not a format v2 container (version {version})", UnsupportedVersionError)
    _need(mode in (MODE_LOSSY, MODE_LOSSLESS), f"unknown mode {mode}")
    _need(flags == 0, f"reserved flags set ({flags:#x})")
    _need(FIXED_SIZE <= header_size <= len(mv) - _PREAMBLE.size, "header size out of range (truncated?)")
    _need(header_size % 4 == 0, "header size is not a multiple of 4")
    body = mv[_PREAMBLE.size:_PREAMBLE.size + header_size]
    _need(crc32(body) == header_crc, "header checksum mismatch", ChecksumError)
    (dtype, param_dtype, group_size, token_scaling, step_mode, table_bits, cps, batch, chunk_tokens,
     n_layers, n_chunks, n_tables, model_comp, model_raw, ext_count, ext_size, res32, payload_size,
     res64) = _FIXED.unpack_from(body, 0)
    _need(res32 == 0 and res64 == 0, "reserved header field is not zero")
    _need(dtype in DTYPE_CODES, f"unknown dtype code {dtype}")
    _need(token_scaling in (0, 1), f"unknown token scaling mode {token_scaling}")
    _need(1 <= n_layers <= limits.max_layers, f"layer count {n_layers} outside [1, {limits.max_layers}]",
          LimitExceededError if n_layers > limits.max_layers else FormatError)
    _need(batch >= 1, "batch is zero")
    _need(batch <= limits.max_batch, f"batch {batch} over limit {limits.max_batch}", LimitExceededError)
    _need(1 <= chunk_tokens <= 65536, f"chunk_tokens {chunk_tokens} outside [1, 65536]")
    _need(1 <= group_size <= 255, f"group_size {group_size} invalid")
    if mode == MODE_LOSSY:
        _need(param_dtype in PARAM_DTYPES, f"unknown parameter dtype code {param_dtype}")
        _need(1 <= cps <= 255, f"channels_per_stream {cps} invalid")
        _need(step_mode in (STEP_PER_CHANNEL, STEP_SHARED), f"unknown step mode {step_mode}")
        _need(MIN_TABLE_BITS <= table_bits <= MAX_TABLE_BITS, f"table_bits {table_bits} outside [1, 12]")
        _need(1 <= n_tables <= 65535, f"table count {n_tables} outside [1, 65535]")
    else:
        _need(param_dtype == 0 and cps == 0 and group_size == 1 and token_scaling == 0 and step_mode == 0
              and table_bits == 0 and n_tables == 0 and model_comp == 0 and model_raw == 0,
              "lossless header carries lossy fields")
    _need(ext_count <= MAX_EXTENSIONS, f"{ext_count} extension records (at most {MAX_EXTENSIONS})")
    pos = FIXED_SIZE
    expect = pos + LAYER_DT.itemsize * n_layers + CHUNK_DT.itemsize * n_chunks + _align4(model_comp) + ext_size
    _need(header_size == expect, f"header size {header_size} != {expect} implied by its counts")

    lrec = np.frombuffer(body, dtype=LAYER_DT, count=n_layers, offset=pos)
    pos += LAYER_DT.itemsize * n_layers
    _need(not lrec["res"].any(), "layer record reserved field not zero")
    t = lrec["tokens"].astype(np.int64)
    _need(bool((t >= 1).all()), "a layer has zero tokens")
    _need(bool((t <= limits.max_tokens).all()), f"a layer's token count is over {limits.max_tokens}", LimitExceededError)
    for hk, dk in (("k_heads", "k_dim"), ("v_heads", "v_dim")):
        hh, dd = lrec[hk].astype(np.int64), lrec[dk].astype(np.int64)
        _need(bool((hh >= 1).all() and (dd >= 1).all()), "a layer has zero heads or head_dim")
        _need(bool((hh * dd <= limits.max_channels).all()), "a layer's channels are over the limit", LimitExceededError)
    if mode == MODE_LOSSY:
        _need(bool(((lrec["k_bits"] >= 1) & (lrec["k_bits"] <= 10) & (lrec["v_bits"] >= 1)
                    & (lrec["v_bits"] <= 10)).all()), "a layer's bit widths are outside [1, 10]")
    else:
        _need(not lrec["k_bits"].any() and not lrec["v_bits"].any(), "lossless layers carry no bit widths")
    layers = [LayerInfo(*r[:7]) for r in lrec.tolist()]   # tolist() gives Python ints
    header = HeaderV2(mode=mode, dtype=dtype, batch=batch, chunk_tokens=chunk_tokens, layers=layers,
                      param_dtype=param_dtype, group_size=group_size, channels_per_stream=cps,
                      token_scaling=token_scaling, step_mode=step_mode, table_bits=table_bits)
    _need(n_chunks == header.n_chunks, f"chunk count {n_chunks} != {header.n_chunks} implied by tokens")
    full = header.decoded_bytes()
    _need(full <= limits.max_output_bytes,
          f"decoded cache would take {full} bytes (limit {limits.max_output_bytes})", LimitExceededError)

    index = np.frombuffer(body, dtype=CHUNK_DT, count=n_chunks, offset=pos).copy()
    pos += CHUNK_DT.itemsize * n_chunks
    sizes = index["size"].astype(np.int64)
    offs = index["offset"].astype(np.int64) if n_chunks else np.zeros(0, np.int64)
    want = np.concatenate([[0], np.cumsum((sizes + 3) & ~3)]).astype(np.int64)
    _need(bool((offs == want[:-1]).all()), "chunk offsets are not contiguous (4-byte aligned)")
    _need(int(want[-1]) == payload_size, "chunk index does not add up to the payload size")
    _need(bool((index["meta_size"].astype(np.int64) <= sizes).all()), "a chunk's metadata is larger than the chunk")
    _need(not index["res"].any(), "chunk index reserved field not zero")

    if mode == MODE_LOSSY:
        _need(model_raw % 4 == 0, "model section size is not a multiple of 4")
        _model_section(header, body[pos:pos + model_comp], model_raw, n_tables, limits)
        pos += _align4(model_comp)
        header.model_section_bytes = _align4(model_comp)
        header.extensions = _parse_extensions(body[pos:pos + ext_size], ext_count)
        check_known(header.extensions)
        _packed_record(header)
        _compact_record(header)
        # Each lossy chunk's metadata size follows from the layout: a cheap structural check.
        want_meta = chunk_meta_sizes(header)
        got_meta = index["meta_size"].astype(np.int64)
        bad = np.flatnonzero((got_meta != want_meta) | ((sizes - want_meta) % 4 != 0))
        _need(bad.size == 0, f"chunk {int(bad[0]) if bad.size else 0}: metadata size does not match its layout "
                             "(or the stream area is not whole words)")
    else:
        _need(not index["meta_size"].any(), "lossless chunks carry no metadata section")
        header.extensions = _parse_extensions(body[pos:pos + ext_size], ext_count)
        check_known(header.extensions)
        _need(find(header.extensions, EXT_PACKED) is None and find(header.extensions, EXT_COMPACT_DIR) is None,
              "lossless container with a packed-params or compact-directory record")

    payload_start = _PREAMBLE.size + header_size
    available = len(mv) - payload_start
    is_partial = False
    if payload_size != available:
        _need(partial and payload_size > available,
              f"payload is {available} bytes, chunk index says {payload_size}"
              + ("" if payload_size < available else " (truncated?)"))
        keep = int(np.searchsorted(offs + sizes, available, side="right"))
        _need(keep >= 1, "no complete chunk present")
        index = index[:keep]
        is_partial = True
    decoded = header.decoded_bytes(int(index.size))
    _need(decoded <= limits.output_allowed(len(mv)),
          f"decoded size {decoded} exceeds what a {len(mv)}-byte container may declare "
          f"({limits.max_expansion}x + {limits.free_output_bytes})", LimitExceededError)
    return ContainerV2(header, index, mv, payload_start, is_partial)


_MODEL_MEMO: "OrderedDict[tuple, tuple]" = OrderedDict()
_MODEL_MEMO_LOCK = threading.Lock()


def _model_section(h: HeaderV2, comp: memoryview, model_raw: int, n_tables: int, limits: DecodeLimits) -> None:
    """Tables and table ids from the (zstd) model section, memoized by its bytes and the layer
    facts its checks depend on: caches of one model and preset share it, so a restore of the
    next one skips the inflate and the per-id checks (read-only arrays, shared)."""
    _need(0 < model_raw <= limits.max_model_bytes, f"model section size {model_raw} out of range",
          LimitExceededError)   # checked before the memo: a stricter caller's limit holds on a hit
    key = (hashlib.blake2b(comp, digest_size=16).digest(), len(comp), model_raw, n_tables, h.table_bits,
           h.roles, tuple((l.k_bits, l.v_bits, l.channels(0), l.channels(1)) for l in h.layers))
    with _MODEL_MEMO_LOCK:
        hit = _MODEL_MEMO.get(key)
        if hit is not None:
            _MODEL_MEMO.move_to_end(key)
    if hit is None:
        raw_model = memoryview(inflate_model_section(comp, model_raw, limits))
        used = _parse_tables(h, raw_model, n_tables)
        _parse_ids(h, raw_model[used:])
        for a in [h.alphabets, h.units] + [x for per in h.table_ids for x in per]:
            a.setflags(write=False)
        h.table_ids = [tuple(per) for per in h.table_ids]
        hit = (h.alphabets, h.units, h.table_ids)
        with _MODEL_MEMO_LOCK:
            _MODEL_MEMO[key] = hit
            while len(_MODEL_MEMO) > 16:
                _MODEL_MEMO.popitem(last=False)
    h.alphabets, h.units, h.table_ids = hit[0], hit[1], list(hit[2])


def _parse_tables(h: HeaderV2, raw: memoryview, n_tables: int) -> int:
    """Alphabets and frequencies from the start of the model section; returns the bytes used."""
    a_bytes = _align4(2 * n_tables)
    _need(len(raw) >= a_bytes, "table section truncated")
    alph = np.frombuffer(raw, dtype="<u2", count=n_tables).astype(np.int64)
    cap = min(MAX_ALPHABET, 1 << h.table_bits)
    _need(bool(((alph >= 1) & (alph <= cap)).all()), f"a table's alphabet is outside [1, {cap}]")
    total = int(alph.sum())
    used = a_bytes + _align4(2 * total)
    _need(len(raw) >= used, "table section size does not match its alphabets")
    units = np.frombuffer(raw, dtype="<u2", count=total, offset=a_bytes)
    _need(bool((units >= 1).all()), "a table has a zero frequency")
    starts = np.concatenate([[0], np.cumsum(alph)[:-1]])
    sums = np.add.reduceat(units.astype(np.int64), starts)
    _need(bool((sums == 1 << h.table_bits).all()), f"a table's frequencies do not sum to 2**{h.table_bits}")
    h.alphabets, h.units = alph, units
    return used


def _parse_ids(h: HeaderV2, raw: memoryview) -> None:
    R = h.roles
    counts = [l.channels(kv) * R for l in h.layers for kv in (0, 1)]
    total = int(sum(counts))
    _need(len(raw) == _align4(2 * total), "table id section size does not match the layers (model section size)")
    ids = np.frombuffer(raw, dtype="<u2", count=total)
    _need(int(ids.max()) < h.n_tables if ids.size else True, "table id out of range")
    # Each id's table must have the alphabet of its (bits, role) class.
    levels = np.array([1 << l.bits(kv) for l in h.layers for kv in (0, 1)], dtype=np.int64)
    want = np.repeat(levels, counts)
    if R == 2:
        want = want.reshape(-1, 2)
        want[:, 1] = 2 * want[:, 1] - 1
        want = want.reshape(-1)
    _need(bool((h.alphabets[ids] == want).all()), "a table's alphabet does not match the symbols it codes")
    out, pos = [], 0
    for l in h.layers:
        per = []
        for kv in (0, 1):
            n = l.channels(kv) * R
            per.append(ids[pos:pos + n].reshape(-1, R))
            pos += n
        out.append(per)
    h.table_ids = out


def _packed_record(h: HeaderV2) -> None:
    """Section 6.2: a packed-params record needs one step per block, and names tables that exist
    (token tables exactly when the container has token scales)."""
    e = find(h.extensions, EXT_PACKED)
    if e is None:
        return
    _need(sum(1 for x in h.extensions if x.kind == EXT_PACKED) == 1, "more than one packed-params record")
    p = PackedParams.from_extension(e)
    _need(h.step_mode == STEP_SHARED, "packed parameters need step_mode 1 (one step per block)")
    for t in p.lo_tables:
        _need(t < h.n_tables, f"packed-params: lo table {t} does not exist ({h.n_tables} tables)")
    for t in p.frac_tables:
        if p.frac_bits:
            _need(t < h.n_tables and int(h.alphabets[t]) == 1 << p.frac_bits,
                  f"packed-params: fraction table {t} must exist with {1 << p.frac_bits} symbols")
        else:
            _need(t == NO_TABLE, "packed-params: fraction table given with frac_bits 0")
    for t in p.tok_tables:
        if h.token_scaling:
            _need(t < h.n_tables, f"packed-params: token table {t} does not exist ({h.n_tables} tables)")
        else:
            _need(t == NO_TABLE, "packed-params: token table given without token scaling")
    h.packed = p


def _compact_record(h: HeaderV2) -> None:
    """Section 6.3: at most one compact-directory record; its group sets the directory layout."""
    recs = [x for x in h.extensions if x.kind == EXT_COMPACT_DIR]
    if not recs:
        return
    _need(len(recs) == 1, "more than one compact-directory record")
    h.dir_group = CompactDirectory.from_extension(recs[0]).group


def _parse_extensions(raw: memoryview, count: int) -> list[Extension]:
    out, pos = [], 0
    for _ in range(count):
        _need(pos + _EXT.size <= len(raw), "extension records truncated")
        kind, res, n = _EXT.unpack_from(raw, pos)
        _need(res == 0, "extension record reserved field not zero")
        _need(kind != 0, "extension kind 0 is reserved")
        pos += _EXT.size
        _need(pos + _align4(n) <= len(raw), "extension record truncated")
        try:
            out.append(Extension(kind, bytes(raw[pos:pos + n])))
        except InputError as e:
            raise FormatError(str(e)) from None
        pos += _align4(n)
    _need(pos == len(raw), "extension section has trailing bytes")
    return out


# ------------------------------------------------------------------------------ chunk views

@dataclass
class ChunkViewV2:
    """Views of one lossy chunk's sections (no copies)."""
    index: int
    layout: ChunkLayout
    lo: Optional[np.ndarray]    # param dtype [total_channels] (None when packed: see codec.params)
    step: np.ndarray      # param dtype [total_steps]
    tok: Optional[np.ndarray]   # uint8 [total_tok] (None when packed)
    ends: np.ndarray      # uint32 [S] cumulative word ends of the data streams
    words: np.ndarray     # uint32 [n_words]
    param_ends: Optional[np.ndarray] = None   # uint32 [nb] packed: ends of the parameter streams


def chunk_view(c: ContainerV2, k: int, verify: bool = True) -> ChunkViewV2:
    h = c.header
    raw = c.chunk_bytes(k, verify)
    lay = h.layout(k)
    pdt = PARAM_DTYPES[h.param_dtype]
    packed = lay.packed
    lo = None if packed else np.frombuffer(raw, dtype=pdt, count=lay.total_channels, offset=lay.lo_at)
    step = np.frombuffer(raw, dtype=pdt, count=lay.total_steps, offset=lay.step_at)
    tok = np.frombuffer(raw, dtype=np.uint8, count=lay.total_tok, offset=lay.tok_at) \
        if lay.total_tok and not packed else None
    n_words = (len(raw) - lay.meta_size) // 4
    words = np.frombuffer(raw, dtype="<u4", count=n_words, offset=lay.meta_size)
    dir_all = _directory(raw, lay, k) if lay.dir_group else \
        np.frombuffer(raw, dtype="<u4", count=lay.n_dir, offset=lay.dir_at)
    if dir_all.size:
        e64 = dir_all.astype(np.int64)
        _need(bool((np.diff(e64) >= 0).all()) and int(e64[-1]) == n_words,
              f"chunk {k}: stream directory does not add up to the chunk's words", StreamError)
    _need(bool((lo is None or np.isfinite(lo).all()) and np.isfinite(step).all() and (step >= 0).all()),
          f"chunk {k}: invalid quantizer parameters")
    ends = dir_all[:lay.n_streams]
    return ChunkViewV2(k, lay, lo, step, tok, ends, words, dir_all[lay.n_streams:] if packed else None)



def _directory(raw, lay: ChunkLayout, k: int) -> np.ndarray:
    """The cumulative u32 ends of a compact directory (section 6.3), checked: the first base is
    0, ends never decrease inside a segment and each segment starts where the one before ends."""
    g, n = lay.dir_group, lay.n_dir
    bases = np.frombuffer(raw, dtype="<u4", count=lay.n_seg, offset=lay.dir_at).astype(np.int64)
    rel = np.frombuffer(raw, dtype="<u2", count=n, offset=lay.rel_at).astype(np.int64)
    if not n:
        return np.zeros(0, np.uint32)
    ends = np.repeat(bases, g)[:n] + rel
    starts = np.concatenate([[0], ends[:-1]])
    _need(int(bases[0]) == 0 and bool((starts[::g] == bases).all()) and bool((ends >= starts).all()),
          f"chunk {k}: compact stream directory is inconsistent", StreamError)
    _need(int(ends[-1]) < 1 << 32, f"chunk {k}: stream directory out of range", StreamError)
    return ends.astype(np.uint32)
