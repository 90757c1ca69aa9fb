"""Plan a stage: how many patients run at once, with how many Numba threads (algorithm B4, B5).

One planner for every caller: the engine plans each stage of a task with
`plan_task_stages` before it reads any volume, and ``diagnose --config`` calls the same
function through ``Engine.plan``, so both report the same widths, limits and needs.

The memory bound (terms from :mod:`pacs_numba.resources.costs`, baseline from
:mod:`pacs_numba.resources.process`, limit from :mod:`pacs_numba.resources.limits`)::

    limit - margin >= baseline + per_task + max(setup, CPUs * per_thread + width * per_patient)
    margin = max(256 MiB, 10% of limit)

Examples
--------
>>> lim = Limits(Figure(16 * 2**30, "SLURM_MEM_PER_NODE=16384"),
...              Figure(8, "SLURM_CPUS_PER_TASK=8"), {})
>>> p = plan_pool(lim, per_patient_bytes=3 * 2**30, baseline_bytes=2**29,
...               n_patients=40, env={})
>>> p.width, p.threads
(4, 2)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numba

from ..config import stride_problem
from ..errors import BudgetError, ConfigError
from .costs import StageCost, stage_cost
from .limits import Figure, Limits
from .units import gib, parse_size

log = logging.getLogger(__name__)


_MIB = 1 << 20


_GIB = 1 << 30


#: Safety margin: this fraction of the limit, and at least `MIN_MARGIN_BYTES`.
MARGIN_FRACTION = 0.10


MIN_MARGIN_BYTES = 256 * _MIB


def check_tile_settings(patch_size: object, stride: object, shape: Sequence[int],
                        where: str = "the config") -> tuple[int, int]:
    """Check ``patch_size`` and ``stride`` against the volume shape, before anything is allocated.

    Parameters
    ----------
    patch_size, stride : int
        ``pacs_sr.patch_size`` and ``pacs_sr.stride``.
    shape : sequence of 3 int
        The volume shape of the task.
    where : str, optional
        Where the settings come from, for the message (the config file's path).

    Returns
    -------
    (int, int)
        ``patch_size, stride``.

    Raises
    ------
    ConfigError
        If either is not an integer, ``patch_size`` is below 1 or larger than the
        volume's largest axis, or ``stride`` is outside ``[1, patch_size]``.  The
        message names the key, its value and the shape.

    Notes
    -----
    A tile is clipped at the volume's end, so a patch longer than some axes is fine (one
    tile spans that axis).  A patch longer than every axis would only make one
    clipped tile of the whole volume with windows computed for a length that does not
    exist, and its per-axis window tables grow with the patch size (a
    ``patch_size: 1000000000`` asked for tens of GB): such a value is a mistake, and is
    refused with the largest value that makes sense.

    Examples
    --------
    >>> check_tile_settings(32, 16, (160, 192, 160))
    (32, 16)
    >>> check_tile_settings(500, 16, (160, 192, 160))
    Traceback (most recent call last):
    ...
    pacs_numba.errors.ConfigError: the config: pacs_sr.patch_size is 500, larger than the ...
    """
    shape = tuple(int(n) for n in shape)
    largest = max(shape)
    for key, value in (("patch_size", patch_size), ("stride", stride)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: pacs_sr.{key} is {value!r}; expected an integer "
                              f"(volume shape {shape})")
    assert isinstance(patch_size, int) and isinstance(stride, int)
    if not 1 <= patch_size <= largest:
        what = "larger than the largest axis of" if patch_size > largest else "below 1 for"
        raise ConfigError(f"{where}: pacs_sr.patch_size is {patch_size}, {what} the volumes "
                          f"(shape {shape}); expected an integer in [1, {largest}]")
    problem = stride_problem(patch_size, stride)
    if problem is not None:
        raise ConfigError(f"{where}: pacs_sr.stride {problem} (volume shape {shape})")
    return patch_size, stride


@dataclass(frozen=True)
class PoolPlan:
    """How many patients run at once, and with how many Numba threads each.

    Parameters
    ----------
    width : int
        Patients in flight (ThreadPoolExecutor workers).
    threads : int
        Numba threads per worker, ``max(1, CPUs // width)``.
    per_patient_bytes, baseline_bytes, margin_bytes : int
        The terms of the memory bound.
    limit : Figure
        Memory limit used (the detected one, or ``--mem-budget`` if smaller).
    cpus : Figure
        CPU figure used.
    reason : str
        Which bound set the width, in words.
    overrides : dict of str to int
        Every worker override seen (``--workers``, ``PACS_NUMBA_MAX_WORKERS``,
        ``PACS_SR_MAX_WORKERS``), whether it applied or not (see ``reason``).
    per_task_bytes : int
        Memory the stage holds once whatever the width.
    thread_bytes : int
        Thread scratch of the whole pool, ``CPUs x`` per-thread scratch.
    setup_bytes : int
        Memory the stage holds once before its pool starts.
    """

    width: int
    threads: int
    per_patient_bytes: int
    baseline_bytes: int
    margin_bytes: int
    limit: Figure
    cpus: Figure
    reason: str
    overrides: dict[str, int] = field(default_factory=dict)
    per_task_bytes: int = 0
    thread_bytes: int = 0
    setup_bytes: int = 0

    def describe(self) -> str:
        """One log line: ``"pool 4 workers x 2 numba threads (memory: ...)"``.

        Returns
        -------
        str
        """
        once = f", once per task {gib(self.per_task_bytes, 2)}" if self.per_task_bytes else ""
        return (f"pool {self.width} workers x {self.threads} numba threads "
                f"(bound: {self.reason}; {gib(self.per_patient_bytes, 2)}/patient, "
                f"baseline {gib(self.baseline_bytes, 2)}{once}, "
                f"margin {gib(self.margin_bytes, 2)})")

    def for_patients(self, n_patients: int) -> PoolPlan:
        """Narrow this plan to a pool of ``n_patients`` (a split smaller than the stage).

        Fewer workers never need more memory (the thread scratch is charged for every
        CPU already), so the width drops to ``n_patients`` and the freed CPUs become
        Numba threads.

        Parameters
        ----------
        n_patients : int

        Returns
        -------
        PoolPlan
        """
        n = max(1, int(n_patients))
        if n >= self.width:
            return self
        return dataclasses.replace(
            self, width=n, threads=numba_threads(int(self.cpus.value) // n),
            reason=f"patients: {n} in this split (stage plan: {self.width} x {self.reason})")


def numba_threads(wanted: int) -> int:
    """Return the Numba threads a worker may use: ``wanted``, at least 1, at most Numba's pool.

    ``numba.set_num_threads`` refuses more than ``NUMBA_NUM_THREADS`` (fixed when Numba
    starts, e.g. ``NUMBA_NUM_THREADS=1`` on a 2-CPU node), so every plan is capped there.

    Examples
    --------
    >>> numba_threads(0)
    1
    """
    return max(1, min(int(wanted), int(numba.config.NUMBA_NUM_THREADS)))


_OVERRIDE_ENV = ("PACS_NUMBA_MAX_WORKERS", "PACS_SR_MAX_WORKERS")


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool):
        value = None  # True/False are not worker counts
    try:
        n = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        n = None
    if n is None or n < 1:
        raise ConfigError(f"{name}={value!r} is not a worker count; expected an integer >= 1")
    return n


def margin_bytes(limit_bytes: int, margin_fraction: float = MARGIN_FRACTION,
                 min_margin_bytes: int = MIN_MARGIN_BYTES) -> int:
    """Return the safety margin the planner keeps free under a limit of ``limit_bytes``.

    Returns
    -------
    int
        ``int(max(min_margin_bytes, margin_fraction * limit_bytes))``.
    """
    return int(max(min_margin_bytes, margin_fraction * limit_bytes))


def limit_for(core_bytes: int, margin_fraction: float = MARGIN_FRACTION,
              min_margin_bytes: int = MIN_MARGIN_BYTES) -> int:
    """Return the smallest limit ``L`` with ``L - margin_bytes(L) >= core_bytes``.

    Parameters
    ----------
    core_bytes : int
        Memory that must fit under the limit, margin excluded.
    margin_fraction, min_margin_bytes : optional
        As in `margin_bytes`.

    Returns
    -------
    int
        Bytes.  ``L - margin_bytes(L)`` never decreases with ``L``, so a job with a
        limit of at least this has room for ``core_bytes``, and one with less has not.

    Examples
    --------
    >>> limit_for(900 * 2**20) == 900 * 2**20 + 256 * 2**20
    True
    >>> L = limit_for(9 * 2**30); L - margin_bytes(L) >= 9 * 2**30 > L - 1 - margin_bytes(L - 1)
    True
    """
    core = max(0, int(core_bytes))
    lo, hi = core, core + min_margin_bytes + int(core * margin_fraction / (1 - margin_fraction)) + 2
    while hi - margin_bytes(hi, margin_fraction, min_margin_bytes) < core:
        hi *= 2
    while lo < hi:  # smallest L in [lo, hi] with room
        mid = (lo + hi) // 2
        if mid - margin_bytes(mid, margin_fraction, min_margin_bytes) >= core:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _core_bytes(per_patient: int, width: int, baseline: int, per_task: int, threads_total: int,
                setup: int) -> int:
    """Memory a pool of ``width`` needs under the limit, margin excluded (module docstring)."""
    return baseline + per_task + max(setup, threads_total + width * per_patient)


def plan_pool(limits: Limits, *, per_patient_bytes: int, baseline_bytes: int, n_patients: int,
              num_workers: int | None = None, workers_override: int | None = None,
              env: Mapping[str, str] | None = None, margin_fraction: float = MARGIN_FRACTION,
              min_margin_bytes: int = MIN_MARGIN_BYTES,
              mem_budget_bytes: int | None = None, per_task_bytes: int = 0,
              per_thread_bytes: int = 0, setup_bytes: int = 0) -> PoolPlan:
    """Choose the pool width and Numba threads per worker (algorithm B4, B5).

    Parameters
    ----------
    limits : Limits
        From `limits.detect_limits`.
    per_patient_bytes : int
        Memory of one patient in flight (`costs.StageCost`), > 0.
    baseline_bytes : int
        Memory of the process before any patient (`process.baseline_bytes`), >= 0.
    n_patients : int
        Patients to process; the pool is never wider.
    num_workers : int, optional
        The config's ``num_workers``.  Negative values follow joblib, as the
        reference passed them to it: -1 = all CPUs, -2 = all but one.
    workers_override : int, optional
        ``--workers``.  It replaces ``num_workers`` (the command line beats the
        config file) and makes the environment overrides ignored.
    env : mapping, optional
        Environment (default ``os.environ``) for ``PACS_NUMBA_MAX_WORKERS`` and,
        if that is unset, the reference's ``PACS_SR_MAX_WORKERS``: caps.
    margin_fraction : float, optional
        Safety margin as a fraction of the limit (default 10%).
    min_margin_bytes : int, optional
        Smallest safety margin (default 256 MiB).
    mem_budget_bytes : int, optional
        ``--mem-budget``; used instead of the detected limit when smaller.
    per_task_bytes : int, optional
        Memory the stage holds once while its pool runs, >= 0; default 0.
    per_thread_bytes : int, optional
        Scratch of one Numba thread, >= 0, charged for every CPU; default 0.
    setup_bytes : int, optional
        Memory the stage holds once before its pool starts, >= 0; default 0.

    Returns
    -------
    PoolPlan
        ``width = min(requested workers, CPUs, n_patients, memory)`` where memory is
        the largest width with ``limit - margin >= baseline + per_task + max(setup,
        CPUs * per_thread + width * per_patient)`` and ``margin = max(min_margin_bytes,
        margin_fraction * limit)``; ``threads = max(1, CPUs // width)``.  No override
        can go above what memory or the CPUs allow; ``reason`` says when one was capped.

    Raises
    ------
    BudgetError
        If not even one patient fits; the message says how much memory one
        patient needs, how much the job has and from where, and what to ask for.
    ConfigError
        If an override or ``num_workers`` is not an integer >= 1 (the message
        names it).
    """
    env = os.environ if env is None else env
    if per_patient_bytes <= 0:
        raise ValueError(f"per_patient_bytes must be > 0, got {per_patient_bytes}")
    for name, value in (("baseline_bytes", baseline_bytes), ("per_task_bytes", per_task_bytes),
                        ("per_thread_bytes", per_thread_bytes), ("setup_bytes", setup_bytes)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if n_patients < 0:
        raise ValueError(f"n_patients must be >= 0, got {n_patients}")
    if not 0 <= margin_fraction < 1:
        raise ValueError(f"margin_fraction must be in [0, 1), got {margin_fraction}")

    cpus = int(limits.cpus.value)
    limit = limits.memory
    if mem_budget_bytes is not None:
        if mem_budget_bytes <= 0:
            raise ConfigError(f"--mem-budget must be > 0 bytes, got {mem_budget_bytes}")
        if mem_budget_bytes < limit.value:
            limit = Figure(int(mem_budget_bytes), f"--mem-budget {gib(mem_budget_bytes, 2)}")

    # Overrides: all set values are checked so a typo never passes silently.
    overrides: dict[str, int] = {}
    if workers_override is not None:
        overrides["--workers"] = _check_count("--workers", workers_override)
    for name in _OVERRIDE_ENV:
        raw = env.get(name, "")
        if raw.strip():
            overrides[name] = _check_count(name, raw)

    # Requested width: --workers, else the config; then an environment cap.
    bounds: list[tuple[int, str]] = []   # (value, words); order = order named on ties
    override_name: str | None = None
    if "--workers" in overrides:
        override_name = "--workers"
        bounds.append((overrides["--workers"], f"--workers={overrides['--workers']}"))
    else:
        env_name = next((n for n in _OVERRIDE_ENV if n in overrides), None)
        if env_name is not None:
            override_name = env_name
            bounds.append((overrides[env_name], f"{env_name}={overrides[env_name]}"))
        if num_workers is not None:
            nw = int(num_workers)
            if nw == 0 or isinstance(num_workers, bool):
                raise ConfigError(f"num_workers={num_workers!r} is not a worker count; "
                                  "expected an integer >= 1 (or -1 for all CPUs)")
            if nw > 0:
                bounds.append((nw, f"config num_workers={nw}"))
            else:
                bounds.append((max(1, cpus + 1 + nw), f"config num_workers={nw} (joblib style)"))
    bounds.append((max(1, n_patients), f"patients: {n_patients} to process"))
    bounds.append((cpus, f"CPUs: {cpus} ({limits.cpus.source})"))

    margin = margin_bytes(int(limit.value), margin_fraction, min_margin_bytes)
    threads_total = cpus * int(per_thread_bytes)
    room = int(limit.value) - margin - baseline_bytes - per_task_bytes
    free = room - threads_total
    fit = free // per_patient_bytes if free > 0 else 0
    if fit < 1 or room < setup_bytes:
        core = _core_bytes(per_patient_bytes, 1, baseline_bytes, per_task_bytes, threads_total,
                           setup_bytes)
        raise BudgetError(_budget_message(
            limit, core, per_patient_bytes, baseline_bytes, per_task_bytes, threads_total,
            setup_bytes, margin_fraction, min_margin_bytes))
    once = f" - {gib(per_task_bytes)} once per task" if per_task_bytes else ""
    scratch = f" - {gib(threads_total)} thread scratch" if threads_total else ""
    bounds.append((fit, f"memory: {fit} x {gib(per_patient_bytes)} fits in "
                        f"{gib(limit.value)} ({limit.source}) - {gib(baseline_bytes)} baseline"
                        f"{once}{scratch} - {gib(margin)} margin"))

    width = min(v for v, _ in bounds)
    binding = [words for v, words in bounds if v == width]
    reason = "; ".join(binding)
    if override_name is not None and overrides[override_name] > width:
        reason += (f" ({override_name}={overrides[override_name]} capped to {width}: the pool "
                   "never exceeds the memory, the CPUs or the patients)")
    ignored = [n for n in overrides if n != override_name]
    if ignored:
        reason += f" ({', '.join(ignored)} ignored: {override_name} takes precedence)"
    threads = numba_threads(cpus // width)
    plan = PoolPlan(width=width, threads=threads, per_patient_bytes=int(per_patient_bytes),
                    baseline_bytes=int(baseline_bytes), margin_bytes=margin, limit=limit,
                    cpus=limits.cpus, reason=reason, overrides=overrides,
                    per_task_bytes=int(per_task_bytes), thread_bytes=threads_total,
                    setup_bytes=int(setup_bytes))
    log.debug("%s", plan.describe())
    return plan


def slurm_mem(n_bytes: int) -> str:
    """Return an ``sbatch --mem`` value of at least ``n_bytes``, rounded up to a readable step.

    Parameters
    ----------
    n_bytes : int

    Returns
    -------
    str
        Below 4 GiB, whole hundreds of MiB (``"700M"``); from 4 GiB, whole GiB
        (``"5G"``).  SLURM reads both as binary units, as `limits.parse_size` does.

    Examples
    --------
    >>> slurm_mem(int(0.63 * 2**30)), slurm_mem(2**30), slurm_mem(int(4.2 * 2**30))
    ('700M', '1100M', '5G')
    """
    mib = math.ceil(n_bytes / _MIB)
    if mib < 4 * 1024:
        hundreds = math.ceil(mib / 100) * 100
        # 1024 MiB -> 1100M, but exactly 4096 MiB reads better as 4G
        return f"{hundreds}M" if hundreds < 4096 else "4G"
    return f"{math.ceil(mib / 1024)}G"


#: What an ``sbatch --mem`` request adds to the planner's need before rounding: the plan's
#: baseline is the planning process's RSS after its imports (``diagnose``), and a task
#: measures its own, which can be some tens of MiB larger (more modules and kernels loaded).
SBATCH_HEADROOM_BYTES = 100 * _MIB


def sbatch_request(needed_bytes: int) -> tuple[str, int]:
    """Return the ``sbatch --mem`` value for a task that needs ``needed_bytes``, and its headroom.

    Parameters
    ----------
    needed_bytes : int
        The smallest job memory limit that runs the task at the intended width
        (`StagePlan.needed_bytes_for`).

    Returns
    -------
    mem : str
        `slurm_mem` of ``needed_bytes + SBATCH_HEADROOM_BYTES``.
    headroom_bytes : int
        How much ``mem`` asks for beyond ``needed_bytes``: the headroom plus the rounding.

    Examples
    --------
    >>> sbatch_request(530 * 2**20)
    ('700M', 178257920)
    """
    mem = slurm_mem(int(needed_bytes) + SBATCH_HEADROOM_BYTES)
    return mem, parse_size(mem) - int(needed_bytes)


def _budget_message(limit: Figure, core: int, per_patient: int, baseline: int, per_task: int,
                    threads_total: int, setup: int, margin_fraction: float,
                    min_margin_bytes: int) -> str:
    need = limit_for(core, margin_fraction, min_margin_bytes)
    margin_at_need = need - core
    parts = [f"{gib(per_patient, 2)} per patient", f"{gib(baseline, 2)} baseline"]
    if per_task:
        parts.append(f"{gib(per_task, 2)} once per task")
    if setup > threads_total + per_patient:
        parts[0] = f"{gib(setup, 2)} of weight maps before the first patient"
    elif threads_total:
        parts.append(f"{gib(threads_total, 2)} thread scratch")
    parts.append(f"{gib(margin_at_need, 2)} safety margin")
    ask = slurm_mem(need)
    fix = (f"request at least {ask} (sbatch --mem={ask}, or a --mem-per-cpu that gives at "
           f"least {ask} over the job's CPUs)")
    if limit.source.startswith("--mem-budget"):
        fix = f"raise --mem-budget to at least {ask} if the job has that much memory, or {fix}"
    return (f"not even one patient fits in memory: one patient needs {gib(need, 2)} "
            f"({' + '.join(parts)}) but the job has {gib(limit.value, 2)} "
            f"({limit.source}). To run, {fix}; or process smaller volumes or fewer experts "
            "(when evaluating, save_weight_volumes: false also helps).")


@dataclass(frozen=True)
class StagePlan:
    """The plan of one stage of a task: its cost terms, its pool, the memory it needs.

    Parameters
    ----------
    stage : str
        ``"fit"``, ``"evaluate"`` or ``"predict"``.
    shape : tuple of 3 int
        Volume shape.
    n_experts : int
        ``M``.
    n_patients : int
        Patients the stage processes.
    cost : costs.StageCost
        The memory terms.
    pool : PoolPlan
        Width and threads.
    needed_bytes : int
        The smallest job memory limit with which this stage runs at ``pool.width``.
    needed_bytes_one : int
        The same for one worker.
    """

    stage: str
    shape: tuple[int, int, int]
    n_experts: int
    n_patients: int
    cost: StageCost
    pool: PoolPlan
    needed_bytes: int
    needed_bytes_one: int

    @property
    def fixed_bytes(self) -> int:
        """Memory besides the patients at `needed_bytes` (baseline, per task, scratch, margin).

        ``fixed_bytes + pool.width * cost.per_patient_bytes == needed_bytes``.
        """
        return self.needed_bytes - self.pool.width * self.cost.per_patient_bytes

    def needed_bytes_for(self, width: int) -> int:
        """Return the smallest job memory limit that runs ``width`` patients of this stage at once.

        Parameters
        ----------
        width : int
            >= 1.

        Returns
        -------
        int
        """
        p = self.pool
        core = _core_bytes(self.cost.per_patient_bytes, max(1, int(width)), p.baseline_bytes,
                           p.per_task_bytes, p.thread_bytes, p.setup_bytes)
        return limit_for(core)

    def to_json(self) -> dict[str, Any]:
        """Return the stage's entry of ``diagnose --json``'s ``"plan"``.

        Returns
        -------
        dict
            ``n_patients, per_patient_bytes, fixed_bytes, width, threads, needed_bytes,
            needed_bytes_one``, and the terms of ``fixed_bytes``: ``baseline_bytes,
            per_task_bytes, thread_bytes, setup_bytes, margin_bytes`` (the margin at
            ``needed_bytes``), ``limit_bytes`` (the limit planned with), and ``by_width``:
            for each width ``w`` from 1 to ``n_patients``, ``{"width": w, "needed_bytes",
            "sbatch_mem", "headroom_bytes"}`` (`needed_bytes_for` and `sbatch_request`), so a
            script sizing a job for another width reads the planner's figure.
        """
        p = self.pool
        return {
            "n_patients": int(self.n_patients),
            "per_patient_bytes": int(self.cost.per_patient_bytes),
            "fixed_bytes": int(self.fixed_bytes),
            "width": int(p.width),
            "threads": int(p.threads),
            "needed_bytes": int(self.needed_bytes),
            "needed_bytes_one": int(self.needed_bytes_one),
            "baseline_bytes": int(p.baseline_bytes),
            "per_task_bytes": int(p.per_task_bytes),
            "thread_bytes": int(p.thread_bytes),
            "setup_bytes": int(p.setup_bytes),
            "margin_bytes": int(margin_bytes(self.needed_bytes)),
            "limit_bytes": int(p.limit.value),
            "by_width": [self._width_json(w) for w in range(1, max(1, self.n_patients) + 1)],
        }

    def _width_json(self, width: int) -> dict[str, Any]:
        need = self.needed_bytes_for(width)
        mem, headroom = sbatch_request(need)
        return {"width": width, "needed_bytes": int(need), "sbatch_mem": mem,
                "headroom_bytes": int(headroom)}


def plan_stage(stage: str, pacs: Any, n_experts: int, shape: Sequence[int], n_patients: int,
               limits: Limits, *, baseline_bytes: int, workers: int | None = None,
               mem_budget_bytes: int | None = None, thread_safe: bool = True,
               env: Mapping[str, str] | None = None, where: str = "the config",
               volume_cache: str = "disk", cold: bool = True) -> StagePlan:
    """Plan one stage: check the tile settings, cost the stage, size its pool.

    Parameters
    ----------
    stage : {"fit", "evaluate", "predict"}
        The pass.
    pacs : config.PacsSRConfig
        The config's ``pacs_sr`` section (patch_size, stride, lambdas, grad_operator,
        ssim_axis, save_weight_volumes, num_workers).
    n_experts : int
        ``M``.
    shape : sequence of 3 int
        Volume shape of the task.
    n_patients : int
        Patients the stage processes.
    limits : Limits
        The job's limits.
    baseline_bytes : int
        `process.baseline_bytes` of the planning process.
    workers, mem_budget_bytes : int, optional
        ``--workers`` and ``--mem-budget``.
    thread_safe : bool, optional
        Whether the Numba threading layer allows several workers (False: workqueue,
        one worker with every CPU's threads).
    env : mapping, optional
        Environment for the worker overrides (default ``os.environ``).
    where : str, optional
        Names the config in error messages.
    volume_cache : {"disk", "memory"}, optional
        Where the volumes live (``costs.stage_cost``).
    cold : bool, optional
        Whether some inputs still have to be decoded into the disk cache (default: assume
        so); False leaves the decodes out of the ``disk`` cost (``costs.stage_cost``).

    Returns
    -------
    StagePlan

    Raises
    ------
    ConfigError
        On tile settings that do not fit the volume, or a bad worker count.
    BudgetError
        If not even one patient fits.
    """
    patch, stride = check_tile_settings(pacs.patch_size, pacs.stride, shape, where)
    shape3 = tuple(int(n) for n in shape)
    cost = stage_cost(stage, shape3, n_experts, patch_size=patch, stride=stride,
                      lambda_grad=pacs.lambda_grad, lambda_edge=pacs.lambda_edge,
                      grad_operator=pacs.grad_operator, ssim_axis=pacs.ssim_axis,
                      save_weight_volumes=pacs.save_weight_volumes,
                      save_weight_maps=getattr(pacs, "save_weight_maps", False),
                      save_blends=getattr(pacs, "save_blends", True),
                      n_patients=n_patients, volume_cache=volume_cache, cold=cold,
                      gated=getattr(pacs, "gating", "none") != "none",
                      weighted_mapping=getattr(pacs, "hr_free_mapping", "mean") == "weighted")
    pool = plan_pool(limits, per_patient_bytes=cost.per_patient_bytes,
                     baseline_bytes=int(baseline_bytes), n_patients=max(1, int(n_patients)),
                     num_workers=pacs.num_workers, workers_override=workers, env=env,
                     mem_budget_bytes=mem_budget_bytes, per_task_bytes=cost.per_task_bytes,
                     per_thread_bytes=cost.per_thread_bytes, setup_bytes=cost.setup_bytes)
    if pool.width > 1 and not thread_safe:
        pool = dataclasses.replace(pool, width=1, threads=numba_threads(pool.threads * pool.width),
                                   reason=pool.reason + "; 1 worker: workqueue layer")
    plan = StagePlan(stage, shape3, int(n_experts), int(n_patients), cost, pool, 0, 0)
    return dataclasses.replace(plan, needed_bytes=plan.needed_bytes_for(pool.width),
                               needed_bytes_one=plan.needed_bytes_for(1))


def stage_patients(pacs: Any, n_train: int, n_test: int, *, fit: bool = True) -> dict[str, int]:
    """Patients of each stage of a task, as the engine runs them.

    Parameters
    ----------
    pacs : config.PacsSRConfig
        For ``evaluate_train``.
    n_train, n_test : int
        The fold's train and test patients.
    fit : bool, optional
        Whether the task fits a model (``train`` without a reusable one).

    Returns
    -------
    dict of str to int
        ``{"fit": n_train}`` when fitting, and ``"evaluate"``: the test patients plus,
        with ``evaluate_train``, the train patients (the stage evaluates both splits;
        each split's pool is the stage plan narrowed to its size).  A stage with no
        patient is left out.
    """
    out: dict[str, int] = {}
    if fit and n_train:
        out["fit"] = int(n_train)
    n_eval = int(n_test) + (int(n_train) if pacs.evaluate_train else 0)
    if n_eval:
        out["evaluate"] = n_eval
    return out


def plan_task_stages(pacs: Any, n_experts: int, shape: Sequence[int], n_train: int, n_test: int,
                     limits: Limits, *, baseline_bytes: int, fit: bool = True,
                     workers: int | None = None, mem_budget_bytes: int | None = None,
                     thread_safe: bool = True, env: Mapping[str, str] | None = None,
                     where: str = "the config", volume_cache: str = "disk",
                     cold: bool = True) -> dict[str, StagePlan]:
    """Plan every stage of a task at once, before any volume is read.

    Parameters
    ----------
    pacs, n_experts, shape, limits, baseline_bytes
        As for `plan_stage`.
    workers, mem_budget_bytes, thread_safe, env, where, volume_cache, cold
        As for `plan_stage`.
    n_train, n_test : int
        The fold's train and test patients (see `stage_patients`).
    fit : bool, optional
        Whether the task fits a model.

    Returns
    -------
    dict of str to StagePlan
        By stage name, in run order.

    Raises
    ------
    ConfigError, BudgetError
        As `plan_stage`, for the first stage that cannot run (a BudgetError's
        ``stage`` attribute names it).
    """
    plans: dict[str, StagePlan] = {}
    for stage, n in stage_patients(pacs, n_train, n_test, fit=fit).items():
        try:
            plans[stage] = plan_stage(stage, pacs, n_experts, shape, n, limits,
                                      baseline_bytes=baseline_bytes, workers=workers,
                                      mem_budget_bytes=mem_budget_bytes, thread_safe=thread_safe,
                                      env=env, where=where, volume_cache=volume_cache,
                                      cold=cold)
        except BudgetError as exc:
            exc.stage = stage  # type: ignore[attr-defined]  # for diagnose's check name
            raise
    return plans


def plans_json(plans: Mapping[str, StagePlan]) -> dict[str, Any]:
    """Return the ``"plan"`` document of ``diagnose --json`` for a task's stage plans.

    Parameters
    ----------
    plans : mapping of str to StagePlan
        From `plan_task_stages`.

    Returns
    -------
    dict
        ``{"shape": [n0, n1, n2], "n_experts": M, "stages": {stage: StagePlan.to_json()}}``.
    """
    first = next(iter(plans.values()))
    return {"shape": list(first.shape), "n_experts": first.n_experts,
            "stages": {name: p.to_json() for name, p in plans.items()}}
