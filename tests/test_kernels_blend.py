"""Blend, weight-map and brain-mask kernels against their slow twins (algorithm A7.2-A7.5, A8)."""

from __future__ import annotations

import io

import numba
import numpy as np
import pytest
from conftest import ATOL32, RTOL32
from numpy.testing import assert_allclose, assert_array_equal
from reference import blend as ref
from scipy import ndimage
from scipy.signal import windows

from pacs_numba._config import BLEND_EPS, WINDOWS
from pacs_numba.core.blending import blend_volume, brain_mask, weight_analysis, weight_maps
from pacs_numba.core.checks import as_volume, as_volume_list
from pacs_numba.core.tiling import TileGrid
from pacs_numba.kernels.blend import _blend_volume, _brain_mask, _window_table

# (shape, patch_size, stride, n_experts, window): odd shapes that the stride does not
# divide, stride == patch (flat forced), stride < patch, stride 1, M = 1..5 (M = 5 takes
# the kernel's general path), and a clipped last tile of length 1 (17 = 2*8 + 1).
CASES = [
    ((13, 11, 9), 4, 2, 3, "hann"),
    ((10, 7, 16), 5, 5, 2, "hann"),
    ((10, 7, 16), 6, 4, 5, "hann"),
    ((13, 11, 9), 4, 3, 1, "flat"),
    ((17, 9, 10), 16, 8, 4, "hann"),
    ((9, 12, 11), 3, 1, 2, "hann"),
    ((12, 8, 9), 4, 2, 4, "flat"),
]


