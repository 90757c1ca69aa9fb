"""Test metrics beside the published ones: each expert alone, and the HR-free protocol.

The published evaluation (algorithm A7) normalises the blend with the test HR's own mean and
std and masks it with the HR's brain mask, information a new patient does not have.  So that
a reader sees what the blend is worth in use, every test patient is also scored

* per expert alone, scored like the blend: the expert put through the same path with
  one-hot tile weights (z-scored over the HR mask, mapped back with the HR's mean and std,
  brain-masked), so that "PaCS-SR against the best expert" compares the weighting and
  nothing else, and
* under the HR-free protocol: the blend ``predict`` makes (algorithm B6: normalisation
  statistics and brain mask taken from the experts), scored against the HR.

These numbers go under new keys (``test_experts``, ``test_hr_free``) so that the published
keys of ``metrics.json`` stay as the published tool writes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._config import SSIM_AXES, SSIM_MIN_RANGE, WINDOWS
from ..errors import InputError
from ..kernels.score import _score_patient
from .blending import Normalisation, blend_patient, brain_mask, expert_mean
from .checks import (
    as_mask_u8,
    as_tile_weights,
    as_volume,
    as_volume_list,
    check_shape,
    readonly,
)
from .metrics import METRIC_KEYS, aggregate, metrics_from_sums, volume_metrics
from .model import StackingModel
from .predict import model_window

#: The blend's brain mask (algorithm A7.5); ``score_patient`` has a parameter of that name.
_component_mask = brain_mask

HR_FREE_PROTOCOL = (
    "HR-free: expert z-score statistics over mean(experts) > 0, blend mapped back with the "
    "mean of the experts' means and stds, brain mask from mean(experts) >= 0.1 (as predict); "
    "the published 'test' entry takes all three from the test HR"
)


@dataclass(frozen=True, eq=False)
class PatientScore:
    """What scoring one patient gives: its blend, the blend's metrics and the extras.

    Attributes
    ----------
    blend : (N0, N1, N2) float32
        The evaluate blend (algorithm A7), ready to be written.
    metrics : dict
        ``{mse, mae, psnr, ssim}`` of the blend against the HR.
    extras : dict
        ``{"experts": {name: metrics}}`` and/or ``{"hr_free": metrics}`` as asked for.
    """

    blend: NDArray[np.float32]
    metrics: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)


def score_patient(
    hr: ArrayLike,
    experts: Sequence[ArrayLike],
    model: StackingModel,
    *,
    window: str,
    ssim_axis: str,
    brain_mask: ArrayLike | None,
    experts_alone: bool = False,
    hr_free: bool = False,
    hr_free_mask: ArrayLike | None = None,
) -> PatientScore:
    """Blend one patient and score it, each expert alone and the HR-free blend, in one pass.

    Parameters
    ----------
    hr : (N0, N1, N2) float32
        The HR: normalisation source of the blend (algorithm A7.1) and the metrics' target.
    experts : sequence of (N0, N1, N2) float32
        The experts in the model's order.
    model : StackingModel
        Tile weights and grid.
    window : {"hann", "flat"}
        The evaluation's mixing window.
    ssim_axis : {"axial", "coronal", "sagittal"}
        The SSIM slice axis.
    brain_mask : (N0, N1, N2) bool or uint8, or None
        Mask of the blend and of every expert alone (the HR's largest component, or the
        atlas mask); None: no masking.
    experts_alone : bool
        Also score each expert through the blend's path with one-hot tile weights.
    hr_free : bool
        Also score the blend ``predict`` makes without the HR (algorithm B6).
    hr_free_mask : (N0, N1, N2) bool or uint8, optional
        The HR-free blend's mask; default: the largest component of the experts' mean.

    Returns
    -------
    PatientScore

    Raises
    ------
    InputError
        If the HR has no usable mask or variance, the experts none (``hr_free``), or the
        shapes do not fit the model.

    Notes
    -----
    :mod:`pacs_numba.kernels.score` reads each voxel once for every prediction: the blend
    and the HR-free blend share one overlap-add, an expert alone is its z-scored values
    times ``den / (den + 1e-8)``, and every SSIM shares the HR's box sums.  The numbers
    equal those of separate blends and :func:`~pacs_numba.core.metrics.volume_metrics` to
    float rounding.  Along the sagittal axis a slice crosses every output row, so there
    each prediction is blended and scored on its own (same numbers, more passes).

    Examples
    --------
    >>> import numpy as np
    >>> from pacs_numba.core.tiling import TileGrid
    >>> g = TileGrid((8, 8, 8), patch_size=4, stride=2)
    >>> hr = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32) + 1
    >>> m = StackingModel(np.full((g.n_tiles, 1), 1.0, np.float32),
    ...                   np.ones(g.n_tiles, bool), g, ("A",), {})
    >>> s = score_patient(hr, [hr], m, window="flat", ssim_axis="axial", brain_mask=None,
    ...                   experts_alone=True)
    >>> round(s.metrics["ssim"], 6), round(s.extras["experts"]["A"]["ssim"], 6)
    (1.0, 1.0)
    """
    grid, names = model.grid, model.model_names
    if ssim_axis not in SSIM_AXES:
        raise ValueError(f"ssim_axis must be one of {sorted(SSIM_AXES)}, got {ssim_axis!r}")
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {sorted(WINDOWS)}, got {window!r}")
    t = as_volume(hr)
    check_shape(t.shape, grid.shape, what="the HR", like="the model's grid")
    vols = as_volume_list(experts, grid.shape)
    if len(vols) != len(names):
        raise InputError(
            f"the model blends {len(names)} experts {list(names)}; got {len(vols)} volumes"
        )
    norm = Normalisation.from_hr(t, vols)
    free: Normalisation | None = None
    free_mask = hr_free_mask
    if hr_free:
        model_window(model, window)  # the HR-free blend is predict's: same window check
        proxy = expert_mean(vols)
        free = Normalisation.from_experts(vols, proxy)
        if free_mask is None:
            free_mask = _component_mask(proxy)
        del proxy
    axis = SSIM_AXES[ssim_axis]
    if axis == 2:
        return _score_separately(t, vols, model, window, ssim_axis, norm, brain_mask,
                                 experts_alone, free, free_mask)
    w = as_tile_weights(model.weights, grid, len(vols))
    # every array read-only and every flag a Python bool: one compiled specialisation
    empty = readonly(np.zeros((1, 1, 1), np.uint8))
    mask_u8 = empty if brain_mask is None else as_mask_u8(brain_mask, grid.shape)
    mask2_u8 = empty if free_mask is None else as_mask_u8(free_mask, grid.shape)
    f = free if free is not None else norm

    def stats(a: ArrayLike) -> NDArray[np.float64]:
        return readonly(np.ascontiguousarray(a, dtype=np.float64).reshape(-1))

    kind = "flat" if grid.stride >= grid.patch_size else window
    blend, count, sum_sq, sum_abs, lo, hi, ssim = _score_patient(
        t, vols, w, stats(norm.mus), stats(norm.sds), float(norm.mu_out), float(norm.sd_out),
        mask_u8, brain_mask is not None, stats(f.mus), stats(f.sds), float(f.mu_out),
        float(f.sd_out), mask2_u8, free_mask is not None, bool(experts_alone),
        free is not None, grid.patch_size, grid.stride, WINDOWS[kind], axis,
        SSIM_MIN_RANGE, numba.get_num_threads(),
    )
    # Slice partial sums added in slice order, as metrics._volume_metrics adds its planes.
    n = int(count.sum())
    lo_all = float(lo.min()) if lo.size else np.inf
    hi_all = float(hi.max()) if hi.size else -np.inf

    def finish(q: int) -> dict[str, float]:
        s2 = s1 = 0.0
        for i in range(sum_sq.shape[1]):
            s2 += float(sum_sq[q, i])
            s1 += float(sum_abs[q, i])
        return _floats(metrics_from_sums(n, s2, s1, lo_all, hi_all, ssim[q]))

    extras: dict[str, Any] = {}
    q = 1
    if experts_alone:
        extras["experts"] = {name: finish(q + e) for e, name in enumerate(names)}
        q += len(names)
    if free is not None:
        extras["hr_free"] = finish(q)
    return PatientScore(blend, finish(0), extras)


def _score_separately(
    hr: NDArray[np.float32],
    experts: Sequence[NDArray[np.float32]],
    model: StackingModel,
    window: str,
    ssim_axis: str,
    norm: Normalisation,
    bmask: ArrayLike | None,
    experts_alone: bool,
    free: Normalisation | None,
    free_mask: ArrayLike | None,
) -> PatientScore:
    """Each prediction blended and scored on its own (the sagittal SSIM axis)."""
    grid, names = model.grid, model.model_names
    blend = blend_patient(experts, grid, model.weights, window=window, norm=norm,
                          brain_mask=bmask)
    metrics = _floats(volume_metrics(hr, blend, ssim_axis=ssim_axis))
    extras: dict[str, Any] = {}
    if experts_alone:
        per = {}
        for e, name in enumerate(names):
            w = np.zeros((grid.n_tiles, len(names)), dtype=np.float32)
            w[:, e] = 1.0
            pred = blend_patient(experts, grid, w, window=window, norm=norm, brain_mask=bmask)
            per[name] = _floats(volume_metrics(hr, pred, ssim_axis=ssim_axis))
            del pred
        extras["experts"] = per
    if free is not None:
        pred = blend_patient(experts, grid, model.weights, window=window, norm=free,
                             brain_mask=free_mask)
        extras["hr_free"] = _floats(volume_metrics(hr, pred, ssim_axis=ssim_axis))
    return PatientScore(blend, metrics, extras)


def test_extras(
    hr: NDArray[np.float32],
    experts: Sequence[NDArray[np.float32]],
    model: StackingModel,
    *,
    window: str,
    ssim_axis: str,
    mask: NDArray | None = None,
) -> dict[str, Any]:
    """Per-expert and HR-free metrics of one test patient (see :func:`score_patient`).

    ``mask`` is a fixed brain mask for every blend (the atlas mask with registration);
    default: the HR's for the experts alone and the experts' mean's for the HR-free blend.
    Returns ``{"experts": {name: {mse, mae, psnr, ssim}}, "hr_free": {mse, mae, psnr, ssim}}``.
    """
    bmask = brain_mask(hr) if mask is None else mask
    return score_patient(hr, experts, model, window=window, ssim_axis=ssim_axis,
                         brain_mask=bmask, experts_alone=True, hr_free=True,
                         hr_free_mask=mask).extras


def expert_alone(
    hr: NDArray[np.float32],
    experts: Sequence[NDArray[np.float32]],
    model: StackingModel,
    *,
    window: str,
    ssim_axis: str,
    mask: NDArray | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of each expert used alone, through the blend's own path (one-hot weights).

    Every expert is z-scored over the HR mask, mapped back with the HR's mean and std and
    brain-masked exactly as the evaluate blend is, so its score differs from the blend's
    only by the weights.
    """
    bmask = brain_mask(hr) if mask is None else mask
    return score_patient(hr, experts, model, window=window, ssim_axis=ssim_axis,
                         brain_mask=bmask, experts_alone=True).extras["experts"]


