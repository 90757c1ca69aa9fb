"""The run: tasks of (fold, spacing, pulse), patients in a thread pool, outputs of algorithm A8.

One process, one volume cache.  Each patient's HR and expert volumes are memory-mapped
from the shared cache (``io.VolumeStore``); the fused kernels read them in place, so a
patient in flight costs its touched pages plus a few small accumulators instead of the
published tool's ~20 private float32 copies.  Per-patient results are combined in manifest
order after the pool has finished, so the numbers do not depend on the pool width or on
which thread finished first.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numba
import numpy as np

from . import __version__
from .blending import Normalisation, blend_patient, brain_mask, weight_analysis, weight_maps
from .cellstats import StatsCache, combine, fit_stats_key
from .config import FullConfig, config_to_dict
from .errors import ConfigError, InputError, Interrupted
from .integrity import require_regular_file, strict_json, sweep_temp_files
from .io import (
    VolumeStore,
    atomic_savez_from,
    atomic_write_json,
    atomic_write_text,
    npz_bytes,
    read_affine,
    read_shape,
    write_nifti,
)
from .layout import MODEL_FILE, TaskLayout
from .limits import Limits, detect_limits
from .locking import TaskBusy, TaskLock
from .manifest import load_manifest, select_task
from .metrics import METRIC_KEYS, aggregate, volume_metrics  # noqa: F401 - METRIC_KEYS re-exported
from .model import (
    StackingModel,
    load_model,
    read_weights_json,
    save_model,
    weights_json_text,
    write_weights_json,
)
from .planning import PoolPlan, StagePlan, check_tile_settings, plan_task_stages
from .process import baseline_bytes
from .progress import progress
from .record import RunRecord, fingerprints, model_digest, result_settings
from .registration import Registrar, ants_import_bytes, ants_imported
from .scoring import extras_summary, split_extras, test_extras
from .solve import fit_weights, laplacian_smooth
from .statistics import hr_is_flat
from .tiling import TileGrid
from .weightmaps import BlendWeightMaps, map_paths

log = logging.getLogger(__name__)

STAGES = ("load", "statistics", "solve", "smoothing", "blend", "metrics", "writes")
AFFINE_ATOL = 1e-3


# --------------------------------------------------------------------------------------
# Options and results
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunOptions:
    """Settings of one run that are not in the YAML config (they come from the CLI).

    Parameters
    ----------
    cache_dir : Path or None
        Volume cache directory (None: ``PACS_NUMBA_CACHE_DIR`` or a per-user temp dir).
    workers : int or None
        ``--workers``: an upper bound on the pool width.
    mem_budget_bytes : int or None
        ``--mem-budget``: an upper bound on the memory the run may use.
    force : bool
        Overwrite outputs that already exist.
    resume : bool
        Keep complete outputs made from the same inputs and settings; redo the rest.
    no_progress : bool
        Never draw a tqdm bar (log lines instead).
    out_root : Path or None
        Write outputs here instead of the config's ``pacs_sr.out_root``.
    wait : bool
        ``--wait``: when another process runs the same task, wait for it instead of
        failing (exit 2) at once.
    """

    cache_dir: Path | None = None
    workers: int | None = None
    mem_budget_bytes: int | None = None
    force: bool = False
    resume: bool = False
    no_progress: bool = False
    out_root: Path | None = None
    wait: bool = False


@dataclass(frozen=True)
class Task:
    """One unit of the published tool's loop: a fold (1-based), a spacing and a pulse."""

    fold: int
    spacing: str
    pulse: str

    def __str__(self) -> str:
        return f"fold {self.fold} {self.spacing} {self.pulse}"


