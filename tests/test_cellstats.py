"""Decomposed, cached per-tile statistics (``cellstats``, ``kernels.stats._box_moments``).

Against the slow twin ``reference.stats.box_moments`` on awkward shapes, and against the direct
fit (``statistics.patient_statistics`` -> ``solve.fit_weights``) for random lambdas, strides
and every fold.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from conftest import RTOL32
from numpy.testing import assert_allclose, assert_array_equal
from reference import stats as ref
from test_kernels_stats import make_patient

from pacs_numba.core.cellstats import (
    StatsKey,
    box_statistics,
    combine,
    patient_statistics,
    sum_stats,
)
from pacs_numba.core.solve import fit_weights, objective
from pacs_numba.core.tiling import TileGrid
from pacs_numba.errors import ConfigError
from pacs_numba.store.statscache import StatsCache

# Same bound as test_kernels_stats.STATS_RTOL: the twin z-scores and filters in float32,
# the kernel in float64 with float32 stencils, so each product differs by ~1e-7 of the
# size of its tile's sums; RTOL32 of the largest term of the tile's part is a 10x margin.
PARTS_RTOL = RTOL32
# Decomposed vs direct statistics come from the same stencils and differ only in how the
# edge weight distributes over the sum (float64 rounding, ~1e-16 relative): 1e-12 of the
# tile's largest entry leaves room for sums over many voxels.
COMBINE_RTOL = 1e-12
# Weights from the two: an exact QP of near-identical Q, B; float32 output.
WEIGHTS_ATOL = 1e-5


def key(region="first_block", stride=2, patch=2, window="flat", power=1.0, op="sobel",
        edge=True, grad=True) -> StatsKey:
    return StatsKey.make(region=region, stride=stride, patch_size=patch, window=window,
                         edge_power=power, grad_operator=op, with_edge=edge, with_grad=grad)


@pytest.mark.parametrize(
    ("shape", "m", "region", "patch", "stride", "window", "op", "power"),
    [
        ((9, 7, 11), 3, "first_block", 3, 3, "flat", "sobel", 1.0),
        ((9, 7, 11), 2, "window", 4, 2, "hann", "prewitt", 0.7),
        ((6, 10, 5), 1, "window", 5, 3, "hann", "scharr", 2.0),
        ((5, 4, 7), 2, "window", 4, 4, "hann", "sobel", 0.5),
        ((5, 4, 7), 2, "window", 3, 1, "flat", "sobel", 1.3),
    ],
)
def test_box_moments_match_twin(rng, shape, m, region, patch, stride, window, op, power):
    hr, ex = make_patient(rng, shape, m)
    k = key(region, stride, patch, window, power, op)
    got = box_statistics(hr, ex, k)
    want = ref.box_moments(hr, ex, patch_size=k.patch_size, stride=stride, window=k.window,
                           edge_power=power, grad_operator=op)
    assert_array_equal(got.counts, want["counts"])
    scale = np.abs(want["parts"]).max(axis=2, keepdims=True)
    assert np.all(np.abs(got.parts - want["parts"]) <= PARTS_RTOL * scale)


def test_parts_not_asked_for_stay_zero_and_lambdas_are_refused(rng):
    hr, ex = make_patient(rng, (6, 5, 7), 2)
    st = box_statistics(hr, ex, key(edge=False, grad=False))
    assert np.all(st.parts[:, 1:] == 0) and np.any(st.parts[:, 0] != 0)
    with pytest.raises(ConfigError, match="lambda_edge=0.5 but these statistics have no edge"):
        combine(st, lambda_edge=0.5, lambda_grad=0.0)
    with pytest.raises(ConfigError, match="lambda_grad must be a finite number >= 0"):
        combine(st, lambda_edge=0.0, lambda_grad=-1.0)


def test_nan_voxels_are_left_out(rng):
    hr, ex = make_patient(rng, (6, 5, 7), 2)
    ex[1][2, 3, 4] = np.nan
    hr[0, 0, 0] = np.inf
    st = box_statistics(hr, ex, key(region="window", stride=2, patch=4, window="hann"))
    assert np.isfinite(st.parts).all()


def _direct(hr, ex, stride, le, lg, power, op):
    return patient_statistics(hr, ex, TileGrid(hr.shape, stride, stride), lambda_edge=le,
                              edge_power=power, lambda_grad=lg, grad_operator=op)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_combined_statistics_equal_direct_fit_for_every_fold(seed):
    """Random settings; stats at a fine cell, coarsened, summed per fold, solved."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(5, 12, size=3))
    m = int(rng.integers(1, 4))
    cell = int(rng.integers(1, 3))
    stride = cell * int(rng.integers(1, 4))
    power = float(rng.choice([0.5, 1.0, 1.7]))
    op = str(rng.choice(["sobel", "prewitt", "scharr"]))
    le = float(rng.choice([0.0, rng.uniform(0.1, 3)]))
    lg = float(rng.choice([0.0, rng.uniform(0.1, 2)]))
    ridge = float(rng.choice([0.0, 1e-3, 1.0]))
    patients = [make_patient(rng, shape, m) for _ in range(4)]
    k = key(stride=cell, patch=cell, power=power, op=op)
    cells = [box_statistics(hr, ex, k) for hr, ex in patients]
    direct = [_direct(hr, ex, stride, le, lg, power, op) for hr, ex in patients]
    grid = TileGrid(shape, stride, stride)
    for test in range(len(patients)):  # leave-one-out folds
        train = [i for i in range(len(patients)) if i != test]
        st = sum_stats([cells[i] for i in train]).coarsen(stride)
        Q, B = combine(st, lambda_edge=le, lambda_grad=lg)
        Qd = sum(direct[i].Q for i in train)
        Bd = sum(direct[i].B for i in train)
        nd = sum(direct[i].counts for i in train)
        assert_array_equal(st.counts, nd)
        scale = np.abs(Qd).max(axis=(1, 2))[:, None]
        assert np.all(np.abs(B - Bd) <= COMBINE_RTOL * scale + 1e-300)
        assert np.all(np.abs(Q - Qd) <= COMBINE_RTOL * scale[:, :, None] + 1e-300)
        for simplex in (True, False):
            w, learned = fit_weights(Q, B, st.counts, grid.counts, simplex=simplex,
                                     lambda_ridge=ridge, laplacian_tau=0.0)
            wd, learned_d = fit_weights(Qd, Bd, nd, grid.counts, simplex=simplex,
                                        lambda_ridge=ridge, laplacian_tau=0.0)
            assert_array_equal(learned, learned_d)
            # Singular Q (tiny tiles, no ridge) has many minimisers: compare objectives, which
            # are unique, relative to the tile's size; weights where the minimiser is unique.
            f = objective(Qd, Bd, ridge, w)
            fd = objective(Qd, Bd, ridge, wd)
            assert np.all(np.abs(f - fd) <= 1e-6 * (1.0 + scale[:, 0]))
            if simplex and ridge > 0:
                assert_allclose(w, wd, atol=WEIGHTS_ATOL)


