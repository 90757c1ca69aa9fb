"""Check a node: can a run start here, and how wide will it be (``pacs-numba diagnose``).

Each check returns ``(level, name, message)`` with level ``ok``, ``warn`` or ``fail``
(nibabel's battery-runner style).  Exit status 0 when nothing failed, 1 otherwise.

Run it inside the SLURM allocation you will use (``srun pacs-numba diagnose --config C
--warmup``; ``python -m pacs_numba.diagnose`` takes the same options): it reports the
limits the job really has (cgroup, SLURM), the pool width and Numba threads a run would
use, and with ``--warmup`` compiles every kernel into the on-disk cache so array tasks
start in a fraction of a second.  Numba keys that cache by the source path of each
kernel, so it only helps a ``pacs-numba`` that imports the same copy of the package:
:func:`check_package` compares the two.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import isal
import nibabel
import numba
import numpy
import scipy

from .._config import KERNEL_CACHE_DIR
from .._version import __version__
from ..config import load_config
from ..errors import BudgetError, PacsError
from ..resources import limits as resource_limits
from ..resources.planning import plans_json
from ..resources.threads import ensure_threading_layer
from ..resources.units import gib, human_size
from ..store.nifti import read_shape
from ..store.registration import ants_status, registration_bytes, template_key
from ..store.volumes import VolumeStore
from .engine import Engine
from .tasks import RunOptions
from .warmup import warm_kernels

#: The folder of the pacs_numba package this module belongs to (the copy whose kernels run).
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))

Check = tuple[str, str, str]


OK, WARN, FAIL = "ok", "warn", "fail"


def check_versions() -> list[Check]:
    """Python and library versions."""
    try:

        isal_v = isal.__version__
    except ImportError:  # pragma: no cover - a dependency
        isal_v = "missing (gzip falls back to zlib)"
    return [
        (
            OK,
            "versions",
            f"pacs_numba {__version__}, python {platform.python_version()}, numpy "
            f"{numpy.__version__}, numba {numba.__version__}, scipy {scipy.__version__}, "
            f"nibabel {nibabel.__version__}, isal {isal_v}",
        )
    ]


def check_threading() -> list[Check]:
    """Report the Numba threading layer and its thread count."""
    layer = ensure_threading_layer()
    msg = f"layer {layer}, {numba.config.NUMBA_NUM_THREADS} threads available"
    if layer in {"omp", "tbb"}:
        return [(OK, "threading", msg + " (safe to launch kernels from several threads)")]
    return [
        (
            WARN,
            "threading",
            msg + ": not thread-safe, patients will run one at a time; "
            "install a numba wheel with OpenMP or `pip install tbb`",
        )
    ]


def check_limits() -> list[Check]:
    """Memory and CPU limits with their sources, SLURM variables and overrides."""
    limits = resource_limits.detect_limits()
    out: list[Check] = [(OK, "limits", limits.describe())]
    for key, fig in sorted(limits.details.items()):
        out.append((OK, f"limit:{key}", f"{fig.value} ({fig.source})"))
    slurm = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
    keys = (
        "SLURM_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
        "SLURM_CPUS_PER_TASK",
        "SLURM_MEM_PER_NODE",
        "SLURM_MEM_PER_CPU",
        "SLURM_JOB_CPUS_PER_NODE",
        "SLURMD_NODENAME",
    )
    shown = ", ".join(f"{k}={slurm[k]}" for k in keys if k in slurm)
    out.append((OK, "slurm", shown or "not inside a SLURM job"))
    over = {
        k: os.environ[k]
        for k in ("PACS_NUMBA_MAX_WORKERS", "PACS_SR_MAX_WORKERS")
        if k in os.environ
    }
    out.append((OK, "overrides", ", ".join(f"{k}={v}" for k, v in over.items()) or "none"))
    return out


def _writable(directory: Path) -> str | None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".pacs-probe-"):
            pass
    except OSError as exc:
        return str(exc)
    return None


def check_caches(cache_dir: Path | None) -> list[Check]:
    """Whether the volume cache and Numba's compile cache can be written."""
    out: list[Check] = []
    try:
        store = VolumeStore(cache_dir)
        info = store.info()
        err = _writable(Path(store.directory))
        if err:
            out.append(
                (
                    FAIL,
                    "volume cache",
                    f"{store.directory} is not writable: {err}; "
                    "use --cache-dir or PACS_NUMBA_CACHE_DIR",
                )
            )
        else:

            # no space in the value, so the line stays key=value greppable
            shown = {**info, "total_bytes": human_size(info["total_bytes"]).replace(" ", "")}
            shown["size"] = shown.pop("total_bytes")
            out.append((OK, "volume cache", ", ".join(f"{k}={v}" for k, v in shown.items())))
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        out.append((FAIL, "volume cache", str(exc)))

    if KERNEL_CACHE_DIR is None:
        out.append((WARN, "compile cache", "off (PACS_NUMBA_CACHE=0): every process compiles"))
        return out
    # One folder per build of the kernels (fast-math flags, constants, versions).
    target = KERNEL_CACHE_DIR
    user_dir = os.environ.get("NUMBA_CACHE_DIR", "")
    where = (
        f"{target} (NUMBA_CACHE_DIR={user_dir})"
        if user_dir
        else f"{target} (set NUMBA_CACHE_DIR to move it)"
    )
    err = _writable(target)
    if err:
        out.append(
            (
                WARN,
                "compile cache",
                f"{where} is not writable ({err}): every process "
                "will compile the kernels again (12-27 s); set NUMBA_CACHE_DIR to a "
                "writable per-user folder",
            )
        )
    else:
        out.append((OK, "compile cache", where))
    return out


