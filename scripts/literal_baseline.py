#!/usr/bin/env python
"""Literal NumPy/SciPy re-implementation of the published PaCS-SR (docs/algorithm.md part A).

This script is deliberately *not* clever.  It does what the published tool does, the way the
published tool does it, so that it can serve as

1. the side-by-side baseline that the benchmark measures pacs_numba's speed-ups and memory
   ratios against, and
2. an independent stand-in for the published tool in end-to-end tests: it writes the algorithm A8
   output tree (weights.json, metrics.json, blends, weight-map npz files), so that
   ``pacs-numba evaluate --weights`` can be checked against it.

It never imports pacs_numba.

The published way of working, kept on purpose:

- the fit runs every training patient in a joblib ``loky`` worker process; the evaluation
  then blends and scores the patients one after another in the parent process;
- each fit worker reads HR + M experts with nibabel and materialises float32 z-scored copies,
  the Sobel edge-weight volume, one gradient volume per axis for HR and every expert (when
  ``lambda_grad > 0``) and the int32 label volume;
- every tile ``r`` gathers its voxels through a whole-volume boolean mask ``labels == r`` and
  forms its products ``x w x^T`` and ``x w y`` in float32;
- workers return per-patient ``{tile: (Q, B, n)}`` dicts which the parent sums in float64 in
  manifest order;
- one ``scipy.optimize.minimize(method="SLSQP")`` call per tile on the unscaled objective,
  with ``sum(w) = 1`` as an equality and ``w >= 0`` as an inequality constraint given without
  a Jacobian (so SLSQP differentiates it by finite differences), no bounds;
- the smoothing graph is read off the label volume with Python loops over its voxel lines.

Usage::

    python scripts/literal_baseline.py --config C --fold N --spacing S --pulse P \
        [--workers W] [--weights weights.json] [--out-root DIR]

``--fold`` is 1-based (fold 1 is the manifest's first fold, written to ``fold_1``).  With
``--weights`` the fit is skipped and the given weights are evaluated.

The importable pieces (``patient_statistics``, ``blend_patient``, ``patient_metrics``,
``solve_tile``, ``laplacian_smooth``, ``weight_maps`` ...) work on in-memory arrays so the
test-suite can use them as an oracle.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import yaml
from numpy.typing import NDArray
from scipy import ndimage as ndi
from scipy.optimize import minimize

log = logging.getLogger("literal_baseline")

# Epsilons of docs/algorithm.md part A (kept local: this script must not import pacs_numba).
SD_FLOOR = 1e-8
EDGE_EPS = 1e-6
BLEND_EPS = 1e-8
SMOOTH_EPS = 1e-8
ENTROPY_EPS = 1e-10
PSNR_EPS = 1e-12
SSIM_MIN_RANGE = 1e-7
BRAIN_THRESHOLD = 0.1
SSIM_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
METRIC_KEYS = ("mse", "mae", "psnr", "ssim")


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """The pacs_sr settings this baseline uses (a picklable subset of the YAML config)."""

    models: tuple[str, ...]
    experiment_name: str
    patch_size: int
    stride: int
    mixing_window: str = "flat"
    simplex: bool = True
    lambda_ridge: float = 0.0
    laplacian_tau: float = 0.0
    lambda_edge: float = 0.0
    edge_power: float = 1.0
    lambda_grad: float = 0.0
    grad_operator: str = "sobel"
    normalize: str = "zscore"
    use_registration: bool = False
    num_workers: int = 1
    ssim_axis: str = "axial"
    evaluate_train: bool = True
    save_weight_volumes: bool = False
    save_blends: bool = False
    out_root: str = "."
    manifest: str = ""


_REQUIRED = (
    "experiment_name", "patch_size", "stride", "simplex", "lambda_ridge", "laplacian_tau",
    "lambda_edge", "edge_power", "normalize", "num_workers", "ssim_axis",
    "save_weight_volumes", "save_blends", "out_root",
)


def load_params(config_path: str | Path) -> Params:
    """Read the reference-format YAML config (algorithm A1) into :class:`Params`."""
    config_path = Path(config_path)
    with open(config_path) as fh:
        cfg = yaml.safe_load(fh)
    if not isinstance(cfg, dict) or "pacs_sr" not in cfg or "data" not in cfg:
        raise ValueError(f"{config_path}: expected sections 'data' and 'pacs_sr'")
    data, ps = cfg["data"], cfg["pacs_sr"]
    for key in _REQUIRED:
        if key not in ps:
            raise ValueError(f"{config_path}: missing required key pacs_sr.{key}")
    models = data.get("models", ps.get("models"))
    if not models:
        raise ValueError(f"{config_path}: missing required key data.models")
    manifest = str(data.get("out", ""))
    if manifest and not Path(manifest).is_absolute() and not Path(manifest).exists():
        # The reference resolves relative paths against the working directory; fall back to
        # the config's folder so a self-contained config directory also works.
        alt = config_path.parent / manifest
        if alt.exists():
            manifest = str(alt)
    p = Params(
        models=tuple(str(m) for m in models),
        experiment_name=str(ps["experiment_name"]),
        patch_size=int(ps["patch_size"]),
        stride=int(ps["stride"]),
        mixing_window=str(ps.get("mixing_window", "flat")),
        simplex=bool(ps["simplex"]),
        lambda_ridge=float(ps["lambda_ridge"]),
        laplacian_tau=float(ps["laplacian_tau"]),
        lambda_edge=float(ps["lambda_edge"]),
        edge_power=float(ps["edge_power"]),
        lambda_grad=float(ps.get("lambda_grad", 0.0)),
        grad_operator=str(ps.get("grad_operator", "sobel")).lower(),
        normalize=str(ps["normalize"]),
        use_registration=bool(ps.get("use_registration", False)),
        num_workers=int(ps["num_workers"]),
        ssim_axis=str(ps["ssim_axis"]),
        evaluate_train=bool(ps.get("evaluate_train", True)),
        save_weight_volumes=bool(ps["save_weight_volumes"]),
        save_blends=bool(ps["save_blends"]),
        out_root=str(ps["out_root"]),
        manifest=manifest,
    )
    if not 1 <= p.stride <= p.patch_size:
        raise ValueError(
            f"pacs_sr.stride must be in [1, patch_size={p.patch_size}], got {p.stride}")
    if p.grad_operator not in ("sobel", "prewitt", "scharr"):
        raise ValueError(
            f"pacs_sr.grad_operator must be sobel|prewitt|scharr, got {p.grad_operator}")
    if p.ssim_axis not in SSIM_AXES:
        raise ValueError(f"pacs_sr.ssim_axis must be axial|coronal|sagittal, got {p.ssim_axis}")
    if p.use_registration:
        raise NotImplementedError("literal_baseline does not implement ANTs registration")
    return p


# --------------------------------------------------------------------------------------------
# Volumes, tiles, preprocessing (algorithm A2, A3)
# --------------------------------------------------------------------------------------------


def read_volume(path: str | Path) -> tuple[NDArray[np.float32], Any]:
    """Return ``(float32 data, nibabel image)``; a trailing singleton 4th axis is squeezed."""
    img = nib.load(str(path))
    vol = img.get_fdata(dtype=np.float32)
    if vol.ndim == 4 and vol.shape[3] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {vol.shape}")
    return vol, img


def tile_counts(shape: tuple[int, ...], stride: int) -> tuple[int, int, int]:
    """Anchors per axis, ``ceil(N_d / stride)`` (algorithm A2)."""
    return tuple(math.ceil(n / stride) for n in shape[:3])  # type: ignore[return-value]


def tile_boxes(shape: tuple[int, ...], patch_size: int, stride: int):
    """Yield ``(tile id, (z0, z1, y0, y1, x0, x1))`` in tile-id order (axis-0-major)."""
    Z, Y, X = shape[:3]
    rid = 0
    for z0 in range(0, Z, stride):
        for y0 in range(0, Y, stride):
            for x0 in range(0, X, stride):
                yield rid, (z0, min(z0 + patch_size, Z), y0, min(y0 + patch_size, Y),
                            x0, min(x0 + patch_size, X))
                rid += 1


def tile_labels(shape: tuple[int, ...], stride: int) -> NDArray[np.int32]:
    """Label volume: the largest id among the tiles covering each voxel (algorithm A2)."""
    n0, n1, n2 = tile_counts(shape, stride)
    i0 = (np.arange(shape[0]) // stride).astype(np.int32)
    i1 = (np.arange(shape[1]) // stride).astype(np.int32)
    i2 = (np.arange(shape[2]) // stride).astype(np.int32)
    labels = (i0[:, None, None] * n1 + i1[None, :, None]) * n2 + i2[None, None, :]
    return np.ascontiguousarray(labels, dtype=np.int32)


def zscore(vol: NDArray[np.float32], mask: NDArray[np.bool_],
           normalize: str = "zscore") -> tuple[NDArray[np.float32], float, float]:
    """Materialised float32 z-scored copy with mean/std over ``mask`` (algorithm A3.2-3).

    Mean and population std are NumPy's float32 reductions of ``vol[mask]``, as the
    reference computes them.
    """
    if normalize != "zscore":
        return vol.astype(np.float32), 0.0, 1.0
    vals = vol[mask]
    mu = float(vals.mean()) if vals.size else 0.0
    sd = float(vals.std()) if vals.size else 0.0
    sd = sd if sd > SD_FLOOR else SD_FLOOR
    return ((vol - mu) / sd).astype(np.float32), mu, sd


def edge_weight(hr_n: NDArray[np.float32], lambda_edge: float,
                edge_power: float) -> NDArray[np.float32]:
    """``1 + lambda_edge * (|sobel(hr_n)| / (max + 1e-6)) ** edge_power`` (algorithm A3.4)."""
    if lambda_edge <= 0:
        return np.ones_like(hr_n, dtype=np.float32)
    s0 = ndi.sobel(hr_n, axis=0, mode="nearest")
    s1 = ndi.sobel(hr_n, axis=1, mode="nearest")
    s2 = ndi.sobel(hr_n, axis=2, mode="nearest")
    g = np.sqrt(s0 * s0 + s1 * s1 + s2 * s2)
    gmax = float(np.max(g)) + EDGE_EPS
    e = 1.0 + lambda_edge * (g / gmax) ** edge_power
    return e.astype(np.float32)


def gradients(vol: NDArray[np.float32], op: str) -> list[NDArray[np.float32]]:
    """Materialised gradient volumes along axes 0, 1, 2 (algorithm A3.5), mode "nearest"."""
    v = vol.astype(np.float32, copy=False)
    if op == "sobel":
        return [ndi.sobel(v, axis=d, mode="nearest") for d in range(3)]
    if op == "prewitt":
        return [ndi.prewitt(v, axis=d, mode="nearest") for d in range(3)]
    if op == "scharr":
        out = []
        for d in range(3):
            # Same order of passes as scipy.ndimage.sobel: derivative first, then smoothing
            # along the other axes in increasing axis order (correlation sense throughout).
            g = ndi.correlate1d(v, [-1.0, 0.0, 1.0], axis=d, mode="nearest")
            for other in range(3):
                if other != d:
                    g = ndi.correlate1d(g, [3.0, 10.0, 3.0], axis=other, mode="nearest")
            out.append(g)
        return out
    raise ValueError(f"unknown grad_operator {op!r}")


# --------------------------------------------------------------------------------------------
# Statistics (algorithm A4)
# --------------------------------------------------------------------------------------------

TileStats = dict[int, tuple[NDArray[np.float64], NDArray[np.float64], int]]


def patient_statistics(
    hr: NDArray[np.float32],
    experts: list[NDArray[np.float32]],
    patch_size: int,
    stride: int,
    lambda_edge: float = 0.0,
    edge_power: float = 1.0,
    lambda_grad: float = 0.0,
    grad_operator: str = "sobel",
    normalize: str = "zscore",
    product_dtype: type = np.float32,
) -> TileStats:
    """One patient's per-tile normal equations ``{tile id: (Q (M,M), B (M,), n)}``.

    Literal reference design: z-scored copies, an edge-weight volume, gradient volumes for HR
    and every expert, the label volume, and one whole-volume boolean mask per tile.  Tiles
    without HR-mask voxels are absent from the dict.  ``patch_size`` does not enter: labels
    depend on the stride only (algorithm A2), it is accepted for a uniform signature.  The
    products are float32, as the published tool forms them; callers sum patients in float64.
    ``product_dtype=np.float64`` forms them in float64 instead (an exact oracle for tests).
    """
    del patch_size  # labels use the stride only
    mask = hr > 0
    hr_n, _, _ = zscore(hr, mask, normalize)
    omega = edge_weight(hr_n, lambda_edge, edge_power) * mask.astype(np.float32)

    hr_grads: list[NDArray[np.float32]] = []
    if lambda_grad > 0:
        hr_grads = gradients(hr_n, grad_operator)

    xs: list[NDArray[np.float32]] = []
    grads: list[list[NDArray[np.float32]]] = [[], [], []]
    for x in experts:
        xn, _, _ = zscore(x, mask, normalize)
        xs.append(xn)
        if lambda_grad > 0:
            for d, g in enumerate(gradients(xn, grad_operator)):
                grads[d].append(g)
    X = np.stack(xs, axis=0)  # (M, Z, Y, X)
    del xs
    G = [np.stack(gd, axis=0) for gd in grads] if lambda_grad > 0 else []
    del grads

    labels = tile_labels(hr.shape, stride)
    stats: TileStats = {}
    for rid in np.unique(labels):
        rid = int(rid)
        sel = labels == rid            # whole-volume boolean mask per tile (reference design)
        selm = sel & mask
        n = int(np.count_nonzero(selm))
        if n == 0:
            continue
        # The published tool forms the per-tile products in float32 (its volumes are float32
        # and it does not upcast); only the sum over patients is float64 (see ``fit``).
        x = np.stack([xm[selm] for xm in X], axis=0).astype(product_dtype, copy=False)  # (M, n)
        y = hr_n[selm].astype(product_dtype, copy=False)
        w = omega[selm].astype(product_dtype, copy=False)
        xw = x * w
        Q = xw @ x.T
        B = xw @ y
        if lambda_grad > 0:
            lam = product_dtype(lambda_grad)
            for d in range(3):
                gx = np.stack([gm[selm] for gm in G[d]], axis=0).astype(product_dtype, copy=False)
                gy = hr_grads[d][selm].astype(product_dtype, copy=False)
                gw = gx * w
                Q += lam * (gw @ gx.T)
                B += lam * (gw @ gy)
        stats[rid] = (Q, B, n)
    return stats


# --------------------------------------------------------------------------------------------
# Solve and smoothing (algorithm A5, A6)
# --------------------------------------------------------------------------------------------


def objective(w: NDArray, Q: NDArray, B: NDArray, lambda_ridge: float) -> float:
    """``w^T (Q + lambda I) w - 2 B^T w`` in float64."""
    w = np.asarray(w, dtype=np.float64)
    A = Q + lambda_ridge * np.eye(len(B))
    return float(w @ A @ w - 2.0 * B @ w)


def solve_tile(Q: NDArray[np.float64], B: NDArray[np.float64], lambda_ridge: float,
               simplex: bool) -> NDArray[np.float32]:
    """The reference solve: SLSQP from ``1/M`` on the unscaled objective, then clip+renormalise.

    Constraints as the published tool passes them: ``sum(w) = 1`` (with its Jacobian) and
    ``w >= 0`` as an inequality without a Jacobian (finite differences), no bounds.

    ``simplex=False``: ``(Q + lambda I) w = B`` by ``np.linalg.solve`` (pseudo-inverse if
    singular).  Returns float32.
    """
    M = len(B)
    A = Q + lambda_ridge * np.eye(M, dtype=np.float64)
    if not simplex:
        try:
            w = np.linalg.solve(A, B)
        except np.linalg.LinAlgError:
            w = np.linalg.pinv(A) @ B
        return np.asarray(w).astype(np.float32)

    def fun(w: NDArray) -> float:
        return float(w @ A @ w - 2.0 * B @ w)

    def jac(w: NDArray) -> NDArray:
        return 2.0 * (A @ w) - 2.0 * B

    # As published: no bounds; w >= 0 is an inequality constraint WITHOUT a Jacobian, so SLSQP
    # differentiates it by finite differences (M + 1 calls per iteration); the equality
    # sum(w) = 1 comes with its Jacobian.
    res = minimize(
        fun, np.full(M, 1.0 / M), jac=jac, method="SLSQP",
        constraints=[{"type": "eq", "fun": lambda w: np.sum(w) - 1.0,
                      "jac": lambda w: np.ones_like(w)},
                     {"type": "ineq", "fun": lambda w: w}],
        options={"maxiter": 200, "ftol": 1e-12},
    )
    w = np.array(res.x, dtype=np.float64)
    w[w < 0] = 0.0
    s = w.sum()
    w = np.full(M, 1.0 / M) if s <= 0 else w / s
    return w.astype(np.float32)


def grid_neighbours(rid: int, counts: tuple[int, int, int]) -> list[int]:
    """Ids of the 6-neighbours of tile ``rid`` on the tile grid, ascending."""
    n0, n1, n2 = counts
    i0, rem = divmod(rid, n1 * n2)
    i1, i2 = divmod(rem, n2)
    out = []
    for d0, d1, d2 in ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)):
        j0, j1, j2 = i0 + d0, i1 + d1, i2 + d2
        if 0 <= j0 < n0 and 0 <= j1 < n1 and 0 <= j2 < n2:
            out.append((j0 * n1 + j1) * n2 + j2)
    return sorted(out)


def label_adjacency(labels: NDArray[np.int32]) -> dict[int, set[int]]:
    """6-neighbour tile graph read off the label volume with Python loops, as published.

    For every line of voxels along each axis (a Python loop over the other two axes), the
    places where the label changes join the two labels.  On the regular grid of algorithm A2
    this gives the same graph as :func:`grid_neighbours`, at the published tool's cost.
    """
    adj: dict[int, set[int]] = {}

    def join(a: int, b: int) -> None:
        if a != b:
            adj.setdefault(a, set()).add(b)
            adj.setdefault(b, set()).add(a)

    n0, n1, n2 = labels.shape
    for axis, (na, nb) in ((2, (n0, n1)), (1, (n0, n2)), (0, (n1, n2))):
        for i in range(na):
            for j in range(nb):
                if axis == 2:
                    line = labels[i, j, :]
                elif axis == 1:
                    line = labels[i, :, j]
                else:
                    line = labels[:, i, j]
                for k in np.flatnonzero(line[1:] != line[:-1]):
                    join(int(line[k]), int(line[k + 1]))
    return adj


def laplacian_smooth(
    weights: dict[int, NDArray[np.float32]],
    counts: tuple[int, int, int],
    tau: float,
    adjacency: dict[int, set[int]] | None = None,
) -> dict[int, NDArray[np.float32]]:
    """One Jacobi step over the learned tiles' 6-neighbour graph, then clip and renormalise.

    float32 throughout, as the reference's (R, M) float32 weight array.  ``adjacency`` is the
    graph from :func:`label_adjacency` (what ``fit`` passes, as published); without it the
    neighbours come from the tile-grid arithmetic of :func:`grid_neighbours` (same graph).
    """
    if tau <= 0:
        return weights
    rids = sorted(weights)
    W = np.stack([weights[r] for r in rids], axis=0).astype(np.float32)
    index = {r: i for i, r in enumerate(rids)}
    new = W.copy()
    for i, r in enumerate(rids):
        around = grid_neighbours(r, counts) if adjacency is None else \
            sorted(adjacency.get(r, ()))
        nb = [index[q] for q in around if q in index]
        if not nb:
            continue
        avg = np.mean(W[nb, :], axis=0)
        new[i, :] = (1.0 - tau) * W[i, :] + tau * avg
    new[new < 0] = 0
    new = new / (np.sum(new, axis=1, keepdims=True) + SMOOTH_EPS)
    return {r: new[i].astype(np.float32) for i, r in enumerate(rids)}


# --------------------------------------------------------------------------------------------
# Blend, brain mask, metrics (algorithm A7)
# --------------------------------------------------------------------------------------------


def hann_periodic(length: int) -> NDArray[np.float32]:
    """Periodic Hann ``0.5 - 0.5 cos(2 pi k / L)``, ``k = 0..L-1`` (algorithm A7.2), float32.

    For ``L = 1`` the formula gives 0, but ``scipy.signal.windows.hann(1, sym=False)``, which
    the published tool calls, returns 1: a one-voxel clipped box (N mod stride == 1) keeps its
    weight.  This script stands in for the published tool, so it returns 1 there too.
    """
    if length == 1:
        return np.ones(1, dtype=np.float32)
    k = np.arange(length, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * k / length)).astype(np.float32)


def tile_window(size: tuple[int, int, int], kind: str) -> NDArray[np.float32]:
    """3-D outer-product window of a clipped tile box (flat = ones)."""
    if kind == "hann":
        w0, w1, w2 = (hann_periodic(n) for n in size)
        return (w0[:, None, None] * w1[None, :, None] * w2[None, None, :]).astype(np.float32)
    return np.ones(size, dtype=np.float32)


def brain_mask(hr: NDArray[np.float32]) -> NDArray[np.bool_]:
    """Largest 26-connected component of ``hr >= 0.1`` on the raw HR (algorithm A7.5)."""
    fg = hr >= BRAIN_THRESHOLD
    if not np.any(fg):
        return fg
    lab, nlab = ndi.label(fg, structure=np.ones((3, 3, 3), dtype=bool))
    if nlab == 1:
        return fg
    counts = np.bincount(lab.ravel())
    counts[0] = 0
    return lab == int(np.argmax(counts))


def blend_patient(
    hr: NDArray[np.float32],
    experts: list[NDArray[np.float32]],
    weights: dict[int, NDArray[np.float32]],
    patch_size: int,
    stride: int,
    mixing_window: str = "flat",
    normalize: str = "zscore",
) -> NDArray[np.float32]:
    """Overlap-add blend of one patient in native HR units, brain-masked (algorithm A7.1-5).

    ``weights`` maps tile id -> (M,) weights; tiles not in it use ``1/M``.
    """
    mask = hr > 0
    hr_n, mu, sd = zscore(hr, mask, normalize)
    X = np.stack([zscore(x, mask, normalize)[0] for x in experts], axis=0)  # (M, Z, Y, X)
    M = X.shape[0]
    kind = "flat" if stride >= patch_size else mixing_window
    acc = np.zeros_like(hr_n, dtype=np.float32)
    den = np.zeros_like(hr_n, dtype=np.float32)
    uniform = np.ones(M, dtype=np.float32) / M
    for rid, (z0, z1, y0, y1, x0, x1) in tile_boxes(hr.shape, patch_size, stride):
        w = weights.get(rid)
        w = uniform if w is None else np.asarray(w, dtype=np.float32)
        sub = X[:, z0:z1, y0:y1, x0:x1]
        vals = np.tensordot(w, sub.reshape(M, -1), axes=(0, 0)).reshape(sub.shape[1:])
        win = tile_window(vals.shape, kind)
        acc[z0:z1, y0:y1, x0:x1] += win * vals
        den[z0:z1, y0:y1, x0:x1] += win
    blend_n = acc / (den + BLEND_EPS)
    blend = (blend_n * sd + mu).astype(np.float32)
    return blend * brain_mask(hr).astype(np.float32)


def ssim_slicewise(pred: NDArray[np.float32], target: NDArray[np.float32],
                   mask: NDArray[np.bool_], axis: int) -> float:
    """Mean 2-D SSIM over the slices along ``axis`` that contain mask voxels (algorithm A7.6)."""
    from skimage.metrics import structural_similarity

    p = pred.astype(np.float32)
    t = target.astype(np.float32)
    scores = []
    for i in range(p.shape[axis]):
        ps = np.take(p, i, axis=axis)
        ts = np.take(t, i, axis=axis)
        ms = np.take(mask, i, axis=axis)
        if not np.any(ms):
            continue
        ps = ps * ms
        ts = ts * ms
        data_range = float(ts.max() - ts.min())
        if data_range < SSIM_MIN_RANGE:
            continue
        score = structural_similarity(ts, ps, data_range=data_range)
        if not np.isnan(score):
            scores.append(score)
    return float(np.mean(scores)) if scores else 0.0


def patient_metrics(hr: NDArray[np.float32], blend: NDArray[np.float32],
                    ssim_axis: str = "axial") -> dict[str, float]:
    """mse, mae, psnr, ssim over ``hr > 0`` exactly as algorithm A7.6."""
    mask = hr > 0
    d = hr[mask].astype(np.float32) - blend[mask].astype(np.float32)
    mse = float(np.mean(d * d, dtype=np.float64))
    mae = float(np.mean(np.abs(d)))
    mse32 = np.mean(d * d)  # float32 mean
    R = float(np.max(hr) - np.min(hr))  # float32 difference
    psnr = float(20.0 * np.log10((R + PSNR_EPS) / np.sqrt(mse32 + PSNR_EPS)))
    ssim = ssim_slicewise(blend, hr, mask, SSIM_AXES[ssim_axis])
    return {"mse": mse, "mae": mae, "psnr": psnr, "ssim": ssim}


# --------------------------------------------------------------------------------------------
# Weight maps (algorithm A8)
# --------------------------------------------------------------------------------------------


def weight_maps(shape: tuple[int, ...], weights: dict[int, NDArray[np.float32]], n_models: int,
                stride: int) -> NDArray[np.float32]:
    """(Z, Y, X, M) float32: each voxel's label tile weight, ``1/M`` for unlearned tiles."""
    labels = tile_labels(shape, stride)
    out = np.zeros(tuple(shape[:3]) + (n_models,), dtype=np.float32)
    uniform = np.ones(n_models, dtype=np.float32) / n_models
    for rid in np.unique(labels):
        sel = labels == rid
        w = weights.get(int(rid))
        out[sel] = uniform if w is None else w
    return out


