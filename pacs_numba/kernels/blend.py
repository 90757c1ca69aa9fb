"""Blend kernels: overlap-add of the weighted experts, weight maps, brain mask.

algorithm A7.2-A7.5 (blend, window, brain mask) and A8 (weight, entropy and
dominant-model maps).  Every function here is ``@njit``; the wrappers that check
inputs live in :mod:`pacs_numba.core.blending`.

Float32 on purpose: the reference blends in float32 numpy arrays (z-scored
copies, ``tensordot`` per tile, a float32 ``accum``/``weight`` pair, float32
windows), and compat asks for its numbers "to rounding".  The kernels therefore
keep the reference's dtype at every step and its order of accumulation (tile id
order at every voxel), so the only differences left are single roundings
(fused multiply-adds under ``FASTMATH``, BLAS summation order in the reference).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .._config import CACHE, FASTMATH
from .grid import _n_anchors_one, _tile_id_one

# --------------------------------------------------------------------------------------
# Blend (algorithm A7.2-A7.5)
# --------------------------------------------------------------------------------------


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _window_table(n_anchors, length, patch_size, stride, window):
    """1-D window of every tile along one axis (algorithm A7.2).

    Parameters
    ----------
    n_anchors : int
        Number of tiles along the axis, ``ceil(length / stride)``.
    length : int
        Volume length ``N_d`` along the axis.
    patch_size, stride : int
        Tile edge ``p`` and anchor spacing ``s``.
    window : int
        ``_config.WINDOWS`` code: 0 flat, 1 hann.

    Returns
    -------
    table : (n_anchors, patch_size) float32
        ``table[t, k]`` is the window value at offset ``k`` inside tile ``t``'s
        clipped box of length ``L = min(t*s + p, N) - t*s``; entries ``k >= L``
        are 0 and never read.

    Notes
    -----
    Hann is the periodic window of the clipped length,
    ``h[k] = 0.5 - 0.5 cos(2 pi k / L)``, evaluated exactly as the reference's
    ``scipy.signal.windows.hann(L, sym=False)`` does (``0.5 + 0.5 cos(k*step - pi)``
    with ``step = 2 pi / L``, in float64, then cast to float32).  For ``L == 1``
    scipy returns ``[1.0]`` (its length guard), not ``0.5 - 0.5 cos(0) = 0``; the
    reference blends with that value and so do we.

    Serial, allocates its output; no NaN can arise.
    """
    table = np.zeros((n_anchors, patch_size), np.float32)
    for t in range(n_anchors):
        a = t * stride
        n_box = min(a + patch_size, length) - a
        if window == 0 or n_box == 1:
            for k in range(n_box):
                table[t, k] = 1.0
        else:
            step = 2.0 * math.pi / n_box
            for k in range(n_box):
                table[t, k] = np.float32(0.5 + 0.5 * math.cos(k * step - math.pi))
    return table


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _blend_row_one(
    experts,
    weights,
    mu32,
    sd32,
    h0,
    h1,
    h2,
    i0,
    i1,
    patch_size,
    stride,
    counts1,
    counts2,
    xn,
    tmp,
    acc,
    den,
):
    """Accumulate the overlap-add numerator and denominator of one row ``(i0, i1, :)``.

    Parameters
    ----------
    experts : numba.typed.List of (N0, N1, N2) float32
        Raw expert volumes.
    weights : (n_tiles, M) float32
        Tile weights.
    mu32, sd32 : (M,) float32
        Expert z-score statistics, already rounded to float32.
    h0, h1, h2 : (n_d, patch_size) float32
        Window tables from :func:`_window_table`.
    i0, i1 : int
        Row index.
    patch_size, stride, counts1, counts2 : int
        Grid geometry (``counts_d = ceil(N_d / stride)``).
    xn : (M, N2) float32
        Scratch: the z-scored experts of the row.
    tmp : (N2,) float32
        Scratch: ``sum_m w_m x_m,n`` for the current tile (used when M > 4).
    acc, den : (N2,) float32
        Written: ``sum_tiles win * tmp`` and ``sum_tiles win`` for the row.

    Notes
    -----
    Every voxel receives the contributions of its covering tiles in increasing
    tile id, like the reference's tile loop, and in float32 like its arrays.  A
    non-finite raw expert value is read as 0.0 before z-scoring, so no NaN
    reaches ``acc``.  Serial; writes only the scratch rows it is given.
    """
    n2 = xn.shape[1]
    n_exp = xn.shape[0]
    s = stride
    p = patch_size
    for m in range(n_exp):
        vol = experts[m]
        mu = mu32[m]
        sd = sd32[m]
        for k in range(n2):
            v = vol[i0, i1, k]
            if not np.isfinite(v):
                v = np.float32(0.0)
            xn[m, k] = (v - mu) / sd
    for k in range(n2):
        acc[k] = 0.0
        den[k] = 0.0
    # Up to 4 experts get one fused loop per tile (the common case, about 3x
    # faster than one loop per expert); the sum over m stays sequential either way.
    zero = np.float32(0.0)
    last = n_exp - 1
    x0 = xn[0]
    x1 = xn[min(1, last)]
    x2 = xn[min(2, last)]
    x3 = xn[min(3, last)]
    # Tile t covers index i along an axis iff t*s <= i < t*s + p.
    t0_lo = max(0, (i0 - p) // s + 1)
    t1_lo = max(0, (i1 - p) // s + 1)
    for t0 in range(t0_lo, i0 // s + 1):
        w0 = h0[t0, i0 - t0 * s]
        for t1 in range(t1_lo, i1 // s + 1):
            w01 = w0 * h1[t1, i1 - t1 * s]
            base = _tile_id_one(t0, t1, 0, counts1, counts2)
            for t2 in range(counts2):
                a2 = t2 * s
                b2 = min(a2 + p, n2)
                wt = weights[base + t2]
                h2t = h2[t2]
                if n_exp <= 4:
                    wa = wt[0]
                    wb = wt[1] if n_exp > 1 else zero
                    wc = wt[2] if n_exp > 2 else zero
                    wd = wt[3] if n_exp > 3 else zero
                    for k in range(a2, b2):
                        v = wa * x0[k]
                        if n_exp > 1:
                            v += wb * x1[k]
                        if n_exp > 2:
                            v += wc * x2[k]
                        if n_exp > 3:
                            v += wd * x3[k]
                        win = w01 * h2t[k - a2]
                        acc[k] += win * v
                        den[k] += win
                else:
                    wa = wt[0]
                    for k in range(a2, b2):
                        tmp[k] = wa * x0[k]
                    for m in range(1, n_exp):
                        wm = wt[m]
                        xm = xn[m]
                        for k in range(a2, b2):
                            tmp[k] += wm * xm[k]
                    for k in range(a2, b2):
                        win = w01 * h2t[k - a2]
                        acc[k] += win * tmp[k]
                        den[k] += win


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _blend_volume(
    experts, weights, mus, sds, mu_hr, sd_hr, mask, use_mask, patch_size, stride, window, n_chunks
):
    """Overlap-add blend of z-scored experts with per-tile weights (algorithm A7.2-A7.5).

    Parameters
    ----------
    experts : numba.typed.List of (N0, N1, N2) float32, C-contiguous
        The M raw expert volumes (read only).
    weights : (n_tiles, M) float32
        One weight row per tile id ``r = (i0*n1 + i1)*n2 + i2``; tiles without
        a learned weight already hold ``1/M``.
    mus, sds : (M,) float64
        Each expert's z-score mean and std (rounded to float32 here, as the
        reference's ``(x - mu) / sd`` on a float32 array does).
    mu_hr, sd_hr : float
        The HR z-score mean and std used to de-normalise the blend.
    mask : (N0, N1, N2) uint8
        Brain mask applied when ``use_mask``: voxels where it is 0 are multiplied
        by 0.0, the others are kept.  Otherwise any small uint8 3-D array (not read).
    use_mask : bool
        Whether to apply ``mask``.
    patch_size, stride : int
        Tile edge ``p`` and anchor spacing ``s`` (algorithm A2).
    window : int
        ``_config.WINDOWS`` code (0 flat, 1 hann).  The caller has already
        forced flat when ``stride >= patch_size``.
    n_chunks : int
        Number of work chunks (each with its own scratch rows); a few per Numba
        thread balances the load.  The result does not depend on it.

    Returns
    -------
    blend : (N0, N1, N2) float32
        ``(acc / (den + 1e-8)) * sd_hr + mu_hr`` (times the mask), where
        ``acc = sum_tiles win * sum_m w_m x_m,n`` and ``den = sum_tiles win``
        over every tile box covering the voxel.

    Notes
    -----
    Race-free by construction: the volume is gathered row by row (each output
    row ``(i0, i1, :)`` is written by exactly one ``prange`` iteration, which
    sums the contributions of the tiles covering it), so no two threads write
    the same voxel and the result does not depend on the thread count.  Per-
    chunk scratch is allocated before the loop.

    NaN: a non-finite raw expert value is read as 0.0 (then z-scored like any
    other value), so the blend is NaN-free for finite weights and statistics.
    Safe to run concurrently from several Python threads (nogil, no shared
    mutable state) under a thread-safe threading layer.
    """
    vol0 = experts[0]
    n0, n1, n2 = vol0.shape
    n_exp = len(experts)
    s = stride
    counts0 = _n_anchors_one(n0, s)
    counts1 = _n_anchors_one(n1, s)
    counts2 = _n_anchors_one(n2, s)
    h0 = _window_table(counts0, n0, patch_size, s, window)
    h1 = _window_table(counts1, n1, patch_size, s, window)
    h2 = _window_table(counts2, n2, patch_size, s, window)
    mu32 = np.empty(n_exp, np.float32)
    sd32 = np.empty(n_exp, np.float32)
    for m in range(n_exp):
        mu32[m] = np.float32(mus[m])
        sd32[m] = np.float32(sds[m])
    mu_hr32 = np.float32(mu_hr)
    sd_hr32 = np.float32(sd_hr)
    eps32 = np.float32(1e-8)  # algorithm A7.4 (BLEND_EPS), added in float32 like the reference

    out = np.empty((n0, n1, n2), np.float32)
    n_rows = n0 * n1
    n_chunks = max(1, min(n_chunks, n_rows))
    xn = np.empty((n_chunks, n_exp, n2), np.float32)
    tmp = np.empty((n_chunks, n2), np.float32)
    acc = np.empty((n_chunks, n2), np.float32)
    den = np.empty((n_chunks, n2), np.float32)
    for c in prange(n_chunks):
        r_lo = c * n_rows // n_chunks
        r_hi = (c + 1) * n_rows // n_chunks
        xn_c = xn[c]
        tmp_c = tmp[c]
        acc_c = acc[c]
        den_c = den[c]
        for r in range(r_lo, r_hi):
            i0 = r // n1
            i1 = r - i0 * n1
            _blend_row_one(
                experts,
                weights,
                mu32,
                sd32,
                h0,
                h1,
                h2,
                i0,
                i1,
                patch_size,
                s,
                counts1,
                counts2,
                xn_c,
                tmp_c,
                acc_c,
                den_c,
            )
            for k in range(n2):
                b = acc_c[k] / (den_c[k] + eps32)
                b = b * sd_hr32 + mu_hr32
                if use_mask and mask[i0, i1, k] == 0:
                    b = b * np.float32(0.0)  # the reference multiplies by the 0/1 mask
                out[i0, i1, k] = b
    return out


# --------------------------------------------------------------------------------------
# Weight maps (algorithm A8)
# --------------------------------------------------------------------------------------


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _weight_maps(weights, n0, n1, n2, stride):
    """Per-voxel tile weights (algorithm A8 ``weight_maps``).

    Parameters
    ----------
    weights : (n_tiles, M) float32
        Tile weights, ``n_tiles = c0*c1*c2`` with ``c_d = ceil(N_d / stride)``.
    n0, n1, n2 : int
        Volume shape.
    stride : int
        Anchor spacing ``s``.

    Returns
    -------
    maps : (N0, N1, N2, M) float32
        ``maps[v] = weights[r(v)]`` with the voxel label
        ``r(v) = (floor(v0/s)*c1 + floor(v1/s))*c2 + floor(v2/s)`` (algorithm A2).

    Notes
    -----
    Each ``prange`` iteration writes its own axis-0 plane: race-free, thread-count
    independent.  Copies values, so NaN weights stay NaN.
    """
    n_exp = weights.shape[1]
    s = stride
    counts1 = _n_anchors_one(n1, s)
    counts2 = _n_anchors_one(n2, s)
    out = np.empty((n0, n1, n2, n_exp), np.float32)
    for i0 in prange(n0):
        t0 = i0 // s
        for i1 in range(n1):
            base = _tile_id_one(t0, i1 // s, 0, counts1, counts2)
            for i2 in range(n2):
                r = base + i2 // s
                for m in range(n_exp):
                    out[i0, i1, i2, m] = weights[r, m]
    return out


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _entropy_dominant_one(w, eps):
    """Entropy ``-sum w' log(w' + eps)`` (float32) and first argmax of one weight row."""
    n_exp = w.shape[0]
    total = np.float32(0.0)
    for m in range(n_exp):
        total += w[m]
    norm = total + eps
    ent = np.float32(0.0)
    for m in range(n_exp):
        wn = w[m] / norm
        ent += wn * np.float32(math.log(wn + eps))
    best = 0
    best_val = w[0]
    if not np.isnan(best_val):
        for m in range(1, n_exp):
            v = w[m]
            if np.isnan(v):
                best = m
                break
            if v > best_val:
                best = m
                best_val = v
    return -ent, best


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _weight_analysis(maps):
    """Entropy and dominant-expert maps of a weight map (algorithm A8 analysis npz).

    Parameters
    ----------
    maps : (N0, N1, N2, M) float32, C-contiguous
        Per-voxel weights.

    Returns
    -------
    entropy : (N0, N1, N2) float32
        ``-sum_m w'_m log(w'_m + 1e-10)`` with ``w' = w / (sum w + 1e-10)``,
        every step in float32 and the sums sequential over ``m`` (what NumPy's
        float32 reductions do for M < 8).  The ``+ 1e-10`` in the normaliser is
        the reference's; it changes nothing in float32 unless ``sum w < 2e-3``
        and keeps an all-zero row finite (entropy 0).
    dominant : (N0, N1, N2) int32
        ``argmax_m w_m``, the first maximum on ties, a NaN wins (``np.argmax``).

    Notes
    -----
    Each ``prange`` iteration writes its own axis-0 plane: race-free.
    """
    n0, n1, n2, n_exp = maps.shape
    eps = np.float32(1e-10)  # ENTROPY_EPS
    entropy = np.empty((n0, n1, n2), np.float32)
    dominant = np.empty((n0, n1, n2), np.int32)
    for i0 in prange(n0):
        for i1 in range(n1):
            ent_prev = np.float32(0.0)
            best_prev = 0
            for i2 in range(n2):
                w = maps[i0, i1, i2]
                # Weight maps are constant over runs of ``stride`` voxels: reuse the
                # previous voxel's result when its weights are identical (bitwise
                # equal inputs give equal outputs, so this changes no value).
                if i2 > 0:
                    same = True
                    prev = maps[i0, i1, i2 - 1]
                    for m in range(n_exp):
                        if w[m] != prev[m]:
                            same = False
                            break
                    if same:
                        entropy[i0, i1, i2] = ent_prev
                        dominant[i0, i1, i2] = best_prev
                        continue
                ent_prev, best_prev = _entropy_dominant_one(w, eps)
                entropy[i0, i1, i2] = ent_prev
                dominant[i0, i1, i2] = best_prev
    return entropy, dominant


# --------------------------------------------------------------------------------------
# Brain mask: largest 26-connected component (algorithm A7.5)
# --------------------------------------------------------------------------------------


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _find_one(parent, x):
    """Root of ``x`` with path halving.

    Every link points to a smaller raster index (``parent[x] <= x``), so a root
    is the first voxel of its tree in raster order.  Writes ``parent`` along the
    path (callers keep each thread inside its own index range).
    """
    while parent[x] != x:
        nxt = parent[parent[x]]
        parent[x] = nxt
        x = nxt
    return x


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _union_one(parent, a, b):
    """Merge the trees of ``a`` and ``b``; the smaller root index becomes the root."""
    ra = _find_one(parent, a)
    rb = _find_one(parent, b)
    if ra < rb:
        parent[rb] = ra
    elif rb < ra:
        parent[ra] = rb


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH, inline="always")
def _union_previous_plane_one(parent, v, i, j, k, n1, n2, dk_lo):
    """Link foreground voxel ``v = (i, j, k)`` to its foreground 26-neighbours in plane ``i-1``.

    The 9 of them with ``dk_lo = -1``, the 3 at ``k + 1`` with ``dk_lo = 1``.  Used inside a
    slab and again where two slabs meet; writes only through ``_union_one``.  Inlined into
    both (Numba IR): as a call the labelling pass took ~15% longer.
    """
    for dj in range(-1, 2):
        jj = j + dj
        if jj < 0 or jj >= n1:
            continue
        for dk in range(dk_lo, 2):
            kk = k + dk
            if kk < 0 or kk >= n2:
                continue
            u = ((i - 1) * n1 + jj) * n2 + kk
            if parent[u] >= 0:
                _union_one(parent, v, u)


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _label_slab_one(hr, thr, parent, lo, hi):
    """Union-find over the foreground of axis-0 planes ``[lo, hi)``.

    Sets ``parent[v] = -1`` for background voxels and links each foreground voxel
    to its 13 already-visited 26-neighbours inside the slab.  Touches only the
    ``parent`` entries of the slab, so slabs can be labelled concurrently.
    NaN voxels are background (``NaN >= thr`` is false).

    When the previous voxel ``v - 1`` is foreground, ``v`` is linked to it, and then only
    to the 4 visited neighbours at ``k + 1``: those at ``k - 1`` and ``k`` are 26-neighbours
    of ``v - 1`` as well, visited before it, so already in its tree.  The components are
    the same as with all 13 unions (about 3x fewer inside the brain).
    """
    n0, n1, n2 = hr.shape
    for i in range(lo, hi):
        for j in range(n1):
            for k in range(n2):
                v = (i * n1 + j) * n2 + k
                if not hr[i, j, k] >= thr:
                    parent[v] = -1
                    continue
                if k > 0 and parent[v - 1] >= 0:
                    parent[v] = v - 1  # a link to a smaller index, as every link
                    dk_lo = 1
                else:
                    parent[v] = v
                    dk_lo = -1
                # previous plane (9 neighbours, or the 3 at k + 1), inside the slab only
                if i > lo:
                    _union_previous_plane_one(parent, v, i, j, k, n1, n2, dk_lo)
                # previous row (3 neighbours, or the one at k + 1)
                if j > 0:
                    for dk in range(dk_lo, 2):
                        kk = k + dk
                        if kk < 0 or kk >= n2:
                            continue
                        u = (i * n1 + j - 1) * n2 + kk
                        if parent[u] >= 0:
                            _union_one(parent, v, u)


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _brain_mask(hr, threshold, parent, n_slabs):
    """Largest 26-connected component of ``hr >= threshold`` (algorithm A7.5).

    Parameters
    ----------
    hr : (N0, N1, N2) float32, C-contiguous
        Raw HR volume.
    threshold : float
        Foreground threshold (``BRAIN_THRESHOLD`` = 0.1), compared in float32
        like the reference's ``vol >= thr`` on a float32 array.
    parent : (N0*N1*N2,) int32 or int64
        Scratch for the union-find forest (overwritten).  int32 suffices below
        2**31 voxels.
    n_slabs : int
        Number of axis-0 slabs labelled concurrently, normally the Numba thread
        count.  The result does not depend on it.

    Returns
    -------
    mask : (N0, N1, N2) uint8
        1 on the largest component.  Ties go to the component whose first voxel
        comes first in raster (C) order -- the one ``scipy.ndimage.label``
        numbers lowest, which ``argmax`` over its ``bincount`` picks.  All zeros
        when no voxel reaches the threshold.

    Notes
    -----
    1. Axis-0 slabs are labelled concurrently (each thread writes only its own
       slab's ``parent`` entries); 2. the planes where slabs meet are merged
       serially; 3. one serial raster pass turns every link into a component code
       (a root is the smallest index of its component and every link points
       backwards, so the target of a link is always resolved first) and counts
       component sizes; 4. the mask is written in parallel, one plane per
       iteration.  The result does not depend on the thread count.  NaN voxels
       are background.
    """
    n0, n1, n2 = hr.shape
    n = n0 * n1 * n2
    thr = np.float32(threshold)
    mask = np.zeros((n0, n1, n2), np.uint8)
    if n == 0:
        return mask
    n_slabs = max(1, min(n_slabs, n0))
    for c in prange(n_slabs):
        _label_slab_one(hr, thr, parent, c * n0 // n_slabs, (c + 1) * n0 // n_slabs)
    for c in range(1, n_slabs):
        i = c * n0 // n_slabs
        for j in range(n1):
            for k in range(n2):
                v = (i * n1 + j) * n2 + k
                if parent[v] >= 0:
                    _union_previous_plane_one(parent, v, i, j, k, n1, n2, -1)
    n_roots = 0
    for v in prange(n):
        if parent[v] == v:
            n_roots += 1
    if n_roots == 0:
        return mask
    sizes = np.zeros(n_roots, np.int64)
    # Serial relabel: code(component c) = -(c + 2); -1 stays background.
    n_comp = 0
    for v in range(n):
        pv = parent[v]
        if pv < 0:
            continue
        if pv == v:
            parent[v] = -(n_comp + 2)
            sizes[n_comp] = 1
            n_comp += 1
        else:
            code = parent[pv]
            parent[v] = code
            sizes[-code - 2] += 1
    best = 0
    for c in range(1, n_comp):
        if sizes[c] > sizes[best]:
            best = c
    keep = -(best + 2)
    plane = n1 * n2
    for i in prange(n0):
        for j in range(n1):
            for k in range(n2):
                if parent[i * plane + j * n2 + k] == keep:
                    mask[i, j, k] = 1
    return mask
