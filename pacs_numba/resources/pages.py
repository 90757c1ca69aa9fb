"""Give back the resident pages of volumes mapped from the volume cache.

A cache entry is a read-only, shared memory map of a ``.npy`` file
(:func:`pacs_numba.store.volumes.map_npy`).  Every page a kernel touches stays in the
process's resident set (and in what ``sacct`` and the job's memory watch report as its RSS)
until the mapping is dropped, although the page cache keeps the data whether or not the
process maps it.  A patient's volumes are read pass after pass, so without help all of them
stay resident for the whole patient: five full-size volumes are ~175 MB per patient in
flight.

:func:`release_pages` drops this process's mapping of a range of planes with
``madvise(MADV_DONTNEED)``.  For a shared, read-only file mapping that only removes page
table entries: the data stay in the page cache, and a later read maps them again (a minor
fault per 64 KiB, no disk read while the page cache holds them).  Nothing else is ever
touched: a private array (the ``memory`` volume cache, a volume decoded in memory), a
writable map or a view of anything else is left alone, since there the call would discard
data.
"""

from __future__ import annotations

import mmap

import numpy as np

#: Axis-0 planes of each volume a slab-by-slab pass reads before it gives them back
#: (``core.statistics.by_slabs``, ``core.scoring``): ~2.8 MB a volume at 200x230x190.
SLAB_PLANES = 16

_PAGE = mmap.PAGESIZE
_HAVE_MADVISE = hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")
#: Linux maps up to this much around a read fault of a file mapping ("fault-around").
_FAULT_AROUND = 64 << 10


def slab_resident_bytes(plane_bytes: int, n_volumes: int, planes: int = SLAB_PLANES) -> int:
    """Return what a slab-by-slab pass keeps mapped of ``n_volumes`` volumes at most.

    One slab of each (plus the slab after it, which the reads' fault-around and the kernel's
    threads may have started) and the fault-around window at each end.
    """
    return n_volumes * (2 * planes * int(plane_bytes) + 2 * _FAULT_AROUND)


def _read_only_map(arr: np.ndarray) -> np.memmap | None:
    """Return the read-only ``np.memmap`` whose buffer ``arr`` views, else None."""
    b: object = arr
    for _ in range(16):  # a view of a view of ...: a short chain in practice
        if isinstance(b, np.memmap):
            return b if b.mode == "r" and getattr(b, "_mmap", None) is not None else None
        b = getattr(b, "base", None)
        if b is None:
            return None
    return None


def release_pages(arr: np.ndarray, lo: int = 0, hi: int | None = None) -> int:
    """Drop this process's resident pages of planes ``lo:hi`` (axis 0) of a mapped volume.

    Parameters
    ----------
    arr : ndarray
        A C-contiguous array; only one that views a read-only ``np.memmap`` (a volume cache
        entry) is acted on, anything else is left as it is.
    lo, hi : int
        Planes along axis 0 (default all).  Pages shared with the planes just outside the
        range are dropped too: harmless, a read maps them again.

    Returns
    -------
    int
        Bytes of mapping released (0 when nothing was done).

    Notes
    -----
    The values ``arr`` reads are unchanged: the mapping is shared and read-only, so its pages
    come back from the page cache (or the file) as they were.  Safe while other threads read
    the same volume; they fault the pages back in.
    """
    if not _HAVE_MADVISE or arr.ndim == 0 or arr.size == 0 or not arr.flags.c_contiguous:
        return 0
    mm = _read_only_map(arr)
    if mm is None:
        return 0
    raw = mm._mmap
    n = arr.shape[0]
    hi = n if hi is None else min(hi, n)
    lo = max(lo, 0)
    if hi <= lo:
        return 0
    plane = arr.strides[0] if arr.ndim > 1 else arr.itemsize
    map_addr = np.frombuffer(raw, np.uint8, count=1).ctypes.data  # the mapping's first byte
    start = arr.ctypes.data - map_addr + lo * plane
    end = arr.ctypes.data - map_addr + hi * plane
    start -= start % _PAGE
    end = min(-(-end // _PAGE) * _PAGE, len(raw))
    if start < 0 or end <= start:
        return 0
    raw.madvise(mmap.MADV_DONTNEED, start, end - start)
    return end - start
