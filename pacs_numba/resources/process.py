"""What this process holds: resident set size, the JIT's share, glibc's arenas (algorithm B5).

The planner (:mod:`pacs_numba.resources.planning`) starts from `baseline_bytes`, the memory the
process needs before any patient: what it holds now plus what loading (or compiling) the
kernels will add.  `pin_mmap_threshold` makes the resident set follow the live arrays,
so the cost model of :mod:`pacs_numba.resources.costs` describes what the kernel really charges.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import resource
import sys
from collections.abc import Mapping

import psutil

log = logging.getLogger(__name__)


_KIB = 1 << 10


_MIB = 1 << 20


#: Memory that loading every kernel from a warm Numba cache adds (LLVM code
#: objects, NRT, type caches): measured 22-30 MiB for all kernels between the
#: Engine's start and the end of a run, whatever the volume shape.
WARM_JIT_BYTES = 32 * _MIB


#: Memory that compiling every kernel adds when the cache is cold or off (LLVM
#: keeps the compiled modules): measured ~300 MiB retained (numba 0.60-0.61, 4
#: experts), almost all of it still resident at the end of the run.
COLD_JIT_BYTES = 320 * _MIB


def current_rss_bytes() -> int:
    """Resident set size of this process now, in bytes (psutil).

    Returns
    -------
    int
    """
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Returns
    -------
    int
        ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which Linux reports in
        KiB and macOS in bytes.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * _KIB)


_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def pin_mmap_threshold(threshold_bytes: int = _MIB,
                       env: Mapping[str, str] | None = None) -> bool:
    """Make glibc serve every allocation of ``threshold_bytes`` or more with its own mmap.

    Parameters
    ----------
    threshold_bytes : int, optional
        Allocations at least this large are mapped and unmapped on their own
        (default 1 MiB: every volume-sized array; small scratch stays on the heap).
    env : mapping, optional
        Environment (default ``os.environ``); if it sets
        ``MALLOC_MMAP_THRESHOLD_``, glibc already obeys that and nothing is done.

    Returns
    -------
    bool
        Whether the threshold was set (False off glibc, e.g. macOS or musl).

    Notes
    -----
    glibc raises its mmap threshold to the size of every mapped block that is
    freed (up to 32 MiB), so after the first volume is freed, later volumes of
    up to 32 MiB (up to 8M float32 voxels, e.g. 160x192x160) come from the
    per-thread malloc arenas, which keep freed blocks resident.  Measured on a
    160x192x160 cohort: +20-40 MiB of RSS at one worker that no live array
    accounts for.  Setting the threshold explicitly turns the dynamic
    adjustment off, so RSS follows the live arrays (:mod:`pacs_numba.resources.costs`); no
    run-time cost was measurable.  Call it once at start-up, before the pool.
    """
    env = os.environ if env is None else env
    if env.get("MALLOC_MMAP_THRESHOLD_", "").strip():
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))


_KERNEL_MODULES = ("blend", "metrics", "probe", "qp", "stats")


def kernel_cache_state() -> tuple[int, int]:
    """Count the package's kernels and those the Numba cache can serve.

    Returns
    -------
    (n_kernels, n_cached) : tuple of int
        Every ``@njit`` dispatcher defined in ``pacs_numba.kernels``, and those
        whose on-disk cache index exists and matches the current source (what
        Numba's own loader checks before it loads instead of compiling).  With
        the cache off (``PACS_NUMBA_CACHE=0``) ``n_cached`` is 0.  ``(0, 0)``
        if the kernels cannot be inspected.
    """
    total = cached = 0
    for name in _KERNEL_MODULES:
        try:
            mod = importlib.import_module(f"pacs_numba.kernels.{name}")
        except Exception as exc:  # noqa: BLE001 - an estimate; never fail the run for it
            log.debug("cannot inspect kernels of %s: %s", name, exc)
            return 0, 0
        for obj in vars(mod).values():
            py_func = getattr(obj, "py_func", None)
            if py_func is None or getattr(py_func, "__module__", None) != mod.__name__:
                continue
            total += 1
            cache = getattr(obj, "_cache", None)
            try:
                if cache is not None and cache._cache_file._load_index():
                    cached += 1
            except Exception:  # noqa: BLE001 - numba internals: unreadable = not cached
                pass
    return total, cached


def baseline_bytes(*, compile_allowance_bytes: int | None = None,
                   fallback_rss_bytes: int = 400 * _MIB) -> int:
    """Memory the process needs before any patient: RSS now + a JIT allowance.

    Parameters
    ----------
    compile_allowance_bytes : int, optional
        Memory the kernels will add when they are first used, after this is
        measured.  None (default): from the Numba cache (`kernel_cache_state`):
        ``WARM_JIT_BYTES`` (32 MiB) if every kernel loads from the cache, else
        ``WARM_JIT_BYTES`` plus ``COLD_JIT_BYTES`` (320 MiB) times the fraction
        of kernels that must be compiled.
    fallback_rss_bytes : int, optional
        Used when psutil cannot read the RSS: roughly the interpreter plus
        numpy, scipy, numba and nibabel imported.

    Returns
    -------
    int
        Current RSS (call this after the imports, as the engine does when it
        plans a pool) + the allowance.

    Notes
    -----
    Measured on ``pacs-numba train`` (4 experts): RSS after the imports and the
    Engine's start 160-165 MiB (about 70 MiB anonymous + 93 MiB of mapped
    shared libraries), 185-195 MiB once every kernel is loaded from a warm
    cache; compiling them all instead left ~300 MiB more resident.  Both are
    independent of the volume shape.  Calling it again once the kernels are
    loaded counts them twice (RSS and allowance): at most 32 MiB too much with
    a warm cache.
    """
    if compile_allowance_bytes is None:
        total, cached = kernel_cache_state()
        cold_fraction = (total - cached) / total if total else 1.0
        compile_allowance_bytes = int(WARM_JIT_BYTES + COLD_JIT_BYTES * cold_fraction)
    try:
        rss = current_rss_bytes()
    except Exception:  # noqa: BLE001 - any psutil failure: fall back to the estimate
        rss = fallback_rss_bytes
    return int(rss + compile_allowance_bytes)
