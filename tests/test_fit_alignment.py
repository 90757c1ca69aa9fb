"""Fitting as predict blends: ``fit_region: centre`` and ``fit_normalisation: experts`` (A4).

The statistics against the slow twin ``reference.stats.box_moments`` on awkward shapes (odd
sizes, patches that are not a multiple of the stride, three boxes per voxel), the centre
regions as a partition, the multi-scale prior's parents, and the property the experts'
z-scores exist for: the fit minimises the squared error of the HR-free blend ``predict``
makes.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RTOL32
from numpy.testing import assert_allclose, assert_array_equal
from reference import stats as ref
from test_kernels_stats import make_patient

from pacs_numba.core.blending import Normalisation, blend_patient
from pacs_numba.core.cellstats import StatsKey, box_statistics, centre_windows, sum_stats
from pacs_numba.core.tiling import TileGrid
from pacs_numba.core.weightfit import fit_model, weight_model_conflict
from pacs_numba.errors import ConfigError
from pacs_numba.kernels.blend import _window_table

# As test_cellstats.PARTS_RTOL: float32 twin vs float64 kernel, 10x margin.
PARTS_RTOL = RTOL32


def _key(region, stride, patch, window="hann", norm="hr", edge=False, grad=False, power=1.0):
    return StatsKey.make(region=region, stride=stride, patch_size=patch, window=window,
                         edge_power=power, grad_operator="sobel", with_edge=edge,
                         with_grad=grad, normalisation=norm)


@pytest.mark.parametrize(
    ("shape", "m", "region", "patch", "stride", "norm", "edge", "grad"),
    [
        ((9, 7, 11), 3, "centre", 4, 2, "hr", True, True),
        ((10, 6, 13), 2, "centre", 5, 3, "experts", True, False),
        ((7, 9, 8), 1, "centre", 6, 2, "experts", False, True),  # three boxes per voxel
        ((9, 7, 11), 2, "first_block", 3, 3, "experts", True, True),
        ((6, 5, 7), 2, "window", 4, 2, "experts", False, False),
    ],
)
def test_statistics_match_twin(rng, shape, m, region, patch, stride, norm, edge, grad):
    hr, ex = make_patient(rng, shape, m)
    k = _key(region, stride, patch, norm=norm, edge=edge, grad=grad)
    got = box_statistics(hr, ex, k)
    want = ref.box_moments(hr, ex, patch_size=k.patch_size, stride=stride, window=k.window,
                           edge_power=1.0, grad_operator="sobel",
                           centre=region == "centre", normalisation=norm)
    assert_array_equal(got.counts, want["counts"])
    used = [0] + ([1] if edge else []) + ([2] if grad else []) + ([3] if edge and grad else [])
    scale = np.abs(want["parts"]).max(axis=2, keepdims=True)
    assert np.all(np.abs(got.parts - want["parts"])[:, used] <= PARTS_RTOL * scale[:, used])
    # the HR's own statistics are kept for the flat-HR check, whatever the z-scores
    if norm == "experts":
        assert got.mu_hr == pytest.approx(box_statistics(hr, ex, _key(
            region, stride, patch, edge=edge, grad=grad)).mu_hr)


@pytest.mark.parametrize(("n", "patch", "stride", "window"),
                         [(12, 8, 4, 1), (13, 5, 3, 1), (11, 6, 2, 1), (9, 4, 2, 0), (1, 2, 1, 1)])
def test_centre_windows_partition_each_axis(n, patch, stride, window):
    table = _window_table(-(-n // stride), n, patch, stride, window)
    w = centre_windows(table, n, stride)
    owner = np.full(n, -1)
    for t in range(w.shape[0]):
        for k in np.flatnonzero(w[t]):
            assert owner[t * stride + k] == -1  # one tile per voxel
            owner[t * stride + k] = t
    assert (owner >= 0).all() and np.all(np.diff(owner) >= 0)
    for v in range(n):  # the owner's window is the largest there
        t = owner[v]
        cover = [u for u in range(w.shape[0]) if 0 <= v - u * stride < min(patch, n - u * stride)]
        assert max(table[u, v - u * stride] for u in cover) == table[t, v - t * stride]
    if window == 0:  # flat: ties everywhere, the largest id: the label cell of A2
        assert_array_equal(owner, np.arange(n) // stride)
    if (patch, stride) == (8, 4):  # Hann, p = 2s: the box's central block
        assert_array_equal(owner[2:10], [0, 0, 0, 0, 1, 1, 1, 1])


def test_keys_default_to_todays_and_fold_centre_into_the_label_cell():
    # default normalisation: the key (and so every cache entry name) is unchanged
    assert "normalisation" not in _key("first_block", 4, 4).as_dict()
    assert _key("first_block", 4, 4, norm="experts").as_dict()["normalisation"] == "experts"
    # centre without overlap, or with flat windows, is the label cell
    assert _key("centre", 4, 4) == _key("first_block", 4, 4)
    assert _key("centre", 2, 4, window="flat") == _key("first_block", 2, 2)
    assert _key("centre", 2, 4).region == "centre"
    with pytest.raises(ConfigError, match="fit_normalisation 'atlas'"):
        _key("first_block", 4, 4, norm="atlas")


def test_centre_parents_are_sums_of_their_children(rng):
    hr, ex = make_patient(rng, (11, 9, 10), 2)
    st = box_statistics(hr, ex, _key("centre", 2, 4))
    par = st.parents()
    n = [-(-x // 2) for x in hr.shape]
    pn = [-(-x // 2) for x in n]
    assert par.parts.shape[0] == np.prod(pn) and par.key.stride == 4
    kids = st.parts.reshape(*n, *st.parts.shape[1:])
    for i, j, k in [(0, 0, 0), (2, 1, 2), (pn[0] - 1, pn[1] - 1, pn[2] - 1)]:
        want = kids[2 * i:2 * i + 2, 2 * j:2 * j + 2, 2 * k:2 * k + 2].sum(axis=(0, 1, 2))
        assert_allclose(par.parts[(i * pn[1] + j) * pn[2] + k], want, rtol=1e-12)
    assert par.counts.sum() == st.counts.sum()
    fb = box_statistics(hr, ex, _key("first_block", 2, 2))
    assert_array_equal(fb.parents().parts, fb.coarsen(4).parts)
    with pytest.raises(ConfigError, match="window statistics have no parent"):
        box_statistics(hr, ex, _key("window", 2, 4)).parents()


def test_multiscale_prior_fits_centre_statistics(rng):
    pats = [make_patient(rng, (12, 10, 9), 3) for _ in range(2)]
    st = sum_stats([box_statistics(h, e, _key("centre", 2, 4, norm="experts")) for h, e in pats])
    w, learned = fit_model(st, simplex=True, lambda_ridge=1e-4, prior="multiscale")
    assert w.shape == (st.counts.size, 3) and learned.any()
    assert_allclose(w.sum(axis=1), 1, atol=1e-6)
    assert (w >= 0).all()


class _C:
    def __init__(self, **kw):
        base = dict(prior="none", gating="none", fit_region="first_block", lambda_edge=0.0,
                    lambda_grad=0.0, stride=4, patch_size=8, mixing_window="hann")
        self.__dict__.update({**base, **kw})


def test_weight_model_conflicts_of_the_centre_region():
    assert weight_model_conflict(_C(prior="multiscale", fit_region="centre")) is None
    assert weight_model_conflict(_C(prior="multiscale", fit_region="window"))[0] == "prior"
    assert weight_model_conflict(_C(gating="edge", fit_region="centre"))[0] == "gating"
    assert weight_model_conflict(_C(gating="edge", fit_region="centre",
                                    mixing_window="flat")) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_experts_z_scores_minimise_the_error_predict_makes(seed):
    """With ``fit_normalisation: experts`` the fitted tile weights give predict's blend (HR-free
    z-scores, ``mean`` map-back) the smallest squared error over the HR mask of every weight
    vector on the simplex."""
    rng = np.random.default_rng(seed)
    shape = (8, 6, 7)
    hr, ex = make_patient(rng, shape, 3)
    grid = TileGrid(shape, 8, 8)  # one tile, no overlap: the fit sees what the blend uses
    st = box_statistics(hr, ex, _key("first_block", 8, 8, norm="experts"))
    w, _ = fit_model(st, simplex=True, lambda_ridge=0.0)
    norm = Normalisation.from_experts(ex)
    inside = hr > 0

    def sse(weights):
        b = blend_patient(ex, grid, np.asarray(weights, np.float32).reshape(1, 3),
                          window="flat", norm=norm, brain_mask=None)
        return float(((b[inside].astype(np.float64) - hr[inside]) ** 2).sum())

    best = sse(w)
    for other in [*np.eye(3), *rng.dirichlet(np.ones(3), 40)]:
        assert best <= sse(other) * (1 + 1e-5)


@pytest.mark.parametrize("keys, msg", [
    ({"fit_normalisation": "atlas"}, r"pacs_sr\.fit_normalisation"),
    ({"gating": "edge", "lambda_edge": 0.0, "lambda_grad": 0.0, "fit_region": "centre",
      "mixing_window": "hann"}, r"pacs_sr\.gating edge needs fit_region: first_block"),
    ({"prior": "multiscale", "fit_region": "window"},
     r"pacs_sr\.prior multiscale needs fit_region: first_block or centre"),
])
def test_config_checks_the_fit_keys(tmp_path, keys, msg):
    import yaml

    from pacs_numba.config import load_config
    from pacs_numba.store.cohort import make_cohort

    cfg = make_cohort(tmp_path / "c", patients=2, shape=(10, 10, 10), spacings=("3mm",),
                      pulses=("t1c",), kfolds=2, patch_size=4, stride=2)
    doc = yaml.safe_load(cfg.read_text())
    pacs = load_config(cfg).pacs_sr
    assert (pacs.fit_region, pacs.fit_normalisation) == ("first_block", "hr")  # today's fit
    doc["pacs_sr"].update(keys)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError, match=msg):
        load_config(cfg)


def test_train_and_predict_a_model_fitted_as_predict_blends(tmp_path):
    """The engine fits ``centre`` + ``experts`` with the prior from the same statistics as
    a direct computation, and predict applies the model."""
    import yaml

    from pacs_numba import cli
    from pacs_numba.config import load_config
    from pacs_numba.core.predict import predict_volume
    from pacs_numba.store.cohort import make_cohort
    from pacs_numba.store.manifest import build_manifest, load_manifest, select_task, write_manifest
    from pacs_numba.store.modelfile import load_model
    from pacs_numba.store.nifti import read_nifti

    cfg = make_cohort(tmp_path / "c", patients=3, shape=(14, 16, 13), spacings=("3mm",),
                      pulses=("t1c",), models=("A", "B", "C"), kfolds=3, patch_size=8,
                      stride=4, experts="complementary")
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=1, log_to_file=False, lambda_edge=0.0, lambda_grad=0.0,
                          laplacian_tau=0.0, mixing_window="hann", fit_region="centre",
                          fit_normalisation="experts", prior="multiscale")
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    out, cache = tmp_path / "out", tmp_path / "cache"
    assert cli.main(["train", "--config", str(cfg), "--fold", "1", "--out-root", str(out),
                     "--cache-dir", str(cache), "--no-progress"]) == 0
    mdir = out / "PaCS_SR" / "3mm" / "model_data" / "fold_1" / "t1c"
    model = load_model(mdir / "pacs_model.npz")
    train, test = select_task(load_manifest(config.data.out), 1, "3mm", "t1c", ["A", "B", "C"])
    key = StatsKey.make(region="centre", stride=4, patch_size=8, window="hann", edge_power=1.0,
                        grad_operator="sobel", with_edge=False, with_grad=False,
                        normalisation="experts")
    st = sum_stats([box_statistics(read_nifti(p["HR"])[0], [read_nifti(x)[0] for x in
                                                             p["experts"]], key)
                    for p in train.values()])
    w, _ = fit_model(st, simplex=True, lambda_ridge=config.pacs_sr.lambda_ridge,
                     prior="multiscale", prior_strength=config.pacs_sr.prior_strength)
    assert_allclose(model.weights, w, atol=1e-6)
    paths = next(iter(test.values()))
    target = tmp_path / "p.nii.gz"
    assert cli.main(["predict", "--model", str(mdir / "pacs_model.npz"), "--experts",
                     *paths["experts"], "--out", str(target), "--cache-dir", str(cache)]) == 0
    want = predict_volume([read_nifti(p)[0] for p in paths["experts"]], model)
    assert np.allclose(read_nifti(target)[0], want, atol=1e-4)
