"""Hugging Face transformers: caches to and from cachegen, and a runner for the prefix store.

    from cachegen import hf
    out = model(ids, use_cache=True)
    hf.save("ctx.cgk", out.past_key_values, "default")          # keeps the true sequence length
    cache = hf.load("ctx.cgk", model.config)                     # a DynamicCache, ready to continue
    model(next_ids, past_key_values=cache)

Why not ``DynamicCache(cachegen.decode(data), config=model.config)``: transformers 5 gives
sliding-window layers (Gemma-3, Mistral-style) a ``DynamicSlidingWindowLayer`` that keeps only
its last ``sliding_window - 1`` tokens and counts the true length in ``cumulative_length``.
Feeding the window back through ``update`` counts only the window (Gemma-3 reports 511
instead of 900 and generation goes wrong). :func:`to_dynamic_cache` sets each layer's state
directly: full layers get every token, sliding layers their window and the true length.

:class:`HFRunner` has the ``prefill`` / ``continue_from`` protocol of ``OrtRunner``, so
``cachegen.store.prefill_with_reuse`` and the streaming loader work with a transformers model.
It keeps every layer's whole cache (the store slices chunks by token position); the model
applies the sliding window through its attention mask, as the ONNX export does.

Works with transformers 5.x (per-layer ``cache.layers`` with sliding-window layers) and 4.5x
(no sliding layers in ``DynamicCache``: every layer must hold the whole sequence; Gemma-3
there defaults to a ``HybridCache`` of static buffers, which is refused: run it with
``past_key_values=DynamicCache()``). Tested: 5.24 (all tests) and 4.55 (the tiny-model tests
less the sliding-layer one).
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from ._deps import require
from .errors import FormatError, InputError

__all__ = ["to_dynamic_cache", "from_dynamic_cache", "cache_seq_length", "save", "load", "encode",
           "decode", "HFRunner", "HFCacheInfo", "META_KEY"]

META_KEY = "cachegen.hf"   # key of our record in the container's user-metadata extension


def _torch():
    return require("torch")


def _transformers():
    return require("transformers")


@dataclass(frozen=True)
class HFCacheInfo:
    """What a container needs besides the tensors to become a transformers cache again."""
    seq_length: int                          # tokens the cache stands for (not the window)
    sliding_windows: tuple                   # per layer: the window, or None for full attention


def _layer_windows(cache: Any) -> list[Optional[int]]:
    layers = getattr(cache, "layers", None)
    if layers is None:                        # transformers 4.5x DynamicCache: no sliding layers
        return [None] * len(getattr(cache, "key_cache", []))
    return [int(l.sliding_window) if getattr(l, "is_sliding", False) else None for l in layers]


def cache_seq_length(cache: Any) -> int:
    """The true sequence length of a transformers cache (a sliding layer counts every token seen)."""
    return int(cache.get_seq_length())


def from_dynamic_cache(cache: Any) -> list:
    """``[(key, value)]`` per layer, each ``[batch, kv_heads, tokens, head_dim]``; sliding layers
    give only the tokens they hold (their window), which is all the model reads."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        out = []
        for i, l in enumerate(layers):
            if not type(l).__name__.startswith("Dynamic"):
                # static / hybrid caches hold preallocated max-length buffers
                raise InputError(f"layer {i} is a {type(l).__name__}: only DynamicCache layers are supported "
                                 "(run the model with past_key_values=DynamicCache())")
            if not getattr(l, "is_initialized", True) or getattr(l, "keys", None) is None:
                raise InputError(f"layer {i} of the cache is empty (was the model run with use_cache=True?)")
            out.append((l.keys, l.values))
        return out
    if hasattr(cache, "key_cache"):
        return list(zip(cache.key_cache, cache.value_cache))
    if isinstance(cache, (list, tuple)):        # legacy tuple-of-tuples cache
        return [(k, v) for k, v, *_ in cache]
    raise InputError(f"not a transformers cache: {type(cache).__name__}")


def _window_for(config: Any, n_layers: int) -> list[Optional[int]]:
    """Per-layer sliding window from a model config (what DynamicCache(config=) builds)."""
    if config is None:
        return [None] * n_layers
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if not types or not window:
        return [None] * n_layers
    return [int(window) if t in ("sliding_attention", "chunked_attention") else None for t in types][:n_layers]


