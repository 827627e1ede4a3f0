"""The numcodecs codec (entry point cachegen_kv) and its use from zarr (v2 and v3 formats)."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

import numcodecs  # noqa: E402  (the test extra installs it)

import cachegen  # noqa: E402
from cachegen.integrations.numcodecs import KVArrayCodec  # noqa: E402

RNG = np.random.default_rng(0)
KV6 = RNG.standard_normal((3, 2, 1, 2, 300, 16)).astype(np.float16)
T4 = RNG.standard_normal((2, 4, 100, 8)).astype(np.float32)


def test_entry_point_finds_the_codec_without_importing_cachegen():
    code = ("import sys, numcodecs; c = numcodecs.get_codec({'id': 'cachegen_kv', 'preset': 'small'}); "
            "print(type(c).__module__, c.get_config()['preset'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["cachegen.integrations.numcodecs", "small"]


def test_round_trips():
    c = numcodecs.get_codec({"id": "cachegen_kv", "preset": "default"})
    assert isinstance(c, KVArrayCodec) and numcodecs.get_codec(c.get_config()) == c
    data = c.encode(KV6)
    assert len(data) < KV6.nbytes / 2
    back = c.decode(data)
    assert back.shape == KV6.shape and back.dtype == KV6.dtype
    assert np.abs(back.astype(np.float32) - KV6).max() < 0.3
    exact = KVArrayCodec("lossless")
    assert np.array_equal(exact.decode(exact.encode(KV6)), KV6)
    for role in ("key", "value"):
        c4 = KVArrayCodec("lossless", role=role)
        assert np.array_equal(c4.decode(c4.encode(T4)), T4)
    out = np.empty_like(T4)
    c4 = KVArrayCodec("high")
    c4.decode(c4.encode(T4), out=out)
    assert np.abs(out - T4).max() < 0.1
    # a 4-D tensor is coded with the key widths (role="value": the value widths)
    ck = KVArrayCodec(config={"key_bits": 8, "value_bits": 3})
    cv = KVArrayCodec(config={"key_bits": 8, "value_bits": 3}, role="value")
    assert cachegen.inspect(ck.encode(T4))["per_layer"][0]["k_bits"] == 8
    assert len(cv.encode(T4)) < len(ck.encode(T4))
    ek = np.abs(ck.decode(ck.encode(T4)) - T4).max()
    ev = np.abs(cv.decode(cv.encode(T4)) - T4).max()
    assert ek < ev


def test_bad_inputs():
    c = KVArrayCodec()
    for bad in (np.zeros((2, 3)), np.zeros((1, 3, 2, 4, 4, 4), np.float16), np.zeros((1, 1, 4, 4), np.int32),
                np.zeros((0, 1, 4, 4), np.float16)):
        with pytest.raises(cachegen.InputError):
            c.encode(bad)
    with pytest.raises(cachegen.FormatError):          # a container that is not a cachegen_kv chunk
        c.decode(cachegen.encode([(T4, T4)]))
    with pytest.raises(cachegen.FormatError):
        c.decode(b"junk" * 20)
    with pytest.raises(cachegen.ConfigError):
        KVArrayCodec(config={"keybits": 3})
    with pytest.raises(cachegen.InputError):
        KVArrayCodec(role="both")


def _zarr():
    import zarr
    warnings.filterwarnings("ignore", message=".*Numcodecs codecs are not in the Zarr version 3.*")
    return zarr


def test_zarr_v2_compressor(tmp_path):
    zarr = _zarr()
    z = zarr.create_array(str(tmp_path / "a.zarr"), shape=KV6.shape, chunks=(1, 2, 1, 2, 128, 16),
                          dtype="float16", zarr_format=2, compressors=KVArrayCodec("default"))
    z[:] = KV6
    back = zarr.open_array(str(tmp_path / "a.zarr"))[:]
    assert back.shape == KV6.shape and np.abs(back.astype(np.float32) - KV6).max() < 0.3
    part = zarr.open_array(str(tmp_path / "a.zarr"))[1, :, :, :, 100:260]      # across chunk borders
    assert np.array_equal(part, back[1, :, :, :, 100:260])


def test_zarr_v3_serializer_reopens_in_a_fresh_process(tmp_path):
    zarr = _zarr()
    from cachegen.integrations.zarr3 import CacheGenKV
    path = str(tmp_path / "b.zarr")
    z = zarr.create_array(path, shape=KV6.shape, chunks=(1, 2, 1, 2, 256, 16), dtype="float16",
                          serializer=CacheGenKV(preset="lossless"), compressors=None)
    z[:] = KV6
    np.save(tmp_path / "ref.npy", KV6)
    code = (f"import sys, warnings, numpy as np, zarr; warnings.simplefilter('ignore'); "
            f"a = zarr.open_array({path!r})[:]; "
            f"assert np.array_equal(a, np.load({str(tmp_path / 'ref.npy')!r})); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
