"""Evaluation metrics: masked mse, mae, psnr and slice-wise SSIM (algorithm A7.6).

Public wrappers of :mod:`pacs_numba.kernels.metrics`.  The kernels return sums
and per-slice SSIM values; the scalar formulas are finished here with NumPy
float32 scalars in the reference's exact expressions, so the reported numbers
round the way the reference's do.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._config import PSNR_EPS, SSIM_AXES, SSIM_MIN_RANGE
from ..kernels.metrics import _ssim_slices, _volume_metrics
from .checks import as_mask_u8, as_volume, check_shape

log = logging.getLogger(__name__)


#: The metrics of one volume, in the order ``metrics.json`` lists them (algorithm A7.6).
#: :func:`volume_metrics` returns exactly these keys (a value without a key is an error,
#: never dropped), and the engine and :func:`aggregate` take the keys from its result.
METRIC_KEYS = ("mse", "mae", "psnr", "ssim")


def _axis_code(axis: str | int) -> int:
    if isinstance(axis, str):
        if axis not in SSIM_AXES:
            raise ValueError(f"ssim_axis must be one of {sorted(SSIM_AXES)}, got {axis!r}")
        return SSIM_AXES[axis]
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= axis <= 2:
        return int(axis)
    raise ValueError(f"axis must be 0, 1, 2 or one of {sorted(SSIM_AXES)}, got {axis!r}")


def _pair(hr: ArrayLike, pred: ArrayLike) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    t = as_volume(hr)
    p = as_volume(pred)
    check_shape(p.shape, t.shape, what="prediction", like="the HR volume")
    return t, p


def ssim_slices(
    hr: ArrayLike, pred: ArrayLike, mask: ArrayLike, axis: str | int
) -> NDArray[np.float64]:
    """SSIM of every slice along ``axis``, as the reference averages them (algorithm A7.6).

    Parameters
    ----------
    hr, pred : array_like, (N0, N1, N2)
        Target and prediction (compared as float32).
    mask : array_like of bool or uint8, (N0, N1, N2)
        Voxels that count; both images are multiplied by it (non-finite hr
        voxels count as outside it).
    axis : {"axial", "coronal", "sagittal"} or {0, 1, 2}
        Slice axis.

    Returns
    -------
    ndarray of float64, (N_axis,)
        ``skimage.metrics.structural_similarity(t*m, p*m,
        data_range=max(t*m) - min(t*m))`` with skimage's defaults (7x7 uniform
        window, K1 = 0.01, K2 = 0.03, sample covariance, 3-pixel border cropped)
        on the float32 slices; NaN where the reference skips the slice: no mask
        voxel, data range below 1e-7, NaN result, or an in-plane side shorter
        than 7 pixels (skimage raises ``ValueError`` there and the reference's
        ``except Exception`` skips the slice).

    Raises
    ------
    InputError
        On mismatched shapes.
    ValueError
        On an unknown axis.

    Notes
    -----
    Agrees with skimage to float32 rounding (at most ~3e-7 per slice mean under the
    default fast-math flags; bit-identical with ``PACS_FASTMATH=0``).  A
    non-finite prediction outside the mask is zeroed (the reference's
    ``p * m`` would turn it into NaN and drop the slice).

    Examples
    --------
    >>> import numpy as np
    >>> x = np.random.default_rng(0).random((2, 8, 9)).astype(np.float32) + 1
    >>> ssim_slices(x, x, x > 0, "axial").tolist()
    [1.0, 1.0]
    """
    t, p = _pair(hr, pred)
    m = as_mask_u8(mask, t.shape, like="the HR volume")
    return _ssim_slices(t, p, m, _axis_code(axis), SSIM_MIN_RANGE, numba.get_num_threads())


def volume_metrics(hr: ArrayLike, pred: ArrayLike, *, ssim_axis: str = "axial") -> dict[str, float]:
    """mse, mae, psnr and ssim of a prediction over the HR foreground (algorithm A7.6).

    Parameters
    ----------
    hr : array_like, (N0, N1, N2)
        HR target (float32).  The mask is ``hr > 0`` over finite voxels.
    pred : array_like, (N0, N1, N2)
        Prediction, e.g. the blend (float32).
    ssim_axis : {"axial", "coronal", "sagittal"}, optional
        Slice axis of the SSIM (0, 1, 2).

    Returns
    -------
    dict of str to float
        ``mse``: mean of ``d*d`` over the mask, ``d = hr - pred`` in float32,
        accumulated in float64.
        ``mae``: mean of ``|d|`` rounded to float32 (the reference's float32 mean).
        ``psnr``: ``20 log10((R + 1e-12) / sqrt(mse32 + 1e-12))`` in float32
        arithmetic, ``mse32`` the float32 mean of ``d*d`` and ``R = max(hr) - min(hr)``
        over the finite voxels; ``inf`` when ``mse32 == 0`` (as the reference).
        ``ssim``: mean of :func:`ssim_slices` over the slices not skipped, 0.0
        if none.

    Raises
    ------
    InputError
        On mismatched shapes.
    ValueError
        On an unknown axis.

    Warns
    -----
    UserWarning
        If the mask is empty; mse, mae and psnr are then NaN.

    Notes
    -----
    The means are computed from float64 sums and rounded once, so mae and
    mse32 may differ from NumPy's float32 pairwise means in the last float32
    digit; NaN in ``pred`` inside the mask makes mse, mae and psnr NaN.

    Examples
    --------
    >>> import numpy as np
    >>> hr = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32) + 1
    >>> m = volume_metrics(hr, hr)
    >>> m["mse"], m["psnr"], m["ssim"]
    (0.0, inf, 1.0)
    """
    t, p = _pair(hr, pred)
    axis = _axis_code(ssim_axis)
    n, sum_sq, sum_abs, hr_min, hr_max = _volume_metrics(t, p)
    # The kernel drops non-finite hr voxels itself, so hr > 0 (1 byte per voxel) is enough.
    mask = t > 0
    per_slice = _ssim_slices(
        t, p, as_mask_u8(mask, t.shape), axis, SSIM_MIN_RANGE, numba.get_num_threads()
    )
    return metrics_from_sums(n, sum_sq, sum_abs, hr_min, hr_max, per_slice)


def metrics_from_sums(
    n: int,
    sum_sq: float,
    sum_abs: float,
    hr_min: float,
    hr_max: float,
    per_slice: NDArray[np.float64],
) -> dict[str, float]:
    """Finish mse, mae, psnr and ssim from a kernel's masked sums (algorithm A7.6).

    The one place the reference's scalar expressions are evaluated, for
    :func:`volume_metrics` and the one-pass scoring of :mod:`pacs_numba.core.scoring`.

    Parameters
    ----------
    n : int
        Mask voxels (``hr > 0`` and finite).
    sum_sq, sum_abs : float
        ``sum float32(d*d)`` and ``sum |d|`` over the mask (float64 sums).
    hr_min, hr_max : float
        Range of the finite HR voxels.
    per_slice : (n_slices,) float64
        SSIM per slice, NaN where skipped.

    Returns
    -------
    dict of str to float
        ``{mse, mae, psnr, ssim}`` as :func:`volume_metrics` documents them.

    Warns
    -----
    UserWarning
        If ``n == 0``; mse, mae and psnr are then NaN.

    Examples
    --------
    >>> import numpy as np
    >>> metrics_from_sums(4, 4.0, 4.0, 0.0, 10.0, np.array([0.5, np.nan]))["mae"]
    1.0
    """
    if n == 0:
        warnings.warn("the HR volume has no voxel > 0: mse, mae and psnr are NaN", stacklevel=2)
        mse = mae = psnr = math.nan
    else:
        mse = float(sum_sq / n)
        mae = float(np.float32(sum_abs / n))
        mse32 = np.float32(sum_sq / n)
        # The reference's expression on the same float32 / Python-float operands.
        data_range = float(np.float32(hr_max) - np.float32(hr_min))
        if not mse32 > 0:
            psnr = math.inf if mse32 == 0 else math.nan
        else:
            psnr = float(
                20.0 * np.log10((data_range + PSNR_EPS) / np.sqrt(mse32 + np.float32(PSNR_EPS)))
            )
    kept = per_slice[~np.isnan(per_slice)]
    ssim = float(np.mean(kept)) if kept.size else 0.0
    return dict(zip(METRIC_KEYS, (mse, mae, psnr, ssim), strict=True))


def aggregate(metrics: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Plain mean of each metric over patients (algorithm A7.6).

    Parameters
    ----------
    metrics : sequence of mapping
        One ``{name: value}`` per patient (normally :func:`volume_metrics`), all with
        the same keys.

    Returns
    -------
    dict of str to float
        ``{name: float(np.mean([m[name] for m in metrics]))}``; empty if
        ``metrics`` is empty (the reference writes ``{}`` then).  Keys keep the
        first patient's order.

    Raises
    ------
    ValueError
        If the patients do not all have the same metric names (a metric computed for
        some patients only would otherwise be averaged over a subset or dropped).

    Examples
    --------
    >>> aggregate([{"psnr": 30.0, "ssim": 0.5}, {"psnr": 32.0, "ssim": 1.0}])
    {'psnr': 31.0, 'ssim': 0.75}
    """
    if len(metrics) == 0:
        return {}
    keys = list(metrics[0].keys())
    for i, m in enumerate(metrics):
        if set(m) != set(keys):
            raise ValueError(
                f"patient {i} has metrics {sorted(m)}; expected {sorted(keys)} like patient 0"
            )
    return {k: float(np.mean([float(m[k]) for m in metrics])) for k in keys}
