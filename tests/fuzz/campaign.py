"""Fuzzing campaign over both container formats: every input must decode or raise CacheGenError,
fast and in bounded memory, and never decode silently to something else.

    python -m tests.fuzz.campaign --n 100000 --workers 2          # ~10 min on 2 cores
    python -m tests.fuzz.campaign --n 5000 --json out.json --save-bugs /tmp/fuzz_bugs

Seeds: small caches encoded with ``cachegen.encode`` (format v2, the default) and with
``format_version=1``, plus the v1 golden vectors of codec_spec/vectors. Mutants come from
tests/fuzz/fields.py (field-targeted edits with checksums recomputed or left stale, splices,
reorders, raw byte edits). Each input goes to decode (reference or lock-step decoder, complete or
partial, verified) or inspect. Outcome classes:

* ``decoded:same`` / ``decoded:other``: decoded; ``other`` only counts when checksums were
  recomputed (a forged but valid container), else it is ``SILENT`` (a bug);
* ``rejected:<Error>``: a CacheGenError subclass;
* ``BUG:<Exception>``: anything else; ``TIMEOUT``: over --timeout seconds (a bug as well).
Worst time and worst memory (growth of the worker's peak RSS over its warmed-up baseline, with the
input that caused it) are reported; with --save-bugs the bad inputs are written out.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import resource
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def _kv(rng, layers, batch, heads, tokens, dim, dtype="float16", lengths=None, v_dim=None):
    out = []
    for i in range(layers):
        t = lengths[i] if lengths else tokens
        base = rng.standard_normal((batch, heads, 1, dim)) * 2
        k = (base + 0.3 * np.cumsum(rng.standard_normal((batch, heads, t, dim)), axis=2) / np.sqrt(t)).astype(np.float32)
        vd = v_dim or dim
        v = rng.standard_normal((batch, heads, t, vd)).astype(np.float32)
        if dtype == "bfloat16":
            import torch
            out.append((torch.from_numpy(k).to(torch.bfloat16), torch.from_numpy(v).to(torch.bfloat16)))
        else:
            out.append((k.astype(dtype), v.astype(dtype)))
    return out


def make_seeds() -> list[tuple[str, bytes]]:
    import cachegen
    rng = np.random.default_rng(20261201)
    small = cachegen.CodecConfig(chunk_tokens=16, channels_per_stream=3, key_bits=6, value_bits=4, group_size=1)
    grouped = cachegen.CodecConfig(chunk_tokens=16, group_size=4, key_bits=5, value_bits=3, token_scaling=True,
                                   scale_sharing=0.5)
    caches = {
        "fp16_2l": _kv(rng, 2, 1, 1, 40, 8, lengths=[40, 12]),
        "bf16_b2": _kv(rng, 2, 2, 2, 20, 4, dtype="bfloat16"),
        "fp32_vdim": _kv(rng, 1, 1, 2, 33, 4, dtype="float32", v_dim=6),
    }
    plan = [("fp16_2l", "default"), ("fp16_2l", "cachegen-paper"), ("fp16_2l", small), ("fp16_2l", "lossless"),
            ("bf16_b2", grouped), ("bf16_b2", "lossless"), ("fp32_vdim", "small"), ("fp32_vdim", small)]
    seeds = []
    for name, cfg in plan:
        label = cfg if isinstance(cfg, str) else ("small-cps3" if cfg is small else "grouped-ts")
        for fv in (2, 1):
            try:
                seeds.append((f"v{fv}:{name}:{label}", cachegen.encode(caches[name], cfg, format_version=fv)))
            except TypeError:   # an encoder without format_version: its default format only
                if fv == 2:
                    seeds.append((f"v?:{name}:{label}", cachegen.encode(caches[name], cfg)))
    for sub, tag, vecs in (("", "v1vec", ("tiny_example", "small_batch2_fp32", "token_scaled_fp16", "lossless_bf16")),
                           ("v2", "v2vec", ("tiny_example", "small_batch2_fp32", "extensions", "token_scaled_fp16"))):
        for vec in vecs:
            p = ROOT / "codec_spec" / "vectors" / sub / f"{vec}.cgk"
            if p.exists():
                try:
                    cachegen.decode(p.read_bytes())
                except cachegen.CacheGenError:   # a vector of a layout this tree does not read (yet)
                    continue
                seeds.append((f"{tag}:{vec}", p.read_bytes()))
    return seeds


_INDEX_EDITS = (b"Infinity", b"-Infinity", b"NaN", b"1e999", b"-1", b"true", b"null", b'"12"', b"[]", b"{}",
                b"1.5", b"18446744073709551616", b"[" * 3000 + b"]" * 3000, b'{"a":' * 2000 + b"1" + b"}" * 2000)


def _store_index(rng) -> str:
    """A store index entry, checksummed and keyed correctly, with a hostile JSON payload: it is
    a CorruptEntryError or a dict of the documented types."""
    from cachegen.store.entry import KIND_INDEX, CorruptEntryError, pack_entry, unpack_entry, unpack_index
    doc = bytearray(b'{"levels":{"default":1234,"small":567},"tokens":256}')
    for _ in range(int(rng.integers(1, 3))):
        r = rng.random()
        if not doc:
            break
        if r < 0.6 and re.search(rb"[0-9{\[\"]", doc):
            spans = [(m.start(), m.end()) for m in re.finditer(rb"[0-9]+|\"[a-z]+\"|\{|\[", doc)]
            a, b = spans[int(rng.integers(0, len(spans)))]
            doc[a:b] = _INDEX_EDITS[int(rng.integers(0, len(_INDEX_EDITS)))]
        elif r < 0.8:
            del doc[int(rng.integers(0, len(doc))):]
        else:
            doc[int(rng.integers(0, len(doc)))] = int(rng.integers(0, 256))
    key = "00" * 32 + ".idx"
    try:
        d = unpack_index(key, unpack_entry(key, pack_entry(key, KIND_INDEX, bytes(doc)), KIND_INDEX))
    except CorruptEntryError:
        return "rejected:CorruptEntryError"
    ok = isinstance(d["tokens"], int) and all(isinstance(v, int) and v >= 0 for v in d["levels"].values())
    return "index:parsed" if ok else "SILENT"


def _gpu_host(data: bytes, partial: bool) -> None:
    """The GPU decoders' host side (plans, LUTs, chunk views), which runs without a GPU."""
    import torch
    from cachegen import dispatch
    from cachegen.format.container import MODE_LOSSY, Container
    c = dispatch.open_container(data, partial=partial)
    if c.header.mode != MODE_LOSSY:
        return
    if isinstance(c, Container):
        from cachegen.gpu.plan import build_plan, symbol_luts
        build_plan(c, verify=True)
        symbol_luts(c.header.freqs, c.header.cdfs, 12, True)
    else:
        from cachegen.format import v2 as fmt2
        from cachegen.gpu import v2 as g2
        g2.build_shape_plan(c.header, c.n_chunks, torch.device("cpu"))
        for k in range(c.n_chunks):
            fmt2.chunk_view(c, k, verify=True)


