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

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._config import SSIM_AXES, SSIM_MIN_RANGE, WINDOWS
from ..errors import InputError
from ..kernels.score import _score_patient
from ..resources.pages import SLAB_PLANES, release_pages
from ..resources.threads import run_chunks
from .blending import (
    Normalisation,
    blend_patient,
    brain_mask,
    check_blend_finite,
    expert_mean,
)
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
from .predict import model_mapping, model_window
from .statistics import by_slabs

#: The blend's brain mask (algorithm A7.5); ``score_patient`` has a parameter of that name.
_component_mask = brain_mask

#: Planes of every volume one call of the one-pass kernel scores along the axial SSIM axis,
#: and the slab of the statistics before it: what a patient keeps mapped while it is scored.
SCORE_SLAB_PLANES = SLAB_PLANES

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
    times ``den / (den + 1e-8)``, an expert as a user gets it (HR-free protocol,
    :func:`experts_as_they_are`) its raw values times the HR-free mask, and every SSIM
    shares the HR's box sums.  The numbers
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
    # Every pass below goes slab by slab and gives back the pages of volumes mapped from the
    # volume cache as it goes (resources/pages.py): a patient holds a few MB of its volumes at
    # a time instead of all of them, whatever it is doing.
    slab = SCORE_SLAB_PLANES
    norm = Normalisation.from_hr(t, vols, slab=slab)
    free: Normalisation | None = None
    free_mask = hr_free_mask
    if hr_free:
        model_window(model, window)  # the HR-free blend is predict's: same window check
        proxy = expert_mean(vols, slab=slab)
        free = Normalisation.from_experts(vols, proxy, mapping=model_mapping(model), slab=slab)
        if free_mask is None:
            free_mask = _component_mask(proxy)
        del proxy
    axis = SSIM_AXES[ssim_axis]
    # The one-pass kernel blends one weight vector per tile, mapped back by one affine map;
    # the sagittal SSIM axis, the edge-gated model (two vectors mixed per voxel) and the
    # weighted HR-free mapping (per voxel) take the separate, per-prediction path.
    if axis == 2 or model.gating != "none" or (free is not None and free.mapping != "mean"):
        score = _score_separately(t, vols, model, window, ssim_axis, norm, brain_mask,
                                  experts_alone, free, free_mask)
        score = _with_experts_as_they_are(score, t, vols, names, ssim_axis, free_mask)
        _release(t, vols)
        return score
    w = as_tile_weights(model.weights, grid, len(vols))
    # every array read-only and every flag a Python bool: one compiled specialisation
    empty = readonly(np.zeros((1, 1, 1), np.uint8))
    mask_u8 = empty if brain_mask is None else as_mask_u8(brain_mask, grid.shape)
    mask2_u8 = empty if free_mask is None else as_mask_u8(free_mask, grid.shape)
    f = free if free is not None else norm

    def stats(a: ArrayLike) -> NDArray[np.float64]:
        return readonly(np.ascontiguousarray(a, dtype=np.float64).reshape(-1))

    kind = "flat" if grid.stride >= grid.patch_size else window
    n_pred = 1 + len(vols) * (int(experts_alone) + int(free is not None)) + int(free is not None)
    n_s = t.shape[axis]
    blend = np.empty(t.shape, np.float32)
    count = np.zeros(n_s, np.int64)
    sum_sq = np.zeros((n_pred, n_s), np.float64)
    sum_abs = np.zeros((n_pred, n_s), np.float64)
    lo = np.empty(n_s, np.float32)
    hi = np.empty(n_s, np.float32)
    ssim = np.full((n_pred, n_s), np.nan)
    threads = numba.get_num_threads()
    mus, sds, mus2, sds2 = stats(norm.mus), stats(norm.sds), stats(f.mus), stats(f.sds)

    def score(a: int, b: int) -> None:  # slices a:b along the SSIM axis
        _score_patient(
            t, vols, w, mus, sds, float(norm.mu_out),
            float(norm.sd_out), mask_u8, brain_mask is not None, mus2, sds2,
            float(f.mu_out), float(f.sd_out), mask2_u8, free_mask is not None,
            bool(experts_alone), free is not None, grid.patch_size, grid.stride,
            WINDOWS[kind], axis, SSIM_MIN_RANGE, threads,
            a, b, blend, count, sum_sq, sum_abs, lo, hi, ssim, run_chunks,
        )

    # Along axis 0 a slice is a slab of planes of every volume; along axis 1 it spans them all.
    if axis == 0:
        by_slabs(n_s, max(slab, 2 * threads), [t, *vols], score)
    else:
        score(0, n_s)
        _release(t, vols)
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

    check_blend_finite(blend, model.weights, norm)  # a NonFiniteBlend names the cause
    extras: dict[str, Any] = {}
    q = 1
    if experts_alone:
        extras["experts"] = {name: finish(q + e) for e, name in enumerate(names)}
        q += len(names)
    if free is not None:
        extras["hr_free"] = finish(q)
        if not math.isfinite(extras["hr_free"]["mse"]):
            # the HR-free blend overflowed float32: blend it alone to name the cause
            blend_patient(vols, grid, model.weights, window=window, norm=free,
                          brain_mask=free_mask)
        # each expert as a user gets it, scored in the same pass (experts_as_they_are)
        extras["hr_free"]["experts"] = {name: finish(q + 1 + e) for e, name in enumerate(names)}
    return PatientScore(blend, finish(0), extras)


