"""Quality guard (cachegen.guard) on a tiny numpy attention model; real-model figures are in
benches/bench_guard.py and benches/RESULTS.md."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import cachegen
from cachegen.config import get_config
from cachegen.errors import ConfigError, InputError
from cachegen.format.extensions import EXT_QUALITY, EXT_USER, Extension
from cachegen.guard import (Guard, GuardPolicy, _encode_keep, _reconstruct, _spot_check, encode_guarded,
                            step_counts, with_extensions)
from cachegen.store import KVStore
from cachegen.store.backends import MemoryBackend
from cachegen.store.keys import fingerprint_from_kv


class TinyAttention:
    """Logits of each probe token = W . concat over layers of softmax(q K^T / sqrt(D)) V, with
    q an embedding of the token: the cache's keys and values both matter, as in an LLM."""

    def __init__(self, layers: int, heads: int, dim: int, vocab: int = 97, sharp: float = 6.0, seed: int = 0,
                 torch_logits: bool = False):
        rng = np.random.default_rng(seed)
        self.E = rng.standard_normal((vocab, heads, dim)) * 2.0
        self.W = rng.standard_normal((layers * heads * dim, vocab)) * sharp / math.sqrt(layers * heads * dim)
        self.dim = dim
        self.torch_logits = torch_logits
        self.calls = 0

    def continue_from(self, kv, ids):
        self.calls += 1
        ids = np.asarray(ids).reshape(-1)
        feats = []
        for k, v in kv:
            k = (k.float().numpy() if isinstance(k, torch.Tensor) else np.asarray(k, np.float64))[0]
            v = (v.float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float64))[0]
            q = self.E[ids]                                             # [N, H, D]
            s = np.einsum("nhd,htd->nht", q, k) / math.sqrt(self.dim)
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            feats.append(np.einsum("nht,htd->nhd", a, v).reshape(len(ids), -1))
        logits = (np.concatenate(feats, 1) @ self.W)[None].astype(np.float32)
        return (torch.from_numpy(logits) if self.torch_logits else logits), kv


def make_kv(layers=3, heads=2, tokens=600, dim=16, dtype=np.float32, seed=1, short_layer=None):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(layers):
        t = 300 if i == short_layer else tokens
        base = rng.standard_normal((1, heads, 1, dim)) * 2
        k = (base + rng.standard_normal((1, heads, t, dim))).astype(dtype)
        v = rng.standard_normal((1, heads, t, dim)).astype(dtype)
        out.append((k, v))
    return out


def kl_of(runner, kv, restored, probe):
    lo = np.asarray(runner.continue_from(kv, probe)[0], np.float64)[0]
    lr = np.asarray(runner.continue_from(restored, probe)[0], np.float64)[0]
    lpo = lo - lo.max(-1, keepdims=True)
    lpo -= np.log(np.exp(lpo).sum(-1, keepdims=True))
    lpr = lr - lr.max(-1, keepdims=True)
    lpr -= np.log(np.exp(lpr).sum(-1, keepdims=True))
    return float(np.maximum((np.exp(lpo) * (lpo - lpr)).sum(-1), 0).mean())


@pytest.fixture(scope="module")
def setup():
    kv = make_kv()
    m = TinyAttention(3, 2, 16)
    probe = list(range(5, 37))
    kls = {p: kl_of(m, kv, cachegen.decode(cachegen.encode(kv, p)), probe) for p in ("tiny", "small", "default", "fine")}
    return kv, m, probe, kls


def test_presets_order_on_the_tiny_model(setup):
    _, _, _, kls = setup
    assert kls["tiny"] > kls["small"] > kls["default"] > kls["fine"] > 0, kls


