"""Per-patient statistics (algorithm A3-A4): valid mask, z-score moments and tile normal equations.

Public wrappers around :mod:`pacs_numba.kernels.stats`.  They check shapes and
options, bring the volumes into the one layout the kernels are compiled for
(read-only, C-contiguous float32, experts as a ``numba.typed.List``; see
:mod:`pacs_numba.core.checks`) and call the kernels.  Memory-mapped volumes are not
copied.

Non-finite voxels
-----------------
The reference algorithm assumes finite volumes (a NaN would turn the whole
tile's Q and B into NaN).  Here a voxel whose HR or any expert is NaN/Inf is left
out of the mask and counted (``PatientStats.nonfinite``), and wherever a value is
still needed (gradient stencils of neighbouring voxels, the edge map) a
non-finite value is read as 0.0.  Q and B are therefore always finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numba.typed import List
from numpy.typing import ArrayLike, NDArray

from ..errors import ConfigError, InputError
from ..kernels.stats import (
    _merge_moments,
    _moments_planes,
    _valid_mask,
    _valid_mask_planes,
    _volume_moments,
)
from ..resources.pages import release_pages
from .checks import as_mask_u8, as_volume, as_volume_list, check_volume_list


@dataclass(frozen=True, eq=False)
class PatientStats:
    """Everything the fit needs from one patient (algorithm A3-A4).

    ``eq=False``: the fields are arrays, for which ``==`` is elementwise.

    Attributes
    ----------
    Q : (T, M, M) float64
        Per-tile ``sum omega x x^T + lambda_grad sum_d sum omega G_d G_d^T``
        (symmetric).
    B : (T, M) float64
        Per-tile ``sum omega x y + lambda_grad sum_d sum omega G_d H_d``.
    counts : (T,) int64
        Mask voxels per tile (label partition of algorithm A2).
    mu_hr, sd_hr : float
        HR mean and floored population std over the mask.
    mus, sds : (M,) float64
        The same for each expert (over the HR mask).
    nonfinite : (M + 1,) int64
        NaN/Inf voxels in the HR (index 0) and in each expert.
    n_mask : int
        Number of mask voxels, ``counts.sum()``.
    """

    Q: NDArray[np.float64]
    B: NDArray[np.float64]
    counts: NDArray[np.int64]
    mu_hr: float
    sd_hr: float
    mus: NDArray[np.float64]
    sds: NDArray[np.float64]
    nonfinite: NDArray[np.int64]
    n_mask: int


def check_volumes(
    hr: ArrayLike, experts: Sequence[ArrayLike]
) -> tuple[NDArray[np.float32], List]:
    """Return ``hr`` as a kernel volume and ``experts`` as a typed list, or raise InputError."""
    hr_shape = np.shape(hr)
    if len(hr_shape) != 3:
        raise InputError(f"HR volume has shape {hr_shape}; expected a 3-D volume")
    return as_volume(hr), as_volume_list(experts, hr_shape, like="the HR volume")


def valid_mask(
    hr: ArrayLike, experts: Sequence[ArrayLike], *, slab: int | None = None,
) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Voxels used by the statistics, and non-finite counts.

    Parameters
    ----------
    hr : (N0, N1, N2) array_like
        HR volume (any real dtype; converted to float32).
    experts : sequence of M (N0, N1, N2) array_like
        Expert volumes.
    slab : int, optional
        Go ``slab`` axis-0 planes at a time and give back each slab's pages of volumes
        mapped from the volume cache (:func:`by_slabs`); the same result.

    Returns
    -------
    mask : (N0, N1, N2) uint8
        1 where ``hr`` is finite and ``> 0`` and every expert is finite (algorithm A3.1,
        plus finiteness).
    nonfinite : (M + 1,) int64
        NaN/Inf voxel count of the HR (index 0) and of each expert.

    Raises
    ------
    InputError
        If a volume is not 3-D, there is no expert, or the shapes differ.

    Examples
    --------
    >>> hr = np.array([1.0, 0.0, np.nan, 2.0], np.float32).reshape(1, 1, 4)
    >>> mask, bad = valid_mask(hr, [np.ones((1, 1, 4), np.float32)])
    >>> mask.ravel().tolist(), bad.tolist()
    ([1, 0, 0, 1], [1, 0])
    """
    hr_v, ex = check_volumes(hr, experts)
    if slab is None:
        return _valid_mask(hr_v, ex)
    mask = np.empty(hr_v.shape, np.uint8)
    bad = np.zeros((hr_v.shape[0], len(ex) + 1), np.int64)
    by_slabs(hr_v.shape[0], slab, [hr_v, *map(np.asarray, experts)],
             lambda lo, hi: _valid_mask_planes(hr_v, ex, lo, hi, mask, bad))
    return mask, bad.sum(axis=0)


