"""Lossless mode: per chunk, each (layer, K/V) slice byte-shuffled, the lot in one zstd frame."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import zstandard

from ..config import CodecConfig
from ..errors import FormatError
from ..format.container import MODE_LOSSLESS, Container, Header, build_container, chunk_token_count
from .layout import describe, raw_bytes

RawSink = Callable[[int, int, int, int, np.ndarray], None]  # (layer, kv, chunk, n, bytes [B,H,n,D,s])


def _shuffle(b: np.ndarray) -> bytes:
    s = b.shape[-1]
    return np.ascontiguousarray(b.reshape(-1, s).T).tobytes()


def _unshuffle(buf: memoryview, shape: tuple[int, ...], s: int) -> np.ndarray:
    planes = np.frombuffer(buf, dtype=np.uint8).reshape(s, -1)
    return np.ascontiguousarray(planes.T).reshape(shape + (s,))


def chunk_payloads(kv: Sequence[Sequence[Any]], infos: Sequence, config: CodecConfig,
                   progress: Optional[Callable[[int, int], None]] = None):
    """The lossless payload of every chunk (both format versions): per block the byte-shuffled
    slice, the chunk in one zstd frame with its content size."""
    raws = [(raw_bytes(k), raw_bytes(v)) for k, v in kv]
    cctx = zstandard.ZstdCompressor(level=config.zstd_level, write_content_size=True)
    C = config.chunk_tokens
    n_chunks = -(-max(l.tokens for l in infos) // C)
    for k in range(n_chunks):
        parts = []
        for i, l in enumerate(infos):
            n = chunk_token_count(l.tokens, k, C)
            if n:
                for kvi in (0, 1):
                    parts.append(_shuffle(raws[i][kvi][:, :, k * C:k * C + n]))
        yield cctx.compress(b"".join(parts))
        if progress:
            progress(k + 1, n_chunks)


def encode_lossless(kv: Sequence[Sequence[Any]], config: CodecConfig,
                    progress: Optional[Callable[[int, int], None]] = None) -> bytes:
    infos, batch, dtype = describe(kv)
    header = Header(mode=MODE_LOSSLESS, dtype=dtype, batch=batch, chunk_tokens=config.chunk_tokens,
                    layers=infos, channels_per_stream=0)
    return build_container(header, list(chunk_payloads(kv, infos, config, progress)))


def lossless_items(container: Container) -> list[tuple[int, int, int]]:
    return [(k, 0, 0) for k in range(container.n_chunks)]


def decode_lossless(container: Container, item: tuple[int, int, int], verify: bool = True):
    """Yields (layer, kv, chunk, n, elements [B, H, n, D] as int16/int32 bit patterns)."""
    h = container.header
    s = h.elem_bytes
    k = item[0]
    blob = container.chunk_bytes(k, verify)
    shapes, expect = [], 0
    for i, l in enumerate(h.layers):
        n = chunk_token_count(l.tokens, k, h.chunk_tokens)
        if n:
            for kvi in (0, 1):
                heads, dim = l.heads_dim(kvi)
                shapes.append((i, kvi, n, (h.batch, heads, n, dim)))
                expect += h.batch * heads * n * dim * s
    try:
        if zstandard.get_frame_parameters(bytes(blob[:18])).content_size != expect:
            raise FormatError(f"chunk {k}: zstd frame does not declare the expected size {expect}")
        obj = zstandard.ZstdDecompressor().decompressobj()
        raw = obj.decompress(bytes(blob))
        if len(raw) != expect or obj.unused_data or not obj.eof:
            raise FormatError(f"chunk {k}: zstd frame decodes to the wrong size or has trailing data")
    except zstandard.ZstdError as e:
        raise FormatError(f"chunk {k}: zstd frame does not decode: {e}") from None
    mv, pos = memoryview(raw), 0
    ints = np.int16 if s == 2 else np.int32
    for i, kvi, n, shape in shapes:
        nb = int(np.prod(shape)) * s
        yield i, kvi, k, n, _unshuffle(mv[pos:pos + nb], shape, s).view(ints)[..., 0]
        pos += nb
