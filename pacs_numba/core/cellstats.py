"""Decomposed per-tile statistics, computed once per patient and cached (algorithm A4).

The fit of algorithm A4-A5 needs, per tile, ``Q = sum omega (x x^T + lambda_grad sum_d G_d G_d^T)``
and ``B = sum omega (x y + lambda_grad sum_d G_d H_d)`` with ``omega = mask (1 + lambda_edge t^p)``.
Both are linear in ``lambda_edge``, ``lambda_grad`` and their product, so a patient is reduced
once to four *parts* per tile (:class:`CellStats`)::

    Q = P_value + lambda_edge P_value_edge + lambda_grad (P_grad + lambda_edge P_grad_edge)

and any lambda, any fold (a sum over its training patients) and, for the published
``first_block`` fit, any stride that is a multiple of the stored cell size (coarse cells are
unions of fine cells; the published fit uses only each tile's label cell, so the patch size
does not enter) follow by sums.  What does change the parts is part of the cache key: the
input files, the cell size, ``edge_power`` (the shape of the edge map), ``grad_operator``,
and which parts were computed.

The ``window`` fit region (:data:`FIT_REGIONS`) fits each tile on its whole box, weighted by the
blending window.  A Hann box weight is the product of three per-axis profiles *relative to
the tile's own anchor*, so a voxel has a different weight in each of the (up to
``ceil(p/s)^3``) boxes that cover it, and per-cell sums do not compose into box sums.
Storing per-(cell, position-in-tile) sums would be exact, but it is as large as the box
statistics themselves and depends on the patch size and the window anyway; so this mode
makes a direct pass per (patch, stride, window) and caches that, still decomposed in the
lambdas.

The ``centre`` fit region (algorithm A4) fits each tile on the voxels its blending window
weighs most (:func:`centre_windows`): the same pass as ``window`` with 0/1 windows, so
a voxel is read once, as in the cell pass.  ``StatsKey.normalisation`` says whether the
z-scores are the HR's (algorithm A3) or the experts' own (``fit_normalisation: experts``).

Cache
-----
Entries live in ``<volume cache dir>/cellstats/<key>.npz``; ``key`` hashes the format
version, every input file's :func:`pacs_numba.store.volumes.file_fingerprint` (absolute path, size,
``mtime_ns``, ``ctime_ns`` and a content sample: a rewritten input gets a new key) and the
settings above.  An entry is written under a unique temporary name and
renamed into place (:func:`pacs_numba.store.atomic.atomic_savez`), under an advisory node lock
so that SLURM tasks on one node compute it once; an unreadable entry is recomputed with a WARNING.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._config import FIT_NORMALISATIONS, GRAD_OPERATORS, WINDOWS
from ..config import FIT_REGIONS, PacsConfig, check_stride
from ..errors import ConfigError, InputError
from ..kernels.blend import _window_table
from ..kernels.gated import _gated_moments
from ..kernels.stats import (
    N_PARTS,
    _box_moments,
    _sobel_magnitude_max,
    _valid_mask,
    _volume_moments,
)
from ..resources.threads import run_chunks
from .blending import Normalisation
from .checks import as_volume_list
from .gating import edge_gate, gated_normal_equations, term_index
from .statistics import PatientStats, check_option, check_volumes
from .tiling import TileGrid

log = logging.getLogger(__name__)


#: Parts the edge-gated model adds (value moments weighted by ``g`` and ``g^2``).
N_GATED_PARTS = 2

#: Bumped whenever the meaning or layout of a stored entry changes.
FORMAT = 1


def effective_region(region: str, patch_size: int, stride: int, window: str) -> str:
    """Return the fit region a setting really uses (algorithm A4).

    ``centre`` without overlap, or with flat windows (every covering tile weighs a voxel
    alike, ties go to the largest id), is the label cell: ``first_block``.
    """
    if region == "centre" and (stride >= patch_size or window == "flat"):
        return "first_block"
    return region


@dataclass(frozen=True)
class StatsKey:
    """The settings a patient's decomposed statistics depend on.

    Attributes
    ----------
    region : {"first_block", "window"}
        ``first_block``: label cells of edge ``stride`` (algorithm A2); ``window``: whole
        boxes weighted by the blending window.
    stride : int
        Cell size (``first_block``) or anchor spacing (``window``).
    patch_size : int
        Box edge (``window`` only; equal to ``stride`` for ``first_block``).
    window : {"flat", "hann"}
        Effective box window (``window`` only; ``flat`` for ``first_block`` and whenever
        ``stride >= patch_size``, as the blend does).
    edge_power : float
        Exponent of the edge term (ignored, stored as 0, when ``with_edge`` is false).
    grad_operator : str
        Gradient operator (ignored, stored as ``""``, when ``with_grad`` is false).
    with_edge, with_grad : bool
        Which parts were computed (a ``False`` part is all zero).
    with_gate : bool
        Whether the two gated parts of the edge-gated model (algorithm A5.2) follow the
        four parts (``first_block`` only).
    normalisation : {"hr", "experts"}
        z-scores of the fit: the HR's mask and statistics (algorithm A3), or the experts'
        own as at predict (``pacs_sr.fit_normalisation``, algorithm A4).
    """

    region: str
    stride: int
    patch_size: int
    window: str
    edge_power: float
    grad_operator: str
    with_edge: bool
    with_grad: bool
    with_gate: bool = False
    normalisation: str = "hr"

    @classmethod
    def make(
        cls,
        *,
        region: str,
        stride: int,
        patch_size: int,
        window: str,
        edge_power: float,
        grad_operator: str,
        with_edge: bool,
        with_grad: bool,
        with_gate: bool = False,
        normalisation: str = "hr",
    ) -> StatsKey:
        """Normalise the settings (drop those that cannot matter) and check them.

        Raises
        ------
        ConfigError
            On an unknown region, window or operator, a bad stride/patch pair or a
            non-positive ``edge_power``.
        """
        if region not in FIT_REGIONS:
            raise ConfigError(f"fit_region {region!r}: expected one of {list(FIT_REGIONS)}")
        if window not in WINDOWS:
            raise ConfigError(f"mixing_window {window!r}: expected one of {sorted(WINDOWS)}")
        if grad_operator not in GRAD_OPERATORS:
            raise ConfigError(
                f"grad_operator {grad_operator!r}: expected one of {sorted(GRAD_OPERATORS)}"
            )
        patch_size = int(patch_size)
        stride = check_stride(patch_size, stride)
        if with_edge and not (math.isfinite(edge_power) and edge_power > 0):
            raise ConfigError(f"edge_power must be a finite number > 0, got {edge_power!r}")
        if with_gate and region != "first_block":
            raise ConfigError("gating: edge statistics need fit_region: first_block")
        if normalisation not in FIT_NORMALISATIONS:
            raise ConfigError(f"fit_normalisation {normalisation!r}: expected one of "
                              f"{list(FIT_NORMALISATIONS)}")
        region = effective_region(region, patch_size, stride, window)
        if region == "first_block":
            patch_size, window = stride, "flat"
        elif stride >= patch_size:
            window = "flat"
        return cls(
            region, stride, patch_size, window,
            float(edge_power) if with_edge else 0.0,
            grad_operator if with_grad else "",
            bool(with_edge), bool(with_grad), bool(with_gate), normalisation,
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for hashing and the entry's metadata)."""
        return {
            "region": self.region, "stride": self.stride, "patch_size": self.patch_size,
            "window": self.window, "edge_power": self.edge_power,
            "grad_operator": self.grad_operator, "with_edge": self.with_edge,
            "with_grad": self.with_grad,
            # only when set, so the keys (and cache entries) of ungated statistics stay
            **({"with_gate": True} if self.with_gate else {}),
            **({"normalisation": self.normalisation} if self.normalisation != "hr" else {}),
        }

    @property
    def n_parts(self) -> int:
        """Parts per tile: the four of algorithm A4, plus two gated ones (A5.2)."""
        return N_PARTS + (N_GATED_PARTS if self.with_gate else 0)