@dataclass
class TaskResult:
    """What one task produced."""

    task: Task
    metrics: dict[str, dict[str, float]]
    per_patient: dict[str, dict[str, dict[str, float]]]
    skipped: dict[str, str]
    model_dir: Path
    timings: dict[str, float]
    pool: PoolPlan | None = None
    plans: dict[str, StagePlan] = field(default_factory=dict)
    #: ``test_experts`` (each expert alone) and ``test_hr_free`` of ``metrics.json``
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageClock:
    """Wall seconds per stage, summed over threads (thread-safe)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def __call__(self, stage: str):  # noqa: ANN204 - contextmanager
        """Add the wall time of the ``with`` block to ``stage``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage`` (for time measured around nested stages)."""
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class _Skip(Exception):
    """A patient cannot be used (unreadable file, empty mask); the task goes on without it."""


# --------------------------------------------------------------------------------------
# Threading layer
# --------------------------------------------------------------------------------------
_LAYER_LOCK = threading.Lock()
_LAYER: str | None = None


def ensure_threading_layer() -> str:
    """Start Numba's parallel runtime on a thread-safe layer and return its name.

    ``_config`` asks for the "threadsafe" layers (omp or tbb) before anything compiles.  If
    neither can be loaded this falls back to ``workqueue``, which is NOT safe when several
    Python threads launch parallel kernels; the engine then runs one patient at a time.
    """
    global _LAYER
    with _LAYER_LOCK:
        if _LAYER is None:
            from .kernels.probe import _parallel_probe

            try:
                _parallel_probe(np.ones(64))
            except ValueError as exc:  # "No threading layer could be loaded"
                log.warning("no thread-safe Numba threading layer (%s); using workqueue", exc)
                numba.config.THREADING_LAYER = "workqueue"
                _parallel_probe(np.ones(64))
            _LAYER = numba.threading_layer()
        return _LAYER


def thread_safe_layer() -> bool:
    """Whether parallel kernels may be launched from several Python threads at once."""
    return ensure_threading_layer() in {"omp", "tbb"}


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------
class Engine:
    """Runs train / evaluate tasks of one config.

    Parameters
    ----------
    config : FullConfig
        The loaded YAML config.
    options : RunOptions
        CLI-level settings.
    limits : Limits or None
        Memory and CPU limits (detected when None).
    """

    def __init__(
        self, config: FullConfig, options: RunOptions | None = None, limits: Limits | None = None
    ) -> None:
        self.config = config
        self.options = options or RunOptions()
        self.pacs = config.pacs_sr
        self.models = tuple(config.data.models)
        self.store = VolumeStore(self.options.cache_dir)
        # Per-patient fit statistics, shared by every fold, lambda and process on the node.
        self.stats_cache = StatsCache(self.store.directory / "cellstats")
        self.limits = limits if limits is not None else detect_limits()
        # Registration hooks (algorithm A7.5 with registration): None when it is off.
        self.registrar: Registrar | None = None
        self._registered: dict[str, Any] = {}
        if self.pacs.use_registration:
            assert config.registration is not None  # load_config requires the section then
            self.registrar = Registrar(config.registration, self.store, self.limits.cpus.value)
            self.registrar.check_pulses(config.data.pulses)
        self.stop_event = threading.Event()
        self.stop_signal: int | None = None
        self.layer = ensure_threading_layer()
        self._manifest: dict | None = None

    # ---------------------------------------------------------------- public API
    @property
    def out_root(self) -> Path:
        """Root of every output (``--out-root`` or ``pacs_sr.out_root``)."""
        return Path(self.options.out_root or self.pacs.out_root)

    def manifest(self) -> dict:
        """Return the K-fold manifest named by ``data.out`` (read once)."""
        if self._manifest is None:
            self._manifest = load_manifest(self.config.data.out)
        return self._manifest

    def tasks(
        self, fold: int | None = None, spacing: str | None = None, pulse: str | None = None
    ) -> list[Task]:
        """Every (fold, spacing, pulse) the published tool would run for these filters."""
        n_folds = len(self.manifest()["folds"])
        if fold is not None and not 1 <= fold <= n_folds:
            raise ConfigError(f"--fold {fold}: the manifest has folds 1..{n_folds}")
        for name, value, allowed in (
            ("spacing", spacing, self.config.data.spacings),
            ("pulse", pulse, self.config.data.pulses),
        ):
            if value is not None and value not in allowed:
                raise ConfigError(
                    f"--{name} {value!r}: data.{name}s in the config has {list(allowed)}"
                )
        folds = [fold] if fold is not None else list(range(1, n_folds + 1))
        spacings = [spacing] if spacing is not None else list(self.config.data.spacings)
        pulses = [pulse] if pulse is not None else list(self.config.data.pulses)
        return [Task(f, s, p) for f in folds for s in spacings for p in pulses]

    def request_stop(self, signum: int) -> None:
        """Ask the run to stop: no new patient starts; in-flight patients finish."""
        self.stop_signal = signum
        self.stop_event.set()

    def layout(self, task: Task) -> TaskLayout:
        """Every output path of ``task`` (:class:`pacs_numba.layout.TaskLayout`)."""
        return TaskLayout(
            self.out_root, self.pacs.experiment_name, task.fold, task.spacing, task.pulse
        )

    def model_dir(self, task: Task) -> Path:
        """``{out_root}/{experiment}/{spacing}/model_data/fold_{N}/{pulse}``."""
        return self.layout(task).model_dir

    def volumes_dir(self, task: Task) -> Path:
        """``{out_root}/{experiment}/{spacing}/output_volumes``."""
        return self.layout(task).volumes_dir

    def train(self, task: Task) -> TaskResult:
        """Fit the tile weights of ``task`` on its training patients, then evaluate."""
        return self._run(task, weights_path=None)

    def evaluate(self, task: Task, weights_path: Path | None = None) -> TaskResult:
        """Evaluate given weights (a weights.json or a model file) on ``task``'s patients.

        Without ``weights_path`` the task's own model file (or weights.json) is used.
        """
        if weights_path is None:  # looked up under the task lock: a train may be writing it
            return self._run(task, weights_path=None, own_model=True)
        return self._run(task, weights_path=Path(weights_path))

    # ---------------------------------------------------------------- the task
    def _run(self, task: Task, weights_path: Path | None, own_model: bool = False) -> TaskResult:
        train, test = select_task(self.manifest(), task.fold, task.spacing, task.pulse, self.models)
        self._check_files_exist(task, {**train, **test})
        if weights_path is not None:
            require_regular_file(weights_path, "weights file")
        lay = self.layout(task)
        if own_model and not lay.model_dir.is_dir():  # no train ran here: no folder to lock
            raise InputError(
                f"no model for {task} in '{lay.model_dir}': run `pacs-numba train` first "
                "or pass --weights"
            )
        lock = TaskLock(lay.model_dir, f"task {task}", wait=self.options.wait,
                        should_stop=self.stop_event.is_set)
        try:
            lock.acquire()
        except TaskBusy as exc:
            if self.stop_event.is_set():  # SIGTERM/Ctrl-C during --wait
                raise Interrupted(self.stop_signal or 15, str(exc)) from None
            raise
        try:
            if own_model:
                weights_path = lay.existing_weights()
                if weights_path is None:
                    raise InputError(
                        f"no model for {task} in '{lay.model_dir}': run `pacs-numba train` "
                        "first or pass --weights"
                    )
                require_regular_file(weights_path, "weights file")
            self._sweep_temps(lay, test, lock.start_ns)
            return self._run_locked(task, weights_path, train, test)
        finally:
            lock.release()

    def _run_locked(
        self, task: Task, weights_path: Path | None, train: dict, test: dict
    ) -> TaskResult:
        t_task = time.perf_counter()
        clock = StageClock()
        lay = self.layout(task)
        mdir = lay.model_dir
        self._check_existing_outputs(task, lay, weights_path)
        log.info(
            "task %s: %d train, %d test patients, %d experts %s -> %s",
            task,
            len(train),
            len(test),
            len(self.models),
            list(self.models),
            mdir,
        )
        skipped: dict[str, str] = {}
        nonfinite: dict[str, dict[str, int]] = {}
        settings = result_settings(config_to_dict(self.config)["pacs_sr"], self.models)
        if self.registrar is not None:
            settings["registration"] = _registration_settings(self.config)
            with clock("registration"):
                self._registered = self._register_patients(task, {**train, **test})
        record = RunRecord(lay.record_file, settings, resume=self.options.resume)
        # Every stage is planned before any volume is read (headers only), so a task that
        # cannot run stops here with nothing written, not after its fit.
        fitting = False
        if weights_path is None:
            if not train:
                raise InputError(f"task {task}: the manifest has no training patients")
            shape = self._reference_shape(task, train, skipped, "training ")
            check_tile_settings(self.pacs.patch_size, self.pacs.stride, shape,
                                str(self.config.path))
            source: dict[str, Any] = {
                "train": {
                    pid: fingerprints([paths["HR"], *paths["experts"]])
                    for pid, paths in train.items()
                }
            }
            model = self._reusable_model(record, source, lay)
            fitting = model is None
            if model is not None:
                skipped.update((record.old or {}).get("model", {}).get("skipped", {}))
                _ensure_weights_json(lay.weights_json, model)
        else:
            model = self._load_weights(task, weights_path, train, test)
            source = {"weights": fingerprints([weights_path])}
            shape = model.grid.shape
        plans = self._plan_stages(task, shape, len(train), len(test), fit=fitting)
        plan: PoolPlan | None = None
        if fitting:
            model = self._fit(task, train, clock, skipped, nonfinite, plans["fit"])
            plan = plans["fit"].pool
            with clock("writes"):
                save_model(lay.model_file, model)
                write_weights_json(lay.weights_json, model.weights, model.learned)
        elif weights_path is not None:
            with clock("writes"):
                # Both files describe the weights in use, so they can never disagree (an
                # evaluate --weights X --force must not leave the trained model next to X).
                if not _same_file(weights_path, lay.model_file):
                    save_model(lay.model_file, model)
                write_weights_json(lay.weights_json, model.weights, model.learned)
        assert model is not None
        record.set_model(
            model_digest(model.weights, model.learned, model.grid.shape), source, dict(skipped)
        )

        per_patient: dict[str, dict[str, dict[str, float]]] = {"train": {}, "test": {}}
        results: dict[str, dict[str, float]] = {}
        if self.pacs.evaluate_train and train:
            per_patient["train"], plan_e = self._evaluate_split(
                task, "train", train, model, clock, skipped, nonfinite, record, plans["evaluate"]
            )
            plan = plan or plan_e
            # a non-empty split either yields metrics or _evaluate_split raises
            results["train"] = aggregate(list(per_patient["train"].values()))
        per_patient["test"], plan_t = self._evaluate_split(
            task, "test", test, model, clock, skipped, nonfinite, record, plans.get("evaluate")
        )
        plan = plan or plan_t
        # each expert alone and the HR-free protocol, beside (never inside) the published keys
        per_patient["test"], test_experts, test_hr_free = split_extras(per_patient["test"])
        results["test"] = aggregate(list(per_patient["test"].values()))  # {} for no test patient
        if not test:
            log.warning("task %s: the manifest has no test patients", task)

        metrics_doc: dict[str, Any] = dict(results)
        extras = extras_summary(test_experts, test_hr_free, self.models)
        metrics_doc.update(extras)
        if skipped:
            metrics_doc["skipped"] = dict(sorted(skipped.items()))
        if nonfinite:
            metrics_doc["nonfinite_voxels"] = dict(sorted(nonfinite.items()))
        with clock("writes"):
            # strict JSON: an infinite PSNR (blend == HR) is written as null
            atomic_write_json(lay.metrics_json, strict_json(metrics_doc), indent=2)
            atomic_write_json(
                lay.patients_json,
                strict_json(
                    {"per_patient": per_patient, "skipped": skipped, "timings_s": clock.seconds,
                     "test_experts": test_experts, "test_hr_free": test_hr_free}
                ),
                indent=2,
            )
        record.mark_complete()
        secs = time.perf_counter() - t_task
        summary = " ".join(
            f"{split}_{k}={results[split][k]:.4f}"
            for split in ("train", "test")
            if results.get(split)
            for k in ("psnr", "ssim")
        )
        log.info("task=%s secs=%.1f skipped=%d %s", task, secs, len(skipped), summary)
        return TaskResult(
            task, results, per_patient, skipped, mdir, dict(clock.seconds), plan, plans, extras
        )

    # ---------------------------------------------------------------- checks
    def _check_files_exist(self, task: Task, patients: Mapping[str, Mapping[str, Any]]) -> None:
        missing = []
        for pid, paths in patients.items():
            for p in [paths["HR"], *paths["experts"]]:
                if not Path(p).exists():
                    missing.append(f"{pid}: {p}")
                else:  # a FIFO would block the first read for ever; a folder is no volume
                    require_regular_file(p, f"patient {pid}: input")
        if missing:
            listing = "\n  ".join(missing)
            raise InputError(
                f"{len(missing)} input file(s) of {task} named in the manifest "
                f"'{self.config.data.out}' do not exist:\n  {listing}"
            )

    def _sweep_temps(self, lay: TaskLayout, test: Mapping[str, Any], lock_start_ns: int) -> None:
        """Remove temporary files left in this task's outputs and the cache by dead writers.

        Called with the task lock held: no live process writes into the task folder, so a
        temporary file there (or a test blend's temporary file in ``output_volumes``, which
        only this task writes) older than the lock is an orphan of a killed run.
        """
        mdir, vdir = lay.model_dir, lay.volumes_dir
        candidates = [p for p in _listdir(mdir) if ".tmp-" in p.name]
        prefixes = tuple(f"{lay.test_blend(pid).name}.tmp-" for pid in test)
        if prefixes:
            candidates += [p for p in _listdir(vdir) if p.name.startswith(prefixes)]
        removed = sweep_temp_files(candidates, host=platform.node(), older_than_ns=lock_start_ns)
        removed += self.store.sweep_temps()
        for p in removed:
            log.info("removed temporary file %s left by a writer that is gone", p)

    def _check_existing_outputs(
        self, task: Task, lay: TaskLayout, weights_path: Path | None = None
    ) -> None:
        if self.options.force or self.options.resume:
            return
        mdir = lay.model_dir
        if lay.metrics_json.exists():
            if weights_path is None:
                fix = "pass --force to overwrite them or --resume to keep complete ones"
            elif weights_path.resolve().is_relative_to(mdir.resolve()):
                # evaluate has no --resume; its own model only exists under this out_root
                fix = "pass --force to overwrite them with this evaluation"
            else:
                fix = (
                    "pass --force to overwrite them, or --out-root DIR to write this "
                    "evaluation elsewhere"
                )
            raise ConfigError(f"outputs of {task} already exist in '{mdir}'; {fix}")

    # ---------------------------------------------------------------- pool
    def plan(self, task: Task, *, fit: bool = True) -> dict[str, StagePlan]:
        """Plan every stage of ``task`` as a run of it would (``diagnose --config`` shows this).

        Reads volume headers only.  ``fit=False`` plans an ``evaluate`` of given weights.
        """
        train, test = select_task(self.manifest(), task.fold, task.spacing, task.pulse, self.models)
        if fit and not train:
            raise InputError(f"task {task}: the manifest has no training patients")
        patients = train if fit else {**test, **train}
        shape = self._reference_shape(task, patients, {}, "training " if fit else "")
        return self._plan_stages(task, shape, len(train), len(test), fit=fit)

    def _plan_stages(
        self, task: Task, shape: tuple[int, int, int], n_train: int, n_test: int, *, fit: bool
    ) -> dict[str, StagePlan]:
        plans = plan_task_stages(
            self.pacs,
            len(self.models),
            shape,
            n_train,
            n_test,
            self.limits,
            baseline_bytes=baseline_bytes() + self._registration_baseline(),
            fit=fit,
            workers=self.options.workers,
            mem_budget_bytes=self.options.mem_budget_bytes,
            thread_safe=thread_safe_layer(),
            where=str(self.config.path),
        )
        if any("workqueue" in p.pool.reason for p in plans.values()):
            log.warning(
                "Numba threading layer is %s, which aborts when several threads launch "
                "kernels; running patients one at a time",
                self.layer,
            )
        for stage, p in plans.items():
            log.debug("plan %s %s: %s", stage, task, p.pool.describe())
        return plans

    def _map_patients(
        self,
        desc: str,
        items: list[str],
        fn: Callable[[str], Any],
        plan: PoolPlan,
    ) -> dict[str, Any]:
        """Run ``fn(pid)`` for every patient on ``plan.width`` threads; results by pid.

        A patient that raises ``_Skip`` is left out.  Other exceptions propagate after the
        pool has drained.  After a stop request no new patient starts.
        """
        out: dict[str, Any] = {}
        threads = plan.threads

        def run_one(pid: str) -> Any:
            if self.stop_event.is_set():
                return _NOT_RUN
            numba.set_num_threads(threads)  # thread-local in numba
            return fn(pid)

        pending: set[Future] = set()
        queue = list(items)
        with (
            ThreadPoolExecutor(plan.width, thread_name_prefix="patient") as pool,
            progress(
                len(items), desc, disabled=self.pacs.disable_tqdm or self.options.no_progress
            ) as bar,
        ):
            futures: dict[Future, str] = {}
            error: BaseException | None = None
            while queue or pending:
                while (
                    queue
                    and len(pending) < plan.width
                    and error is None
                    and not self.stop_event.is_set()
                ):
                    pid = queue.pop(0)
                    fut = pool.submit(run_one, pid)
                    futures[fut] = pid
                    pending.add(fut)
                if not pending:
                    break
                done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                for fut in done:
                    pid = futures[fut]
                    try:
                        res = fut.result()
                    except _Skip:
                        bar.update(1)
                        continue
                    except BaseException as exc:  # noqa: BLE001 - re-raised after draining
                        error = error or exc
                        continue
                    if res is not _NOT_RUN:
                        out[pid] = res
                    bar.update(1)
            if error is not None:
                raise error
        if self.stop_event.is_set():
            raise Interrupted(
                self.stop_signal or 15,
                f"stopped by signal {self.stop_signal} during '{desc}': "
                f"{len(out)}/{len(items)} patients finished",
            )
        return out

    # ---------------------------------------------------------------- loading
    def _load(
        self,
        pid: str,
        paths: Mapping[str, Any],
        clock: StageClock,
        skipped: dict[str, str],
        nonfinite: dict[str, dict[str, int]],
    ):
        with clock("load"):
            try:
                if self.registrar is not None:
                    hr, experts = self._registered_volumes(pid)
                else:
                    hr = self.store.get(paths["HR"])
                    experts = [self.store.get(p) for p in paths["experts"]]
            except InputError as exc:
                log.warning("skipping patient %s: %s", pid, exc)
                skipped[pid] = str(exc)
                raise _Skip(pid) from exc
        for e, path in zip(experts, paths["experts"], strict=True):
            if e.data.shape != hr.data.shape:
                raise InputError(
                    f"patient {pid}: expert '{path}' has shape {e.data.shape}; expected "
                    f"{hr.data.shape} like HR '{paths['HR']}'"
                )
            if not np.allclose(e.meta.affine, hr.meta.affine, atol=AFFINE_ATOL):
                log.warning(
                    "patient %s: affine of expert '%s' differs from HR '%s' by more than %g",
                    pid,
                    path,
                    paths["HR"],
                    AFFINE_ATOL,
                )
        counts = {str(v.source): int(v.nonfinite) for v in [hr, *experts] if v.nonfinite}
        if counts:
            nonfinite[pid] = counts
            for f, n in counts.items():
                log.warning("patient %s: %d NaN/Inf voxels in '%s' excluded", pid, n, f)
        return hr, experts

    # ---------------------------------------------------------------- registration
    def _registration_baseline(self) -> int:
        """Return what ``import ants`` keeps resident here (0 unless this process registered)."""
        return ants_import_bytes() if self.registrar is not None and ants_imported() else 0

    def _register_patients(
        self, task: Task, patients: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Any]:
        """Bring every patient of ``task`` into atlas space (hook; cached entries cost nothing).

        Runs before the patient pool.  antspyx holds the GIL, so threads cannot overlap
        registrations: the registrar runs them in spawned processes, one ITK thread each (the
        only reproducible setting), as many at once as the CPUs and the memory limit allow.
        """
        assert self.registrar is not None
        limit = self.limits.memory.value
        if self.options.mem_budget_bytes is not None:
            limit = min(limit, self.options.mem_budget_bytes)
        return self.registrar.prepare(
            task.pulse, patients, limit_bytes=limit, baseline_bytes=baseline_bytes(),
            stop=self.stop_event,
        )

    def _brain_mask(self, task: Task, hr: np.ndarray) -> np.ndarray:
        """Return the blend's brain mask (hook): the atlas mask with registration (A7.5)."""
        if self.registrar is not None:
            return self.registrar.brain_mask(task.pulse)
        return brain_mask(hr)

    def _registered_volumes(self, pid: str):
        """Return the registered (atlas-space) HR and experts of ``pid`` (hook)."""
        got = self._registered.get(pid)
        if got is None:
            raise InputError(f"patient {pid} was not registered (stopped before it)")
        if isinstance(got, InputError):
            raise got
        return got

    # ---------------------------------------------------------------- fit
    def _fit(
        self,
        task: Task,
        train: Mapping[str, Mapping[str, Any]],
        clock: StageClock,
        skipped: dict[str, str],
        nonfinite: dict[str, dict[str, int]],
        stage_plan: StagePlan,
    ) -> StackingModel:
        pids = list(train)
        grid = TileGrid(stage_plan.shape, self.pacs.patch_size, self.pacs.stride)
        plan = stage_plan.pool
        log.info("fit %s: %s", task, _describe_plan(plan))
        p = self.pacs

        key = fit_stats_key(p)

        def fit_one(pid: str):
            paths = train[pid]
            load_s = 0.0

            def load():  # only when the patient's statistics are not cached yet
                nonlocal load_s
                t = time.perf_counter()
                hr, experts = self._load(pid, paths, clock, skipped, nonfinite)  # clocks "load"
                self._check_grid(pid, paths["HR"], hr.data.shape, grid)
                load_s = time.perf_counter() - t
                return hr.data, [e.data for e in experts]

            t0 = time.perf_counter()
            if self.registrar is not None:
                # atlas-space statistics: name the entry by the registered volumes, whose
                # cache entries are keyed by the inputs, the atlas and the transform settings
                try:
                    hr_r, exp_r = self._registered_volumes(pid)
                except InputError as exc:
                    log.warning("skipping patient %s: %s", pid, exc)
                    skipped[pid] = str(exc)
                    raise _Skip(pid) from exc
                files = [hr_r.entry, *(e.entry for e in exp_r)]
            else:
                files = [paths["HR"], *paths["experts"]]
            st = self.stats_cache.get(
                files, key, load, edge_power=p.edge_power, grad_operator=p.grad_operator,
            )
            clock.add("statistics", time.perf_counter() - t0 - load_s)
            self._check_grid(pid, paths["HR"], st.shape, grid)
            if st.n_mask == 0:
                msg = f"HR '{paths['HR']}' has no voxel > 0 (empty mask)"
                log.warning("skipping patient %s: %s", pid, msg)
                skipped[pid] = msg
                raise _Skip(pid)
            if hr_is_flat(st.mu_hr, st.sd_hr):  # nothing to fit: it would teach every tile
                msg = (
                    f"HR '{train[pid]['HR']}' has no variance inside its mask "
                    f"(constant {st.mu_hr:.6g})"
                )
                log.warning("skipping patient %s: %s", pid, msg)
                skipped[pid] = msg
                raise _Skip(pid)
            log.debug(
                "patient=%s stage=fit secs=%.3f mask=%d", pid, time.perf_counter() - t0, st.n_mask
            )
            q, b = combine(st, lambda_edge=p.lambda_edge, lambda_grad=p.lambda_grad)
            return q, b, st.counts

        stats = self._map_patients(f"fit {task}", pids, fit_one, plan)
        used = [pid for pid in pids if pid in stats]  # manifest order: deterministic sums
        if not used:
            raise InputError(
                f"task {task}: every training patient was skipped: " + _reasons(skipped)
            )
        Q = np.zeros_like(stats[used[0]][0])
        B = np.zeros_like(stats[used[0]][1])
        n = np.zeros_like(stats[used[0]][2])
        for pid in used:
            q, b, c = stats[pid]
            Q += q
            B += b
            n += c
        with clock("solve"):
            weights, learned = fit_weights(
                Q,
                B,
                n,
                grid.counts,
                simplex=p.simplex,
                lambda_ridge=p.lambda_ridge,
                laplacian_tau=0.0,
            )
        if p.laplacian_tau > 0:
            with clock("smoothing"):  # leaves tiles without a learned weight at 1/M
                weights = laplacian_smooth(weights, learned, grid.counts, p.laplacian_tau)
        log.info(
            "fit %s: %d/%d tiles learned from %d patients (%d skipped)",
            task,
            int(learned.sum()),
            grid.n_tiles,
            len(used),
            len(pids) - len(used),
        )
        settings = {
            "pacs_sr": config_to_dict(self.config)["pacs_sr"],
            "registration": _registration_settings(self.config) if self.registrar else None,
            "fold": task.fold,
            "spacing": task.spacing,
            "pulse": task.pulse,
            "train_patients": used,
            "pacs_numba_version": __version__,
        }
        # the grid's affine (first used training HR, in atlas space when registered): weight
        # maps of the model alone carry it
        if self.registrar is not None:
            affine = self._registered_volumes(used[0])[0].meta.affine
        else:  # the header only: a fit from cached statistics reads no volume
            affine = read_affine(train[used[0]]["HR"])
        model = StackingModel(
            weights, learned, grid, self.models, settings,
            window=p.mixing_window, affine=np.asarray(affine, np.float64),
            normalisation=p.normalize, train_patients=tuple(used),
        )
        return model

    def _reusable_model(
        self, record: RunRecord, source: dict[str, Any], lay: TaskLayout
    ) -> StackingModel | None:
        """Return the previous model when resuming and its training inputs are unchanged."""
        digest = record.reusable_model(source)
        if digest is None or not lay.model_file.exists():
            return None
        try:
            model = load_model(lay.model_file)
        except InputError as exc:
            log.warning("resume: %s; fitting again", exc)
            return None
        if model_digest(model.weights, model.learned, model.grid.shape) != digest:
            log.info("resume: '%s' is not the recorded model; fitting again", lay.model_file)
            return None
        log.info("resume: reusing the fitted model in '%s'", lay.model_file)
        return model

    def _reference_shape(
        self, task: Task, patients: Mapping[str, Mapping[str, Any]], skipped: dict[str, str],
        what: str = "",
    ) -> tuple[int, int, int]:
        """Shape of the first readable HR: the grid every patient of the task must share.

        When no HR can be read at all, every patient is reported as skipped (a single bad HR
        is reported later, by the patient's own load).
        """
        if self.registrar is not None:  # every registered volume is on the atlas grid
            return self.registrar.shape(task.pulse)
        reasons: dict[str, str] = {}
        for pid, paths in patients.items():
            try:  # the header only: the memory plan comes before any volume is read
                shape = read_shape(paths["HR"])
            except InputError:
                try:  # a broken file: the volume reader says precisely what is wrong
                    shape = self.store.get(paths["HR"]).data.shape
                except InputError as exc:
                    reasons[pid] = str(exc)
                    continue
            if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
                return tuple(int(n) for n in shape[:3])  # type: ignore[return-value]
            reasons[pid] = f"input '{paths['HR']}' has shape {shape}; expected a 3-D volume"
        for pid, why in reasons.items():
            log.warning("skipping patient %s: %s", pid, why)
        skipped.update(reasons)
        raise InputError(f"task {task}: every {what}patient was skipped: " + _reasons(reasons))

    @staticmethod
    def _check_grid(pid: str, hr_path: str, shape: tuple[int, ...], grid: TileGrid) -> None:
        if tuple(shape) != grid.shape:
            raise InputError(
                f"patient {pid}: HR '{hr_path}' has shape {tuple(shape)}; every patient of a "
                f"task must share the training grid {grid.shape} (register them to one space)"
            )

    def _load_weights(self, task: Task, path: Path, train: Mapping, test: Mapping) -> StackingModel:
        shape = self._reference_shape(task, {**test, **train}, {})
        check_tile_settings(self.pacs.patch_size, self.pacs.stride, shape, str(self.config.path))
        grid = TileGrid(shape, self.pacs.patch_size, self.pacs.stride)
        if path.suffix == ".npz":
            model = load_model(path)
            if model.grid != grid or model.model_names != self.models:
                raise InputError(
                    f"model '{path}' was made for grid {model.grid} and experts "
                    f"{list(model.model_names)}; this task has {grid} and {list(self.models)}"
                )
            return model
        weights, learned = read_weights_json(path, grid.n_tiles, len(self.models))
        self._check_neighbour_model(path, grid)
        log.info("evaluate %s: %d tiles from '%s'", task, int(learned.sum()), path)
        return StackingModel(weights, learned, grid, self.models, {"weights_from": str(path)})

    def _check_neighbour_model(self, path: Path, grid: TileGrid) -> None:
        """Check that a weights.json next to our model file belongs to this task's grid.

        The published weights.json names tile ids only; ids of another patch size or stride
        can all be in range and still mean other tiles.  When the file sits next to the
        ``pacs_model.npz`` it was written with, that file knows the grid: use it.
        """
        neighbour = Path(path).parent / MODEL_FILE
        if not neighbour.is_file():
            return
        try:
            other = load_model(neighbour)
        except InputError:
            return  # the weights.json stands on its own
        if other.grid != grid or len(other.model_names) != len(self.models):
            raise InputError(
                f"weights file '{path}' was written with the model '{neighbour}' for grid "
                f"{other.grid} and {len(other.model_names)} experts; this task has {grid} and "
                f"{len(self.models)} experts (another patch_size, stride or volume shape)"
            )

    # ---------------------------------------------------------------- evaluate
    def _evaluate_split(
        self,
        task: Task,
        split: str,
        patients: Mapping[str, Mapping[str, Any]],
        model: StackingModel,
        clock: StageClock,
        skipped: dict[str, str],
        nonfinite: dict[str, dict[str, int]],
        record: RunRecord,
        stage_plan: StagePlan | None,
    ):
        if not patients or stage_plan is None:
            return {}, None
        p = self.pacs
        grid = model.grid
        plan = stage_plan.pool.for_patients(len(patients))
        log.info("evaluate %s %s: %s", task, split, _describe_plan(plan))
        lay = self.layout(task)
        npz: _WeightNpz | None = None
        nifti_maps: _WeightNifti | None = None
        if p.save_weight_volumes and split == "test":
            with clock("writes"):  # before the pool: the maps never meet a patient in flight
                npz = _WeightNpz(model, task)
                nifti_maps = _WeightNifti(model, p.mixing_window)
                nifti_maps.write_model(lay.model_dir)

        def eval_one(pid: str):
            paths = patients[pid]
            inputs = fingerprints([paths["HR"], *paths["experts"]])
            kept = record.reusable_patient(split, pid, inputs)
            if kept is not None:
                log.info("patient=%s split=%s resumed (outputs complete)", pid, split)
                return kept
            outputs: list[Path] = []
            hr, experts = self._load(pid, paths, clock, skipped, nonfinite)
            self._check_grid(pid, paths["HR"], hr.data.shape, grid)
            t0 = time.perf_counter()
            exp = [e.data for e in experts]
            with clock("blend"):
                try:  # algorithm A7: statistics from the HR; brain mask from the HR or atlas
                    norm = Normalisation.from_hr(hr.data, exp)
                    bmask = self._brain_mask(task, hr.data)
                    blend = blend_patient(
                        exp, grid, model.weights, window=p.mixing_window, norm=norm,
                        brain_mask=bmask,
                    )
                except InputError as exc:
                    msg = f"HR '{paths['HR']}': {exc}"
                    log.warning("skipping patient %s: %s", pid, msg)
                    skipped[pid] = msg
                    raise _Skip(pid) from exc
            with clock("metrics"):
                m = volume_metrics(hr.data, blend, ssim_axis=p.ssim_axis)
            with clock("writes"):
                if p.save_blends:
                    target = lay.blend(split, pid)
                    write_nifti(target, blend, hr.meta.affine, hr.meta.header)
                    outputs.append(target)
                del blend  # before the extras below: their blend then replaces it in memory
            extra: dict[str, Any] = {}
            if split == "test":
                with clock("metrics"):  # each expert alone, and the HR-free protocol
                    # with registration every blend, the HR-free one too, takes the atlas mask
                    extra = test_extras(
                        hr.data, exp, model, window=p.mixing_window, ssim_axis=p.ssim_axis,
                        mask=bmask if self.registrar is not None else None,
                    )
            if nifti_maps is None:
                del bmask
            affine = hr.meta.affine
            with clock("writes"):
                # The npz writes below are the slowest step: release this patient's mapped
                # volumes first so they do not count against other patients.
                del exp, experts, hr
                if npz is not None:
                    outputs += npz.write(lay, pid)
                if nifti_maps is not None:
                    outputs += nifti_maps.write_patient(lay.model_dir, pid, affine, bmask)
                    del bmask
            log.info(
                "patient=%s split=%s secs=%.2f psnr=%.4f ssim=%.4f mse=%.6g mae=%.6g",
                pid,
                split,
                time.perf_counter() - t0,
                m["psnr"],
                m["ssim"],
                m["mse"],
                m["mae"],
            )
            result: dict[str, Any] = {k: float(v) for k, v in m.items()}  # every metric made
            result.update(extra)
            record.add_patient(split, pid, inputs, outputs, result)
            return result

        res = self._map_patients(f"{split} {task}", list(patients), eval_one, plan)
        if not res:
            raise InputError(
                f"task {task}: every {split} patient was skipped: "
                + _reasons({pid: skipped.get(pid, "?") for pid in patients})
            )
        return {pid: res[pid] for pid in patients if pid in res}, plan

