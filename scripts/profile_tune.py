#!/usr/bin/env python
"""What ``pacs-numba tune`` costs, measured on whole processes, against ``pacs-numba train``.

One generated cohort (``make_cohort``: default 10 patients of 200x230x190, 4 experts, K=5
folds, one spacing and one pulse) whose config holds the published config's settings
(MarioPasc/PaCS-SR ``configs/config.yaml``: patch 32, stride 16, hann, simplex,
lambda_ridge 1e-4, laplacian_tau 0.05, lambda_edge 0.25, edge_power 2, lambda_grad 0.2,
sobel, SSIM axial, evaluate_train, weight volumes and blends saved).  Every measured run is
one ``pacs-numba`` process, timed whole (interpreter start, imports and the kernel cache
load included):

* ``tune-1``: ``pacs-numba tune`` with a grid of the published setting alone: statistics,
  fit, held-out blending and scoring of all K folds;
* ``tune-grid``: ``pacs-numba tune`` with a realistic grid (default 16 settings: patch 16/32 x
  stride 8/16 x lambda_edge 0/0.25 x lambda_grad 0/0.2, see :data:`GRID`);
* ``train-published``: ``pacs-numba train`` of all K folds with the published config (what
  one setting costs the normal way: train and test patients evaluated, outputs written);
* ``train-lean``: the same with ``evaluate_train: false`` and every optional output off,
  the closest equivalent of one tune setting.

Each kind runs "cold" (a new, empty ``--cache-dir``: volumes decompressed, statistics
computed; the OS page cache holds the ``.nii.gz`` inputs, read by the un-measured warm-up)
and then "warm" (the same cache directory, so volumes are memory-mapped and the statistics
read back), each time into a new results folder (``tune`` would otherwise resume).  Per run:
wall seconds, CPU seconds of the process tree (user + system from ``wait4``), peak RSS of
the tree (``tests/rss_sampler.py`` every 25 ms, and ``ru_maxrss``), the 1-minute load
average before and after, tune's own stage split (its log line "tune: seconds: ...") and,
from ``tune_results.csv``, the held-out gain over the best single expert of the published
setting and of the grid's best.  Medians with min-max over ``--repeats``.

Writes ``profiling/<date>-tune-<host>.json`` and ``.md`` (``-2``, ``-3`` ... if taken; an
existing profile is never overwritten).

Usage::

    python scripts/profile_tune.py                                  # default, ~1 h on 2 cores
    python scripts/profile_tune.py --shape 64 72 60 --patients 6 --kfolds 3 --repeats 1
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.append(str(ROOT / "tests"))  # the repository's one RSS sampler
from rss_sampler import wait_sampled  # noqa: E402

MIB = 2**20
SAMPLE_INTERVAL_S = 0.025
SPACING, PULSE = "3mm", "t1c"
EXPERTS = ("BSPLINE", "LINEAR", "NEAREST", "SHARPEN", "SMOOTH")
#: The published config's fit and output settings (MarioPasc/PaCS-SR configs/config.yaml).
PUBLISHED = {"patch_size": 32, "stride": 16, "mixing_window": "hann", "simplex": True,
             "lambda_ridge": 1e-4, "laplacian_tau": 0.05, "lambda_edge": 0.25,
             "edge_power": 2.0, "lambda_grad": 0.2, "grad_operator": "sobel",
             "ssim_axis": "axial", "evaluate_train": True, "save_weight_volumes": True,
             "save_blends": True}
#: ``train-lean``: no evaluation of the training patients, no optional output.
LEAN = {"evaluate_train": False, "save_weight_volumes": False, "save_blends": False,
        "save_weight_maps": False}
#: The realistic grid: 16 settings (the published one among them).  A grid is a cartesian
#: product, so "stride = patch / 2" cannot be said alone: patch 16/32 x stride 8/16 gives the
#: two half-patch strides and also 16/16 (no overlap) and 32/8 (the dearest blend, 64 tiles
#: over each voxel); laplacian_tau stays 0.05 (it costs only a smoothing step per fit).
GRID = {"patch_size": [16, 32], "stride": [8, 16], "lambda_edge": [0.0, 0.25],
        "lambda_grad": [0.0, 0.2]}
#: In the order they run within a repeat (the dearest last).
KINDS = ("tune-1", "train-lean", "train-published", "tune-grid")
STAGE_RE = re.compile(r"tune: seconds: statistics ([\d.]+), fits ([\d.]+), held-out blends "
                      r"and scores ([\d.]+), total ([\d.]+)")
UNITS_RE = re.compile(r"tune: (\d+) candidates x (\d+) folds")
GAIN_LABEL = ("held-out gain over the best single expert: mean PSNR (dB) and SSIM of the "
              "setting minus those of the best single expert, both under tune's HR-free "
              "protocol (statistics and brain mask from the experts), over every fold's "
              "held-out patients (tune_results.csv)")


# ------------------------------------------------------------------------------- the cohort
def make_profile_cohort(root: Path, shape: tuple[int, int, int], patients: int,
                        experts: int, kfolds: int, seed: int) -> dict[str, str]:
    """Generate the cohort and its two configs (published, lean); write the manifest."""
    import dataclasses

    from pacs_numba.config import dump_config, load_config
    from pacs_numba.store.cohort import make_cohort
    from pacs_numba.store.manifest import build_manifest, write_manifest

    cfg_path = make_cohort(root, patients=patients, shape=shape, spacings=(SPACING,),
                           pulses=(PULSE,), models=EXPERTS[:experts], seed=seed,
                           kfolds=kfolds, patch_size=32, stride=16)
    cfg = load_config(cfg_path)
    common = {"log_to_file": False, "disable_tqdm": True}
    out = {}
    for name, extra in (("published", {}), ("lean", LEAN)):
        pacs = dataclasses.replace(cfg.pacs_sr, **{**PUBLISHED, **common, **extra})
        path = root / f"config-{name}.yaml"
        dump_config(dataclasses.replace(cfg, pacs_sr=pacs), path)
        out[name] = str(path)
    write_manifest(build_manifest(cfg.data), cfg.data.out)
    return out


def _cohort_child(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    made = make_profile_cohort(Path(spec["root"]), tuple(spec["shape"]), spec["patients"],
                               spec["experts"], spec["kfolds"], spec["seed"])
    Path(spec["result"]).write_text(json.dumps(made))
    return 0


# ------------------------------------------------------------------------- measured processes
def pacs_numba_command() -> list[str]:
    """The ``pacs-numba`` console script next to this interpreter, else ``-m pacs_numba``."""
    exe = Path(sys.executable).parent / "pacs-numba"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "pacs_numba"]


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=5)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def measure(cmd: list[str], log_path: Path) -> dict[str, Any]:
    """Run ``cmd`` in its own session; wall, CPU and RSS of its process tree, and its log."""
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log_path, "wb") as log:
        # INFO whatever the caller's PACS_LOG_LEVEL: tune's stage split is an INFO line.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True,
                                env={**os.environ, "PACS_LOG_LEVEL": "INFO"})
        status, ru, sampler = wait_sampled(proc, SAMPLE_INTERVAL_S, _kill_group)
    wall = time.perf_counter() - t0
    proc.returncode = rc = os.waitstatus_to_exitcode(status)
    text = log_path.read_text(errors="replace")
    maxrss = int(ru.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)
    return {"cmd": shlex.join(cmd), "rc": rc, "wall_s": wall,
            "cpu_s": ru.ru_utime + ru.ru_stime, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
            "peak_rss_bytes": max(sampler.peak_bytes, maxrss),
            "peak_rss_sampled_bytes": sampler.peak_bytes, "ru_maxrss_bytes": maxrss,
            "peak_rss_anon_bytes": sampler.peak_anon_bytes,
            "loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0],
            "compiled": "compiling kernels" in text, "log_tail": text[-1500:] if rc else ""}


def tune_stages(log_text: str) -> dict[str, float] | None:
    """Tune's own stage split (seconds) from its log, or None if it did not log one."""
    m = STAGE_RE.search(log_text)
    if m is None:
        return None
    return dict(zip(("statistics", "fit", "blend_metrics", "total"), map(float, m.groups()),
                    strict=True))


