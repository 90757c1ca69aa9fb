"""Kernels of the two paper metrics: 3-D MS-SSIM and MMD on morphological features.

The wrappers in :mod:`pacs_numba.core.paper_metrics` check the inputs, crop,
mask, pick the window size and scale count, and combine what these kernels
return (docs/paper-metrics.md).

MS-SSIM follows the pytorch-msssim definition on float32 volumes.  Each
separable Gaussian pass (axis 0, then 1, then 2, "valid" extent) sums its taps in
float64 and stores the result in float32, exactly as ``scipy.ndimage.correlate1d``
with a float32 output does; the SSIM and CS maps are evaluated in float64 from
those float32 values (products of float32 are exact there, so identical inputs
give exactly 1 under any fast-math contraction) and averaged in float64.  One
output plane along axis 0 is produced at a time from the input planes it needs,
so no filtered volume is ever stored.

MMD-MF evaluates its five features only at the sampled voxels.  Every separable
pass of the SciPy filters it reproduces (sobel, gaussian_laplace, uniform_filter)
is rounded to float32 where SciPy stores a float32 intermediate; an intermediate
at a voxel outside the volume is, for "nearest" and "reflect" borders, the
intermediate at the mapped voxel, so a point evaluation equals the whole-volume
filter.  The unbiased polynomial-kernel MMD sums are accumulated per row in
float64 without forming any kernel matrix.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .._config import CACHE, FASTMATH

# Work blocks of the parallel loops (each with its own scratch).  A constant, not the
# thread count: numba.get_num_threads() inside a kernel defeats the on-disk cache, and
# no result depends on it (partial sums are kept per plane / per row and added in order).
_N_BLOCKS = 64
# Largest LoG radius: int(4.0 * 4 + 0.5) for sigma 4 with SciPy's truncate 4.0.
_LOG_MAX_TAPS = 33
# Columns of the kernel row evaluated at a time by _mmd_poly_sums.
_J_CHUNK = 512
# Local-variance box of the published feature (5^3, radius 2).
_BOX = 5


# --------------------------------------------------------------------------------------
# MS-SSIM
# --------------------------------------------------------------------------------------


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _ssim_plane_one(x, y, g, c1, c2, i0, acc, ring, row):
    """Sum the SSIM and CS maps over output plane ``i0`` of the valid convolution.

    Parameters
    ----------
    x, y : (N0, N1, N2) float32
        The two (masked) volumes at the current scale; ``N_d >= W``.
    g : (W,) float32
        Normalised 1-D Gaussian window.
    c1, c2 : float64
        ``(K1 R)^2`` and ``(K2 R)^2`` (rounded to float32 by the caller).
    i0 : int
        Output plane, ``0 <= i0 < N0 - W + 1``.
    acc : (5, >= N2) float64
        Scratch for the axis-0 sums of one line.
    ring : (5, W, >= N2) float32
        Scratch: the last ``W`` lines of the axis-0 pass of x, y, x*x, y*y, x*y
        (line ``i1`` in slot ``i1 % W``).
    row : (5, >= N2) float32
        Scratch: the axis-1 pass of one line.

    Returns
    -------
    ssim_sum, cs_sum : float64
        Sums over the ``(N1 - W + 1) * (N2 - W + 1)`` voxels of the plane.

    Notes
    -----
    Writes only its scratch arrays, so one set per concurrent caller.  The five
    products are formed in float32 (``x*x`` as torch stores it), every pass
    (axis 0, 1, 2) sums in float64 and is rounded to float32, and the maps are
    evaluated in float64 from those float32 values.  NaN in ``x`` or ``y``
    propagates into the sums.
    """
    n1, n2 = x.shape[1], x.shape[2]
    w = g.shape[0]
    m1 = n1 - w + 1
    m2 = n2 - w + 1
    ssim_sum = 0.0
    cs_sum = 0.0
    for j1 in range(m1):
        first = j1 + w - 1 if j1 > 0 else 0
        for i1 in range(first, j1 + w):
            slot = i1 % w
            acc[:, :n2] = 0.0
            for k in range(w):
                gk = np.float64(g[k])
                for i2 in range(n2):
                    xv = x[i0 + k, i1, i2]
                    yv = y[i0 + k, i1, i2]
                    acc[0, i2] += gk * np.float64(xv)
                    acc[1, i2] += gk * np.float64(yv)
                    acc[2, i2] += gk * np.float64(xv * xv)
                    acc[3, i2] += gk * np.float64(yv * yv)
                    acc[4, i2] += gk * np.float64(xv * yv)
            for q in range(5):
                for i2 in range(n2):
                    ring[q, slot, i2] = np.float32(acc[q, i2])
        acc[:, :n2] = 0.0
        for k in range(w):
            gk = np.float64(g[k])
            slot = (j1 + k) % w
            for q in range(5):
                for i2 in range(n2):
                    acc[q, i2] += gk * np.float64(ring[q, slot, i2])
        for q in range(5):
            for i2 in range(n2):
                row[q, i2] = np.float32(acc[q, i2])
        for j2 in range(m2):
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            s4 = 0.0
            for k in range(w):
                gk = np.float64(g[k])
                s0 += gk * np.float64(row[0, j2 + k])
                s1 += gk * np.float64(row[1, j2 + k])
                s2 += gk * np.float64(row[2, j2 + k])
                s3 += gk * np.float64(row[3, j2 + k])
                s4 += gk * np.float64(row[4, j2 + k])
            # Each filtered value is stored in float32, as torch stores it; the map is
            # then evaluated in float64, where every product of two float32 is exact,
            # so fused multiply-adds cannot break the x/y symmetry (x == y gives 1).
            mu1 = np.float64(np.float32(s0))
            mu2 = np.float64(np.float32(s1))
            mu1_sq = mu1 * mu1
            mu2_sq = mu2 * mu2
            mu1_mu2 = mu1 * mu2
            sig1 = np.float64(np.float32(s2)) - mu1_sq
            sig2 = np.float64(np.float32(s3)) - mu2_sq
            sig12 = np.float64(np.float32(s4)) - mu1_mu2
            cs = (2.0 * sig12 + c2) / (sig1 + sig2 + c2)
            ssim_sum += (2.0 * mu1_mu2 + c1) / (mu1_sq + mu2_sq + c1) * cs
            cs_sum += cs
    return ssim_sum, cs_sum


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _ssim_scale(x, y, g, c1, c2):
    """Mean SSIM and mean CS of one scale (valid separable Gaussian filtering).

    Parameters
    ----------
    x, y : (N0, N1, N2) float32, C-contiguous
        The two volumes at this scale, every ``N_d >= W``.
    g : (W,) float32
        Normalised 1-D Gaussian window.
    c1, c2 : float64
        ``(K1 R)^2`` and ``(K2 R)^2`` (rounded to float32 by the caller).

    Returns
    -------
    ssim_mean, cs_mean : float64
        Plain means of the SSIM and CS maps over the
        ``prod(N_d - W + 1)`` valid voxels.

    Notes
    -----
    Output planes are split into at most ``_N_BLOCKS`` contiguous blocks, one
    scratch set of ``5 * (W + 3) * N2`` float32-equivalents per block, allocated
    before the loop; each plane's sums go to its own entry and are added in
    plane order afterwards, so the result depends neither on the thread count
    nor on the blocking.  NaN in the inputs gives NaN.
    """
    n0, n1, n2 = x.shape
    w = g.shape[0]
    m0 = n0 - w + 1
    m1 = n1 - w + 1
    m2 = n2 - w + 1
    n_blocks = max(1, min(_N_BLOCKS, m0))
    accs = np.empty((n_blocks, 5, n2))
    rings = np.empty((n_blocks, 5, w, n2), np.float32)
    rows = np.empty((n_blocks, 5, n2), np.float32)
    plane_ssim = np.zeros(m0)
    plane_cs = np.zeros(m0)
    for c in prange(n_blocks):
        for i0 in range(c * m0 // n_blocks, (c + 1) * m0 // n_blocks):
            s, t = _ssim_plane_one(x, y, g, c1, c2, i0, accs[c], rings[c], rows[c])
            plane_ssim[i0] = s
            plane_cs[i0] = t
    count = np.float64(m0) * np.float64(m1) * np.float64(m2)
    ssim_total = 0.0
    cs_total = 0.0
    for i0 in range(m0):
        ssim_total += plane_ssim[i0]
        cs_total += plane_cs[i0]
    return ssim_total / count, cs_total / count


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _avg_pool_3d(x):
    """2x2x2 average pooling, stride 2, zero padding of ``N_d % 2`` on both sides.

    Parameters
    ----------
    x : (N0, N1, N2) float32

    Returns
    -------
    (M0, M1, M2) float32
        ``M_d = (N_d + 2 p_d - 2) // 2 + 1`` with ``p_d = N_d % 2``; each value is
        the sum of its 8 cells (padding counts as 0) divided by 8, summed in
        float64 and rounded once (torch ``avg_pool3d``, ``count_include_pad``).

    Notes
    -----
    Writes only the new array, one output plane per iteration.  NaN propagates.
    """
    n0, n1, n2 = x.shape
    p0, p1, p2 = n0 % 2, n1 % 2, n2 % 2
    m0 = (n0 + 2 * p0 - 2) // 2 + 1
    m1 = (n1 + 2 * p1 - 2) // 2 + 1
    m2 = (n2 + 2 * p2 - 2) // 2 + 1
    out = np.empty((m0, m1, m2), np.float32)
    for j0 in prange(m0):
        for j1 in range(m1):
            for j2 in range(m2):
                s = 0.0
                for t0 in range(2):
                    i0 = 2 * j0 + t0 - p0
                    if i0 < 0 or i0 >= n0:
                        continue
                    for t1 in range(2):
                        i1 = 2 * j1 + t1 - p1
                        if i1 < 0 or i1 >= n1:
                            continue
                        for t2 in range(2):
                            i2 = 2 * j2 + t2 - p2
                            if i2 < 0 or i2 >= n2:
                                continue
                            s += np.float64(x[i0, i1, i2])
                out[j0, j1, j2] = np.float32(s / 8.0)
    return out


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _ms_ssim_3d(x, y, g, c1, c2, n_scales):
    """Per-scale mean SSIM and mean CS of the MS-SSIM pyramid.

    Parameters
    ----------
    x, y : (N0, N1, N2) float32, C-contiguous
        Masked test and reference volumes (scale 0).
    g : (W,) float32
        Normalised 1-D Gaussian window.
    c1, c2 : float64
        ``(K1 R)^2`` and ``(K2 R)^2`` (rounded to float32 by the caller).
    n_scales : int
        Number of scales; the caller guarantees every dimension of every scale
        is at least ``W``.

    Returns
    -------
    ssim_means, cs_means : (n_scales,) float64
        Plain means of the SSIM and CS maps at each scale.

    Notes
    -----
    Serial driver around the parallel :func:`_ssim_scale` and
    :func:`_avg_pool_3d`; allocates the pooled volumes (1/8 of the previous scale
    each) and its two outputs, writes nothing else.  NaN propagates.
    """
    ssim_means = np.empty(n_scales)
    cs_means = np.empty(n_scales)
    a = x
    b = y
    for s in range(n_scales):
        sm, cm = _ssim_scale(a, b, g, c1, c2)
        ssim_means[s] = sm
        cs_means[s] = cm
        if s < n_scales - 1:
            a = _avg_pool_3d(a)
            b = _avg_pool_3d(b)
    return ssim_means, cs_means


# --------------------------------------------------------------------------------------
# MMD-MF features at sampled voxels
# --------------------------------------------------------------------------------------


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _nearest_one(i, n):
    """Index ``i`` clamped to ``[0, n)`` (SciPy mode "nearest")."""
    if i < 0:
        return 0
    if i >= n:
        return n - 1
    return i


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _reflect_one(i, n):
    """Index ``i`` mapped into ``[0, n)`` by SciPy mode "reflect" (period ``2n``)."""
    m = i % (2 * n)
    if m >= n:
        m = 2 * n - 1 - m
    return m


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _sobel_axis_one(v, p0, p1, p2, a):
    """``scipy.ndimage.sobel(v, axis=a, mode="nearest")`` at one voxel, float32.

    Parameters
    ----------
    v : (N0, N1, N2) float32
    p0, p1, p2 : int
        The voxel.
    a : int
        Derivative axis (0, 1 or 2).

    Returns
    -------
    float32

    Notes
    -----
    The ``[-1, 0, 1]`` pass along ``a`` is followed by ``[1, 2, 1]`` passes along
    the other axes in increasing order, each rounded to float32 as SciPy stores
    them.  Writes nothing.  NaN propagates.
    """
    n0, n1, n2 = v.shape
    res = 0.0
    for ic in range(3):
        col = 0.0
        for ib in range(3):
            if a == 0:
                q1 = _nearest_one(p1 + ib - 1, n1)
                q2 = _nearest_one(p2 + ic - 1, n2)
                lo = v[_nearest_one(p0 - 1, n0), q1, q2]
                hi = v[_nearest_one(p0 + 1, n0), q1, q2]
            elif a == 1:
                q0 = _nearest_one(p0 + ib - 1, n0)
                q2 = _nearest_one(p2 + ic - 1, n2)
                lo = v[q0, _nearest_one(p1 - 1, n1), q2]
                hi = v[q0, _nearest_one(p1 + 1, n1), q2]
            else:
                q0 = _nearest_one(p0 + ib - 1, n0)
                q1 = _nearest_one(p1 + ic - 1, n1)
                lo = v[q0, q1, _nearest_one(p2 - 1, n2)]
                hi = v[q0, q1, _nearest_one(p2 + 1, n2)]
            d = np.float32(np.float64(hi) - np.float64(lo))
            wb = 2.0 if ib == 1 else 1.0
            col += wb * np.float64(d)
        wc = 2.0 if ic == 1 else 1.0
        res += wc * np.float64(np.float32(col))
    return np.float32(res)


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _sobel_magnitude_one(v, p0, p1, p2):
    """Float32 Sobel gradient magnitude at one voxel (mode "nearest").

    Parameters
    ----------
    v : (N0, N1, N2) float32
    p0, p1, p2 : int

    Returns
    -------
    float32
        ``sqrt(g2*g2 + g1*g1 + g0*g0)`` with ``g_d`` the Sobel derivative along
        axis ``d``, every operation rounded to float32 in that order.

    Notes
    -----
    Products and sums are formed in float64 and rounded, which is the float32
    result whatever contraction fast-math allows.  Writes nothing.
    """
    g0 = np.float64(_sobel_axis_one(v, p0, p1, p2, 0))
    g1 = np.float64(_sobel_axis_one(v, p0, p1, p2, 1))
    g2 = np.float64(_sobel_axis_one(v, p0, p1, p2, 2))
    s = np.float32(np.float64(np.float32(g2 * g2)) + np.float64(np.float32(g1 * g1)))
    s = np.float32(np.float64(s) + np.float64(np.float32(g0 * g0)))
    return np.float32(math.sqrt(np.float64(s)))


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _laplace_one(v, p0, p1, p2, gw, dw, idx, acc_g, acc_d, pass_g, pass_d, line):
    """``scipy.ndimage.gaussian_laplace(v, sigma)`` (mode "reflect") at one voxel.

    Parameters
    ----------
    v : (N0, N1, N2) float32
    p0, p1, p2 : int
        The voxel.
    gw, dw : (T,) float64
        SciPy's correlation weights of the Gaussian (order 0) and of its second
        derivative (order 2), ``T = 2 r + 1 <= 33``.
    idx : (3, >= T) int64
        Scratch: reflected indices along each axis.
    acc_g, acc_d : (>= T, >= T) float64
        Scratch: axis-0 sums.
    pass_g, pass_d : (>= T, >= T) float32
        Scratch: axis-0 pass with ``gw`` and with ``dw``.
    line : (3, >= T) float32
        Scratch: axis-1 pass of the three second derivatives.

    Returns
    -------
    float32
        ``(D0 + D1) + D2`` in float32, ``D_a`` the order-2 Gaussian derivative
        along axis ``a`` (SciPy filters axis 0, 1, 2 in turn and stores each pass
        in float32).

    Notes
    -----
    Writes only the scratch arrays.  NaN within the reach of the kernel
    propagates.
    """
    n0, n1, n2 = v.shape
    t = gw.shape[0]
    r = t // 2
    for k in range(t):
        idx[0, k] = _reflect_one(p0 + k - r, n0)
        idx[1, k] = _reflect_one(p1 + k - r, n1)
        idx[2, k] = _reflect_one(p2 + k - r, n2)
    for j1 in range(t):
        for j2 in range(t):
            acc_g[j1, j2] = 0.0
            acc_d[j1, j2] = 0.0
    for k in range(t):
        q0 = idx[0, k]
        wg = gw[k]
        wd = dw[k]
        for j1 in range(t):
            q1 = idx[1, j1]
            for j2 in range(t):
                val = np.float64(v[q0, q1, idx[2, j2]])
                acc_g[j1, j2] += wg * val
                acc_d[j1, j2] += wd * val
    for j1 in range(t):
        for j2 in range(t):
            pass_g[j1, j2] = np.float32(acc_g[j1, j2])
            pass_d[j1, j2] = np.float32(acc_d[j1, j2])
    for j2 in range(t):
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        for j1 in range(t):
            s0 += gw[j1] * np.float64(pass_d[j1, j2])
            s1 += dw[j1] * np.float64(pass_g[j1, j2])
            s2 += gw[j1] * np.float64(pass_g[j1, j2])
        line[0, j2] = np.float32(s0)
        line[1, j2] = np.float32(s1)
        line[2, j2] = np.float32(s2)
    d0 = 0.0
    d1 = 0.0
    d2 = 0.0
    for j2 in range(t):
        d0 += gw[j2] * np.float64(line[0, j2])
        d1 += gw[j2] * np.float64(line[1, j2])
        d2 += dw[j2] * np.float64(line[2, j2])
    s = np.float32(np.float64(np.float32(d0)) + np.float64(np.float32(d1)))
    return np.float32(np.float64(s) + np.float64(np.float32(d2)))


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _local_variance_one(v, p0, p1, p2, box_m, box_q):
    """Local variance over the 5^3 box at one voxel, mode "nearest", float32.

    Parameters
    ----------
    v : (N0, N1, N2) float32
    p0, p1, p2 : int
    box_m, box_q : (5, 5) float32
        Scratch: axis-0 box means of ``v`` and of ``float32(v*v)``.

    Returns
    -------
    float32
        ``max(U(v*v) - U(v)*U(v), 0)`` with ``U`` the 5^3 ``uniform_filter``
        (three passes, axis 0, 1, 2, each a float64 mean stored in float32).

    Notes
    -----
    SciPy's running mean and this direct mean agree to float64 rounding before
    the float32 store.  Writes only the scratch arrays.  NaN propagates.
    """
    n0, n1, n2 = v.shape
    h = _BOX // 2
    for j1 in range(_BOX):
        q1 = _nearest_one(p1 + j1 - h, n1)
        for j2 in range(_BOX):
            q2 = _nearest_one(p2 + j2 - h, n2)
            sm = 0.0
            sq = 0.0
            for k in range(_BOX):
                val = v[_nearest_one(p0 + k - h, n0), q1, q2]
                sm += np.float64(val)
                sq += np.float64(np.float32(np.float64(val) * np.float64(val)))
            box_m[j1, j2] = np.float32(sm / _BOX)
            box_q[j1, j2] = np.float32(sq / _BOX)
    mean = 0.0
    mean_sq = 0.0
    for j2 in range(_BOX):
        sm = 0.0
        sq = 0.0
        for j1 in range(_BOX):
            sm += np.float64(box_m[j1, j2])
            sq += np.float64(box_q[j1, j2])
        mean += np.float64(np.float32(sm / _BOX))
        mean_sq += np.float64(np.float32(sq / _BOX))
    m = np.float64(np.float32(mean / _BOX))
    var = np.float32(np.float64(np.float32(mean_sq / _BOX)) - np.float64(np.float32(m * m)))
    if var < 0:
        return np.float32(0.0)
    return var


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _mmd_features(vol, flat_idx, g1, d1, g2, d2, g4, d4, out):
    """Compute the five MMD-MF features at the given voxels.

    Parameters
    ----------
    vol : (N0, N1, N2) float32, C-contiguous
        Unmasked volume.
    flat_idx : (M,) int64
        C-order flat indices of the voxels, each in ``[0, N0*N1*N2)``.
    g1, d1, g2, d2, g4, d4 : (T_s,) float64
        SciPy correlation weights of the order-0 and order-2 Gaussian at sigma
        1, 2 and 4 (``T_s = 9, 17, 33``).
    out : (5, M) float32
        Written: Sobel magnitude, LoG at sigma 1, 2, 4, local variance, for
        each voxel in the order of ``flat_idx``.

    Returns
    -------
    None

    Notes
    -----
    Equal, up to float64 summation order before each float32 store, to the
    whole-volume SciPy filters of the published feature extractor read at the
    same voxels.  Voxels are split into contiguous blocks with one scratch set
    each (allocated before the loop); each voxel writes only its column of
    ``out``.  Memory: about 26 kB of scratch per block.  NaN propagates to the features whose
    filter reaches it.
    """
    n0, n1, n2 = vol.shape
    m = flat_idx.shape[0]
    n_blocks = max(1, min(_N_BLOCKS, m))
    t = _LOG_MAX_TAPS
    idxs = np.empty((n_blocks, 3, t), np.int64)
    accs_g = np.empty((n_blocks, t, t))
    accs_d = np.empty((n_blocks, t, t))
    passes_g = np.empty((n_blocks, t, t), np.float32)
    passes_d = np.empty((n_blocks, t, t), np.float32)
    lines = np.empty((n_blocks, 3, t), np.float32)
    boxes_m = np.empty((n_blocks, _BOX, _BOX), np.float32)
    boxes_q = np.empty((n_blocks, _BOX, _BOX), np.float32)
    plane = n1 * n2
    for c in prange(n_blocks):
        for s in range(c * m // n_blocks, (c + 1) * m // n_blocks):
            f = flat_idx[s]
            p0 = f // plane
            rem = f - p0 * plane
            p1 = rem // n2
            p2 = rem - p1 * n2
            out[0, s] = _sobel_magnitude_one(vol, p0, p1, p2)
            out[1, s] = _laplace_one(vol, p0, p1, p2, g1, d1, idxs[c], accs_g[c],
                                     accs_d[c], passes_g[c], passes_d[c], lines[c])
            out[2, s] = _laplace_one(vol, p0, p1, p2, g2, d2, idxs[c], accs_g[c],
                                     accs_d[c], passes_g[c], passes_d[c], lines[c])
            out[3, s] = _laplace_one(vol, p0, p1, p2, g4, d4, idxs[c], accs_g[c],
                                     accs_d[c], passes_g[c], passes_d[c], lines[c])
            out[4, s] = _local_variance_one(vol, p0, p1, p2, boxes_m[c], boxes_q[c])


# --------------------------------------------------------------------------------------
# MMD: polynomial-kernel sums without kernel matrices
# --------------------------------------------------------------------------------------


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _mmd_poly_sums(fx, fy):
    """Off-diagonal and cross sums of the cubic polynomial kernel.

    Parameters
    ----------
    fx, fy : (D, N) float32, C-contiguous
        Feature-major samples of the two sets (same ``N``).

    Returns
    -------
    sxx, syy : float64
        ``sum_{i != j} k(x_i, x_j)`` and ``sum_{i != j} k(y_i, y_j)``.
    sxy : float64
        ``sum_{i, j} k(x_i, y_j)``.

    Notes
    -----
    ``k(a, b) = (a.b / D + 1)^3`` evaluated in float64 from the float32
    features.  One parallel pass over rows: each row computes its three
    dot-product rows ``_J_CHUNK`` columns at a time (scratch
    ``(blocks, 3, _J_CHUNK)`` float64, allocated before the loop), sums its
    kernel row, subtracts its own diagonal term from the two within-set sums and
    stores the three row sums in its own entries; the row sums are added in row
    order after the loop.  Memory O(N) (three float64 row-sum vectors), no
    ``N x N`` matrix.  NaN features give NaN sums.
    """
    d, n = fx.shape
    n_blocks = max(1, min(_N_BLOCKS, n))
    dots = np.empty((n_blocks, 3, _J_CHUNK))
    row_xx = np.zeros(n)
    row_yy = np.zeros(n)
    row_xy = np.zeros(n)
    gamma = 1.0 / d
    for c in prange(n_blocks):
        dot = dots[c]
        for i in range(c * n // n_blocks, (c + 1) * n // n_blocks):
            sxx = 0.0
            syy = 0.0
            sxy = 0.0
            for j0 in range(0, n, _J_CHUNK):
                jn = min(_J_CHUNK, n - j0)
                dot[:, :jn] = 0.0
                for f in range(d):
                    a = np.float64(fx[f, i])
                    b = np.float64(fy[f, i])
                    for jj in range(jn):
                        xj = np.float64(fx[f, j0 + jj])
                        yj = np.float64(fy[f, j0 + jj])
                        dot[0, jj] += a * xj
                        dot[1, jj] += b * yj
                        dot[2, jj] += a * yj
                for jj in range(jn):
                    kxx = dot[0, jj] * gamma + 1.0
                    kyy = dot[1, jj] * gamma + 1.0
                    kxy = dot[2, jj] * gamma + 1.0
                    sxx += kxx * kxx * kxx
                    syy += kyy * kyy * kyy
                    sxy += kxy * kxy * kxy
            dxx = 0.0
            dyy = 0.0
            for f in range(d):
                a = np.float64(fx[f, i])
                b = np.float64(fy[f, i])
                dxx += a * a
                dyy += b * b
            kii = dxx * gamma + 1.0
            kjj = dyy * gamma + 1.0
            row_xx[i] = sxx - kii * kii * kii
            row_yy[i] = syy - kjj * kjj * kjj
            row_xy[i] = sxy
    sxx = 0.0
    syy = 0.0
    sxy = 0.0
    for i in range(n):
        sxx += row_xx[i]
        syy += row_yy[i]
        sxy += row_xy[i]
    return sxx, syy, sxy