def test_steps_up_until_the_budget_holds(setup):
    kv, m, probe, kls = setup
    budget = math.sqrt(kls["default"] * kls["fine"])          # default fails, high passes
    res = encode_guarded(kv, Guard(m, probe, max_kl=budget), config="default")
    assert res.config == "fine" and res.met and res.stepped_up == 1
    assert [s.config for s in res.steps] == ["default", "fine"]
    assert not res.steps[0].passed and res.steps[1].passed
    # the figures are those of the real decoder: same as encode -> decode -> model
    # (float32 log-probabilities: ~1e-8 absolute)
    assert res.steps[0].kl_mean == pytest.approx(kls["default"], rel=1e-4)
    assert res.steps[0].bytes is None and res.steps[1].bytes == len(cachegen.encode(kv, "fine"))
    assert res.kl_mean == pytest.approx(kls["fine"], rel=1e-4) and res.kl_mean <= budget
    # the container is the "fine" cache, with the record
    dec = cachegen.decode(res.data)
    ref = cachegen.decode(cachegen.encode(kv, "fine"))
    assert all(torch.equal(a, b) for p, q in zip(dec, ref) for a, b in zip(p, q))
    ext = [e for e in cachegen.inspect(res.data)["extensions"] if e["kind"] == EXT_QUALITY]
    assert len(ext) == 1
    rec = ext[0]["value"]
    assert rec["config"] == "fine" and rec["met"] and rec["max_kl"] == budget
    assert rec["kl_mean"] == pytest.approx(res.kl_mean, rel=1e-5)
    assert [s["config"] for s in rec["steps"]] == ["default", "fine"]
    assert rec["probe"] == {"kind": "continuation", "tokens": 32, "sha1": Guard(m, probe).probe_digest()}


def test_start_below_the_ladder_and_loose_budget(setup):
    kv, m, probe, kls = setup
    res = Guard(m, probe, max_kl=1e9).encode(kv, "tiny")
    assert res.config == "tiny" and res.stepped_up == 0 and res.kl_mean == pytest.approx(kls["tiny"], rel=1e-4)
    budget = math.sqrt(kls["small"] * kls["default"])
    res = Guard(m, probe, max_kl=budget).encode(kv, "tiny")       # tiny -> default (the ladder's next)
    assert [s.config for s in res.steps] == ["tiny", "default"] and res.met


def test_zero_budget_stores_lossless(setup):
    kv, m, probe, _ = setup
    res = Guard(m, probe, max_kl=0.0).encode(kv)
    assert [s.config for s in res.steps] == ["default", "fine", "high", "lossless"]
    assert res.config == "lossless" and res.met and res.kl_mean == 0.0 and not res.steps[-1].measured
    dec = cachegen.decode(res.data)
    assert all(np.array_equal(d.numpy(), o) for p, q in zip(dec, kv) for d, o in zip(p, q))


def test_ladder_without_lossless_can_fail(setup):
    kv, m, probe, kls = setup
    res = Guard(m, probe, max_kl=0.0, presets=("small",)).encode(kv, "tiny")
    assert [s.config for s in res.steps] == ["tiny", "small"] and not res.met and res.config == "small"
    assert cachegen.inspect(res.data)["extensions"][0]["value"]["met"] is False


def test_fast_check_equals_full_decode(setup):
    kv, m, probe, kls = setup
    budget = math.sqrt(kls["default"] * kls["fine"])
    a = Guard(m, probe, max_kl=budget).encode(kv)
    b = Guard(m, probe, max_kl=budget, check="decode").encode(kv)
    assert with_extensions(a.data, []) == with_extensions(b.data, []) == cachegen.encode(kv, "fine")
    # "fast" never entropy-codes the preset it steps past; "decode" did
    assert [s.bytes for s in a.steps] == [None, len(cachegen.encode(kv, "fine"))]
    assert [s.bytes for s in b.steps] == [len(cachegen.encode(kv, "default")), len(cachegen.encode(kv, "fine"))]
    assert [(s.config, s.kl_mean, s.kl_max, s.top1) for s in a.steps] == \
           [(s.config, s.kl_mean, s.kl_max, s.top1) for s in b.steps]


