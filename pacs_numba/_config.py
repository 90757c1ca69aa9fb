"""Package-wide settings: Numba decorator options, dtypes, tolerances, ``PACS_*`` overrides.

Everything a kernel needs from configuration comes from here, so the compiled
code and its cache depend on one small module (docs/architecture.md, caches).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import llvmlite
import numba
import numpy as np


def _env_flag(name: str, default: bool) -> bool:
    """Read an on/off environment switch; an unknown value warns and keeps the default."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    warnings.warn(
        f"{name}={raw!r} is not one of 1/0, true/false, yes/no, on/off; using the default "
        f"({'on' if default else 'off'})",
        stacklevel=2,
    )
    return default


#: LLVM fast-math flags for every kernel.  No ``nnan``/``ninf``: kernels test
#: ``np.isfinite`` to keep NaN voxels out of masks and statistics.
FASTMATH: set[str] | bool = (
    {"nsz", "arcp", "contract", "afn", "reassoc"} if _env_flag("PACS_FASTMATH", True) else False
)
#: Numba on-disk compile cache (``PACS_NUMBA_CACHE=0`` turns it off).
CACHE: bool = _env_flag("PACS_NUMBA_CACHE", True)
#: Volume dtype everywhere outside the accumulators.
DTYPE = np.float32

#: Floors and epsilons of the reference algorithm (docs/algorithm.md part A).
SD_FLOOR = 1e-8          # A3.2 std floor
EDGE_EPS = 1e-6          # A3.4 max(g) + eps
BLEND_EPS = 1e-8         # A7.4 acc / (den + eps)
SMOOTH_EPS = 1e-8        # A6 renormalisation
ENTROPY_EPS = 1e-10      # A8 entropy map
PSNR_EPS = 1e-12         # A7.6
SSIM_MIN_RANGE = 1e-7    # A7.6 slices with a smaller data range are skipped
BRAIN_THRESHOLD = 0.1    # A7.5 raw-HR threshold of the brain mask
GATE_QUANTILE = 0.9      # A5.2 edge gate = min(1, sobel / this quantile over the head)

#: Codes the kernels take instead of strings.
GRAD_OPERATORS = {"sobel": 0, "prewitt": 1, "scharr": 2}
WINDOWS = {"flat": 0, "hann": 1}
PRIORS = ("none", "multiscale")   # A5.1 pacs_sr.prior (first = default)
GATINGS = ("none", "edge")        # A5.2 pacs_sr.gating (first = default)
HR_FREE_MAPPINGS = ("mean", "weighted")  # B6 pacs_sr.hr_free_mapping (first = default)
FIT_NORMALISATIONS = ("hr", "experts")   # A4 pacs_sr.fit_normalisation (first = default)
SSIM_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}

# Numba's default "workqueue" threading layer aborts the process when two Python
# threads launch parallel kernels at once.  "threadsafe" picks omp or tbb.  It must
# be chosen before the first parallel kernel compiles; the engine verifies what it
# got with numba.threading_layer() and degrades to one worker if it is workqueue.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"


# --------------------------------------------------------------------------------------
# Compile-cache identity
# --------------------------------------------------------------------------------------
# Numba keys a cached kernel by its signature, the bytecode and a hash of its own source
# file.  Fast-math flags and the module-level constants it reads (frozen into the machine
# code at compile time) are not part of that key: with one shared cache folder,
# PACS_FASTMATH=0 would load the fast-math build, and a new SD_FLOOR here would not
# recompile anything.  So the kernels get one cache folder per digest of everything
# above that changes their code, chosen before any kernel is decorated (Numba's cache
# locator reads numba.config.CACHE_DIR when ``@njit(cache=True)`` runs, i.e. when
# pacs_numba.kernels is imported).  A user's NUMBA_CACHE_DIR stays the base folder.


def _kernel_settings(namespace: Mapping[str, Any]) -> dict[str, str]:
    """Every UPPER_CASE setting of ``namespace`` as text, the way kernels see it."""
    out = {}
    for name, value in namespace.items():
        if not name.isupper() or name.startswith("KERNEL_CACHE") or name == "CACHE":
            continue
        if isinstance(value, (set, frozenset)):
            value = sorted(value)
        elif isinstance(value, dict):
            value = sorted(value.items())
        out[name] = repr(value)
    return out


