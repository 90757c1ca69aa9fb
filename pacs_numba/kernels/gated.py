"""Kernels of the edge-gated weight model (algorithm A5.2).

- :func:`_mean_sobel_magnitude`: Sobel gradient magnitude of the experts' mean, the edge
  strength that gates each voxel between a tile's "edge" and "flat" weight vectors.  It is
  computed from the experts alone, so ``predict`` can compute it without an HR.
- :func:`_gated_moments`: per label cell, the value moments weighted by the gate ``g`` and
  by ``g^2`` (the plain moments come from ``kernels.stats._box_moments``), from which the
  normal equations of the ``2M``-unknown gated fit follow by sums.
- :func:`_solve_two_simplex_qp`: the exact minimiser of ``z^T (Q + lam I) z - 2 B^T z`` for
  ``z = (a, b)``, ``a`` and ``b`` each on the probability simplex, by enumerating pairs of
  supports (KKT systems of size ``|S_a| + |S_b| + 2``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .._config import CACHE, FASTMATH
from .qp import _gauss_solve_one, _scaled_system_one

#: Support candidates with a weight >= -_NEG_TOL are kept (then clipped and renormalised
#: per simplex); the same rule, and reason, as ``kernels.qp._NEG_TOL``.
_NEG_TOL = 1e-8


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _mean_sobel_magnitude(experts):
    """Sobel gradient magnitude of the mean of the experts, boundary mode "nearest".

    Parameters
    ----------
    experts : numba.typed.List of M (N0, N1, N2) float32
        Raw expert volumes (non-finite values read as 0).

    Returns
    -------
    (N0, N1, N2) float32
        ``sqrt(S_0^2 + S_1^2 + S_2^2)`` with ``S_d`` scipy's ``ndimage.sobel`` of the mean
        along axis ``d`` (derivative ``[-1, 0, 1]`` along ``d``, smoothing ``[1, 2, 1]``
        along the two others, indices clamped).

    Notes
    -----
    Parallel over axis-0 planes; each plane of the output is written by one iteration,
    reading a 3-plane neighbourhood of the mean, which is computed first (one float32
    volume).  Accumulates in float64.  Safe to run concurrently.
    """
    m = len(experts)
    n0, n1, n2 = experts[0].shape
    mean = np.empty((n0, n1, n2), np.float32)
    inv = 1.0 / m
    for i in prange(n0):
        for j in range(n1):
            for k in range(n2):
                s = 0.0
                for e in range(m):
                    v = experts[e][i, j, k]
                    if np.isfinite(v):
                        s += v
                mean[i, j, k] = s * inv
    out = np.empty((n0, n1, n2), np.float32)
    sm = np.array([1.0, 2.0, 1.0])
    for i in prange(n0):
        for j in range(n1):
            for k in range(n2):
                g0 = 0.0
                g1 = 0.0
                g2 = 0.0
                for a in range(3):
                    ia = min(max(i + a - 1, 0), n0 - 1)
                    for b in range(3):
                        jb = min(max(j + b - 1, 0), n1 - 1)
                        for c in range(3):
                            kc = min(max(k + c - 1, 0), n2 - 1)
                            v = float(mean[ia, jb, kc])
                            # derivative weight (a - 1) along its own axis, smoothing else
                            g0 += (a - 1) * sm[b] * sm[c] * v
                            g1 += sm[a] * (b - 1) * sm[c] * v
                            g2 += sm[a] * sm[b] * (c - 1) * v
                out[i, j, k] = np.sqrt(g0 * g0 + g1 * g1 + g2 * g2)
    return out


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _gated_moments(hr, experts, mask, stride, mus, sds, gate):
    """Gate-weighted value moments per label cell (algorithm A5.2).

    Parameters
    ----------
    hr : (N0, N1, N2) float32
        Raw HR volume.
    experts : numba.typed.List of M (N0, N1, N2) float32
        Raw expert volumes.
    mask : (N0, N1, N2) uint8
        Valid mask (``kernels.stats._valid_mask``).
    stride : int
        Cell edge (label cells of algorithm A2).
    mus, sds : (M + 1,) float64
        Mean and floored std of the HR (index 0) and each expert over the mask.
    gate : (N0, N1, N2) float32
        Edge gate ``g`` in [0, 1].

    Returns
    -------
    (n_cells, 2, M + M (M + 1) / 2) float64
        Part 0 weighs each mask voxel's products by ``g``, part 1 by ``g^2``.  In each,
        terms ``0..M-1`` are the cross terms ``x_a y`` with the z-scored HR ``y`` and the
        rest the upper triangle ``x_a x_c``, row-major (the layout of ``_box_moments``).

    Notes
    -----
    Parallel over the cell rows along axis 0: iteration ``t0`` reads planes
    ``[t0 s, (t0 + 1) s)`` and writes only cells with that first index, so no two
    iterations write the same cell; each cell is summed in a fixed voxel order, so the
    result does not depend on the thread count.  Non-finite values are never in the mask.
    Writes only the array it returns; safe to run concurrently.
    """
    n0, n1, n2 = hr.shape
    m = len(experts)
    c0 = (n0 + stride - 1) // stride
    c1 = (n1 + stride - 1) // stride
    c2 = (n2 + stride - 1) // stride
    n_terms = m + m * (m + 1) // 2
    out = np.zeros((c0 * c1 * c2, 2, n_terms))
    xs = np.empty((c0, m))
    inv_sds = 1.0 / sds
    for t0 in prange(c0):
        x = xs[t0]
        for i in range(t0 * stride, min((t0 + 1) * stride, n0)):
            for j in range(n1):
                row = (t0 * c1 + j // stride) * c2
                for k in range(n2):
                    if mask[i, j, k] == 0:
                        continue
                    cell = row + k // stride
                    g = np.float64(gate[i, j, k])  # float64: g * g must not round to float32
                    g2 = g * g
                    y = (hr[i, j, k] - mus[0]) * inv_sds[0]
                    for e in range(m):
                        x[e] = (experts[e][i, j, k] - mus[e + 1]) * inv_sds[e + 1]
                    for e in range(m):
                        xy = x[e] * y
                        out[cell, 0, e] += g * xy
                        out[cell, 1, e] += g2 * xy
                    t = m
                    for a in range(m):
                        for c in range(a, m):
                            p = x[a] * x[c]
                            out[cell, 0, t] += g * p
                            out[cell, 1, t] += g2 * p
                            t += 1
    return out


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _two_simplex_qp_one(q, bvec, lam, m, out, a, b, aug, sol, idx, best_w):
    """Exact QP of one tile over a product of two simplices, by enumerating supports.

    Minimise ``f(z) = z^T (Q + lam I) z - 2 B^T z`` over ``z = (a, b)``, ``a, b`` in R^M,
    subject to ``a >= 0, sum a = 1, b >= 0, sum b = 1``.

    Parameters
    ----------
    q : (2M, 2M) float64
        Tile matrix (symmetric positive semi-definite).
    bvec : (2M,) float64
        Tile vector.
    lam : float
        Ridge ``>= 0``.
    m : int
        Experts per block ``M``.
    out : (2M,) float64
        Receives the minimiser (NaN if Q, B hold NaN or inf).
    a, b, aug, sol, idx, best_w : scratch
        ``(2M, 2M)``, ``(2M,)``, ``(2M + 2, 2M + 3)``, ``(2M + 2,)`` float64,
        ``(2M,)`` int64 and ``(2M,)`` float64.

    Notes
    -----
    For every pair of non-empty supports ``S_a, S_b`` (``(2^M - 1)^2`` of them) solve the
    KKT system of the scaled problem with the two equality constraints::

        [ A_SS  e_a  e_b ] [ z_S  ]   [ b_S ]
        [ e_a^T  0    0  ] [ nu_a ] = [ 1   ]
        [ e_b^T  0    0  ] [ nu_b ]   [ 1   ]

    (``e_a`` marks the support's entries in the first block), keep solutions with
    ``z_S >= -_NEG_TOL``, clip and renormalise each block, and return the feasible
    candidate with the smallest objective (the first on ties, in increasing order of the
    pair of bitmasks).  Exact for the same reason as ``kernels.qp._simplex_qp_one``: the
    minimum set is a face of the polytope with an extreme point, and the KKT system of an
    extreme point's support is non-singular (a null vector would move along the minimum
    set within both simplices' affine hulls).  Cost ``O(4^M M^3)``: meant for ``M <= 5``.
    Serial; writes ``out`` and the scratch only.
    """
    n = 2 * m
    _scaled_system_one(q, bvec, lam, a, b)
    best_f = np.inf
    found = False
    full = 1 << m
    for mask_a in range(1, full):
        for mask_b in range(1, full):
            k = 0
            for i in range(m):
                if (mask_a >> i) & 1:
                    idx[k] = i
                    k += 1
            ka = k
            for i in range(m):
                if (mask_b >> i) & 1:
                    idx[k] = m + i
                    k += 1
            for r in range(k):
                ir = idx[r]
                for c in range(k):
                    aug[r, c] = a[ir, idx[c]]
                aug[r, k] = 1.0 if r < ka else 0.0
                aug[r, k + 1] = 0.0 if r < ka else 1.0
                aug[r, k + 2] = b[ir]
            for c in range(k):
                aug[k, c] = 1.0 if c < ka else 0.0
                aug[k + 1, c] = 0.0 if c < ka else 1.0
            for r in range(k, k + 2):
                aug[r, k] = 0.0
                aug[r, k + 1] = 0.0
                aug[r, k + 2] = 1.0
            if not _gauss_solve_one(aug, k + 2, sol):
                continue
            ok = True
            sa = 0.0
            sb = 0.0
            for r in range(k):
                v = sol[r]
                if not v >= -_NEG_TOL:  # NaN fails here too
                    ok = False
                    break
                if v < 0.0:
                    v = 0.0
                sol[r] = v
                if r < ka:
                    sa += v
                else:
                    sb += v
            if not ok or not sa > 0.0 or not sb > 0.0:
                continue
            for r in range(k):
                sol[r] *= 1.0 / sa if r < ka else 1.0 / sb
            f = 0.0
            for r in range(k):
                ir = idx[r]
                ar = 0.0
                for c in range(k):
                    ar += a[ir, idx[c]] * sol[c]
                f += sol[r] * (ar - 2.0 * b[ir])
            if f < best_f:
                best_f = f
                found = True
                for i in range(n):
                    best_w[i] = 0.0
                for r in range(k):
                    best_w[idx[r]] = sol[r]
    for i in range(n):
        out[i] = best_w[i] if found else np.nan


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _solve_two_simplex_qp(q_all, b_all, lam, active, n_chunks):
    """Exact two-simplex QP for every tile (algorithm A5.2).

    Parameters
    ----------
    q_all : (T, 2M, 2M) float64, C-contiguous
    b_all : (T, 2M) float64, C-contiguous
    lam : float
        Ridge ``>= 0`` added to the diagonal.
    active : (T,) bool
        Tiles to solve; the others get ``1/M`` in both blocks.
    n_chunks : int
        Work chunks, each with its own scratch (the result does not depend on it).

    Returns
    -------
    (T, 2M) float64
        ``(a, b)`` per tile, each block on the simplex; NaN where Q or B is not finite.

    Notes
    -----
    See :func:`_two_simplex_qp_one`.  Parallel over chunks of tiles with scratch allocated
    before the loop; each chunk writes its own rows.  Safe to run concurrently.
    """
    n_tiles = b_all.shape[0]
    n = b_all.shape[1]
    m = n // 2
    out = np.empty((n_tiles, n))
    n_chunks = max(1, min(n_chunks, n_tiles))
    a = np.empty((n_chunks, n, n))
    b = np.empty((n_chunks, n))
    aug = np.empty((n_chunks, n + 2, n + 3))
    sol = np.empty((n_chunks, n + 2))
    idx = np.empty((n_chunks, n), np.int64)
    best_w = np.empty((n_chunks, n))
    uniform = 1.0 / m
    for c in prange(n_chunks):
        start = c * n_tiles // n_chunks
        stop = (c + 1) * n_tiles // n_chunks
        for t in range(start, stop):
            if active[t]:
                _two_simplex_qp_one(q_all[t], b_all[t], lam, m, out[t], a[c], b[c], aug[c],
                                    sol[c], idx[c], best_w[c])
            else:
                for i in range(n):
                    out[t, i] = uniform
    return out
