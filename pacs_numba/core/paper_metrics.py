"""The paper's volume metrics: 3-D MS-SSIM and MMD on morphological features (MMD-MF).

Both compare a test volume with the raw HR reference inside ``mask = reference > 0``
(unless a mask is given); volumes of different shapes are first cropped at the
origin to their common minimum shape.  The definitions, the differences from a
naive implementation and the memory cost are in docs/paper-metrics.md; the
compiled work is in :mod:`pacs_numba.kernels.paper`.
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..kernels.paper import _mmd_features, _mmd_poly_sums, _ms_ssim_3d

__all__ = [
    "MMD_N_SAMPLES",
    "MMD_SEED",
    "MS_SSIM_WEIGHTS",
    "mmd_mf",
    "ms_ssim_3d",
    "ms_ssim_geometry",
]

#: pytorch-msssim's default scale weights (finest first).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
_SIGMA = 1.5
_K1 = 0.01
_K2 = 0.03
_RANGE_FLOOR = 1e-8
#: Voxels drawn for MMD-MF, and the seed of ``np.random.RandomState`` that draws them.
MMD_N_SAMPLES = 10_000
MMD_SEED = 42
_LOG_SIGMAS = (1.0, 2.0, 4.0)
_LOG_TRUNCATE = 4.0
_STD_FLOOR = 1e-8


def _as_volume(name: str, a: object) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim != 3:
        raise InputError(f"{name} must be a 3-D volume, got shape {arr.shape}")
    if min(arr.shape) < 1:
        raise InputError(f"{name} has an empty axis: shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name} must be real-valued, got dtype {arr.dtype} (shape {arr.shape})")
    return arr


def _cropped(
    reference: object, test: object, mask: object | None, copy: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int, int]]:
    """Check, crop at the origin to the common minimum shape, make the mask.

    The volumes come back C-contiguous float32, as fresh arrays when ``copy``.
    """
    ref = _as_volume("reference", reference)
    tst = _as_volume("test", test)
    shapes = [ref.shape, tst.shape]
    msk = None
    if mask is not None:
        msk = _as_volume("mask", mask)
        shapes.append(msk.shape)
    shape = tuple(int(min(s[d] for s in shapes)) for d in range(3))
    crop = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    ref32 = np.array(ref[crop], dtype=np.float32, order="C", copy=copy or None)
    tst32 = np.array(tst[crop], dtype=np.float32, order="C", copy=copy or None)
    if msk is None:
        m = ref32 > 0
    else:
        m = np.ascontiguousarray(msk[crop]).astype(bool, copy=False)
    return ref32, tst32, m, shape  # type: ignore[return-value]


def ms_ssim_geometry(shape: tuple[int, ...]) -> tuple[int, int]:
    """Window size and number of scales MS-SSIM uses for a volume shape.

    Parameters
    ----------
    shape : tuple of int
        The (cropped) volume shape.

    Returns
    -------
    win : int
        Starts at 11, drops by 2 while ``win > 3`` and
        ``min(shape) <= (win - 1) * 16``.
    n_scales : int
        Starts at 5, drops while ``n > 1`` and ``min(shape) // 2**(n - 1) < win``;
        fewer than 2 means the metric is undefined (NaN).

    Examples
    --------
    >>> ms_ssim_geometry((197, 233, 189))
    (11, 5)
    >>> ms_ssim_geometry((23, 31, 19))
    (3, 3)
    """
    min_dim = int(min(shape))
    win = 11
    while win > 3 and min_dim <= (win - 1) * 16:
        win -= 2
    n = 5
    while n > 1 and min_dim // 2 ** (n - 1) < win:
        n -= 1
    return win, n


def _gauss_window(win: int) -> np.ndarray:
    """pytorch-msssim's 1-D window in float32: exp(-c^2 / (2 sigma^2)), c centred, sum 1."""
    coords = np.arange(win, dtype=np.float32) - np.float32(win // 2)
    g = np.exp(-(coords**2) / np.float32(2 * _SIGMA**2)).astype(np.float32)
    return (g / g.sum(dtype=np.float32)).astype(np.float32)


def ms_ssim_3d(reference: object, test: object, mask: object | None = None) -> float:
    """3-D multi-scale SSIM of ``test`` against ``reference`` (pytorch-msssim definition).

    Parameters
    ----------
    reference : (N0, N1, N2) array_like
        Raw HR reference volume.
    test : (M0, M1, M2) array_like
        Volume to score; both are cropped at the origin to the common minimum shape.
    mask : array_like of bool, optional
        Voxels to keep (cropped with the volumes); default ``reference > 0``.

    Returns
    -------
    float
        ``prod_{s < n-1} relu(mean CS_s)^w_s * relu(mean SSIM_{n-1})^w_{n-1}`` on
        float32 volumes multiplied by the mask, Gaussian window sigma 1.5 of size
        and scale count from :func:`ms_ssim_geometry`, weights the first ``n`` of
        :data:`MS_SSIM_WEIGHTS` renormalised, data range ``R = max - min`` of the
        masked reference (1.0 when below 1e-8).  NaN when fewer than 2 scales fit
        or an input holds NaN.

    Raises
    ------
    InputError
        An input is not a non-empty real 3-D array.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> hr = rng.random((40, 40, 40), dtype=np.float32)
    >>> ms_ssim_3d(hr, hr)
    1.0
    >>> 0.0 < ms_ssim_3d(hr, hr + 0.1 * rng.random((40, 40, 40))) < 1.0
    True
    """
    ref32, tst32, m, shape = _cropped(reference, test, mask, copy=True)
    win, n_scales = ms_ssim_geometry(shape)
    if n_scales < 2:
        return float("nan")
    t = ref32  # fresh copies: multiply in place (NaN * 0 stays NaN, as in the product)
    t *= m
    p = tst32
    p *= m
    data_range = float(t.max() - t.min())
    if data_range < _RANGE_FLOOR:  # False for NaN, which then propagates
        data_range = 1.0
    # The constants enter torch's float32 expressions as float32 values.
    c1 = float(np.float32((_K1 * data_range) ** 2))
    c2 = float(np.float32((_K2 * data_range) ** 2))
    g = _gauss_window(win)
    ssim_means, cs_means = _ms_ssim_3d(p, t, g, c1, c2, n_scales)
    w = np.asarray(MS_SSIM_WEIGHTS[:n_scales], dtype=np.float64)
    w = w / w.sum()
    vals = np.append(cs_means[:-1], ssim_means[-1])
    return float(np.prod(np.maximum(vals, 0.0) ** w))


def _scipy_weights(sigma: float, order: int) -> np.ndarray:
    """Return the correlation weights ``gaussian_filter1d`` applies (impulse response, reversed)."""
    from scipy import ndimage as ndi  # ~26 MB of RSS: only the paper metrics need it

    radius = int(_LOG_TRUNCATE * sigma + 0.5)
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    resp = ndi.gaussian_filter1d(impulse, sigma, order=order, mode="constant",
                                 truncate=_LOG_TRUNCATE)
    return np.ascontiguousarray(resp[::-1])


def _features(vol: np.ndarray, flat_idx: np.ndarray) -> np.ndarray:
    """Return the (M, 5) float32 features of ``vol`` at ``flat_idx``, in that order.

    The voxels are visited in increasing memory order (twice as fast on a
    full-size volume as the random sample order); each result is put back in
    its sample's row, so the order only changes speed.
    """
    weights = []
    for sigma in _LOG_SIGMAS:
        weights += [_scipy_weights(sigma, 0), _scipy_weights(sigma, 2)]
    order = np.argsort(flat_idx, kind="stable")
    out = np.empty((5, flat_idx.shape[0]), np.float32)
    _mmd_features(vol, np.ascontiguousarray(flat_idx[order]), *weights, out)
    feats = np.empty((flat_idx.shape[0], 5), np.float32)
    feats[order] = out.T
    return feats


def mmd_mf(
    reference: object,
    test: object,
    mask: object | None = None,
    *,
    n_samples: int = MMD_N_SAMPLES,
    seed: int = MMD_SEED,
) -> float:
    """Unbiased MMD^2 between the morphological features of ``test`` and ``reference``.

    Parameters
    ----------
    reference : (N0, N1, N2) array_like
        Raw HR reference volume.
    test : (M0, M1, M2) array_like
        Volume to score; both are cropped at the origin to the common minimum shape.
    mask : array_like of bool, optional
        Voxels to sample (cropped with the volumes); default ``reference > 0``.
    n_samples : int, optional
        At most this many masked voxels are used (10,000 in the paper).
    seed : int, optional
        Seed of ``np.random.RandomState(seed).choice(n, n_samples, replace=False)``,
        which picks the voxels (the same for both volumes) when more are masked.

    Returns
    -------
    float
        ``max(0, mean_{i!=j} k(x_i, x_j) + mean_{i!=j} k(y_i, y_j) - 2 mean k(x_i, y_j))``,
        ``k(a, b) = (a.b / 5 + 1)^3``, over the five float32 features (Sobel
        magnitude, LoG at sigma 1, 2, 4, 5^3 local variance) of the unmasked
        volumes at the sampled voxels, z-scored jointly over both sets (ddof 0,
        a standard deviation below 1e-8 taken as 1).  NaN for an empty mask.
        With a single voxel the two within-set means are 0.

    Raises
    ------
    InputError
        An input is not a non-empty real 3-D array, or ``n_samples < 1``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> hr = rng.random((24, 24, 24), dtype=np.float32)
    >>> abs(mmd_mf(hr, hr)) < 1e-9
    True
    >>> mmd_mf(hr, 2.0 * hr + rng.random((24, 24, 24))) > 0.0
    True
    """
    if int(n_samples) < 1:
        raise InputError(f"n_samples must be at least 1, got {n_samples}")
    ref32, tst32, m, _ = _cropped(reference, test, mask, copy=False)
    flat = np.flatnonzero(m)
    del m
    n_fg = flat.shape[0]
    if n_fg == 0:
        return float("nan")
    if n_fg > n_samples:
        idx = np.random.RandomState(seed).choice(n_fg, size=int(n_samples), replace=False)
        flat = flat[idx]
    flat = np.ascontiguousarray(flat, dtype=np.int64)
    feat_test = _features(tst32, flat)
    feat_ref = _features(ref32, flat)
    # Joint z-scoring with NumPy's float32 reductions over the (2n, 5) row-major stack,
    # the same operands in the same order as the published code.
    combined = np.concatenate([feat_test, feat_ref], axis=0)
    mu = combined.mean(axis=0)
    sd = combined.std(axis=0)
    sd[sd < _STD_FLOOR] = 1.0
    zx = np.ascontiguousarray(((feat_test - mu) / sd).T)
    zy = np.ascontiguousarray(((feat_ref - mu) / sd).T)
    n = zx.shape[1]
    sxx, syy, sxy = _mmd_poly_sums(zx, zy)
    within = float(n) * float(n - 1)
    mean_xx = sxx / within if n > 1 else 0.0
    mean_yy = syy / within if n > 1 else 0.0
    mean_xy = sxy / (float(n) * float(n))
    return float(max(0.0, mean_xx + mean_yy - 2.0 * mean_xy))
