"""ONNX Runtime runner on the two real models, checked against transformers (fp32, CPU)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest_models import gemma3, gemma3_torch, smollm2, smollm2_torch, text_ids  # noqa: F401

pytestmark = pytest.mark.slow


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits.numpy()


def _torch_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([list(ids)]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n)
    return out[0, len(ids):].tolist()


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _check_close(ort_logits, ref, atol):
    diff = np.abs(ort_logits - ref).max()
    lp = np.abs(_log_softmax(ort_logits) - _log_softmax(ref)).max()
    agree = (ort_logits.argmax(-1) == ref.argmax(-1)).mean()
    assert diff < atol, f"max |logit diff| {diff}"
    assert lp < atol, f"max |log-prob diff| {lp}"
    assert agree >= 0.99, f"argmax agreement {agree}"
    return diff


# ------------------------------------------------------------------------------ SmolLM2
def test_smollm2_layout(smollm2):
    r = smollm2
    assert (r.num_layers, r.num_kv_heads, r.head_dim) == (30, 3, 64)
    assert r.dtype == np.float32
    assert r.windows == [None] * 30
    assert r.layout.past_names[0] == ("past_key_values.0.key", "past_key_values.0.value")
    assert r.layout.present_names[29] == ("present.29.key", "present.29.value")


def test_smollm2_logits_match_torch(smollm2, smollm2_torch):
    ids = text_ids("smollm2")[:96]
    logits, kv = smollm2.prefill(ids)
    assert logits.shape == (1, 96, 49152)
    assert len(kv) == 30 and kv[0][0].shape == (1, 3, 96, 64) and kv[0][1].dtype == np.float32
    _check_close(logits, _torch_logits(smollm2_torch, ids), atol=5e-3)


def test_smollm2_continue_equals_full_prefill(smollm2):
    ids = text_ids("smollm2")[:160]
    full, kv_full = smollm2.prefill(ids)
    _, kv = smollm2.prefill(ids[:100])
    part, kv2 = smollm2.continue_from(kv, ids[100:])
    np.testing.assert_allclose(part, full[:, 100:], atol=1e-4, rtol=0)
    for (k1, v1), (k2, v2) in zip(kv_full, kv2):
        np.testing.assert_allclose(k2, k1, atol=1e-5, rtol=0)
        np.testing.assert_allclose(v2, v1, atol=1e-5, rtol=0)
    # one token at a time, too
    kv3 = kv
    for i, t in enumerate(ids[100:110]):
        lg, kv3 = smollm2.continue_from(kv3, [t])
        np.testing.assert_allclose(lg[0, 0], full[0, 100 + i], atol=1e-4, rtol=0)
    # score() returns the same rows
    np.testing.assert_allclose(smollm2.score(kv, ids[100:]), full[0, 100:], atol=1e-4, rtol=0)


def test_smollm2_torch_tensor_kv(smollm2):
    ids = text_ids("smollm2")[:80]
    _, kv = smollm2.prefill(ids[:64])
    ref, _ = smollm2.continue_from(kv, ids[64:])
    tkv = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in kv]
    got, _ = smollm2.continue_from(tkv, ids[64:])
    np.testing.assert_array_equal(got, ref)
    # fp16 torch tensors are cast to the graph dtype
    hkv = [(k.half(), v.half()) for k, v in tkv]
    got16, _ = smollm2.continue_from(hkv, ids[64:])
    assert np.abs(got16 - ref).max() < 0.5
    assert smollm2.window_kv(kv) == kv  # no sliding layers: no-op


def test_smollm2_greedy_matches_torch(smollm2, smollm2_torch):
    ids = text_ids("smollm2")[:64]
    ours = smollm2.generate(ids, 16, stop_at_eos=False)
    assert ours == _torch_greedy(smollm2_torch, ids, 16)
    # from a cache: prefill all but the last token, then feed it
    _, kv = smollm2.prefill(ids[:-1])
    assert smollm2.generate(ids[-1:], 16, kv=kv, stop_at_eos=False) == ours


def test_bad_kv_rejected(smollm2):
    _, kv = smollm2.prefill([1, 2, 3, 4])
    with pytest.raises(ValueError):
        smollm2.continue_from(kv[:-1], [5])
    bad = list(kv)
    bad[3] = (kv[3][0][:, :, :2], kv[3][1][:, :, :2])  # a full-attention layer cannot be trimmed
    with pytest.raises(ValueError):
        smollm2.continue_from(bad, [5])


def test_bad_ids_and_text_rejected(smollm2):
    """Ragged, non-integer or empty ids and non-str text get our InputError, not numpy's or the
    tokenizer's (a tuple or list would be tokenized as a batch)."""
    from cachegen.errors import InputError

    for bad in ([[1, 2], [3]], [1.5, 2.0], [], [[]], ["a", "b"]):
        with pytest.raises(InputError):
            smollm2.prefill(bad)
    _, kv = smollm2.prefill([1, 2, 3])
    with pytest.raises(InputError):
        smollm2.continue_from(kv, [[4, 5], [6]])
    for bad in (("some", "text"), ["text"], b"bytes", None):
        with pytest.raises(InputError):
            smollm2.encode(bad)


