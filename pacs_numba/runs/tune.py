"""K-fold cross-validated sweep over the fit settings (``pacs-numba tune``).

Every candidate setting is fitted on each fold's training patients and scored on the fold's
held-out patients with the HR-free protocol of ``predict`` (algorithm B6): the z-score
statistics and the brain mask come from the experts, never from the target, so the score is
what a user would get on a new patient.  Each single expert is scored the same way (its
volume times the same experts' brain mask) for the baseline.

Cost: a patient is read once per *statistics key* (:class:`pacs_numba.core.cellstats.StatsKey`),
not once per candidate and fold.  All ``first_block`` candidates share one pass at the
greatest common divisor of their strides (coarser strides are sums of cells), with the edge
and gradient parts if any candidate uses them; ``window`` candidates need one pass per
(patch, stride, window).  Every lambda, every fold and the ridge/smoothing then cost a sum
and a small QP per tile.  Blending and scoring the held-out patients (one blend per
candidate, fold and held-out patient) is what remains.

Resume: each (candidate, fold, spacing, pulse) result is written atomically to
``results/<id>.json`` as it finishes; the id hashes the candidate, the fixed settings and
the fold's patient split, so a rerun skips finished units and a changed config starts anew.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import logging
import math
import os
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._config import FIT_NORMALISATIONS, GATINGS, HR_FREE_MAPPINGS, PRIORS
from ..config import (
    FIT_REGIONS,
    MIXING_WINDOWS,
    FullConfig,
    dump_config,
    stride_problem,
)
from ..core.cellstats import effective_region, sum_stats
from ..core.scoring import HR_FREE, PROTOCOL_NOTE, PROTOCOLS, gain_over_best
from ..core.weightfit import weight_model_conflict
from ..errors import ConfigError, InputError, Interrupted
from ..store.atomic import atomic_write_json, atomic_write_text
from ..store.manifest import filter_tasks, load_manifest, select_task
from ..store.statscache import StatsCache
from ..store.volumes import VolumeStore, file_fingerprint
from ..yamlfile import parse_yaml
from .cvunits import Patients as _Patients
from .cvunits import digest as _digest
from .cvunits import fit_and_score as _fit_and_score
from .cvunits import fixed_settings
from .cvunits import statistics_group as _statistics_group
from .cvunits import stats_key as _stats_key
from .escape import md_text
from .pool import StopFlag
from .progress import progress

log = logging.getLogger(__name__)


#: Above this many (setting, fold, spacing, pulse) units ``run_tune`` refuses to start unless
#: told ``yes=True`` (``pacs-numba tune --yes``): a grid typed with one zero too many would
#: otherwise run for days before anyone notices.
MAX_UNITS = 2000


#: Swept keys, in table order, with their types.
SWEPT = {
    "patch_size": int,
    "stride": int,
    "lambda_ridge": float,
    "lambda_edge": float,
    "lambda_grad": float,
    "laplacian_tau": float,
    "fit_region": str,
    "mixing_window": str,
    "prior": str,
    "prior_strength": float,
    "gating": str,
    "hr_free_mapping": str,
    "fit_normalisation": str,
}
#: Allowed values of the swept string keys.
_CHOICES = {"fit_region": FIT_REGIONS, "mixing_window": MIXING_WINDOWS, "prior": PRIORS,
            "gating": GATINGS, "hr_free_mapping": HR_FREE_MAPPINGS,
            "fit_normalisation": FIT_NORMALISATIONS}


@dataclass(frozen=True)
class Candidate:
    """One setting of the swept ``pacs_sr`` keys."""

    patch_size: int
    stride: int
    lambda_ridge: float
    lambda_edge: float
    lambda_grad: float
    laplacian_tau: float
    fit_region: str
    mixing_window: str
    prior: str = "none"
    prior_strength: float = 1.0
    gating: str = "none"
    hr_free_mapping: str = "mean"
    fit_normalisation: str = "hr"

    def as_dict(self) -> dict[str, Any]:
        """Return the swept keys and their values."""
        return dataclasses.asdict(self)

    @property
    def window(self) -> str:
        """The window the blend really uses (flat without overlap, algorithm A7.2)."""
        return "flat" if self.stride >= self.patch_size else self.mixing_window


def _values(file: Path, grid: Mapping[str, Any], name: str, base: Any) -> list[Any]:
    raw = grid.get(name, [base])
    if not isinstance(raw, list):
        raw = [raw]
    if not raw:
        raise ConfigError(f"{file}: {name}: expected a non-empty list of values")
    kind = SWEPT[name]
    out = []
    for v in raw:
        if kind is int:
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
            want = "integers >= 1"
        elif kind is float:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) \
                and v >= 0 and (name != "laplacian_tau" or v <= 1) \
                and (name != "prior_strength" or v > 0)
            want = {"laplacian_tau": "numbers in [0, 1]",
                    "prior_strength": "numbers > 0"}.get(name, "numbers >= 0")
        else:
            choices = _CHOICES[name]
            ok = isinstance(v, str) and v.lower() in choices
            want = f"one of {list(choices)}"
            v = v.lower() if ok else v
        if not ok:
            raise ConfigError(f"{file}: {name}: {v!r} is not valid; expected {want}")
        out.append(kind(v))
    return list(dict.fromkeys(out))


def load_grid(path: str | os.PathLike[str], config: FullConfig) -> list[Candidate]:
    """Read a sweep grid: the cartesian product of the listed values.

    Parameters
    ----------
    path : path-like
        YAML mapping of swept keys (:data:`SWEPT`) to a value or a list of values, e.g.
        ``{stride: [8, 16], lambda_edge: [0, 0.5]}``; keys left out keep the config's value.
        Combinations with ``stride > patch_size`` are dropped.  Without overlap
        (``stride == patch_size``) the window and the fit region make no difference, so
        such combinations count once.
    config : FullConfig
        Supplies the values of keys the grid leaves out.

    Returns
    -------
    list of Candidate
        The config's own setting first, then the grid in product order, without duplicates
        (the window is ignored where tiles do not overlap).

    Raises
    ------
    ConfigError
        On an unreadable file, an unknown key or an invalid value (the message names the
        file and key), or a grid without any valid combination.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"grid file '{file}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"grid file '{file}' is not readable: {exc}") from None
    # the config's loader: a key given twice is refused, 1e-4 is a float
    doc = parse_yaml(text, file)
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(
            f"{file}: expected a mapping of pacs_sr keys to lists of values, e.g. "
            "'stride: [8, 16]'"
        )
    unknown = sorted(set(doc) - set(SWEPT))
    if unknown:
        raise ConfigError(f"{file}: cannot sweep {unknown}; sweepable keys: {list(SWEPT)}")
    base = config.pacs_sr
    lists = [_values(file, doc, k, getattr(base, k)) for k in SWEPT]
    own = Candidate(*(getattr(base, k) for k in SWEPT))
    valid = [c for c in (Candidate(*v) for v in itertools.product(*lists))
             if stride_problem(c.patch_size, c.stride) is None
             and weight_model_conflict(c) is None]
    if not valid:
        raise ConfigError(f"{file}: every combination has stride > patch_size, or a weight "
                          "model its other settings exclude (prior: multiscale needs "
                          "fit_region: first_block; gating: edge needs lambda_edge and "
                          "lambda_grad 0)")
    return unique_candidates([own, *valid])


