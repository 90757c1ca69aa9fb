"""Atomic writers: a temporary file in the destination folder, then :func:`os.replace`.

A reader never sees a partial file under its final name, and the temporary file is removed
when the write fails.  Temporary names carry the host, pid and thread of the writer, so a
sweep can tell the files of dead writers (:mod:`pacs_numba.store.integrity`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import platform
import re
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from numpy.typing import ArrayLike

from ..errors import OutputError

#: gzip level of written ``.nii.gz`` files: level 1 is 3-10x faster than nibabel's default and
#: float32 MRI data compresses only a few per cent better at higher levels.
GZIP_LEVEL = 1


log = logging.getLogger(__name__)


def host_tag() -> str:
    """Return this host's name as written into temporary cache file names.

    '-' is replaced, so the pid that follows the name can be parsed back.
    """
    return re.sub(r"[^A-Za-z0-9.]", "_", platform.node()) or "host"


def install_file(final: Path, write: Any) -> None:
    """Write ``final`` through a unique temporary name in its folder, then rename it in place.

    Unique names (pid, thread, random) let several processes create the same entry at once:
    each rename installs a complete file and the last one wins.
    """
    # The host makes the writer identifiable on a cache shared by several nodes: only a
    # writer of this host whose pid is gone is known to be dead (see sweep_temps).
    host = host_tag()
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
        unlink_quiet(tmp)
        raise


def unlink_quiet(p: Path) -> None:
    """Remove ``p`` if it exists; a file already gone or unremovable is no error here."""
    try:
        os.unlink(p)
    except OSError:
        pass


@contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
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
        unlink_quiet(tmp)
        raise OutputError(f"cannot write '{final}': {exc.strerror or exc}") from exc
    except BaseException:
        unlink_quiet(tmp)
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
    with atomic_file(path) as f:
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
    with atomic_file(path) as f:
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
