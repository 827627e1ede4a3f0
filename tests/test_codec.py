"""Round trips, error bounds, decoder agreement, API surface of the codec core."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import cachegen
from cachegen import CodecConfig, PRESETS
from cachegen.dispatch import block_params, open_container
from cachegen.format.tables import TOKEN_SCALES

from helpers import as_f32, make_kv

LOSSY = [n for n, c in PRESETS.items() if not c.lossless]


def error_bound(data: bytes, layer: int, kvi: int) -> np.ndarray:
    """Per-element bound on |x - x'| from the container's own parameters: half a step (times
    the token scale) plus rounding of the fp32 arithmetic and of the output dtype."""
    c = open_container(data)
    h = c.header
    l = h.layers[layer]
    heads, dim = l.heads_dim(kvi)
    bound = np.zeros((h.batch, heads, l.tokens, dim), dtype=np.float64)
    for k in range(c.n_chunks):
        for bp in block_params(c, k):
            if (bp.layer, bp.kv) != (layer, kvi):
                continue
            n = bp.tokens
            step = bp.step.astype(np.float64).reshape(heads, dim)
            ts = np.ones((h.batch, n)) if bp.token_exp is None else \
                TOKEN_SCALES[bp.token_exp].astype(np.float64).reshape(h.batch, n)
            bound[:, :, k * h.chunk_tokens:k * h.chunk_tokens + n, :] = \
                0.5 * step[None, :, None, :] * ts[:, None, :, None]
    return bound


VERSIONS = [1, 2]   # every test of the codec runs on both format versions


@pytest.mark.parametrize("fv", VERSIONS)
@pytest.mark.parametrize("preset", LOSSY)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_round_trip_within_quantization_bound(preset, dtype, fv):
    kv = make_kv(layers=3, tokens=300, dtype=dtype, seed=1)
    data = cachegen.encode(kv, preset, format_version=fv)
    out = cachegen.decode(data)
    rel = {"float16": 2 ** -10, "bfloat16": 2 ** -7, "float32": 2 ** -22}[dtype]
    for i, (pair_in, pair_out) in enumerate(zip(kv, out)):
        for kvi in (0, 1):
            x, y = as_f32(pair_in[kvi]), pair_out[kvi]
            assert y.dtype == {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
            assert tuple(y.shape) == x.shape
            err = np.abs(as_f32(y).astype(np.float64) - x)
            q = error_bound(data, i, kvi) * (1 + 1e-5)
            bound = q + rel * (np.abs(x) + q) + 1e-30   # output rounding is relative to x'
            assert np.all(err <= bound), (preset, dtype, i, kvi, float((err - bound).max()))


@pytest.mark.parametrize("preset", LOSSY)
def test_reference_and_lockstep_decoders_are_bit_identical(preset):
    kv = make_kv(layers=3, batch=2, tokens=270, seed=2, lengths=[270, 40, 270])
    data = cachegen.encode(kv, preset, format_version=1)   # the lock-step decoder reads v1
    a = cachegen.decode(data, decoder="reference")
    b = cachegen.decode(data, decoder="lockstep")
    for (ka, va), (kb, vb) in zip(a, b):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_lossless_is_exact_for_every_dtype_and_special_values():
    kv = make_kv(layers=2, tokens=70, dtype="float32", seed=3)
    kv[0][0][0, 0, :4, 0] = [np.inf, -np.inf, np.nan, -0.0]
    for dt in ("float16", "float32"):
        src = [(k.astype(dt), v.astype(dt)) for k, v in kv]
        out = cachegen.decode(cachegen.encode(src, "lossless"))
        for (k, v), (ko, vo) in zip(src, out):
            assert ko.numpy().tobytes() == k.tobytes() and vo.numpy().tobytes() == v.tobytes()
    bf = make_kv(layers=2, tokens=70, dtype="bfloat16", seed=3)
    out = cachegen.decode(cachegen.encode(bf, "lossless"))
    for (k, v), (ko, vo) in zip(bf, out):
        assert torch.equal(k.view(torch.int16), ko.view(torch.int16))


@pytest.mark.parametrize("fv", VERSIONS)
def test_hybrid_layers_batch_and_distinct_kv_shapes(fv):
    kv = make_kv(layers=4, batch=3, heads=1, dim=32, v_heads=2, v_dim=8, tokens=600,
                 lengths=[600, 512, 600, 10], seed=4)
    data = cachegen.encode(kv, "default", format_version=fv)
    out = cachegen.decode(data)
    for i, ((k, v), (ko, vo)) in enumerate(zip(kv, out)):
        assert tuple(ko.shape) == k.shape and tuple(vo.shape) == v.shape
        for kvi, (x, y) in enumerate(((k, ko), (v, vo))):
            q = error_bound(data, i, kvi) * (1 + 1e-5)
            assert np.all(np.abs(as_f32(y) - as_f32(x)) <= q + 2 ** -10 * (np.abs(as_f32(x)) + q))


@pytest.mark.parametrize("fv", VERSIONS)
def test_prefix_of_a_container_decodes_without_the_rest(fv):
    kv = make_kv(layers=2, tokens=600, seed=5)
    data = cachegen.encode(kv, "default", format_version=fv)
    full = cachegen.decode(data)
    info = cachegen.inspect(data)
    ch = info["chunks"]
    cut = data[:info["header_bytes"] + ch[1]["offset"] + ch[1]["size"] + 7]
    with pytest.raises(cachegen.FormatError):
        cachegen.decode(cut)
    part = cachegen.decode(cut, partial=True)
    for (kf, vf), (kp, vp) in zip(full, part):
        assert kp.shape[2] == 512
        assert torch.equal(kf[:, :, :512], kp) and torch.equal(vf[:, :, :512], vp)


def test_numpy_and_torch_inputs_give_the_same_bytes():
    kv = make_kv(layers=2, tokens=100, seed=6)
    tkv = [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in kv]
    assert cachegen.encode(kv) == cachegen.encode(tkv)


def test_encoding_is_deterministic():
    kv = make_kv(layers=2, tokens=300, seed=7)
    assert cachegen.encode(kv) == cachegen.encode(kv)


def test_decode_into_preallocated_buffers_and_prefix_capacity():
    kv = make_kv(layers=2, tokens=300, seed=8)
    data = cachegen.encode(kv)
    ref = cachegen.decode(data)
    bufs = [(torch.full((1, 2, 512, 16), 7.0, dtype=torch.float16),
             torch.full((1, 2, 512, 16), 7.0, dtype=torch.float16)) for _ in kv]
    assert cachegen.decode_into(data, bufs) == [300, 300]
    for (k, v), (kb, vb) in zip(ref, bufs):
        assert torch.equal(kb[:, :, :300], k) and torch.equal(vb[:, :, :300], v)
        assert torch.all(kb[:, :, 300:] == 7.0)
    with pytest.raises(cachegen.InputError):
        cachegen.decode_into(data, [(torch.zeros(1, 2, 100, 16, dtype=torch.float16),) * 2] * 2)
    with pytest.raises(cachegen.InputError):
        cachegen.decode_into(data, [(torch.zeros(1, 2, 512, 16, dtype=torch.float32),) * 2] * 2)


def test_save_load_and_atomic_overwrite(tmp_path):
    kv = make_kv(layers=2, tokens=100, seed=9)
    p = tmp_path / "kv.cgk"
    n = cachegen.save(p, kv, "small")
    assert p.stat().st_size == n
    out = cachegen.load(p)
    assert torch.equal(out[0][0], cachegen.decode(p.read_bytes())[0][0])
    before = p.read_bytes()
    with pytest.raises(cachegen.InputError):
        cachegen.save(p, [(np.zeros((1, 1, 4, 4), np.int32),) * 2])
    assert p.read_bytes() == before          # a failed save leaves the old file untouched
    assert [q.name for q in tmp_path.iterdir()] == ["kv.cgk"]  # no temp files left behind


@pytest.mark.parametrize("fv", VERSIONS)
def test_inspect_reports_sizes_and_bits(fv):
    kv = make_kv(layers=3, tokens=600, seed=10)
    data = cachegen.encode(kv, "default", format_version=fv)
    info = cachegen.inspect(data, verify=True)
    assert info["format_version"] == fv and info["verified"]
    assert info["mode"] == "lossy" and info["layers"] == 3 and len(info["chunks"]) == 3
    assert info["total_bytes"] == len(data)
    pad = info["breakdown"].get("padding", 0)
    assert sum(l["bytes"] for l in info["per_layer"]) + info["header_bytes"] + pad == len(data)
    assert sum(info["breakdown"].values()) == len(data)
    assert 0 < info["bits_per_element"] < 16
    assert abs(info["ratio_vs_fp16"] - 16 / info["bits_per_element"]) < 1e-9


def test_codec_object_config_round_trip_and_registry():
    codec = cachegen.Codec("small")
    cfg = codec.get_config()
    assert cfg["id"] == "cachegen"
    again = cachegen.get_codec(cfg)
    assert again == codec
    kv = make_kv(layers=2, tokens=50, seed=11)
    assert again.encode(kv) == codec.encode(kv)
    out = codec.decode(codec.encode(kv))
    assert len(out) == 2
    with pytest.raises(cachegen.ConfigError):
        cachegen.get_codec({"id": "nope"})
    with pytest.raises(cachegen.ConfigError):
        cachegen.Codec.from_config({**cfg, "bogus": 1})


def test_bit_schedules():
    from cachegen.config import resolve_bits
    assert resolve_bits("8/6/4", 30) == [8] * 10 + [6] * 10 + [4] * 10
    assert resolve_bits("8/6/4", 4) == [8, 8, 6, 4]
    assert resolve_bits(5, 3) == [5, 5, 5]
    assert resolve_bits((3, 4), 2) == [3, 4]
    for bad in ("8/x", 0, 11, (3,), True):
        with pytest.raises(cachegen.ConfigError):
            resolve_bits(bad, 2)
    cfg = CodecConfig(key_bits=(8, 4), value_bits=6)
    kv = make_kv(layers=2, tokens=40, seed=12)
    info = cachegen.inspect(cachegen.encode(kv, cfg))
    assert [(l["k_bits"], l["v_bits"]) for l in info["per_layer"]] == [(8, 6), (4, 6)]
    with pytest.raises(cachegen.ConfigError):
        cachegen.encode(make_kv(layers=3, tokens=10), cfg)


@pytest.mark.parametrize("bad_kv, match", [
    ([], "at least one layer"),
    ([(np.zeros((1, 2, 3), np.float16), np.zeros((1, 2, 3), np.float16))], "shape"),
    ([(np.zeros((1, 2, 3, 4), np.float16), np.zeros((1, 2, 5, 4), np.float16))], "differ"),
    ([(np.zeros((1, 2, 3, 4), np.float16), np.zeros((1, 2, 3, 4), np.float32))], "dtype"),
    ([(np.zeros((1, 2, 3, 4), np.int8),) * 2], "dtype"),
    ([(np.zeros((1, 2, 0, 4), np.float16),) * 2], "empty"),
    ([(np.zeros((1, 2, 3, 4), np.float16),) * 2, (np.zeros((2, 2, 3, 4), np.float16),) * 2], "batch"),
    ("not a cache", "sequence"),
    ([(1, 2, 3)], "pair"),
])
def test_bad_input_raises_input_error(bad_kv, match):
    with pytest.raises(cachegen.InputError, match=match):
        cachegen.encode(bad_kv)


def test_non_finite_values_need_lossless():
    kv = make_kv(layers=1, tokens=10, dtype="float32")
    kv[0][0][0, 0, 0, 0] = np.nan
    with pytest.raises(cachegen.InputError, match="non-finite"):
        cachegen.encode(kv)
    cachegen.decode(cachegen.encode(kv, "lossless"))


def test_bad_config_raises_config_error():
    for kw in ({"group_size": 0}, {"chunk_tokens": 0}, {"channels_per_stream": 256},
               {"scale_sharing": 2.0}, {"key_bits": "9/x"}, {"tables_per_class": 0},
               {"key_step_gain": 0.5}, {"value_step_gain": 2.5}, {"key_step_gain": float("nan")},
               {"key_step_gain": True}, {"value_step_gain": "1.5"}, {"key_step_gain": ()}):
        with pytest.raises(cachegen.ConfigError):
            CodecConfig(**kw)
    with pytest.raises(cachegen.ConfigError):
        cachegen.encode(make_kv(layers=1, tokens=4), "no-such-preset")


def test_step_gains_widen_the_stored_step():
    """Step gains (fractional widths) are encoder-only: the container stores the widened steps,
    so the plain decoder's error grows with the gain and stays within the stored step."""
    kv = make_kv(layers=2, tokens=300, dtype="float32", seed=11)
    sizes, errs = [], []
    for g in (1.0, 1.5, 2.0):
        cfg = CodecConfig.from_preset("default", key_step_gain=g, value_step_gain=(g, 1.0))
        assert CodecConfig.from_dict(cfg.to_dict()) == cfg
        data = cachegen.encode(kv, cfg)
        out = cachegen.decode(data)
        sizes.append(len(data))
        errs.append(float(np.abs(out[0][0].numpy() - kv[0][0]).mean()))
        # layer 1's values keep gain 1: the same bytes as without gains there
        assert np.array_equal(out[1][1].numpy(), cachegen.decode(cachegen.encode(kv, "default"))[1][1].numpy())
    assert sizes[0] > sizes[1] > sizes[2] and errs[0] < errs[1] < errs[2]
    with pytest.raises(cachegen.ConfigError):
        cachegen.encode(kv, CodecConfig.from_preset("default", key_step_gain=(1.0, 1.0, 1.0)))


