"""Tile weights from the accumulated statistics: solve, smooth, fill (algorithm A5, A6, B3).

Public wrappers around :mod:`pacs_numba.kernels.qp`.  They check shapes and values,
bring the arrays into the layout the kernels are compiled for (C-contiguous float64
statistics, float32 weights, bool masks) and call the kernels.  The engine calls
:func:`fit_weights`; the other functions are its parts, plus
:func:`slsqp_reference_weights`, the published solver, kept for comparisons.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import ConfigError, InputError
from ..kernels.qp import (
    _laplacian_smooth,
    _solve_simplex_qp,
    _solve_simplex_qp_active_set,
    _solve_unconstrained,
)
from .checks import check_grid_counts

#: Up to this many experts the simplex QP enumerates all 2^M - 1 supports of each tile
#: (kernels.qp._simplex_qp_one); beyond it an exact active-set method takes over
#: (kernels.qp._active_set_qp_one), whose cost grows like M^3 instead of 2^M M^3.
#: Both are exact; the enumeration is kept where it is as fast, because on a tie
#: (several minimisers, lambda_ridge = 0 and duplicated experts) it picks the one the
#: earlier releases picked.  Measured per tile (2 threads, loaded machine, median of 3
#: runs over 2000 tiles): M = 4 enumeration 9 us, active set 10 us; M = 6: 34 us vs 10 us;
#: M = 8: 177 us vs 6 us; M = 12: 5.6 ms vs 12 us.
_ENUMERATION_MAX_EXPERTS = 5


def _check_lambda(lambda_ridge: float) -> float:
    try:
        lam = float(lambda_ridge)
    except (TypeError, ValueError):
        raise ConfigError(
            f"lambda_ridge must be a number >= 0, got {lambda_ridge!r}; "
            "set pacs_sr.lambda_ridge to e.g. 1e-4"
        ) from None
    if isinstance(lambda_ridge, bool) or not math.isfinite(lam) or lam < 0.0:
        raise ConfigError(
            f"lambda_ridge must be a finite number >= 0, got {lambda_ridge!r}; "
            "set pacs_sr.lambda_ridge to e.g. 1e-4"
        )
    return lam


def _check_tau(tau: float) -> float:
    try:
        val = float(tau)
    except (TypeError, ValueError):
        raise ConfigError(
            f"laplacian_tau must be a number in [0, 1], got {tau!r}; "
            "set pacs_sr.laplacian_tau to 0 (off) or e.g. 0.05"
        ) from None
    if isinstance(tau, bool) or not 0.0 <= val <= 1.0:  # also rejects NaN
        raise ConfigError(
            f"laplacian_tau must be in [0, 1], got {tau!r}; "
            "set pacs_sr.laplacian_tau to 0 (off) or e.g. 0.05"
        )
    return val


def _check_stats(
    Q: ArrayLike, B: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    q = np.ascontiguousarray(Q, dtype=np.float64)
    b = np.ascontiguousarray(B, dtype=np.float64)
    if q.ndim != 3 or q.shape[1] != q.shape[2] or q.shape[1] < 1:
        raise InputError(
            f"Q must have shape (n_tiles, n_experts, n_experts) with n_experts >= 1, "
            f"got {q.shape}"
        )
    if b.shape != q.shape[:2]:
        raise InputError(
            f"B has shape {b.shape}; expected {q.shape[:2]} (n_tiles, n_experts) to match "
            f"Q of shape {q.shape}"
        )
    return q, b


def _check_active(active: ArrayLike | None, n_tiles: int) -> NDArray[np.bool_]:
    if active is None:
        return np.ones(n_tiles, dtype=np.bool_)
    act = np.ascontiguousarray(active, dtype=np.bool_)
    if act.shape != (n_tiles,):
        raise InputError(f"active has shape {act.shape}; expected ({n_tiles},), one flag per tile")
    return act


def _check_finite(
    q: NDArray[np.float64], b: NDArray[np.float64], active: NDArray[np.bool_]
) -> None:
    bad = active & ~(np.isfinite(q).all(axis=(1, 2)) & np.isfinite(b).all(axis=1))
    if bad.any():
        tiles = np.flatnonzero(bad)
        raise ValueError(
            f"the statistics of {tiles.size} tile(s) hold NaN or inf (first: tile "
            f"{int(tiles[0])}); check the input volumes for non-finite voxels"
        )


def simplex_method(n_experts: int) -> str:
    """Name the method :func:`solve_simplex_qp` uses for ``n_experts`` experts.

    ``"exact-kkt"`` (every support enumerated, its KKT system solved) up to
    ``_ENUMERATION_MAX_EXPERTS`` experts, else ``"active-set"``.
    """
    return "exact-kkt" if n_experts <= _ENUMERATION_MAX_EXPERTS else "active-set"


def solve_simplex_qp(
    Q: ArrayLike,
    B: ArrayLike,
    lambda_ridge: float,
    active: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Exact simplex-constrained weights of every tile (algorithm A5, B3).

    For each active tile ``t`` return the minimiser of
    ``f(w) = w^T (Q_t + lambda_ridge I) w - 2 B_t^T w`` subject to ``w >= 0`` and
    ``sum(w) = 1``.

    Parameters
    ----------
    Q : (n_tiles, n_experts, n_experts) array_like, float64
        Per-tile Gram matrices (symmetric positive semi-definite).
    B : (n_tiles, n_experts) array_like, float64
        Per-tile cross terms.
    lambda_ridge : float
        Ridge added to the diagonal, ``>= 0``.
    active : (n_tiles,) array_like of bool, optional
        Tiles to solve (default all); the others get ``1/n_experts``.

    Returns
    -------
    (n_tiles, n_experts) ndarray of float64
        Weights, ``>= 0`` and summing to 1 on every tile.

    Raises
    ------
    ConfigError
        If ``lambda_ridge`` is negative or not finite.
    InputError
        If the shapes disagree.
    ValueError
        If an active tile's statistics are not finite.

    Notes
    -----
    For up to ``_ENUMERATION_MAX_EXPERTS`` experts, enumerates every support of each
    tile and solves its KKT system; the minimiser is the feasible candidate with the
    smallest objective (see :func:`pacs_numba.kernels.qp._simplex_qp_one` for why this
    is exact).  For more experts, a primal active-set method finds a minimiser too
    (:func:`pacs_numba.kernels.qp._active_set_qp_one`); any number of experts works.  The
    minimiser is unique when ``Q + lambda_ridge I`` is positive definite, and then both
    methods return it (to rounding).  With ``lambda_ridge = 0`` and a singular Q
    (duplicated or collinear experts) several weight vectors are optimal: the enumeration
    returns the first optimal candidate in increasing support-bitmask order (bit ``i`` is
    expert ``i``; objectives equal to rounding may resolve either way), which is not
    necessarily the one with the smallest support, and the active-set method may return
    another optimal vector.  Both are deterministic (algorithm A5).  Parallel over tiles.

    Examples
    --------
    >>> Q = np.array([[[2.0, 0.0], [0.0, 1.0]]])
    >>> B = np.array([[1.0, 1.0]])
    >>> solve_simplex_qp(Q, B, 0.0).round(6)
    array([[0.333333, 0.666667]])
    """
    lam = _check_lambda(lambda_ridge)
    q, b = _check_stats(Q, B)
    act = _check_active(active, q.shape[0])
    _check_finite(q, b, act)
    enumerate_supports = q.shape[1] <= _ENUMERATION_MAX_EXPERTS
    kernel = _solve_simplex_qp if enumerate_supports else _solve_simplex_qp_active_set
    return kernel(q, b, lam, act, numba.get_num_threads())


