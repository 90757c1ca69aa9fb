"""One table for every trained task under an ``out_root`` (``pacs-numba summarize``).

A run of 5 folds x 3 spacings x 4 pulses leaves 60 ``metrics.json`` files.  This module reads
every task folder ``{out_root}/{experiment}/{spacing}/model_data/fold_{N}/{pulse}`` and, per
(experiment, spacing, pulse), gives for each expert alone, for PaCS-SR (the published
protocol) and for PaCS-SR under the HR-free protocol the mean and standard deviation over
the test patients of all folds; the gain of PaCS-SR over the best single expert (the expert
with the highest mean PSNR) with a paired Wilcoxon signed-rank test over patients; and the
share of learned tiles where each expert has the largest weight.

Units are test patients: each patient is a test patient in exactly one fold, so the pooled
values are independent of the fold sizes.  A task written without per-patient metrics (the
published tool writes only means) contributes its fold mean as one unit, and the table says
so.  The standard deviation is the sample one (``ddof=1``).
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import wilcoxon

from ..errors import InputError
from ..store.atomic import atomic_write_text
from ..store.layout import (
    METRICS_FILE,
    SUMMARY_CSV,
    SUMMARY_MD,
    TASK_DIR_PATTERN,
    TaskLayout,
    find_task_dirs,
)
from ..store.modelfile import load_model
from ..store.results_h5 import metrics_means

log = logging.getLogger(__name__)


PACS = "PaCS-SR"


PACS_HR_FREE = "PaCS-SR (HR-free)"


METRICS = ("psnr", "ssim", "mae")


CSV_FILE, MD_FILE = SUMMARY_CSV, SUMMARY_MD


@dataclass
class TaskData:
    """What one task folder holds, per test patient (or one fold-mean unit)."""

    experiment: str
    spacing: str
    pulse: str
    fold: int
    path: Path
    #: method -> {pid: {metric: value}}
    values: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: expert -> share of learned tiles it dominates (0..1)
    dominance: dict[str, float] = field(default_factory=dict)
    per_patient: bool = True
    experts: tuple[str, ...] = ()


def find_tasks(out_root: Path) -> list[Path]:
    """Every task folder (``layout.TASK_DIR_PATTERN``) under ``out_root`` with metrics."""
    root = Path(out_root)
    if not root.is_dir():
        raise InputError(f"'{root}' is not a folder (expected a run's out_root)")
    found = [lay.model_dir for lay in find_task_dirs(root)]
    if not found:
        raise InputError(
            f"no trained task under '{root}': expected {TASK_DIR_PATTERN}/{METRICS_FILE}"
        )
    return found


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read '{path}': {exc}") from None


def read_task(task_dir: Path) -> TaskData:
    """Read one task folder's metrics.json, patients.json and model (or weights.json)."""
    d = Path(task_dir)
    try:
        lay = TaskLayout.from_model_dir(d)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    fold = lay.fold
    t = TaskData(lay.experiment, lay.spacing, lay.pulse, fold, d)
    metrics = metrics_means(_read_json(lay.metrics_json))  # either release's form
    if not isinstance(metrics, dict) or not isinstance(metrics.get("test"), dict):
        raise InputError(f"'{lay.metrics_json}' has no 'test' metrics")
    pj = lay.patients_json
    patients = _read_json(pj) if pj.exists() else None
    if patients and patients.get("per_patient", {}).get("test"):
        t.values[PACS] = dict(patients["per_patient"]["test"])
        for pid, per in (patients.get("test_experts") or {}).items():
            for name, m in per.items():
                t.values.setdefault(name, {})[pid] = m
        if patients.get("test_hr_free"):
            t.values[PACS_HR_FREE] = dict(patients["test_hr_free"])
    else:  # the published tool: only means, one unit per fold
        t.per_patient = False
        unit = lay.model_dir.parent.name  # the fold's folder name
        if metrics["test"]:
            t.values[PACS] = {unit: metrics["test"]}
        for name, m in (metrics.get("test_experts") or {}).items():
            t.values.setdefault(name, {})[unit] = m
        if metrics.get("test_hr_free"):
            t.values[PACS_HR_FREE] = {unit: metrics["test_hr_free"]}
    weights = learned = None
    names: tuple[str, ...] = ()
    if lay.model_file.exists():
        model = load_model(lay.model_file)
        weights, learned, names = model.weights, model.learned, model.model_names
    elif lay.weights_json.exists():
        raw = _read_json(lay.weights_json)
        if isinstance(raw, dict) and raw:
            weights = np.asarray(list(raw.values()), dtype=np.float64)
            learned = np.ones(len(weights), dtype=bool)
    if weights is not None and learned is not None and learned.any():
        if not names:  # a published weights.json: names from the experts' metrics, if any
            names = tuple(k for k in t.values if k not in (PACS, PACS_HR_FREE))
        if len(names) == weights.shape[1]:
            dom = np.bincount(np.argmax(weights[learned], axis=1), minlength=len(names))
            t.dominance = {n: float(c) / int(learned.sum()) for n, c in zip(names, dom,
                                                                            strict=True)}
    t.experts = names or tuple(k for k in t.values if k not in (PACS, PACS_HR_FREE))
    return t


