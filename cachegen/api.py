"""The library API: encode / decode / decode_into / save / load / inspect, and a numcodecs-style Codec."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .config import CodecConfig, get_config
from .errors import ConfigError, FormatError, InputError, LimitExceededError
from .fileio import write_atomic
from .format.container import (DTYPE_CODES, FORMAT_VERSION, MODE_LOSSLESS, MODE_LOSSY, STEP_SHARED,
                               Container, DecodeLimits, parse_container, parse_lossy_chunk)
from . import dispatch
from .codec.encoder import encode_lossless_v2, encode_lossy, encode_lossy_v2
from .codec.lossless import encode_lossless
from .format import v2 as fmt2
from .format.extensions import Extension, describe as describe_extensions

KVCache = Sequence[Sequence[Any]]            # [(key, value)] per layer, each [B, H, T, D]
TorchKV = list[tuple[torch.Tensor, torch.Tensor]]
Progress = Optional[Callable[[int, int], None]]

_INT_VIEW = {1: np.int16, 2: np.int16, 3: np.int32}
_TORCH_INT = {1: torch.int16, 2: torch.int16, 3: torch.int32}


def encode(kv: KVCache, config: Union[str, CodecConfig, None] = "default", progress: Progress = None,
           extensions: Sequence[Extension] = (), format_version: int = 2) -> bytes:
    """Compress a KV cache (per-layer (key, value), each [batch, kv_heads, tokens, head_dim]).

    Writes format v2 (``format_version=1`` writes the older layout, which cannot hold
    ``extensions``: metadata records such as measured quality, see cachegen.format.extensions)."""
    cfg = get_config(config)
    exts = list(extensions)
    if format_version == 1:
        if exts:
            raise InputError("format v1 has no extension records: use format_version=2")
        return _check_decodable((encode_lossless if cfg.lossless else encode_lossy)(kv, cfg, progress))
    if format_version != 2:
        raise InputError(f"format_version must be 1 or 2, got {format_version!r}")
    return _check_decodable((encode_lossless_v2 if cfg.lossless else encode_lossy_v2)(kv, cfg, progress, exts))


def _check_decodable(data: bytes) -> bytes:
    """The encoder never hands out a container that decoders with the default limits refuse."""
    try:
        dispatch.open_container(data)
    except LimitExceededError as e:
        raise InputError(f"decoders with the default DecodeLimits would refuse this container: {e} "
                         "(a nearly constant cache can compress beyond max_expansion)") from None
    return data


def _container(data: Any, limits: Optional[DecodeLimits], partial: bool):
    return dispatch.open_container(data, limits, partial)


def decode(data: Any, device: Union[str, torch.device] = "cpu", *, decoder: str = "auto",
           limits: Optional[DecodeLimits] = None, partial: bool = False, verify: bool = True,
           profiles: Any = None) -> TorchKV:
    """Decompress to [(key, value)] torch tensors in the original layout and dtype.

    ``partial=True`` accepts a container cut short and returns the complete chunks present
    (a prefix of the cache). ``device="cuda"`` decodes on the GPU. A container coded with a
    model profile (``cachegen.profile``) is transformed back with it: ``profiles`` gives the
    Profile(s), else the shipped and registered ones are searched (ConfigError if missing).
    """
    dev = dispatch.resolve_device(device)
    c = _container(data, limits, partial)
    if dispatch.has_transform(c) and dev.type == "cuda" and decoder in ("auto", "gpu"):
        from .gpu.v2 import supports
        if supports(c):   # transformed back on the device by the fused decoder
            out = dispatch.allocate(c, dev, dtype=dispatch.output_dtype(c))
            decode_into(c, out, decoder=decoder, verify=verify, profiles=profiles)
            return out
    return dispatch.untransform(c, dispatch.decode(c, dev, decoder, verify), profiles)


def decode_into(data: Any, buffers: Sequence[Sequence[torch.Tensor]], *, decoder: str = "auto",
                limits: Optional[DecodeLimits] = None, partial: bool = False, verify: bool = True,
                profiles: Any = None) -> list[int]:
    """Decode into caller-owned tensors (e.g. a preallocated max-length cache or the buffers bound
    to an ORT session). buffers[i] = (key, value), each [B, H, capacity, D] with capacity >= the
    layer's tokens, of the container's dtype, on CPU or CUDA. Returns the tokens written per layer.
    """
    c = _container(data, limits, partial)
    if dispatch.has_transform(c):
        dev = _buffers_device(buffers)
        if dev.type == "cuda" and decoder in ("auto", "gpu"):
            from .gpu.v2 import default_decoder, supports
            if supports(c):
                # the fused decoder transforms back on the device, into the buffers themselves
                bufs = dispatch.check_buffers(c, buffers, dtype=dispatch.output_dtype(c))
                dec = default_decoder(dev)
                dec.profiles = _profile_list(profiles)
                dec.decode_into(c, bufs, verify=verify)
                return c.tokens()
        # coefficients decode in the container's dtype, K/V come back in the original one:
        # decode, transform back, then copy into the caller's buffers
        dispatch.copy_into(buffers, decode(c, _buffers_device(buffers), decoder=decoder, verify=verify,
                                           profiles=profiles))
        return c.tokens()
    bufs = dispatch.check_buffers(c, buffers)
    dispatch.decode_into(c, bufs, decoder, verify)
    return c.tokens()


def _profile_list(profiles: Any) -> list:
    from .profile.codec import _profiles_list
    return _profiles_list(profiles)


def _buffers_device(buffers: Any) -> torch.device:
    try:
        return buffers[0][0].device
    except (TypeError, IndexError, AttributeError):
        raise InputError("buffers must be a sequence of (key, value) tensor pairs") from None


def save(path: Union[str, os.PathLike], kv: KVCache, config: Union[str, CodecConfig, None] = "default",
         progress: Progress = None, guard: Any = None) -> int:
    """Encode and write atomically (temp file + rename: an existing file is never half-written).
    ``guard``: a ``cachegen.guard.Guard`` (model + probe + KL budget): ``config`` is stepped up
    until the budget holds and the measured figures are stored in the file (EXT_QUALITY).
    The file's mode honours the umask, like ``open()``. Returns the number of bytes written."""
    if guard is not None:
        data = guard.encode(kv, config, progress=progress).data
    else:
        data = encode(kv, config, progress)
    write_atomic(path, data)
    return len(data)


