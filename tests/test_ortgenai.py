"""onnxruntime-genai route: the KV of a Generator, trimmed, saved, restored with OrtRunner."""
from __future__ import annotations

import numpy as np
import pytest

import onnxruntime_genai as og  # noqa: E402  (.ci/install installs it)

import cachegen  # noqa: E402
from cachegen.integrations.ortgenai import generator_kv, save_generator  # noqa: E402


@pytest.mark.slow
def test_generator_kv_saved_and_continued_with_ort_runner(tmp_path):
    from conftest_models import model_dir, runner, text_ids
    r = runner("smollm2")
    ids = list(text_ids("smollm2"))[:300]
    model = og.Model(str(model_dir("smollm2")))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=512)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(ids, dtype=np.int32))
    kv = generator_kv(gen)
    assert len(kv) == r.num_layers and all(k.shape[2] == 300 for k, _ in kv)   # not the 512-token buffer
    _, ref = r.prefill(ids)
    for (k, v), (k2, v2) in zip(kv, ref):
        np.testing.assert_allclose(k, np.asarray(k2), atol=2e-3)
        np.testing.assert_allclose(v, np.asarray(v2), atol=2e-3)
    # after generate_next_token the newest token is not in the cache yet
    gen.generate_next_token()
    nxt = int(gen.get_sequence(0)[-1])
    assert generator_kv(gen, gen.token_count() - 1)[0][0].shape[2] == 300
    with pytest.raises(cachegen.InputError):
        generator_kv(gen, 10_000)
    path = tmp_path / "gen.cgk"
    save_generator(path, gen, "lossless", tokens=300)
    restored = cachegen.load(path)
    lg, _ = r.continue_from(restored, [nxt])
    lg_ref, _ = r.continue_from(ref, [nxt])
    np.testing.assert_allclose(lg[0, -1], lg_ref[0, -1], atol=2e-3)
    gen.generate_next_token()                           # the generator's own next token
    assert int(np.argmax(lg[0, -1])) == int(gen.get_sequence(0)[-1])
