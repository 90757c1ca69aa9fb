"""The run: tasks of (fold, spacing, pulse), patients in a thread pool, outputs of algorithm A8.

One process, one volume cache.  Each patient's HR and expert volumes are memory-mapped
from the shared cache (``io.VolumeStore``); the fused kernels read them in place, so a
patient in flight costs its touched pages plus a few small accumulators instead of the
published tool's ~20 private float32 copies.  Per-patient results are combined in manifest
order after the pool has finished, so the numbers do not depend on the pool width or on
which thread finished first.
"""

from __future__ import annotations

import dataclasses
import logging
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
from .errors import BudgetError, ConfigError, InputError, Interrupted
from .io import (
    VolumeStore,
    atomic_savez_from,
    atomic_write_json,
    npz_bytes,
    read_shape,
    write_nifti,
)
from .layout import TaskLayout
from .manifest import load_manifest, select_task
from .memory import (
    Limits,
    PoolPlan,
    baseline_bytes,
    detect_limits,
    per_patient_bytes,
    per_task_bytes,
    plan_pool,
    setup_bytes,
)
from .metrics import METRIC_KEYS, aggregate, volume_metrics  # noqa: F401 - METRIC_KEYS re-exported
from .model import (
    StackingModel,
    load_model,
    read_weights_json,
    save_model,
    write_weights_json,
)
from .progress import progress
from .record import RunRecord, fingerprints, model_digest, result_settings
from .solve import fit_weights, laplacian_smooth
from .tiling import TileGrid

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
    """

    cache_dir: Path | None = None
    workers: int | None = None
    mem_budget_bytes: int | None = None
    force: bool = False
    resume: bool = False
    no_progress: bool = False
    out_root: Path | None = None


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
        if self.pacs.use_registration:
            raise ConfigError(
                f"{config.path}: pacs_sr.use_registration: true is not supported by pacs_numba "
                "yet; set it to false (the brain mask then comes from the HR, algorithm A7.5)"
            )
        self.models = tuple(config.data.models)
        self.store = VolumeStore(self.options.cache_dir)
        # Per-patient fit statistics, shared by every fold, lambda and process on the node.
        self.stats_cache = StatsCache(self.store.directory / "cellstats")
        self.limits = limits if limits is not None else detect_limits()
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
        if weights_path is None:
            lay = self.layout(task)
            weights_path = lay.existing_weights()
            if weights_path is None:
                raise InputError(
                    f"no model for {task} in '{lay.model_dir}': run `pacs-numba train` first "
                    "or pass --weights"
                )
        return self._run(task, weights_path=Path(weights_path))

    # ---------------------------------------------------------------- the task
    def _run(self, task: Task, weights_path: Path | None) -> TaskResult:
        t_task = time.perf_counter()
        clock = StageClock()
        train, test = select_task(self.manifest(), task.fold, task.spacing, task.pulse, self.models)
        self._check_files_exist(task, {**train, **test})
        lay = self.layout(task)
        mdir = lay.model_dir
        self._check_existing_outputs(task, lay)
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
        record = RunRecord(
            lay.record_file,
            result_settings(config_to_dict(self.config)["pacs_sr"], self.models),
            resume=self.options.resume,
        )
        plan: PoolPlan | None = None
        if weights_path is None:
            source: dict[str, Any] = {
                "train": {
                    pid: fingerprints([paths["HR"], *paths["experts"]])
                    for pid, paths in train.items()
                }
            }
            model = self._reusable_model(record, source, lay)
            if model is None:
                model, plan = self._fit(task, train, clock, skipped, nonfinite)
                with clock("writes"):
                    save_model(lay.model_file, model)
                    write_weights_json(lay.weights_json, model.weights, model.learned)
            else:
                skipped.update((record.old or {}).get("model", {}).get("skipped", {}))
        else:
            model = self._load_weights(task, weights_path, train, test)
            source = {"weights": fingerprints([weights_path])}
            with clock("writes"):
                write_weights_json(lay.weights_json, model.weights, model.learned)
        record.set_model(
            model_digest(model.weights, model.learned, model.grid.shape), source, dict(skipped)
        )

        per_patient: dict[str, dict[str, dict[str, float]]] = {"train": {}, "test": {}}
        results: dict[str, dict[str, float]] = {}
        if self.pacs.evaluate_train and train:
            per_patient["train"], plan_e = self._evaluate_split(
                task, "train", train, model, clock, skipped, nonfinite, record
            )
            plan = plan or plan_e
            # a non-empty split either yields metrics or _evaluate_split raises
            results["train"] = aggregate(list(per_patient["train"].values()))
        per_patient["test"], plan_t = self._evaluate_split(
            task, "test", test, model, clock, skipped, nonfinite, record
        )
        plan = plan or plan_t
        results["test"] = aggregate(list(per_patient["test"].values()))  # {} for no test patient
        if not test:
            log.warning("task %s: the manifest has no test patients", task)

        metrics_doc: dict[str, Any] = dict(results)
        if skipped:
            metrics_doc["skipped"] = dict(sorted(skipped.items()))
        if nonfinite:
            metrics_doc["nonfinite_voxels"] = dict(sorted(nonfinite.items()))
        with clock("writes"):
            atomic_write_json(lay.metrics_json, metrics_doc, indent=2)
            atomic_write_json(
                lay.patients_json,
                {"per_patient": per_patient, "skipped": skipped, "timings_s": clock.seconds},
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
        return TaskResult(task, results, per_patient, skipped, mdir, dict(clock.seconds), plan)

    # ---------------------------------------------------------------- checks
    def _check_files_exist(self, task: Task, patients: Mapping[str, Mapping[str, Any]]) -> None:
        missing = []
        for pid, paths in patients.items():
            for p in [paths["HR"], *paths["experts"]]:
                if not Path(p).exists():
                    missing.append(f"{pid}: {p}")
        if missing:
            listing = "\n  ".join(missing)
            raise InputError(
                f"{len(missing)} input file(s) of {task} named in the manifest "
                f"'{self.config.data.out}' do not exist:\n  {listing}"
            )

    def _check_existing_outputs(self, task: Task, lay: TaskLayout) -> None:
        if self.options.force or self.options.resume:
            return
        if lay.metrics_json.exists():
            raise ConfigError(
                f"outputs of {task} already exist in '{lay.model_dir}'; pass --force to "
                "overwrite them "
                "or --resume to keep complete ones"
            )

    # ---------------------------------------------------------------- pool
    def _plan(self, n_patients: int, shape: tuple[int, int, int], stage: str) -> PoolPlan:
        grid = TileGrid(shape, self.pacs.patch_size, self.pacs.stride)
        per = per_patient_bytes(
            shape,
            len(self.models),
            lambda_grad=self.pacs.lambda_grad,
            lambda_edge=self.pacs.lambda_edge,
            n_tiles=grid.n_tiles,
            stage=stage,
            save_weight_volumes=self.pacs.save_weight_volumes,
        )
        once = per_task_bytes(
            shape, len(self.models), n_tiles=grid.n_tiles, stage=stage,
            save_weight_volumes=self.pacs.save_weight_volumes, n_patients=n_patients,
        )
        plan = plan_pool(
            self.limits,
            per_patient_bytes=per,
            per_task_bytes=once,
            baseline_bytes=baseline_bytes(),
            n_patients=max(1, n_patients),
            num_workers=self.pacs.num_workers,
            workers_override=self.options.workers,
            mem_budget_bytes=self.options.mem_budget_bytes,
        )
        setup = setup_bytes(shape, len(self.models), stage=stage,
                            save_weight_volumes=self.pacs.save_weight_volumes)
        if plan.baseline_bytes + setup + plan.margin_bytes > plan.limit.value:
            raise BudgetError(
                f"the weight maps of one task need {setup / 2**30:.2f} GiB on top of "
                f"{plan.baseline_bytes / 2**30:.2f} GiB baseline, but the job has "
                f"{plan.limit.value / 2**30:.2f} GiB ({plan.limit.source}); request more memory "
                "or set save_weight_volumes: false"
            )
        if plan.width > 1 and not thread_safe_layer():
            log.warning(
                "Numba threading layer is %s, which aborts when several threads launch "
                "kernels; running patients one at a time",
                self.layer,
            )
            plan = dataclasses.replace(
                plan,
                width=1,
                threads=plan.threads * plan.width,
                reason=plan.reason + "; 1 worker: workqueue layer",
            )
        return plan

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

    # ---------------------------------------------------------------- fit
    def _fit(
        self,
        task: Task,
        train: Mapping[str, Mapping[str, Any]],
        clock: StageClock,
        skipped: dict[str, str],
        nonfinite: dict[str, dict[str, int]],
    ):
        if not train:
            raise InputError(f"task {task}: the manifest has no training patients")
        pids = list(train)
        shape = self._reference_shape(task, train, skipped, "training ")
        grid = TileGrid(shape, self.pacs.patch_size, self.pacs.stride)
        plan = self._plan(len(pids), shape, "fit")
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
            st = self.stats_cache.get(
                [paths["HR"], *paths["experts"]], key, load,
                edge_power=p.edge_power, grad_operator=p.grad_operator,
            )
            clock.add("statistics", time.perf_counter() - t0 - load_s)
            self._check_grid(pid, paths["HR"], st.shape, grid)
            if st.n_mask == 0:
                msg = f"HR '{paths['HR']}' has no voxel > 0 (empty mask)"
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
            "fold": task.fold,
            "spacing": task.spacing,
            "pulse": task.pulse,
            "train_patients": used,
            "pacs_numba_version": __version__,
        }
        return StackingModel(weights, learned, grid, self.models, settings), plan

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
        log.info("evaluate %s: %d tiles from '%s'", task, int(learned.sum()), path)
        return StackingModel(weights, learned, grid, self.models, {"weights_from": str(path)})

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
    ):
        if not patients:
            return {}, None
        p = self.pacs
        grid = model.grid
        plan = self._plan(len(patients), grid.shape, "evaluate")
        log.info("evaluate %s %s: %s", task, split, _describe_plan(plan))
        lay = self.layout(task)
        npz: _WeightNpz | None = None
        if p.save_weight_volumes and split == "test":
            with clock("writes"):  # before the pool: the maps never meet a patient in flight
                npz = _WeightNpz(model, task)

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
                try:  # algorithm A7: statistics and brain mask from the HR
                    norm = Normalisation.from_hr(hr.data, exp)
                    blend = blend_patient(
                        exp, grid, model.weights, window=p.mixing_window, norm=norm,
                        brain_mask=brain_mask(hr.data),
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
                # The npz writes below are the slowest step: release this patient's blend
                # and mapped volumes first so they do not count against other patients.
                del blend, exp, experts, hr
                if npz is not None:
                    outputs += npz.write(lay, pid)
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
            result = {k: float(v) for k, v in m.items()}  # every metric volume_metrics made
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


def _reasons(reasons: Mapping[str, str]) -> str:
    return "; ".join(f"{pid}: {why}" for pid, why in reasons.items())


def _describe_plan(plan: PoolPlan) -> str:
    return f"{plan.width} worker(s) x {plan.threads} numba thread(s) ({plan.reason})"
