"""Tile-grid arithmetic of the kernels (algorithm A2): anchors per axis and tile ids.

The one place kernels spell the tile-id formula; :class:`pacs_numba.core.tiling.TileGrid` is its
Python side and a test checks that both agree.  Tile ids are axis-0-major,
``r = (i0 * c1 + i1) * c2 + i2`` for grid index ``(i0, i1, i2)`` on a grid of
``(c0, c1, c2)`` tiles.  Integer arithmetic only; serial helpers meant to be inlined
into ``prange`` bodies.
"""

from __future__ import annotations

from numba import njit

from .._config import CACHE, FASTMATH


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _n_anchors_one(length, stride):
    """Count the tile anchors ``0, s, 2s, ... < length``, i.e. ``ceil(length / stride)``.

    Parameters
    ----------
    length : int
        Volume length ``N_d`` along the axis.
    stride : int
        Anchor spacing ``s >= 1``.

    Returns
    -------
    int
    """
    return (length + stride - 1) // stride


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _tile_id_one(i0, i1, i2, c1, c2):
    """Return the id of the tile at grid index ``(i0, i1, i2)`` (``c1 x c2`` tiles per plane).

    Parameters
    ----------
    i0, i1, i2 : int
        Grid index.
    c1, c2 : int
        Tiles along axes 1 and 2.

    Returns
    -------
    int
        ``(i0 * c1 + i1) * c2 + i2``.
    """
    return (i0 * c1 + i1) * c2 + i2


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _tile_index_one(r, c1, c2):
    """Return the grid index ``(i0, i1, i2)`` of tile id ``r`` (inverse of :func:`_tile_id_one`).

    Parameters
    ----------
    r : int
        Tile id.
    c1, c2 : int
        Tiles along axes 1 and 2.

    Returns
    -------
    tuple of 3 int
    """
    plane = c1 * c2
    return r // plane, (r // c2) % c1, r % c2
