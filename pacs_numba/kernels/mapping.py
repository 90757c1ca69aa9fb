"""Kernel of the HR-free ``weighted`` map-back (algorithm B6, ``hr_free_mapping: weighted``).

A blend made without an HR is computed in z-space (each expert z-scored with its own mean
and std) and must be mapped back to intensities.  The ``weighted`` mapping uses, at every
voxel, the mean and std of the experts weighted by the weights the blend applies there, so
a one-hot weight gives back the raw expert.  :func:`_map_back_weighted` does that last,
per-voxel step from the z-space blend and the overlap-added per-tile statistics.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._config import CACHE, FASTMATH


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _map_back_weighted(blend_n, maps, mask, use_mask, mu_fallback, sd_fallback):
    """Map a z-space blend back to intensities with per-voxel weighted statistics.

    Parameters
    ----------
    blend_n : (N0, N1, N2) float32
        The blend in z-space (``sum_e W_e(v) z_e(v)``), overwritten with the result.
    maps : (N0, N1, N2, 3) float32
        Per voxel ``sum_e W_e sd_e``, ``sum_e W_e mu_e`` and ``sum_e W_e``, the overlap-add
        of the per-tile values with the blend's windows.
    mask : (N0, N1, N2) uint8
        Brain mask (read only when ``use_mask``).
    use_mask : bool
    mu_fallback, sd_fallback : float
        Mean and std used where no window reaches (``sum_e W_e == 0``): the ``mean``
        mapping's.

    Returns
    -------
    (N0, N1, N2) float32
        ``blend_n`` itself: ``(blend_n * sd + mu) * mask`` with ``sd``, ``mu`` the weighted
        statistics divided by ``sum_e W_e``.

    Notes
    -----
    Parallel over axis-0 planes, each plane written by one iteration; float64 per voxel,
    rounded once.  Safe to run concurrently.
    """
    n0, n1, n2 = blend_n.shape
    for i in prange(n0):
        for j in range(n1):
            for k in range(n2):
                if use_mask and mask[i, j, k] == 0:
                    blend_n[i, j, k] = np.float32(0.0)
                    continue
                total = float(maps[i, j, k, 2])
                if total > 0.0:
                    sd = float(maps[i, j, k, 0]) / total
                    mu = float(maps[i, j, k, 1]) / total
                else:
                    sd = sd_fallback
                    mu = mu_fallback
                blend_n[i, j, k] = np.float32(float(blend_n[i, j, k]) * sd + mu)
    return blend_n
