"""A fold's blends in one ``results_fold_{N}.h5``, written safely by concurrent SLURM tasks.

Each blend goes to its own small part file ``results_fold_{N}.parts/{spacing}/{pulse}/{pid}.h5``
(temporary name, fsync, rename), and ``results_fold_{N}.h5`` is an index of relative HDF5
external links to them, rebuilt from the part files present and replaced by a rename under an
exclusive ``flock``.  A task killed by SIGKILL leaves at most its own hidden temporary file;
plain h5py reads the index: ``h5py.File(index)["3mm/blends/P001/t1c"][...]``.  docs/hdf5.md has
the design and its costs.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError, OutputError
from .atomic import host_tag, unlink_quiet
from .layout import fold_results_h5
from .locks import node_lock

try:  # POSIX only; without it the index is still correct (see ResultsH5.rebuild_index)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from .hdf5 import (
    SEPARATOR,
    H5Source,
    as_h5_volume,
    create_h5_volume,
    h5_reason,
    h5py_module,
    read_h5_volume,
)

log = logging.getLogger(__name__)

#: Longest wait for the index lock before rebuilding without it (correct either way).
LOCK_WAIT_S = 120.0
#: A temporary file untouched this long belongs to a dead writer, whatever host wrote it.
STALE_TEMP_S = 3600.0
#: Root attribute that marks an index written by :class:`ResultsH5` (never overwrite others).
INDEX_MARK = "pacs_numba_index"
INDEX_VERSION = 1

_BAD_NAME = re.compile(r"[/\\\x00]")
_TMP_RE = re.compile(r"^\..+\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-\d+-[0-9a-f]+$")


# --------------------------------------------------------------------------------------
# Blend results: part files and an index of external links
# --------------------------------------------------------------------------------------


def _temp_name(final: Path) -> Path:
    """``.{name}.tmp-{host}-{pid}-{thread}-{random}`` beside ``final``.

    The form of the volume cache's temporary files, which ``integrity.temp_writer`` parses.
    """
    return final.with_name(
        f".{final.name}.tmp-{host_tag()}-{os.getpid()}-{threading.get_ident()}-"
        f"{os.urandom(4).hex()}"
    )


def _fsync_path(p: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(p, flags)
    except OSError:
        if directory:
            return  # some file systems do not open directories; the rename is still atomic
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


@contextmanager
def _atomic_h5(final: Path) -> Iterator[Any]:
    """Yield a new h5py file that replaces ``final`` (fsync, rename, fsync of the folder).

    A process killed inside the block leaves only its hidden temporary file, never a partial
    ``final``; :meth:`ResultsH5.rebuild_index` removes such files once their writer is gone.
    """
    h5py = h5py_module()
    tmp = _temp_name(final)
    try:
        with h5py.File(tmp, "w-", locking=False) as f:
            yield f
        _fsync_path(tmp)
        os.replace(tmp, final)
    except BaseException:
        unlink_quiet(tmp)
        raise
    _fsync_path(final.parent, directory=True)


def _check_name(name: object, what: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or _BAD_NAME.search(name)
        or name[0] in ".-"
        or SEPARATOR in name
    ):
        raise OutputError(
            f"{what} {name!r} cannot be used in an HDF5 key and a file name (no '/', '\\', "
            f"NUL, '{SEPARATOR}', empty name or leading '.'/'-')"
        )
    return name


def _usable(name: str) -> bool:
    try:
        _check_name(name, "name")
    except OutputError:
        return False
    return True


def _is_stale_temp(p: Path, host: str, now_ns: int) -> bool:
    m = _TMP_RE.match(p.name)
    if not m:
        return False
    try:
        st = os.lstat(p)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if now_ns - st.st_mtime_ns > STALE_TEMP_S * 1e9:
        return True
    if m.group("host") != host:
        return False
    pid = int(m.group("pid"))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class ResultsH5:
    """The blends of one fold: ``{root}/results_fold_{fold}.h5`` and its part files.

    Parameters
    ----------
    root : str or path-like
        The experiment folder (``{out_root}/{experiment_name}``); created on the first write.
    fold : int
        Fold number ``N`` of ``results_fold_{N}.h5``.

    Notes
    -----
    Layout::

        {root}/results_fold_{N}.h5                       index: external links only
        {root}/results_fold_{N}.h5.lock                  empty; flock'ed while rebuilding
        {root}/results_fold_{N}.parts/{spacing}/{pulse}/{pid}.h5
                                     one dataset /{spacing}/blends/{pid}/{pulse}

    Each index entry ``/{spacing}/blends/{pid}/{pulse}`` is an external link to the same path
    in the part file, by a path relative to ``root``; HDF5 resolves it against the index
    file's folder (after ``HDF5_EXT_PREFIX`` if that is set), so the experiment folder can be
    moved and read from any working directory.  Copy the index and the ``.parts`` folder
    together.

    Examples
    --------
    >>> res = ResultsH5(tmp / "exp", 0)  # doctest: +SKIP
    >>> res.write_blend("3mm", "t1c", "P001", blend, affine)  # doctest: +SKIP
    >>> h5py.File(tmp / "exp" / "results_fold_0.h5")["3mm/blends/P001/t1c"][...]  # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str], fold: int) -> None:
        if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or fold < 0:
            raise OutputError(f"fold must be a non-negative integer, got {fold!r}")
        self.root = Path(root)
        self.fold = int(fold)
        self.index, self.parts, self.lock = fold_results_h5(self.root, self.fold)

    def __repr__(self) -> str:
        return f"ResultsH5({str(self.root)!r}, {self.fold})"

    # -- names ----------------------------------------------------------------------------
    @staticmethod
    def key(spacing: str, pulse: str, pid: str) -> str:
        """Dataset path of a blend in the index and in its part file."""
        return f"{spacing}/blends/{pid}/{pulse}"

    def part_path(self, spacing: str, pulse: str, pid: str) -> Path:
        """Part file of one blend."""
        return self.parts / spacing / pulse / f"{pid}.h5"

    # -- writing --------------------------------------------------------------------------
    def write_blend(
        self,
        spacing: str,
        pulse: str,
        pid: str,
        data: ArrayLike,
        affine: ArrayLike,
        *,
        update_index: bool = True,
    ) -> Path:
        """Write one blend to its part file atomically, then rebuild the index.

        Parameters
        ----------
        spacing, pulse, pid : str
            Spacing label (``3mm``), pulse (``t1c``) and patient id; each must be usable as a
            file name (no ``/``, no leading ``.``/``-``).
        data : array-like, 3-D
            Stored as float32, gzip level 4.
        affine : array-like, 4x4
            The HR's affine; stored as 16 float64 values, row-major.
        update_index : bool
            Rebuild the index now (default).  A task that writes many blends may pass False
            and call :meth:`rebuild_index` once at the end; until then readers of the index do
            not see those blends.

        Returns
        -------
        Path
            The part file.

        Raises
        ------
        OutputError
            A name is unusable, the volume is not 3-D, the affine not 16 finite numbers, or
            a file cannot be written; nothing partial is left under a visible name.
        """
        for name, what in ((spacing, "spacing"), (pulse, "pulse"), (pid, "patient id")):
            _check_name(name, what)
        key = self.key(spacing, pulse, pid)
        final = self.part_path(spacing, pulse, pid)
        vol, aff = as_h5_volume(data, affine, f"blend '{key}' of fold {self.fold}")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            with _atomic_h5(final) as f:
                create_h5_volume(f, key, vol, aff)
        except OSError as exc:
            raise OutputError(f"cannot write blend part file '{final}': {h5_reason(exc)}") from exc
        if update_index:
            self.rebuild_index()
        return final

    def _scan(self) -> dict[str, str]:
        """``{index key: part path relative to root}`` for every complete part file."""
        found: dict[str, str] = {}
        try:
            spacings = sorted(os.scandir(self.parts), key=lambda e: e.name)
        except FileNotFoundError:
            return found
        for s in spacings:
            if s.name.startswith(".") or not s.is_dir(follow_symlinks=False):
                continue
            for p in sorted(os.scandir(s.path), key=lambda e: e.name):
                if p.name.startswith(".") or not p.is_dir(follow_symlinks=False):
                    continue
                for e in os.scandir(p.path):
                    n = e.name
                    if n.startswith(".") or not n.endswith(".h5") or len(n) == 3:
                        continue
                    if not e.is_file(follow_symlinks=False):
                        continue
                    pid = n[:-3]
                    if not (_usable(s.name) and _usable(p.name) and _usable(pid)):
                        continue  # not a name write_blend makes: never link it
                    rel = f"{self.parts.name}/{s.name}/{p.name}/{n}"
                    found[self.key(s.name, p.name, pid)] = rel
        return dict(sorted(found.items()))

    def _sweep(self) -> list[Path]:
        """Remove temporary files of dead writers (index and parts); return them."""
        host = host_tag()
        now = time.time_ns()
        cands = list(self.root.glob(f".{self.index.name}.tmp-*"))
        if self.parts.is_dir():
            cands += list(self.parts.glob("*/*/.*.h5.tmp-*"))
        removed = []
        for c in cands:
            if _is_stale_temp(c, host, now):
                unlink_quiet(c)
                removed.append(c)
        return removed

    def _refuse_foreign_index(self) -> None:
        """Refuse to replace a ``results_fold_{N}.h5`` that this class did not write."""
        if not os.path.lexists(self.index):
            return
        h5py = h5py_module()
        try:
            with h5py.File(self.index, "r", locking=False) as f:
                ours = f.attrs.get(INDEX_MARK) is not None
        except OSError:
            ours = False
        if not ours:
            raise OutputError(
                f"'{self.index}' exists and was not written by pacs_numba (it may hold the "
                "published tool's blends); move it away before writing results here"
            )

    def _write_index(self, entries: dict[str, str]) -> None:
        h5py = h5py_module()
        with _atomic_h5(self.index) as f:
            f.attrs[INDEX_MARK] = INDEX_VERSION
            for key, rel in entries.items():
                f[key] = h5py.ExternalLink(rel, "/" + key)

    def rebuild_index(self, *, max_rounds: int = 20) -> int:
        """Rewrite ``results_fold_{N}.h5`` from the part files present; return its entries.

        Under an exclusive ``flock`` on ``results_fold_{N}.h5.lock``: remove temporary files
        of dead writers, list the part files, write the links to a temporary file, fsync it
        and rename it over the index.  Then list the parts again and start over if the list
        changed, so the index is complete even where ``flock`` does not work (then two
        rebuilds can race; the last one to rename re-lists after its rename and repairs what
        an earlier one missed).

        Parameters
        ----------
        max_rounds : int
            Rebuilds before giving up on a folder that keeps changing (a warning).

        Returns
        -------
        int
            Number of blends the index links to.

        Raises
        ------
        OutputError
            The index cannot be written, or an index not written by pacs_numba is in the way.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"cannot create '{self.root}': {exc.strerror or exc}") from exc
        with node_lock(self.lock):
            self._refuse_foreign_index()
            self._sweep()
            entries = self._scan()
            for _ in range(max_rounds):
                try:
                    self._write_index(entries)
                except OSError as exc:
                    raise OutputError(
                        f"cannot write index '{self.index}': {h5_reason(exc)}"
                    ) from exc
                again = self._scan()
                if again == entries:
                    return len(entries)
                entries = again
            log.warning("part files of %s kept changing; the index may miss the newest",
                        self.index)
            return len(entries)

    # -- reading --------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Index keys ``{spacing}/blends/{pid}/{pulse}``, sorted; [] when there is no index.

        Read from the links themselves: no part file is opened.
        """
        h5py = h5py_module()
        if not self.index.exists():
            return []
        out: list[str] = []
        try:
            with h5py.File(self.index, "r", locking=False) as f:
                for spacing in f:
                    blends = f[spacing].get("blends")
                    if not isinstance(blends, h5py.Group):
                        continue
                    for pid in blends:
                        for pulse in blends[pid]:
                            out.append(self.key(spacing, pulse, pid))
        except OSError as exc:
            raise InputError(f"index '{self.index}' cannot be read ({h5_reason(exc)})") from exc
        return sorted(out)

    def read_blend(
        self, spacing: str, pulse: str, pid: str
    ) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
        """Read one blend from its part file: ``(data, 4x4 affine)`` (see :func:`read_h5_volume`).

        The part file is read directly, so a blend is readable as soon as
        :meth:`write_blend` has renamed it, even before the index lists it.
        """
        for name, what in ((spacing, "spacing"), (pulse, "pulse"), (pid, "patient id")):
            try:
                _check_name(name, what)
            except OutputError as exc:
                raise InputError(str(exc)) from None
        return read_h5_volume(
            H5Source(self.part_path(spacing, pulse, pid), self.key(spacing, pulse, pid))
        )


