"""cachegen rd: rate-distortion sweep of presets on a user's KV cache."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cachegen.cli import EXIT_DATA, EXIT_OK, EXIT_USAGE, main
from cachegen.npz import write_kv_npz
from cachegen.rd import format_table, plot, sweep


def _kv(layers=3, tokens=260, seed=0):
    rng = np.random.default_rng(seed)
    # per-channel offsets and scales like real keys, so the presets have something to model
    out = []
    for _ in range(layers):
        off = rng.standard_normal((1, 2, 1, 16)) * 2
        k = (rng.standard_normal((1, 2, tokens, 16)) * rng.uniform(0.5, 3, 16) + off).astype(np.float16)
        v = rng.standard_normal((1, 2, tokens, 16)).astype(np.float16)
        out.append((k, v))
    return out


def test_sweep_orders_presets_by_rate_and_error():
    res = sweep(_kv(), ["high", "default", "small", "tiny", "lossless"])
    by = {p.preset: p for p in res.points}
    assert res.layers == 3 and res.tokens == 260 and res.values == 3 * 2 * 2 * 260 * 16
    assert by["lossless"].key_rel_rmse == by["lossless"].value_rel_rmse == by["lossless"].max_abs_error == 0
    fam = [by[n] for n in ("high", "default", "small", "tiny")]
    assert [p.bytes for p in fam] == sorted((p.bytes for p in fam), reverse=True)
    for err in ("key_rel_rmse", "value_rel_rmse"):
        vals = [getattr(p, err) for p in fam]
        assert vals == sorted(vals) and vals[0] > 0, (err, vals)
    for p in res.points:
        assert p.bits_per_value == pytest.approx(8 * p.bytes / res.values)
        assert p.ratio_vs_fp16 == pytest.approx(16 / p.bits_per_value)
        assert p.kl_mean is None
    table = format_table(res)
    assert "tiny" in table and "K rel.err" in table and "KL" not in table


def test_cli_rd_json_table_and_plot(tmp_path, capsys):
    write_kv_npz(tmp_path / "kv.npz", _kv())
    png = tmp_path / "rd.png"
    assert main(["rd", str(tmp_path / "kv.npz"), "--presets", "default,tiny,lossless", "--plot", str(png),
                 "--json"]) == EXIT_OK
    res = json.loads(capsys.readouterr().out)
    assert [p["preset"] for p in res["points"]] == ["default", "tiny", "lossless"]
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image as mpimg
    img = mpimg.imread(str(png))
    assert img.shape[0] > 300 and img.shape[1] > 500 and img[..., :3].std() > 0.05   # not blank
    assert main(["rd", str(tmp_path / "kv.npz"), "--presets", "small"]) == EXIT_OK
    assert "small" in capsys.readouterr().out


def test_cli_rd_errors(tmp_path, capsys):
    write_kv_npz(tmp_path / "kv.npz", _kv(layers=1, tokens=20))
    assert main(["rd", str(tmp_path / "kv.npz"), "--presets", "default,medium"]) == EXIT_USAGE
    assert main(["rd", str(tmp_path / "nosuch.npz")]) == EXIT_DATA
    assert main(["rd", str(tmp_path / "kv.npz"), "--model", "smollm2"]) == EXIT_DATA
    err = capsys.readouterr().err
    assert "heldout" in err and "Traceback" not in err


@pytest.mark.slow
def test_rd_with_model_quality(tmp_path):
    from conftest_models import runner, text_ids
    r = runner("smollm2")
    ids = list(text_ids("smollm2"))
    _, kv = r.prefill(ids[:300])
    res = sweep(kv, ["high", "tiny", "lossless"], runner=r, heldout=ids[300:340], model="smollm2")
    by = {p.preset: p for p in res.points}
    assert by["lossless"].kl_mean == 0 and by["lossless"].delta_ppl_rel == 0
    assert 0 < by["high"].kl_mean < by["tiny"].kl_mean
    assert by["high"].top1_agreement >= by["tiny"].top1_agreement
    plot(res, str(tmp_path / "q.png"))
    assert (tmp_path / "q.png").stat().st_size > 10_000
    assert "KL mean" in format_table(res)
