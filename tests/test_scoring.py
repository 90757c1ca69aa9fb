"""One-pass scoring of a test patient against the separate passes it replaced (issue 18).

The slow twin is the path the evaluate stage took before: one full overlap-add blend per
prediction (the blend, each expert alone with one-hot tile weights, the HR-free blend of
``predict``), each scored with ``volume_metrics``.  Those pieces are checked against NumPy,
SciPy and skimage in test_kernels_blend.py and test_kernels_metrics.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import ndimage

from pacs_numba.core import scoring
from pacs_numba.core.blending import (
    Normalisation,
    blend_patient,
    brain_mask,
    expert_mean,
)
from pacs_numba.core.metrics import METRIC_KEYS, volume_metrics
from pacs_numba.core.model import StackingModel
from pacs_numba.core.scoring import expert_alone, score_patient
from pacs_numba.core.tiling import TileGrid
from pacs_numba.errors import InputError

# mse and mae are means of float32 differences that differ by a few float32 ulps between a
# one-hot overlap-add and the z-scored expert times den / (den + eps); psnr follows.
RTOL = 2e-5
ATOL_SSIM = 1e-5


def _separate(hr, experts, model, window, axis, bmask, free_mask):
    """The pre-issue-18 path: every prediction blended and scored on its own."""
    grid, names = model.grid, model.model_names
    norm = Normalisation.from_hr(hr, experts)
    blend = blend_patient(experts, grid, model.weights, window=window, norm=norm,
                          brain_mask=bmask)
    out = {"blend": volume_metrics(hr, blend, ssim_axis=axis), "experts": {}}
    for e, name in enumerate(names):
        w = np.zeros((grid.n_tiles, len(names)), np.float32)
        w[:, e] = 1.0
        pred = blend_patient(experts, grid, w, window=window, norm=norm, brain_mask=bmask)
        out["experts"][name] = volume_metrics(hr, pred, ssim_axis=axis)
    proxy = expert_mean(experts)
    free = Normalisation.from_experts(experts, proxy)
    fm = brain_mask(proxy) if free_mask is None else free_mask
    pred = blend_patient(experts, grid, model.weights, window=window, norm=free, brain_mask=fm)
    out["hr_free"] = volume_metrics(hr, pred, ssim_axis=axis)
    # each expert as a user gets it: its own values (non-finite -> 0) times that mask
    out["hr_free_experts"] = {
        name: volume_metrics(hr, np.where(np.isfinite(x) & np.asarray(fm, bool), x,
                                          np.float32(0)), ssim_axis=axis)
        for name, x in zip(names, experts, strict=True)}
    return blend, out


def _patient(rng, shape, n_exp):
    hr = ndimage.gaussian_filter(rng.random(shape), 1.5).astype(np.float32) * 400
    hr[hr < np.quantile(hr, 0.3)] = 0  # background, so brain masks and mask edges exist
    hr[:1] = 0  # an empty slice along axis 0
    hr[2, 3, 4] = np.nan  # outside every mask
    experts = []
    for e in range(n_exp):
        x = (hr * (0.8 + 0.1 * e) + rng.normal(0, 10 + 5 * e, shape)).astype(np.float32)
        experts.append(np.ascontiguousarray(x))
    experts[0][3, 4, 5] = np.inf  # read as 0 by every blend
    return hr, experts


def _model(rng, grid, n_exp):
    w = rng.random((grid.n_tiles, n_exp)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    learned = np.ones(grid.n_tiles, bool)
    learned[::5] = False
    w[~learned] = np.float32(1.0 / n_exp)
    return StackingModel(w, learned, grid, tuple(f"E{e}" for e in range(n_exp)), {})


def _close(got, want):
    for k in METRIC_KEYS:
        if k == "ssim":
            assert abs(got[k] - want[k]) <= ATOL_SSIM, (k, got[k], want[k])
        else:
            assert_allclose(got[k], want[k], rtol=RTOL, err_msg=k)


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
@pytest.mark.parametrize(
    ("shape", "patch", "stride", "window", "n_exp"),
    [((17, 23, 19), 8, 4, "hann", 4), ((12, 15, 21), 6, 6, "hann", 2),
     ((13, 9, 11), 5, 3, "flat", 1), ((16, 14, 10), 7, 4, "hann", 6)],
)
def test_one_pass_equals_separate_passes(rng, axis, shape, patch, stride, window, n_exp):
    hr, experts = _patient(rng, shape, n_exp)
    grid = TileGrid(shape, patch, stride)
    model = _model(rng, grid, n_exp)
    bmask = brain_mask(hr)
    want_blend, want = _separate(hr, experts, model, window, axis, bmask, None)
    got = score_patient(hr, experts, model, window=window, ssim_axis=axis, brain_mask=bmask,
                        experts_alone=True, hr_free=True)
    assert_array_equal(got.blend, want_blend)  # the same operations in the same order
    _close(got.metrics, want["blend"])
    assert list(got.extras["experts"]) == list(model.model_names)
    for name in model.model_names:
        _close(got.extras["experts"][name], want["experts"][name])
    _close(got.extras["hr_free"], want["hr_free"])
    assert list(got.extras["hr_free"]["experts"]) == list(model.model_names)
    for name in model.model_names:
        _close(got.extras["hr_free"]["experts"][name], want["hr_free_experts"][name])


def test_fixed_mask_and_no_extras(rng):
    """With registration one atlas mask serves every blend; without extras only the blend."""
    shape = (15, 12, 13)
    hr, experts = _patient(rng, shape, 3)
    grid = TileGrid(shape, 6, 3)
    model = _model(rng, grid, 3)
    atlas = np.zeros(shape, bool)
    atlas[2:-2, 2:-2, 2:-2] = True
    want_blend, want = _separate(hr, experts, model, "hann", "axial", atlas, atlas)
    got = scoring.test_extras(hr, experts, model, window="hann", ssim_axis="axial", mask=atlas)
    for name in model.model_names:
        _close(got["experts"][name], want["experts"][name])
    _close(got["hr_free"], want["hr_free"])
    for name in model.model_names:  # the raw experts under the atlas mask
        _close(got["hr_free"]["experts"][name], want["hr_free_experts"][name])
    plain = score_patient(hr, experts, model, window="hann", ssim_axis="axial",
                          brain_mask=atlas)
    assert plain.extras == {}
    assert_array_equal(plain.blend, want_blend)
    _close(plain.metrics, want["blend"])
    alone = expert_alone(hr, experts, model, window="hann", ssim_axis="axial", mask=atlas)
    assert alone == got["experts"]


def test_identical_expert_scores_like_the_hr(rng):
    """An expert equal to the HR, alone: psnr inf, ssim 1 (invariant of the metrics)."""
    shape = (12, 12, 12)
    hr, _ = _patient(rng, shape, 1)
    hr = np.nan_to_num(hr)
    grid = TileGrid(shape, 4, 4)
    model = _model(rng, grid, 1)
    got = score_patient(hr, [hr], model, window="flat", ssim_axis="coronal",
                        brain_mask=None, experts_alone=True)
    e = got.extras["experts"]["E0"]
    assert e["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert e["mse"] < 1e-6 and (math.isinf(e["psnr"]) or e["psnr"] > 100)


def test_expert_count_must_match_the_model(rng):
    shape = (10, 10, 10)
    hr, experts = _patient(rng, shape, 2)
    model = _model(rng, TileGrid(shape, 4, 2), 3)
    with pytest.raises(InputError, match=r"the model blends 3 experts .* got 2 volumes"):
        score_patient(hr, experts, model, window="hann", ssim_axis="axial", brain_mask=None)


def test_unknown_axis_is_an_error(rng):
    shape = (10, 10, 10)
    hr, experts = _patient(rng, shape, 2)
    model = _model(rng, TileGrid(shape, 4, 2), 2)
    with pytest.raises(ValueError, match="ssim_axis must be one of"):
        score_patient(hr, experts, model, window="hann", ssim_axis="oblique", brain_mask=None)
