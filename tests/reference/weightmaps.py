"""Slow twin of the blend-weight maps (pacs_numba.core.weightmaps), written from algorithm A7.2.

Tile by tile in float64: add ``win * w_t`` and ``win`` over every tile box, then divide, the
way the blend overlap-adds its z-scored experts.
"""

from __future__ import annotations

import numpy as np

from .blend import tile_boxes, tile_window


def blend_weight_maps(weights, shape, patch_size, stride, window):
    """``sum_t win_t w_t / (sum_t win_t + 1e-8)`` per voxel, (N0, N1, N2, M) float32."""
    kind = "flat" if stride >= patch_size else window
    weights = np.asarray(weights, dtype=np.float64)
    acc = np.zeros((*shape, weights.shape[1]), dtype=np.float64)
    den = np.zeros(shape, dtype=np.float64)
    for rid, box in tile_boxes(shape, patch_size, stride):
        box_shape = tuple(s.stop - s.start for s in box)
        win = tile_window(box_shape, kind).astype(np.float64)
        acc[box] += win[..., None] * weights[rid]
        den[box] += win
    return (acc / (den + 1e-8)[..., None]).astype(np.float32)
