"""Tile-weight solvers and Laplacian smoothing (algorithm A5, A6, B3) against their slow twins."""

from __future__ import annotations

import numba
import numpy as np
import pytest
from conftest import ATOL32, RTOL32
from numpy.testing import assert_allclose, assert_array_equal
from reference import qp as ref

from pacs_numba.core.solve import (
    fit_weights,
    laplacian_smooth,
    objective,
    slsqp_reference_weights,
    solve_simplex_qp,
    solve_unconstrained,
)
from pacs_numba.errors import ConfigError
from pacs_numba.kernels.qp import (
    _laplacian_smooth,
    _solve_simplex_qp,
    _solve_simplex_qp_active_set,
    _solve_unconstrained,
)

# Exact solver vs brute-force twin: both are exact, so only rounding separates them.
W_ATOL = 1e-7
F_RTOL = 1e-10
# algorithm A5 compat rule against the published SLSQP solver.
SLSQP_RTOL = 1e-9


def gram_stats(rng, n_tiles, m, n_rows=None, scale=1.0):
    """Well-conditioned random statistics: Q = X^T X, B = X^T y."""
    n_rows = n_rows or 3 * m + 5
    X = rng.standard_normal((n_tiles, n_rows, m))
    y = X @ rng.dirichlet(np.ones(m), size=n_tiles)[:, :, None] * 0.8
    y = y[..., 0] + rng.standard_normal((n_tiles, n_rows))
    Q = np.einsum("tni,tnj->tij", X, X) * scale
    B = np.einsum("tni,tn->ti", X, y) * scale
    return Q, B


def realistic_stats(rng, n_tiles, m, n_vox=4096):
    """Statistics shaped like algorithm A4 sums over z-scored volumes (|Q| ~ 1e4..1e7).

    Each tile has a true signal y and experts x_m = a_m y + c_m + noise, where the noise
    of different experts is correlated; edge weights in [1, 1.25]; the patient count
    and intensity level multiply Q and B by 3..300.
    """
    Q = np.empty((n_tiles, m, m))
    B = np.empty((n_tiles, m))
    for t in range(n_tiles):
        y = rng.standard_normal(n_vox) * rng.uniform(0.2, 2.0) + rng.uniform(-1.5, 1.5)
        shared = rng.standard_normal(n_vox)
        corr = rng.uniform(0.0, 0.9)
        X = np.empty((n_vox, m))
        for e in range(m):
            noise = corr * shared + np.sqrt(1 - corr**2) * rng.standard_normal(n_vox)
            X[:, e] = (y * rng.uniform(0.8, 1.1) + rng.uniform(-0.2, 0.2)
                       + rng.uniform(0.02, 0.6) * noise)
        omega = 1.0 + 0.25 * rng.uniform(0.0, 1.0, n_vox) ** 2
        c = 10 ** rng.uniform(0.5, 2.5)
        Xw = X * omega[:, None]
        Q[t] = c * (Xw.T @ X)
        B[t] = c * (Xw.T @ y)
    return Q, B


def check_simplex(W):
    assert np.all(W >= 0.0)
    assert_allclose(W.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def assert_matches_twin(Q, B, lam, W, weights=True):
    for t in range(len(B)):
        w_ref = ref.simplex_qp(Q[t], B[t], lam)
        f_ref = ref.objective(Q[t], B[t], lam, w_ref)
        f = ref.objective(Q[t], B[t], lam, W[t])
        size = np.abs(Q[t]).max() + abs(lam) + np.abs(B[t]).max()
        assert abs(f - f_ref) <= F_RTOL * abs(f_ref) + 1e-14 * size, (t, f, f_ref)
        if weights:
            assert_allclose(W[t], w_ref, rtol=0, atol=W_ATOL, err_msg=f"tile {t}")


# --------------------------------------------------------------------------- simplex QP


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 6])
def test_simplex_matches_twin_on_random_pd_problems(rng, m):
    scale = 10 ** rng.uniform(-6, 6)
    Q, B = gram_stats(rng, 12, m, scale=scale)
    lam = 1e-3 * scale
    W = solve_simplex_qp(Q, B, lam)
    assert W.dtype == np.float64 and W.shape == (12, m)
    check_simplex(W)
    assert_matches_twin(Q, B, lam, W)


