"""Paper metrics (3-D MS-SSIM, MMD-MF) against their NumPy/SciPy twins and invariants."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ATOL32, RTOL32
from numpy.testing import assert_allclose
from reference import paper_metrics as ref
from scipy import ndimage

from pacs_numba.core.paper_metrics import (
    _features,
    mmd_mf,
    ms_ssim_3d,
    ms_ssim_geometry,
)
from pacs_numba.errors import InputError
from pacs_numba.kernels.paper import _ms_ssim_3d, _reflect_one

# MMD-MF features agree with SciPy's whole-volume filters bit for bit for the LoG and
# to one float32 ulp for the Sobel magnitude (FMA contraction under FASTMATH) and the
# local variance (SciPy's running box mean vs a direct mean).  MMD^2 is a difference
# of kernel means of order 1-10, so those ulps move it by up to ~1e-6 in absolute
# terms whatever its size: compare it with this absolute tolerance besides RTOL32.
MMD_ATOL = 1e-5
# One float32 ulp of the features, relative to each feature's largest magnitude.
FEATURE_RTOL = 2.5e-7

SHAPES = [
    # (reference shape, test shape): window 3 / 3 scales, cropped at the origin
    ((23, 31, 19), (25, 31, 20)),
    # window 3 / 4 scales, odd sizes at every pooling
    ((40, 37, 45), (40, 37, 45)),
    # window 5 / 4 scales
    ((70, 66, 71), (71, 66, 73)),
    # one short axis: window 3, 3 scales (13 // 4 = 3)
    ((13, 41, 35), (13, 41, 35)),
]


def _volume(rng, shape, scale=1000.0, background=0.4):
    """Smooth positive structure over a zero-or-negative background."""
    v = ndimage.gaussian_filter(rng.random(shape), 1.5) * scale
    return (v - np.quantile(v, background)).astype(np.float32)


def _pair(rng, shape_ref, shape_test):
    a = _volume(rng, shape_ref)
    b = _volume(rng, shape_test)
    pad = [(0, max(0, t - r)) for r, t in zip(shape_ref, shape_test, strict=True)]
    core = np.pad(a, pad)[: shape_test[0], : shape_test[1], : shape_test[2]]
    return a, (0.8 * core + 0.2 * b).astype(np.float32)


# ------------------------------------------------------------------------------ MS-SSIM


@pytest.mark.parametrize(
    "shape",
    [(197, 233, 189), (161, 300, 300), (160, 300, 300), (23, 31, 19), (40, 37, 45),
     (70, 66, 71), (97, 97, 97), (129, 140, 150), (13, 41, 35), (11, 50, 50), (5, 30, 30),
     (3, 3, 3), (1, 40, 40)],
)
def test_geometry_matches_twin(shape):
    assert ms_ssim_geometry(shape) == ref.geometry(shape)


def test_geometry_values():
    assert ms_ssim_geometry((197, 233, 189)) == (11, 5)  # full size: nothing shrinks
    assert ms_ssim_geometry((160, 300, 300)) == (9, 5)  # 160 <= 10 * 16: window shrinks
    assert ms_ssim_geometry((40, 37, 45)) == (3, 4)  # scales drop: 37 // 16 < 3
    assert ms_ssim_geometry((5, 30, 30)) == (3, 1)  # fewer than 2 scales


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0])))
def test_ms_ssim_matches_twin(rng, shapes):
    a, b = _pair(rng, *shapes)
    got = ms_ssim_3d(a, b)
    want = ref.ms_ssim_3d(a, b)
    assert 0.0 < want < 1.0
    assert_allclose(got, want, rtol=RTOL32, atol=ATOL32)


def test_ms_ssim_scale_means_match_twin(rng):
    """Every scale's mean SSIM and CS, not only their weighted product."""
    a, b = _pair(rng, (40, 37, 45), (40, 37, 45))
    ssims, css, _ = ref.ms_ssim_scales(a, b)
    m = a > 0
    t = a * m
    p = b * m
    win, n = ms_ssim_geometry(a.shape)
    r = float(t.max() - t.min())
    c1 = float(np.float32((0.01 * r) ** 2))
    c2 = float(np.float32((0.03 * r) ** 2))
    got_ssim, got_cs = _ms_ssim_3d(p, t, ref.gauss_window(win), c1, c2, n)
    assert_allclose(got_ssim, ssims, rtol=RTOL32, atol=ATOL32)
    assert_allclose(got_cs, css, rtol=RTOL32, atol=ATOL32)