def paired_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, str]:
    """Two-sided Wilcoxon signed-rank p of the paired differences ``a - b``, and a note.

    Zero differences are dropped (Wilcoxon's original treatment).  With fewer than 6
    non-zero pairs no two-sided p can be below 0.05 (the smallest exact p is
    ``2 / 2**n``); the note says so.  All differences zero: p is NaN.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[np.isfinite(d)]
    nz = int(np.count_nonzero(d))
    if d.size == 0:
        return math.nan, "no paired values"
    if nz == 0:
        return math.nan, "all differences are zero: no test"
    notes = []
    if nz < 6:
        notes.append(f"n={nz} < 6: p cannot be below {2.0 / 2**nz:.3g}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = float(wilcoxon(d[d != 0], alternative="two-sided").pvalue)
    notes += [str(w.message).split("\n")[0] for w in caught]
    return p, "; ".join(notes)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else math.nan


def summarize_tasks(tasks: Sequence[TaskData]) -> list[dict[str, Any]]:
    """Rows of the summary table: one per (experiment, spacing, pulse, method)."""
    groups: dict[tuple[str, str, str], list[TaskData]] = {}
    for t in tasks:
        groups.setdefault((t.experiment, t.spacing, t.pulse), []).append(t)
    rows: list[dict[str, Any]] = []
    for (exp, spacing, pulse), ts in sorted(groups.items()):
        ts.sort(key=lambda t: t.fold)
        experts: list[str] = []
        for t in ts:
            experts += [e for e in t.experts if e not in experts]
        pooled: dict[str, dict[str, dict[str, float]]] = {}
        for t in ts:
            for method, per in t.values.items():
                for pid, m in per.items():
                    pooled.setdefault(method, {})[f"{t.fold}/{pid}"] = m
        methods = [e for e in experts if e in pooled] + [
            m for m in (PACS, PACS_HR_FREE) if m in pooled
        ]
        best = max(
            (e for e in experts if e in pooled),
            key=lambda e: _mean_std([m["psnr"] for m in pooled[e].values()])[0],
            default=None,
        )
        per_patient = all(t.per_patient for t in ts)
        for method in methods:
            units = pooled[method]
            row: dict[str, Any] = {
                "experiment": exp, "spacing": spacing, "pulse": pulse, "method": method,
                "folds": len({k.split("/")[0] for k in units}),
                "n": len(units),
                "unit": "patient" if per_patient else "fold mean",
            }
            for k in METRICS:
                row[f"{k}_mean"], row[f"{k}_std"] = _mean_std([m[k] for m in units.values()])
            shares = [t.dominance[method] for t in ts if method in t.dominance]
            row["dominant_share"] = float(np.mean(shares)) if shares else math.nan
            row["best_expert"] = best or ""
            for k in ("psnr", "ssim"):
                row[f"gain_{k}"], row[f"p_{k}"] = math.nan, math.nan
            row["note"] = ""
            if method in (PACS, PACS_HR_FREE) and best is not None:
                common = sorted(set(units) & set(pooled[best]))
                notes = []
                for k in ("psnr", "ssim"):
                    a = [units[u][k] for u in common]
                    b = [pooled[best][u][k] for u in common]
                    row[f"gain_{k}"] = float(np.mean(np.subtract(a, b))) if common else math.nan
                    p, note = paired_test(a, b)
                    row[f"p_{k}"] = p
                    if note:
                        notes.append(f"{k}: {note}")
                row["note"] = "; ".join(dict.fromkeys(notes))
            rows.append(row)
    return rows


COLUMNS = ("experiment", "spacing", "pulse", "method", "folds", "n", "unit",
           "psnr_mean", "psnr_std", "ssim_mean", "ssim_std", "mae_mean", "mae_std",
           "dominant_share", "best_expert", "gain_psnr", "p_psnr", "gain_ssim", "p_ssim", "note")


def _csv_cell(v: Any) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    s = str(v)
    return '"' + s.replace('"', '""') + '"' if any(c in s for c in ',"\n') else s


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """Return the rows as CSV (full precision; empty cell = not available)."""
    lines = [",".join(COLUMNS)]
    lines += [",".join(_csv_cell(r[c]) for c in COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v: float, digits: int) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _pm(mean: float, std: float, digits: int) -> str:
    if math.isnan(mean):
        return "–"
    return _fmt(mean, digits) + ("" if math.isnan(std) else f" ± {_fmt(std, digits)}")


def to_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """One markdown table per (experiment, spacing, pulse)."""
    out = []
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["experiment"], r["spacing"], r["pulse"]), []).append(r)
    for (exp, spacing, pulse), rs in groups.items():
        unit = rs[0]["unit"]
        out.append(f"### {exp} {spacing} {pulse}: {rs[0]['folds']} fold(s), "
                   f"n = {rs[0]['n']} ({unit}s); mean ± std")
        out.append("")
        out.append("| method | PSNR (dB) | SSIM | MAE | dominant tiles | gain PSNR vs best "
                   "(p) | gain SSIM vs best (p) |")
        out.append("|---|---|---|---|---|---|---|")
        for r in rs:
            gain = ""
            gain_s = ""
            if not math.isnan(r["gain_psnr"]):
                gain = f"{r['gain_psnr']:+.3f} dB (p={_fmt(r['p_psnr'], 3)})"
                gain_s = f"{r['gain_ssim']:+.4f} (p={_fmt(r['p_ssim'], 3)})"
            share = "" if math.isnan(r["dominant_share"]) else f"{100 * r['dominant_share']:.1f}%"
            out.append(
                f"| {r['method']} | {_pm(r['psnr_mean'], r['psnr_std'], 3)} | "
                f"{_pm(r['ssim_mean'], r['ssim_std'], 4)} | {_pm(r['mae_mean'], r['mae_std'], 3)}"
                f" | {share} | {gain} | {gain_s} |"
            )
        best = rs[0]["best_expert"]
        notes = sorted({r["note"] for r in rs if r["note"]})
        out.append("")
        if best:
            out.append(f"Best single expert (highest mean PSNR): {best}. Gains are paired over "
                       f"the same {unit}s; p from a two-sided Wilcoxon signed-rank test.")
        out.append(f"{PACS}: the published protocol (normalisation and brain mask from the test "
                   f"HR). {PACS_HR_FREE}: both from the experts, as `predict` does.")
        for n in notes:
            out.append(f"Note: {n}.")
        out.append("")
    return "\n".join(out)


def summarize(out_root: Path, out_dir: Path | None = None) -> tuple[list[dict[str, Any]], str,
                                                                      list[Path]]:
    """Read every task under ``out_root`` and write ``summary.csv`` and ``summary.md``.

    Returns
    -------
    rows, markdown, paths
        The table rows, the markdown text and the two files written (in ``out_dir``,
        default ``out_root``).

    Raises
    ------
    InputError
        If ``out_root`` holds no trained task, or a task's files cannot be read.
    """
    tasks = [read_task(d) for d in find_tasks(out_root)]
    log.info("summarize: %d task(s) under '%s'", len(tasks), out_root)
    rows = summarize_tasks(tasks)
    md = to_markdown(rows)
    target = Path(out_dir or out_root)
    paths = [target / CSV_FILE, target / MD_FILE]
    atomic_write_text(paths[0], to_csv(rows))
    atomic_write_text(paths[1], md)
    return rows, md, paths
