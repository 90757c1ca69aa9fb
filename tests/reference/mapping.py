"""Slow twin of the HR-free ``weighted`` map-back (pacs_numba.core.mapping, algorithm B6).

Written from docs/algorithm.md: per voxel, the weights the blend applies,
``W_e(v) = sum_t win_t(v) w_t,e / (sum_t win_t(v) + 1e-8)``, give the blend in z-space
``sum_e W_e z_e`` and the statistics it is mapped back with,
``sd(v) = sum_e W_e sd_e / sum_e W_e`` and ``mu(v)`` likewise (the mean of the experts'
means and stds where ``sum_e W_e = 0``); with the edge-gated model the per-voxel weights are
``g W_a + (1 - g) W_b``.  Everything per voxel in float64, tile by tile.
"""

from __future__ import annotations

import numpy as np

from .weightmaps import blend_weight_maps


def voxel_weights(weights, shape, patch_size, stride, window, gate=None):
    """(N0, N1, N2, M) float64 per-voxel weights the blend applies (gate-mixed with 2M columns)."""
    w = np.asarray(weights, np.float64)
    if gate is None:
        return blend_weight_maps(w, shape, patch_size, stride, window).astype(np.float64)
    m = w.shape[1] // 2
    a = blend_weight_maps(w[:, :m], shape, patch_size, stride, window).astype(np.float64)
    b = blend_weight_maps(w[:, m:], shape, patch_size, stride, window).astype(np.float64)
    g = np.asarray(gate, np.float64)[..., None]
    return g * a + (1 - g) * b


def weighted_blend(experts, weights, shape, patch_size, stride, window, mus, sds, mask,
                   gate=None):
    """The HR-free blend mapped back with the blend-weighted experts' mean and std."""
    W = voxel_weights(weights, shape, patch_size, stride, window, gate)
    mus = np.asarray(mus, np.float64)
    sds = np.asarray(sds, np.float64)
    z = np.stack([(np.where(np.isfinite(x), x, 0).astype(np.float64) - mu) / sd
                  for x, mu, sd in zip(experts, mus, sds, strict=True)], axis=-1)
    blend_n = (W * z).sum(-1)
    total = W.sum(-1)
    safe = np.where(total > 0, total, 1.0)
    sd = np.where(total > 0, (W * sds).sum(-1) / safe, sds.mean())
    mu = np.where(total > 0, (W * mus).sum(-1) / safe, mus.mean())
    out = blend_n * sd + mu
    if mask is not None:
        out = out * (np.asarray(mask) != 0)
    return out.astype(np.float32)


def map_back(blend_n, maps, mask, mu_fallback, sd_fallback):
    """The kernel's per-voxel step: ``(b * sd + mu) * mask`` from the three statistic maps."""
    b = np.asarray(blend_n, np.float64)
    maps = np.asarray(maps, np.float64)
    total = maps[..., 2]
    safe = np.where(total > 0, total, 1.0)
    sd = np.where(total > 0, maps[..., 0] / safe, sd_fallback)
    mu = np.where(total > 0, maps[..., 1] / safe, mu_fallback)
    out = b * sd + mu
    if mask is not None:
        out = out * (np.asarray(mask) != 0)
    return out.astype(np.float32)