def _problem(rng, shape, grid, n_exp, nan=True):
    experts = [rng.normal(100.0, 20.0, shape).astype(np.float32) for _ in range(n_exp)]
    if nan:
        experts[0][1, 2, 3] = np.nan
        experts[-1][-1, 0, -1] = np.inf
    w = rng.random((grid.n_tiles, n_exp)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    w[rng.random(grid.n_tiles) < 0.3] = np.float32(1.0) / np.float32(n_exp)  # untrained tiles
    mus = rng.normal(100.0, 5.0, n_exp)
    sds = rng.uniform(10.0, 30.0, n_exp)
    return experts, w, mus, sds


def _readonly(a):
    a = np.ascontiguousarray(a).view()
    a.flags.writeable = False
    return a


def _denominator(shape, grid, window):
    """Twin's den = sum of tile windows, float64 (to bound the effect of BLEND_EPS)."""
    kind = "flat" if grid.stride >= grid.patch_size else window
    den = np.zeros(shape)
    for _, box in ref.tile_boxes(shape, grid.patch_size, grid.stride):
        den[box] += ref.tile_window(den[box].shape, kind)
    return den


@pytest.mark.parametrize(("shape", "p", "s", "n_exp", "window"), CASES)
def test_blend_matches_twin(rng, shape, p, s, n_exp, window):
    grid = TileGrid(shape, p, s)
    experts, w, mus, sds = _problem(rng, shape, grid, n_exp)
    mask = (rng.random(shape) > 0.2).astype(np.uint8)
    for m in (mask, None):
        got = blend_volume(
            experts, grid, w, mus=mus, sds=sds, mu_hr=50.0, sd_hr=7.0, mask=m, window=window
        )
        want = ref.blend_volume(experts, shape, p, s, w, mus, sds, 50.0, 7.0, m, window)
        assert got.dtype == np.float32 and got.shape == shape
        assert np.all(np.isfinite(got)), "a NaN/inf expert value reached the blend"
        assert_allclose(got, want, rtol=RTOL32, atol=ATOL32 * np.abs(want).max())
        if m is not None:
            assert np.all(got[mask == 0] == 0)


def test_window_table_is_scipy_periodic_hann():
    for n_box in range(1, 130):
        table = _window_table(1, n_box, n_box, n_box, WINDOWS["hann"])
        assert_array_equal(table[0], windows.hann(n_box, sym=False).astype(np.float32))
    # clipped boxes: anchors 0, 8, 16 of a length-17 axis -> lengths 16, 9, 1
    table = _window_table(3, 17, 16, 8, WINDOWS["hann"])
    for t, n_box in enumerate((16, 9, 1)):
        assert_array_equal(table[t, :n_box], windows.hann(n_box, sym=False).astype(np.float32))
    assert np.all(_window_table(3, 17, 16, 8, WINDOWS["flat"])[0] == 1)


@pytest.mark.parametrize(("shape", "p", "s", "n_exp", "window"), CASES[:5])
def test_blend_invariants(rng, shape, p, s, n_exp, window):
    grid = TileGrid(shape, p, s)
    _, w, _, _ = _problem(rng, shape, grid, n_exp, nan=False)
    mu_hr, sd_hr = 80.0, 12.0
    mus, sds = np.full(n_exp, mu_hr), np.full(n_exp, sd_hr)
    den = _denominator(shape, grid, window)
    # blend_n = xn * den / (den + eps): BLEND_EPS bounds the relative error where den > 0;
    # where den == 0 (first voxel of each axis under the periodic Hann) blend = mu_hr.
    rel = BLEND_EPS / np.maximum(den, 1e-30) + 10 * RTOL32
    live = den > 0

    def check(got, want):
        assert np.all(np.abs(got - want)[live] <= (rel * np.abs(want - mu_hr) + 1e-4)[live])
        assert np.all(got[~live] == np.float32(mu_hr))

    const = [np.full(shape, 123.0, np.float32)] * n_exp
    check(
        blend_volume(
            const, grid, w, mus=mus, sds=sds, mu_hr=mu_hr, sd_hr=sd_hr, mask=None, window=window
        ),
        np.float32(123.0),
    )
    x = rng.normal(90.0, 30.0, shape).astype(np.float32)
    check(
        blend_volume(
            [x] * n_exp,
            grid,
            w,
            mus=mus,
            sds=sds,
            mu_hr=mu_hr,
            sd_hr=sd_hr,
            mask=None,
            window=window,
        ),
        x,
    )
    others = [rng.normal(0.0, 500.0, shape).astype(np.float32) for _ in range(n_exp)]
    for j in range(n_exp):
        one_hot = np.zeros_like(w)
        one_hot[:, j] = 1.0
        experts = list(others)
        experts[j] = x
        check(
            blend_volume(
                experts,
                grid,
                one_hot,
                mus=mus,
                sds=sds,
                mu_hr=mu_hr,
                sd_hr=sd_hr,
                mask=None,
                window=window,
            ),
            x,
        )


def test_blend_mask_and_flat_forcing(rng):
    shape, n_exp = (9, 10, 11), 3
    grid = TileGrid(shape, 4, 4)
    experts, w, mus, sds = _problem(rng, shape, grid, n_exp)
    kw = dict(mus=mus, sds=sds, mu_hr=3.0, sd_hr=2.0)
    unmasked = blend_volume(experts, grid, w, mask=None, window="flat", **kw)
    assert_array_equal(
        blend_volume(experts, grid, w, mask=np.ones(shape, bool), window="flat", **kw), unmasked
    )
    assert not np.any(
        blend_volume(experts, grid, w, mask=np.zeros(shape, np.uint8), window="flat", **kw)
    )
    labels = np.where(np.arange(np.prod(shape)).reshape(shape) % 3 == 0, 0, 255).astype(np.uint8)
    got = blend_volume(experts, grid, w, mask=labels, window="flat", **kw)
    assert_array_equal(got, unmasked * (labels != 0))  # nonzero = inside, not a scale
    # stride == patch: the reference forces the flat window whatever mixing_window says
    assert_array_equal(blend_volume(experts, grid, w, mask=None, window="hann", **kw), unmasked)


def test_blend_independent_of_threads_and_chunks(rng):
    shape, n_exp = (14, 13, 17), 4
    grid = TileGrid(shape, 6, 3)
    experts, w, mus, sds = _problem(rng, shape, grid, n_exp)
    vols = as_volume_list(experts)
    # read-only like the wrapper passes them, so the test reuses the wrapper's compilation
    mask, w, mus, sds = (_readonly(a) for a in (np.ones((1, 1, 1), np.uint8), w, mus, sds))
    outs = [
        _blend_volume(vols, w, mus, sds, 1.0, 2.0, mask, False, 6, 3, WINDOWS["hann"], c)
        for c in (1, 2, 5, 64, 10_000)
    ]
    for out in outs[1:]:
        assert_array_equal(out, outs[0])
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = blend_volume(
            experts, grid, w, mus=mus, sds=sds, mu_hr=1.0, sd_hr=2.0, mask=None, window="hann"
        )
    finally:
        numba.set_num_threads(before)
    assert_array_equal(one, outs[0])


def test_blend_rejects_bad_input(rng):
    shape = (6, 6, 6)
    grid = TileGrid(shape, 4, 2)
    experts, w, mus, sds = _problem(rng, shape, grid, 2)
    kw = dict(mus=mus, sds=sds, mu_hr=0.0, sd_hr=1.0, mask=None)
    with pytest.raises(ValueError, match="window must be one of"):
        blend_volume(experts, grid, w, window="gauss", **kw)
    with pytest.raises(ValueError, match="weights have 3 columns but 2 experts were given"):
        blend_volume(experts, grid, np.ones((27, 3)), window="flat", **kw)
    with pytest.raises(ValueError, match=r"weights have shape \(26, 2\); expected \(27, n_exp"):
        blend_volume(experts, grid, w[:-1], window="flat", **kw)
    with pytest.raises(ValueError,
                       match=r"expert 1 has shape \(6, 6, 5\); expected \(6, 6, 6\) like the tile"):
        blend_volume([experts[0], experts[1][:, :, :5]], grid, w, window="flat", **kw)
    with pytest.raises(ValueError, match="need at least one expert"):
        blend_volume([], grid, w, window="flat", **kw)
    with pytest.raises(ValueError, match=r"mask has shape \(6, 6\)"):
        blend_volume(experts, grid, w, window="flat", **{**kw, "mask": np.ones((6, 6))})
    with pytest.raises(ValueError, match="sds > 0"):
        blend_volume(experts, grid, w, window="flat", **{**kw, "sds": [1.0, 0.0]})
    with pytest.raises(ValueError, match="one value per expert"):
        blend_volume(experts, grid, w, window="flat", **{**kw, "mus": [1.0]})
    with pytest.raises(ValueError, match="sd_hr > 0"):
        blend_volume(experts, grid, w, window="flat", **{**kw, "sd_hr": np.nan})


# ----------------------------------------------------------------------------- weight maps


@pytest.mark.parametrize(
    ("shape", "p", "s", "n_exp"),
    [((13, 11, 9), 4, 2, 3), ((10, 7, 16), 5, 5, 1), ((9, 8, 10), 6, 4, 5)],
)
def test_weight_maps_and_analysis_match_twin(rng, shape, p, s, n_exp):
    grid = TileGrid(shape, p, s)
    w = rng.random((grid.n_tiles, n_exp)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    w[::3] = np.float32(1.0) / np.float32(n_exp)  # ties -> first expert
    if n_exp > 1:
        w[1::5] = 0.0
        w[1::5, -1] = 1.0  # one-hot: entropy 0
        w[2::7, :2] = 0.5  # tie between the first two
    maps = weight_maps(w, grid)
    want = ref.weight_maps(w, shape, p, s)
    assert maps.dtype == np.float32 and maps.shape == shape + (n_exp,)
    assert_array_equal(maps, want)
    names = [f"M{i}" for i in range(n_exp)]
    out = weight_analysis(maps, names)
    assert list(out) == ["weight_maps", "entropy_map", "dominant_map", "model_names", "statistics"]
    assert out["entropy_map"].dtype == np.float32 and out["entropy_map"].shape == shape
    assert out["dominant_map"].dtype == np.int32 and out["dominant_map"].shape == shape
    assert out["model_names"].dtype.kind == "U" and out["model_names"].tolist() == names
    assert out["statistics"].dtype == object and out["statistics"].shape == ()
    assert_allclose(out["entropy_map"], ref.entropy_map(want), rtol=RTOL32, atol=ATOL32)
    assert_array_equal(out["dominant_map"], ref.dominant_map(want))
    assert out["statistics"].item() == ref.weight_statistics(want, names)
    # the dict round-trips through np.savez_compressed like the reference's npz
    buf = io.BytesIO()
    np.savez_compressed(buf, patient_id="p1", **out)
    buf.seek(0)
    with np.load(buf, allow_pickle=True) as npz:
        assert npz["statistics"].item() == out["statistics"].item()
        assert_array_equal(npz["entropy_map"], out["entropy_map"])


def test_weight_analysis_edge_rows():
    maps = np.array(
        [[[[0.0, 0.0, 0.0], [np.nan, 1.0, 0.0], [0.2, np.nan, 0.9], [1e-4, 2e-4, 0.0]]]], np.float32
    )
    out = weight_analysis(maps, ["a", "b", "c"])
    assert_array_equal(out["dominant_map"], ref.dominant_map(maps))
    assert_allclose(out["entropy_map"], ref.entropy_map(maps), rtol=RTOL32, atol=ATOL32)
    with pytest.raises(ValueError, match=r"expected \(N0, N1, N2, 2\)"):
        weight_analysis(maps, ["a", "b"])
    with pytest.raises(ValueError, match=r"weights have shape \(3, 2\)"):
        weight_maps(np.ones((3, 2)), TileGrid((4, 4, 4), 2, 2))


# ------------------------------------------------------------------------------ brain mask


def _blobs(rng, shape, density):
    hr = np.where(rng.random(shape) < density, rng.uniform(0.1, 5.0, shape), 0.05)
    return hr.astype(np.float32)


@pytest.mark.parametrize("density", [0.03, 0.08, 0.15, 0.5])
def test_brain_mask_matches_scipy(rng, density):
    for shape in [(9, 10, 11), (16, 5, 20), (1, 7, 7), (30, 1, 1)]:
        hr = _blobs(rng, shape, density)
        assert_array_equal(brain_mask(hr), ref.brain_mask(hr))


def test_brain_mask_smooth_blobs_and_slabs(rng):
    hr = ndimage.gaussian_filter(rng.random((40, 33, 29)), 1.5).astype(np.float32)
    hr = (hr - hr.mean()) * 20 + 0.05  # a few large, winding components
    want = ref.brain_mask(hr)
    assert ndimage.label(hr >= 0.1, np.ones((3, 3, 3)))[1] > 2
    vol = as_volume(hr)
    for n_slabs in (1, 2, 3, 7, 40, 1000):
        parent = np.empty(vol.size, np.int32)
        assert_array_equal(_brain_mask(vol, 0.1, parent, n_slabs), want)
    parent = np.empty(vol.size, np.int64)
    assert_array_equal(_brain_mask(vol, 0.1, parent, 3), want)


def test_brain_mask_ties_and_connectivity():
    hr = np.zeros((6, 7, 8), np.float32)
    hr[4, 0:2, 0:2] = 1.0  # 4 voxels, first voxel late in z
    hr[0:2, 5:7, 6:8] = 1.0  # 8 voxels
    hr[0:2, 0:2, 2:4] = 1.0  # 8 voxels, first voxel first in raster order -> wins
    assert_array_equal(brain_mask(hr), ref.brain_mask(hr))
    assert brain_mask(hr)[0, 0, 2] == 1 and brain_mask(hr)[0, 5, 6] == 0
    # corner contact is 26-connected: a diagonal chain is one component
    diag = np.zeros((5, 5, 5), np.float32)
    for i in range(5):
        diag[i, i, 4 - i] = 1.0
    diag[0, 4, 0] = diag[0, 4, 1] = 1.0
    assert_array_equal(brain_mask(diag), ref.brain_mask(diag))
    assert brain_mask(diag).sum() == 5
    # a U whose arms only meet at the bottom: merged late in the scan
    u = np.zeros((3, 6, 5), np.float32)
    u[1, 0:5, 0] = u[1, 0:5, 4] = u[1, 4, :] = 1.0
    u[1, 0, 2] = 1.0
    assert_array_equal(brain_mask(u), ref.brain_mask(u))
    assert brain_mask(u).sum() == 13


def test_brain_mask_threshold_nan_and_empty():
    hr = np.zeros((4, 5, 6), np.float32)
    assert brain_mask(hr).dtype == np.uint8 and not brain_mask(hr).any()
    hr[1, 1, 1:4] = [np.float32(0.1), np.nan, np.float32(0.1)]  # >= 0.1 counts; NaN does not
    hr[2, 3, 5] = np.nextafter(np.float32(0.1), np.float32(0))
    assert_array_equal(brain_mask(hr), ref.brain_mask(hr))
    assert brain_mask(hr).sum() == 1
    assert brain_mask(np.ones((3, 4, 5))).all()
    with pytest.raises(ValueError, match="expected a 3-D volume"):
        brain_mask(np.ones((3, 4)))


def test_brain_mask_independent_of_threads(rng):
    hr = _blobs(rng, (23, 17, 19), 0.1)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = brain_mask(hr)
    finally:
        numba.set_num_threads(before)
    assert_array_equal(one, brain_mask(hr))


# ----------------------------------------------------------------------- realistic size


@pytest.mark.slow
def test_realistic_blend_brain_mask_and_maps():
    rng = np.random.default_rng(2024)
    shape, n_exp = (160, 192, 160), 4
    grid = TileGrid(shape, 32, 16)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    head = ((z - 80) / 70.0) ** 2 + ((y - 96) / 85.0) ** 2 + ((x - 80) / 70.0) ** 2 < 1
    hr = np.where(head, rng.uniform(200, 800, shape), 0).astype(np.float32)
    hr[rng.random(shape) < 1e-3] = 1.0  # specks outside the head
    experts = [(hr + rng.normal(0, 25, shape)).astype(np.float32) for _ in range(n_exp)]
    experts[1][5, 5, 5] = np.nan
    w = rng.random((grid.n_tiles, n_exp)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    mus = np.array([float(np.mean(e[hr > 0], dtype=np.float64)) for e in experts])
    sds = np.array([float(np.std(e[hr > 0], dtype=np.float64)) for e in experts])
    mu_hr, sd_hr = float(hr[hr > 0].mean()), float(hr[hr > 0].std())

    mask = brain_mask(hr)
    assert_array_equal(mask, ref.brain_mask(hr))
    got = blend_volume(
        experts, grid, w, mus=mus, sds=sds, mu_hr=mu_hr, sd_hr=sd_hr, mask=mask, window="hann"
    )
    # twin on random tiles: the literal overlap-add restricted to a tile's box needs every
    # tile overlapping that box, so run it on a block of whole tiles around each pick
    picks = [0, grid.n_tiles - 1, *rng.choice(grid.n_tiles, 8, replace=False)]
    for tile in picks:
        (a0, b0), (a1, b1), (a2, b2) = grid.box(int(tile))
        lo = [max(0, a - 32) for a in (a0, a1, a2)]
        hi = [min(n, b + 32) for n, b in zip(shape, (b0, b1, b2), strict=True)]
        want = _twin_on_block(experts, grid, w, mus, sds, mu_hr, sd_hr, mask, lo, hi)
        box = (slice(a0, b0), slice(a1, b1), slice(a2, b2))
        inner = tuple(slice(b.start - lo_d, b.stop - lo_d) for b, lo_d in zip(box, lo, strict=True))
        assert_allclose(got[box], want[inner], rtol=RTOL32, atol=ATOL32 * np.abs(want).max())
    # invariant: identical experts stack to that expert (inside the head, away from the
    # corner voxels where the Hann denominator is comparable to BLEND_EPS)
    same = blend_volume(
        [hr] * n_exp,
        grid,
        w,
        mus=[mu_hr] * n_exp,
        sds=[sd_hr] * n_exp,
        mu_hr=mu_hr,
        sd_hr=sd_hr,
        mask=mask,
        window="hann",
    )
    assert_allclose(same[mask == 1], hr[mask == 1], rtol=10 * RTOL32, atol=1e-3)
    maps = weight_maps(w, grid)
    sub = (slice(40, 60), slice(100, 130), slice(0, 160))
    lab = grid.labels()[sub]
    assert_array_equal(maps[sub], w[lab])


def _twin_on_block(experts, grid, w, mus, sds, mu_hr, sd_hr, mask, lo, hi):
    """Literal overlap-add (twin) of every tile, accumulated only inside [lo, hi)."""
    p, s = grid.patch_size, grid.stride
    shape = tuple(h - lo_d for lo_d, h in zip(lo, hi, strict=True))
    x = np.stack(
        [
            ref.zscore_expert(e[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], m, sd)
            for e, m, sd in zip(experts, mus, sds, strict=True)
        ]
    )
    acc = np.zeros(shape, np.float32)
    den = np.zeros(shape, np.float32)
    for rid, box in ref.tile_boxes(grid.shape, p, s):
        full = [(b.start, b.stop) for b in box]
        if any(b1 <= lo_d or b0 >= h for (b0, b1), lo_d, h in zip(full, lo, hi, strict=True)):
            continue
        win = ref.tile_window(tuple(b1 - b0 for b0, b1 in full), "hann")
        cut = tuple(
            slice(max(b0, lo_d), min(b1, h)) for (b0, b1), lo_d, h in zip(full, lo, hi, strict=True)
        )
        in_win = tuple(
            slice(c.start - b0, c.stop - b0) for c, (b0, _) in zip(cut, full, strict=True)
        )
        in_blk = tuple(
            slice(c.start - lo_d, c.stop - lo_d) for c, lo_d in zip(cut, lo, strict=True)
        )
        vals = np.tensordot(w[rid], x[(slice(None),) + in_blk], axes=(0, 0)).astype(np.float32)
        acc[in_blk] += win[in_win] * vals
        den[in_blk] += win[in_win]
    blend = ((acc / (den + 1e-8)) * sd_hr + mu_hr).astype(np.float32)
    return blend * mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32)


@pytest.mark.parametrize("shape, patch, stride", [((13, 11, 9), 4, 2), ((29, 34, 27), 8, 4),
                                                  ((10, 7, 16), 5, 5), ((1, 9, 3), 2, 1)])
def test_weight_statistics_from_tiles_equal_numpy_over_the_voxels(shape, patch, stride):
    """The tile-count shortcut picks NumPy's order statistics and agrees on mean/std."""
    from pacs_numba.core.blending import weight_analysis, weight_maps
    from pacs_numba.core.tiling import TileGrid

    grid = TileGrid(shape, patch, stride)
    rng = np.random.default_rng(sum(shape))
    w = rng.dirichlet(np.ones(3), grid.n_tiles).astype(np.float32)
    w[::3] = np.float32(1 / 3)  # ties between many tiles
    maps = weight_maps(w, grid)
    slow = weight_analysis(maps, ["a", "b", "c"])["statistics"].item()
    fast = weight_analysis(maps, ["a", "b", "c"], tiles=(w, grid))["statistics"].item()
    for m in slow:
        for k in ("min", "max", "median", "q25", "q75"):
            assert fast[m][k] == slow[m][k], (m, k)
        for k in ("mean", "std"):
            assert fast[m][k] == pytest.approx(slow[m][k], rel=1e-6, abs=1e-9), (m, k)
