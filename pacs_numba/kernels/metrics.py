"""Metric kernels: masked error sums and slice-wise SSIM (algorithm A7.6).

The wrappers in :mod:`pacs_numba.core.metrics` turn these sums into mse, mae, psnr and
ssim.  SSIM reproduces ``skimage.metrics.structural_similarity`` with its
defaults on float32 slices: scipy's ``uniform_filter`` is separable, runs along
image axis 0 then axis 1, sums each line in float64 and stores every pass in the
float32 output; skimage then evaluates the SSIM map in float32 and averages the
map without its 3-pixel border in float64.  Only windows that lie entirely in the
slice survive that crop, so the filter's boundary mode never matters and running
float64 sums over exactly the same 7 values reproduce the filter.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._config import CACHE, FASTMATH

# skimage defaults: 7x7 uniform window, K1, K2, sample covariance.
_WIN = 7
_HALF = 3


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _metrics_plane_one(hr, pred, i0, count, sum_sq, sum_abs, hr_min, hr_max):
    """Masked error sums over one axis-0 plane; writes entry ``i0`` of each output.

    ``d = hr - pred`` in float32 over voxels with ``hr > 0`` and finite hr;
    ``sum_sq`` adds ``float32(d*d)`` and ``sum_abs`` adds ``|d|`` in float64.
    ``hr_min``/``hr_max`` are over the finite voxels of the plane (+inf/-inf if
    none).  A non-finite ``pred`` inside the mask propagates into the sums.
    """
    n1, n2 = hr.shape[1], hr.shape[2]
    cnt = 0
    s2 = 0.0
    s1 = 0.0
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    for i1 in range(n1):
        for i2 in range(n2):
            h = hr[i0, i1, i2]
            if not np.isfinite(h):
                continue
            if h < lo:
                lo = h
            if h > hi:
                hi = h
            if h > 0:
                d = h - pred[i0, i1, i2]
                dd = d * d
                cnt += 1
                s2 += np.float64(dd)
                s1 += np.float64(abs(d))
    count[i0] = cnt
    sum_sq[i0] = s2
    sum_abs[i0] = s1
    hr_min[i0] = lo
    hr_max[i0] = hi


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _volume_metrics(hr, pred):
    """Compute the masked sums behind mse, mae and psnr (algorithm A7.6).

    Parameters
    ----------
    hr, pred : (N0, N1, N2) float32, C-contiguous
        Target and prediction.

    Returns
    -------
    count : int
        Number of mask voxels (``hr > 0`` and finite).
    sum_sq : float
        ``sum float32(d*d)`` over the mask, accumulated in float64, ``d = hr - pred``
        computed in float32.
    sum_abs : float
        ``sum |d|`` over the mask, in float64.
    hr_min, hr_max : float32
        Range of the finite voxels of ``hr`` (``inf``/``-inf`` if none).

    Notes
    -----
    One ``prange`` iteration per axis-0 plane writes that plane's partial sums;
    they are added serially in plane order afterwards, so the result does not
    depend on the thread count.  NaN in ``hr`` is outside the mask and the
    range; NaN in ``pred`` inside the mask makes the sums NaN.
    """
    n0 = hr.shape[0]
    count = np.zeros(n0, np.int64)
    sum_sq = np.zeros(n0, np.float64)
    sum_abs = np.zeros(n0, np.float64)
    hr_min = np.empty(n0, np.float32)
    hr_max = np.empty(n0, np.float32)
    for i0 in prange(n0):
        _metrics_plane_one(hr, pred, i0, count, sum_sq, sum_abs, hr_min, hr_max)
    n = 0
    s2 = 0.0
    s1 = 0.0
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    for i0 in range(n0):
        n += count[i0]
        s2 += sum_sq[i0]
        s1 += sum_abs[i0]
        if hr_min[i0] < lo:
            lo = hr_min[i0]
        if hr_max[i0] > hi:
            hi = hr_max[i0]
    return n, s2, s1, lo, hi


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _gather_slice_one(hr, pred, mask, axis, s, t, p):
    """Copy slice ``s`` along ``axis`` into ``t``/``p`` as ``t*m``, ``p*m``.

    ``m`` = mask and finite hr.  Outside ``m`` both images are 0 (a non-finite
    pred there is zeroed too; the reference would multiply it by 0 and get NaN).
    Returns ``(any_mask, t_min, t_max)`` over the whole slice in float32.
    """
    n_a, n_b = t.shape
    any_mask = False
    lo = np.float32(np.inf)
    hi = np.float32(-np.inf)
    zero = np.float32(0.0)
    for i in range(n_a):
        for j in range(n_b):
            if axis == 0:
                h = hr[s, i, j]
                q = pred[s, i, j]
                m = mask[s, i, j]
            elif axis == 1:
                h = hr[i, s, j]
                q = pred[i, s, j]
                m = mask[i, s, j]
            else:
                h = hr[i, j, s]
                q = pred[i, j, s]
                m = mask[i, j, s]
            if m != 0 and np.isfinite(h):
                any_mask = True
            else:
                h = zero
                q = zero
            t[i, j] = h
            p[i, j] = q
            if h < lo:
                lo = h
            if h > hi:
                hi = h
    return any_mask, lo, hi


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _ssim_slice_one(t, p, data_range, vert, col, run):
    """Mean SSIM of one 2-D float32 slice pair, as skimage computes it.

    Parameters
    ----------
    t, p : (A, B) float32
        Masked target and prediction (``A, B >= 7``).
    data_range : float32
        ``max(t) - min(t)``.
    vert : (5, A, B) float32
        Scratch: the axis-0 pass of the uniform filter of t, p, t*t, p*p, t*p.
    col : (5, B) float64
        Scratch: running column sums.
    run : (5,) float64
        Scratch: running row sums.

    Returns
    -------
    float
        Mean of the SSIM map over rows/cols ``[3, A-3) x [3, B-3)``, float64.
        NaN if a NaN reached the map (NaN pred inside the mask).

    Notes
    -----
    Box sums are float64 running sums over the same 7 float32 values scipy's
    ``uniform_filter1d`` adds; each pass is rounded to float32 like scipy's
    float32 output, and the SSIM formula is evaluated in float32 with skimage's
    constants: ``C1 = (0.01 R)^2`` and ``C2 = (0.03 R)^2`` in float64 rounded to
    float32, ``cov_norm = 49/48``.
    """
    n_a, n_b = t.shape
    inv = 1.0 / _WIN
    r64 = np.float64(data_range)
    c1 = np.float32((0.01 * r64) ** 2)
    c2 = np.float32((0.03 * r64) ** 2)
    cov_norm = np.float32(_WIN * _WIN / (_WIN * _WIN - 1.0))
    two = np.float32(2.0)
    # Pass 1: along image axis 0, rows [3, A-3) only (the cropped map needs no more).
    for j in range(n_b):
        for c in range(5):
            col[c, j] = 0.0
    for i in range(_WIN):
        for j in range(n_b):
            a = t[i, j]
            b = p[i, j]
            col[0, j] += a
            col[1, j] += b
            col[2, j] += np.float64(a * a)
            col[3, j] += np.float64(b * b)
            col[4, j] += np.float64(a * b)
    for i in range(_HALF, n_a - _HALF):
        if i > _HALF:
            i_new = i + _HALF
            i_old = i - _HALF - 1
            for j in range(n_b):
                a = t[i_new, j]
                b = p[i_new, j]
                a0 = t[i_old, j]
                b0 = p[i_old, j]
                col[0, j] += np.float64(a) - np.float64(a0)
                col[1, j] += np.float64(b) - np.float64(b0)
                col[2, j] += np.float64(a * a) - np.float64(a0 * a0)
                col[3, j] += np.float64(b * b) - np.float64(b0 * b0)
                col[4, j] += np.float64(a * b) - np.float64(a0 * b0)
        for c in range(5):
            for j in range(n_b):
                vert[c, i, j] = np.float32(col[c, j] * inv)
    # Pass 2 along image axis 1, fused with the SSIM map and its cropped mean.
    total = 0.0
    for i in range(_HALF, n_a - _HALF):
        for c in range(5):
            acc = 0.0
            for j in range(_WIN):
                acc += np.float64(vert[c, i, j])
            run[c] = acc
        for j in range(_HALF, n_b - _HALF):
            if j > _HALF:
                j_new = j + _HALF
                j_old = j - _HALF - 1
                for c in range(5):
                    run[c] += np.float64(vert[c, i, j_new]) - np.float64(vert[c, i, j_old])
            ux = np.float32(run[0] * inv)
            uy = np.float32(run[1] * inv)
            uxx = np.float32(run[2] * inv)
            uyy = np.float32(run[3] * inv)
            uxy = np.float32(run[4] * inv)
            vx = cov_norm * (uxx - ux * ux)
            vy = cov_norm * (uyy - uy * uy)
            vxy = cov_norm * (uxy - ux * uy)
            a1 = two * ux * uy + c1
            a2 = two * vxy + c2
            b1 = ux * ux + uy * uy + c1
            b2 = vx + vy + c2
            total += np.float64((a1 * a2) / (b1 * b2))
    return total / ((n_a - 2 * _HALF) * (n_b - 2 * _HALF))


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _ssim_slices(hr, pred, mask, axis, min_range, n_chunks):
    """Slice-wise SSIM of ``hr*m`` vs ``pred*m`` along ``axis`` (algorithm A7.6).

    Parameters
    ----------
    hr, pred : (N0, N1, N2) float32, C-contiguous
        Target and prediction.
    mask : (N0, N1, N2) uint8
        Voxels that count; non-finite hr voxels are treated as outside it.
    axis : int
        ``_config.SSIM_AXES`` code: 0 axial, 1 coronal, 2 sagittal.
    min_range : float
        Slices whose ``max(t*m) - min(t*m)`` is below this are skipped
        (``SSIM_MIN_RANGE`` = 1e-7).
    n_chunks : int
        Number of work chunks (and scratch blocks), normally the Numba thread
        count.  The result does not depend on it.

    Returns
    -------
    ssim : (n_slices,) float64
        SSIM of each slice, NaN for skipped slices: no mask voxel, data range
        below ``min_range``, an in-plane side shorter than the 7-pixel window
        (skimage raises there and the reference skips the slice), or a NaN map
        (NaN pred inside the mask).

    Notes
    -----
    Slices are dealt round-robin to one chunk per thread; each chunk owns its
    scratch (allocated before the loop) and writes only its slices' entries, so
    the values do not depend on the thread count.
    """
    n0, n1, n2 = hr.shape
    if axis == 0:
        n_s, n_a, n_b = n0, n1, n2
    elif axis == 1:
        n_s, n_a, n_b = n1, n0, n2
    else:
        n_s, n_a, n_b = n2, n0, n1
    out = np.full(n_s, np.nan)
    if n_a < _WIN or n_b < _WIN or n_s == 0:
        return out
    n_chunks = max(1, min(n_chunks, n_s))
    img_t = np.empty((n_chunks, n_a, n_b), np.float32)
    img_p = np.empty((n_chunks, n_a, n_b), np.float32)
    vert = np.empty((n_chunks, 5, n_a, n_b), np.float32)
    col = np.empty((n_chunks, 5, n_b), np.float64)
    run = np.empty((n_chunks, 5), np.float64)
    for c in prange(n_chunks):
        for s in range(c, n_s, n_chunks):
            any_mask, lo, hi = _gather_slice_one(hr, pred, mask, axis, s, img_t[c], img_p[c])
            if not any_mask:
                continue
            data_range = hi - lo
            if not np.float64(data_range) >= min_range:
                continue
            out[s] = _ssim_slice_one(img_t[c], img_p[c], data_range, vert[c], col[c], run[c])
    return out