def weight_statistics(wmaps: NDArray[np.float32], model_names: list[str]) -> dict:
    """Per-model mean, std (ddof 0), min, max, median, q25, q75 of the float32 weight map."""
    stats = {}
    for m, name in enumerate(model_names):
        v = wmaps[..., m]
        stats[name] = {
            "mean": float(np.mean(v)), "std": float(np.std(v)),
            "min": float(np.min(v)), "max": float(np.max(v)),
            "median": float(np.median(v)),
            "q25": float(np.percentile(v, 25)), "q75": float(np.percentile(v, 75)),
        }
    return stats


def write_weight_npz(model_dir: Path, pid: str, weights: dict[int, NDArray[np.float32]],
                     shape: tuple[int, ...], p: Params, spacing: str, pulse: str) -> None:
    """``{pid}_weights_test.npz`` and ``{pid}_weight_analysis_test.npz``."""
    names = list(p.models)
    M = len(names)
    wm = weight_maps(shape, weights, M, p.stride)
    np.savez_compressed(
        model_dir / f"{pid}_weights_test.npz",
        weight_maps=wm, patient_id=pid, split="test", spacing=spacing, pulse=pulse,
        model_names=names, patch_size=p.patch_size, stride=p.stride,
        shape=tuple(int(s) for s in wm.shape[:3]), n_models=M,
    )
    wsum = np.sum(wm, axis=-1, keepdims=True)
    wn = wm / (wsum + ENTROPY_EPS)
    entropy = -np.sum(wn * np.log(wn + ENTROPY_EPS), axis=-1)
    stats = np.empty((), dtype=object)
    stats[()] = weight_statistics(wm, names)
    np.savez_compressed(
        model_dir / f"{pid}_weight_analysis_test.npz",
        weight_maps=wm, entropy_map=entropy.astype(np.float32),
        dominant_map=np.argmax(wm, axis=-1).astype(np.int32),
        model_names=names, patient_id=pid, statistics=stats,
    )


