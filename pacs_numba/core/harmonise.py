"""Shape harmonisation of a patient whose experts come on other grids than its HR.

The current PaCS-SR release resamples, per patient, every volume to ``S``, the element-wise
maximum of the HR's and every expert's shape, with a cubic spline (``scipy.ndimage.zoom``,
``order=3``).  pacs_numba does the same for the volumes, then cuts the tiles on ``S`` once, for
fit and blend alike (the published blend recomputes its tiles on the resampled shape, so its
fit and blend tiles disagree when the HR was the smaller one; that defect is not copied).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError

#: Spline order of the volumes (the published tool's); labels would use 0 (nearest).
VOLUME_ORDER = 3


def common_shape(shapes: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """Element-wise maximum of 3-D shapes.

    Examples
    --------
    >>> common_shape([(10, 12, 8), (11, 10, 8)])
    (11, 12, 8)
    """
    arr = np.asarray([tuple(int(n) for n in s[:3]) for s in shapes])
    if arr.ndim != 2 or arr.shape[1] != 3 or (arr < 1).any():
        raise InputError(f"expected 3-D shapes with positive axes, got {list(shapes)}")
    a, b, c = (int(n) for n in arr.max(axis=0))
    return (a, b, c)


def zoom_to(vol: ArrayLike, shape: Sequence[int], order: int = VOLUME_ORDER
            ) -> NDArray[np.float32]:
    """Resample ``vol`` to ``shape`` as the published tool does (``ndi.zoom`` by shape ratio).

    Parameters
    ----------
    vol : (N0, N1, N2) array_like
    shape : 3 ints
        Target shape.
    order : int
        Spline order: 3 for volumes, 0 (nearest) for labels.

    Returns
    -------
    (S0, S1, S2) ndarray of float32, C-contiguous
        ``scipy.ndimage.zoom(vol, shape / vol.shape, order=order)`` in float32.  zoom rounds
        its output shape, which equals ``shape`` here since the factors are exact ratios.

    Examples
    --------
    >>> zoom_to(np.ones((2, 2, 2), np.float32), (4, 4, 2)).shape
    (4, 4, 2)
    """
    v = np.asarray(vol, dtype=np.float32)
    target = tuple(int(n) for n in shape)
    if v.shape == target:
        return np.ascontiguousarray(v)
    # scipy.ndimage costs ~26 MB of RSS to import; only patients of mixed shapes need it
    import scipy.ndimage as ndi

    factors = np.asarray(target, dtype=np.float64) / np.asarray(v.shape, dtype=np.float64)
    out = ndi.zoom(v, factors, order=order)
    if out.shape != target:  # pragma: no cover - zoom rounds size * (target / size) exactly
        raise InputError(f"resampling {v.shape} to {target} gave {out.shape}")
    return np.ascontiguousarray(out, dtype=np.float32)


def zoomed_affine(affine: ArrayLike, old_shape: Sequence[int], new_shape: Sequence[int]
                  ) -> NDArray[np.float64]:
    """Affine of a volume resampled from ``old_shape`` to ``new_shape`` over the same extent.

    Voxel ``j`` of the new grid sits at old voxel ``j * old / new`` (``zoom``'s default,
    corner-aligned with ``grid_mode=False``: the first and last voxel centres stay put).
    """
    a = np.asarray(affine, dtype=np.float64).reshape(4, 4)
    old = np.asarray(old_shape[:3], dtype=np.float64)
    new = np.asarray(new_shape[:3], dtype=np.float64)
    step = np.where(new > 1, (old - 1) / np.maximum(new - 1, 1), 1.0)
    return a @ np.diag([*step, 1.0])