def _floats(m: Mapping[str, float]) -> dict[str, float]:
    return {k: float(m[k]) for k in METRIC_KEYS}


def split_extras(
    per_patient: Mapping[str, Mapping[str, Any]],
) -> tuple[dict[str, dict[str, float]], dict[str, dict], dict[str, dict[str, float]]]:
    """Separate the published per-patient metrics from the extras added by :func:`test_extras`.

    Returns
    -------
    plain : {pid: {mse, mae, psnr, ssim}}
    experts : {pid: {name: metrics}} (patients that have extras)
    hr_free : {pid: metrics}
    """
    plain, experts, hr_free = {}, {}, {}
    for pid, m in per_patient.items():
        plain[pid] = {k: m[k] for k in m if k in METRIC_KEYS}
        if "experts" in m:
            experts[pid] = dict(m["experts"])
        if "hr_free" in m:
            hr_free[pid] = dict(m["hr_free"])
    return plain, experts, hr_free


def extras_summary(
    experts: Mapping[str, Mapping[str, Mapping[str, float]]],
    hr_free: Mapping[str, Mapping[str, float]],
    model_names: Sequence[str],
) -> dict[str, Any]:
    """``metrics.json`` entries: means over patients per expert and under the HR-free protocol."""
    out: dict[str, Any] = {}
    if hr_free:
        out["test_hr_free"] = {**aggregate(list(hr_free.values())), "protocol": HR_FREE_PROTOCOL}
    if experts:
        out["test_experts"] = {
            name: aggregate([e[name] for e in experts.values() if name in e])
            for name in model_names
        }
    return out
