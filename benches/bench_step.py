"""The first decode step after a restore, against a plain ORT step (issue 11: 6.4 ms vs 3.4 ms).

    python benches/bench_step.py --out benches/step_results.json             # CUDA GPU + ORT CUDA
    python benches/bench_step.py --dry-run --out /tmp/step_dry.json          # CPU: checks the harness

Per model and context, in one process (medians over ``--reps``; host wall time, one decode step
of one token + argmax of its logits):

* ``plain``: ``OrtRunner._run`` with the prefill's present tensors as the past (ORT allocates
  nothing: we bind fresh [1, H, T+1, D] presents, the graph copies the past into them);
* ``static``: ``StaticKV.step`` after ``StaticKV.load`` of the same cache (shared past/present
  buffers), in its variants: mask/positions bound from device buffers or from host arrays
  (``device_inputs``), with or without the torch stream sync before the run;
* ``static_after_restore``: ``StaticKV.restore`` of the encoded cache from pinned bytes, then
  the step (what bench_restore times as "step");
* ``ort_run``: only ``session.run_with_iobinding`` + ``synchronize_outputs`` of a static step
  (the bindings made beforehand): ORT's own share;
* ``loop``: 32 greedy steps in a row (per-token time of a steady decode).

``--profile-dir``: an ORT profile (``enable_profiling``) of 5 static and 5 plain steps; the
summary lists the nodes that take the most time in the last step of each kind.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benches"))

from bench_restore import heldout_ids  # noqa: E402


def _runner(model: str, dry: bool, profile: bool = False, graph: bool = False):
    import onnxruntime as ort
    from cachegen.ort import OrtRunner, export_model
    so = ort.SessionOptions()
    if profile:
        so.enable_profiling = True
    if dry:
        return OrtRunner(export_model(model, "fp32", "cpu", progress=False), session_options=so)
    return OrtRunner(export_model(model, "fp16", "cuda", progress=False), provider="cuda", session_options=so,
                     provider_options={"arena_extend_strategy": "kSameAsRequested"}, cuda_graph=graph)


def _sync(dry: bool) -> None:
    if not dry:
        import torch
        torch.cuda.synchronize()


def _timed(fn, reps: int, dry: bool) -> list[float]:
    out = []
    for _ in range(2):
        fn()
    for _ in range(reps):
        _sync(dry)
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _loop_ms(s, nxt, T: int, dry: bool, n: int = 32) -> float:
    """Per-token host time of ``n`` greedy steps after a cache of ``T`` tokens."""
    s.reset(T)
    _sync(dry)
    t = time.perf_counter()
    toks = s.greedy(nxt, n)
    return (time.perf_counter() - t) * 1e3 / len(toks)


def _restore_steps(s, src, nxt, reps: int, dry: bool, defer: bool) -> tuple[list, list, list]:
    """(restore, first step, restore + step) ms per rep, after two warm-up reps."""
    rest, after, ttft = [], [], []
    for i in range(reps + 2):
        _sync(dry)
        t = time.perf_counter()
        s.restore(src, defer=defer)
        t1 = time.perf_counter()
        int(s.step(nxt)[0, -1].argmax())
        t2 = time.perf_counter()
        if i >= 2:
            rest.append((t1 - t) * 1e3)
            after.append((t2 - t1) * 1e3)
            ttft.append((t2 - t) * 1e3)
    return rest, after, ttft


def measure(model: str, T: int, reps: int, dry: bool) -> dict:
    import torch
    import cachegen
    from cachegen.ort.cuda import StaticKV

    r = _runner(model, dry)
    ids = heldout_ids(r, T + 40)
    nxt = ids[T:T + 1]
    _, kv = r._run(r._ids_array(ids[:T]), None, 0)
    row: dict = dict(model=model, tokens=T)

    def plain():
        lg, kv2 = r._run(r._ids_array(nxt), kv, T)
        return int(torch.as_tensor(lg)[0, -1].argmax())
    row["plain_all_ms"] = _timed(plain, reps, dry)

    for dev_in in (True, False):
        s = StaticKV(r, T + 64, device_inputs=dev_in)
        s.load(kv)
        _sync(dry)
        for sync in (True, False):
            def st():
                s.reset(T)
                return int(s.step(nxt, sync=sync)[0, -1].argmax())
            row[f"static_dev{int(dev_in)}_sync{int(sync)}_all_ms"] = _timed(st, reps, dry)
        if dev_in:
            # ORT's share: bindings made by one step, then only the run
            s.reset(T)
            s.step(nxt)
            io = s.runner.session, s._io

            def run_only():
                io[0].run_with_iobinding(io[1])
                io[1].synchronize_outputs()
            row["ort_run_all_ms"] = _timed(run_only, reps, dry)
            row["loop_per_token_ms"] = _loop_ms(s, nxt, T, dry)   # steady decode
            # after a restore from pinned bytes (host bytes on the CPU)
            host = [(torch.as_tensor(np.asarray(k) if not torch.is_tensor(k) else k.cpu()),
                     torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v.cpu())) for k, v in r.window_kv(kv)]
            data = cachegen.encode(host, "default")
            src = data if dry else torch.frombuffer(bytearray(data), dtype=torch.uint8).pin_memory()
            rest, after, _ = _restore_steps(s, src, nxt, reps, dry, defer=False)
            row["restore_nontimed_all_ms"] = rest
            row["static_after_restore_all_ms"] = after
            if PROFILE_DIR is not None:
                _host_profiles(s, src, nxt, f"{model}_{T}", dry)
            # TTFT-style: restore (deferred checks) + step, on this plain session
            row["plain_session_restore_defer_step_all_ms"] = _restore_steps(s, src, nxt, reps, dry, defer=True)[2]
        del s
    if not dry:
        try:
            _graph_rows(row, r, kv, nxt, src, T, reps, model, dry)
        except Exception as e:  # noqa: BLE001 - record why the graph path failed, keep the rest
            import traceback
            row["graph_error"] = f"{type(e).__name__}: {e}"[:800]
            traceback.print_exc()
    for k in [k for k in row if k.endswith("_all_ms")]:
        row[k[:-len("_all_ms")] + "_ms"] = statistics.median(row[k])
    return row


def _graph_rows(row, r, kv, nxt, src, T, reps, model, dry):
    import torch
    from cachegen.ort.cuda import StaticKV
    if True:
        # the one-token step replayed from a CUDA graph (OrtRunner(cuda_graph=True))
        rg = _runner(model, dry, graph=True)
        sg = StaticKV(rg, T + 64)
        sg.warmup()
        sg.load(kv)
        s_ref = StaticKV(r, T + 64)
        s_ref.load(kv)
        row["graph_argmax_equal"] = int(sg.step(nxt)[0, -1].argmax()) == int(s_ref.step(nxt)[0, -1].argmax())
        del s_ref

        def gst():
            sg.reset(T)
            return int(sg.step(nxt)[0, -1].argmax())
        row["graph_step_all_ms"] = _timed(gst, reps, dry)
        row["graph_loop_per_token_ms"] = _loop_ms(sg, nxt, T, dry)
        for defer in (True, False):
            rest, after, ttft = _restore_steps(sg, src, nxt, reps, dry, defer)
            tag = "defer" if defer else "sync"
            row[f"graph_restore_{tag}_all_ms"] = rest
            row[f"graph_after_restore_{tag}_all_ms"] = after
            row[f"graph_ttft_{tag}_all_ms"] = ttft
        if PROFILE_DIR is not None:
            _host_profiles(sg, src, nxt, f"{model}_{T}_graph", dry)
        del sg, rg


PROFILE_DIR = None


def _host_profiles(s, src, nxt, tag: str, dry: bool) -> None:
    """cProfile of 20 restores + steps (host time by function), and one torch.profiler trace
    of a restore + step (the GPU timeline: gaps where the device waits for the host)."""
    import cProfile
    import io as _io
    import pstats
    pr = cProfile.Profile()
    _sync(dry)
    pr.enable()
    for _ in range(20):
        s.restore(src, defer=True)
        int(s.step(nxt)[0, -1].argmax())
    pr.disable()
    buf = _io.StringIO()
    st = pstats.Stats(pr, stream=buf)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(45)
    (PROFILE_DIR / f"cprofile_{tag}.txt").write_text(buf.getvalue())
    print(buf.getvalue()[:6000], flush=True)
    if dry:
        return
    import torch
    from torch.profiler import ProfilerActivity, profile as tprof
    with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            s.restore(src, defer=True)
            int(s.step(nxt)[0, -1].argmax())
        torch.cuda.synchronize()
    tab = p.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (PROFILE_DIR / f"torchprof_{tag}.txt").write_text(tab)
    print(tab[:5000], flush=True)


def profile(model: str, T: int, dry: bool, out_dir: Path) -> dict:
    """ORT node times of the last of 5 static steps and of 5 plain steps."""
    import torch
    from cachegen.ort.cuda import StaticKV
    r = _runner(model, dry, profile=True)
    ids = heldout_ids(r, T + 8)
    nxt = ids[T:T + 1]
    _, kv = r._run(r._ids_array(ids[:T]), None, 0)
    s = StaticKV(r, T + 64)
    s.load(kv)
    _sync(dry)
    for _ in range(5):
        s.reset(T)
        s.step(nxt)
    for _ in range(5):
        r._run(r._ids_array(nxt), kv, T)
    prof = r.session.end_profiling()
    dst = out_dir / f"ortprof_{model}_{T}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    os.replace(prof, dst)
    ev = json.loads(dst.read_text())
    runs = [e for e in ev if e.get("cat") == "Session" and e.get("name") == "model_run"]
    res: dict = {"profile": str(dst), "model_run_us": [e["dur"] for e in runs]}
    # the 6th run from the end is the last static step (after 5 static come 5 plain)
    for tag, run in (("static", runs[-6] if len(runs) >= 6 else None), ("plain", runs[-1] if runs else None)):
        if run is None:
            continue
        a, b = run["ts"], run["ts"] + run["dur"]
        nodes = [e for e in ev if e.get("cat") == "Node" and a <= e["ts"] <= b and e["name"].endswith("_kernel_time")]
        by: dict = {}
        for e in nodes:
            op = e.get("args", {}).get("op_name", "?")
            by[op] = by.get(op, 0) + e["dur"]
        res[f"{tag}_run_us"] = run["dur"]
        res[f"{tag}_nodes"] = len(nodes)
        res[f"{tag}_node_us_sum"] = sum(e["dur"] for e in nodes)
        res[f"{tag}_by_op_us"] = dict(sorted(by.items(), key=lambda x: -x[1])[:12])
        top = sorted(nodes, key=lambda e: -e["dur"])[:8]
        res[f"{tag}_top_nodes"] = [(e["name"], e["dur"], e.get("args", {}).get("provider")) for e in top]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    ap.add_argument("--tokens", nargs="+", type=int, default=None)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benches" / "step_results.json"))
    ap.add_argument("--profile-dir", default=None)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    dry = a.dry_run
    global PROFILE_DIR
    if a.profile_dir:
        PROFILE_DIR = Path(a.profile_dir)
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    toks = a.tokens or ([300] if dry else [8128])
    rows, profs = [], []
    for m in (["smollm2"] if dry else a.models):
        for T in toks:
            T = min(T, 8128) if m == "smollm2" else T
            row = measure(m, T, a.reps, dry)
            rows.append(row)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
                              if not k.endswith("_all_ms")}), flush=True)
            if a.profile_dir:
                p = profile(m, T, dry, Path(a.profile_dir))
                profs.append(dict(model=m, tokens=T, **p))
                print(json.dumps(p)[:3000], flush=True)
    res = dict(machine=platform.node(), date=time.strftime("%Y-%m-%d"), dry_run=dry, rows=rows, profiles=profs,
               command=" ".join(sys.argv))
    Path(a.out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
