"""The evaluate stage of a task: blend, score and write each patient of a split.

:class:`EvaluateStage` is a part of :class:`~pacs_numba.runs.engine.Engine`; it uses the
engine's config, caches, registration hooks and patient pool.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..core.blending import NonFiniteBlend
from ..core.model import StackingModel
from ..core.scoring import score_patient
from ..core.tiling import TileGrid
from ..errors import InputError
from ..resources.costs import WRITE_QUEUE_DEPTH
from ..resources.planning import StagePlan, check_tile_settings
from ..store.layout import MODEL_FILE
from ..store.mapfiles import WeightNifti, WeightNpz
from ..store.modelfile import load_model, read_weights_json
from ..store.nifti import write_nifti
from ..store.record import RunRecord, fingerprints
from ..store.results_h5 import TIME_KEY, ResultsH5
from .pool import PatientSkipped, describe_plan, join_reasons
from .tasks import StageClock, Task
from .writer import OutputWriter

log = logging.getLogger(__name__)


def _cause(exc: InputError, paths: Mapping[str, Any]) -> str:
    """Name the input file behind a blend's error.

    The expert a non-finite blend blames, else the HR (every other blend error is about
    the HR's statistics).
    """
    if isinstance(exc, NonFiniteBlend) and exc.expert is not None:
        return f"expert '{paths['experts'][exc.expert]}': {exc}"
    return f"HR '{paths['HR']}': {exc}"


class EvaluateStage:
    """Blending, scoring and writing the patients of a split with a model (algorithm A7-A8)."""

    def _load_weights(self, task: Task, path: Path, train: Mapping, test: Mapping) -> StackingModel:
        shape = self._reference_shape(task, {**test, **train}, {})
        check_tile_settings(self.pacs.patch_size, self.pacs.stride, shape, str(self.config.path))
        grid = TileGrid(shape, self.pacs.patch_size, self.pacs.stride)
        if path.suffix == ".npz":
            model = load_model(path)
            if model.grid != grid or sorted(model.model_names) != sorted(self.models):
                raise InputError(
                    f"model '{path}' was made for grid {model.grid} and experts "
                    f"{list(model.model_names)}; this task has {grid} and {list(self.models)}"
                )
            if model.model_names != self.models:  # the file names its columns: reorder them
                log.warning(
                    "evaluate %s: model '%s' has the experts in the order %s; reordered to "
                    "the config's %s", task, path, list(model.model_names), list(self.models),
                )
                cols = [model.model_names.index(n) for n in self.models]
                model = dataclasses.replace(
                    model, weights=np.ascontiguousarray(model.weights[:, cols]),
                    model_names=self.models,
                )
            return model
        weights, learned = read_weights_json(path, grid.n_tiles, len(self.models))
        order = self._check_neighbour_model(path, grid)
        if order is not None and order != self.models:
            # the columns follow the model written with the file, not data.models
            weights = np.ascontiguousarray(weights[:, [order.index(n) for n in self.models]])
            log.warning(
                "evaluate %s: the weights in '%s' are in the expert order %s of the model "
                "beside them; reordered to the config's %s",
                task, path, list(order), list(self.models),
            )
        log.info("evaluate %s: %d tiles from '%s'", task, int(learned.sum()), path)
        return StackingModel(weights, learned, grid, self.models, {"weights_from": str(path)})

    def _check_neighbour_model(self, path: Path, grid: TileGrid) -> tuple[str, ...] | None:
        """Check a weights.json against the model file beside it; return that model's order.

        The published weights.json names tile ids only; ids of another patch size or stride
        can all be in range and still mean other tiles, and its columns can be in another
        expert order than this config's ``data.models``.  When the file sits next to the
        ``pacs_model.npz`` it was written with, that file knows the grid and the order: the
        grid must be this task's, the experts the same names (the caller then reorders the
        columns to the config's order, see docs/architecture.md).  None when there is no readable
        model beside it (the weights.json stands on its own, in the config's order).

        Raises
        ------
        InputError
            If the model beside it has another grid, or other experts than the config.
        """
        neighbour = Path(path).parent / MODEL_FILE
        if not neighbour.is_file():
            return None
        try:
            other = load_model(neighbour)
        except InputError:
            return None  # the weights.json stands on its own
        if other.grid != grid or len(other.model_names) != len(self.models):
            raise InputError(
                f"weights file '{path}' was written with the model '{neighbour}' for grid "
                f"{other.grid} and {len(other.model_names)} experts; this task has {grid} and "
                f"{len(self.models)} experts (another patch_size, stride or volume shape)"
            )
        if sorted(other.model_names) != sorted(self.models):
            raise InputError(
                f"weights file '{path}' was written with the model '{neighbour}' for experts "
                f"{list(other.model_names)}; this config's data.models is {list(self.models)}: "
                "its columns cannot be matched to these experts"
            )
        return other.model_names

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
        log.info("evaluate %s %s: %s", task, split, describe_plan(plan))
        lay = self.layout(task)
        npz: WeightNpz | None = None
        nifti_maps: WeightNifti | None = None
        if split == "test" and (p.save_weight_volumes or p.save_weight_maps):
            with clock("writes"):  # before the pool: the maps never meet a patient in flight
                if p.save_weight_volumes:
                    npz = WeightNpz(model, task.spacing, task.pulse)
                if p.save_weight_maps:
                    nifti_maps = WeightNifti(model, p.mixing_window)
                    nifti_maps.write_model(lay.model_dir)

        def eval_one(pid: str):
            paths = patients[pid]
            inputs = fingerprints([paths["HR"], *paths["experts"]])
            kept = record.reusable_patient(split, pid, inputs)
            if kept is not None:
                log.info("patient=%s split=%s resumed (outputs complete)", pid, split)
                return kept
            hr, experts = self._load(pid, paths, clock, skipped, nonfinite)
            self._check_grid(pid, paths["HR"], hr.data.shape, grid)
            t0 = time.perf_counter()
            exp = [e.data for e in experts]
            extras = split == "test"
            # One pass scores the blend and, on the test split, each expert alone and the
            # HR-free blend (core/scoring.py): "blend" holds the metrics' time too.
            with clock("blend"):
                try:  # algorithm A7: statistics from the HR; brain mask from the HR or atlas
                    bmask = self._brain_mask(task, hr.data)
                    scored = score_patient(
                        hr.data, exp, model, window=p.mixing_window, ssim_axis=p.ssim_axis,
                        brain_mask=bmask, experts_alone=extras and p.score_experts,
                        hr_free=extras and p.score_hr_free,
                        # with registration every blend, the HR-free one too, takes the atlas
                        hr_free_mask=bmask if self.registrar is not None else None,
                    )
                except InputError as exc:  # a NonFiniteBlend names the expert behind it
                    msg = _cause(exc, paths)
                    log.warning("skipping patient %s: %s", pid, msg)
                    skipped[pid] = msg
                    raise PatientSkipped(pid) from exc
            m, extra, blend = scored.metrics, scored.extras, scored.blend
            del scored
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
            affine, header = hr.meta.affine, hr.meta.header
            # Release this patient's mapped volumes before the writes: they never need them.
            del exp, experts, hr
            keep_blend = blend if p.save_blends else None
            keep_mask = bmask if nifti_maps is not None else None
            del blend, bmask

            def write() -> None:
                """Write the patient's outputs, then record it (runs in the writer thread)."""
                outputs: list[Path] = []
                with clock("writes"):
                    if keep_blend is not None and self.config.data.schema == "hdf5":
                        # the current release's form: results_fold_{N}.h5 (train blends too)
                        outputs.append(ResultsH5(lay.experiment_layout.root, task.fold)
                                       .write_blend(task.spacing, task.pulse, pid, keep_blend,
                                                    affine))
                    elif keep_blend is not None:
                        target = lay.blend(split, pid)
                        write_nifti(target, keep_blend, affine, header)
                        outputs.append(target)
                    if npz is not None:
                        outputs += npz.write(lay, pid)
                    if nifti_maps is not None:
                        outputs += nifti_maps.write_patient(lay.model_dir, pid, affine,
                                                            keep_mask)
                record.add_patient(split, pid, inputs, outputs, result)

            writer.submit(write)
            # the current release's time_seconds: the engine takes it out of the means (a
            # resumed patient has none)
            return {**result, TIME_KEY: time.perf_counter() - t0}

        # Outputs are written on the writer's thread while the pool computes the next
        # patient; leaving the block drains it (also on SIGTERM: only whole, recorded files).
        with OutputWriter(depth=WRITE_QUEUE_DEPTH, name=f"writer-{split}") as writer:
            res = self._map_patients(f"{split} {task}", list(patients), eval_one, plan)
        if not res:
            raise InputError(
                f"task {task}: every {split} patient was skipped: "
                + join_reasons({pid: skipped.get(pid, "?") for pid in patients})
            )
        return {pid: res[pid] for pid in patients if pid in res}, plan
