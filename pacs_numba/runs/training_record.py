"""The current release's ``training_record.json`` and ``experiment_metadata.json``.

Written when the config is in the HDF5 form (its users' scripts read them).  The per-tile
record replaces SLSQP's iterations and success flag by what our exact solver knows: the
method, the size of the active set (the support of the minimiser) and the KKT residual.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np
from numpy.typing import NDArray

from .._version import __version__
from ..config import FullConfig, config_to_dict
from ..core.solve import objective, simplex_method
from ..core.tiling import TileGrid
from .tasks import Task


def environment() -> dict[str, Any]:
    """Versions, host and SLURM ids of this process."""
    return {
        "pacs_numba": __version__,
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "numba": numba.__version__,
        "platform": platform.platform(),
        "host": platform.node(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def kkt_residual(q: NDArray[np.float64], b: NDArray[np.float64], lam: float,
                 w: NDArray[np.float64], simplex: bool) -> NDArray[np.float64]:
    """Largest violation of the optimality conditions of each tile's QP.

    With ``g = 2((Q + lam I) w - B)``: on the simplex, ``g_i = nu`` on the support
    (``w_i > 0``) and ``g_i >= nu`` off it, with ``nu`` the mean of ``g`` over the support;
    unconstrained, ``g = 0``.  Returned in the units of ``g`` (absolute).
    """
    m = w.shape[1]
    g = 2.0 * (np.einsum("tij,tj->ti", q + lam * np.eye(m), w) - b)
    if not simplex:
        return np.abs(g).max(axis=1)
    support = w > 0
    count = np.maximum(support.sum(axis=1), 1)
    nu = np.where(support, g, 0.0).sum(axis=1) / count
    on = np.where(support, np.abs(g - nu[:, None]), 0.0).max(axis=1)
    off = np.where(~support, np.maximum(nu[:, None] - g, 0.0), 0.0).max(axis=1)
    return np.maximum(on, off)


def training_record(
    config: FullConfig, task: Task, patients: Sequence[str], grid: TileGrid,
    stats: tuple[NDArray, NDArray, NDArray], solved: NDArray[np.float32],
    weights: NDArray[np.float32], learned: NDArray[np.bool_], timings: dict[str, float],
) -> dict[str, Any]:
    """Build ``training_record.json`` of one task.

    Parameters
    ----------
    config : FullConfig
    task : Task
    patients : sequence of str
        The training patients used (skipped ones left out).
    grid : TileGrid
    stats : (Q, B, n)
        Summed statistics: ``(n_tiles, M, M)``, ``(n_tiles, M)`` float64 and ``(n_tiles,)``.
    solved : (n_tiles, M) float32
        The solver's weights (before smoothing): their objective is recorded.
    weights : (n_tiles, M) float32
        The weights after smoothing: the ones the blend uses.
    learned : (n_tiles,) bool
    timings : dict
        Seconds per stage so far.

    Returns
    -------
    dict
        ``environment``, ``config``, ``fold``, ``spacing``, ``pulse``, ``patient_ids``,
        ``volume_shape``, ``tiles`` (one entry per learned tile: ``tile``, ``weights``,
        ``voxels``, ``objective``, ``method``, ``active_set_size``, ``kkt_residual``,
        ``success``) and ``summary``.
    """
    q, b, n = (np.asarray(a) for a in stats)
    p = config.pacs_sr
    lam = float(p.lambda_ridge)
    w64 = np.asarray(solved, np.float64)
    f = objective(q, b, lam, w64)
    res = kkt_residual(q, b, lam, w64, p.simplex)
    method = simplex_method(w64.shape[1]) if p.simplex else "normal-equations"
    tiles = []
    for t in np.flatnonzero(learned):
        tiles.append({
            "tile": int(t), "weights": [float(x) for x in weights[t]], "voxels": int(n[t]),
            "objective": float(f[t]), "method": method,
            "active_set_size": int((w64[t] > 0).sum()), "kkt_residual": float(res[t]),
            "success": True,
        })
    obj = np.array([x["objective"] for x in tiles]) if tiles else np.zeros(0)
    vox = np.array([x["voxels"] for x in tiles]) if tiles else np.zeros(0)

    def stat(a: np.ndarray) -> dict[str, float | None]:
        if not a.size:
            return {k: None for k in ("mean", "std", "min", "max", "median")}
        return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
                "max": float(a.max()), "median": float(np.median(a))}

    return {
        "environment": environment(),
        "config": config_to_dict(config),
        "fold": task.fold, "spacing": task.spacing, "pulse": task.pulse,
        "patient_ids": list(patients),
        "volume_shape": list(grid.shape),
        "tiles": tiles,
        "summary": {
            "n_tiles": int(grid.n_tiles), "n_learned": len(tiles),
            "objective": stat(obj), "success_rate": 1.0 if tiles else None,
            "voxels_per_tile": stat(vox.astype(np.float64)),
            "max_kkt_residual": float(res[learned].max()) if tiles else None,
            "method": method,
        },
        "timings_s": dict(timings),
    }


def experiment_metadata(config: FullConfig, tasks: Sequence[Task], command: str
                        ) -> dict[str, Any]:
    """Build ``experiment_metadata.json``: environment, config, data paths, what was run."""
    d = config.data
    return {
        "environment": environment(),
        "config": config_to_dict(config),
        "config_file": str(config.path),
        "data": {"schema": d.schema, "source_h5": str(d.source_h5) if d.source_h5 else None,
                 "experts_dir": str(d.experts_dir) if d.experts_dir else None,
                 "manifest": str(d.out)},
        "command": command,
        "tasks": [{"fold": t.fold, "spacing": t.spacing, "pulse": t.pulse} for t in tasks],
    }
