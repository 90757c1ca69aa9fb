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
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .blending import Normalisation, blend_patient, brain_mask
from .metrics import METRIC_KEYS, aggregate, volume_metrics
from .model import StackingModel
from .predict import predict_volume

HR_FREE_PROTOCOL = (
    "HR-free: expert z-score statistics over mean(experts) > 0, blend mapped back with the "
    "mean of the experts' means and stds, brain mask from mean(experts) >= 0.1 (as predict); "
    "the published 'test' entry takes all three from the test HR"
)


def test_extras(
    hr: NDArray[np.float32],
    experts: Sequence[NDArray[np.float32]],
    model: StackingModel,
    *,
    window: str,
    ssim_axis: str,
    mask: NDArray | None = None,
) -> dict[str, Any]:
    """Per-expert and HR-free metrics of one test patient.

    Parameters
    ----------
    hr : (N0, N1, N2) float32
        The test HR.
    experts : sequence of (N0, N1, N2) float32
        The experts in the model's order.
    model : StackingModel
        The model being evaluated.
    window : {"hann", "flat"}
        The mixing window of the evaluation.
    ssim_axis : str
        The SSIM slice axis of the evaluation.
    mask : (N0, N1, N2) bool or uint8, optional
        A fixed brain mask for every blend here (the atlas mask with registration); default:
        the HR's for the experts alone and the experts' mean's for the HR-free blend.

    Returns
    -------
    dict
        ``{"experts": {name: {mse, mae, psnr, ssim}}, "hr_free": {mse, mae, psnr, ssim}}``.
    """
    per_expert = expert_alone(hr, experts, model, window=window, ssim_axis=ssim_axis,
                              mask=mask)
    pred = predict_volume(experts, model, window=window, mask=mask)
    hr_free = _floats(volume_metrics(hr, pred, ssim_axis=ssim_axis))
    return {"experts": per_expert, "hr_free": hr_free}


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
    grid, names = model.grid, model.model_names
    norm = Normalisation.from_hr(hr, experts)
    bmask = brain_mask(hr) if mask is None else mask
    out = {}
    for e, name in enumerate(names):
        w = np.zeros((grid.n_tiles, len(names)), dtype=np.float32)
        w[:, e] = 1.0
        pred = blend_patient(experts, grid, w, window=window, norm=norm, brain_mask=bmask)
        out[name] = _floats(volume_metrics(hr, pred, ssim_axis=ssim_axis))
        del pred
    return out


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