def test_overlap_gives_the_same_result(setup):
    """The model runs on a helper thread (default) or in turn (overlap=False): same steps,
    figures and container; wait_s / exposed_s account for what the encode stood waiting."""
    kv, m, probe, kls = setup
    budget = math.sqrt(kls["default"] * kls["fine"])       # default fails (its table fit is stopped)
    a = Guard(m, probe, max_kl=budget).encode(kv)
    b = Guard(m, probe, max_kl=budget, overlap=False).encode(kv)
    assert a.data == b.data and a.config == b.config == "fine"
    assert [(s.config, s.bytes, s.kl_mean, s.kl_max, s.top1, s.passed) for s in a.steps] == \
           [(s.config, s.bytes, s.kl_mean, s.kl_max, s.top1, s.passed) for s in b.steps]
    for r in (a, b):
        assert all(s.wait_s >= 0 for s in r.steps) and 0 < r.exposed_s
    # in turn, the encode waits for every model run: at least the reference and the checks
    assert b.exposed_s >= b.reference_s + b.steps[0].check_s - 1e-3


class _SlowRunner(TinyAttention):
    """A model whose decoded-cache runs take ``delay`` s (the exact one is quick), so the
    encoder's pass 2 runs while the probe does (on an LLM the probe outlasts the table fit)."""

    def __init__(self, delay: float):
        super().__init__(3, 2, 16)
        self.delay = delay

    def continue_from(self, kv, ids):
        if self.calls >= 1:
            import time

            time.sleep(self.delay)
        return super().continue_from(kv, ids)


def test_streams_coded_while_the_probe_runs(setup, monkeypatch):
    """With the probe still running after the table fit, pass 2 codes chunks meanwhile in this
    process until the probe is done: kept when it passes (the rest on the workers, or here when
    little is left; same bytes as a plain encode), dropped when it fails (then the next
    preset's container is stored, with the same steps as overlap=False)."""
    import time

    from cachegen.codec import encoder as E

    kv, _, probe, kls = setup
    n_chunks = -(-600 // get_config("default").chunk_tokens)
    calls = []
    real = E.code_chunks_v2

    def spy(h, outs, units, progress=None, workers=None, stop=None, start=0):
        res = real(h, outs, units, progress, workers=workers, stop=stop, start=start)
        calls.append((workers, stop is not None, start, len(res)))
        return res

    real_chunk = E._code_chunk_v2

    def slow_chunk(state, k):                 # each chunk outlasts the probe's delay below
        time.sleep(0.3)
        return real_chunk(state, k)

    monkeypatch.setattr(E, "code_chunks_v2", spy)
    monkeypatch.setattr(E, "_code_chunk_v2", slow_chunk)
    # a quick probe (0.05 s): one chunk coded meanwhile, the rest after it passed
    r = Guard(_SlowRunner(0.05), probe, max_kl=1e9).encode(kv, "default")
    assert r.config == "default" and r.met
    assert calls == [(1, True, 0, 1), (None, False, 1, n_chunks - 1)]
    assert with_extensions(r.data, []) == cachegen.encode(kv, "default")
    # little left (est. serial time of the rest under _FORK_PAYS_S): the rest stays in this process
    import cachegen.guard as G

    monkeypatch.setattr(G, "_FORK_PAYS_S", 100.0)
    calls.clear()
    r = Guard(_SlowRunner(0.05), probe, max_kl=1e9).encode(kv, "default")
    assert calls == [(1, True, 0, 1), (1, False, 1, n_chunks - 1)]
    assert with_extensions(r.data, []) == cachegen.encode(kv, "default")
    monkeypatch.setattr(G, "_FORK_PAYS_S", 0.0)
    # a slow probe: every chunk coded meanwhile
    calls.clear()
    r = Guard(_SlowRunner(2.5), probe, max_kl=1e9).encode(kv, "default")
    assert calls == [(1, True, 0, n_chunks)] and with_extensions(r.data, []) == cachegen.encode(kv, "default")
    # default fails, fine passes: default's chunks dropped
    calls.clear()
    budget = math.sqrt(kls["default"] * kls["fine"])
    a = Guard(_SlowRunner(0.05), probe, max_kl=budget).encode(kv, "default")
    assert calls[0] == (1, True, 0, 1) and sum(c[3] for c in calls[1:]) == n_chunks
    b = Guard(TinyAttention(3, 2, 16), probe, max_kl=budget, overlap=False).encode(kv, "default")
    assert a.config == b.config == "fine" and a.data == b.data
    assert [(s.config, s.bytes, s.kl_mean, s.passed) for s in a.steps] == [(s.config, s.bytes, s.kl_mean, s.passed) for s in b.steps]


def test_code_chunks_stop_and_workers():
    """Pass 2 of the encoder: the same chunks on 1 or 2 workers; ``stop`` abandons it."""
    from cachegen.codec import encoder as E
    from cachegen.guard import _quantize, _tables, _use_tables

    kv = make_kv(tokens=1100)
    cfg = get_config("default")
    h, outs = _quantize(kv, cfg)
    units = _use_tables(h, _tables(h, outs, cfg))
    a = E.code_chunks_v2(h, outs, units, workers=1)
    assert E.code_chunks_v2(h, outs, units, workers=2) == a and len(a) == h.n_chunks > 2
    seen = []
    part = E.code_chunks_v2(h, outs, units, workers=1, stop=lambda: seen.append(1) or len(seen) == 2)
    assert part == a[:2] and E.code_chunks_v2(h, outs, units, start=2) == a[2:]


def test_blas_on_one_thread_while_guarding(setup, monkeypatch):
    """numpy's BLAS pool is held to one thread while the guard fits tables next to its probe (the
    two thread pools fought for the cores), and given back afterwards -- also after an error."""
    import threadpoolctl   # a declared dependency

    from cachegen import guard as G

    def blas_threads():
        return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    assert before, "numpy's BLAS not seen by threadpoolctl: the limit would be a no-op"
    kv, m, probe, _ = setup
    seen = []
    real = G._tables

    def spy(*a, **k):
        seen.append(blas_threads())
        return real(*a, **k)

    monkeypatch.setattr(G, "_tables", spy)
    encode_guarded(kv, Guard(m, probe, max_kl=1.0), config="default")
    assert seen and all(t == [1] * len(before) for t in seen) and blas_threads() == before

    def broken(*a, **k):
        raise RuntimeError("fit broke")

    monkeypatch.setattr(G, "_tables", broken)
    with pytest.raises(RuntimeError, match="fit broke"):
        encode_guarded(kv, Guard(m, probe, max_kl=1.0), config="default")
    assert blas_threads() == before


def test_guard_runs_without_threadpoolctl(setup, monkeypatch):
    """threadpoolctl is a performance aid: without it (an import that fails) the guard still works."""
    import sys

    kv, m, probe, _ = setup
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)
    res = encode_guarded(kv, Guard(m, probe, max_kl=1.0), config="default")
    assert res.config == "default" and res.met


