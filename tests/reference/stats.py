"""Slow twins of ``pacs_numba.kernels.stats``, written literally from docs/algorithm.md A2-A4.

Everything is materialised the way the published reference does it: float32
z-scored volumes, ``scipy.ndimage`` gradient volumes (mode "nearest"), one
boolean mask ``labels == r`` per tile, and Q/B summed in float64 with einsum.
Two agreed additions to algorithm A3.1 are mirrored here: voxels where the HR or any
expert is non-finite are left out of the mask (and counted), and a non-finite
value is read as 0.0 wherever a value is still needed; an empty mask has the
identity z-score (mean 0, std 1).  Never imports numba or pacs_numba.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

SD_FLOOR = 1e-8  # A3.2
EDGE_EPS = 1e-6  # A3.4
SMOOTHING = {"sobel": [1.0, 2.0, 1.0], "prewitt": [1.0, 1.0, 1.0], "scharr": [3.0, 10.0, 3.0]}


def valid_mask(hr: np.ndarray, experts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Boolean mask ``finite(hr) & hr > 0 & finite(every expert)`` and non-finite counts."""
    hr = np.asarray(hr, np.float32)
    mask = np.isfinite(hr) & (np.nan_to_num(hr, nan=0.0, posinf=0.0, neginf=0.0) > 0)
    bad = [int(np.count_nonzero(~np.isfinite(hr)))]
    for x in experts:
        fin = np.isfinite(np.asarray(x, np.float32))
        mask &= fin
        bad.append(int(np.count_nonzero(~fin)))
    return mask, np.array(bad, np.int64)


def clean(vol: np.ndarray) -> np.ndarray:
    """float32 copy with non-finite values replaced by 0.0."""
    vol = np.asarray(vol, np.float32)
    return np.where(np.isfinite(vol), vol, np.float32(0.0))


