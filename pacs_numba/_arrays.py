"""Bring arrays into the one layout every kernel is compiled for.

Kernels are compiled once for read-only, C-contiguous float32 3-D arrays, and
take the experts as a ``numba.typed.List`` of such arrays, so one compiled
kernel serves any number of experts and both memmapped and in-memory volumes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba.typed import List
from numpy.typing import ArrayLike, NDArray

from .errors import InputError


def as_volume(arr: ArrayLike) -> NDArray[np.float32]:
    """Return a read-only, C-contiguous float32 3-D view of ``arr`` (a copy only if needed)."""
    vol = np.ascontiguousarray(arr, dtype=np.float32)
    if vol.ndim != 3:
        raise InputError(f"expected a 3-D volume, got shape {vol.shape}")
    vol = vol.view(np.ndarray)  # drop np.memmap: the view still maps the same pages
    vol.flags.writeable = False
    return vol


def as_volume_list(vols: Sequence[ArrayLike], shape: tuple[int, ...] | None = None) -> List:
    """Return the volumes as a ``numba.typed.List`` of :func:`as_volume` views.

    Raises
    ------
    InputError
        If the list is empty or the shapes differ (from each other or from ``shape``).
    """
    if len(vols) == 0:
        raise InputError("need at least one expert volume")
    out = List()
    for v in vols:
        v = as_volume(v)
        if shape is not None and v.shape != tuple(shape):
            raise InputError(f"expert volume has shape {v.shape}; expected {tuple(shape)}")
        shape = v.shape
        out.append(v)
    return out