class _FailingRunner(TinyAttention):
    def __init__(self, fail_at: int):
        super().__init__(3, 2, 16)
        self.fail_at = fail_at

    def continue_from(self, kv, ids):
        if self.calls + 1 == self.fail_at:
            self.calls += 1
            raise RuntimeError("runner broke")
        return super().continue_from(kv, ids)


@pytest.mark.parametrize("fail_at", [1, 2])
@pytest.mark.parametrize("overlap", [True, False])
def test_runner_errors_reach_the_caller(setup, fail_at, overlap):
    """An error of the exact (1) or the decoded (2) probe run, on the helper thread or not, is
    raised by encode, and no helper thread is left running."""
    import threading

    kv, _, probe, _ = setup
    with pytest.raises(RuntimeError, match="runner broke"):
        Guard(_FailingRunner(fail_at), probe, max_kl=1e9, overlap=overlap).encode(kv, "small")
    assert not [t for t in threading.enumerate() if t.name == "cachegen-guard"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16, "bf16"])
@pytest.mark.parametrize("preset", ["default", "tiny", "cachegen-paper"])
def test_reconstruction_is_bit_exact(dtype, preset):
    kv = make_kv(tokens=700, short_layer=1, dtype=np.float32 if dtype == "bf16" else dtype, seed=3)
    if dtype == "bf16":
        kv = [(torch.from_numpy(k).bfloat16(), torch.from_numpy(v).bfloat16()) for k, v in kv]
    cfg = get_config(preset)
    data, h, outs = _encode_keep(kv, cfg)
    assert data == cachegen.encode(kv, cfg)
    rec = _reconstruct(h, outs)
    dec = cachegen.decode(data)
    for (rk, rv), (dk, dv) in zip(rec, dec):
        for r, d in ((rk, dk), (rv, dv)):
            assert r.shape == tuple(d.shape)
            assert torch.equal(torch.from_numpy(np.ascontiguousarray(r)).to(d.dtype), d)
    for k in range(h.n_chunks):
        _spot_check(data, rec, k, blocks=None)


