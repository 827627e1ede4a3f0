"""Decode dispatch: the one place that picks the parser (format v1 / v2) and the decoder
(lossless, CPU reference, CPU lock-step, GPU) for a container and a destination.

Sits between ``cachegen.gpu`` and ``cachegen.api`` (the GPU package never imports the API).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

from .buffers import TORCH_DTYPES, check_kv_buffers
from .errors import ConfigError, InputError, LimitExceededError, UnsupportedVersionError
from .format import v2 as fmt2
from .format.container import MODE_LOSSLESS, Container, DecodeLimits, parse_container
from .codec.decoder import decode_lockstep, decode_reference, work_items
from .codec.lossless import decode_lossless, lossless_items
from .codec.parallel import parallel_imap, worker_count

AnyContainer = Union[Container, fmt2.ContainerV2]

_TORCH_INT = {1: torch.int16, 2: torch.int16, 3: torch.int32}
CPU_DECODERS = ("reference", "lockstep")


def open_container(data: Any, limits: Optional[DecodeLimits] = None, partial: bool = False) -> AnyContainer:
    """Parse and validate a container of either format version (everything but stream contents)."""
    if isinstance(data, (Container, fmt2.ContainerV2)):
        return data
    version = fmt2.peek_version(data)
    if version == fmt2.VERSION:
        return fmt2.parse_container(data, limits, partial)
    if version == 1:
        return parse_container(data, limits, partial)
    raise UnsupportedVersionError(f"container format version {version} is not supported (this decoder reads 1 and 2)")


def f32_to(x: np.ndarray, dtype: int) -> np.ndarray:
    """float32 -> the container dtype in numpy, round-to-nearest-even (bf16 as int16 bits)."""
    if dtype == 1:
        return x.astype(np.float16, order="C")
    if dtype == 2:
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16).view(np.int16)
    return np.ascontiguousarray(x, dtype=np.float32)


def _items(c: AnyContainer) -> list[tuple[int, int, int]]:
    if c.header.mode == MODE_LOSSLESS:
        return lossless_items(c)  # type: ignore[arg-type]
    if isinstance(c, fmt2.ContainerV2):
        return [(k, 0, 0) for k in range(c.n_chunks)]
    return work_items(c, pieces_per_chunk=2)


def _decode_item(state: tuple, item: tuple[int, int, int]) -> list:
    """One unit of CPU decode work, runnable in a forked worker (numpy + constriction only)."""
    c, method, verify = state
    if c.header.mode == MODE_LOSSLESS:
        return list(decode_lossless(c, item, verify))
    if isinstance(c, fmt2.ContainerV2):
        from .codec.decoder_v2 import decode_chunk
        blocks = decode_chunk(c, item[0], verify)
    else:
        blocks = (decode_reference if method == "reference" else decode_lockstep)(c, item, verify)
    return [(i, kvi, k, n, f32_to(x, c.header.dtype)) for i, kvi, k, n, x in blocks]


def cpu_fill(c: AnyContainer, bufs: Sequence[Sequence[torch.Tensor]], decoder: str = "reference",
             verify: bool = True) -> None:
    """Decode on the CPU into CPU tensors [B, H, >=T, D] (tokens written from position 0)."""
    h = c.header
    if decoder not in CPU_DECODERS:
        raise ConfigError(f"unknown CPU decoder {decoder!r} ({', '.join(CPU_DECODERS)})")
    if decoder == "lockstep" and isinstance(c, fmt2.ContainerV2):
        decoder = "reference"  # v2 has one CPU decoder; the GPU kernels are checked against it
    items = _items(c)
    workers = worker_count(h.decoded_bytes(c.n_chunks), len(items))
    C = h.chunk_tokens
    bits = h.mode == MODE_LOSSLESS or h.dtype == 2      # results come as integer bit patterns
    # numpy views of the destination: plain memory copies, no torch intra-op threads
    views = [tuple((t.view(_TORCH_INT[h.dtype]) if bits else t).numpy() for t in pair) for pair in bufs]
    for result in parallel_imap(_decode_item, (c, decoder, verify), items, workers):  # streamed: one item in memory
        for i, kvi, k, n, arr in result:
            views[i][kvi][:, :, k * C:k * C + n, :] = arr


def allocate(c: AnyContainer, device: torch.device,
             dtype: Optional[torch.dtype] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Output tensors for a validated container (of ``dtype``, default the container's); an
    allocation failure is a LimitExceededError."""
    h = c.header
    dt = TORCH_DTYPES[h.dtype] if dtype is None else dtype
    out = []
    try:
        for l, t in zip(h.layers, c.tokens()):
            out.append((torch.empty((h.batch, l.k_heads, t, l.k_dim), dtype=dt, device=device),
                        torch.empty((h.batch, l.v_heads, t, l.v_dim), dtype=dt, device=device)))
    except (RuntimeError, MemoryError) as e:   # torch reports out-of-memory as RuntimeError
        raise LimitExceededError(f"cannot allocate the decoded cache ({h.decoded_bytes(c.n_chunks)} bytes): {e}") from None
    return out


