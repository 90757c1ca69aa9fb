"""The HR-free map-back of a blend to intensities (algorithm B6, ``pacs_sr.hr_free_mapping``).

Without an HR a blend is made in z-space, each expert z-scored with its own mean ``mu_e`` and
std ``sd_e`` over the experts' mask, and mapped back to intensities:

- ``mean`` (default, the published B6 rule): with the mean of the experts' means and the mean
  of their stds, one affine map for the whole volume;
- ``weighted``: at every voxel with the blend-weighted mean and std of the experts,
  ``sd(v) = sum_e W_e(v) sd_e / sum_e W_e(v)`` and likewise ``mu(v)``, where ``W_e(v)`` are
  the weights the blend applies at ``v`` (the overlap-add of the tile weights with the
  blend's windows; with the edge-gated model ``g W_a + (1 - g) W_b``).  A one-hot weight
  (``w_t = e_m`` on every tile) then gives back the raw expert ``m`` (to the blend's 1e-8
  guard), so a gain over the best expert is what the weights add, not the mapping.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..kernels.mapping import _map_back_weighted
from .checks import as_mask_u8, readonly
from .tiling import TileGrid
from .weightmaps import blend_weight_maps


def statistic_maps(
    weights: ArrayLike, grid: TileGrid, window: str, mus: ArrayLike, sds: ArrayLike,
) -> NDArray[np.float32]:
    """Per voxel ``sum_e W_e sd_e``, ``sum_e W_e mu_e`` and ``sum_e W_e`` (float32, last axis).

    The three are overlap-adds of per-tile values (``w_t . sds``, ``w_t . mus``, ``1``), so
    they are computed as the blend's weight maps of a three-column "weight" array
    (:func:`pacs_numba.core.weightmaps.blend_weight_maps`), not expert by expert.
    """
    w = np.asarray(weights, np.float64)
    cols = np.stack([w @ np.asarray(sds, np.float64), w @ np.asarray(mus, np.float64),
                     w.sum(axis=1)], axis=1)
    return blend_weight_maps(cols, grid, window)


def map_back_weighted(
    blend_n: NDArray[np.float32],
    weights: ArrayLike,
    grid: TileGrid,
    *,
    window: str,
    mus: ArrayLike,
    sds: ArrayLike,
    brain_mask: ArrayLike | None,
    gate: NDArray[np.float32] | None = None,
) -> NDArray[np.float32]:
    """Map a z-space blend back with per-voxel blend-weighted expert statistics (in place).

    Parameters
    ----------
    blend_n : (N0, N1, N2) float32
        The blend before the map-back (``blend_patient`` with mean 0, std 1, no mask);
        overwritten and returned.
    weights : (n_tiles, M) or (n_tiles, 2M) array_like
        The tile weights the blend used (edge then flat weights with ``2M`` columns).
    grid : TileGrid
    window : {"flat", "hann"}
        The blend's mixing window.
    mus, sds : (M,) array_like
        The experts' z-score statistics.
    brain_mask : (N0, N1, N2) bool or uint8, or None
    gate : (N0, N1, N2) float32, optional
        The edge gate, required with ``2M`` weight columns.

    Returns
    -------
    (N0, N1, N2) float32

    Examples
    --------
    >>> g = TileGrid((4, 4, 4), patch_size=2, stride=2)
    >>> x = [np.full((4, 4, 4), 5.0, np.float32), np.full((4, 4, 4), 9.0, np.float32)]
    >>> w = np.tile([[0.0, 1.0]], (g.n_tiles, 1))
    >>> z = np.zeros((4, 4, 4), np.float32)  # both experts at their mean
    >>> float(map_back_weighted(z, w, g, window="flat", mus=[5.0, 9.0], sds=[1.0, 2.0],
    ...                         brain_mask=None)[0, 0, 0])
    9.0
    """
    mus64 = np.asarray(mus, np.float64).reshape(-1)
    sds64 = np.asarray(sds, np.float64).reshape(-1)
    w = np.asarray(weights, np.float64)
    m = mus64.size
    if w.shape[1] == 2 * m:
        maps = statistic_maps(w[:, :m], grid, window, mus64, sds64)
        flat = statistic_maps(w[:, m:], grid, window, mus64, sds64)
        maps -= flat
        maps *= np.asarray(gate, np.float32)[..., None]
        maps += flat
        del flat
    else:
        maps = statistic_maps(w, grid, window, mus64, sds64)
    if brain_mask is None:
        mask, use = readonly(np.zeros((1, 1, 1), np.uint8)), False
    else:
        mask, use = as_mask_u8(brain_mask, grid.shape, like="the tile grid"), True
    return _map_back_weighted(blend_n, maps, mask, use, float(np.mean(mus64)),
                              float(np.mean(sds64)))