# ------------------------------------------------------------------------------ Gemma-3
def test_gemma3_layout_and_bos(gemma3):
    r = gemma3
    assert (r.num_layers, r.num_kv_heads, r.head_dim) == (18, 1, 256)
    assert r.windows == [None if i % 6 == 5 else 512 for i in range(18)]
    assert r.encode("hello")[0] == r.bos_token_id == 2


def test_gemma3_logits_match_torch_short(gemma3, gemma3_torch):
    ids = text_ids("gemma3")[:40]
    logits, _ = gemma3.prefill(ids)
    _check_close(logits, _torch_logits(gemma3_torch, ids), atol=5e-2)


def test_gemma3_past_window_matches_torch(gemma3, gemma3_torch):
    """Past 512 tokens the sliding layers must only see their window, exactly like transformers."""
    ids = text_ids("gemma3")[:620]
    logits, kv = gemma3.prefill(ids)
    assert kv[0][0].shape == (1, 1, 620, 256)
    ref = _torch_logits(gemma3_torch, ids)
    _check_close(logits[:, 512:], ref[:, 512:], atol=5e-2)
    # continuing from a cache longer than the window, one and several tokens
    _, kv = gemma3.prefill(ids[:580])
    part, _ = gemma3.continue_from(kv, ids[580:])
    _check_close(part, ref[:, 580:], atol=5e-2)
    # greedy generation after the window
    ours = gemma3.generate(ids[-1:], 8, kv=gemma3.prefill(ids[:-1])[1], stop_at_eos=False)
    assert ours == _torch_greedy(gemma3_torch, ids, 8)


def test_gemma3_trimmed_window_cache(gemma3):
    ids = text_ids("gemma3")[:660]
    _, kv = gemma3.prefill(ids[:600])
    win = gemma3.window_kv(kv)
    assert [k.shape[2] for k, _ in win] == [600 if i % 6 == 5 else 512 for i in range(18)]
    assert gemma3.kv_nbytes_fp16(win) < gemma3.kv_nbytes_fp16(kv)
    full_logits, full_kv = gemma3.continue_from(kv, ids[600:])
    trim_logits, trim_kv = gemma3.continue_from(win, ids[600:])
    np.testing.assert_allclose(trim_logits, full_logits, atol=1e-5, rtol=0)
    # the returned cache stays trimmed and equals the full one's window
    for i, ((kf, vf), (kt, vt)) in enumerate(zip(gemma3.window_kv(full_kv), trim_kv)):
        assert kt.shape == kf.shape, i
        np.testing.assert_allclose(kt, kf, atol=1e-5, rtol=0)
        np.testing.assert_allclose(vt, vf, atol=1e-5, rtol=0)
    # greedy generation from the trimmed cache (also as torch tensors) is the same
    g_full = gemma3.generate(ids[600:610], 8, kv=kv, stop_at_eos=False)
    g_trim = gemma3.generate(ids[600:610], 8, kv=[(torch.from_numpy(np.ascontiguousarray(k)),
                                                  torch.from_numpy(np.ascontiguousarray(v)))
                                                 for k, v in win], stop_at_eos=False)
    assert g_trim == g_full
    # a sliding layer trimmed below its window is refused
    bad = list(win)
    bad[0] = (win[0][0][:, :, -100:], win[0][1][:, :, -100:])
    with pytest.raises(ValueError):
        gemma3.continue_from(bad, ids[600:601])
