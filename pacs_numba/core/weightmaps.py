"""Weight maps as NIfTI volumes that clinical viewers open (ITK-SNAP, FSLeyes).

The published ``{pid}_weights_test.npz`` files hold, per voxel, the weight vector of the
voxel's *label* tile (algorithm A8): a blocky picture that is not what the blend applies
where tiles overlap.  The maps here are the weights the blend really applies (algorithm
A7.2): at voxel ``v``

    W_e(v) = sum_t win_t(v) w_{t,e} / (sum_t win_t(v) + 1e-8)

over the tiles ``t`` whose box covers ``v``, with the blend's window (periodic Hann of each
clipped box, or flat) and the blend's ``1e-8``.  Since the blend is linear in the z-scored
experts, ``blend_z(v) = sum_e W_e(v) z_e(v)`` exactly, and ``sum_e W_e(v) = 1`` (to float
rounding) wherever some window is nonzero, in particular inside the brain.

The window of a tile is a product of three 1-D windows and the tile weights sit on a regular
3-D grid, so the overlap-add is three one-axis contractions per expert instead of a loop
over 3-D tiles; it is computed in float64, in a fixed order (reruns give the same bits), and
rounded to float32 once.

Files (names from :func:`map_paths`): a 4-D float32 weight map (one volume per expert, in
the model's order), a float32 entropy map ``-sum_e W_e ln W_e`` (0 = one expert decides,
``ln M`` = all equal), a uint8 dominant-expert label map (label ``e + 1`` for expert ``e``,
0 outside the brain) and a JSON legend naming every label and its colour.  An ITK-SNAP label
description file with the same colours is written beside it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .tiling import TileGrid

#: label colours (RGB 0-255) of experts 1..M in the dominant-expert map; colour-blind safe
#: (Okabe-Ito), repeated beyond 8 experts
EXPERT_COLOURS = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66),
    (0, 114, 178), (213, 94, 0), (204, 121, 167), (120, 120, 120),
)


DEN_EPS = 1e-8  # the blend's guard in acc / (den + 1e-8) (algorithm A7.2)


def window_matrix(length: int, patch_size: int, stride: int, window: str) -> NDArray[np.float64]:
    """1-D windows of every tile along one axis, as a matrix.

    Parameters
    ----------
    length : int
        Volume length along the axis.
    patch_size, stride : int
        Tile edge and anchor spacing.
    window : {"hann", "flat"}
        The mixing window; ``flat`` is used whenever ``stride >= patch_size`` (as the blend).

    Returns
    -------
    (ceil(length / stride), length) float64
        Row ``t`` holds tile ``t``'s window over its clipped box ``[t s, min(t s + p, N))``
        and 0 elsewhere.  Hann is the periodic window of the clipped length rounded to
        float32 (as the blend's table), with the value 1 for a one-voxel box.

    Examples
    --------
    >>> window_matrix(5, 4, 2, "hann").round(2).tolist()
    [[0.0, 0.5, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.75, 0.75], [0.0, 0.0, 0.0, 0.0, 1.0]]
    """
    kind = "flat" if stride >= patch_size else window
    if kind not in ("hann", "flat"):
        raise ValueError(f"window must be 'hann' or 'flat', got {window!r}")
    n_anchors = math.ceil(length / stride)
    out = np.zeros((n_anchors, length), dtype=np.float64)
    for t in range(n_anchors):
        a = t * stride
        n_box = min(a + patch_size, length) - a
        if kind == "flat" or n_box == 1:
            out[t, a : a + n_box] = 1.0
        else:
            k = np.arange(n_box, dtype=np.float64)
            vals = 0.5 + 0.5 * np.cos(k * (2.0 * math.pi / n_box) - math.pi)
            out[t, a : a + n_box] = vals.astype(np.float32)
    return out


def _contract_first(g: NDArray, mat: NDArray) -> NDArray:
    """``out[..., x] = sum_a g[a, ...] mat[a, x]``: the first axis of ``g`` for a new last one.

    Written as one multiply-add per tile row, in row order, instead of ``np.tensordot``:
    BLAS may sum in an order that depends on threads and memory alignment, which would make
    reruns (e.g. a resumed run) differ in the last bit; this does not.  Each row of ``mat``
    is nonzero on at most ``patch_size`` entries, so the work is small.
    """
    out = np.zeros((*g.shape[1:], mat.shape[1]), dtype=np.float64)
    for a in range(mat.shape[0]):
        nz = np.flatnonzero(mat[a])
        if nz.size:
            lo, hi = int(nz[0]), int(nz[-1]) + 1
            out[..., lo:hi] += g[a][..., None] * mat[a, lo:hi]
    return out


def _overlap_add(grid_values: NDArray[np.float64], mats: Sequence[NDArray]) -> NDArray:
    """``sum_{a,b,c} G[a,b,c] A0[a,x] A1[b,y] A2[c,z]`` as three contractions."""
    out = _contract_first(grid_values, mats[0])  # (n1, n2, N0)
    out = _contract_first(out, mats[1])  # (n2, N0, N1)
    return _contract_first(out, mats[2])  # (N0, N1, N2)


def blend_weight_maps(weights: ArrayLike, grid: TileGrid, window: str) -> NDArray[np.float32]:
    """Per-voxel weight of every expert as the blend applies it (algorithm A7.2).

    Parameters
    ----------
    weights : (grid.n_tiles, M) array_like
        Tile weights, ``1/M`` for tiles without a learned weight.
    grid : TileGrid
        The weights' tile grid.
    window : {"hann", "flat"}
        The mixing window the blend uses.

    Returns
    -------
    (N0, N1, N2, M) float32
        ``W_e(v)`` of the module docstring.  Each voxel's weights sum to
        ``den / (den + 1e-8)``: 1 to float32 rounding wherever a window is nonzero, 0 on
        the voxels no window reaches (with Hann, the first voxel of each axis).

    Raises
    ------
    ValueError
        If ``weights`` does not have one row per tile.

    Examples
    --------
    >>> g = TileGrid((4, 4, 4), patch_size=2, stride=2)
    >>> w = np.tile([[0.25, 0.75]], (g.n_tiles, 1))
    >>> blend_weight_maps(w, g, "flat")[1, 2, 3].tolist()
    [0.25, 0.75]
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != grid.n_tiles:
        raise ValueError(f"weights have shape {w.shape}; expected ({grid.n_tiles}, n_experts)")
    mats = [
        window_matrix(n, grid.patch_size, grid.stride, window) for n in grid.shape
    ]
    den = _overlap_add(np.ones(grid.counts), mats)
    den += DEN_EPS
    out = np.empty((*grid.shape, w.shape[1]), dtype=np.float32)
    for e in range(w.shape[1]):
        out[..., e] = _overlap_add(w[:, e].reshape(grid.counts), mats) / den
    return out


def entropy_map(maps: ArrayLike) -> NDArray[np.float32]:
    """Shannon entropy (natural log) of each voxel's weights, ``-sum_e W_e ln W_e``.

    Weights are renormalised to sum 1 first; a voxel whose weights are all 0 gets 0.

    Examples
    --------
    >>> m = np.array([[[[0.5, 0.5], [1.0, 0.0]]]], np.float32)
    >>> [round(float(x), 4) for x in entropy_map(m)[0, 0]]
    [0.6931, 0.0]
    """
    m = np.asarray(maps, dtype=np.float32)
    total = m.sum(axis=-1)
    ent = np.zeros(m.shape[:-1], dtype=np.float32)
    for e in range(m.shape[-1]):  # one expert at a time: N-sized temporaries only
        _add_entropy_term(ent, m[..., e], total)
    return ent


def _add_entropy_term(ent: NDArray[np.float32], w: NDArray, total: NDArray) -> None:
    """``ent -= p ln p`` with ``p = w / total`` where ``p > 0`` (in place)."""
    p = np.divide(w, total, out=np.zeros(ent.shape, np.float32), where=total > 0)
    pos = p > 0
    p[pos] *= np.log(p[pos])
    ent -= p


def dominant_labels(maps: ArrayLike, mask: ArrayLike | None = None) -> NDArray[np.uint8]:
    """Label ``e + 1`` of the expert with the largest weight (first on ties), 0 = background.

    Background is outside ``mask`` (when given) and where every weight is 0.
    """
    m = np.asarray(maps)
    labels = (np.argmax(m, axis=-1) + 1).astype(np.uint8)
    labels[m.max(axis=-1) <= 0] = 0
    if mask is not None:
        labels[~np.asarray(mask, dtype=bool)] = 0
    return labels


def legend(model_names: Sequence[str]) -> dict:
    """JSON legend of the dominant-expert label map: label -> name and RGB colour."""
    labels = {"0": {"name": "background", "rgb": [0, 0, 0]}}
    for e, name in enumerate(model_names):
        labels[str(e + 1)] = {
            "name": str(name),
            "rgb": list(EXPERT_COLOURS[e % len(EXPERT_COLOURS)]),
        }
    return {
        "description": "dominant expert per voxel: the expert with the largest blend weight "
        "(ties: the first in model order); 0 outside the brain",
        "labels": labels,
    }


class BlendWeightMaps:
    """The blend's weight maps of one model, made one expert at a time (memory-lean).

    Holds ``1 / (den + 1e-8)`` (float32), the entropy map (float32) and the dominant-expert
    labels (uint8) of the whole grid: ``9N`` bytes.  Each expert's map is recomputed when
    it is written (three small matrix products), so a 4-D map is never held whole; writing a
    set peaks at about ``12N`` more (one float64 map and its float32 copy).  Building the
    object peaks at about ``29N``.

    Parameters
    ----------
    weights : (n_tiles, M) array_like
        Tile weights.
    grid : TileGrid
        Their grid.
    window : {"hann", "flat"}
        The blend's mixing window.
    """

    def __init__(self, weights: ArrayLike, grid: TileGrid, window: str) -> None:
        self.w = np.asarray(weights, dtype=np.float64)
        if self.w.ndim != 2 or self.w.shape[0] != grid.n_tiles:
            raise ValueError(
                f"weights have shape {self.w.shape}; expected ({grid.n_tiles}, n_experts)"
            )
        self.grid = grid
        self.n_experts = self.w.shape[1]
        self.mats = [window_matrix(n, grid.patch_size, grid.stride, window) for n in grid.shape]
        den = _overlap_add(np.ones(grid.counts), self.mats)
        den += DEN_EPS
        self.inv_den = (1.0 / den).astype(np.float32)
        total = ((den - DEN_EPS) / den).astype(np.float32)  # = sum_e W_e
        del den
        self.entropy = np.zeros(grid.shape, dtype=np.float32)
        best = np.zeros(grid.shape, dtype=np.float32)
        self.labels = np.zeros(grid.shape, dtype=np.uint8)
        for e in range(self.n_experts):
            w_e = self.expert(e)
            _add_entropy_term(self.entropy, w_e, total)
            better = w_e > best  # strict: the first expert wins ties, as argmax
            best[better] = w_e[better]
            self.labels[better] = e + 1
            del w_e, better
        self.entropy += np.float32(0.0)  # -0.0 -> 0.0

    def expert(self, e: int) -> NDArray[np.float32]:
        """``W_e`` of expert ``e`` (0-based) as a float32 volume."""
        acc = _overlap_add(self.w[:, e].reshape(self.grid.counts), self.mats)
        acc *= self.inv_den
        return acc.astype(np.float32)

    def maps(self) -> NDArray[np.float32]:
        """All experts' maps, (N0, N1, N2, M) float32 (for small volumes and tests)."""
        return np.stack([self.expert(e) for e in range(self.n_experts)], axis=-1)
