"""A tiny parallel kernel that starts Numba's threading layer (and lets us ask which it is)."""

from __future__ import annotations

import numba

from .._config import CACHE, FASTMATH


@numba.njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _parallel_probe(x):
    """Sum ``x`` (1-D float64) with a parallel reduction.

    Used once at start-up to load the threading layer; safe to call from any thread.

    Parameters
    ----------
    x : (n,) float64

    Returns
    -------
    float
        ``x.sum()``.
    """
    s = 0.0
    for i in numba.prange(x.shape[0]):
        s += x[i]
    return s