def test_coarsen_rejects_a_stride_that_is_not_a_multiple(rng):
    hr, ex = make_patient(rng, (6, 5, 7), 1)
    st = box_statistics(hr, ex, key(stride=2, patch=2, edge=False, grad=False))
    with pytest.raises(ConfigError, match="stride 3 cannot be built from first_block"):
        st.coarsen(3)


def _files(tmp_path, rng, shape=(6, 5, 7), m=2):
    hr, ex = make_patient(rng, shape, m)
    files = []
    for i, v in enumerate([hr, *ex]):
        f = tmp_path / f"v{i}.npy"
        np.save(f, v)
        files.append(f)
    return files, (hr, ex)


def test_cache_computes_once_then_reads_no_volume(tmp_path, rng):
    files, vols = _files(tmp_path, rng)
    cache = StatsCache(tmp_path / "cellstats")
    calls = []

    def load():
        calls.append(1)
        return vols

    def fail():
        raise AssertionError("a volume was read although the statistics are cached")

    a = cache.get(files, key(stride=2, patch=2, edge=True, grad=False), load)
    assert calls == [1] and cache.computed == 1
    # Same key, from a fresh object (a second process or fold): no volume read.
    again = StatsCache(tmp_path / "cellstats")
    b = again.get(files, key(stride=2, patch=2, edge=True, grad=False), fail)
    assert_array_equal(a.parts, b.parts)
    # A coarser stride is built from the cached cells; an edge-free request is served by the
    # entry with an edge part when the config names its edge_power.
    c = again.get(files, key(stride=4, patch=4, edge=False, grad=False), fail, edge_power=1.0)
    assert c.key.stride == 4 and again.computed == 0 and again.loaded == 2
    assert_allclose(c.parts[:, 0].sum(axis=0), a.parts[:, 0].sum(axis=0), rtol=1e-12)
    # Another edge_power, or the gradient parts, need a new pass.
    again.get(files, key(stride=2, patch=2, power=2.0, grad=False), load)
    assert calls == [1, 1]