def output_dtype(c: AnyContainer) -> torch.dtype:
    """dtype of the decoded cache: the container's, or for a model-profile container (its
    coefficients are float32) the original cache's, from its transform record."""
    if has_transform(c):
        from .format.extensions import EXT_TRANSFORM, find
        from .profile.codec import TransformRecord
        return TORCH_DTYPES[TransformRecord(find(c.header.extensions, EXT_TRANSFORM).payload).dtype]
    return TORCH_DTYPES[c.header.dtype]


def check_buffers(c: AnyContainer, buffers: Sequence[Sequence[torch.Tensor]],
                  dtype: Optional[torch.dtype] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Buffers checked against the container: count, shape, capacity, one device, and the
    container's dtype (``dtype`` overrides it: a profile container's output dtype)."""
    return check_kv_buffers(c.header, c.tokens(), buffers, dtype)


def _cpu_then_copy(c: AnyContainer, bufs, decoder: str, verify: bool) -> None:
    tmp = allocate(c, torch.device("cpu"))
    cpu_fill(c, tmp, decoder, verify)
    for (kb, vb), (k, v) in zip(bufs, tmp):
        kb[:, :, :k.shape[2]].copy_(k, non_blocking=False)
        vb[:, :, :v.shape[2]].copy_(v, non_blocking=False)


def resolve_device(device: Any) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InputError(f"bad device {device!r}: {e}") from None
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device must be cpu or cuda, got {dev.type!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' asked for, but torch sees no CUDA GPU")
    return dev


def decode_into(c: AnyContainer, bufs: Sequence[Sequence[torch.Tensor]], decoder: str = "auto",
                verify: bool = True) -> None:
    """Fill checked buffers (see check_buffers) with the decoded cache, on their device."""
    if decoder not in ("auto", "gpu") + CPU_DECODERS:
        raise ConfigError(f"unknown decoder {decoder!r} (auto, gpu, reference, lockstep)")
    dev = bufs[0][0].device
    if dev.type == "cuda" and decoder in ("auto", "gpu") and c.header.mode != MODE_LOSSLESS:
        if isinstance(c, fmt2.ContainerV2):
            from .gpu.v2 import default_decoder, supports
            if supports(c):
                # raw decoder output: a profile container's coefficients (api.decode transforms)
                default_decoder(dev).decode_into(c, bufs, verify=verify, coefficients=True)
                return
            # anchor-delta v2 containers: no fused kernel; decode on the CPU and copy
            _cpu_then_copy(c, bufs, "reference", verify)
        else:
            from .gpu import decode_gpu_into
            decode_gpu_into(c, bufs, verify=verify)
        return
    if decoder == "gpu" and dev.type != "cuda":
        raise InputError("decoder='gpu' needs CUDA destination buffers")
    cpu = "reference" if decoder in ("auto", "gpu") else decoder
    if dev.type == "cpu":
        cpu_fill(c, bufs, cpu, verify)
    else:
        _cpu_then_copy(c, bufs, cpu, verify)


def decode(c: AnyContainer, device: Any = "cpu", decoder: str = "auto", verify: bool = True):
    dev = resolve_device(device)
    bufs = allocate(c, dev)
    decode_into(c, bufs, decoder, verify)
    return bufs


@dataclass(frozen=True)
class BlockParams:
    """Quantizer parameters of one (layer, K/V) block of a chunk, whatever the format version."""
    layer: int
    kv: int
    tokens: int
    lo: np.ndarray            # float32 [channels]
    step: np.ndarray          # float32 [channels] (a shared step repeated)
    token_exp: Optional[np.ndarray]   # uint8 [batch * tokens] scale codes, or None
    stream_words: int         # 32-bit words of the block's streams
    streams: int
    stored_steps: int         # step values stored (1 when one step is shared by the channels)


def block_params(c: AnyContainer, k: int, verify: bool = True) -> list[BlockParams]:
    """Per block of lossy chunk k: its parameters and stream sizes (for inspect and tests)."""
    h = c.header
    out = []
    if isinstance(c, fmt2.ContainerV2):
        from .codec.params import chunk_params
        v = fmt2.chunk_view(c, k, verify)
        lay = v.layout
        lo, tok = chunk_params(c, v, c.cache.setdefault("models", {}))
        st = v.step.astype(np.float32)
        ends = v.ends.astype(np.int64)
        for j, (i, kv, n) in enumerate(lay.blocks):
            ch = int(lay.nch[j])
            a = int(lay.ch_off[j])
            s0 = int(lay.step_off[j])
            step = np.repeat(st[s0:s0 + 1], ch) if h.step_mode == 1 else st[s0:s0 + ch]
            e = tok[int(lay.tok_off[j]):int(lay.tok_off[j]) + h.batch * n] if tok is not None else None
            f0, f1 = int(lay.first_stream[j]), int(lay.first_stream[j + 1])
            w = int(ends[f1 - 1] - (ends[f0 - 1] if f0 else 0)) if f1 > f0 else 0
            out.append(BlockParams(i, kv, n, lo[a:a + ch], step, e, w, f1 - f0, 1 if h.step_mode == 1 else ch))
        return out
    from .format.container import STEP_SHARED, parse_lossy_chunk
    ch = parse_lossy_chunk(c, k, verify)
    for b, (i, kv, n) in enumerate(ch.blocks):
        s0 = ch.first_stream[b]
        s1 = ch.first_stream[b + 1] if b + 1 < len(ch.blocks) else ch.stream_lengths.size
        out.append(BlockParams(i, kv, n, ch.lo[b], ch.step[b], ch.token_exp[b],
                               int(ch.stream_lengths[s0:s1].sum()), int(s1 - s0),
                               1 if ch.step_modes[b] == STEP_SHARED else ch.lo[b].size))
    return out


def has_transform(c: AnyContainer) -> bool:
    from .format.extensions import EXT_TRANSFORM, find
    return find(getattr(c.header, "extensions", []) or [], EXT_TRANSFORM) is not None


def untransform(c: AnyContainer, kv, profiles: Any = None):
    """Undo a model-profile transform (EXT_TRANSFORM, critical) on the decoder's raw output:
    without this a transform-coded container would come back as coefficients. Returns kv
    unchanged when the container has no transform; raises ConfigError when its profile is
    not available (cachegen.profile.find_profile)."""
    if not has_transform(c):
        return kv
    from .profile.codec import postprocess   # needs torch and the profile package: only here
    return postprocess(kv, c.header.extensions, profiles)


def copy_into(buffers: Sequence[Sequence[torch.Tensor]], kv) -> None:
    """Copy a decoded cache into caller buffers [B, H, >=T, D] (checked: count, shape, dtype, device)."""
    if len(buffers) != len(kv):
        raise InputError(f"{len(buffers)} buffer pairs for {len(kv)} layers")
    for i, (pair, src) in enumerate(zip(buffers, kv)):
        try:
            kb, vb = pair
        except (TypeError, ValueError):
            raise InputError(f"layer {i}: expected a (key, value) buffer pair") from None
        for name, b, x in (("k", kb, src[0]), ("v", vb, src[1])):
            if not isinstance(b, torch.Tensor) or b.dtype != x.dtype or b.dim() != 4 or b.shape[0] != x.shape[0] \
                    or b.shape[1] != x.shape[1] or b.shape[3] != x.shape[3] or b.shape[2] < x.shape[2]:
                raise InputError(f"layer {i} {name}: buffer must be a {x.dtype} tensor "
                                 f"[{x.shape[0]}, {x.shape[1]}, >={x.shape[2]}, {x.shape[3]}]")
            b[:, :, :x.shape[2]].copy_(x.to(b.device))
