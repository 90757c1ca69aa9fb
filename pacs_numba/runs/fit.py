"""The fit stage of a task: per-patient statistics (cached), one exact solve, smoothing.

:class:`FitStage` is a part of :class:`~pacs_numba.runs.engine.Engine`; it uses the engine's
config, caches, registration hooks and patient pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from .._version import __version__
from ..config import config_to_dict
from ..core.cellstats import combine, fit_stats_key, sum_stats
from ..core.model import StackingModel
from ..core.solve import fit_weights, laplacian_smooth
from ..core.statistics import hr_is_flat
from ..core.tiling import TileGrid
from ..core.weightfit import fit_model
from ..errors import InputError
from ..resources.planning import StagePlan
from ..store.layout import TaskLayout
from ..store.modelfile import load_model
from ..store.record import RunRecord, model_digest
from ..store.volumes import volume_affine
from .pool import PatientSkipped, describe_plan, join_reasons
from .tasks import StageClock, Task, registration_settings

log = logging.getLogger(__name__)


class FitStage:
    """Fitting the tile weights of a task on its training patients (algorithm A4-A6)."""

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
        log.info("fit %s: %s", task, describe_plan(plan))
        p = self.pacs

        key = fit_stats_key(p)
        # The published model keeps its own path (Q, B summed per patient), bit for bit.
        weight_model = p.prior != "none" or p.gating != "none"

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

            self._shapes_skip(pid, paths, skipped)  # shape_policy: skip, before the cache
            t0 = time.perf_counter()
            if self.registrar is not None:
                # atlas-space statistics: name the entry by the registered volumes, whose
                # cache entries are keyed by the inputs, the atlas and the transform settings
                try:
                    hr_r, exp_r = self._registered_volumes(pid)
                except InputError as exc:
                    log.warning("skipping patient %s: %s", pid, exc)
                    skipped[pid] = str(exc)
                    raise PatientSkipped(pid) from exc
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
                raise PatientSkipped(pid)
            if hr_is_flat(st.mu_hr, st.sd_hr):  # nothing to fit: it would teach every tile
                msg = (
                    f"HR '{train[pid]['HR']}' has no variance inside its mask "
                    f"(constant {st.mu_hr:.6g})"
                )
                log.warning("skipping patient %s: %s", pid, msg)
                skipped[pid] = msg
                raise PatientSkipped(pid)
            log.debug(
                "patient=%s stage=fit secs=%.3f mask=%d", pid, time.perf_counter() - t0, st.n_mask
            )
            if weight_model:  # the fit needs the decomposed parts (coarser levels, gated parts)
                return st
            q, b = combine(st, lambda_edge=p.lambda_edge, lambda_grad=p.lambda_grad)
            return q, b, st.counts

        stats = self._map_patients(f"fit {task}", pids, fit_one, plan)
        used = [pid for pid in pids if pid in stats]  # manifest order: deterministic sums
        if not used:
            raise InputError(
                f"task {task}: every training patient was skipped: " + join_reasons(skipped)
            )
        if weight_model:  # algorithm A5.1, A5.2: summed parts, one fit for every level
            with clock("solve"):
                weights, learned = fit_model(
                    sum_stats([stats[pid] for pid in used]), simplex=p.simplex,
                    lambda_ridge=p.lambda_ridge, lambda_edge=p.lambda_edge,
                    lambda_grad=p.lambda_grad, laplacian_tau=p.laplacian_tau, prior=p.prior,
                    prior_strength=p.prior_strength, gating=p.gating,
                )
        else:
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
            solved = weights
            if p.laplacian_tau > 0:
                with clock("smoothing"):  # leaves tiles without a learned weight at 1/M
                    weights = laplacian_smooth(weights, learned, grid.counts, p.laplacian_tau)
            # the training record's solver checks (KKT of the published QP) are for this
            # model only; the weight models' fits are checked by their tests
            self._fitted(task, used, grid, (Q, B, n), solved, weights, learned)  # engine's hook
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
            "registration": registration_settings(self.config) if self.registrar else None,
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
            affine = volume_affine(train[used[0]]["HR"])
        model = StackingModel(
            weights, learned, grid, self.models, settings,
            window=p.mixing_window, affine=np.asarray(affine, np.float64),
            normalisation=p.normalize, train_patients=tuple(used), gating=p.gating,
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
