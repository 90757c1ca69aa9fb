"""Per-tile weight solvers and Laplacian smoothing on the tile grid (algorithm A5, A6, B3).

Three parallel drivers, one tile per ``prange`` work item:

- :func:`_solve_simplex_qp`: exact minimiser of ``w^T (Q + lam I) w - 2 B^T w`` over
  the probability simplex, by enumerating every support and solving its KKT system.
- :func:`_solve_simplex_qp_active_set`: the same minimiser by a primal active-set
  method, for expert counts where enumerating supports is too slow.
- :func:`_solve_unconstrained`: least-norm solution of ``(Q + lam I) w = B``.
- :func:`_laplacian_smooth`: one Jacobi step of graph-Laplacian smoothing over the
  6-neighbour graph of tiles that have a learned weight.

The serial helpers (``*_one``) hold the per-tile numerics; they take every scratch
array from the caller so that no allocation happens inside ``prange``.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from .._config import CACHE, FASTMATH, SMOOTH_EPS
from .grid import _tile_index_one

# Numerical thresholds of the solvers.  They act on problems rescaled so that the mean
# diagonal of Q + lam I is 1 (see _simplex_qp_one), so they are relative to the scale
# of the statistics.  (Candidates for _config if anyone ever needs to tune them.)

#: A pivot smaller than this times the largest KKT-matrix entry marks the system as
#: singular.  Such a system has no correct digits left at 1e-14, and skipping it only
#: skips a candidate: an exactly optimal support with a non-singular system always
#: exists (see _simplex_qp_one, Notes).
_PIVOT_RTOL = 1e-14
#: A support candidate is kept if all its weights are >= -_NEG_TOL (then clipped to 0
#: and renormalised before its objective is evaluated).  Every kept candidate is a
#: feasible point scored by its true objective, so a loose value cannot make the
#: answer worse; it only admits the optimal support when rounding makes one of its
#: weights slightly negative.
_NEG_TOL = 1e-8
#: Eigenvalues at most this times the largest one count as zero in the least-norm
#: solve (statistics accumulated in float64 from float32 voxels are exactly
#: rank-deficient only up to ~1e-15 relative; 1e-12 leaves a safety margin).
_PINV_RCOND = 1e-12
#: Cyclic Jacobi converges quadratically; 6-10 sweeps are typical for M <= 16.
_JACOBI_MAX_SWEEPS = 60


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _gauss_solve_one(aug, n, x):
    """Solve an ``n x n`` system in place by Gaussian elimination with partial pivoting.

    Parameters
    ----------
    aug : (>= n, >= n + 1) float64
        Augmented matrix: ``aug[:n, :n]`` is the system matrix, ``aug[:n, n]`` the
        right-hand side.  Overwritten (scratch).
    n : int
        System size.
    x : (>= n,) float64
        Receives the solution in ``x[:n]``.

    Returns
    -------
    bool
        False if a pivot is at most ``_PIVOT_RTOL`` times the largest matrix entry
        (numerically singular) or the matrix holds NaN; ``x`` is then undefined.

    Notes
    -----
    Serial; writes only ``aug`` and ``x``, so concurrent calls on distinct scratch are
    safe.
    """
    big = 0.0
    for i in range(n):
        for j in range(n):
            v = abs(aug[i, j])
            if v > big:
                big = v
    if not big > 0.0:  # all zero, or NaN
        return False
    tiny = _PIVOT_RTOL * big
    for c in range(n):
        p = c
        pv = abs(aug[c, c])
        for r in range(c + 1, n):
            v = abs(aug[r, c])
            if v > pv:
                p = r
                pv = v
        if not pv > tiny:  # also rejects NaN pivots
            return False
        if p != c:
            for j in range(c, n + 1):
                tmp = aug[c, j]
                aug[c, j] = aug[p, j]
                aug[p, j] = tmp
        inv = 1.0 / aug[c, c]
        for r in range(c + 1, n):
            f = aug[r, c] * inv
            if f != 0.0:
                for j in range(c + 1, n + 1):
                    aug[r, j] -= f * aug[c, j]
    for i in range(n - 1, -1, -1):
        s = aug[i, n]
        for j in range(i + 1, n):
            s -= aug[i, j] * x[j]
        x[i] = s / aug[i, i]
    return True


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _scaled_system_one(q, bvec, lam, a, b):
    """Write ``a = (sym(q) + lam I) / s`` and ``b = bvec / s`` with ``s`` = mean diagonal.

    Parameters
    ----------
    q : (M, M) float64
        Tile matrix Q (symmetrised here, so a slightly asymmetric sum is harmless).
    bvec : (M,) float64
        Tile vector B.
    lam : float
        Ridge ``lambda >= 0``.
    a : (M, M) float64
        Receives the scaled matrix (scratch).
    b : (M,) float64
        Receives the scaled vector (scratch).

    Notes
    -----
    Both minimisers (simplex and unconstrained) are invariant under a common positive
    scaling of Q + lam I and B.  Statistics summed over thousands of voxels reach
    1e5..1e7; after scaling every entry is O(1), so the absolute tolerances of the
    solvers are in fact relative to the problem.  If the diagonal is zero (Q = 0 and
    lam = 0: a linear objective) the scale falls back to ``max |B|``, then to 1.
    Serial, writes only ``a`` and ``b``.  NaN input gives NaN output.
    """
    m = bvec.shape[0]
    tr = 0.0
    for i in range(m):
        for j in range(m):
            a[i, j] = 0.5 * (q[i, j] + q[j, i])
        a[i, i] += lam
        tr += a[i, i]
    scale = tr / m
    if not scale > 0.0:
        scale = 0.0
        for i in range(m):
            v = abs(bvec[i])
            if v > scale:
                scale = v
        if not scale > 0.0:
            scale = 1.0
    inv = 1.0 / scale
    for i in range(m):
        b[i] = bvec[i] * inv
        for j in range(m):
            a[i, j] *= inv


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _simplex_qp_one(q, bvec, lam, out, a, b, aug, sol, idx, best_w):
    """Exact simplex-constrained QP of one tile by enumeration of supports.

    Minimise ``f(w) = w^T (Q + lam I) w - 2 B^T w`` subject to ``w >= 0`` and
    ``sum(w) = 1``.

    Parameters
    ----------
    q : (M, M) float64
        Tile matrix Q (symmetric positive semi-definite).
    bvec : (M,) float64
        Tile vector B.
    lam : float
        Ridge ``lambda >= 0``.
    out : (M,) float64
        Receives the minimiser (all NaN if Q, B hold NaN or inf).
    a, b, aug, sol, idx, best_w : scratch
        ``(M, M)``, ``(M,)``, ``(M + 1, M + 2)``, ``(M + 1,)`` float64,
        ``(M,)`` int64 and ``(M,)`` float64.

    Notes
    -----
    For every non-empty support S (``2^M - 1`` of them) solve the equality-constrained
    KKT system of the scaled problem (A = scaled Q + lam I, b = scaled B)::

        [ A_SS  1 ] [ w_S ]   [ b_S ]
        [ 1^T   0 ] [ nu  ] = [ 1   ]

    keep solutions with ``w_S >= -_NEG_TOL``, clip them to ``w_S >= 0``, renormalise,
    evaluate ``f`` and return the feasible candidate with the smallest ``f`` (the
    first one on ties, in increasing bitmask order).  This is exact: the minimum set
    of a convex QP on a polytope has an extreme point w*, and the KKT system of its
    support is non-singular (a null vector (v, m) with v != 0 would satisfy
    ``A_SS v = 0`` and ``1^T v = 0``, so ``w* +- eps v`` would be two more minimisers
    and w* not extreme).  So the candidate list always contains w*, every candidate
    is feasible, and the smallest objective is f(w*) up to rounding.  When
    ``Q + lam I`` is positive definite the minimiser is unique.  The objective is
    compared on the O(1)-scaled problem, so rounding in ``f`` is ~1e-16 relative.
    Cost: ``O(2^M M^3)`` flops per tile, negligible for M <= 10.

    Serial; writes ``out`` and the scratch arrays only.
    """
    m = bvec.shape[0]
    _scaled_system_one(q, bvec, lam, a, b)
    best_f = np.inf
    found = False
    for mask in range(1, 1 << m):
        k = 0
        for i in range(m):
            if (mask >> i) & 1:
                idx[k] = i
                k += 1
        for r in range(k):
            ir = idx[r]
            for c in range(k):
                aug[r, c] = a[ir, idx[c]]
            aug[r, k] = 1.0
            aug[r, k + 1] = b[ir]
        for c in range(k):
            aug[k, c] = 1.0
        aug[k, k] = 0.0
        aug[k, k + 1] = 1.0
        if not _gauss_solve_one(aug, k + 1, sol):
            continue
        ok = True
        s = 0.0
        for r in range(k):
            v = sol[r]
            if not v >= -_NEG_TOL:  # NaN fails here too
                ok = False
                break
            if v < 0.0:
                v = 0.0
            sol[r] = v
            s += v
        if not ok or not s > 0.0:
            continue
        inv_s = 1.0 / s
        for r in range(k):
            sol[r] *= inv_s
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
            for i in range(m):
                best_w[i] = 0.0
            for r in range(k):
                best_w[idx[r]] = sol[r]
    if found:
        for i in range(m):
            out[i] = best_w[i]
    else:
        for i in range(m):
            out[i] = np.nan


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _solve_simplex_qp(q_all, b_all, lam, active, n_chunks):
    """Exact simplex-constrained QP for every tile (algorithm A5, B3).

    Parameters
    ----------
    q_all : (T, M, M) float64, C-contiguous
        Per-tile matrices Q (symmetric PSD).
    b_all : (T, M) float64, C-contiguous
        Per-tile vectors B.
    lam : float
        Ridge ``lambda >= 0`` added to the diagonal.
    active : (T,) bool
        Tiles to solve; the others get ``1/M``.
    n_chunks : int
        Number of work chunks, each with its own scratch; normally the number of
        Numba threads (the wrapper passes ``numba.get_num_threads()``; calling it
        here would stop Numba from caching the kernel).  Any value >= 1 gives the
        same result, bit for bit.

    Returns
    -------
    (T, M) float64
        Newly allocated weights: ``w >= 0``, ``sum(w) == 1`` (to rounding) on active
        tiles; ``1/M`` on inactive ones; NaN on active tiles whose Q or B holds NaN
        or inf (the wrapper rejects those first).

    Notes
    -----
    See :func:`_simplex_qp_one`.  Parallel over chunks of tiles; each chunk has its
    own scratch, allocated before the ``prange`` loop, and writes only its own rows of
    the output, so there are no races.  The result does not depend on the number of
    threads.  Reads its inputs only; safe to call concurrently from several Python
    threads under a thread-safe threading layer.
    """
    n_tiles = b_all.shape[0]
    m = b_all.shape[1]
    out = np.empty((n_tiles, m), dtype=np.float64)
    n_chunks = max(1, min(n_chunks, n_tiles))
    a = np.empty((n_chunks, m, m), dtype=np.float64)
    b = np.empty((n_chunks, m), dtype=np.float64)
    aug = np.empty((n_chunks, m + 1, m + 2), dtype=np.float64)
    sol = np.empty((n_chunks, m + 1), dtype=np.float64)
    idx = np.empty((n_chunks, m), dtype=np.int64)
    best_w = np.empty((n_chunks, m), dtype=np.float64)
    uniform = 1.0 / m
    for c in prange(n_chunks):
        start = c * n_tiles // n_chunks
        stop = (c + 1) * n_tiles // n_chunks
        for t in range(start, stop):
            if active[t]:
                _simplex_qp_one(q_all[t], b_all[t], lam, out[t], a[c], b[c], aug[c],
                                sol[c], idx[c], best_w[c])
            else:
                for i in range(m):
                    out[t, i] = uniform
    return out


#: Multipliers of the bounds ``w_i >= 0`` above ``-_ACTIVE_SET_TOL`` (scaled problem)
#: count as non-negative when the active-set method checks optimality.  Rounding in the
#: scaled KKT solves is ~1e-15; a tolerance much tighter than 1e-10 lets rounding
#: noise re-enter an index it has just dropped.
_ACTIVE_SET_TOL = 1e-11


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _face_kkt_one(a, b, free, k, j, aug, sol):
    """Solve the equality-constrained KKT system of the face spanned by ``free[:k]``.

    Parameters
    ----------
    a : (M, M) float64
        Scaled matrix ``A`` (see :func:`_scaled_system_one`).
    b : (M,) float64
        Scaled vector ``b``.
    free : (M,) int64
        Free indices; only ``free[:k]`` are read.
    k : int
        Number of free indices (>= 1).
    j : int
        ``-1``: right-hand side ``(b_S, 1)``, giving the minimiser of the face in
        ``sol[:k]`` and minus the multiplier of ``sum(w) = 1`` in ``sol[k]``.  Otherwise
        the right-hand side is ``(-A_Sj, -1)``, giving the direction that is the null
        vector of the face ``S + {j}`` (see :func:`_active_set_qp_one`).
    aug, sol : scratch
        ``(M + 1, M + 2)`` and ``(M + 1,)`` float64.

    Returns
    -------
    bool
        False if the system is numerically singular.

    Notes
    -----
    Serial; writes ``aug`` and ``sol`` only.
    """
    for r in range(k):
        ir = free[r]
        for c in range(k):
            aug[r, c] = a[ir, free[c]]
        aug[r, k] = 1.0
        aug[r, k + 1] = b[ir] if j < 0 else -a[ir, j]
    for c in range(k):
        aug[k, c] = 1.0
    aug[k, k] = 0.0
    aug[k, k + 1] = 1.0 if j < 0 else -1.0
    return _gauss_solve_one(aug, k + 1, sol)


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _active_set_qp_one(q, bvec, lam, out, a, b, aug, sol, free, in_free, w):
    """Exact simplex-constrained QP of one tile by a primal active-set method.

    Minimise ``f(w) = w^T (Q + lam I) w - 2 B^T w`` subject to ``w >= 0`` and
    ``sum(w) = 1``, for any number of experts M.

    Parameters
    ----------
    q : (M, M) float64
        Tile matrix Q (symmetric positive semi-definite).
    bvec : (M,) float64
        Tile vector B.
    lam : float
        Ridge ``lambda >= 0``.
    out : (M,) float64
        Receives the minimiser (all NaN if Q, B hold NaN or inf).
    a, b, aug, sol, free, in_free, w : scratch
        ``(M, M)``, ``(M,)``, ``(M + 1, M + 2)``, ``(M + 1,)`` float64,
        ``(M,)`` int64, ``(M,)`` int64 and ``(M,)`` float64.

    Notes
    -----
    Algorithm 16.3 of Nocedal & Wright (2006), on the scaled problem of
    :func:`_scaled_system_one`, adapted to a Hessian that may be singular:

    1. Start at the best vertex ``e_i`` (smallest ``A_ii - 2 b_i``); the free set
       is ``F = {i}``.
    2. Solve the KKT system of the face ``F`` (``A_FF y + mu 1 = b_F``,
       ``1^T y = 1``).  If ``y`` has a negative entry, step from ``w`` towards
       ``y`` until the first weight reaches 0 and drop that index from ``F``.
    3. Otherwise ``w = y``; the bound multipliers are ``z_i = (A w - b)_i + mu``
       for ``i`` outside ``F``.  If all are ``>= -_ACTIVE_SET_TOL`` the KKT
       conditions of the whole problem hold and ``w`` is a global minimiser (the
       problem is convex).  Else add the index ``j`` with the most negative
       ``z_j`` to ``F``.

    The KKT matrix of a face ``S`` is singular exactly when some ``v != 0`` with
    ``1^T v = 0`` has ``A v = 0`` and support in ``S`` (A is PSD).  So it stays
    non-singular on every subset of a non-singular face; starting from a vertex,
    only step 3 can make it singular.  Then the null space is one-dimensional with
    ``v_j = 1``, ``v_F`` solving the face system with right-hand side
    ``(-A_Fj, -1)``.  Along ``d = v`` the objective is linear with slope
    ``2 z_j < 0``, and since ``sum(d_F) = -1`` some ``d_i < 0``: the method steps
    along ``d`` until the first weight in ``F`` reaches 0 and swaps that index for
    ``j``.  The new face has no null vector (``d`` was the only one, and it needs
    the dropped index), so the invariant holds.  ``f`` never increases.  Iterations
    are capped at ``20 M + 100`` as a guard against cycling on degenerate ties; the
    iterate is then feasible but possibly not optimal (never seen in tests).

    With ``lam > 0`` or a positive definite Q the minimiser is unique and this
    returns the same weights as :func:`_simplex_qp_one` (to rounding); with
    several minimisers it may return a different one with the same objective.
    Cost: a few ``O(M^3)`` solves per added expert, versus ``O(2^M M^3)``.

    Serial; writes ``out`` and the scratch arrays only.
    """
    m = bvec.shape[0]
    _scaled_system_one(q, bvec, lam, a, b)
    finite = True
    for i in range(m):
        if not np.isfinite(b[i]):
            finite = False
        for c in range(m):
            if not np.isfinite(a[i, c]):
                finite = False
    if not finite:
        for i in range(m):
            out[i] = np.nan
        return
    best = 0
    best_v = np.inf
    for i in range(m):
        v = a[i, i] - 2.0 * b[i]
        if v < best_v:
            best_v = v
            best = i
    for i in range(m):
        w[i] = 0.0
        in_free[i] = 0
    w[best] = 1.0
    free[0] = best
    in_free[best] = 1
    k = 1
    added = -1
    for _ in range(20 * m + 100):
        if not _face_kkt_one(a, b, free, k, -1, aug, sol):
            if added < 0:
                break  # cannot happen (see Notes); keep the feasible iterate
            # Singular face: undo the addition and move along its null vector.
            k -= 1
            in_free[added] = 0
            if not _face_kkt_one(a, b, free, k, added, aug, sol):
                break
            t = np.inf
            kb = -1
            for r in range(k):
                d = sol[r]
                if d < 0.0:
                    ratio = w[free[r]] / -d
                    if ratio < t:
                        t = ratio
                        kb = r
            if kb < 0:
                break
            for r in range(k):
                w[free[r]] += t * sol[r]
            w[added] = t
            out_i = free[kb]
            w[out_i] = 0.0
            in_free[out_i] = 0
            free[kb] = added
            in_free[added] = 1
            added = -1
            continue
        added = -1
        # Ratio test towards the face minimiser.
        t = 1.0
        kb = -1
        for r in range(k):
            y = sol[r]
            if y < 0.0:
                wi = w[free[r]]
                ratio = wi / (wi - y)
                if ratio < t:
                    t = ratio
                    kb = r
        if kb >= 0:
            for r in range(k):
                i = free[r]
                w[i] += t * (sol[r] - w[i])
            out_i = free[kb]
            w[out_i] = 0.0
            in_free[out_i] = 0
            k -= 1
            free[kb] = free[k]
            continue
        for r in range(k):
            w[free[r]] = sol[r]
        mu = sol[k]
        z_min = -_ACTIVE_SET_TOL
        j = -1
        for i in range(m):
            if in_free[i]:
                continue
            z = mu - b[i]
            for c in range(k):
                z += a[i, free[c]] * w[free[c]]
            if z < z_min:
                z_min = z
                j = i
        if j < 0:
            break  # KKT conditions hold: optimal
        free[k] = j
        in_free[j] = 1
        k += 1
        added = j
    s = 0.0
    for i in range(m):
        if w[i] < 0.0:
            w[i] = 0.0
        s += w[i]
    for i in range(m):
        out[i] = w[i] / s


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _solve_simplex_qp_active_set(q_all, b_all, lam, active, n_chunks):
    """Exact simplex-constrained QP for every tile, by an active-set method (A5, B3).

    Parameters
    ----------
    q_all : (T, M, M) float64, C-contiguous
        Per-tile matrices Q (symmetric PSD).
    b_all : (T, M) float64, C-contiguous
        Per-tile vectors B.
    lam : float
        Ridge ``lambda >= 0`` added to the diagonal.
    active : (T,) bool
        Tiles to solve; the others get ``1/M``.
    n_chunks : int
        Number of work chunks, each with its own scratch (see
        :func:`_solve_simplex_qp`).  The result does not depend on it.

    Returns
    -------
    (T, M) float64
        Newly allocated weights: ``w >= 0``, ``sum(w) == 1`` on active tiles; ``1/M``
        on inactive ones; NaN on active tiles whose Q or B holds NaN or inf.

    Notes
    -----
    See :func:`_active_set_qp_one`; used for the expert counts where enumerating
    supports (:func:`_solve_simplex_qp`) is too slow.  Parallel over chunks of tiles
    with scratch allocated before the ``prange`` loop; each tile row is written by one
    iteration only.  Reads its inputs only; safe to call concurrently.
    """
    n_tiles = b_all.shape[0]
    m = b_all.shape[1]
    out = np.empty((n_tiles, m), dtype=np.float64)
    n_chunks = max(1, min(n_chunks, n_tiles))
    a = np.empty((n_chunks, m, m), dtype=np.float64)
    b = np.empty((n_chunks, m), dtype=np.float64)
    aug = np.empty((n_chunks, m + 1, m + 2), dtype=np.float64)
    sol = np.empty((n_chunks, m + 1), dtype=np.float64)
    free = np.empty((n_chunks, m), dtype=np.int64)
    in_free = np.empty((n_chunks, m), dtype=np.int64)
    w = np.empty((n_chunks, m), dtype=np.float64)
    uniform = 1.0 / m
    for c in prange(n_chunks):
        start = c * n_tiles // n_chunks
        stop = (c + 1) * n_tiles // n_chunks
        for t in range(start, stop):
            if active[t]:
                _active_set_qp_one(q_all[t], b_all[t], lam, out[t], a[c], b[c], aug[c],
                                   sol[c], free[c], in_free[c], w[c])
            else:
                for i in range(m):
                    out[t, i] = uniform
    return out


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _jacobi_eigh_one(a, v):
    """Diagonalise a symmetric matrix in place by cyclic Jacobi rotations.

    Parameters
    ----------
    a : (M, M) float64
        Symmetric matrix; on return its diagonal holds the eigenvalues and the
        off-diagonal is (numerically) zero.
    v : (M, M) float64
        Receives the orthonormal eigenvectors as columns.

    Notes
    -----
    Rotation formulas of Numerical Recipes §11.1 (``t = sgn(theta) / (|theta| +
    sqrt(theta^2 + 1))``).  Jacobi is slow for large M but very accurate, including for
    small eigenvalues, which is what the rank decision of the least-norm solve needs.
    Serial; writes ``a`` and ``v`` only.  NaN input gives NaN output.
    """
    m = a.shape[0]
    for i in range(m):
        for j in range(m):
            v[i, j] = 0.0
        v[i, i] = 1.0
    for _ in range(_JACOBI_MAX_SWEEPS):
        off = 0.0
        diag = 0.0
        for i in range(m):
            diag += a[i, i] * a[i, i]
            for j in range(i + 1, m):
                off += a[i, j] * a[i, j]
        if not off > 1e-36 * diag:  # converged (also stops on NaN)
            break
        for p in range(m - 1):
            for q in range(p + 1, m):
                apq = a[p, q]
                if apq == 0.0:
                    continue
                theta = (a[q, q] - a[p, p]) / (2.0 * apq)
                if abs(theta) > 1e150:
                    t = 0.5 / theta
                else:
                    t = 1.0 / (abs(theta) + math.sqrt(theta * theta + 1.0))
                    if theta < 0.0:
                        t = -t
                cs = 1.0 / math.sqrt(t * t + 1.0)
                sn = t * cs
                for k in range(m):
                    akp = a[k, p]
                    akq = a[k, q]
                    a[k, p] = cs * akp - sn * akq
                    a[k, q] = sn * akp + cs * akq
                for k in range(m):
                    apk = a[p, k]
                    aqk = a[q, k]
                    a[p, k] = cs * apk - sn * aqk
                    a[q, k] = sn * apk + cs * aqk
                a[p, q] = 0.0
                a[q, p] = 0.0
                for k in range(m):
                    vkp = v[k, p]
                    vkq = v[k, q]
                    v[k, p] = cs * vkp - sn * vkq
                    v[k, q] = sn * vkp + cs * vkq


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _unconstrained_one(q, bvec, lam, out, a, b, v):
    """Least-norm solution of ``(Q + lam I) w = B`` for one tile.

    Parameters
    ----------
    q : (M, M) float64
        Tile matrix Q (symmetric).
    bvec : (M,) float64
        Tile vector B.
    lam : float
        Ridge ``lambda >= 0``.
    out : (M,) float64
        Receives ``w = (Q + lam I)^+ B``.
    a, b, v : scratch
        ``(M, M)``, ``(M,)``, ``(M, M)`` float64.

    Notes
    -----
    ``w = sum_i v_i (v_i^T B) / d_i`` over the eigenpairs ``(d_i, v_i)`` with
    ``|d_i| > _PINV_RCOND * max|d|``: the Moore-Penrose solution, equal to the plain
    solve when the matrix is well conditioned.  Computed on the scaled system of
    :func:`_scaled_system_one` (the solution is scale-invariant).  Serial; writes
    ``out`` and the scratch arrays only.  NaN input gives NaN output.
    """
    m = bvec.shape[0]
    _scaled_system_one(q, bvec, lam, a, b)
    _jacobi_eigh_one(a, v)
    dmax = 0.0
    for i in range(m):
        d = abs(a[i, i])
        if d > dmax:
            dmax = d
    cut = _PINV_RCOND * dmax
    for i in range(m):
        out[i] = 0.0
    for e in range(m):
        d = a[e, e]
        if not abs(d) > cut:
            continue
        proj = 0.0
        for i in range(m):
            proj += v[i, e] * b[i]
        coef = proj / d
        for i in range(m):
            out[i] += coef * v[i, e]
    if not dmax == dmax:  # NaN statistics: say so instead of returning zeros
        for i in range(m):
            out[i] = np.nan


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _solve_unconstrained(q_all, b_all, lam, active, n_chunks):
    """Least-norm solution of ``(Q_t + lam I) w = B_t`` for every tile (algorithm A5).

    Parameters
    ----------
    q_all : (T, M, M) float64, C-contiguous
        Per-tile matrices Q (symmetric).
    b_all : (T, M) float64, C-contiguous
        Per-tile vectors B.
    lam : float
        Ridge ``lambda >= 0``.
    active : (T,) bool
        Tiles to solve; the others get ``1/M``.
    n_chunks : int
        Number of work chunks, each with its own scratch; normally the number of
        Numba threads (the wrapper passes ``numba.get_num_threads()``; calling it
        here would stop Numba from caching the kernel).  Any value >= 1 gives the
        same result, bit for bit.

    Returns
    -------
    (T, M) float64
        Newly allocated weights (no sign or sum constraint); ``1/M`` on inactive
        tiles; NaN on active tiles with non-finite statistics.

    Notes
    -----
    See :func:`_unconstrained_one`.  Parallel over chunks of tiles with per-chunk
    scratch allocated before the loop; each tile row is written by one iteration only.
    Independent of the thread count; reads its inputs only.
    """
    n_tiles = b_all.shape[0]
    m = b_all.shape[1]
    out = np.empty((n_tiles, m), dtype=np.float64)
    n_chunks = max(1, min(n_chunks, n_tiles))
    a = np.empty((n_chunks, m, m), dtype=np.float64)
    b = np.empty((n_chunks, m), dtype=np.float64)
    v = np.empty((n_chunks, m, m), dtype=np.float64)
    uniform = 1.0 / m
    for c in prange(n_chunks):
        start = c * n_tiles // n_chunks
        stop = (c + 1) * n_tiles // n_chunks
        for t in range(start, stop):
            if active[t]:
                _unconstrained_one(q_all[t], b_all[t], lam, out[t], a[c], b[c], v[c])
            else:
                for i in range(m):
                    out[t, i] = uniform
    return out


@njit(parallel=True, nogil=True, cache=CACHE, fastmath=FASTMATH)
def _laplacian_smooth(weights, learned, n0, n1, n2, tau):
    """One Jacobi step of Laplacian smoothing on the tile grid (algorithm A6).

    Parameters
    ----------
    weights : (T, M) float32, C-contiguous
        Tile weights, ``T = n0 * n1 * n2``, ids axis-0-major
        ``r = (i0 * n1 + i1) * n2 + i2``.
    learned : (T,) bool
        Graph nodes: tiles with a learned weight.
    n0, n1, n2 : int
        Tile counts along each axis.
    tau : float
        Smoothing strength in ``[0, 1]``.

    Returns
    -------
    (T, M) float32
        Newly allocated.  For a learned tile ``r`` with learned 6-neighbours N(r)::

            W'_r = (1 - tau) W_r + tau * mean_{n in N(r)} W_n

        (``W'_r = W_r`` if N(r) is empty), then negatives set to 0 and
        ``W'_r /= sum(W'_r) + SMOOTH_EPS``; computed in float64 from the float32
        input and rounded once.  Rows of unlearned tiles are copied unchanged.
        (With ``tau = 0`` learned rows are still clipped and renormalised; the
        wrapper returns the input unchanged instead, as the reference does.)

    Notes
    -----
    Parallel over tiles: each iteration reads the (unmodified) input and writes only
    its own output row (a Jacobi, not Gauss-Seidel, step), so there are no races and
    the result does not depend on the thread count.  Neighbours are summed in a fixed
    order (-/+ along axis 0, 1, 2).  NaN weights propagate to the tile and its
    learned neighbours.
    """
    n_tiles = weights.shape[0]
    m = weights.shape[1]
    out = np.empty((n_tiles, m), dtype=np.float32)
    row = np.empty((n_tiles, m), dtype=np.float64)  # float64 rows before rounding
    stride0 = n1 * n2
    for r in prange(n_tiles):
        if not learned[r]:
            for e in range(m):
                out[r, e] = weights[r, e]
            continue
        i0, i1, i2 = _tile_index_one(r, n1, n2)
        # Neighbour ids, or -1 where outside the grid or unlearned.
        nb0 = r - stride0 if i0 > 0 else -1
        nb1 = r + stride0 if i0 + 1 < n0 else -1
        nb2 = r - n2 if i1 > 0 else -1
        nb3 = r + n2 if i1 + 1 < n1 else -1
        nb4 = r - 1 if i2 > 0 else -1
        nb5 = r + 1 if i2 + 1 < n2 else -1
        cnt = 0
        for nb in (nb0, nb1, nb2, nb3, nb4, nb5):
            if nb >= 0 and learned[nb]:
                cnt += 1
        total = 0.0
        for e in range(m):
            val = np.float64(weights[r, e])
            if cnt > 0:
                acc = 0.0
                for nb in (nb0, nb1, nb2, nb3, nb4, nb5):
                    if nb >= 0 and learned[nb]:
                        acc += np.float64(weights[nb, e])
                val = (1.0 - tau) * val + tau * (acc / cnt)
            if val < 0.0:
                val = 0.0
            row[r, e] = val
            total += val
        denom = total + SMOOTH_EPS
        for e in range(m):
            out[r, e] = np.float32(row[r, e] / denom)
    return out
