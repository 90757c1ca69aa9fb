"""Small checks that keep outputs whole and inputs honest (no NumPy, no nibabel).

* :func:`require_regular_file` refuses FIFOs, devices and directories before anything opens
  them (opening a FIFO for reading blocks until a writer appears: a run would hang).
* :func:`file_digest` / :func:`verify_file` give an output's size and SHA-256 checksum, so a
  resumed run can tell a complete output from a truncated or replaced one.
* :func:`content_sample` is the cheap content check of the volume cache key: a hash of the
  first and last blocks of a file and a few blocks in between.
* :func:`check_patient_id` / :func:`output_under` keep every output inside its folder.
* :func:`strict_json` turns the non-finite floats of a metrics document into ``null``.
* :func:`pid_alive`, :func:`temp_writer` and :func:`sweep_temp_files` find and remove the
  temporary files of writers that are gone (a SIGKILL leaves them behind).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..config import name_problem
from ..errors import InputError

log = logging.getLogger(__name__)


#: Bytes hashed at each end of a file by :func:`content_sample`.
SAMPLE_EDGE_BYTES = 64 * 1024


#: Number and size of the blocks sampled between the two ends.
SAMPLE_BLOCKS = 8


SAMPLE_BLOCK_BYTES = 4096


#: Read size of :func:`file_digest`.
_CHUNK = 1 << 20


#: ``<name>.tmp-<pid>-<thread>`` (io's atomic writers) and ``.<key>.npy.tmp-<host>-<pid>-...``
_TMP_RE = re.compile(r"\.tmp-(?P<rest>.+)$")


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def require_regular_file(path: str | os.PathLike[str], what: str = "input") -> os.stat_result:
    """Return ``os.stat(path)`` if ``path`` is a regular file (symlinks followed).

    Raises
    ------
    InputError
        If it does not exist, cannot be examined, or is a directory, FIFO, device or socket;
        the message names the file and what it is.
    """
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{what} '{p}' does not exist") from None
    except OSError as exc:
        raise InputError(f"cannot examine {what} '{p}': {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} '{p}' is {_kind(st.st_mode)}; expected a regular file")
    return st


def open_regular(path: str | os.PathLike[str], what: str = "input") -> int:
    """Open ``path`` read-only without ever blocking on a FIFO; return the descriptor.

    ``O_NONBLOCK`` makes ``open`` of a FIFO return at once; the descriptor is then checked
    to be a regular file (so a file swapped for a FIFO after a ``stat`` is caught too) and
    put back in blocking mode.
    """
    p = Path(path)
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{what} '{p}' is {_kind(st.st_mode)}; expected a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sample_offsets(size: int) -> list[int]:
    """Offsets of the blocks :func:`content_sample` hashes, the two ends excepted.

    ``0`` (the first ``SAMPLE_EDGE_BYTES``) and, for a file larger than twice that,
    ``SAMPLE_BLOCKS`` offsets of ``SAMPLE_BLOCK_BYTES`` blocks spread evenly between the
    two ends (the last ``SAMPLE_EDGE_BYTES`` are hashed as well).

    Examples
    --------
    >>> sample_offsets(1000)
    [0]
    >>> len(sample_offsets(1 << 20))
    9
    """
    offsets = [0]
    if size > 2 * SAMPLE_EDGE_BYTES:
        span = size - 2 * SAMPLE_EDGE_BYTES - SAMPLE_BLOCK_BYTES
        offsets += [
            SAMPLE_EDGE_BYTES + span * (i + 1) // (SAMPLE_BLOCKS + 1) for i in range(SAMPLE_BLOCKS)
        ]
    return offsets


def content_sample(fd: int, size: int) -> str:
    """Hash the first and last ``SAMPLE_EDGE_BYTES`` and ``SAMPLE_BLOCKS`` blocks in between.

    Cheap (at most ~160 KiB read whatever the file size) and part of the volume cache key:
    a file rewritten with the same size and times but other bytes in a sampled block gets a
    new key (:func:`sample_offsets` says which).  A change confined to bytes that are not
    sampled is not seen by this check (``ctime`` still changes on every write, so only a
    clock or file system that does not update it would let such a change through).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(size.to_bytes(8, "little"))
    for off in sample_offsets(size):
        h.update(os.pread(fd, SAMPLE_EDGE_BYTES if off == 0 else SAMPLE_BLOCK_BYTES, off))
    if size > SAMPLE_EDGE_BYTES:
        h.update(os.pread(fd, SAMPLE_EDGE_BYTES, max(size - SAMPLE_EDGE_BYTES, 0)))
    return h.hexdigest()


