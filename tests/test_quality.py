"""Quality harness: maths on synthetic logits (fast) and on SmolLM2 / Gemma-3 (slow)."""
from __future__ import annotations

import numpy as np
import pytest

from cachegen.quality import compare_logits, int8_round_trip, log_softmax

from conftest_models import gemma3, smollm2  # noqa: F401


def test_compare_logits_identity_and_shift():
    rng = np.random.default_rng(0)
    lo = rng.normal(size=(7, 50)) * 3
    c = compare_logits(lo, lo, targets=list(range(7)))
    assert c["kl"].max() == 0 and c["top1"] == 1.0
    np.testing.assert_array_equal(c["nll_original"], c["nll_restored"])
    # a constant shift of the logits is the same distribution
    c = compare_logits(lo, lo + 5.0)
    assert c["kl"].max() < 1e-12 and c["top1"] == 1.0
    c = compare_logits(lo, lo + rng.normal(size=lo.shape))
    assert c["kl"].mean() > 0
    np.testing.assert_allclose(np.exp(log_softmax(lo)).sum(-1), 1.0)


def test_int8_round_trip_is_close():
    rng = np.random.default_rng(1)
    kv = [(rng.normal(size=(1, 2, 9, 4)).astype(np.float32),) * 2 for _ in range(3)]
    out = int8_round_trip(kv)
    for (k, v), (k2, v2) in zip(kv, out):
        assert k2.shape == k.shape and k2.dtype == np.float32
        assert np.abs(k2 - k).max() <= np.abs(k).max() / 127 * 0.51 + 1e-7


def test_greedy_stats_prefix_and_position_agreement():
    from cachegen.quality import Divergence, GreedyStats, greedy_stats, position_agreement

    a = [1, 2, 3, 4, 5, 6, 7, 8]
    assert position_agreement(a, a) == 1.0 and position_agreement(a, a, 8) == 1.0
    # one flipped token in the middle: the prefix stops at 3, the positions still agree 7/8
    b = [1, 2, 3, 9, 5, 6, 7, 8]
    assert position_agreement(a, b, 8) == 7 / 8
    # a shifted continuation (an inserted token) agrees before the shift only
    c = [1, 2, 0, 3, 4, 5, 6, 7]
    assert position_agreement(a, c, 8) == 2 / 8
    # a short continuation (EOS stop): the missing positions disagree
    assert position_agreement(a, a[:4], 8) == 4 / 8 and position_agreement(a[:4], a) == 4 / 8
    assert position_agreement([], [], 0) == 1.0
    div = Divergence(3, 4, 9, [(4, 0.41), (9, 0.40)], [(9, 0.42), (4, 0.40)], 0.01)
    st = greedy_stats([(a, a, None), (a, b, div), (a, c, None)], 8)
    assert st.prompts == 3 and st.tokens_per_prompt == 8 and st.identical == 1
    assert abs(st.agreement - (8 + 3 + 2) / 24) < 1e-12
    assert abs(st.token_agreement - (8 + 7 + 2) / 24) < 1e-12
    assert st.divergences == [div] and abs(st.identical_rate - 1 / 3) < 1e-12
    s = st.summary()
    assert "54.2% of 8-token continuations (1/3 identical, 70.8% of positions agree)" in s, s
    assert "1/1 divergences at near-ties" in s
    empty = greedy_stats([], 8)
    assert empty.agreement == 1.0 and empty.token_agreement == 1.0 and empty.prompts == 0
    # built the old way (positional, no position-wise figure): still valid, summary without it
    old = GreedyStats(2, 8, 2, 1.0)
    assert old.token_agreement is None and "positions" not in old.summary()


@pytest.mark.slow
def test_identity_round_trip_is_lossless(smollm2):
    from cachegen.demo import demo_text
    from cachegen.quality import evaluate

    rep = evaluate(smollm2, demo_text(), lambda kv: kv, context_tokens=256, continuation_tokens=48,
                   generate_tokens=12)
    assert rep.context_tokens == 256 and rep.continuation_tokens == 48
    assert rep.delta_ppl_rel == 0.0 and rep.ppl_original == rep.ppl_restored
    assert rep.kl_mean == 0.0 and rep.kl_max == 0.0 and rep.top1_agreement == 1.0
    assert rep.greedy_identical and rep.greedy_match_prefix_len == 12
    assert 1.0 < rep.ppl_original < 100.0
    assert rep.fp16_bytes == 30 * 2 * 3 * 256 * 64 * 2


@pytest.mark.slow
def test_int8_round_trip_small_loss(smollm2):
    from cachegen.demo import demo_text
    from cachegen.quality import evaluate

    rep = evaluate(smollm2, demo_text(), int8_round_trip, context_tokens=256,
                   continuation_tokens=48, generate_tokens=0)
    assert 0.0 < rep.kl_mean < 0.01
    assert abs(rep.delta_ppl_rel) < 0.02
    assert rep.top1_agreement > 0.9


@pytest.mark.slow
def test_cachegen_lossless_on_trimmed_gemma_cache(gemma3):
    """cachegen.encode/decode through the harness: the lossless preset on a window-trimmed cache."""
    from cachegen.demo import demo_text
    from cachegen.quality import evaluate

    rep = evaluate(gemma3, demo_text(), config="lossless", context_tokens=560,
                   continuation_tokens=24, generate_tokens=4, trim_window=True)
    assert rep.kl_max == 0.0 and rep.delta_ppl_rel == 0.0 and rep.greedy_identical
    assert rep.config == "lossless" and rep.compressed_bytes > 0
    # trimmed: 15 sliding layers x 512 tokens + 3 full layers x 560 tokens, 1 head x 256, K and V
    assert rep.fp16_bytes == (15 * 512 + 3 * 560) * 2 * 256 * 2


@pytest.mark.slow
def test_cachegen_default_preset_sane(smollm2):
    from cachegen.demo import demo_text
    from cachegen.quality import evaluate

    rep = evaluate(smollm2, demo_text(), config="default", context_tokens=256,
                   continuation_tokens=48, generate_tokens=0)
    assert rep.ratio > 2.0
    assert rep.kl_mean < 0.1 and abs(rep.delta_ppl_rel) < 0.1
    assert rep.encode_s > 0 and rep.decode_s > 0