def save_nifti(path: Path, vol: NDArray[np.float32], ref_img: Any) -> None:
    """float32 NIfTI with the reference image's affine and header."""
    img = nib.Nifti1Image(vol.astype(np.float32), ref_img.affine, ref_img.header.copy())
    img.set_data_dtype(np.float32)
    nib.save(img, str(path))


# --------------------------------------------------------------------------------------------
# Worker tasks (one patient per loky worker)
# --------------------------------------------------------------------------------------------


def _maxrss_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _load_patient(entry: dict, models: tuple[str, ...], spacing: str, pulse: str):
    hr_path = entry["HR"][spacing][pulse]
    hr, hr_img = read_volume(hr_path)
    experts = []
    for m in models:
        path = entry[m][spacing][pulse]
        x, _ = read_volume(path)
        if x.shape != hr.shape:
            raise ValueError(f"expert {path!r} has shape {x.shape}; expected {hr.shape} "
                             f"like HR {hr_path!r}")
        experts.append(x)
    return hr, hr_img, experts


def _fit_task(pid: str, entry: dict, spacing: str, pulse: str, p: Params) -> dict:
    t0 = time.perf_counter()
    try:
        hr, _, experts = _load_patient(entry, p.models, spacing, pulse)
    except Exception as exc:  # unreadable patient: skipped by the parent with a warning
        return {"pid": pid, "error": f"{type(exc).__name__}: {exc}", "os_pid": os.getpid()}
    t1 = time.perf_counter()
    stats = patient_statistics(hr, experts, p.patch_size, p.stride, p.lambda_edge,
                               p.edge_power, p.lambda_grad, p.grad_operator, p.normalize)
    t2 = time.perf_counter()
    return {"pid": pid, "stats": stats, "shape": tuple(hr.shape),
            "times": {"load": t1 - t0, "statistics": t2 - t1},
            "os_pid": os.getpid(), "maxrss": _maxrss_bytes()}


