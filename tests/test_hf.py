"""cachegen.hf: transformers caches to/from containers, the true length of sliding-window layers,
and the runner that lets the prefix store work with a transformers model.

Fast tests use tiny randomly initialised models built from a config (no weights loaded);
the slow ones use the two reference models (the fp32 HF folder saved next to their ONNX export).
"""
from __future__ import annotations

import inspect

import numpy as np
import pytest

import torch  # noqa: E402
import transformers  # noqa: E402

import cachegen  # noqa: E402
from cachegen import hf  # noqa: E402
from cachegen.store import DirectoryBackend, KVStore, fingerprint_from_runner, prefill_with_reuse  # noqa: E402

WINDOW = 8


def _tiny_gemma():
    cfg = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=WINDOW, max_position_embeddings=512,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"])
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(cfg).eval()


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


SLIDING = hf.supports_sliding_layers()
needs_sliding = pytest.mark.skipif(not SLIDING, reason="this transformers' DynamicCache has no sliding layers")


def _prefill(model, ids):
    # transformers 4.5x gives Gemma-3 a HybridCache (static buffers) unless handed a DynamicCache
    kw = {} if SLIDING else {"past_key_values": transformers.DynamicCache()}
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids)[None], use_cache=True, **kw).past_key_values


def _next_logits(model, cache, ids):
    # transformers 5.2x renamed past_key_values to cache
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids)[None], use_cache=True, **{kw: cache}).logits


IDS = list(np.random.default_rng(0).integers(0, 128, 40))


@pytest.mark.parametrize("make", [_tiny_gemma, _tiny_llama])
def test_round_trip_keeps_the_true_length(make, tmp_path):
    model = make()
    cache = _prefill(model, IDS[:30])
    assert cache.get_seq_length() == 30
    path = tmp_path / "ctx.cgk"
    hf.save(path, cache, "lossless", metadata={"note": "hi"})
    back = hf.load(path, model.config)
    assert back.get_seq_length() == 30
    assert [type(l).__name__ for l in back.layers] == [type(l).__name__ for l in cache.layers]
    for a, b in zip(hf.from_dynamic_cache(cache), hf.from_dynamic_cache(back)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ext = cachegen.inspect(path.read_bytes())["extensions"][0]["value"]
    assert ext["note"] == "hi" and ext[hf.META_KEY]["seq_length"] == 30
    # continuing from the restored cache equals continuing from the original one
    assert torch.equal(_next_logits(model, back, IDS[30:34]), _next_logits(model, cache, IDS[30:34]))
    assert back.get_seq_length() == cache.get_seq_length() == 34


@needs_sliding
def test_sliding_layers_hold_their_window_and_count_everything():
    model = _tiny_gemma()
    cache = _prefill(model, IDS[:30])
    kv = hf.from_dynamic_cache(cache)
    assert [int(k.shape[2]) for k, _ in kv] == [WINDOW - 1] * 3 + [30]
    # the naive route counts only the window: what this module exists to avoid
    naive = transformers.DynamicCache(kv, config=model.config) if hasattr(transformers.DynamicCache(), "layers") else None
    if naive is not None:
        assert naive.get_seq_length() != 30
    restored = hf.to_dynamic_cache(kv, model.config)
    assert restored.get_seq_length() == 30
    # a full-length cache (e.g. from ONNX Runtime, which keeps every token) is trimmed to the window
    full = [(torch.randn(1, 1, 30, 16), torch.randn(1, 1, 30, 16)) for _ in range(4)]
    c = hf.to_dynamic_cache(full, model.config)
    assert c.get_seq_length() == 30 and [l.keys.shape[2] for l in c.layers] == [WINDOW - 1] * 3 + [30]
    assert torch.equal(c.layers[0].keys, full[0][0][:, :, -(WINDOW - 1):])
    # without the config every layer is a full layer and must hold every token
    with pytest.raises(cachegen.InputError, match="holds 7 of 30"):
        hf.to_dynamic_cache(kv)
    with pytest.raises(cachegen.InputError, match="needs the last 7"):
        hf.to_dynamic_cache([(k[:, :, -3:], v[:, :, -3:]) for k, v in kv[:3]] + [kv[3]], model.config)
    with pytest.raises(cachegen.InputError, match="layers"):
        hf.to_dynamic_cache(kv[:2], model.config)
    with pytest.raises(cachegen.InputError):
        hf.to_dynamic_cache([(torch.zeros(2, 3), torch.zeros(2, 3))])


def test_plain_containers_and_bad_records(tmp_path):
    model = _tiny_gemma()
    kv = hf.from_dynamic_cache(_prefill(model, IDS[:30]))
    # a container written by cachegen.save (no hf record): the length is the longest layer's
    data = cachegen.encode(kv, "lossless")
    assert hf.decode(data, model.config).get_seq_length() == 30
    from cachegen.format.extensions import EXT_USER, Extension
    bad = cachegen.encode(kv, "lossless", extensions=[Extension.json(EXT_USER, {hf.META_KEY: {"seq_length": 5,
                                                                                           "sliding_windows": []}})])
    with pytest.raises(cachegen.FormatError):
        hf.decode(bad, model.config)
    (tmp_path / "empty.cgk").write_bytes(b"")
    with pytest.raises(cachegen.FormatError):
        hf.load(tmp_path / "empty.cgk")


@pytest.mark.parametrize("make", [_tiny_gemma, _tiny_llama])
def test_runner_matches_the_model_and_works_with_the_store(make, tmp_path):
    model = make()
    r = hf.HFRunner(model, model_id="tiny")
    ids = IDS[:37]
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids)[None]).logits.float().numpy()
    logits, kv = r.prefill(ids)
    np.testing.assert_allclose(logits, ref, atol=1e-5)
    assert all(int(k.shape[2]) == 37 for k, _ in kv)          # every layer whole (the store slices chunks)
    lg2, kv2 = r.continue_from([(k[:, :, :30], v[:, :, :30]) for k, v in kv], ids[30:])
    np.testing.assert_allclose(lg2, ref[:, 30:], atol=1e-4)
    store = KVStore(DirectoryBackend(tmp_path), fingerprint_from_runner(r, chunk_tokens=8), levels=("lossless",))
    l1, _, info1 = prefill_with_reuse(r, store, ids, level="lossless", save="sync")
    assert info1["reused_tokens"] == 0 and info1["chunks_written"] == 4
    longer = ids + IDS[37:40]
    l2, kv3, info2 = prefill_with_reuse(r, store, longer, level="lossless")
    assert info2["reused_tokens"] == 32 and info2["store_future"].result(timeout=60) == 1
    with torch.no_grad():
        ref2 = model(input_ids=torch.as_tensor(longer)[None]).logits.float().numpy()
    np.testing.assert_allclose(l2, ref2[:, 32:], atol=1e-4)
    assert all(int(k.shape[2]) == 40 for k, _ in kv3)
    with pytest.raises(cachegen.InputError):
        r.prefill([])