def check_config(
    config_path: Path,
    workers: int | None = None,
    *,
    mem_budget_bytes: int | None = None,
    cache_dir: Path | None = None,
    plan_out: dict[str, Any] | None = None,
) -> list[Check]:
    """Load the config and plan the first task's stages exactly as ``train`` would.

    The plan comes from ``Engine.plan`` (the planner the engine itself calls), with the
    same ``--workers``, ``--mem-budget``, threading layer and patients per stage.  When
    ``plan_out`` is given, the machine-readable plan (`planning.plans_json`) is stored
    in it under ``"plan"``.
    """
    out: list[Check] = []
    try:
        cfg = load_config(config_path)
    except PacsError as exc:
        return [(FAIL, "config", str(exc))]
    p = cfg.pacs_sr
    out.append(
        (
            OK,
            "config",
            f"{config_path}: experiment {p.experiment_name}, "
            f"{len(cfg.data.models)} experts {list(cfg.data.models)}, patch {p.patch_size}, "
            f"stride {p.stride}",
        )
    )
    try:
        engine = Engine(
            cfg,
            RunOptions(cache_dir=cache_dir, workers=workers, mem_budget_bytes=mem_budget_bytes),
            limits=resource_limits.detect_limits(),
        )
        task = engine.tasks()[0]
        n_folds = len(engine.manifest()["folds"])
    except (PacsError, KeyError, IndexError) as exc:
        out.append(
            (
                WARN,
                "manifest",
                f"cannot size a patient from the manifest "
                f"'{cfg.data.out}' ({exc}); run `pacs-numba build-manifest` first",
            )
        )
        return out
    try:
        plans = engine.plan(task)
    except BudgetError as exc:
        return out + [(FAIL, f"plan:{getattr(exc, 'stage', 'fit')}", f"{task}: {exc}")]
    except PacsError as exc:
        return out + [(FAIL, "manifest", f"{task}: {exc}")]
    first = next(iter(plans.values()))
    out.append(
        (
            OK,
            "manifest",
            f"{cfg.data.out}: {n_folds} folds; {task}: "
            + ", ".join(f"{sp.n_patients} patients to {name}" for name, sp in plans.items())
            + f"; volume shape {first.shape}",
        )
    )
    for name, sp in plans.items():
        pool = sp.pool
        out.append(
            (
                OK,
                f"plan:{name}",
                f"{human_size(sp.cost.per_patient_bytes)} per patient; {pool.width} worker(s) x "
                f"{pool.threads} numba thread(s) ({pool.reason}); needs "
                f"{human_size(sp.needed_bytes)} at this width, "
                f"{human_size(sp.needed_bytes_one)} for one worker",
            )
        )
    if plan_out is not None:
        plan_out["plan"] = plans_json(plans)
    return out


def check_registration(config_path: Path) -> list[Check]:
    """With ``use_registration: true``: antspyx, the atlas files and one registration's cost.

    ``import ants`` costs ~250 MB and a few seconds, so it is tried only when the config
    turns registration on.
    """
    try:
        cfg = load_config(config_path)
    except PacsError:
        return []  # check_config reports it
    if not cfg.pacs_sr.use_registration or cfg.registration is None:
        return [(OK, "registration", "off (use_registration: false); antspyx not imported")]
    r = cfg.registration
    ok, what = ants_status()
    out: list[Check] = [
        (OK, "registration:antspyx", f"antspyx {what} imports")
        if ok
        else (FAIL, "registration:antspyx",
              f"antspyx does not import ({what}); pip install 'pacs-numba[registration]'")
    ]
    shapes = []
    for pulse in cfg.data.pulses:
        try:
            path = Path(r.atlas) / getattr(r, template_key(pulse))
        except PacsError as exc:
            out.append((FAIL, "registration:atlas", str(exc)))
            continue
        if not path.is_file():
            out.append((FAIL, "registration:atlas", f"pulse {pulse}: template '{path}' missing"))
            continue
        try:

            shapes.append(tuple(read_shape(path)[:3]))
        except PacsError as exc:
            out.append((FAIL, "registration:atlas", str(exc)))
            continue
        out.append((OK, "registration:atlas", f"pulse {pulse}: {path} {shapes[-1]}"))
    mask = Path(r.atlas) / r.brain_mask
    out.append((OK, "registration:mask",
                f"{mask}" if mask.is_file() else f"{mask} missing: atlas > 0 is the brain mask"))
    if shapes:
        limits = resource_limits.detect_limits()
        biggest = max(shapes, key=lambda s: s[0] * s[1] * s[2])
        need = registration_bytes(biggest, 1)
        level = OK if need < limits.memory.value else FAIL
        out.append((level, "registration:cost",
                    f"mode {r.mode}, settings {r.settings}: up to {limits.cpus.value} "
                    f"registration process(es) at once, 1 ITK thread each, ~{gib(need, 2)} "
                    f"each for {biggest} (limit {gib(limits.memory.value)})"))
    return out


