"""Numba's threading layer: start it on a thread-safe layer and say which one runs (B4)."""

from __future__ import annotations

import logging
import threading

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
