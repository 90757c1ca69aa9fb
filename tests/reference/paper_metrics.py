"""Slow NumPy/SciPy twins of the paper metrics (3-D MS-SSIM, MMD-MF), from the definitions.

Whole-volume filters, plain array expressions, no cleverness; written from
docs/paper-metrics.md.  Never imports numba or pacs_numba.kernels.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

WEIGHTS = [0.0448, 0.2856, 0.3001, 0.2363, 0.1333]


def crop_common(*vols):
    """Crop every array at the origin to the common minimum shape."""
    shape = tuple(min(v.shape[d] for v in vols) for d in range(3))
    return [np.asarray(v)[: shape[0], : shape[1], : shape[2]] for v in vols]


# ------------------------------------------------------------------------------ MS-SSIM


def geometry(shape):
    """(window size, number of scales) for a volume shape."""
    min_dim = min(shape)
    win = 11
    while win > 3 and min_dim <= (win - 1) * 16:
        win -= 2
    n = 5
    while n > 1 and min_dim // 2 ** (n - 1) < win:
        n -= 1
    return win, n


def gauss_window(win, sigma=1.5):
    coords = np.arange(win, dtype=np.float32) - np.float32(win // 2)
    g = np.exp(-(coords**2) / np.float32(2 * sigma**2)).astype(np.float32)
    return (g / g.sum(dtype=np.float32)).astype(np.float32)


def valid_filter(v, g):
    """Separable 'valid' correlation along axes 0, 1, 2; float32 after every pass."""
    r = len(g) // 2
    out = v
    for axis in range(3):
        full = ndimage.correlate1d(out, g.astype(np.float64), axis=axis, output=np.float32,
                                   mode="constant")
        sl = [slice(None)] * 3
        sl[axis] = slice(r, out.shape[axis] - r)
        out = full[tuple(sl)]
    return out


def avg_pool(v):
    """2x2x2 mean, stride 2, zero padding of (size % 2) on both sides, divisor 8."""
    pad = [(s % 2, s % 2) for s in v.shape]
    p = np.pad(v.astype(np.float64), pad)
    out_shape = [(s + 2 * q - 2) // 2 + 1 for s, (q, _) in zip(v.shape, pad, strict=True)]
    p = p[: 2 * out_shape[0], : 2 * out_shape[1], : 2 * out_shape[2]]
    blocks = p.reshape(out_shape[0], 2, out_shape[1], 2, out_shape[2], 2)
    return (blocks.sum(axis=(1, 3, 5)) / 8.0).astype(np.float32)


def ssim_cs(x, y, g, c1, c2):
    """Plain means of the SSIM and CS maps.

    The five filtered maps are float32 (as torch stores them); the map formula is
    evaluated in float64 from them, and averaged in float64.
    """
    mu1 = valid_filter(x, g).astype(np.float64)
    mu2 = valid_filter(y, g).astype(np.float64)
    e11 = valid_filter(x * x, g).astype(np.float64)
    e22 = valid_filter(y * y, g).astype(np.float64)
    e12 = valid_filter(x * y, g).astype(np.float64)
    s1 = e11 - mu1 * mu1
    s2 = e22 - mu2 * mu2
    s12 = e12 - mu1 * mu2
    cs = (2 * s12 + c2) / (s1 + s2 + c2)
    ssim = (2 * mu1 * mu2 + c1) / (mu1 * mu1 + mu2 * mu2 + c1) * cs
    return float(np.mean(ssim)), float(np.mean(cs))


def ms_ssim_scales(reference, test, mask=None):
    """(ssim means, cs means, weights) per scale, or None when < 2 scales."""
    if mask is None:
        ref, tst = crop_common(reference, test)
        m = ref.astype(np.float32) > 0
    else:
        ref, tst, m = crop_common(reference, test, mask)
        m = m.astype(bool)
    ref = ref.astype(np.float32)
    tst = tst.astype(np.float32)
    t = ref * m
    p = tst * m
    win, n = geometry(t.shape)
    if n < 2:
        return None
    rng = float(t.max() - t.min())
    if rng < 1e-8:
        rng = 1.0
    c1 = float(np.float32((0.01 * rng) ** 2))
    c2 = float(np.float32((0.03 * rng) ** 2))
    g = gauss_window(win)
    ssims, css = [], []
    for s in range(n):
        a, b = ssim_cs(p, t, g, c1, c2)
        ssims.append(a)
        css.append(b)
        if s < n - 1:
            p = avg_pool(p)
            t = avg_pool(t)
    w = np.array(WEIGHTS[:n]) / np.sum(WEIGHTS[:n])
    return np.array(ssims), np.array(css), w


def ms_ssim_3d(reference, test, mask=None):
    out = ms_ssim_scales(reference, test, mask)
    if out is None:
        return float("nan")
    ssims, css, w = out
    vals = np.concatenate([css[:-1], ssims[-1:]])
    return float(np.prod(np.maximum(vals, 0.0) ** w))


# ------------------------------------------------------------------------------ MMD-MF


def features(vol):
    """(N, 5) float32 whole-volume features in C order."""
    v = vol.astype(np.float32)
    gx = ndimage.sobel(v, axis=2, mode="nearest")
    gy = ndimage.sobel(v, axis=1, mode="nearest")
    gz = ndimage.sobel(v, axis=0, mode="nearest")
    grad = np.sqrt(gx * gx + gy * gy + gz * gz)
    logs = [ndimage.gaussian_laplace(v, sigma=s) for s in (1.0, 2.0, 4.0)]  # mode "reflect"
    mean = ndimage.uniform_filter(v, size=5, mode="nearest")
    mean_sq = ndimage.uniform_filter(v * v, size=5, mode="nearest")
    var = mean_sq - mean * mean
    var[var < 0] = 0.0
    return np.column_stack([grad.ravel()] + [x.ravel() for x in logs] + [var.ravel()])


def sample_indices(mask, n_samples=10_000, seed=42):
    """Flat (C-order) indices of the sampled mask voxels."""
    flat = np.flatnonzero(mask)
    if flat.size > n_samples:
        flat = flat[np.random.RandomState(seed).choice(flat.size, n_samples, replace=False)]
    return flat


def zscored(reference, test, mask=None, n_samples=10_000, seed=42):
    """Jointly z-scored (test, reference) feature samples, float32, or None if mask empty."""
    if mask is None:
        ref, tst = crop_common(reference, test)
        m = ref > 0
    else:
        ref, tst, m = crop_common(reference, test, mask)
        m = m.astype(bool)
    if not m.any():
        return None
    idx = sample_indices(m, n_samples, seed)
    fx = features(tst)[idx]
    fy = features(ref)[idx]
    both = np.concatenate([fx, fy], axis=0)
    mu = both.mean(axis=0)
    sd = both.std(axis=0)
    sd[sd < 1e-8] = 1.0
    return (fx - mu) / sd, (fy - mu) / sd


def poly_mmd(x, y, dtype=np.float64, block=1000):
    """Unbiased MMD^2 with k = (a.b / d + 1)^3, kernel matrices built in row blocks."""
    x = x.astype(dtype)
    y = y.astype(dtype)
    n, d = x.shape

    def ksum(a, b, drop_diagonal):
        total = 0.0
        for i0 in range(0, len(a), block):
            k = ((a[i0:i0 + block] / d) @ b.T + 1) ** 3
            total += float(k.sum(dtype=np.float64))
            if drop_diagonal:
                rows = np.arange(i0, min(i0 + block, len(a)))
                total -= float(k[rows - i0, rows].sum(dtype=np.float64))
        return total

    sxx = ksum(x, x, True) / (n * (n - 1)) if n > 1 else 0.0
    syy = ksum(y, y, True) / (n * (n - 1)) if n > 1 else 0.0
    sxy = ksum(x, y, False) / (n * n)
    return max(0.0, sxx + syy - 2 * sxy)


def mmd_mf(reference, test, mask=None, n_samples=10_000, seed=42):
    z = zscored(reference, test, mask, n_samples, seed)
    if z is None:
        return float("nan")
    return poly_mmd(*z)
