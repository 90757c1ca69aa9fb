#!/usr/bin/env python
"""Benchmark pacs_numba against the literal NumPy/loky baseline on one generated cohort.

What it does, in one invocation:

1. generates a phantom cohort (``make_cohort``: train + test patients, one spacing, one
   pulse, M experts) at a realistic size (default 200 x 230 x 190 voxels), sets the
   published settings this benchmark is about (patch 32, stride 16, lambda_grad 0.2,
   lambda_edge 0.25, hann window, laplacian_tau 0.05, blends and weight volumes saved) and
   builds a manifest whose fold 1 has exactly the requested train / test patients;
2. runs one warm-up train that is also the *first-ever run*: an empty Numba compile cache
   (``<work>/numba-cache``, then used by every later run) and an empty volume cache, so it
   compiles the kernels the run needs and decompresses every input; its whole process time
   (interpreter, imports, compile, train) is the first-ever figure.  With
   ``--no-first-ever`` it uses the environment's compile cache and is not reported.  Either
   way the OS page cache then holds the ``.nii.gz`` inputs, so every measured run starts
   from the same state;
3. for every pool width x Numba threads with ``width * threads <= CPUs`` and every repeat:
   a train (fit + evaluate) on an EMPTY volume cache ("cold": the inputs are decompressed
   into the cache), then one on the cache that run filled ("warm": the inputs are
   memory-mapped);
4. runs ``scripts/literal_baseline.py`` (the published algorithm, literally: a boolean
   mask ``labels == r`` per tile over the whole volume, float32 tile products, materialised
   normalised and gradient volumes, the fit in joblib loky workers, SLSQP with a
   finite-difference inequality constraint, the evaluation patient by patient in the parent)
   on the same cohort and fold;
5. writes ``profiling/<date>-<host>-<HHMM>.json`` (every run, medians, ratios, environment) and
   the ``.md`` next to it (a short table and the command); an existing profile is never
   overwritten (a counter is added, an explicit ``--name`` that exists is refused).

Before the first run it prints the planned runs with a rough time estimate, and one line per
run as it goes ("[3/20] ...").  Ctrl-C, SIGTERM and SIGHUP stop the running child together with
its loky workers (each child leads its own process group, which the child's watchdog thread
also kills if the parent dies without stopping it, e.g. by SIGKILL).

Every measured run is a fresh ``python scripts/profile.py --_child SPEC`` process, so its
RSS includes the interpreter, the imports and the Numba cache load of a real run.  The
parent samples the RSS of the child's whole process tree (psutil, every 25 ms; RssAnon
from /proc where readable), and the child reports ``ru_maxrss`` and per-stage wall times
(``TaskResult.timings``: seconds per stage summed over the pool's threads).

Usage::

    python scripts/profile.py                       # the realistic default (~30 min on 2 cores)
    python scripts/profile.py --quick               # a small check of everything, < 3 min
    python scripts/profile.py --dry-run             # only the plan and the estimate
    python scripts/profile.py --shape 96 112 96 --train 4 --test 2 --repeats 1
    python scripts/profile.py --no-baseline --widths 1 --keep --out /tmp/prof

Only pacs_numba's public API is used (``make_cohort``, ``load_config``/``dump_config``,
``build_manifest``/``write_manifest``, ``Engine``/``RunOptions``/``Task``, ``detect_limits``,
``cgroup_memory_usage``).

Peak RSS of a run is the larger of the sampled peak of its process tree and, for pacs_numba
(one process), its ``ru_maxrss`` (the kernel's exact high-water mark, which also catches
spikes shorter than the sampling interval).  For the baseline it is the larger of our
samples and its own (parent + loky workers summed at one instant); the sum of the
processes' ``ru_maxrss`` would overstate it (their peaks are at different times).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
# ``python scripts/profile.py`` puts scripts/ first on sys.path, where this file would shadow
# the standard library's ``profile`` module (cProfile imports it).  Take it off; the
# baseline child appends it at the end to import literal_baseline.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != SCRIPTS]
sys.path.append(str(ROOT / "tests"))  # the repository's one RSS sampler
from rss_sampler import wait_sampled  # noqa: E402

log = logging.getLogger("profile")

STAGES = ("load", "statistics", "solve", "smoothing", "blend", "metrics", "writes")
MIB = 2**20
SAMPLE_INTERVAL_S = 0.025
# Targets (issue 18, "fast again"; the per-worker one from the memory issue), measured on
# 2 cores at the default size against the baseline on the same machine in the same run.
TARGET_FIRST_EVER_SPEEDUP = 25.0
TARGET_WARM_SPEEDUP = 100.0
TARGET_COLD_SPEEDUP = 60.0
TARGET_PEAK_RSS_RATIO = 0.25
TARGET_PER_WORKER_RATIO = 0.3
EXPERT_NAMES = ("BSPLINE", "LINEAR", "NEAREST", "SHARPEN", "SMOOTH")
SPACING, PULSE, FOLD = "3mm", "t1c", 1
DEFAULT_SHAPE = (200, 230, 190)
WORK_DIRS = ("src", "cohort", "cache", "cache-warmup", "numba-cache", "out", "logs")


# ----------------------------------------------------------------------------------------------
# Child processes
# ----------------------------------------------------------------------------------------------
def _child(spec_path: str) -> int:
    """One measured run; reads a JSON spec, writes a JSON result (see ``_run_child``)."""
    t_start = time.perf_counter()
    # This child leads its own process group (start_new_session), loky workers included.  The
    # parent stops it by signalling the whole group (SIGTERM keeps its default action here, so
    # it acts at once even while the main thread waits on a lock).  If the parent dies without
    # doing so (SIGKILL, OOM kill), the watchdog below takes the group down.
    _watch_parent(os.getppid())
    spec = json.loads(Path(spec_path).read_text())
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if spec["kind"] == "cohort":
        cfg = make_benchmark_cohort(Path(spec["root"]), tuple(spec["shape"]), spec["train"],
                                    spec["test"], spec["experts"], spec["seed"])
        out = {"kind": "cohort", "config": str(cfg), "wall_s": time.perf_counter() - t_start,
               "floors": measure_floors(cfg)}
    elif spec["kind"] == "engine":
        out = _child_engine(spec, t_start)
    else:
        out = _child_baseline(spec, t_start)
    out["ru_maxrss_self_bytes"] = _ru_maxrss(resource.RUSAGE_SELF)
    out["ru_maxrss_children_bytes"] = _ru_maxrss(resource.RUSAGE_CHILDREN)
    out["process_wall_s"] = time.perf_counter() - t_start
    Path(spec["result"]).write_text(json.dumps(out, indent=1))
    return 0


def _ru_maxrss(who: int) -> int:
    peak = resource.getrusage(who).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _rss_now() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def _child_engine(spec: dict, t_start: float) -> dict:
    import numba

    from pacs_numba.config import load_config
    from pacs_numba.resources.limits import Figure, detect_limits
    from pacs_numba.runs.engine import Engine, RunOptions, Task

    t_imported = time.perf_counter()
    width, threads = int(spec["width"]), int(spec["threads"])
    cfg = load_config(spec["config"])
    limits = detect_limits()
    # The pool gets width x threads CPUs: threads = CPUs // width (algorithm B4).
    limits = dataclasses.replace(
        limits, cpus=Figure(width * threads, f"profile.py --_child {width}x{threads}"))
    numba.set_num_threads(width * threads)  # the main thread's kernels (solve, smoothing)
    opts = RunOptions(cache_dir=Path(spec["cache_dir"]), workers=width, force=True,
                      no_progress=True, out_root=Path(spec["out_root"]))
    engine = Engine(cfg, opts, limits)
    if spec.get("load_kernels"):
        # the first-ever run compiles as `pacs-numba train` does before its first task (in two
        # processes, under the node lock), not lazily inside the stages, which no CLI run does
        from pacs_numba.runs.warmup import load_kernels

        load_kernels("train", cfg.pacs_sr)
    rss_ready = _rss_now()
    pkg = Path(sys.modules["pacs_numba"].__file__).parent
    t0 = time.perf_counter()
    res = engine.train(Task(FOLD, SPACING, PULSE))
    wall = time.perf_counter() - t0
    pool = res.pool
    return {
        "kind": "engine",
        "wall_s": wall,
        "import_s": t_imported - t_start,
        "setup_s": t0 - t_imported,
        "timings_s": {k: float(res.timings.get(k, 0.0)) for k in STAGES},
        # each patient's blend and scoring (test: + each expert alone and the HR-free blend)
        "patient_seconds": res.patient_seconds,
        "pool": None if pool is None else {
            "width": pool.width, "threads": pool.threads, "reason": pool.reason,
            "per_patient_bytes": pool.per_patient_bytes, "baseline_bytes": pool.baseline_bytes,
        },
        "threading_layer": engine.layer,
        "pacs_numba_dir": str(pkg),
        "source_digest": source_digest(pkg),
        "rss_before_run_bytes": rss_ready,
        "metrics": res.metrics,
        "skipped": res.skipped,
    }


def _child_baseline(spec: dict, t_start: float) -> dict:
    sys.path.append(spec["scripts_dir"])  # loky workers inherit sys.path, import it by name
    import literal_baseline as lb

    t_imported = time.perf_counter()
    rss_ready = _rss_now()
    res = lb.run(spec["config"], FOLD, SPACING, PULSE, workers=int(spec["workers"]),
                 out_root=spec["out_root"])
    t = res["timings"]
    pr = res["peak_rss"]
    return {
        "kind": "baseline",
        "wall_s": float(t["total_wall"]),
        "import_s": t_imported - t_start,
        "timings_s": {k: float(v) for k, v in t.items()},
        "workers": res["workers"],
        "literal_baseline_file": lb.__file__,
        "rss_before_run_bytes": rss_ready,
        "baseline_peak_rss": {
            "tree_bytes": pr["tree_bytes"],
            "parent_bytes": pr["parent_bytes"],
            "tree_by_phase_bytes": pr["tree_by_phase_bytes"],
            "worker_sampled_bytes": {str(k): v for k, v in pr["worker_sampled_bytes"].items()},
            "worker_maxrss_bytes": {str(k): v for k, v in pr["worker_maxrss_bytes"].items()},
        },
        "metrics": res["metrics"],
    }


# ----------------------------------------------------------------------------------------------
# The cgroup's view (the process tree is sampled by tests/rss_sampler.py)
# ----------------------------------------------------------------------------------------------
def _cgroup() -> dict | None:
    from pacs_numba.resources.limits import cgroup_memory_usage

    try:
        u = cgroup_memory_usage()
    except Exception:  # noqa: BLE001 - informative only
        return None
    if u is None:
        return None
    return {"current_bytes": u.current_bytes, "peak_bytes": u.peak_bytes, "source": u.source}


def _watch_parent(ppid: int, interval_s: float = 0.5) -> threading.Thread:
    """In a child: a daemon thread that kills the child's process group once ``ppid`` is gone.

    A thread polling ``os.getppid()`` (which changes when the parent dies and the child is
    re-parented) works whatever killed the parent and whatever the main thread is doing; it
    reaches the loky workers too, which a parent-death signal to the child alone would not.
    """
    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != ppid:
                os.killpg(os.getpgid(0), signal.SIGKILL)

    t = threading.Thread(target=watch, name="parent-watch", daemon=True)
    t.start()
    return t


def _stop_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the child's process group, SIGKILL it after ``grace_s``; reap the child."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


class Stopped(Exception):
    """The parent got SIGTERM or SIGHUP: stop the running child and exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def _raise_stopped(signum: int, _frame: Any) -> None:
    raise Stopped(signum)