def to_dynamic_cache(kv: Sequence[Sequence[Any]], config: Any = None, seq_length: Optional[int] = None,
                     device: Any = None, dtype: Any = None) -> Any:
    """A ``transformers.DynamicCache`` holding ``kv`` (numpy or torch ``[B, H, T, D]`` per layer).

    ``config``: the model's config. With it (transformers 5), sliding-window layers become
    ``DynamicSlidingWindowLayer``s holding the last ``sliding_window - 1`` tokens and counting
    ``seq_length`` tokens; without it every layer is a full layer (the model still applies its
    window through the mask, but every layer must then hold the whole sequence).
    ``seq_length``: the true length; default the longest layer's tokens. A layer that holds fewer
    tokens than it needs raises InputError.
    """
    torch = _torch()
    DynamicCache = _transformers().DynamicCache
    if not kv:
        raise InputError("the KV cache has no layers")
    tensors = []
    for i, pair in enumerate(kv):
        try:
            k, v = pair[0], pair[1]
        except (TypeError, IndexError):
            raise InputError(f"layer {i}: expected a (key, value) pair") from None
        k, v = (x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x)) for x in (k, v))
        if k.dim() != 4 or v.dim() != 4 or k.shape[2] != v.shape[2]:
            raise InputError(f"layer {i}: key/value must be [batch, heads, tokens, head_dim] with equal tokens, "
                             f"got {tuple(k.shape)} / {tuple(v.shape)}")
        if device is not None or dtype is not None:
            k, v = k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)
        tensors.append((k, v))
    longest = max(int(k.shape[2]) for k, _ in tensors)
    n = longest if seq_length is None else int(seq_length)
    if n < longest:
        raise InputError(f"seq_length {n} is shorter than a layer's {longest} tokens")

    sliding = supports_sliding_layers()
    cache = DynamicCache(config=config) if config is not None and sliding else DynamicCache()
    layers = getattr(cache, "layers", None)
    if layers is None or not sliding:        # transformers 4.5x: no sliding layers, grow by update()
        for i, (k, v) in enumerate(tensors):
            if k.shape[2] != n:
                raise InputError(f"layer {i} holds {k.shape[2]} of {n} tokens; this transformers version's "
                                 "DynamicCache has no sliding-window layers (give every layer the whole sequence)")
            cache.update(k, v, i)
        return cache
    windows = _layer_windows(cache) if layers else [None] * len(tensors)
    if layers and len(layers) != len(tensors):
        raise InputError(f"the cache has {len(tensors)} layers, the model config {len(layers)}")
    if not layers:                           # no config: layers are created on first update
        from transformers.cache_utils import DynamicLayer
        cache.layers.extend(DynamicLayer() for _ in tensors)
        layers = cache.layers
    for i, ((k, v), layer, w) in enumerate(zip(tensors, layers, windows)):
        t = int(k.shape[2])
        if w is None:
            if t != n:
                raise InputError(f"layer {i} (full attention) holds {t} of {n} tokens")
        else:
            keep = min(n, w - 1)             # what DynamicSlidingWindowLayer keeps after an update
            if t < keep:
                raise InputError(f"layer {i} (sliding window {w}) holds {t} tokens, needs the last {keep}")
            k, v = k[:, :, t - keep:], v[:, :, t - keep:]
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        if hasattr(layer, "cumulative_length"):
            layer.cumulative_length = n
    return cache


def supports_sliding_layers() -> bool:
    """Whether this transformers' DynamicCache has sliding-window layers (5.x, 4.56+)."""
    return _accepts(_transformers().DynamicCache, "config")


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


# ------------------------------------------------------------------ containers

def encode(cache: Any, config: Any = "default", metadata: Optional[Mapping[str, Any]] = None) -> bytes:
    """Compress a transformers cache; the true sequence length and the layers' windows travel
    in the container (user-metadata extension ``"cachegen.hf"``). ``metadata``: more JSON
    fields for that extension."""
    import cachegen
    from .format.extensions import EXT_USER, Extension

    kv = from_dynamic_cache(cache)
    info = {"seq_length": cache_seq_length(cache), "sliding_windows": _layer_windows(cache)}
    payload = {META_KEY: info, **dict(metadata or {})}
    return cachegen.encode(kv, config, extensions=[Extension.json(EXT_USER, payload)])


def read_info(data: Any) -> HFCacheInfo:
    """The transformers record of a container (or, without one, what the tensors imply)."""
    import cachegen

    info = cachegen.inspect(data)
    for e in info.get("extensions", []):
        rec = e.get("value") if isinstance(e.get("value"), dict) else None
        if rec and isinstance(rec.get(META_KEY), dict):
            r = rec[META_KEY]
            n, w = r.get("seq_length"), r.get("sliding_windows")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0 or not isinstance(w, list) \
                    or len(w) != info["layers"] or not all(x is None or (isinstance(x, int) and x > 0) for x in w):
                raise FormatError(f"malformed {META_KEY} record in the container: {r!r}")
            if n < max(l["tokens"] for l in info["per_layer"]) and not info["partial"]:
                raise FormatError(f"{META_KEY}: seq_length {n} below the tokens stored")
            return HFCacheInfo(n, tuple(w))
    return HFCacheInfo(max(l["tokens"] for l in info["per_layer"]), (None,) * info["layers"])


