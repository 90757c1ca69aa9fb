"""Nested cross-validation of the fit settings (``pacs-numba tune --nested``).

A plain sweep picks the setting with the best mean held-out score and reports that score,
which is optimistic: the patients that chose the setting also grade it.  Here the
manifest's K folds are the *outer* folds.  For outer fold ``f`` the setting is chosen on
*inner* folds built from its training patients only (inner fold ``g != f`` trains on
``train(f)`` minus ``test(g)`` and holds out ``test(g)``), and so is the best single
expert.  The chosen setting is then fitted on all of ``train(f)`` and scored on
``test(f)``, which took no part in either choice.  The reported gain is the mean over
outer folds of the held-out gain of that blend over that expert, with its spread over the
folds and a paired Wilcoxon signed-rank test over the held-out patients.

Every unit (candidate, split, spacing, pulse) is scored under the HR-free protocol
(:mod:`pacs_numba.runs.cvunits`) and written atomically to ``results/<id>.json`` with the
same id a plain ``tune`` would give the same split, so reruns resume and a plain sweep's
outer-fold results are reused.
"""

from __future__ import annotations

import dataclasses
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

from ..config import FullConfig
from ..core.cellstats import sum_stats
from ..errors import ConfigError, InputError, Interrupted
from ..store.atomic import atomic_write_json, atomic_write_text
from ..store.integrity import strict_json
from ..store.manifest import load_manifest, select_task
from ..store.statscache import StatsCache
from ..store.volumes import VolumeStore, file_fingerprint
from .cvunits import (
    Patients,
    digest,
    fit_and_score,
    fixed_settings,
    statistics_group,
    stats_key,
)
from .pool import StopFlag
from .progress import progress
from .tune import SWEPT, Candidate, unique_candidates

log = logging.getLogger(__name__)

#: Prior strengths and strides the default grid tries for the multi-scale prior.
DEFAULT_PRIOR_STRENGTHS = (0.25, 1.0, 4.0)


def family(c: Candidate) -> str:
    """Name of the weight model of ``c``: published, multiscale, edge-gated or both.

    Fitted as ``predict`` blends (``fit_region: centre`` or ``fit_normalisation: experts``,
    algorithm A4) the name says so after a comma.
    """
    parts = [p for p, on in (("multiscale", c.prior == "multiscale"),
                             ("edge-gated", c.gating == "edge")) if on]
    fit = [f for f, on in (("centre", c.fit_region == "centre"),
                           ("experts' z-scores", c.fit_normalisation == "experts")) if on]
    return ("+".join(parts) or "published") + (", fitted " + " + ".join(fit) if fit else "")