def _bits(t):
    import torch
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


class _Seed:
    def __init__(self, name: str, data: bytes):
        import cachegen
        from . import fields
        self.name, self.data = name, data
        self.parts = fields.split(data)
        if self.parts is not None and fields.join(self.parts) != data:
            self.parts = None          # the splitter does not know this layout exactly: raw mutations only
        self.out = [tuple(_bits(t) for t in pair) for pair in cachegen.decode(data)]


def _same_prefix(out, ref) -> bool:
    if len(out) != len(ref):
        return False
    for pair, rpair in zip(out, ref):
        for t, r in zip(pair, rpair):
            b = _bits(t)
            if b.ndim != 4 or b.shape[:2] != r.shape[:2] or b.shape[3] != r.shape[3] or b.shape[2] > r.shape[2]:
                return False
            if not np.array_equal(b, r[:, :, :b.shape[2]]):
                return False
    return True


def _worker(args) -> dict:
    wid, n, rng_seed, timeout, save_dir = args
    os.environ["CACHEGEN_WORKERS"] = "1"       # the campaign's processes are the parallelism
    warnings.simplefilter("ignore", RuntimeWarning)   # fp16 overflow of forged parameters: inf is the answer
    import cachegen
    from . import fields
    seeds = [_Seed(n_, d) for n_, d in make_seeds()]
    others = [s.parts for s in seeds if s.parts is not None]
    rng = np.random.default_rng(rng_seed)
    signal.signal(signal.SIGALRM, _alarm)
    tmp = Path(tempfile.mkdtemp(prefix="cgfuzz")) / "in.cgk"
    outcomes: Counter = Counter()
    by_mut: dict = {}
    worst_t: list = []
    bugs: list = []
    # Warm up (imports, first allocations), then take the RSS baseline.
    for s in seeds:
        cachegen.inspect(s.data)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_rss, peak_what = base_rss, ""
    t_start = time.perf_counter()
    for it in range(n):
        s = seeds[it % len(seeds)]
        m = fields.mutate(rng, s.data, s.parts, others)
        r = rng.random()
        api = ("inspect" if r < 0.1 else "gpu_host" if r < 0.15 else "load" if r < 0.17
               else "store_index" if r < 0.2 else "lockstep" if r < 0.3 else "reference")
        partial = bool(rng.random() < 0.3)
        what = f"{s.name} {m.name} fixed={m.fixed} {api} partial={partial}"
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            if api == "inspect":
                cachegen.inspect(m.data)
                cls = "inspected"
            elif api == "store_index":
                cls = _store_index(rng)
                what = "store index entry"
            elif api == "gpu_host":
                _gpu_host(m.data, partial)
                cls = "planned"
            else:
                if api == "load":
                    tmp.write_bytes(m.data)
                    out = cachegen.load(tmp, partial=partial, verify=m.verify)
                else:
                    out = cachegen.decode(m.data, decoder=api, partial=partial, verify=m.verify)
                if _same_prefix(out, s.out):
                    cls = "decoded:same"
                elif m.fixed:
                    cls = "decoded:other"
                else:
                    cls = "SILENT"
        except _Timeout:
            cls = "TIMEOUT"
        except cachegen.CacheGenError as e:
            cls = f"rejected:{type(e).__name__}"
        except Exception as e:  # noqa: BLE001 - the point: anything else is a finding
            cls = f"BUG:{type(e).__name__}"
            what += f" -> {type(e).__name__}: {str(e)[:200]}"
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        dt = time.perf_counter() - t0
        outcomes[cls] += 1
        fam = "store_index" if api == "store_index" else (re.match(r"[a-z_]*", m.name).group(0) or "other")
        by_mut.setdefault(fam, Counter())[cls.split(":")[0]] += 1
        worst_t.append((dt, what))
        if len(worst_t) > 64:
            worst_t.sort(reverse=True)
            del worst_t[8:]
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if rss > peak_rss:
            peak_rss, peak_what = rss, what
        if cls.startswith(("BUG", "SILENT", "TIMEOUT")):
            bugs.append(what)
            if save_dir:
                Path(save_dir).mkdir(parents=True, exist_ok=True)
                (Path(save_dir) / f"w{wid}_{it}.cgk").write_bytes(m.data)
    worst_t.sort(reverse=True)
    return {"n": n, "seconds": time.perf_counter() - t_start, "outcomes": dict(outcomes),
            "by_mutator": {k: dict(v) for k, v in by_mut.items()}, "worst_time": worst_t[:5],
            "rss_growth_mb": (peak_rss - base_rss) / 1024, "rss_growth_input": peak_what,
            "base_rss_mb": base_rss / 1024, "bugs": bugs[:50], "n_bugs": len(bugs), "seeds": len(seeds)}


