"""A KV store keyed by token prefix: per-chunk entries, several quality levels per chunk.

Layout in the backend, for chunk ``k`` of a prompt with chained hash ``h_k`` (see
:mod:`cachegen.store.keys`):

* ``<h_k hex>.<level>``: the KV of that chunk's tokens only (``[B, H, C, D]`` per layer),
  encoded on its own at ``level`` (a codec preset name, or ``"raw"`` for plain fp16);
* ``<h_k hex>.idx``: a small index entry listing the levels stored for the chunk and their
  sizes (the streaming planner needs them before fetching anything); written after the data,
  by a merge (:meth:`Backend.update`: compare-and-set on Redis, a lock on a directory), so two
  writers adding different levels of one chunk at once both end up listed.

Why per-chunk containers rather than one container per prompt: any prefix of any stored prompt
is served without re-encoding, two prompts that share a prefix share its entries, eviction of
one chunk costs one chunk (the loader recomputes it from its tokens and goes on), and every
chunk can have its own level, which is what bandwidth adaptation needs. The price is one
container header per chunk (about 11 KB against ~1.1-2.3 MB of payload for a 256-token SmolLM2
chunk, under 1%) and one request per chunk (batched with MGET for the index lookup).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..api import decode as cg_decode, encode as cg_encode
from ..config import CodecConfig, get_config
from ..errors import CacheGenError, ConfigError
from .backends import Backend, DirectoryBackend
from .entry import (KIND_DATA, KIND_INDEX, CorruptEntryError, check_chunk_container, decode_raw, encode_raw,
                    pack_entry, pack_index, unpack_entry, unpack_index)
from .keys import Fingerprint, chunk_hashes

__all__ = ["KVStore", "ChunkRef", "PrefixMatch", "concat_kv", "slice_kv", "prefill_with_reuse"]

log = logging.getLogger("cachegen.store")
TorchKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ChunkRef:
    index: int                 # chunk number in the prompt
    hash: bytes                # chained hash h_k
    levels: Mapping[str, int]  # level -> stored bytes (entry payload)
    tokens: int                # tokens in the chunk


@dataclass
class PrefixMatch:
    """The longest stored prefix of a prompt: ``tokens`` = sum of the matched chunks' tokens."""
    chunks: list[ChunkRef]
    chunk_tokens: int
    lookup_s: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def slice_kv(kv: Sequence[Sequence[Any]], a: int, b: int) -> list:
    return [(k[:, :, a:b], v[:, :, a:b]) for k, v in kv]


def _to_torch(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))


def concat_kv(parts: Sequence[Sequence[Sequence[Any]]]) -> TorchKV:
    """Concatenate per-chunk caches along tokens (torch tensors out)."""
    if not parts:
        return []
    if len(parts) == 1:
        return [(_to_torch(k), _to_torch(v)) for k, v in parts[0]]
    out = []
    for layer in zip(*parts):
        out.append((torch.cat([_to_torch(p[0]) for p in layer], dim=2),
                    torch.cat([_to_torch(p[1]) for p in layer], dim=2)))
    return out