_NOT_RUN = object()


class _WeightNpz:
    """The two weight-map ``.npz`` files of a task's test patients (algorithm A8).

    Their content is the same for every test patient but ``patient_id``, so both are
    compressed once into template bytes (a few MB) before the pool starts; the per-voxel
    maps (``4NM + 8N`` bytes) are freed at once, and each patient's files are the template
    plus a ``patient_id`` member.
    """

    def __init__(self, model: StackingModel, task: Task) -> None:
        grid, names = model.grid, np.asarray(model.model_names)
        maps = weight_maps(model.weights, grid)
        analysis = weight_analysis(maps, list(model.model_names), tiles=(model.weights, grid))
        self.weights = npz_bytes(
            weight_maps=maps, model_names=names, split=np.asarray("test"),
            spacing=np.asarray(task.spacing), pulse=np.asarray(task.pulse),
            patch_size=np.int64(grid.patch_size), stride=np.int64(grid.stride),
            shape=np.asarray(grid.shape, dtype=np.int64), n_models=np.int64(len(names)),
        )
        self.analysis = npz_bytes(**analysis)  # weight_maps, entropy, dominant, statistics
        del maps, analysis

    def write(self, lay: TaskLayout, pid: str) -> list[Path]:
        """Write ``{pid}_weights_test.npz`` and ``{pid}_weight_analysis_test.npz``."""
        paths = [lay.weight_npz(pid), lay.weight_analysis_npz(pid)]
        atomic_savez_from(paths[0], self.weights, patient_id=np.asarray(pid))
        atomic_savez_from(paths[1], self.analysis, patient_id=np.asarray(pid))
        return paths