@pytest.mark.parametrize("scale", [1e-10, 1.0, 1e7])
def test_simplex_is_scale_invariant(rng, scale):
    Q, B = gram_stats(rng, 20, 4)
    W1 = solve_simplex_qp(Q, B, 0.0)
    W2 = solve_simplex_qp(Q * scale, B * scale, 0.0)
    assert_allclose(W2, W1, rtol=0, atol=1e-12)
    assert_matches_twin(Q * scale, B * scale, 0.0, W2)


def test_simplex_realistic_scale_matches_twin(rng):
    Q, B = realistic_stats(rng, 25, 4, n_vox=2048)
    assert np.abs(Q).max() > 1e5
    W = solve_simplex_qp(Q, B, 1e-4)
    check_simplex(W)
    assert_matches_twin(Q, B, 1e-4, W)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_simplex_rank_deficient_q_with_zero_ridge(rng, m):
    # X has rank 1..m-1: the minimiser need not be unique, so compare objectives.
    rank = int(rng.integers(1, m))
    Z = rng.standard_normal((10, 8, rank))
    X = Z @ rng.standard_normal((10, rank, m))
    Q = np.einsum("tni,tnj->tij", X, X) * 1e4
    B = np.einsum("tni,tn->ti", X, rng.standard_normal((10, 8))) * 1e4
    W = solve_simplex_qp(Q, B, 0.0)
    check_simplex(W)
    assert_matches_twin(Q, B, 0.0, W, weights=False)


def test_simplex_duplicated_experts(rng):
    Q, B = gram_stats(rng, 15, 3)
    dup = [0, 1, 2, 1]  # expert 3 is a copy of expert 1
    Qd = Q[:, dup][:, :, dup]
    Bd = B[:, dup]
    W3 = solve_simplex_qp(Q, B, 0.0)
    W4 = solve_simplex_qp(Qd, Bd, 0.0)
    check_simplex(W4)
    merged = W4[:, [0, 1, 2]].copy()
    merged[:, 1] += W4[:, 3]
    assert_allclose(merged, W3, rtol=0, atol=1e-9)
    assert_matches_twin(Qd, Bd, 0.0, W4, weights=False)


def test_simplex_one_expert_and_degenerate_tiles():
    assert_array_equal(solve_simplex_qp(np.zeros((3, 1, 1)), np.zeros((3, 1)), 0.0), 1.0)
    # Q = 0, lam = 0: linear objective, minimised at the vertex of the largest B.
    W = solve_simplex_qp(np.zeros((1, 3, 3)), np.array([[1.0, 5.0, 2.0]]), 0.0)
    assert_array_equal(W, [[0.0, 1.0, 0.0]])
    # Q = 0, B = 0: every point is optimal; any simplex point will do.
    check_simplex(solve_simplex_qp(np.zeros((1, 3, 3)), np.zeros((1, 3)), 0.0))
    # All experts identical: f is constant on the simplex.
    Q = np.full((1, 4, 4), 7.0)
    check_simplex(solve_simplex_qp(Q, np.full((1, 4), 3.0), 0.0))
    # Empty tile list.
    assert solve_simplex_qp(np.zeros((0, 4, 4)), np.zeros((0, 4)), 0.0).shape == (0, 4)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_simplex_kkt_conditions(rng, m):
    Q, B = gram_stats(rng, 30, m, scale=1e3)
    lam = 0.5
    W = solve_simplex_qp(Q, B, lam)
    check_simplex(W)
    for t in range(30):
        size = np.abs(Q[t]).max() + lam + np.abs(B[t]).max()
        g, nu, z, support = ref.kkt_parts(Q[t], B[t], lam, W[t])
        assert np.abs(z[support]).max() <= 1e-9 * size  # stationarity on the support
        assert np.all(z[~support] >= -1e-9 * size)  # dual feasibility
        assert np.all(W[t][~support] == 0.0)  # complementary slackness


