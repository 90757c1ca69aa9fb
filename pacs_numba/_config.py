"""Package-wide settings: Numba decorator options, dtypes, tolerances, ``PACS_*`` overrides.

Everything a kernel needs from configuration comes from here, so the compiled
code and its cache depend on one small module (docs/architecture.md, caches).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import llvmlite
import numba
import numpy as np
from numba.misc.appdirs import AppDirs  # where Numba itself falls back to


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


def _writable_dir(path: Path) -> bool:
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _kernel_cache_base() -> Path:
    """NUMBA_CACHE_DIR if set; else the kernels' __pycache__, or Numba's per-user folder."""
    if numba.config.CACHE_DIR:
        return Path(numba.config.CACHE_DIR)
    in_tree = Path(__file__).resolve().parent / "kernels" / "__pycache__"
    if _writable_dir(in_tree):
        return in_tree

    return Path(AppDirs(appname="numba", appauthor=False).user_cache_dir)


#: Everything the compiled kernels depend on besides their source (see kernel_cache_key).
KERNEL_CACHE_KEY: dict[str, Any] = kernel_cache_key(globals())
#: Digest of KERNEL_CACHE_KEY; names the compile-cache folder.
KERNEL_CACHE_DIGEST: str = kernel_cache_digest(KERNEL_CACHE_KEY)
#: The folder compiled kernels are saved in and loaded from (None when caching is off).
KERNEL_CACHE_DIR: Path | None = None
if CACHE:
    KERNEL_CACHE_DIR = _kernel_cache_base() / f"pacs_numba-{KERNEL_CACHE_DIGEST}"
    numba.config.CACHE_DIR = str(KERNEL_CACHE_DIR)
