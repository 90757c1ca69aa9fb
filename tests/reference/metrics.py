"""Slow twins of the metric kernels, written from algorithm A7.6 (the reference's expressions).

SSIM calls ``skimage.metrics.structural_similarity`` itself: it is the oracle.
Never imports numba or pacs_numba.kernels.
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

AXES = {"axial": 0, "coronal": 1, "sagittal": 2}


def foreground(hr) -> np.ndarray:
    """algorithm A7.6 mask: hr > 0 over finite voxels."""
    hr = np.asarray(hr, dtype=np.float32)
    return (hr > 0) & np.isfinite(hr)


def mse(hr, pred) -> float:
    m = foreground(hr)
    d = hr[m].astype(np.float32) - pred[m].astype(np.float32)
    return float(np.mean(d * d, dtype=np.float64))


def mae(hr, pred) -> float:
    m = foreground(hr)
    return float(np.mean(np.abs(pred[m].astype(np.float32) - hr[m].astype(np.float32))))


def psnr(hr, pred) -> float:
    m = foreground(hr)
    fin = hr[np.isfinite(hr)]
    data_range = float(fin.max() - fin.min())
    mse32 = np.mean((pred[m].astype(np.float32) - hr[m].astype(np.float32)) ** 2)
    if mse32 <= 0:
        return float("inf")
    return float(20.0 * np.log10((data_range + 1e-12) / np.sqrt(mse32 + 1e-12)))


def ssim_slices(hr, pred, mask, axis) -> np.ndarray:
    """Per-slice skimage SSIM of t*m vs p*m; NaN where the reference skips the slice."""
    a = AXES[axis] if isinstance(axis, str) else int(axis)
    hr = np.asarray(hr, dtype=np.float32)
    pred = np.asarray(pred, dtype=np.float32)
    m = np.asarray(mask, dtype=bool) & np.isfinite(hr)
    out = np.full(hr.shape[a], np.nan)
    for i in range(hr.shape[a]):
        ms = np.take(m, i, axis=a)
        if not ms.any():
            continue
        ts = np.where(ms, np.take(hr, i, axis=a), np.float32(0)).astype(np.float32)
        ps = np.where(ms, np.take(pred, i, axis=a), np.float32(0)).astype(np.float32)
        data_range = float(ts.max() - ts.min())
        if data_range < 1e-7:
            continue
        try:
            score = structural_similarity(ts, ps, data_range=data_range)
        except ValueError:  # slice smaller than the 7x7 window
            continue
        if not np.isnan(score):
            out[i] = score
    return out


def ssim(hr, pred, axis="axial") -> float:
    s = ssim_slices(hr, pred, foreground(hr), axis)
    s = s[~np.isnan(s)]
    return float(np.mean(s)) if s.size else 0.0