def kernels_source_digest(folder: Path) -> str:
    """Return a digest of every ``*.py`` source in ``folder`` (the kernels), by name and bytes.

    Numba's own cache key covers a kernel's own file but not the helpers it calls from a
    sibling file: editing ``kernels/grid.py`` would leave every kernel that inlines its tile
    arithmetic running stale machine code.  Any edit to any kernel file changes this digest,
    and with it the compile-cache folder, so everything is compiled afresh.
    """
    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.py")):
        h.update(path.name.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def kernel_cache_key(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Return what the compiled kernels depend on besides their own source.

    Parameters
    ----------
    namespace : mapping
        Module globals holding the settings (this module's ``globals()``); every
        UPPER_CASE name counts (``FASTMATH``, ``SD_FLOOR``, ...), so a new constant is
        part of the key without being listed anywhere.

    Returns
    -------
    dict
        ``settings`` (name -> repr), the digest of the kernels' sources
        (:func:`kernels_source_digest`), and the versions of Python, Numba, llvmlite and
        NumPy.
    """
    return {
        "settings": _kernel_settings(namespace),
        "kernels_source": kernels_source_digest(Path(__file__).resolve().parent / "kernels"),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "numba": numba.__version__,
        "llvmlite": llvmlite.__version__,
        "numpy": np.__version__,
    }


def kernel_cache_digest(key: Mapping[str, Any]) -> str:
    """Return a short, stable hex digest of :func:`kernel_cache_key`'s result."""
    text = json.dumps(key, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _usable_cache_dir(path: Path) -> bool:
    """Tell whether Numba can keep a cache in ``path`` (create it, write a file there).

    Numba's locator makes the same check before it accepts a folder.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def user_cache_base() -> Path:
    """Return the per-user folder for compiled kernels: ``$XDG_CACHE_HOME/pacs_numba/numba``.

    ``XDG_CACHE_HOME`` defaults to ``~/.cache`` (the system temp folder without a home).
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    try:
        root = Path(xdg) if xdg else Path.home() / ".cache"
    except RuntimeError:  # no home directory
        root = Path(tempfile.gettempdir()) / f"pacs_numba-{os.getuid()}"
    return root / "pacs_numba" / "numba"


def _seed_from(read_only: Path, target: Path) -> None:
    """Copy an administrator's warm cache (read-only) into a new per-user folder.

    Numba accepts only a writable cache folder, so a warm cache in a read-only install is
    never read where it is; copying its few megabytes once is what loads it instead of
    compiling again.  A partial copy is harmless (missing kernels compile).
    """
    if not read_only.is_dir() or any(target.iterdir()):
        return
    try:
        shutil.copytree(read_only, target, dirs_exist_ok=True)
    except OSError:
        pass


def choose_kernel_cache(digest: str) -> tuple[Path | None, str | None]:
    """Return the compile-cache folder of this digest and a WARNING to log, if any.

    One place for every run, ``diagnose --warmup`` and SLURM array tasks alike:
    ``NUMBA_CACHE_DIR`` if the user set it, else the kernels' ``__pycache__`` in the
    package, else (a read-only install) the per-user :func:`user_cache_base`, seeded from
    a warm cache in the package.  None when nothing is writable: kernels then compile in
    every run, uncached.
    """
    folder = f"pacs_numba-{digest}"
    in_tree = Path(__file__).resolve().parent / "kernels" / "__pycache__"
    tried = []
    if numba.config.CACHE_DIR:
        tried.append(("NUMBA_CACHE_DIR", Path(numba.config.CACHE_DIR)))
    tried += [("the package folder", in_tree), ("the per-user folder", user_cache_base())]
    for i, (what, base) in enumerate(tried):
        path = base / folder
        if not _usable_cache_dir(path):
            continue
        note = None
        if i > 0:
            first_what, first = tried[0]
            note = (f"{first_what} {first} is not writable; compiled kernels are cached in "
                    f"{what} {base} instead")
            if base != in_tree:
                _seed_from(in_tree / folder, path)
        return path, note
    where = ", ".join(f"{w} {b}" for w, b in tried)
    return None, (f"no writable folder for compiled kernels (tried {where}); kernels are "
                  "compiled in every run, uncached: set NUMBA_CACHE_DIR to a writable folder")


#: Everything the compiled kernels depend on besides their source (see kernel_cache_key).
KERNEL_CACHE_KEY: dict[str, Any] = kernel_cache_key(globals())
#: Digest of KERNEL_CACHE_KEY; names the compile-cache folder.
KERNEL_CACHE_DIGEST: str = kernel_cache_digest(KERNEL_CACHE_KEY)
#: The folder compiled kernels are saved in and loaded from (None when caching is off).
KERNEL_CACHE_DIR: Path | None = None
#: Why the compile cache is not where it would normally be (logged as a WARNING), or None.
KERNEL_CACHE_NOTE: str | None = None
if CACHE:
    KERNEL_CACHE_DIR, KERNEL_CACHE_NOTE = choose_kernel_cache(KERNEL_CACHE_DIGEST)
    if KERNEL_CACHE_DIR is None:
        CACHE = False  # kernels read this when they are decorated, after this module
    else:
        numba.config.CACHE_DIR = str(KERNEL_CACHE_DIR)
