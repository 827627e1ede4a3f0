"""Files cachegen writes get the mode open() would give them (0o666 less the umask), not
mkstemp's 0o600, so another user or service sharing a store can read them; DirectoryBackend
takes an explicit mode= for stores shared by a group."""
from __future__ import annotations

import os
import stat
from contextlib import contextmanager

import numpy as np
import pytest

import cachegen
from cachegen.errors import ConfigError
from cachegen.fileio import current_umask, file_mode, write_atomic
from cachegen.store.backends import DirectoryBackend


@contextmanager
def umask(m: int):
    old = os.umask(m)
    try:
        yield
    finally:
        os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _kv():
    rng = np.random.default_rng(0)
    return [(rng.standard_normal((1, 2, 40, 8)).astype(np.float32),
             rng.standard_normal((1, 2, 40, 8)).astype(np.float32)) for _ in range(2)]


@pytest.mark.parametrize("mask,want", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o000, 0o666)])
def test_write_atomic_honours_umask(tmp_path, mask, want):
    with umask(mask):
        assert current_umask() == mask
        write_atomic(tmp_path / "f", b"data")
        # open() as the reference behaviour
        with open(tmp_path / "g", "wb") as f:
            f.write(b"x")
    assert _mode(tmp_path / "f") == want == _mode(tmp_path / "g")
    assert (tmp_path / "f").read_bytes() == b"data"


def test_write_atomic_explicit_mode_and_rewrite(tmp_path):
    with umask(0o077):
        write_atomic(tmp_path / "f", b"one", mode=0o640)
        assert _mode(tmp_path / "f") == 0o640
        write_atomic(tmp_path / "f", b"two")        # a rewrite gets the current default again
    assert _mode(tmp_path / "f") == 0o600 and (tmp_path / "f").read_bytes() == b"two"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("bad", [-1, 0o10000, "644", 1.5, True])
def test_bad_mode_is_a_config_error(tmp_path, bad):
    with pytest.raises(ConfigError):
        file_mode(bad)
    with pytest.raises(ConfigError):
        write_atomic(tmp_path / "f", b"x", mode=bad)
    assert not list(tmp_path.iterdir())
    with pytest.raises(ConfigError):
        DirectoryBackend(tmp_path / "store", mode=bad)


def test_save_honours_umask(tmp_path):
    with umask(0o002):
        cachegen.save(tmp_path / "a.cgk", _kv(), "default")
    with umask(0o022):
        cachegen.save(tmp_path / "b.cgk", _kv(), "lossless")
    assert _mode(tmp_path / "a.cgk") == 0o664
    assert _mode(tmp_path / "b.cgk") == 0o644
    assert len(cachegen.load(tmp_path / "b.cgk")) == 2


def test_directory_backend_default_and_explicit_mode(tmp_path):
    with umask(0o022):
        b = DirectoryBackend(tmp_path / "s1")
        assert b.put("ab0001", b"hello")
        d = DirectoryBackend(tmp_path / "s2", mode=0o660)
        assert d.put("cd0002", b"world")
    assert _mode(b.path("ab0001")) == 0o644
    assert _mode(d.path("cd0002")) == 0o660
    assert _mode(d.path("cd0002").parent) == 0o770          # group can list and add entries
    assert d.get("cd0002") == b"world"
    # another process (same user here) reading the group-shared store through its own backend
    assert DirectoryBackend(tmp_path / "s2").get("cd0002") == b"world"


def test_cli_encode_output_honours_umask(tmp_path):
    from cachegen.cli import main

    kv = _kv()
    npz = tmp_path / "kv.npz"
    np.savez(npz, **{f"layer{i}.key": k for i, (k, _) in enumerate(kv)},
             **{f"layer{i}.value": v for i, (_, v) in enumerate(kv)})
    with umask(0o002):
        rc = main(["encode", str(npz), str(tmp_path / "out.cgk"), "--preset", "small"])
    assert rc == 0
    assert _mode(tmp_path / "out.cgk") == 0o664