@dataclass(frozen=True, eq=False)
class CellStats:
    """One patient's (or a sum of patients') decomposed per-tile statistics.

    Attributes
    ----------
    parts : (T, key.n_parts, M + M (M + 1) / 2) float64
        Per tile: the value, value-edge, gradient and gradient-edge parts
        (``kernels.stats.PART_*``), then with ``key.with_gate`` the value parts weighted
        by the edge gate ``g`` and by ``g^2`` (algorithm A5.2); in each, terms
        ``0..M-1`` are the cross terms with the HR and the rest the upper triangle of
        the expert products, row-major.
    counts : (T,) int64
        Mask voxels per tile (with a non-zero window weight).
    shape : tuple of 3 int
        Volume shape.
    key : StatsKey
        Settings the parts were computed with.
    n_experts : int
    mu_hr, sd_hr : float
        The HR's mean and floored std over its mask (algorithm A3.2), so a patient whose HR
        has no variance can be left out of the fit without reading it again; NaN for a sum
        over patients.
    """

    parts: NDArray[np.float64]
    counts: NDArray[np.int64]
    shape: tuple[int, int, int]
    key: StatsKey
    n_experts: int
    mu_hr: float = math.nan
    sd_hr: float = math.nan

    @property
    def n_mask(self) -> int:
        """Mask voxels in all tiles (for ``first_block``: the mask size)."""
        return int(self.counts.sum())

    def coarsen(self, stride: int) -> CellStats:
        """Statistics of the ``first_block`` cells of ``stride``, a multiple of the cell size.

        Coarse cell ``(i0, i1, i2)`` is the union of the fine cells ``(i0 f + a, ...)``,
        ``f = stride // cell``, clipped to the grid, so sums are exact.

        Raises
        ------
        ConfigError
            If this is not ``first_block`` data or ``stride`` is not a multiple of the
            cell size.
        """
        cell = self.key.stride
        if self.key.region != "first_block" or stride % cell:
            raise ConfigError(
                f"stride {stride} cannot be built from {self.key.region} statistics of "
                f"cell size {cell} (it must be a multiple)"
            )
        if stride == cell:
            return self
        key = StatsKey(**{**self.key.as_dict(), "stride": stride, "patch_size": stride})
        return self._grouped(stride // cell, key)

    def parents(self) -> CellStats:
        """Statistics of the parent tiles of the multi-scale prior (algorithm A5.1).

        Parent ``(i0, i1, i2)`` holds the tiles ``(2 i0 + a, 2 i1 + b, 2 i2 + c)``: for
        ``first_block`` this is :meth:`coarsen` to twice the stride; for ``centre`` the
        union of the children's regions (a parent only serves as a prior, it is never
        blended, so its region need not be a tile's).

        Raises
        ------
        ConfigError
            For ``window`` statistics, whose boxes overlap.
        """
        if self.key.region == "first_block":
            return self.coarsen(2 * self.key.stride)
        if self.key.region != "centre":
            raise ConfigError(f"{self.key.region} statistics have no parent tiles")
        key = StatsKey(**{**self.key.as_dict(), "stride": 2 * self.key.stride,
                          "patch_size": 2 * self.key.patch_size})
        return self._grouped(2, key)

    def _grouped(self, f: int, key: StatsKey) -> CellStats:
        fine = tuple(math.ceil(n / self.key.stride) for n in self.shape)
        coarse = tuple(math.ceil(n / f) for n in fine)
        pad = [(0, c * f - n) for c, n in zip(coarse, fine, strict=True)]
        p = self.parts.reshape(*fine, -1)
        p = np.pad(p, [*pad, (0, 0)])
        p = p.reshape(coarse[0], f, coarse[1], f, coarse[2], f, -1).sum(axis=(1, 3, 5))
        c = np.pad(self.counts.reshape(fine), pad)
        c = c.reshape(coarse[0], f, coarse[1], f, coarse[2], f).sum(axis=(1, 3, 5))
        return CellStats(
            p.reshape(-1, self.parts.shape[1], self.parts.shape[-1]),
            c.reshape(-1).astype(np.int64),
            self.shape, key, self.n_experts, self.mu_hr, self.sd_hr,
        )


def fit_stats_key(pacs: PacsConfig) -> StatsKey:
    """Return the statistics key a config's fit needs (only the parts its lambdas use)."""
    return StatsKey.make(
        region=pacs.fit_region, stride=pacs.stride, patch_size=pacs.patch_size,
        window=pacs.mixing_window, edge_power=pacs.edge_power,
        grad_operator=pacs.grad_operator, with_edge=pacs.lambda_edge > 0,
        with_grad=pacs.lambda_grad > 0, with_gate=pacs.gating == "edge",
        normalisation=pacs.fit_normalisation,
    )


def combine(
    stats: CellStats, *, lambda_edge: float, lambda_grad: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-tile ``Q`` and ``B`` of algorithm A4 for given lambdas.

    Parameters
    ----------
    stats : CellStats
        Decomposed statistics (one patient or a sum).
    lambda_edge, lambda_grad : float
        Edge and gradient weights (>= 0).

    Returns
    -------
    Q : (T, M, M) float64
    B : (T, M) float64

    Raises
    ------
    ConfigError
        If a lambda is negative, or non-zero while its parts were not computed.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> hr = rng.random((6, 5, 4), np.float32) + 0.5
    >>> st = box_statistics(hr, [hr, 2 * hr], StatsKey.make(
    ...     region="first_block", stride=4, patch_size=4, window="flat", edge_power=1.0,
    ...     grad_operator="sobel", with_edge=True, with_grad=False))
    >>> Q, B = combine(st, lambda_edge=0.0, lambda_grad=0.0)
    >>> Q.shape, bool(np.isclose(Q.sum(axis=0)[0, 0], 120.0))
    ((4, 2, 2), True)
    """
    for name, lam, have in (
        ("lambda_edge", lambda_edge, stats.key.with_edge),
        ("lambda_grad", lambda_grad, stats.key.with_grad),
    ):
        if not (math.isfinite(lam) and lam >= 0):
            raise ConfigError(f"{name} must be a finite number >= 0, got {lam!r}")
        if lam > 0 and not have:
            raise ConfigError(f"{name}={lam} but these statistics have no {name[7:]} parts")
    p = stats.parts
    terms = p[:, 0] + lambda_edge * p[:, 1] + lambda_grad * (p[:, 2] + lambda_edge * p[:, 3])
    m = stats.n_experts
    return terms[:, term_index(m)], terms[:, :m].copy()


def combine_gated(stats: CellStats) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per-tile ``Q (T, 2M, 2M)`` and ``B (T, 2M)`` of the edge-gated fit (algorithm A5.2).

    Raises
    ------
    ConfigError
        If the statistics have no gated parts.
    """
    if not stats.key.with_gate:
        raise ConfigError("gating: edge needs statistics with the gated parts")
    q, b = combine(stats, lambda_edge=0.0, lambda_grad=0.0)
    return gated_normal_equations(q, b, stats.parts[:, N_PARTS:N_PARTS + N_GATED_PARTS])


def sum_stats(items: Sequence[CellStats]) -> CellStats:
    """Sum several patients' statistics (in the order given: deterministic).

    Raises
    ------
    InputError
        If the shapes, keys or expert counts differ, or ``items`` is empty.
    """
    if not items:
        raise InputError("no statistics to sum")
    first = items[0]
    parts = first.parts.copy()
    counts = first.counts.copy()
    for s in items[1:]:
        if s.shape != first.shape or s.key != first.key or s.n_experts != first.n_experts:
            raise InputError(
                f"cannot sum statistics of shape {s.shape} / {s.key} with {first.shape} / "
                f"{first.key}"
            )
        parts += s.parts
        counts += s.counts
    return CellStats(parts, counts, first.shape, first.key, first.n_experts)


def box_statistics(
    hr: ArrayLike, experts: Sequence[ArrayLike], key: StatsKey
) -> CellStats:
    """Compute one patient's decomposed statistics (one fused pass over the volumes).

    Parameters
    ----------
    hr : (N0, N1, N2) array_like
        HR volume (float32 memmaps are used in place).
    experts : sequence of M (N0, N1, N2) array_like
        Expert volumes, in model order.
    key : StatsKey
        Region, cell/box geometry and which parts to compute.

    Returns
    -------
    CellStats

    Raises
    ------
    InputError
        If a volume is not 3-D, there is no expert, or the shapes differ.

    Notes
    -----
    Mask, z-scoring and the edge map are those of
    :func:`patient_statistics`; with ``first_block`` the result
    recombined by :func:`combine` equals its Q and B up to float64 rounding.
    """
    hr_v, ex = check_volumes(hr, experts)
    mask, _ = _valid_mask(hr_v, ex)
    mask.flags.writeable = False
    mom = _volume_moments(as_volume_list([hr_v, *ex]), mask)
    mu_hr, sd_hr = float(mom[0, 0]), float(mom[0, 1])
    if key.normalisation == "experts":
        mom = experts_moments(ex)
    mus = np.ascontiguousarray(mom[:, 0])
    sds = np.ascontiguousarray(mom[:, 1])
    n_chunks = numba.get_num_threads()
    gmax = 0.0
    if key.with_edge:
        gmax = float(_sobel_magnitude_max(hr_v, float(mus[0]), float(sds[0]), n_chunks))
    code = WINDOWS[key.window]
    wins = [
        _window_table(-(-n // key.stride), n, key.patch_size, key.stride, code)
        for n in hr_v.shape
    ]
    if key.region == "centre":
        wins = [centre_windows(w, n, key.stride) for w, n in zip(wins, hr_v.shape, strict=True)]
    parts, counts = _box_moments(
        hr_v, ex, mask, key.patch_size, key.stride, wins[0], wins[1], wins[2], mus, sds,
        float(key.edge_power) if key.with_edge else 1.0, gmax, key.with_edge, key.with_grad,
        int(GRAD_OPERATORS[key.grad_operator or "sobel"]), n_chunks, run_chunks,
    )
    if key.with_gate:
        gate = edge_gate(ex)
        gated = _gated_moments(hr_v, ex, mask, key.stride, mus, sds, gate)
        del gate
        parts = np.ascontiguousarray(np.concatenate([parts, gated], axis=1))
    return CellStats(parts, counts, tuple(hr_v.shape), key, len(ex),  # type: ignore[arg-type]
                     mu_hr, sd_hr)


def experts_moments(experts: Sequence[NDArray[np.float32]]) -> NDArray[np.float64]:
    """z-score moments of ``fit_normalisation: experts``: predict's, for the fit (algorithm A4).

    Returns
    -------
    (M + 1, 2) float64
        Row ``1 + e``: mean and floored std of expert ``e`` as ``predict`` z-scores it
        (:meth:`Normalisation.from_experts`, algorithm B6); row 0, standing for the HR's:
        the mean of the experts' means and of their stds, the ``mean`` map-back.  The HR is
        then z-scored with the statistics its blend is mapped back with, so the fit
        minimises the squared error ``predict`` makes, divided by the squared std.

    Raises
    ------
    InputError
        If the experts have no voxel > 0 (nothing ``predict`` could blend either).
    """
    norm = Normalisation.from_experts(experts)
    mom = np.empty((len(experts) + 1, 2))
    mom[0] = norm.mu_out, norm.sd_out
    mom[1:, 0] = norm.mus
    mom[1:, 1] = norm.sds
    return mom


def centre_windows(table: NDArray[np.float32], n: int, stride: int) -> NDArray[np.float32]:
    """0/1 windows of the ``centre`` fit region along one axis (algorithm A4).

    Parameters
    ----------
    table : (n_tiles, patch) float32
        The blend's windows along the axis (``kernels.blend._window_table``).
    n : int
        Axis length.
    stride : int

    Returns
    -------
    (n_tiles, patch) float32
        1 where the tile's window weighs the voxel more than every other tile's window
        that covers it (ties: the largest tile id, the label rule of algorithm A2), else
        0.  Each voxel belongs to exactly one tile.  With a Hann window of ``p = 2 s``
        tile ``t`` gets ``[t s + s/2, t s + 3 s/2)``: its box's central block, where the
        blend uses its weights most, instead of the box's first block.

    Examples
    --------
    >>> from pacs_numba.kernels.blend import _window_table
    >>> w = centre_windows(_window_table(3, 12, 8, 4, 1), 12, 4)  # Hann, p = 8, s = 4
    >>> [next(t for t in range(3) if 0 <= v - 4 * t < 8 and w[t, v - 4 * t])
    ...  for v in range(12)]
    [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    """
    n_tiles, patch = table.shape
    out = np.zeros_like(table)
    best = np.full(n, -1.0)
    owner = np.zeros(n, np.int64)
    for t in range(n_tiles):  # increasing id: ">=" gives ties to the largest
        lo = t * stride
        hi = min(lo + patch, n)
        h = table[t, : hi - lo].astype(np.float64)
        take = h >= best[lo:hi]
        best[lo:hi] = np.where(take, h, best[lo:hi])
        owner[lo:hi] = np.where(take, t, owner[lo:hi])
    v = np.arange(n)
    out[owner, v - owner * stride] = 1.0
    return out


def patient_statistics(
    hr: ArrayLike,
    experts: Sequence[ArrayLike],
    grid: TileGrid,
    *,
    lambda_edge: float,
    edge_power: float,
    lambda_grad: float,
    grad_operator: str = "sobel",
) -> PatientStats:
    """One patient's per-tile normal equations, the whole pipeline (algorithm A3-A4).

    The fit's own path: the decomposed per-cell moments of :func:`box_statistics` over
    the label cells (``first_block``, algorithm A2), recombined by :func:`combine` for
    these lambdas, plus the normalisation statistics and non-finite counts of the valid
    mask.  (The engine caches the decomposed moments and recombines them per setting.)

    Parameters
    ----------
    hr : (N0, N1, N2) array_like
        HR volume (float32 memmaps are used in place).
    experts : sequence of M (N0, N1, N2) array_like
        Expert volumes, in model order.
    grid : TileGrid
        Tile grid of the volume shape.  Only ``grid.stride`` enters the fit (voxel
        labels, algorithm A2); ``patch_size`` does not.
    lambda_edge : float
        Edge weight strength; 0 turns edge weighting off.
    edge_power : float
        Exponent of the normalised gradient magnitude in the edge weight.
    lambda_grad : float
        Weight of the gradient-matching terms; 0 turns them off.
    grad_operator : {"sobel", "prewitt", "scharr"}
        Gradient operator of the gradient terms (the edge map always uses sobel).

    Returns
    -------
    PatientStats
        ``Q (T, M, M)``, ``B (T, M)``, ``counts (T,)`` with ``T = grid.n_tiles``, the
        normalisation statistics, non-finite counts and the mask size.  An empty mask
        is not an error: counts, Q and B are then all zero.

    Raises
    ------
    InputError
        If a volume is not 3-D, there is no expert, the shapes differ, or ``grid``
        was built for another shape.
    ConfigError
        If ``grad_operator`` is unknown, or a lambda or ``edge_power`` is negative or
        not finite.

    Notes
    -----
    Voxels with a non-finite HR or expert value are excluded and counted (see the
    module docstring).  Thread-safe: kernels write only their own outputs, so
    several patients may be processed concurrently from a thread pool (with a
    thread-safe Numba threading layer).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> hr = rng.random((6, 5, 4), np.float32) + 0.5
    >>> st = patient_statistics(hr, [hr, hr + 1], TileGrid(hr.shape, 4, 4),
    ...                         lambda_edge=0.0, edge_power=1.0, lambda_grad=0.0)
    >>> st.Q.shape, int(st.counts.sum()), np.allclose(st.Q.sum(0), 120.0)
    ((4, 2, 2), 120, True)
    """
    if grad_operator not in GRAD_OPERATORS:
        raise ConfigError(
            f"unknown grad_operator {grad_operator!r}; expected one of {sorted(GRAD_OPERATORS)}"
        )
    lambda_edge = check_option("lambda_edge", lambda_edge)
    edge_power = check_option("edge_power", edge_power)
    lambda_grad = check_option("lambda_grad", lambda_grad)
    hr_v, ex = check_volumes(hr, experts)
    if tuple(grid.shape) != hr_v.shape:
        raise InputError(
            f"tile grid was built for shape {tuple(grid.shape)}; the HR volume has shape "
            f"{hr_v.shape}"
        )
    mask, nonfinite = _valid_mask(hr_v, ex)
    mask.flags.writeable = False  # same compiled signature as masks from as_mask_u8
    mom = _volume_moments(as_volume_list([hr_v, *ex]), mask)
    key = StatsKey.make(
        region="first_block", stride=grid.stride, patch_size=grid.stride, window="flat",
        edge_power=edge_power if edge_power > 0 else 1.0, grad_operator=grad_operator,
        with_edge=lambda_edge > 0, with_grad=lambda_grad > 0,
    )
    cells = box_statistics(hr_v, ex, key)
    q, b = combine(cells, lambda_edge=lambda_edge, lambda_grad=lambda_grad)
    return PatientStats(
        Q=q,
        B=b,
        counts=cells.counts,
        mu_hr=float(mom[0, 0]),
        sd_hr=float(mom[0, 1]),
        mus=mom[1:, 0].copy(),
        sds=mom[1:, 1].copy(),
        nonfinite=nonfinite,
        n_mask=int(cells.counts.sum()),
    )
