"""HDF5 cohorts and blend results in the layout of the published tool's current version.

Reading: one dataset per volume, float32 (float16/64 accepted and converted), 3-D, with an
``affine`` attribute of 16 float64 values stored row-major.  A volume is named by an
:class:`H5Source`, whose string form ``"{file}::{key}"`` lets it travel wherever a path string
travels (configs, manifests, logs) and be recognised again by :func:`parse_source`.

Writing: :func:`write_h5_volume` appends one volume to a file (test cohorts, converters), and
:class:`ResultsH5` writes a fold's blends so that several SLURM tasks, on one node or on several
nodes sharing NFS, can write into one ``results_fold_{N}.h5`` at once and a task killed by
SIGKILL damages nothing that others wrote.  Each blend goes to its own small part file
``results_fold_{N}.parts/{spacing}/{pulse}/{pid}.h5`` (temporary name, fsync, rename), and
``results_fold_{N}.h5`` is an index of relative HDF5 external links to them, rebuilt from the
part files present and replaced by a rename under an exclusive ``flock``.  Plain h5py reads it:
``h5py.File(index)["3mm/blends/P001/t1c"][...]``.  docs/hdf5.md has the design and its costs.

h5py is an optional dependency (``pip install 'pacs-numba[hdf5]'``), imported only when an
HDF5 function runs.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError, OutputError
from .integrity import content_sample, open_regular

try:  # POSIX only; without it the index is still correct (see ResultsH5.rebuild_index)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SEPARATOR",
    "H5Source",
    "h5_identity",
    "parse_source",
    "read_h5_volume",
    "write_h5_volume",
]

log = logging.getLogger(__name__)

#: Between the file and the dataset key in the string form of an :class:`H5Source`.
SEPARATOR = "::"
#: gzip level of every dataset written (the published tool's).
GZIP_LEVEL = 4
#: Upper bound of the raw dataset bytes hashed by :func:`h5_identity`.
IDENTITY_SAMPLE_BYTES = 160 * 1024
#: Children listed when a key is missing.
_NEAREST = 5
_READ_TRIES = 3

_H5PY_MISSING = "reading HDF5 cohorts needs h5py: pip install 'pacs-numba[hdf5]'"


def h5py_module() -> ModuleType:
    """Return the h5py module, or raise :class:`InputError` saying how to install it."""
    try:
        import h5py
    except ImportError:
        raise InputError(_H5PY_MISSING) from None
    return h5py


# --------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class H5Source:
    """One dataset of one HDF5 file: a volume source.

    Attributes
    ----------
    file : Path
        The HDF5 file.  It may contain ``"::"`` (see :func:`parse_source`).
    key : str
        The dataset's path inside the file, without a leading ``/`` (one is removed if given).
        It must not be empty, contain ``"::"``, NUL or empty components (``a//b``).

    Examples
    --------
    >>> src = H5Source(Path("/data/source_data.h5"), "/high_resolution/P001/t1c")
    >>> str(src)
    '/data/source_data.h5::high_resolution/P001/t1c'
    >>> parse_source(str(src)) == src
    True
    """

    file: Path
    key: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "file", Path(self.file))
        key = self.key.lstrip("/") if isinstance(self.key, str) else self.key
        if (
            not isinstance(key, str)
            or not key
            or SEPARATOR in key
            or "\x00" in key
            or "" in key.split("/")
        ):
            raise InputError(
                f"HDF5 file '{self.file}': dataset key {self.key!r} is not usable (it must be "
                f"a non-empty path like 'a/b/c', without '{SEPARATOR}', NUL or empty parts)"
            )
        object.__setattr__(self, "key", key)

    def __str__(self) -> str:
        return f"{self.file}{SEPARATOR}{self.key}"


def parse_source(s: str | os.PathLike[str] | H5Source) -> H5Source | None:
    """Return the :class:`H5Source` written as ``"{file}::{key}"``, or None for a plain path.

    Every byte but NUL and ``/`` may appear in a POSIX file name, so no printable separator is
    unambiguous by itself; these rules make it so:

    * the split is at the *last* ``"::"`` (keys may not contain it; file names may);
    * a string that names an existing file system entry as a whole is a plain path (None),
      so ``/data/a::b.nii.gz`` stays a NIfTI path when that file exists;
    * nothing after the last ``"::"``, or nothing before it, is a plain path (None).

    Parameters
    ----------
    s : str, path-like or H5Source

    Returns
    -------
    H5Source or None

    Raises
    ------
    InputError
        If the part after ``"::"`` is not a usable key (``a//b``, NUL).
    """
    if isinstance(s, H5Source):
        return s
    text = os.fspath(s)
    if not isinstance(text, str) or SEPARATOR not in text:
        return None
    file, _, key = text.rpartition(SEPARATOR)
    if not file or not key.strip("/"):
        return None
    if os.path.lexists(text):
        return None
    return H5Source(Path(file), key)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def _open_h5(src: H5Source) -> Any:
    """Open ``src.file`` read-only for h5py; :class:`InputError` naming file and key if not.

    ``locking=False``: HDF5 (1.10 and later) takes an ``flock`` on every file it opens and
    fails outright where the file system refuses one (NFS without a lock daemon: "unable to
    lock file", ENOLCK/ENOSYS) and when any process holds the file open for writing (EAGAIN),
    for example a converter appending other patients.  Readers here never depend on that lock:
    outputs are installed by rename, and :func:`read_h5_volume` checks that the file did not
    change while it was read.  The setting is part of the file access properties, which HDF5
    also uses for the files that external links open.
    """
    h5py = h5py_module()
    where = f"HDF5 file '{src.file}' (dataset '{src.key}')"
    try:
        fd = open_regular(src.file, what="HDF5 file")
    except FileNotFoundError:
        raise InputError(f"{where} does not exist; expected an HDF5 file") from None
    except InputError as exc:
        raise InputError(f"{exc} (reading dataset '{src.key}')") from None
    except OSError as exc:
        raise InputError(f"cannot read {where}: {exc.strerror or exc}") from exc
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size == 0:
        raise InputError(f"{where} is empty (0 bytes); expected an HDF5 file")
    try:
        return h5py.File(src.file, "r", locking=False)
    except OSError as exc:
        raise InputError(
            f"{where} is not an HDF5 file or is damaged ({h5_reason(exc)}); expected an HDF5 "
            "file such as the published tool writes"
        ) from exc


def h5_reason(exc: BaseException) -> str:
    """Return the first line of an h5py/HDF5 error, for a one-line message."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _nearest(names: list[str], wanted: str) -> list[str]:
    close = difflib.get_close_matches(wanted, names, n=_NEAREST, cutoff=0.0)
    return close or sorted(names)[:_NEAREST]


def _listing(names: list[str], wanted: str) -> str:
    if not names:
        return "it is empty"
    near = _nearest(names, wanted)
    more = f" (of {len(names)})" if len(names) > len(near) else ""
    return "nearest existing: " + ", ".join(repr(n) for n in near) + more


def _resolve(f: Any, src: H5Source) -> Any:
    """Walk ``src.key`` component by component; return the object, or explain what is missing."""
    h5py = h5py_module()
    where = f"HDF5 file '{src.file}'"
    parts = src.key.split("/")
    node = f
    for i, name in enumerate(parts):
        here = "/" + "/".join(parts[:i]) if i else "/"
        if not isinstance(node, h5py.Group):
            raise InputError(
                f"{where}: dataset '{src.key}' cannot exist: '{here}' is a dataset, not a group"
            )
        link = node.get(name, getlink=True)
        if link is None:
            raise InputError(
                f"{where} has no dataset '{src.key}': group '{here}' has no member '{name}' "
                f"({_listing(list(node.keys()), name)})"
            )
        try:
            node = node[name]
        except (KeyError, OSError) as exc:
            if isinstance(link, h5py.ExternalLink):
                what = (
                    f"an external link to '{link.path}' in '{link.filename}' (relative to "
                    f"'{src.file.parent}') that cannot be followed"
                )
            elif isinstance(link, h5py.SoftLink):
                what = f"a dangling soft link to '{link.path}'"
            else:
                what = f"an object that cannot be opened ({h5_reason(exc)})"
            raise InputError(
                f"{where}: '{'/'.join(parts[: i + 1])}' (of dataset '{src.key}') is {what}"
            ) from exc
    if isinstance(node, h5py.Group):
        raise InputError(
            f"{where}: '{src.key}' is a group, not a dataset; expected a 3-D volume "
            f"({_listing(list(node.keys()), '')})"
        )
    if not isinstance(node, h5py.Dataset):  # pragma: no cover - datatypes
        raise InputError(f"{where}: '{src.key}' is not a dataset; expected a 3-D volume")
    return node


def _check_dataset(dset: Any, src: H5Source) -> tuple[int, int, int]:
    """Return the 3-D shape of ``dset``; refuse other ranks and non-float types."""
    where = f"HDF5 file '{src.file}', dataset '{src.key}'"
    shape = tuple(int(n) for n in (dset.shape or ()))
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(
            f"{where} has shape {tuple(dset.shape or ())} ({len(dset.shape or ())}-D); "
            "expected a 3-D volume (a trailing 4th axis of length 1 is accepted)"
        )
    if min(shape) == 0:
        raise InputError(f"{where} has shape {shape} with an empty axis; expected a 3-D volume")
    dt = dset.dtype
    if dt.kind != "f" or dt.itemsize not in (2, 4, 8) or dt.fields is not None:
        raise InputError(
            f"{where} has type {dt}; expected floating point voxels (float32, as the published "
            "tool writes; float16 and float64 are converted). Integer data are refused: they "
            "are not what nibabel's get_fdata returned, so any NIfTI scaling may be missing"
        )
    return shape  # type: ignore[return-value]


def _read_affine(dset: Any, src: H5Source) -> NDArray[np.float64]:
    where = f"HDF5 file '{src.file}', dataset '{src.key}'"
    if "affine" not in dset.attrs:
        raise InputError(
            f"{where} has no 'affine' attribute; expected 16 float64 values (the 4x4 affine, "
            "row-major)"
        )
    try:
        raw = np.asarray(dset.attrs["affine"])
    except (OSError, TypeError, ValueError) as exc:
        raise InputError(f"{where}: its 'affine' attribute cannot be read ({exc})") from exc
    if raw.dtype.kind not in "fiu" or raw.shape not in ((16,), (4, 4)):
        raise InputError(
            f"{where}: its 'affine' attribute has shape {raw.shape} and type {raw.dtype}; "
            "expected 16 numbers (shape (16,) or (4, 4), row-major)"
        )
    aff = raw.astype(np.float64).reshape(4, 4)
    if not np.isfinite(aff).all():
        raise InputError(f"{where}: its 'affine' attribute holds NaN or infinite values")
    if not np.array_equal(aff[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(
            f"{where}: its 'affine' attribute's last row is {aff[3].tolist()}; expected "
            "[0, 0, 0, 1] (an affine as nibabel returns it)"
        )
    return np.ascontiguousarray(aff)


def read_h5_volume(
    src: H5Source | str | os.PathLike[str],
) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Read one volume of an HDF5 cohort fully into memory.

    Parameters
    ----------
    src : H5Source or its string form ``"{file}::{key}"``

    Returns
    -------
    data : (X, Y, Z) float32 ndarray, C-contiguous, writeable
        The dataset's values (a trailing singleton 4th axis squeezed, float16/float64 converted
        to float32 as NumPy rounds).
    affine : (4, 4) float64 ndarray
        The ``affine`` attribute reshaped row-major.

    Raises
    ------
    InputError
        Naming the file and the key: the file is missing, empty, not a regular file, not HDF5
        or damaged; the key is missing (the nearest members of the deepest existing group are
        listed), passes through a dataset, is a dangling link or an external link that cannot
        be followed, or is a group; the dataset is not 3-D, has an empty axis or does not hold
        float16/32/64 values; the ``affine`` attribute is missing, not 16 numbers (shape
        ``(16,)`` or ``(4, 4)``), not finite, or its last row is not ``0 0 0 1``; the file
        kept changing while it was read; h5py is not installed.

    Notes
    -----
    The file is opened without HDF5's file lock (see ``_open_h5``), so its size and times are
    compared before and after the read, and a changed file is read again (three tries).

    Examples
    --------
    >>> data, affine = read_h5_volume("source_data.h5::high_resolution/P001/t1c")  # doctest: +SKIP
    """
    src = _as_source(src)
    for _ in range(_READ_TRIES):
        before = _stat_quiet(src.file)
        with _open_h5(src) as f:
            dset = _resolve(f, src)
            shape = _check_dataset(dset, src)
            affine = _read_affine(dset, src)
            data = _read_data(dset, shape, src)
        if before is not None and before == _stat_quiet(src.file):
            return data, affine
    raise InputError(
        f"HDF5 file '{src.file}' (dataset '{src.key}') kept changing while it was read; is it "
        "still being written?"
    )


def _as_source(src: H5Source | str | os.PathLike[str]) -> H5Source:
    parsed = parse_source(src)
    if parsed is None:
        raise InputError(
            f"'{os.fspath(src)}' does not name an HDF5 dataset; expected 'file.h5{SEPARATOR}key'"
        )
    return parsed


def _stat_quiet(p: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_data(dset: Any, shape: tuple[int, ...], src: H5Source) -> NDArray[np.float32]:
    native = dset.dtype.newbyteorder("=")
    try:
        buf = np.empty(tuple(dset.shape), dtype=native)
        if buf.size:
            dset.read_direct(buf)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"HDF5 file '{src.file}', dataset '{src.key}' cannot be read, it is damaged "
            f"({h5_reason(exc)})"
        ) from exc
    buf = buf.reshape(shape)
    if buf.dtype != np.float32:
        buf = buf.astype(np.float32)
    return np.ascontiguousarray(buf)


# --------------------------------------------------------------------------------------
# Identity (cache key)
# --------------------------------------------------------------------------------------


def _file_fields(path: Path, src: H5Source) -> dict[str, Any]:
    """Stat and content sample of ``path`` with the field names of the NIfTI cache identity."""
    try:
        fd = open_regular(path, what="HDF5 file")
    except FileNotFoundError:
        raise InputError(
            f"HDF5 file '{path}' (dataset '{src.key}') does not exist; expected an HDF5 file"
        ) from None
    except InputError as exc:
        raise InputError(f"{exc} (reading dataset '{src.key}')") from None
    except OSError as exc:
        raise InputError(f"cannot read HDF5 file '{path}': {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        sample = content_sample(fd, st.st_size)
    except OSError as exc:
        raise InputError(f"cannot read HDF5 file '{path}': {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return {
        "source": os.path.realpath(path),
        "device": int(st.st_dev),
        "inode": int(st.st_ino),
        "size": int(st.st_size),
        "mtime_ns": int(st.st_mtime_ns),
        "ctime_ns": int(st.st_ctime_ns),
        "sample": sample,
    }


def _pread_ranges(path: str, ranges: list[tuple[int, int]]) -> bytes:
    """Concatenate ``os.pread`` of each ``(offset, length)`` of ``path``."""
    fd = open_regular(path)
    try:
        return b"".join(os.pread(fd, n, off) for off, n in ranges if n > 0)
    finally:
        os.close(fd)


def _spread(offset: int, length: int, budget: int) -> list[tuple[int, int]]:
    """Byte ranges of at most ``budget`` bytes covering the start, middle and end of a span."""
    if length <= budget:
        return [(offset, length)]
    third = budget // 3
    return [
        (offset, third),
        (offset + (length - third) // 2, third),
        (offset + length - third, third),
    ]


def _dataset_fields(dset: Any, src: H5Source) -> dict[str, Any]:
    """Layout, storage and a bounded raw-byte sample of ``dset`` (see :func:`h5_identity`)."""
    h5py = h5py_module()
    did = dset.id
    layout = did.get_create_plist().get_layout()
    fields: dict[str, Any] = {
        "key": src.key,
        "shape": list(dset.shape or ()),
        "dtype": dset.dtype.str,
        "storage_size": int(did.get_storage_size()),
    }
    h = hashlib.blake2b(digest_size=16)
    home = dset.file.filename
    if layout == h5py.h5d.CONTIGUOUS:
        offset = did.get_offset()
        fields["layout"] = "contiguous"
        fields["offset"] = None if offset is None else int(offset)
        if offset is not None:
            h.update(
                _pread_ranges(home, _spread(offset, fields["storage_size"], IDENTITY_SAMPLE_BYTES))
            )
    elif layout == h5py.h5d.CHUNKED:
        fields["layout"] = "chunked"
        fields["chunks"] = list(dset.chunks)
        index: list[tuple[tuple[int, ...], int, int, int]] = []
        did.chunk_iter(
            lambda si: index.append(
                (tuple(si.chunk_offset), int(si.filter_mask), int(si.byte_offset), int(si.size))
            )
        )
        ih = hashlib.blake2b(digest_size=16)
        for item in index:
            ih.update(repr(item).encode())
        fields["chunk_index"] = ih.hexdigest()
        fields["num_chunks"] = len(index)
        picks = sorted({0, len(index) // 2, len(index) - 1}) if index else []
        per = IDENTITY_SAMPLE_BYTES // max(len(picks), 1)
        ranges: list[tuple[int, int]] = []
        for i in picks:
            _, _, off, size = index[i]
            ranges += _spread(off, size, per)
        h.update(_pread_ranges(home, ranges))
    elif layout == h5py.h5d.COMPACT:  # at most 64 KiB, stored in the object header
        fields["layout"] = "compact"
        h.update(np.ascontiguousarray(dset[()]).tobytes())
    else:
        raise InputError(
            f"HDF5 file '{src.file}', dataset '{src.key}' has a virtual or external layout; "
            "expected a contiguous, chunked or compact dataset"
        )
    plist = did.get_create_plist()
    filters = (plist.get_filter(i) for i in range(plist.get_nfilters()))
    fields["filters"] = [[int(c), int(fl), [int(v) for v in vals]] for c, fl, vals, *_ in filters]
    fields["data_sample"] = h.hexdigest()
    return fields


def h5_identity(src: H5Source | str | os.PathLike[str]) -> dict[str, Any]:
    """Fingerprint of one HDF5 dataset's current version, for a cache key.

    Parameters
    ----------
    src : H5Source or its string form

    Returns
    -------
    dict
        JSON-serialisable.  The file fields of the NIfTI cache identity (``io._identity``):
        ``source`` (resolved path), ``device``, ``inode``, ``size``, ``mtime_ns``,
        ``ctime_ns``, ``sample`` (:func:`integrity.content_sample` of the whole file); then
        ``key``, ``shape``, ``dtype``, ``storage_size``, ``filters``, ``layout`` and, for a
        contiguous dataset, ``offset``, for a chunked one ``chunks``, ``num_chunks`` and
        ``chunk_index`` (BLAKE2b of every chunk's logical offset, filter mask, file address and
        stored size); and ``data_sample``: BLAKE2b of at most ``IDENTITY_SAMPLE_BYTES`` of the
        dataset's stored (compressed) bytes, from its first, middle and last chunks (start,
        middle and end of the contiguous block).  When the dataset lives in another file than
        ``src.file`` (reached through an external link), that file's fields are added under
        ``target``.

    Raises
    ------
    InputError
        As :func:`read_h5_volume` for a missing file, key or a non-dataset.

    Notes
    -----
    It catches: a file replaced by another (device, inode); any write to the file, to this
    dataset or any other (size, times: ctime cannot be set back by ``touch``); a rewrite of
    this dataset in place with the same file size and restored mtime, when a sampled byte, a
    chunk's stored size or address changes.  It can miss: a change confined to unsampled
    chunks whose compressed size and address stay the same, on a file system whose ctime does
    not move (the whole-file content sample and the chunk index are the only other checks).
    Any write to the file changes the key of every dataset in it (conservative: a converter
    appending patients makes cached volumes of that file stale).  Cost: one open, the chunk
    index walk (about 2.5 ms for 1024 chunks) and at most ~320 KiB of reads.
    """
    src = _as_source(src)
    ident = _file_fields(src.file, src)
    with _open_h5(src) as f:
        dset = _resolve(f, src)
        try:
            ident.update(_dataset_fields(dset, src))
        except OSError as exc:
            raise InputError(
                f"HDF5 file '{src.file}', dataset '{src.key}' cannot be examined "
                f"({h5_reason(exc)})"
            ) from exc
        home = Path(dset.file.filename)
    if os.path.realpath(home) != ident["source"]:
        ident["target"] = _file_fields(home, src)
    return ident


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def as_h5_volume(data: ArrayLike, affine: ArrayLike, where: str) -> tuple[NDArray[np.float32],
                                                                        NDArray[np.float64]]:
    arr = np.asarray(data)
    if arr.ndim != 3 or arr.dtype.kind not in "fiub":
        raise OutputError(f"{where}: expected a 3-D numeric volume, got {arr.ndim}-D {arr.dtype}")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.size != 16 or not np.isfinite(aff).all():
        raise OutputError(f"{where}: expected a finite 4x4 affine, got shape {aff.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32), aff.reshape(16).copy()


def create_h5_volume(group: Any, key: str, data: NDArray[np.float32],
                   affine16: NDArray[np.float64]) -> None:
    dset = group.create_dataset(
        key, data=data, dtype=np.float32, compression="gzip", compression_opts=GZIP_LEVEL
    )
    dset.attrs["affine"] = affine16


def write_h5_volume(
    path: str | os.PathLike[str], key: str, data: ArrayLike, affine: ArrayLike
) -> H5Source:
    """Add one volume to an HDF5 file (created if needed), as the published tool writes it.

    Parameters
    ----------
    path : str or path-like
        The file; parent folders are created.  An existing file is appended to.
    key : str
        Dataset path (``high_resolution/P001/t1c``); intermediate groups are created.  An
        existing dataset of that name is replaced (HDF5 does not reclaim its space).
    data : array-like, 3-D
        Stored as float32, gzip level 4, chunk shape chosen by h5py.
    affine : array-like, 4x4 or 16 values
        Stored as the ``affine`` attribute: 16 float64 values, row-major.

    Returns
    -------
    H5Source
        Where the volume now is.

    Raises
    ------
    OutputError
        The data are not a 3-D numeric array, the affine not 16 finite numbers, or the file
        cannot be written (the message names it and the key).

    Notes
    -----
    Not atomic and not for concurrent writers: it edits the file in place, as a converter
    does.  Blends go through :class:`ResultsH5`.
    """
    h5py = h5py_module()
    p = Path(path)
    src = H5Source(p, key)
    vol, aff = as_h5_volume(data, affine, f"HDF5 file '{p}', dataset '{src.key}'")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(p, "a", locking=False) as f:
            if src.key in f:
                del f[src.key]
            create_h5_volume(f, src.key, vol, aff)
    except (OSError, ValueError, TypeError) as exc:
        raise OutputError(
            f"cannot write dataset '{src.key}' to HDF5 file '{p}': {h5_reason(exc)}"
        ) from exc
    return src