def test_constant_and_tiny_inputs():
    for x in (np.zeros((1, 1, 1, 1), np.float16), np.full((2, 3, 257, 5), 3.5, np.float16)):
        for preset in ("default", "cachegen-paper", "lossless"):
            out = cachegen.decode(cachegen.encode([(x, x)], preset))
            assert np.array_equal(out[0][0].numpy(), x)


def test_large_magnitudes_switch_to_fp32_parameters():
    kv = make_kv(layers=1, tokens=64, dtype="float32")
    big = [(kv[0][0] * 1e6, kv[0][1])]
    data = cachegen.encode(big)
    assert open_container(data).header.param_dtype == 2
    out = cachegen.decode(data)
    err = np.abs(out[0][0].numpy().astype(np.float64) - big[0][0])
    q = error_bound(data, 0, 0) * (1 + 1e-5)
    assert np.all(err <= q + 2 ** -22 * (np.abs(big[0][0]) + q))


# ------------------------------------------------------------------ property-based round trips

@st.composite
def caches(draw):
    layers = draw(st.integers(1, 4))
    batch = draw(st.integers(1, 2))
    heads = draw(st.integers(1, 3))
    dim = draw(st.sampled_from([1, 4, 8, 9]))
    base = draw(st.integers(1, 70))
    lengths = [draw(st.integers(1, base)) if draw(st.booleans()) else base for _ in range(layers)]
    dtype = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    seed = draw(st.integers(0, 2 ** 16))
    return make_kv(layers=layers, batch=batch, heads=heads, dim=dim, tokens=base, lengths=lengths,
                   dtype=dtype, seed=seed)


