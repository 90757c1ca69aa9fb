#!/usr/bin/env python
"""Measure what the decomposed statistics buy: sweeps, K-fold train, and the tuned gain.

One generated cohort (``make_cohort``, one spacing, one pulse, 4 experts), the published
settings (patch 32, stride 16, lambda_edge 0.25, edge_power 1, lambda_grad 0.2, hann,
laplacian_tau 0.05, simplex) as the base config, then:

1. **direct fit**: fold 1's training patients, ``patient_statistics`` per patient (the fused
   direct pass, no statistics cache) summed, then ``fit_weights`` + ``laplacian_smooth``;
   volumes already in the volume cache (memory-mapped), so this is the fit, not NIfTI decoding.
2. **sweep fit**: the same training patients, ``--configs`` settings (strides 8/16/32 x
   lambda_edge x lambda_grad x lambda_ridge x tau, first_block): one decomposed pass per
   patient into an empty statistics cache, then per setting a sum, a recombination and a QP.
   Ratio to (1).  Held-out evaluation is measured separately (``eval_per_setting_s``).
3. **K-fold train**: after one unmeasured run that fills the volume cache, ``Engine.train``
   of fold 1 alone on an empty statistics cache, then of all K folds on another empty one;
   fit-side seconds (``load + statistics + solve +
   smoothing`` from ``TaskResult.timings``), evaluation aside (``evaluate_train`` off).
4. **gain**: ``run_tune`` over every fold with a grid that includes the published
   settings, on the cohort given by ``--gain-shape`` (default the same); best setting's
   held-out gain over the best single expert next to the published settings' gain.

Writes ``profiling/<date>-tune-<host>.json`` and ``.md``.  Only the public API is used.

Usage::

    python scripts/profile_tune.py                       # 200x230x190, 10 patients, K=5
    python scripts/profile_tune.py --shape 64 72 60 --patients 6 --kfolds 3   # quick check
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import yaml

from pacs_numba.config import dump_config, load_config
from pacs_numba.core.cellstats import StatsKey, combine, sum_stats
from pacs_numba.core.solve import fit_weights, laplacian_smooth
from pacs_numba.core.statistics import patient_statistics
from pacs_numba.core.tiling import TileGrid
from pacs_numba.runs.engine import Engine, RunOptions
from pacs_numba.runs.tune import load_grid, run_tune
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.manifest import build_manifest, select_task, write_manifest
from pacs_numba.store.statscache import StatsCache
from pacs_numba.store.volumes import VolumeStore

PUBLISHED = dict(patch_size=32, stride=16, lambda_grad=0.2, lambda_edge=0.25, edge_power=1.0,
                 mixing_window="hann", laplacian_tau=0.05, lambda_ridge=0.0, simplex=True)
SPACING, PULSE = "3mm", "t1c"


def cohort(root: Path, shape, patients: int, kfolds: int, seed: int) -> Path:
    if (root / "config.yaml").exists() and (root / "manifest.json").exists():
        return root / "config.yaml"  # made by an earlier run with the same --work
    cfg = make_cohort(root, patients=patients, shape=tuple(shape), spacings=(SPACING,),
                      pulses=(PULSE,), seed=seed, kfolds=kfolds, patch_size=32, stride=16)
    config = load_config(cfg)
    config = dataclasses.replace(config, pacs_sr=dataclasses.replace(
        config.pacs_sr, **PUBLISHED, evaluate_train=False, save_blends=False,
        save_weight_volumes=False, log_to_file=False))
    dump_config(config, cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    return cfg


def sweep_grid(n: int) -> list[dict]:
    """``n`` first_block settings: strides x lambdas (the published one among them)."""
    out = []
    for stride in (16, 8, 32):
        for le in (0.25, 0.0, 1.0):
            for lg in (0.2, 0.0, 1.0):
                for ridge in (0.0, 1.0):
                    for tau in (0.05, 0.0):
                        out.append(dict(stride=stride, lambda_edge=le, lambda_grad=lg,
                                        lambda_ridge=ridge, laplacian_tau=tau))
    return out[:n]


def direct_fit(config, store, train) -> float:
    p = config.pacs_sr
    t0 = time.perf_counter()
    grid = None
    Q = B = n = 0
    for paths in train.values():
        hr = store.get(paths["HR"]).data
        ex = [store.get(x).data for x in paths["experts"]]
        grid = grid or TileGrid(hr.shape, p.patch_size, p.stride)
        st = patient_statistics(hr, ex, grid, lambda_edge=p.lambda_edge,
                                edge_power=p.edge_power, lambda_grad=p.lambda_grad,
                                grad_operator=p.grad_operator)
        Q, B, n = Q + st.Q, B + st.B, n + st.counts
    w, learned = fit_weights(Q, B, n, grid.counts, simplex=p.simplex,
                             lambda_ridge=p.lambda_ridge, laplacian_tau=0.0)
    laplacian_smooth(w, learned, grid.counts, p.laplacian_tau)
    return time.perf_counter() - t0


def sweep_fit(config, store, train, settings, cache_dir: Path) -> tuple[float, float, float]:
    p = config.pacs_sr
    t0 = time.perf_counter()
    cache = StatsCache(cache_dir)
    cell = int(np.gcd.reduce([s["stride"] for s in settings]))
    key = StatsKey.make(region="first_block", stride=cell, patch_size=cell, window="flat",
                        edge_power=p.edge_power, grad_operator=p.grad_operator,
                        with_edge=True, with_grad=True)
    per = []
    for paths in train.values():
        files = [paths["HR"], *paths["experts"]]
        per.append(cache.get(files, key, lambda paths=paths: (
            store.get(paths["HR"]).data, [store.get(x).data for x in paths["experts"]])))
    total = sum_stats(per)
    t_stats = time.perf_counter() - t0
    by_stride = {}
    for s in settings:
        st = by_stride.setdefault(s["stride"], total.coarsen(s["stride"]))
        grid = TileGrid(st.shape, max(s["stride"], p.patch_size), s["stride"])
        Q, B = combine(st, lambda_edge=s["lambda_edge"], lambda_grad=s["lambda_grad"])
        w, learned = fit_weights(Q, B, st.counts, grid.counts, simplex=p.simplex,
                                 lambda_ridge=s["lambda_ridge"], laplacian_tau=0.0)
        if s["laplacian_tau"] > 0:
            laplacian_smooth(w, learned, grid.counts, s["laplacian_tau"])
    total_s = time.perf_counter() - t0
    return total_s, t_stats, total_s - t_stats


def fit_seconds(res) -> float:
    return sum(res.timings.get(k, 0.0) for k in ("load", "statistics", "solve", "smoothing"))


def kfold_train(cfg: Path, work: Path, cache: Path, folds) -> float:
    config = load_config(cfg)
    shutil.rmtree(cache / "cellstats", ignore_errors=True)
    eng = Engine(config, RunOptions(cache_dir=cache, out_root=work, no_progress=True,
                                    force=True))
    total = 0.0
    for task in eng.tasks():
        if task.fold in folds:
            total += fit_seconds(eng.train(task))
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(200, 230, 190))
    ap.add_argument("--patients", type=int, default=10)
    ap.add_argument("--kfolds", type=int, default=5)
    ap.add_argument("--configs", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kfold-shape", type=int, nargs=3, default=None,
                    help="cohort shape of the K-fold train measurement (default --shape)")
    ap.add_argument("--gain-shape", type=int, nargs=3, default=None,
                    help="cohort shape of the tune/gain run (default --shape)")
    ap.add_argument("--gain-grid", type=Path, default=None,
                    help="grid YAML for the gain run (default: a built-in 50-setting grid)")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--parts", nargs="+", choices=["sweep", "kfold", "gain"],
                    default=["sweep", "kfold", "gain"], help="measurements to run")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "profiling")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="pacs_tune_prof_"))
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "cache"
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    report: dict = {"shape": list(args.shape), "patients": args.patients, "kfolds": args.kfolds,
                    "configs": args.configs, "host": socket.gethostname(),
                    "cpus": os.cpu_count(), "numba_threads": numba.get_num_threads(),
                    "loadavg_start": os.getloadavg(), "published": PUBLISHED}
    cohorts: dict[tuple, Path] = {}

    def cohort_of(shape) -> Path:
        shape = tuple(shape)
        if shape not in cohorts:
            name = "cohort_" + "x".join(map(str, shape))
            cohorts[shape] = cohort(work / name, shape, args.patients, args.kfolds, args.seed)
        return cohorts[shape]

    stamp = dt.date.today().isoformat()
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{stamp}-tune-{socket.gethostname()}-{'-'.join(args.parts)}"
    if "gain" in args.parts:  # one file per gain cohort: runs at other sizes do not overwrite
        name += "-" + "x".join(map(str, args.gain_shape or args.shape))
    base = args.out / name

    def save() -> None:
        base.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))

    md = [
        f"# decomposed statistics and tune ({stamp}, {socket.gethostname()}, "
        f"{os.cpu_count()} CPUs, load average {report['loadavg_start'][0]:.1f} at start: "
        "the machine was shared with other jobs, timings are noisy)",
        "",
    ]
    if {"sweep", "kfold"} & set(args.parts):
        md += ["| measurement | median s | ratio |", "|---|---:|---:|"]
    if "sweep" in args.parts:
        t0 = time.perf_counter()
        cfg = cohort_of(args.shape)
        log(f"cohort {args.shape} x {args.patients}: {time.perf_counter() - t0:.0f} s")
        config = load_config(cfg)
        store = VolumeStore(cache)
        manifest = json.loads(Path(config.data.out).read_text())
        train, _ = select_task(manifest, 1, SPACING, PULSE, config.data.models)
        report["train_patients_fold1"] = len(train)
        # Warm-up (not measured): compile/load the kernels, and decompress every training
        # patient into the volume cache so both measured fits map their volumes.
        for paths in train.values():
            for f in [paths["HR"], *paths["experts"]]:
                store.get(f)
        direct_fit(config, store, dict(list(train.items())[:1]))
        sweep_fit(config, store, dict(list(train.items())[:1]), sweep_grid(2), work / "warm")
        settings = sweep_grid(args.configs)
        direct, sweep = [], []
        for r in range(args.repeats):
            direct.append(direct_fit(config, store, train))
            shutil.rmtree(work / f"sc{r}", ignore_errors=True)
            sweep.append(sweep_fit(config, store, train, settings, work / f"sc{r}"))
            log(f"repeat {r}: direct fit {direct[-1]:.1f} s; sweep of {len(settings)}: "
                f"{sweep[-1][0]:.1f} s (statistics {sweep[-1][1]:.1f} s, solves "
                f"{sweep[-1][2]:.1f} s)")
        report["direct_fit_s"] = direct
        report["sweep_fit_s"] = [s[0] for s in sweep]
        report["sweep_statistics_s"] = [s[1] for s in sweep]
        report["sweep_solves_s"] = [s[2] for s in sweep]
        report["sweep_over_direct_median"] = statistics.median(
            s[0] / d for s, d in zip(sweep, direct, strict=True))
        save()
        md += [
            f"| direct fit of fold 1 ({len(train)} patients, {args.shape}; fused pass + QP, "
            f"published settings) | {statistics.median(direct):.1f} | 1 |",
            f"| sweep of {len(settings)} settings over the same patients (one decomposed pass "
            f"+ {len(settings)} QPs) | {statistics.median(report['sweep_fit_s']):.1f} | "
            f"{report['sweep_over_direct_median']:.2f} |",
        ]
    if "kfold" in args.parts:
        kcfg = cohort_of(args.kfold_shape or args.shape)
        report["kfold_shape"] = list(args.kfold_shape or args.shape)
        # Unmeasured: fill the volume cache with this cohort (both runs then map, not decode).
        kfold_train(kcfg, work / "kwarm", cache, set(range(1, args.kfolds + 1)))
        one, all_ = [], []
        for r in range(max(1, args.repeats)):
            one.append(kfold_train(kcfg, work / "o1", cache, {1}))
            all_.append(kfold_train(kcfg, work / "ok", cache, set(range(1, args.kfolds + 1))))
            log(f"repeat {r}: fit of fold 1 {one[-1]:.1f} s; of all {args.kfolds} folds "
                f"{all_[-1]:.1f} s")
        report["train_fold1_fit_s"] = one
        report["train_allfolds_fit_s"] = all_
        report["kfold_over_one_median"] = statistics.median(
            a / o for a, o in zip(all_, one, strict=True))
        save()
        md += [
            f"| train fit, fold 1 (cohort {report['kfold_shape']}, {args.patients} patients) | "
            f"{statistics.median(one):.1f} | 1 |",
            f"| train fit, all {args.kfolds} folds | {statistics.median(all_):.1f} | "
            f"{report['kfold_over_one_median']:.2f} |",
        ]
    if "gain" in args.parts:
        gcfg = cohort_of(args.gain_shape or args.shape)
        gconfig = load_config(gcfg)
        grid_path = args.gain_grid
        if grid_path is None:
            grid_path = work / "grid.yaml"
            grid_path.write_text(yaml.safe_dump({
                "patch_size": [16, 32], "stride": [8, 16], "lambda_ridge": [0.0],
                "lambda_edge": [0.0, 0.25], "lambda_grad": [0.0, 0.2],
                "fit_region": ["first_block", "window"], "laplacian_tau": [0.0, 0.05],
                "mixing_window": ["hann"]}))
        cands = load_grid(grid_path, gconfig)
        t0 = time.perf_counter()
        res = run_tune(gconfig, cands, work / "tune", cache_dir=cache, no_progress=True)
        report["tune_wall_s"] = time.perf_counter() - t0
        report["tune_timings_s"] = res.timings_s
        report["tune_candidates"] = len(cands)
        report["gain_shape"] = list(args.gain_shape or args.shape)
        own = next(r for r in res.table if r["config_default"])
        report["experts"] = res.experts
        report["best"] = res.table[0]
        report["published_row"] = own
        report["table_md"] = (work / "tune" / "tune_results.md").read_text()
        save()
        md += [
            "",
            f"Tune ({len(cands)} settings, all {args.kfolds} folds, cohort "
            f"{report['gain_shape']}, {args.patients} patients): wall "
            f"{report['tune_wall_s']:.0f} s; best gain {res.table[0]['gain_psnr']:+.4f} dB "
            f"PSNR over the best expert {res.experts['_best']['name']} vs the published "
            f"settings' {own['gain_psnr']:+.4f} dB (rank {own['rank']} of {len(cands)}).",
            "",
            report["table_md"],
        ]
    report["loadavg_end"] = os.getloadavg()
    save()
    if {"sweep", "kfold"} & set(args.parts):
        md += [
            "",
                "Ratios are medians of per-repeat ratios (both runs of a repeat back to back). "
            "Direct and sweep fits are wall seconds on a warm volume cache; the sweep starts "
            "from an empty statistics cache. Train fit is the engine's fit-stage seconds "
            "(load + statistics + solve + smoothing, summed over its pool threads; evaluation "
            "excluded), each run from an empty statistics cache.",
        ]
    md += ["", f"Command: `python scripts/profile_tune.py {' '.join(argv or sys.argv[1:])}`"]
    base.with_suffix(".md").write_text("\n".join(md) + "\n")
    log(f"wrote {base}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
