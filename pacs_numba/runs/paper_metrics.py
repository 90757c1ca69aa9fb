"""The paper's metrics table of a finished run: 3-D MS-SSIM and MMD-MF of every method.

One row per test patient, spacing, pulse and method (every expert by its config name, and
``PACS_SR`` for the blend), over all folds: ``patient, spacing, pulse, model, ms_ssim_3d,
mmd_mf``, as the current release writes it.  The reference is the raw HR, the mask
``HR > 0`` (``core.paper_metrics``).  Blends are read from where the run wrote them:
``results_fold_{N}.h5`` (HDF5-form configs) or ``output_volumes/{pid}-{pulse}.nii.gz``.

Resumable: rows already in the CSV are skipped; each new row is appended whole (one
``write`` of one line, then fsync), and a line left incomplete by a killed run is dropped
when the next run starts.  Patients are scored one at a time, so memory stays at one
patient's volumes (memory-mapped from the volume cache) plus the metrics' copies; the
estimate is checked against the job's memory limit before anything is read.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import FullConfig
from ..core.paper_metrics import mmd_mf, ms_ssim_3d
from ..errors import BudgetError, InputError, OutputError
from ..resources.limits import detect_limits
from ..resources.process import baseline_bytes
from ..store.atomic import atomic_write_text
from ..store.layout import ExperimentLayout, TaskLayout
from ..store.locks import node_lock
from ..store.manifest import load_manifest, select_task
from ..store.results_h5 import ResultsH5
from ..store.volumes import VolumeStore, volume_shape
from .tasks import Task

log = logging.getLogger(__name__)

COLUMNS = ("patient", "spacing", "pulse", "model", "ms_ssim_3d", "mmd_mf")
#: The blend's name in the ``model`` column.
BLEND = "PACS_SR"
#: float32 volumes alive at once while one method is scored: the two masked MS-SSIM copies,
#: their pooled pyramid (< 1/3), the mask (1/4) and the blend when it is read from HDF5.
_VOLUMES_IN_FLIGHT = 4


@dataclass(frozen=True)
class _Job:
    fold: int
    spacing: str
    pulse: str
    pid: str
    hr: str
    experts: tuple[str, ...]


def _jobs(config: FullConfig, tasks: Sequence[Task] | None) -> Iterator[_Job]:
    d = config.data
    manifest = load_manifest(d.out, d)
    if tasks is None:
        tasks = [Task(f, s, p) for f in range(1, len(manifest["folds"]) + 1)
                 for s in d.spacings for p in d.pulses]
    for t in tasks:
        _, test = select_task(manifest, t.fold, t.spacing, t.pulse, d.models)
        for pid, e in test.items():
            yield _Job(t.fold, t.spacing, t.pulse, pid, e["HR"], tuple(e["experts"]))


def _read_done(path: Path) -> set[tuple[str, str, str, str]]:
    """Rows already in ``path``; an incomplete last line (a killed run) is dropped from it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return set()
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines = lines[:-1]
    rows = list(csv.reader(lines))
    if not rows:  # empty, or only a header cut short by a killed run: no row yet
        if text:
            atomic_write_text(path, "")
            log.warning("'%s': dropped an incomplete header left by an interrupted run", path)
        return set()
    if tuple(rows[0]) != COLUMNS:
        raise InputError(f"'{path}' is not a paper-metrics table (its header is not "
                         f"{','.join(COLUMNS)}); choose another --out or remove it")
    good = [r for r in rows[1:] if len(r) == len(COLUMNS)]
    if len(good) != len(rows) - 1 or "".join(lines) != text:
        atomic_write_text(path, _csv_text([COLUMNS, *good]))
        log.warning("'%s': dropped an incomplete row left by an interrupted run", path)
    return {tuple(r[:4]) for r in good}  # type: ignore[misc]