def test_spot_check_catches_a_wrong_reconstruction():
    kv = make_kv()
    data, h, outs = _encode_keep(kv, get_config("default"))
    rec = _reconstruct(h, outs)
    rec[0][0][0, 0, -1, 0] += 1.0
    with pytest.raises(RuntimeError, match="differs from the decoder"):
        _spot_check(data, rec)


def test_probe_from_context_and_torch_logits(setup):
    kv, _, _, _ = setup
    m = TinyAttention(3, 2, 16, torch_logits=True)
    ctx = list(np.random.default_rng(0).integers(0, 97, 600))
    g = Guard.from_context(m, ctx, probe_tokens=16, max_kl=1e9)
    assert g.probe_ids == [int(t) for t in ctx[-16:]] and g.probe_kind == "context_tail"
    res = g.encode(kv, "small")
    rec = cachegen.inspect(res.data)["extensions"][0]["value"]
    assert rec["probe"]["kind"] == "context_tail" and rec["probe"]["tokens"] == 16
    assert m.calls == 2                     # exact cache once, decoded cache once


def test_keeps_other_extensions_and_with_extensions(setup):
    kv, m, probe, _ = setup
    user = Extension.json(EXT_USER, {"doc": "a"})
    res = Guard(m, probe, max_kl=1e9).encode(kv, "small", extensions=[user])
    kinds = [e["kind"] for e in cachegen.inspect(res.data)["extensions"]]
    assert kinds == [EXT_USER, EXT_QUALITY]
    bare = with_extensions(res.data, [])
    assert cachegen.inspect(bare)["extensions"] == []
    assert bare == cachegen.encode(kv, "small")
    with pytest.raises(InputError):
        with_extensions(cachegen.encode(kv, "small", format_version=1), [user])


def test_save_with_guard(tmp_path, setup):
    kv, m, probe, kls = setup
    budget = math.sqrt(kls["default"] * kls["fine"])
    n = cachegen.save(tmp_path / "c.cgk", kv, "default", guard=Guard(m, probe, max_kl=budget))
    data = (tmp_path / "c.cgk").read_bytes()
    assert n == len(data)
    rec = cachegen.inspect(data)["extensions"][0]["value"]
    assert rec["config"] == "fine" and rec["kl_mean"] <= budget
    assert len(cachegen.load(tmp_path / "c.cgk")) == 3


@pytest.mark.parametrize("kw,exc", [({"max_kl": -1.0}, ConfigError), ({"max_kl": float("nan")}, ConfigError),
                                    ({"presets": ("nope",)}, ConfigError), ({"check": "maybe"}, ConfigError),
                                    ({"probe_ids": []}, InputError)])
def test_bad_guard_arguments(setup, kw, exc):
    _, m, probe, _ = setup
    args = {"runner": m, "probe_ids": probe, **kw}
    with pytest.raises(exc):
        Guard(**args)


def test_runner_without_protocol_is_refused():
    with pytest.raises(InputError):
        Guard(object(), [1, 2])
    with pytest.raises(InputError):
        Guard.from_context(TinyAttention(1, 1, 4), [])