def by_slabs(n0: int, slab: int, volumes: Sequence[NDArray], fill) -> None:
    """Call ``fill(lo, hi)`` for axis-0 slabs of ``slab`` planes, in order, then let go of them.

    After each slab the pages of its planes are given back for every volume mapped from the
    volume cache (:func:`~pacs_numba.resources.pages.release_pages`; other arrays are left
    alone), so a pass over a patient holds a slab of its volumes at a time rather than all
    of them.  What the reads mapped around a slab's edges is given back at the end.
    """
    step = max(1, int(slab))
    for lo in range(0, n0, step):
        hi = min(lo + step, n0)
        fill(lo, hi)
        for v in volumes:
            release_pages(v, lo, hi)
    for v in volumes:
        release_pages(v)


def volume_moments(
    vol_or_list: ArrayLike | Sequence[ArrayLike], mask: ArrayLike
) -> NDArray[np.float64]:
    """Mean and floored population std of one or several volumes over a mask.

    Parameters
    ----------
    vol_or_list : (N0, N1, N2) array_like, or sequence of K of them
        Volume(s).  A single 3-D array counts as ``K = 1``.
    mask : (N0, N1, N2) array_like
        Voxels to use (non-zero / True).

    Returns
    -------
    (K, 2) float64
        ``[mean, max(std, 1e-8)]`` per volume (algorithm A3.2, ``ddof=0``), accumulated in
        float64.  An empty mask gives ``[0.0, 1.0]`` (identity z-score) instead of
        NaN.  A non-finite value under the mask is read as 0.

    Raises
    ------
    InputError
        If a volume is not 3-D or the shapes differ.

    Examples
    --------
    >>> v = np.array([1.0, 2.0, 3.0, 100.0], np.float32).reshape(1, 1, 4)
    >>> volume_moments(v, v < 10).round(6).tolist()
    [[2.0, 0.816497]]
    """
    arr = vol_or_list if isinstance(vol_or_list, np.ndarray) else None
    if arr is not None and arr.ndim == 3:
        vols = [arr]
    elif arr is not None:
        raise InputError(f"volume has shape {arr.shape}; expected a 3-D volume or a list of them")
    else:
        vols = list(vol_or_list)  # type: ignore[arg-type]
    shape = check_volume_list(vols, what="volume")
    return _volume_moments(as_volume_list(vols), as_mask_u8(mask, shape))


def normalisation(
    hr: ArrayLike, experts: Sequence[ArrayLike], mask: ArrayLike, *, slab: int | None = None,
) -> tuple[float, float, NDArray[np.float64], NDArray[np.float64]]:
    """z-score statistics of the HR and of every expert over the HR mask (algorithm A3.2-3).

    Parameters
    ----------
    hr : (N0, N1, N2) array_like
        HR volume.
    experts : sequence of M (N0, N1, N2) array_like
        Expert volumes.
    mask : (N0, N1, N2) array_like
        Voxels to use, normally :func:`valid_mask`'s mask.
    slab : int, optional
        As for :func:`valid_mask`: slab by slab, the same numbers (the per-plane partial
        sums are merged in plane order either way).

    Returns
    -------
    mu_hr, sd_hr : float
        HR mean and floored population std.
    mus, sds : (M,) float64
        The same for each expert.

    Raises
    ------
    InputError
        If a volume is not 3-D, there is no expert, or the shapes differ.

    Examples
    --------
    >>> hr = np.arange(1, 9, dtype=np.float32).reshape(2, 2, 2)
    >>> mu, sd, mus, sds = normalisation(hr, [2 * hr], hr > 0)
    >>> float(mu), float(mus[0])
    (4.5, 9.0)
    """
    hr_v, ex = check_volumes(hr, experts)
    vols = as_volume_list([hr_v, *ex])
    mask_u8 = as_mask_u8(mask, hr_v.shape)
    if slab is None:
        mom = _volume_moments(vols, mask_u8)
    else:
        n0, k = hr_v.shape[0], len(vols)
        cnt = np.zeros(n0, np.int64)
        psum = np.zeros((n0, k))
        pm2 = np.zeros((n0, k))
        by_slabs(n0, slab, [hr_v, *map(np.asarray, experts)],
                 lambda lo, hi: _moments_planes(vols, mask_u8, lo, hi, cnt, psum, pm2))
        mom = _merge_moments(cnt, psum, pm2)
    return float(mom[0, 0]), float(mom[0, 1]), mom[1:, 0].copy(), mom[1:, 1].copy()


def check_option(name: str, value: float, *, positive_only: bool = True) -> float:
    """Return ``value`` as a float; a ConfigError naming ``name`` if not finite (or negative)."""
    value = float(value)
    if not math.isfinite(value) or (positive_only and value < 0):
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


#: An HR whose std over its mask is below this fraction of its mean (or the A3.2 floor) is
#: flat: it has nothing to fit a blend to, and its PSNR would be meaningless or infinite.
FLAT_HR_RTOL = 1e-6


def hr_is_flat(mu_hr: float, sd_hr: float) -> bool:
    """Tell whether an HR has no variance inside its mask (``sd_hr`` at the std floor).

    ``sd_hr`` is the floored std of :func:`normalisation`; a constant volume gives the
    floor itself, or a rounding residue far below ``FLAT_HR_RTOL * |mu_hr|``.
    """
    return not sd_hr > max(1e-8, FLAT_HR_RTOL * abs(mu_hr))