def _csv_text(rows: Sequence[Sequence[object]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _append(path: Path, row: Sequence[object]) -> None:
    """Append one whole line (one write, then fsync) under the table's lock."""
    data = _csv_text([row]).encode("utf-8")
    with node_lock(path.with_name(f".{path.name}.lock")):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise OutputError(f"cannot write the metrics table '{path}': "
                              f"{exc.strerror or exc}") from None
        try:
            if os.fstat(fd).st_size == 0:
                data = _csv_text([COLUMNS]).encode("utf-8") + data
            os.write(fd, data)
            os.fsync(fd)
        except OSError as exc:
            raise OutputError(f"cannot write the metrics table '{path}': "
                              f"{exc.strerror or exc}") from None
        finally:
            os.close(fd)


def _check_budget(shape: tuple[int, ...], limit_bytes: int) -> None:
    need = baseline_bytes() + _VOLUMES_IN_FLIGHT * 4 * math.prod(shape[:3])
    if need > limit_bytes:
        raise BudgetError(
            f"scoring one {tuple(shape[:3])} volume needs about {need / 2**30:.2f} GiB; the "
            f"limit is {limit_bytes / 2**30:.2f} GiB (raise the job's memory or --mem-budget)"
        )


def _blend(config: FullConfig, root: Path, job: _Job, store: VolumeStore) -> np.ndarray | None:
    if config.data.schema == "hdf5":
        part = ResultsH5(root, job.fold).part_path(job.spacing, job.pulse, job.pid)
        if not part.exists():
            return None
        return ResultsH5(root, job.fold).read_blend(job.spacing, job.pulse, job.pid)[0]
    lay = TaskLayout(root.parent, root.name, job.fold, job.spacing, job.pulse)
    path = lay.test_blend(job.pid)
    return store.get(path).data if path.exists() else None


def paper_metrics_table(
    config: FullConfig,
    *,
    out: Path | None = None,
    out_root: Path | None = None,
    cache_dir: Path | None = None,
    tasks: Sequence[Task] | None = None,
    mem_budget_bytes: int | None = None,
) -> tuple[Path, int]:
    """Write (or complete) the paper's metrics table of a finished run.

    Parameters
    ----------
    config : FullConfig
        The run's config (either data form); its manifest names the test patients.
    out : Path, optional
        The CSV (default ``{out_root}/{experiment}/paper_metrics.csv``).
    out_root : Path, optional
        Where the run wrote its outputs (default ``pacs_sr.out_root``).
    cache_dir : Path, optional
        Volume cache directory (as for ``train``).
    tasks : sequence of Task, optional
        Only these (fold, spacing, pulse); default all.
    mem_budget_bytes : int, optional
        An upper bound on the memory used, below the job's limit.

    Returns
    -------
    path, added : Path, int
        The CSV and the number of rows added by this call.

    Raises
    ------
    BudgetError
        One patient's volumes do not fit the memory limit.
    InputError
        The CSV exists and is not such a table; an HR or expert cannot be read.

    Notes
    -----
    A test patient whose blend is missing (a task not run, ``save_blends: false``) gets the
    expert rows only, with a WARNING.
    """
    p = config.pacs_sr
    exp = ExperimentLayout(Path(out_root or p.out_root), p.experiment_name)
    path = Path(out) if out is not None else exp.paper_metrics_csv
    try:  # before any volume is read: an unwritable table fails at once, naming the path
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666))
    except OSError as exc:
        raise OutputError(f"cannot write the metrics table '{path}': "
                          f"{exc.strerror or exc}") from None
    done = _read_done(path)
    store = VolumeStore(cache_dir)
    limit = detect_limits().memory.value
    if mem_budget_bytes is not None:
        limit = min(limit, mem_budget_bytes)
    added = 0
    checked: set[tuple[int, ...]] = set()
    names = list(config.data.models)
    for job in _jobs(config, tasks):
        todo = [n for n in [*names, BLEND] if (job.pid, job.spacing, job.pulse, n) not in done]
        if not todo:
            continue
        shape = tuple(volume_shape(job.hr))
        if shape not in checked:
            _check_budget(shape, limit)
            checked.add(shape)
        t0 = time.perf_counter()
        hr = store.get(job.hr).data
        for name in todo:
            if name == BLEND:
                vol = _blend(config, exp.root, job, store)
                if vol is None:
                    log.warning("patient %s %s %s fold %d: no blend found; PACS_SR row skipped",
                                job.pid, job.spacing, job.pulse, job.fold)
                    continue
            else:
                vol = store.get(job.experts[names.index(name)]).data
            row = (job.pid, job.spacing, job.pulse, name, repr(ms_ssim_3d(hr, vol)),
                   repr(mmd_mf(hr, vol)))
            _append(path, row)
            done.add(row[:4])
            added += 1
            del vol
        log.info("paper metrics patient=%s spacing=%s pulse=%s fold=%d rows=%d secs=%.1f",
                 job.pid, job.spacing, job.pulse, job.fold, len(todo),
                 time.perf_counter() - t0)
    log.info("paper metrics: %d rows added -> %s", added, path)
    return path, added