def _run_child(spec: dict, work: Path, label: str, src: Path | None = None,
               numba_cache: Path | None = None) -> dict:
    """Start a child on ``spec``, sample its tree, wait; its result merged with our samples.

    With ``src`` the child imports pacs_numba from that snapshot (first on PYTHONPATH); with
    ``numba_cache`` it compiles into, and loads from, that Numba cache folder.
    """
    env = dict(os.environ)
    if numba_cache is not None:
        env["NUMBA_CACHE_DIR"] = str(numba_cache)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [env.get("PYTHONPATH")])])
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(logs / f"{label}.result.json")}
    spec_path = logs / f"{label}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    cg_before = _cgroup()
    load_before = os.getloadavg()[0]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", str(spec_path)]
    t0 = time.perf_counter()
    with open(logs / f"{label}.stderr", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, cwd=str(work), env=env,
                                start_new_session=True)
        # Ctrl-C, SIGTERM/SIGHUP (Stopped) or an error while waiting: the child's own session
        # holds only what we started (the child and its loky workers), _stop_group ends it.
        status, ru, sampler = wait_sampled(proc, SAMPLE_INTERVAL_S, _stop_group)
        proc.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (logs / f"{label}.stderr").read_text(errors="replace")[-4000:]
        raise RuntimeError(f"child {label} exited with {proc.returncode}:\n{tail}")
    out = json.loads(Path(spec["result"]).read_text())
    if out["kind"] == "engine":
        out["peak_rss_bytes"] = max(sampler.peak_bytes, out["ru_maxrss_self_bytes"])
    elif out["kind"] == "baseline":
        bp = out["baseline_peak_rss"]
        out["peak_rss_bytes"] = max(sampler.peak_bytes, bp["tree_bytes"])
        # Each loky worker's peak: the larger of the two samplers' (ru_maxrss of a worker
        # starts at the RSS of the process that forked it, so it is not used).
        bp["worker_peak_bytes"] = {
            k: max(v, sampler.peak_by_pid.get(int(k), 0))
            for k, v in bp["worker_sampled_bytes"].items() if int(k) != proc.pid}
    out.update({
        "label": label,
        "process_elapsed_s": elapsed,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "ru_maxrss_wait4_bytes": int(ru.ru_maxrss) * (1 if sys.platform == "darwin" else 1024),
        "sampled": {
            "peak_tree_bytes": sampler.peak_bytes,
            "peak_tree_anon_bytes": sampler.peak_anon_bytes,
            "peak_root_bytes": sampler.peak_root_bytes,
            "peak_children_bytes": {str(k): v for k, v in sampler.peak_by_pid.items()
                                    if k != proc.pid},
            "samples": len(sampler.samples),
            "interval_s": sampler.interval_s,
        },
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "cgroup_before": cg_before,
        "cgroup_after": _cgroup(),
    })
    return out