def test_simplex_not_worse_than_trust_constr(rng):
    Q, B = gram_stats(rng, 4, 3, scale=10.0)
    W = solve_simplex_qp(Q, B, 0.1)
    for t in range(4):
        w_tc = ref.simplex_qp_trust_constr(Q[t], B[t], 0.1, n_starts=3, seed=t)
        f_tc = ref.objective(Q[t], B[t], 0.1, w_tc)
        assert ref.objective(Q[t], B[t], 0.1, W[t]) <= f_tc + 1e-12 * abs(f_tc)


def test_simplex_inactive_tiles_get_uniform_weights(rng):
    Q, B = gram_stats(rng, 10, 5)
    active = rng.random(10) < 0.5
    active[0] = False
    Q[0] = np.nan  # inactive tiles are never read
    W = solve_simplex_qp(Q, B, 0.0, active=active)
    assert_array_equal(W[~active], 0.2)
    assert_array_equal(W[active], solve_simplex_qp(Q[active], B[active], 0.0))


def test_simplex_never_worse_than_published_slsqp():
    # algorithm A5 compat: f(ours) <= f(SLSQP) + 1e-9 |f(SLSQP)| on every tile.
    rng = np.random.default_rng(2024)
    Q, B = realistic_stats(rng, 2000, 4)
    lam = 1e-4
    W = solve_simplex_qp(Q, B, lam)
    W_ref = slsqp_reference_weights(Q, B, lam)
    check_simplex(W_ref)
    f = objective(Q, B, lam, W)
    f_ref = objective(Q, B, lam, W_ref)
    assert np.all(f <= f_ref + SLSQP_RTOL * np.abs(f_ref))
    # ... and the comparison has teeth: SLSQP is measurably worse on some tiles.
    assert np.mean(f < f_ref - 1e-6 * np.abs(f_ref)) > 0.005


def test_slsqp_reference_on_a_well_scaled_problem(rng):
    Q, B = gram_stats(rng, 5, 3)
    Q /= np.trace(Q, axis1=1, axis2=2)[:, None, None]
    B /= np.abs(B).max(axis=1, keepdims=True)
    active = np.array([True, True, False, True, True])
    W_ref = slsqp_reference_weights(Q, B, 0.0, active=active)
    assert_array_equal(W_ref[2], 1 / 3)
    assert_allclose(W_ref[active], solve_simplex_qp(Q, B, 0.0)[active], atol=1e-5)


