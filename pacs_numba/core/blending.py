"""Blend the experts with the tile weights, build the weight maps and the brain mask.

Public wrappers of :mod:`pacs_numba.kernels.blend` (algorithm A7.2-A7.5, A8): they
check shapes and dtypes, bring arrays into the kernels' layout and pick the
window; the kernels do the work in one pass over the volumes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._config import BRAIN_THRESHOLD, HR_FREE_MAPPINGS, WINDOWS
from ..errors import InputError
from ..kernels.blend import _blend_volume, _brain_mask, _weight_analysis, _weight_maps
from .checks import (
    as_mask_u8,
    as_tile_weights,
    as_volume,
    as_volume_list,
    check_volume_list,
    readonly,
)
from .gating import edge_gate, gated_mix
from .mapping import map_back_weighted
from .statistics import by_slabs, hr_is_flat, normalisation, valid_mask
from .tiling import TileGrid

log = logging.getLogger(__name__)


def brain_mask(hr: ArrayLike, *, threshold: float = BRAIN_THRESHOLD) -> NDArray[np.uint8]:
    """Largest 26-connected component of ``hr >= threshold`` (algorithm A7.5, no registration).

    Parameters
    ----------
    hr : array_like, (N0, N1, N2)
        Raw HR volume (converted to float32; the comparison is made in float32
        like the reference's ``vol >= 0.1`` on a float32 array).
    threshold : float, optional
        Foreground threshold, default ``BRAIN_THRESHOLD`` (0.1).

    Returns
    -------
    ndarray of uint8, (N0, N1, N2)
        1 on the largest component, 0 elsewhere.  Among equally large components
        the one whose first voxel comes first in C order wins, as
        ``scipy.ndimage.label`` + ``argmax(bincount)`` decides.  All zeros when no
        voxel reaches the threshold (the reference raises ``ValueError`` there).

    Raises
    ------
    InputError
        If ``hr`` is not 3-D.

    Notes
    -----
    NaN voxels are background.  Allocates a union-find scratch of 4 bytes per
    voxel (8 above 2**31 voxels) besides the 1-byte mask.

    Examples
    --------
    >>> import numpy as np
    >>> hr = np.zeros((4, 4, 6), np.float32)
    >>> hr[1:3, 1:3, 0:2] = 1.0
    >>> hr[1:3, 1:3, 3:6] = 1.0
    >>> int(brain_mask(hr).sum())
    12
    """
    vol = as_volume(hr)
    n = vol.size
    parent = np.empty(n, dtype=np.int32 if n < 2**31 - 1 else np.int64)
    return _brain_mask(vol, float(threshold), parent, numba.get_num_threads())


def expert_mean(experts: Sequence[ArrayLike], *, slab: int | None = None) -> NDArray[np.float32]:
    """Voxelwise mean of the experts, non-finite values read as 0 (algorithm B6's HR proxy).

    Parameters
    ----------
    experts : sequence of (N0, N1, N2) array_like
        Expert volumes.
    slab : int, optional
        Go ``slab`` axis-0 planes at a time (small temporaries) and give back each slab's
        pages of volumes mapped from the volume cache (``statistics.by_slabs``); the same
        values.

    Returns
    -------
    (N0, N1, N2) float32
        ``sum_m where(isfinite(x_m), x_m, 0) / M``, summed in float32 in expert order.

    Raises
    ------
    InputError
        If there is no expert, or they are not 3-D volumes of one shape.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.array([1.0, np.nan], np.float32).reshape(1, 1, 2)
    >>> expert_mean([a, 3 * np.ones_like(a)]).ravel().tolist()
    [2.0, 1.5]
    """
    shape = check_volume_list(experts)
    proxy = np.zeros(shape, dtype=np.float32)
    vols = [np.asarray(v) for v in experts]
    zero, n = np.float32(0), np.float32(len(vols))

    def fill(lo: int, hi: int) -> None:
        out = proxy[lo:hi]
        for vol in vols:  # summed in expert order, voxel by voxel: any slab gives the same
            part = vol[lo:hi]
            out += np.where(np.isfinite(part), part, zero)
        out /= n

    if slab is None:
        fill(0, shape[0])
    else:
        by_slabs(shape[0], slab, vols, fill)
    return proxy


@dataclass(frozen=True, eq=False)
class Normalisation:
    """Where a blend's z-score statistics come from, and what maps it back (algorithm A7.1, B6).

    The experts are z-scored with ``mus``/``sds`` and the blend is mapped back with
    ``mu_out``/``sd_out``.  Build it with :meth:`from_hr` (evaluate: the HR is the source)
    or :meth:`from_experts` (predict: no HR); :func:`blend_patient` takes either, so every
    blend goes through one path whatever the source.

    Attributes
    ----------
    mus, sds : (M,) float64
        Each expert's mean and floored std over the statistics mask.
    mu_out, sd_out : float
        Mean and std the blend is mapped back to.
    source : str
        ``"hr"`` or ``"experts"`` (for messages).
    mapping : {"mean", "weighted"}
        ``mean``: map back with ``mu_out``/``sd_out``; ``weighted`` (HR-free only,
        ``pacs_sr.hr_free_mapping``): with the blend-weighted mean and std of the experts
        at every voxel (:mod:`pacs_numba.core.mapping`).
    """

    mus: NDArray[np.float64]
    sds: NDArray[np.float64]
    mu_out: float
    sd_out: float
    source: str
    mapping: str = "mean"

    @classmethod
    def from_hr(cls, hr: ArrayLike, experts: Sequence[ArrayLike], *,
                slab: int | None = None) -> Normalisation:
        """Statistics over the valid HR mask, mapped back with the HR's own (algorithm A7.1).

        The mask is ``hr > 0`` where the HR and every expert are finite.  ``slab``: go
        that many planes at a time, giving back mapped pages (``statistics.by_slabs``).

        Raises
        ------
        InputError
            If the HR has no valid voxel > 0 (nothing to normalise over), or no variance
            inside that mask.
        """
        mask, _ = valid_mask(hr, experts, slab=slab)
        if not mask.any():
            raise InputError("the HR has no voxel > 0 (empty mask)")
        mu_hr, sd_hr, mus, sds = normalisation(hr, experts, mask, slab=slab)
        if hr_is_flat(mu_hr, sd_hr):
            raise InputError(f"the HR has no variance inside its mask (constant {mu_hr:.6g})")
        return cls(mus, sds, mu_hr, sd_hr, "hr")

    @classmethod
    def from_experts(
        cls, experts: Sequence[ArrayLike], proxy: ArrayLike | None = None,
        mapping: str = "mean", *, slab: int | None = None,
    ) -> Normalisation:
        """Statistics without an HR (algorithm B6).

        The statistics mask is ``proxy > 0`` where every expert is finite, ``proxy``
        being :func:`expert_mean` (pass it when already computed).  Each expert is
        z-scored with its own mean/std over that mask, and the blend is mapped back with
        the mean of the experts' means and the mean of their stds: the experts all
        estimate the same scan, so these estimate the HR's.  ``mapping="weighted"``
        maps back voxel by voxel with the blend-weighted experts' statistics instead.
        ``slab``: as for :meth:`from_hr`.

        Raises
        ------
        InputError
            If the experts have no valid voxel > 0.
        ValueError
            On an unknown ``mapping``.
        """
        if mapping not in HR_FREE_MAPPINGS:
            raise ValueError(f"hr_free_mapping must be one of {list(HR_FREE_MAPPINGS)}, got "
                             f"{mapping!r}")
        if proxy is None:
            proxy = expert_mean(experts, slab=slab)
        valid, _ = valid_mask(proxy, experts, slab=slab)
        if not valid.any():
            raise InputError("the experts have no voxel > 0: nothing to blend")
        _, _, mus, sds = normalisation(proxy, experts, valid, slab=slab)
        return cls(mus, sds, float(np.mean(mus)), float(np.mean(sds)), "experts", mapping)


def blend_patient(
    experts: Sequence[ArrayLike],
    grid: TileGrid,
    weights: ArrayLike,
    *,
    window: str,
    norm: Normalisation,
    brain_mask: ArrayLike | None,
    gate: ArrayLike | None = None,
) -> NDArray[np.float32]:
    """Blend one patient (algorithm A7.1-A7.5) from a normalisation source and a brain mask.

    The one blend path of the engine, ``predict`` and ``demo``: the caller decides where the
    statistics come from (``norm``) and which brain mask applies (the HR's largest
    component, the experts' mean's, or a registered atlas mask).

    Parameters
    ----------
    experts : sequence of (N0, N1, N2) array_like
        Expert volumes, in the order of the weight columns.
    grid : TileGrid
        The tile grid of ``weights``.
    weights : (n_tiles, M) or (n_tiles, 2M) array_like
        Tile weights (``1/M`` for tiles without a learned weight); with ``2M`` columns the
        edge-gated model's edge weights ``a`` then flat weights ``b`` (algorithm A5.2).
    window : {"flat", "hann"}
        Mixing window where tiles overlap.
    norm : Normalisation
        z-score statistics of the experts and the mean/std the blend is mapped back to.
    brain_mask : (N0, N1, N2) array_like of bool or uint8, or None
        Multiplied into the blend (nonzero = inside); None = no masking.
    gate : (N0, N1, N2) float32, optional
        Edge gate ``g`` of the experts, used with ``2M`` weight columns (default: computed
        here by :func:`pacs_numba.core.gating.edge_gate`, from the experts alone): the
        blend is ``g blend(a) + (1 - g) blend(b)``, at every voxel a convex combination
        of the experts with weights ``g W_a + (1 - g) W_b``.

    Returns
    -------
    (N0, N1, N2) float32
        The blend, in the intensity units of ``norm``'s source.

    Raises
    ------
    InputError
        If a gate is given that does not have the experts' shape.
    NonFiniteBlend
        If a voxel of the blend is NaN or infinite (checked once, before anything is
        written): huge finite expert values that overflow float32 when mapped back, or
        weights or statistics that are not finite.  Its ``expert`` names the cause.

    Examples
    --------
    >>> import numpy as np
    >>> g = TileGrid((4, 4, 4), patch_size=2, stride=2)
    >>> hr = np.arange(1, 65, dtype=np.float32).reshape(4, 4, 4)
    >>> w = np.full((g.n_tiles, 1), 1.0, np.float32)
    >>> out = blend_patient([hr], g, w, window="flat",
    ...                     norm=Normalisation.from_hr(hr, [hr]), brain_mask=None)
    >>> bool(np.allclose(out, hr, atol=1e-4))
    True
    """
    m = len(experts)
    w = np.asarray(weights)
    gated = w.ndim == 2 and w.shape[1] == 2 * m
    if gated and gate is None:
        gate = edge_gate(experts)
    if norm.mapping == "weighted":  # B6 hr_free_mapping: weighted, per voxel
        z_space = Normalisation(norm.mus, norm.sds, 0.0, 1.0, norm.source)
        blend = blend_patient(experts, grid, weights, window=window, norm=z_space,
                              brain_mask=None, gate=gate)
        blend = map_back_weighted(blend, w, grid, window=window, mus=norm.mus, sds=norm.sds,
                                  brain_mask=brain_mask, gate=gate)
        check_blend_finite(blend, weights, norm)
        return blend
    if gated:
        if np.shape(gate) != np.shape(experts[0]):
            raise InputError(
                f"edge-gated weights ({w.shape[1]} columns for {m} experts) need an edge gate "
                f"of the experts' shape {np.shape(experts[0])}; got {np.shape(gate)}"
            )
        edge = blend_patient(experts, grid, w[:, :m], window=window, norm=norm,
                             brain_mask=brain_mask)
        flat = blend_patient(experts, grid, w[:, m:], window=window, norm=norm,
                             brain_mask=brain_mask)
        return gated_mix(edge, flat, np.asarray(gate, np.float32))
    blend = blend_volume(
        experts,
        grid,
        weights,
        mus=norm.mus,
        sds=norm.sds,
        mu_hr=norm.mu_out,
        sd_hr=norm.sd_out,
        mask=brain_mask,
        window=window,
    )
    check_blend_finite(blend, weights, norm)
    return blend


class NonFiniteBlend(InputError):
    """A blend with NaN or infinite voxels (an :class:`InputError`).

    ``expert`` is the index of the expert that caused it, None when the weights or the
    HR's statistics did.
    """

    def __init__(self, message: str, expert: int | None = None) -> None:
        super().__init__(message)
        self.expert = expert


def check_blend_finite(blend: NDArray[np.float32], weights: ArrayLike, norm: Normalisation) -> None:
    """Raise :class:`NonFiniteBlend` naming the cause if ``blend`` has a non-finite voxel.

    The kernels read a non-finite expert voxel as 0, so a NaN or Inf in a blend comes from
    the numbers it is made of: tile weights that are not finite, or an expert whose values
    are so large that the blend, mapped back with ``norm``'s mean and std, overflows
    float32 (the expert with the largest ``|mean| + std`` is named).  One pass over the
    volume in 4 Mi-voxel chunks (about 10 ms at 197x233x189), no volume-sized temporary.
    """
    flat = blend.reshape(-1)
    bad = 0
    for i in range(0, flat.size, 1 << 22):
        bad += int(np.count_nonzero(~np.isfinite(flat[i : i + (1 << 22)])))
    if not bad:
        return
    w = np.asarray(weights)
    if not np.all(np.isfinite(w)):
        raise NonFiniteBlend(
            f"the blend has {bad} voxels that are not finite: the model's tile weights hold "
            f"{int(np.count_nonzero(~np.isfinite(w)))} NaN/Inf values"
        )
    scale = np.abs(np.asarray(norm.mus, np.float64)) + np.asarray(norm.sds, np.float64)
    e = int(np.argmax(scale))
    if norm.source == "hr" and abs(norm.mu_out) + norm.sd_out > scale[e]:
        raise NonFiniteBlend(
            f"the blend has {bad} voxels that are not finite (float32 overflow): the HR's "
            f"mean {norm.mu_out:.3g} and std {norm.sd_out:.3g} are too large for float32"
        )
    raise NonFiniteBlend(
        f"the blend has {bad} voxels that are not finite (float32 overflow): expert {e + 1} "
        f"has mean {norm.mus[e]:.3g} and std {norm.sds[e]:.3g}, too large for float32 "
        f"(max {float(np.finfo(np.float32).max):.3g}) once blended and mapped back with "
        f"mean {norm.mu_out:.3g}, std {norm.sd_out:.3g}",
        expert=e,
    )


def blend_volume(
    experts: Sequence[ArrayLike],
    grid: TileGrid,
    weights: ArrayLike,
    *,
    mus: ArrayLike,
    sds: ArrayLike,
    mu_hr: float,
    sd_hr: float,
    mask: ArrayLike | None,
    window: str,
) -> NDArray[np.float32]:
    """Blend the experts with one weight vector per tile (algorithm A7.2-A7.5).

    Parameters
    ----------
    experts : sequence of array_like, M x (N0, N1, N2)
        Raw expert volumes (memmaps welcome; read as float32, never copied if
        already C-contiguous float32).
    grid : TileGrid
        Tile grid of ``grid.shape == (N0, N1, N2)``.
    weights : array_like, (grid.n_tiles, M)
        Tile weights (cast to float32); rows of tiles without a learned weight
        must already hold ``1/M``.
    mus, sds : array_like, (M,)
        Each expert's z-score mean and std over the HR mask (algorithm A3.3).
    mu_hr, sd_hr : float
        HR mean and std that turn the blend back into HR intensities.
    mask : array_like of bool or uint8, (N0, N1, N2), or None
        Brain mask multiplied into the blend (algorithm A7.5), nonzero = inside;
        None = no masking.
    window : {"flat", "hann"}
        ``mixing_window``.  Flat is used whenever ``grid.stride >= grid.patch_size``
        (no overlap), as the reference does.

    Returns
    -------
    ndarray of float32, (N0, N1, N2)
        ``(acc / (den + 1e-8)) * sd_hr + mu_hr`` times the mask, with
        ``acc = sum_tiles win * sum_m w_m (x_m - mu_m) / sd_m`` and
        ``den = sum_tiles win`` over every tile box covering the voxel.

    Raises
    ------
    InputError
        On an empty expert list, mismatched shapes, or a weights array that does
        not match the grid and the experts.
    ValueError
        On an unknown window, or a non-positive / non-finite ``sds`` or ``sd_hr``.

    Notes
    -----
    Computed in float32 in the reference's order (tile id order per voxel), so
    it matches the reference to float32 rounding.  A non-finite expert value is
    read as 0.0 before z-scoring, so no NaN reaches the blend.  With the periodic
    Hann window the first voxel of every axis gets weight 0 from its only tile,
    so ``den`` is 0 there and the blend is ``0 * sd_hr + mu_hr`` -- the
    reference's behaviour, kept for compatibility.  The numerator and
    denominator are computed per row and never stored as volumes: the only
    volume allocated is the float32 output.

    Examples
    --------
    >>> import numpy as np
    >>> g = TileGrid((4, 4, 4), patch_size=2, stride=2)
    >>> x = np.full((4, 4, 4), 3.0, np.float32)
    >>> w = np.full((g.n_tiles, 2), 0.5, np.float32)
    >>> b = blend_volume([x, x], g, w, mus=[1.0, 1.0], sds=[2.0, 2.0],
    ...                  mu_hr=1.0, sd_hr=2.0, mask=None, window="hann")
    >>> float(b[0, 0, 0])
    3.0
    """
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {sorted(WINDOWS)}, got {window!r}")
    vols = as_volume_list(experts, grid.shape, like="the tile grid")
    n_exp = len(vols)
    w = as_tile_weights(weights, grid, n_exp)
    mus64 = readonly(np.ascontiguousarray(mus, dtype=np.float64).reshape(-1))
    sds64 = readonly(np.ascontiguousarray(sds, dtype=np.float64).reshape(-1))
    if mus64.shape != (n_exp,) or sds64.shape != (n_exp,):
        raise InputError(
            f"mus and sds need one value per expert ({n_exp}); got {mus64.size} and {sds64.size}"
        )
    if not (np.all(np.isfinite(sds64)) and np.all(sds64 > 0) and np.all(np.isfinite(mus64))):
        raise ValueError(
            f"expert statistics must be finite with sds > 0; got mus={mus64}, sds={sds64}"
        )
    if not (np.isfinite(sd_hr) and sd_hr > 0 and np.isfinite(mu_hr)):
        raise ValueError(
            f"HR statistics must be finite with sd_hr > 0; got mu_hr={mu_hr}, sd_hr={sd_hr}"
        )
    if mask is None:
        mask_u8 = readonly(np.zeros((1, 1, 1), np.uint8))
        use_mask = False
    else:
        mask_u8 = as_mask_u8(mask, grid.shape, like="the tile grid")
        use_mask = True
    kind = "flat" if grid.stride >= grid.patch_size else window
    return _blend_volume(
        vols,
        w,
        mus64,
        sds64,
        float(mu_hr),
        float(sd_hr),
        mask_u8,
        use_mask,
        grid.patch_size,
        grid.stride,
        WINDOWS[kind],
        4 * numba.get_num_threads(),
    )


def weight_maps(weights: ArrayLike, grid: TileGrid) -> NDArray[np.float32]:
    """Per-voxel weight volume of the A8 npz files.

    Parameters
    ----------
    weights : array_like, (grid.n_tiles, M)
        Tile weights (cast to float32), ``1/M`` for tiles without a learned weight.
    grid : TileGrid
        The tile grid of the volume.

    Returns
    -------
    ndarray of float32, (N0, N1, N2, M)
        ``weights[r(v)]`` for every voxel, ``r(v)`` the voxel label of algorithm A2
        (the largest id among the tiles covering ``v``).

    Raises
    ------
    InputError
        If ``weights`` does not have one row per tile.

    Examples
    --------
    >>> import numpy as np
    >>> g = TileGrid((3, 2, 2), patch_size=2, stride=2)
    >>> w = np.array([[1.0, 0.0], [0.25, 0.75]], np.float32)
    >>> weight_maps(w, g)[:, 0, 0, 1].tolist()
    [0.0, 0.0, 0.75]
    """
    w = as_tile_weights(weights, grid)
    n0, n1, n2 = grid.shape
    return _weight_maps(w, n0, n1, n2, grid.stride)


def _label_voxel_counts(grid: TileGrid) -> NDArray[np.int64]:
    """Voxels per label (the s^3 block of each tile, clipped at the volume's end)."""
    per_axis = []
    for n, k in zip(grid.shape, grid.counts, strict=True):
        starts = np.arange(k, dtype=np.int64) * grid.stride
        per_axis.append(np.minimum(starts + grid.stride, n) - starts)
    c0, c1, c2 = per_axis
    return (c0[:, None, None] * c1[None, :, None] * c2[None, None, :]).ravel()


def _counted_statistics(values: NDArray[np.float32], counts: NDArray[np.int64]) -> dict:
    """Statistics of the multiset where ``values[t]`` occurs ``counts[t]`` times.

    Percentiles are NumPy's default (linear): the order statistics at ``q (n - 1)`` and the
    next one, blended with NumPy's own interpolation formula on the float32 pair.
    """
    n = int(counts.sum())
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    ends = np.cumsum(counts[order])  # the sorted multiset's element k is at searchsorted

    def nth(k: int) -> np.float32:
        return sorted_vals[int(np.searchsorted(ends, k, side="right"))]

    def percentile(q: float) -> float:
        pos = q / 100.0 * (n - 1)
        lo = int(np.floor(pos))
        pair = np.array([nth(lo), nth(min(lo + 1, n - 1))], dtype=np.float32)
        return float(np.percentile(pair, 100.0 * (pos - lo)))

    # Correctly rounded sums (math.fsum), not np.dot: a BLAS dot product splits long sums
    # between its threads, so its last digit followed OPENBLAS_NUM_THREADS.  The products
    # are elementwise, so the result no longer depends on any thread count or order.
    v64 = values.astype(np.float64)
    mean = math.fsum(counts * v64) / n
    var = math.fsum(counts * (v64 - mean) ** 2) / n
    return {
        "mean": mean,
        "std": var**0.5,
        "min": float(sorted_vals[0]),
        "max": float(sorted_vals[-1]),
        "median": percentile(50.0),
        "q25": percentile(25.0),
        "q75": percentile(75.0),
    }


def weight_analysis(
    maps: ArrayLike,
    model_names: Sequence[str],
    *,
    tiles: tuple[ArrayLike, TileGrid] | None = None,
) -> dict[str, np.ndarray]:
    """Content of ``{pid}_weight_analysis_{split}.npz`` but ``patient_id`` (algorithm A8).

    Parameters
    ----------
    maps : array_like, (N0, N1, N2, M)
        Per-voxel weights from :func:`weight_maps` (cast to float32).
    model_names : sequence of str, length M
        Expert names in column order.
    tiles : (weights, grid), optional
        The tile weights ``(n_tiles, M)`` and grid ``maps`` were made from.  Every voxel of
        a map holds its label's tile weight, so the statistics follow exactly from the tile
        values and the voxel count of each label block, without sorting ``N`` voxels per
        model (~0.8 s at 200x230x190x4).  Min, max, median and quartiles are the same order
        statistics NumPy would pick; mean and std are computed in float64 (NumPy's float32
        pairwise sums differ from them by ~1e-7 relative).

    Returns
    -------
    dict
        Keys and values exactly as ``np.savez_compressed`` stores the reference's:

        ``weight_maps``
            (N0, N1, N2, M) float32, the input.
        ``entropy_map``
            (N0, N1, N2) float32, ``-sum w' log(w' + 1e-10)`` with
            ``w' = w / (sum w + 1e-10)`` (the reference's normaliser; equal to
            ``w / sum w`` in float32 whenever ``sum w > 2e-3``).
        ``dominant_map``
            (N0, N1, N2) int32, ``argmax`` over the experts (first on ties).
        ``model_names``
            (M,) unicode array (``np.asarray(list(model_names))``).
        ``statistics``
            0-d object array holding ``{model: {"mean", "std", "min", "max",
            "median", "q25", "q75"}}`` of Python floats over every voxel of that
            model's float32 map (NumPy's float32 mean and ``std`` with ddof 0,
            linear percentiles) -- the same NumPy calls as the reference, so
            identical numbers.  Load it with ``np.load(..., allow_pickle=True)``
            and ``.item()``.

    Raises
    ------
    InputError
        If ``maps`` is not 4-D or ``model_names`` does not name its last axis.
    """
    wm = readonly(np.ascontiguousarray(maps, dtype=np.float32))
    names = [str(n) for n in model_names]
    if wm.ndim != 4 or wm.shape[3] != len(names) or len(names) == 0:
        raise InputError(
            f"weight maps have shape {wm.shape}; expected (N0, N1, N2, {len(names)}) "
            f"for models {names}"
        )
    entropy, dominant = _weight_analysis(wm)
    stats: dict[str, dict[str, float]] = {}
    if tiles is not None:
        weights, grid = tiles
        w32 = np.asarray(weights, dtype=np.float32)
        if grid.shape != wm.shape[:3] or w32.shape != (grid.n_tiles, len(names)):
            raise InputError(f"tiles {w32.shape} on {grid} do not describe maps {wm.shape}")
        counts = _label_voxel_counts(grid)
        for i, name in enumerate(names):
            stats[name] = _counted_statistics(w32[:, i], counts)
    else:
        for i, name in enumerate(names):
            col = wm[..., i]
            stats[name] = {
                "mean": float(np.mean(col)),
                "std": float(np.std(col)),
                "min": float(np.min(col)),
                "max": float(np.max(col)),
                "median": float(np.median(col)),
                "q25": float(np.percentile(col, 25)),
                "q75": float(np.percentile(col, 75)),
            }
    statistics = np.empty((), dtype=object)
    statistics[()] = stats
    return {
        "weight_maps": wm,
        "entropy_map": entropy,
        "dominant_map": dominant,
        "model_names": np.asarray(names),
        "statistics": statistics,
    }