@st.composite
def configs(draw):
    preset = draw(st.sampled_from(sorted(PRESETS)))
    cfg = PRESETS[preset]
    if cfg.lossless:
        return dataclasses.replace(cfg, chunk_tokens=draw(st.integers(1, 40)))
    return dataclasses.replace(
        cfg, chunk_tokens=draw(st.integers(1, 40)), group_size=draw(st.sampled_from([1, 2, 3, 10])),
        channels_per_stream=draw(st.integers(1, 9)), key_bits=draw(st.integers(1, 10)),
        value_bits=draw(st.integers(1, 10)), scale_sharing=draw(st.sampled_from([0.0, 0.5, 1.0])),
        token_scaling=draw(st.booleans()), tables_per_class=draw(st.integers(1, 4)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kv=caches(), cfg=configs(), fv=st.sampled_from(VERSIONS))
def test_property_round_trip(kv, cfg, fv):
    data = cachegen.encode(kv, cfg, format_version=fv)
    out = cachegen.decode(data)
    assert len(out) == len(kv)
    for (k, v), (ko, vo) in zip(kv, out):
        assert tuple(ko.shape) == tuple(k.shape) and tuple(vo.shape) == tuple(v.shape)
        if cfg.lossless:
            assert np.array_equal(as_f32(ko), as_f32(k), equal_nan=True)
    if not cfg.lossless:
        for i in range(len(kv)):
            for kvi in (0, 1):
                x = as_f32(kv[i][kvi])
                err = np.abs(as_f32(out[i][kvi]).astype(np.float64) - x)
                q = error_bound(data, i, kvi) * (1 + 1e-5)
                assert np.all(err <= q + 2 ** -7 * (np.abs(x) + q) + 1e-30)
        if fv == 1:
            lock = cachegen.decode(data, decoder="lockstep")
            for (a, b), (c, d) in zip(out, lock):
                assert torch.equal(a, c) and torch.equal(b, d)


def test_load_maps_the_file_and_rejects_empty_or_garbage(tmp_path):
    kv = make_kv(layers=2, tokens=300, seed=13)
    for preset in ("default", "lossless"):
        p = tmp_path / f"{preset}.cgk"
        cachegen.save(p, kv, preset)
        for (a, b), (c, d) in zip(cachegen.load(p), cachegen.decode(p.read_bytes())):
            assert torch.equal(a, c) and torch.equal(b, d)
    (tmp_path / "empty.cgk").write_bytes(b"")
    with pytest.raises(cachegen.FormatError):
        cachegen.load(tmp_path / "empty.cgk")
    (tmp_path / "junk.cgk").write_bytes(b"CGKV" + bytes(100))
    with pytest.raises(cachegen.FormatError):
        cachegen.load(tmp_path / "junk.cgk")