# --------------------------------------------------------------------------------------
# metrics.json in the current release's form
# --------------------------------------------------------------------------------------

#: Key of a patient's evaluation seconds in its per-patient result (the current release's
#: ``time_seconds``); never part of the means.
TIME_KEY = "time_seconds"
#: The metrics the current release's ``aggregate``/``std`` hold, in its order.
_PUBLISHED = ("mse", "mae", "psnr", "ssim")


def split_metrics_doc(per_patient: dict[str, dict[str, float]],
                      seconds: dict[str, float]) -> dict[str, object]:
    """One split of the current release's ``metrics.json``: aggregate, std, per_patient.

    Parameters
    ----------
    per_patient : {pid: {mse, mae, psnr, ssim}}
        In the order the patients are listed.
    seconds : {pid: float}
        Each patient's evaluation time (``time_seconds``).

    Returns
    -------
    dict
        ``{"aggregate": {metric: mean}, "std": {metric: population std}, "per_patient":
        [{"patient_id": pid, mse, mae, psnr, ssim, "time_seconds"}, ...]}``; ``{}`` when there
        is no patient.  An infinite PSNR (blend == HR) stays infinite (written as null).
    """
    if not per_patient:
        return {}
    table = {k: np.array([float(m[k]) for m in per_patient.values()]) for k in _PUBLISHED}
    rows = [{"patient_id": pid, **{k: float(m[k]) for k in _PUBLISHED},
             TIME_KEY: float(seconds.get(pid, float("nan")))} for pid, m in per_patient.items()]
    return {"aggregate": {k: float(np.mean(v)) for k, v in table.items()},
            "std": {k: float(np.std(v)) for k, v in table.items()},
            "per_patient": rows}


def metrics_means(doc: object) -> object:
    """Return a ``metrics.json`` with the 2025 shape ``{split: {metric: mean}}``, from either form.

    The current release's splits (``{"aggregate", "std", "per_patient"}``) are replaced by
    their ``aggregate``; other keys are kept.  Readers (``summarize``, ``report``) call this
    so that they read both forms.
    """
    if not isinstance(doc, dict):
        return doc
    out = dict(doc)
    for split in ("train", "test"):
        part = out.get(split)
        if isinstance(part, dict) and isinstance(part.get("aggregate"), dict):
            out[split] = dict(part["aggregate"])
    return out
