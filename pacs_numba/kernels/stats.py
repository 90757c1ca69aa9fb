"""Per-patient statistics kernels (algorithm A3, A4).

Valid mask, masked moments, edge maximum and per-tile sums.

Every kernel reads the raw float32 volumes (read-only, C-contiguous, possibly
memory-mapped) and derives z-scored values, gradients and edge weights on the
fly, one line ``vol[v0, v1, :]`` at a time, so no normalised or gradient volume
is ever materialised (algorithm B2).  All helpers live in this module on purpose:
Numba's on-disk cache of a kernel is not invalidated when a helper imported from
another module changes.

Conventions shared by all kernels
---------------------------------
* ``hr`` is the HR volume, ``experts`` a ``numba.typed.List`` of the M expert
  volumes of the same shape.  Index ``0`` of every per-volume axis is the HR,
  ``1..M`` the experts.
* A non-finite input value (NaN, +-Inf) is read as ``0.0`` wherever a value is
  needed (z-scored values, gradient stencils, the edge map).  Such voxels are never
  in the valid mask, so they only enter statistics through their neighbours'
  gradient stencils, and no NaN can reach Q or B.
* "nearest" boundaries: stencil indices are clamped to the volume.
* Every kernel writes only arrays it allocates itself (the ``*_planes`` kernels: the
  planes they are given of their caller's arrays), so any kernel may run
  concurrently from several Python threads (given a thread-safe Numba threading
  layer, see ``_config``).  Results do not depend on the number of Numba threads:
  every output element is reduced by one thread in a fixed order.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .._config import CACHE, EDGE_EPS, FASTMATH, GRAD_OPERATORS, SD_FLOOR
from .grid import _n_anchors_one, _tile_id_one

# Operator codes as plain ints (compile-time constants for Numba).
_SOBEL = GRAD_OPERATORS["sobel"]
_PREWITT = GRAD_OPERATORS["prewitt"]
_SCHARR = GRAD_OPERATORS["scharr"]


# --------------------------------------------------------------------------- helpers


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _smoothing_weights(grad_op):
    """Return the (side, centre) weights of an operator's smoothing kernel.

    Parameters
    ----------
    grad_op : int
        Operator code from ``_config.GRAD_OPERATORS`` (0 sobel, 1 prewitt, 2 scharr).

    Returns
    -------
    w_side, w_mid : float
        Smoothing kernel ``[w_side, w_mid, w_side]``: sobel ``[1, 2, 1]``, prewitt
        ``[1, 1, 1]``, scharr ``[3, 10, 3]``.  An unknown code gives sobel (the
        wrapper rejects unknown operators before calling a kernel).

    Notes
    -----
    Pure function; thread-safe.
    """
    if grad_op == _PREWITT:
        return 1.0, 1.0
    if grad_op == _SCHARR:
        return 3.0, 10.0
    return 1.0, 2.0


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _centred_one(x, mu):
    """Return ``float64(x) - mu``, reading a non-finite ``x`` as ``0.0``.

    Parameters
    ----------
    x : float32
        Raw voxel value.
    mu : float64
        Mean to subtract.

    Returns
    -------
    float64
        ``x - mu`` if ``x`` is finite, else ``-mu``.

    Notes
    -----
    Pure function; thread-safe.  This is the only place a raw value is read.
    """
    xf = np.float64(x)
    if math.isfinite(xf):
        return xf - mu
    return -mu


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _line_values_one(vol, v0, v1, mu, inv_sd, val, row):
    """Write the z-scored values of the line ``vol[v0, v1, :]`` into ``val[row]``.

    Parameters
    ----------
    vol : (N0, N1, N2) float32
        Raw volume.
    v0, v1 : int
        Line index.
    mu, inv_sd : float64
        Mean and reciprocal (floored) standard deviation of the volume.
    val : (K, N2) float64
        Output: ``val[row, k] = (vol[v0, v1, k] - mu) * inv_sd`` (non-finite read as 0).
    row : int
        Row of ``val`` to write.

    Notes
    -----
    Serial; writes only ``val[row]``, so it is safe inside ``prange`` with
    per-thread scratch.  Like every helper here it indexes whole arrays instead of
    slicing them: a slice of a shared array costs an atomic reference-count update
    that threads would contend for.
    """
    for k in range(vol.shape[2]):
        val[row, k] = _centred_one(vol[v0, v1, k], mu) * inv_sd


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _centred32_one(x, mu32):
    """Return ``x - mu32`` in float32, reading a non-finite ``x`` as ``0.0``.

    Parameters
    ----------
    x : float32
        Raw voxel value.
    mu32 : float32
        Mean to subtract, rounded to float32.

    Returns
    -------
    float32
        ``x - mu32`` if ``x`` is finite, else ``-mu32``.

    Notes
    -----
    Pure function; thread-safe.  Used for gradient stencils only.
    """
    if math.isfinite(x):
        return x - mu32
    return -mu32


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _line_gradients_one(vol, v0, v1, mu, inv_sd, w_side, w_mid, val, grad, row, tmp):
    """Write the z-scored values and the three axis derivatives of one line.

    The derivative along axis ``d`` is the correlation with ``[-1, 0, 1]`` along
    ``d`` and with the smoothing kernel ``[w_side, w_mid, w_side]`` along the two
    other axes, boundary mode "nearest" (as ``scipy.ndimage.sobel`` /
    ``correlate1d``), of the z-scored volume ``(vol - mu) * inv_sd``.

    Parameters
    ----------
    vol : (N0, N1, N2) float32
        Raw volume.
    v0, v1 : int
        Line index.
    mu, inv_sd : float64
        Mean and reciprocal (floored) standard deviation of the volume.
    w_side, w_mid : float64
        Smoothing weights (see :func:`_smoothing_weights`).
    val : (K, N2) float64
        Output: ``val[row]`` receives the z-scored values of the line (float64,
        as :func:`_line_values_one`).
    grad : (3, K, N2) float64
        Output: ``grad[d, row]`` receives the derivative along axis ``d``.
    row : int
        Row of ``val`` and ``grad`` to write.
    tmp : (3, N2 + 2) float32
        Scratch (padded by one element at each end for the axis-2 stencil).

    Notes
    -----
    Separable scheme: one pass over the 3x3 neighbouring lines (indices clamped)
    forms, per position along axis 2, the axis-0/1-smoothed value ``p``, the
    axis-0 difference smoothed along axis 1 ``e0``, and the axis-1 difference
    smoothed along axis 0 ``e1``; a second pass applies ``[-1, 0, 1]`` to ``p``
    and the smoothing kernel to ``e0``, ``e1`` along axis 2.  The stencils are
    applied to ``x - mu`` and scaled by ``inv_sd`` at the end: the derivative
    kernel sums to zero, so this equals the stencil of the z-scored volume.
    Stencil arithmetic is float32, the precision of the reference's scipy filters
    on float32 volumes (~1e-7 relative; twice the SIMD width of float64, ~35%
    faster here); the result is scaled and stored in float64.  Non-finite raw
    values are read as 0.  Serial; writes only ``val[row]``, ``grad[:, row]`` and
    ``tmp``.
    """
    n0, n1, n2 = vol.shape
    mu32 = np.float32(mu)
    ws = np.float32(w_side)
    wm = np.float32(w_mid)
    a0 = max(v0 - 1, 0)
    a2 = min(v0 + 1, n0 - 1)
    b0 = max(v1 - 1, 0)
    b2 = min(v1 + 1, n1 - 1)
    for k in range(n2):
        x00 = _centred32_one(vol[a0, b0, k], mu32)
        x01 = _centred32_one(vol[a0, v1, k], mu32)
        x02 = _centred32_one(vol[a0, b2, k], mu32)
        x10 = _centred32_one(vol[v0, b0, k], mu32)
        x11 = _centred32_one(vol[v0, v1, k], mu32)
        x12 = _centred32_one(vol[v0, b2, k], mu32)
        x20 = _centred32_one(vol[a2, b0, k], mu32)
        x21 = _centred32_one(vol[a2, v1, k], mu32)
        x22 = _centred32_one(vol[a2, b2, k], mu32)
        s0 = ws * (x00 + x02) + wm * x01
        s1 = ws * (x10 + x12) + wm * x11
        s2 = ws * (x20 + x22) + wm * x21
        tmp[0, k + 1] = ws * (s0 + s2) + wm * s1
        tmp[1, k + 1] = s2 - s0
        tmp[2, k + 1] = ws * ((x02 - x00) + (x22 - x20)) + wm * (x12 - x10)
        val[row, k] = _centred_one(vol[v0, v1, k], mu) * inv_sd
    for i in range(3):
        tmp[i, 0] = tmp[i, 1]
        tmp[i, n2 + 1] = tmp[i, n2]
    for k in range(n2):
        grad[2, row, k] = np.float64(tmp[0, k + 2] - tmp[0, k]) * inv_sd
        grad[0, row, k] = np.float64(ws * (tmp[1, k] + tmp[1, k + 2]) + wm * tmp[1, k + 1]) * inv_sd
        grad[1, row, k] = np.float64(ws * (tmp[2, k] + tmp[2, k + 2]) + wm * tmp[2, k + 1]) * inv_sd


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _line_all_one(hr, experts, v0, v1, mus, inv_sds, w_side, w_mid, use_grad, val, grad, tmp):
    """Write one line's z-scored values (row 0 the HR, row ``e + 1`` expert ``e``).

    With ``use_grad`` also the three axis derivatives of every volume
    (:func:`_line_gradients_one`); otherwise the values only (:func:`_line_values_one`).
    Serial; writes ``val``, ``grad`` and ``tmp``.  Shared by both statistics kernels, so the
    direct and the decomposed fit read the volumes the same way.
    """
    # one call per volume with a run-time row: a literal row 0 would be a specialisation
    # of its own, compiled once more
    for r in range(len(experts) + 1):
        vol = hr if r == 0 else experts[r - 1]
        if use_grad:
            _line_gradients_one(vol, v0, v1, mus[r], inv_sds[r], w_side, w_mid, val, grad, r,
                                tmp)
        else:
            _line_values_one(vol, v0, v1, mus[r], inv_sds[r], val, r)








# --------------------------------------------------------------------------- kernels


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _valid_mask_planes(hr, experts, lo, hi, mask, bad):
    """Fill axis-0 planes ``lo:hi`` of the valid mask and of the per-plane non-finite counts.

    Parameters
    ----------
    hr : (N0, N1, N2) float32
        Raw HR volume.
    experts : numba.typed.List of M (N0, N1, N2) float32
        Raw expert volumes.
    lo, hi : int
        Planes to do.
    mask : (N0, N1, N2) uint8
        Written in those planes: 1 where ``hr`` is finite and ``> 0`` and every expert is
        finite, else 0 (algorithm A3.1 plus finiteness).
    bad : (N0, M + 1) int64
        Written in those rows: NaN/Inf voxels of the plane in the HR (column 0) and in each
        expert.

    Notes
    -----
    Plane ``i`` reads plane ``i`` of every volume only, so a caller may go slab by slab
    (``core.statistics``, to let go of each slab's mapped pages).  Parallel over planes.
    """
    n1, n2 = hr.shape[1], hr.shape[2]
    m = len(experts)
    for i in prange(lo, hi):
        mi = mask[i]
        hi_ = hr[i]
        nb = 0
        for j in range(n1):
            for k in range(n2):
                x = hi_[j, k]
                ok = math.isfinite(x)
                nb += not ok
                mi[j, k] = ok and x > 0
        bad[i, 0] = nb
        for e in range(m):
            xi = experts[e][i]
            nb = 0
            for j in range(n1):
                for k in range(n2):
                    ok = math.isfinite(xi[j, k])
                    nb += not ok
                    mi[j, k] = mi[j, k] & ok
            bad[i, e + 1] = nb


def _valid_mask(hr, experts):
    """Valid-voxel mask and per-volume count of non-finite voxels.

    ``hr`` and ``experts`` as for :func:`_valid_mask_planes`.

    Returns
    -------
    mask : (N0, N1, N2) uint8
        That kernel's mask, for every plane.
    nonfinite : (M + 1,) int64
        Number of NaN/Inf voxels in the HR (index 0) and in each expert.

    Notes
    -----
    Plain Python around :func:`_valid_mask_planes` over every plane (parallel), then the
    per-plane counts summed (integer sums: exact).  Not a kernel itself: a jitted wrapper
    passed the constant 0 as a literal and made Numba compile the planes kernel twice (once
    for that literal, once for the slab calls), ~2 CPU-seconds of every first run.
    """
    n0 = hr.shape[0]
    mask = np.empty(hr.shape, np.uint8)
    bad = np.zeros((n0, len(experts) + 1), np.int64)
    _valid_mask_planes(hr, experts, 0, n0, mask, bad)
    return mask, bad.sum(axis=0)


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _moments_planes(vols, mask, lo, hi, cnt, psum, pm2):
    """Per-plane masked count, sum and sum of squared deviations, planes ``lo:hi``.

    Parameters
    ----------
    vols : numba.typed.List of K (N0, N1, N2) float32
        Raw volumes.
    mask : (N0, N1, N2) uint8
        Voxels to use (non-zero).
    lo, hi : int
        Planes to do.
    cnt : (N0,) int64
        Written in those rows: mask voxels of the plane.
    psum, pm2 : (N0, K) float64
        Written in those rows: per volume, the plane's masked sum and the sum of squared
        deviations from the plane's own mean (an exact two-pass; the plane is still in
        cache on the second pass).  Left as they are where the plane has no mask voxel.

    Notes
    -----
    Plane ``i`` reads plane ``i`` of every volume only (slab by slab is possible, as for
    :func:`_valid_mask_planes`).  A non-finite value under the mask is read as 0.
    Parallel over planes.
    """
    k_vols = len(vols)
    n1, n2 = mask.shape[1], mask.shape[2]
    for i in prange(lo, hi):
        mi = mask[i]
        c = 0
        for j in range(n1):
            for k in range(n2):
                c += mi[j, k] != 0
        cnt[i] = c
        if c == 0:
            continue
        for e in range(k_vols):
            xi = vols[e][i]
            s = 0.0
            for j in range(n1):
                for k in range(n2):
                    if mi[j, k] != 0:
                        s += _centred_one(xi[j, k], 0.0)
            mean_i = s / c
            ss = 0.0
            for j in range(n1):
                for k in range(n2):
                    if mi[j, k] != 0:
                        d = _centred_one(xi[j, k], mean_i)
                        ss += d * d
            psum[i, e] = s
            pm2[i, e] = ss


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _merge_moments(cnt, psum, pm2):
    """Mean and floored population std per volume from per-plane partials.

    Parameters
    ----------
    cnt : (N0,) int64
    psum, pm2 : (N0, K) float64
        As :func:`_moments_planes` writes them (rows of empty planes are not read).

    Returns
    -------
    (K, 2) float64
        Row ``e``: ``[mean, max(std, SD_FLOOR)]`` (algorithm A3.2, ``ddof=0``); an empty
        mask gives ``[0.0, 1.0]``, the identity z-score.

    Notes
    -----
    Planes merged serially in order with Chan et al.'s pairwise update
    ``M2 = sum M2_i + sum n_i (mean_i - mean)^2``: accurate, and independent of the thread
    count and of how the planes were split into calls.
    """
    n0, k_vols = psum.shape
    n = 0
    for i in range(n0):
        n += cnt[i]
    out = np.empty((k_vols, 2))
    for e in range(k_vols):
        if n == 0:
            out[e, 0] = 0.0
            out[e, 1] = 1.0
            continue
        total = 0.0
        for i in range(n0):
            total += psum[i, e]
        mean = total / n
        m2 = 0.0
        for i in range(n0):
            if cnt[i] > 0:
                dm = psum[i, e] / cnt[i] - mean
                m2 += pm2[i, e] + cnt[i] * dm * dm
        out[e, 0] = mean
        out[e, 1] = max(math.sqrt(m2 / n), SD_FLOOR)
    return out


def _volume_moments(vols, mask):
    """Mean and population standard deviation of each volume over the mask.

    ``vols`` (K raw volumes) and ``mask`` as for :func:`_moments_planes`.

    Returns
    -------
    (K, 2) float64
        Row ``e``: ``[mean, max(std, SD_FLOOR)]`` of ``vols[e][mask]`` (algorithm A3.2,
        ``ddof=0``).  An empty mask gives ``[0.0, 1.0]``, the identity z-score, so
        that callers stay finite (the reference would produce NaN).

    Notes
    -----
    float64 throughout: :func:`_moments_planes` over every plane (parallel), then
    :func:`_merge_moments`.  Plain Python, as :func:`_valid_mask`.  Writes only the arrays it
    returns.
    """
    k_vols = len(vols)
    n0 = mask.shape[0]
    cnt = np.zeros(n0, np.int64)
    psum = np.zeros((n0, k_vols))
    pm2 = np.zeros((n0, k_vols))
    _moments_planes(vols, mask, 0, n0, cnt, psum, pm2)
    return _merge_moments(cnt, psum, pm2)


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _sobel_magnitude_max(hr, mu, sd, n_chunks):
    """Maximum over the whole volume of the Sobel gradient magnitude of the z-scored HR.

    Parameters
    ----------
    hr : (N0, N1, N2) float32
        Raw HR volume.
    mu, sd : float64
        HR mean and (floored) standard deviation over the mask.
    n_chunks : int
        Number of work blocks (and scratch blocks), normally the Numba thread
        count.  The result does not depend on it.

    Returns
    -------
    float64
        ``max(sqrt(S0^2 + S1^2 + S2^2))`` with ``S_d = sobel((hr - mu) / sd, axis=d,
        mode="nearest")`` (algorithm A3.4), over every voxel, masked or not.

    Notes
    -----
    Needed before the fused pass because the edge weight of a voxel depends on
    the global maximum.  Lines are split into ``n_chunks`` contiguous blocks
    (neighbouring lines share cache); each block keeps its own maximum of ``g^2``
    and the blocks are merged after the loop (max is exact, so the result does
    not depend on the thread count).  Non-finite raw values are read as 0.
    Writes only its own scratch; safe to run concurrently.
    """
    n0, n1, n2 = hr.shape
    n_lines = n0 * n1
    n_chunks = max(1, min(n_chunks, n_lines))
    vals = np.empty((n_chunks, 1, n2))
    ders = np.empty((n_chunks, 3, 1, n2))
    tmps = np.empty((n_chunks, 3, n2 + 2), np.float32)
    part = np.zeros(n_chunks)
    inv_sd = 1.0 / sd
    for c in prange(n_chunks):
        val = vals[c]
        der = ders[c]
        tmp = tmps[c]
        g2max = 0.0
        for line in range(c * n_lines // n_chunks, (c + 1) * n_lines // n_chunks):
            v0 = line // n1
            v1 = line - v0 * n1
            _line_gradients_one(hr, v0, v1, mu, inv_sd, 1.0, 2.0, val, der, np.int64(0), tmp)
            for k in range(n2):
                g2 = der[0, 0, k] * der[0, 0, k] + der[1, 0, k] * der[1, 0, k] \
                    + der[2, 0, k] * der[2, 0, k]
                g2max = max(g2max, g2)
        part[c] = g2max
    return math.sqrt(part.max())




# --------------------------------------------------------------------------- decomposed moments
#
# The fit's normal equations are linear in lambda_edge and lambda_grad once the edge map's
# shape (edge_power, the HR's own Sobel maximum) and the gradient operator are fixed:
#     omega (v + lambda_grad g) = mask (1 + lambda_edge t^p) (v + lambda_grad g)
#       = mask v + lambda_edge mask t^p v + lambda_grad (mask g + lambda_edge mask t^p g)
# with v a value product and g a gradient product.  The kernel below stores those four parts
# per tile (algorithm A4 decomposed), so any lambda_edge, lambda_grad follow without a volume.

PART_VALUE = 0       # sum win mask x_a x_c (and x_a y)
PART_VALUE_EDGE = 1  # sum win mask t^p x_a x_c
PART_GRAD = 2        # sum win mask sum_d G_d,a G_d,c
PART_GRAD_EDGE = 3   # sum win mask t^p sum_d G_d,a G_d,c
N_PARTS = 4


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _line_edge_one(mask, v0, v1, grad, edge_power, inv_edge, et):
    """Write the edge term ``t^p`` of one line, 0 outside the mask (algorithm A3.4).

    Parameters
    ----------
    mask : (N0, N1, N2) uint8
        Valid mask; line ``mask[v0, v1]`` is used.
    v0, v1 : int
        Line index.
    grad : (3, K, N2) float64
        ``grad[d, 0]`` holds the Sobel derivative of the z-scored HR along axis ``d``.
    edge_power : float64
        Exponent ``p``.
    inv_edge : float64
        ``1 / (max(g) + 1e-6)`` over the whole volume.
    et : (N2,) float64
        Output: ``(g * inv_edge) ** p`` where the mask is set, else 0, so that the edge
        weight of :func:`_line_weights_one` is ``1 + lambda_edge * et``.

    Notes
    -----
    Serial; writes only ``et``.  Same special cases of ``p`` as :func:`_line_weights_one`.
    """
    for k in range(et.shape[0]):
        if mask[v0, v1, k] != 0:
            g0 = grad[0, 0, k]
            g1 = grad[1, 0, k]
            g2 = grad[2, 0, k]
            t = math.sqrt(g0 * g0 + g1 * g1 + g2 * g2) * inv_edge
            if edge_power == 1.0:
                et[k] = t
            elif edge_power == 2.0:
                et[k] = t * t
            elif edge_power == 0.5:
                et[k] = math.sqrt(t)
            else:
                et[k] = t**edge_power
        else:
            et[k] = 0.0


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _add_term_one(val, grad, wp, we, a, c, t, use_edge, use_grad, acc):
    """Add the products of volumes ``a`` and ``c`` of one line to term ``t`` of every part.

    Parameters
    ----------
    val : (M + 1, N2) float64
        z-scored values of the line (row 0 HR).
    grad : (3, M + 1, N2) float64
        Their derivatives (read only if ``use_grad``).
    wp, we : (N2,) float64
        Plain weight ``win * mask`` and edge weight ``win * mask * t^p``.
    a, c : int
        Rows of ``val`` to multiply.
    t : int
        Term index.
    use_edge, use_grad : bool
        Which of the parts ``PART_VALUE_EDGE``, ``PART_GRAD``, ``PART_GRAD_EDGE`` to fill.
    acc : (4, n_terms, N2) float64
        Updated in place.

    Notes
    -----
    Serial; writes only ``acc``.
    """
    n2 = val.shape[1]
    # One loop per combination of parts: each product is formed once per voxel and feeds
    # every part that uses it; no branch inside a loop, so each vectorises.
    if use_grad and use_edge:
        for k in range(n2):
            pv = val[a, k] * val[c, k]
            pg = grad[0, a, k] * grad[0, c, k] + grad[1, a, k] * grad[1, c, k] \
                + grad[2, a, k] * grad[2, c, k]
            acc[0, t, k] += wp[k] * pv
            acc[1, t, k] += we[k] * pv
            acc[2, t, k] += wp[k] * pg
            acc[3, t, k] += we[k] * pg
    elif use_grad:
        for k in range(n2):
            acc[0, t, k] += wp[k] * (val[a, k] * val[c, k])
            acc[2, t, k] += wp[k] * (grad[0, a, k] * grad[0, c, k]
                                     + grad[1, a, k] * grad[1, c, k]
                                     + grad[2, a, k] * grad[2, c, k])
    elif use_edge:
        for k in range(n2):
            pv = val[a, k] * val[c, k]
            acc[0, t, k] += wp[k] * pv
            acc[1, t, k] += we[k] * pv
    else:
        for k in range(n2):
            acc[0, t, k] += wp[k] * (val[a, k] * val[c, k])


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _flush_box_row_one(acc, cnt, r_base, t2, patch, stride, win2, out, counts):
    """Reduce a tile row's per-position accumulators into its tiles' parts and counts.

    Parameters
    ----------
    acc : (4, n_terms, N2) float64
        Accumulators summed over the row's lines; zeroed on return.
    cnt : (N2,) int64
        Mask voxels per position (of lines with a non-zero window); zeroed on return.
    r_base : int
        Id of the row's first tile.
    t2 : int
        Number of tiles along axis 2.
    patch, stride : int
        Box edge and anchor spacing along axis 2.
    win2 : (t2, patch) float32
        Window of every tile along axis 2 (zeros past the clipped box).
    out : (n_tiles, 4, n_terms) float64
        Written for the row's tiles.
    counts : (n_tiles,) int64
        Written for the row's tiles: mask voxels with a non-zero window weight.

    Notes
    -----
    Serial; the caller guarantees one thread owns the row's tiles.  With ``patch ==
    stride`` and a flat window every position belongs to one tile with weight 1, which
    is exactly the label partition of algorithm A2.  Sums run in a fixed order.
    """
    n_parts = acc.shape[0]
    n_terms = acc.shape[1]
    n2 = acc.shape[2]
    for j2 in range(t2):
        lo = j2 * stride
        hi = min(lo + patch, n2)
        r = r_base + j2
        n = 0
        for k in range(lo, hi):
            if win2[j2, k - lo] != 0:
                n += cnt[k]
        counts[r] = n
        for p in range(n_parts):
            for t in range(n_terms):
                s = 0.0
                for k in range(lo, hi):
                    s += np.float64(win2[j2, k - lo]) * acc[p, t, k]
                out[r, p, t] = s
    for k in range(n2):
        cnt[k] = 0
        for p in range(n_parts):
            for t in range(n_terms):
                acc[p, t, k] = 0.0


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _box_chunk_one(
    hr, experts, mask, patch, stride, win0, win1, win2, mus, inv_sds, edge_power, inv_edge,
    use_edge, use_grad, reuse_hr, w_side, w_mid, c, n_chunks, val, grad, sob, tmp, et, wp, we,
    acc, cnt, out, counts,
):
    """Fill the tiles of the tile-grid rows ``c, c + n_chunks, ...``: one chunk of the kernel.

    The parameters are :func:`_box_moments`'s; the rest is the chunk's scratch.

    Serial; writes only its own scratch and its rows' tiles of ``out`` and ``counts``.
    """
    n0, n1, n2 = hr.shape
    m = len(experts)
    t1 = _n_anchors_one(n1, stride)
    t2 = _n_anchors_one(n2, stride)
    n_rows = _n_anchors_one(n0, stride) * t1
    for row in range(c, n_rows, n_chunks):
        j0 = row // t1
        j1 = row - j0 * t1
        a0 = j0 * stride
        a1 = j1 * stride
        for v0 in range(a0, min(a0 + patch, n0)):
            w0 = np.float64(win0[j0, v0 - a0])
            if w0 == 0.0:
                continue
            for v1 in range(a1, min(a1 + patch, n1)):
                w01 = w0 * np.float64(win1[j1, v1 - a1])
                if w01 == 0.0:
                    continue
                n_in = 0
                for k in range(n2):
                    inside = mask[v0, v1, k] != 0
                    n_in += inside
                    cnt[k] += inside
                if n_in == 0:
                    continue
                _line_all_one(hr, experts, v0, v1, mus, inv_sds, w_side, w_mid, use_grad, val,
                              grad, tmp)
                if use_edge:
                    if reuse_hr:
                        _line_edge_one(mask, v0, v1, grad, edge_power, inv_edge, et)
                    else:
                        _line_gradients_one(hr, v0, v1, mus[0], inv_sds[0], 1.0, 2.0,
                                            val, sob, np.int64(0), tmp)
                        _line_edge_one(mask, v0, v1, sob, edge_power, inv_edge, et)
                    for k in range(n2):
                        we[k] = w01 * et[k]
                for k in range(n2):
                    wp[k] = w01 if mask[v0, v1, k] != 0 else 0.0
                t = m
                for a in range(1, m + 1):
                    _add_term_one(val, grad, wp, we, a, np.int64(0), a - 1, use_edge, use_grad,
                                  acc)
                    for cc in range(a, m + 1):
                        _add_term_one(val, grad, wp, we, a, cc, t, use_edge, use_grad, acc)
                        t += 1
        _flush_box_row_one(acc, cnt, _tile_id_one(j0, j1, 0, t1, t2), t2, patch, stride,
                           win2, out, counts)


def _box_moments(
    hr, experts, mask, patch, stride, win0, win1, win2, mus, sds, edge_power, gmax,
    use_edge, use_grad, grad_op, n_chunks, run_chunks=None,
):
    """Per-tile decomposed normal equations over window-weighted boxes (algorithm A4).

    Parameters
    ----------
    hr : (N0, N1, N2) float32
        Raw HR volume.
    experts : numba.typed.List of M (N0, N1, N2) float32
        Raw expert volumes.
    mask : (N0, N1, N2) uint8
        Valid mask (see :func:`_valid_mask`).
    patch, stride : int
        Tile box edge and anchor spacing.  ``patch == stride`` with flat windows gives the
        label cells of algorithm A2 (the published "first stride block" fit).
    win0, win1, win2 : (n_d, patch) float32
        Window of every tile along each axis (``kernels.blend._window_table``); the
        voxel weight is the product of the three.
    mus, sds : (M + 1,) float64
        Mean and floored std of the HR (index 0) and each expert over the mask.
    edge_power : float64
        Exponent ``p`` of the edge term.
    gmax : float64
        :func:`_sobel_magnitude_max` of the HR (unused unless ``use_edge``).
    use_edge, use_grad : bool
        Whether to fill the edge parts and the gradient parts (others stay 0).
    grad_op : int
        Operator code (``_config.GRAD_OPERATORS``) of the gradient parts.
    n_chunks : int
        Number of work blocks (normally the Numba thread count); the result does not
        depend on it.
    run_chunks : callable, optional
        ``run_chunks(chunk, n_chunks)`` calls ``chunk(c)`` for every ``c``, in parallel
        (``resources.threads.run_chunks``); None: one after the other on this thread.

    Returns
    -------
    parts : (n_tiles, 4, M + M (M + 1) / 2) float64
        Per tile and part (``PART_VALUE``, ``PART_VALUE_EDGE``, ``PART_GRAD``,
        ``PART_GRAD_EDGE``), term ``a < M`` is the cross term with the HR of expert ``a``
        and the following terms the upper triangle ``a <= c`` of the expert products,
        row-major.  The value parts weigh ``win * mask`` (times ``t^p`` for the edge
        part) the products of z-scored values, the gradient parts the summed products of
        the three derivatives.  So ``Q = P0 + le P1 + lg (P2 + le P3)`` for the weight
        ``omega = (1 + le t^p) mask`` of algorithm A3.4.
    counts : (n_tiles,) int64
        Mask voxels with a non-zero window weight per tile.

    Notes
    -----
    Plain Python around the serial ``nogil`` :func:`_box_chunk_one`, as
    ``kernels.score._score_patient``: a ``parallel=True`` wrapper made Numba compile the
    chunk's code once more.  Chunks are the rows ``(j0, j1)`` of the tile grid,
    round-robin over ``n_chunks`` blocks; each tile is written by one chunk in a fixed
    order.  Overlapping boxes recompute the lines they share (a direct pass: at most
    ``ceil(patch/stride)^2`` times the work of the cell pass).  Lines whose window weight
    is 0 (the first voxel of a Hann box) or that have no mask voxel are skipped.
    Non-finite values are read as 0 and are never in the mask.  Writes only the arrays it
    returns; safe to run concurrently.
    """
    n0, n1, n2 = hr.shape
    m = len(experts)
    stride, patch = int(stride), int(patch)
    t0 = _n_anchors_one(n0, stride)
    t1 = _n_anchors_one(n1, stride)
    t2 = _n_anchors_one(n2, stride)
    n_tiles = t0 * t1 * t2
    n_terms = m + m * (m + 1) // 2
    out = np.zeros((n_tiles, N_PARTS, n_terms))
    counts = np.zeros(n_tiles, np.int64)
    w_side, w_mid = _smoothing_weights(int(grad_op))
    use_edge, use_grad = bool(use_edge), bool(use_grad)
    reuse_hr = use_grad and int(grad_op) == _SOBEL
    inv_edge = 1.0 / (float(gmax) + EDGE_EPS)
    inv_sds = 1.0 / np.asarray(sds, np.float64)
    mus = np.asarray(mus, np.float64)
    edge_power = float(edge_power)
    n_rows = t0 * t1
    n_chunks = max(1, min(int(n_chunks), n_rows))
    vals = np.empty((n_chunks, m + 1, n2))
    grads = np.empty((n_chunks, 3, m + 1, n2 if use_grad else 0))
    sobs = np.empty((n_chunks, 3, 1, n2 if (use_edge and not reuse_hr) else 0))
    tmps = np.empty((n_chunks, 3, n2 + 2), np.float32)
    ets = np.zeros((n_chunks, n2))
    wps = np.empty((n_chunks, n2))
    wes = np.zeros((n_chunks, n2))
    accs = np.zeros((n_chunks, N_PARTS, n_terms, n2))
    cnts = np.zeros((n_chunks, n2), np.int64)

    def chunk(c):
        _box_chunk_one(
            hr, experts, mask, patch, stride, win0, win1, win2, mus, inv_sds, edge_power,
            inv_edge, use_edge, use_grad, reuse_hr, w_side, w_mid, c, n_chunks,
            vals[c], grads[c], sobs[c], tmps[c], ets[c], wps[c], wes[c], accs[c], cnts[c],
            out, counts,
        )

    if run_chunks is None:
        for c in range(n_chunks):
            chunk(c)
    else:
        run_chunks(chunk, n_chunks)
    return out, counts
