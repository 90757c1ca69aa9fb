"""Synthetic cohorts in the published on-disk layout, with a ready config.

:func:`make_cohort` writes, for every patient, a procedural 3-D head phantom at
1 mm (the HR volume), its thick-slice low-resolution version (LR) and several
"expert" up-samplings of the LR back onto the HR grid, in exactly the folders
the manifest builder scans (algorithm A1), plus a ``config.yaml`` that runs on them.

The phantom is built from implicit surfaces (nested ellipsoids with folded
grey/white boundaries) under a smooth random deformation, so no volume is ever
resampled: every tissue fraction is evaluated analytically at the voxel centres,
which keeps generation vectorised and fast.  Tissue boundaries are soft over
about one voxel (partial volume).

The experts differ the way real SR methods do: cubic B-spline, linear and
nearest interpolation across slices, and an unsharp-masked B-spline, so that
smooth regions favour the smoothing experts and edges the sharp ones; a
tile-wise convex blend therefore beats each single expert.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ..config import (
    DataConfig,
    FullConfig,
    PacsConfig,
    RegistrationConfig,
    check_stride,
    dump_config,
)
from ..core.blending import brain_mask
from ..errors import ConfigError
from .layout import expert_file, hr_file, lr_file
from .nifti import write_nifti
from .registration import template_key

log = logging.getLogger(__name__)


F32 = np.float32


#: Expert names with a fixed up-sampling method (case-insensitive).  Other names get
#: the methods not used yet, in this order, then stronger variants of them.
EXPERT_KINDS = {
    "BSPLINE": "bspline",
    "LINEAR": "linear",
    "NEAREST": "nearest",
    "SHARPEN": "sharpen",
    "SMOOTH": "smooth",
}


_KIND_CYCLE = ("bspline", "sharpen", "linear", "smooth", "nearest")


#: Relative tissue intensities per contrast (x 1000 in the volumes):
#: scalp, skull, CSF, grey matter, white matter, deep grey nuclei, lesion.
_TISSUES = ("scalp", "skull", "csf", "gm", "wm", "dgm", "lesion")


_CONTRASTS = {
    "t1n": (0.90, 0.06, 0.18, 0.52, 0.78, 0.62, 0.45),
    "t1c": (0.90, 0.06, 0.20, 0.55, 0.80, 0.65, 1.00),  # enhancing lesion
    "t2w": (0.55, 0.04, 1.00, 0.62, 0.45, 0.55, 0.80),
    "t2f": (0.60, 0.04, 0.10, 0.62, 0.48, 0.58, 0.95),  # FLAIR: CSF suppressed
    "pd": (0.70, 0.05, 0.80, 0.75, 0.65, 0.72, 0.85),
}


#: Rician noise level, as a fraction of the brightest tissue of the contrast.
_NOISE_FRAC = 0.02


def parse_spacing(spacing: str | int) -> int:
    """Slice spacing in whole millimetres from a name like ``"3mm"``.

    Parameters
    ----------
    spacing : str or int
        ``"3mm"``, ``"3 mm"``, ``"3MM"``, ``"3"`` or ``3``.

    Returns
    -------
    int
        The spacing, >= 1.

    Raises
    ------
    ConfigError
        Not a positive whole number of millimetres.

    Examples
    --------
    >>> parse_spacing("5mm")
    5
    """
    if isinstance(spacing, int) and not isinstance(spacing, bool):
        value = spacing
    else:
        match = re.fullmatch(r"\s*(\d+)\s*(?:mm)?\s*", str(spacing), flags=re.IGNORECASE)
        if match is None:
            raise ConfigError(
                f"spacing {spacing!r} is not a whole number of millimetres like '3mm'"
            )
        value = int(match.group(1))
    if value < 1:
        raise ConfigError(f"spacing {spacing!r} must be at least 1mm")
    return value


def _contrast(pulse: str) -> tuple[float, ...]:
    """Tissue intensities for a pulse name; unknown names fall back on the nearest kind."""
    name = pulse.lower()
    if name in _CONTRASTS:
        return _CONTRASTS[name]
    if "flair" in name or ("t2" in name and "f" in name.replace("t2", "", 1)):
        return _CONTRASTS["t2f"]
    if "t2" in name:
        return _CONTRASTS["t2w"]
    if "pd" in name:
        return _CONTRASTS["pd"]
    if "t1" in name and any(tag in name for tag in ("c", "gd", "ce")):
        return _CONTRASTS["t1c"]
    return _CONTRASTS["t1n"]


def _expert_specs(models: Sequence[str]) -> list[tuple[str, float]]:
    """Give each model a (method, strength): named ones fixed, the others spread over the rest."""
    named = {EXPERT_KINDS[m.upper()] for m in models if m.upper() in EXPERT_KINDS}
    free = [k for k in _KIND_CYCLE if k not in named] or list(_KIND_CYCLE)
    specs, j = [], 0
    for m in models:
        if m.upper() in EXPERT_KINDS:
            specs.append((EXPERT_KINDS[m.upper()], 1.0))
        else:
            specs.append((free[j % len(free)], 1.0 + 0.5 * (j // len(free))))
            j += 1
    return specs


def _basis(n: int, n_ctrl: int) -> NDArray[np.float32]:
    """(n, n_ctrl) Gaussian bumps on a regular grid, rows of unit L2 norm.

    A field ``sum_abc C_abc B0[i,a] B1[j,b] B2[k,c]`` with i.i.d. standard normal
    ``C`` then has unit variance at every voxel, without a pass to measure it.
    """
    n_ctrl = max(2, n_ctrl)
    pos = np.arange(n, dtype=np.float64)[:, None]
    centres = np.linspace(-0.1 * n, 1.1 * n, n_ctrl)[None, :]
    width = 1.2 * n / (n_ctrl - 1)
    b = np.exp(-0.5 * ((pos - centres) / width) ** 2)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return b.astype(F32)


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, int, int], ctrl_vox: float
) -> NDArray[np.float32]:
    """Draw a smooth random field of unit variance, as a separable tensor product (fast).

    ``ctrl_vox`` is the spacing of the control points in voxels: features are
    about twice that size.  The cost is one small matrix product per axis.
    """
    c = [max(3, int(round(n / ctrl_vox)) + 1) for n in shape]
    coef = rng.standard_normal(tuple(c), dtype=F32)
    b0, b1, b2 = (_basis(n, k) for n, k in zip(shape, c, strict=True))
    t = np.tensordot(b0, coef, axes=(1, 0))  # (n0, c1, c2)
    t = np.ascontiguousarray(np.tensordot(t, b1, axes=(1, 1)).transpose(0, 2, 1))  # (n0, n1, c2)
    # One 2-D BLAS product for the big step (a stacked 3-D matmul is much slower).
    out = t.reshape(-1, c[2]) @ np.ascontiguousarray(b2.T)
    return out.reshape(shape)


def _soft_inside(level: NDArray[np.float32], edge: float | NDArray, inv_w: float) -> NDArray:
    """Fraction of a voxel inside ``level < edge``: a ramp one voxel wide, clipped to [0, 1]."""
    if np.ndim(edge) == 0:
        # (edge - level) * inv_w + 0.5 with the offset folded into the scalar: one pass less.
        out = np.subtract(F32(float(edge) + 0.5 / inv_w), level, dtype=F32)
        out *= F32(inv_w)
    else:
        out = np.subtract(edge, level, dtype=F32)
        out *= F32(inv_w)
        out += F32(0.5)
    np.clip(out, 0.0, 1.0, out=out)
    return out


@dataclass
class _Blob:
    """An axis-aligned soft ellipsoid (in deformed coordinates) painted on a box."""

    box: tuple[slice, slice, slice]
    mask: NDArray[np.float32]
    tissue: int


@dataclass
class _Anatomy:
    """Tissue fractions of one patient, shared by all pulses."""

    layers: list[NDArray[np.float32]]  # head, inside skull, inside inner skull, brain, WM
    blobs: list[_Blob]
    brain: NDArray[np.float32]


def _anatomy(rng: np.random.Generator, shape: tuple[int, int, int]) -> _Anatomy:
    """Draw one head: geometry, deformation, folding, ventricles, nuclei, maybe a lesion."""
    n = np.asarray(shape, dtype=np.float64)
    semi = 0.42 * n * rng.uniform(0.9, 1.0, 3)  # head semi-axes in voxels
    centre = (n - 1) / 2 + rng.uniform(-0.02, 0.02, 3) * n
    inv_w = float(np.mean(semi))  # one voxel in normalised units is ~1 / semi

    # Normalised coordinates with a small random rotation and a smooth deformation.
    u = [((np.arange(s) - c) / a).astype(F32) for s, c, a in zip(shape, centre, semi, strict=True)]
    ang = np.deg2rad(rng.uniform(-6, 6, 3))
    rot = _rotation(ang)
    disp_amp = 0.03
    x = []
    for d in range(3):
        xd = _smooth_field(rng, shape, float(n.max()) / 4)
        xd *= F32(disp_amp)
        xd += F32(rot[d, 0]) * u[0][:, None, None]
        xd += F32(rot[d, 1]) * u[1][None, :, None]
        xd += F32(rot[d, 2]) * u[2][None, None, :]
        x.append(xd)
    # Bound on |x - u| near the brain (rotation of |u| < ~1.1 by < 10 deg overall, plus
    # 5 sigma of the deformation),
    # used to find the voxel boxes of the small structures.
    slack = 0.2 + 5 * disp_amp

    r = np.square(x[0])
    tmp = np.square(x[1])
    r += tmp
    np.square(x[2], out=tmp)
    r += tmp
    del tmp
    np.sqrt(r, out=r)
    skull_out = rng.uniform(0.935, 0.955)
    skull_in = skull_out - rng.uniform(0.05, 0.07)
    # Cortex.  The pial surface is a gently bumpy ellipsoid 2-3 mm inside the skull.
    # Sulci are the zero sheets of a smooth random field S (|S| small), cut to a
    # random depth below the pial surface; the white-matter surface lies a cortical
    # thickness below the pial one and dips under each sulcus, so grey matter lines
    # the sulcal walls.  Lengths are in voxels (1 mm) converted to radius units.
    vox = 1.0 / inv_w
    ctrl = 6.0  # control spacing of S in voxels; its gradient is ~1 / ctrl per voxel
    bumps = _smooth_field(rng, shape, 12.0)
    pial = F32(skull_in - 2.5 * vox) + F32(vox) * bumps
    del bumps
    sulc_field = _smooth_field(rng, shape, ctrl)
    np.abs(sulc_field, out=sulc_field)
    sulc_field *= F32(ctrl)  # ~ distance to the sulcal sheet, in voxels
    depth = _smooth_field(rng, shape, 20.0)
    depth *= F32(4.0 * vox)
    depth += F32(16.0 * vox)  # sulcal depth ~ 16 +- 4 mm
    dip = np.square(sulc_field * F32(1 / 3.5))
    np.negative(dip, out=dip)
    np.exp(dip, out=dip)
    dip *= depth
    r_wm = pial - F32(3.0 * vox) - dip
    del dip
    sulcus = _soft_inside(sulc_field, 0.8, 1.0)  # CSF sheet ~1.6 mm wide
    del sulc_field
    sulcus *= _soft_inside(pial - depth, r, inv_w)  # only above the sulcal floor
    del depth
    layers = [
        _soft_inside(r, 1.0, inv_w),
        _soft_inside(r, skull_out, inv_w),
        _soft_inside(r, skull_in, inv_w),
        _soft_inside(r, pial, inv_w),
        _soft_inside(r, r_wm, inv_w),
    ]
    del r, pial, r_wm
    brain = layers[3]

    def blob(c: Sequence[float], e: Sequence[float], tissue: int) -> _Blob | None:
        lo = [int(math.floor(centre[d] + (c[d] - e[d] - slack) * semi[d])) for d in range(3)]
        hi = [int(math.ceil(centre[d] + (c[d] + e[d] + slack) * semi[d])) + 1 for d in range(3)]
        box = tuple(slice(max(0, a), min(s, b)) for a, b, s in zip(lo, hi, shape, strict=True))
        if any(sl.start >= sl.stop for sl in box):
            return None
        q = sum(((x[d][box] - F32(c[d])) / F32(e[d])) ** 2 for d in range(3))
        # Ramp one voxel wide at the surface, measured along the smallest semi-axis.
        mask = _soft_inside(np.sqrt(q) * F32(min(e)), min(e), inv_w)
        mask *= brain[box]
        return _Blob(box, mask, tissue)

    csf, dgm, lesion = (_TISSUES.index(t) for t in ("csf", "dgm", "lesion"))
    sulcus *= brain
    blobs: list[_Blob | None] = [_Blob((slice(None),) * 3, sulcus, csf)]
    # Deep grey nuclei, then lateral ventricles (painted over them), with random size.
    for side in (-1, 1):
        blobs.append(blob((side * 0.2, -0.02, -0.02), (0.09, 0.13, 0.09), dgm))
    vsize = rng.uniform(0.8, 1.3)
    for side in (-1, 1):
        blobs.append(
            blob((side * 0.085, 0.03, 0.12), (0.045 * vsize, 0.24 * vsize, 0.09 * vsize), csf)
        )
    # Interhemispheric fissure: a thin CSF slab along axis 0 in the upper brain.
    blobs.append(blob((0.0, 0.0, 0.45), (0.012, 0.75, 0.55), csf))
    # An optional lesion.
    if rng.random() < 0.75:
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        where = direction * rng.uniform(0.3, 0.65)
        size = rng.uniform(0.05, 0.11) * rng.uniform(0.8, 1.2, 3)
        blobs.append(blob(tuple(where), tuple(size), lesion))
    return _Anatomy(layers=layers, blobs=[b for b in blobs if b is not None], brain=brain)


def _rotation(angles: NDArray[np.float64]) -> NDArray[np.float64]:
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _hr_volume(
    rng: np.random.Generator, anat: _Anatomy, pulse: str, shape: tuple[int, int, int]
) -> NDArray[np.float32]:
    """One pulse of a patient: contrast, texture, bias field and Rician noise; background 0."""
    c = np.asarray(_contrast(pulse)) * rng.normal(1.0, 0.03, len(_TISSUES))
    c *= 1000.0
    scalp, skull, csf, gm, wm = (F32(v) for v in c[:5])
    head, in_skull, in_inner, brain, white = anat.layers
    img = head * scalp
    img += in_skull * (skull - scalp)
    img += in_inner * (csf - skull)
    img += brain * (gm - csf)
    img += white * (wm - gm)
    for b in anat.blobs:
        part = img[b.box]
        part += b.mask * (F32(c[b.tissue]) - part)
    # Mild tissue texture inside the brain and a smooth multiplicative bias field.
    tex = _smooth_field(rng, shape, 5.0)
    tex *= F32(0.03)
    tex *= brain
    tex += F32(1.0)
    img *= tex
    del tex
    bias = _smooth_field(rng, shape, max(shape) / 2)
    bias *= F32(0.12)
    np.exp(bias, out=bias)
    img *= bias
    del bias

    # Rician magnitude noise inside the head only, so hr > 0 is exactly the head.
    sigma = F32(_NOISE_FRAC * float(c.max()))
    re_ = rng.standard_normal(shape, dtype=F32)
    re_ *= sigma
    re_ += img
    im = rng.standard_normal(shape, dtype=F32)
    im *= sigma
    np.multiply(re_, re_, out=re_)
    np.multiply(im, im, out=im)
    re_ += im
    np.sqrt(re_, out=re_)
    inside = head > 0
    # A magnitude of exactly 0 inside the head has probability ~0; floor it anyway.
    np.maximum(re_, F32(1e-3), out=re_)
    re_ *= inside
    return re_


def downsample_slices(hr: NDArray[np.float32], factor: int) -> NDArray[np.float32]:
    """Average blocks of ``factor`` slices along axis 2 (slice thickness = spacing).

    LR slice ``k`` is the mean of HR slices ``[k f, min((k+1) f, N2))``: the last
    block may be thinner when ``f`` does not divide ``N2``, and is averaged over
    the slices that exist.

    Parameters
    ----------
    hr : (N0, N1, N2) float32
    factor : int

    Returns
    -------
    (N0, N1, ceil(N2 / factor)) float32
    """
    n0, n1, n2 = hr.shape
    n_lr = -(-n2 // factor)
    pad = n_lr * factor - n2
    sums = np.zeros((n0, n1, n_lr), dtype=np.float64)
    full = n2 // factor
    if full:
        sums[:, :, :full] = (
            hr[:, :, : full * factor].reshape(n0, n1, full, factor).sum(axis=3, dtype=np.float64)
        )
    if pad:
        sums[:, :, full] = hr[:, :, full * factor :].sum(axis=2, dtype=np.float64)
    counts = np.full(n_lr, factor, dtype=np.float64)
    counts[-1] = factor - pad
    return (sums / counts).astype(F32)


def lr_affine(hr_affine: NDArray[np.float64], factor: int) -> NDArray[np.float64]:
    """Affine of the LR grid: voxel k along axis 2 is centred on its block of HR slices."""
    s = np.eye(4)
    s[2, 2] = factor
    s[2, 3] = (factor - 1) / 2.0
    return hr_affine @ s


def _upsample_matrix(n_hr: int, n_lr: int, factor: int, order: int) -> NDArray[np.float32]:
    """(n_hr, n_lr) interpolation along the slice axis, from LR slice centres to HR slices.

    HR slice ``z`` sits at LR coordinate ``(z - (f - 1) / 2) / f``.  Interpolation
    is linear in the data, so interpolating each unit vector gives the matrix
    exactly (edges replicate, scipy ``mode="nearest"``).
    """
    from scipy import ndimage  # ~26 MB of RSS: only cohort generation needs it

    z = np.arange(n_hr, dtype=np.float64)
    if order == 0:
        # Nearest LR centre = the slab that contains the slice.
        w = np.zeros((n_hr, n_lr))
        w[np.arange(n_hr), np.minimum(z.astype(int) // factor, n_lr - 1)] = 1.0
        return w.astype(F32)
    u = (z - (factor - 1) / 2.0) / factor
    eye = np.eye(n_lr)
    cols = [
        ndimage.map_coordinates(eye[j], u[None, :], order=order, mode="nearest")
        for j in range(n_lr)
    ]
    return np.stack(cols, axis=1).astype(F32)


def upsample_expert(
    lr: NDArray[np.float32], n_hr: int, factor: int, kind: str, strength: float = 1.0
) -> NDArray[np.float32]:
    """Up-sample an LR volume along axis 2 to ``n_hr`` slices with one expert method.

    Parameters
    ----------
    lr : (N0, N1, n_lr) float32
    n_hr : int
        HR slice count.
    factor : int
        Slice spacing in HR voxels.
    kind : {"bspline", "linear", "nearest", "sharpen", "smooth"}
        Cubic B-spline, linear or nearest interpolation; "sharpen" is the
        B-spline with an unsharp mask (crisper edges, more noise), "smooth" the
        B-spline with a light Gaussian (less noise, softer edges).
    strength : float
        Scales the unsharp amount / Gaussian width.

    Returns
    -------
    (N0, N1, n_hr) float32, non-negative.
    """
    from scipy import ndimage  # ~26 MB of RSS: only cohort generation needs it

    order = {"bspline": 3, "linear": 1, "nearest": 0, "sharpen": 3, "smooth": 3}[kind]
    n0, n1, n_lr = lr.shape
    w = _upsample_matrix(n_hr, n_lr, factor, order)
    out = (lr.reshape(-1, n_lr) @ w.T).reshape(n0, n1, n_hr)
    if kind == "sharpen":
        blur = ndimage.gaussian_filter(out, sigma=(0.8, 0.8, 0.5 * factor), mode="nearest")
        blur -= out
        blur *= F32(-0.7 * strength)
        out += blur
    elif kind == "smooth":
        out = ndimage.gaussian_filter(out, sigma=(0.7 * strength, 0.7 * strength, 0.0))
    np.maximum(out, 0.0, out=out)
    return np.ascontiguousarray(out, dtype=F32)


#: ``make_cohort(experts="complementary")``: expert ``j`` simulates ``COMPLEMENTARY[j % 3]``.
COMPLEMENTARY = ("sharp_noisy", "smooth", "edge_only")
#: Expert sets of :func:`make_cohort`.
EXPERT_SETS = ("methods", "complementary")


def complementary_expert(
    lr: NDArray[np.float32], hr: NDArray[np.float32], factor: int, kind: str,
    rng: np.random.Generator,
) -> NDArray[np.float32]:
    """Simulate an expert that differs from the others as real SR methods do (issue 21).

    Parameters
    ----------
    lr : (N0, N1, n_lr) float32
        The LR volume.
    hr : (N0, N1, N2) float32
        The HR volume: ``edge_only`` uses its edges, standing for a learned method that
        restores edges well (a simulation device: no real method sees the HR).
    factor : int
        Slice spacing in HR voxels.
    kind : {"sharp_noisy", "smooth", "edge_only"}
        ``sharp_noisy``: B-spline with a strong unsharp mask plus white noise (2% of the
        HR's 99th percentile): crisp edges, noisy flat tissue.  ``smooth``: B-spline with a
        Gaussian in-plane blur: clean flat tissue, soft edges.  ``edge_only``: near the
        HR's edges halfway between the B-spline and a lightly blurred HR, elsewhere the
        B-spline plus a hallucinated texture (a smooth random field, 4%) and noise (2%):
        right on edges only.
    rng : numpy.random.Generator
        Noise and texture source.

    Returns
    -------
    (N0, N1, N2) float32, non-negative.
    """
    from scipy import ndimage  # ~26 MB of RSS: only cohort generation needs it

    n = hr.shape[2]
    head = hr > 0
    scale = float(np.percentile(hr[head], 99)) if head.any() else 1.0
    if kind == "sharp_noisy":
        out = upsample_expert(lr, n, factor, "sharpen", 1.5)
        out += rng.standard_normal(out.shape, dtype=F32) * F32(0.02 * scale)
    elif kind == "smooth":
        out = upsample_expert(lr, n, factor, "smooth", 1.0)
    elif kind == "edge_only":
        soft = ndimage.gaussian_filter(hr, 1.0)
        mag = np.sqrt(sum(ndimage.sobel(soft, axis=d, mode="nearest") ** 2 for d in range(3)))
        q = float(np.percentile(mag[head], 90)) if head.any() else 0.0
        edge = np.clip(mag / q, 0.0, 1.0) if q > 0 else np.zeros_like(mag)
        edge = ndimage.gaussian_filter(edge, 0.7).astype(F32)
        bad = upsample_expert(lr, n, factor, "bspline")
        good = F32(0.5) * ndimage.gaussian_filter(hr, 0.6) + F32(0.5) * bad
        bad += _smooth_field(rng, hr.shape, 3.0) * F32(0.04 * scale)
        bad += rng.standard_normal(hr.shape, dtype=F32) * F32(0.02 * scale)
        out = edge * good + (F32(1) - edge) * bad
    else:
        raise ConfigError(f"complementary expert kind {kind!r}: expected one of "
                          f"{list(COMPLEMENTARY)}")
    np.maximum(out, 0.0, out=out)
    return np.ascontiguousarray(out, dtype=F32)


def _patient_ids(n: int) -> list[str]:
    width = max(3, len(str(n)))
    return [f"sub-{i + 1:0{width}d}" for i in range(n)]


def _check_names(what: str, names: Sequence[str]) -> tuple[str, ...]:
    if isinstance(names, str) or not names:
        raise ConfigError(f"{what} must be a non-empty list of names; got {names!r}")
    out = tuple(str(n) for n in names)
    if len(set(out)) != len(out) or any(not n or "/" in n for n in out):
        raise ConfigError(f"{what} must be unique names without '/'; got {list(out)}")
    return out


def make_cohort(
    out_dir: str | os.PathLike[str],
    *,
    patients: int = 6,
    shape: tuple[int, int, int] = (96, 112, 96),
    spacings: Sequence[str] = ("3mm", "5mm"),
    pulses: Sequence[str] = ("t1c", "t2w"),
    models: Sequence[str] = ("BSPLINE", "LINEAR", "NEAREST", "SHARPEN"),
    seed: int = 0,
    kfolds: int = 3,
    patch_size: int = 16,
    stride: int = 8,
    experts: str = "methods",
    atlas: bool = False,
) -> Path:
    """Write a synthetic cohort in the published layout and a config that runs on it.

    Parameters
    ----------
    out_dir : str or PathLike
        Created if needed; receives ``hr/``, ``lr/``, ``models/`` and ``config.yaml``.
    patients : int
        Number of patients (ids ``sub-001``, ``sub-002``, ...), >= kfolds.
    shape : tuple of 3 int
        HR shape at 1 mm isotropic; axis 2 is the slice axis.
    spacings : sequence of str
        LR slice spacings such as ``"3mm"`` (see :func:`parse_spacing`).
    pulses : sequence of str
        Pulse names; ``t1n t1c t2w t2f pd`` have their own contrast, other
        names get the closest one (e.g. ``flair`` -> t2f).
    models : sequence of str
        Expert names.  BSPLINE, LINEAR, NEAREST, SHARPEN and SMOOTH have a fixed
        method (see :func:`upsample_expert`); other names get the remaining
        methods in turn.
    seed : int
        Everything is a deterministic function of the seed: patient ``i`` draws
        from ``numpy.random.default_rng([seed, i])`` (and a pulse from a stream
        keyed by its name), so adding patients or pulses leaves the others as they were.
    kfolds, patch_size, stride : int
        Written into the config.
    experts : {"methods", "complementary"}
        ``methods``: each model up-samples with its method (above).  ``complementary``:
        model ``j`` is :func:`complementary_expert` of kind ``COMPLEMENTARY[j % 3]`` (one
        sharp and noisy, one smooth, one right on edges only), so the best blend differs
        between edges and flat tissue.
    atlas : bool
        Also write an atlas into ``out_dir/atlas`` with the registration section's file
        names, so that ``use_registration: true`` runs on the cohort: per template
        (``T1_brain.nii`` for t1c/t1n, ``T2_brain.nii`` for t2w/t2f, ...) the voxelwise
        mean of every patient's HR of the first pulse that uses it, and
        ``brain_mask.nii``, the largest connected component of that mean >= 0.1 (the rule
        of algorithm A7.5).  The patients' heads are posed at random, so registering them
        to their mean has work to do.

    Returns
    -------
    Path
        The written ``config.yaml`` (absolute paths; ``data.out`` is
        ``out_dir/manifest.json``, ``pacs_sr.out_root`` is ``out_dir/results``).

    Raises
    ------
    ConfigError
        An argument is invalid (e.g. fewer patients than folds), or ``atlas`` is asked for
        with a pulse that has no atlas template.

    Notes
    -----
    HR: ``hr/{pid}/{pid}-{pulse}.nii.gz``, float32, >= 0, exactly 0 outside the
    head.  LR: ``lr/{spacing}/{pid}/{pid}-{pulse}.nii.gz``, blocks of N slices
    averaged along axis 2 (:func:`downsample_slices`), voxel size N along axis 2.
    Experts: ``models/{MODEL}/{spacing}/output_volumes/{pid}-{pulse}.nii.gz`` on
    the HR grid.

    Examples
    --------
    >>> cfg_path = make_cohort("/tmp/cohort", patients=3, shape=(24, 28, 20))  # doctest: +SKIP
    """
    out = Path(out_dir).resolve()
    spacings = _check_names("spacings", spacings)
    pulses = _check_names("pulses", pulses)
    models = _check_names("models", models)
    factors = [parse_spacing(s) for s in spacings]
    if isinstance(kfolds, bool) or not isinstance(kfolds, int) or kfolds < 2:
        raise ConfigError(f"kfolds must be an integer >= 2; got {kfolds!r}")
    if isinstance(patients, bool) or not isinstance(patients, int) or patients < kfolds:
        raise ConfigError(f"patients must be an integer >= kfolds={kfolds}; got {patients!r}")
    bad_dims = any(
        isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 8 for s in shape
    )
    if len(shape) != 3 or bad_dims:
        raise ConfigError(f"shape must be 3 integers >= 8; got {shape!r}")
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ConfigError(f"patch_size must be an integer >= 1; got {patch_size!r}")
    check_stride(patch_size, stride)

    registration = RegistrationConfig(
        atlas=out / "atlas",
        t1="T1_brain.nii",
        t2="T2_brain.nii",
        epi="EPI_brain.nii",
        pd="PD_brain.nii",
        brain_mask="brain_mask.nii",
    )
    # template file name -> the pulse whose HRs make it (the first pulse that uses it)
    atlas_pulses: dict[str, str] = {}
    if atlas:
        for pulse in pulses:
            name = getattr(registration, template_key(pulse))
            atlas_pulses.setdefault(name, pulse)
    atlas_sums = {pulse: np.zeros(shape, np.float64) for pulse in atlas_pulses.values()}

    if experts not in EXPERT_SETS:
        raise ConfigError(f"experts must be one of {list(EXPERT_SETS)}; got {experts!r}")
    hr_root, lr_root, models_root = out / "hr", out / "lr", out / "models"
    specs = _expert_specs(models)
    affine = np.eye(4)
    affine[:3, 3] = -(np.asarray(shape, dtype=np.float64) - 1) / 2.0  # centred, 1 mm, RAS
    log.info(
        "cohort: %d patients shape=%s spacings=%s pulses=%s experts=%s -> %s",
        patients,
        shape,
        ",".join(spacings),
        ",".join(pulses),
        ",".join(f"{m}={k}" for m, (k, _) in zip(models, specs, strict=True)),
        out,
    )
    for i, pid in enumerate(_patient_ids(patients)):
        t0 = time.perf_counter()
        anat = _anatomy(np.random.default_rng([seed, i]), shape)
        for pulse in pulses:
            # A stream per (patient, pulse name): independent of which other pulses exist.
            rng = np.random.default_rng([seed, i, zlib.crc32(pulse.encode())])
            hr = _hr_volume(rng, anat, pulse, shape)
            if pulse in atlas_sums:
                atlas_sums[pulse] += hr
            hr_path = hr_file(hr_root, pid, pulse)
            hr_path.parent.mkdir(parents=True, exist_ok=True)
            write_nifti(hr_path, hr, affine)
            for spacing, f in zip(spacings, factors, strict=True):
                lr = downsample_slices(hr, f)
                lr_path = lr_file(lr_root, spacing, pid, pulse)
                lr_path.parent.mkdir(parents=True, exist_ok=True)
                write_nifti(lr_path, lr, lr_affine(affine, f))
                for j, (model, (kind, strength)) in enumerate(zip(models, specs, strict=True)):
                    if experts == "complementary":
                        erng = np.random.default_rng(
                            [seed, i, zlib.crc32(pulse.encode()), zlib.crc32(spacing.encode()), j])
                        sr = complementary_expert(lr, hr, f, COMPLEMENTARY[j % 3], erng)
                    else:
                        sr = upsample_expert(lr, shape[2], f, kind, strength)
                    sr_path = expert_file(models_root, model, spacing, pid, pulse)
                    sr_path.parent.mkdir(parents=True, exist_ok=True)
                    write_nifti(sr_path, sr, affine)
            del hr
        log.info("cohort patient=%s secs=%.2f", pid, time.perf_counter() - t0)
    if atlas:
        _write_atlas(registration, atlas_pulses, atlas_sums, patients, affine)

    cfg = FullConfig(
        data=DataConfig(
            models_root=models_root,
            hr_root=hr_root,
            lr_root=lr_root,
            spacings=spacings,
            pulses=pulses,
            models=models,
            kfolds=kfolds,
            seed=int(seed),
            out=out / "manifest.json",
        ),
        registration=registration,
        pacs_sr=PacsConfig(
            experiment_name="PaCS_SR",
            patch_size=patch_size,
            stride=stride,
            mixing_window="hann",
            simplex=True,
            lambda_ridge=1e-4,
            laplacian_tau=0.05,
            lambda_edge=0.25,
            edge_power=2.0,
            lambda_grad=0.2,
            grad_operator="sobel",
            normalize="zscore",
            use_registration=False,
            num_workers=2,
            parallel_backend="loky",
            device="cpu",
            compute_lpips=False,
            compute_kid=False,
            ssim_axis="axial",
            evaluate_train=True,
            save_weight_volumes=True,
            save_blends=True,
            log_level="INFO",
            log_to_file=True,
            log_region_freq=10,
            disable_tqdm=False,
            out_root=out / "results",
        ),
        predict=None,
        path=out / "config.yaml",
    )
    dump_config(cfg, cfg.path)
    log.info("cohort: wrote %s", cfg.path)
    return cfg.path


def _write_atlas(registration: RegistrationConfig, atlas_pulses: dict[str, str],
                 sums: dict[str, NDArray[np.float64]], n: int, affine: NDArray) -> None:
    """Write each template (the population mean HR) and the brain mask of the first one."""
    folder = Path(registration.atlas)
    folder.mkdir(parents=True, exist_ok=True)
    mask_written = False
    for name, pulse in atlas_pulses.items():
        mean = (sums[pulse] / n).astype(np.float32)
        write_nifti(folder / name, mean, affine)
        log.info("cohort atlas: %s = mean of %d %s HRs", folder / name, n, pulse)
        if not mask_written:
            write_nifti(folder / registration.brain_mask, brain_mask(mean), affine,
                        dtype=np.uint8)
            log.info("cohort atlas: %s = largest component of that mean >= 0.1",
                     folder / registration.brain_mask)
            mask_written = True
