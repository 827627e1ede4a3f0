"""Restore a compressed KV cache straight into ONNX Runtime's CUDA buffers and keep generating.

``StaticKV`` owns one preallocated buffer pair per layer, ``[1, H_kv, capacity, D]`` (torch,
on the session's device), bound with IOBinding to **both** ``past_key_values.i.*`` and
``present.i.*``. With onnxruntime-genai's GroupQueryAttention graphs that turns on past/present
buffer sharing: each step appends its new K/V in place and the attention mask's width gives the
total length, so the KV never moves after it is restored (no copy per step, no host round trip).

Restore paths (all write into the same static buffers):

* :meth:`StaticKV.restore` -- from a path, bytes, a pinned tensor or a uint8 CUDA tensor:
  ``cachegen.io`` stages the bytes (reused pinned buffer, parallel reads, H2D in pieces on a copy
  stream) and the GPU decoder writes fp16 straight into the bound memory (views on the CUDA
  buffers); a parsed ``Container`` goes to ``cachegen.decode_into`` as before;
* :meth:`StaticKV.load` -- copy an already decoded cache (e.g. decoded on the CPU, the reference).

Windowed caches (Gemma-3's sliding layers stored with their last 512 tokens) are decoded into
the *tail* of that layer's full-length buffer, i.e. at their true positions; the positions in
front lie outside the attention window and are never read (the buffers start zeroed).

Time to first token after a restore (H200 measurements: benches/RESULTS.md section 9): ORT runs
on a torch stream (``OrtRunner.compute_stream``), so a step is ordered after a queued decode by a
stream wait, not a host sync; ``restore(defer=True)`` leaves the decoder's device checks to the
next step (which raises before it returns logits); with ``OrtRunner(cuda_graph=True)`` the
one-token step replays a CUDA graph captured by :meth:`StaticKV.warmup` (one per StaticKV:
make one per serving slot, not per request).

The class works with ``provider="cpu"`` too (torch CPU tensors), which is how it is unit-tested
without a GPU; its purpose is the CUDA path.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from ..errors import InputError

__all__ = ["StaticKV", "cuda_provider_available"]

_TORCH = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32}
_TORCH_INT = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}


def cuda_provider_available() -> bool:
    """True when torch sees a CUDA GPU and onnxruntime has its CUDA execution provider."""
    if not torch.cuda.is_available():
        return False
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ort.preload_dlls()  # onnxruntime-gpu >= 1.21: CUDA/cuDNN from the torch wheels
    except Exception:
        pass
    return True


_NP_OF = {t: n for n, t in _TORCH_INT.items()}


def _bind_kv(io, runner, kv) -> None:
    """Bind each layer's buffer pair as both past (input) and present (output) of ``io``."""
    np_dt = np.dtype(runner.dtype)
    for (k, v), (pk, pv), (ok, ov) in zip(kv, runner.layout.past_names, runner.layout.present_names):
        for name_in, name_out, t in ((pk, ok, k), (pv, ov, v)):
            dev, idx = t.device.type, (t.device.index or 0)
            io.bind_input(name_in, dev, idx, np_dt, list(t.shape), t.data_ptr())
            io.bind_output(name_out, dev, idx, np_dt, list(t.shape), t.data_ptr())