class KVStore:
    """Save and find compressed KV caches by token prefix.

    ``backend``: a :class:`~cachegen.store.backends.Backend`, or a folder path for a
    :class:`DirectoryBackend`. ``levels``: the levels :meth:`put` writes by default (preset names,
    ``"raw"``, or names given in ``configs``), best quality first is customary.
    """

    def __init__(self, backend: Union[Backend, str, Any], fingerprint: Fingerprint,
                 levels: Sequence[str] = ("default",), configs: Optional[Mapping[str, CodecConfig]] = None,
                 kv_dtype: torch.dtype = torch.float32, guard: Any = None) -> None:
        # guard: a cachegen.guard.GuardPolicy; put() then steps each level up until the prompt's
        # probe holds the KL budget and stores it under the level it reached (see guard_chunks)
        self.guard = guard
        self.last_guard: dict = {}
        self.backend = backend if isinstance(backend, Backend) else DirectoryBackend(backend)
        self.fp = fingerprint
        self.levels = tuple(levels)
        self.configs = dict(configs or {})
        self.kv_dtype = kv_dtype
        self.stats = {"corrupt": 0, "chunks_written": 0, "chunks_loaded": 0}
        for lv in self.levels:
            self.config_for(lv)

    @property
    def chunk_tokens(self) -> int:
        return self.fp.chunk_tokens

    # ---------------------------------------------------------------- keys and entries
    @staticmethod
    def data_key(h: bytes, level: str) -> str:
        return f"{h.hex()}.{level}"

    @staticmethod
    def index_key(h: bytes) -> str:
        return f"{h.hex()}.idx"

    def config_for(self, level: str) -> Optional[CodecConfig]:
        if level == "raw":
            return None
        if level in self.configs:
            return self.configs[level]
        return get_config(level)

    def encode_chunk(self, kv: Sequence[Sequence[Any]], level: str) -> bytes:
        cfg = self.config_for(level)
        if cfg is None:
            return encode_raw(kv)
        return cg_encode(kv, cfg)

    def decode_chunk(self, payload: Any, level: str, device: str = "cpu") -> TorchKV:
        """Payload -> KV. Raises CacheGenError on bad data."""
        if level == "raw":
            kv = decode_raw(payload, self.fp.layer_shapes, dtype=self.kv_dtype)
        else:
            # Shapes, dtype and tokens checked on the header first: a checksummed entry may still
            # hold another cache (it is then a miss, never served).
            check_chunk_container("chunk", payload, self.fp.layer_shapes, self.fp.dtype, self.chunk_tokens)
            kv = cg_decode(payload, device)
        if len(kv) != self.fp.num_layers:
            raise CorruptEntryError(f"chunk has {len(kv)} layers, the model {self.fp.num_layers}")
        return kv

    def _read(self, key: str, kind: int, data: Optional[bytes]) -> Optional[memoryview]:
        if data is None:
            return None
        try:
            return unpack_entry(key, data, kind)
        except CorruptEntryError as e:
            self.drop(key, e)
            return None

    def drop(self, key: str, why: Any) -> None:
        """Remove a corrupt entry (it is a miss from now on)."""
        self.stats["corrupt"] += 1
        log.warning("store: dropping corrupt entry %s: %s", key, why)
        self.backend.delete(key)

    # ---------------------------------------------------------------- write
    def put(self, tokens: Any, kv: Sequence[Sequence[Any]], levels: Optional[Sequence[str]] = None,
            start_chunk: int = 0, skip_existing: bool = True, logits: Any = None) -> int:
        """Store the full chunks of ``tokens`` covered by ``kv`` (``kv`` holds at least those tokens,
        position 0 first). Chunks before ``start_chunk`` are left alone (already stored). Returns
        the number of chunks written.

        ``logits``: with a guard, the prefill's logits for ``tokens`` (``[1, T, V]`` or ``[T, V]``,
        or only the last rows): the guard then probes with them (``Guard.from_prefill``: one
        model run per preset tried, no exact probe), else with the context's last tokens."""
        levels = tuple(levels or self.levels)
        C = self.chunk_tokens
        kv_len = min(int(k.shape[2]) for k, _ in kv)
        hashes = chunk_hashes(self.fp, tokens, max_chunks=kv_len // C)
        existing: list[Optional[dict]] = [None] * len(hashes)
        if skip_existing and start_chunk < len(hashes):
            keys = [self.index_key(h) for h in hashes[start_chunk:]]
            for i, (key, raw) in enumerate(zip(keys, self.backend.get_many(keys))):
                p = self._read(key, KIND_INDEX, raw)
                if p is not None:
                    try:
                        existing[start_chunk + i] = unpack_index(key, p)
                    except CorruptEntryError as e:
                        self.drop(key, e)
        guarded: dict = {}
        if self.guard is not None and start_chunk < len(hashes):
            from ..guard import guard_chunks

            for lv in levels:
                if lv != "raw" and any(not e or lv not in e["levels"] for e in existing[start_chunk:]):
                    guarded[lv] = guard_chunks(self.guard, tokens, kv, C, start_chunk, len(hashes), lv, logits)
                    self.last_guard[lv] = guarded[lv][2]
        written = 0
        for k in range(start_chunk, len(hashes)):
            h = hashes[k]
            have = dict(existing[k]["levels"]) if existing[k] else {}
            todo = [lv for lv in levels if lv not in have]
            if not todo:
                continue
            chunk = slice_kv(kv, k * C, (k + 1) * C)
            ok = False
            for lv in todo:
                if lv in guarded:       # stored under the level the guard reached
                    name, payload = guarded[lv][0], guarded[lv][1][k]
                else:
                    name, payload = lv, self.encode_chunk(chunk, lv)
                if self.backend.put(self.data_key(h, name), pack_entry(self.data_key(h, name), KIND_DATA, payload)):
                    have[name] = len(payload)
                    ok = True
            if ok:
                if self._merge_index(h, have, C):
                    written += 1
        self.stats["chunks_written"] += written
        return written

    def _merge_index(self, h: bytes, levels: Mapping[str, int], tokens: int) -> bool:
        """Add ``levels`` to the chunk's index entry, keeping what other writers listed."""
        ikey = self.index_key(h)

        def merge(old: Optional[bytes]) -> Optional[bytes]:
            have: dict = {}
            if old is not None:
                try:
                    info = unpack_index(ikey, unpack_entry(ikey, old, KIND_INDEX))
                    if info["tokens"] == tokens:
                        have = dict(info["levels"])
                except CorruptEntryError as e:
                    self.stats["corrupt"] += 1
                    log.warning("store: replacing corrupt index entry %s: %s", ikey, e)
            if have and all(have.get(lv) == b for lv, b in levels.items()):
                return None                                   # nothing new
            have.update(levels)
            return pack_entry(ikey, KIND_INDEX, pack_index({"tokens": tokens, "levels": have}))

        return self.backend.update(ikey, merge)

    # ---------------------------------------------------------------- lookup and read
    def lookup(self, tokens: Any, max_tokens: Optional[int] = None) -> PrefixMatch:
        """The longest stored chunk-aligned prefix of ``tokens`` (at most ``max_tokens`` tokens)."""
        t0 = time.perf_counter()
        C = self.chunk_tokens
        hashes = chunk_hashes(self.fp, tokens, None if max_tokens is None else max_tokens // C)
        keys = [self.index_key(h) for h in hashes]
        raws = self.backend.get_many(keys) if keys else []
        chunks = []
        for k, (h, key, raw) in enumerate(zip(hashes, keys, raws)):
            p = self._read(key, KIND_INDEX, raw)
            if p is None:
                break
            try:
                info = unpack_index(key, p)
            except CorruptEntryError as e:
                self.drop(key, e)
                break
            if not info["levels"] or info["tokens"] != C:
                break
            chunks.append(ChunkRef(k, h, info["levels"], C))
        return PrefixMatch(chunks, C, time.perf_counter() - t0)

    def fetch(self, ref: ChunkRef, level: str) -> Optional[memoryview]:
        """The verified payload of a chunk at a level, or None (missing, evicted, unreachable, corrupt)."""
        key = self.data_key(ref.hash, level)
        return self._read(key, KIND_DATA, self.backend.get(key))

    def get_chunk(self, ref: ChunkRef, level: str, device: str = "cpu") -> Optional[TorchKV]:
        payload = self.fetch(ref, level)
        if payload is None:
            self._forget_level(ref, level)
            return None
        try:
            kv = self.decode_chunk(payload, level, device)
        except CacheGenError as e:
            self.drop(self.data_key(ref.hash, level), e)
            self._forget_level(ref, level)
            return None
        if any(int(k.shape[2]) != ref.tokens for k, _ in kv):
            self.drop(self.data_key(ref.hash, level), "wrong token count")
            self._forget_level(ref, level)
            return None
        self.stats["chunks_loaded"] += 1
        return kv

    def _forget_level(self, ref: ChunkRef, level: str) -> None:
        """The index lists data that is gone (evicted by the backend's LRU, deleted as corrupt):
        take the level out of the index entry so lookups stop promising it."""
        ikey = self.index_key(ref.hash)

        def merge(old: Optional[bytes]) -> Optional[bytes]:
            if old is None:
                return None
            try:
                info = unpack_index(ikey, unpack_entry(ikey, old, KIND_INDEX))
            except CorruptEntryError:
                return None                      # lookup drops it when it reads it
            if level not in info["levels"]:
                return None
            levels = {k: v for k, v in info["levels"].items() if k != level}
            return pack_entry(ikey, KIND_INDEX, pack_index({"tokens": info["tokens"], "levels": levels}))

        if ref.levels.get(level) is not None:
            self.backend.update(ikey, merge)

    def pick_level(self, ref: ChunkRef, prefer: Sequence[str]) -> Optional[str]:
        for lv in prefer:
            if lv in ref.levels:
                return lv
        return next(iter(ref.levels), None)

    def load(self, match: PrefixMatch, level: Union[str, Sequence[str]] = "default",
             device: str = "cpu") -> tuple[TorchKV, int]:
        """Load the matched chunks in order, stopping at the first one that cannot be served.
        ``level``: one level or a preference list. Returns ``(kv, tokens loaded)``."""
        prefer = [level] if isinstance(level, str) else list(level)
        parts = []
        for ref in match.chunks:
            lv = self.pick_level(ref, prefer)
            kv = self.get_chunk(ref, lv, device) if lv is not None else None
            if kv is None:
                break
            parts.append(kv)
        return concat_kv(parts), sum(int(p[0][0].shape[2]) for p in parts)


_BG_LOCK = threading.Lock()
_BG: Optional[ThreadPoolExecutor] = None


def _background() -> ThreadPoolExecutor:
    """One writer thread per process: stores happen in submission order and never compete with
    each other for the cores (the encoder stays in-process off the main thread)."""
    global _BG
    with _BG_LOCK:
        if _BG is None:
            _BG = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cachegen-store")
        return _BG


def _log_failure(f: "Future[int]") -> None:
    e = f.exception()
    if e is not None:
        log.warning("store: background save failed: %s: %s", type(e).__name__, e)


def prefill_with_reuse(runner: Any, store: KVStore, tokens: Any, level: Union[str, Sequence[str]] = "default",
                       save: Union[str, bool] = "background", save_levels: Optional[Sequence[str]] = None
                       ) -> tuple[Any, Any, dict]:
    """Prefill ``tokens`` with ``runner`` (an object with ``prefill(ids)`` and
    ``continue_from(kv, ids)``), reusing the longest stored prefix and storing the new chunks.

    At least one token is always run through the model (its logits are needed), so a prompt
    that is entirely stored reuses all but its last chunk-aligned part. Returns
    ``(logits of the new tokens, kv of the whole prompt, info)``.

    ``save``: ``"background"`` (default) returns as soon as the logits are there and encodes +
    writes the new chunks on a writer thread, so storing adds nothing to time to first token;
    ``info["store_future"]`` (a ``concurrent.futures.Future``) gives the number of chunks
    written (``.result()`` waits; a failure is logged and kept in the future). Do not modify the
    returned ``kv`` in place before that future is done. ``"sync"`` (or ``True``) stores before
    returning (``info["chunks_written"]``); ``False`` stores nothing.
    """
    if save is True:
        save = "sync"
    if save not in ("background", "sync", False, None):
        raise ConfigError(f"save must be 'background', 'sync' or False, got {save!r}")
    ids = np.asarray(tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens).reshape(-1)
    t0 = time.perf_counter()
    match = store.lookup(ids, max_tokens=len(ids) - 1)
    t1 = time.perf_counter()
    kv, n = store.load(match, level) if len(match) else ([], 0)
    t2 = time.perf_counter()
    if n:
        logits, full = runner.continue_from(kv, ids[n:])
    else:
        logits, full = runner.prefill(ids)
    t3 = time.perf_counter()
    written: Optional[int] = 0
    future: Optional["Future[int]"] = None
    start = n // store.chunk_tokens
    if save == "sync":
        written = store.put(ids, full, levels=save_levels, start_chunk=start)
    elif save == "background":
        written = None
        future = _background().submit(store.put, ids, full, levels=save_levels, start_chunk=start)
        future.add_done_callback(_log_failure)
    t4 = time.perf_counter()
    info = {"prompt_tokens": len(ids), "reused_tokens": n, "matched_tokens": match.tokens,
            "lookup_s": t1 - t0, "load_s": t2 - t1, "compute_s": t3 - t2, "ttft_s": t3 - t0,
            "store_s": t4 - t3, "store": save or "off", "chunks_written": written, "store_future": future}
    return logits, full, info
