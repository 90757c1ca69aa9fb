"""Tile grid geometry (algorithm A2): anchors, counts, boxes and ids.  Pure functions."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..config import check_stride


@dataclass(frozen=True)
class TileGrid:
    """The regular grid of 3-D tiles over a volume.

    Parameters
    ----------
    shape : tuple of int
        Volume shape ``(N0, N1, N2)``.
    patch_size : int
        Tile edge length ``p`` in voxels.
    stride : int
        Anchor spacing ``s`` in voxels, ``1 <= s <= p``.

    Notes
    -----
    Along axis ``d`` the anchors are ``0, s, 2s, ... < N_d``, so there are
    ``n_d = ceil(N_d / s)`` of them; tile boxes are ``[a, min(a + p, N_d))``.
    Tile ids are axis-0-major, ``r = (i0 * n1 + i1) * n2 + i2``.  The label of a
    voxel (used for fitting and weight maps) is the largest id among the tiles
    covering it, ``(floor(v0/s) * n1 + floor(v1/s)) * n2 + floor(v2/s)``.

    Examples
    --------
    >>> g = TileGrid((10, 7, 5), patch_size=4, stride=2)
    >>> g.counts, g.n_tiles
    ((5, 4, 3), 60)
    >>> g.box(59)
    ((8, 10), (6, 7), (4, 5))
    """

    shape: tuple[int, int, int]
    patch_size: int
    stride: int

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ValueError(f"shape must be three positive lengths, got {self.shape}")
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {self.patch_size}")
        check_stride(self.patch_size, self.stride)

    @property
    def counts(self) -> tuple[int, int, int]:
        """Number of anchors along each axis, ``ceil(N_d / stride)``."""
        s = self.stride
        return tuple(math.ceil(n / s) for n in self.shape)  # type: ignore[return-value]

    @property
    def n_tiles(self) -> int:
        """Total number of tiles."""
        n0, n1, n2 = self.counts
        return n0 * n1 * n2

    @property
    def overlapping(self) -> bool:
        """Whether neighbouring tiles overlap (``stride < patch_size``)."""
        return self.stride < self.patch_size

    def tile_id(self, i0, i1, i2):  # noqa: ANN001, ANN201 - ints or integer arrays
        """Tile id of grid index ``(i0, i1, i2)``: ``(i0 * n1 + i1) * n2 + i2``.

        The Python side of ``kernels.grid._tile_id_one``; broadcasts over integer arrays.
        """
        _, n1, n2 = self.counts
        return (i0 * n1 + i1) * n2 + i2

    def index(self, tile: int) -> tuple[int, int, int]:
        """Grid index ``(i0, i1, i2)`` of tile id ``tile`` (the inverse of :meth:`tile_id`)."""
        _, n1, n2 = self.counts
        return tile // (n1 * n2), (tile // n2) % n1, tile % n2

    def box(self, tile: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """Half-open voxel ranges of the tile box along each axis."""
        out = []
        for i, n in zip(self.index(tile), self.shape, strict=True):
            a = i * self.stride
            out.append((a, min(a + self.patch_size, n)))
        return tuple(out)  # type: ignore[return-value]

    def labels(self) -> NDArray[np.int64]:
        """Label volume (algorithm A2), ``int64`` of ``shape``.  For tests and small volumes."""
        s = self.stride
        i0, i1, i2 = (np.arange(n) // s for n in self.shape)
        return self.tile_id(i0[:, None, None], i1[None, :, None], i2[None, None, :])
