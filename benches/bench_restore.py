"""Restore vs recompute time to first token, per source of the container bytes (issue 11, item 6).

    python benches/bench_restore.py --out benches/restore_results.json          # CUDA GPU + ORT CUDA
    python benches/bench_restore.py --dry-run --out /tmp/restore_dry.json       # CPU: checks the harness
    python -m pytest benches/bench_restore.py --benchmark-enable                # pytest-benchmark entries

For each model and context (SmolLM2 1K/4K/8K (8,128 tokens: the model's 8,192 positions minus
room for the step), Gemma-3 1K/4K/8K/16K/32K (32,704)) in one process, on held-out text (Python's
``pydoc_data.topics``: neither the demo nor the calibration text):

* **recompute**: ORT CUDA fp16 prefill of the context and the next token + argmax of the last
  row (as in bench_ttft.py: the builder graph computes logits for every position);
* **restore**, the container (``default`` preset, Gemma-3's sliding layers windowed) restored with
  ``StaticKV.restore`` straight into the IOBinding buffers, then one decode step + argmax, from
  - ``file_warm``: a path, file in the page cache;
  - ``file_cold``: a path, its pages dropped first (``cachegen.io.drop_page_cache``: fdatasync +
    POSIX_FADV_DONTNEED; the VM's virtual disk behind it);
  - ``pinned``: bytes already in a pinned host tensor;
  - ``gpu``: bytes already on the GPU (uint8 CUDA tensor).

TTFT = host wall time from the start of the restore (or prefill) to the first token on the host;
both predict the token after context + next token, so the first tokens should agree (up to
quantization).
Breakdown per restore (``StaticKV.last_restore``, a ``cachegen.io.RestoreResult``, with CUDA
events): read (filling the pinned buffer, H2D copies queued on the way), H2D (sum of the piece
copies), parse, decoder call on the host, decoder stream time ("kernels": its stream work
between events, including any H2D of its own), first step; host CPU time of the restore (calling
thread + reader threads: ``time.thread_time``) and the process CPU time (``time.process_time``:
includes ORT's and torch's threads). Medians over ``--reps``. Before timing, each source's
restored KV must be bit-identical to the others' (checked on the device).

Also a read sweep: the 8K SmolLM2 file into the reused pinned buffer and into device memory
(read + H2D pipelined), 1/2/4/8 threads x 1/4/16 MiB pieces.

``--dry-run``: no GPU needed; SmolLM2 fp32 on the ORT CPU provider, 256/600-token contexts, CPU
buffers (the ``gpu``/``pinned`` sources are skipped, ``host`` bytes used instead): exercises
files, staging, restore, the step, the breakdown and the JSON/markdown output.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("RESTORE_WORK", "/tmp/cachegen_restore"))
CONTEXTS = {"smollm2": [1024, 4096, 8128], "gemma3": [1024, 4096, 8192, 16384, 32704]}
DRY_CONTEXTS = {"smollm2": [256, 600]}
SOURCES = ("file_warm", "file_cold", "pinned", "gpu")
DRY_SOURCES = ("file_warm", "file_cold", "host")
PRESET = "default"
DEFER = True          # TTFT restores: StaticKV.restore(defer=True) (--no-defer: wait for the checks)


def heldout_text() -> str:
    """Held-out prose: the Python documentation topics shipped with the interpreter."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def heldout_ids(r, n: int) -> list[int]:
    ids = r.encode(heldout_text())
    body = ids[1:] if r.add_bos else ids
    while len(ids) < n:           # only if the text were short (it is ~100K tokens)
        ids = ids + body
    return ids[:n]


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _encode(r, host) -> bytes:
    """The cache to store, with PRESET: a model-profile preset ("...-p") codes it with the
    model's profile (next to its export, else the shipped one), the others plainly."""
    import dataclasses
    layout = {} if LAYOUT is None else dict(channels_per_stream=LAYOUT[0], tables_per_class=LAYOUT[1])
    layout.update(CODEC)
    if PRESET.endswith("-p"):
        from cachegen import profile as cp
        from cachegen.profile import codec as pc
        prof = cp.load_for_model(r.model_dir)
        return cp.encode(host, prof, dataclasses.replace(pc.preset_config(prof, PRESET), **layout))
    import cachegen
    return cachegen.encode(host, dataclasses.replace(cachegen.get_config(PRESET), **layout))