# ----------------------------------------------------------------------------------------------
# Source snapshot
# ----------------------------------------------------------------------------------------------
def source_digest(pkg_dir: Path) -> str:
    """sha256 over the relative paths and contents of a package's .py files."""
    h = hashlib.sha256()
    for f in sorted(pkg_dir.rglob("*.py")):
        if "__pycache__" in f.parts:
            continue
        h.update(f.relative_to(pkg_dir).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def snapshot_sources(dest: Path) -> Path:
    """Copy pacs_numba and literal_baseline.py to ``dest``: the code every run measures.

    Other people may commit while a long benchmark runs; every child imports this copy, so
    all runs measure the same code (Numba compiles its cache for it in the warm-up).
    """
    import pacs_numba

    pkg = Path(pacs_numba.__file__).parent
    shutil.copytree(pkg, dest / "pacs_numba",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc"))
    shutil.copy2(SCRIPTS / "literal_baseline.py", dest / "literal_baseline.py")
    return dest


# ----------------------------------------------------------------------------------------------
# Cohort
# ----------------------------------------------------------------------------------------------
def _expert_names(m: int) -> tuple[str, ...]:
    return tuple(EXPERT_NAMES[:m]) + tuple(f"EXPERT{i + 1}" for i in range(len(EXPERT_NAMES), m))


def _kfolds(n: int, n_test: int) -> int:
    """A fold count whose first fold tests exactly ``n_test`` of ``n`` patients."""
    for k in range(max(2, n // n_test), 1, -1):
        if n // k == n_test:
            return k
    for k in range(max(2, n // n_test), n + 1):
        if n // k == n_test:
            return k
    raise SystemExit(f"--train/--test: no fold count gives {n_test} test patients out of {n}")


def make_benchmark_cohort(root: Path, shape: tuple[int, int, int], n_train: int, n_test: int,
                          n_experts: int, seed: int) -> Path:
    """Generate the cohort, set the benchmark's pacs_sr values, write the manifest."""
    from pacs_numba.config import dump_config, load_config
    from pacs_numba.store.cohort import make_cohort
    from pacs_numba.store.manifest import build_manifest, write_manifest

    n = n_train + n_test
    k = _kfolds(n, n_test)
    cfg_path = make_cohort(root, patients=n, shape=shape, spacings=(SPACING,), pulses=(PULSE,),
                           models=_expert_names(n_experts), seed=seed, kfolds=k,
                           patch_size=32, stride=16)
    cfg = load_config(cfg_path)
    pacs = dataclasses.replace(
        cfg.pacs_sr, patch_size=32, stride=16, lambda_grad=0.2, lambda_edge=0.25,
        mixing_window="hann", laplacian_tau=0.05, save_blends=True, save_weight_volumes=True,
        evaluate_train=True, log_to_file=False, disable_tqdm=True,
    )
    cfg = dataclasses.replace(cfg, pacs_sr=pacs)
    dump_config(cfg, cfg_path)
    manifest = build_manifest(cfg.data)
    fold = manifest["folds"][FOLD - 1]
    if (len(fold["train"]), len(fold["test"])) != (n_train, n_test):
        raise SystemExit(f"fold {FOLD} has {len(fold['train'])} train / {len(fold['test'])} "
                         f"test patients; expected {n_train} / {n_test}")
    write_manifest(manifest, cfg.data.out)
    return cfg_path


def measure_floors(cfg_path: Path) -> dict:
    """What the cold run cannot go below here: decompressing its inputs once, on one core.

    Every HR and expert of the measured fold is read and inflated with ISA-L (as the volume
    cache does), one after the other; CPU seconds of this process and wall seconds.
    """
    from isal import isal_zlib

    from pacs_numba.config import load_config
    from pacs_numba.store.manifest import load_manifest

    cfg = load_config(cfg_path)
    fold = load_manifest(cfg.data.out)["folds"][FOLD - 1]
    files = sorted({str(entry[k][SPACING][PULSE]) for split in ("train", "test")
                    for entry in fold[split].values() for k in ("HR", *cfg.data.models)})
    for f in files:  # from the page cache, as the measured runs read them
        Path(f).read_bytes()
    c0, t0 = time.process_time(), time.perf_counter()
    raw = 0
    for f in files:
        raw += len(isal_zlib.decompress(Path(f).read_bytes(), wbits=31))
    return {"inputs": len(files), "gzip_cpu_s": time.process_time() - c0,
            "gzip_wall_s": time.perf_counter() - t0, "raw_bytes": raw}


# ----------------------------------------------------------------------------------------------
# Summaries
# ----------------------------------------------------------------------------------------------
def _stat(values: list[float]) -> dict | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def _summarise(runs: list[dict], n_patients: int) -> dict:
    """Medians (min, max) of one configuration's runs."""
    out = {
        "wall_s": _stat([r["wall_s"] for r in runs]),
        "patients_per_min": _stat([60.0 * n_patients / r["wall_s"] for r in runs]),
        "process_elapsed_s": _stat([r["process_elapsed_s"] for r in runs]),
        "cpu_s": _stat([r["cpu_s"] for r in runs]),
        "peak_rss_bytes": _stat([r["peak_rss_bytes"] for r in runs]),
        "peak_rss_sampled_bytes": _stat([r["sampled"]["peak_tree_bytes"] for r in runs]),
        "peak_rss_anon_sampled_bytes": _stat([r["sampled"]["peak_tree_anon_bytes"] for r in runs]),
        "ru_maxrss_bytes": _stat([r["ru_maxrss_self_bytes"] for r in runs]),
        "rss_before_run_bytes": _stat([r["rss_before_run_bytes"] for r in runs]),
        "loadavg_1min_before": _stat([r["loadavg_1min_before"] for r in runs]),
    }
    if runs[0]["kind"] == "engine":
        for split in ("train", "test"):
            secs = [v for r in runs for v in r.get("patient_seconds", {}).get(split, {}).values()
                    if v == v]  # NaN: resumed
            out[f"{split}_patient_s"] = _stat(secs) if secs else None
    keys = STAGES if runs[0]["kind"] == "engine" else sorted(runs[0]["timings_s"])
    out["timings_s"] = {k: _stat([r["timings_s"].get(k, 0.0) for r in runs]) for k in keys}
    return out


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def _med(s: dict | None) -> float | None:
    return None if s is None else s["median"]


def compute_ratios(engine: dict, baseline: dict, cpus: int,
                   first_ever: dict | None = None) -> dict:
    """Speed-ups and memory ratios against the literal baseline, with the targets.

    Headlines compare like with like: our fastest configuration among those using the most
    CPUs measured (normally all of them) against the baseline with that many loky workers
    (or the most workers measured); peak RSS at the same number of patients in flight.
    ``first_ever`` (the warm-up run on an empty compile cache, with its ``width`` and
    ``threads``) is compared by its whole process time, imports and compilation included.
    """
    out: dict[str, Any] = {}
    used = max(v["width"] * v["threads"] for v in engine.values())
    b_top = baseline[max(baseline, key=int)]

    def ref_for(n_cpus: int) -> dict:
        return baseline.get(str(n_cpus)) or b_top

    speed: dict[str, Any] = {}
    for cache in ("cold", "warm"):
        per: dict[str, Any] = {}
        for k, v in engine.items():
            if not v.get(cache):
                continue
            ours = _med(v[cache]["wall_s"])
            ref = ref_for(v["width"] * v["threads"])
            ref_wall = _med(ref["summary"]["wall_s"])
            per[k] = {"ours_wall_s": ours, "baseline_workers": ref["workers"],
                      "baseline_wall_s": ref_wall, "speedup": _ratio(ref_wall, ours)}
        cands = [(k, per[k]) for k, v in engine.items()
                 if k in per and v["width"] * v["threads"] == used]
        head = None
        if cands:
            k_best, best = min(cands, key=lambda c: c[1]["ours_wall_s"])
            head = {"ours": k_best, **best}
        speed[cache] = {"per_config": per, "headline": head}
    out["speedup"] = speed
    if first_ever is not None:
        ref = ref_for(first_ever["width"] * first_ever["threads"])
        ref_wall = _med(ref["summary"]["wall_s"])
        ours = first_ever["process_elapsed_s"]
        out["first_ever"] = {"ours": f"{first_ever['width']}x{first_ever['threads']}",
                             "ours_process_s": ours, "ours_train_s": first_ever["wall_s"],
                             "baseline_workers": ref["workers"], "baseline_wall_s": ref_wall,
                             "speedup": _ratio(ref_wall, ours)}

    # Peak RSS of the whole run, at the same number of patients in flight where measured.
    mem: dict[str, Any] = {}
    for k, v in engine.items():
        peaks = [_med(v[c]["peak_rss_bytes"]) for c in ("cold", "warm") if v.get(c)]
        ref = baseline.get(str(v["width"])) or b_top
        ref_tree = _med(ref["summary"]["peak_rss_bytes"])
        peak = max(peaks) if peaks else None
        mem[k] = {"ours_peak_bytes": peak, "baseline_workers": ref["workers"],
                  "baseline_tree_peak_bytes": ref_tree, "ratio": _ratio(peak, ref_tree)}
    ones = [k for k, v in engine.items() if v["threads"] == 1]
    pool_key = f"{b_top['workers']}x1"
    if pool_key not in engine:
        pool_key = max(ones or engine, key=lambda k: engine[k]["width"])
    out["peak_rss"] = {"per_config": mem, "headline": {"ours": pool_key, **mem[pool_key]}}

    # RSS growth per extra worker (threads 1) against what one loky worker costs.
    widths = sorted(engine[k]["width"] for k in ones)
    growth: dict[str, float] = {}
    if len(widths) >= 2 and widths[0] == 1:
        wmax = widths[-1]
        for cache in ("cold", "warm"):
            lo, hi = engine["1x1"].get(cache), engine[f"{wmax}x1"].get(cache)
            if lo and hi:
                growth[cache] = (_med(hi["peak_rss_bytes"]) - _med(lo["peak_rss_bytes"])) / (
                    wmax - 1)
    per_worker = tree_delta = None
    b_one = baseline.get("1")
    if b_top["workers"] > 1:
        peaks = [v for r in b_top["runs"] for v in r["baseline_peak_rss"]
                 ["worker_peak_bytes"].values() if v]
        per_worker = statistics.median(peaks) if peaks else None
        if b_one is not None:
            tree_delta = ((_med(b_top["summary"]["peak_rss_bytes"])
                           - _med(b_one["summary"]["peak_rss_bytes"])) / (b_top["workers"] - 1))
    ours_growth = max(growth.values()) if growth else None
    out["per_worker"] = {
        "ours_growth_bytes": growth,
        "ours_growth_worst_bytes": ours_growth,
        "baseline_workers": b_top["workers"],
        "baseline_worker_peak_bytes": per_worker,
        "baseline_tree_delta_per_worker_bytes": tree_delta,
        "ratio": _ratio(ours_growth, per_worker),
        "ratio_vs_tree_delta": _ratio(ours_growth, tree_delta),
    }

    def verdict(value: float | None, target: float, higher_is_better: bool) -> dict:
        if value is None:
            return {"value": None, "target": target, "met": None}
        met = value >= target if higher_is_better else value <= target
        return {"value": value, "target": target, "met": met}

    sh = speed["warm"]["headline"]
    sc = speed["cold"]["headline"]
    fe = out.get("first_ever")
    out["targets"] = {
        "first_ever_speedup": verdict(fe and fe["speedup"], TARGET_FIRST_EVER_SPEEDUP, True),
        "warm_speedup": verdict(sh and sh["speedup"], TARGET_WARM_SPEEDUP, True),
        "cold_speedup": verdict(sc and sc["speedup"], TARGET_COLD_SPEEDUP, True),
        "peak_rss_ratio": verdict(out["peak_rss"]["headline"] and
                                  out["peak_rss"]["headline"]["ratio"],
                                  TARGET_PEAK_RSS_RATIO, False),
        "per_worker_rss_ratio": verdict(out["per_worker"]["ratio"], TARGET_PER_WORKER_RATIO,
                                        False),
    }
    return out


# ----------------------------------------------------------------------------------------------
# Environment and report
# ----------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("pacs-numba", "numba", "llvmlite", "numpy", "scipy", "nibabel", "isal",
                 "joblib", "loky", "psutil", "scikit-image"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _git() -> dict[str, Any]:
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True,
                                  text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = run("status", "--porcelain", "--untracked-files=all")
    lines = [] if status is None else status.splitlines()
    measured = [ln for ln in lines if "pacs_numba/" in ln or "literal_baseline.py" in ln]
    return {"commit": run("rev-parse", "HEAD"),
            "dirty_files": None if status is None else len(lines),
            "measured_code_dirty": measured, "status": lines[:100]}


def environment() -> dict:
    from pacs_numba.resources.limits import detect_limits

    limits = detect_limits()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "os_cpu_count": os.cpu_count(),
        "affinity_cpus": affinity,
        "limits": limits.describe(),
        "cpus_used": int(limits.cpus.value),
        "memory_limit_bytes": int(limits.memory.value),
        "versions": _versions(),
        "git": _git(),
        "env": {k: os.environ[k] for k in sorted(os.environ)
                if k.startswith(("NUMBA_", "OMP_", "PACS_", "SLURM_CPUS", "MKL_", "OPENBLAS_"))},
    }


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / MIB:,.0f}"


def _s(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _range(s: dict | None, digits: int = 1) -> str:
    if s is None:
        return "-"
    if s["n"] == 1:
        return _s(s["median"], digits)
    return f"{_s(s['median'], digits)} ({_s(s['min'], digits)}-{_s(s['max'], digits)})"


def markdown(doc: dict) -> str:
    """The short report: the command, one table of runs, the targets, the stage split."""
    p = doc["parameters"]
    env = doc["environment"]
    n_dirty = len(env["git"].get("measured_code_dirty") or [])
    dirty = f" (+ uncommitted changes to {n_dirty} of its files)" if n_dirty else ""
    lines = [
        f"# pacs_numba profile {doc['date']} on {env['host']}",
        "",
        "```",
        doc["command"],
        "```",
        "",
        f"{p['shape'][0]}x{p['shape'][1]}x{p['shape'][2]} voxels, {p['experts']} experts, "
        f"fold {FOLD} {SPACING} {PULSE}: {p['train']} train + {p['test']} test patients, "
        f"patch 32, stride 16, lambda_grad 0.2, lambda_edge 0.25, hann, laplacian_tau 0.05, "
        f"blends and weight volumes saved. {env['cpu_model']}, {env['cpus_used']} CPUs "
        f"({env['limits']}); Numba threading layer {doc.get('threading_layer')}; "
        f"pacs_numba git {str(env['git']['commit'])[:10]}{dirty}. "
        f"Medians of {p['repeats']} runs (min-max); baseline {p['baseline_repeats']} run(s). "
        f"Wall = fit + evaluate (train + test blends, metrics, every output written); "
        f"patients/min = {p['train'] + p['test']} patients / wall. "
        f"Peak RSS = the run's process tree (max of {int(SAMPLE_INTERVAL_S * 1000)} ms samples "
        "and, for pacs_numba, ru_maxrss; memory-mapped cache pages included; 'anonymous' = "
        "sampled peak of RssAnon). CPU s = user + system seconds of the whole tree.",
        "",
        "| run | cache | width x threads | wall s | speed-up | patients/min | peak RSS MiB | "
        "of it anonymous MiB | CPU s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    speed = (doc.get("ratios") or {}).get("speedup", {})
    for key, v in doc["engine"].items():
        for cache in ("cold", "warm"):
            s = v.get(cache)
            if not s:
                continue
            sp = speed.get(cache, {}).get("per_config", {}).get(key)
            sp_txt = (f"{sp['speedup']:.1f}x vs {sp['baseline_workers']}w"
                      if sp and sp["speedup"] else "-")
            lines.append(
                f"| pacs_numba | {cache} | {v['width']} x {v['threads']} | {_range(s['wall_s'])} "
                f"| {sp_txt} | {_s(_med(s['patients_per_min']))} | "
                f"{_mib(_med(s['peak_rss_bytes']))} | "
                f"{_mib(_med(s['peak_rss_anon_sampled_bytes']))} | {_s(_med(s['cpu_s']))} |")
    for w, b in doc["baseline"].items():
        s = b["summary"]
        how = f"{w} loky workers" if int(w) > 1 else "1 (joblib inline)"
        lines.append(
            f"| literal baseline | - | {how} | "
            f"{_range(s['wall_s'])} | 1x | {_s(_med(s['patients_per_min']), 2)} | "
            f"{_mib(_med(s['peak_rss_bytes']))} | {_mib(_med(s['peak_rss_anon_sampled_bytes']))} "
            f"| {_s(_med(s['cpu_s']))} |")
    r = doc.get("ratios")
    if r:
        lines += ["", "| target | measured | required | met |", "|---|---|---|---|"]
        t = r["targets"]
        sh, sc = r["speedup"]["warm"]["headline"], r["speedup"]["cold"]["headline"]
        pr = r["peak_rss"]["headline"]
        pw = r["per_worker"]

        def row(name: str, v: dict, fmt: str, req: str, how: str) -> None:
            val = "-" if v["value"] is None else fmt.format(v["value"])
            met = {True: "yes", False: "**no**", None: "-"}[v["met"]]
            lines.append(f"| {name} ({how}) | {val} | {req} | {met} |")

        fe = r.get("first_ever")
        row("speed-up, first-ever run", t["first_ever_speedup"], "{:.1f}x",
            f">= {TARGET_FIRST_EVER_SPEEDUP:g}x",
            fe and f"{fe['ours']} on an empty compile cache: {fe['ours_process_s']:.1f} s of "
                   f"process incl. imports and compile ({fe['ours_train_s']:.1f} s train), vs "
                   f"baseline {fe['baseline_workers']} workers" or "not measured "
                   "(--no-first-ever)")
        row("speed-up, warm cache", t["warm_speedup"], "{:.1f}x", f">= {TARGET_WARM_SPEEDUP:g}x",
            sh and f"fastest of ours, {sh['ours']}, vs baseline {sh['baseline_workers']} "
                   "workers" or "")
        row("speed-up, cold cache", t["cold_speedup"], "{:.1f}x", f">= {TARGET_COLD_SPEEDUP:g}x",
            sc and f"{sc['ours']} vs baseline {sc['baseline_workers']} workers" or "")
        row("peak RSS / baseline tree", t["peak_rss_ratio"], "{:.3f}",
            f"<= {TARGET_PEAK_RSS_RATIO:g}",
            f"{pr['ours']}, worse of cold/warm, {_mib(pr['ours_peak_bytes'])} MiB vs "
            f"{_mib(pr['baseline_tree_peak_bytes'])} MiB with {pr['baseline_workers']} workers")
        row("RSS growth per extra worker / baseline per-worker RSS",
            t["per_worker_rss_ratio"], "{:.3f}", f"<= {TARGET_PER_WORKER_RATIO:g}",
            f"ours {_mib(pw['ours_growth_worst_bytes'])} MiB (worse of cold/warm) vs a loky "
            f"worker's {_mib(pw['baseline_worker_peak_bytes'])} MiB"
            + (f"; the baseline's tree grows {_mib(pw['baseline_tree_delta_per_worker_bytes'])} "
               f"MiB from 1 to {pw['baseline_workers']} workers, ratio "
               f"{pw['ratio_vs_tree_delta']:.3f}" if pw["ratio_vs_tree_delta"] else ""))
        if tuple(p["shape"]) != DEFAULT_SHAPE or (p["train"], p["test"]) != (8, 2):
            lines += ["", "(The targets are defined at the default size, 200x230x190 with 8 + 2 "
                          "patients; at this size they are informative only.)"]
    # Stage split of the planner's default shape (width = CPUs, threads 1) when measured.
    key = f"{env['cpus_used']}x1" if f"{env['cpus_used']}x1" in doc["engine"] else \
        next(iter(doc["engine"]), None)
    if key:
        lines += ["", f"Where pacs_numba's time goes ({key}; seconds summed over the pool's "
                      "threads, medians):", "",
                  "| cache | " + " | ".join(STAGES) + " |", "|---" * (len(STAGES) + 1) + "|"]
        for cache in ("cold", "warm"):
            s = doc["engine"][key].get(cache)
            if s:
                lines.append(f"| {cache} | " + " | ".join(
                    _s(_med(s["timings_s"][k]), 2) for k in STAGES) + " |")
    if key:
        per = [(c, doc["engine"][key][c].get("test_patient_s")) for c in ("cold", "warm")
               if doc["engine"][key].get(c)]
        per = [(c, s) for c, s in per if s]
        if per:
            lines += ["", f"One test patient's evaluation ({key}; blend, its metrics, each "
                          "expert alone and the HR-free blend, outputs queued to the writer; "
                          "median (min-max) over test patients and runs): " + "; ".join(
                              f"{c} {_range(s, 2)} s" for c, s in per) + "."]
    lines += held_back(doc)
    if doc["baseline"]:
        w, b = next(reversed(doc["baseline"].items()))
        tb = b["summary"]["timings_s"]
        lines += ["", f"Literal baseline ({w} workers; seconds summed over patients): " + ", ".join(
            f"{k} {_s(_med(tb.get(k)), 1)}" for k in STAGES) + "."]
    lines += ["", "Notes: " + " ".join(doc["notes"]), ""]
    return "\n".join(lines)


def held_back(doc: dict) -> list[str]:
    """Lines naming, for each missed speed target, the stage that holds it back, and the floors."""
    out: list[str] = []
    fl = doc.get("floors")
    cpus = doc["environment"]["cpus_used"]
    if fl:
        out += ["", f"Floor here: inflating the fold's {fl['inputs']} .nii.gz inputs once (ISA-L, "
                    f"one core, from the page cache) takes {fl['gzip_cpu_s']:.2f} CPU s "
                    f"({fl['gzip_wall_s']:.2f} s wall), so no cold run on {cpus} CPUs can spend "
                    f"less than {fl['gzip_cpu_s'] / cpus:.2f} s decompressing."]
    r = doc.get("ratios") or {}
    for cache in ("cold", "warm"):
        t = (r.get("targets") or {}).get(f"{cache}_speedup")
        head = ((r.get("speedup") or {}).get(cache) or {}).get("headline")
        if not t or t["met"] is not False or not head:
            continue
        s = doc["engine"][head["ours"]][cache]
        stages = {k: _med(s["timings_s"][k]) or 0.0 for k in STAGES}
        total = sum(stages.values()) or 1.0
        top = sorted(stages.items(), key=lambda kv: -kv[1])[:3]
        need = head["baseline_wall_s"] / t["target"]
        out += ["", f"{cache.capitalize()} target missed: {head['ours']} took "
                    f"{head['ours_wall_s']:.1f} s, {need:.1f} s would meet it; its stages (s "
                    "summed over threads, share): " + ", ".join(
                        f"{k} {v:.2f} ({100 * v / total:.0f}%)" for k, v in top) + "."]
    return out


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def _configs(cpus: int, widths: list[int] | None,
             threads: list[int] | None) -> list[tuple[int, int]]:
    ws = widths or list(range(1, cpus + 1))
    ts = threads or list(range(1, cpus + 1))
    out = [(w, t) for w in ws for t in ts if w * t <= cpus]
    if not out:
        raise SystemExit(f"no width x threads <= {cpus} CPUs among --widths {ws} --threads {ts}")
    return out


# --quick: a small cohort, one repeat; every configuration and both baseline worker counts
# still run, so the report has every row (the targets are then informative only).
QUICK = {"shape": (64, 72, 60), "train": 3, "test": 1, "repeats": 1, "baseline_repeats": 1,
         "first_ever": False}

# Rough cost model for the estimate printed before the first run, fitted to the 2-core VM
# profiles in profiling/ (seconds; "vp" = voxels x patients, "vpt" = x tiles too).
EST_CHILD_START_S = 4.0          # interpreter + imports + Numba cache load, per child
EST_COMPILE_S = 90.0             # first compile of the measured snapshot (the warm-up)
EST_COHORT_S_PER_VP = 6e-8
EST_ENGINE_S_PER_VP = {"cold": 1.5e-7, "warm": 8.2e-8}   # a 1x1 run; wider runs divide
EST_BASELINE_STATS_S_PER_VPT = 3.6e-9                    # boolean mask per tile, float32
EST_BASELINE_EVAL_S_PER_VP = 2.6e-6                      # blend + metrics + writes, in parent
EST_BASELINE_LOAD_S_PER_VP = 2.2e-7


def plan(args: argparse.Namespace, configs: list[tuple[int, int]],
         b_workers: list[int]) -> list[tuple[str, float]]:
    """The measured runs in order, each with a rough estimate of its process time (s)."""
    shape = tuple(args.shape)
    vox = shape[0] * shape[1] * shape[2]
    tiles = math.prod(math.ceil(n / 16) for n in shape)
    vp = vox * (args.train + args.test)
    runs: list[tuple[str, float]] = []
    for rep in range(args.repeats):
        for w, t in configs:
            speed = w * t if w * t == 1 else 0.8 * w * t  # sharing costs some of the 2nd core
            for state in ("cold", "warm"):
                est = EST_CHILD_START_S + EST_ENGINE_S_PER_VP[state] * vp / speed
                runs.append((f"engine-{w}x{t}-{state}-r{rep + 1}", est))
    for rep in range(args.baseline_repeats if b_workers else 0):
        for wk in b_workers:
            fit = (EST_BASELINE_STATS_S_PER_VPT * vox * tiles + EST_BASELINE_LOAD_S_PER_VP * vox) \
                * args.train / wk
            evaluate = (EST_BASELINE_EVAL_S_PER_VP + EST_BASELINE_LOAD_S_PER_VP) * vp
            runs.append((f"baseline-{wk}w-r{rep + 1}", EST_CHILD_START_S + fit + evaluate))
    return runs


def estimate_setup_s(args: argparse.Namespace, configs: list[tuple[int, int]]) -> float:
    """Cohort generation and the un-measured warm-up (compile included), estimated."""
    shape = tuple(args.shape)
    vp = shape[0] * shape[1] * shape[2] * (args.train + args.test)
    w, t = configs[-1]
    return (2 * EST_CHILD_START_S + EST_COHORT_S_PER_VP * vp + EST_COMPILE_S
            + EST_ENGINE_S_PER_VP["cold"] * vp / max(1.0, 0.8 * w * t))


def _fmt_s(sec: float) -> str:
    sec = int(round(sec))
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else \
        f"{sec // 60}m{sec % 60:02d}s"


def result_paths(results: Path, name: str | None, host: str,
                 now: dt.datetime) -> tuple[Path, Path]:
    """Where the JSON and markdown go; never a pair that exists already.

    Default stem ``<YYYY-MM-DD>-<host>-<HHMM>``, then ``-2``, ``-3`` ... if that is taken.
    An explicit ``--name`` whose files exist is refused (SystemExit), before anything runs.
    """
    def pair(stem: str) -> tuple[Path, Path]:
        return results / f"{stem}.json", results / f"{stem}.md"

    def taken(stem: str) -> bool:
        return any(p.exists() for p in pair(stem))

    if name is not None:
        if "/" in name or name in ("", ".", ".."):
            raise SystemExit(f"--name {name!r}: expected a file stem, not a path")
        if taken(name):
            raise SystemExit(f"--name {name}: {pair(name)[0]} or its .md exists already; "
                             "profiles are never overwritten, choose another --name")
        return pair(name)
    base = f"{now.date().isoformat()}-{host.split('.')[0]}-{now:%H%M}"
    stem, k = base, 1
    while taken(stem):
        k += 1
        stem = f"{base}-{k}"
    return pair(stem)


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` with ``text``; fail rather than replace a file that appeared meanwhile."""
    with open(path, "x") as fh:
        fh.write(text)


def build_parser() -> argparse.ArgumentParser:
    quick = ", ".join(f"--{k.replace('_', '-')} "
                      f"{' '.join(map(str, v)) if isinstance(v, tuple) else v}"
                      for k, v in QUICK.items())
    ap = argparse.ArgumentParser(
        description="Benchmark pacs_numba train (cold and warm volume cache, every pool width "
                    "x threads) against the literal NumPy/loky baseline on one generated cohort. "
                    "Prints the planned runs and a time estimate first, then one line per run. "
                    f"--quick: {quick} (under 3 minutes on 2 idle cores; explicit options "
                    "override it).",
        epilog="Results: <results>/<YYYY-MM-DD>-<host>-<HHMM>.json and .md (a counter is "
               "added if taken); an existing profile is never overwritten.")
    ap.add_argument("--quick", action="store_true",
                    help="small cohort, 1 repeat: a check that everything runs, in minutes")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the plan and the estimate, run nothing")
    ap.add_argument("--shape", type=int, nargs=3, default=DEFAULT_SHAPE,
                    metavar=("Z", "Y", "X"), help="volume shape (axis 2 is the slice axis)")
    ap.add_argument("--train", type=int, default=8, help="training patients (default 8)")
    ap.add_argument("--test", type=int, default=2, help="test patients (default 2)")
    ap.add_argument("--experts", type=int, default=4, help="experts per patient (default 4)")
    ap.add_argument("--seed", type=int, default=0, help="cohort seed")
    ap.add_argument("--repeats", type=int, default=3, help="runs per configuration (default 3)")
    ap.add_argument("--baseline-repeats", type=int, default=1,
                    help="runs of the literal baseline per worker count (default 1)")
    ap.add_argument("--baseline-workers", type=int, nargs="+", default=None,
                    help="loky worker counts of the baseline (default: 1 and the most CPUs a "
                         "measured configuration uses, i.e. all of them; 1 worker takes about "
                         "twice as long as 2)")
    ap.add_argument("--widths", type=int, nargs="+", default=None,
                    help="pool widths (default 1..CPUs; width x threads <= CPUs)")
    ap.add_argument("--threads", type=int, nargs="+", default=None,
                    help="Numba threads per worker (default 1..CPUs)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the literal baseline")
    ap.add_argument("--no-first-ever", dest="first_ever", action="store_false",
                    help="do not measure a first-ever run: the warm-up then loads the kernels "
                         "from the environment's Numba cache (NUMBA_CACHE_DIR or the package's) "
                         "instead of compiling them into a new, empty one")
    ap.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                    help="import the live pacs_numba tree instead of a copy made at the start "
                         "(edits made during the run would then be measured)")
    ap.add_argument("--out", type=Path, default=None,
                    help="work directory (cohort, caches, outputs, logs; default a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--results", type=Path, default=ROOT / "profiling",
                    help="where the JSON and markdown go (default profiling/)")
    ap.add_argument("--name", default=None,
                    help="file stem of the results (default <YYYY-MM-DD>-<host>-<HHMM>); "
                         "refused if such files exist")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return ap


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse and check the options; ``--quick`` supplies defaults that explicit options beat."""
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        ap.set_defaults(**QUICK)
        args = ap.parse_args(argv)
    for name in ("train", "test", "experts", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.baseline_repeats < 0:
        ap.error("--baseline-repeats must be >= 0")
    if min(args.shape) < 1:
        ap.error("--shape: every axis must be >= 1")
    for name in ("widths", "threads", "baseline_workers"):
        if getattr(args, name) and min(getattr(args, name)) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args._child:
        return _child(args._child)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    env = environment()
    cpus = env["cpus_used"]
    configs = _configs(cpus, args.widths, args.threads)
    b_workers = [] if args.no_baseline or args.baseline_repeats == 0 else \
        sorted(set(args.baseline_workers or [1, max(w * t for w, t in configs)]))
    shape = tuple(args.shape)
    n_pat = args.train + args.test
    started = dt.datetime.now().astimezone()
    command = shlex.join(["python", os.path.relpath(__file__, Path.cwd()), *argv])
    jpath, mpath = result_paths(args.results, args.name, env["host"], started)
    runs = plan(args, configs, b_workers)
    setup_s = estimate_setup_s(args, configs)
    total_s = setup_s + sum(e for _, e in runs)
    log.info("profile: %s", command)
    log.info("host %s, %s, %s", env["host"], env["cpu_model"], env["limits"])
    log.info("plan: %d measured runs (%s; %d repeat(s)) + baseline %s, after the cohort and "
             "%s", len(runs), ", ".join(f"{w}x{t}" for w, t in configs),
             args.repeats, ", ".join(f"{wk}w" for wk in b_workers) or "skipped",
             "a warm-up that is the first-ever run (empty compile cache)" if args.first_ever
             else "an un-measured warm-up")
    log.info("estimate: %s in all (setup %s; rough, from a 2-core VM, more on a loaded "
             "machine)", _fmt_s(total_s), _fmt_s(setup_s))
    for i, (label, est) in enumerate(runs, 1):
        log.info("  %2d/%d %-26s ~%s", i, len(runs), label, _fmt_s(est))
    log.info("results will go to %s and %s", jpath, mpath)
    if args.dry_run:
        return 0
    # SIGTERM (e.g. SLURM, kill) and SIGHUP stop the running child's process group too
    # (_run_child), like Ctrl-C; exit status 128 + signal.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_stopped)
    try:
        return _main_run(args, argv, env, configs, b_workers, shape, n_pat, cpus, started,
                         command, jpath, mpath, runs)
    except Stopped as exc:
        log.error("stopped by signal %d; the running child was stopped with its workers",
                  exc.signum)
        return 128 + exc.signum
    except KeyboardInterrupt:
        log.error("interrupted; the running child was stopped with its workers")
        return 130


def _main_run(args: argparse.Namespace, argv: list[str], env: dict,
              configs: list[tuple[int, int]], b_workers: list[int],
              shape: tuple[int, int, int], n_pat: int, cpus: int, started: dt.datetime,
              command: str, jpath: Path, mpath: Path, planned: list[tuple[str, float]]) -> int:
    args.planned = planned

    if args.out is None:
        work, ours = Path(tempfile.mkdtemp(prefix="pacs_profile-")), True
    else:
        work, ours = args.out.resolve(), not args.out.exists()
        work.mkdir(parents=True, exist_ok=True)
    try:
        doc = _profile(args, work, env, configs, b_workers, shape, n_pat, cpus)
    finally:
        if args.keep:
            log.info("work directory kept: %s", work)
        elif ours:
            shutil.rmtree(work, ignore_errors=True)
        else:  # a directory the user gave us: remove only what we made in it
            for sub in WORK_DIRS:
                shutil.rmtree(work / sub, ignore_errors=True)
    doc.update({"command": command, "argv": [sys.executable, __file__, *argv],
                "cwd": str(Path.cwd()), "date": started.date().isoformat(),
                "started": started.isoformat(),
                "finished": dt.datetime.now().astimezone().isoformat()})
    # Key order for readers: what, where, then the numbers.
    doc = {k: doc[k] for k in ("date", "command", "argv", "cwd", "started", "finished",
                               "parameters", "environment", "threading_layer", "targets_met",
                               "ratios", "engine", "baseline", "warmup", "cohort_s", "floors",
                               "notes", "runs")}
    args.results.mkdir(parents=True, exist_ok=True)
    _write_new(jpath, json.dumps(doc, indent=1) + "\n")
    _write_new(mpath, markdown(doc))
    log.info("wrote %s and %s", jpath, mpath)
    print(mpath.read_text())
    return 0


def _profile(args: argparse.Namespace, work: Path, env: dict, configs: list[tuple[int, int]],
             b_workers: list[int], shape: tuple[int, int, int], n_pat: int, cpus: int) -> dict:
    # The parent stays small (no numpy, numba or nibabel imported here): a child's ru_maxrss
    # starts from the RSS of the process that forked it, so the cohort is made in a child too.
    if args.snapshot:
        src: Path | None = snapshot_sources(work / "src")
        pkg_dir, scripts_dir = src / "pacs_numba", src
    else:
        import pacs_numba

        src, pkg_dir, scripts_dir = None, Path(pacs_numba.__file__).parent, SCRIPTS
    digest = source_digest(pkg_dir)
    log.info("measuring pacs_numba from %s (sha256 %s)", pkg_dir, digest[:12])
    t0 = time.perf_counter()
    made = _run_child({"kind": "cohort", "root": str(work / "cohort"), "shape": list(shape),
                       "train": args.train, "test": args.test, "experts": args.experts,
                       "seed": args.seed}, work, "cohort", src)
    cfg_path = Path(made["config"])
    cohort_s = time.perf_counter() - t0
    log.info("cohort: %d patients %s in %.1f s -> %s", n_pat, shape, cohort_s, cfg_path)
    runs: list[dict] = []
    planned = dict(getattr(args, "planned", []))
    n_planned = len(planned)
    t_measure = None

    def starting(label: str) -> None:
        nonlocal t_measure
        t_measure = t_measure or time.perf_counter()
        i = len(runs) + 1
        left = sum(list(planned.values())[i - 1:])
        log.info("[%d/%d] %s: starting (estimate ~%s; ~%s left)", i, n_planned, label,
                 _fmt_s(planned.get(label, 0.0)), _fmt_s(left))

    def out_root(label: str) -> Path:
        return work / "out" / label

    def done(label: str) -> None:
        if not args.keep:
            shutil.rmtree(out_root(label), ignore_errors=True)

    engine_spec = {"kind": "engine", "config": str(cfg_path)}
    # Warm-up: the first-ever run (an empty compile cache that every later run then uses) or,
    # with --no-first-ever, a Numba cache load; either way the OS page cache of the inputs.
    numba_cache = None
    if args.first_ever:
        numba_cache = work / "numba-cache"
        shutil.rmtree(numba_cache, ignore_errors=True)
        numba_cache.mkdir(parents=True)
    w0, t0_ = configs[-1]
    what = ("first-ever run: an empty compile cache and volume cache" if numba_cache else
            "not measured: Numba loads or compiles its kernels")
    log.info("warm-up (%dx%d, %s)", w0, t0_, what)
    warm = _run_child({**engine_spec, "width": w0, "threads": t0_,
                       "cache_dir": str(work / "cache-warmup"),
                       "out_root": str(out_root("warmup")),
                       "load_kernels": numba_cache is not None}, work, "warmup", src, numba_cache)
    warm.update({"width": w0, "threads": t0_, "first_ever": numba_cache is not None})
    done("warmup")
    shutil.rmtree(work / "cache-warmup", ignore_errors=True)
    layer = warm["threading_layer"]
    log.info("warm-up (%dx%d): %.1f s in process (%.1f s train), layer %s",
             w0, t0_, warm["process_elapsed_s"], warm["wall_s"], layer)

    for rep in range(args.repeats):
        for w, t in configs:
            # Cold: a new, empty cache directory.  Warm: the same directory, filled by the cold run.
            cache = work / "cache" / f"{w}x{t}-r{rep + 1}"
            for state in ("cold", "warm"):
                label = f"engine-{w}x{t}-{state}-r{rep + 1}"
                starting(label)
                r = _run_child({**engine_spec, "width": w, "threads": t,
                                "cache_dir": str(cache), "out_root": str(out_root(label))},
                               work, label, src, numba_cache)
                r.update({"width": w, "threads": t, "cache": state, "repeat": rep + 1})
                if r["pool"] and (r["pool"]["width"], r["pool"]["threads"]) != (w, t):
                    log.warning("%s: the engine planned %s x %s (%s)", label,
                                r["pool"]["width"], r["pool"]["threads"], r["pool"]["reason"])
                runs.append(r)
                done(label)
                log.info("[%d/%d] %-26s wall %6.1f s  peak RSS %6.0f MiB  load %.2f",
                         len(runs), n_planned, label, r["wall_s"],
                         r["sampled"]["peak_tree_bytes"] / MIB, r["loadavg_1min_before"])
            shutil.rmtree(cache, ignore_errors=True)

    for rep in range(args.baseline_repeats if b_workers else 0):
        for wk in b_workers:
            label = f"baseline-{wk}w-r{rep + 1}"
            starting(label)
            r = _run_child({"kind": "baseline", "config": str(cfg_path), "workers": wk,
                            "scripts_dir": str(scripts_dir), "out_root": str(out_root(label))},
                           work, label, src)
            r.update({"repeat": rep + 1})
            runs.append(r)
            done(label)
            log.info("[%d/%d] %-26s wall %6.1f s  peak RSS %6.0f MiB  load %.2f", len(runs),
                     n_planned, label, r["wall_s"], r["sampled"]["peak_tree_bytes"] / MIB,
                     r["loadavg_1min_before"])

    engine: dict[str, Any] = {}
    for w, t in configs:
        key = f"{w}x{t}"
        engine[key] = {"width": w, "threads": t}
        for state in ("cold", "warm"):
            rs = [r for r in runs if r["kind"] == "engine" and (r["width"], r["threads"]) == (w, t)
                  and r["cache"] == state]
            if rs:
                engine[key][state] = _summarise(rs, n_pat)
    baseline: dict[str, Any] = {}
    for wk in b_workers:
        rs = [r for r in runs if r["kind"] == "baseline" and r["workers"] == wk]
        if rs:
            baseline[str(wk)] = {"workers": wk, "summary": _summarise(rs, n_pat), "runs": rs}
    ratios = (compute_ratios(engine, baseline, cpus, warm if numba_cache else None)
              if baseline else None)
    measured = {(r["pacs_numba_dir"], r["source_digest"]) for r in [warm, *runs]
                if r["kind"] == "engine"}
    same_code = measured == {(str(pkg_dir), digest)}
    if not same_code:
        log.warning("the measured pacs_numba changed during the run: %s", sorted(measured))
    cg = [r["cgroup_after"] for r in runs if r.get("cgroup_after")]
    notes = [
        "Cold = a new, empty volume cache directory; the OS "
        "page cache still holds the .nii.gz inputs (read by the warm-up), so 'cold' measures "
        "decompression into the cache, not disk reads. Warm = the same cache right after.",
        "Every run is a fresh process; wall = Engine.train() (fit + evaluate incl. writes) or "
        "the baseline's total_wall, without interpreter start and imports (process_elapsed_s "
        "in the JSON has them).",
        "Per-stage seconds are summed over threads (ours) or over patients in the workers "
        "(baseline), so with width > 1 they can exceed the wall.",
        "RSS counts the touched pages of the memory-mapped cache (file-backed, shared, "
        "reclaimable); peak_rss_anon_sampled_bytes in the JSON is the anonymous part.",
        "The baseline with 1 worker runs inline in its parent process (joblib n_jobs=1), "
        "not in a loky worker. As in the published tool, only the baseline's fit runs in loky "
        "workers; its evaluation (blends, metrics, writes) runs patient after patient in the "
        "parent, whatever the worker count.",
        ("First-ever = the warm-up run on an empty Numba compile cache and an empty volume "
         "cache: its whole process time (interpreter start, imports, the compile as "
         "`pacs-numba train` does it before its first task, i.e. warmup.load_kernels in two "
         "processes, then the train with its decompression) against the baseline's "
         "total_wall; every later run loads the kernels it compiled, so no other measured run "
         "includes compilation."
         if numba_cache else
         "The un-measured warm-up loads (or compiles) the measured snapshot's kernels; no "
         "measured run includes compilation."),
    ]
    if args.snapshot:
        notes.append("Every run imported a snapshot of pacs_numba (and literal_baseline.py) "
                     "copied at the start, so all runs measure the same code: git "
                     f"{str(env['git']['commit'])[:10]} plus the uncommitted changes listed "
                     f"in environment.git.status (sha256 of the .py files {digest[:12]}).")
    if not same_code:
        notes.append(f"WARNING: the pacs_numba source changed during the run ({len(measured)} "
                     "versions measured); the medians mix them.")
    if cg:
        notes.append(
            f"cgroup memory peak ({cg[-1]['source']}) is the high-water mark of the whole "
            "cgroup (this benchmark, its children and the page cache it charged, e.g. written "
            "outputs and cache files) since the cgroup was created; it cannot be reset from "
            "here, so per run only cgroup_before/after in the JSON are recorded: it is an "
            "upper bound, not a per-run figure.")
    else:
        notes.append("cgroup memory.peak was not readable here.")
    targets_met = None
    if ratios:
        targets_met = {k: v["met"] for k, v in ratios["targets"].items()}
    return {
        "parameters": {"shape": list(shape), "train": args.train, "test": args.test,
                       "experts": args.experts, "seed": args.seed, "repeats": args.repeats,
                       "baseline_repeats": args.baseline_repeats if b_workers else 0,
                       "baseline_workers": b_workers, "configs": [f"{w}x{t}" for w, t in configs],
                       "patch_size": 32, "stride": 16, "lambda_grad": 0.2, "lambda_edge": 0.25,
                       "mixing_window": "hann", "laplacian_tau": 0.05, "fold": FOLD,
                       "spacing": SPACING, "pulse": PULSE, "rss_sample_interval_s":
                       SAMPLE_INTERVAL_S},
        "environment": {**env, "measured_source": {"snapshot": bool(args.snapshot),
                                                   "pacs_numba_dir": str(pkg_dir),
                                                   "sha256": digest, "unchanged": same_code}},
        "threading_layer": layer, "targets_met": targets_met,
        "ratios": ratios, "engine": engine,
        "baseline": {k: {"workers": v["workers"], "summary": v["summary"]}
                     for k, v in baseline.items()},
        "warmup": {k: warm[k] for k in ("process_elapsed_s", "wall_s", "import_s", "setup_s",
                                        "timings_s", "width", "threads", "first_ever",
                                        "peak_rss_bytes")},
        "cohort_s": cohort_s, "floors": made.get("floors"), "notes": notes, "runs": runs,
    }


if __name__ == "__main__":
    raise SystemExit(main())