def test_cache_key_follows_the_input_files(tmp_path, rng):
    files, vols = _files(tmp_path, rng)
    cache = StatsCache(tmp_path / "c")
    k = key(edge=False, grad=False)
    first = cache.entry(files, k)
    st = os.stat(files[1])
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.entry(files, k) != first


def test_unreadable_entry_is_recomputed(tmp_path, rng, caplog):
    files, vols = _files(tmp_path, rng)
    cache = StatsCache(tmp_path / "c")
    k = key(edge=False, grad=False)
    good = cache.get(files, k, lambda: vols)
    cache.entry(files, k).write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING, logger="pacs_numba.core.cellstats"):
        again = cache.get(files, k, lambda: vols)
    assert "unreadable" in caplog.text and cache.computed == 2
    assert_array_equal(again.parts, good.parts)
    assert not [p for p in (tmp_path / "c").iterdir() if ".tmp" in p.name]


def test_key_checks_settings():
    with pytest.raises(ConfigError, match="fit_region 'box'"):
        key(region="box")
    with pytest.raises(ConfigError,
                       match=r"stride must be an integer in \[1, patch_size=4\]; got 5"):
        key(region="window", stride=5, patch=4)
    # Settings that cannot matter are dropped from the key.
    assert key(region="first_block", stride=2, patch=8, window="hann") == key(stride=2, patch=2)
    assert key(region="window", stride=4, patch=4, window="hann").window == "flat"
    assert key(edge=False, power=3.0) == key(edge=False, power=1.0)


def test_cache_clear_removes_statistics_entries(tmp_path, rng, capsys):
    from pacs_numba import cli

    files, vols = _files(tmp_path, rng)
    cache = StatsCache(tmp_path / "vols" / "cellstats")
    cache.get(files, key(edge=False, grad=False), lambda: vols)
    assert cli.main(["cache", "clear", "--cache-dir", str(tmp_path / "vols")]) == 0
    assert "1 statistics entries" in capsys.readouterr().out
    assert not list((tmp_path / "vols" / "cellstats").glob("*.npz"))


def test_concurrent_requests_compute_an_entry_once(tmp_path, rng):
    """Threads of one process (and, through the node lock, processes) share one computation."""
    import threading

    files, vols = _files(tmp_path, rng)
    calls = []
    caches = [StatsCache(tmp_path / "c") for _ in range(2)]  # like two processes
    barrier = threading.Barrier(4)
    out = []

    def work(i):
        barrier.wait()
        out.append(caches[i % 2].get(files, key(edge=True, grad=False),
                                     lambda: calls.append(1) or vols))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 4
    for st in out[1:]:
        assert_array_equal(st.parts, out[0].parts)
