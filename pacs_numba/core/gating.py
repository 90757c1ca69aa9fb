"""The edge-gated weight model (algorithm A5.2): arrays in, arrays out.

Per tile two weight vectors, ``a`` for edge voxels and ``b`` for flat ones, each on the
simplex, mixed per voxel by an edge strength ``g(v)`` in [0, 1] computed from the experts
alone::

    blend(v) = g(v) sum_m a_m x_m(v) + (1 - g(v)) sum_m b_m x_m(v)

so at every voxel the blend is still a convex combination of the experts, with weights
``g a + (1 - g) b``.  The fit minimises the same weighted squared error as the published
model over ``z = (a, b)``, from statistics that are sums over voxels of products weighted by
``1``, ``g`` and ``g^2`` (decomposed, cached and coarsened like the published parts).
"""

from __future__ import annotations

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._config import GATE_QUANTILE
from ..errors import ConfigError
from ..kernels.gated import _mean_sobel_magnitude, _solve_two_simplex_qp
from .checks import as_volume_list

#: Enumerating pairs of supports costs ``(2^M - 1)^2`` KKT solves per tile.
MAX_GATED_EXPERTS = 6


def edge_gate(experts: ArrayLike) -> NDArray[np.float32]:
    """Edge strength of every voxel, from the experts alone (algorithm A5.2).

    Parameters
    ----------
    experts : sequence of M (N0, N1, N2) array_like
        Raw expert volumes (non-finite values read as 0).

    Returns
    -------
    (N0, N1, N2) float32
        ``g = min(1, s / q)`` with ``s`` the Sobel gradient magnitude of the experts' mean
        (boundary "nearest") and ``q`` its ``GATE_QUANTILE`` quantile over the voxels where
        the mean is > 0 (the head); all 0 if ``q`` is 0.  Dividing by a quantile of the
        volume's own magnitudes makes ``g`` independent of the intensity scale.

    Examples
    --------
    >>> x = np.zeros((6, 6, 6), np.float32); x[:, :, 3:] = 1
    >>> g = edge_gate([x, x])
    >>> float(g.max()), float(g[0, 0, 0])
    (1.0, 0.0)
    """
    vols = as_volume_list(list(experts))
    mag = _mean_sobel_magnitude(vols)
    mean = np.zeros(mag.shape, np.float32)
    for v in vols:
        mean += np.where(np.isfinite(v), v, np.float32(0))
    head = mag[mean > 0]
    q = float(np.quantile(head, GATE_QUANTILE)) if head.size else 0.0
    if not q > 0:
        return np.zeros(mag.shape, np.float32)
    mag *= np.float32(1.0 / q)
    np.minimum(mag, np.float32(1.0), out=mag)
    return mag


def gated_normal_equations(
    plain_q: NDArray[np.float64], plain_b: NDArray[np.float64], gated_parts: NDArray[np.float64],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Return the ``2M``-unknown normal equations of the gated fit from the decomposed moments.

    Parameters
    ----------
    plain_q : (T, M, M) float64
        ``S = sum_v x x^T`` per tile (the published value part).
    plain_b : (T, M) float64
        ``s = sum_v x y``.
    gated_parts : (T, 2, M + M (M + 1) / 2) float64
        ``sum g (x y, x x^T)`` and ``sum g^2 (x y, x x^T)``
        (``kernels.gated._gated_moments`` layout).

    Returns
    -------
    Q : (T, 2M, 2M) float64
        ``[[G2, G - G2], [G - G2, S - 2 G + G2]]`` with ``G = sum g x x^T``,
        ``G2 = sum g^2 x x^T``: the moments of ``(g x, (1 - g) x)``.
    B : (T, 2M) float64
        ``(sum g x y, s - sum g x y)``.
    """
    m = plain_b.shape[1]
    idx = term_index(m)
    g1 = gated_parts[:, 0][:, idx]
    g2 = gated_parts[:, 1][:, idx]
    gy = gated_parts[:, 0, :m]
    t = plain_b.shape[0]
    q = np.empty((t, 2 * m, 2 * m))
    q[:, :m, :m] = g2
    q[:, :m, m:] = g1 - g2
    q[:, m:, :m] = g1 - g2
    q[:, m:, m:] = plain_q - 2.0 * g1 + g2
    b = np.concatenate([gy, plain_b - gy], axis=1)
    return q, b


def term_index(m: int) -> NDArray[np.int64]:
    """``(M, M)`` index of each expert-product term in a part (upper triangle, symmetric).

    A part's columns hold the ``M`` single-expert terms, then the products ``a <= c`` in
    row order; the statistics (``cellstats``) and the gated normal equations read them so.
    """
    idx = np.empty((m, m), np.int64)
    t = m
    for a in range(m):
        for c in range(a, m):
            idx[a, c] = idx[c, a] = t
            t += 1
    return idx


def solve_two_simplex_qp(
    Q: ArrayLike, B: ArrayLike, lambda_ridge: float, active: ArrayLike,
) -> NDArray[np.float64]:
    """Exact minimiser of ``z^T (Q + lambda I) z - 2 B^T z`` with both halves of z on the simplex.

    Parameters
    ----------
    Q : (T, 2M, 2M) array_like
    B : (T, 2M) array_like
    lambda_ridge : float
        Ridge ``>= 0``.
    active : (T,) array_like of bool
        Tiles to solve; the others get ``1/M`` in both halves.

    Returns
    -------
    (T, 2M) float64

    Raises
    ------
    ConfigError
        With more than :data:`MAX_GATED_EXPERTS` experts, or a bad ``lambda_ridge``.

    Examples
    --------
    >>> q = np.eye(4)[None]; b = np.array([[1.0, 0.0, 0.0, 1.0]])
    >>> solve_two_simplex_qp(q, b, 0.0, [True]).round(6).tolist()
    [[1.0, 0.0, 0.0, 1.0]]
    """
    q = np.ascontiguousarray(Q, np.float64)
    b = np.ascontiguousarray(B, np.float64)
    m = b.shape[1] // 2
    if m > MAX_GATED_EXPERTS:
        raise ConfigError(f"gating: edge supports at most {MAX_GATED_EXPERTS} experts "
                          f"(exact enumeration of support pairs); got {m}")
    if not (np.isfinite(lambda_ridge) and lambda_ridge >= 0):
        raise ConfigError(f"lambda_ridge must be a finite number >= 0, got {lambda_ridge!r}")
    act = np.ascontiguousarray(active, np.bool_)
    return _solve_two_simplex_qp(q, b, float(lambda_ridge), act, numba.get_num_threads())


def gated_mix(
    edge_blend: NDArray[np.float32], flat_blend: NDArray[np.float32], gate: NDArray[np.float32],
) -> NDArray[np.float32]:
    """``g * edge_blend + (1 - g) * flat_blend`` in float32 (in place in ``flat_blend``).

    Each blend is an overlap-add of convex combinations with the same windows, mapped back
    and masked by the same affine map and mask, so mixing the two finished blends equals
    blending with the per-voxel weights ``g a + (1 - g) b`` (algorithm A5.2).
    """
    edge_blend -= flat_blend
    edge_blend *= gate
    flat_blend += edge_blend
    return flat_blend