def _eval_task(pid: str, entry: dict, split: str, spacing: str, pulse: str, p: Params,
               weights: dict[int, NDArray[np.float32]], out_volumes: str, model_dir: str) -> dict:
    t0 = time.perf_counter()
    try:
        hr, hr_img, experts = _load_patient(entry, p.models, spacing, pulse)
    except Exception as exc:
        return {"pid": pid, "split": split, "error": f"{type(exc).__name__}: {exc}",
                "os_pid": os.getpid()}
    t1 = time.perf_counter()
    blend = blend_patient(hr, experts, weights, p.patch_size, p.stride, p.mixing_window,
                          p.normalize)
    t2 = time.perf_counter()
    metrics = patient_metrics(hr, blend, p.ssim_axis)
    t3 = time.perf_counter()
    if split == "test":
        save_nifti(Path(out_volumes) / f"{pid}-{pulse}.nii.gz", blend, hr_img)
        if p.save_weight_volumes:
            write_weight_npz(Path(model_dir), pid, weights, hr.shape, p, spacing, pulse)
    elif p.save_blends:
        save_nifti(Path(model_dir) / f"{pid}_blend_train.nii.gz", blend, hr_img)
    t4 = time.perf_counter()
    return {"pid": pid, "split": split, "metrics": metrics,
            "times": {"load": t1 - t0, "blend": t2 - t1, "metrics": t3 - t2, "writes": t4 - t3},
            "os_pid": os.getpid(), "maxrss": _maxrss_bytes()}