def file_identity(path: str | os.PathLike[str], *, what: str = "input",
                  missing: str | None = None, context: str = "",
                  open_verb: str = "read") -> tuple[os.stat_result, dict[str, Any]]:
    """Stat a regular file and take its content sample: what a cached copy must match.

    The one home of "open without blocking, refuse a non-regular file, fstat, sample" for
    the volume cache, resume fingerprints and HDF5 sources.  Device and inode catch a file
    replaced by another one (a rename over it); size, mtime and ctime catch writes (ctime
    cannot be set back by ``touch``/``os.utime``); the content sample
    (:func:`content_sample`) catches a same-size rewrite even where times are coarse or
    restored.

    Parameters
    ----------
    path : str or path-like
        The file.
    what : str, optional
        What the file is, for messages (``"input"``, ``"HDF5 file"``).
    missing : str, optional
        The message for a file that does not exist (default: ``"<what> '<path>' does not
        exist"``).
    context : str, optional
        Appended in parentheses to the message about a file that is not regular.
    open_verb : str, optional
        The verb of the message when the file cannot be opened (``"read"``, ``"examine"``).

    Returns
    -------
    st : os.stat_result
    identity : dict
        ``source`` (the resolved path), ``device``, ``inode``, ``size``, ``mtime_ns``,
        ``ctime_ns`` and ``sample``.

    Raises
    ------
    InputError
        The file does not exist, is not a regular file, or cannot be read.
    """
    try:
        fd = open_regular(path, what=what)
    except FileNotFoundError:
        raise InputError(missing or f"{what} '{path}' does not exist") from None
    except InputError as exc:
        if context:
            raise InputError(f"{exc} ({context})") from None
        raise
    except OSError as exc:
        raise InputError(f"cannot {open_verb} {what} '{path}': {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        sample = content_sample(fd, st.st_size)
    except OSError as exc:
        raise InputError(f"cannot read {what} '{path}': {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return st, {
        "source": os.path.realpath(path),
        "device": int(st.st_dev),
        "inode": int(st.st_ino),
        "size": int(st.st_size),
        "mtime_ns": int(st.st_mtime_ns),
        "ctime_ns": int(st.st_ctime_ns),
        "sample": sample,
    }


def file_digest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return ``{"size": bytes, "sha256": hex}`` of a file.

    SHA-256 rather than BLAKE2b: x86-64 CPUs with the SHA extensions hash it about twice as
    fast (measured on the 2-core build machine, loaded: 204 vs 94 MB/s, same run).

    Raises
    ------
    OSError
        If the file cannot be read.
    """
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return {"size": n, "sha256": h.hexdigest()}


def verify_file(path: str | os.PathLike[str], expected: Mapping[str, Any]) -> str | None:
    """Why ``path`` is not the file described by ``expected`` (:func:`file_digest`), or None."""
    p = Path(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return f"'{p}' is missing"
    except OSError as exc:
        return f"'{p}' cannot be examined ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return f"'{p}' is {_kind(st.st_mode)}"
    if st.st_size != expected.get("size"):
        return f"'{p}' has {st.st_size} bytes, {expected.get('size')} were written"
    try:
        got = file_digest(p)
    except OSError as exc:
        return f"'{p}' cannot be read ({exc.strerror or exc})"
    if got["sha256"] != expected.get("sha256"):
        return f"'{p}' does not have the checksum it was written with"
    return None


def check_patient_id(pid: object, where: str) -> str:
    """Return ``pid`` if it is usable in a file name; ``InputError`` naming it otherwise.

    A patient id becomes part of output file names, so it must be one safe path component
    (:func:`pacs_numba.config.name_problem`, the one rule shared with the experiment name):
    no path separator, NUL or control character, not empty, ``.`` or ``..``, and no leading
    ``-`` or ``.`` (option-like names, hidden files).  ``where`` names the file and place
    the id came from (manifest, CSV line, folder).
    """
    why = name_problem(pid)
    if why is not None:
        raise InputError(
            f"{where}: patient id {pid!r} cannot be used in a file name: it {why} (expected "
            "one name: no '/', '\\', NUL, '..', empty id or leading '.'/'-')"
        )
    return pid  # type: ignore[return-value]


def output_under(folder: str | os.PathLike[str], name: str) -> Path:
    """Return ``folder / name`` after checking that it resolves inside ``folder``.

    Raises
    ------
    InputError
        If the path (symlinks and ``..`` resolved) leaves ``folder``.
    """
    base = Path(folder)
    target = base / name
    real_base = os.path.realpath(base)
    real = os.path.realpath(target)
    if os.path.dirname(real) != real_base:
        raise InputError(
            f"output '{target}' would be written outside its folder '{base}' (resolves to "
            f"'{real}'); check the patient ids and the folder's symlinks"
        )
    return target


def strict_json(obj: Any) -> Any:
    """Copy of ``obj`` with every NaN or infinite float replaced by ``None`` (JSON ``null``).

    JSON has no NaN or Infinity; Python's ``json`` would write them as bare tokens that
    other readers reject.  In metrics, ``null`` PSNR means infinite (the blend equals the HR).
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # NumPy scalars
        return strict_json(obj.item())
    return obj


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (``kill(pid, 0)``)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    except OSError:
        return True
    return True


def temp_writer(name: str, host: str | None = None) -> tuple[str | None, int] | None:
    """Parse the writer of a temporary file name: ``(host or None, pid)``, or None.

    Two forms are written: ``<name>.tmp-<pid>-<thread>`` (output folders; no host) and
    ``.<key>.<ext>.tmp-<host>-<pid>-<thread>-<random>`` (the volume cache).  ``host`` is
    this host's name, used to tell the second form apart.
    """
    m = _TMP_RE.search(name)
    if not m:
        return None
    parts = m.group("rest").split("-")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        return None, int(parts[0])
    if len(parts) >= 4 and parts[-3].isdigit() and parts[-2].isdigit():
        return "-".join(parts[:-3]), int(parts[-3])
    if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():  # old cache form
        return None, int(parts[0])
    return None


def writer_gone(path: Path, *, host: str, older_than_ns: int | None, mtime_ns: int) -> bool:
    """Whether the temporary file ``path`` was left by a writer that no longer runs.

    Gone means: the name carries this host and a pid that is not alive here; or the file
    was last written before ``older_than_ns`` (the start of the lock holder of the folder,
    when the caller holds it).
    """
    w = temp_writer(path.name)
    if w is None:
        return False
    whost, pid = w
    if older_than_ns is not None and mtime_ns < older_than_ns:
        return True
    return whost == host and not pid_alive(pid)


def sweep_temp_files(
    candidates: Iterable[Path], *, host: str, older_than_ns: int | None
) -> list[Path]:
    """Remove the temporary files among ``candidates`` whose writer is gone; return them."""
    removed: list[Path] = []
    for p in candidates:
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if writer_gone(p, host=host, older_than_ns=older_than_ns, mtime_ns=st.st_mtime_ns):
            try:
                os.unlink(p)
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot remove stale temporary file %s: %s", p, exc.strerror or exc)
                continue
            removed.append(p)
    return removed