def test_simplex_rejects_bad_input(rng):
    Q, B = gram_stats(rng, 3, 2)
    with pytest.raises(ConfigError, match=r"lambda_ridge must be a finite number >= 0, got -1"):
        solve_simplex_qp(Q, B, -1.0)
    with pytest.raises(ConfigError, match="lambda_ridge"):
        solve_simplex_qp(Q, B, float("nan"))
    with pytest.raises(ValueError, match=r"B has shape \(3, 3\); expected \(3, 2\)"):
        solve_simplex_qp(Q, np.zeros((3, 3)), 0.0)
    with pytest.raises(ValueError, match=r"Q must have shape"):
        solve_simplex_qp(np.zeros((3, 2, 3)), B, 0.0)
    with pytest.raises(ValueError, match=r"active has shape \(2,\); expected \(3,\)"):
        solve_simplex_qp(Q, B, 0.0, active=[True, False])
    Q[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 tile\(s\) hold NaN or inf \(first: tile 1\)"):
        solve_simplex_qp(Q, B, 0.0)


# ------------------------------------------------------------- simplex QP, active set


def objectives(Q, B, lam, W):
    return np.array([ref.objective(Q[t], B[t], lam, W[t]) for t in range(len(B))])


def low_rank_stats(rng, n_tiles, m, rank):
    X = rng.standard_normal((n_tiles, 2 * m, rank)) @ rng.standard_normal((n_tiles, rank, m))
    y = rng.standard_normal((n_tiles, 2 * m))
    return np.einsum("tni,tnj->tij", X, X), np.einsum("tni,tn->ti", X, y)


@pytest.mark.parametrize("m", [1, 2, 3, 6, 9, 12, 14])
@pytest.mark.parametrize("lam", [0.0, 0.05])
def test_active_set_matches_enumeration(rng, m, lam):
    # Both kernels are exact: the same objective always, the same weights when the
    # minimiser is unique (lam > 0).  Half the tiles have a singular Q (rank < m).
    n = 4 if m >= 12 else 10
    Q, B = gram_stats(rng, n, m)
    Qs, Bs = low_rank_stats(rng, n, m, max(1, m // 2))
    Q, B = np.concatenate([Q, Qs]), np.concatenate([B, Bs])
    act = np.ones(len(B), dtype=bool)
    W_enum = _solve_simplex_qp(Q, B, lam, act, 2)
    W_as = _solve_simplex_qp_active_set(Q, B, lam, act, 2)
    check_simplex(W_as)
    f_enum, f_as = objectives(Q, B, lam, W_enum), objectives(Q, B, lam, W_as)
    assert_allclose(f_as, f_enum, rtol=F_RTOL, atol=1e-12)
    if lam > 0:
        assert_allclose(W_as, W_enum, rtol=0, atol=W_ATOL)


@pytest.mark.parametrize("m", [2, 7, 15, 20, 26])
def test_active_set_matches_twin(rng, m):
    Q, B = gram_stats(rng, 6, m)
    Qs, Bs = low_rank_stats(rng, 6, m, max(1, m // 3))
    Q, B = np.concatenate([Q, Qs]), np.concatenate([B, Bs])
    W = _solve_simplex_qp_active_set(Q, B, 0.0, np.ones(len(B), dtype=bool), 3)
    W_ref = np.array([ref.simplex_qp_active_set(Q[t], B[t], 0.0) for t in range(len(B))])
    assert_allclose(objectives(Q, B, 0.0, W), objectives(Q, B, 0.0, W_ref),
                    rtol=F_RTOL, atol=1e-12)
    assert_allclose(W[:6], W_ref[:6], rtol=0, atol=W_ATOL)  # full rank: unique minimiser


def test_twenty_experts_against_trust_constr_and_kkt(rng):
    # 20 experts through the public wrapper, checked by an independent solver (scipy's
    # trust-constr, best of several starts) and by the KKT conditions.
    m, lam = 20, 1e-3
    Q, B = realistic_stats(rng, 3, m, n_vox=512)
    Qs, Bs = low_rank_stats(rng, 2, m, 6)
    Q, B = np.concatenate([Q, Qs]), np.concatenate([B, Bs])
    W = solve_simplex_qp(Q, B, lam)
    check_simplex(W)
    for t in range(len(B)):
        w_tc = ref.simplex_qp_trust_constr(Q[t], B[t], lam, n_starts=3)
        f, f_tc = (ref.objective(Q[t], B[t], lam, w) for w in (W[t], w_tc))
        # trust-constr is an interior method: it can only be as good, up to its tolerance
        assert f <= f_tc + 1e-7 * abs(f_tc), (t, f, f_tc)
        g, nu, z, support = ref.kkt_parts(Q[t], B[t], lam, W[t])
        size = np.abs(g).max() + 1.0
        assert np.abs(g[support] - nu).max() <= 1e-8 * size, t
        assert z[~support].min(initial=0.0) >= -1e-8 * size, t


def test_many_experts_duplicated(rng):
    # 16 experts, the last 8 copies of the first 8, no ridge: every minimiser merges to
    # the minimiser of the 8 distinct experts.
    Q8, B8 = gram_stats(rng, 8, 8)
    dup = list(range(8)) * 2
    Q, B = Q8[:, dup][:, :, dup], B8[:, dup]
    W = solve_simplex_qp(Q, B, 0.0)
    check_simplex(W)
    merged = W[:, :8] + W[:, 8:]
    assert_allclose(merged, solve_simplex_qp(Q8, B8, 0.0), rtol=0, atol=1e-9)


def test_active_set_nan_and_inactive_tiles(rng):
    Q, B = gram_stats(rng, 4, 9)
    Q[2, 0, 0] = np.nan
    act = np.array([True, False, True, True])
    W = _solve_simplex_qp_active_set(Q, B, 0.0, act, 2)
    assert np.isnan(W[2]).all()
    assert_array_equal(W[1], np.full(9, 1 / 9))
    check_simplex(W[[0, 3]])


# ----------------------------------------------------------------------- unconstrained


@pytest.mark.parametrize("m", [1, 2, 4, 7])
def test_unconstrained_matches_numpy_solve(rng, m):
    Q, B = gram_stats(rng, 10, m, scale=10 ** rng.uniform(-5, 7))
    lam = 1e-3
    W = solve_unconstrained(Q, B, lam)
    expected = np.linalg.solve(Q + lam * np.eye(m), B[..., None])[..., 0]
    assert_allclose(W, expected, rtol=1e-10, atol=0)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_unconstrained_singular_matches_pinv(rng, m):
    rank = int(rng.integers(1, m))
    X = rng.standard_normal((8, 9, rank)) @ rng.standard_normal((8, rank, m))
    Q = np.einsum("tni,tnj->tij", X, X) * 100.0
    B = rng.standard_normal((8, m)) * 100.0
    dup = Q.copy()
    dup[:, -1, :] = dup[:, 0, :]
    dup[:, :, -1] = dup[:, :, 0]
    for q in (Q, dup, np.zeros_like(Q)):
        W = solve_unconstrained(q, B, 0.0)
        for t in range(8):
            assert_allclose(W[t], ref.unconstrained(q[t], B[t], 0.0), rtol=1e-8, atol=1e-12)


def test_unconstrained_inactive_tiles_and_errors(rng):
    Q, B = gram_stats(rng, 6, 3)
    active = np.array([True, False, True, False, True, True])
    W = solve_unconstrained(Q, B, 0.0, active=active)
    assert_array_equal(W[~active], 1 / 3)
    with pytest.raises(ConfigError, match="lambda_ridge"):
        solve_unconstrained(Q, B, -0.5)


# ----------------------------------------------------------------------- smoothing


@pytest.mark.parametrize("counts", [(3, 1, 4), (1, 1, 1), (2, 3, 2), (1, 5, 1), (4, 3, 5)])
@pytest.mark.parametrize("tau", [0.0, 0.05, 1.0])
def test_laplacian_matches_twin(rng, counts, tau):
    n = int(np.prod(counts))
    m = int(rng.integers(1, 5))
    # Unnormalised and partly negative, as smoothed unconstrained weights can be.
    W = rng.uniform(-0.2, 1.0, (n, m)).astype(np.float32)
    for p_learned in (0.4, 1.0):
        learned = rng.random(n) < p_learned
        out = laplacian_smooth(W, learned, counts, tau)
        assert out.dtype == np.float32 and out.shape == W.shape
        assert_allclose(out, ref.laplacian_smooth(W, learned, counts, tau),
                        rtol=RTOL32, atol=ATOL32)
        assert_array_equal(out[~learned], W[~learned])
        if tau > 0:
            assert np.all(out[learned] >= 0)


def test_laplacian_small_cases_by_hand():
    W = np.array([[1.0, 0.0], [0.0, 1.0], [0.2, 0.8], [0.5, 0.5]], dtype=np.float32)
    learned = np.array([True, True, False, True])
    out = laplacian_smooth(W, learned, (4, 1, 1), 0.5)
    # Tile 0: neighbour 1 only.  Tile 1: neighbour 0 (tile 2 is unlearned).
    # Tile 3: no learned neighbour, kept (and renormalised by sum + 1e-8).
    expected = np.array([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8], [0.5, 0.5]]) / np.array(
        [[1 + 1e-8], [1 + 1e-8], [1.0], [1 + 1e-8]])
    assert_allclose(out, expected.astype(np.float32), rtol=0, atol=0)


def test_laplacian_rejects_bad_input():
    W = np.full((6, 2), 0.5, dtype=np.float32)
    learned = np.ones(6, dtype=bool)
    for tau in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"laplacian_tau must be in \[0, 1\]"):
            laplacian_smooth(W, learned, (1, 2, 3), tau)
    with pytest.raises(ValueError, match=r"grid counts \(2, 2, 2\) do not describe 6 tiles"):
        laplacian_smooth(W, learned, (2, 2, 2), 0.1)
    with pytest.raises(ValueError, match=r"learned has shape \(5,\); expected \(6,\)"):
        laplacian_smooth(W, learned[:5], (1, 2, 3), 0.1)


# ------------------------------------------------------------------ threads, fit_weights


def test_results_do_not_depend_on_thread_count(rng):
    Q, B = gram_stats(rng, 37, 4)
    active = rng.random(37) < 0.8
    W = rng.random((37, 4)).astype(np.float32)
    before = numba.get_num_threads()
    try:
        results = []
        for n_threads in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n_threads)
            results.append((solve_simplex_qp(Q, B, 0.0, active),
                            solve_unconstrained(Q, B, 0.0, active),
                            laplacian_smooth(W, active, (37, 1, 1), 0.3)))
    finally:
        numba.set_num_threads(before)
    for got in results[1:]:
        for a, b in zip(results[0], got, strict=True):
            assert_array_equal(a, b)
    # The chunking of tiles (one scratch slot per chunk) does not matter either.
    for n_chunks in (1, 3, 50):
        assert_array_equal(_solve_simplex_qp(Q, B, 0.0, active, n_chunks), results[0][0])
        assert_array_equal(_solve_unconstrained(Q, B, 0.0, active, n_chunks), results[0][1])
    assert_array_equal(_laplacian_smooth(W, active, 37, 1, 1, 0.3), results[0][2])


@pytest.mark.parametrize("simplex", [True, False])
@pytest.mark.parametrize("tau", [0.0, 0.05])
def test_fit_weights_pipeline(rng, simplex, tau):
    counts = (2, 3, 2)
    Q, B = gram_stats(rng, 12, 4, scale=1e4)
    n = rng.integers(0, 3, 12) * 100
    weights, learned = fit_weights(Q, B, n, counts, simplex=simplex,
                                   lambda_ridge=1e-4, laplacian_tau=tau)
    assert weights.dtype == np.float32 and learned.dtype == np.bool_
    assert_array_equal(learned, n > 0)
    assert_array_equal(weights[~learned], np.float32(1) / np.float32(4))
    solve = solve_simplex_qp if simplex else solve_unconstrained
    expected = solve(Q, B, 1e-4, active=learned).astype(np.float32)
    if tau > 0:
        expected = ref.laplacian_smooth(expected, learned, counts, tau)
        assert np.all(weights >= 0)
        assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
    assert_allclose(weights[learned], expected[learned], rtol=RTOL32, atol=ATOL32)
    if tau == 0:
        assert_array_equal(weights[learned], expected[learned])


def test_fit_weights_rejects_bad_input(rng):
    Q, B = gram_stats(rng, 6, 2)
    n = np.ones(6, dtype=np.int64)
    kw = dict(simplex=True, lambda_ridge=0.0, laplacian_tau=0.0)
    with pytest.raises(ConfigError, match="lambda_ridge"):
        fit_weights(Q, B, n, (1, 2, 3), **{**kw, "lambda_ridge": -1e-4})
    with pytest.raises(ConfigError, match=r"laplacian_tau must be in \[0, 1\], got 2"):
        fit_weights(Q, B, n, (1, 2, 3), **{**kw, "laplacian_tau": 2})
    with pytest.raises(ValueError, match=r"counts_n has shape \(5,\); expected \(6,\)"):
        fit_weights(Q, B, n[:5], (1, 2, 3), **kw)
    with pytest.raises(ValueError, match="do not describe 6 tiles"):
        fit_weights(Q, B, n, (1, 2, 2), **kw)
    with pytest.raises(ValueError, match=r"B has shape"):
        fit_weights(Q, B[:, :1], n, (1, 2, 3), **kw)


def test_objective_matches_twin(rng):
    Q, B = gram_stats(rng, 5, 3)
    W = rng.dirichlet(np.ones(3), size=5)
    f = objective(Q, B, 0.3, W.astype(np.float32))
    expected = [ref.objective(Q[t], B[t], 0.3, W[t].astype(np.float32)) for t in range(5)]
    assert_allclose(f, expected, rtol=1e-12)