def check_warmup() -> list[Check]:
    """Compile every kernel, then check that a new process loads them from the cache."""
    t0 = time.perf_counter()
    try:
        times = warm_kernels()
    except Exception as exc:  # noqa: BLE001 - a failed compile is a failed check
        return [(FAIL, "warmup", f"kernel compilation failed: {exc!r}")]
    total = time.perf_counter() - t0
    detail = ", ".join(f"{k} {v:.2f}s" for k, v in times.items())
    out: list[Check] = [(OK, "warmup", f"all kernels ready in {total:.1f}s ({detail})")]
    code = (
        "import json, time; t=time.perf_counter(); "
        "from pacs_numba.runs.warmup import warm_kernels, cache_counts; warm_kernels(); "
        "print(json.dumps([time.perf_counter()-t, *cache_counts()]))"
    )
    # The new process must import this very package (the cache is keyed by source path):
    # run it from an empty folder, with this package's parent first on PYTHONPATH.

    parent = os.path.dirname(PACKAGE_DIR)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (parent, env.get("PYTHONPATH", "")) if p)
    try:
        with tempfile.TemporaryDirectory() as cwd:
            res = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                check=True, cwd=cwd, env=env,
            )
        again, hits, misses = json.loads(res.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return out + [(WARN, "compile cache", f"could not test a cached start: {exc}")]
    if misses == 0 and hits > 0:
        out.append((OK, "compile cache", f"a new process loads every kernel from the cache "
                    f"({hits} cached, {again:.1f}s)"))
    else:
        out.append((WARN, "compile cache", f"a new process compiled {misses} kernel(s) again "
                    f"({again:.1f}s): check that NUMBA_CACHE_DIR is writable and persistent"))
    return out


_WHERE_CODE = (
    "import os, pacs_numba; print(os.path.dirname(os.path.realpath(pacs_numba.__file__)))"
)


def entry_point_package(env: dict[str, str] | None = None) -> tuple[str | None, str]:
    """Return the pacs_numba folder that the ``pacs-numba`` command imports, and the command.

    Runs the command's interpreter (from its ``#!`` line) in an empty folder, where
    nothing can shadow the installed package: a console script puts its own ``bin``
    folder first on ``sys.path``, not the current folder.  ``PYTHONPATH`` applies as it
    would to the command.  Returns ``(None, reason)`` when there is no such command or
    it cannot be run.
    """
    env = dict(os.environ if env is None else env)
    script = shutil.which("pacs-numba", path=env.get("PATH"))
    if script is None:
        return None, "no pacs-numba command on PATH"
    interp = sys.executable
    try:
        with open(script, "rb") as f:
            first = f.readline().decode("utf-8", "replace").strip()
        if first.startswith("#!") and "python" in first:
            interp = first[2:].split()[0]
    except OSError:
        pass
    with tempfile.TemporaryDirectory() as cwd:
        try:
            res = subprocess.run(
                [interp, "-c", _WHERE_CODE], cwd=cwd, env=env, capture_output=True,
                text=True, timeout=300, check=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"{script} could not be run: {exc}"
    return res.stdout.strip().splitlines()[-1], script


def check_package(env: dict[str, str] | None = None) -> list[Check]:
    """Which pacs_numba was checked, and whether ``pacs-numba`` imports that same copy."""
    here = PACKAGE_DIR
    other, script = entry_point_package(env)
    if other is None:
        return [(WARN, "package", f"checked the kernels of {here}; {script}, so the copy "
                 "that train will import is unknown")]
    if os.path.realpath(other) == here:
        return [(OK, "package", f"checked the kernels of {here}, the copy that {script} "
                 "imports")]
    return [(WARN, "package", f"checked the kernels of {here}, but {script} imports {other}: "
             "Numba keys its compile cache by source path, so its tasks compile the kernels "
             "again; run `pacs-numba diagnose` from a folder without a pacs_numba/ in it")]


def run_checks(
    config: Path | None = None,
    *,
    warmup: bool = False,
    cache_dir: Path | None = None,
    workers: int | None = None,
    mem_budget_bytes: int | None = None,
    plan_out: dict[str, Any] | None = None,
) -> list[Check]:
    """Every check, in order (``plan_out`` receives the config's plan, see `check_config`)."""
    checks: list[Check] = []
    checks += check_versions()
    checks += check_package()
    checks += check_threading()
    checks += check_limits()
    checks += check_caches(cache_dir)
    if config is not None:
        checks += check_config(config, workers, mem_budget_bytes=mem_budget_bytes,
                               cache_dir=cache_dir, plan_out=plan_out)
        checks += check_registration(config)
    if warmup:
        checks += check_warmup()
    return checks

