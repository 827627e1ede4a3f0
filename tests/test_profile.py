"""Model profiles (issue 13): transforms, file format, EXT_TRANSFORM records, decode errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cachegen
from cachegen.errors import CacheGenError, ConfigError, FormatError, InputError, UnsupportedVersionError
from cachegen.format.extensions import EXT_COMPACT_DIR, EXT_PACKED, EXT_TRANSFORM, Extension
from cachegen.profile import Profile, ProfilePreset, decode, encode, ops, postprocess
from cachegen.profile import codec as pcodec
from cachegen.profile import transform as tf

from helpers import as_f32, make_kv

L, H, D = 3, 2, 16


def _profile(seed: int = 0, sinks: int = 1, thetas=(1e4, 1e6, 1e4)) -> Profile:
    """A profile fitted (PCA, keys without RoPE) on a synthetic calibration cache."""
    calib = make_kv(layers=L, heads=H, dim=D, tokens=400, dtype="float32", seed=seed + 100)
    kb, vb = tf.fit_bases(calib, thetas, key_rope=True, center=False)
    return Profile(model="synthetic", n_layers=L, kv_heads=H, head_dim=D, rope_theta=tuple(thetas),
                   key_basis=np.stack([b.basis for b in kb]), value_basis=np.stack([b.basis for b in vb]),
                   sinks=sinks, presets={"default-p": ProfilePreset((7,) * L, (6,) * L)})


def test_fit_basis_orthonormal_and_ordered():
    x = np.random.default_rng(0).normal(size=(500, 8)) * np.arange(1, 9)
    b = tf.fit_basis(x, center=False)
    np.testing.assert_allclose(b.basis.T @ b.basis, np.eye(8), atol=1e-5)
    assert np.all(np.diff(b.variance) <= 1e-6)


@pytest.mark.parametrize("start", [0, 37, 5000])
def test_rope_inverse_and_transform_round_trip(start):
    x = make_kv(layers=1, heads=H, dim=D, tokens=50, dtype="float32")[0][0]
    y = ops.rope(ops.rope(x, start, 1e4, inverse=True), start, 1e4)
    np.testing.assert_allclose(y, x, atol=2e-5 * np.abs(x).max())
    p = _profile()
    b = pcodec._basis(p, 0, 1)
    z = tf.inverse_tensor(tf.forward_tensor(x, start, 1e6, b), start, 1e6, b)
    np.testing.assert_allclose(z, x, atol=1e-4 * np.abs(x).max())
    # torch gives the same numbers as numpy
    zt = tf.forward_tensor(torch.from_numpy(x), start, 1e6, b)
    np.testing.assert_allclose(zt.numpy(), tf.forward_tensor(x, start, 1e6, b), atol=1e-4 * np.abs(x).max())


def test_rope_matches_rotate_half_definition():
    """Positions rotate pairs (i, i + D/2) by pos * theta**(-2i/D) (the HF/llama convention)."""
    x = np.zeros((1, 1, 3, 4), dtype=np.float32)
    x[..., 0] = 1.0
    y = ops.rope(x, 0, 100.0)
    np.testing.assert_allclose(y[0, 0, :, 0], np.cos([0.0, 1.0, 2.0]), atol=1e-6)
    np.testing.assert_allclose(y[0, 0, :, 2], np.sin([0.0, 1.0, 2.0]), atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_encode_decode_round_trip(dtype):
    p = _profile()
    kv = make_kv(layers=L, heads=H, dim=D, tokens=300, dtype=dtype, seed=3)
    data = encode(kv, p, "default-p")
    c = cachegen.inspect(data)
    # packed where it pays; the presets' compact directory always fits caches this small
    assert [e["kind"] for e in c["extensions"]] in ([EXT_TRANSFORM, EXT_COMPACT_DIR],
                                                    [EXT_TRANSFORM, EXT_PACKED, EXT_COMPACT_DIR])
    out = decode(data, profiles=p)
    for (k, v), (k2, v2) in zip(kv, out):
        assert k2.dtype == (k.dtype if isinstance(k, torch.Tensor) else torch.from_numpy(k).dtype)
        for a, b in ((k, k2), (v, v2)):
            a, b = as_f32(a), as_f32(b)
            rng = a.max() - a.min()
            assert np.abs(a - b).max() < 0.05 * rng          # lossy, but close
            # the attention sink (token 0) is stored exactly (fp16)
            np.testing.assert_array_equal(b[:, :, :1], a[:, :, :1].astype(np.float16).astype(np.float32))


def test_profile_domain_beats_raw_on_correlated_channels():
    """Channels mixed by a fixed rotation: the fitted basis undoes it and codes far smaller."""
    rng = np.random.default_rng(5)
    C = H * D
    q, _ = np.linalg.qr(rng.normal(size=(C, C)))
    def cache(seed):
        r = np.random.default_rng(seed)
        out = []
        for _ in range(L):
            pair = []
            for _ in range(2):
                z = r.normal(size=(1, 600, C)) * np.exp(-np.arange(C) / 4.0)   # few strong directions
                x = (z @ q.T).reshape(1, 600, H, D).transpose(0, 2, 1, 3)
                pair.append(np.ascontiguousarray(x, dtype=np.float32))
            out.append(tuple(pair))
        return out
    calib = cache(1)
    kb, vb = tf.fit_bases(calib, (0.0,) * L, key_rope=False, center=False)
    p = Profile(model="synthetic", n_layers=L, kv_heads=H, head_dim=D, rope_theta=(0.0,) * L,
                key_basis=np.stack([b.basis for b in kb]), value_basis=np.stack([b.basis for b in vb]), sinks=0)
    kv = cache(2)

    def err(out):
        return np.mean([np.mean((as_f32(a) - b) ** 2) for (a, _), (b, _) in zip(out, kv)])

    def cfg(b):
        return cachegen.CodecConfig(key_bits=b, value_bits=b, group_size=1, token_scaling=True, scale_sharing=1.0)

    for b in (5, 7):
        raw = cachegen.encode(kv, cfg(b))
        prof = encode(kv, p, cfg(b + 1))    # one bit more: the top coefficient's range sets the step
        assert len(prof) < 0.75 * len(raw)
        assert err(decode(prof, profiles=p)) < err(cachegen.decode(raw))


def test_trimmed_layers_use_their_positions_and_no_sinks():
    p = _profile()
    kv = make_kv(layers=L, heads=H, dim=D, tokens=300, dtype="float32", lengths=[300, 120, 300], seed=4)
    data = encode(kv, p, "default-p")
    ext = [e for e in cachegen.dispatch.open_container(data).header.extensions if e.kind == EXT_TRANSFORM][0]
    rec = pcodec.TransformRecord(ext.payload)
    assert rec.starts == [0, 180, 0] and rec.sinks == [1, 0, 1]
    out = decode(data, profiles=p)
    assert tuple(out[1][0].shape) == (1, H, 120, D)
    assert np.abs(out[1][0].numpy() - kv[1][0]).max() < 0.05 * np.ptp(kv[1][0])


def test_missing_or_wrong_profile_raises():
    p, other = _profile(0), _profile(1)
    assert p.hash != other.hash
    data = encode(make_kv(layers=L, heads=H, dim=D, tokens=64, seed=1), p, "default-p")
    with pytest.raises(ConfigError, match="profile"):
        decode(data)
    with pytest.raises(ConfigError):
        decode(data, profiles=other)
    with pytest.raises(ConfigError):
        pcodec.apply_inverse(cachegen.decode(data), cachegen.dispatch.open_container(data).header.extensions, other)
    assert len(decode(data, profiles=[other, p])) == L


def test_postprocess_is_noop_without_record_and_checks_payloads():
    kv = cachegen.decode(cachegen.encode(make_kv(layers=L, heads=H, dim=D, tokens=32), "default"))
    assert postprocess(kv, []) is kv
    p = _profile()
    good = pcodec.pack_payload(p, 1, 1, [0] * L, [None] * L)
    for bad in (b"", b"XXXX" + good[4:], good[:-3], good + b"\0\0\0\0"):
        with pytest.raises(FormatError):
            postprocess(kv, [Extension(EXT_TRANSFORM, bad)], p)
    with pytest.raises(FormatError):     # 5 layers declared, 3 decoded
        postprocess(kv, [Extension(EXT_TRANSFORM, pcodec.pack_payload(p, 1, 1, [0] * 5, [None] * 5))], p)


def test_bad_inputs_raise_our_errors():
    p = _profile()
    with pytest.raises(InputError):
        encode(make_kv(layers=2, heads=H, dim=D, tokens=16), p)
    with pytest.raises(InputError):
        encode(make_kv(layers=L, heads=H, dim=8, tokens=16), p)
    with pytest.raises(ConfigError):
        encode(make_kv(layers=L, heads=H, dim=D, tokens=16), p, "no-such-preset")
    with pytest.raises(ConfigError):
        encode(make_kv(layers=L, heads=H, dim=D, tokens=16), p, "lossless")
    with pytest.raises(InputError):
        encode(make_kv(layers=L, heads=H, dim=D, tokens=16), p, starts=[-1, 0, 0])


def test_profile_file_round_trip_and_integrity(tmp_path):
    p = _profile()
    path = p.save(tmp_path / "p.npz")
    q = Profile.load(path)
    assert q.hash == p.hash and q.presets == p.presets
    np.testing.assert_array_equal(q.key_basis, p.key_basis)
    raw = bytearray(path.read_bytes())
    # flip one byte inside the stored basis: the content hash no longer matches
    i = raw.find(p.key_basis[1].tobytes()[:64])
    assert i > 0
    raw[i + 10] ^= 0x40
    with pytest.raises(FormatError):          # the zip member's CRC catches it
        Profile.from_bytes(bytes(raw))
    import io, json, zipfile
    z = np.load(io.BytesIO(p.to_bytes()))
    kb = z["key_basis"].copy()
    kb[1, 2, 3] += 1e-3                       # a consistent file with other content: hash mismatch
    buf = io.BytesIO()
    np.savez(buf, meta=z["meta"], key_basis=kb, value_basis=z["value_basis"])
    with pytest.raises(FormatError, match="hash"):
        Profile.from_bytes(buf.getvalue())
    for junk in (b"", b"not a zip", bytes(raw[:100])):
        with pytest.raises(CacheGenError):
            Profile.from_bytes(junk)
    meta = json.loads(z["meta"].tobytes())
    meta["version"] = 99
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), key_basis=z["key_basis"],
             value_basis=z["value_basis"])
    with pytest.raises(UnsupportedVersionError):
        Profile.from_bytes(buf.getvalue())
    with pytest.raises(ConfigError):
        Profile.load(tmp_path / "missing.npz")
    assert zipfile.is_zipfile(path)


def test_registry_lookup(tmp_path, monkeypatch):
    p = _profile(7)
    data = encode(make_kv(layers=L, heads=H, dim=D, tokens=40, seed=2), p, "default-p")
    monkeypatch.setenv("CACHEGEN_PROFILE_DIR", str(tmp_path))
    with pytest.raises(ConfigError):
        decode(data)
    p.save(tmp_path / "x.npz")
    assert len(decode(data)) == L      # found by hash in $CACHEGEN_PROFILE_DIR


@pytest.mark.gpu
def test_inverse_on_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    p = _profile()
    kv = make_kv(layers=L, heads=H, dim=D, tokens=200, dtype="float16", seed=9, lengths=[200, 90, 200])
    data = encode(kv, p, "default-p")
    cpu = decode(data, profiles=p)
    gpu = decode(data, profiles=p, device="cuda")
    for (a, b), (c, d) in zip(cpu, gpu):
        assert c.device.type == "cuda" and c.dtype == torch.float16
        for x, y in ((a, c), (b, d)):
            assert (x.float() - y.float().cpu()).abs().max().item() <= 2e-3 * x.float().abs().max().item()


def test_transform_record_layout():
    """The EXT_TRANSFORM payload layout of codec_spec/FORMAT_V2.md section 6.1, byte for byte."""
    import struct
    p = _profile()
    sk = (np.full((1, H, 1, D), 1.5, dtype=np.float16), np.full((1, H, 1, D), -2.0, dtype=np.float16))
    b = pcodec.pack_payload(p, 1, 1, [0, 7, 0], [sk, None, sk])
    assert b[:4] == b"CGTF" and b[4] == 1 and b[5] == 1
    assert struct.unpack_from("<HH", b, 6) == (L, 1) and b[10:26] == p.hash
    assert [struct.unpack_from("<qH", b, 26 + 10 * i) for i in range(L)] == [(0, 1), (7, 0), (0, 1)]
    assert len(b) == 26 + 10 * L + 2 * (2 * H * D * 2)
    assert b[56:58] == np.float16(1.5).tobytes()
    rec = pcodec.TransformRecord(b)
    s = rec.sink_arrays(p)
    assert s[1] is None and float(s[2][1][0, 1, 0, 3]) == -2.0


def test_bases_are_fitted_outside_the_tuning_windows():
    from cachegen.profile.fit import WINDOW_LEN, WINDOW_STARTS, basis_ids
    ids = list(range(4200))
    rest = basis_ids(ids)
    inside = {t for s in WINDOW_STARTS for t in range(s, s + WINDOW_LEN)}
    assert rest and not inside & set(rest)
    assert len(rest) == 4200 - len(WINDOW_STARTS) * WINDOW_LEN
    assert basis_ids(list(range(1500))) == list(range(1500))   # too short to leave enough: all of it


def test_load_for_model_falls_back_to_the_shipped_profile(tmp_path):
    import json
    from cachegen.errors import ConfigError
    from cachegen.profile import load_for_model, shipped_profile
    from cachegen.ort.export import META_FILE
    (tmp_path / META_FILE).write_text(json.dumps({"model": "smollm2", "precision": "fp32"}))
    p = load_for_model(tmp_path)
    assert p.model == "smollm2" and p.hash == shipped_profile("smollm2").hash
    (tmp_path / META_FILE).write_text(json.dumps({"model": "nosuch"}))
    with pytest.raises(ConfigError):
        load_for_model(tmp_path)


def test_fractional_widths_through_step_gains():
    """A profile preset with per-layer step gains (half-bit widths of the allocation): stored in
    the profile file, applied by the encoder, read back by every decoder from the container."""
    from cachegen.config import width_to_bits
    from cachegen.profile.fit import width_config, widths
    assert widths(0.5)[:3] == (2.0, 2.5, 3.0) and widths(1.0) == tuple(float(b) for b in range(2, 10))
    assert width_to_bits(5.0) == (5, 1.0)
    b, g = width_to_bits(4.5)
    assert b == 5 and abs(g - 31 / (2 ** 4.5 - 1)) < 1e-12
    cfg, kb, vb, kg, vg = width_config("x", [4.5, 5.0, 6.0], [3.0, 3.0, 3.0])
    assert kb == (5, 5, 6) and vb == (3, 3, 3) and vg is None and kg[1:] == (1.0, 1.0)
    kv = make_kv(layers=L, heads=H, dim=D, tokens=300, dtype="float16", seed=4)
    base = _profile()
    errs, sizes = [], []
    for gain in (None, (1.5,) * L):
        p = base.with_presets({"default-p": ProfilePreset((6,) * L, (5,) * L, key_gain=gain, value_gain=gain)})
        q = Profile.from_bytes(p.to_bytes())
        assert q.presets == p.presets and q.hash == p.hash
        data = encode(kv, q, "default-p")
        out = decode(data, profiles=q)
        sizes.append(len(data))
        errs.append(max(float(np.abs(as_f32(o) - as_f32(x)).mean()) for pair, opair in zip(kv, out)
                        for x, o in zip(pair, opair)))
    assert sizes[1] < sizes[0] and errs[1] > errs[0]
    # a profile without gains keeps the hash it had before gains existed (no new meta keys)
    assert "key_gain" not in base.presets["default-p"].to_dict()
    with pytest.raises(ConfigError):
        base.with_presets({"x": ProfilePreset((6,) * L, (5,) * L, key_gain=(3.0,) * L)})
    with pytest.raises(ConfigError):
        base.with_presets({"x": ProfilePreset((6,) * L, (5,) * L, key_gain=(1.5,))})


def test_retuned_profile_decodes_containers_of_its_predecessor(tmp_path, monkeypatch):
    """A re-tune changes the presets (so the content hash) but not the transform: the new profile
    lists the old hash as an alias, and containers written with the old one still decode."""
    old = _profile(3)
    kv = make_kv(layers=L, heads=H, dim=D, tokens=60, seed=5)
    data = encode(kv, old, "default-p")
    want = decode(data, profiles=old)
    new = old.with_presets({"default-p": ProfilePreset((5,) * L, (4,) * L)}, aliases=[old.hash_hex])
    assert new.hash != old.hash and new.matches(old.hash) and new.same_transform(old)
    got = decode(data, profiles=new)
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    # found by alias through the search paths too, once the old file is gone
    monkeypatch.setenv("CACHEGEN_PROFILE_DIR", str(tmp_path))
    new.save(tmp_path / "new.npz")
    assert len(decode(data)) == L
    # an alias never overrides an exact match, and a malformed alias is ignored
    odd = old.with_presets(old.presets, aliases=["zz", "00"])
    assert odd.aliases == ()
    other = _profile(4)
    assert not other.matches(old.hash)
    from cachegen.profile.profile import find_profile
    assert find_profile(old.hash, [new, old]) is old
    assert find_profile(old.hash, [new]) is new


def test_preset_codec_fields_are_stored_and_applied():
    """A preset may carry codec fields over the profile codec's defaults (the fit's 1,024-token
    chunks with one channel per stream): kept in the file, applied by preset_config, checked."""
    base = _profile()
    p = base.with_presets({"default-p": ProfilePreset((6,) * L, (5,) * L,
                                                      codec={"chunk_tokens": 128, "channels_per_stream": 1})})
    q = Profile.from_bytes(p.to_bytes())
    assert q.presets == p.presets and q.hash == p.hash != base.hash
    cfg = pcodec.preset_config(q, "default-p")
    assert cfg.chunk_tokens == 128 and cfg.channels_per_stream == 1 and cfg.token_scaling
    kv = make_kv(layers=L, heads=H, dim=D, tokens=300, dtype="float16", seed=8)
    data = encode(kv, q, "default-p")
    info = cachegen.inspect(data)
    assert info["chunk_tokens"] == 128 and info["channels_per_stream"] == 1 and len(info["chunks"]) == 3
    assert len(decode(data, profiles=q)) == L
    for bad in ({"group_size": 2}, {"chunk_tokens": 0}, {"channels_per_stream": 999}):
        with pytest.raises(ConfigError):
            base.with_presets({"x": ProfilePreset((6,) * L, (5,) * L, codec=bad)})


@pytest.mark.parametrize("given", [[], ["--margin", "0.5", "--trim"]])
def test_retune_cli_reuses_the_stored_tuning(tmp_path, monkeypatch, given):
    """`cachegen profile M --retune` re-tunes with the margin and trim the stored profile was
    tuned with (recorded in its info), unless given on the command line; the result aliases the
    old hash and records what it used."""
    import cachegen.ort as cort
    from cachegen.profile import cli as pcli
    from cachegen.profile import fit

    old = _profile(2).with_presets(_profile(2).presets, margin=0.7, trim=False)
    out = tmp_path / "p.npz"
    old.save(out)
    seen = {}

    def fake_tune(profile, runner, text, *, margin, width_step, trim, targets=None, log=None, **kw):
        seen.update(margin=margin, trim=trim, width_step=width_step, targets=targets)
        return profile.with_presets({"default-p": ProfilePreset((5,) * L, (4,) * L)}, margin=margin, trim=trim)

    monkeypatch.setattr(cort, "export_model", lambda *a, **k: tmp_path)
    monkeypatch.setattr(cort, "OrtRunner", lambda *a, **k: object())
    monkeypatch.setattr(fit, "tune_presets", fake_tune)
    assert pcli.main(["smollm2", "--retune", "--only", "default-p", "--out", str(out), *given]) == 0
    want = (0.7, False) if not given else (0.5, True)
    assert (seen["margin"], seen["trim"]) == want and seen["targets"] == {"default-p": None}
    new = Profile.load(out)
    assert new.matches(old.hash) and new.hash != old.hash
    assert (new.info["margin"], new.info["trim"]) == want


def test_retune_cli_target(tmp_path, monkeypatch, capsys):
    """`--target PRESET=KL` sets that preset's calibration target (and re-tunes only the presets
    named); a malformed one, or one without --retune, is refused before any model is exported."""
    import cachegen.ort as cort
    from cachegen.profile import cli as pcli
    from cachegen.profile import fit

    out = tmp_path / "p.npz"
    _profile(2).save(out)
    seen = {}

    def fake_tune(profile, runner, text, *, targets=None, **kw):
        seen["targets"] = targets
        return profile.with_presets(dict(profile.presets))

    exported = []
    monkeypatch.setattr(cort, "export_model", lambda *a, **k: exported.append(1) or tmp_path)
    monkeypatch.setattr(cort, "OrtRunner", lambda *a, **k: object())
    monkeypatch.setattr(fit, "tune_presets", fake_tune)
    assert pcli.main(["smollm2", "--retune", "--target", "tiny-p=0.023", "--only", "small-p", "--out", str(out)]) == 0
    assert seen["targets"] == {"small-p": fit.PRESET_TARGETS["small-p"], "tiny-p": 0.023}
    exported.clear()
    for bad in (["--retune", "--target", "tiny-p=x"], ["--retune", "--target", "tiny-p=-1"],
                ["--retune", "--target", "default-p=0.01"], ["--retune", "--target", "huge-p=0.1"],
                ["--target", "tiny-p=0.02"]):
        assert pcli.main(["smollm2", *bad, "--out", str(out)]) == 2
        assert "--target" in capsys.readouterr().err
    assert not exported