def _bind_dev(io, name: str, t: torch.Tensor, a: int = 0, b: Optional[int] = None) -> None:
    """Bind ``t[0, a:b]`` (a [1, n] device buffer; the whole of it by default) as input ``name``."""
    b = t.shape[1] if b is None else b
    io.bind_input(name, t.device.type, t.device.index or 0, _NP_OF[t.dtype], [1, b - a],
                  t.data_ptr() + a * t.element_size())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class StaticKV:
    """Preallocated max-length KV buffers bound to one ORT session as past *and* present."""

    def __init__(self, runner, capacity: int, *, zero: bool = True, device_inputs: bool = True):
        """``zero=False``: the buffers start uninitialised (the caller fills what is read).
        ``device_inputs``: the attention mask and position ids live on the session's device
        (one preallocated buffer each, bound as views), so a step copies only its token ids."""
        self.runner = runner
        self.capacity = int(capacity)
        self.device = torch.device(f"cuda:{runner.device_id}" if runner.provider == "cuda" else "cpu")
        dt = _TORCH[np.dtype(runner.dtype)]
        H, D = runner.num_kv_heads, runner.head_dim
        alloc = torch.zeros if zero else torch.empty
        self.kv = [(alloc((1, H, self.capacity, D), dtype=dt, device=self.device),
                    alloc((1, H, self.capacity, D), dtype=dt, device=self.device))
                   for _ in range(runner.num_layers)]
        self.length = 0
        self._io = runner.session.io_binding()
        _bind_kv(self._io, runner, self.kv)
        self._logits: dict = {}
        self._view_cache: dict = {}
        self._mask = self._pos = None
        if device_inputs and self.device.type == "cuda":
            if runner._mask_dtype is not None:
                self._mask = torch.ones((1, self.capacity), dtype=_TORCH_INT[np.dtype(runner._mask_dtype)],
                                        device=self.device)
            if runner._pos_dtype is not None:
                self._pos = torch.arange(self.capacity, dtype=_TORCH_INT[np.dtype(runner._pos_dtype)],
                                         device=self.device)[None]
        self._graph = None
        if getattr(runner, "cuda_graph", False) and self.device.type == "cuda":
            self._graph = _GraphStep(self)
        self._reader = None                 # cachegen.io.PinnedReader, built by the first staged restore
        self._pending = None                # cachegen.io.PendingCheck of a deferred restore
        self.last_restore = None            # cachegen.io.RestoreResult of the last staged restore

    # ------------------------------------------------------------------ filling
    def _views(self, tokens: Sequence[int]) -> list:
        """Per layer the buffer slice a layer of ``tokens[i]`` tokens is written to: the first
        ``T`` positions for full layers, the last ``tokens[i]`` of ``[0, T)`` for windowed ones."""
        key = tuple(tokens)
        hit = self._view_cache.get(key)
        if hit is not None:
            return hit
        T = max(tokens)
        if T > self.capacity:
            raise InputError(f"cache of {T} tokens does not fit capacity {self.capacity}")
        out = []
        for (k, v), t, w in zip(self.kv, tokens, self.runner.windows):
            if t < T and (w is None or t < min(w, T)):
                raise InputError(f"a layer has {t} of {T} tokens; only sliding-window layers may be trimmed")
            out.append((k[:, :, T - t:], v[:, :, T - t:]))
        if len(self._view_cache) >= 8:
            self._view_cache.clear()
        self._view_cache[key] = out      # views of the fixed buffers: reusable for the next restore
        return out

    def reader(self):
        """The reused host/device staging buffers of this cache's restores (built on first use)."""
        if self._reader is None:
            from ..io import PinnedReader
            self._reader = PinnedReader(pin=self.device.type == "cuda")
        return self._reader

    def restore(self, data: Any, verify: bool = True, decoder: Any = "auto", *, timing: bool = False,
                defer: bool = False) -> int:
        """Decode a cachegen container into the bound buffers (on the GPU for a CUDA session).
        Returns the context length.

        ``data``: a parsed ``Container`` (decoded as is), a path (read into this cache's reused
        pinned buffer with parallel reads, copied to the GPU in pieces), bytes-like data in host
        memory (staged the same way, or used in place when pinned), or a contiguous 1-D uint8
        CUDA tensor holding the container's bytes (no H2D). ``decoder``: ``"auto"`` (the GPU
        decoder on a CUDA session), a ``cachegen.decode_into`` decoder name, or a decoder object
        (``cachegen.io.restore``). What the last restore did (bytes, times, host CPU time) is in
        ``self.last_restore`` (GPU times with ``timing=True``).

        ``defer=True`` (GPU decoder): return once the decode is queued, without waiting for the
        device-side checks (every stream's rANS end state, the words checksums); the next
        :meth:`step` / :meth:`greedy` queues its run behind the decode (a stream wait, no host
        sync, when the runner has a ``compute_stream``), then reads the checks and raises, with
        the cache emptied, before it returns any logits. Call :meth:`wait` before reading
        ``self.kv`` yourself. Host-side checks (header, chunk metadata) still raise here.
        """
        import cachegen
        from .. import io as cio

        st = None
        self.last_restore = None
        self._pending = None
        if cio.is_container(data):
            c = data
        else:
            st = cio.stage(data, self.device, decoder=decoder, reader=self.reader(), timing=timing, verify=verify)
            c = st.container
        consumed = False
        try:
            tokens = c.tokens()
            if len(tokens) != len(self.kv):
                raise InputError(f"container has {len(tokens)} layers, the model {len(self.kv)}")
            from ..dispatch import output_dtype
            if output_dtype(c) != self.kv[0][0].dtype:
                # e.g. an fp16 container restored into an fp32 CPU graph: decode, then cast-copy
                name = decoder if isinstance(decoder, str) else "auto"
                return self.load(cachegen.decode(c, self.device, verify=verify, decoder=name))
            views = self._views(tokens)
            if st is None:
                cachegen.decode_into(c, views, verify=verify, decoder=decoder if isinstance(decoder, str) else "auto")
            else:
                consumed = True
                self.last_restore = cio.decode_staged(st, views, decoder=decoder, verify=verify, defer=defer)
                self._pending = self.last_restore.pending
        finally:
            if st is not None and st.device_bytes is not None and not consumed:
                st.device_bytes.release()  # queued bytes nobody decodes: free the buffer for the next restore
        self.reset(max(tokens))
        return self.length

    def wait(self) -> None:
        """Resolve a deferred restore's device-side checks (``restore(defer=True)``): raise its
        ``CacheGenError`` and empty the cache if the payload was corrupt. No-op otherwise."""
        p, self._pending = self._pending, None
        if p is None:
            return
        try:
            p.resolve()
        except Exception:
            self.length = 0
            raise
        finally:
            if self.last_restore is not None:
                self.last_restore.pending = None

    def load(self, kv) -> int:
        """Copy a decoded cache ([(k, v)] torch tensors, any device, windowed layers allowed)."""
        self._pending = None
        if len(kv) != len(self.kv):
            raise InputError(f"cache has {len(kv)} layers, the model {len(self.kv)}")
        tokens = [int(k.shape[2]) for k, _ in kv]
        for (bk, bv), (k, v) in zip(self._views(tokens), kv):
            bk[:, :, :k.shape[2]].copy_(torch.as_tensor(k), non_blocking=True)
            bv[:, :, :v.shape[2]].copy_(torch.as_tensor(v), non_blocking=True)
        self.reset(max(tokens))
        return self.length

    # ------------------------------------------------------------------ running
    def step(self, ids, *, sync: bool = True) -> torch.Tensor:
        """Feed ``ids`` (1-D token list/array) after the cache; returns logits ``[1, T, V]``
        (a torch tensor on the session's device, reused by the next call of the same length).
        ``sync=False``: do not order the run after torch work queued on the current stream (the
        caller knows none is pending). A CUDA-graph step is always ordered (it fills its inputs
        with torch kernels)."""
        r = self.runner
        a = np.ascontiguousarray(np.asarray(ids, dtype=r._ids_dtype).reshape(1, -1))
        T = a.shape[1]
        total = self.length + T
        if total > self.capacity:
            raise InputError(f"{total} tokens exceed the static cache capacity {self.capacity}")
        if self._graph is not None:
            if T == 1:
                return self._graph.step(int(a[0, 0]))
            self._graph.dirty = True     # the graph's mask is rebuilt at its next step
        io = self._io
        keep = None
        if self._graph is not None:      # a graph-enabled session takes device inputs only
            keep = r._bind_in_dev(io, "input_ids", a)
        else:
            io.bind_cpu_input("input_ids", a)
        if self._mask is not None:
            _bind_dev(io, "attention_mask", self._mask, 0, total)
        elif r._mask_dtype is not None:
            io.bind_cpu_input("attention_mask", np.ones((1, total), dtype=r._mask_dtype))
        if self._pos is not None:
            _bind_dev(io, "position_ids", self._pos, self.length, total)
        elif r._pos_dtype is not None:
            io.bind_cpu_input("position_ids", np.arange(self.length, total, dtype=r._pos_dtype)[None])
        lg = self._logits.get(T)
        if lg is None:
            if r.vocab_size is None:
                raise InputError("graph has no static vocabulary size")
            lg = torch.empty((1, T, r.vocab_size), dtype=_TORCH[np.dtype(r._logits_dtype)], device=self.device)
            if T == 1:
                self._logits[T] = lg
        io.bind_output(r._logits_name, lg.device.type, lg.device.index or 0, np.dtype(r._logits_dtype),
                       list(lg.shape), lg.data_ptr())
        self._order(sync)
        r.session.run_with_iobinding(io, getattr(r, "_run_opts", None))
        io.synchronize_outputs()
        return self._finish(total, lg)

    def _order(self, sync: bool) -> None:
        """Torch work on the buffers (decode, copies) comes before the run: a stream wait when
        ORT runs on a torch stream (its host-side launches then overlap a queued decode), else
        a host sync."""
        if not sync:
            return
        cs = getattr(self.runner, "compute_stream", None)
        if cs is not None and self.device.type == "cuda":
            cs.wait_stream(torch.cuda.current_stream(self.device))
        else:
            _sync(self.device)

    def _finish(self, total: int, lg: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            self.wait()                 # a deferred restore's checks, before any logits leave
        self.length = total
        return lg

    def greedy(self, ids, max_new_tokens: int, stop_at_eos: bool = False) -> List[int]:
        """Greedy tokens after the cache (argmax on the device; one scalar read per token)."""
        out: List[int] = []
        lg = self.step(ids)
        for i in range(max_new_tokens):
            tok = int(lg[0, -1].argmax())
            out.append(tok)
            if (stop_at_eos and tok in self.runner.eos_token_ids) or i == max_new_tokens - 1:
                break
            lg = self.step([tok])
        return out

    def warmup(self) -> None:
        """Capture the one-token step's CUDA graph now (``OrtRunner(cuda_graph=True)``), so that
        the first step after a restore replays it. Leaves the cache empty. No-op otherwise."""
        if self._graph is None:
            return
        self._pending = None
        for _ in range(3):              # ORT: warm-up run(s), then the capture
            self.reset(0)
            self._graph.step(0)
        self.reset(0)

    def reset(self, length: int = 0) -> None:
        self.length = int(length)
        if self._graph is not None:
            self._graph.dirty = True


class _GraphStep:
    """The one-token decode step of a StaticKV as a captured CUDA graph (ORT ``gpu_graph_id``):
    fixed buffers for the token id, positions, logits and an attention mask as wide as the
    cache (ones over the filled positions, zeros after: the graph derives the sequence lengths
    from its sum, so one capture serves every length; bit-identical logits to a mask as wide as
    the filled length on both reference models, ORT CPU, 2026-12-02). Each step writes the new
    token id and mask entry with tiny kernels on the current stream, then replays."""

    def __init__(self, skv: "StaticKV"):
        r = skv.runner
        self.skv = skv
        dev = skv.device
        self.ro = r.graph_run_options()
        self.io = r.session.io_binding()
        _bind_kv(self.io, r, skv.kv)
        if r.vocab_size is None:
            raise InputError("graph has no static vocabulary size")
        self.ids = torch.zeros((1, 1), dtype=_TORCH_INT[np.dtype(r._ids_dtype)], device=dev)
        _bind_dev(self.io, "input_ids", self.ids)
        self.mask = self.pos = None
        if r._mask_dtype is not None:
            self.mask = torch.zeros((1, skv.capacity), dtype=_TORCH_INT[np.dtype(r._mask_dtype)], device=dev)
            _bind_dev(self.io, "attention_mask", self.mask)
        if r._pos_dtype is not None:
            self.pos = torch.zeros((1, 1), dtype=_TORCH_INT[np.dtype(r._pos_dtype)], device=dev)
            _bind_dev(self.io, "position_ids", self.pos)
        self.logits = torch.empty((1, 1, r.vocab_size), dtype=_TORCH[np.dtype(r._logits_dtype)], device=dev)
        self.io.bind_output(r._logits_name, "cuda", dev.index or 0, np.dtype(r._logits_dtype),
                            list(self.logits.shape), self.logits.data_ptr())
        self.dirty = True               # the mask does not match skv.length yet

    def step(self, tok: int) -> torch.Tensor:
        skv = self.skv
        L = skv.length
        self.ids.fill_(tok)
        if self.pos is not None:
            self.pos.fill_(L)
        if self.mask is not None:
            if self.dirty:
                self.mask[:, :L + 1].fill_(1)
                self.mask[:, L + 1:].fill_(0)
            else:
                self.mask[:, L:L + 1].fill_(1)
        self.dirty = False
        skv._order(True)                # the fills above are torch work too: always ordered
        skv.runner.session.run_with_iobinding(self.io, self.ro)
        self.io.synchronize_outputs()
        return skv._finish(L + 1, self.logits)
