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
    points at the same directory then shares one copy in the page cache.

Writing (algorithm A8)
    Every writer writes a temporary file in the destination folder and moves it
    into place with :func:`os.replace`, so a reader never sees a partial file
    under the final name, and the temporary file is removed on failure.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import io
import json
import logging
import math
import os
import platform
import re
import tempfile
import threading
import time
import weakref
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from nibabel.fileholders import FileHolder
from numpy.typing import ArrayLike, NDArray

try:
    import fcntl
except ImportError:  # not POSIX: no inter-process lock, atomic renames still keep entries whole
    fcntl = None  # type: ignore[assignment]

from ._checks import readonly
from .errors import InputError, OutputError
from .integrity import (
    content_sample,
    open_regular,
    require_regular_file,
    sweep_temp_files,
    writer_gone,
)

log = logging.getLogger(__name__)

__all__ = [
    "CachedVolume",
    "NiftiMeta",
    "VolumeStore",
    "atomic_savez",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "file_fingerprint",
    "read_nifti",
    "write_nifti",
]

#: Environment variable naming the volume cache directory.
CACHE_DIR_ENV = "PACS_NUMBA_CACHE_DIR"
#: Version of the cache entry layout; part of the key, so a new layout never reads an old entry.
#: 2: the key also covers device, inode, ctime and a content sample of the source.
CACHE_FORMAT = 2
#: gzip level of written ``.nii.gz`` files: level 1 is 3-10x faster than nibabel's default and
#: float32 MRI data compresses only a few per cent better at higher levels.
GZIP_LEVEL = 1
#: Temporary cache files untouched for this long belong to a killed process; ``clear`` removes them.
STALE_TEMP_S = 3600.0
#: Longest wait for another process that is building the same cache entry.
LOCK_WAIT_S = 300.0

_GZIP_MAGIC = b"\x1f\x8b"
_NIFTI1_SIZEOF_HDR = 348
_NIFTI2_SIZEOF_HDR = 540
_KEY_RE = re.compile(r"^[0-9a-f]{32}$")
_ENTRY_RE = re.compile(r"^([0-9a-f]{32})\.(npy|json)$")
_TEMP_RE = re.compile(r"^\.([0-9a-f]{32})\.(npy|json)\.tmp-.+$")
_LOCK_RE = re.compile(r"^\.([0-9a-f]{32})\.lock$")
_CHUNK_ELEMS = 1 << 22  # nonfinite counting in 16 MB float32 chunks keeps temporaries small


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NiftiMeta:
    """Geometry and header of a NIfTI volume.

    Attributes
    ----------
    shape : tuple of int
        The 3-D shape of the volume (a trailing singleton 4th axis removed).
    affine : (4, 4) float64 ndarray
        Voxel-to-world affine, as ``nibabel`` reports it (``img.affine``); read-only.
    zooms : tuple of float
        Voxel sizes of the three spatial axes.
    header_bytes : bytes
        The header as nibabel serialises it (``header.write_to``), extensions included.
        :attr:`header` rebuilds a nibabel header from it.
    nifti_version : int
        1 or 2.

    Notes
    -----
    The header is kept as bytes, not as a nibabel object, because nibabel headers are mutable
    and one ``NiftiMeta`` is shared by every thread: each :attr:`header` call returns a new
    object that the caller may change freely.  Equality is identity (``eq=False``), since
    the fields hold an array.
    """

    shape: tuple[int, int, int]
    affine: NDArray[np.float64]
    zooms: tuple[float, float, float]
    header_bytes: bytes
    nifti_version: int = 1

    @property
    def header(self) -> nib.Nifti1Header:
        """A new nibabel header (``Nifti1Header`` or ``Nifti2Header``) parsed from the bytes."""
        cls = nib.Nifti2Header if self.nifti_version == 2 else nib.Nifti1Header
        return cls.from_fileobj(io.BytesIO(self.header_bytes))

    def _to_json(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "affine": self.affine.tolist(),
            "zooms": list(self.zooms),
            "nifti_version": self.nifti_version,
            "header_b64": base64.b64encode(self.header_bytes).decode("ascii"),
        }

    @classmethod
    def _from_json(cls, d: dict[str, Any]) -> NiftiMeta:
        """Rebuild from :meth:`_to_json` output (``ValueError``, ``KeyError``... if damaged)."""
        shape = tuple(int(n) for n in d["shape"])
        affine = np.array(d["affine"], dtype=np.float64)
        zooms = tuple(float(z) for z in d["zooms"])
        version = int(d["nifti_version"])
        if len(shape) != 3 or min(shape) < 1 or affine.shape != (4, 4) or len(zooms) != 3:
            raise ValueError("bad shape, affine or zooms")
        if version not in (1, 2):
            raise ValueError(f"bad nifti_version {version}")
        meta = cls(_shape3(shape), readonly(affine), _zooms3(zooms),
                   base64.b64decode(d["header_b64"], validate=True), version)
        meta.header  # noqa: B018  -- parse once so a damaged header is caught here
        return meta


def read_nifti(path: str | os.PathLike[str]) -> tuple[NDArray[np.float32], NiftiMeta]:
    """Read a 3-D NIfTI volume as a C-contiguous float32 array.

    Parameters
    ----------
    path : str or path-like
        A NIfTI-1 or NIfTI-2 single file, ``.nii`` or ``.nii.gz``.  Compression is detected
        from the content, not the name.

    Returns
    -------
    data : (X, Y, Z) float32 ndarray, C-contiguous, writeable
        Equal to ``nibabel.load(path).get_fdata(dtype=np.float32)`` (``scl_slope`` and
        ``scl_inter`` applied exactly as nibabel applies them), with a trailing singleton 4th
        axis squeezed.
    meta : NiftiMeta
        Shape, affine, zooms and header.

    Raises
    ------
    InputError
        The file is missing, empty, unreadable, a damaged or truncated gzip stream, not a
        NIfTI single file, not 3-D (a 4-D file with more than one volume, a 2-D image), or holds
        complex or RGB voxels.

    Notes
    -----
    gzip is decompressed with python-isal (about 2x faster than zlib), then nibabel parses the
    bytes from memory and applies the scaling, so values are nibabel's by construction.  When
    the header asks for no scaling, the float32 cast that nibabel would do is done on a view of
    the decompressed bytes instead, sparing one copy.  The one reordering copy from NIfTI's
    Fortran order to C order is unavoidable.

    Examples
    --------
    >>> data, meta = read_nifti("sub-01-T1w.nii.gz")  # doctest: +SKIP
    >>> data.flags.c_contiguous, data.dtype, meta.shape == data.shape  # doctest: +SKIP
    (True, dtype('float32'), True)
    """
    vol, meta, _ = _load(Path(path))
    return vol, meta


def _read_source(p: Path) -> tuple[bytes, os.stat_result]:
    """Read the whole file; return its bytes and the stat of what was read."""
    for _ in range(3):
        try:
            # O_NONBLOCK open + regular-file check: a FIFO is refused instead of hanging
            with open(open_regular(p), "rb") as f:
                st = os.fstat(f.fileno())
                buf = f.read()
                st_after = os.fstat(f.fileno())
        except FileNotFoundError:
            raise InputError(
                f"input '{p}' does not exist; expected a NIfTI volume (.nii or .nii.gz)"
            ) from None
        except IsADirectoryError:
            raise InputError(f"input '{p}' is a directory; expected a NIfTI file") from None
        except OSError as exc:
            raise InputError(f"cannot read input '{p}': {exc.strerror or exc}") from exc
        same = (st.st_size, st.st_mtime_ns) == (st_after.st_size, st_after.st_mtime_ns)
        if same and len(buf) == st.st_size:
            break
    else:
        raise InputError(f"input '{p}' kept changing while it was read; is it still being written?")
    if not buf:
        raise InputError(
            f"input '{p}' is empty (0 bytes); expected a NIfTI volume (an interrupted copy?)"
        )
    return buf, st


def _gunzip(p: Path, raw: bytes) -> bytes:
    """Decompress every gzip member of ``raw``; ignore trailing non-gzip bytes, as gzip does."""
    parts: list[bytes] = []
    rest = raw
    try:
        while True:
            d = isal_zlib.decompressobj(wbits=31)  # 31: gzip wrapper, CRC32 and length checked
            parts.append(d.decompress(rest))
            if not d.eof:
                raise InputError(
                    f"input '{p}' is truncated: its gzip stream ends early "
                    f"({len(raw)} bytes on disk); re-copy or regenerate the file"
                )
            rest = d.unused_data
            if not rest.startswith(_GZIP_MAGIC):
                break
    except isal_zlib.error as exc:
        raise InputError(
            f"input '{p}' is a damaged gzip file ({exc}); expected a gzip-compressed NIfTI volume"
        ) from exc
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _nifti_version(buf: bytes) -> int | None:
    """1 or 2 for a NIfTI single-file header at the start of ``buf``, else None."""
    for order in ("little", "big"):
        n = int.from_bytes(buf[:4], order)
        if n == _NIFTI1_SIZEOF_HDR and buf[344:348] == b"n+1\x00":
            return 1
        if n == _NIFTI2_SIZEOF_HDR and buf[4:8] == b"n+2\x00":
            return 2
    return None


def _not_nifti_reason(buf: bytes) -> str:
    if len(buf) < _NIFTI1_SIZEOF_HDR:
        return f"only {len(buf)} bytes, shorter than a NIfTI-1 header (348)"
    if buf[344:348] == b"ni1\x00":
        return "a NIfTI-1 pair header (.hdr/.img), which is not supported; convert it to .nii.gz"
    le, be = int.from_bytes(buf[:4], "little"), int.from_bytes(buf[:4], "big")
    if _NIFTI1_SIZEOF_HDR in (le, be):
        return "an Analyze 7.5 header without the NIfTI magic 'n+1'"
    return f"sizeof_hdr is {le}, expected 348 (NIfTI-1) or 540 (NIfTI-2)"


def _load(p: Path) -> tuple[NDArray[np.float32], NiftiMeta, os.stat_result]:
    """Read ``p`` into a C-order float32 volume; also return the stat of the bytes read.

    Transient memory: the compressed plus the decompressed bytes, then the decompressed bytes
    plus the C-order result.  A scaled file adds nibabel's copy of the data and its scaling
    temporaries (float32 or float64); (u)int32/64 and float64 files add a float64 copy.  Each
    buffer is released as soon as it is used up.
    """
    buf, st = _read_source(p)
    if buf.startswith(_GZIP_MAGIC):
        buf = _gunzip(p, buf)
        version = _nifti_version(buf)
        if version is None:
            raise InputError(
                f"input '{p}' is gzip-compressed but not NIfTI inside ({_not_nifti_reason(buf)})"
            )
    else:
        version = _nifti_version(buf)
        if version is None:
            if p.name.lower().endswith(".gz"):
                raise InputError(
                    f"input '{p}' is not gzip-compressed although its name ends in .gz, and is "
                    f"not NIfTI either; expected a gzip-compressed NIfTI volume"
                )
            raise InputError(f"input '{p}' is not a NIfTI file ({_not_nifti_reason(buf)})")

    img_class = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    bio = io.BytesIO(buf)  # shares buf's memory until written to, which nobody does
    try:
        img = img_class.from_file_map(
            {"header": FileHolder(fileobj=bio), "image": FileHolder(fileobj=bio)}
        )
    except Exception as exc:  # nibabel raises HeaderDataError, ValueError, ... for bad headers
        raise InputError(
            f"input '{p}' has an unreadable NIfTI-{version} header "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    hdr = img.header

    full_shape = tuple(int(n) for n in hdr.get_data_shape())
    shape = full_shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise InputError(
            f"input '{p}' is 4-D with {shape[3]} volumes (shape {full_shape}); "
            f"expected one 3-D volume"
        )
    if len(shape) != 3:
        raise InputError(
            f"input '{p}' is {len(shape)}-D (shape {full_shape}); expected a 3-D volume"
        )
    if 0 in shape:
        raise InputError(f"input '{p}' has an empty axis (shape {full_shape}); expected voxels")
    dtype = hdr.get_data_dtype()
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise InputError(
            f"input '{p}' stores {dtype} voxels ({hdr.get_value_label('datatype')}); "
            f"expected a real-valued (integer or float) volume"
        )
    offset = int(img.dataobj.offset)  # img.header's vox_offset is reset to 0 by nibabel
    need = math.prod(full_shape) * dtype.itemsize
    if len(buf) < offset + need:
        raise InputError(
            f"input '{p}' is truncated: {max(len(buf) - offset, 0)} data bytes follow the "
            f"header, {need} expected for shape {full_shape} of {dtype}; re-copy the file"
        )

    proxy = img.dataobj
    if float(proxy.slope) == 1.0 and float(proxy.inter) == 0.0:
        # No scaling: nibabel's get_fdata(dtype=float32) is then exactly
        # raw.astype(promote_types(raw.dtype, float32)).astype(float32) (apply_read_scaling returns
        # the raw array unchanged).  Doing that on a view of the decompressed bytes skips
        # nibabel's copy of them: 15% of the read time and one volume of memory.
        raw = np.frombuffer(buf, dtype=dtype, count=math.prod(full_shape), offset=offset)
        fdata = raw.reshape(full_shape, order="F")
        promoted = np.promote_types(dtype, np.float32)
        if promoted != np.float32:  # (u)int32/64, float64: nibabel goes through float64
            fdata = fdata.astype(promoted, copy=False)
    else:
        try:
            fdata = img.get_fdata(dtype=np.float32, caching="unchanged")  # Fortran order
        except Exception as exc:
            raise InputError(f"input '{p}': nibabel cannot read the data ({exc})") from exc
    del img, bio, proxy
    vol = np.empty(shape, dtype=np.float32)  # C order
    np.copyto(vol, fdata.reshape(shape, order="A"), casting="unsafe")  # = astype(float32)
    del fdata, buf

    hbio = io.BytesIO()
    hdr.write_to(hbio)
    meta = NiftiMeta(
        shape=_shape3(shape),
        affine=readonly(np.array(hdr.get_best_affine(), dtype=np.float64)),
        zooms=_zooms3(hdr.get_zooms()[:3]),
        header_bytes=hbio.getvalue(),
        nifti_version=version,
    )
    return vol, meta, st


def _shape3(shape: tuple[int, ...]) -> tuple[int, int, int]:
    a, b, c = (int(n) for n in shape)
    return (a, b, c)


def _zooms3(zooms: Any) -> tuple[float, float, float]:
    a, b, c = (float(z) for z in zooms)
    return (a, b, c)


def _header_image(path: str | os.PathLike[str]) -> Any:
    """Open a NIfTI file for its header only (nibabel reads no voxel data until asked).

    Raises
    ------
    InputError
        If the file is missing, not a regular file, or not a readable NIfTI header.
    """
    p = Path(path)
    require_regular_file(p)  # nibabel would block for ever opening a FIFO
    try:
        return nib.load(str(p))
    except FileNotFoundError:
        raise InputError(f"input '{p}' does not exist") from None
    except Exception as exc:  # nibabel raises many types for a bad header
        raise InputError(f"input '{p}' is not a readable NIfTI header: {exc}") from None


def read_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """Shape of a NIfTI volume from its header alone (cheap: no voxel data is read).

    Raises
    ------
    InputError
        If the file is missing or is not a NIfTI image.
    """
    return tuple(int(n) for n in _header_image(path).shape)


def read_affine(path: str | os.PathLike[str]) -> NDArray[np.float64]:
    """Affine of a NIfTI volume from its header alone (as nibabel chooses it: sform, qform).

    Raises
    ------
    InputError
        If the file is missing or is not a NIfTI image.
    """
    return np.asarray(_header_image(path).affine, dtype=np.float64)


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Identify a file's current version for resume records.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    dict
        ``{"path": absolute path (str), "size": bytes (int), "mtime_ns": int, "ctime_ns": int,
        "sample": content sample (str)}`` (see :func:`integrity.content_sample`).

    Raises
    ------
    InputError
        If the file does not exist, cannot be examined or is not a regular file.
    """
    p = Path(os.path.abspath(path))
    try:
        fd = open_regular(p)
    except FileNotFoundError:
        raise InputError(f"input '{p}' does not exist") from None
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"cannot examine input '{p}': {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        sample = content_sample(fd, st.st_size)
    except OSError as exc:
        raise InputError(f"cannot read input '{p}': {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return {"path": str(p), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns),
            "ctime_ns": int(st.st_ctime_ns), "sample": sample}


# --------------------------------------------------------------------------------------
# Volume cache
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CachedVolume:
    """A volume served from the cache.

    Attributes
    ----------
    data : (X, Y, Z) float32 ndarray
        Read-only, C-contiguous view of a memory map of the cache entry: the layout every
        kernel is compiled for (``_arrays.as_volume`` returns it unchanged, without a copy).
    meta : NiftiMeta
    source : pathlib.Path
        Absolute path of the NIfTI file, as given (symlinks not resolved).
    nonfinite : int
        Number of NaN or infinite voxels, counted once when the entry was made.
    entry : pathlib.Path
        The ``.npy`` file mapped by ``data``.
    """

    data: NDArray[np.float32]
    meta: NiftiMeta
    source: Path
    nonfinite: int
    entry: Path


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

    Raises
    ------
    InputError
        If the directory cannot be created or is not writable, or the default directory
        belongs to another user.

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
    """

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None) -> None:
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
        self._ensure_dir(default)

    def __repr__(self) -> str:
        return f"VolumeStore({str(self.directory)!r})"

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
        return {
            "directory": str(self.directory),
            "entries": len(keys & npys),
            "total_bytes": total,
            "temp_files": temps,
            "stale_temp_files": stale,
            "stale_temp_bytes": stale_bytes,
            "writable": os.access(self.directory, os.W_OK | os.X_OK),
        }

    @staticmethod
    def _temp_gone(path: Path, mtime_ns: int, now_ns: int) -> bool:
        """Tell whether a temporary cache file's writer is gone.

        Gone: its pid is not alive on this host, or the file is untouched for
        ``STALE_TEMP_S`` (a writer on another node sharing the cache).
        """
        return writer_gone(
            path, host=_host_tag(), older_than_ns=now_ns - int(STALE_TEMP_S * 1e9),
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
        return sweep_temp_files(temps, host=_host_tag(), older_than_ns=cutoff)

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

    # -- entries ----------------------------------------------------------------------

    def get(self, path: str | os.PathLike[str]) -> CachedVolume:
        """Return the volume at ``path``, decompressing it into the cache on first use.

        Parameters
        ----------
        path : str or path-like
            A NIfTI file, as for :func:`read_nifti`.

        Returns
        -------
        CachedVolume
            ``data`` is a read-only, C-contiguous float32 memory map equal to
            ``read_nifti(path)[0]``.

        Raises
        ------
        InputError
            As :func:`read_nifti` for a bad input file.
        PacsError
            If the cache entry cannot be written (disk full, permissions); the message names
            the cache directory.

        Notes
        -----
        Thread-safe.  Concurrent calls for the same file wait for one decompression.
        """
        source = Path(os.path.abspath(path))
        for _ in range(3):
            st, ident = _identity(source)
            key = _entry_key(ident)
            with self._lock_for(key):
                with self._guard:
                    cv = self._live.get(key)
                if cv is not None:
                    return cv
                try:
                    cv = self._open_entry(key, source, ident)
                except _BadEntry:
                    cv = None
                if cv is None:
                    # Missing or bad: let one process of the node build it while the others
                    # wait, then look again, since a waiter usually finds it ready.
                    with _node_lock(self.directory / f".{key}.lock"):
                        try:
                            cv = self._open_entry(key, source, ident)
                        except _BadEntry as why:
                            log.warning(
                                "volume cache entry %s for '%s' is invalid (%s); rebuilding it",
                                self.directory / f"{key}.npy", source, why,
                            )
                        if cv is None:
                            cv = self._build(key, source, ident, st)
                if cv is not None:
                    with self._guard:
                        self._live[key] = cv
                    return cv
            # The source changed between stat and read: its key is stale, start again.
        raise InputError(f"input '{source}' kept changing while it was read; is it being written?")

    def _lock_for(self, key: str) -> threading.Lock:
        with self._guard:
            lock = self._key_locks.get(key)
            if lock is None:
                lock = self._key_locks[key] = threading.Lock()
            return lock

    def _open_entry(
        self, key: str, source: Path, ident: dict[str, Any]
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
        except _BadEntry:
            raise
        except Exception as exc:  # json errors, missing keys, bad values, bad header bytes
            raise _BadEntry(f"sidecar unparsable: {type(exc).__name__}: {exc}") from exc
        data = _map_npy(npy, meta.shape)
        return CachedVolume(data, meta, source, nonfinite, npy)

    def _build(
        self, key: str, source: Path, ident: dict[str, Any], st: os.stat_result
    ) -> CachedVolume | None:
        """Decompress ``source`` into a new entry; None if the source changed since ``st``."""
        t0 = time.perf_counter()
        vol, meta, st_read = _load(source)
        with self._guard:
            self.read_count += 1
        if _stat_id(st_read) != _stat_id(st):
            return None
        nonfinite = _count_nonfinite(vol)
        rec = {
            "format": CACHE_FORMAT,
            **ident,
            "dtype": "<f4",
            "nonfinite": nonfinite,
            **meta._to_json(),
        }
        side_text = json.dumps(rec, indent=1)
        npy = self.directory / f"{key}.npy"
        side = self.directory / f"{key}.json"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)  # survives a tmp cleaner
            _install(npy, partial(np.lib.format.write_array, array=vol, allow_pickle=False))
            _install(side, lambda f: f.write(side_text.encode("utf-8")))
        except OSError as exc:
            raise OutputError(
                f"cannot write volume cache entry {npy} for '{source}': "
                f"{exc.strerror or exc}; free space or choose another directory with "
                f"--cache-dir or {CACHE_DIR_ENV}"
            ) from exc
        data = _map_npy(npy, meta.shape)  # the just-written pages are still in the page cache
        log.debug(
            "cached %s -> %s in %.0f ms (nonfinite=%d)",
            source, npy.name, 1e3 * (time.perf_counter() - t0), nonfinite,
        )
        return CachedVolume(data, meta, source, nonfinite, npy)


@contextmanager
def _node_lock(path: Path) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``path`` if the file system allows it.

    The lock only saves duplicate work: correctness never depends on it, since every entry is
    installed by an atomic rename.  So when locks are unsupported (some network file systems)
    or the holder takes longer than ``LOCK_WAIT_S``, carry on without it.  The kernel releases
    the lock if its holder dies.  Lock files are empty and left in place (removing them would
    let two processes lock different inodes); ``clear`` removes them.
    """
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("waited %.0f s for %s; building without it", LOCK_WAIT_S, path)
                    break
                time.sleep(0.01)
            except OSError:
                break  # no flock here
        yield
    finally:
        os.close(fd)  # releases the lock


def _host_tag() -> str:
    """Return this host's name as written into temporary cache file names.

    '-' is replaced, so the pid that follows the name can be parsed back.
    """
    return re.sub(r"[^A-Za-z0-9.]", "_", platform.node()) or "host"


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
    try:
        fd = open_regular(source)
    except FileNotFoundError:
        raise InputError(
            f"input '{source}' does not exist; expected a NIfTI volume (.nii or .nii.gz)"
        ) from None
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"cannot read input '{source}': {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        sample = content_sample(fd, st.st_size)
    except OSError as exc:
        raise InputError(f"cannot read input '{source}': {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    ident = {
        "source": os.path.realpath(source),
        "device": int(st.st_dev),
        "inode": int(st.st_ino),
        "size": int(st.st_size),
        "mtime_ns": int(st.st_mtime_ns),
        "ctime_ns": int(st.st_ctime_ns),
        "sample": sample,
    }
    return st, ident


def _entry_key(ident: dict[str, Any]) -> str:
    text = "\0".join(f"{k}={ident[k]}" for k in sorted(ident))
    h = hashlib.sha256(f"v{CACHE_FORMAT}\0{text}".encode())
    return h.hexdigest()[:32]


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


def _map_npy(npy: Path, shape: tuple[int, int, int]) -> NDArray[np.float32]:
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


def _install(final: Path, write: Any) -> None:
    """Write ``final`` through a unique temporary name in its folder, then rename it in place.

    Unique names (pid, thread, random) let several processes create the same entry at once:
    each rename installs a complete file and the last one wins.
    """
    # The host makes the writer identifiable on a cache shared by several nodes: only a
    # writer of this host whose pid is gone is known to be dead (see sweep_temps).
    host = _host_tag()
    tmp = final.with_name(
        f".{final.name}.tmp-{host}-{os.getpid()}-{threading.get_ident()}-{os.urandom(4).hex()}"
    )
    try:
        # 0o666 & ~umask, like any new file, so a group-shared cache stays readable by the group
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with open(fd, "wb") as f:
            write(f)
        os.replace(tmp, final)
    except BaseException:
        _unlink_quiet(tmp)
        raise


def _unlink_quiet(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


# --------------------------------------------------------------------------------------
# Atomic writers
# --------------------------------------------------------------------------------------


@contextmanager
def _atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only when the block completes.

    The temporary file is ``<name>.tmp-<pid>-<thread>`` in the same folder (a rename within one
    file system is atomic); parent folders are created.  Any OSError becomes a
    :class:`OutputError` naming ``path``; on any failure the temporary file is removed.
    """
    final = Path(path)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, final)
    except OSError as exc:
        _unlink_quiet(tmp)
        raise OutputError(f"cannot write '{final}': {exc.strerror or exc}") from exc
    except BaseException:
        _unlink_quiet(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically.

    Parameters
    ----------
    path : str or path-like
        Destination; parent folders are created.
    data : bytes-like

    Raises
    ------
    OutputError
        If the file cannot be written; the message names ``path`` and the OS error.  Nothing
        is left under ``path`` or under a temporary name.
    """
    with _atomic_file(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically, without newline translation.

    See :func:`atomic_write_bytes`.
    """
    atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, **json_kwargs: Any) -> None:
    """Write ``json.dumps(obj, **json_kwargs)`` to ``path`` atomically.

    The text is exactly ``json.dumps``'s: no trailing newline is added.  A value that cannot be
    serialised raises ``TypeError`` before any file is created, and so does a NaN or infinite
    float (``ValueError``; ``allow_nan`` is False unless the caller passes it): every JSON
    file written is strict JSON.  :func:`integrity.strict_json` turns such floats into null.

    Examples
    --------
    >>> atomic_write_json(tmp / "weights.json", {"0": [0.5, 0.5]}, indent=2)  # doctest: +SKIP
    """
    json_kwargs.setdefault("allow_nan", False)  # NaN/Infinity are not JSON: fail, never write
    atomic_write_text(path, json.dumps(obj, **json_kwargs))


