"""The multi-scale prior and the edge-gated model (algorithm A5.1, A5.2) against slow twins."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from conftest import RTOL32
from numpy.testing import assert_allclose
from reference import gated as ref
from reference import qp as ref_qp
from test_kernels_stats import make_patient

from pacs_numba.core.blending import Normalisation, blend_patient
from pacs_numba.core.cellstats import StatsKey, box_statistics, combine, combine_gated, sum_stats
from pacs_numba.core.checks import as_volume_list
from pacs_numba.core.gating import edge_gate, solve_two_simplex_qp
from pacs_numba.core.solve import fit_weights
from pacs_numba.core.tiling import TileGrid
from pacs_numba.core.weightfit import fit_model, parent_index, prior_strength_scale
from pacs_numba.errors import ConfigError, InputError
from pacs_numba.kernels.gated import _gated_moments, _mean_sobel_magnitude
from pacs_numba.kernels.stats import _valid_mask, _volume_moments

SHAPES = [(7, 9, 5), (12, 5, 11), (3, 4, 13)]
# Exact solvers on both sides: only rounding separates them.
W_ATOL = 1e-7
# The prior twin is SLSQP at ftol 1e-15 on a scaled problem: a few 1e-6 on the weights.
PRIOR_ATOL = 2e-5


def _key(stride: int, gate: bool = True) -> StatsKey:
    return StatsKey.make(region="first_block", stride=stride, patch_size=stride, window="flat",
                         edge_power=1.0, grad_operator="sobel", with_edge=False,
                         with_grad=False, with_gate=gate)


@pytest.mark.parametrize("shape", SHAPES)
def test_sobel_magnitude_and_gate_match_scipy(rng, shape):
    _, experts = make_patient(rng, shape, 3)
    experts[1][0, 0, 0] = np.nan
    got = _mean_sobel_magnitude(as_volume_list(experts))
    assert_allclose(got, ref.mean_sobel_magnitude(experts), rtol=RTOL32, atol=1e-3)
    g = edge_gate(experts)
    want = ref.edge_gate(experts)
    assert g.dtype == np.float32 and 0 <= g.min() and g.max() <= 1
    assert_allclose(g, want, atol=1e-5)


def test_gate_of_a_constant_volume_is_zero():
    x = np.full((5, 6, 7), 3.0, np.float32)
    assert not edge_gate([x, x]).any()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("stride", [2, 3, 5])
def test_gated_moments_match_twin(rng, shape, stride):
    hr, experts = make_patient(rng, shape, 3)
    mask, _ = _valid_mask(hr, as_volume_list(experts))
    mom = _volume_moments(as_volume_list([hr, *experts]), mask)
    mus, sds = np.ascontiguousarray(mom[:, 0]), np.ascontiguousarray(mom[:, 1])
    gate = rng.random(shape, dtype=np.float32)
    got = _gated_moments(hr, as_volume_list(experts), mask, stride, mus, sds, gate)
    want = ref.gated_moments(hr, experts, mask, stride, mus, sds, gate)
    scale = np.abs(want).max(axis=(1, 2), keepdims=True) + 1e-12
    assert_allclose(got / scale, want / scale, atol=1e-12)


def test_gated_normal_equations_are_the_moments_of_g_x_and_one_minus_g_x(rng):
    """Q, B of the 2M-unknown fit equal the direct sums over voxels of (g x, (1 - g) x)."""
    shape = (9, 7, 8)
    hr, experts = make_patient(rng, shape, 2)
    st = box_statistics(hr, experts, _key(4))
    q, b = combine_gated(st)
    gate = edge_gate(experts).astype(np.float64)
    mask, _ = _valid_mask(hr, as_volume_list(experts))
    mom = _volume_moments(as_volume_list([hr, *experts]), mask)
    y = (hr - mom[0, 0]) / mom[0, 1]
    xs = np.stack([(x - mom[e + 1, 0]) / mom[e + 1, 1] for e, x in enumerate(experts)], -1)
    z = np.concatenate([gate[..., None] * xs, (1 - gate[..., None]) * xs], -1)
    labels = TileGrid(shape, 4, 4).labels()
    for t in range(st.counts.size):
        sel = (labels == t) & (mask > 0)
        assert_allclose(q[t], z[sel].T @ z[sel], rtol=1e-9, atol=1e-9)
        assert_allclose(b[t], z[sel].T @ y[sel], rtol=1e-9, atol=1e-9)


def test_gated_parts_coarsen_and_sum_like_the_others(rng):
    pats = [make_patient(rng, (10, 9, 11), 2) for _ in range(2)]
    fine = sum_stats([box_statistics(h, e, _key(2)) for h, e in pats])
    direct = sum_stats([box_statistics(h, e, _key(4)) for h, e in pats])
    assert_allclose(fine.coarsen(4).parts, direct.parts, rtol=1e-12, atol=1e-9)
    assert fine.parts.shape[1] == 6 and _key(2, gate=False).n_parts == 4
    assert "with_gate" not in _key(2, gate=False).as_dict()  # old cache keys unchanged


def _tiny_problems(rng, m, n_tiles=6):
    X = rng.standard_normal((n_tiles, 4 * m + 3, 2 * m))
    y = X @ np.abs(rng.standard_normal(2 * m)) * 0.3 + rng.standard_normal((n_tiles, 4 * m + 3))
    Q = np.einsum("tri,trj->tij", X, X)
    B = np.einsum("tri,tr->ti", X, y)
    return Q, B


@pytest.mark.parametrize("m", [1, 2, 3])
@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_two_simplex_qp_matches_twin_and_kkt(rng, m, lam):
    Q, B = _tiny_problems(rng, m)
    if m > 1:
        Q[0, :, 1] = Q[0, :, 0]  # a singular tile: collinear columns
        Q[0, 1, :] = Q[0, 0, :]
        B[0, 1] = B[0, 0]
    got = solve_two_simplex_qp(Q, B, lam, np.ones(len(B), bool))
    for t in range(len(B)):
        z = got[t]
        assert (z >= 0).all() and np.isclose(z[:m].sum(), 1) and np.isclose(z[m:].sum(), 1)
        want = ref.two_simplex_qp(Q[t], B[t], lam)
        f_got = ref.two_simplex_objective(Q[t], B[t], lam, z)
        f_want = ref.two_simplex_objective(Q[t], B[t], lam, want)
        assert f_got <= f_want + 1e-10 * abs(f_want) + 1e-12
        if lam > 0:  # strictly convex: unique minimiser
            assert_allclose(z, want, atol=W_ATOL)


def test_two_simplex_qp_inactive_tiles_get_uniform_and_threads_do_not_matter(rng):
    Q, B = _tiny_problems(rng, 3, n_tiles=9)
    active = np.arange(9) % 3 != 0
    one = None
    for n in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(n)
        try:
            w = solve_two_simplex_qp(Q, B, 0.1, active)
        finally:
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        assert_allclose(w[~active], 1 / 3)
        if one is None:
            one = w
        assert np.array_equal(w, one)


def test_two_simplex_qp_refuses_too_many_experts():
    with pytest.raises(ConfigError, match="at most 6 experts"):
        solve_two_simplex_qp(np.zeros((1, 14, 14)), np.zeros((1, 14)), 0.0, [True])


def test_parent_index_follows_coarsen(rng):
    for counts in [(3, 1, 2), (5, 4, 3), (1, 1, 1)]:
        idx = parent_index(counts)
        i0, i1, i2 = np.unravel_index(np.arange(np.prod(counts)), counts)
        pc = tuple(-(-n // 2) for n in counts)
        assert np.array_equal(idx, np.ravel_multi_index((i0 // 2, i1 // 2, i2 // 2), pc))


def test_multiscale_prior_is_the_shrunk_qp_parents_first(rng):
    """Every level's weights minimise f + mu ||w - w_parent||^2, the parent solved first."""
    hr, experts = make_patient(rng, (13, 11, 9), 3)
    st = box_statistics(hr, experts, _key(2, gate=False))
    strength = 0.7
    w, learned = fit_model(st, simplex=True, lambda_ridge=0.01, prior="multiscale",
                           prior_strength=strength)
    # Rebuild the chain with the twin: strides 2, 4, 8, 16 (16 is one tile).
    levels = [st.coarsen(s) for s in (2, 4, 8, 16)]
    parent = None
    for lv in reversed(levels):
        q, b = combine(lv, lambda_edge=0, lambda_grad=0)
        active = lv.counts > 0
        counts = tuple(-(-n // lv.key.stride) for n in lv.shape)
        mu = strength * prior_strength_scale(q, active) if parent is not None else 0.0
        wp = parent[parent_index(counts)] if parent is not None else np.zeros_like(b)
        cur = np.full(b.shape, 1 / 3)
        for t in np.flatnonzero(active):
            cur[t] = ref.simplex_qp_with_prior(q[t], b[t], 0.01, mu, wp[t]) if mu else \
                ref_qp.simplex_qp(q[t], b[t], 0.01)
        parent = cur
    assert_allclose(w[learned], parent[learned], atol=PRIOR_ATOL)
    assert np.allclose(w.sum(1), 1, atol=1e-6) and (w >= 0).all()


def test_weight_models_default_is_the_published_fit(rng):
    hr, experts = make_patient(rng, (11, 10, 9), 3)
    st = box_statistics(hr, experts, _key(3, gate=False))
    q, b = combine(st, lambda_edge=0, lambda_grad=0)
    counts = tuple(-(-n // 3) for n in st.shape)
    want, _ = fit_weights(q, b, st.counts, counts, simplex=True, lambda_ridge=0.1,
                          laplacian_tau=0.3)
    got, _ = fit_model(st, simplex=True, lambda_ridge=0.1, laplacian_tau=0.3)
    assert np.array_equal(got, want)


def test_gated_fit_with_equal_halves_is_never_worse_and_blend_is_convex(rng):
    hr, experts = make_patient(rng, (12, 10, 9), 3)
    st = box_statistics(hr, experts, _key(3))
    wg, _ = fit_model(st, simplex=True, lambda_ridge=0.0, gating="edge")
    wp, _ = fit_model(st, simplex=True, lambda_ridge=0.0)
    qg, bg = combine_gated(st)
    for t in range(len(wg)):
        z_plain = np.concatenate([wp[t], wp[t]]).astype(np.float64)
        f = ref.two_simplex_objective(qg[t], bg[t], 0.0, wg[t].astype(np.float64))
        f_plain = ref.two_simplex_objective(qg[t], bg[t], 0.0, z_plain)
        assert f <= f_plain + 1e-6 * abs(f_plain)
    # The blend: per voxel g * blend(a) + (1 - g) * blend(b), inside the experts' range.
    grid = TileGrid(hr.shape, 3, 3)
    norm = Normalisation.from_hr(hr, experts)
    gate = edge_gate(experts)
    got = blend_patient(experts, grid, wg, window="flat", norm=norm, brain_mask=None, gate=gate)
    m = len(experts)
    a = blend_patient(experts, grid, wg[:, :m], window="flat", norm=norm, brain_mask=None)
    b = blend_patient(experts, grid, wg[:, m:], window="flat", norm=norm, brain_mask=None)
    assert_allclose(got, gate * a + (1 - gate) * b, rtol=1e-5, atol=1e-3)
    zs = np.stack([(x - mu) / sd for x, mu, sd in zip(experts, norm.mus, norm.sds, strict=True)])
    gn = (got - norm.mu_out) / norm.sd_out
    assert (gn >= zs.min(0) - 1e-3).all() and (gn <= zs.max(0) + 1e-3).all()


def test_gated_blend_computes_its_gate_from_the_experts(rng):
    hr, experts = make_patient(rng, (6, 7, 5), 2)
    grid = TileGrid(hr.shape, 3, 3)
    w = rng.dirichlet(np.ones(2), size=(grid.n_tiles, 2)).reshape(grid.n_tiles, 4)
    w = w.astype(np.float32)
    norm = Normalisation.from_hr(hr, experts)
    got = blend_patient(experts, grid, w, window="flat", norm=norm, brain_mask=None)
    want = blend_patient(experts, grid, w, window="flat", norm=norm, brain_mask=None,
                         gate=edge_gate(experts))
    assert np.array_equal(got, want)
    with pytest.raises(InputError, match="need an edge gate of the experts' shape"):
        blend_patient(experts, grid, w, window="flat", norm=norm, brain_mask=None,
                      gate=np.zeros((2, 2, 2), np.float32))


def test_weight_model_errors_name_the_setting(rng):
    hr, experts = make_patient(rng, (6, 6, 6), 2)
    st = box_statistics(hr, experts, _key(3, gate=False))
    with pytest.raises(ConfigError, match="gating: edge needs statistics with the gated parts"):
        fit_model(st, simplex=True, lambda_ridge=0.0, gating="edge")
    with pytest.raises(ConfigError, match="prior 'tree'"):
        fit_model(st, simplex=True, lambda_ridge=0.0, prior="tree")
    with pytest.raises(ConfigError, match="prior_strength must be a finite number > 0"):
        fit_model(st, simplex=True, lambda_ridge=0.0, prior="multiscale", prior_strength=0.0)
    with pytest.raises(ConfigError, match="gating: edge needs lambda_edge: 0"):
        fit_model(st, simplex=True, lambda_ridge=0.0, gating="edge", lambda_edge=0.1)


def test_train_predict_and_maps_of_a_gated_multiscale_model(tmp_path, capsys):
    """The engine fits, saves, evaluates, maps and predicts with the new weight models."""
    import json

    import nibabel as nib
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
                          gating="edge", prior="multiscale", prior_strength=0.5,
                          save_weight_maps=True)  # the NIfTI maps are off by default
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    assert cli.main(["train", "--config", str(cfg), "--fold", "1", "--out-root", str(out),
                     "--cache-dir", str(cache), "--no-progress"]) == 0
    mdir = out / "PaCS_SR" / "3mm" / "model_data" / "fold_1" / "t1c"
    model = load_model(mdir / "pacs_model.npz")
    assert model.gating == "edge" and model.weights.shape[1] == 6
    learned = model.weights[model.learned]
    assert np.allclose(learned[:, :3].sum(1), 1, atol=1e-6)
    assert np.allclose(learned[:, 3:].sum(1), 1, atol=1e-6)
    metrics = json.loads((mdir / "metrics.json").read_text())
    assert np.isfinite(metrics["test"]["psnr"]) and "test_hr_free" in metrics
    maps = nib.load(next(mdir.glob("weight_maps_model*weights*")))
    assert maps.shape[-1] == 6
    legend = json.loads((mdir / "weight_maps_model_dominant.json").read_text())
    assert "A (edge)" in json.dumps(legend) and "C (flat)" in json.dumps(legend)
    with np.load(next(mdir.glob("*_weights_test.npz"))) as z:
        assert z["weight_maps"].shape[-1] == 6
    # predict: the CLI writes what predict_volume computes, gate from the experts alone
    _, test = select_task(load_manifest(config.data.out), 1, "3mm", "t1c", ["A", "B", "C"])
    pid, paths = next(iter(test.items()))
    target = tmp_path / "p.nii.gz"
    assert cli.main(["predict", "--model", str(mdir / "pacs_model.npz"), "--experts",
                     *paths["experts"], "--out", str(target), "--cache-dir", str(cache)]) == 0
    vols = [read_nifti(p)[0] for p in paths["experts"]]
    want = predict_volume(vols, model)
    assert np.allclose(read_nifti(target)[0], want, atol=1e-4)
    capsys.readouterr()
    assert cli.main(["inspect", str(mdir / "pacs_model.npz")]) == 0
    text = capsys.readouterr().out
    assert "dominant share edge" in text and "gating=edge" in text


@pytest.mark.parametrize("keys, msg", [
    ({"prior": "multiscale", "fit_region": "window"},
     r"pacs_sr\.prior multiscale needs fit_region: first_block"),
    ({"gating": "edge", "lambda_edge": 0.5},
     r"pacs_sr\.gating edge needs lambda_edge: 0 and lambda_grad: 0"),
    ({"gating": "sharp"}, r"pacs_sr\.gating"),
    ({"prior_strength": 0}, r"pacs_sr\.prior_strength"),
])
def test_config_refuses_weight_models_its_other_keys_exclude(tmp_path, keys, msg):
    import yaml

    from pacs_numba.config import load_config
    from pacs_numba.store.cohort import make_cohort

    cfg = make_cohort(tmp_path / "c", patients=2, shape=(10, 10, 10), spacings=("3mm",),
                      pulses=("t1c",), kfolds=2, patch_size=4, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    assert load_config(cfg).pacs_sr.prior == "none"  # the default keeps today's model
    doc["pacs_sr"].update(keys)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError, match=msg):
        load_config(cfg)