def test_store_put_with_guard(setup):
    kv, m, probe, kls = setup
    budget = math.sqrt(kls["default"] * kls["fine"])
    tokens = list(np.random.default_rng(2).integers(0, 97, 600))
    fp = fingerprint_from_kv(kv, "tiny-attn", chunk_tokens=256)
    store = KVStore(MemoryBackend(), fp, levels=("default",), guard=GuardPolicy(m, max_kl=budget))
    assert store.put(tokens, kv) == 2                       # 600 tokens: 2 full chunks
    res = store.last_guard["default"]
    match = store.lookup(tokens)
    assert len(match) == 2
    assert all(set(c.levels) == {res.config} for c in match.chunks)
    assert res.met and res.kl_mean <= budget
    got, n = store.load(match, level=[res.config])
    assert n == 512
    ref = cachegen.decode(cachegen.encode([(k[:, :, :256], v[:, :, :256]) for k, v in kv], res.config))
    assert torch.equal(got[0][0][:, :, :256], ref[0][0])
    rec = cachegen.inspect(bytes(store.fetch(match.chunks[1], res.config)))["extensions"][0]["value"]
    assert rec["scope"] == {"chunks": [0, 2], "chunk_tokens": 256} and rec["config"] == res.config
    counts = step_counts([res])
    assert counts["n"] == 1 and counts["stored"] == {res.config: 1}


@pytest.mark.parametrize("check", ["fast", "decode"])
def test_store_put_with_prefill_logits(setup, check):
    """put(..., logits=): the guard probes with the prefill's own predictions at the stored
    prefix's end (one model run per preset, none for the exact side)."""
    kv, m, probe, kls = setup
    tokens = [int(t) for t in np.random.default_rng(2).integers(0, 97, 600)]
    end, n = 512, 16                                        # 2 full chunks of 256 are stored
    exact = m.continue_from([(k[:, :, :end - n], v[:, :, :end - n]) for k, v in kv], tokens[end - n:end])[0]
    logits = np.zeros((1, 600, 97), np.float32)
    logits[0, end - n:end] = exact[0]
    fp = fingerprint_from_kv(kv, "tiny-attn", chunk_tokens=256)
    store = KVStore(MemoryBackend(), fp, levels=("small",),
                    guard=GuardPolicy(m, max_kl=1e9, prefill_tokens=n, check=check))
    calls = m.calls
    assert store.put(tokens, kv, logits=logits) == 2
    res = store.last_guard["small"]
    assert res.probe_kind == "prefill_tail" and res.probe_tokens == n and res.config == "small"
    assert m.calls == calls + 1                             # only the decoded cache's run
    match = store.lookup(tokens)
    got, _ = store.load(match, level=["small"])
    dec = [(k[:, :, :end - n], v[:, :, :end - n]) for k, v in got]
    cut = [(k[:, :, :end - n], v[:, :, :end - n]) for k, v in kv]
    assert res.kl_mean == pytest.approx(kl_of(m, cut, dec, tokens[end - n:end]), rel=1e-4)
    rec = cachegen.inspect(bytes(store.fetch(match.chunks[1], "small")))["extensions"][0]["value"]
    assert rec["probe"]["kind"] == "prefill_tail"
    # only the last rows given: enough when they reach back to the probe's first position
    s2 = KVStore(MemoryBackend(), fp, levels=("small",), guard=GuardPolicy(m, max_kl=1e9, prefill_tokens=n))
    s2.put(tokens, kv, logits=logits[0, -(600 - end + n):])
    assert s2.last_guard["small"].kl_mean == pytest.approx(res.kl_mean, rel=1e-6)
    s3 = KVStore(MemoryBackend(), fp, levels=("small",), guard=GuardPolicy(m, max_kl=1e9, prefill_tokens=n))
    with pytest.raises(InputError, match="rows of prefill logits"):
        s3.put(tokens, kv, logits=logits[0, -(600 - end):])
    assert s3.lookup(tokens).tokens == 0                   # refused before anything was written


def test_with_extensions_refuses_a_corrupt_header(setup):
    from cachegen.errors import ChecksumError

    kv, _, _, _ = setup
    data = bytearray(cachegen.encode(kv, "small"))
    data[20] ^= 1                                   # inside the header: its CRC no longer matches
    with pytest.raises(ChecksumError):
        with_extensions(bytes(data), [Extension.json(EXT_USER, {"a": 1})])


