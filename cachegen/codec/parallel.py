"""Spread independent work (chunks, layers) over the machine's cores with forked workers.

constriction holds the GIL while it codes, so threads do not help; forked processes share the
parent's inputs copy-on-write and send back only their results. Small jobs stay in-process.
Set CACHEGEN_WORKERS=1 to disable (e.g. where fork is unwelcome).
"""
from __future__ import annotations

import gc
import itertools
import multiprocessing as mp
import os
import threading
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Sequence

MIN_PARALLEL_BYTES = 4 << 20   # below this, process start-up costs more than it saves

_JOB: tuple[Callable[[Any, Any], Any], Any] | None = None
_IN_WORKER = False   # set in forked workers: a job that itself calls parallel_map stays in-process


def worker_count(work_bytes: int, items: int) -> int:
    env = os.environ.get("CACHEGEN_WORKERS")
    try:
        n = int(env) if env else len(os.sched_getaffinity(0))
    except (ValueError, AttributeError):
        n = os.cpu_count() or 1
    if n <= 1 or items <= 1 or work_bytes < MIN_PARALLEL_BYTES or "fork" not in mp.get_all_start_methods():
        return 1
    return min(n, items, 16)


def _run(item: Any) -> Any:
    global _IN_WORKER
    _IN_WORKER = True
    if gc.isenabled():   # per job: an initializer=gc.disable alone left it on under Python 3.12 (H200)
        gc.disable()
    fn, state = _JOB  # type: ignore[misc]
    return fn(state, item)


def parallel_imap(fn: Callable[[Any, Any], Any], state: Any, items: Iterable[Any], workers: int,
                  window: int = 0) -> Iterator[Any]:
    """fn(state, item) for each item, yielded in order, computed on `workers` forked processes.

    At most `window` (default 2 * workers) items are in flight, so results are not piled up
    faster than the caller consumes them; the first error stops the pool (pending items are
    cancelled, not run) and is raised here."""
    global _JOB
    # _JOB is one per process, and a fork from a helper thread (e.g. the store's background
    # writer) would race the main thread's jobs: off the main thread, work stays in-process.
    # Nor inside a worker: a nested pool would reset the worker's own _JOB when it finishes.
    if workers <= 1 or _IN_WORKER or threading.current_thread() is not threading.main_thread():
        for it in items:
            yield fn(state, it)
        return
    _JOB = (fn, state)   # set before the pool forks its workers: they inherit it
    # A worker should never free the parent's objects (e.g. a garbage cycle holding a CUDA
    # tensor: a CUDA call in a forked child fails; an encode next to an ORT CUDA session lost a
    # worker to cudaErrorInitializationError on the H200, cause not pinned down). Freeze the
    # parent's heap before the forks; the workers keep their collector off (_run).
    gc.freeze()
    ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"))
    pending: deque = deque()
    try:
        source = iter(items)
        for it in itertools.islice(source, window or 2 * workers):
            pending.append(ex.submit(_run, it))
        while pending:
            result = pending.popleft().result()
            for it in itertools.islice(source, 1):
                pending.append(ex.submit(_run, it))
            yield result
    finally:
        for f in pending:
            f.cancel()
        ex.shutdown(wait=True, cancel_futures=True)
        gc.unfreeze()
        _JOB = None


def parallel_map(fn: Callable[[Any, Any], Any], state: Any, items: Sequence[Any], workers: int) -> list:
    """[fn(state, item) for item in items], in order, on `workers` forked processes (see parallel_imap)."""
    return list(parallel_imap(fn, state, items, workers))