def test_ms_ssim_explicit_mask_matches_twin(rng):
    a, b = _pair(rng, (40, 37, 45), (40, 37, 45))
    mask = rng.random(a.shape) < 0.7
    assert_allclose(ms_ssim_3d(a, b, mask), ref.ms_ssim_3d(a, b, mask), rtol=RTOL32,
                    atol=ATOL32)


def test_ms_ssim_identical_is_one(rng):
    a = _volume(rng, (40, 37, 45))
    assert ms_ssim_3d(a, a) == 1.0


def test_ms_ssim_nan_below_two_scales(rng):
    a, b = _pair(rng, (5, 30, 30), (5, 30, 30))
    assert np.isnan(ms_ssim_3d(a, b))
    assert np.isnan(ref.ms_ssim_3d(a, b))
    # cropping decides: a 40^3 reference against a 5-voxel-thin test
    assert np.isnan(ms_ssim_3d(_volume(rng, (40, 40, 40)), _volume(rng, (40, 5, 40))))


def test_ms_ssim_constant_reference_uses_unit_range(rng):
    """A constant positive reference has range 0 < 1e-8: R = 1 (C1 = 1e-4, C2 = 9e-4)."""
    shape = (23, 31, 19)
    a = np.full(shape, 0.5, np.float32)
    b = (0.5 + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    got = ms_ssim_3d(a, b)
    assert_allclose(got, ref.ms_ssim_3d(a, b), rtol=RTOL32, atol=ATOL32)
    # with R = 1 the small noise matters; with R = 1e-8 there would be no structure left
    assert 0.0 < got < 1.0
    # an all-background reference: everything is masked to 0 and the volumes agree
    assert ms_ssim_3d(np.zeros(shape, np.float32), b) == 1.0


def test_ms_ssim_nan_propagates(rng):
    a, b = _pair(rng, (23, 31, 19), (23, 31, 19))
    b[5, 5, 5] = np.nan
    assert np.isnan(ms_ssim_3d(a, b))


def test_ms_ssim_leaves_inputs_alone(rng):
    a, b = _pair(rng, (23, 31, 19), (23, 31, 19))
    a0, b0 = a.copy(), b.copy()
    ms_ssim_3d(a, b)
    assert np.array_equal(a, a0) and np.array_equal(b, b0)


@pytest.mark.parametrize("fn", [ms_ssim_3d, mmd_mf])
def test_inputs_checked(fn):
    v = np.ones((20, 20, 20), np.float32)
    with pytest.raises(InputError, match=r"\(20, 20\)"):
        fn(v, np.ones((20, 20), np.float32))
    with pytest.raises(InputError, match="empty axis"):
        fn(np.ones((0, 20, 20), np.float32), v)
    with pytest.raises(InputError, match="mask"):
        fn(v, v, np.ones((20, 20, 20, 1), bool))
    with pytest.raises(InputError, match="real"):
        fn(v.astype(complex), v)


# ------------------------------------------------------------------------------ MMD-MF


def test_reflect_index_matches_scipy():
    for n in (1, 2, 3, 5):
        x = np.arange(n, dtype=np.float64) + 1.0
        w = np.zeros(41)
        for off in range(-20, 21):
            w[:] = 0.0
            w[off + 20] = 1.0
            out = ndimage.correlate1d(x, w, mode="reflect")
            for i in range(n):
                assert out[i] == x[_reflect_one(i + off, n)]


@pytest.mark.parametrize("shape", [(23, 31, 19), (40, 37, 45), (7, 40, 9)])
def test_features_match_scipy(rng, shape):
    """Point features equal SciPy's whole-volume filters (short axes: repeated reflection)."""
    v = _volume(rng, shape)
    flat = np.flatnonzero(v > 0)
    flat = flat[rng.permutation(flat.size)[:3000]]  # unsorted, as the sampling gives
    got = _features(v, flat)
    want = ref.features(v)[flat]
    for f in range(5):
        scale = np.abs(want[:, f]).max()
        assert_allclose(got[:, f], want[:, f], rtol=0, atol=FEATURE_RTOL * scale,
                        err_msg=f"feature {f}")
    # the three LoG features are bit-identical
    assert np.array_equal(got[:, 1:4], want[:, 1:4])


@pytest.mark.parametrize("shapes", SHAPES[:3], ids=lambda s: "x".join(map(str, s[0])))
def test_mmd_matches_twin(rng, shapes):
    a, b = _pair(rng, *shapes)
    got = mmd_mf(a, b, n_samples=1500)
    want = ref.mmd_mf(a, b, n_samples=1500)
    assert want > 0
    assert_allclose(got, want, rtol=RTOL32, atol=MMD_ATOL)


def test_mmd_default_sampling_matches_twin():
    """More than 10,000 masked voxels: the published RandomState(42) draw (one seed: the
    twin's 10,000^2 kernel sums take seconds)."""
    a, b = _pair(np.random.default_rng(3), (40, 37, 45), (40, 37, 45))
    assert np.count_nonzero(a > 0) > 10_000
    assert_allclose(mmd_mf(a, b), ref.mmd_mf(a, b), rtol=RTOL32, atol=MMD_ATOL)


def test_mmd_all_voxels_when_few(rng):
    """At most n_samples masked voxels: all of them, in C order; an explicit mask."""
    a, b = _pair(rng, (23, 31, 19), (23, 31, 19))
    mask = np.zeros(a.shape, bool)
    mask[3:12, 4:20, 2:15] = True
    got = mmd_mf(a, b, mask)
    assert_allclose(got, ref.mmd_mf(a, b, mask), rtol=RTOL32, atol=MMD_ATOL)


def test_mmd_identical_is_zero_and_near_copies_small(rng):
    a = _volume(rng, (23, 31, 19))
    assert mmd_mf(a, a) == 0.0
    noisy = (a + 1e-3 * rng.standard_normal(a.shape)).astype(np.float32)
    n = 2000
    assert 0.0 <= mmd_mf(a, noisy, n_samples=n) < 1e-3 < mmd_mf(a, 3 * a + 100, n_samples=n)


def test_mmd_empty_mask_is_nan(rng):
    a, b = _pair(rng, (23, 31, 19), (23, 31, 19))
    assert np.isnan(mmd_mf(-np.abs(a), b))
    assert np.isnan(mmd_mf(a, b, np.zeros(a.shape, bool)))
    with pytest.raises(InputError, match="n_samples"):
        mmd_mf(a, b, n_samples=0)


# ------------------------------------------------------------------------------ full size


@pytest.mark.slow
def test_full_size_against_twin_and_invariants():
    rng = np.random.default_rng(7)
    shape = (160, 192, 160)
    a = _volume(rng, shape, background=0.55)
    b = (a + rng.normal(0, 15, shape)).astype(np.float32)
    assert ms_ssim_geometry(shape) == (9, 5)
    got = ms_ssim_3d(a, b)
    assert_allclose(got, ref.ms_ssim_3d(a, b), rtol=RTOL32, atol=ATOL32)
    assert 0.0 < got < 1.0
    assert ms_ssim_3d(a, a) == 1.0
    worse = (a + rng.normal(0, 60, shape)).astype(np.float32)
    assert ms_ssim_3d(a, worse) < got
    d = mmd_mf(a, b)
    assert mmd_mf(a, a) == 0.0
    assert 0.0 < d < mmd_mf(a, worse)