class _PlainRunner:
    """Only the runner protocol: the guard falls back to continue_from."""

    def __init__(self, runner):
        self.r = runner

    def continue_from(self, kv, ids):
        return self.r.continue_from(kv, ids)


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_shared_buffer_probe_equals_continue_from(name):
    """The ORT fast path (past/present buffer sharing, decoded values rebuilt into the buffers)
    measures exactly what continue_from on the decoded cache measures, windowed layers included."""
    from conftest_models import runner as get_runner, text_ids
    from cachegen.guard import _shared_buffers_fit

    r = get_runner(name)
    ids = list(text_ids(name))[:700]
    _, kv = r.prefill(ids)
    kv = r.window_kv(kv)                            # Gemma-3: sliding layers keep 512 tokens
    assert _shared_buffers_fit(r, kv) and not _shared_buffers_fit(_PlainRunner(r), kv)
    # the export records which ops make the presents, so the check needs no onnx import
    assert r._meta.get("present_ops") in (["GroupQueryAttention"], None)
    g_fast = Guard.from_context(r, ids, 16, max_kl=0.0, presets=("tiny", "default"))
    g_plain = Guard.from_context(_PlainRunner(r), ids, 16, max_kl=0.0, presets=("tiny", "default"), check="decode")
    a, b = g_fast.encode(kv), g_plain.encode(kv)
    # max_kl=0: both presets measured, neither passes, the last one is stored
    assert [s.config for s in a.steps] == [s.config for s in b.steps] == ["tiny", "default"]
    assert not a.met and a.steps[0].kl_mean > a.kl_mean > 0
    for s, t in zip(a.steps, b.steps):
        assert s.kl_mean == pytest.approx(t.kl_mean, rel=1e-6, abs=1e-9)
        assert s.kl_max == pytest.approx(t.kl_max, rel=1e-6, abs=1e-9) and s.top1 == t.top1
    assert with_extensions(a.data, []) == with_extensions(b.data, []) == cachegen.encode(kv, "default")
    # the runner kept the probe's buffers: the next guarded encode of this shape reuses them
    # (exact cache reloaded, decoded one rebuilt into them) and measures the same
    from cachegen.guard import _IDLE_PROBES, release_buffers

    kept = _IDLE_PROBES.get(r)
    assert kept is not None
    c = Guard.from_context(r, ids, 16, max_kl=0.0, presets=("tiny", "default")).encode(kv)
    assert _IDLE_PROBES.get(r) is kept
    assert [(s.kl_mean, s.kl_max, s.top1) for s in c.steps] == [(s.kl_mean, s.kl_max, s.top1) for s in a.steps]
    assert c.data == a.data
    release_buffers(r)
    assert _IDLE_PROBES.get(r) is None