def _release(hr: NDArray, experts: Sequence[NDArray]) -> None:
    """Give back the mapped pages of the HR and the experts (if mapped from the cache)."""
    for v in (hr, *experts):
        release_pages(v)


def _with_experts_as_they_are(
    score: PatientScore, hr: NDArray[np.float32], experts: Sequence[NDArray[np.float32]],
    names: Sequence[str], ssim_axis: str, free_mask: ArrayLike | None,
) -> PatientScore:
    """Add the HR-free protocol's experts as a user gets them, under the HR-free blend's mask.

    ``scoring.gain_over_best`` needs them for that protocol's best expert; the mask is the
    one the HR-free blend was just scored with, so the experts' mean is not computed again.
    (The one-pass path scores them in its own pass; this is for the separate path.)
    """
    if "hr_free" in score.extras:
        score.extras["hr_free"]["experts"] = experts_as_they_are(
            hr, experts, names, ssim_axis=ssim_axis, mask=free_mask)
    return score


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
        plain = [{k: m[k] for k in METRIC_KEYS} for m in hr_free.values()]
        out["test_hr_free"] = {**aggregate(plain), "protocol": HR_FREE_PROTOCOL}
        alone = [m["experts"] for m in hr_free.values() if "experts" in m]
        if alone:
            out["test_hr_free"]["experts"] = {
                name: aggregate([e[name] for e in alone if name in e]) for name in model_names
            }
    if experts:
        out["test_experts"] = {
            name: aggregate([e[name] for e in experts.values() if name in e])
            for name in model_names
        }
    return out


# ----------------------------------------------------------------------------------------
# The two protocols, the best single expert and the gain: one definition for every output
# (the demo, the train table, tune, summarize, report).  Under the HR-free protocol each
# expert alone is scored as a user would have it without PaCS-SR (experts_as_they_are).
# ----------------------------------------------------------------------------------------

#: Protocol keys.
PUBLISHED, HR_FREE = "published", "hr_free"

#: Each protocol in words, for every output that shows its numbers.
PROTOCOLS = {
    PUBLISHED: "published protocol: HR statistics and HR brain mask",
    HR_FREE: "HR-free protocol: statistics and mask from the experts",
}

#: The label of the blend's row under each protocol.
STACKED = {PUBLISHED: "PaCS-SR", HR_FREE: "PaCS-SR (HR-free)"}

#: Why the two protocols' rows differ and what compares across them.
PROTOCOL_NOTE = (
    "Two protocols, two ways of normalising and masking the same blend. Published: the blend "
    "(and each expert alone) takes the test HR's own mean and std and the HR's brain mask "
    "(largest component of HR >= 0.1), which a new patient does not have. HR-free: both come "
    "from the experts, as predict does, and each expert is scored as it is, under the same "
    "mask. Both are scored against the same HR over the same voxels (HR > 0), so PSNR and "
    "SSIM are on one scale, but a gap between the protocols comes from their masks and "
    "intensity mappings (the experts' mask is usually larger and keeps voxels the HR's mask "
    "cuts), not from a better method: compare rows within a protocol, never across. MAE and "
    "MSE carry each protocol's intensity mapping: compare them within a protocol only. Each "
    "protocol's gain is over its own best single expert: the expert with the highest mean "
    "PSNR over the same test patients."
)