def tune_gains(out: Path) -> dict[str, Any]:
    """The published setting's row and the best row of ``tune_results.csv``."""
    with open(out / "tune_results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    md = (out / "tune_results.md").read_text()
    best_expert = re.search(r"best single expert under the same protocol \(highest mean "
                            r"PSNR\), \*\*(.+?)\*\*", md)

    def row(r: dict[str, str]) -> dict[str, Any]:
        keys = ("patch_size", "stride", "lambda_ridge", "lambda_edge", "lambda_grad",
                "laplacian_tau", "fit_region", "mixing_window")
        return {"rank": int(r["rank"]), "setting": {k: r[k] for k in keys},
                "psnr": float(r["psnr"]), "ssim": float(r["ssim"]),
                "gain_psnr_db": float(r["gain_psnr"]), "gain_ssim": float(r["gain_ssim"]),
                "n_eval": int(r["n_eval"])}

    own = next(r for r in rows if r["config_default"] == "True")
    return {"label": GAIN_LABEL, "settings": len(rows),
            "best_expert": best_expert.group(1) if best_expert else None,
            "published": row(own), "best": row(rows[0])}


# ------------------------------------------------------------------------------- summaries
def _stat(values: list[float]) -> dict[str, float] | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def summarise(runs: list[dict]) -> dict[str, dict]:
    """Per ``kind/cache``: medians and min-max of the runs' figures."""
    out: dict[str, dict] = {}
    for key in dict.fromkeys(f"{r['kind']}/{r['cache']}" for r in runs):
        rs = [r for r in runs if f"{r['kind']}/{r['cache']}" == key]
        s = {k: _stat([r.get(k) for r in rs]) for k in (
            "wall_s", "cpu_s", "peak_rss_bytes", "peak_rss_anon_bytes", "loadavg_1min_before")}
        if rs[0].get("stages"):
            s["stages_s"] = {k: _stat([r["stages"][k] for r in rs if r.get("stages")])
                             for k in rs[0]["stages"]}
        out[key] = s
    return out


def _med(summary: dict, key: str, what: str = "cpu_s") -> float | None:
    s = summary.get(key, {}).get(what)
    return None if s is None else s["median"]


def ratios(summary: dict, n_grid: int | None) -> dict[str, Any]:
    """CPU-second ratios between medians (a ratio of medians, not a median of ratios)."""
    out: dict[str, Any] = {}
    for cache in ("cold", "warm"):
        one = _med(summary, f"tune-1/{cache}")
        grid = _med(summary, f"tune-grid/{cache}")
        pub = _med(summary, f"train-published/{cache}")
        lean = _med(summary, f"train-lean/{cache}")
        r: dict[str, float | None] = {}
        if one and pub:
            r["tune_1_over_train_published"] = one / pub
        if one and lean:
            r["tune_1_over_train_lean"] = one / lean
        if one and grid:
            r["tune_grid_over_tune_1"] = grid / one
            if n_grid and n_grid > 1:
                r["cpu_s_per_extra_setting"] = (grid - one) / (n_grid - 1)
        out[cache] = r
    return out


# ---------------------------------------------------------------------------------- report
def _fmt(s: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if s is None:
        return "-"
    med, lo, hi = (s[k] / scale for k in ("median", "min", "max"))
    if s["n"] == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def markdown(doc: dict) -> str:
    p, env = doc["parameters"], doc["environment"]
    shape = "x".join(map(str, p["shape"]))
    what = {"tune-1": "`tune`, grid = the published setting alone",
            "tune-grid": f"`tune`, {p['grid_settings']}-setting grid",
            "train-published": "`train` all folds, published config",
            "train-lean": "`train` all folds, evaluate_train false, outputs off"}
    lines = [
        f"# What `pacs-numba tune` costs ({doc['date']}, {env['host']})",
        "",
        "```", doc["command"], "```", "",
        f"Cohort: {p['patients']} generated patients of {shape} voxels, {p['experts']} "
        f"experts, K={p['kfolds']} folds, {SPACING} {PULSE}; the published config's settings "
        "(patch 32, stride 16, hann, simplex, lambda_ridge 1e-4, laplacian_tau 0.05, "
        "lambda_edge 0.25, edge_power 2, lambda_grad 0.2, sobel, SSIM axial, evaluate_train, "
        f"weight volumes and blends saved). {env['cpu_model']}, {env['cpus']} CPUs shared with "
        f"other jobs; pacs_numba git {str(env['git_commit'])[:10]}. Every run is a whole "
        "`pacs-numba` process: medians (min-max) over "
        f"{p['repeats']} repeat(s) ({p['grid_repeats']} for the grid). CPU s = user + system "
        "seconds of the process tree (wait4); peak RSS = the tree's, sampled every "
        f"{int(SAMPLE_INTERVAL_S * 1000)} ms, or ru_maxrss if larger. Cold = a new, empty "
        "cache directory (volumes decompressed, statistics computed); warm = the same "
        "directory right after. Load = 1-minute load average before each run. RSS includes the "
        "touched pages of the memory-mapped volume cache (file-backed, reclaimable); "
        "'anonymous' is the sampled peak of RssAnon.",
        "",
        "| run | cache | CPU s | wall s | peak RSS MiB | of it anonymous MiB | load |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for key, s in doc["summary"].items():
        kind, cache = key.split("/")
        loads = ", ".join(f"{r['loadavg_1min_before']:.1f}" for r in doc["runs"]
                          if f"{r['kind']}/{r['cache']}" == key)
        lines.append(f"| {what[kind]} | {cache} | {_fmt(s['cpu_s'])} | {_fmt(s['wall_s'])} | "
                     f"{_fmt(s['peak_rss_bytes'], MIB, 0)} | "
                     f"{_fmt(s.get('peak_rss_anon_bytes'), MIB, 0)} | {loads} |")
    names = {"tune_1_over_train_published": "tune (published setting) / train (published)",
             "tune_1_over_train_lean": "tune (published setting) / train (lean)",
             "tune_grid_over_tune_1": "tune (grid) / tune (published setting)",
             "cpu_s_per_extra_setting": "CPU s per extra setting of the grid"}
    if any(doc["ratios"].values()):
        lines += ["", "Ratios of median CPU seconds:", ""]
    for cache, r in doc["ratios"].items():
        if r:
            lines.append(f"- {cache}: " + "; ".join(
                f"{names[k]} {v:.2f}" for k, v in r.items()))
    staged = {k: s["stages_s"] for k, s in doc["summary"].items() if s.get("stages_s")}
    if staged:
        lines += ["", "Tune's own stage split (its log line 'tune: seconds: ...'; wall seconds "
                      "inside the process, medians (min-max)). Statistics = reading or computing "
                      "each training patient's cached statistics and summing them per fold; "
                      "fits = the QPs and smoothing; held-out blends and scores = each held-out "
                      "patient's experts loaded once and scored alone, then one blend and its "
                      "metrics per setting and fold:",
                  "", "| run | cache | statistics | fits | held-out blends and scores | "
                      "total in run_tune |", "|---|---|---:|---:|---:|---:|"]
        for key, st in staged.items():
            kind, cache = key.split("/")
            lines.append(f"| {what[kind]} | {cache} | " + " | ".join(
                _fmt(st.get(k), digits=2) for k in ("statistics", "fit", "blend_metrics",
                                                    "total")) + " |")
    else:
        lines += ["", "Tune logged no stage split (no 'tune: seconds:' line)."]
    g = doc.get("gains") or {}
    if g:
        lines += ["", f"Gains ({GAIN_LABEL}; best expert "
                      f"{g.get('best_expert') or '?'}):", ""]
        for name, key in (("published setting", "published"), ("grid's best", "best")):
            if key in g:
                r = g[key]
                st = ", ".join(f"{k} {v}" for k, v in r["setting"].items())
                lines.append(f"- {name} ({st}; rank {r['rank']} of {g['settings']}): "
                             f"{r['gain_psnr_db']:+.4f} dB PSNR, {r['gain_ssim']:+.4f} SSIM "
                             f"over {r['n_eval']} held-out patient evaluations")
        alone = g.get("published_alone")
        if alone:
            same = (alone["gain_psnr_db"], alone["gain_ssim"]) == (
                g["published"]["gain_psnr_db"], g["published"]["gain_ssim"])
            lines.append(f"- published setting tuned alone (the 1-setting grid): "
                         f"{alone['gain_psnr_db']:+.4f} dB PSNR, {alone['gain_ssim']:+.4f} SSIM"
                         + (" (the same as in the grid)" if same else
                            " (**differs** from its row in the grid)"))
    if doc["notes"]:
        lines += ["", "Notes: " + " ".join(doc["notes"])]
    return "\n".join(lines) + "\n"


def result_paths(results: Path, host: str, date: str) -> tuple[Path, Path]:
    """``<date>-tune-<host>.json/.md``, with ``-2``, ``-3`` ... where taken."""
    stem, k = f"{date}-tune-{host.split('.')[0]}", 1
    while True:
        name = stem if k == 1 else f"{stem}-{k}"
        pair = results / f"{name}.json", results / f"{name}.md"
        if not any(x.exists() for x in pair):
            return pair
        k += 1


def environment() -> dict[str, Any]:
    import importlib.metadata as md

    model = platform.processor() or "unknown"
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in
                     Path("/proc/cpuinfo").read_text().splitlines()
                     if ln.lower().startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or None
    versions = {}
    for name in ("pacs-numba", "numba", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"host": socket.gethostname(), "cpus": os.cpu_count(), "cpu_model": model,
            "python": platform.python_version(), "versions": versions, "git_commit": commit,
            "numba_cache_dir": os.environ.get("NUMBA_CACHE_DIR"),
            "numba_num_threads": os.environ.get("NUMBA_NUM_THREADS")}


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(200, 230, 190),
                    metavar=("Z", "Y", "X"))
    ap.add_argument("--patients", type=int, default=10)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--kfolds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--repeats", type=int, default=3,
                    help="repeats of tune-1 and the trains (default 3)")
    ap.add_argument("--grid-repeats", type=int, default=None,
                    help="repeats of the grid (default --repeats)")
    ap.add_argument("--grid", type=Path, default=None,
                    help="grid YAML of tune-grid (default: the 16-setting grid above)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the un-measured warm-up (the kernels must be compiled already)")
    ap.add_argument("--work", type=Path, default=None,
                    help="work folder (default: a new temporary one, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--results", type=Path, default=ROOT / "profiling")
    ap.add_argument("--_cohort", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args._cohort:
        return _cohort_child(args._cohort)
    if min(args.repeats, args.grid_repeats or 1, args.patients, args.kfolds) < 1:
        raise SystemExit("--repeats, --grid-repeats, --patients and --kfolds must be >= 1")
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(128 + s))  # runs the cleanup below
    args.results.mkdir(parents=True, exist_ok=True)
    # Claimed now (created empty, exclusively) and rewritten after every run, so a profile
    # stopped half-way keeps what it measured; a profile made earlier is never touched.
    paths = result_paths(args.results, socket.gethostname(), dt.date.today().isoformat())
    for path in paths:
        open(path, "x").close()
    work = (args.work or Path(tempfile.mkdtemp(prefix="pacs_tune_prof_"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        doc = profile(args, argv, work, paths)
    finally:
        for path in paths:  # nothing measured: give the names back
            if path.stat().st_size == 0:
                path.unlink()
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        elif args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {paths[0]} and {paths[1]}", file=sys.stderr)
    return 0 if all(r["rc"] == 0 for r in doc["runs"]) else 1


def save(doc: dict, paths: tuple[Path, Path]) -> None:
    """Rewrite this profile's own JSON and markdown (atomically: temporary file + rename)."""
    for path, text in zip(paths, (json.dumps(doc, indent=1) + "\n", markdown(doc)),
                          strict=True):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


def profile(args: argparse.Namespace, argv: list[str], work: Path,
            paths: tuple[Path, Path]) -> dict[str, Any]:
    say = lambda *a: print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)  # noqa: E731
    started = dt.datetime.now().astimezone()
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    # The cohort is made in a child: the parent stays small (a child's ru_maxrss can start
    # from its parent's RSS).
    spec = {"root": str(work / "cohort"), "shape": list(args.shape), "patients": args.patients,
            "experts": args.experts, "kfolds": args.kfolds, "seed": args.seed,
            "result": str(logs / "cohort.json")}
    (logs / "cohort.spec.json").write_text(json.dumps(spec))
    t0 = time.perf_counter()
    made = measure([sys.executable, str(Path(__file__).resolve()), "--_cohort",
                    str(logs / "cohort.spec.json")], logs / "cohort.log")
    if made["rc"] != 0:
        raise SystemExit(f"making the cohort failed:\n{made['log_tail']}")
    configs = json.loads(Path(spec["result"]).read_text())
    say(f"cohort of {args.patients} x {args.shape}: {time.perf_counter() - t0:.0f} s")
    import yaml

    grid1 = work / "grid-published.yaml"
    grid1.write_text(yaml.safe_dump({k: [PUBLISHED[k]] for k in
                                     ("patch_size", "stride", "lambda_edge", "lambda_grad",
                                      "laplacian_tau", "lambda_ridge", "mixing_window")}))
    grid_path = args.grid
    if grid_path is None:
        grid_path = work / "grid.yaml"
        grid_path.write_text(yaml.safe_dump(GRID))
    pn = pacs_numba_command()

    def command(kind: str, cache: Path, out: Path, *, fold1: bool = False) -> list[str]:
        if kind.startswith("tune"):
            grid = grid1 if kind == "tune-1" else grid_path
            return [*pn, "tune", "--config", configs["published"], "--grid", str(grid),
                    "--out", str(out), "--cache-dir", str(cache), "--no-progress",
                    *(["--folds", "1"] if fold1 else [])]
        cfg = configs["published" if kind == "train-published" else "lean"]
        return [*pn, "train", "--config", cfg, "--out-root", str(out), "--cache-dir",
                str(cache), "--no-progress", "--force", "--no-expert-table",
                *(["--fold", "1"] if fold1 else [])]

    # Un-measured warm-up: kernels compiled or loaded (numeric values of the settings do not
    # change the compiled specialisations), every input in the OS page cache.
    if not args.no_warmup:
        for kind in ("tune-1", "train-published"):
            if kind.split("-")[0] in {k.split("-")[0] for k in args.kinds}:
                say(f"warm-up (not measured): {kind}, fold 1")
                r = measure(command(kind, work / "cache-warmup", work / "out-warmup",
                                    fold1=True), logs / f"warmup-{kind}.log")
                if r["rc"] != 0:
                    raise SystemExit(f"warm-up {kind} failed:\n{r['log_tail']}")
                shutil.rmtree(work / "out-warmup", ignore_errors=True)
        shutil.rmtree(work / "cache-warmup", ignore_errors=True)

    runs: list[dict] = []
    grid_settings = None
    gains: dict[str, Any] = {}

    def document() -> dict[str, Any]:
        summary = summarise(runs)
        notes = []
        if any(r["compiled"] for r in runs):
            notes.append("Some measured runs compiled kernels (their log says 'compiling "
                         "kernels'); those figures include compilation.")
        return {
            "date": started.date().isoformat(), "started": started.isoformat(),
            "finished": dt.datetime.now().astimezone().isoformat(),
            "command": shlex.join(["python", "scripts/profile_tune.py", *argv]),
            "parameters": {"shape": list(args.shape), "patients": args.patients,
                           "experts": args.experts, "kfolds": args.kfolds, "seed": args.seed,
                           "repeats": args.repeats,
                           "grid_repeats": args.grid_repeats or args.repeats,
                           "grid": yaml.safe_load(grid_path.read_text()),
                           "grid_settings": grid_settings, "published": PUBLISHED,
                           "lean": LEAN, "kinds": args.kinds, "warmup": not args.no_warmup},
            "environment": environment(),
            "summary": summary, "ratios": ratios(summary, grid_settings),
            "gains": merge_gains(gains), "notes": notes, "runs": runs,
        }
    for rep in range(max(args.repeats, args.grid_repeats or 0)):
        for kind in args.kinds:
            n_rep = (args.grid_repeats or args.repeats) if kind == "tune-grid" else args.repeats
            if rep >= n_rep:
                continue
            cache = work / "cache" / f"{kind}-r{rep + 1}"
            for state in ("cold", "warm"):
                label = f"{kind}-{state}-r{rep + 1}"
                out = work / "out" / label
                say(f"{label}: starting (load {os.getloadavg()[0]:.1f})")
                r = measure(command(kind, cache, out), logs / f"{label}.log")
                r.update(kind=kind, cache=state, repeat=rep + 1, label=label)
                text = (logs / f"{label}.log").read_text(errors="replace")
                if kind.startswith("tune") and r["rc"] == 0:
                    r["stages"] = tune_stages(text)
                    m = UNITS_RE.search(text)
                    r["settings"] = int(m.group(1)) if m else None
                    r["gains"] = tune_gains(out)
                    if kind == "tune-grid":
                        grid_settings = r["settings"]
                    gains.setdefault(kind, r["gains"])
                runs.append(r)
                say(f"{label}: rc {r['rc']}, CPU {r['cpu_s']:.1f} s, wall {r['wall_s']:.1f} s, "
                    f"peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB")
                if r["rc"] != 0:
                    say(r["log_tail"])
                shutil.rmtree(out, ignore_errors=True)
                save(document(), paths)
            shutil.rmtree(cache, ignore_errors=True)
    return document()


def merge_gains(gains: dict[str, Any]) -> dict[str, Any]:
    """The grid's best and the published setting (from the grid run where there is one)."""
    if not gains:
        return {}
    src = gains.get("tune-grid") or gains["tune-1"]
    out = {"label": GAIN_LABEL, "best_expert": src["best_expert"],
           "settings": src["settings"], "best": src["best"], "published": src["published"]}
    if "tune-1" in gains:
        out["published_alone"] = gains["tune-1"]["published"]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