LAYOUT = None        # --layout CPS/TABLES: channels per stream and tables per class (A/B)
CODEC: dict = {}      # --codec FIELD=VALUE,...: other CodecConfig fields over the preset (A/B)
GRAPH = True          # restores step through OrtRunner(cuda_graph=True) (--no-graph: plain steps)


def _runner(model: str, dry: bool, graph: bool = False):
    from cachegen.ort import OrtRunner, export_model
    if dry:
        return OrtRunner(export_model(model, "fp32", "cpu", progress=False))
    return OrtRunner(export_model(model, "fp16", "cuda", progress=False), provider="cuda",
                     provider_options={"arena_extend_strategy": "kSameAsRequested"}, cuda_graph=graph)


class _Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            import torch
            torch.cuda.synchronize()


def _kv_fingerprint(s, T: int) -> int:
    """A cheap on-device fingerprint of the restored KV bits (positions [0, T) of every buffer)."""
    import torch
    acc = 0
    for i, (k, v) in enumerate(s.kv):
        for j, t in enumerate((k, v)):
            x = t[:, :, :T].reshape(-1).view(torch.int16).to(torch.int64)
            w = torch.arange(1, x.numel() + 1, device=x.device, dtype=torch.int64) % 65521
            acc = (acc * 1000003 + int((x * w).sum()) + 7 * i + j) % (1 << 61)
    return acc


