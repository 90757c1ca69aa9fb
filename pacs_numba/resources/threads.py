"""Numba's threading layer: start it on a thread-safe layer and say which one runs (B4)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numba
import numpy as np

from ..kernels.probe import _parallel_probe

log = logging.getLogger(__name__)


_LAYER_LOCK = threading.Lock()


_LAYER: str | None = None


def ensure_threading_layer() -> str:
    """Start Numba's parallel runtime on a thread-safe layer and return its name.

    ``_config`` asks for the "threadsafe" layers (omp or tbb) before anything compiles.  If
    neither can be loaded this falls back to ``workqueue``, which is NOT safe when several
    Python threads launch parallel kernels; the engine then runs one patient at a time.
    """
    global _LAYER
    with _LAYER_LOCK:
        if _LAYER is None:

            try:
                _parallel_probe(np.ones(64))
            except ValueError as exc:  # "No threading layer could be loaded"
                log.warning("no thread-safe Numba threading layer (%s); using workqueue", exc)
                numba.config.THREADING_LAYER = "workqueue"
                _parallel_probe(np.ones(64))
            _LAYER = numba.threading_layer()
        return _LAYER


def thread_safe_layer() -> bool:
    """Whether parallel kernels may be launched from several Python threads at once."""
    return ensure_threading_layer() in {"omp", "tbb"}


_CHUNK_POOL: tuple[int, ThreadPoolExecutor] | None = None
_CHUNK_POOL_LOCK = threading.Lock()


def _chunk_pool() -> ThreadPoolExecutor:
    """Return the process's helper threads for :func:`run_chunks` (new in a forked child)."""
    global _CHUNK_POOL
    with _CHUNK_POOL_LOCK:
        if _CHUNK_POOL is None or _CHUNK_POOL[0] != os.getpid():
            # a forked child inherits the pool object but none of its threads
            size = max(1, int(numba.config.NUMBA_NUM_THREADS) - 1)
            _CHUNK_POOL = (os.getpid(), ThreadPoolExecutor(size, thread_name_prefix="chunk"))
        return _CHUNK_POOL[1]


def run_chunks(chunk: Callable[[int], Any], n: int) -> None:
    """Run ``chunk(c)`` for ``c`` in ``range(n)``: chunk 0 on this thread, the rest on helpers.

    The engine's largest kernels are serial ``nogil`` functions of one work chunk, run in
    parallel here instead of inside a ``parallel=True`` kernel: Numba compiles a parallel
    kernel's body once more in its parallel function, which cost a first run ~2-3x the
    serial kernel's compile time, and a chunk needs nothing of Numba's threading layer.
    ``n`` is the calling thread's ``numba.get_num_threads()`` (the plan's threads of its
    patient), so at most ``n - 1`` helper threads work for one caller.  Returns when every
    chunk has finished; then raises the first chunk's exception, if any.
    """
    if n <= 1:
        if n == 1:
            chunk(0)
        return
    pool = _chunk_pool()
    futures: list[Future] = [pool.submit(chunk, c) for c in range(1, n)]
    try:
        chunk(0)
    finally:
        wait(futures)
    for f in futures:
        f.result()
