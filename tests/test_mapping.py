"""The HR-free weighted map-back (algorithm B6, pacs_sr.hr_free_mapping) against its twin."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from reference import mapping as ref
from test_kernels_stats import make_patient

from pacs_numba.core.blending import Normalisation, blend_patient, brain_mask, expert_mean
from pacs_numba.core.gating import edge_gate
from pacs_numba.core.mapping import statistic_maps
from pacs_numba.core.metrics import volume_metrics
from pacs_numba.core.model import StackingModel
from pacs_numba.core.predict import model_mapping, predict_volume
from pacs_numba.core.scoring import score_patient
from pacs_numba.core.tiling import TileGrid
from pacs_numba.errors import InputError
from pacs_numba.kernels.mapping import _map_back_weighted

# (shape, patch, stride, experts, window): overlap with Hann (voxels no window reaches),
# overlap flat, no overlap with a clipped last tile.
CASES = [((13, 11, 9), 4, 2, 3, "hann"), ((12, 8, 9), 4, 2, 2, "flat"),
         ((10, 7, 16), 5, 5, 2, "hann")]


def _weights(rng, n_tiles, m, gated=False):
    halves = [rng.dirichlet(np.ones(m), size=n_tiles) for _ in range(2 if gated else 1)]
    return np.concatenate(halves, axis=1).astype(np.float32)


@pytest.mark.parametrize("use_mask", [False, True])
def test_kernel_matches_twin(rng, use_mask):
    shape = (7, 9, 5)
    bn = rng.standard_normal(shape).astype(np.float32)
    maps = np.stack([rng.uniform(1, 3, shape), rng.uniform(50, 90, shape),
                     rng.uniform(0.5, 1, shape)], axis=-1).astype(np.float32)
    maps[0, :, :, 2] = 0  # no window reaches: the fallback statistics
    mask = (rng.random(shape) < 0.7).astype(np.uint8)
    want = ref.map_back(bn, maps, mask if use_mask else None, 60.0, 2.0)
    got = _map_back_weighted(bn.copy(), maps, mask, use_mask, 60.0, 2.0)
    assert_allclose(got, want, rtol=1e-6, atol=1e-5)
    inside = mask[0] != 0 if use_mask else np.ones(shape[1:], bool)
    assert_allclose(got[0][inside], bn[0][inside] * 2.0 + 60.0, rtol=1e-6)  # the fallback


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize(("shape", "patch", "stride", "m", "window"), CASES)
def test_weighted_blend_matches_twin(rng, shape, patch, stride, m, window, gated):
    _, experts = make_patient(rng, shape, m)
    experts[0][1, 2, 3] = np.nan
    grid = TileGrid(shape, patch, stride)
    w = _weights(rng, grid.n_tiles, m, gated)
    norm = Normalisation.from_experts(experts, mapping="weighted")
    mask = brain_mask(expert_mean(experts))
    gate = edge_gate(experts) if gated else None
    got = blend_patient(experts, grid, w, window=window, norm=norm, brain_mask=mask, gate=gate)
    want = ref.weighted_blend(experts, w, shape, patch, stride, window, norm.mus, norm.sds,
                              mask, gate)
    scale = float(np.abs(want).max())
    assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(("shape", "patch", "stride", "m", "window"), CASES)
def test_one_hot_weights_give_back_the_raw_expert(rng, shape, patch, stride, m, window):
    _, experts = make_patient(rng, shape, m)
    grid = TileGrid(shape, patch, stride)
    norm = Normalisation.from_experts(experts, mapping="weighted")
    mean = Normalisation.from_experts(experts)
    reached = np.ones(shape, bool)  # the voxels some window reaches (Hann: not index 0)
    if window == "hann" and stride < patch:
        for d in range(3):
            reached[(slice(None),) * d + (0,)] = False
    for e in range(m):
        w = np.zeros((grid.n_tiles, m), np.float32)
        w[:, e] = 1
        got = blend_patient(experts, grid, w, window=window, norm=norm, brain_mask=None)
        assert_allclose(got[reached], experts[e][reached], rtol=1e-5,
                        atol=1e-5 * float(np.abs(experts[e]).max()))
        # where no window reaches, the blend is what the mean mapping gives (its mean)
        assert_allclose(got[~reached], mean.mu_out, rtol=1e-5)
        # the mean mapping does not give the raw expert back (the experts' scales differ)
        old = blend_patient(experts, grid, w, window=window, norm=mean, brain_mask=None)
        assert not np.allclose(old[reached], experts[e][reached], rtol=1e-3)


def test_statistic_maps_are_the_overlap_added_tile_statistics(rng):
    shape, grid = (9, 8, 7), TileGrid((9, 8, 7), 4, 2)
    w = _weights(rng, grid.n_tiles, 3)
    mus, sds = np.array([10.0, 20.0, 30.0]), np.array([1.0, 2.0, 4.0])
    got = statistic_maps(w, grid, "hann", mus, sds)
    W = ref.voxel_weights(w, shape, 4, 2, "hann")
    assert_allclose(got[..., 0], (W * sds).sum(-1), rtol=1e-5, atol=1e-6)
    assert_allclose(got[..., 1], (W * mus).sum(-1), rtol=1e-5, atol=1e-5)
    assert_allclose(got[..., 2], W.sum(-1), rtol=1e-5, atol=1e-6)


def test_predict_and_hr_free_scoring_follow_the_models_mapping(rng):
    shape = (12, 10, 9)
    hr, experts = make_patient(rng, shape, 2)
    experts = [np.abs(x) + 1 for x in experts]
    grid = TileGrid(shape, 4, 2)
    w = _weights(rng, grid.n_tiles, 2)
    names = ("A", "B")

    def model(mapping):
        settings = {"pacs_sr": {"mixing_window": "hann", "hr_free_mapping": mapping}}
        return StackingModel(w, np.ones(grid.n_tiles, bool), grid, names, settings,
                             window="hann")

    norm = Normalisation.from_experts(experts, mapping="weighted")
    mask = brain_mask(expert_mean(experts))
    want = blend_patient(experts, grid, w, window="hann", norm=norm, brain_mask=mask)
    assert model_mapping(model("weighted")) == "weighted"
    assert model_mapping(StackingModel(w, np.ones(grid.n_tiles, bool), grid, names)) == "mean"
    assert_array_equal(predict_volume(experts, model("weighted")), want)
    assert not np.array_equal(predict_volume(experts, model("mean")), want)
    # the HR-free score of evaluate is predict's blend (the per-prediction path)
    s = score_patient(hr, experts, model("weighted"), window="hann", ssim_axis="axial",
                      brain_mask=brain_mask(hr), hr_free=True)
    m = volume_metrics(hr, want, ssim_axis="axial")
    assert s.extras["hr_free"]["psnr"] == pytest.approx(float(m["psnr"]), rel=1e-6)
    with pytest.raises(InputError, match="hr_free_mapping: 'median'"):
        model_mapping(StackingModel(w, np.ones(grid.n_tiles, bool), grid, names,
                                    {"pacs_sr": {"hr_free_mapping": "median"}}))
    with pytest.raises(ValueError, match="hr_free_mapping must be one of"):
        Normalisation.from_experts(experts, mapping="median")
