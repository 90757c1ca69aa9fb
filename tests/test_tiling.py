"""The kernels' tile-grid arithmetic agrees with TileGrid (algorithm A2, issue 7)."""

from __future__ import annotations

import numpy as np
import pytest

from pacs_numba.core.tiling import TileGrid
from pacs_numba.kernels.grid import _n_anchors_one, _tile_id_one, _tile_index_one


@pytest.mark.parametrize(
    ("shape", "patch", "stride"), [((10, 7, 5), 4, 2), ((9, 9, 9), 3, 3), ((1, 13, 6), 5, 1)]
)
def test_kernel_grid_helpers_match_tilegrid(shape, patch, stride):
    g = TileGrid(shape, patch, stride)
    counts = tuple(_n_anchors_one(n, stride) for n in shape)
    assert counts == g.counts
    _, c1, c2 = counts
    ids = []
    for i0 in range(counts[0]):
        for i1 in range(c1):
            for i2 in range(c2):
                r = _tile_id_one(i0, i1, i2, c1, c2)
                assert r == g.tile_id(i0, i1, i2)
                assert _tile_index_one(r, c1, c2) == g.index(r) == (i0, i1, i2)
                ids.append(r)
    assert ids == list(range(g.n_tiles))  # axis-0-major, dense
    labels = g.labels()
    # the label of a voxel is the id of the tile whose stride block holds it
    v = (shape[0] - 1, shape[1] // 2, shape[2] - 1)
    assert labels[v] == g.tile_id(*(x // stride for x in v))
    assert labels.max() == g.n_tiles - 1 and np.unique(labels).size == g.n_tiles
