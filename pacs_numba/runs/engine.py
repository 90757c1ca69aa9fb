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
import os
import platform
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numba
import numpy as np

from ..config import FullConfig, config_to_dict
from ..core.blending import brain_mask
from ..core.harmonise import common_shape, zoom_to, zoomed_affine
from ..core.metrics import aggregate
from ..core.scoring import extras_summary, split_extras
from ..core.tiling import TileGrid
from ..errors import ConfigError, InputError, Interrupted
from ..resources.costs import load_parallelism
from ..resources.limits import Limits, detect_limits
from ..resources.planning import PoolPlan, StagePlan, check_tile_settings, plan_task_stages
from ..resources.process import baseline_bytes
from ..resources.threads import ensure_threading_layer, thread_safe_layer
from ..store.atomic import atomic_write_json
from ..store.hdf5 import h5py_module
from ..store.integrity import require_regular_file, strict_json, sweep_temp_files
from ..store.layout import ExperimentLayout, TaskLayout
from ..store.locks import TaskBusy, TaskLock
from ..store.manifest import filter_tasks, load_manifest, select_task
from ..store.modelfile import ensure_weights_json, save_model, write_weights_json
from ..store.nifti import AFFINE_ATOL, NiftiMeta, affine_difference
from ..store.record import (
    RunRecord,
    atlas_fingerprints,
    fingerprints,
    model_digest,
    result_settings,
)
from ..store.registration import Registrar, ants_import_bytes, ants_imported
from ..store.results_h5 import TIME_KEY, split_metrics_doc
from ..store.statscache import StatsCache
from ..store.volumes import CachedVolume, VolumeStore, source_file, volume_shape
from .evaluate import EvaluateStage
from .fit import FitStage
from .paper_metrics import paper_metrics_table
from .pool import PatientSkipped, StopFlag, join_reasons, map_patients
from .tasks import RunOptions, StageClock, Task, TaskResult, registration_settings
from .training_record import experiment_metadata, training_record
from .warmup import load_kernels

log = logging.getLogger(__name__)















