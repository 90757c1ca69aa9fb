"""NIfTI reading and writing: the only module that imports nibabel.

:func:`read_nifti` returns a volume exactly as ``nibabel.load(p).get_fdata(dtype=np.float32)``
would (scaling applied, a trailing singleton 4th axis squeezed), but C-ordered; ``.nii.gz``
files are decompressed with python-isal, about twice as fast as nibabel's reader.  The
writers write through :mod:`pacs_numba.store.atomic`, so no partial file is ever visible.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from isal import igzip, isal_zlib
from nibabel.fileholders import FileHolder
from numpy.typing import ArrayLike, NDArray

from ..core.checks import readonly
from ..errors import InputError
from .atomic import GZIP_LEVEL, atomic_file
from .integrity import (
    open_regular,
    require_regular_file,
)

_NIFTI2_SIZEOF_HDR = 540


_NIFTI1_SIZEOF_HDR = 348


log = logging.getLogger(__name__)




_GZIP_MAGIC = b"\x1f\x8b"


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

    @classmethod
    def from_affine(cls, shape: tuple[int, ...], affine: NDArray[np.float64]) -> NiftiMeta:
        """Meta of a volume known by its shape and affine only (an HDF5 dataset).

        The header is a fresh float32 NIfTI-1 header with the affine as sform and qform
        (code 1, scanner), as nibabel writes an image made from an array and an affine.
        """
        img = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), np.asarray(affine, np.float64))
        hdr = img.header
        hdr.set_data_shape(tuple(int(n) for n in shape))
        hdr.set_data_dtype(np.float32)
        hbio = io.BytesIO()
        hdr.write_to(hbio)
        return cls(_shape3(shape), readonly(np.array(img.affine, dtype=np.float64)),
                   _zooms3(hdr.get_zooms()[:3]), hbio.getvalue(), 1)

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
    vol, meta, _ = load_volume(Path(path))
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


def load_volume(p: Path) -> tuple[NDArray[np.float32], NiftiMeta, os.stat_result]:
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
    with atomic_file(path) as f:
        if gz:
            # filename="" and mtime=0: no temporary name or clock in the gzip header, so equal
            # volumes give byte-identical files.
            with igzip.IGzipFile(
                fileobj=f, mode="wb", compresslevel=GZIP_LEVEL, filename="", mtime=0
            ) as zf:
                img.to_file_map({"header": FileHolder(fileobj=zf), "image": FileHolder(fileobj=zf)})
        else:
            img.to_file_map({"header": FileHolder(fileobj=f), "image": FileHolder(fileobj=f)})


#: Bytes of a volume :func:`write_nifti_volumes` converts and writes at a time.
_WRITE_PIECE_BYTES = 1 << 20


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
    with atomic_file(path) as f:
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
                # Fortran order: NIfTI's first axis varies fastest, so a run of planes of
                # the last axis is one contiguous piece of the file: written ~1 MiB at a
                # time, with no Fortran-order copy of the whole volume
                plane = int(np.prod(v.shape[:2])) * out_dtype.itemsize
                step = max(1, _WRITE_PIECE_BYTES // max(plane, 1))
                for k in range(0, v.shape[2], step):
                    sink.write(np.asarray(v[:, :, k : k + step], dtype=out_dtype)
                               .tobytes(order="F"))
                written += 1
            if written != shape[3]:
                raise ValueError(f"got {written} volumes; the shape says {shape[3]}")
        finally:
            if zf is not None:
                zf.close()


#: Largest difference (mm, per affine element) between two volumes' affines that still counts
#: as the same grid: header rounding, never a real shift or flip.
AFFINE_ATOL = 1e-3


def affine_difference(a: ArrayLike, b: ArrayLike) -> str | None:
    """How the affine ``a`` differs from ``b`` beyond :data:`AFFINE_ATOL`, or None.

    The one affine comparison of the package: train compares each expert with the HR
    (a WARNING), predict compares the experts with each other (an error, since the output
    takes the first expert's affine).

    Examples
    --------
    >>> a = np.eye(4)
    >>> affine_difference(a, a + 5e-4) is None
    True
    >>> b = a.copy(); b[0, 3] = 10.0
    >>> affine_difference(a, b)
    'origins 10 mm apart'
    >>> affine_difference(a, np.diag([1.0, -1.0, 1.0, 1.0]))
    'voxel axis 1 flipped'
    """
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    if a64.shape != (4, 4) or b64.shape != (4, 4):
        return f"shapes {a64.shape} and {b64.shape}, not 4x4"
    diff = np.abs(a64 - b64)
    if not np.all(np.isfinite(diff)):
        return "not finite"
    if float(diff.max()) <= AFFINE_ATOL:
        return None
    parts = [
        f"voxel axis {d} flipped" for d in range(3) if float(a64[:3, d] @ b64[:3, d]) < 0
    ]
    shift = float(np.linalg.norm(a64[:3, 3] - b64[:3, 3]))
    if shift > AFFINE_ATOL:
        parts.append(f"origins {shift:.3g} mm apart")
    return ", ".join(parts) or f"elements differ by up to {float(diff[:3, :3].max()):.3g}"
