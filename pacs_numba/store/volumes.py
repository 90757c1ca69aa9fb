"""NIfTI input/output, the shared volume cache, and atomic writers.

This is the only module that imports nibabel.

Reading (algorithm B1)
    :func:`read_nifti` returns a volume exactly as
    ``nibabel.load(p).get_fdata(dtype=np.float32)`` would (scaling applied the
    nibabel way, a trailing singleton 4th axis squeezed), but C-ordered.
    ``.nii.gz`` files are decompressed with python-isal, about twice as fast as
    nibabel's reader, and nibabel then parses the in-memory bytes.

Caching (algorithm B1)
    A ``.nii.gz`` cannot be memory-mapped and nibabel hands data back in Fortran
    order, so :class:`VolumeStore` decompresses, scales and reorders each input
    once into a float32 C-order ``.npy`` file and afterwards opens it with
    ``np.load(mmap_mode="r")``.  Every thread and every process on the node that
    points at the same directory then shares one copy in the page cache.  In the
    ``memory`` mode (``PACS_NUMBA_VOLUME_CACHE=memory``, ``--volume-cache memory``)
    nothing is written: each volume is decompressed into the process's memory when a
    patient asks for it and freed when the patient lets go of it, for cohorts whose
    volumes do not fit on a node's disk (docs/performance.md, "Disk").

Writing (algorithm A8)
    Every writer writes a temporary file in the destination folder and moves it
    into place with :func:`os.replace`, so a reader never sees a partial file
    under the final name, and the temporary file is removed on failure.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from isal import isal_zlib
from numpy.typing import NDArray

from ..errors import ConfigError, InputError, OutputError
from ..resources.costs import VOLUME_CACHES
from ..resources.pages import release_pages
from ..resources.units import human_size, parse_size
from .atomic import host_tag, install_file
from .hdf5 import H5Source, h5_identity, parse_source, read_h5_header, read_h5_volume
from .integrity import file_identity, sweep_temp_files, writer_gone
from .locks import node_lock
from .nifti import NiftiMeta, load_volume, read_affine, read_shape

log = logging.getLogger(__name__)


try:
    import fcntl
except ImportError:  # not POSIX: no inter-process lock, atomic renames still keep entries whole
    fcntl = None  # type: ignore[assignment]


#: Environment variable naming the volume cache directory.
CACHE_DIR_ENV = "PACS_NUMBA_CACHE_DIR"


#: Environment variable choosing where decoded volumes live (`VOLUME_CACHES`).
VOLUME_CACHE_ENV = "PACS_NUMBA_VOLUME_CACHE"


#: Bytes of a cache entry beside its ``4N`` payload: the ``.npy`` header (128) and the
#: ``.json`` sidecar (header bytes, affine, identity: ~1.1 KB measured), rounded up to the
#: 4 KB block the sidecar takes on most file systems.
ENTRY_OVERHEAD_BYTES = 4096


#: Version of the cache entry layout; part of the key, so a new layout never reads an old entry.
#: 2: the key also covers device, inode, ctime and a content sample of the source.
#: 3: the sidecar holds the CRC-32 of the ``.npy`` payload, checked when an entry is opened.
CACHE_FORMAT = 3


#: Temporary cache files untouched for this long belong to a killed process; ``clear`` removes them.
STALE_TEMP_S = 3600.0








_KEY_RE = re.compile(r"^[0-9a-f]{32}$")


_ENTRY_RE = re.compile(r"^([0-9a-f]{32})\.(npy|json)$")


_TEMP_RE = re.compile(r"^\.([0-9a-f]{32})\.(npy|json)\.tmp-.+$")


_LOCK_RE = re.compile(r"^\.([0-9a-f]{32})\.lock$")


_CHUNK_ELEMS = 1 << 22  # nonfinite counting in 16 MB float32 chunks keeps temporaries small


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Identify a file's current version for resume records.

    Parameters
    ----------
    path : str or path-like
        A file, or an HDF5 dataset in the string form ``"file.h5::key"``.

    Returns
    -------
    dict
        ``{"path": absolute path (str), "size": bytes (int), "mtime_ns": int, "ctime_ns": int,
        "sample": content sample (str)}`` (see :func:`integrity.content_sample`); for an HDF5
        dataset ``{"path": "file::key", "h5": hdf5.h5_identity}``.

    Raises
    ------
    InputError
        If the file does not exist, cannot be examined or is not a regular file.
    """
    h5 = parse_source(path)
    if h5 is not None:  # an HDF5 dataset: its identity (file fields and dataset fields)
        src = _absolute(h5)
        return {"path": str(src), "h5": _h5_ident(src)}
    p = Path(os.path.abspath(path))
    _, ident = file_identity(p, open_verb="examine")
    return {"path": str(p), **{k: ident[k] for k in ("size", "mtime_ns", "ctime_ns", "sample")}}


#: Subfolders of the volume cache that other caches keep (statistics, registration).
_SUBFOLDERS = ("cellstats", "registered")


@dataclass(frozen=True, eq=False)
class CachedVolume:
    """A volume served from the cache.

    Attributes
    ----------
    data : (X, Y, Z) float32 ndarray
        Read-only, C-contiguous view of a memory map of the cache entry: the layout every
        kernel is compiled for (``_arrays.as_volume`` returns it unchanged, without a copy).
    meta : NiftiMeta
        For an HDF5 dataset, a NIfTI-1 header made from its shape and affine.
    source : pathlib.Path or H5Source
        Absolute path of the NIfTI file, as given (symlinks not resolved), or the HDF5
        dataset with its file's absolute path.
    nonfinite : int
        Number of NaN or infinite voxels, counted once when the entry was made.
    entry : pathlib.Path or None
        The ``.npy`` file mapped by ``data``; None in the ``memory`` mode, where ``data``
        is the process's own read-only array.
    """

    data: NDArray[np.float32]
    meta: NiftiMeta
    source: Path | H5Source
    nonfinite: int
    entry: Path | None


class _BadEntry(Exception):
    """A cache entry exists but cannot be used; the message says why."""


class VolumeStore:
    """Decompress each NIfTI input once into a shared cache of memory-mappable ``.npy`` files.

    Parameters
    ----------
    cache_dir : str or path-like, optional
        The cache directory.  Default: ``$PACS_NUMBA_CACHE_DIR`` if set, else
        ``<tempfile.gettempdir()>/pacs_numba-<user>/volumes`` (created with mode 0o700).
        The directory is created if needed and checked to be writable at construction.
        The statistics and registration caches live in it in either mode.
    mode : {"disk", "memory"}, optional
        Where decoded volumes live (:func:`volume_cache_mode`; default
        ``$PACS_NUMBA_VOLUME_CACHE``, else ``disk``).  ``memory``: :meth:`get` decodes into
        a private read-only array, writes nothing, and serves the same array to every
        caller while any of them holds it; once none does, it is freed and the next call
        decodes again.

    Raises
    ------
    InputError
        If the directory cannot be created or is not writable, or the default directory
        belongs to another user.
    ConfigError
        If the mode (or ``$PACS_NUMBA_VOLUME_CACHE``) is not one of `VOLUME_CACHES`.

    Notes
    -----
    An entry is ``<key>.npy`` (float32, C order) plus ``<key>.json`` (source path, size and
    mtime, shape, affine, zooms, header, nonfinite count, format version), where ``key`` hashes
    the source's resolved absolute path, size and ``mtime_ns``: a rewritten source gets a new
    key.  An entry is created under unique temporary names in the cache directory and moved
    into place with :func:`os.replace`, the ``.npy`` first and the ``.json`` last, so the
    ``.json`` marks a complete entry.  Within one process a per-key lock makes concurrent
    ``get`` calls for one file decompress it once.  Across processes (SLURM array tasks on one
    node) an advisory ``flock`` on ``.<key>.lock`` lets one process build while the others
    wait and then map its entry; where locks do not work, two creators may both decompress,
    but each rename installs a complete and identical file, so the last writer wins
    harmlessly.  An entry whose sidecar does not match its source or cannot be parsed, or whose
    ``.npy`` has the wrong header or size, is rebuilt with a WARNING.  Mappings already handed
    out stay valid when an entry is replaced or removed (POSIX keeps the old inode alive).

    On SLURM, ``tempfile.gettempdir()`` is often a per-job ``$TMPDIR`` that is wiped at the end
    of the job; set ``PACS_NUMBA_CACHE_DIR`` (or ``--cache-dir``) to node-local or shared
    scratch so that array tasks share one cache.

    In the ``memory`` mode no entry is read or written: each ``get`` of a file that nothing
    in the process holds decodes it (the same bytes as an entry's payload), and concurrent
    or later calls get the same array while any caller still holds it (the array or a view
    of it).  Processes share nothing, and a file used again after it was let go is decoded
    again: the fit needs a patient's volumes only while its statistics are not cached yet,
    the evaluation once per patient.
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None,
                 mode: str | None = None) -> None:
        self.mode = volume_cache_mode(mode)
        default = False
        if cache_dir is None:
            env = os.environ.get(CACHE_DIR_ENV, "").strip()
            if env:
                cache_dir = env
            else:
                cache_dir = Path(tempfile.gettempdir()) / f"pacs_numba-{_user_tag()}" / "volumes"
                default = True
        self.directory = Path(os.path.abspath(os.path.expanduser(cache_dir)))
        self.read_count = 0
        self._guard = threading.Lock()  # protects _key_locks, _live and read_count
        self._key_locks: dict[str, threading.Lock] = {}
        # Entries handed out and still referenced: a second get() reuses the mapping.
        self._live: weakref.WeakValueDictionary[str, CachedVolume] = weakref.WeakValueDictionary()
        # Entries whose payload matched their CRC-32, by key: the .npy's identity then.  An
        # entry is checksummed once per store (process), again if its file changed since.
        self._verified: dict[str, tuple[int, ...]] = {}
        # memory mode: the arrays handed out, by key, while anything holds them (a weak
        # reference to the array, its header and its nonfinite count)
        self._held: dict[str, tuple[weakref.ref, NiftiMeta, int]] = {}
        self._ensure_dir(default)

    def __repr__(self) -> str:
        return f"VolumeStore({str(self.directory)!r}, mode={self.mode!r})"

    # -- directory --------------------------------------------------------------------

    def _ensure_dir(self, default: bool = False) -> None:
        d = self.directory
        hint = f"choose a writable directory with --cache-dir or {CACHE_DIR_ENV}"
        try:
            if default:
                d.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                st = d.parent.lstat()
                if not d.parent.is_dir() or d.parent.is_symlink() or st.st_uid != os.getuid():
                    raise InputError(
                        f"volume cache directory '{d.parent}' is not a directory owned by you; "
                        f"{hint}"
                    )
                d.mkdir(mode=0o700, exist_ok=True)
            else:
                d.mkdir(parents=True, exist_ok=True)
            probe = d / f".probe-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(probe)
        except InputError:
            raise
        except OSError as exc:
            raise InputError(
                f"volume cache directory '{d}' is not writable ({exc.strerror or exc}); {hint}"
            ) from exc

    def info(self) -> dict[str, Any]:
        """Describe the cache.

        Returns
        -------
        dict
            ``directory`` (str), ``entries`` (complete entries, int), ``total_bytes`` (bytes of
            all cache files including temporaries, int), ``temp_files`` (int),
            ``stale_temp_files`` (temporary files whose writer is gone, see
            :meth:`sweep_temps`; int), ``stale_temp_bytes`` (int), ``writable`` (bool).
        """
        keys: set[str] = set()
        npys: set[str] = set()
        total = temps = stale = stale_bytes = 0
        now_ns = time.time_ns()
        for e in self._scan():
            name = e.name
            m = _ENTRY_RE.match(name)
            try:
                st = e.stat()
            except OSError:
                continue
            total += st.st_size
            if m:
                (npys if m.group(2) == "npy" else keys).add(m.group(1))
            elif _TEMP_RE.match(name):
                temps += 1
                if self._temp_gone(Path(e.path), st.st_mtime_ns, now_ns):
                    stale += 1
                    stale_bytes += st.st_size
        sub: dict[str, int] = {}
        for name in _SUBFOLDERS:
            files = size = 0
            for root, _, names in os.walk(self.directory / name):
                for f in names:
                    try:
                        size += os.lstat(os.path.join(root, f)).st_size
                    except OSError:
                        continue
                    files += 1
            sub[f"{name}_files"] = files
            sub[f"{name}_bytes"] = size
            total += size
        return {
            "directory": str(self.directory),
            "entries": len(keys & npys),
            "total_bytes": total,
            "temp_files": temps,
            "stale_temp_files": stale,
            "stale_temp_bytes": stale_bytes,
            "writable": os.access(self.directory, os.W_OK | os.X_OK),
            **sub,
        }

    def space_needed(
        self, sources: list[str | os.PathLike[str] | H5Source], voxels: int, *,
        exact: bool = True,
    ) -> dict[str, int]:
        """Estimate the disk that ``get`` of every source would still take here.

        Parameters
        ----------
        sources : list of path-like or H5Source
            Input volumes (NIfTI files or HDF5 datasets).
        voxels : int
            Voxels of one volume (a task's volumes share one grid).
        exact : bool, optional
            Look up which sources have an entry already (a stat and a content sample of
            each); False counts none as cached (a bound, with no file read).

        Returns
        -------
        dict
            ``inputs`` (int), ``cached`` (those with a complete entry here), ``needed_bytes``
            (``(4 * voxels + ENTRY_OVERHEAD_BYTES)`` per input without one; 0 in the
            ``memory`` mode, which writes none), ``free_bytes`` (free space of the cache
            directory's file system for this user, from :func:`shutil.disk_usage`; -1 if
            it cannot be read) and ``limit_bytes`` (``PACS_NUMBA_CACHE_MAX``, -1 if unset).
            An input that cannot be examined counts as not cached (its load reports it).
        """
        cached = 0
        for src in sources if exact else ():
            try:
                ident = _source_identity(_source(src))[1]
            except (InputError, OSError):
                continue
            cached += (self.directory / f"{_entry_key(ident)}.json").exists()
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            free = -1
        limit = cache_max_bytes()
        per = 0 if self.mode == "memory" else 4 * int(voxels) + ENTRY_OVERHEAD_BYTES
        return {"inputs": len(sources), "cached": cached,
                "needed_bytes": (len(sources) - cached) * per, "free_bytes": int(free),
                "limit_bytes": -1 if limit is None else int(limit)}

    def check_space(
        self, what: str, sources: list[str | os.PathLike[str] | H5Source], voxels: int,
        *, exact: bool = False,
    ) -> dict[str, int]:
        """Log what the volume cache will write for ``what`` and warn early if it cannot.

        One INFO line (inputs, bytes to write at most, free space) and a WARNING when the
        bytes still to write (at most ``PACS_NUMBA_CACHE_MAX``, which evicts older entries)
        exceed the free space: the run would otherwise stop with a full disk after hours of
        work.  Which inputs are cached already is looked up (a stat and a content sample of
        each: 32 ms for 60 full-size inputs here, 224 ms with the files' metadata not yet
        cached) when ``exact`` or when writing all of them would not fit.  Returns
        :meth:`space_needed`'s figures (``cached`` is 0 when not looked up).
        """
        need = self.space_needed(sources, voxels, exact=exact and self.mode != "memory")
        if self.mode == "memory":
            log.info("%s: volume cache in memory: %d inputs decoded per patient, none written",
                     what, need["inputs"])
            return need

        def growth(n: dict[str, int]) -> int:
            limit = n["limit_bytes"]
            return n["needed_bytes"] if limit < 0 else min(n["needed_bytes"], limit)

        free = need["free_bytes"]
        if not exact and 0 <= free < growth(need):
            need, exact = self.space_needed(sources, voxels), True
        grow = growth(need)
        log.info("%s: volume cache %s: %s, at most ~%s to write, %s free", what,
                 self.directory, f"{need['cached']} of {need['inputs']} inputs cached" if exact
                 else f"{need['inputs']} inputs", human_size(grow),
                 "?" if free < 0 else human_size(free))
        if 0 <= free < grow:
            log.warning(
                "%s: the volume cache '%s' needs ~%s more for %d inputs but its file system "
                "has %s free; the run would stop with a full disk.  Free space, choose a larger "
                "disk (--cache-dir or %s), cap the cache (%s, least recently used entries "
                "evicted) or keep volumes in memory (--volume-cache memory or %s=memory: each "
                "decoded per patient, nothing written)", what, self.directory, human_size(grow),
                need["inputs"] - need["cached"], human_size(free), CACHE_DIR_ENV,
                "PACS_NUMBA_CACHE_MAX", VOLUME_CACHE_ENV)
        return need

    @staticmethod
    def _temp_gone(path: Path, mtime_ns: int, now_ns: int) -> bool:
        """Tell whether a temporary cache file's writer is gone.

        Gone: its pid is not alive on this host, or the file is untouched for
        ``STALE_TEMP_S`` (a writer on another node sharing the cache).
        """
        return writer_gone(
            path, host=host_tag(), older_than_ns=now_ns - int(STALE_TEMP_S * 1e9),
            mtime_ns=mtime_ns,
        )

    def sweep_temps(self) -> list[Path]:
        """Remove the temporary files of writers that are gone; return their paths.

        Gone: the file names this host and a pid that no longer runs here, or it has not
        been written to for ``STALE_TEMP_S`` seconds.  A writer that is alive (here) or
        recent (possibly on another node sharing the cache) keeps its file.  Run at the
        start of every task and by ``clear``.
        """
        cutoff = time.time_ns() - int(STALE_TEMP_S * 1e9)
        temps = [Path(e.path) for e in self._scan() if _TEMP_RE.match(e.name)]
        return sweep_temp_files(temps, host=host_tag(), older_than_ns=cutoff)

    def clear(self) -> int:
        """Remove every entry, lock files, and the temporary files of writers that are gone.

        Only files named like cache files are touched.  Do not run it while another process
        is filling the cache: a removed entry is simply rebuilt, and a temporary file of a
        live writer (or a recent one from another node) is kept (:meth:`sweep_temps`).

        Returns
        -------
        int
            Number of entries (keys) of which a file was removed.
        """
        removed: set[str] = set()
        self.sweep_temps()
        for e in self._scan():
            m = _ENTRY_RE.match(e.name)
            try:
                if _TEMP_RE.match(e.name):
                    continue  # a live writer's (sweep_temps removed the dead ones)
                os.unlink(e.path)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot remove cache file %s: %s", e.path, exc.strerror or exc)
                continue
            if m:
                removed.add(m.group(1))
        with self._guard:
            self._live.clear()
        return len(removed)

    def _scan(self) -> Iterator[os.DirEntry[str]]:
        try:
            with os.scandir(self.directory) as it:
                for e in it:
                    ours = any(r.match(e.name) for r in (_ENTRY_RE, _TEMP_RE, _LOCK_RE))
                    if ours and e.is_file(follow_symlinks=False):
                        yield e
        except FileNotFoundError:
            return

    def prune(self, max_bytes: int | None = None, *, keep: str | None = None) -> dict[str, int]:
        """Remove entries whose source file is gone, then the least recently used over a size.

        Parameters
        ----------
        max_bytes : int, optional
            Keep the entries' ``.npy`` and ``.json`` files within this many bytes, removing
            the least recently used first (an entry's use time is its sidecar's mtime, set at
            every open).  None: only the entries whose source is gone.
        keep : str, optional
            A key never removed (the entry just built).

        Returns
        -------
        dict
            ``gone`` and ``evicted`` (entries removed), ``freed_bytes``, ``in_use`` (entries
            that would have gone but are held: mapped by a live process of this node, or
            open in this one) and ``bytes`` (what the entries hold afterwards).

        Notes
        -----
        An entry in use is never removed: this process's open entries, and any file that a
        process of this node maps (``/proc/<pid>/maps``, the processes this user may read).
        Each removal holds the entry's node lock, as its builder does.
        """
        entries = []
        for e in self._scan():
            m = _ENTRY_RE.match(e.name)
            if m and m.group(2) == "json":
                entries.append(m.group(1))
        mapped = _mapped_files()
        with self._guard:
            live = set(self._live)
        out = {"gone": 0, "evicted": 0, "freed_bytes": 0, "in_use": 0, "bytes": 0}
        rows = []
        for key in entries:
            npy, side = self.directory / f"{key}.npy", self.directory / f"{key}.json"
            try:
                size = npy.stat().st_size + side.stat().st_size
                used = side.stat().st_mtime
                source = json.loads(side.read_text(encoding="utf-8")).get("source", "")
            except (OSError, ValueError):
                continue
            busy = key in live or key == keep or str(npy) in mapped
            rows.append([used, key, size, busy, bool(source) and not os.path.exists(source)])
        total = sum(r[2] for r in rows)
        for r in sorted(rows, key=lambda r: r[0]):  # least recently used first
            used, key, size, busy, gone = r
            over = max_bytes is not None and total > max_bytes
            if not (gone or over):
                continue
            if busy:
                out["in_use"] += 1
                continue
            with node_lock(self.directory / f".{key}.lock"):
                for suffix in ("json", "npy"):  # the sidecar first: the entry stops existing
                    try:
                        os.unlink(self.directory / f"{key}.{suffix}")
                    except FileNotFoundError:
                        pass
            total -= size
            out["freed_bytes"] += size
            out["gone" if gone else "evicted"] += 1
        out["bytes"] = total
        if out["gone"] or out["evicted"]:
            log.info("volume cache %s: removed %d entries whose source is gone and %d least "
                     "recently used (%d bytes freed; %d in use kept)", self.directory,
                     out["gone"], out["evicted"], out["freed_bytes"], out["in_use"])
        return out

    # -- entries ----------------------------------------------------------------------

    def get(self, path: str | os.PathLike[str]) -> CachedVolume:
        """Return the volume at ``path``, decompressing it into the cache on first use.

        Parameters
        ----------
        path : str, path-like or H5Source
            A NIfTI file, as for :func:`read_nifti`, or an HDF5 dataset (an
            :class:`~pacs_numba.store.hdf5.H5Source` or its string form ``"file.h5::key"``),
            as for :func:`~pacs_numba.store.hdf5.read_h5_volume`: decompressed once into the
            same cache, keyed by :func:`~pacs_numba.store.hdf5.h5_identity` and the key.

        Returns
        -------
        CachedVolume
            ``data`` is a read-only, C-contiguous float32 memory map equal to
            ``read_nifti(path)[0]`` (in the ``memory`` mode: a private array, equal too).

        Raises
        ------
        InputError
            As :func:`read_nifti` for a bad input file.
        PacsError
            If the cache entry cannot be written (disk full, permissions); the message names
            the cache directory.

        Notes
        -----
        Thread-safe.  Concurrent calls for the same file wait for one decompression (in
        the ``memory`` mode: one per time the file is in use, see the class notes).
        """
        source = _source(path)
        for _ in range(3):
            st, ident = _source_identity(source)
            key = _entry_key(ident)
            with self._lock_for(key):
                if self.mode == "memory":
                    cv = self._in_memory(key, source, ident, st)
                    if cv is not None:
                        return cv
                    continue  # the source changed while it was read
                with self._guard:
                    cv = self._live.get(key)
                if cv is not None:
                    return cv
                try:
                    cv = self._open_entry(key, source, ident)
                except _BadEntry:
                    cv = None
                if cv is not None:
                    _touch(self.directory / f"{key}.json")  # last use, for prune's LRU order
                if cv is None:
                    # Missing or bad: let one process of the node build it while the others
                    # wait, then look again, since a waiter usually finds it ready.
                    with node_lock(self.directory / f".{key}.lock"):
                        try:
                            cv = self._open_entry(key, source, ident)
                        except _BadEntry as why:
                            log.warning(
                                "volume cache entry %s for '%s' is invalid (%s); rebuilding it",
                                self.directory / f"{key}.npy", source, why,
                            )
                        if cv is None:
                            cv = self._build(key, source, ident, st)
                            limit = cache_max_bytes()
                            if limit is not None:
                                self.prune(limit, keep=key)
                if cv is not None:
                    with self._guard:
                        self._live[key] = cv
                    return cv
            # The source changed between stat and read: its key is stale, start again.
        raise InputError(f"input '{source}' kept changing while it was read; is it being written?")

    def _in_memory(
        self, key: str, source: Path | H5Source, ident: dict[str, Any],
        st: os.stat_result | None,
    ) -> CachedVolume | None:
        """Serve :meth:`get` in the ``memory`` mode (under the key's lock): held array or decode.

        None if the source changed while it was read.  The returned array owns its memory,
        so any view of it keeps it alive and held.
        """
        held = self._held.get(key)
        data = held[0]() if held is not None else None
        if data is not None:
            return CachedVolume(data, held[1], source, held[2], None)
        got = self._decode(source, ident, st)
        if got is None:
            return None
        vol, meta, nonfinite = got
        if not vol.flags.owndata:  # a view would not keep the array held (numpy bases)
            vol = vol.copy()
        vol.flags.writeable = False
        held_map = self._held

        def forget(ref: weakref.ref) -> None:  # the last holder let go: the memory is freed
            if held_map.get(key, (None,))[0] is ref:
                held_map.pop(key, None)

        self._held[key] = (weakref.ref(vol, forget), meta, nonfinite)
        return CachedVolume(vol, meta, source, nonfinite, None)

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            lock = self._key_locks.get(key)
            if lock is None:
                lock = self._key_locks[key] = threading.Lock()
            return lock

    def _open_entry(
        self, key: str, source: Path | H5Source, ident: dict[str, Any]
    ) -> CachedVolume | None:
        """Open an existing entry; None if there is none, ``_BadEntry`` if it is unusable."""
        npy = self.directory / f"{key}.npy"
        side = self.directory / f"{key}.json"
        try:
            text = side.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None  # never made, or a creator has not committed it yet
        except (OSError, UnicodeDecodeError) as exc:
            raise _BadEntry(f"sidecar unreadable: {exc}") from exc
        try:
            rec = json.loads(text)
            if rec.get("format") != CACHE_FORMAT:
                raise _BadEntry(f"format {rec.get('format')!r}, expected {CACHE_FORMAT}")
            seen = {k: rec.get(k) for k in ident}
            if seen != ident:
                diff = [k for k in ident if seen[k] != ident[k]]
                raise _BadEntry(
                    f"sidecar describes {rec.get('source')} "
                    + " ".join(f"{k}={seen[k]}" for k in diff)
                    + ", not the source "
                    + " ".join(f"{k}={ident[k]}" for k in diff)
                )
            if rec["dtype"] != "<f4":
                raise _BadEntry(f"dtype {rec['dtype']!r}, expected '<f4'")
            meta = NiftiMeta._from_json(rec)
            nonfinite = int(rec["nonfinite"])
            crc = rec["crc32"]
            if not isinstance(crc, int):
                raise _BadEntry(f"crc32 {crc!r} is not an integer")
        except _BadEntry:
            raise
        except Exception as exc:  # json errors, missing keys, bad values, bad header bytes
            raise _BadEntry(f"sidecar unparsable: {type(exc).__name__}: {exc}") from exc
        data = map_npy(npy, meta.shape)
        self._verify(key, npy, data, crc)
        return CachedVolume(data, meta, source, nonfinite, npy)

    def _verify(self, key: str, npy: Path, data: NDArray[np.float32], crc: int) -> None:
        """Check the mapped payload against the CRC-32 its sidecar was written with.

        Once per store and entry file (a file changed since is checked again): 10-30 ms for
        a 197x233x189 volume from the page cache (docs/architecture.md), against ~1 s to
        decompress it.  ``_BadEntry`` if it differs (damaged in place: the entry is
        rebuilt).
        """
        try:
            st = os.stat(npy)
        except OSError as exc:
            raise _BadEntry(f".npy cannot be examined: {exc}") from exc
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, crc)
        with self._guard:
            if self._verified.get(key) == ident:
                return
        got = payload_crc32(data)
        release_pages(data)  # read once to check it; the kernels map what they read
        if got != crc:
            raise _BadEntry(
                f".npy content does not match the checksum it was written with (crc32 "
                f"{got:08x}, sidecar {crc:08x}): damaged after it was cached"
            )
        with self._guard:
            self._verified[key] = ident

    def _decode(
        self, source: Path | H5Source, ident: dict[str, Any], st: os.stat_result | None,
    ) -> tuple[NDArray[np.float32], NiftiMeta, int] | None:
        """Read ``source`` into a C-order ``<f4`` array with its header and nonfinite count.

        None if the source changed since ``st`` (or its HDF5 identity since ``ident``).
        """
        t0 = time.perf_counter()
        if isinstance(source, H5Source):
            vol, affine = read_h5_volume(source)
            meta = NiftiMeta.from_affine(vol.shape, affine)
            changed = _h5_ident(source) != ident
        else:
            vol, meta, st_read = load_volume(source)
            changed = st is None or _stat_id(st_read) != _stat_id(st)
        with self._guard:
            self.read_count += 1
        if changed:
            return None
        nonfinite = _count_nonfinite(vol)
        vol = np.ascontiguousarray(vol, dtype="<f4")  # the bytes write_array stores
        log.debug("decoded %s in %.0f ms (nonfinite=%d)", source,
                  1e3 * (time.perf_counter() - t0), nonfinite)
        return vol, meta, nonfinite

    def _build(
        self, key: str, source: Path | H5Source, ident: dict[str, Any],
        st: os.stat_result | None,
    ) -> CachedVolume | None:
        """Decompress ``source`` into a new entry; None if the source changed since ``st``."""
        t0 = time.perf_counter()
        got = self._decode(source, ident, st)
        if got is None:
            return None
        vol, meta, nonfinite = got
        crc = payload_crc32(vol)
        rec = {
            "format": CACHE_FORMAT,
            **ident,
            "dtype": "<f4",
            "nonfinite": nonfinite,
            "crc32": crc,
            **meta._to_json(),
        }
        side_text = json.dumps(rec, indent=1)
        npy = self.directory / f"{key}.npy"
        side = self.directory / f"{key}.json"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # survives a tmp cleaner
            install_file(npy, partial(np.lib.format.write_array, array=vol, allow_pickle=False))
            install_file(side, lambda f: f.write(side_text.encode("utf-8")))
        except OSError as exc:
            raise OutputError(
                f"cannot write volume cache entry {npy} for '{source}': "
                f"{exc.strerror or exc}; free space or choose another directory with "
                f"--cache-dir or {CACHE_DIR_ENV}"
            ) from exc
        data = map_npy(npy, meta.shape)  # the just-written pages are still in the page cache
        try:  # written from the checksummed array just now: no need to read it back
            st_npy = os.stat(npy)
            with self._guard:
                self._verified[key] = (st_npy.st_dev, st_npy.st_ino, st_npy.st_size,
                                       st_npy.st_mtime_ns, st_npy.st_ctime_ns, crc)
        except OSError:
            pass
        log.debug(
            "cached %s -> %s in %.0f ms (nonfinite=%d)",
            source, npy.name, 1e3 * (time.perf_counter() - t0), nonfinite,
        )
        return CachedVolume(data, meta, source, nonfinite, npy)


def volume_cache_mode(value: str | None = None) -> str:
    """Return where decoded volumes live: ``value`` if given, else ``$PACS_NUMBA_VOLUME_CACHE``.

    Default ``disk``.  Case and surrounding blanks are ignored.

    Raises
    ------
    ConfigError
        If the value (or the variable) is not one of `VOLUME_CACHES`; the message
        names the variable or ``--volume-cache``.
    """
    where = "--volume-cache"
    if value is None:
        value, where = os.environ.get(VOLUME_CACHE_ENV, ""), VOLUME_CACHE_ENV
        if not value.strip():
            return "disk"
    mode = str(value).strip().lower()
    if mode not in VOLUME_CACHES:
        raise ConfigError(
            f"{where}={value!r} is not a volume cache mode; expected one of "
            f"{', '.join(VOLUME_CACHES)} (disk: decoded once into the cache folder; "
            "memory: decoded per patient, nothing written)"
        )
    return mode


def cache_max_bytes() -> int | None:
    """Return the volume cache's size limit from ``PACS_NUMBA_CACHE_MAX`` (e.g. ``200G``).

    Raises
    ------
    InputError
        If the variable is set but not a size.
    """
    raw = os.environ.get("PACS_NUMBA_CACHE_MAX", "").strip()
    if not raw:
        return None
    try:
        return parse_size(raw)
    except ValueError as exc:
        raise InputError(f"PACS_NUMBA_CACHE_MAX={raw!r} is not a size such as 200G: {exc}") \
            from exc


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass  # a read-only cache: its LRU order is its creation order


def _mapped_files() -> set[str]:
    """Files mapped by the processes of this node that this user may inspect."""
    out: set[str] = set()
    try:
        pids = [d for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    i = line.find("/")
                    if i >= 0:
                        out.add(line[i:].rstrip("\n"))
        except OSError:
            continue
    return out


def _user_tag() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = ""
    user = re.sub(r"[^A-Za-z0-9._-]", "_", user)
    return user or str(os.getuid())


def _stat_id(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _identity(source: Path) -> tuple[os.stat_result, dict[str, Any]]:
    """Stat and content sample of ``source``: what a cache entry must match to be served.

    Device and inode catch a file replaced by another one (a rename over it); size, mtime
    and ctime catch writes (ctime cannot be set back by ``touch``/``os.utime``); the content
    sample (:func:`integrity.content_sample`) catches a same-size rewrite even where times
    are coarse or restored.
    """
    return file_identity(
        source, missing=f"input '{source}' does not exist; expected a NIfTI volume (.nii or "
        ".nii.gz)")


def _source(path: str | os.PathLike[str] | H5Source) -> Path | H5Source:
    """Return the absolute NIfTI path or HDF5 source ``path`` names (entries are keyed by it)."""
    h5 = parse_source(path)
    return _absolute(h5) if h5 is not None else Path(os.path.abspath(path))


def _source_identity(source: Path | H5Source) -> tuple[os.stat_result | None, dict[str, Any]]:
    """Return the stat (None for HDF5) and identity an entry of ``source`` must match."""
    if isinstance(source, H5Source):
        return None, _h5_ident(source)
    return _identity(source)


def _absolute(src: H5Source) -> H5Source:
    return H5Source(Path(os.path.abspath(src.file)), src.key)


def _h5_ident(src: H5Source) -> dict[str, Any]:
    """Return what a cache entry of an HDF5 dataset must match: its identity and key.

    Passed through JSON so that it compares equal to the sidecar's copy (tuples become lists).
    """
    return json.loads(json.dumps({**h5_identity(src), "h5_key": src.key}))


def volume_shape(src: str | os.PathLike[str] | H5Source) -> tuple[int, ...]:
    """Shape of a NIfTI file or HDF5 dataset from its header alone (no voxel data read).

    Raises
    ------
    InputError
        If the file (or the dataset) is missing or unreadable.
    """
    h5 = parse_source(src)
    return read_h5_header(h5)[0] if h5 is not None else read_shape(src)  # type: ignore[arg-type]


def volume_affine(src: str | os.PathLike[str] | H5Source) -> NDArray[np.float64]:
    """Affine of a NIfTI file or HDF5 dataset from its header alone (no voxel data read).

    Raises
    ------
    InputError
        If the file (or the dataset) is missing or unreadable.
    """
    h5 = parse_source(src)
    return read_h5_header(h5)[1] if h5 is not None else read_affine(src)  # type: ignore[arg-type]


def source_file(src: str | os.PathLike[str] | H5Source) -> Path:
    """Return the file a volume source lives in (the NIfTI file or the HDF5 file)."""
    h5 = parse_source(src)
    return h5.file if h5 is not None else Path(src)  # type: ignore[arg-type]


def _entry_key(ident: dict[str, Any]) -> str:
    text = "\0".join(f"{k}={ident[k]}" for k in sorted(ident))
    h = hashlib.sha256(f"v{CACHE_FORMAT}\0{text}".encode())
    return h.hexdigest()[:32]


def payload_crc32(vol: NDArray[np.float32]) -> int:
    """Return the CRC-32 of an array's bytes in C order (a cache entry's payload), as an int.

    ISA-L's CRC-32 (the zlib polynomial, so the value equals ``zlib.crc32``'s) releases the
    GIL and takes ~1.2 ms for a 35 MB volume on the 2-core build machine, against ~6-15 ms
    for zlib's (SHA-256 0.5 GB/s): a check against damage, not a cryptographic one (whoever
    can write the ``.npy`` can rewrite its sidecar too).
    """
    flat = np.ascontiguousarray(vol).reshape(-1).view(np.uint8)
    crc = 0
    for i in range(0, flat.size, 1 << 26):  # 64 MiB at a time: one bounded call each
        crc = isal_zlib.crc32(flat[i : i + (1 << 26)], crc)
    return crc


def _count_nonfinite(vol: np.ndarray) -> int:
    flat = vol.reshape(-1)
    n = 0
    for i in range(0, flat.size, _CHUNK_ELEMS):
        n += int(np.count_nonzero(~np.isfinite(flat[i : i + _CHUNK_ELEMS])))
    return n


# numpy parses .npy headers with ``ast.literal_eval``.  On CPython 3.11.7 two threads in the
# AST constructor at once can raise "SystemError: AST constructor recursion depth mismatch"
# (CPython gh-106905, fixed in later releases); the engine's threads map volumes concurrently,
# so header parsing is serialised.  It costs microseconds per volume.
_HEADER_LOCK = threading.Lock()


def map_npy(npy: Path, shape: tuple[int, int, int]) -> NDArray[np.float32]:
    """Memory-map a cache ``.npy`` after checking its header and size; ``_BadEntry`` if wrong."""
    try:
        with open(npy, "rb") as f, _HEADER_LOCK:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                hshape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                hshape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise _BadEntry(f".npy version {version}")
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise _BadEntry(".npy file missing") from None
    except _BadEntry:
        raise
    except (OSError, ValueError) as exc:
        raise _BadEntry(f".npy header unreadable: {exc}") from exc
    if tuple(hshape) != shape or fortran or dtype != np.dtype("<f4"):
        raise _BadEntry(
            f".npy holds {dtype} {hshape} fortran_order={fortran}, expected <f4 {shape} C order"
        )
    want = offset + math.prod(shape) * 4
    if size != want:
        raise _BadEntry(f".npy is {size} bytes, expected {want} for shape {shape}")
    try:
        # The header was parsed above; map with it rather than letting np.load parse it again.
        mm = np.memmap(npy, dtype="<f4", mode="r", offset=offset, shape=shape, order="C")
    except (OSError, ValueError) as exc:
        raise _BadEntry(f".npy cannot be mapped: {exc}") from exc
    vol = mm.view(np.ndarray)  # as _arrays.as_volume does: a plain ndarray over the same map
    vol.flags.writeable = False
    return vol