class Engine(FitStage, EvaluateStage):
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
        self._kernels_loaded = False
        self.pacs = config.pacs_sr
        self.models = tuple(config.data.models)
        if config.data.schema == "hdf5":
            h5py_module()  # one clear line now if h5py is missing, not one per volume
        self.store = VolumeStore(self.options.cache_dir, self.options.volume_cache)
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
        self.stop = StopFlag()
        self.stop_event = self.stop.event  # set by request_stop, read between patients
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
            self._manifest = load_manifest(self.config.data.out, self.config.data)
        return self._manifest

    def tasks(
        self, fold: int | None = None, spacing: str | None = None, pulse: str | None = None
    ) -> list[Task]:
        """Every (fold, spacing, pulse) the published tool would run for these filters."""
        folds, spacings, pulses = filter_tasks(
            self.manifest(), self.config.data, None if fold is None else [fold],
            None if spacing is None else [spacing], None if pulse is None else [pulse])
        return [Task(f, s, p) for f in folds for s in spacings for p in pulses]

    def request_stop(self, signum: int) -> None:
        """Ask the run to stop: no new patient starts; in-flight patients finish."""
        self.stop.request_stop(signum)

    @property
    def stop_signal(self) -> int | None:
        """The signal that asked the run to stop, or None."""
        return self.stop.signal

    def layout(self, task: Task) -> TaskLayout:
        """Every output path of ``task`` (:class:`pacs_numba.store.layout.TaskLayout`)."""
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
        if not self._kernels_loaded:
            # Before any patient, as the command line does: on a first run this compiles in
            # two processes under the node lock rather than inside the stages, one kernel at
            # a time on whichever pool thread meets it first; otherwise it loads them.
            fitting = weights_path is None and not own_model
            load_kernels("train" if fitting else "evaluate", self.pacs)
            self._kernels_loaded = True
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
            settings["registration"] = registration_settings(self.config)
            reg = self.registrar.config  # the atlas files, fingerprinted: --resume sees edits
            settings["atlas"] = atlas_fingerprints(
                self.registrar.template_path(task.pulse), Path(reg.atlas) / reg.brain_mask
            )
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
                ensure_weights_json(lay.weights_json, model)
        else:
            model = self._load_weights(task, weights_path, train, test)
            source = {"weights": fingerprints([weights_path])}
            shape = model.grid.shape
        # before hours of work: will the inputs' cache entries fit on the cache's disk?
        read = {**test, **(train if fitting or self.pacs.evaluate_train else {})}
        space = self.store.check_space(f"task {task}", [f for paths in read.values() for f in
                                                        (paths["HR"], *paths["experts"])],
                                       int(np.prod(shape)), exact=True)
        # every entry there already: no patient decodes, so the plan leaves the decodes out
        # (the memory cache looks none up: it decodes every time)
        plans = self._plan_stages(task, shape, len(train), len(test), fit=fitting,
                                  cold=space["cached"] < space["inputs"])
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
            results["train"] = aggregate([_without_time(r)
                                          for r in per_patient["train"].values()])
        per_patient["test"], plan_t = self._evaluate_split(
            task, "test", test, model, clock, skipped, nonfinite, record, plans.get("evaluate")
        )
        plan = plan or plan_t
        seconds = {split: {pid: float(r.get(TIME_KEY, float("nan"))) for pid, r in pp.items()}
                   for split, pp in per_patient.items()}
        # each expert alone and the HR-free protocol, beside (never inside) the published keys
        per_patient["train"] = {pid: _without_time(r) for pid, r in per_patient["train"].items()}
        per_patient["test"], test_experts, test_hr_free = split_extras(per_patient["test"])
        results["test"] = aggregate(list(per_patient["test"].values()))  # {} for no test patient
        if not test:
            log.warning("task %s: the manifest has no test patients", task)

        metrics_doc: dict[str, Any] = dict(results)
        if self.config.data.schema == "hdf5":  # the current release's form, with std and rows
            metrics_doc.update((split, split_metrics_doc(per_patient[split], seconds[split]))
                               for split in results)
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
        if self.pacs.compute_paper_metrics and test:  # the paper's table, this task's rows
            paper_metrics_table(self.config, out_root=self.out_root,
                                cache_dir=self.store.directory, tasks=[task],
                                mem_budget_bytes=self.options.mem_budget_bytes)
        secs = time.perf_counter() - t_task
        summary = " ".join(
            f"{split}_{k}={results[split][k]:.4f}"
            for split in ("train", "test")
            if results.get(split)
            for k in ("psnr", "ssim")
        )
        log.info("task=%s secs=%.1f skipped=%d %s", task, secs, len(skipped), summary)
        return TaskResult(
            task, results, per_patient, skipped, mdir, dict(clock.seconds), plan, plans, extras,
            seconds,
        )

    # ---------------------------------------------------------------- checks
    def _check_files_exist(self, task: Task, patients: Mapping[str, Mapping[str, Any]]) -> None:
        missing = []
        for pid, paths in patients.items():
            for p in [paths["HR"], *paths["experts"]]:
                f = source_file(p)  # an HDF5 dataset's key is checked when it is read
                if not f.exists():
                    missing.append(f"{pid}: {p}")
                else:  # a FIFO would block the first read for ever; a folder is no volume
                    require_regular_file(f, f"patient {pid}: input")
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
        self, task: Task, shape: tuple[int, int, int], n_train: int, n_test: int, *, fit: bool,
        cold: bool = True,
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
            volume_cache=self.store.mode,
            cold=cold,
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
                    hr, *experts = self._get_volumes([paths["HR"], *paths["experts"]])
            except InputError as exc:
                log.warning("skipping patient %s: %s", pid, exc)
                skipped[pid] = str(exc)
                raise PatientSkipped(pid) from exc
        try:
            hr, experts, resampled = self._harmonise(pid, paths, hr, experts)
        except InputError as exc:
            log.warning("skipping patient %s: %s", pid, exc)
            skipped[pid] = str(exc)
            raise PatientSkipped(pid) from exc
        for e, path in zip(experts, paths["experts"], strict=True):
            if resampled:  # the affines were made to agree by the resampling
                continue
            why = affine_difference(e.meta.affine, hr.meta.affine)
            if why is not None:
                log.warning(
                    "patient %s: affine of expert '%s' differs from HR '%s' (%s; tolerance %g)",
                    pid, path, paths["HR"], why, AFFINE_ATOL,
                )
        counts = {str(v.source): int(v.nonfinite) for v in [hr, *experts] if v.nonfinite}
        if counts:
            nonfinite[pid] = counts
            for f, n in counts.items():
                log.warning("patient %s: %d NaN/Inf voxels in '%s' excluded", pid, n, f)
        return hr, experts

    def _get_volumes(self, files: list[Any]) -> list[CachedVolume]:
        """Return the cached volumes of ``files``, decompressing several at once.

        A patient's worker owns ``numba.get_num_threads()`` threads of the plan; on a cold
        cache they would wait idle while its volumes are decompressed one after the other.
        ISA-L's inflate and CRC-32 release the GIL, so up to that many volumes, and at most
        half of the patient's files (rounded up), are decompressed at a time: their decodes
        then fit in what the memory plan already charges the patient (``costs.load_bytes``;
        ``costs.held_load_bytes`` when the volumes are held in memory).
        The first failing file in the given order raises, as a serial read would.
        """
        k = load_parallelism(len(files), numba.get_num_threads())
        if k <= 1:
            return [self.store.get(f) for f in files]
        name = threading.current_thread().name
        with ThreadPoolExecutor(k, thread_name_prefix=f"{name}-load") as pool:
            return list(pool.map(self.store.get, files))

    # ---------------------------------------------------------------- shapes
    def _harmonise(self, pid: str, paths: Mapping[str, Any], hr: CachedVolume,
                   experts: list[CachedVolume]):
        """Apply ``pacs_sr.shape_policy`` to a patient whose volumes differ in shape.

        ``skip`` (the 2025 release): InputError naming the first expert that differs.
        ``harmonise`` (the current release): every volume resampled to the element-wise
        maximum shape (``core.harmonise``); the tiles are then cut on that shape for fit and
        blend alike.  Returns ``(hr, experts, resampled)``.
        """
        shapes = [hr.data.shape, *(e.data.shape for e in experts)]
        if len(set(shapes)) == 1:
            return hr, experts, False
        if self.pacs.shape_policy != "harmonise":
            e, path = next((e, p) for e, p in zip(experts, paths["experts"], strict=True)
                           if e.data.shape != hr.data.shape)
            raise InputError(_shape_message(pid, path, e.data.shape, hr.data.shape, paths["HR"]))
        target = common_shape(shapes)
        log.info("patient %s: resampling %s to the common shape %s", pid,
                 sorted({str(s) for s in shapes if s != target}), target)
        affine = zoomed_affine(hr.meta.affine, hr.data.shape, target)

        def fit(v: CachedVolume) -> CachedVolume:
            if v.data.shape == target:
                return v
            data = zoom_to(v.data, target)
            data.flags.writeable = False
            return dataclasses.replace(v, data=data, meta=NiftiMeta.from_affine(target, affine),
                                       nonfinite=int(np.count_nonzero(~np.isfinite(data))))

        return fit(hr), [fit(e) for e in experts], True

    def _shapes_skip(self, pid: str, paths: Mapping[str, Any], skipped: dict[str, str]) -> None:
        """Under ``shape_policy: skip``, skip a patient whose headers differ in shape.

        Checked before the statistics cache is asked, so that a patient cached by a
        ``harmonise`` run is still skipped here.
        """
        if self.pacs.shape_policy == "harmonise" or self.registrar is not None:
            return
        try:
            hr_shape = tuple(volume_shape(paths["HR"])[:3])
            for path in paths["experts"]:
                shape = tuple(volume_shape(path)[:3])
                if shape != hr_shape:
                    msg = _shape_message(pid, path, shape, hr_shape, paths["HR"])
                    log.warning("skipping patient %s: %s", pid, msg)
                    skipped[pid] = msg
                    raise PatientSkipped(pid)
        except InputError:
            return  # the load reports it

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

    def _fitted(self, task: Task, used: list[str], grid: TileGrid, stats: tuple,
                solved: np.ndarray, weights: np.ndarray, learned: np.ndarray) -> None:
        """After a fit (hook): the current release's training record, for HDF5-form configs."""
        if self.config.data.schema != "hdf5":
            return
        rec = training_record(self.config, task, used, grid, stats, solved, weights, learned,
                              {})
        atomic_write_json(self.layout(task).training_record, strict_json(rec), indent=2)

    def write_metadata(self, tasks: list[Task], command: str) -> None:
        """Write ``experiment_metadata.json`` at the experiment root (HDF5-form configs)."""
        if self.config.data.schema != "hdf5":
            return
        lay = ExperimentLayout(self.out_root, self.pacs.experiment_name)
        lay.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(lay.metadata_file,
                          strict_json(experiment_metadata(self.config, tasks, command)), indent=2)

    def _registered_volumes(self, pid: str):
        """Return the registered (atlas-space) HR and experts of ``pid`` (hook)."""
        got = self._registered.get(pid)
        if got is None:
            raise InputError(f"patient {pid} was not registered (stopped before it)")
        if isinstance(got, InputError):
            raise got
        return got



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
                shape = volume_shape(paths["HR"])
            except InputError:
                try:  # a broken file: the volume reader says precisely what is wrong
                    shape = self.store.get(paths["HR"]).data.shape
                except InputError as exc:
                    reasons[pid] = str(exc)
                    continue
            if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
                if self.pacs.shape_policy == "harmonise":  # the tiles are cut on S
                    try:
                        shape = common_shape([shape, *(volume_shape(p)
                                                       for p in paths["experts"])])
                    except InputError:
                        pass  # an unreadable expert: the patient's load reports it
                return tuple(int(n) for n in shape[:3])  # type: ignore[return-value]
            reasons[pid] = f"input '{paths['HR']}' has shape {shape}; expected a 3-D volume"
        for pid, why in reasons.items():
            log.warning("skipping patient %s: %s", pid, why)
        skipped.update(reasons)
        raise InputError(f"task {task}: every {what}patient was skipped: " + join_reasons(reasons))

    @staticmethod
    def _check_grid(pid: str, hr_path: str, shape: tuple[int, ...], grid: TileGrid) -> None:
        if tuple(shape) != grid.shape:
            raise InputError(
                f"patient {pid}: HR '{hr_path}' has shape {tuple(shape)}; every patient of a "
                f"task must share the training grid {grid.shape} (register them to one space)"
            )

    def _map_patients(
        self, desc: str, items: list[str], fn: Callable[[str], Any], plan: PoolPlan
    ) -> dict[str, Any]:
        """Run ``fn(pid)`` for every patient on the task's pool (:func:`pool.map_patients`)."""
        return map_patients(desc, items, fn, plan, self.stop,
                            no_progress=self.pacs.disable_tqdm or self.options.no_progress)


def _shape_message(pid: str, path: str, shape: tuple, hr_shape: tuple, hr: str) -> str:
    return (f"patient {pid}: expert '{path}' has shape {tuple(shape)}; expected "
            f"{tuple(hr_shape)} like HR '{hr}' (pacs_sr.shape_policy: harmonise resamples it "
            "instead)")


def _without_time(result: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k != TIME_KEY}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False




def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []
