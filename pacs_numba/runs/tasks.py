"""What a run is made of: its options, its tasks, their results and the stage clock."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FullConfig, config_to_dict
from ..resources.planning import PoolPlan, StagePlan

STAGES = ("load", "statistics", "solve", "smoothing", "blend", "metrics", "writes")


@dataclass(frozen=True)
class RunOptions:
    """Settings of one run that are not in the YAML config (they come from the CLI).

    Parameters
    ----------
    cache_dir : Path or None
        Volume cache directory (None: ``PACS_NUMBA_CACHE_DIR`` or a per-user temp dir).
    volume_cache : {"disk", "memory"} or None
        Where decoded volumes live (``store.volumes.VolumeStore``'s ``mode``; None:
        ``PACS_NUMBA_VOLUME_CACHE``, else ``disk``).
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
    volume_cache: str | None = None
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
    #: ``{split: {pid: seconds}}``: each evaluated patient's blend and scoring (writes aside,
    #: they run on the writer); NaN for a patient resumed from a previous run
    patient_seconds: dict[str, dict[str, float]] = field(default_factory=dict)


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


def registration_settings(config: FullConfig) -> dict[str, Any]:
    """Return the ``registration`` section as recorded with a task's results (paths as strings)."""
    return config_to_dict(config).get("registration") or {}
