"""Statistics kernels (algorithm A3-A4) against the slow twins in ``tests/reference/stats.py``.

All calls go through ``pacs_numba.core.statistics`` with the same dtypes and layouts,
so every kernel compiles once for the whole file.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from conftest import ATOL32, RTOL32, RTOL64
from numpy.testing import assert_allclose, assert_array_equal
from reference import stats as ref

from pacs_numba.core.cellstats import patient_statistics
from pacs_numba.core.statistics import (
    PatientStats,
    normalisation,
    valid_mask,
    volume_moments,
)
from pacs_numba.core.tiling import TileGrid
from pacs_numba.errors import ConfigError, InputError

# Tolerance for Q and B, relative to the size of each tile's normal equations.
# The twin z-scores into float32 (relative rounding 2**-24 ~ 6e-8 per value) and
# runs scipy's filters on those (a float32 stencil sum errs by up to ~1e-6 of the
# magnitude of its terms); the kernels z-score in float64 and run the stencils in
# float32 on x - mu, scaling by 1/sd in float64 -- same error class.  Every product
# w * u * v in a tile's sum therefore differs by at most ~1e-6 * w (u^2 + v^2) / 2,
# so |dQ_ab| <= ~1e-6 * max(Q_aa, Q_bb) and |dB_a| <= ~1e-6 * max(Q_aa, yy) with
# yy = sum w y^2 (+ gradient terms).  A plain rtol would fail on off-diagonal
# entries that nearly cancel; RTOL32 * max(max|Q_r|, yy_r) per tile is that bound
# with a 10x margin (observed: <= 4e-7), and still catches a wrong voxel, weight
# or stencil tap (those change a tile by >= 1e-3 of its size on these inputs).
STATS_RTOL = RTOL32


def make_patient(
    rng: np.random.Generator, shape: tuple[int, int, int], m: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """HR with ~25% background (<= 0) and experts on different scales and offsets."""
    hr = rng.random(shape, dtype=np.float32) * 100 + 5
    hr[rng.random(shape) < 0.2] = 0.0
    hr[rng.random(shape) < 0.05] = -3.0
    experts = []
    for e in range(m):
        noise = rng.standard_normal(shape).astype(np.float32)
        experts.append(((hr + 10 * noise) * (0.5 + e) + 20 * e).astype(np.float32))
    return hr, experts


def assert_stats_match(got: PatientStats, want: dict, tiles: np.ndarray | None = None) -> None:
    tiles = np.arange(len(want["counts"])) if tiles is None else np.asarray(tiles)
    assert np.isfinite(got.Q).all() and np.isfinite(got.B).all()
    assert_array_equal(got.counts[tiles], want["counts"][tiles])
    q_want = want["Q"][tiles]
    b_want = want["B"][tiles]
    scale = np.maximum(np.abs(q_want).max(axis=(1, 2)), want["yy"][tiles])
    tol = STATS_RTOL * scale + ATOL32
    err_q = np.abs(got.Q[tiles] - q_want).max(axis=(1, 2))
    err_b = np.abs(got.B[tiles] - b_want).max(axis=1)
    worst = int(np.argmax(err_q / tol))
    assert (err_q <= tol).all(), (
        f"Q of tile {tiles[worst]} off by {err_q[worst]:.3g} (tolerance {tol[worst]:.3g})"
    )
    worst = int(np.argmax(err_b / tol))
    assert (err_b <= tol).all(), (
        f"B of tile {tiles[worst]} off by {err_b[worst]:.3g} (tolerance {tol[worst]:.3g})"
    )
    assert_array_equal(got.Q, np.swapaxes(got.Q, 1, 2))


def assert_normalisation_match(got: PatientStats, want: dict) -> None:
    assert_allclose(got.mu_hr, want["mu_hr"], rtol=RTOL64)
    assert_allclose(got.sd_hr, want["sd_hr"], rtol=RTOL64)
    assert_allclose(got.mus, want["mus"], rtol=RTOL64)
    assert_allclose(got.sds, want["sds"], rtol=RTOL64)


def run_both(hr, experts, grid, **opts):
    got = patient_statistics(hr, experts, grid, **opts)
    want = ref.patient_statistics(hr, experts, grid.labels(), grid.n_tiles, **opts)
    return got, want


# shape, experts, patch, stride, lambda_edge, edge_power, lambda_grad, operator
CASES = [
    ((13, 11, 9), 3, 4, 4, 0.0, 1.0, 0.0, "sobel"),      # plain least squares
    ((13, 11, 9), 3, 6, 4, 0.25, 1.0, 0.2, "sobel"),     # overlap, edge + grad share HR sobel
    ((9, 14, 7), 1, 5, 3, 0.5, 2.0, 0.3, "prewitt"),     # one expert
    ((5, 6, 17), 5, 8, 8, 0.25, 1.5, 0.1, "scharr"),     # generic power, edge needs own sobel
    ((9, 14, 7), 2, 4, 2, 0.0, 1.0, 0.5, "scharr"),      # grad only
    ((5, 6, 17), 4, 3, 1, 0.3, 0.5, 0.0, "sobel"),       # stride 1, edge only
    ((13, 11, 9), 2, 32, 16, 0.2, 1.0, 0.2, "prewitt"),  # one tile bigger than the volume
    ((1, 7, 9), 2, 3, 2, 0.2, 1.0, 0.2, "sobel"),        # an axis of length 1
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_patient_statistics_matches_twin(case, rng):
    shape, m, patch, stride, le, ep, lg, op = case
    hr, experts = make_patient(rng, shape, m)
    grid = TileGrid(shape, patch, stride)
    got, want = run_both(hr, experts, grid, lambda_edge=le, edge_power=ep, lambda_grad=lg,
                         grad_operator=op)
    assert got.Q.shape == (grid.n_tiles, m, m) and got.B.shape == (grid.n_tiles, m)
    assert got.Q.dtype == np.float64 and got.counts.dtype == np.int64
    assert_stats_match(got, want)
    assert_normalisation_match(got, want)
    assert got.n_mask == int(want["mask"].sum())
    assert_array_equal(got.nonfinite, np.zeros(m + 1, np.int64))


def test_nonfinite_voxels_are_excluded_and_counted(rng):
    shape, m = (11, 9, 13), 3
    hr, experts = make_patient(rng, shape, m)
    flat = rng.choice(hr.size, size=12, replace=False)
    hr.flat[flat[:3]] = [np.nan, np.inf, -np.inf]
    experts[0].flat[flat[3:6]] = np.nan
    experts[2].flat[flat[6:12]] = [np.inf, np.nan, -np.inf, np.nan, np.nan, np.inf]
    grid = TileGrid(shape, 5, 4)
    for lg, op in [(0.0, "sobel"), (0.3, "sobel"), (0.3, "scharr")]:
        got, want = run_both(hr, experts, grid, lambda_edge=0.25, edge_power=1.0,
                             lambda_grad=lg, grad_operator=op)
        assert_array_equal(got.nonfinite, [3, 3, 0, 6])
        assert_array_equal(got.nonfinite, want["nonfinite"])
        assert_stats_match(got, want)
        assert_normalisation_match(got, want)
    mask, bad = valid_mask(hr, experts)
    assert_array_equal(mask.astype(bool), want["mask"])
    assert not mask.flat[flat].any()


def test_all_zero_hr_gives_empty_counts():
    shape = (7, 8, 9)
    hr = np.zeros(shape, np.float32)
    experts = [np.full(shape, 3.0, np.float32), np.arange(np.prod(shape), dtype=np.float32)
               .reshape(shape)]
    st = patient_statistics(hr, experts, TileGrid(shape, 4, 4), lambda_edge=0.25,
                            edge_power=1.0, lambda_grad=0.2)
    assert st.n_mask == 0 and not st.counts.any()
    assert not st.Q.any() and not st.B.any()
    # Empty mask: identity z-score instead of the reference's NaN.
    assert (st.mu_hr, st.sd_hr) == (0.0, 1.0)
    assert_array_equal(st.mus, [0.0, 0.0])
    assert_array_equal(st.sds, [1.0, 1.0])


def test_constant_experts_hit_the_sd_floor(rng):
    shape, m = (9, 10, 11), 3
    hr, experts = make_patient(rng, shape, m)
    experts[0] = np.full(shape, 7.5, np.float32)            # constant everywhere
    experts[2] = np.where(hr > 0, np.float32(2.0), np.float32(0.0))  # constant in the mask
    grid = TileGrid(shape, 4, 4)
    got, want = run_both(hr, experts, grid, lambda_edge=0.25, edge_power=1.0, lambda_grad=0.2)
    assert got.sds[0] == ref.SD_FLOOR and got.sds[2] == ref.SD_FLOOR
    assert_stats_match(got, want)
    assert_normalisation_match(got, want)
    assert not got.Q[:, 0, :].any()  # a constant expert is exactly 0 after z-scoring


def test_valid_mask_and_moments_match_twin(rng):
    shape = (6, 7, 5)
    hr, experts = make_patient(rng, shape, 2)
    experts[1][0, 0, :2] = np.nan
    mask, bad = valid_mask(hr, experts)
    want_mask, want_bad = ref.valid_mask(hr, experts)
    assert mask.dtype == np.uint8
    assert_array_equal(mask.astype(bool), want_mask)
    assert_array_equal(bad, want_bad)
    mom = volume_moments([hr, *experts], mask)
    assert mom.shape == (3, 2)
    for e, vol in enumerate([hr, *experts]):
        assert_allclose(mom[e], ref.moments(vol, want_mask), rtol=RTOL64)
    assert_allclose(volume_moments(hr, want_mask)[0], ref.moments(hr, want_mask), rtol=RTOL64)
    mu, sd, mus, sds = normalisation(hr, experts, mask)
    assert_allclose([mu, sd], mom[0], rtol=RTOL64)
    assert_allclose(mus, mom[1:, 0], rtol=RTOL64)
    assert_allclose(sds, mom[1:, 1], rtol=RTOL64)


def test_accepts_memmaps_and_other_dtypes(tmp_path, rng):
    shape = (8, 9, 10)
    hr, experts = make_patient(rng, shape, 2)
    path = tmp_path / "hr.npy"
    np.save(path, hr)
    grid = TileGrid(shape, 4, 4)
    opts = dict(lambda_edge=0.25, edge_power=1.0, lambda_grad=0.2)
    a = patient_statistics(np.load(path, mmap_mode="r"), [e.astype(np.float64) for e in experts],
                           grid, **opts)
    b = patient_statistics(hr, experts, grid, **opts)
    assert_array_equal(a.Q, b.Q)
    assert_array_equal(a.B, b.B)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_result_does_not_depend_on_thread_count(rng):
    shape = (21, 19, 23)
    hr, experts = make_patient(rng, shape, 3)
    grid = TileGrid(shape, 8, 5)
    opts = dict(lambda_edge=0.25, edge_power=1.5, lambda_grad=0.2)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = patient_statistics(hr, experts, grid, **opts)
        numba.set_num_threads(2)
        two = patient_statistics(hr, experts, grid, **opts)
    finally:
        numba.set_num_threads(before)
    # Each tile is reduced by one thread in a fixed order: bit-identical.
    for name in ("Q", "B", "counts", "mus", "sds"):
        assert_array_equal(getattr(one, name), getattr(two, name), err_msg=name)
    assert (one.mu_hr, one.sd_hr) == (two.mu_hr, two.sd_hr)


def test_errors_name_the_problem():
    shape = (4, 5, 6)
    hr = np.ones(shape, np.float32)
    grid = TileGrid(shape, 2, 2)
    opts = dict(lambda_edge=0.0, edge_power=1.0, lambda_grad=0.0)
    with pytest.raises(InputError, match=r"expert 1 has shape \(4, 5, 7\); expected \(4, 5, 6\)"):
        patient_statistics(hr, [hr, np.ones((4, 5, 7), np.float32)], grid, **opts)
    with pytest.raises(InputError, match=r"HR volume has shape \(5, 6\); expected a 3-D volume"):
        patient_statistics(hr[0], [hr[0]], grid, **opts)
    with pytest.raises(InputError, match="at least one expert"):
        patient_statistics(hr, [], grid, **opts)
    with pytest.raises(InputError, match=r"tile grid was built for shape \(4, 5, 7\)"):
        patient_statistics(hr, [hr], TileGrid((4, 5, 7), 2, 2), **opts)
    with pytest.raises(ConfigError, match="unknown grad_operator 'canny'"):
        patient_statistics(hr, [hr], grid, **opts | {"grad_operator": "canny"})
    with pytest.raises(ConfigError, match="lambda_grad must be a finite number >= 0"):
        patient_statistics(hr, [hr], grid, **opts | {"lambda_grad": -0.1})
    with pytest.raises(ValueError, match=r"mask has shape \(4, 5\)"):
        volume_moments(hr, np.ones((4, 5), bool))


@pytest.mark.slow
def test_realistic_size_subset_of_tiles():
    rng = np.random.default_rng(1234)
    shape, m = (160, 192, 160), 4
    # Ellipsoidal "head" so that some tiles are empty and many are cut by the mask.
    zz, yy, xx = np.ogrid[:shape[0], :shape[1], :shape[2]]
    inside = ((zz - 80) / 70.0) ** 2 + ((yy - 96) / 85.0) ** 2 + ((xx - 80) / 68.0) ** 2 < 1
    hr = np.where(inside, rng.random(shape, dtype=np.float32) * 50 + 20, np.float32(0))
    experts = [(hr + 5 * rng.standard_normal(shape, dtype=np.float32)) * (1 + 0.1 * e)
               for e in range(m)]
    grid = TileGrid(shape, 32, 16)
    opts = dict(lambda_edge=0.25, edge_power=1.0, lambda_grad=0.2, grad_operator="sobel")
    got = patient_statistics(hr, experts, grid, **opts)
    occupied = np.flatnonzero(got.counts)
    assert 0 < occupied.size < grid.n_tiles
    tiles = rng.choice(occupied, size=20, replace=False)
    want = ref.patient_statistics(hr, experts, grid.labels(), grid.n_tiles, tiles=tiles, **opts)
    assert_stats_match(got, want, tiles)
    assert_normalisation_match(got, want)
    assert got.n_mask == int(inside.sum())
    # Invariants over all tiles: PSD diagonal, counts partition the mask.
    assert (np.diagonal(got.Q, axis1=1, axis2=2) >= 0).all()
    assert got.counts.sum() == want["mask"].sum()
