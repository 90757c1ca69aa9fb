"""Slow twins of ``pacs_numba.kernels.qp`` (algorithm A5, A6), written from docs/algorithm.md.

Brute force and plain loops; nothing here imports numba or pacs_numba.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np

SMOOTH_EPS = 1e-8  # algorithm A6


def objective(Q, B, lam, w):
    """f(w) = w^T (Q + lam I) w - 2 B^T w of one tile."""
    w = np.asarray(w, dtype=np.float64)
    return float(w @ Q @ w + lam * (w @ w) - 2.0 * B @ w)


def kkt_parts(Q, B, lam, w):
    """Gradient g = 2 (Q + lam I) w - 2 B and the multiplier of sum(w) = 1.

    On the support S = {w > 0} stationarity says g_S = nu; nu is taken as the
    mean of g over S, and z = g - nu are the multipliers of w >= 0.
    """
    A = Q + lam * np.eye(len(B))
    g = 2.0 * A @ w - 2.0 * B
    support = w > 1e-12
    nu = g[support].mean()
    return g, nu, g - nu, support


def simplex_qp(Q, B, lam):
    """Minimiser of f over the simplex: every face, KKT system by lstsq, KKT check.

    For every support S the stationarity and sum conditions::

        2 A_SS w_S - nu 1 = 2 B_S,   1^T w_S = 1

    are solved with ``numpy.linalg.lstsq`` (so singular faces give their least-norm
    solution instead of being skipped).  A face solution is a KKT point if the system
    is consistent, ``w_S >= 0`` and the multipliers ``z_i = (2 A w - 2 B)_i - nu`` of
    the other coordinates are ``>= 0`` (tolerances apply to the problem divided by the
    size of its entries).
    f is convex, so every KKT point is a global minimiser; among them the one with
    the smallest f (after clipping rounding-level negatives) is returned.
    """
    Q = np.asarray(Q, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    M = len(B)
    # The minimiser does not change when f is multiplied by a positive number; dividing
    # by the size of the data keeps the KKT matrix (whose last row is all ones)
    # balanced, so lstsq does not truncate it when Q is ~1e7 or ~1e-8.
    size = max(np.abs(Q).max() + lam, np.abs(B).max(), np.finfo(float).tiny)
    A = (Q + lam * np.eye(M)) / size
    Bs = B / size
    best_w, best_f = None, np.inf
    for k in range(1, M + 1):
        for S in itertools.combinations(range(M), k):
            S = list(S)
            K = np.zeros((k + 1, k + 1))
            K[:k, :k] = 2.0 * A[np.ix_(S, S)]
            K[:k, k] = -1.0
            K[k, :k] = 1.0
            rhs = np.concatenate([2.0 * Bs[S], [1.0]])
            x = np.linalg.lstsq(K, rhs, rcond=None)[0]
            if np.abs(K @ x - rhs).max() > 1e-8 * max(1.0, np.abs(rhs).max()):
                continue  # inconsistent: this face has no stationary point
            w = np.zeros(M)
            w[S] = x[:k]
            nu = x[k]
            if w.min() < -1e-9:
                continue
            z = 2.0 * A @ w - 2.0 * Bs - nu
            if np.delete(z, S).size and np.delete(z, S).min() < -1e-8:
                continue
            w = np.clip(w, 0.0, None)
            w /= w.sum()
            f = objective(Q, B, lam, w)
            if f < best_f:
                best_w, best_f = w, f
    if best_w is None:
        raise AssertionError("no KKT point found: the twin's tolerances are too tight")
    return best_w


def simplex_qp_active_set(Q, B, lam, tol=1e-11, max_iter=None):
    """Primal active-set method for the simplex QP, in NumPy (twin of ``_active_set_qp_one``).

    Works on the problem divided by its mean diagonal.  The free set F starts at the
    best vertex.  Each iteration solves the face's KKT system with ``numpy.linalg``;
    a face whose KKT matrix has lost rank (only possible right after adding an index)
    is left along its null vector, found with an SVD.
    """
    Q = np.asarray(Q, dtype=np.float64)
    B = np.asarray(B, dtype=np.float64)
    M = len(B)
    A = 0.5 * (Q + Q.T) + lam * np.eye(M)
    s = np.trace(A) / M
    if not s > 0:
        s = np.abs(B).max() if np.abs(B).max() > 0 else 1.0
    A, b = A / s, B / s

    def kkt(F):
        k = len(F)
        K = np.zeros((k + 1, k + 1))
        K[:k, :k] = A[np.ix_(F, F)]
        K[:k, k] = 1.0
        K[k, :k] = 1.0
        return K

    i0 = int(np.argmin(np.diag(A) - 2 * b))
    w = np.zeros(M)
    w[i0] = 1.0
    F = [i0]
    for _ in range(max_iter or 20 * M + 100):
        K = kkt(F)
        if np.linalg.matrix_rank(K, tol=1e-12 * np.abs(K).max()) < len(F) + 1:
            # the null vector d (d_j = 1 for the index just added) has zero curvature
            _, _, vt = np.linalg.svd(K)
            d = vt[-1][: len(F)]
            j = F[-1]
            d = d / d[-1]
            t, out = min((w[i] / -d[r], i) for r, i in enumerate(F) if d[r] < 0)
            for r, i in enumerate(F):
                w[i] += t * d[r]
            w[out] = 0.0
            F.remove(out)
            assert j in F
            continue
        x = np.linalg.solve(K, np.concatenate([b[F], [1.0]]))
        y, mu = x[:-1], x[-1]
        if (y < 0).any():
            ratios = [(w[i] / (w[i] - y[r]), i) for r, i in enumerate(F) if y[r] < 0]
            t, out = min(ratios)
            for r, i in enumerate(F):
                w[i] += t * (y[r] - w[i])
            w[out] = 0.0
            F.remove(out)
            continue
        w[:] = 0.0
        w[F] = y
        z = A @ w - b + mu
        z[F] = 0.0
        j = int(np.argmin(z))
        if z[j] >= -tol:
            break
        F.append(j)
    w = np.clip(w, 0.0, None)
    return w / w.sum()


def simplex_qp_trust_constr(Q, B, lam, n_starts=5, seed=0):
    """Best of several ``trust-constr`` runs from random simplex points (independent check)."""
    from scipy.optimize import Bounds, LinearConstraint, minimize

    M = len(B)
    A = Q + lam * np.eye(M)
    rng = np.random.default_rng(seed)
    starts = [np.full(M, 1.0 / M)] + list(rng.dirichlet(np.ones(M), size=n_starts - 1))
    best_w, best_f = None, np.inf
    for w0 in starts:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = minimize(
                lambda w: w @ A @ w - 2.0 * B @ w,
                w0,
                jac=lambda w: 2.0 * A @ w - 2.0 * B,
                hess=lambda w: 2.0 * A,
                method="trust-constr",
                bounds=Bounds(np.zeros(M), np.ones(M)),
                constraints=[LinearConstraint(np.ones((1, M)), 1.0, 1.0)],
                options={"gtol": 1e-12, "xtol": 1e-14, "maxiter": 2000},
            )
        w = np.clip(res.x, 0.0, None)
        w /= w.sum()
        f = objective(Q, B, lam, w)
        if f < best_f:
            best_w, best_f = w, f
    return best_w


def unconstrained(Q, B, lam, rcond=1e-12):
    """(Q + lam I)^+ B with numpy's pseudo-inverse."""
    A = np.asarray(Q, dtype=np.float64) + lam * np.eye(len(B))
    return np.linalg.pinv(A, rcond=rcond) @ np.asarray(B, dtype=np.float64)


