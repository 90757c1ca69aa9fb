"""One table for every trained task under an ``out_root`` (``pacs-numba summarize``).

A run of 5 folds x 3 spacings x 4 pulses leaves 60 ``metrics.json`` files.  This module reads
every task folder ``{out_root}/{experiment}/{spacing}/model_data/fold_{N}/{pulse}`` and, per
(experiment, spacing, pulse), gives for each expert alone, for PaCS-SR (the published
protocol) and for PaCS-SR and each expert under the HR-free protocol the mean and standard
deviation over the test patients of all folds; per protocol, the gain of PaCS-SR over that
protocol's best single expert (:func:`pacs_numba.core.scoring.gain_over_best`, the one
definition) with a paired Wilcoxon signed-rank test over patients; and the share of learned
tiles where each expert has the largest weight.  Figures of the same numbers (per-patient
paired gains, per-expert distributions, dominance across folds) go to ``summary_figures/``.

Units are distinct test patients.  A patient is normally a test patient in exactly one fold;
one that appears in several folds' test sets (hand-made manifests, copied task folders) is
one unit whose values are its mean over those folds, and the table says so.  A task written
without per-patient metrics (the published tool writes only means) contributes its fold mean
as one unit, and the table says so.  The standard deviation is the sample one (``ddof=1``).
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
from urllib.parse import quote

import numpy as np

from ..core.scoring import HR_FREE, PROTOCOL_NOTE, PROTOCOLS, PUBLISHED, STACKED, gain_over_best
from ..errors import InputError
from ..store.atomic import atomic_write_text
from ..store.layout import (
    METRICS_FILE,
    SUMMARY_CSV,
    SUMMARY_FIGURES,
    SUMMARY_MD,
    TASK_DIR_PATTERN,
    TaskLayout,
    find_task_dirs,
)
from ..store.modelfile import load_model
from ..store.results_h5 import metrics_means
from .escape import md_text
from .summary_figures import draw_group_figures

log = logging.getLogger(__name__)


PACS = STACKED[PUBLISHED]


PACS_HR_FREE = STACKED[HR_FREE]


#: Appended to an expert's name for its row under the HR-free protocol.
HR_FREE_SUFFIX = " (HR-free)"


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
        for pid, m in (patients.get("test_hr_free") or {}).items():
            t.values.setdefault(PACS_HR_FREE, {})[pid] = m
            for name, e in (m.get("experts") or {}).items():
                t.values.setdefault(name + HR_FREE_SUFFIX, {})[pid] = e
    else:  # the published tool: only means, one unit per fold
        t.per_patient = False
        unit = lay.model_dir.parent.name  # the fold's folder name
        if metrics["test"]:
            t.values[PACS] = {unit: metrics["test"]}
        for name, m in (metrics.get("test_experts") or {}).items():
            t.values.setdefault(name, {})[unit] = m
        if metrics.get("test_hr_free"):
            t.values[PACS_HR_FREE] = {unit: metrics["test_hr_free"]}
            for name, e in (metrics["test_hr_free"].get("experts") or {}).items():
                t.values.setdefault(name + HR_FREE_SUFFIX, {})[unit] = e
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
            names = _expert_names(t.values)
        if len(names) == weights.shape[1]:
            dom = np.bincount(np.argmax(weights[learned], axis=1), minlength=len(names))
            t.dominance = {n: float(c) / int(learned.sum()) for n, c in zip(names, dom,
                                                                            strict=True)}
    t.experts = names or _expert_names(t.values)
    return t


def _expert_names(values: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(k for k in values
                 if k not in (PACS, PACS_HR_FREE) and not k.endswith(HR_FREE_SUFFIX))


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
    # scipy.stats costs ~58 MB of RSS to import: not in every run's process, only here
    from scipy.stats import wilcoxon

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


@dataclass
class Group:
    """Every fold of one (experiment, spacing, pulse), pooled per distinct test patient."""

    experiment: str
    spacing: str
    pulse: str
    folds: list[int]
    experts: list[str]
    per_patient: bool
    #: protocol -> method -> {unit: {metric: value}} (a unit: a patient, or a fold mean)
    values: dict[str, dict[str, dict[str, dict[str, float]]]]
    #: fold -> {expert: share of learned tiles it dominates}
    dominance: dict[int, dict[str, float]]
    #: patients that were test patients in more than one fold -> those folds
    repeats: dict[str, list[int]]

    @property
    def unit(self) -> str:
        """``patient`` or ``fold mean``."""
        return "patient" if self.per_patient else "fold mean"


def _mean_metrics(ms: Sequence[Mapping[str, float]]) -> dict[str, float]:
    keys = set().union(*(m.keys() for m in ms)) & set(METRICS + ("mse",))
    return {k: _mean_std([m[k] for m in ms if isinstance(m.get(k), int | float)])[0]
            for k in sorted(keys)}


def pool_groups(tasks: Sequence[TaskData]) -> list[Group]:
    """Group the tasks by (experiment, spacing, pulse); one unit per distinct test patient."""
    by: dict[tuple[str, str, str], list[TaskData]] = {}
    for t in tasks:
        by.setdefault((t.experiment, t.spacing, t.pulse), []).append(t)
    groups = []
    for (exp, spacing, pulse), ts in sorted(by.items()):
        ts.sort(key=lambda t: t.fold)
        experts: list[str] = []
        for t in ts:
            experts += [e for e in t.experts if e not in experts]
        raw: dict[str, dict[str, list[Mapping[str, float]]]] = {}
        folds_of: dict[str, set[int]] = {}
        for t in ts:
            for method, per in t.values.items():
                for pid, m in per.items():
                    raw.setdefault(method, {}).setdefault(pid, []).append(m)
                    folds_of.setdefault(pid, set()).add(t.fold)
        pooled = {method: {pid: _mean_metrics(ms) for pid, ms in per.items()}
                  for method, per in raw.items()}
        values: dict[str, dict[str, dict[str, dict[str, float]]]] = {PUBLISHED: {}, HR_FREE: {}}
        for e in experts:
            if e in pooled:
                values[PUBLISHED][e] = pooled[e]
            if e + HR_FREE_SUFFIX in pooled:
                values[HR_FREE][e] = pooled[e + HR_FREE_SUFFIX]
        for protocol in (PUBLISHED, HR_FREE):
            if STACKED[protocol] in pooled:
                values[protocol][STACKED[protocol]] = pooled[STACKED[protocol]]
        groups.append(Group(
            exp, spacing, pulse, sorted({t.fold for t in ts}), experts,
            all(t.per_patient for t in ts), {k: v for k, v in values.items() if v},
            {t.fold: t.dominance for t in ts if t.dominance},
            {pid: sorted(f) for pid, f in sorted(folds_of.items()) if len(f) > 1},
        ))
    return groups


def summarize_tasks(tasks: Sequence[TaskData]) -> list[dict[str, Any]]:
    """Rows of the summary table: one per (experiment, spacing, pulse, protocol, method)."""
    return [r for g in pool_groups(tasks) for r in _group_rows(g)]


def _group_rows(g: Group) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    repeat_note = ""
    if g.repeats:
        repeat_note = (f"{len(g.repeats)} patient(s) in more than one fold's test set, each "
                       "counted once (mean over its folds): "
                       + ", ".join(f"{p} (folds {', '.join(map(str, f))})"
                                   for p, f in g.repeats.items()))
    for protocol, methods in g.values.items():
        label = STACKED[protocol]
        experts = {e: methods[e] for e in g.experts if e in methods}
        gain = gain_over_best(protocol, methods.get(label, {}), experts) if experts else None
        for method, units in methods.items():
            row: dict[str, Any] = {
                "experiment": g.experiment, "spacing": g.spacing, "pulse": g.pulse,
                "protocol": protocol,
                "method": method if protocol == PUBLISHED or method == label
                else method + HR_FREE_SUFFIX,
                "folds": len(g.folds), "n": len(units), "unit": g.unit,
            }
            for k in METRICS:
                row[f"{k}_mean"], row[f"{k}_std"] = _mean_std(
                    [m[k] for m in units.values() if k in m])
            shares = [d[method] for d in g.dominance.values() if method in d]
            row["dominant_share"] = (float(np.mean(shares)) if shares and protocol == PUBLISHED
                                     else math.nan)
            row["best_expert"] = (gain.best or "") if gain else ""
            for k in ("psnr", "ssim"):
                row[f"gain_{k}"], row[f"p_{k}"] = math.nan, math.nan
            notes = [repeat_note] if repeat_note else []
            if method == label and gain is not None and gain.best is not None:
                common = gain.units
                for k in ("psnr", "ssim"):
                    row[f"gain_{k}"] = getattr(gain, k)
                    p, note = paired_test([units[u][k] for u in common],
                                          [experts[gain.best][u][k] for u in common])
                    row[f"p_{k}"] = p
                    if note:
                        notes.append(f"{k}: {note}")
            row["note"] = "; ".join(dict.fromkeys(notes))
            rows.append(row)
    return rows


COLUMNS = ("experiment", "spacing", "pulse", "protocol", "method", "folds", "n", "unit",
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
    """One markdown table per (experiment, spacing, pulse) and protocol, every name escaped."""
    out = []
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["experiment"], r["spacing"], r["pulse"]), []).append(r)
    for (exp, spacing, pulse), rs in groups.items():
        unit = rs[0]["unit"]
        out.append(f"### {md_text(exp)} {md_text(spacing)} {md_text(pulse)}: "
                   f"{rs[0]['folds']} fold(s), n = {rs[0]['n']} ({unit}s); mean ± std")
        out.append("")
        for protocol in PROTOCOLS:
            prs = [r for r in rs if r["protocol"] == protocol]
            if not prs:
                continue
            words = PROTOCOLS[protocol]
            out.append(f"*{words[0].upper() + words[1:]}*")
            out.append("")
            out.append("| method | PSNR (dB) | SSIM | MAE | dominant tiles | gain PSNR vs best "
                       "(p) | gain SSIM vs best (p) |")
            out.append("|---|---|---|---|---|---|---|")
            for r in prs:
                gain = gain_s = ""
                if not math.isnan(r["gain_psnr"]):
                    gain = f"{r['gain_psnr']:+.3f} dB (p={_fmt(r['p_psnr'], 3)})"
                    gain_s = f"{r['gain_ssim']:+.4f} (p={_fmt(r['p_ssim'], 3)})"
                share = ("" if math.isnan(r["dominant_share"])
                         else f"{100 * r['dominant_share']:.1f}%")
                name = md_text(r["method"])
                if r["method"] == r["best_expert"]:
                    name += " (best expert)"
                out.append(
                    f"| {name} | {_pm(r['psnr_mean'], r['psnr_std'], 3)} | "
                    f"{_pm(r['ssim_mean'], r['ssim_std'], 4)} | "
                    f"{_pm(r['mae_mean'], r['mae_std'], 3)} | {share} | {gain} | {gain_s} |"
                )
            best = prs[0]["best_expert"]
            out.append("")
            if best:
                out.append(f"Best single expert under this protocol (highest mean PSNR): "
                           f"{md_text(best)}. Gains are paired over the same {unit}s; p from a "
                           "two-sided Wilcoxon signed-rank test.")
                out.append("")
        notes = sorted({r["note"] for r in rs if r["note"]})
        out.append(md_text(PROTOCOL_NOTE))
        for n in notes:
            out.append(f"Note: {md_text(n)}.")
        out.append("")
    return "\n".join(out)


def summarize(out_root: Path, out_dir: Path | None = None, *, figures_wanted: bool = True,
              ) -> tuple[list[dict[str, Any]], str, list[Path]]:
    """Read every task under ``out_root``; write ``summary.csv``, ``summary.md`` and figures.

    Parameters
    ----------
    out_root : Path
        The run's out_root.
    out_dir : Path, optional
        Where to write (default ``out_root``).
    figures_wanted : bool
        Draw the figures into ``summary_figures/`` (needs matplotlib; without it a
        WARNING says how to install it and the tables are still written).

    Returns
    -------
    rows, markdown, paths
        The table rows, the markdown text and the files written: the two tables, then the
        figures.

    Raises
    ------
    InputError
        If ``out_root`` holds no trained task, or a task's files cannot be read.
    """
    tasks = [read_task(d) for d in find_tasks(out_root)]
    log.info("summarize: %d task(s) under '%s'", len(tasks), out_root)
    groups = pool_groups(tasks)
    rows = [r for g in groups for r in _group_rows(g)]
    for g in groups:
        if g.repeats:
            log.warning("summarize %s %s %s: %d patient(s) are test patients in more than one "
                        "fold (%s); each is counted once, with its mean over those folds",
                        g.experiment, g.spacing, g.pulse, len(g.repeats),
                        ", ".join(g.repeats))
    target = Path(out_dir or out_root)
    figures: list[Path] = []
    if figures_wanted:
        figures = draw_group_figures(groups, target / SUMMARY_FIGURES)
    md = to_markdown(rows)
    if figures:
        md += "\n### Figures\n\n" + "\n".join(
            f"![{md_text(f.stem)}]({SUMMARY_FIGURES}/{quote(f.name)})" for f in figures) + "\n"
    paths = [target / CSV_FILE, target / MD_FILE]
    atomic_write_text(paths[0], to_csv(rows))
    atomic_write_text(paths[1], md)
    return rows, md, paths + figures