def moments(vol: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean and population std (floored) of ``vol[mask]`` in float64 (A3.2)."""
    v = clean(vol)[np.asarray(mask, bool)].astype(np.float64)
    if v.size == 0:
        return 0.0, 1.0
    return float(v.mean()), max(float(v.std()), SD_FLOOR)


def zscore(vol: np.ndarray, mu: float, sd: float) -> np.ndarray:
    """``(vol - mu) / sd`` over the whole volume, as float32 (A3.2-3)."""
    return ((clean(vol).astype(np.float64) - mu) / sd).astype(np.float32)


def gradient(vol_n: np.ndarray, axis: int, operator: str) -> np.ndarray:
    """Derivative along ``axis`` with the given operator, mode "nearest" (A3.5)."""
    if operator == "sobel":
        return ndimage.sobel(vol_n, axis=axis, mode="nearest")
    if operator == "prewitt":
        return ndimage.prewitt(vol_n, axis=axis, mode="nearest")
    out = ndimage.correlate1d(vol_n, [-1.0, 0.0, 1.0], axis=axis, mode="nearest")
    for other in range(vol_n.ndim):
        if other != axis:
            out = ndimage.correlate1d(out, SMOOTHING[operator], axis=other, mode="nearest")
    return out


def edge_weight(hr_n: np.ndarray, lambda_edge: float, edge_power: float) -> np.ndarray:
    """``e = 1 + lambda_edge * (g / (max(g) + 1e-6)) ** edge_power`` (A3.4), float32."""
    s = [ndimage.sobel(hr_n, axis=d, mode="nearest") for d in range(3)]
    g = np.sqrt(s[0] ** 2 + s[1] ** 2 + s[2] ** 2)
    return 1 + lambda_edge * (g / (g.max() + EDGE_EPS)) ** edge_power


def patient_statistics(
    hr: np.ndarray,
    experts: Sequence[np.ndarray],
    labels: np.ndarray,
    n_tiles: int,
    *,
    lambda_edge: float,
    edge_power: float,
    lambda_grad: float,
    grad_operator: str = "sobel",
    tiles: Sequence[int] | None = None,
) -> dict[str, np.ndarray | float]:
    """Per-tile Q, B, counts of one patient (A3-A4), the slow obvious way.

    ``labels`` is the algorithm A2 label volume.  ``tiles`` restricts Q/B/counts to a
    subset (other rows stay 0).  Also returns ``yy`` per tile,
    ``sum omega y^2 + lambda_grad sum_d sum omega H_d^2``, which bounds ``|B|`` by
    Cauchy-Schwarz (the tests scale tolerances with it).
    """
    m = len(experts)
    mask, nonfinite = valid_mask(hr, experts)
    mu_hr, sd_hr = moments(hr, mask)
    mom = [moments(x, mask) for x in experts]
    hr_n = zscore(hr, mu_hr, sd_hr)
    xs_n = [zscore(x, mu, sd) for x, (mu, sd) in zip(experts, mom, strict=True)]
    e = edge_weight(hr_n, lambda_edge, edge_power) if lambda_edge > 0 else np.float32(1.0)
    omega = e * mask
    if lambda_grad > 0:
        h = [gradient(hr_n, d, grad_operator) for d in range(3)]
        g = [[gradient(x, d, grad_operator) for d in range(3)] for x in xs_n]
    q = np.zeros((n_tiles, m, m))
    b = np.zeros((n_tiles, m))
    yy = np.zeros(n_tiles)
    counts = np.zeros(n_tiles, np.int64)
    for r in range(n_tiles) if tiles is None else tiles:
        sel = labels == r
        w = omega[sel].astype(np.float64)
        x = np.stack([xn[sel] for xn in xs_n], axis=1).astype(np.float64)
        y = hr_n[sel].astype(np.float64)
        q[r] = np.einsum("v,va,vb->ab", w, x, x)
        b[r] = np.einsum("v,va,v->a", w, x, y)
        yy[r] = np.einsum("v,v,v->", w, y, y)
        if lambda_grad > 0:
            for d in range(3):
                gd = np.stack([gm[d][sel] for gm in g], axis=1).astype(np.float64)
                hd = h[d][sel].astype(np.float64)
                q[r] += lambda_grad * np.einsum("v,va,vb->ab", w, gd, gd)
                b[r] += lambda_grad * np.einsum("v,va,v->a", w, gd, hd)
                yy[r] += lambda_grad * np.einsum("v,v,v->", w, hd, hd)
        counts[r] = np.count_nonzero(mask[sel])
    return {
        "Q": q, "B": b, "counts": counts, "yy": yy, "mask": mask, "nonfinite": nonfinite,
        "mu_hr": mu_hr, "sd_hr": sd_hr,
        "mus": np.array([mu for mu, _ in mom]), "sds": np.array([sd for _, sd in mom]),
    }


def hann_profile(length: int, window: str) -> np.ndarray:
    """Per-axis window of a clipped box (A7.2): periodic Hann of its length, or ones."""
    if window == "flat" or length == 1:
        return np.ones(length)
    k = np.arange(length)
    return (0.5 - 0.5 * np.cos(2 * np.pi * k / length)).astype(np.float32).astype(np.float64)


def box_moments(
    hr: np.ndarray,
    experts: Sequence[np.ndarray],
    *,
    patch_size: int,
    stride: int,
    window: str,
    edge_power: float,
    grad_operator: str,
    centre: bool = False,
    normalisation: str = "hr",
) -> dict[str, np.ndarray]:
    """Decomposed per-tile statistics over window-weighted boxes, the slow obvious way.

    Returns ``parts`` (n_tiles, 4, n_terms) -- value, value * t^p, gradient, gradient * t^p,
    each with terms ``x_a y`` (a < M) then ``x_a x_c`` (a <= c, row-major) -- and ``counts``
    (mask voxels with a non-zero window weight).  ``window`` is the effective window
    (flat when ``stride >= patch_size``); ``patch_size == stride`` with "flat" is the label
    partition of A2.  ``centre`` (fit region ``centre``, A4): each voxel counts, with weight
    1, only for the tile whose box window is largest there (ties: the largest tile id).
    ``normalisation="experts"`` (A4): each expert is z-scored over the voxels where the
    experts' mean is > 0 (all finite), and the HR with the mean of the experts' means and
    the mean of their stds.
    """
    m = len(experts)
    mask, _ = valid_mask(hr, experts)
    mu_hr, sd_hr = moments(hr, mask)
    mom = [moments(x, mask) for x in experts]
    if normalisation == "experts":
        proxy = sum(clean(x) for x in experts) / np.float32(m)
        emask, _ = valid_mask(proxy, experts)
        mom = [moments(x, emask) for x in experts]
        mu_hr = float(np.mean([a for a, _ in mom]))
        sd_hr = float(np.mean([b for _, b in mom]))
    n_anchor = [-(-n // stride) for n in hr.shape]
    owner = []  # per axis: the tile whose window weighs each coordinate most
    for n, na in zip(hr.shape, n_anchor, strict=True):
        best = [(-1.0, -1)] * n
        for t in range(na):
            lo, hi = t * stride, min(t * stride + patch_size, n)
            prof = hann_profile(hi - lo, window)
            for v in range(lo, hi):
                if (prof[v - lo], t) >= best[v]:
                    best[v] = (prof[v - lo], t)
        owner.append(np.array([t for _, t in best]))
    hr_n = zscore(hr, mu_hr, sd_hr)
    xs_n = [zscore(x, mu, sd) for x, (mu, sd) in zip(experts, mom, strict=True)]
    s = [ndimage.sobel(hr_n, axis=d, mode="nearest") for d in range(3)]
    g = np.sqrt(s[0] ** 2 + s[1] ** 2 + s[2] ** 2)
    tp = (g / (g.max() + EDGE_EPS)) ** edge_power * mask
    vols = [hr_n, *xs_n]
    grads = [[gradient(v, d, grad_operator) for d in range(3)] for v in vols]
    pairs = [(a, 0) for a in range(1, m + 1)]
    pairs += [(a, c) for a in range(1, m + 1) for c in range(a, m + 1)]
    counts_axes = [-(-n // stride) for n in hr.shape]
    n_tiles = int(np.prod(counts_axes))
    parts = np.zeros((n_tiles, 4, len(pairs)))
    counts = np.zeros(n_tiles, np.int64)
    r = 0
    for i0 in range(counts_axes[0]):
        for i1 in range(counts_axes[1]):
            for i2 in range(counts_axes[2]):
                box = tuple(
                    slice(i * stride, min(i * stride + patch_size, n))
                    for i, n in zip((i0, i1, i2), hr.shape, strict=True)
                )
                h = [hann_profile(sl.stop - sl.start, window) for sl in box]
                if centre:
                    h = [(owner[d][sl] == i).astype(np.float64)
                         for d, (sl, i) in enumerate(zip(box, (i0, i1, i2), strict=True))]
                win = h[0][:, None, None] * h[1][None, :, None] * h[2][None, None, :]
                wp = (win * mask[box]).ravel()
                we = (win * tp[box]).ravel()
                counts[r] = np.count_nonzero(mask[box] & (win > 0))
                for t, (a, c) in enumerate(pairs):
                    va = vols[a][box].ravel().astype(np.float64)
                    vc = vols[c][box].ravel().astype(np.float64)
                    gg = sum(
                        grads[a][d][box].ravel().astype(np.float64)
                        * grads[c][d][box].ravel().astype(np.float64)
                        for d in range(3)
                    )
                    parts[r, 0, t] = np.dot(wp, va * vc)
                    parts[r, 1, t] = np.dot(we, va * vc)
                    parts[r, 2, t] = np.dot(wp, gg)
                    parts[r, 3, t] = np.dot(we, gg)
                r += 1
    return {"parts": parts, "counts": counts}