# ------------------------------------------------------------------ the reference models

def _real(name):
    from conftest_models import model_dir, text_ids, torch_model
    return torch_model(name), list(text_ids(name)), model_dir(name)


@pytest.mark.slow
@pytest.mark.parametrize("name, n_ctx", [("smollm2", 300), ("gemma3", 540)])
def test_real_model_continuation_from_restored_cache(name, n_ctx, tmp_path):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, ids, _ = _real(name)
    cache = _prefill(model, ids[:n_ctx])
    assert cache.get_seq_length() == n_ctx
    kv_orig = hf.from_dynamic_cache(cache)               # the tensors: a continuation replaces, not mutates, them
    hf.save(tmp_path / "ctx.cgk", cache, "lossless")
    lossy_data = hf.encode(cache, "default")
    restored = hf.load(tmp_path / "ctx.cgk", model.config)
    assert restored.get_seq_length() == n_ctx            # Gemma-3: not 511 (its sliding window - 1)
    r = hf.HFRunner(model)
    q = ids[n_ctx:n_ctx + 4]
    assert r.generate(q, 6, kv=hf.from_dynamic_cache(restored)) == r.generate(q, 6, kv=kv_orig)
    lg_r = _next_logits(model, restored, q)
    lg_o = _next_logits(model, cache, q)                 # the model's own cache object, continued
    assert torch.equal(lg_r, lg_o)
    # lossy: the default preset still gives a cache of the right length and a close continuation
    lossy = hf.decode(lossy_data, model.config)
    assert lossy.get_seq_length() == n_ctx
    p = torch.softmax(lg_o[0, -1].double(), -1)
    pl = torch.softmax(_next_logits(model, lossy, q)[0, -1].double(), -1)
    assert float((p * (p.log() - pl.log())).sum()) < 0.05


@pytest.mark.slow
def test_real_model_prefill_with_reuse(tmp_path):
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    model, ids, mdir = _real("gemma3")
    r = hf.HFRunner(model, model_id="gemma3-hf")
    store = KVStore(DirectoryBackend(tmp_path), fingerprint_from_runner(r), levels=("lossless",))
    prompt = ids[:2 * 256 + 10]
    _, _, info = prefill_with_reuse(r, store, prompt, level="lossless", save="sync")
    assert info["chunks_written"] == 2
    longer = ids[:2 * 256 + 20]
    logits, kv, info2 = prefill_with_reuse(r, store, longer, level="lossless", save=False)
    assert info2["reused_tokens"] == 512
    ref, _ = r.prefill(longer)                           # crosses the 512-token window of the sliding layers
    np.testing.assert_allclose(logits[0], ref[0, 512:], atol=2e-3)
    assert (logits[0].argmax(-1) == ref[0, 512:].argmax(-1)).all()