def _write_npz_members(target: Any, mode: str, compressed: bool, arrays: dict[str, Any]) -> None:
    compression = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(target, mode, compression=compression,
                         compresslevel=GZIP_LEVEL if compressed else None,
                         allowZip64=True) as zf:
        for name, value in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=True)


def atomic_savez(
    path: str | os.PathLike[str], compressed: bool = True, **arrays: ArrayLike
) -> None:
    """Save ``arrays`` as an ``.npz`` file at exactly ``path``, atomically.

    Parameters
    ----------
    path : str or path-like
        Destination, used as given (no ``.npz`` is appended).
    compressed : bool
        Deflate each member (default) or store it.
    **arrays
        Arrays by name; object arrays are pickled as ``np.savez`` does.

    Raises
    ------
    OutputError
        If the file cannot be written.

    Notes
    -----
    The file is what ``np.savez_compressed`` writes (a zip of ``.npy`` members, read by
    ``np.load``), but deflated at level 1 (:data:`GZIP_LEVEL`) instead of zlib's default 6:
    a 200x230x190x4 weight-map volume takes ~0.2 s instead of ~0.6 s for a file ~1.4x the
    size.
    """
    with _atomic_file(path) as f:
        _write_npz_members(f, "w", compressed, arrays)


def npz_bytes(compressed: bool = True, **arrays: ArrayLike) -> bytes:
    """Return the bytes of the ``.npz`` file :func:`atomic_savez` would write.

    With :func:`atomic_savez_from`, files that share most of their members are compressed
    once and written many times.
    """
    buf = io.BytesIO()
    _write_npz_members(buf, "w", compressed, arrays)
    return buf.getvalue()


