"""Fit a tile weight model from decomposed statistics (algorithm A5, A5.1, A5.2, A6).

One entry point, :func:`fit_model`, for the three weight models:

- the published one (``prior: none``, ``gating: none``): one simplex weight vector per
  tile, ridge toward nothing;
- the multi-scale prior (``prior: multiscale``, algorithm A5.1): each tile's weights are
  shrunk toward its parent tile's (the tile of twice the stride that contains it), parents
  fitted first, coarse to fine, from the same cached statistics coarsened;
- the edge-gated model (``gating: edge``, algorithm A5.2): two simplex weight vectors per
  tile (edge, flat), ``2M`` unknowns; it combines with either prior.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError
from .cellstats import CellStats, combine, combine_gated
from .gating import solve_two_simplex_qp
from .solve import laplacian_smooth, solve_simplex_qp, solve_unconstrained


def weight_model_conflict(pacs: Any) -> tuple[str, str] | None:
    """Say which key makes the weight model of ``pacs`` impossible, or return None.

    ``prior: multiscale`` builds parent tiles from disjoint regions, so it needs
    ``fit_region: first_block`` or ``centre``; ``gating: edge`` has value statistics per
    label cell only, so it needs ``first_block`` (``centre`` without overlap is that), and
    ``lambda_edge`` and ``lambda_grad`` 0 (algorithm A5.1, A5.2).  ``pacs`` is any object with
    those attributes (a :class:`PacsConfig` or a tune candidate).
    """
    if pacs.prior == "multiscale" and pacs.fit_region == "window":
        return "prior", ("multiscale needs fit_region: first_block or centre (the parents "
                         "are unions of disjoint regions); got fit_region: window")
    if (pacs.gating == "edge" and pacs.fit_region == "centre" and pacs.stride < pacs.patch_size
            and pacs.mixing_window != "flat"):
        return "gating", ("edge needs fit_region: first_block (the gated statistics are "
                          "per label cell); got fit_region: centre")
    if pacs.gating == "edge" and (pacs.lambda_edge > 0 or pacs.lambda_grad > 0):
        return "gating", ("edge needs lambda_edge: 0 and lambda_grad: 0 (the gated fit has "
                          f"value statistics only); got lambda_edge: {pacs.lambda_edge:g}, "
                          f"lambda_grad: {pacs.lambda_grad:g}")
    return None


def _level_counts(shape: tuple[int, ...], stride: int) -> tuple[int, int, int]:
    return tuple(math.ceil(n / stride) for n in shape)  # type: ignore[return-value]


def parent_index(counts: tuple[int, int, int]) -> NDArray[np.int64]:
    """Index of each tile's parent in the grid of twice the stride (algorithm A5.1).

    Tile ``(i0, i1, i2)`` of a grid with ``counts`` tiles per axis lies in parent
    ``(i0 // 2, i1 // 2, i2 // 2)`` of the grid with ``ceil(n_d / 2)`` tiles per axis, the
    layout of :meth:`CellStats.coarsen` with factor 2.

    Examples
    --------
    >>> parent_index((3, 1, 2)).tolist()
    [0, 0, 0, 0, 1, 1]
    """
    n0, n1, n2 = counts
    p1, p2 = -(-n1 // 2), -(-n2 // 2)
    i0, i1, i2 = np.meshgrid(np.arange(n0), np.arange(n1), np.arange(n2), indexing="ij")
    return (((i0 // 2) * p1 + i1 // 2) * p2 + i2 // 2).reshape(-1).astype(np.int64)


def _normal_equations(
    st: CellStats, gated: bool, lambda_edge: float, lambda_grad: float,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    if gated:
        return combine_gated(st)
    return combine(st, lambda_edge=lambda_edge, lambda_grad=lambda_grad)


def _solve(
    q: NDArray[np.float64], b: NDArray[np.float64], lam: float, active: NDArray[np.bool_],
    *, simplex: bool, gated: bool, m: int,
) -> NDArray[np.float64]:
    if gated and simplex:
        w = solve_two_simplex_qp(q, b, lam, active)
    elif simplex:
        w = solve_simplex_qp(q, b, lam, active=active)
    else:
        w = solve_unconstrained(q, b, lam, active=active)
    w[~active] = 1.0 / m
    return w


def prior_strength_scale(q: NDArray[np.float64], active: NDArray[np.bool_]) -> float:
    """Mean diagonal of the active tiles' ``Q``: what ``prior_strength = 1`` weighs.

    With ``mu = prior_strength * scale`` the prior counts like the data of an average tile
    of the level, so one ``prior_strength`` means the same for any volume, voxel count,
    number of patients or stride; tiles with fewer voxels than average are shrunk more.
    """
    if not active.any():
        return 0.0
    d = np.einsum("tii->t", q[active]) / q.shape[1]
    return float(d.mean())


def fit_model(
    stats: CellStats,
    *,
    simplex: bool,
    lambda_ridge: float,
    lambda_edge: float = 0.0,
    lambda_grad: float = 0.0,
    laplacian_tau: float = 0.0,
    prior: str = "none",
    prior_strength: float = 1.0,
    gating: str = "none",
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Tile weights of any weight model from (summed) decomposed statistics.

    Parameters
    ----------
    stats : CellStats
        Summed training statistics at the fit's stride (``first_block``) or boxes
        (``window``, only with ``prior: none``); with ``gating: edge`` they must hold the
        gated parts.
    simplex : bool
        Constrain each weight vector to the simplex (exact QP).
    lambda_ridge, lambda_edge, lambda_grad, laplacian_tau : float
        As in algorithm A4-A6 (``lambda_edge`` and ``lambda_grad`` must be 0 with gating).
    prior : {"none", "multiscale"}
        ``multiscale``: minimise ``f(w) + mu ||w - w_parent||^2`` per tile (algorithm A5.1).
    prior_strength : float
        ``mu`` in units of the level's mean tile diagonal (:func:`prior_strength_scale`).
    gating : {"none", "edge"}
        ``edge``: two weight vectors per tile (algorithm A5.2).

    Returns
    -------
    weights : (T, M) or (T, 2M) float32
        Per tile ``w``, or ``(a, b)`` (edge, flat) with gating; ``1/M`` where nothing was
        learned.
    learned : (T,) bool
        Tiles with mask voxels.

    Raises
    ------
    ConfigError
        On an unknown prior or gating, a ``window`` fit with the multi-scale prior, or
        lambdas the gated statistics cannot serve.

    Examples
    --------
    >>> from pacs_numba.core.cellstats import box_statistics, StatsKey
    >>> rng = np.random.default_rng(0)
    >>> hr = rng.random((9, 8, 7), np.float32) + 0.5
    >>> key = StatsKey.make(region="first_block", stride=4, patch_size=4, window="flat",
    ...                     edge_power=1.0, grad_operator="sobel", with_edge=False,
    ...                     with_grad=False)
    >>> st = box_statistics(hr, [hr, hr + rng.random(hr.shape, np.float32)], key)
    >>> w, learned = fit_model(st, simplex=True, lambda_ridge=0.0, prior="multiscale")
    >>> w.shape, bool(np.allclose(w.sum(1), 1))
    ((12, 2), True)
    """
    if prior not in ("none", "multiscale"):
        raise ConfigError(f"prior {prior!r}: expected one of ['none', 'multiscale']")
    if gating not in ("none", "edge"):
        raise ConfigError(f"gating {gating!r}: expected one of ['none', 'edge']")
    gated = gating == "edge"
    if gated and (lambda_edge > 0 or lambda_grad > 0):
        raise ConfigError("gating: edge needs lambda_edge: 0 and lambda_grad: 0")
    m = stats.n_experts
    if prior == "multiscale":
        if stats.key.region == "window":
            raise ConfigError("prior: multiscale needs fit_region: first_block or centre")
        if not (math.isfinite(prior_strength) and prior_strength > 0):
            raise ConfigError(f"prior_strength must be a finite number > 0, got "
                              f"{prior_strength!r}")
        levels = [stats]
        while max(_level_counts(stats.shape, levels[-1].key.stride)) > 1:
            levels.append(levels[-1].parents())
        parent: NDArray[np.float64] | None = None
        for st in reversed(levels):
            q, b = _normal_equations(st, gated, lambda_edge, lambda_grad)
            active = st.counts > 0
            if parent is not None:
                counts = _level_counts(st.shape, st.key.stride)
                wp = parent[parent_index(counts)]
                mu = prior_strength * prior_strength_scale(q, active)
                q = q + mu * np.eye(q.shape[1])
                b = b + mu * wp
            parent = _solve(q, b, lambda_ridge, active, simplex=simplex, gated=gated, m=m)
        w64 = parent
    else:
        q, b = _normal_equations(stats, gated, lambda_edge, lambda_grad)
        active = stats.counts > 0
        w64 = _solve(q, b, lambda_ridge, active, simplex=simplex, gated=gated, m=m)
    learned = stats.counts > 0
    weights = w64.astype(np.float32)  # algorithm A5: weights are stored as float32
    if laplacian_tau > 0:
        counts = _level_counts(stats.shape, stats.key.stride)  # the tile grid (algorithm A2)
        halves = [weights[:, :m], weights[:, m:]] if gated else [weights]
        weights = np.concatenate(
            [laplacian_smooth(np.ascontiguousarray(h), learned, counts, laplacian_tau)
             for h in halves], axis=1)
    weights[~learned] = np.float32(1.0) / np.float32(m)
    return weights, learned
