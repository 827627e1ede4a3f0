"""The command line: exit codes, error lines, stdin/stdout, --json, --verify, checks before heavy work."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import cachegen
from cachegen import cli
from cachegen.cli import EXIT_DATA, EXIT_ENV, EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, main


def _kv_npz(path, layers=3, tokens=300, dtype="float16", seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for i in range(layers):
        arrays[f"layer{i}.key"] = rng.standard_normal((1, 2, tokens, 16)).astype(dtype)
        arrays[f"layer{i}.value"] = rng.standard_normal((1, 2, tokens, 16)).astype(dtype)
    np.savez(path, **arrays)
    return arrays


def _run(*args, stdin: bytes = b"", env=None):
    """The installed entry point in a child process (what a shell user sees)."""
    return subprocess.run([sys.executable, "-m", "cachegen", *args], input=stdin, capture_output=True,
                          timeout=300, env=env)


@pytest.fixture
def npz(tmp_path):
    p = tmp_path / "kv.npz"
    arrays = _kv_npz(p)
    return p, arrays


def test_encode_decode_round_trip_and_default_names(npz, tmp_path, capsys):
    p, arrays = npz
    assert main(["encode", str(p)]) == EXIT_OK          # default output: kv.cgk next to it
    cgk = tmp_path / "kv.cgk"
    assert cgk.is_file() and "kv.cgk" in capsys.readouterr().out
    assert main(["encode", str(p)]) == EXIT_USAGE       # never overwrites a default-named output
    assert "exists" in capsys.readouterr().err
    out = tmp_path / "back.npz"
    assert main(["decode", str(cgk), "-o", str(out)]) == EXIT_OK
    with np.load(out) as z:
        for name, a in arrays.items():
            err = np.abs(z[name].astype(np.float32) - a.astype(np.float32)).max()
            assert z[name].shape == a.shape and err < 0.2
    assert main(["decode", str(cgk), str(out), "-o", str(out)]) == EXIT_USAGE  # OUT and -o


def test_json_outputs(npz, tmp_path, capsys):
    p, _ = npz
    cgk = tmp_path / "a.cgk"
    assert main(["encode", str(p), str(cgk), "--preset", "small", "--json"]) == EXIT_OK
    enc = json.loads(capsys.readouterr().out)
    assert enc["bytes"] == cgk.stat().st_size and enc["config"]["name"] == "small"
    assert enc["layers"] == 3 and enc["tokens"] == 300 and enc["ratio_vs_fp16"] > 1
    assert main(["decode", str(cgk), str(tmp_path / "a.npz"), "--json"]) == EXIT_OK
    dec = json.loads(capsys.readouterr().out)
    assert dec["tokens_per_layer"] == [300, 300, 300] and dec["dtype"] == "float16"
    assert main(["inspect", str(cgk), "--json", "--verify"]) == EXIT_OK
    ins = json.loads(capsys.readouterr().out)
    assert ins["verify"]["ok"] is True and ins["layers"] == 3 and ins["total_bytes"] == enc["bytes"]


def test_config_starts_from_the_preset(npz, tmp_path, capsys):
    p, _ = npz
    assert main(["encode", str(p), str(tmp_path / "a.cgk"), "--config", '{"key_bits": 8}', "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    default = cachegen.PRESETS["default"]
    assert cfg["key_bits"] == 8 and cfg["value_bits"] == default.value_bits
    assert cfg["token_scaling"] is True and cfg["group_size"] == default.group_size
    assert cachegen.inspect((tmp_path / "a.cgk").read_bytes())["per_layer"][0]["k_bits"] == 8
    (tmp_path / "c.json").write_text('{"value_bits": [4, 4, 3]}')
    assert main(["encode", str(p), str(tmp_path / "b.cgk"), "--preset", "small",
                 "--config", f"@{tmp_path / 'c.json'}", "--json"]) == 0
    cfg = json.loads(capsys.readouterr().out)["config"]
    assert cfg["value_bits"] == [4, 4, 3] and cfg["key_bits"] == cachegen.PRESETS["small"].key_bits


def test_from_preset():
    c = cachegen.CodecConfig.from_preset("default", key_bits=8)
    d = cachegen.PRESETS["default"]
    assert c.key_bits == 8 and c.value_bits == d.value_bits and c.token_scaling == d.token_scaling
    assert c.scale_sharing == d.scale_sharing and c.name == "default+key_bits"
    assert cachegen.CodecConfig.from_preset("small") == cachegen.PRESETS["small"]
    assert cachegen.CodecConfig.from_preset("tiny", value_bits=[3, 2]).value_bits == (3, 2)
    with pytest.raises(cachegen.ConfigError):
        cachegen.CodecConfig.from_preset("medium")
    with pytest.raises(cachegen.ConfigError):
        cachegen.CodecConfig.from_preset("default", keybits=8)
    with pytest.raises(cachegen.ConfigError):
        cachegen.CodecConfig.from_preset("default", key_bits=11)


@pytest.mark.parametrize("args, code, text", [
    (["encode", "{npz}", "{tmp}/x.cgk", "--preset", "medium"], EXIT_USAGE, "unknown preset 'medium'"),
    (["encode", "{npz}", "{tmp}/x.cgk", "--config", "{{key_bits: 8}}"], EXIT_USAGE, "not valid JSON"),
    (["encode", "{npz}", "{tmp}/x.cgk", "--config", '{{"keybits": 8}}'], EXIT_USAGE, "unknown config fields"),
    (["encode", "{npz}", "{tmp}/x.cgk", "--config", "[1]"], EXIT_USAGE, "JSON object"),
    (["encode", "{tmp}/nosuch.npz", "{tmp}/x.cgk"], EXIT_DATA, "no such file"),
    (["encode", "{tmp}/junk.bin", "{tmp}/x.cgk"], EXIT_DATA, "not a readable .npz"),
    (["encode", "{npz}", "{tmp}/nodir/x.cgk"], EXIT_ENV, "cannot write"),
    (["decode", "{tmp}/junk.bin", "{tmp}/y.npz"], EXIT_DATA, "FormatError"),
    (["decode", "{cgk}", "{tmp}/y.npz", "--device", "gpu"], EXIT_USAGE, "not a device"),
    (["decode", "{cgk}", "{tmp}/y.npz", "--decoder", "gpu"], EXIT_USAGE, "needs --device cuda"),
    (["inspect", "{tmp}/nosuch.cgk"], EXIT_DATA, "no such file"),
    (["inspect", "{tmp}/junk.bin"], EXIT_DATA, "FormatError"),
    (["inspect", "{tmp}"], EXIT_DATA, "is a directory"),
])
def test_error_lines_and_exit_codes(npz, tmp_path, capsys, args, code, text):
    p, _ = npz
    (tmp_path / "junk.bin").write_bytes(b"JUNK" + bytes(200))
    cgk = tmp_path / "kv.cgk"
    cachegen.save(cgk, [(np.ones((1, 1, 8, 4), np.float16),) * 2])
    capsys.readouterr()
    argv = [a.format(npz=p, tmp=tmp_path, cgk=cgk) for a in args]
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cachegen {args[0]}: error: ") and text in err, err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_bad_npz_layouts(tmp_path, capsys):
    a = np.zeros((1, 1, 4, 4), np.float16)
    cases = {"missing_value": {"layer0.key": a}, "gap": {"layer0.key": a, "layer0.value": a, "layer2.key": a,
                                                         "layer2.value": a},
             "stray": {"layer0.key": a, "layer0.value": a, "layer0.keys": a}, "empty": {"tokens": np.arange(3)}}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        assert main(["encode", str(tmp_path / f"{name}.npz"), str(tmp_path / "x.cgk")]) == EXIT_DATA, name
        assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "x.cgk").exists()


def test_kv_array_and_extra_arrays(tmp_path, capsys):
    from cachegen.npz import read_kv_npz
    kv = np.random.default_rng(1).standard_normal((2, 2, 1, 2, 40, 8)).astype(np.float32)
    np.savez(tmp_path / "six.npz", kv=kv)
    np.savez(tmp_path / "named.npz", **{f"layer{i}.{p}": kv[i, j] for i in range(2) for j, p in
                                        enumerate(("key", "value"))}, heldout=np.arange(5), tokens=np.arange(40))
    r = read_kv_npz(str(tmp_path / "named.npz"))
    assert list(r.heldout) == list(range(5)) and len(r.tokens) == 40 and len(r.kv) == 2
    for n in ("six", "named"):
        assert main(["encode", str(tmp_path / f"{n}.npz"), str(tmp_path / f"{n}.cgk"), "--preset", "lossless"]) == 0
    assert (tmp_path / "six.cgk").read_bytes() == (tmp_path / "named.cgk").read_bytes()


def test_inspect_verify_detects_damage(npz, tmp_path, capsys):
    p, _ = npz
    cgk = tmp_path / "kv.cgk"
    assert main(["encode", str(p), str(cgk)]) == 0
    data = bytearray(cgk.read_bytes())
    data[-50] ^= 0x10                                    # inside the last chunk's payload
    (tmp_path / "bad.cgk").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "bad.cgk")]) == EXIT_OK       # the header alone is fine
    assert main(["inspect", str(tmp_path / "bad.cgk"), "--verify"]) == EXIT_DATA
    io = capsys.readouterr()
    assert "verify: FAILED" in io.out and "ChecksumError" in io.err
    # a truncated file: inspect describes the complete chunks, --verify refuses it
    info = cachegen.inspect(cgk.read_bytes())
    first = info["chunks"][0]
    cut = cgk.read_bytes()[:info["header_bytes"] + first["offset"] + first["size"]]
    (tmp_path / "cut.cgk").write_bytes(cut)
    assert main(["inspect", str(tmp_path / "cut.cgk"), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["partial"] is True
    assert main(["inspect", str(tmp_path / "cut.cgk"), "--verify", "--json"]) == EXIT_DATA
    assert json.loads(capsys.readouterr().out)["verify"]["ok"] is False
    assert main(["decode", str(tmp_path / "cut.cgk"), str(tmp_path / "p.npz"), "--partial", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == 256


def test_stdin_stdout_pipeline(npz, tmp_path):
    p, arrays = npz
    enc = _run("encode", "-", "-", stdin=p.read_bytes())
    assert enc.returncode == 0, enc.stderr
    assert enc.stdout[:4] == b"CGKV" and b"bytes" in enc.stderr   # the summary moves to stderr
    ins = _run("inspect", "-", "--json", "--verify", stdin=enc.stdout)
    assert ins.returncode == 0 and json.loads(ins.stdout)["verify"]["ok"]
    dec = _run("decode", "-", "-o", "-", stdin=enc.stdout)
    assert dec.returncode == 0, dec.stderr
    (tmp_path / "d.npz").write_bytes(dec.stdout)
    with np.load(tmp_path / "d.npz") as z:
        assert sorted(z.files) == sorted(arrays)


def test_subprocess_exit_codes_and_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.decode().startswith(f"cachegen {cachegen.__version__}")
    r = _run("encode")                                   # argparse usage error
    assert r.returncode == EXIT_USAGE and b"cachegen encode: error:" in r.stderr
    r = _run("inspect", "-", stdin=b"garbage")
    assert r.returncode == EXIT_DATA and r.stderr.decode().startswith("cachegen inspect: error: FormatError")
    r = _run("nosuchcommand")
    assert r.returncode == EXIT_USAGE


def test_internal_error_and_debug(npz, tmp_path, monkeypatch, capsys):
    p, _ = npz
    def boom(*a, **k):
        raise RuntimeError("kaput")
    monkeypatch.setattr(cachegen.api, "encode", boom)
    monkeypatch.setattr(cachegen, "encode", boom, raising=False)
    assert main(["encode", str(p), str(tmp_path / "x.cgk")]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: kaput" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="kaput"):
        main(["encode", str(p), str(tmp_path / "x.cgk"), "--debug"])
    with pytest.raises(RuntimeError, match="kaput"):
        main(["--debug", "encode", str(p), str(tmp_path / "x.cgk")])


def test_progress_only_when_asked(npz, tmp_path, capsys):
    p, _ = npz
    assert main(["encode", str(p), str(tmp_path / "a.cgk")]) == 0      # stderr is not a TTY here
    assert capsys.readouterr().err == ""
    assert main(["encode", str(p), str(tmp_path / "b.cgk"), "--progress"]) == 0
    assert "encode" in capsys.readouterr().err
    assert main(["decode", str(tmp_path / "b.cgk"), str(tmp_path / "b.npz"), "--progress"]) == 0
    assert "decode" in capsys.readouterr().err


def test_missing_extra_is_a_one_line_hint(tmp_path, monkeypatch, capsys):
    from cachegen import _deps
    real = _deps.available
    monkeypatch.setattr(_deps, "available", lambda m: False if m == "onnxruntime_genai" else real(m))
    assert main(["export", "smollm2", "--cache-dir", str(tmp_path)]) == EXIT_ENV
    err = capsys.readouterr().err.strip()
    assert err.startswith("cachegen export: error: onnxruntime_genai is not installed")
    assert "pip install --no-deps onnxruntime-genai" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []                # nothing was built
    with pytest.raises(cachegen.MissingDependencyError, match=r"cachegen\[redis\]") as ei:
        monkeypatch.setattr(_deps.importlib, "import_module", _no_module)
        _deps.require("redis")
    assert isinstance(ei.value, ImportError) and isinstance(ei.value, cachegen.CacheGenError)


def _no_module(name, *a):
    raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def test_demo_checks_before_heavy_work(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("cachegen.demo.run_demo", lambda **kw: calls.append(kw))
    cache = tmp_path / "models"
    cache.mkdir()
    base = ["demo", "--cache-dir", str(cache)]
    assert main(base + ["--preset", "medium"]) == EXIT_USAGE
    assert main(base + ["--text", str(tmp_path / "nosuch.txt")]) == EXIT_DATA
    (tmp_path / "empty.txt").write_text("  \n")
    assert main(base + ["--text", str(tmp_path / "empty.txt")]) == EXIT_DATA
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    assert main(base + ["--text", str(tmp_path / "bin.txt")]) == EXIT_DATA
    import torch
    if not torch.cuda.is_available():
        assert main(base + ["--device", "cuda"]) == EXIT_ENV
        assert "CUDA is not available" in capsys.readouterr().err
    assert main(base + ["--max-new-tokens", "0"]) == EXIT_USAGE
    assert calls == [] and list(cache.iterdir()) == []    # nothing loaded, nothing exported
    # with every check passing, the demo gets the text, the options and a .cgk output path
    monkeypatch.setattr(cli, "_check_model_env", lambda *a: True)
    (tmp_path / "doc.txt").write_text("Once upon a time.")
    assert main(base + ["--text", str(tmp_path / "doc.txt"), "--preset", "small", "--json"]) == EXIT_OK
    kw = calls[-1]
    assert kw["text"] == "Once upon a time." and kw["preset"] == "small" and kw["as_json"]
    assert kw["out_path"].endswith(".cgk") and kw["precision"] == "fp32"


def test_import_does_not_load_torch():
    code = ("import sys, time; t = time.perf_counter(); import cachegen; dt = time.perf_counter() - t; "
            "assert 'torch' not in sys.modules, sorted(sys.modules); "
            "cachegen.CodecConfig.from_preset('small'); assert 'torch' not in sys.modules; "
            "cachegen.encode; assert 'torch' in sys.modules; print(dt)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # the command line starts without torch too (--help, --version, usage errors)
    code = ("import sys, contextlib, io; from cachegen.cli import main; "
            "out = io.StringIO(); ctx = contextlib.redirect_stdout(out); ctx.__enter__(); "
            "codes = [main(['--version']), main(['--help']), main(['encode'])]; ctx.__exit__(None, None, None); "
            "assert codes == [0, 0, 2], codes; assert 'torch' not in sys.modules; print(out.getvalue()[:60])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "writes container format v2" in r.stdout, r.stderr
    with pytest.raises(AttributeError):
        cachegen.no_such_name  # noqa: B018
    assert {"encode", "decode", "Codec", "DecodeLimits"} <= set(dir(cachegen))


def test_help_strings():
    ap = cli.build_parser()
    subs = next(a for a in ap._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    ours = {"demo", "export", "encode", "decode", "inspect", "rd"}
    assert ours <= set(subs.choices)
    for name in sorted(ours):
        p = subs.choices[name]
        for act in p._actions:
            assert act.help, (name, act.dest)          # every option and argument is explained
        assert ".cgkv" not in p.format_help()
    r = subprocess.run([sys.executable, "-m", "cachegen", "demo", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout and "tokens to generate" in r.stdout


def test_demo_progress_bar_from_its_steps(tmp_path, monkeypatch, capsys):
    import tqdm  # noqa: F401  (the test extra installs it)

    def fake_demo(**kw):
        for step in ("[cachegen export] using cached model", "[demo] smollm2: context 10 tokens",
                     "[demo] encoding the KV cache"):
            print(step, file=sys.stderr, flush=True)
        print("a warning from somewhere", file=sys.stderr)
    monkeypatch.setattr("cachegen.demo.run_demo", fake_demo)
    monkeypatch.setattr(cli, "_check_model_env", lambda *a: True)
    assert main(["demo", "--progress"]) == EXIT_OK
    err = capsys.readouterr().err
    assert "demo: 3 steps" in err and "encoding the KV cache" in err     # one bar, last step shown
    assert "a warning from somewhere" in err and "[demo] smollm2" not in err
    assert sys.stderr is not None and not isinstance(sys.stderr, cli.StageBar)
    assert main(["demo"]) == EXIT_OK                                        # no TTY: the plain lines
    assert "[demo] encoding the KV cache" in capsys.readouterr().err
