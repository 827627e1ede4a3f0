"""Run an exported decoder with ONNX Runtime, with the KV cache as explicit arrays.

``OrtRunner`` wraps one ``InferenceSession`` of a decoder-only graph whose KV cache is passed
in and out explicitly (onnxruntime-genai builder names ``past_key_values.{i}.key/value`` ->
``present.{i}.key/value``; optimum-style graphs with the same names plus ``position_ids`` work
too). Everything goes through IOBinding:

* outputs (logits and presents) are preallocated by us and bound by pointer, so results land
  directly in the arrays we return;
* the next step's past is bound to the previous step's present (no copy on our side);
* KV given as torch tensors is bound by ``data_ptr`` (CPU or CUDA), so a CUDA session can use
  torch-owned device buffers; with ``provider="cuda"`` outputs are torch CUDA tensors.

Layout everywhere: ``kv`` is a list (one entry per layer) of ``(key, value)`` tuples, each of
shape ``[B, H_kv, T, D]``, in the graph's KV dtype (fp32 or fp16).

Positions: the graphs derive positions from ``attention_mask`` (total length = past + new),
so positions of a continuation always come from the full context length. Caches whose
sliding-window layers were trimmed with :meth:`OrtRunner.window_kv` are zero-padded at the
front back to the full length before they are fed (those positions lie outside the window,
so the attention kernel never reads them); outputs of such calls are trimmed again.
"""
from __future__ import annotations

from ..errors import InputError, ModelError

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["OrtRunner", "KVLayout"]

_PAST_RES = [
    re.compile(r"^past_key_values[._](\d+)[._](key|value)$"),
    re.compile(r"^past[._](\d+)[._](key|value)$"),
    re.compile(r"^past_key_values[._](\d+)[._]decoder[._](key|value)$"),
]
_PRESENT_RES = [
    re.compile(r"^present[._](\d+)[._](key|value)$"),
    re.compile(r"^present_key_values[._](\d+)[._](key|value)$"),
    re.compile(r"^present[._](\d+)[._]decoder[._](key|value)$"),
]
_ORT_TO_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _match(regexes, name):
    for r in regexes:
        m = r.match(name)
        if m:
            return int(m.group(1)), m.group(2)
    return None


@dataclass
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: np.dtype
    past_names: List[Tuple[str, str]]
    present_names: List[Tuple[str, str]]
    #: per layer: None (full attention) or the sliding window length in tokens
    windows: List[Optional[int]]


def _compute_stream(opts: dict, device_id: int):
    """Run the session on a torch CUDA stream (ORT's ``user_compute_stream``): a caller can then
    order GPU work before a run with a stream wait instead of a host sync. A stream given in
    ``opts`` is wrapped; otherwise one is made. None when torch has no CUDA."""
    try:
        import torch
        if not torch.cuda.is_available():
            return None
        if "user_compute_stream" in opts:
            return torch.cuda.ExternalStream(int(opts["user_compute_stream"]), device=torch.device("cuda", device_id))
        st = torch.cuda.Stream(device=torch.device("cuda", device_id))
    except Exception:   # no usable CUDA in torch: ORT keeps its own stream
        return None
    opts["user_compute_stream"] = str(st.cuda_stream)
    return st


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


