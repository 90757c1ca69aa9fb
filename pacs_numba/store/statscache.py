"""The on-disk cache of per-patient fit statistics (:class:`StatsCache`).

Entries are keyed by the fingerprints of the patient's input files and the statistics key
(:class:`pacs_numba.core.cellstats.StatsKey`), written atomically under a node lock, and
shared by every fold, lambda and process on the node.  An entry records its own name (the
key's digest), so a valid entry of another patient copied or renamed over it is detected
and recomputed; its content is covered by the CRC-32 of each ``.npz`` member, which
``zipfile`` checks when the member is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from ..core.cellstats import FORMAT, CellStats, StatsKey, box_statistics
from ..errors import InputError
from .atomic import atomic_savez
from .locks import node_lock
from .volumes import file_fingerprint

log = logging.getLogger(__name__)


class StatsCache:
    """Decomposed statistics per patient, on disk next to the volume cache.

    Parameters
    ----------
    directory : path-like
        Folder of the entries (created if needed), normally
        ``VolumeStore(...).directory / "cellstats"``.

    Attributes
    ----------
    computed, loaded : int
        Entries computed and entries read by this object (for logs and tests).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"statistics cache directory '{self.directory}' cannot be created: "
                f"{exc.strerror or exc}"
            ) from exc
        self.computed = 0
        self.loaded = 0
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    def clear(self) -> int:
        """Remove every entry and lock file; return the number of entries removed.

        Temporary files of writers in flight are left alone (their rename would fail).
        """
        n = 0
        for p in self.directory.glob("*.npz"):
            try:
                p.unlink()
                n += 1
            except OSError as exc:
                log.warning("cannot remove %s: %s", p, exc.strerror or exc)
        for p in self.directory.glob(".*.lock"):
            try:
                p.unlink()
            except OSError:
                pass
        return n

    def entry(self, files: Sequence[str | os.PathLike[str]], key: StatsKey) -> Path:
        """Path of the entry for these input files (HR first, then experts) and ``key``."""
        doc = {"format": FORMAT, "files": [file_fingerprint(f) for f in files], **key.as_dict()}
        h = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]
        return self.directory / f"{h}.npz"

    def _read(self, path: Path, key: StatsKey) -> CellStats | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                parts = np.ascontiguousarray(z["parts"], np.float64)
                counts = np.ascontiguousarray(z["counts"], np.int64)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("statistics cache entry '%s' is unreadable (%s); recomputing", path, exc)
            return None
        if "entry" not in meta:  # written before entries named themselves
            log.info("statistics cache entry '%s' is of an older version; recomputing", path)
            return None
        if meta.get("entry") != path.stem:
            # a valid entry of another patient or key copied or renamed over this one: its
            # numbers would be used for this patient
            log.warning(
                "statistics cache entry '%s' belongs to another entry (%s, files %s); "
                "recomputing", path, meta.get("entry"), meta.get("files"),
            )
            return None
        m = int(meta["n_experts"])
        shape = tuple(int(n) for n in meta["shape"])
        n_cells = math.prod(-(-n // key.stride) for n in shape)
        if meta.get("key") != key.as_dict() or parts.shape != (
            n_cells, key.n_parts, m + m * (m + 1) // 2
        ) or counts.shape != (n_cells,):
            log.warning("statistics cache entry '%s' does not match its key; recomputing", path)
            return None
        if "mu_hr" not in meta or "sd_hr" not in meta:
            log.warning("statistics cache entry '%s' has no HR moments; recomputing", path)
            return None
        return CellStats(parts, counts, shape, key, m,  # type: ignore[arg-type]
                         float(meta["mu_hr"]), float(meta["sd_hr"]))

    def lookup(
        self,
        files: Sequence[str | os.PathLike[str]],
        want: StatsKey,
        *,
        edge_power: float | None = None,
        grad_operator: str | None = None,
    ) -> CellStats | None:
        """Return an entry that can serve ``want`` at its cell size, or None if there is none.

        Tries the key itself, then keys with more parts (when ``edge_power`` /
        ``grad_operator`` say which ones would fit), then, for ``first_block``, cell sizes
        that divide the stride, largest first.
        """
        for key in self._candidates(want, edge_power, grad_operator):
            st = self._read(self.entry(files, key), key)
            if st is not None:
                with self._guard:
                    self.loaded += 1
                if want.region == "first_block":
                    st = st.coarsen(want.stride)
                return st
        return None

    @staticmethod
    def _candidates(
        want: StatsKey, edge_power: float | None, grad_operator: str | None
    ) -> list[StatsKey]:
        cells = [want.stride]
        if want.region == "first_block":
            cells += [c for c in range(want.stride - 1, 0, -1) if want.stride % c == 0]
        edges = [(True, want.edge_power)] if want.with_edge else [(False, 0.0)]
        if not want.with_edge and edge_power is not None:
            edges.append((True, float(edge_power)))
        grads = [(True, want.grad_operator)] if want.with_grad else [(False, "")]
        if not want.with_grad and grad_operator is not None:
            grads.append((True, grad_operator))
        out = []
        for cell in cells:
            for with_edge, power in edges:
                for with_grad, op in grads:
                    d = want.as_dict()
                    d.update(stride=cell, with_edge=with_edge, edge_power=power,
                             with_grad=with_grad, grad_operator=op)
                    if want.region == "first_block":
                        d["patch_size"] = cell
                    out.append(StatsKey(**d))
        return out

    def get(
        self,
        files: Sequence[str | os.PathLike[str]],
        key: StatsKey,
        load: Callable[[], tuple[ArrayLike, Sequence[ArrayLike]]],
        *,
        edge_power: float | None = None,
        grad_operator: str | None = None,
    ) -> CellStats:
        """Return the statistics for ``files`` and ``key``, computed and stored if missing.

        Parameters
        ----------
        files : sequence of path-like
            HR then expert files, in model order (they name the entry).
        key : StatsKey
        load : callable
            Returns ``(hr, experts)`` arrays; called only when the entry is computed.
        edge_power, grad_operator : optional
            Let an entry with more parts serve ``key`` (see :meth:`lookup`).

        Returns
        -------
        CellStats
            At ``key``'s cell size.

        Notes
        -----
        One thread per entry computes it (a per-entry lock), and across processes an
        advisory lock next to the entry does the same; the entry is installed atomically.
        """
        hit = self.lookup(files, key, edge_power=edge_power, grad_operator=grad_operator)
        if hit is not None:
            return hit
        path = self.entry(files, key)
        with self._guard:
            lock = self._locks.setdefault(path.name, threading.Lock())
        with lock, node_lock(path.with_name(f".{path.stem}.lock")):
            st = self._read(path, key)  # another thread or process may have made it
            if st is not None:
                with self._guard:
                    self.loaded += 1
                return st
            hr, experts = load()
            st = box_statistics(hr, experts, key)
            meta = json.dumps({
                "format": FORMAT, "entry": path.stem, "key": key.as_dict(),
                "shape": list(st.shape),
                "n_experts": st.n_experts, "files": [str(f) for f in files],
                "mu_hr": st.mu_hr, "sd_hr": st.sd_hr,
            })
            atomic_savez(path, compressed=False, parts=st.parts, counts=st.counts,
                         meta=np.array(meta))
            with self._guard:
                self.computed += 1
            log.debug("statistics cached in '%s'", path)
            return st
