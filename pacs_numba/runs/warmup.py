"""Compiling or loading every kernel before a run (``diagnose --warmup``), and counting them."""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import time
from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from numba.core.dispatcher import Dispatcher

from .. import kernels
from .._config import CACHE
from ..core.blending import blend_volume, brain_mask, weight_analysis, weight_maps
from ..core.cellstats import StatsKey, box_statistics, combine
from ..core.metrics import volume_metrics
from ..core.solve import fit_weights, laplacian_smooth, solve_simplex_qp
from ..core.statistics import normalisation, valid_mask
from ..core.tiling import TileGrid
from ..resources.threads import ensure_threading_layer

log = logging.getLogger(__name__)


def warm_kernels(on_step: Callable[[str, float], Any] | None = None) -> dict[str, float]:
    """Compile (or load from cache) every kernel on a tiny input; seconds per kernel.

    ``on_step(name, seconds)`` is called after each step (``load_kernels`` logs progress).
    """
    ensure_threading_layer()
    rng = np.random.default_rng(0)
    shape = (12, 11, 10)
    hr = (rng.random(shape, dtype=np.float32) + 0.1).astype(np.float32)
    experts = [hr + rng.normal(0, 0.05, shape).astype(np.float32) for _ in range(2)]
    grid = TileGrid(shape, 4, 2)
    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        res = fn()
        times[name] = time.perf_counter() - t0
        if on_step is not None:
            on_step(name, times[name])
        return res


    # the engine's fit pass: the statistics cache computes its entries with box_statistics
    st = timed(
        "statistics",
        lambda: box_statistics(hr, experts, StatsKey.make(
            region="first_block", stride=grid.stride, patch_size=grid.patch_size,
            window="hann", edge_power=2.0, grad_operator="sobel", with_edge=True,
            with_grad=True)),
    )
    q, b = combine(st, lambda_edge=0.25, lambda_grad=0.2)
    w, learned = timed(
        "solve",
        lambda: fit_weights(
            q, b, st.counts, grid.counts, simplex=True, lambda_ridge=1e-4, laplacian_tau=0.0
        ),
    )
    timed(
        "solve_unconstrained",
        lambda: fit_weights(
            q, b, st.counts, grid.counts, simplex=False, lambda_ridge=1e-4, laplacian_tau=0.0
        ),
    )
    # more experts than the support enumeration takes: the active-set solver
    many = 8
    q_many = np.tile(np.eye(many) + 0.5, (3, 1, 1))
    timed(
        "solve_many_experts",
        lambda: solve_simplex_qp(q_many, np.ones((3, many)), 1e-4),
    )
    timed("smoothing", lambda: laplacian_smooth(w, learned, grid.counts, 0.05))
    mask, _ = valid_mask(hr, experts)
    mu, sd, mus, sds = normalisation(hr, experts, mask)
    bm = timed("brain_mask", lambda: brain_mask(hr))
    pred = timed(
        "blend",
        lambda: blend_volume(
            experts, grid, w, mus=mus, sds=sds, mu_hr=mu, sd_hr=sd, mask=bm, window="hann"
        ),
    )
    maps = timed("weight_maps", lambda: weight_maps(w, grid))
    timed("weight_analysis", lambda: weight_analysis(maps, ["a", "b"]))
    timed("metrics", lambda: volume_metrics(hr, pred, ssim_axis="axial"))
    return times


def dispatchers() -> list[Any]:
    """Every Numba dispatcher (kernel) of ``pacs_numba.kernels``."""
    out = []
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"{kernels.__name__}.{info.name}")
        out += [obj for obj in vars(mod).values() if isinstance(obj, Dispatcher)]
    return out


def cache_counts() -> tuple[int, int]:
    """Numba compile-cache hits and misses over every kernel dispatcher of the package."""
    hits = misses = 0
    for obj in dispatchers():
        hits += sum(obj.stats.cache_hits.values())
        misses += sum(obj.stats.cache_misses.values())
    return hits, misses
def kernel_index_files() -> tuple[int, int]:
    """(kernels with a compile-cache index file, kernels) over the package's dispatchers."""
    have = total = 0
    for disp in dispatchers():
        total += 1
        cache = getattr(disp, "_cache", None)
        index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
        have += bool(index and os.path.exists(index))
    return have, total


def kernels_ready() -> tuple[int, int]:
    """(kernels compiled or loaded in this process, kernels) over the package's dispatchers."""
    disps = dispatchers()
    return sum(1 for d in disps if d.signatures), len(disps)


def _log_progress(step: str, secs: float) -> None:
    """One INFO line per warm-up step of a first compile: kernels ready out of all."""
    ready, total = kernels_ready()
    log.info("compiling kernels: %d/%d ready (%s: %.1f s)", ready, total, step, secs)


def load_kernels() -> int:
    """Compile the kernels, or load them from Numba's cache, before the first patient.

    On a first run this takes 20-60 s (minutes on a busy node), and a person watching a
    terminal should know why nothing moves: an INFO line announces it when the compile cache
    lacks kernels, one per step says how many kernels are ready out of all, and one gives the
    time it took.  Returns the number of kernels compiled so far (cache misses),
    for :func:`check_no_compile`.
    """
    have, _ = kernel_index_files()
    where = numba.config.CACHE_DIR or "the kernels' __pycache__ (set NUMBA_CACHE_DIR to move it)"
    # Some kernels (e.g. predict's) may never have been compiled, so "no index file at all"
    # is the sign of a first run; a partial cache only gets the line with the time below.
    announce = not CACHE or have == 0
    if announce:
        why = "the compile cache is off (PACS_NUMBA_CACHE=0)" if not CACHE else "first run only"
        log.info("compiling kernels (%s) ...", why)
    _, misses0 = cache_counts()
    t0 = time.perf_counter()
    warm_kernels(_log_progress if announce else None)
    secs = time.perf_counter() - t0
    _, total_misses = cache_counts()
    misses = total_misses - misses0
    if misses or not CACHE:
        log.info(
            "compiling kernels (first run only) took %.1f s: %d compiled%s",
            secs,
            misses,
            f", cached in {where}" if CACHE else "",
        )
    else:
        log.debug("kernels loaded from the compile cache in %.2f s (%s)", secs, where)
    return total_misses


def check_no_compile(misses_before: int) -> None:
    """Say so if a task compiled a kernel that the start-up load did not cover."""
    _, misses = cache_counts()
    if misses > misses_before:
        log.info(
            "%d more kernel signature(s) compiled during the run (not covered by the start-up "
            "load; they are cached now)",
            misses - misses_before,
        )
    else:
        log.debug("no kernel compiled during the run")