def load(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu", **kw: Any) -> TorchKV:
    """Decode a file written by `save`. The file is read into memory first (one copy: 25 ms for
    55 MB on the H100 host), not memory-mapped: a mapped file that shrinks while it is decoded
    (rewritten in place by another process) kills the process with SIGBUS (measured: 8 of 8
    runs); a file read while it changes is short or fails its checksums: a CacheGenError."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise FormatError(f"{path}: empty file")
        buf = bytearray(size)
        view, n = memoryview(buf), 0
        while n < size:
            got = f.readinto(view[n:])
            if not got:
                break
            n += got
    return decode(view[:n], device, **kw)


def inspect(data: Any, limits: Optional[DecodeLimits] = None, verify: bool = False) -> dict[str, Any]:
    """Header, chunks, sizes per layer and bits per element, without decoding any stream.

    ``verify=True`` also checks every chunk checksum (a ChecksumError names the first bad one)."""
    c = _container(data, limits, partial=True)
    h = c.header
    v2 = isinstance(c, fmt2.ContainerV2)
    elements = [h.batch * t * (l.channels(0) + l.channels(1)) for l, t in zip(h.layers, c.tokens())]
    layer_bytes = [0] * len(h.layers)
    # Where the bytes go: entropy-coded payload vs everything around it.
    parts = {"streams": 0, "stream_directory": 0, "quantizer_params": 0, "token_scales": 0,
             "model_section": 0, "header_and_index": c.payload_start}
    if v2:
        sizes = c.index["size"].astype(np.int64)
        offsets = c.index["offset"].astype(np.int64)
        chunks = [{"offset": int(o), "size": int(n), "meta_crc32": f"{int(m):08x}", "words_sum": f"{int(w):016x}"}
                  for o, n, m, w in zip(offsets, sizes, c.index["meta_crc"], c.index["words_sum"])]
        size = c.end
        parts["padding"] = size - c.payload_start - int(sizes.sum())
        n_tables = h.n_tables
    else:
        chunks = [{"offset": e.offset, "size": e.size, "crc32": f"{e.crc:08x}"} for e in c.chunks]
        size = c.payload_start + sum(e.size for e in c.chunks)
        n_tables = len(h.table_counts)
    if verify:
        for k in range(c.n_chunks):
            c.chunk_bytes(k, verify=True)
    if h.mode == MODE_LOSSY:
        if v2:
            parts["model_section"] = h.model_section_bytes
        else:
            parts["model_section"] = _model_section_size(c)
        parts["header_and_index"] = c.payload_start - parts["model_section"]
        pbytes = 2 if h.param_dtype == 1 else 4
        for k in range(c.n_chunks):
            blocks = dispatch.block_params(c, k, verify=False)
            packed = False
            entry = 4
            if v2:
                lay = h.layout(k)
                packed = lay.packed
                if lay.dir_group:   # compact: a u16 per stream, plus the segment bases and padding
                    entry = 2
                    parts["stream_directory"] += lay.meta_size - lay.dir_at - 2 * lay.n_dir
                if packed:   # lo offsets and token codes live in one parameter stream per block
                    parts["padding"] += lay.dir_at - (lay.step_at + pbytes * lay.total_steps)
                    n_words = (int(c.index["size"][k]) - lay.meta_size) // 4
                    data_words = sum(bp.stream_words for bp in blocks)
                    parts["param_streams"] = parts.get("param_streams", 0) + 4 * (n_words - data_words) + entry * lay.nb
                else:
                    parts["padding"] += lay.dir_at - (lay.tok_at + lay.total_tok)
            for bp in blocks:
                ch_n = 0 if packed else bp.lo.size
                # v1 stores a step-mode byte per block; v2 one mode for the whole file
                params = (0 if v2 else 1) + pbytes * (ch_n + bp.stored_steps)
                scales = 0 if bp.token_exp is None or packed else bp.token_exp.size
                words = 4 * bp.stream_words
                layer_bytes[bp.layer] += params + scales + words + entry * bp.streams
                parts["streams"] += words
                parts["stream_directory"] += entry * bp.streams
                parts["quantizer_params"] += params
                parts["token_scales"] += scales
    else:
        parts["streams"] = size - c.payload_start - parts.get("padding", 0)
    total_el = sum(elements)
    return {
        "format_version": c.version if v2 else FORMAT_VERSION,
        "mode": "lossless" if h.mode == MODE_LOSSLESS else "lossy",
        "dtype": DTYPE_CODES[h.dtype][0],
        "batch": h.batch,
        "layers": len(h.layers),
        "chunk_tokens": h.chunk_tokens,
        "group_size": h.group_size,
        "channels_per_stream": h.channels_per_stream,
        "table_bits": h.table_bits if v2 else 24,
        "tables": n_tables,
        "chunks": chunks,
        "partial": c.partial,
        "verified": bool(verify),
        "header_bytes": c.payload_start,
        "total_bytes": size,
        "extensions": describe_extensions(h.extensions) if v2 else [],
        "per_layer": [{"tokens": t, "k_shape": [l.k_heads, l.k_dim], "v_shape": [l.v_heads, l.v_dim],
                       "k_bits": l.k_bits, "v_bits": l.v_bits, "bytes": lb,
                       "bits_per_element": (8 * lb / el) if (el and lb) else None}
                      for l, t, lb, el in zip(h.layers, c.tokens(), layer_bytes, elements)],
        "breakdown": parts,
        "elements": total_el,
        "bits_per_element": 8 * size / total_el,
        "ratio_vs_fp16": 2 * total_el / size,
    }


def _model_section_size(c: Container) -> int:
    from .format.container import FIXED_SIZE, LAYER_SIZE, CHUNK_ENTRY_SIZE, PREAMBLE_SIZE
    h = c.header
    n_index = h.n_chunks  # the index always lists every chunk, even in a partial container
    return c.payload_start - PREAMBLE_SIZE - FIXED_SIZE - LAYER_SIZE * len(h.layers) - CHUNK_ENTRY_SIZE * n_index


# ------------------------------------------------------------------ numcodecs-style Codec

_REGISTRY: dict[str, type] = {}


def register_codec(cls: type) -> type:
    _REGISTRY[cls.codec_id] = cls
    return cls


def get_codec(config: dict[str, Any]) -> "Codec":
    """Instantiate a codec from its get_config() dict (like numcodecs.get_codec)."""
    d = dict(config)
    cid = d.pop("id", None)
    if cid not in _REGISTRY:
        raise ConfigError(f"unknown codec id {cid!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[cid].from_config({"id": cid, **d})


@register_codec
class Codec:
    """numcodecs-shaped codec: encode(kv) -> bytes, decode(bytes, out=None) -> kv."""
    codec_id = "cachegen"

    def __init__(self, config: Union[str, CodecConfig, None] = "default") -> None:
        self.config = get_config(config)

    def encode(self, buf: KVCache) -> bytes:
        return encode(buf, self.config)

    def decode(self, buf: Any, out: Optional[Sequence[Sequence[torch.Tensor]]] = None) -> TorchKV:
        if out is not None:
            decode_into(buf, out)
            return [tuple(p) for p in out]  # type: ignore[misc]
        return decode(buf)

    def get_config(self) -> dict[str, Any]:
        return {"id": self.codec_id, **self.config.to_dict()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Codec":
        d = dict(config)
        if d.pop("id", cls.codec_id) != cls.codec_id:
            raise ConfigError(f"config is not for codec {cls.codec_id!r}")
        return cls(CodecConfig.from_dict(d))

    def __repr__(self) -> str:
        return f"Codec({self.config.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.get_config() == self.get_config()