def _registration_settings(config: FullConfig) -> dict[str, Any]:
    """Return the ``registration`` section as recorded with a task's results (paths as strings)."""
    return config_to_dict(config).get("registration") or {}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _ensure_weights_json(path: Path, model: StackingModel) -> None:
    """Rewrite ``weights.json`` when it is missing or is not the reused model's (resume)."""
    text = weights_json_text(model.weights, model.learned)
    try:
        same = path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        same = False
    if not same:
        log.info("resume: '%s' is missing or differs from the model; writing it again", path)
        atomic_write_text(path, text)


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


class _WeightNifti:
    """The NIfTI weight maps of a task (see :mod:`pacs_numba.weightmaps`).

    The maps the blend applies do not depend on the patient, so the entropy and label maps
    are made once (``weightmaps.BlendWeightMaps``); each test patient's copy is masked with
    that patient's brain mask and carries its HR's affine.  The model's own copy
    (``weight_maps_model_*``) is unmasked, on the model's affine.
    """

    def __init__(self, model: StackingModel, window: str) -> None:
        self.model = model
        self.maps = BlendWeightMaps(model.weights, model.grid, window)

    def write_model(self, mdir: Path) -> list[Path]:
        """Write ``weight_maps_model_{weights,entropy,dominant}`` for the model itself.

        The legend records the model's digest; files of the same model are kept as they are
        (a resumed run leaves its complete outputs untouched).
        """
        m = self.model
        digest = model_digest(m.weights, m.learned, m.grid.shape)
        paths = map_paths(mdir, "weight_maps_model")
        try:
            same = json.loads(paths["legend"].read_text()).get("model_digest") == digest
        except (OSError, ValueError):
            same = False
        if same and all(p.exists() for p in paths.values()):
            return list(paths.values())
        return self.maps.write(mdir, "weight_maps_model", m.model_names, m.affine,
                               legend_extra={"model_digest": digest})

    def write_patient(self, mdir: Path, pid: str, affine: Any, mask: Any) -> list[Path]:
        """Write ``{pid}_weight_maps_test_*`` masked like the patient's blend."""
        return self.maps.write(mdir, f"{pid}_weight_maps_test", self.model.model_names,
                               affine, mask=mask)


def _reasons(reasons: Mapping[str, str]) -> str:
    return "; ".join(f"{pid}: {why}" for pid, why in reasons.items())


def _describe_plan(plan: PoolPlan) -> str:
    return f"{plan.width} worker(s) x {plan.threads} numba thread(s) ({plan.reason})"
