"""What one patient, one Numba thread and one task of each stage allocate (algorithm B5).

One function per allocating step, named after the code that allocates, each term
commented with the array it stands for; :func:`stage_cost` combines them the way the
steps follow each other in the engine, and :mod:`pacs_numba.resources.planning` turns a
`StageCost` into a pool width.  Pure arithmetic: nothing here looks at a volume.

Notation: ``N`` voxels ``N0 x N1 x N2``, ``M`` experts, ``T`` tiles, ``p`` patch size,
``s`` stride, ``c_d = ceil(N_d / s)`` tiles along axis ``d``.

Four kinds of memory, because they add up differently:

per patient
    What one patient in flight holds at its peak, apart from thread scratch: the
    ``io.VolumeStore`` pages of its inputs (every page of every input is touched by
    the kernels, so they are resident while the patient holds its memory maps) plus
    the largest step.  ``w`` patients in flight hold ``w`` times this.
per thread
    Scratch that each Numba thread of a kernel allocates (line and slice buffers).
    A pool of ``w`` workers runs ``threads = CPUs // w`` Numba threads each, so all
    patients together never hold more than ``CPUs`` times this, whatever ``w``: the
    planner charges it once, for every CPU.
per task
    Held once while the pool runs, whatever its width (the fit's per-patient
    statistics kept for the ordered sum, the evaluate stage's compressed npz
    templates).
setup
    Held once before the pool starts, with no patient in flight (the per-voxel
    weight maps the npz templates are made from).

Calibrated against the sampled RSS of real runs in tests/test_memory_calibration.py.
Not counted: freed blocks glibc keeps in its malloc arenas (up to ~40 MiB per process
measured; none once ``process.pin_mmap_threshold`` is called), and sources other than
float32 NIfTI when the volume cache is cold (an int32 or float64 file decodes through a
float64 copy, up to ``20N`` for one volume instead of ``8N``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .._config import SSIM_AXES
from ..config import check_stride
from .pages import slab_resident_bytes

STAGES = ("fit", "evaluate", "predict")


_MIB = 1 << 20


#: ``numpy.lib.format.write_array`` writes an array to a file object that is not a real
#: file (the zip member of ``io.npz_bytes``) through ``nditer(buffersize=16 MiB)``
#: chunks, one ``bytes`` copy at a time.
SAVEZ_CHUNK_BYTES = 16 * _MIB


#: Compressed size of the weight-map npz members relative to their raw size.  The maps
#: are constant over each tile's ``s^3`` label block and deflate to a few percent
#: (measured 3% at 200x230x190x4); 5% is a generous bound.
NPZ_RATIO = 0.05


#: SSIM's 7x7 window, skimage's default (kernels.metrics): slices with a smaller side
#: are skipped without scratch.
_SSIM_WIN = 7


@dataclass(frozen=True)
class StageCost:
    """The memory terms of one stage (see the module docstring for how they add up).

    Parameters
    ----------
    stage : {"fit", "evaluate", "predict"}
        The pass.
    per_patient_bytes : int
        One patient in flight, without thread scratch.
    per_thread_bytes : int
        Scratch of one Numba thread.
    per_task_bytes : int
        Held once while the pool runs.
    setup_bytes : int
        Held once before the pool starts.
    steps : dict of str to int
        The per-patient steps above the mapped pages, for the log and the tests.
    """

    stage: str
    per_patient_bytes: int
    per_thread_bytes: int
    per_task_bytes: int
    setup_bytes: int
    steps: dict[str, int] = field(default_factory=dict)


def _voxels(shape: Sequence[int]) -> tuple[int, int, int, int]:
    if len(shape) != 3 or min(int(s) for s in shape) < 1:
        raise ValueError(f"shape must be three positive lengths, got {tuple(shape)}")
    n0, n1, n2 = (int(s) for s in shape)
    return n0 * n1 * n2, n0, n1, n2


def _tiles_per_axis(shape: Sequence[int], stride: int) -> tuple[int, int, int]:
    return tuple(math.ceil(int(n) / stride) for n in shape)  # type: ignore[return-value]


# ------------------------------------------------------------------ io
def mapped_bytes(n_voxels: int, n_volumes: int) -> int:
    """``io.VolumeStore`` pages of ``n_volumes`` float32 volumes, all touched: ``4N`` each."""
    return 4 * n_voxels * n_volumes


def load_bytes(n_voxels: int) -> int:
    """Bytes of decoding one float32 NIfTI on a cold cache (``io._load``): ``8N``.

    The file's bytes (compressed, then decompressed: ``4N``) and the C-order copy
    (``4N``).  A patient decodes its inputs before any kernel touches their mapped pages,
    at most half of its ``M + 1`` inputs at a time (rounded up, ``Engine._get_volumes``):
    at most ``8N (M + 2) / 2 = 4N (M + 2)``, within the mapped pages ``4N (M + 1)`` plus any
    stage's step (each holds at least one ``4N`` volume).  So this is an alternative to the
    mapped pages, not an addition.
    """
    return 8 * n_voxels


#: Where decoded volumes live (``io.VolumeStore``'s modes).  ``disk``: decoded once into the
#: cache directory and memory-mapped from there (the default); ``memory``: decoded into the
#: process's memory per use, nothing written.
VOLUME_CACHES = ("disk", "memory")


def load_parallelism(n_files: int, threads: int) -> int:
    """Volumes of one patient decoded at once (``Engine._get_volumes``).

    As many as the patient's worker has Numba threads, at most half of its files rounded
    up, at least one.
    """
    return max(1, min(int(threads), (int(n_files) + 1) // 2))


def held_load_bytes(n_voxels: int, n_volumes: int, parallel: int) -> int:
    """Return the ``memory`` volume cache's decodes above the volumes they leave: ``4N`` each.

    With ``io.VolumeStore(mode="memory")`` a patient's volumes are its own anonymous
    float32 arrays, ``4N`` each (`mapped_bytes`: the same size as mapped pages), and a
    decode in flight holds `load_bytes` ``8N`` of which ``4N`` stays.  With at most
    ``parallel`` decodes at once and the rest done, the patient holds
    ``4N n_volumes + 4N parallel`` when its last decodes run, before any step: this term
    is an alternative to the steps, on top of the held volumes.
    """
    return 4 * n_voxels * max(1, min(int(parallel), int(n_volumes)))


def _per_patient(n: int, n_volumes: int, step: int, volume_cache: str, parallel: int,
                 mapped: int | None = None, cold: bool = True) -> int:
    """One patient's peak: its volumes and the larger of its decodes and its largest step.

    ``disk``: the mapped pages and the step, or the cold decodes (``parallel`` times
    `load_bytes`; none when not ``cold``), whichever is larger.  ``mapped``: what stays
    mapped at once when the passes give pages back as they go (`evaluate_mapped_bytes`);
    default every volume whole.
    ``memory``: the held copies plus the larger of `held_load_bytes` and the step.
    """
    if volume_cache == "memory":
        return mapped_bytes(n, n_volumes) + max(held_load_bytes(n, n_volumes, parallel), step)
    if volume_cache != "disk":
        raise ValueError(f"volume_cache must be one of {VOLUME_CACHES}, got {volume_cache!r}")
    held = mapped_bytes(n, n_volumes) if mapped is None else mapped
    return max(int(parallel) * load_bytes(n) if cold else 0, held + step)


def evaluate_mapped_bytes(shape: Sequence[int], n_volumes: int) -> int:
    """Return the mapped pages of one evaluate patient scored in one pass, slab by slab.

    Every pass (the z-score statistics, the HR-free proxy, the one-pass scores) goes slab by
    slab and gives back each slab (`pages.slab_resident_bytes`), at most the whole volumes.
    Two reads are whole, one volume at a time: a cache entry's first check (given back at
    once) and the HR's brain mask, which `stage_cost` adds to that step.
    """
    n, n0, n1, n2 = _voxels(shape)
    return min(4 * n * int(n_volumes), slab_resident_bytes(4 * n1 * n2, n_volumes))


# ------------------------------------------------------------------ statistics (fit)
def valid_mask_bytes(n_voxels: int, n0: int, n_experts: int) -> int:
    """``kernels.stats._valid_mask``: the uint8 mask ``N`` and per-plane counts."""
    return n_voxels + 8 * n0 * (n_experts + 1)


def moments_bytes(n0: int, n_volumes: int) -> int:
    """``kernels.stats._volume_moments``: per-plane count, sums and squares (float64)."""
    return 8 * n0 * (2 * n_volumes + 1)


def box_moments_thread_bytes(n2: int, n_experts: int, *, lambda_grad: float,
                             lambda_edge: float, grad_operator: str) -> int:
    """Per-thread scratch of ``kernels.stats._box_moments`` (the fit's statistics pass).

    ``vals (M+1, N2)``, ``grads (3, M+1, N2)`` with gradients, ``sobs (3, 1, N2)`` when the
    edge map cannot reuse the HR's sobel gradients, ``ets``, ``wps``, ``wes``, ``cnts``
    ``(N2,)`` and ``accs (4, M + M(M+1)/2, N2)`` in 8 bytes, ``tmps (3, N2 + 2)`` float32.
    The edge maximum's scratch (``_sobel_magnitude_max``) comes before and is smaller.
    """
    m = int(n_experts)
    use_grad = lambda_grad > 0
    use_edge = lambda_edge > 0
    reuse_hr = use_grad and grad_operator == "sobel"
    n_terms = m + m * (m + 1) // 2
    rows = (m + 1) + (3 * (m + 1) if use_grad else 0) + (3 if use_edge and not reuse_hr else 0)
    rows += 4 + 4 * n_terms                               # ets, wps, wes, cnts, accs
    return 8 * n2 * rows + 12 * (n2 + 2)


def box_parts_bytes(n_tiles: int, n_experts: int) -> int:
    """One patient's decomposed statistics (``cellstats.CellStats``): parts and counts."""
    m = int(n_experts)
    return 8 * int(n_tiles) * (4 * (m + m * (m + 1) // 2) + 1)


def statistics_bytes(n_tiles: int, n_experts: int) -> int:
    """One patient's ``Q (T, M, M)``, ``B (T, M)`` float64 and ``counts (T,)`` int64."""
    m = int(n_experts)
    return 8 * int(n_tiles) * (m * m + m + 1)


def solve_bytes(n_tiles: int, n_experts: int) -> int:
    """``solve.fit_weights`` and ``laplacian_smooth`` on ``T x M`` arrays.

    The finiteness check's boolean arrays ``T(M*M + M)``, the float64 solution ``8TM``,
    its float32 copy ``4TM`` and smoothing's float32 output and float64 rows ``12TM``.
    """
    t, m = int(n_tiles), int(n_experts)
    return t * (m * m + m) + 8 * t * m + 4 * t * m + 12 * t * m


# ------------------------------------------------------------------ blending
def brain_mask_bytes(n_voxels: int) -> int:
    """``blending.brain_mask``: union-find labels, the uint8 mask and component sizes.

    Labels are int32 (int64 from 2**31 voxels); the sizes are int64 per component, and
    26-connected components that touch no other are at least two voxels apart on each
    axis, so there are at most ``N/8`` of them: ``N`` bytes at most.
    """
    label = 4 if n_voxels < 2**31 - 1 else 8
    return label * n_voxels + n_voxels + n_voxels


def window_table_bytes(shape: Sequence[int], patch_size: int, stride: int) -> int:
    """``kernels.blend._window_table``: one ``(c_d, p)`` float32 table per axis."""
    return 4 * int(patch_size) * sum(_tiles_per_axis(shape, stride))


def blend_bytes(n_voxels: int, shape: Sequence[int], patch_size: int, stride: int) -> int:
    """``blending.blend_volume`` given a uint8 brain mask (``N``).

    ``mask != 0`` is a second uint8 mask ``N``; the float32 blend ``4N``; the window tables.
    """
    return n_voxels + n_voxels + 4 * n_voxels + window_table_bytes(shape, patch_size, stride)


def blend_thread_bytes(n2: int, n_experts: int) -> int:
    """``kernels.blend._blend_volume`` per thread: 4 chunks of float32 rows.

    Each chunk has ``xn (M, N2)``, ``tmp``, ``acc`` and ``den (N2,)``.
    """
    return 4 * 4 * n2 * (int(n_experts) + 3)


# ------------------------------------------------------------------ metrics
def ssim_slice_shape(shape: Sequence[int], ssim_axis: str | int) -> tuple[int, int]:
    """In-plane shape of the SSIM slices along ``ssim_axis`` (``kernels.metrics._ssim_slices``)."""
    axis = SSIM_AXES[ssim_axis] if isinstance(ssim_axis, str) else int(ssim_axis)
    n0, n1, n2 = (int(s) for s in shape)
    return ((n1, n2), (n0, n2), (n0, n1))[axis]


def metrics_bytes(n_voxels: int) -> int:
    """``metrics.volume_metrics``: the ``hr > 0`` boolean mask ``N`` (the blend apart)."""
    return n_voxels


def ssim_thread_bytes(shape: Sequence[int], ssim_axis: str | int) -> int:
    """``kernels.metrics._ssim_slices`` per thread: slice buffers.

    Two float32 slices, five float32 filtered slices and five float64 columns.
    """
    n_a, n_b = ssim_slice_shape(shape, ssim_axis)
    if n_a < _SSIM_WIN or n_b < _SSIM_WIN:
        return 0
    return 28 * n_a * n_b + 40 * n_b + 40


def score_thread_bytes(shape: Sequence[int], ssim_axis: str | int, n_experts: int,
                       n_predictions: int) -> int:
    """``kernels.score._score_patient`` per thread (one chunk of slices).

    Rows: ``xn`` and ``yn (M, N2)``, ``tmp``, ``tmp2``, ``acc``, ``acc2``, ``den (N2,)``
    float32; slices: the HR's and ``P`` predictions' float32 images, ``2 + 3P`` float32
    filtered images and ``2 + 3P`` float64 columns and running sums.  Along the sagittal
    axis the scoring runs the blend and metric kernels instead (0 here).
    """
    axis = SSIM_AXES[ssim_axis] if isinstance(ssim_axis, str) else int(ssim_axis)
    if axis == 2:
        return 0
    n_a, n_b = ssim_slice_shape(shape, axis)
    p, ch = int(n_predictions), 2 + 3 * int(n_predictions)
    rows = 4 * n_b * (2 * int(n_experts) + 5)
    vert = 4 * ch * n_a * n_b if n_a >= _SSIM_WIN and n_b >= _SSIM_WIN else 4 * ch * n_b
    return rows + 4 * n_a * n_b * (1 + p) + vert + 8 * ch * (n_b + 1)


# ------------------------------------------------------------------ writes
#: Patients whose outputs may wait in the background writer's queue (runs/writer.py).
WRITE_QUEUE_DEPTH = 1


def queued_outputs_bytes(n_voxels: int, n0: int, n1: int, *, save_blends: bool,
                         save_weight_maps: bool, depth: int = WRITE_QUEUE_DEPTH) -> int:
    """Return what the background writer holds: ``depth + 1`` patients' outputs and scratch.

    Per patient: the float32 blend ``4N`` (``save_blends``) and the uint8 brain mask ``N``
    of its NIfTI weight maps (``save_weight_maps``); the npz files are per-task templates.
    While one is written: one slice of the blend's NIfTI write, or the maps' float64 map
    of one expert and its float32 copy ``12N`` (``nifti_weight_maps_bytes`` less the mask).
    """
    one = (4 * n_voxels if save_blends else 0) + (n_voxels if save_weight_maps else 0)
    scratch = max(nifti_write_bytes(n0, n1) if save_blends else 0,
                  nifti_weight_maps_bytes(n_voxels) - n_voxels if save_weight_maps else 0)
    return (int(depth) + 1) * one + scratch


def nifti_write_bytes(n0: int, n1: int) -> int:
    """``io.write_nifti`` of a C-order float32 volume: one ``N0 x N1`` slice.

    nibabel writes the Fortran-order file slice by slice (python-isal keeps only a
    small window).
    """
    return 4 * n0 * n1


def weight_maps_bytes(n_voxels: int, n_experts: int) -> int:
    """``blending.weight_maps`` and ``weight_analysis``: ``4NM + 8N``.

    The per-voxel weights (float32), the entropy (float32) and dominant (int32) maps.
    """
    return 4 * n_voxels * int(n_experts) + 8 * n_voxels


def npz_template_bytes(n_voxels: int, n_experts: int) -> int:
    """``engine._WeightNpz``: both compressed npz templates.

    The maps ``4NM`` twice, entropy and dominant ``8N``, compressed to `NPZ_RATIO`.
    """
    return int(NPZ_RATIO * (8 * n_voxels * int(n_experts) + 8 * n_voxels))


# ------------------------------------------------------------------ stages
def stage_cost(stage: str, shape: Sequence[int], n_experts: int, *, patch_size: int,
               stride: int, lambda_grad: float = 0.0, lambda_edge: float = 0.0,
               grad_operator: str = "sobel", ssim_axis: str | int = "axial",
               save_weight_volumes: bool = True, save_weight_maps: bool = True,
               save_blends: bool = True, n_patients: int = 1,
               volume_cache: str = "disk", one_pass: bool = True,
               cold: bool = True, gated: bool = False,
               weighted_mapping: bool = False) -> StageCost:
    """Cost ``stage`` for volumes of ``shape`` and ``n_experts`` experts.

    Parameters
    ----------
    stage : {"fit", "evaluate", "predict"}
        ``fit``: ``engine.Engine._fit``; ``evaluate``: ``Engine._evaluate_split``;
        ``predict``: ``predict.predict_files`` (one patient, no pool).
    shape : sequence of 3 int
        Volume shape.
    n_experts : int
        ``M``.
    patch_size, stride : int
        Tile geometry (``stride`` sets ``T``; both set the blend's window tables).
    lambda_grad, lambda_edge : float, optional
        Fit options: gradient terms and edge weights add per-line scratch only.
    grad_operator : str, optional
        With ``"sobel"`` and gradient terms on, the edge map reuses the HR's gradients.
    ssim_axis : str or int, optional
        Slice axis of the SSIM (its per-thread slice buffers).
    save_weight_volumes : bool, optional
        Whether evaluate writes the weight npz files of algorithm A8.
    save_weight_maps : bool, optional
        Whether evaluate writes the NIfTI weight maps (the model's and each test patient's).
    save_blends : bool, optional
        Whether evaluate writes the blends (held in the background writer's queue).
    n_patients : int, optional
        Patients of the stage (the fit keeps every patient's statistics until the
        ordered sum).
    volume_cache : {"disk", "memory"}, optional
        Where the patient's volumes live (`_per_patient`): mapped cache pages, or private
        copies decoded per patient (``fit`` and ``evaluate`` decode up to
        `load_parallelism` at once, ``predict`` one at a time).
    one_pass : bool, optional
        Whether evaluate scores its patients in the one pass that goes slab by slab and
        gives mapped pages back (`evaluate_mapped_bytes`): the axial SSIM axis, one weight
        vector per tile and the ``mean`` HR-free mapping (``core.scoring.score_patient``).
        False: every volume stays mapped whole while a patient is scored.
    cold : bool, optional
        Whether a patient's inputs may still have to be decoded into the ``disk`` cache
        (the decodes are an alternative peak, `_per_patient`); False when every input has
        an entry already.  The ``memory`` cache decodes every time.
    gated : bool, optional
        Edge-gated weights (``pacs_sr.gating: edge``): a blend also holds the float32 edge
        gate and the edge blend ``8N`` while it makes the flat one.
    weighted_mapping : bool, optional
        ``pacs_sr.hr_free_mapping: weighted``: an HR-free blend also holds its per-voxel
        statistic maps, three float32 per voxel ``12N`` (``24N`` when gated).
        Either option scores test patients on the separate path (not ``one_pass``).

    Returns
    -------
    StageCost

    Raises
    ------
    ValueError
        On a bad stage, shape, expert count or tile geometry.

    Notes
    -----
    fit
        per patient: the mapped HR and experts ``4N(M+1)`` + the valid mask (alive
        for the whole call) + the moments + the decomposed parts (`box_parts_bytes`); per
        thread: `box_moments_thread_bytes`;
        per task: every patient's Q, B, counts + their sums + `solve_bytes`.
    evaluate
        per patient: the mapped HR and experts (scored in one pass: a slab of each, and
        the HR whole during the brain mask, `evaluate_mapped_bytes`) + the largest of: the
        valid mask; the brain mask; the blend (brain mask, its ``!= 0`` copy, the output,
        the window tables); the metrics (blend + ``hr > 0`` mask); the one-pass scores.  The writes
        run on the background writer: `queued_outputs_bytes` per task.
        Per thread: the larger of the blend's and the SSIM's scratch.  Per task: the
        npz templates; setup: the maps they are compressed from and one savez chunk
        (the templates made from them are the per-task term, already alive then).
    predict
        per patient: the mapped experts ``4NM`` + the largest of: the HR proxy
        ``4N`` with one ``np.where`` copy and its ``isfinite`` mask ``5N`` while it
        is summed; the proxy and the valid mask; the proxy and the brain mask; the
        blend; the write.

    Every stage also has the cold-cache decode `load_bytes` as an alternative peak; with
    ``volume_cache="memory"`` the volumes are held copies and the decodes
    `held_load_bytes` the alternative to the steps.

    Examples
    --------
    >>> c = stage_cost("evaluate", (160, 192, 160), 4, patch_size=32, stride=16)
    >>> c.per_patient_bytes // 2**20, c.setup_bytes // 2**20
    (112, 135)
    >>> stage_cost("evaluate", (160, 192, 160), 4, patch_size=32, stride=16,
    ...            cold=False).per_patient_bytes // 2**20  # every input cached: no decode
    70
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be 'fit', 'evaluate' or 'predict', got {stage!r}")
    n, n0, n1, n2 = _voxels(shape)
    m = int(n_experts)
    if m < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    if int(patch_size) < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    check_stride(int(patch_size), int(stride))
    c0, c1, c2 = _tiles_per_axis(shape, int(stride))
    n_tiles = c0 * c1 * c2
    parallel = load_parallelism(m + 1, m + 1)  # the engine's bound; predict reads serially

    if stage == "fit":
        # cellstats.box_statistics: the valid mask and moments, then _box_moments' parts;
        # then combine() makes the patient's Q, B (the per-task term)
        steps = {"statistics": valid_mask_bytes(n, n0, m) + moments_bytes(n0, m + 1)
                 + box_parts_bytes(n_tiles, m)}
        per = _per_patient(n, m + 1, steps["statistics"], volume_cache, parallel, cold=cold)
        thread = box_moments_thread_bytes(n2, m, lambda_grad=lambda_grad,
                                          lambda_edge=lambda_edge, grad_operator=grad_operator)
        task = (statistics_bytes(n_tiles, m) * (max(1, int(n_patients)) + 1)
                + solve_bytes(n_tiles, m))
        return StageCost(stage, int(per), int(thread), int(task), 0, steps)

    blend = blend_bytes(n, shape, patch_size, stride) + (8 * n if gated else 0)
    hr_free = _hr_free_steps(n, n0, n1, m, blend)
    if weighted_mapping:
        hr_free["blend"] += 12 * n * (2 if gated else 1)
    if stage == "predict":
        steps = hr_free
        per = _per_patient(n, m, max(steps.values()), volume_cache, 1, cold=cold)
        thread = blend_thread_bytes(n2, m)
        return StageCost(stage, int(per), int(thread), 0, 0, steps)

    template = npz_template_bytes(n, m) if save_weight_volumes else 0
    steps = {
        "valid mask": valid_mask_bytes(n, n0, m) + moments_bytes(n0, m + 1),
        "brain mask": brain_mask_bytes(n),
        "blend": blend,
        "metrics": 4 * n + metrics_bytes(n),
        # test split (scoring.score_patient): with the HR's brain mask N alive, the HR-free
        # statistics and mask (the largest predict step before its blend), then one pass
        # with the blend and the HR-free mask N
        "scores": n + max(max(v for k, v in hr_free.items() if k != "write"), blend),
    }
    # the writes run on the background writer (runs/writer.py), not in the patient's
    # worker: the outputs of the queued patients and of the one being written, and its
    # scratch, are the task's
    task = template + queued_outputs_bytes(n, n0, n1, save_blends=save_blends,
                                           save_weight_maps=save_weight_maps)
    setup = 0
    if save_weight_volumes:
        setup = weight_maps_bytes(n, m) + min(SAVEZ_CHUNK_BYTES, 4 * n * m)
    if save_weight_maps:
        task += nifti_weight_maps_task_bytes(n)
        setup = max(setup, nifti_weight_maps_setup_bytes(n))
    axial = (SSIM_AXES[ssim_axis] if isinstance(ssim_axis, str) else int(ssim_axis)) == 0
    mapped, step = None, max(steps.values())
    if one_pass and axial and not (gated or weighted_mapping):
        mapped = evaluate_mapped_bytes(shape, m + 1)
        step = max(step, 4 * n + steps["brain mask"])  # the brain mask reads the HR whole
    per = _per_patient(n, m + 1, step, volume_cache, parallel, mapped, cold)
    thread = max(blend_thread_bytes(n2, m), ssim_thread_bytes(shape, ssim_axis),
                 # predictions: the blend, each expert alone, the HR-free blend and each
                 # raw expert under its mask
                 score_thread_bytes(shape, ssim_axis, m, 2 * m + 2))
    return StageCost(stage, int(per), int(thread), int(task), int(setup), steps)


def _hr_free_steps(n: int, n0: int, n1: int, m: int, blend: int) -> dict[str, int]:
    """Return the steps of one HR-free blend (``predict.predict_volume``) beside its experts.

    The float32 HR proxy ``4N`` with one ``np.where`` copy and its ``isfinite`` mask
    ``5N`` while it is summed; the proxy and the valid mask; the proxy and the brain mask;
    the blend; the write.
    """
    proxy = 4 * n
    return {
        "proxy": proxy + 5 * n,
        "valid mask": proxy + valid_mask_bytes(n, n0, m),
        "brain mask": proxy + brain_mask_bytes(n),
        "blend": blend,
        "write": 4 * n + nifti_write_bytes(n0, n1),
    }


def nifti_weight_maps_bytes(n_voxels: int) -> int:
    """One patient's NIfTI weight maps (``mapfiles.write_blend_weight_maps``).

    Its brain mask ``N`` and one expert's float64 map with its float32 copy ``12N``.
    """
    return 13 * n_voxels


def nifti_weight_maps_task_bytes(n_voxels: int) -> int:
    """Return what ``engine._WeightNifti`` keeps for a task.

    Float32 ``1/den`` and entropy maps and a uint8 label map.
    """
    return 9 * n_voxels


def nifti_weight_maps_setup_bytes(n_voxels: int) -> int:
    """Return the peak of ``weightmaps.BlendWeightMaps`` while it is built (``29N``)."""
    return 29 * n_voxels