def atomic_savez_from(
    path: str | os.PathLike[str], template: bytes, compressed: bool = True, **arrays: ArrayLike
) -> None:
    """Write the ``.npz`` ``template`` (from :func:`npz_bytes`) plus ``arrays``, atomically.

    The template's members are copied as they are (not decompressed); ``arrays`` are
    appended as further members.  ``np.load`` reads the result like any ``.npz``.

    Raises
    ------
    OutputError
        If the file cannot be written.
    """
    buf = io.BytesIO(template)
    _write_npz_members(buf, "a", compressed, arrays)
    atomic_write_bytes(path, buf.getbuffer())


def _nifti1_header(header: object) -> nib.Nifti1Header | None:
    """Return a private NIfTI-1 copy of ``header`` (nibabel header, NiftiMeta or None)."""
    if header is None:
        return None
    if isinstance(header, NiftiMeta):
        header = header.header
    if type(header) is nib.Nifti1Header:
        hdr = header.copy()
    else:  # e.g. a Nifti2Header or an Analyze header: nibabel converts the common fields
        # check=False: nibabel's check would log "sizeof_hdr should be 348" for a NIfTI-2
        # source; setting it is the whole fix.
        hdr = nib.Nifti1Header.from_header(header, check=False)
        hdr["sizeof_hdr"] = 348
    if hdr.endianness != nib.volumeutils.native_code:
        hdr = hdr.as_byteswapped(nib.volumeutils.native_code)
    return hdr