def decode(data: Any, model_config: Any = None, device: str = "cpu", dtype: Any = None) -> Any:
    """Container bytes -> ``DynamicCache`` (see :func:`to_dynamic_cache`)."""
    import cachegen

    info = read_info(data)
    kv = cachegen.decode(data, device)
    if dtype is not None:
        kv = [(k.to(dtype), v.to(dtype)) for k, v in kv]
    return to_dynamic_cache(kv, model_config, seq_length=info.seq_length)


def save(path: Union[str, os.PathLike], cache: Any, config: Any = "default",
         metadata: Optional[Mapping[str, Any]] = None) -> int:
    """Encode a transformers cache and write it atomically; returns the bytes written."""
    from .fileio import write_atomic

    data = encode(cache, config, metadata)
    write_atomic(path, data)
    return len(data)


def load(path: Union[str, os.PathLike], model_config: Any = None, device: str = "cpu", dtype: Any = None) -> Any:
    """Read a file written by :func:`save` (or ``cachegen.save``) as a ``DynamicCache``."""
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise FormatError(f"{path}: empty file")
    return decode(data, model_config, device, dtype)


# ------------------------------------------------------------------ runner for the store

class HFRunner:
    """A transformers causal LM behind the runner protocol of ``cachegen.store``:
    ``prefill(ids) -> (logits [1, T, V] float32 numpy, kv)`` and
    ``continue_from(kv, ids) -> (logits, kv of past + new)``, plus the attributes
    ``fingerprint_from_runner`` reads (``num_layers``, ``num_kv_heads``, ``head_dim``,
    ``dtype``, ``model_dir``). kv is ``[(key, value)]`` torch tensors holding every token in
    every layer (sliding layers too), so the store can cut it into chunks."""

    def __init__(self, model: Any, tokenizer: Any = None, model_id: Optional[str] = None) -> None:
        torch = _torch()
        self.model = model.eval()
        self.tokenizer = tokenizer
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.config = model.config
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.model_dir = model_id or getattr(cfg, "_name_or_path", None) or type(model).__name__
        self.windows = _window_for(model.config, self.num_layers)
        params = inspect.signature(model.forward).parameters
        # transformers 5.2x renamed past_key_values to cache (the old name still works, with a warning)
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._torch = torch

    def _ids(self, ids: Any):
        torch = self._torch
        t = ids if isinstance(ids, torch.Tensor) else torch.as_tensor(np.asarray(ids, dtype=np.int64))
        t = t.reshape(1, -1) if t.dim() == 1 else t
        if t.dim() != 2 or t.shape[0] != 1 or t.shape[1] == 0:
            raise InputError(f"expected a non-empty 1-D token sequence (batch 1), got shape {tuple(t.shape)}")
        return t.to(self.device)

    def _forward(self, ids: Any, cache: Any):
        with self._torch.no_grad():
            out = self.model(input_ids=self._ids(ids), use_cache=True, **{self._cache_arg: cache})
        new = getattr(out, "past_key_values", None)
        if new is None:
            new = getattr(out, "cache", None)
        return out.logits.float().cpu().numpy(), new

    def prefill(self, input_ids: Any):
        """Run a prompt from an empty cache (one that keeps every token in every layer)."""
        cache = _empty_cache()
        logits, cache = self._forward(input_ids, cache)
        return logits, from_dynamic_cache(cache)

    def continue_from(self, kv: Sequence[Sequence[Any]], new_ids: Any):
        """Feed ``new_ids`` after ``kv`` (every layer whole, or sliding layers trimmed to their
        window: then the returned cache is trimmed the same way)."""
        lens = {int(k.shape[2]) for k, _ in kv}
        if len(lens) == 1:
            cache = to_dynamic_cache(kv, None, device=self.device, dtype=self.dtype)
        else:
            cache = to_dynamic_cache(kv, self.config, device=self.device, dtype=self.dtype)
        logits, cache = self._forward(new_ids, cache)
        return logits, from_dynamic_cache(cache)

    def generate(self, new_ids: Any, max_new_tokens: int, kv: Optional[Sequence[Sequence[Any]]] = None) -> list[int]:
        """Greedy tokens after ``kv`` (or after a prefill of ``new_ids`` when kv is None)."""
        logits, kv2 = self.prefill(new_ids) if kv is None else self.continue_from(kv, new_ids)
        out: list[int] = []
        for step in range(max_new_tokens):
            tok = int(np.argmax(logits[0, -1]))
            out.append(tok)
            if step == max_new_tokens - 1:
                break
            logits, kv2 = self.continue_from(kv2, [tok])
        return out


def _empty_cache() -> Any:
    """An empty DynamicCache whose layers all keep every token (no config: no sliding layers)."""
    return _transformers().DynamicCache()