def test_prefill_tail_probe_on_the_tiny_model(setup):
    """from_prefill: the decoded cache without its last n positions, then those n tokens, against
    the exact logits the caller already has (here: the same run on the exact cache)."""
    kv, m, _, _ = setup
    ctx = [int(t) for t in np.random.default_rng(4).integers(0, 97, 600)]
    n = 24
    cut = [(k[:, :, :-n], v[:, :, :-n]) for k, v in kv]
    exact = m.continue_from(cut, ctx[-n:])[0]
    logits = np.concatenate([np.zeros((1, 600 - n, 97), np.float32), exact], 1)   # a prefill's [1, T, V]
    calls = m.calls
    res = Guard.from_prefill(m, ctx, logits, probe_tokens=n, max_kl=1e9).encode(kv, "small")
    assert m.calls == calls + 1                     # no exact probe: one run, with the decoded cache
    assert res.reference_s < 0.05
    dec = [(k[:, :, :-n], v[:, :, :-n]) for k, v in cachegen.decode(res.data)]
    assert res.kl_mean == pytest.approx(kl_of(m, cut, dec, ctx[-n:]), rel=1e-4)
    rec = cachegen.inspect(res.data)["extensions"][0]["value"]
    assert rec["probe"]["kind"] == "prefill_tail" and rec["probe"]["tokens"] == n
    b = Guard.from_prefill(m, ctx, logits, probe_tokens=n, max_kl=1e9, check="decode").encode(kv, "small")
    assert b.kl_mean == pytest.approx(res.kl_mean, rel=1e-6) and with_extensions(b.data, []) == with_extensions(res.data, [])
    with pytest.raises(InputError):                 # reference rows do not match the probe
        Guard(m, ctx[-n:], reference=exact[0, :-1])
    with pytest.raises(InputError):                 # a layer shorter than the context
        Guard.from_prefill(m, ctx, logits, n).encode(make_kv(tokens=600, short_layer=1), "small")


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_prefill_tail_probe_on_ort(name):
    from conftest_models import runner as get_runner, text_ids

    r = get_runner(name)
    ids = list(text_ids(name))[:700]
    lg, full = r.prefill(ids)
    kv = r.window_kv(full)                           # Gemma-3: sliding layers keep their 512 positions
    extra = {}
    if name == "gemma3":
        # trimmed sliding layers without the untrimmed cache: refused, not mis-measured
        with pytest.raises(InputError, match="untrimmed"):
            Guard.from_prefill(r, ids, lg, 16).encode(kv, "default")
        extra = dict(kv=full)                        # the probe takes the 15 positions before the window from it
    a = Guard.from_prefill(r, ids, lg, 16, max_kl=0.0, presets=("tiny", "default"), **extra).encode(kv)
    b = Guard.from_prefill(_PlainRunner(r), ids, lg, 16, max_kl=0.0, presets=("tiny", "default"),
                           check="decode", **extra).encode(kv)
    assert [s.config for s in a.steps] == [s.config for s in b.steps] == ["tiny", "default"]
    for s, t in zip(a.steps, b.steps):
        assert s.kl_mean == pytest.approx(t.kl_mean, rel=1e-6, abs=1e-9) and s.top1 == t.top1
    assert a.steps[0].kl_mean > a.kl_mean > 0
    assert with_extensions(a.data, []) == cachegen.encode(kv, "default")
    # the reference is the exact cache's own prediction there: the exact cut cache (with the lead
    # positions) scores ~0, so what the probe measures is the codec's error alone
    from cachegen.guard import _Reference, _compare, _cut, _lead_of
    g = Guard.from_prefill(r, ids, lg, 16, **extra)
    lead = _lead_of(g, [int(k.shape[2]) for k, _ in kv], len(ids), 16)
    assert (name == "gemma3") == any(ld is not None for ld in lead)
    cut = _cut(kv, 16, lead)
    klm, _, top1 = _compare(_Reference(lg[0, -16:]), r.continue_from(cut, ids[-16:])[0])
    assert klm < 1e-5 and top1 == 1.0
    # the fast probe reused for a second guarded encode (buffers kept by the runner) measures the same
    c = Guard.from_prefill(r, ids, lg, 16, max_kl=0.0, presets=("tiny", "default"), **extra).encode(kv)
    assert [(s.kl_mean, s.top1) for s in c.steps] == [(s.kl_mean, s.top1) for s in a.steps]


def test_gqa_check_reads_the_export_record(monkeypatch):
    """Whether a graph's presents come from GroupQueryAttention: from the export's record when it
    has one (importing onnx costs ~1.5 s, once per process: it was most of a first guarded
    encode), else from the graph itself; a graph that cannot be read means the plain path."""
    import sys

    from cachegen import guard as gmod

    class R:
        model_dir = "/nonexistent"
        layout = None

    for ops, want in ((["GroupQueryAttention"], True), (["Concat"], False), (["Concat", "GroupQueryAttention"], False)):
        r = R()
        r._meta = {"present_ops": ops}
        monkeypatch.setitem(sys.modules, "onnx", None)      # any import of onnx would fail
        assert gmod._presents_from_gqa(r) is want
    r = R()
    r._meta = {}
    monkeypatch.setattr(gmod, "_GQA_GRAPHS", {})
    assert gmod._presents_from_gqa(r) is False              # no record, no readable graph