def write_nifti(
    path: str | os.PathLike[str], data: ArrayLike, affine: ArrayLike, header: object = None,
    *, dtype: type = np.float32,
) -> None:
    """Write ``data`` as a float32 NIfTI-1 file (or ``dtype``, e.g. uint8 labels), atomically.

    Parameters
    ----------
    path : str or path-like
        Destination; gzip-compressed (python-isal, level 1) when the name ends in ``.gz``.
        Parent folders are created.
    data : array_like
        The volume, e.g. (X, Y, Z); converted to float32.
    affine : (4, 4) array_like
        Voxel-to-world affine.
    header : nibabel header or NiftiMeta, optional
        Template header, typically the HR volume's (algorithm A8).  Its fields are kept (qform and
        sform with their codes, units, descrip, extensions...), except what describes the data:
        shape, datatype float32, and ``scl_slope``/``scl_inter`` reset to "no scaling".  As in
        nibabel, if ``affine`` differs from the header's own affine, sform and qform are set
        from ``affine`` with codes aligned/unknown.

    Raises
    ------
    OutputError
        If the file cannot be written: the message names ``path`` and the OS error (e.g.
        "cannot write '/x/y.nii.gz': No space left on device").  No file is left under
        ``path`` or under the temporary name ``<name>.tmp-<pid>-<thread>``.
    ValueError
        If ``affine`` is not 4x4.

    Examples
    --------
    >>> vol, meta = read_nifti("hr.nii.gz")  # doctest: +SKIP
    >>> write_nifti("blend.nii.gz", vol, meta.affine, meta.header)  # doctest: +SKIP
    """
    arr = np.asarray(data)
    if arr.dtype != dtype:
        arr = arr.astype(dtype)
    arr = arr.view(np.ndarray)  # a memmap subclass would confuse nibabel's slicing of dataobj
    aff = np.array(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {aff.shape}")
    img = nib.Nifti1Image(arr, aff, _nifti1_header(header))
    img.set_data_dtype(dtype)
    # (NaN, NaN) tells nibabel to choose the scaling itself: none for float32 -> float32
    img.header.set_slope_inter(np.nan, np.nan)
    gz = os.fspath(path).lower().endswith(".gz")
    with _atomic_file(path) as f:
        if gz:
            # filename="" and mtime=0: no temporary name or clock in the gzip header, so equal
            # volumes give byte-identical files.
            with igzip.IGzipFile(
                fileobj=f, mode="wb", compresslevel=GZIP_LEVEL, filename="", mtime=0
            ) as zf:
                img.to_file_map({"header": FileHolder(fileobj=zf), "image": FileHolder(fileobj=zf)})
        else:
            img.to_file_map({"header": FileHolder(fileobj=f), "image": FileHolder(fileobj=f)})



def write_nifti_volumes(
    path: str | os.PathLike[str],
    volumes: Iterable[ArrayLike],
    shape: tuple[int, int, int, int],
    affine: ArrayLike,
    *,
    dtype: type = np.float32,
) -> None:
    """Write a 4-D NIfTI-1 file one 3-D volume at a time, atomically.

    A 4-D weight map of ``M`` experts would otherwise be held whole (``4 N M`` bytes) and
    copied by nibabel on the way out; here only the volume being written is in memory.

    Parameters
    ----------
    path : str or path-like
        Destination (gzip level 1 when it ends in ``.gz``).
    volumes : iterable of (N0, N1, N2) array_like
        ``shape[3]`` volumes, in order (generated lazily if wanted).
    shape : (N0, N1, N2, M)
        The 4-D shape.
    affine : (4, 4) array_like
        Voxel-to-world affine (sform and qform, as ``write_nifti`` sets them).
    dtype : numpy dtype
        On-disk data type.

    Raises
    ------
    OutputError
        If the file cannot be written.
    ValueError
        If a volume's shape or the number of volumes does not match ``shape``.
    """
    aff = np.array(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.zeros((1, 1, 1, 1), dtype=dtype), aff)
    img.update_header()
    hdr = img.header
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_slope_inter(np.nan, np.nan)
    hdr.set_data_offset(352)
    gz = os.fspath(path).lower().endswith(".gz")
    out_dtype = np.dtype(dtype).newbyteorder(hdr.endianness)
    with _atomic_file(path) as f:
        zf = (igzip.IGzipFile(fileobj=f, mode="wb", compresslevel=GZIP_LEVEL, filename="",
                              mtime=0) if gz else None)
        sink = zf if zf is not None else f
        try:
            hdr.write_to(sink)
            written = 0
            for vol in volumes:
                v = np.asarray(vol)
                if v.shape != tuple(shape[:3]):
                    raise ValueError(f"volume {written} has shape {v.shape}; expected {shape[:3]}")
                # Fortran order: NIfTI's first axis varies fastest
                sink.write(np.asarray(v, dtype=out_dtype).tobytes(order="F"))
                written += 1
            if written != shape[3]:
                raise ValueError(f"got {written} volumes; the shape says {shape[3]}")
        finally:
            if zf is not None:
                zf.close()