def default_grid(config: FullConfig) -> list[Candidate]:
    """Return the grid of ``tune --nested`` without ``--grid``: today's settings, options.

    - the config's own setting, and the published model with each of ``lambda_edge``,
      ``lambda_grad`` and ``laplacian_tau`` at 0 or the config's value (up to 8);
    - the published model at tiles of half the size, without and with the config's
      smoothing (up to 2): what the smaller tiles gain without the prior;
    - the multi-scale prior at ``prior_strength`` 0.25, 1 and 4, at the config's tiles and
      at tiles of half the size (6);
    - the edge-gated model without the prior at the config's tiles, and with the prior at
      strengths 1 and 4 at both tile sizes (5): the gated model has twice the unknowns,
      so it is the one that needs the prior most;
    - fitted as ``predict`` blends (``fit_region: centre``, ``fit_normalisation: experts``,
      algorithm A4): the published model and the prior's three strengths at both tile sizes
      (8);
    - each of those without ``lambda_edge`` and ``lambda_grad`` again with the other HR-free
      map-back (``hr_free_mapping``: ``weighted`` when the config's is ``mean``; up to 15),
      which changes the blend, not the fit.

    The options use the ``first_block`` fit with ``lambda_edge = lambda_grad = 0`` and no
    smoothing, which they need (gating) or replace (the prior smooths across scales).
    """
    base = config.pacs_sr
    own = Candidate(*(getattr(base, k) for k in SWEPT))
    out = [own]
    for le in dict.fromkeys((0.0, own.lambda_edge)):
        for lg in dict.fromkeys((0.0, own.lambda_grad)):
            for tau in dict.fromkeys((0.0, own.laplacian_tau)):
                out.append(dataclasses.replace(own, lambda_edge=le, lambda_grad=lg,
                                               laplacian_tau=tau, prior="none",
                                               gating="none"))
    plain = dataclasses.replace(own, lambda_edge=0.0, lambda_grad=0.0, laplacian_tau=0.0,
                                fit_region="first_block", prior="none", gating="none")
    sizes = [(own.patch_size, own.stride)]
    if own.stride >= 2:
        sizes.append((max(1, own.patch_size // 2), own.stride // 2))
    for patch, stride in sizes[1:]:
        for tau in dict.fromkeys((0.0, own.laplacian_tau)):
            out.append(dataclasses.replace(plain, patch_size=patch, stride=stride,
                                           laplacian_tau=tau))
    for patch, stride in sizes:
        for strength in DEFAULT_PRIOR_STRENGTHS:
            out.append(dataclasses.replace(plain, patch_size=patch, stride=stride,
                                           prior="multiscale", prior_strength=strength))
    out.append(dataclasses.replace(plain, gating="edge"))
    for patch, stride in sizes:
        for strength in DEFAULT_PRIOR_STRENGTHS[1:]:
            out.append(dataclasses.replace(plain, patch_size=patch, stride=stride, gating="edge",
                                           prior="multiscale", prior_strength=strength))
    # fitted as predict blends (algorithm A4): each tile on its window's central block,
    # z-scored with the experts' own statistics.  Not the gated model: its statistics are
    # per label cell, and with the experts' z-scores alone it gained nothing on the
    # generated cohorts (profiling/2026-12-07-weight-models-gate.md) for the most
    # expensive blends of the grid.
    for patch, stride in sizes:
        out.append(dataclasses.replace(plain, patch_size=patch, stride=stride,
                                       fit_region="centre", fit_normalisation="experts"))
        for strength in DEFAULT_PRIOR_STRENGTHS:
            out.append(dataclasses.replace(plain, patch_size=patch, stride=stride,
                                           prior="multiscale", prior_strength=strength,
                                           fit_region="centre", fit_normalisation="experts"))
    other = "weighted" if own.hr_free_mapping == "mean" else "mean"
    out += [dataclasses.replace(c, hr_free_mapping=other) for c in out[1:]
            if c.lambda_edge == 0 and c.lambda_grad == 0]
    return unique_candidates(out)


@dataclass
class NestedResult:
    """What :func:`run_nested` produced (``summary`` is the content of ``nested.json``)."""

    summary: dict[str, Any]
    out_dir: Path
    units_done: int
    units_resumed: int
    timings_s: dict[str, float]


def _wilcoxon(diffs: Sequence[float]) -> dict[str, Any]:
    d = np.asarray(diffs, np.float64)
    out: dict[str, Any] = {"n": int(d.size), "median_diff": float(np.median(d)) if d.size else
                           None, "statistic": None, "p_value": None}
    if d.size and np.any(d != 0):
        from scipy import stats as sps  # ~58 MB of RSS: imported by the runs that test

        r = sps.wilcoxon(d, zero_method="wilcox", alternative="two-sided")
        out.update(statistic=float(r.statistic), p_value=float(r.pvalue))
    return out


def run_nested(
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
) -> NestedResult:
    """Nested cross-validation of ``candidates``; write ``nested.json`` and ``nested.md``.

    Parameters
    ----------
    config : FullConfig
        The base config (data, manifest, fixed fit settings).
    candidates : sequence of Candidate
        Settings to choose from (:func:`default_grid` or :func:`runs.tune.load_grid`).
    out_dir : path-like
        Receives ``results/`` (one JSON per unit), ``nested.json`` and ``nested.md``.
    folds : iterable of int, optional
        1-based outer folds to score (default all); the inner folds always use every
        other fold of the manifest.
    spacings, pulses : sequence of str, optional
        Subsets of ``data.spacings`` / ``data.pulses`` (default all).
    cache_dir : path-like, optional
        Volume cache (statistics in its ``cellstats`` folder).
    no_progress : bool
        Log progress lines instead of a bar.
    stop : StopFlag, optional
        Checked between units (SIGTERM, Ctrl-C): finished units stay on disk, a rerun
        resumes.

    Returns
    -------
    NestedResult

    Raises
    ------
    ConfigError
        With fewer than 3 folds (an outer fold needs at least two inner folds), a bad fold,
        spacing or pulse, or no candidate.
    InputError
        If an input cannot be read, or an inner split has no training patient.
    Interrupted
        When ``stop`` was set.
    """
    t_start = time.perf_counter()
    if not candidates:
        raise ConfigError("no candidate settings to tune")
    out = Path(out_dir)
    pacs = config.pacs_sr
    models = tuple(config.data.models)
    manifest = load_manifest(config.data.out)
    k = len(manifest["folds"])
    if k < 3:
        raise ConfigError(f"tune --nested needs a manifest with at least 3 folds (each outer "
                          f"fold chooses on 2 or more inner folds); '{config.data.out}' has {k}")
    outer = sorted(set(folds)) if folds is not None else list(range(1, k + 1))
    for f in outer:
        if not 1 <= f <= k:
            raise ConfigError(f"--folds {f}: the manifest has folds 1..{k}")
    for name, chosen, allowed in (("spacing", spacings, config.data.spacings),
                                  ("pulse", pulses, config.data.pulses)):
        for v in chosen or ():
            if v not in allowed:
                raise ConfigError(f"--{name} {v!r}: data.{name}s in the config has {list(allowed)}")
    spacing_list = list(spacings or config.data.spacings)
    pulse_list = list(pulses or config.data.pulses)
    store = VolumeStore(cache_dir)
    cache = StatsCache(store.directory / "cellstats")
    fixed = fixed_settings(pacs, models)
    fb = [c for c in candidates if statistics_group(c)[0] == "first_block"]
    cell = math.gcd(*(c.stride for c in fb)) if fb else 1
    need = (any(c.lambda_edge > 0 for c in candidates),
            any(c.lambda_grad > 0 for c in candidates),
            any(c.gating != "none" for c in candidates))

    # Splits: (s, p, f, g) with g = 0 for the outer split of fold f.
    splits: dict[tuple, tuple[dict, dict]] = {}
    for s in spacing_list:
        for p in pulse_list:
            tasks = {f: select_task(manifest, f, s, p, models) for f in range(1, k + 1)}
            for f in outer:
                train, test = tasks[f]
                splits[(s, p, f, 0)] = (train, test)
                for g in range(1, k + 1):
                    if g == f:
                        continue
                    held = tasks[g][1]
                    inner_train = {pid: v for pid, v in train.items() if pid not in held}
                    if not inner_train:
                        raise InputError(f"outer fold {f}, inner fold {g} ({s} {p}): no "
                                         "training patient left; use more patients or folds")
                    splits[(s, p, f, g)] = (inner_train, dict(held))
    inputs = {
        (s, p, pid): [file_fingerprint(x) for x in [v["HR"], *v["experts"]]]
        for (s, p, *_), (tr, te) in splits.items() for pid, v in {**tr, **te}.items()
    }

    def unit_path(c: Candidate, split: tuple) -> Path:
        s, p = split[:2]
        tr, te = splits[split]
        ident = digest({"c": c.as_dict(), "fixed": fixed, "spacing": s, "pulse": p,
                        "train": {pid: inputs[(s, p, pid)] for pid in tr},
                        "test": {pid: inputs[(s, p, pid)] for pid in te}})
        return out / "results" / f"{ident}.json"

    timings = {"statistics": 0.0, "fit": 0.0, "blend_metrics": 0.0}
    counter = {"computed": 0, "resumed": 0}
    pats_by_task: dict[tuple, Patients] = {}

    def run_units(units: list[tuple[Candidate, tuple]], bar: Any) -> None:
        todo: dict[tuple, list[Candidate]] = {}
        for c, split in units:
            if unit_path(c, split).exists():
                counter["resumed"] += 1
                bar.update(1)
            else:
                todo.setdefault(split, []).append(c)
        for split, cands in todo.items():
            s, p = split[:2]
            tr, te = splits[split]
            if (s, p) not in pats_by_task:
                paths: dict[str, Mapping] = {}
                for (s2, p2, *_), (a, b) in splits.items():
                    if (s2, p2) == (s, p):
                        paths.update(a)
                        paths.update(b)
                pats_by_task[(s, p)] = Patients(store, cache, paths)
            pats = pats_by_task[(s, p)]
            groups: dict[tuple, list[Candidate]] = {}
            for c in cands:
                groups.setdefault(statistics_group(c), []).append(c)
            for gkey, members in groups.items():
                fb_group = gkey[0] == "first_block"
                skey = stats_key(members[0], cell, pacs, need[0], need[1], need[2] and fb_group)
                t0 = time.perf_counter()
                st = sum_stats([pats.stats(pid, skey, pacs) for pid in tr])
                timings["statistics"] += time.perf_counter() - t0
                for c in members:
                    if stop is not None and stop.is_set():
                        signum = stop.signal or signal.SIGTERM
                        log.error("tune --nested: stopped by %s after %d unit(s); the finished "
                                  "ones are kept in results/, rerun the same command to resume",
                                  signal.Signals(signum).name, counter["computed"])
                        raise Interrupted(int(signum), f"tune --nested stopped after "
                                          f"{counter['computed']} unit(s)")
                    st_c = st.coarsen(c.stride) if fb_group else st
                    unit = fit_and_score(c, st_c, pats, te, pacs, models, timings)
                    unit.update(candidate=c.as_dict(), split=list(split[2:]), spacing=s, pulse=p,
                                train=sorted(tr))
                    atomic_write_json(unit_path(c, split), unit, indent=1)
                    counter["computed"] += 1
                    bar.update(1)

    def read(c: Candidate, split: tuple) -> dict[str, Any]:
        path = unit_path(c, split)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"tune result '{path}' is unreadable ({exc}); delete it and "
                             "rerun") from exc

    inner_units = [(c, sp) for c in candidates for sp in splits if sp[3] != 0]
    n_inner = len(inner_units)
    log.info("tune --nested: %d candidates, %d outer folds x %d inner folds, %d spacings x "
             "%d pulses: %d inner units", len(candidates), len(outer), k - 1,
             len(spacing_list), len(pulse_list), n_inner)
    with progress(n_inner, "tune --nested inner", unit="fits", disabled=no_progress) as bar:
        run_units(inner_units, bar)

    # Choose per outer fold, on its inner units only.
    fams = list(dict.fromkeys(family(c) for c in candidates))
    mappings = list(dict.fromkeys(c.hr_free_mapping for c in candidates))
    chosen: dict[tuple[int, str], Candidate] = {}
    best_expert: dict[int, str] = {}
    best_path: dict[int, str] = {}  # best expert through the blend's path (old units: none)
    use_expert: dict[int, bool] = {}  # the expert alone beat every blend on the inner folds
    inner_scores: dict[int, dict[str, Any]] = {}
    for f in outer:
        inner = [sp for sp in splits if sp[2] == f and sp[3] != 0]
        means = {}
        expert_psnr: dict[str, list[float]] = {}
        path_psnr: dict[str, list[float]] = {}
        for i, c in enumerate(candidates):
            vals = []
            for sp in inner:
                for _pid, r in sorted(read(c, sp)["patients"].items()):
                    vals.append(r["psnr"])
                    if i == 0:
                        for name, e in r["experts"].items():
                            expert_psnr.setdefault(name, []).append(e["psnr"])
                        for name, e in r.get("experts_path", {}).items():
                            path_psnr.setdefault(name, []).append(e["psnr"])
            means[c] = float(np.mean(vals))
        best_expert[f] = max(expert_psnr, key=lambda n: np.mean(expert_psnr[n]))
        if path_psnr:
            best_path[f] = max(path_psnr, key=lambda n: np.mean(path_psnr[n]))
        for fam in ["all", *fams]:
            pool = [c for c in candidates if fam == "all" or family(c) == fam]
            chosen[(f, fam)] = max(pool, key=lambda c: means[c])  # first on ties: grid order
        for mp in mappings:  # the best setting with each HR-free map-back (algorithm B6)
            chosen[(f, f"mapping {mp}")] = max(
                (c for c in candidates if c.hr_free_mapping == mp), key=lambda c: means[c])
        expert_inner = float(np.mean(expert_psnr[best_expert[f]]))
        # "the best expert alone" is a candidate too: a blend must beat it on the inner folds
        use_expert[f] = expert_inner >= means[chosen[(f, "all")]]
        inner_scores[f] = {"best_expert_psnr": expert_inner,
                           "chosen_psnr": means[chosen[(f, "all")]],
                           "expert_alone_chosen": use_expert[f]}

    own = candidates[0]
    outer_units = list(dict.fromkeys(
        [(c, (s, p, f, 0)) for (f, _), c in chosen.items() for s in spacing_list
         for p in pulse_list]
        + [(own, (s, p, f, 0)) for f in outer for s in spacing_list for p in pulse_list]))
    with progress(len(outer_units), "tune --nested outer", unit="fits",
                  disabled=no_progress) as bar:
        run_units(outer_units, bar)

    def score(pick: Mapping[int, Candidate],
              expert_alone: Mapping[int, bool] | None = None) -> dict[str, Any]:
        per_fold, per_fold_ssim, diffs, per_fold_path = [], [], [], []
        for f in outer:
            d_psnr, d_ssim, d_path = [], [], []
            alone = bool(expert_alone and expert_alone[f])
            for s in spacing_list:
                for p in pulse_list:
                    for _pid, r in sorted(read(pick[f], (s, p, f, 0))["patients"].items()):
                        e = r["experts"][best_expert[f]]
                        # the expert chosen alone is its raw volume: the gain is exactly 0
                        got = e if alone else r
                        d_psnr.append(got["psnr"] - e["psnr"])
                        d_ssim.append(got["ssim"] - e["ssim"])
                        if f in best_path and "experts_path" in r:
                            d_path.append(got["psnr"] - r["experts_path"][best_path[f]]["psnr"])
            per_fold.append(float(np.mean(d_psnr)))
            per_fold_ssim.append(float(np.mean(d_ssim)))
            diffs.extend(d_psnr)
            per_fold_path.append(float(np.mean(d_path)) if d_path else None)
        arr = np.asarray(per_fold)
        path_ok = all(v is not None for v in per_fold_path)
        return {
            "gain_psnr": float(arr.mean()),
            "gain_psnr_per_fold": per_fold,
            "gain_psnr_sd": float(arr.std(ddof=1)) if arr.size > 1 else None,
            "gain_psnr_min": float(arr.min()), "gain_psnr_max": float(arr.max()),
            "gain_ssim": float(np.mean(per_fold_ssim)),
            "gain_ssim_per_fold": per_fold_ssim,
            "wilcoxon": _wilcoxon(diffs),
            # the same gain against the best expert pushed through the blend's own HR-free
            # path: what the weights add, without the normalisation's own effect
            "gain_psnr_vs_expert_path": float(np.mean(per_fold_path)) if path_ok else None,
            "gain_psnr_vs_expert_path_per_fold": per_fold_path if path_ok else None,
            "chosen": [{"expert": best_expert[f]} if expert_alone and expert_alone[f]
                       else pick[f].as_dict() for f in outer],
            "expert_alone_chosen": [bool(expert_alone and expert_alone[f]) for f in outer],
        }

    summary: dict[str, Any] = {
        "protocol": "nested cross-validation; settings and best expert chosen on the inner "
                    "folds of each outer fold's training patients, the best expert alone "
                    "(its raw volume) being one more choice; outer held-out patients "
                    "scored HR-free (normalisation, brain mask and edge gate from the experts)",
        "outer_folds": outer, "inner_folds_per_outer": k - 1,
        "spacings": spacing_list, "pulses": pulse_list, "n_candidates": len(candidates),
        "best_expert": [best_expert[f] for f in outer],
        "best_expert_path": [best_path.get(f) for f in outer],
        "inner": [inner_scores[f] for f in outer],
    }
    overall = score({f: chosen[(f, "all")] for f in outer}, use_expert)
    summary.update(overall)
    # the same choice without the expert-alone option: what the best blend gains or loses
    summary["blends_only"] = score({f: chosen[(f, "all")] for f in outer})
    summary["families"] = {fam: score({f: chosen[(f, fam)] for f in outer}) for fam in fams}
    summary["mappings"] = {mp: score({f: chosen[(f, f"mapping {mp}")] for f in outer})
                           for mp in mappings}
    summary["config_setting"] = score({f: own for f in outer})
    timings["total"] = time.perf_counter() - t_start
    summary["timings_s"] = timings
    atomic_write_json(out / "nested.json", strict_json(summary), indent=2)
    atomic_write_text(out / "nested.md", _table(summary))
    sd = summary["gain_psnr_sd"]
    log.info("tune --nested: held-out gain %+.4f dB PSNR over the best expert (sd over %d outer "
             "folds %s); %d units computed, %d resumed", summary["gain_psnr"], len(outer),
             "n/a" if sd is None or not math.isfinite(sd) else f"{sd:.4f}",
             counter["computed"], counter["resumed"])
    return NestedResult(summary, out, counter["computed"], counter["resumed"], timings)


def _fmt(v: float | None, spec: str = "+.4f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else \
        format(v, spec)


def _table(summary: Mapping[str, Any]) -> str:
    rows = [("chosen among all settings and the best expert alone", summary),
            ("chosen among all blend settings", summary["blends_only"])]
    rows += [(f"best {fam} setting", r) for fam, r in summary["families"].items()]
    rows += [(f"best setting with hr_free_mapping {mp}", r)
             for mp, r in summary["mappings"].items()]
    rows.append(("config setting (fixed, no choice)", summary["config_setting"]))
    lines = [
        "# pacs-numba tune --nested",
        "",
        "Held-out gain over the best single expert (dB PSNR), HR-free protocol. For each outer "
        "fold the setting and the best expert are chosen on inner folds of its training "
        "patients only; the outer held-out patients score the choice. Best expert per outer "
        f"fold: {', '.join(summary['best_expert'])}. Last column: the gain over the best expert "
        "pushed through the blend's own HR-free path (z-scored, mapped back with the experts' "
        "statistics, masked), i.e. what the weights add beyond that mapping.",
        "",
        "| model | gain PSNR (mean) | sd over folds | min | max | per fold | gain SSIM | "
        "Wilcoxon p (n) | gain vs expert through the blend path |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, r in rows:
        w = r["wilcoxon"]
        lines.append(
            f"| {name} | {_fmt(r['gain_psnr'])} | {_fmt(r['gain_psnr_sd'], '.4f')} | "
            f"{_fmt(r['gain_psnr_min'])} | {_fmt(r['gain_psnr_max'])} | "
            + " ".join(_fmt(v, "+.3f") for v in r["gain_psnr_per_fold"])
            + f" | {_fmt(r['gain_ssim'])} | {_fmt(w['p_value'], '.3g')} ({w['n']}) | "
            f"{_fmt(r['gain_psnr_vs_expert_path'])} |"
        )
    lines += ["", "Chosen per outer fold (all settings and the best expert alone; an expert "
              "is chosen when no blend setting beat it on the inner folds, and then a user "
              "takes that expert's own volume, no PaCS-SR model):", ""]
    for f, c in zip(summary["outer_folds"], summary["chosen"], strict=True):
        lines.append(f"- fold {f}: " + (f"expert {c['expert']} alone" if "expert" in c else
                                        ", ".join(f"{k}={v}" for k, v in c.items())))
    return "\n".join(lines) + "\n"