class OrtRunner:
    """An ONNX Runtime decoder with explicit KV cache in/out (see module docstring)."""

    def __init__(self, model_dir: os.PathLike | str, provider: str = "cpu",
                 threads: Optional[int] = None, session_options=None, device_id: int = 0,
                 provider_options: Optional[dict] = None, cuda_graph: bool = False):
        """``cuda_graph=True`` (CUDA only): the session may capture CUDA graphs (ORT's
        ``enable_cuda_graph``); ``StaticKV`` then replays one-token decode steps from a graph
        (host cost of a step: one launch instead of one per node). Runs outside a StaticKV
        graph step (prefill, scoring) run uncaptured (``gpu_graph_id=-1``)."""
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        path = self.model_dir / "model.onnx" if self.model_dir.is_dir() else self.model_dir
        if self.model_dir.is_file():
            self.model_dir = self.model_dir.parent
        if provider not in ("cpu", "cuda"):
            raise InputError(f"provider must be 'cpu' or 'cuda', got {provider!r}")
        self.provider = provider
        self.device_id = device_id
        #: the torch CUDA stream ORT's CUDA kernels run on (``user_compute_stream``), or None: work
        #: queued on it (a GPU decode) is ordered before a run without a host sync
        self.compute_stream = None
        self.cuda_graph = bool(cuda_graph) and provider == "cuda"
        self._graph_ids = 0
        self._run_opts = None
        so = session_options or ort.SessionOptions()
        if threads is not None:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        if provider == "cuda":
            try:  # onnxruntime-gpu >= 1.21 loads CUDA/cuDNN from the torch / nvidia wheels
                ort.preload_dlls()
            except Exception:
                pass
            opts = {"device_id": device_id, **(provider_options or {})}
            self.compute_stream = _compute_stream(opts, device_id)
            if self.cuda_graph:
                opts["enable_cuda_graph"] = "1"
                self._run_opts = ort.RunOptions()
                self._run_opts.add_run_config_entry("gpu_graph_id", "-1")   # prefill etc.: not captured
            providers = [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:
            if not self.cuda_graph:
                raise
            raise ModelError(f"onnxruntime refused CUDA graphs for {path}: {e}") from e
        self._ort = ort
        self._meta = self._read_meta()
        self.layout = self._discover()
        self.num_layers = self.layout.num_layers
        self.num_kv_heads = self.layout.num_kv_heads
        self.head_dim = self.layout.head_dim
        self.dtype = self.layout.dtype
        self.windows = self.layout.windows
        self.bos_token_id = self._meta.get("bos_token_id")
        eos = self._meta.get("eos_token_id")
        self.eos_token_ids = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        self.add_bos = bool(self._meta.get("add_bos", False))
        self._tokenizer = None

    def graph_run_options(self):
        """Run options of a new CUDA graph of this session (one per static buffer set)."""
        if not self.cuda_graph:
            raise InputError("this runner was not built with cuda_graph=True")
        self._graph_ids += 1
        ro = self._ort.RunOptions()
        ro.add_run_config_entry("gpu_graph_id", str(self._graph_ids))
        return ro

    # ------------------------------------------------------------------ discovery
    def _read_meta(self) -> dict:
        meta: dict = {}
        p = self.model_dir / "cachegen_export.json"
        if p.is_file():
            meta.update(json.loads(p.read_text()))
        g = self.model_dir / "genai_config.json"
        if g.is_file():
            gc = json.loads(g.read_text()).get("model", {})
            dec = gc.get("decoder", {})
            meta.setdefault("head_dim", dec.get("head_size"))
            meta.setdefault("num_kv_heads", dec.get("num_key_value_heads"))
            meta.setdefault("num_layers", dec.get("num_hidden_layers"))
            meta.setdefault("bos_token_id", gc.get("bos_token_id"))
            meta.setdefault("eos_token_id", gc.get("eos_token_id"))
        for hf in (self.model_dir / "hf" / "config.json", self.model_dir / "config.json"):
            if hf.is_file():
                c = json.loads(hf.read_text())
                c = c.get("text_config", c)
                meta.setdefault("layer_types", c.get("layer_types"))
                meta.setdefault("sliding_window", c.get("sliding_window"))
                meta.setdefault("head_dim", c.get("head_dim"))
                meta.setdefault("bos_token_id", c.get("bos_token_id"))
                meta.setdefault("eos_token_id", c.get("eos_token_id"))
                if c.get("model_type", "").startswith("gemma"):
                    meta.setdefault("add_bos", True)
                break
        return meta

    def _discover(self) -> KVLayout:
        ins = {i.name: i for i in self.session.get_inputs()}
        outs = {o.name: o for o in self.session.get_outputs()}
        past: dict = {}
        for n in ins:
            m = _match(_PAST_RES, n)
            if m:
                past[m] = n
        present: dict = {}
        for n in outs:
            m = _match(_PRESENT_RES, n)
            if m:
                present[m] = n
        if not past:
            raise InputError(f"no past KV inputs found in {sorted(ins)}")
        n_layers = max(i for i, _ in past) + 1
        past_names, present_names = [], []
        for i in range(n_layers):
            try:
                past_names.append((past[(i, "key")], past[(i, "value")]))
                present_names.append((present[(i, "key")], present[(i, "value")]))
            except KeyError as e:
                raise InputError(f"layer {i}: missing past/present KV name {e}") from None
        first = ins[past_names[0][0]]
        shape = list(first.shape)
        dtype = np.dtype(_ORT_TO_NP.get(first.type, np.float32))
        heads = shape[1] if isinstance(shape[1], int) else self._meta.get("num_kv_heads")
        hd = shape[3] if isinstance(shape[3], int) else self._meta.get("head_dim")
        if heads is None or hd is None:
            raise InputError("cannot determine KV heads / head_dim from the graph or its configs")
        self._input_names = set(ins)
        self._logits_name = "logits" if "logits" in outs else next(iter(outs))
        logit_shape = outs[self._logits_name].shape
        self.vocab_size = logit_shape[-1] if isinstance(logit_shape[-1], int) else None
        self._logits_dtype = np.dtype(_ORT_TO_NP.get(outs[self._logits_name].type, np.float32))
        self._ids_dtype = np.dtype(_ORT_TO_NP.get(ins["input_ids"].type, np.int64))
        self._mask_dtype = (np.dtype(_ORT_TO_NP.get(ins["attention_mask"].type, np.int64))
                            if "attention_mask" in ins else None)
        self._pos_dtype = (np.dtype(_ORT_TO_NP.get(ins["position_ids"].type, np.int64))
                           if "position_ids" in ins else None)
        types = self._meta.get("layer_types") or []
        win = self._meta.get("sliding_window")
        windows: List[Optional[int]] = []
        for i in range(n_layers):
            t = types[i] if i < len(types) else "full_attention"
            windows.append(int(win) if (t == "sliding_attention" and win) else None)
        return KVLayout(n_layers, int(heads), int(hd), dtype, past_names, present_names, windows)

    # ------------------------------------------------------------------ helpers
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .export import load_tokenizer

            self._tokenizer = load_tokenizer(self.model_dir)
        return self._tokenizer

    def encode(self, text: str) -> List[int]:
        """Tokenize text the way the model expects (BOS first for Gemma-3)."""
        from .export import encode_text

        if not isinstance(text, str):      # a tokenizer would take a list or tuple as a batch
            raise InputError(f"text must be a str, got {type(text).__name__}")
        return encode_text(self.tokenizer, text, add_bos=self.add_bos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def kv_nbytes_fp16(self, kv) -> int:
        """Bytes of this cache stored as fp16 (the usual baseline)."""
        return sum(2 * int(np.prod(k.shape)) + 2 * int(np.prod(v.shape)) for k, v in kv)

    @staticmethod
    def kv_length(kv) -> int:
        """Context length covered by a cache (the longest layer, i.e. a full-attention one)."""
        return max(int(k.shape[2]) for k, _ in kv)

    def _ids_array(self, ids) -> np.ndarray:
        if _is_torch(ids):
            ids = ids.detach().cpu().numpy()
        try:
            a = np.asarray(ids)
        except (ValueError, TypeError) as e:      # ragged rows, mixed types
            raise InputError(f"input_ids must be [T] or [B, T] token ids: {e}") from None
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2 or a.shape[1] == 0:
            raise InputError(f"input_ids must be [T] or [B, T] with T >= 1, got shape {a.shape}")
        if a.dtype.kind not in "iu":
            raise InputError(f"input_ids must be integer token ids, got dtype {a.dtype}")
        return np.ascontiguousarray(a, dtype=self._ids_dtype)

    def _device_is_cuda(self) -> bool:
        return self.provider == "cuda"

    def _alloc(self, shape, dtype):
        """An output buffer: numpy on CPU, torch on CUDA."""
        if self._device_is_cuda():
            import torch

            tdt = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[np.dtype(dtype)]
            return torch.empty(tuple(shape), dtype=tdt, device=f"cuda:{self.device_id}")
        return np.empty(tuple(shape), dtype=dtype)

    def _bind_in(self, io, name: str, x) -> Any:
        """Bind a KV input; returns the object that must stay alive until the run ends."""
        ort = self._ort
        if _is_torch(x):
            import torch

            want = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[self.dtype]
            if self._device_is_cuda() and x.device.type != "cuda":
                x = x.to(f"cuda:{self.device_id}")
            x = x.to(want).contiguous()
            if x.numel() == 0:
                ov = ort.OrtValue.ortvalue_from_shape_and_type(list(x.shape), self.dtype,
                                                               "cuda" if x.device.type == "cuda" else "cpu",
                                                               x.device.index or 0)
                io.bind_ortvalue_input(name, ov)
                return ov
            dev = x.device.type
            io.bind_input(name, dev, x.device.index or 0, self.dtype, list(x.shape), x.data_ptr())
            return x
        a = np.ascontiguousarray(np.asarray(x), dtype=self.dtype)
        if a.size == 0:
            ov = ort.OrtValue.ortvalue_from_shape_and_type(list(a.shape), self.dtype, "cpu", 0)
            io.bind_ortvalue_input(name, ov)
            return ov
        io.bind_input(name, "cpu", 0, self.dtype, list(a.shape), a.ctypes.data)
        return a

    def _bind_in_dev(self, io, name: str, a: np.ndarray):
        import torch
        t = torch.from_numpy(np.ascontiguousarray(a)).to(f"cuda:{self.device_id}")
        io.bind_input(name, "cuda", self.device_id, a.dtype, list(a.shape), t.data_ptr())
        return t

    def _bind_out(self, io, name: str, buf) -> None:
        if _is_torch(buf):
            io.bind_output(name, buf.device.type, buf.device.index or 0,
                           np.float16 if buf.dtype.is_floating_point and buf.element_size() == 2 else np.float32,
                           list(buf.shape), buf.data_ptr())
        else:
            io.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)

    def _normalize_kv(self, kv, batch: int):
        """Check a cache; return (layers, total_length, trimmed?) with trimmed layers padded."""
        if len(kv) != self.num_layers:
            raise InputError(f"cache has {len(kv)} layers, the model {self.num_layers}")
        total = self.kv_length(kv)
        trimmed = False
        out = []
        for i, (k, v) in enumerate(kv):
            ks, vs = tuple(k.shape), tuple(v.shape)
            if ks != vs or len(ks) != 4:
                raise InputError(f"layer {i}: key {ks} and value {vs} must both be [B, H, T, D]")
            if ks[0] != batch or ks[1] != self.num_kv_heads or ks[3] != self.head_dim:
                raise InputError(f"layer {i}: KV shape {ks} does not fit batch {batch}, "
                                 f"{self.num_kv_heads} heads, head_dim {self.head_dim}")
            t = ks[2]
            if t < total:
                w = self.windows[i]
                if w is None or t < min(w, total):
                    raise InputError(f"layer {i} has {t} tokens but the cache covers {total}; only "
                                     f"sliding-window layers may be trimmed (to >= their window)")
                trimmed = True
                k, v = self._pad_front(k, total), self._pad_front(v, total)
            out.append((k, v))
        return out, total, trimmed

    def _pad_front(self, x, total: int):
        t = x.shape[2]
        if _is_torch(x):
            import torch

            pad = torch.zeros((x.shape[0], x.shape[1], total - t, x.shape[3]), dtype=x.dtype, device=x.device)
            return torch.cat([pad, x], dim=2)
        a = np.asarray(x)
        out = np.zeros((a.shape[0], a.shape[1], total, a.shape[3]), dtype=a.dtype)
        out[:, :, total - t:, :] = a
        return out

    # ------------------------------------------------------------------ core step
    def _run(self, ids: np.ndarray, past, past_len: int, last_logits_only: bool = False):
        """One forward pass. ``past``: normalized list of (k, v) or None (empty cache)."""
        B, T = ids.shape
        total = past_len + T
        io = self.session.io_binding()
        keep = []
        small = [("input_ids", ids)]
        if self._mask_dtype is not None:
            small.append(("attention_mask", np.ones((B, total), dtype=self._mask_dtype)))
        if self._pos_dtype is not None:
            small.append(("position_ids", np.broadcast_to(np.arange(past_len, total, dtype=self._pos_dtype), (B, T)).copy()))
        for name, a in small:
            if self.cuda_graph:   # a graph-enabled session: every input on the device
                keep.append(self._bind_in_dev(io, name, a))
            else:
                io.bind_cpu_input(name, a)
        for i, (kn, vn) in enumerate(self.layout.past_names):
            if past is None:
                empty = np.zeros((B, self.num_kv_heads, 0, self.head_dim), dtype=self.dtype)
                keep.append(self._bind_in(io, kn, empty))
                keep.append(self._bind_in(io, vn, empty))
            else:
                k, v = past[i]
                keep.append(self._bind_in(io, kn, k))
                keep.append(self._bind_in(io, vn, v))
        logits = self._alloc((B, T, self.vocab_size), self._logits_dtype) if self.vocab_size else None
        if logits is not None:
            self._bind_out(io, self._logits_name, logits)
        else:
            io.bind_output(self._logits_name, "cuda" if self._device_is_cuda() else "cpu")
        presents = []
        for kn, vn in self.layout.present_names:
            k = self._alloc((B, self.num_kv_heads, total, self.head_dim), self.dtype)
            v = self._alloc((B, self.num_kv_heads, total, self.head_dim), self.dtype)
            self._bind_out(io, kn, k)
            self._bind_out(io, vn, v)
            presents.append((k, v))
        io.synchronize_inputs()
        if self.compute_stream is not None:
            import torch   # torch work still queued on the current stream (inputs) comes first
            self.compute_stream.wait_stream(torch.cuda.current_stream(self.compute_stream.device))
        self.session.run_with_iobinding(io, self._run_opts)
        io.synchronize_outputs()
        if logits is None:
            logits = io.get_outputs()[0].numpy()
        del keep
        return logits, presents

    def _logits_np(self, logits) -> np.ndarray:
        if _is_torch(logits):
            return logits.float().cpu().numpy()
        return np.asarray(logits, dtype=np.float32)

    # ------------------------------------------------------------------ public API
    def prefill(self, input_ids) -> Tuple[np.ndarray, list]:
        """Run a prompt from an empty cache. Returns ``(logits [B,T,V] float32, kv)``."""
        ids = self._ids_array(input_ids)
        logits, kv = self._run(ids, None, 0)
        return self._logits_np(logits), kv

    def continue_from(self, kv, new_ids) -> Tuple[np.ndarray, list]:
        """Feed ``new_ids`` after a cache. Returns ``(logits [B,T_new,V], kv of past+new)``.

        ``kv`` may be numpy arrays or torch tensors (any float dtype; cast to the graph's), and
        its sliding-window layers may be trimmed to their window (see :meth:`window_kv`); the
        returned cache is then trimmed the same way.
        """
        ids = self._ids_array(new_ids)
        past, total, trimmed = self._normalize_kv(kv, ids.shape[0])
        logits, out = self._run(ids, past, total)
        if trimmed:
            out = self.window_kv(out)
        return self._logits_np(logits), out

    def window_kv(self, kv, window: Optional[int] = None):
        """Trim sliding-window layers to the last ``window`` tokens (default: the model's).

        Gemma-3's sliding layers only ever attend to their last 512 positions, so this loses
        nothing: :meth:`continue_from` on the trimmed cache gives the same logits. Full-attention
        layers are untouched. Returns views (no copy) for numpy input.
        """
        out = []
        for (k, v), w in zip(kv, self.windows):
            w = window if (window is not None and w is not None) else w
            if w is not None and k.shape[2] > w:
                k, v = k[:, :, -w:, :], v[:, :, -w:, :]
            out.append((k, v))
        return out

    def score(self, kv, continuation_ids) -> np.ndarray:
        """Teacher-forced logits of a continuation after a cache.

        Returns ``[N, V]`` float32 for batch 1 (``[B, N, V]`` for a batch): row ``i`` is the
        distribution after consuming ``continuation_ids[i]``, i.e. it predicts
        ``continuation_ids[i + 1]`` (the last row predicts the token after the continuation).
        """
        ids = self._ids_array(continuation_ids)
        logits, _ = self.continue_from(kv, ids)
        return logits[0] if logits.shape[0] == 1 else logits

    def generate(self, input_ids=None, max_new_tokens: int = 32, kv=None, greedy: bool = True,
                 temperature: float = 1.0, seed: Optional[int] = None, stop_at_eos: bool = True,
                 return_kv: bool = False):
        """Generate tokens (batch 1).

        * ``generate(prompt_ids, n)``: prefill the prompt, then decode ``n`` tokens.
        * ``generate(new_ids, n, kv=cache)``: continue after a (restored) cache: feed ``new_ids``
          (at least one token, e.g. a question) and decode.

        Returns the list of generated token ids (without the prompt); stops early at EOS when
        ``stop_at_eos``. With ``return_kv=True`` returns ``(tokens, kv)``.
        """
        if input_ids is None:
            raise InputError("generate needs input_ids (the prompt, or the tokens after kv)")
        ids = self._ids_array(input_ids)
        if ids.shape[0] != 1:
            raise InputError("generate supports batch 1")
        rng = np.random.default_rng(seed)
        trimmed = False
        if kv is None:
            logits, cur = self._run(ids, None, 0)
            total = ids.shape[1]
        else:
            past, plen, trimmed = self._normalize_kv(kv, 1)
            logits, cur = self._run(ids, past, plen)
            total = plen + ids.shape[1]
        out: List[int] = []
        for step in range(max_new_tokens):
            last = self._logits_np(logits[:, -1, :])[0]
            if greedy:
                tok = int(np.argmax(last))
            else:
                z = last.astype(np.float64) / max(temperature, 1e-6)
                p = np.exp(z - z.max())
                p /= p.sum()
                tok = int(rng.choice(len(p), p=p))
            out.append(tok)
            if (stop_at_eos and tok in self.eos_token_ids) or step == max_new_tokens - 1:
                break
            # next step: past bound directly to the previous step's present buffers
            logits, cur = self._run(np.array([[tok]], dtype=self._ids_dtype), cur, total)
            total += 1
        if return_kv:
            # note: the last generated token has not been fed yet, so it is not in the cache
            return out, (self.window_kv(cur) if trimmed else cur)
        return out