def unique_candidates(cands: Iterable[Candidate]) -> list[Candidate]:
    """Drop candidates that fit and blend exactly like an earlier one (order kept).

    Without overlap a box is its label cell and the window is flat: one fit, one blend;
    without the multi-scale prior its strength does not matter.
    """
    seen: dict[tuple, Candidate] = {}
    for c in cands:
        region = "first_block" if c.stride == c.patch_size else \
            effective_region(c.fit_region, c.patch_size, c.stride, c.window)
        strength = c.prior_strength if c.prior == "multiscale" else None
        ident = (c.patch_size, c.stride, c.lambda_ridge, c.lambda_edge, c.lambda_grad,
                 c.laplacian_tau, region, c.window, c.prior, strength, c.gating,
                 c.hr_free_mapping, c.fit_normalisation)
        seen.setdefault(ident, c)
    return list(seen.values())


@dataclass
class TuneResult:
    """What :func:`run_tune` produced."""

    table: list[dict[str, Any]]
    experts: dict[str, dict[str, float]]
    best: Candidate
    out_dir: Path
    units_done: int
    units_resumed: int
    timings_s: dict[str, float]


def run_tune(
    config: FullConfig,
    candidates: Sequence[Candidate],
    out_dir: str | os.PathLike[str],
    *,
    folds: Iterable[int] | None = None,
    spacings: Sequence[str] | None = None,
    pulses: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    no_progress: bool = False,
    stop: StopFlag | None = None,
    yes: bool = False,
    max_units: int = MAX_UNITS,
) -> TuneResult:
    """Cross-validate ``candidates`` and write the ranked table and the best config.

    Parameters
    ----------
    config : FullConfig
        The base config (data, manifest, fixed fit settings such as ``simplex``,
        ``edge_power``, ``grad_operator``, ``ssim_axis``).
    candidates : sequence of Candidate
        Settings to compare (:func:`load_grid`).
    out_dir : path-like
        Receives ``results/`` (one JSON per finished unit), ``tune_results.csv``,
        ``tune_results.md`` and ``best_config.yaml``.
    folds : iterable of int, optional
        1-based folds to use (default: all of the manifest's).
    spacings, pulses : sequence of str, optional
        Subsets of ``data.spacings`` / ``data.pulses`` (default: all).
    cache_dir : path-like, optional
        Volume cache (the statistics live in its ``cellstats`` folder).
    no_progress : bool
        Log progress lines instead of a tqdm bar.
    stop : StopFlag, optional
        Set by SIGTERM/SIGINT (``pacs-numba tune``): no new unit starts, finished units are
        kept, and :class:`~pacs_numba.errors.Interrupted` says how far the sweep got.
    yes : bool
        Run a grid of more than ``max_units`` units anyway.
    max_units : int
        The largest grid that runs without ``yes`` (default :data:`MAX_UNITS`).

    Returns
    -------
    TuneResult
        Ranked rows (best mean held-out PSNR first), per-expert baselines, the best
        candidate and counts of units computed and resumed.

    Raises
    ------
    ConfigError
        On a bad fold, spacing or pulse, no candidate, or a grid of more than ``max_units``
        units without ``yes``.
    InputError
        If an input file cannot be read.
    Interrupted
        When ``stop`` was set; the finished units are on disk and a rerun resumes.
    """
    t_start = time.perf_counter()
    if not candidates:
        raise ConfigError("no candidate settings to tune")
    out = Path(out_dir)
    results_dir = out / "results"
    pacs = config.pacs_sr
    models = tuple(config.data.models)
    manifest = load_manifest(config.data.out, config.data)
    fold_list, spacing_list, pulse_list = filter_tasks(manifest, config.data, folds, spacings,
                                                       pulses, fold_option="--folds")
    _check_grid_size(len(candidates), len(fold_list), len(spacing_list), len(pulse_list),
                     yes=yes, max_units=max_units)
    store = VolumeStore(cache_dir)
    cache = StatsCache(store.directory / "cellstats")
    fixed = fixed_settings(pacs, models)

    # Shared statistics: one first_block pass per patient at the gcd of the strides.
    fb = [c for c in candidates if _statistics_group(c)[0] == "first_block"]
    cell = math.gcd(*(c.stride for c in fb)) if fb else 1
    need_edge = any(c.lambda_edge > 0 for c in candidates)
    need_grad = any(c.lambda_grad > 0 for c in candidates)
    need_gate = any(c.gating != "none" for c in candidates)

    def group_of(c: Candidate) -> tuple:
        g = _statistics_group(c)
        return (*g, c.stride) if g[0] == "first_block" else g

    groups: dict[tuple, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(group_of(c), []).append(c)

    splits = {
        (f, s, p): select_task(manifest, f, s, p, models)
        for f in fold_list for s in spacing_list for p in pulse_list
    }
    # Inputs by fingerprint (path, size, mtime): a rewritten file makes new units.
    inputs = {
        (s, p, pid): [file_fingerprint(x) for x in [v["HR"], *v["experts"]]]
        for (_, s, p), (train, test) in splits.items() for pid, v in {**train, **test}.items()
    }
    unit_paths: dict[tuple, Path] = {}
    for c in candidates:
        for (f, s, p), (train, test) in splits.items():
            ident = _digest({"c": c.as_dict(), "fixed": fixed, "spacing": s, "pulse": p,
                             "train": {pid: inputs[(s, p, pid)] for pid in train},
                             "test": {pid: inputs[(s, p, pid)] for pid in test}})
            unit_paths[(c, f, s, p)] = results_dir / f"{ident}.json"
    done = {u for u, path in unit_paths.items() if path.exists()}
    n_units = len(unit_paths)
    log.info("tune: %d candidates x %d folds x %d spacings x %d pulses = %d units, %d done "
             "already; %d statistics groups (first_block cell %d)", len(candidates),
             len(fold_list), len(spacing_list), len(pulse_list), n_units, len(done),
             len(groups), cell)
    timings = {"statistics": 0.0, "fit": 0.0, "blend_metrics": 0.0}
    computed = 0
    with progress(n_units, "tune", unit="fits", disabled=no_progress) as bar:
        if done:
            bar.update(len(done))
        for s in spacing_list:
            for p in pulse_list:
                paths: dict[str, Mapping] = {}
                for f in fold_list:
                    train, test = splits[(f, s, p)]
                    paths.update(train)
                    paths.update(test)
                pats = _Patients(store, cache, paths)
                # Fold by fold: a fold's held-out patients are prepared once for every
                # setting, then forgotten, so memory does not grow with the cohort.
                for f in fold_list:
                    train, test = splits[(f, s, p)]
                    for gkey, members in groups.items():
                        todo = [c for c in members if (c, f, s, p) not in done]
                        if not todo:
                            continue
                        if not train:
                            raise InputError(f"fold {f} {s} {p}: the manifest has no training "
                                             "patients")
                        skey = _stats_key(members[0], cell, pacs, need_edge, need_grad,
                                          need_gate and gkey[0] == "first_block")
                        t0 = time.perf_counter()
                        per = [pats.stats(pid, skey, pacs) for pid in train]
                        st = sum_stats(per)
                        del per
                        if gkey[0] == "first_block":
                            st = st.coarsen(gkey[-1])
                        timings["statistics"] += time.perf_counter() - t0
                        for c in todo:
                            _stop_point(stop, computed, n_units - len(done))
                            t_unit = time.perf_counter()
                            unit = _fit_and_score(c, st, pats, test, pacs, models, timings)
                            unit.update(candidate=c.as_dict(), fold=f, spacing=s, pulse=p)
                            atomic_write_json(unit_paths[(c, f, s, p)], unit, indent=1)
                            computed += 1
                            bar.update(1)
                            if computed == 1:
                                _log_estimate(time.perf_counter() - t_unit,
                                              timings["statistics"], n_units - len(done))
                    pats.release(test)
                log.debug("tune %s %s: %d volume reads", s, p, pats.reads)
    table, experts = _rank(candidates, unit_paths)
    best = Candidate(**table[0]["candidate"])
    _write_outputs(out, config, table, experts, best)
    timings["total"] = time.perf_counter() - t_start
    log.info("tune: seconds: statistics %.1f, fits %.1f, held-out blends and scores %.1f, "
             "total %.1f", timings["statistics"], timings["fit"], timings["blend_metrics"],
             timings["total"])
    log.info("tune: best %s: held-out PSNR %.4f dB (%+.4f dB vs the best expert %s; %s); "
             "%d units computed, %d resumed", _label(best), table[0]["psnr"],
             table[0]["gain_psnr"], experts["_best"]["name"], PROTOCOLS[HR_FREE], computed,
             n_units - computed)
    return TuneResult(table, experts, best, out, computed, n_units - computed, timings)


def _label(c: Candidate) -> str:
    return (f"patch={c.patch_size} stride={c.stride} ridge={c.lambda_ridge:g} "
            f"edge={c.lambda_edge:g} grad={c.lambda_grad:g} tau={c.laplacian_tau:g} "
            f"fit={c.fit_region} window={c.window} prior={c.prior}"
            + (f"({c.prior_strength:g})" if c.prior == "multiscale" else "")
            + f" gating={c.gating} mapping={c.hr_free_mapping}"
            + f" fit_normalisation={c.fit_normalisation}")


def _rank(
    candidates: Sequence[Candidate], unit_paths: Mapping[tuple, Path]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Rank the candidates; the best expert and the gains from ``scoring.gain_over_best``.

    A unit of the means is one (fold, spacing, pulse, held-out patient); every candidate and
    every expert is scored on the same units, under the HR-free protocol.
    """
    per_cand: dict[Candidate, dict[str, dict[str, float]]] = {c: {} for c in candidates}
    expert_units: dict[str, dict[str, dict[str, float]]] = {}
    for (c, f, s, p), path in unit_paths.items():
        try:
            unit = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"tune result '{path}' is unreadable ({exc}); delete it and "
                             "rerun") from exc
        for pid, r in sorted(unit["patients"].items()):
            key = f"{f}/{s}/{p}/{pid}"
            per_cand[c][key] = {"psnr": r["psnr"], "ssim": r["ssim"]}
            for name, e in r["experts"].items():
                expert_units.setdefault(name, {})[key] = e
    rows = []
    best_name = None
    for i, c in enumerate(candidates):
        g = gain_over_best(HR_FREE, per_cand[c], expert_units)
        best_name = best_name or g.best
        units = per_cand[c]
        rows.append({"candidate": c.as_dict(), "config_default": i == 0,
                     "psnr": float(np.mean([u["psnr"] for u in units.values()]))
                     if units else float("nan"),
                     "ssim": float(np.mean([u["ssim"] for u in units.values()]))
                     if units else float("nan"),
                     "n_eval": len(units), "gain_psnr": g.psnr, "gain_ssim": g.ssim})
    g0 = gain_over_best(HR_FREE, per_cand[candidates[0]], expert_units)
    experts = {n: g0.means[n] for n in expert_units}
    rows.sort(key=lambda r: (-r["psnr"], -r["ssim"]))
    for rank, r in enumerate(rows, 1):
        r["rank"] = rank
    best_name = g0.best or best_name
    experts["_best"] = {"name": best_name, **experts[best_name]}  # type: ignore[dict-item]
    return rows, experts


def _check_grid_size(n_settings: int, n_folds: int, n_spacings: int, n_pulses: int, *,
                     yes: bool, max_units: int) -> None:
    """Log the grid's size; refuse one above ``max_units`` unless ``yes``."""
    n = n_settings * n_folds * n_spacings * n_pulses
    size = (f"{n_settings} setting(s) x {n_folds} fold(s) x {n_spacings} spacing(s) x "
            f"{n_pulses} pulse(s) = {n:,} units")
    log.info("tune: the grid is %s; a time estimate follows the first unit", size)
    if n > max_units and not yes:
        raise ConfigError(f"tune: the grid is {size}, more than {max_units:,}; shrink the "
                          "grid, or pass --yes to run it anyway (each unit is one fit and "
                          "the blends of the fold's held-out patients)")


def _log_estimate(first_unit_s: float, statistics_s: float, todo: int) -> None:
    """After the first unit: an estimate of the sweep's remaining time.

    ``first_unit_s`` is the unit's own fit and held-out scoring, which every other unit
    repeats; ``statistics_s`` what the statistics before it took, which later units share
    (each patient's are read or computed once), so they are not multiplied.
    """
    left_s = first_unit_s * (todo - 1)
    log.info("tune: first unit took %.1f s to fit and score (after %.1f s of statistics); "
             "about %s for the other %d unit(s), plus the statistics of patients not read "
             "yet", first_unit_s, statistics_s, _duration(left_s), todo - 1)


def _duration(secs: float) -> str:
    secs = int(round(secs))
    h, rest = divmod(secs, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _stop_point(stop: StopFlag | None, computed: int, todo: int) -> None:
    """Raise Interrupted between units once a stop was asked for (SIGTERM, Ctrl-C)."""
    if stop is None or not stop.is_set():
        return
    signum = stop.signal or signal.SIGTERM
    log.error("tune: stopped by %s after %d of %d unit(s) of this run; the finished ones are "
              "kept in results/, rerun the same command to resume", signal.Signals(signum).name,
              computed, todo)
    raise Interrupted(int(signum), f"tune stopped after {computed} of {todo} unit(s)")


def _write_outputs(
    out: Path, config: FullConfig, table: list[dict[str, Any]],
    experts: Mapping[str, Any], best: Candidate,
) -> None:
    cols = ["rank", *SWEPT, "psnr", "ssim", "gain_psnr", "gain_ssim", "n_eval", "config_default"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in table:
        flat = {**r["candidate"], **r}
        w.writerow([flat[c] for c in cols])
    atomic_write_text(out / "tune_results.csv", buf.getvalue())
    best_name = experts["_best"]["name"]
    lines = [
        "# pacs-numba tune",
        "",
        f"Held-out PSNR/SSIM, mean over every (fold, spacing, pulse, held-out patient), "
        f"{PROTOCOLS[HR_FREE]} (as predict, no HR). Gains are against the best single expert "
        f"under the same protocol (highest mean PSNR), **{md_text(best_name)}**; they compare "
        "with the HR-free rows of `pacs-numba summarize`, not with the published ones.",
        "",
        md_text(PROTOCOL_NOTE),
        "",
        "| expert | PSNR (dB) | SSIM |",
        "|---|---:|---:|",
        *(f"| {md_text(n)} | {e['psnr']:.4f} | {e['ssim']:.4f} |" for n, e in experts.items()
          if n != "_best"),
        "",
        "| rank | " + " | ".join(SWEPT) + " | PSNR (dB) | SSIM | gain PSNR | gain SSIM |",
        "|" + "---:|" * (len(SWEPT) + 5),
    ]
    for r in table:
        c = r["candidate"]
        mark = " (config)" if r["config_default"] else ""
        lines.append(
            f"| {r['rank']}{mark} | " + " | ".join(f"{c[k]:g}" if isinstance(c[k], float)
                                                   else md_text(c[k]) for k in SWEPT)
            + f" | {r['psnr']:.4f} | {r['ssim']:.4f} | {r['gain_psnr']:+.4f} | "
            f"{r['gain_ssim']:+.4f} |"
        )
    atomic_write_text(out / "tune_results.md", "\n".join(lines) + "\n")
    best_cfg = dataclasses.replace(config, pacs_sr=dataclasses.replace(config.pacs_sr,
                                                                       **best.as_dict()))
    dump_config(best_cfg, out / "best_config.yaml")