def run(n: int, workers: int = 2, seed: int = 0, timeout: float = 10.0, save_dir: Optional[str] = None) -> dict:
    per = [n // workers + (1 if i < n % workers else 0) for i in range(workers)]
    args = [(i, per[i], seed * 1000 + i, timeout, save_dir) for i in range(workers)]
    t0 = time.perf_counter()
    if workers == 1:
        parts = [_worker(args[0])]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            parts = pool.map(_worker, args)
    total: Counter = Counter()
    by_mut: dict = {}
    for p in parts:
        total.update(p["outcomes"])
        for k, v in p["by_mutator"].items():
            by_mut.setdefault(k, Counter()).update(v)
    worst = sorted((w for p in parts for w in p["worst_time"]), reverse=True)[:5]
    mem = max(parts, key=lambda p: p["rss_growth_mb"])
    return {"inputs": n, "workers": workers, "wall_s": time.perf_counter() - t0, "seeds": parts[0]["seeds"],
            "outcomes": dict(sorted(total.items())), "by_mutator": {k: dict(v) for k, v in sorted(by_mut.items())},
            "worst_time_s": worst[0][0] if worst else 0.0, "worst_time_input": worst[0][1] if worst else "",
            "slowest": worst, "worst_rss_growth_mb": mem["rss_growth_mb"], "worst_rss_input": mem["rss_growth_input"],
            "base_rss_mb": max(p["base_rss_mb"] for p in parts),
            "bugs": [b for p in parts for b in p["bugs"]][:50], "n_bugs": sum(p["n_bugs"] for p in parts)}


def table(res: dict) -> str:
    lines = [f"{res['inputs']} inputs from {res['seeds']} seeds, {res['workers']} workers, "
             f"{res['wall_s']:.0f} s wall ({res['inputs'] / max(res['wall_s'], 1e-9):.0f} inputs/s)", "",
             "| outcome | inputs | share |", "|---|---:|---:|"]
    for k, v in res["outcomes"].items():
        lines.append(f"| {k} | {v} | {100 * v / res['inputs']:.2f}% |")
    fams = sorted(res["by_mutator"])
    cols = sorted({c for v in res["by_mutator"].values() for c in v})
    lines += ["", "| mutator | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for f in fams:
        lines.append(f"| {f} | " + " | ".join(str(res["by_mutator"][f].get(c, 0)) for c in cols) + " |")
    lines += ["", f"worst time: {res['worst_time_s']:.3f} s ({res['worst_time_input']})",
              f"worst memory: peak RSS +{res['worst_rss_growth_mb']:.0f} MiB over the worker's warmed-up "
              f"{res['base_rss_mb']:.0f} MiB ({res['worst_rss_input']})",
              f"exceptions outside CacheGenError, silent corruptions, timeouts: {res['n_bugs']}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per input before it counts as a hang")
    ap.add_argument("--json", help="write the full result here")
    ap.add_argument("--save-bugs", help="write inputs that found a bug into this folder")
    a = ap.parse_args(argv)
    res = run(a.n, a.workers, a.seed, a.timeout, a.save_bugs)
    print(table(res))
    for b in res["bugs"][:20]:
        print("BUG", b)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 1 if res["n_bugs"] else 0


if __name__ == "__main__":
    sys.exit(main())