def measure_row(r, model: str, T: int, ids: list[int], reps: int, dry: bool, rs_=None) -> dict:
    """``r``: the runner of the recompute (a plain session); ``rs_``: the restore's runner
    (a CUDA-graph session with ``--graph``; default ``r``)."""
    import torch
    import cachegen
    from cachegen import io as cio
    from cachegen.ort.cuda import StaticKV

    clock = _Clock(not dry)
    WORK.mkdir(parents=True, exist_ok=True)
    arr = r._ids_array(ids[:T + 1])   # recompute: the context and the next token, in one prefill
    nxt = ids[T:T + 1]                 # restore: the context's cache, then a step with that token
    # the cache to store: one prefill, windowed, on the host
    _, kv = r._run(r._ids_array(ids[:T]), None, 0)
    kvw = r.window_kv(kv)
    host = [(torch.as_tensor(np.asarray(k) if not torch.is_tensor(k) else k.cpu()),
             torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v.cpu())) for k, v in kvw]
    del kv, kvw
    t0 = time.perf_counter()
    data = _encode(r, host)
    enc_s = time.perf_counter() - t0
    fp16_bytes = sum(2 * (k.numel() + v.numel()) for k, v in host)
    out_bytes = sum(k.element_size() * (k.numel() + v.numel()) for k, v in host)
    del host
    path = WORK / f"{model}_{T}.cgk"
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    row = dict(model=model, tokens=T, comp_bytes=len(data), fp16_bytes=fp16_bytes, ratio=fp16_bytes / len(data),
               encode_s=enc_s, format_version=data[4], preset=PRESET, layout=LAYOUT, codec=CODEC or None)

    # recompute
    def recompute():
        clock.sync()
        t = time.perf_counter()
        lg, kv2 = r._run(arr, None, 0)
        tok = int(lg[0, -1].argmax())
        dt = (time.perf_counter() - t) * 1e3
        del lg, kv2
        return dt, tok
    for _ in range(2):
        recompute()
    rec = [recompute() for _ in range(reps)]
    row["recompute_ms"] = _med([x[0] for x in rec])
    row["recompute_all_ms"] = [x[0] for x in rec]
    rec_tok = rec[0][1]
    if not dry:
        torch.cuda.empty_cache()

    s = StaticKV(rs_ or r, T + 8)
    try:
        s.warmup()                      # a CUDA-graph runner captures the one-token step here
        row["graph"] = bool(getattr(rs_, "cuda_graph", False))
    except Exception as e:  # noqa: BLE001 - ORT refused the capture: measure plain steps, say why
        row["graph"] = False
        row["graph_error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"[{model} {T}] CUDA graph step failed, plain steps: {row['graph_error']}", flush=True)
        s = StaticKV(r, T + 8)
    srcs: dict = {}
    for name in (DRY_SOURCES if dry else SOURCES):
        if name in ("file_warm", "file_cold"):
            srcs[name] = path
        elif name == "host":
            srcs[name] = data
        elif name == "pinned":
            srcs[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8).pin_memory()
        elif name == "gpu":
            srcs[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to("cuda")
    clock.sync()

    def once(name, timed=False):
        src = srcs[name]
        if name == "file_cold":
            cio.drop_page_cache(path)
        clock.sync()
        p0 = time.process_time()
        t = time.perf_counter()
        s.restore(src, timing=timed and not dry, defer=DEFER and not timed)
        t1 = time.perf_counter()
        p1 = time.process_time()
        tok = int(s.step(nxt)[0, -1].argmax())
        t2 = time.perf_counter()
        lr = s.last_restore
        ht = None
        if not dry:   # the GPU decoder's host breakdown of this restore (cachegen.gpu.v2.HostTiming)
            from cachegen.gpu.v2 import default_decoder
            t_ = default_decoder("cuda").last_timing
            ht = None if t_ is None else dict(vars(t_))
        return dict(ttft=(t2 - t) * 1e3, restore=(t1 - t) * 1e3, step=(t2 - t1) * 1e3, proc_cpu=(p1 - p0) * 1e3,
                    host_cpu=lr.host_cpu_ms, read=lr.read_ms, read_cpu=lr.read_cpu_ms, parse=lr.parse_ms,
                    decode_call=lr.decode_call_ms, h2d=lr.h2d_busy_ms, h2d_span=lr.h2d_span_ms,
                    kernels=lr.decode_gpu_ms, path=lr.path, source=lr.source, host_parts=ht), tok

    prints = {}
    toks = {}
    for name in srcs:
        if name == "file_warm":
            path.read_bytes()            # the whole file in the page cache (not timed)
        try:
            once(name)                   # warm-up (first call: JIT, buffer growth)
            prints[name] = _kv_fingerprint(s, T)
            # TTFT from untimed restores (CUDA events and their sync would serialize the decode
            # with the step's launches); the breakdown from timed ones right after
            runs = [once(name) for _ in range(reps)]
            truns = [once(name, timed=True) for _ in range(reps)] if not dry else runs
        except Exception as e:  # noqa: BLE001 - one failing source must not cost the whole run
            row[f"{name}_error"] = f"{type(e).__name__}: {e}"
            print(f"[{model} {T}] {name} failed: {row[f'{name}_error']}", flush=True)
            continue
        toks[name] = {t for _, t in runs} | {t for _, t in truns}
        rs = [x for x, _ in runs]
        trs = [x for x, _ in truns]
        for k in ("ttft", "restore", "step", "proc_cpu", "host_cpu"):
            row[f"{name}_{k}_ms"] = _med([x[k] for x in rs])
        for k in ("ttft", "restore", "step", "read", "read_cpu", "parse", "decode_call", "h2d", "h2d_span", "kernels"):
            row[f"{name}_{k}_ms" if k not in ("ttft", "restore", "step") else f"{name}_timed_{k}_ms"] = \
                _med([x[k] for x in trs])
        row[f"{name}_ttft_all_ms"] = [x["ttft"] for x in rs]
        row[f"{name}_path"] = rs[0]["path"]
        if trs[0]["host_parts"]:
            row[f"{name}_host_parts_ms"] = {k: _med([x["host_parts"][k] for x in trs]) for k in trs[0]["host_parts"]}
        row[f"{name}_ratio"] = row[f"{name}_ttft_ms"] / row["recompute_ms"]
        # end to end restore throughput, in bytes of the restored cache's dtype (fp16 on the GPU)
        row[f"{name}_restore_GBs"] = out_bytes / row[f"{name}_timed_restore_ms"] / 1e6   # a synced restore
    rd = s.reader()
    row["reader"] = dict(threads=rd.threads, piece_bytes=rd.piece_bytes, adaptive=rd.adaptive, pinned=rd.pin)
    row["kv_identical_across_sources"] = len(set(prints.values())) == 1
    row["first_token_restore"] = sorted(set().union(*toks.values())) if toks else []
    row["first_token_recompute"] = rec_tok
    row["first_token_equal"] = row["first_token_restore"] == [rec_tok]
    return row


def read_sweep(path: Path, reps: int, dry: bool) -> list[dict]:
    """The file into the reused pinned buffer, and into device memory (read + H2D pipelined)."""
    from cachegen import io as cio
    import torch
    rows = []
    n = os.path.getsize(path)
    for piece in (1 << 20, 4 << 20, 16 << 20):
        for threads in (1, 2, 4, 8):
            r = cio.PinnedReader(threads=threads, piece_bytes=piece, adaptive=False)
            r.read(path)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                r.read(path)
                ts.append(time.perf_counter() - t)
            row = dict(piece_MiB=piece >> 20, threads=threads, bytes=n, read_GBs=n / _med(ts) / 1e9)
            if not dry:
                d = r.load(path, "cuda")
                d.synchronize()
                ts = []
                for _ in range(reps):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    d = r.load(path, "cuda")
                    d.synchronize()
                    d.release()
                    ts.append(time.perf_counter() - t)
                row["read_h2d_GBs"] = n / _med(ts) / 1e9
            rows.append(row)
            r.close()
            print(json.dumps(row), flush=True)
    if not dry:
        # the floor: pinned -> device copy of the same bytes
        a = torch.empty(n, dtype=torch.uint8).pin_memory()
        b = torch.empty(n, dtype=torch.uint8, device="cuda")
        b.copy_(a, non_blocking=True)
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            b.copy_(a, non_blocking=True)
            e1.record()
            e1.synchronize()
            ts.append(e0.elapsed_time(e1))
        rows.append(dict(piece_MiB=None, threads=None, bytes=n, pinned_h2d_GBs=n / _med(ts) / 1e6))
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ---------------------------------------------------------------------------------- output

def _f(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(res: dict) -> str:
    srcs = res["sources"]
    lines = [f"Restore vs recompute TTFT ({res['device']}; {res['when']}; `{res['command']}`; medians of "
             f"{res['reps']}; held-out text; preset `{PRESET}`; defer {res.get('defer')}, CUDA-graph step "
             f"{res.get('graph')}, per-group launches {res.get('pipeline')}).", "",
             "| model | tokens | comp MB | ×fp16 | recompute ms | " + " | ".join(f"{s} ms" for s in srcs) + " | "
             + " | ".join(f"{s}/rec" for s in srcs) + " |",
             "|---|---|---|---|---|" + "---|" * (2 * len(srcs))]
    ok = [r for r in res["rows"] if "error" not in r]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tokens']} | failed: {r['error']} |")
            continue
        lines.append(f"| {r['model']} | {r['tokens']} | {r['comp_bytes'] / 1e6:.2f} | {r['ratio']:.2f} | "
                     f"{_f(r['recompute_ms'])} | " + " | ".join(_f(r.get(f'{s}_ttft_ms')) for s in srcs) + " | "
                     + " | ".join(_f(r.get(f'{s}_ratio'), 2) for s in srcs) + " |")
    lines += ["", "Breakdown (ms, medians): read = filling the pinned buffer (H2D queued on the way); H2D = sum "
              "of piece copies (events); parse + decoder call = host wall; kernels = decoder's stream time; "
              "step = first decode step + argmax. `restore`, `step` (and the TTFT above): untimed restores "
              "(`defer` when the run says so: the step then also waits for the decode); `timed` columns: "
              "restores with CUDA events, synchronized at the end, where read … kernels come from. host CPU = "
              "restore's thread CPU time (reader threads included); proc CPU = process CPU time during the "
              "restore; GB/s = restored KV bytes / timed restore wall time.", "",
              "| model | tokens | source | path | restore | step | timed restore | read | H2D | parse | decoder call "
              "| kernels | timed step | host CPU | proc CPU | GB/s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        for s in srcs:
            if f"{s}_ttft_ms" not in r:
                continue
            g = lambda k: r.get(f"{s}_{k}_ms")  # noqa: E731
            lines.append(f"| {r['model']} | {r['tokens']} | {s} | {r.get(f'{s}_path')} | {_f(g('restore'), 2)} | "
                         f"{_f(g('step'), 2)} | {_f(g('timed_restore'), 2)} | "
                         f"{_f(g('read'), 2)} | {_f(g('h2d'), 2)} | {_f(g('parse'), 2)} | {_f(g('decode_call'), 2)} | "
                         f"{_f(g('kernels'), 2)} | {_f(g('timed_step'), 2)} | {_f(g('host_cpu'), 2)} | "
                         f"{_f(g('proc_cpu'), 2)} | {_f(r.get(f'{s}_restore_GBs'), 1)} |")
    checks = [f"{r['model']} {r['tokens']}: KV identical across sources {r['kv_identical_across_sources']}, "
              f"first token restore {r['first_token_restore']} vs recompute {r['first_token_recompute']}"
              for r in ok]
    errs = [f"{r['model']} {r['tokens']} {k[:-6]}: {v}" for r in ok for k, v in r.items() if k.endswith("_error")]
    lines += ["", "Checks: " + "; ".join(checks) + "."]
    if errs:
        lines += ["", "Failed sources: " + "; ".join(errs) + "."]
    if res.get("read_sweep"):
        lines += ["", f"Read sweep ({res['read_sweep'][0]['bytes'] / 1e6:.1f} MB file in the page cache; GB/s):", "",
                  "| piece MiB | threads | -> pinned buffer | -> device (read + H2D) |", "|---|---|---|---|"]
        for x in res["read_sweep"]:
            if x.get("threads") is None:
                lines.append(f"| pinned -> device copy alone | | | {x['pinned_h2d_GBs']:.1f} |")
            else:
                lines.append(f"| {x['piece_MiB']} | {x['threads']} | {x['read_GBs']:.2f} | {_f(x.get('read_h2d_GBs'), 2)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--contexts", nargs="*", type=int, default=None, help="override the contexts of every model")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sweep-reps", type=int, default=5)
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--dry-run", "--cpu", dest="dry", action="store_true", help="CPU only: check the harness")
    ap.add_argument("--no-graph", action="store_true",
                    help="restore-side steps without CUDA graphs (OrtRunner(cuda_graph=False))")
    ap.add_argument("--no-defer", action="store_true",
                    help="TTFT restores wait for the decode's device checks (StaticKV.restore(defer=False))")
    ap.add_argument("--pipeline", action="store_true",
                    help="GpuDecoder(pipeline=True): a launch per chunk group as its bytes arrive (slower "
                         "on the H200, 2026-12-02; the default decodes after the whole copy in one launch)")
    ap.add_argument("--preset", default="default", help="preset of the stored caches (a '-p' one codes with the model's profile)")
    ap.add_argument("--layout", default=None, metavar="CPS/TABLES",
                    help="override the preset's stream layout (channels per stream / tables per class), e.g. 32/32")
    ap.add_argument("--serial-params", action="store_true",
                    help="GpuDecoder.defer = False: the packed-parameter pass before the data kernel (A/B)")
    ap.add_argument("--params-after", action="store_true",
                    help="GpuDecoder.params_after = True: the deferred parameter pass launched after the data kernel (A/B)")
    ap.add_argument("--codec", default=None, metavar="FIELD=VALUE,...",
                    help="override CodecConfig fields of the preset (ints; 0/1 for the bool fields), e.g. "
                         "packed_params=0,compact_directory=0,tables_per_class=16")
    ap.add_argument("--kernel", default=None, help="GpuDecoder kernel (nested, nested-wide, flat) for an A/B")
    ap.add_argument("--out", default=str(ROOT / "benches" / "restore_results.json"),
                    help="JSON path; the markdown table goes next to it (.md)")
    a = ap.parse_args(argv)
    import torch
    dry = a.dry
    global DEFER, GRAPH, PRESET, LAYOUT, CODEC
    PRESET = a.preset
    if a.codec:
        from cachegen.config import CodecConfig
        bools = {f for f, v in CodecConfig.__dataclass_fields__.items() if v.type in ("bool", bool)}
        CODEC = {k: (bool(int(v)) if k in bools else int(v))
                 for k, v in (item.split("=") for item in a.codec.split(","))}
    if a.layout:
        LAYOUT = tuple(int(x) for x in a.layout.split("/"))
    DEFER = not a.no_defer
    GRAPH = not a.no_graph
    if a.kernel and not dry:
        from cachegen.gpu.v2 import default_decoder
        default_decoder("cuda").kernel = a.kernel
    if a.serial_params and not dry:
        from cachegen.gpu.v2 import default_decoder
        default_decoder("cuda").defer = False
    if a.params_after and not dry:
        from cachegen.gpu.v2 import default_decoder
        default_decoder("cuda").params_after = True
    if a.pipeline and not dry:   # A/B of the per-group launches
        from cachegen.gpu.v2 import default_decoder
        default_decoder("cuda").pipeline = True
    if not dry and not torch.cuda.is_available():
        print("no CUDA GPU: use --dry-run for the CPU check", file=sys.stderr)
        return 2
    contexts = DRY_CONTEXTS if dry else CONTEXTS
    models = a.models or list(contexts)
    res = dict(device="CPU (dry run)" if dry else torch.cuda.get_device_name(), torch=torch.__version__,
               host=f"{platform.node()} {os.cpu_count()} CPUs", when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               command="python " + " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               reps=a.reps, sources=list(DRY_SOURCES if dry else SOURCES), rows=[], read_sweep=[],
               pipeline=a.pipeline, defer=DEFER, graph=GRAPH, serial_params=a.serial_params,
               params_after=a.params_after)
    try:
        import onnxruntime as ort
        res["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    t_start = time.perf_counter()
    for model in models:
        t = time.perf_counter()
        r = _runner(model, dry)
        rg = _runner(model, dry, graph=True) if GRAPH and not dry else None
        ctxs = a.contexts or contexts.get(model, CONTEXTS.get(model))
        ids = heldout_ids(r, max(ctxs) + 1)
        print(f"[{model}] runner ready in {time.perf_counter() - t:.1f}s", flush=True)
        for T in ctxs:
            t = time.perf_counter()
            try:
                row = measure_row(r, model, T, ids, a.reps, dry, rg)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory at one context: keep the others
                row = dict(model=model, tokens=T, error=f"{type(e).__name__}: {e}")
                print(f"[{model} {T}] failed: {row['error']}", flush=True)
            gc.collect()                 # the row's static buffers and sources
            if not dry:
                torch.cuda.empty_cache()
            res["rows"].append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if not isinstance(v, list) or k.startswith("first")}), flush=True)
            print(f"[{model} {T}] {time.perf_counter() - t:.1f}s", flush=True)
        del r, rg
        gc.collect()
        if not dry:
            torch.cuda.empty_cache()
    if not a.no_sweep:
        cands = sorted(WORK.glob("smollm2_*.cgk"), key=lambda p: p.stat().st_size)
        if cands:
            res["read_sweep"] = read_sweep(cands[-1], a.sweep_reps, dry)
    res["total_s"] = time.perf_counter() - t_start
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')} in {res['total_s']:.0f}s", flush=True)
    bad = [r for r in res["rows"] if "error" in r or not r["kv_identical_across_sources"]
           or any(k.endswith("_error") for k in r)]
    return 1 if bad else 0


# ---------------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest
    import torch as _torch
    _cuda = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    pytest = None
    _cuda = False

if pytest is not None:
    @pytest.fixture(scope="module")
    def _cases():
        from cachegen.ort.cuda import cuda_provider_available
        if not cuda_provider_available():
            pytest.skip("needs onnxruntime's CUDA provider")
        return {}

    @pytest.mark.skipif(not _cuda, reason="needs a CUDA GPU")
    @pytest.mark.parametrize("model", ["smollm2", "gemma3"])
    @pytest.mark.parametrize("source", ["recompute", "file_warm", "pinned", "gpu"])
    def test_restore_ttft_4k(benchmark, _cases, model, source):
        import torch
        import cachegen
        from cachegen.ort.cuda import StaticKV
        T = 4096
        if model not in _cases:
            r = _runner(model, False)
            ids = heldout_ids(r, T + 1)
            _, kv = r._run(r._ids_array(ids[:T]), None, 0)
            data = _encode(r, [(k.cpu(), v.cpu()) for k, v in r.window_kv(kv)])
            WORK.mkdir(parents=True, exist_ok=True)
            path = WORK / f"bench_{model}_{T}.cgk"
            path.write_bytes(data)
            _cases[model] = (r, ids, data, path, StaticKV(r, T + 8))
        r, ids, data, path, s = _cases[model]
        arr = r._ids_array(ids[:T + 1])
        src = {"file_warm": path, "pinned": torch.frombuffer(bytearray(data), dtype=torch.uint8).pin_memory(),
               "gpu": torch.frombuffer(bytearray(data), dtype=torch.uint8).cuda()}.get(source)

        def run():
            if source == "recompute":
                lg, _ = r._run(arr, None, 0)
                return int(lg[0, -1].argmax())
            s.restore(src)
            return int(s.step(ids[T:T + 1])[0, -1].argmax())
        benchmark(run)


if __name__ == "__main__":
    sys.exit(main())