def _rss_sampler(interval_s: float) -> Any:
    """The repository's one RSS sampler (``tests/rss_sampler.py``), over this process's tree.

    Imported here, not at the top, so that loky workers importing this module by name
    need neither psutil nor the tests folder.
    """
    tests = str(Path(__file__).resolve().parents[1] / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    from rss_sampler import RssSampler

    return RssSampler(interval_s, include_children=True)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _parallel(workers: int):
    from joblib import Parallel

    _make_picklable_for_workers()
    return Parallel(n_jobs=workers, backend="loky", batch_size="auto")


def _make_picklable_for_workers() -> None:
    """Let loky workers unpickle this module's tasks however the module was loaded.

    Run as a script, cloudpickle ships ``__main__`` functions by value.  Imported under a
    name the workers cannot import (e.g. loaded from its file path), ship it by value too.
    """
    from importlib.machinery import PathFinder

    if __name__ == "__main__" or "." in __name__:
        return
    # Search sys.path only (what a fresh worker would do), not sys.modules.
    spec = PathFinder.find_spec(__name__)
    if spec is not None and spec.origin and Path(spec.origin).resolve() == Path(__file__).resolve():
        return
    try:
        import cloudpickle  # what loky pickles tasks with (joblib >= 1.5 uses the package)
    except ImportError:  # older joblib vendored it
        from joblib.externals import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def read_weights_json(path: str | Path) -> dict[int, NDArray[np.float32]]:
    """``{"<tile id>": [w...]}`` -> ``{tile id: float32 array}``."""
    with open(path) as fh:
        raw = json.load(fh)
    return {int(k): np.asarray(v, dtype=np.float32) for k, v in raw.items()}


def write_weights_json(path: Path, weights: dict[int, NDArray[np.float32]]) -> None:
    """Keys ascending numeric, indent 2, values float(float32)."""
    data = {str(r): [float(v) for v in np.asarray(weights[r], dtype=np.float32)]
            for r in sorted(weights)}
    with open(path, "w") as fh:
        json.dump(data, fh, indent=2)


def fit(manifest_fold: dict, spacing: str, pulse: str, p: Params, workers: int,
        timings: dict, worker_info: dict) -> dict[int, NDArray[np.float32]]:
    """Statistics in loky workers, float64 sums in manifest order, SLSQP per tile, smoothing."""
    from joblib import delayed

    train = list(manifest_fold["train"].items())
    if not train:
        raise ValueError("the fold has no training patients")
    # Like the reference, peek at an HR header for the grid shape (no voxel data is read).
    shape = None
    for _, entry in train:
        try:
            shape = tuple(nib.load(str(entry["HR"][spacing][pulse])).shape[:3])
            break
        except Exception:  # an unreadable patient is reported (and skipped) by its task
            continue
    if shape is None:
        raise ValueError("no training patient has a readable HR file")
    counts = tile_counts(shape, p.stride)
    M = len(p.models)

    t0 = time.perf_counter()
    results = _parallel(min(workers, len(train)))(
        delayed(_fit_task)(pid, entry, spacing, pulse, p) for pid, entry in train)
    timings["fit_parallel_wall"] = time.perf_counter() - t0

    n_tiles = counts[0] * counts[1] * counts[2]
    Q = np.zeros((n_tiles, M, M), dtype=np.float64)
    B = np.zeros((n_tiles, M), dtype=np.float64)
    n = np.zeros(n_tiles, dtype=np.int64)
    for res in results:  # manifest order
        if "error" in res:
            log.warning("skipping train patient %s: %s", res["pid"], res["error"])
            continue
        if res["shape"] != shape:
            raise ValueError(f"train patient {res['pid']} has shape {res['shape']}; expected "
                             f"{shape} like the first training patient (one tile grid per fit)")
        for key in ("load", "statistics"):
            timings[key] = timings.get(key, 0.0) + res["times"][key]
        timings["fit_load"] = timings.get("fit_load", 0.0) + res["times"]["load"]
        worker_info.setdefault(res["os_pid"], 0)
        worker_info[res["os_pid"]] = max(worker_info[res["os_pid"]], res["maxrss"])
        for rid, (q, b, c) in res["stats"].items():
            Q[rid] += q
            B[rid] += b
            n[rid] += c
    del results

    t1 = time.perf_counter()
    weights: dict[int, NDArray[np.float32]] = {}
    for rid in range(n_tiles):
        if n[rid] == 0:
            continue
        weights[rid] = solve_tile(Q[rid], B[rid], p.lambda_ridge, p.simplex)
    t2 = time.perf_counter()
    timings["solve"] = t2 - t1
    if p.laplacian_tau > 0:
        # As published: the graph is read off the whole label volume with Python loops.
        adjacency = label_adjacency(tile_labels(shape, p.stride))
        weights = laplacian_smooth(weights, counts, p.laplacian_tau, adjacency)
    timings["smoothing"] = time.perf_counter() - t2
    return weights


def evaluate(manifest_fold: dict, spacing: str, pulse: str, p: Params,
             weights: dict[int, NDArray[np.float32]], base_dir: Path, model_dir: Path,
             timings: dict) -> dict[str, dict[str, float]]:
    """Blend + metrics per patient, one after another in this process (train first).

    As published: only the fit runs in loky workers; the evaluation loops over the patients
    in the parent process, whatever the worker count.
    """
    out_volumes = base_dir / "output_volumes"
    out_volumes.mkdir(parents=True, exist_ok=True)
    model_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    if p.evaluate_train:
        tasks += [(pid, e, "train") for pid, e in manifest_fold["train"].items()]
    tasks += [(pid, e, "test") for pid, e in manifest_fold["test"].items()]

    t0 = time.perf_counter()
    results = [_eval_task(pid, e, split, spacing, pulse, p, weights, str(out_volumes),
                          str(model_dir))
               for pid, e, split in tasks]
    timings["evaluate_loop_wall"] = time.perf_counter() - t0

    per_split: dict[str, list[dict[str, float]]] = {"train": [], "test": []}
    per_patient: dict[str, dict] = {}
    for res in results:
        if "error" in res:
            log.warning("skipping %s patient %s: %s", res["split"], res["pid"], res["error"])
            continue
        for key, val in res["times"].items():
            timings[key] = timings.get(key, 0.0) + val
        timings["evaluate_load"] = timings.get("evaluate_load", 0.0) + res["times"]["load"]
        per_split[res["split"]].append(res["metrics"])
        per_patient[f"{res['split']}/{res['pid']}"] = res["metrics"]

    summary: dict[str, Any] = {}
    if p.evaluate_train:
        if per_split["train"]:
            summary["train"] = {k: float(np.mean([m[k] for m in per_split["train"]]))
                                for k in METRIC_KEYS}
        else:
            log.warning("no train metrics to aggregate")
    summary["test"] = ({k: float(np.mean([m[k] for m in per_split["test"]])) for k in METRIC_KEYS}
                       if per_split["test"] else {})
    summary["_per_patient"] = per_patient
    return summary


def run(config_path: str | Path, fold: int, spacing: str, pulse: str, workers: int | None = None,
        weights_path: str | Path | None = None, out_root: str | Path | None = None,
        manifest_path: str | Path | None = None) -> dict:
    """Fit (unless ``weights_path``) and evaluate one (fold, spacing, pulse); write algorithm A8.

    Parameters
    ----------
    config_path : path
        Reference-format YAML config.
    fold : int
        1-based fold number (``fold_1`` is the manifest's first fold).
    spacing, pulse : str
        The task.
    workers : int, optional
        loky worker processes (default ``pacs_sr.num_workers``).
    weights_path : path, optional
        Evaluate these weights (``weights.json`` format) instead of fitting.
    out_root : path, optional
        Overrides ``pacs_sr.out_root``.
    manifest_path : path, optional
        Overrides ``data.out``.

    Returns
    -------
    dict
        ``timings`` (s; worker stages are sums over patients), ``workers``, ``peak_rss``
        (bytes: tree, parent, per worker sampled and self-reported ``ru_maxrss``),
        ``metrics`` (as metrics.json), ``per_patient`` metrics, ``weights`` and ``paths``.
    """
    t_start = time.perf_counter()
    p = load_params(config_path)
    if out_root is not None:
        p = Params(**{**asdict(p), "out_root": str(out_root)})
    mpath = Path(manifest_path) if manifest_path is not None else Path(p.manifest)
    with open(mpath) as fh:
        manifest = json.load(fh)
    folds = manifest["folds"]
    if not 1 <= fold <= len(folds):
        raise ValueError(f"fold must be in [1, {len(folds)}] (1-based), got {fold}")
    mfold = folds[fold - 1]
    W = int(workers if workers is not None else p.num_workers)
    if W < 1:
        raise ValueError(f"workers must be >= 1, got {W}")

    base_dir = Path(p.out_root) / p.experiment_name / spacing
    model_dir = base_dir / "model_data" / f"fold_{fold}" / pulse

    sampler = _rss_sampler(0.05)
    sampler.start()
    timings: dict[str, float] = {}
    worker_info: dict[int, int] = {}
    try:
        if weights_path is None:
            sampler.phase = "fit"
            t0 = time.perf_counter()
            weights = fit(mfold, spacing, pulse, p, W, timings, worker_info)
            timings["fit_wall"] = time.perf_counter() - t0
        else:
            weights = read_weights_json(weights_path)
            bad = [r for r, w in weights.items() if w.shape != (len(p.models),)]
            if bad:
                raise ValueError(f"{weights_path}: tile {bad[0]} has {weights[bad[0]].shape[0]} "
                                 f"weights; expected {len(p.models)} (models {p.models})")
        sampler.phase = "evaluate"
        t0 = time.perf_counter()
        summary = evaluate(mfold, spacing, pulse, p, weights, base_dir, model_dir, timings)
        timings["evaluate_wall"] = time.perf_counter() - t0
        per_patient = summary.pop("_per_patient")
        t0 = time.perf_counter()
        write_weights_json(model_dir / "weights.json", weights)
        with open(model_dir / "metrics.json", "w") as fh:
            json.dump(summary, fh, indent=2)
        timings["writes"] = timings.get("writes", 0.0) + time.perf_counter() - t0
    finally:
        sampler.stop()
    timings["total_wall"] = time.perf_counter() - t_start
    for key in ("load", "statistics", "solve", "smoothing", "blend", "metrics", "writes"):
        timings.setdefault(key, 0.0)

    return {
        "timings": timings,
        "workers": W,
        "peak_rss": {
            "tree_bytes": sampler.peak_bytes,
            "parent_bytes": sampler.peak_root_bytes,
            "tree_by_phase_bytes": dict(sampler.peak_by_phase),
            "worker_sampled_bytes": {pid: sampler.peak_by_pid.get(pid, 0) for pid in worker_info},
            "worker_maxrss_bytes": dict(worker_info),
            "other_children_sampled_bytes": {pid: v for pid, v in sampler.peak_by_pid.items()
                                             if pid not in worker_info and pid != os.getpid()},
            "samples": len(sampler.samples),
        },
        "metrics": summary,
        "per_patient": per_patient,
        "weights": weights,
        "paths": {"base_dir": str(base_dir), "model_dir": str(model_dir)},
    }


def _fmt_mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB"


def format_summary(result: dict) -> str:
    """Human-readable per-stage timings, worker count and peak RSS."""
    t = result["timings"]
    pr = result["peak_rss"]
    lines = [f"workers: {result['workers']}"]
    lines.append("stage wall times (s; load/statistics are summed over patients in the fit's "
                 "workers, blend/metrics/writes over patients evaluated in the parent):")
    for key in ("load", "statistics", "solve", "smoothing", "blend", "metrics", "writes"):
        lines.append(f"  {key:<11s} {t[key]:9.3f}")
    for key in ("fit_load", "evaluate_load", "fit_parallel_wall", "fit_wall",
                "evaluate_loop_wall", "evaluate_wall", "total_wall"):
        if key in t:
            lines.append(f"  {key:<22s} {t[key]:9.3f}")
    lines.append(f"peak RSS, process tree (parent + children, 50 ms samples): "
                 f"{_fmt_mb(pr['tree_bytes'])}")
    for phase, v in pr["tree_by_phase_bytes"].items():
        lines.append(f"  during {phase}: {_fmt_mb(v)}")
    lines.append(f"peak RSS, parent: {_fmt_mb(pr['parent_bytes'])}")
    for pid in sorted(pr["worker_maxrss_bytes"]):
        sampled = _fmt_mb(pr["worker_sampled_bytes"][pid])
        lines.append(f"peak RSS, worker pid {pid}: sampled {sampled}, "
                     f"ru_maxrss {_fmt_mb(pr['worker_maxrss_bytes'][pid])}")
    for pid, v in sorted(pr["other_children_sampled_bytes"].items()):
        lines.append(f"peak RSS, other child pid {pid}: sampled {_fmt_mb(v)}")
    for split, m in result["metrics"].items():
        if m:
            lines.append(f"{split}: " + " ".join(f"{k}={m[k]:.6g}" for k in METRIC_KEYS))
    lines.append(f"outputs: {result['paths']['model_dir']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--fold", type=int, required=True, help="1-based fold number")
    ap.add_argument("--spacing", required=True)
    ap.add_argument("--pulse", required=True)
    ap.add_argument("--workers", type=int, default=None,
                    help="loky worker processes (default pacs_sr.num_workers)")
    ap.add_argument("--weights", default=None, help="evaluate this weights.json; skip the fit")
    ap.add_argument("--out-root", default=None, help="overrides pacs_sr.out_root")
    ap.add_argument("--manifest", default=None, help="overrides data.out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = run(args.config, args.fold, args.spacing, args.pulse, workers=args.workers,
                 weights_path=args.weights, out_root=args.out_root, manifest_path=args.manifest)
    print(format_summary(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