def laplacian_smooth(W, learned, counts, tau):
    """One Jacobi step of algorithm A6 with plain loops over the grid, in float64.

    ``tau <= 0`` returns the weights unchanged, as the reference's
    ``laplacian_smooth_weights`` does.
    """
    W = np.asarray(W)
    if tau <= 0:
        return W.copy()
    n0, n1, n2 = counts
    T, M = W.shape
    out = W.astype(np.float64).copy()
    for i0 in range(n0):
        for i1 in range(n1):
            for i2 in range(n2):
                r = (i0 * n1 + i1) * n2 + i2
                if not learned[r]:
                    continue
                nbrs = []
                for d0, d1, d2 in [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0),
                                   (0, 0, -1), (0, 0, 1)]:
                    j0, j1, j2 = i0 + d0, i1 + d1, i2 + d2
                    if 0 <= j0 < n0 and 0 <= j1 < n1 and 0 <= j2 < n2:
                        q = (j0 * n1 + j1) * n2 + j2
                        if learned[q]:
                            nbrs.append(q)
                new = [float(W[r, m]) for m in range(M)]
                if nbrs:
                    for m in range(M):
                        mean = sum(float(W[q, m]) for q in nbrs) / len(nbrs)
                        new[m] = (1.0 - tau) * float(W[r, m]) + tau * mean
                new = [max(v, 0.0) for v in new]
                s = sum(new) + SMOOTH_EPS
                for m in range(M):
                    out[r, m] = new[m] / s
    return out.astype(W.dtype)
