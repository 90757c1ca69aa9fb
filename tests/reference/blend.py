"""Slow twins of the blend, weight-map and brain-mask kernels, written from algorithm A7 and A8.

Plain NumPy/SciPy in the reference's float32 arrays, tile by tile.  Never
imports numba or pacs_numba.kernels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.signal import windows


def anchors(n: int, stride: int) -> list[int]:
    """algorithm A2: 0, s, 2s, ... < n."""
    return list(range(0, n, stride))


def tile_boxes(shape, patch_size, stride):
    """Yield ``(tile_id, (slice0, slice1, slice2))`` in id order (axis-0-major)."""
    rid = 0
    for a0 in anchors(shape[0], stride):
        for a1 in anchors(shape[1], stride):
            for a2 in anchors(shape[2], stride):
                yield (
                    rid,
                    (
                        slice(a0, min(a0 + patch_size, shape[0])),
                        slice(a1, min(a1 + patch_size, shape[1])),
                        slice(a2, min(a2 + patch_size, shape[2])),
                    ),
                )
                rid += 1


def tile_window(box_shape, window: str) -> np.ndarray:
    """Reference ``_tile_window``: periodic Hann of the clipped lengths (scipy), or ones."""
    if window == "hann":
        w0, w1, w2 = (windows.hann(n, sym=False).astype(np.float32) for n in box_shape)
        return (w0[:, None, None] * w1[None, :, None] * w2[None, None, :]).astype(np.float32)
    return np.ones(box_shape, dtype=np.float32)


def zscore_expert(x, mu: float, sd: float) -> np.ndarray:
    """Non-finite raw values read as 0.0, then ``(x - mu) / sd`` on float32 like the reference."""
    x = np.asarray(x, dtype=np.float32)
    x = np.where(np.isfinite(x), x, np.float32(0.0)).astype(np.float32)
    return ((x - mu) / sd).astype(np.float32)


def blend_volume(experts, shape, patch_size, stride, weights, mus, sds, mu_hr, sd_hr, mask, window):
    """algorithm A7.2-A7.5, literally: overlap-add every tile box in float32 arrays."""
    kind = "flat" if stride >= patch_size else window
    x = np.stack(
        [zscore_expert(e, float(m), float(s)) for e, m, s in zip(experts, mus, sds, strict=True)]
    )
    acc = np.zeros(shape, dtype=np.float32)
    den = np.zeros(shape, dtype=np.float32)
    weights = np.asarray(weights, dtype=np.float32)
    for rid, box in tile_boxes(shape, patch_size, stride):
        sub = x[(slice(None),) + box]
        vals = np.tensordot(weights[rid], sub, axes=(0, 0)).astype(np.float32)
        win = tile_window(vals.shape, kind)
        acc[box] += win * vals
        den[box] += win
    blend_n = acc / (den + 1e-8)
    blend = (blend_n * float(sd_hr) + float(mu_hr)).astype(np.float32)
    if mask is not None:
        blend = blend * np.asarray(mask).astype(np.float32)
    return blend


def labels(shape, patch_size, stride) -> np.ndarray:
    """Reference ``region_labels``: paint every tile box in id order (last one wins)."""
    out = np.full(shape, -1, dtype=np.int64)
    for rid, box in tile_boxes(shape, patch_size, stride):
        out[box] = rid
    return out


def weight_maps(weights, shape, patch_size, stride) -> np.ndarray:
    """Reference ``expand_weights_to_volume``."""
    weights = np.asarray(weights, dtype=np.float32)
    lab = labels(shape, patch_size, stride)
    out = np.zeros(tuple(shape) + (weights.shape[1],), dtype=np.float32)
    for rid in np.unique(lab):
        out[lab == rid] = weights[rid]
    return out


def entropy_map(maps, eps: float = 1e-10) -> np.ndarray:
    """Reference ``compute_weight_entropy`` (float32 throughout)."""
    total = np.sum(maps, axis=-1, keepdims=True)
    wn = maps / (total + eps)
    return (-np.sum(wn * np.log(wn + eps), axis=-1)).astype(np.float32)


def dominant_map(maps) -> np.ndarray:
    """Reference ``get_dominant_model_map``."""
    return np.argmax(maps, axis=-1).astype(np.int32)


def weight_statistics(maps, model_names) -> dict:
    """Reference ``analyze_weight_statistics``."""
    out = {}
    for i, name in enumerate(model_names):
        w = maps[..., i]
        out[name] = {
            "mean": float(np.mean(w)),
            "std": float(np.std(w)),
            "min": float(np.min(w)),
            "max": float(np.max(w)),
            "median": float(np.median(w)),
            "q25": float(np.percentile(w, 25)),
            "q75": float(np.percentile(w, 75)),
        }
    return out


def brain_mask(hr, threshold: float = 0.1) -> np.ndarray:
    """algorithm A7.5 with scipy: largest 26-connected component; empty -> zeros."""
    b = np.asarray(hr, dtype=np.float32) >= threshold
    lab, n = ndimage.label(b, structure=np.ones((3, 3, 3)))
    if n == 0:
        return np.zeros(b.shape, dtype=np.uint8)
    keep = 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
    return (lab == keep).astype(np.uint8)
