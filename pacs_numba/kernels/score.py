"""Score a test patient in one pass: the blend, each expert alone and the HR-free blend.

Algorithm A7 (blend, metrics) and B6 (HR-free).  The evaluate stage scores every test
patient up to ``2M + 2`` times: the blend, each expert "alone" (the blend's path with
one-hot tile weights), the blend ``predict`` makes without the HR and each raw expert under
that blend's mask.  Run one after the other, those are ``M + 2`` overlap-add blends and
``2M + 2`` metric passes over the volume.
This kernel reads each voxel once and produces all of them:

* the overlap-add of the blend and of the HR-free blend share the tile loop, the windows
  and the denominator (only the z-score statistics differ: two numerators);
* an expert alone needs no overlap-add at all.  With one-hot weights the numerator is
  ``sum_tiles win * x_e,n = x_e,n * den`` up to float32 rounding, so the one-hot blend is
  ``x_e,n * den / (den + 1e-8)``; the factor keeps the reference's value where the Hann
  window makes ``den`` 0 (there the blend is the HR mean, not the expert);
* under the HR-free protocol each expert is also scored as a user gets it: its raw values
  times the HR-free blend's brain mask, read from the same row;
* every prediction is scored against the same HR slice: the masked error sums and the
  SSIM, whose HR box sums (``t``, ``t*t``), mask and data range are computed once per
  slice and shared.

Work is dealt per SSIM slice (axis 0 or 1: an output row ``(i0, i1, :)`` lies in one such
slice).  Along axis 2 a slice crosses every row; the wrapper scores that axis the plain
way.  The arithmetic of every prediction is the one of :mod:`.blend` and :mod:`.metrics`
step by step, so the results equal the separate passes to float rounding.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._config import CACHE, FASTMATH
from .blend import _window_table
from .grid import _n_anchors_one, _tile_id_one

_WIN = 7  # skimage's SSIM window (see kernels/metrics.py)
_HALF = 3


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _zscore_row_one(experts, mu32, sd32, i0, i1, xn):
    """Z-score row ``(i0, i1, :)`` of every expert into ``xn`` (M, N2); non-finite -> 0 first."""
    n_exp, n2 = xn.shape
    for m in range(n_exp):
        vol = experts[m]
        mu = mu32[m]
        sd = sd32[m]
        for k in range(n2):
            v = vol[i0, i1, k]
            if not np.isfinite(v):
                v = np.float32(0.0)
            xn[m, k] = (v - mu) / sd


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _blend_pair_row_one(
    weights, h0, h1, h2, i0, i1, patch_size, stride, counts1, counts2, xn, yn, use_y,
    tmp, tmp2, acc, acc2, den,
):
    """Overlap-add numerators of two z-scorings of one row, and their shared denominator.

    Parameters
    ----------
    weights : (n_tiles, M) float32
        Tile weights.
    h0, h1, h2 : (n_d, patch_size) float32
        Window tables.
    i0, i1 : int
        Row index.
    patch_size, stride, counts1, counts2 : int
        Grid geometry.
    xn, yn : (M, N2) float32
        The row's experts under the HR's z-scoring and under the experts' own (``yn`` is
        read only when ``use_y``).
    use_y : bool
        Whether to accumulate ``acc2``.
    tmp, tmp2 : (N2,) float32
        Scratch for more than 4 experts.
    acc, acc2, den : (N2,) float32
        Written: ``sum_tiles win * sum_m w_m xn_m``, the same of ``yn``, ``sum_tiles win``.

    Notes
    -----
    The same operations in the same order as ``blend._blend_row_one`` for each numerator
    (tiles in increasing id at every voxel), so each equals that kernel's.  Serial.
    """
    n_exp, n2 = xn.shape
    s = stride
    p = patch_size
    for k in range(n2):
        acc[k] = 0.0
        acc2[k] = 0.0
        den[k] = 0.0
    zero = np.float32(0.0)
    last = n_exp - 1
    x0 = xn[0]
    x1 = xn[min(1, last)]
    x2 = xn[min(2, last)]
    x3 = xn[min(3, last)]
    y0 = yn[0]
    y1 = yn[min(1, last)]
    y2 = yn[min(2, last)]
    y3 = yn[min(3, last)]
    t0_lo = max(0, (i0 - p) // s + 1)
    t1_lo = max(0, (i1 - p) // s + 1)
    for t0 in range(t0_lo, i0 // s + 1):
        w0 = h0[t0, i0 - t0 * s]
        for t1 in range(t1_lo, i1 // s + 1):
            w01 = w0 * h1[t1, i1 - t1 * s]
            base = _tile_id_one(t0, t1, 0, counts1, counts2)
            for t2 in range(counts2):
                a2 = t2 * s
                b2 = min(a2 + p, n2)
                wt = weights[base + t2]
                h2t = h2[t2]
                if n_exp <= 4:
                    wa = wt[0]
                    wb = wt[1] if n_exp > 1 else zero
                    wc = wt[2] if n_exp > 2 else zero
                    wd = wt[3] if n_exp > 3 else zero
                    for k in range(a2, b2):
                        v = wa * x0[k]
                        if n_exp > 1:
                            v += wb * x1[k]
                        if n_exp > 2:
                            v += wc * x2[k]
                        if n_exp > 3:
                            v += wd * x3[k]
                        win = w01 * h2t[k - a2]
                        acc[k] += win * v
                        den[k] += win
                    if use_y:  # a loop of its own: a test inside would stop vectorisation
                        for k in range(a2, b2):
                            u = wa * y0[k]
                            if n_exp > 1:
                                u += wb * y1[k]
                            if n_exp > 2:
                                u += wc * y2[k]
                            if n_exp > 3:
                                u += wd * y3[k]
                            acc2[k] += (w01 * h2t[k - a2]) * u
                else:
                    wa = wt[0]
                    for k in range(a2, b2):
                        tmp[k] = wa * x0[k]
                    for m in range(1, n_exp):
                        wm = wt[m]
                        xm = xn[m]
                        for k in range(a2, b2):
                            tmp[k] += wm * xm[k]
                    for k in range(a2, b2):
                        win = w01 * h2t[k - a2]
                        acc[k] += win * tmp[k]
                        den[k] += win
                    if use_y:
                        for k in range(a2, b2):
                            tmp2[k] = wa * y0[k]
                        for m in range(1, n_exp):
                            wm = wt[m]
                            ym = yn[m]
                            for k in range(a2, b2):
                                tmp2[k] += wm * ym[k]
                        for k in range(a2, b2):
                            acc2[k] += (w01 * h2t[k - a2]) * tmp2[k]


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _ssim_shared_one(t, preds, n_pred, data_range, vert, col, run, out, s):
    """Mean SSIM of ``n_pred`` predictions against one target slice, sharing the target's sums.

    Parameters
    ----------
    t : (A, B) float32
        Masked target slice (``A, B >= 7``).
    preds : (P, A, B) float32
        Masked predictions; the first ``n_pred`` are scored.
    n_pred : int
        Number of predictions.
    data_range : float32
        ``max(t) - min(t)``.
    vert : (2 + 3P, A, B) float32
        Scratch: axis-0 pass of ``t``, ``t*t`` and per prediction ``p``, ``p*p``, ``t*p``.
    col : (2 + 3P, B) float64
        Scratch: running column sums.
    run : (2 + 3P,) float64
        Scratch: running row sums.
    out : (P, n_slices) float64
        Written: ``out[q, s]`` for every prediction ``q``.

    Notes
    -----
    Per prediction, the operations of ``metrics._ssim_slice_one`` in its order; the
    target's two channels are computed once instead of once per prediction.  Serial.
    """
    n_a, n_b = t.shape
    n_ch = 2 + 3 * n_pred
    inv = 1.0 / _WIN
    r64 = np.float64(data_range)
    c1 = np.float32((0.01 * r64) ** 2)
    c2 = np.float32((0.03 * r64) ** 2)
    cov_norm = np.float32(_WIN * _WIN / (_WIN * _WIN - 1.0))
    two = np.float32(2.0)
    for j in range(n_b):
        for c in range(n_ch):
            col[c, j] = 0.0
    for i in range(_WIN):
        for j in range(n_b):
            a = t[i, j]
            col[0, j] += a
            col[1, j] += np.float64(a * a)
            for q in range(n_pred):
                b = preds[q, i, j]
                col[2 + 3 * q, j] += b
                col[3 + 3 * q, j] += np.float64(b * b)
                col[4 + 3 * q, j] += np.float64(a * b)
    for i in range(_HALF, n_a - _HALF):
        if i > _HALF:
            i_new = i + _HALF
            i_old = i - _HALF - 1
            for j in range(n_b):
                a = t[i_new, j]
                a0 = t[i_old, j]
                col[0, j] += np.float64(a) - np.float64(a0)
                col[1, j] += np.float64(a * a) - np.float64(a0 * a0)
                for q in range(n_pred):
                    b = preds[q, i_new, j]
                    b0 = preds[q, i_old, j]
                    col[2 + 3 * q, j] += np.float64(b) - np.float64(b0)
                    col[3 + 3 * q, j] += np.float64(b * b) - np.float64(b0 * b0)
                    col[4 + 3 * q, j] += np.float64(a * b) - np.float64(a0 * b0)
        for c in range(n_ch):
            for j in range(n_b):
                vert[c, i, j] = np.float32(col[c, j] * inv)
    for q in range(n_pred):
        out[q, s] = 0.0
    for i in range(_HALF, n_a - _HALF):
        for c in range(n_ch):
            acc = 0.0
            for j in range(_WIN):
                acc += np.float64(vert[c, i, j])
            run[c] = acc
        for j in range(_HALF, n_b - _HALF):
            if j > _HALF:
                j_new = j + _HALF
                j_old = j - _HALF - 1
                for c in range(n_ch):
                    run[c] += np.float64(vert[c, i, j_new]) - np.float64(vert[c, i, j_old])
            ux = np.float32(run[0] * inv)
            uxx = np.float32(run[1] * inv)
            vx = cov_norm * (uxx - ux * ux)
            for q in range(n_pred):
                uy = np.float32(run[2 + 3 * q] * inv)
                uyy = np.float32(run[3 + 3 * q] * inv)
                uxy = np.float32(run[4 + 3 * q] * inv)
                vy = cov_norm * (uyy - uy * uy)
                vxy = cov_norm * (uxy - ux * uy)
                a1 = two * ux * uy + c1
                a2 = two * vxy + c2
                b1 = ux * ux + uy * uy + c1
                b2 = vx + vy + c2
                out[q, s] += np.float64((a1 * a2) / (b1 * b2))
    area = (n_a - 2 * _HALF) * (n_b - 2 * _HALF)
    for q in range(n_pred):
        out[q, s] = out[q, s] / area


@njit(nogil=True, cache=CACHE, fastmath=FASTMATH)
def _score_chunk_one(
    hr, experts, weights, mask, use_mask, mask2, use_mask2, do_experts, do_free,
    patch_size, s, axis, n_a, n_pred, counts1, counts2, h0, h1, h2,
    mu32, sd32, mu2_32, sd2_32, mu_hr32, sd_hr32, mu2f, sd2f, do_ssim, min_range,
    c, n_chunks, sl_lo, sl_hi, xn_c, yn_c, tmp, tmp2, acc_c, acc2_c, den_c, ratio_c, in_c,
    t_c, p_c, vert, col, run, out, count, sum_sq, sum_abs, hr_min, hr_max, ssim,
):
    """Chunk ``c`` of :func:`_score_patient`: slices ``sl_lo + c, sl_lo + c + n_chunks, ...``.

    The arguments are the kernel's (its float32 copies of the statistics, its window tables
    and anchor counts) and the chunk's own scratch rows; it writes only those scratch rows
    and the chunk's slices of the outputs.
    """
    n2 = hr.shape[2]
    n_exp = len(experts)
    eps32 = np.float32(1e-8)  # BLEND_EPS, as in blend._blend_volume
    zero = np.float32(0.0)
    for sl in range(sl_lo + c, sl_hi, n_chunks):
        cnt = 0
        lo = np.float32(np.inf)
        hi = np.float32(-np.inf)
        t_lo = np.float32(np.inf)  # range of the masked SSIM image t*m
        t_hi = np.float32(-np.inf)
        any_mask = False
        for a in range(n_a):
            if axis == 0:
                i0 = sl
                i1 = a
            else:
                i0 = a
                i1 = sl
            _zscore_row_one(experts, mu32, sd32, i0, i1, xn_c)
            if do_free:
                _zscore_row_one(experts, mu2_32, sd2_32, i0, i1, yn_c)
            _blend_pair_row_one(
                weights, h0, h1, h2, i0, i1, patch_size, s, counts1, counts2, xn_c, yn_c,
                do_free, tmp, tmp2, acc_c, acc2_c, den_c,
            )
            for k in range(n2):  # the blend, as blend._blend_volume finishes it
                b = acc_c[k] / (den_c[k] + eps32)
                b = b * sd_hr32 + mu_hr32
                if use_mask and mask[i0, i1, k] == 0:
                    b = b * zero  # the reference multiplies by the 0/1 mask
                out[i0, i1, k] = b
                p_c[0, a, k] = b
            q = 1
            if do_experts:  # one-hot blends: x_e,n * den / (den + eps), mapped back
                for k in range(n2):
                    ratio_c[k] = den_c[k] / (den_c[k] + eps32)
                for e in range(n_exp):
                    pq = p_c[q]
                    xe = xn_c[e]
                    for k in range(n2):
                        v = (xe[k] * ratio_c[k]) * sd_hr32 + mu_hr32
                        if use_mask and mask[i0, i1, k] == 0:
                            v = v * zero
                        pq[a, k] = v
                    q += 1
            if do_free:
                pq = p_c[q]
                for k in range(n2):
                    v = acc2_c[k] / (den_c[k] + eps32)
                    v = v * sd2f + mu2f
                    if use_mask2 and mask2[i0, i1, k] == 0:
                        v = v * zero
                    pq[a, k] = v
                q += 1
                # each expert as a user gets it (HR-free protocol): its own values, a
                # non-finite one read as 0, times the HR-free blend's brain mask
                for e in range(n_exp):
                    pq = p_c[q]
                    vol = experts[e]
                    for k in range(n2):
                        v = vol[i0, i1, k]
                        if not np.isfinite(v) or (use_mask2 and mask2[i0, i1, k] == 0):
                            v = zero
                        pq[a, k] = v
                    q += 1
            for k in range(n2):  # the HR: range, metric mask, masked SSIM image
                h = hr[i0, i1, k]
                fin = np.isfinite(h)
                if fin and h < lo:
                    lo = h
                if fin and h > hi:
                    hi = h
                inside = fin and h > 0
                in_c[k] = inside
                if not inside:
                    h = zero
                t_c[a, k] = h
                if h < t_lo:
                    t_lo = h
                if h > t_hi:
                    t_hi = h
                if inside:
                    cnt += 1
                    any_mask = True
            for q in range(n_pred):  # error sums over the mask; zero outside it
                pq = p_c[q]
                s2 = 0.0
                s1 = 0.0
                for k in range(n2):
                    if in_c[k]:
                        d = t_c[a, k] - pq[a, k]
                        s2 += np.float64(d * d)
                        s1 += np.float64(abs(d))
                    else:
                        pq[a, k] = zero
                sum_sq[q, sl] += s2
                sum_abs[q, sl] += s1
        count[sl] = cnt
        hr_min[sl] = lo
        hr_max[sl] = hi
        if not (do_ssim and any_mask):
            continue
        data_range = t_hi - t_lo
        if not np.float64(data_range) >= min_range:
            continue
        _ssim_shared_one(t_c, p_c, n_pred, data_range, vert, col, run, ssim, sl)


def _score_patient(
    hr, experts, weights, mus, sds, mu_hr, sd_hr, mask, use_mask,
    mus2, sds2, mu2, sd2, mask2, use_mask2, do_experts, do_free,
    patch_size, stride, window, axis, min_range, n_chunks,
    sl_lo, sl_hi, out, count, sum_sq, sum_abs, hr_min, hr_max, ssim, run_chunks=None,
):
    """Blend and score slices ``sl_lo:sl_hi``: the blend, each expert alone, the HR-free blend.

    Parameters
    ----------
    hr : (N0, N1, N2) float32, C-contiguous
        The HR target.  Metric mask: ``hr > 0`` and finite.
    experts : numba.typed.List of (N0, N1, N2) float32, C-contiguous
        The M raw experts.
    weights : (n_tiles, M) float32
        Tile weights (``1/M`` rows for tiles without a learned weight).
    mus, sds : (M,) float64
        The experts' z-score statistics over the HR mask (algorithm A7.1).
    mu_hr, sd_hr : float
        The HR's, mapping the blend and every expert alone back.
    mask : (N0, N1, N2) uint8
        Brain mask of the blend and the experts alone when ``use_mask``.
    use_mask : bool
    mus2, sds2 : (M,) float64
        The experts' statistics without the HR (algorithm B6), read when ``do_free``.
    mu2, sd2 : float
        What the HR-free blend is mapped back to.
    mask2 : (N0, N1, N2) uint8
        Brain mask of the HR-free blend when ``use_mask2``.
    use_mask2, do_experts, do_free : bool
        Which predictions besides the blend to score; ``do_free`` scores the HR-free blend
        and each raw expert under its mask (the HR-free protocol's single experts).
    patch_size, stride, window : int
        Grid and ``_config.WINDOWS`` code (flat already forced without overlap).
    axis : int
        SSIM slice axis, 0 or 1 (the wrapper handles 2).
    min_range : float
        ``SSIM_MIN_RANGE``.
    n_chunks : int
        Work chunks (each with its own scratch); the result does not depend on it.
    sl_lo, sl_hi : int
        The slices along ``axis`` to do now (``0, n_slices`` for all).  Slice ``sl`` reads
        only the rows of that slice, so along axis 0 a caller can score a volume slab by
        slab and let go of each slab's pages once done (``core.scoring``).
    out : (N0, N1, N2) float32
        Written in these slices: the blend, as ``blend._blend_volume`` makes it.
    count : (n_slices,) int64
        Written: mask voxels per slice along ``axis``.
    sum_sq, sum_abs : (P, n_slices) float64, zero on entry
        Added to: per prediction and slice, ``sum float32(d*d)`` and ``sum |d|`` over the
        mask, ``d = hr - pred`` in float32.  Predictions: 0 the blend, then each expert alone
        (``do_experts``), then the HR-free blend and each raw expert times ``mask2``
        (``do_free``).
    hr_min, hr_max : (n_slices,) float32
        Written: range of the finite HR voxels per slice (+inf/-inf if none).
    ssim : (P, n_slices) float64, NaN on entry
        Written: SSIM per prediction and slice, left NaN where skipped (as
        ``metrics._ssim_slices``).
    run_chunks : callable, optional
        ``run_chunks(chunk, n_chunks)`` calls ``chunk(c)`` for every ``c``, in parallel
        (``resources.threads.run_chunks``); None: one after the other on this thread.

    Notes
    -----
    Plain Python around the serial ``nogil`` :func:`_score_chunk_one`: the tables, the
    float32 statistics and each chunk's scratch are made here, the chunks run through
    ``run_chunks``.  (As a ``parallel=True`` kernel, Numba compiled the chunk's code once
    more in the parallel function: ~40% of this kernel's first-run compile.)  Each chunk
    owns whole slices (the output rows in them, their entries of
    every per-slice array and its own scratch): race-free, and no value depends on the
    thread count.  A non-finite expert value is read as 0.0; NaN HR voxels are outside
    the mask and the range.
    """
    n0, n1, n2 = hr.shape
    n_exp = len(experts)
    n_pred = 1 + (n_exp if do_experts else 0) + (1 + n_exp if do_free else 0)
    s = int(stride)
    patch_size = int(patch_size)
    counts0 = _n_anchors_one(n0, s)
    counts1 = _n_anchors_one(n1, s)
    counts2 = _n_anchors_one(n2, s)
    h0 = _window_table(counts0, n0, patch_size, s, window)
    h1 = _window_table(counts1, n1, patch_size, s, window)
    h2 = _window_table(counts2, n2, patch_size, s, window)
    mu32 = np.asarray(mus, np.float64)[:n_exp].astype(np.float32)
    sd32 = np.asarray(sds, np.float64)[:n_exp].astype(np.float32)
    mu2_32 = np.asarray(mus2, np.float64)[:n_exp].astype(np.float32)
    sd2_32 = np.asarray(sds2, np.float64)[:n_exp].astype(np.float32)
    mu_hr32 = np.float32(mu_hr)
    sd_hr32 = np.float32(sd_hr)
    mu2f = np.float32(mu2)
    sd2f = np.float32(sd2)

    if axis == 0:
        n_s, n_a = n0, n1
    else:
        n_s, n_a = n1, n0
    do_ssim = n_a >= _WIN and n2 >= _WIN
    sl_lo = max(int(sl_lo), 0)
    sl_hi = min(int(sl_hi), n_s)
    n_chunks = max(1, min(int(n_chunks), sl_hi - sl_lo))
    n_ch = 2 + 3 * n_pred
    xn = np.empty((n_chunks, n_exp, n2), np.float32)
    yn = np.zeros((n_chunks, n_exp, n2), np.float32)
    tmp = np.empty((n_chunks, n2), np.float32)
    tmp2 = np.empty((n_chunks, n2), np.float32)
    acc = np.empty((n_chunks, n2), np.float32)
    acc2 = np.empty((n_chunks, n2), np.float32)
    den = np.empty((n_chunks, n2), np.float32)
    ratio = np.empty((n_chunks, n2), np.float32)
    inmask = np.empty((n_chunks, n2), np.bool_)
    img_t = np.empty((n_chunks, n_a, n2), np.float32)
    img_p = np.empty((n_chunks, n_pred, n_a, n2), np.float32)
    vert = np.empty((n_chunks, n_ch, n_a if do_ssim else 1, n2), np.float32)
    col = np.empty((n_chunks, n_ch, n2), np.float64)
    run = np.empty((n_chunks, n_ch), np.float64)
    use_mask, use_mask2 = bool(use_mask), bool(use_mask2)
    do_experts, do_free = bool(do_experts), bool(do_free)
    min_range = float(min_range)

    def chunk(c):
        _score_chunk_one(
            hr, experts, weights, mask, use_mask, mask2, use_mask2, do_experts, do_free,
            patch_size, s, int(axis), n_a, n_pred, counts1, counts2, h0, h1, h2,
            mu32, sd32, mu2_32, sd2_32, mu_hr32, sd_hr32, mu2f, sd2f, do_ssim, min_range,
            c, n_chunks, sl_lo, sl_hi, xn[c], yn[c], tmp[c], tmp2[c], acc[c],
            acc2[c], den[c], ratio[c], inmask[c], img_t[c], img_p[c], vert[c], col[c], run[c],
            out, count, sum_sq, sum_abs, hr_min, hr_max, ssim,
        )

    if run_chunks is None:
        for c in range(n_chunks):
            chunk(c)
    else:
        run_chunks(chunk, n_chunks)
