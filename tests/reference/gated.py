"""Slow twins of ``pacs_numba.kernels.gated`` and the weight models (algorithm A5.1, A5.2).

Plain NumPy/SciPy written from docs/algorithm.md; nothing here imports numba or pacs_numba.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage

GATE_QUANTILE = 0.9  # algorithm A5.2


def mean_sobel_magnitude(experts):
    """|sobel| of the experts' mean (non-finite read as 0), scipy, boundary "nearest"."""
    mean = np.mean([np.where(np.isfinite(x), x, 0).astype(np.float64) for x in experts], axis=0)
    g = [ndimage.sobel(mean, axis=d, mode="nearest") for d in range(3)]
    return np.sqrt(sum(x * x for x in g))


def edge_gate(experts):
    """g = min(1, s / quantile_0.9(s over mean > 0))."""
    s = mean_sobel_magnitude(experts)
    mean = np.mean([np.where(np.isfinite(x), x, 0).astype(np.float64) for x in experts], axis=0)
    head = s[mean > 0]
    q = np.quantile(head, GATE_QUANTILE) if head.size else 0.0
    if not q > 0:
        return np.zeros_like(s)
    return np.minimum(1.0, s / q)


def gated_moments(hr, experts, mask, stride, mus, sds, gate):
    """Per label cell: sum g (x y, x_a x_c for a <= c) and the same with g^2."""
    m = len(experts)
    y = (hr.astype(np.float64) - mus[0]) / sds[0]
    xs = [(x.astype(np.float64) - mus[e + 1]) / sds[e + 1] for e, x in enumerate(experts)]
    counts = [-(-n // stride) for n in hr.shape]
    terms = m + m * (m + 1) // 2
    out = np.zeros((int(np.prod(counts)), 2, terms))
    for c0, c1, c2 in itertools.product(*(range(c) for c in counts)):
        t = (c0 * counts[1] + c1) * counts[2] + c2
        box = tuple(slice(c * stride, (c + 1) * stride) for c in (c0, c1, c2))
        sel = mask[box] > 0
        g = gate[box][sel].astype(np.float64)
        xv = [x[box][sel] for x in xs]
        yv = y[box][sel]
        prods = [xv[e] * yv for e in range(m)]
        prods += [xv[a] * xv[c] for a in range(m) for c in range(a, m)]
        for j, p in enumerate(prods):
            out[t, 0, j] = np.sum(g * p)
            out[t, 1, j] = np.sum(g * g * p)
    return out


def two_simplex_objective(Q, B, lam, z):
    """f(z) = z^T (Q + lam I) z - 2 B^T z."""
    z = np.asarray(z, np.float64)
    return float(z @ Q @ z + lam * z @ z - 2 * B @ z)


def two_simplex_qp(Q, B, lam):
    """Minimiser over two simplices: every pair of faces, KKT by lstsq, full KKT check."""
    Q = np.asarray(Q, np.float64)
    B = np.asarray(B, np.float64)
    n = len(B)
    m = n // 2
    size = max(np.abs(Q).max() + lam, np.abs(B).max(), np.finfo(float).tiny)
    A = (Q + lam * np.eye(n)) / size
    b = B / size
    best, best_f = None, np.inf
    faces = [list(s) for k in range(1, m + 1) for s in itertools.combinations(range(m), k)]
    for sa in faces:
        for sb in faces:
            S = sa + [m + i for i in sb]
            k = len(S)
            K = np.zeros((k + 2, k + 2))
            K[:k, :k] = 2 * A[np.ix_(S, S)]
            ea = np.array([1.0 if i < m else 0.0 for i in S])
            K[:k, k] = -ea
            K[:k, k + 1] = -(1 - ea)
            K[k, :k] = ea
            K[k + 1, :k] = 1 - ea
            rhs = np.concatenate([2 * b[S], [1.0, 1.0]])
            x = np.linalg.lstsq(K, rhs, rcond=None)[0]
            if np.abs(K @ x - rhs).max() > 1e-8 * max(1.0, np.abs(rhs).max()):
                continue
            z = np.zeros(n)
            z[S] = x[:k]
            if z.min() < -1e-9:
                continue
            nu = np.array([x[k]] * m + [x[k + 1]] * m)
            mult = 2 * A @ z - 2 * b - nu
            off = np.setdiff1d(np.arange(n), S)
            if off.size and mult[off].min() < -1e-8:
                continue
            z = np.clip(z, 0, None)
            z[:m] /= z[:m].sum()
            z[m:] /= z[m:].sum()
            f = two_simplex_objective(Q, B, lam, z)
            if f < best_f:
                best, best_f = z, f
    if best is None:
        raise AssertionError("no KKT point found")
    return best


def simplex_qp_with_prior(Q, B, lam, mu, w_parent):
    """argmin over the simplex of w^T (Q + lam I) w - 2 B^T w + mu ||w - w_parent||^2, by SLSQP
    from every vertex and the centre (tiny problems only), best objective kept."""
    from scipy.optimize import minimize

    Q = np.asarray(Q, np.float64)
    m = len(B)
    scale = max(np.trace(Q) / m + lam + mu, 1e-300)

    def f(w):
        d = w - w_parent
        return (w @ Q @ w + lam * w @ w - 2 * B @ w + mu * d @ d) / scale

    best = None
    for w0 in [*np.eye(m), np.full(m, 1 / m)]:
        r = minimize(f, w0, method="SLSQP", bounds=[(0, 1)] * m,
                     constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}],
                     options={"ftol": 1e-15, "maxiter": 500})
        if best is None or r.fun < best.fun:
            best = r
    return best.x