def solve_unconstrained(
    Q: ArrayLike,
    B: ArrayLike,
    lambda_ridge: float,
    active: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Unconstrained weights ``(Q_t + lambda_ridge I)^+ B_t`` of every tile (algorithm A5).

    Parameters
    ----------
    Q : (n_tiles, n_experts, n_experts) array_like, float64
        Per-tile Gram matrices (symmetric).
    B : (n_tiles, n_experts) array_like, float64
        Per-tile cross terms.
    lambda_ridge : float
        Ridge added to the diagonal, ``>= 0``.
    active : (n_tiles,) array_like of bool, optional
        Tiles to solve (default all); the others get ``1/n_experts``.

    Returns
    -------
    (n_tiles, n_experts) ndarray of float64
        The solution of ``(Q_t + lambda_ridge I) w = B_t``; the least-norm
        (pseudo-inverse) solution where the matrix is singular.

    Raises
    ------
    ConfigError
        If ``lambda_ridge`` is negative or not finite.
    InputError
        If the shapes disagree.
    ValueError
        If an active tile's statistics are not finite.

    Notes
    -----
    Symmetric eigendecomposition by cyclic Jacobi; eigenvalues at most ``1e-12``
    times the largest are treated as zero (so the result equals
    ``numpy.linalg.pinv(A, rcond=1e-12) @ B``).  For a well-conditioned matrix this
    is ``numpy.linalg.solve`` to rounding.  The reference calls ``solve`` and falls
    back to ``pinv`` only on an exactly zero pivot, so on numerically singular
    tiles (condition number > 1e12) it returns a huge, rounding-dominated vector
    where this returns the least-norm one.

    Examples
    --------
    >>> Q = np.array([[[2.0, 0.0], [0.0, 0.0]]])
    >>> solve_unconstrained(Q, np.array([[1.0, 0.0]]), 0.0)
    array([[0.5, 0. ]])
    """
    lam = _check_lambda(lambda_ridge)
    q, b = _check_stats(Q, B)
    act = _check_active(active, q.shape[0])
    _check_finite(q, b, act)
    return _solve_unconstrained(q, b, lam, act, numba.get_num_threads())


def laplacian_smooth(
    weights: ArrayLike,
    learned: ArrayLike,
    counts: tuple[int, int, int],
    tau: float,
) -> NDArray[np.float32]:
    """One Jacobi step of Laplacian smoothing of tile weights on the tile grid (algorithm A6).

    Parameters
    ----------
    weights : (n_tiles, n_experts) array_like, float32
        Tile weights, tile ids axis-0-major (:class:`pacs_numba.core.tiling.TileGrid`).
    learned : (n_tiles,) array_like of bool
        Tiles that have a learned weight: the nodes of the graph.
    counts : tuple of 3 int
        Tile counts ``(n0, n1, n2)`` of the grid, ``n0 * n1 * n2 == n_tiles``.
    tau : float
        Smoothing strength in ``[0, 1]``.

    Returns
    -------
    (n_tiles, n_experts) ndarray of float32
        New array.  Each learned tile becomes
        ``(1 - tau) W_r + tau * mean(W over its learned 6-neighbours)`` (unchanged if
        it has none), with negatives set to 0, divided by ``sum + 1e-8``; computed in
        float64, rounded once.  Unlearned tiles are copied unchanged.  With
        ``tau == 0`` the weights are returned unchanged (a copy), as the reference
        does.

    Raises
    ------
    ConfigError
        If ``tau`` is outside ``[0, 1]``.
    InputError
        If the shapes disagree with each other or with ``counts``.

    Examples
    --------
    >>> w = np.array([[1, 0], [0, 1], [0.5, 0.5]], dtype=np.float32)
    >>> laplacian_smooth(w, np.array([True, True, False]), (3, 1, 1), 0.5)
    array([[0.5, 0.5],
           [0.5, 0.5],
           [0.5, 0.5]], dtype=float32)
    """
    t = _check_tau(tau)
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.ndim != 2 or w.shape[1] < 1:
        raise InputError(f"weights must have shape (n_tiles, n_experts), got {w.shape}")
    lrn = np.ascontiguousarray(learned, dtype=np.bool_)
    if lrn.shape != (w.shape[0],):
        raise InputError(
            f"learned has shape {lrn.shape}; expected ({w.shape[0]},), one flag per tile"
        )
    n0, n1, n2 = check_grid_counts(counts, w.shape[0])
    if t == 0.0:
        return w.copy()
    return _laplacian_smooth(w, lrn, n0, n1, n2, t)


def objective(
    Q: ArrayLike, B: ArrayLike, lambda_ridge: float, W: ArrayLike
) -> NDArray[np.float64]:
    """Per-tile objective ``f(w) = w^T (Q + lambda_ridge I) w - 2 B^T w`` (algorithm A5).

    Parameters
    ----------
    Q : (n_tiles, n_experts, n_experts) array_like, float64
        Per-tile Gram matrices.
    B : (n_tiles, n_experts) array_like, float64
        Per-tile cross terms.
    lambda_ridge : float
        Ridge, ``>= 0``.
    W : (n_tiles, n_experts) array_like
        Weights (any float dtype; evaluated in float64).

    Returns
    -------
    (n_tiles,) ndarray of float64
        ``f`` of each tile.

    Raises
    ------
    ConfigError
        If ``lambda_ridge`` is negative or not finite.
    InputError
        If the shapes disagree.

    Examples
    --------
    >>> objective(np.eye(2)[None], np.ones((1, 2)), 0.0, np.array([[0.5, 0.5]]))
    array([-1.5])
    """
    lam = _check_lambda(lambda_ridge)
    q, b = _check_stats(Q, B)
    w = np.asarray(W, dtype=np.float64)
    if w.shape != b.shape:
        raise InputError(f"W has shape {w.shape}; expected {b.shape} like B")
    quad = np.einsum("ti,tij,tj->t", w, q, w) + lam * np.einsum("ti,ti->t", w, w)
    return quad - 2.0 * np.einsum("ti,ti->t", b, w)


def slsqp_reference_weights(
    Q: ArrayLike,
    B: ArrayLike,
    lambda_ridge: float,
    active: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Weights as the published PaCS-SR computes them: one SciPy SLSQP run per tile.

    For comparisons and benchmarks only; the engine uses :func:`solve_simplex_qp`.

    Parameters
    ----------
    Q : (n_tiles, n_experts, n_experts) array_like, float64
        Per-tile Gram matrices.
    B : (n_tiles, n_experts) array_like, float64
        Per-tile cross terms.
    lambda_ridge : float
        Ridge, ``>= 0``.
    active : (n_tiles,) array_like of bool, optional
        Tiles to solve (default all); the others get ``1/n_experts``.

    Returns
    -------
    (n_tiles, n_experts) ndarray of float64
        The published solver's weights, before its cast to float32.

    Raises
    ------
    ConfigError
        If ``lambda_ridge`` is negative or not finite.
    InputError
        If the shapes disagree.

    Notes
    -----
    Mirrors ``pacs_sr.model.model._solve_simplex_qp`` of the published tool: SLSQP on
    the unscaled objective from ``w0 = 1/M`` with the analytic gradient
    ``2 (Q + lam I) w - 2 B``, the equality constraint ``sum(w) = 1`` (with its
    Jacobian), the inequality constraint ``w >= 0`` (no Jacobian, no bounds) and
    ``options={"maxiter": 200, "ftol": 1e-12}``; then negatives are set to 0 and
    the vector is divided by its sum (``1/M`` if the sum is not positive).  At the
    scale of real statistics this often stops at or near ``w0`` (algorithm A5).
    Slow: a Python-level optimisation per tile.
    """
    # scipy.optimize costs ~40 MB of RSS and 0.15 s to import; only this reference path needs it
    from scipy.optimize import minimize

    lam = _check_lambda(lambda_ridge)
    q, b = _check_stats(Q, B)
    act = _check_active(active, q.shape[0])
    n_tiles, m = b.shape
    out = np.full((n_tiles, m), 1.0 / m)
    eye = np.eye(m)
    w0 = np.full(m, 1.0 / m)
    cons = [
        {"type": "eq", "fun": lambda w: np.sum(w) - 1.0, "jac": lambda w: np.ones_like(w)},
        {"type": "ineq", "fun": lambda w: w},
    ]
    for t in np.flatnonzero(act):
        qr = q[t] + lam * eye
        bt = b[t]
        res = minimize(
            lambda w, qr=qr, bt=bt: float(w @ qr @ w - 2.0 * bt @ w),
            w0,
            jac=lambda w, qr=qr, bt=bt: 2.0 * (qr @ w) - 2.0 * bt,
            constraints=cons,
            method="SLSQP",
            options={"maxiter": 200, "ftol": 1e-12},
        )
        w = np.array(res.x, dtype=np.float64)
        w[w < 0] = 0.0
        s = w.sum()
        out[t] = w0 if s <= 0 else w / s
    return out


def fit_weights(
    Q: ArrayLike,
    B: ArrayLike,
    counts_n: ArrayLike,
    grid_counts: tuple[int, int, int],
    *,
    simplex: bool,
    lambda_ridge: float,
    laplacian_tau: float,
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Tile weights from summed statistics: solve, store as float32, smooth, fill.

    Parameters
    ----------
    Q : (n_tiles, n_experts, n_experts) array_like, float64
        Per-tile statistics summed over the training patients (algorithm A4).
    B : (n_tiles, n_experts) array_like, float64
        Per-tile cross terms (algorithm A4).
    counts_n : (n_tiles,) array_like of int
        Masked voxel count ``n_r`` of each tile; tiles with ``n_r > 0`` are learned.
    grid_counts : tuple of 3 int
        Tile counts ``(n0, n1, n2)`` (``TileGrid.counts``); their product is n_tiles.
    simplex : bool
        Constrain the weights to the simplex (exact QP) or solve the normal equations.
    lambda_ridge : float
        Ridge, ``>= 0``.
    laplacian_tau : float
        Smoothing strength in ``[0, 1]``; 0 turns smoothing off.

    Returns
    -------
    weights : (n_tiles, n_experts) ndarray of float32
        Learned weights (algorithm A5, smoothed per A6 if ``laplacian_tau > 0``);
        ``float32(1) / n_experts`` on tiles without a learned weight.
    learned : (n_tiles,) ndarray of bool
        ``counts_n > 0``.

    Raises
    ------
    ConfigError
        If ``lambda_ridge < 0`` or ``laplacian_tau`` is outside ``[0, 1]``.
    InputError
        If the shapes disagree with each other or with ``grid_counts``.
    ValueError
        If a learned tile's statistics are not finite.

    Notes
    -----
    As in the reference, smoothing (when on) also applies to unconstrained weights,
    and its clipping and renormalisation then move them onto the simplex.

    Examples
    --------
    >>> Q = np.stack([np.eye(2), np.eye(2)])
    >>> B = np.array([[1.0, 0.0], [0.0, 0.0]])
    >>> w, learned = fit_weights(Q, B, [10, 0], (2, 1, 1), simplex=True,
    ...                          lambda_ridge=0.0, laplacian_tau=0.0)
    >>> w, learned
    (array([[1. , 0. ],
           [0.5, 0.5]], dtype=float32), array([ True, False]))
    """
    lam = _check_lambda(lambda_ridge)
    tau = _check_tau(laplacian_tau)
    q, b = _check_stats(Q, B)
    n_tiles, m = b.shape
    n = np.asarray(counts_n)
    if n.shape != (n_tiles,):
        raise InputError(f"counts_n has shape {n.shape}; expected ({n_tiles},), one count per tile")
    grid = check_grid_counts(grid_counts, n_tiles)
    learned = n > 0
    if simplex:
        w64 = solve_simplex_qp(q, b, lam, active=learned)
    else:
        w64 = solve_unconstrained(q, b, lam, active=learned)
    weights = w64.astype(np.float32)  # algorithm A5: weights are stored as float32
    if tau > 0.0:
        weights = laplacian_smooth(weights, learned, grid, tau)
    weights[~learned] = np.float32(1.0) / np.float32(m)
    return weights, learned