def experts_as_they_are(
    hr: NDArray[np.float32],
    experts: Sequence[NDArray[np.float32]],
    names: Sequence[str],
    *,
    ssim_axis: str,
    mask: NDArray | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of each expert alone under the HR-free protocol: its volume times the brain mask.

    What a user gets from that expert on a new patient without PaCS-SR: the expert's own
    intensities, masked with the HR-free blend's brain mask (the largest component of the
    experts' mean >= 0.1, or ``mask``), scored against the HR.

    Parameters
    ----------
    hr : (N0, N1, N2) float32
        The test HR (scoring only).
    experts : sequence of (N0, N1, N2) float32
        The expert volumes.
    names : sequence of str
        Their names.
    ssim_axis : str
        The SSIM slice axis.
    mask : (N0, N1, N2) bool or uint8, optional
        A fixed brain mask (the atlas mask with registration).

    Returns
    -------
    dict
        ``{name: {mse, mae, psnr, ssim}}``.
    """
    if mask is None:
        proxy = expert_mean(experts)
        mask = brain_mask(proxy)
        del proxy
    out = {}
    for name, x in zip(names, experts, strict=True):
        # a non-finite expert voxel reads as 0, as in every blend (docs/algorithm.md)
        vol = np.asarray(x, dtype=np.float32)
        masked = np.where(np.isfinite(vol) & np.asarray(mask, bool), vol, np.float32(0))
        out[name] = _floats(volume_metrics(hr, masked, ssim_axis=ssim_axis))
        del masked
    return out


@dataclass(frozen=True)
class Gain:
    """PaCS-SR against the best single expert under one protocol (:func:`gain_over_best`).

    Attributes
    ----------
    protocol : str
        :data:`PUBLISHED` or :data:`HR_FREE`.
    best : str or None
        The best single expert: the highest mean PSNR over ``units``; None without experts.
    units : tuple of str
        The units (test patients, or fold means) that PaCS-SR and every expert share, in
        sorted order; the means and the gain are over these.
    psnr, ssim : float
        Mean over ``units`` of PaCS-SR minus the best expert (NaN when not available).
    means : dict
        ``{method: {metric: mean over units}}`` of every expert and PaCS-SR.
    """

    protocol: str
    best: str | None
    units: tuple[str, ...]
    psnr: float
    ssim: float
    means: dict[str, dict[str, float]]

    @property
    def words(self) -> str:
        """The protocol in words (:data:`PROTOCOLS`)."""
        return PROTOCOLS[self.protocol]

    def describe(self) -> str:
        """One line, e.g. ``gain over the best single expert (BSPLINE): +0.035 dB PSNR ...``."""
        if self.best is None or math.isnan(self.psnr):
            return "gain over the best single expert: not available (no expert scores)"
        return (f"gain over the best single expert ({self.best}, highest mean PSNR): "
                f"{self.psnr:+.3f} dB PSNR, {self.ssim:+.4f} SSIM over {len(self.units)} "
                f"{'unit' if len(self.units) == 1 else 'units'}")


def _finite_mean(values: Sequence[float]) -> float:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
    return float(v.mean()) if v.size else math.nan


def gain_over_best(
    protocol: str,
    stacked: Mapping[str, Mapping[str, float]],
    experts: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> Gain:
    """Find the best single expert and PaCS-SR's gain over it: the one definition.

    Within one protocol, over the units (test patients) that PaCS-SR and every expert have
    in common: the best expert has the highest mean PSNR (the first in ``experts``' order on
    a tie); the gain is the mean over those units of PaCS-SR minus that expert, for PSNR and
    SSIM (equal to the difference of the means).  Non-finite values (an infinite PSNR) are
    left out of the means.

    Parameters
    ----------
    protocol : str
        :data:`PUBLISHED` or :data:`HR_FREE`.
    stacked : dict
        ``{unit: {metric: value}}`` of PaCS-SR under that protocol.
    experts : dict
        ``{name: {unit: {metric: value}}}`` of each expert alone under that protocol.

    Returns
    -------
    Gain

    Raises
    ------
    ValueError
        On an unknown protocol.

    Examples
    --------
    >>> g = gain_over_best("published", {"p1": {"psnr": 31.0, "ssim": 0.9}},
    ...                    {"A": {"p1": {"psnr": 30.0, "ssim": 0.8}},
    ...                     "B": {"p1": {"psnr": 30.5, "ssim": 0.85}}})
    >>> g.best, round(g.psnr, 3), g.words
    ('B', 0.5, 'published protocol: HR statistics and HR brain mask')
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected one of {list(PROTOCOLS)}")
    units = set(stacked)
    for per in experts.values():
        units &= set(per)
    common = tuple(sorted(units))
    means: dict[str, dict[str, float]] = {}
    for name, per in experts.items():
        means[name] = {k: _finite_mean([per[u].get(k) for u in common]) for k in ("psnr", "ssim")}
    means[STACKED[protocol]] = {k: _finite_mean([stacked[u].get(k) for u in common])
                                for k in ("psnr", "ssim")}
    ranked = [n for n in experts if not math.isnan(means[n]["psnr"])]
    best = max(ranked, key=lambda n: means[n]["psnr"], default=None) if common else None
    gains = {}
    for k in ("psnr", "ssim"):
        if best is None:
            gains[k] = math.nan
            continue
        gains[k] = _finite_mean([stacked[u][k] - experts[best][u][k] for u in common
                                 if stacked[u].get(k) is not None
                                 and experts[best][u].get(k) is not None])
    return Gain(protocol, best, common, gains["psnr"], gains["ssim"], means)
