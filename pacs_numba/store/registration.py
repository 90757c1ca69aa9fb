"""Rigid registration to an atlas with antspyx (``pacs_sr.use_registration: true``).

The published tool registers every volume (the HR and each expert) on its own to the atlas
template of its pulse with ``ants.registration(type_of_transform="Rigid")``, masks the warped
volume with the atlas brain mask, and then runs everything (z-score, statistics, blend,
metrics) in atlas space.  It does so again in every pass and every fold.

Here a registration is done once and kept in the volume cache:

* ``mode: per_patient`` (default): one registration per patient, of its HR to the template;
  the same transform resamples every expert (linear interpolation), so the target and its
  experts stay aligned to each other.  ``mode: per_volume``: every volume is registered on its
  own, as the published tool does.
* ``settings: fast`` (default) is a cheaper rigid schedule measured to land within a fraction
  of a voxel of ANTs' defaults (``profiling/registration-*.md``); ``settings: published`` is
  exactly the published call (ANTs' defaults).
* Transforms (``<key>.mat``) and registered, masked float32 volumes (``<key>.npy``) are entries
  of ``<volume cache>/registered/``, keyed by the source file's fingerprint (path, size, mtime,
  ctime, content sample: :func:`pacs_numba.store.volumes.file_fingerprint`), the atlas template
  file's,
  the settings and the seed; a volume's key adds the transform that resampled it and the
  brain mask.  Entries are installed by atomic rename and built under the same per-node
  ``flock`` as the volume cache, so folds, tasks, reruns and SLURM tasks on a node share them.
* ANTs samples the metric at jittered points: the seed is pinned (``REGISTRATION_SEED``).  A
  seeded registration is reproducible only with ONE ITK thread (with 2 threads, ITK's default
  pool threader and even its static "Platform" threader gave different transforms run to run;
  antspyx's own ``set_ants_deterministic`` also forces one thread).  So every registration runs
  on one ITK thread, and the job's CPUs are used by running several registrations at once.
* antspyx holds the GIL while it registers, so threads cannot run registrations side by side:
  pending registrations go to a pool of spawned processes, as wide as the CPUs, the pending
  patients and the memory limit allow (:func:`registration_bytes` each); with width 1 they run
  in this process.  Either way this happens before the patient pool starts.

This is the only module that imports ``ants``, and only when a registration is needed.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..config import REGISTRATION_MODES, RegistrationConfig
from ..errors import BudgetError, ConfigError, InputError, OutputError
from ..resources.planning import limit_for, margin_bytes
from ..resources.units import gib
from .atomic import install_file
from .locks import node_lock
from .nifti import NiftiMeta, affine_difference
from .volumes import CachedVolume, VolumeStore, file_fingerprint, map_npy

log = logging.getLogger(__name__)


#: ``registration.mode`` values; the first is the default.
MODES = REGISTRATION_MODES


#: ``registration.settings`` presets: keyword arguments of ``ants.registration`` on top of
#: ``type_of_transform="Rigid"``.  ``published`` is ANTs' defaults, as the published tool calls
#: it: shrink 6x4x2x1, smoothing 3x2x1x0 voxels, 2100x1200x1200x10 iterations, Mattes MI with
#: 32 bins on a 20% regular (jittered) sample.  ``fast`` stops at half resolution with fewer
#: iterations and a sparser sample; profiling/registration-2026-11-30.md has the measurements.
SETTINGS: dict[str, dict[str, Any]] = {  # keys: config.REGISTRATION_SETTINGS
    "fast": {
        "aff_shrink_factors": (6, 4, 2),
        "aff_smoothing_sigmas": (3, 2, 1),
        "aff_iterations": (200, 100, 50),
        "aff_random_sampling_rate": 0.1,
    },
    "published": {},
}


#: ``fast`` starts at 1/6 resolution, samples 10% of the voxels and stops at half resolution.
#: On a small grid its coarsest level has too few samples and its finest too few voxels to pin
#: the rotation down: at 64x72x60 it recovered a 5.9 degree motion to within 0.35-1.40 degrees
#: depending on the sampling seed and on the numpy/scipy build (round 3 found the 1.40 on every
#: fresh install), while the published schedule stayed within 0.12-0.58 degrees over seeds 1-5
#: in ~1 s.  At 96x112x96 ``fast`` is within 0.18-0.65 degrees over seeds 1-5 (published 0.06-
#: 0.21, 4x slower).  Atlases whose shortest axis is below this use the published schedule.
FAST_MIN_AXIS = 96


#: Pulse name -> ``registration`` key naming its template, as in the published tool
#: (t1c/t1n -> t1, t2w/t2f -> t2); epi and pd have their own template keys.
PULSE_TEMPLATES = {"t1c": "t1", "t1n": "t1", "t2w": "t2", "t2f": "t2", "epi": "epi", "pd": "pd"}


#: Seed of ANTs' metric sampling (``antsRegistration --random-seed``).
REGISTRATION_SEED = 1


#: ITK threads per registration: one, the only count at which a seeded ANTs run reproduces.
ITK_THREADS = 1


#: Format of the registration cache entries; bump to invalidate them all.
_FORMAT = 1


#: Resident memory that ``import ants`` adds to the process (measured: ~250 MB, antspyx 0.6.3).
_ANTS_IMPORT_BYTES = 260 * (1 << 20)


#: Working memory of one rigid registration beyond the import, per voxel of the atlas grid, and
#: a constant part.  Measured peak RSS of a process that imports ants and registers one volume:
#: 803 MiB at 197x233x189 (8.7 M voxels; both presets, 1 and 2 ITK threads alike) and 332 MiB at
#: 96x112x96, i.e. 64-80 bytes per voxel above the ~250 MiB import; a pool process (which also
#: imports numpy/numba) peaked at <= 690 MiB at 160x192x160.  72 bytes plus 96 MiB keeps the
#: estimate above all three (profiling/registration-2026-11-30.md).
_REG_BYTES_PER_VOXEL = 72


_REG_FIXED_BYTES = 96 * (1 << 20)


_REG_BYTES_PER_THREAD = 16 * (1 << 20)


_ANTS_LOCK = threading.Lock()  # one registration at a time per process (antspyx holds the GIL)


_ants_module: Any = None


def template_key(pulse: str) -> str:
    """Return the ``registration`` key (``t1``, ``t2``, ``epi``, ``pd``) for a pulse.

    Parameters
    ----------
    pulse : str
        A pulse name of ``data.pulses`` (case-insensitive).

    Returns
    -------
    str

    Raises
    ------
    ConfigError
        If the pulse has no template; the message lists the pulses that do.

    Examples
    --------
    >>> template_key("t2f")
    't2'
    """
    key = PULSE_TEMPLATES.get(pulse.lower())
    if key is None:
        known = ", ".join(PULSE_TEMPLATES)
        raise ConfigError(
            f"pulse {pulse!r} has no atlas template for registration; known pulses: {known} "
            "(t1c/t1n use registration.t1, t2w/t2f use registration.t2)"
        )
    return key


def ants_kwargs(settings: str, shape: Iterable[int]) -> dict[str, Any]:
    """Return the ``ants.registration`` keywords of a preset for an atlas of ``shape``.

    Parameters
    ----------
    settings : {"fast", "published"}
    shape : 3 ints
        The atlas grid.

    Returns
    -------
    dict
        ``SETTINGS[settings]``, except that ``fast`` on an atlas whose shortest axis is below
        ``FAST_MIN_AXIS`` gives the published schedule.

    Examples
    --------
    >>> ants_kwargs("fast", (40, 48, 40)) == SETTINGS["published"]
    True
    """
    if settings == "fast" and min(int(n) for n in shape) < FAST_MIN_AXIS:
        return dict(SETTINGS["published"])
    return dict(SETTINGS[settings])


def ants_import_bytes() -> int:
    """Resident memory that ``import ants`` adds to a process (bytes)."""
    return _ANTS_IMPORT_BYTES


def registration_bytes(shape: Iterable[int], threads: int) -> int:
    """Peak memory of one rigid registration beyond the process baseline, in bytes.

    Parameters
    ----------
    shape : 3 ints
        The larger of the atlas and the moving volume's shapes.
    threads : int
        ITK threads.

    Returns
    -------
    int
        ``import ants`` (resident once loaded) plus the images, pyramids and metric samples of
        one registration.

    Notes
    -----
    Fitted above the peak RSS measured at 197x233x189 and 96x112x96 with 1 and 2 ITK threads,
    for both presets (profiling/registration-2026-11-30.md): ~0.92 GiB at 197x233x189.

    Examples
    --------
    >>> registration_bytes((197, 233, 189), 2) / 2**20 > 800
    True
    """
    n = 1
    for s in shape:
        n *= int(s)
    return (
        _ANTS_IMPORT_BYTES
        + _REG_FIXED_BYTES
        + _REG_BYTES_PER_VOXEL * n
        + _REG_BYTES_PER_THREAD * max(1, int(threads))
    )


def ants_status() -> tuple[bool, str]:
    """Whether antspyx imports, and its version or the import error (for diagnose).

    Importing ants here costs ~250 MB of RSS; diagnose calls this only on request.
    """
    try:
        import ants  # noqa: PLC0415 - lazily: only when registration is on
    except Exception as exc:  # ImportError, or a broken binary wheel
        return False, f"{type(exc).__name__}: {exc}"
    return True, str(getattr(ants, "__version__", "unknown version"))


def ants_imported() -> bool:
    """Whether this process has imported antspyx (its ~250 MB then stay resident)."""
    return _ants_module is not None


def _import_ants() -> Any:
    """Import antspyx with ITK on ``ITK_THREADS`` threads (set before ITK's first use)."""
    global _ants_module
    if _ants_module is None:
        # ITK reads this when its first filter runs; setting it here, before any registration
        # of this process, is enough even if the caller imported ants earlier.
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(ITK_THREADS)
        try:
            import ants  # noqa: PLC0415 - only when registration is on
        except ImportError as exc:
            raise ConfigError(
                "pacs_sr.use_registration is true but antspyx cannot be imported "
                f"({exc}); install it with `pip install 'pacs-numba[registration]'`"
            ) from exc
        _ants_module = ants
        log.info("antspyx %s imported; ITK threads %d", ants.__version__, ITK_THREADS)
    return _ants_module


def _to_ants(ants: Any, vol: NDArray, affine: NDArray) -> Any:
    """Return an ANTs image with the voxels of ``vol`` and the world geometry of a NIfTI affine.

    nibabel's affines are RAS, ITK's physical space is LPS: flip the first two rows.
    """
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / spacing
    return ants.from_numpy(
        np.ascontiguousarray(vol, dtype=np.float32),
        origin=tuple(float(v) for v in lps[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=direction,
    )


def _fp(path: str | os.PathLike[str]) -> dict[str, Any]:
    fp = file_fingerprint(path)
    fp["path"] = os.path.realpath(fp["path"])
    return fp


def _key(doc: Mapping[str, Any]) -> str:
    text = json.dumps(doc, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class _Template:
    path: Path
    volume: CachedVolume
    mask: NDArray[np.uint8]
    mask_source: str
    fingerprint: dict[str, Any]


class Registrar:
    """Register patients to the atlas and keep the results in the volume cache.

    Parameters
    ----------
    config : RegistrationConfig
        The ``registration`` section (atlas folder, template names, mode, settings).
    store : VolumeStore
        The volume cache; registration entries go to ``store.directory / "registered"``.
    processes : int
        How many registrations may run at once, in spawned processes (the job's CPUs); the
        memory limit given to :meth:`prepare` may narrow it.

    Attributes
    ----------
    registrations, resamplings : int
        How many ``ants.registration`` and ``ants.apply_transforms`` calls this instance made
        (the rest came from the cache).
    """

    def __init__(self, config: RegistrationConfig, store: VolumeStore, processes: int = 1) -> None:
        if config.mode not in MODES:
            raise ConfigError(f"registration.mode must be one of {', '.join(MODES)}; "
                              f"got {config.mode!r}")
        if config.settings not in SETTINGS:
            raise ConfigError(f"registration.settings must be one of {', '.join(SETTINGS)}; "
                              f"got {config.settings!r}")
        self.config = config
        self.store = store
        self.processes = max(1, int(processes))
        self.directory = store.directory / "registered"
        self.registrations = 0
        self.resamplings = 0
        self._templates: dict[str, _Template] = {}
        self._guard = threading.Lock()

    # ---------------------------------------------------------------- templates
    def check_pulses(self, pulses: Iterable[str]) -> None:
        """Raise ``ConfigError`` naming the first pulse that has no atlas template."""
        for pulse in pulses:
            template_key(pulse)

    def template_path(self, pulse: str) -> Path:
        """Return the atlas template file of ``pulse``; ``InputError`` if it does not exist."""
        name = getattr(self.config, template_key(pulse))
        path = Path(self.config.atlas) / name
        if not path.is_file():
            raise InputError(
                f"atlas template for pulse {pulse!r} not found: '{path}' (registration.atlas "
                f"'{self.config.atlas}' + registration.{template_key(pulse)} {name!r}); "
                "expected a NIfTI file"
            )
        return path

    def template(self, pulse: str) -> _Template:
        """Return the atlas template of ``pulse`` (memory-mapped) and its brain mask."""
        key = template_key(pulse)
        with self._guard:
            if key in self._templates:
                return self._templates[key]
        path = self.template_path(pulse)
        vol = self.store.get(path)
        mask, source = self._brain_mask(vol)
        tpl = _Template(path, vol, mask, source, _fp(path))
        with self._guard:
            self._templates[key] = tpl
        return tpl

    def _brain_mask(self, atlas: CachedVolume) -> tuple[NDArray[np.uint8], str]:
        """``brain_mask`` in the atlas folder if it exists, else ``atlas > 0``.

        A mask file on another grid is resampled nearest-neighbour onto the atlas grid (through
        the world coordinates of both files, as ``ants.resample_image_to_target`` does).
        """
        path = Path(self.config.atlas) / self.config.brain_mask
        if not path.is_file():
            log.info("registration: no brain mask '%s'; using atlas > 0", path)
            return (np.asarray(atlas.data) > 0).astype(np.uint8), "atlas > 0"
        m = self.store.get(path)
        if m.data.shape == atlas.data.shape and affine_difference(
            m.meta.affine, atlas.meta.affine
        ) is None:
            return (np.asarray(m.data) > 0).astype(np.uint8), json.dumps(_fp(path))
        log.warning(
            "registration: brain mask '%s' has shape %s, the atlas '%s' %s; resampling it "
            "nearest-neighbour onto the atlas grid",
            path, m.data.shape, atlas.source, atlas.data.shape,
        )
        ants = _import_ants()
        res = ants.resample_image_to_target(
            _to_ants(ants, m.data, m.meta.affine),
            _to_ants(ants, atlas.data, atlas.meta.affine),
            interp_type="nearestNeighbor",
        )
        return (res.numpy() > 0).astype(np.uint8), json.dumps(_fp(path)) + " resampled"

    def brain_mask(self, pulse: str) -> NDArray[np.uint8]:
        """Return the atlas brain mask for ``pulse`` (uint8, atlas grid): the engine's mask hook."""
        return self.template(pulse).mask

    def shape(self, pulse: str) -> tuple[int, int, int]:
        """Return the atlas grid of ``pulse``: every registered volume has this shape."""
        return tuple(self.template(pulse).volume.data.shape)  # type: ignore[return-value]

    # ---------------------------------------------------------------- patients
    def register_patient(
        self,
        pulse: str,
        hr: str | os.PathLike[str],
        experts: list[str | os.PathLike[str]],
        *,
        cache_only: bool = False,
    ) -> tuple[CachedVolume, list[CachedVolume]] | None:
        """Return the patient's HR and experts in atlas space (from the cache, or made now).

        Parameters
        ----------
        pulse : str
            Selects the atlas template.
        hr : path
            The HR volume: registered to the template.
        experts : list of path
            Resampled with the HR's transform (``per_patient``) or registered on their own
            (``per_volume``).
        cache_only : bool
            Return None instead of computing a missing entry.

        Returns
        -------
        hr : CachedVolume
            Registered and masked HR: ``data`` is a read-only float32 memmap on the atlas grid;
            ``meta`` has the atlas affine and the HR's own header.
        experts : list of CachedVolume
            The same for each expert.

        Raises
        ------
        InputError
            A volume or the template cannot be read.
        """
        tpl = self.template(pulse)
        hr_tx = self._transform(tpl, hr, cache_only=cache_only)
        if hr_tx is None:
            return None
        header = self.store.get(hr).meta.header_bytes
        out_hr = self._resampled(tpl, hr, hr_tx, header, cache_only=cache_only)
        if out_hr is None:
            return None
        out_ex = []
        for e in experts:
            tx = (
                hr_tx
                if self.config.mode == "per_patient"
                else self._transform(tpl, e, cache_only=cache_only)
            )
            got = None if tx is None else self._resampled(tpl, e, tx, header,
                                                          cache_only=cache_only)
            if got is None:
                return None
            out_ex.append(got)
        return out_hr, out_ex

    def register_mean(
        self, pulse: str, experts: list[str | os.PathLike[str]]
    ) -> tuple[list[CachedVolume], dict[str, Any]]:
        """Register a new patient without HR (``predict``): the experts' mean drives it.

        The mean of the experts is registered to the template (it stands for the HR, which a
        new patient does not have); its transform resamples every expert, in both modes.

        Returns
        -------
        experts : list of CachedVolume
            Registered, masked experts.
        transform : dict
            The transform entry's sidecar (matrix, offset, settings).
        """
        tpl = self.template(pulse)
        vols = [self.store.get(e) for e in experts]
        mean = np.zeros(vols[0].data.shape, np.float32)
        for v in vols:
            if v.data.shape != mean.shape:
                raise InputError(
                    f"expert '{v.source}' has shape {v.data.shape}; expected {mean.shape} like "
                    f"'{vols[0].source}'"
                )
            mean += np.nan_to_num(np.asarray(v.data, dtype=np.float32))
        mean /= np.float32(len(vols))
        ident = {"mean_of": [_fp(e) for e in experts]}
        tx = self._transform(tpl, None, moving=(mean, vols[0].meta.affine, ident))
        assert tx is not None  # computed when missing
        header = vols[0].meta.header_bytes
        out = [self._resampled(tpl, e, tx, header) for e in experts]
        return [v for v in out if v is not None], tx

    # ---------------------------------------------------------------- entries
    def _settings_doc(self, tpl: _Template) -> dict[str, Any]:
        return {
            "settings": self.config.settings,
            "ants_kwargs": ants_kwargs(self.config.settings, tpl.volume.data.shape),
            "seed": REGISTRATION_SEED,
        }

    def _transform(
        self,
        tpl: _Template,
        source: str | os.PathLike[str] | None,
        *,
        moving: tuple[NDArray, NDArray, dict] | None = None,
        cache_only: bool = False,
    ) -> dict[str, Any] | None:
        """Return the rigid transform of ``source`` (or of an in-memory ``moving``) to ``tpl``."""
        ident = moving[2] if moving is not None else {"source": _fp(source)}
        key = _key({"format": _FORMAT, "kind": "transform", **ident,
                    "atlas": tpl.fingerprint, **self._settings_doc(tpl)})
        side = self.directory / f"{key}.json"
        rec = _read_json(side)
        if rec is not None or cache_only:
            return rec
        self._ensure_dir()
        with node_lock(self.directory / f".{key}.lock"):
            rec = _read_json(side)
            if rec is not None:
                return rec
            if moving is None:
                vol = self.store.get(source)
                data, affine, what = vol.data, vol.meta.affine, str(vol.source)
            else:
                data, affine, what = moving[0], moving[1], "mean of the experts"
            rec = self._register(tpl, data, affine, what, key)
            rec.update(ident)
            text = json.dumps(rec, indent=1)
            try:
                install_file(side, lambda f: f.write(text.encode("utf-8")))
            except OSError as exc:
                raise self._write_error(side, exc) from exc
        return rec

    def _register(
        self, tpl: _Template, data: NDArray, affine: NDArray, what: str, key: str
    ) -> dict[str, Any]:
        ants = _import_ants()
        kwargs = ants_kwargs(self.config.settings, tpl.volume.data.shape)
        with _ANTS_LOCK:
            fixed = _to_ants(ants, tpl.volume.data, tpl.volume.meta.affine)
            moving = _to_ants(ants, np.nan_to_num(np.asarray(data, np.float32)), affine)
            old_seed = ants.config._random_seed
            ants.config._random_seed = REGISTRATION_SEED
            with tempfile.TemporaryDirectory(prefix="pacs_reg_") as tmp:
                t0 = time.perf_counter()
                try:
                    reg = ants.registration(
                        fixed, moving, type_of_transform="Rigid",
                        outprefix=str(Path(tmp) / "tx_"), **kwargs,
                    )
                finally:
                    ants.config._random_seed = old_seed
                secs = time.perf_counter() - t0
                mat = Path(reg["fwdtransforms"][0])
                tx = ants.read_transform(str(mat))
                final = self.directory / f"{key}.mat"
                try:
                    install_file(final, lambda f: f.write(mat.read_bytes()))
                except OSError as exc:
                    raise self._write_error(final, exc) from exc
        self.registrations += 1
        p = np.asarray(tx.parameters, dtype=np.float64)
        centre = np.asarray(tx.fixed_parameters, dtype=np.float64)
        matrix = p[:9].reshape(3, 3)
        offset = p[9:12] + centre - matrix @ centre
        angle = float(np.degrees(np.arccos(np.clip((np.trace(matrix) - 1) / 2, -1.0, 1.0))))
        log.info(
            "registered %s -> %s: settings=%s secs=%.1f rotation_deg=%.2f translation_mm=%s",
            what, tpl.path.name, self.config.settings, secs, angle,
            np.round(offset, 2).tolist(),
        )
        return {
            "format": _FORMAT,
            "key": key,
            "mat": f"{key}.mat",
            "atlas": tpl.fingerprint,
            **self._settings_doc(tpl),
            "matrix_lps": matrix.tolist(),
            "offset_lps": offset.tolist(),
            "rotation_deg": angle,
            "secs": secs,
            "itk_threads": ITK_THREADS,
        }

    def _resampled(
        self,
        tpl: _Template,
        source: str | os.PathLike[str],
        tx: dict[str, Any],
        header: bytes,
        *,
        cache_only: bool = False,
    ) -> CachedVolume | None:
        """``source`` resampled by ``tx`` onto the atlas grid (linear), times the brain mask."""
        key = _key({"format": _FORMAT, "kind": "volume", "source": _fp(source),
                    "transform": tx["key"], "mask": tpl.mask_source, "header": _digest(header)})
        side = self.directory / f"{key}.json"
        npy = self.directory / f"{key}.npy"
        cv = self._open(key, source)
        if cv is not None or cache_only:
            return cv
        self._ensure_dir()
        with node_lock(self.directory / f".{key}.lock"):
            cv = self._open(key, source)
            if cv is not None:
                return cv
            vol = self.store.get(source)
            ants = _import_ants()
            with _ANTS_LOCK:
                warped = ants.apply_transforms(
                    fixed=_to_ants(ants, tpl.volume.data, tpl.volume.meta.affine),
                    moving=_to_ants(ants, np.nan_to_num(np.asarray(vol.data)), vol.meta.affine),
                    transformlist=[str(self.directory / tx["mat"])],
                    interpolator="linear",
                )
                out = np.ascontiguousarray(warped.numpy(), dtype=np.float32)
            self.resamplings += 1
            out *= tpl.mask
            meta = NiftiMeta(tpl.volume.meta.shape, tpl.volume.meta.affine,
                             tpl.volume.meta.zooms, header, 1)
            rec = {"format": _FORMAT, "key": key, "source": str(vol.source),
                   "transform": tx["key"], "nonfinite": 0, **meta._to_json()}
            text = json.dumps(rec, indent=1)
            try:
                install_file(npy, partial(np.lib.format.write_array, array=out, allow_pickle=False))
                install_file(side, lambda f: f.write(text.encode("utf-8")))
            except OSError as exc:
                raise self._write_error(npy, exc) from exc
            del out
        cv = self._open(key, source)
        assert cv is not None  # just installed
        return cv

    def _open(self, key: str, source: str | os.PathLike[str]) -> CachedVolume | None:
        rec = _read_json(self.directory / f"{key}.json")
        if rec is None:
            return None
        try:
            meta = NiftiMeta._from_json(rec)
            data = map_npy(self.directory / f"{key}.npy", meta.shape)
        except Exception as exc:  # a damaged entry is made again
            log.warning("registration cache entry %s is unusable (%s); rebuilding", key, exc)
            return None
        return CachedVolume(data, meta, Path(os.path.abspath(source)), 0,
                            self.directory / f"{key}.npy")

    def _ensure_dir(self) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._write_error(self.directory, exc) from exc

    @staticmethod
    def _write_error(path: Path, exc: OSError) -> OutputError:
        return OutputError(
            f"cannot write registration cache entry {path}: {exc.strerror or exc}; free space "
            "or choose another directory with --cache-dir or PACS_NUMBA_CACHE_DIR"
        )

    # ---------------------------------------------------------------- a task
    def prepare(
        self,
        pulse: str,
        patients: Mapping[str, Mapping[str, Any]],
        *,
        limit_bytes: int | None = None,
        baseline_bytes: int = 0,
        stop: threading.Event | None = None,
    ) -> dict[str, tuple[CachedVolume, list[CachedVolume]] | InputError]:
        """Register every patient of a task, before the patient pool starts.

        Patients whose entries are all cached cost nothing.  The others are registered in a
        pool of spawned processes (one ITK thread each) as wide as ``processes``, the pending
        patients and the memory limit allow, or in this process when that width is 1.

        Parameters
        ----------
        pulse : str
        patients : mapping
            ``{pid: {"HR": path, "experts": [paths]}}`` as the manifest gives them.
        limit_bytes, baseline_bytes : int, optional
            The job's memory limit and what this process needs meanwhile; the pool is sized
            so that ``baseline + width * registration_bytes + margin`` fits, and
            :class:`BudgetError` is raised before anything starts when not even one fits.
        stop : threading.Event, optional
            Set by a signal: no new registration starts.

        Returns
        -------
        dict
            ``{pid: (hr, experts)}``, or ``{pid: InputError}`` for a patient whose files could
            not be read (the engine skips it, as it skips unreadable inputs).
        """
        tpl = self.template(pulse)
        t0 = time.perf_counter()
        out: dict[str, Any] = {}
        pending: list[str] = []
        for pid, paths in patients.items():
            try:
                got = self.register_patient(pulse, paths["HR"], list(paths["experts"]),
                                            cache_only=True)
            except InputError as exc:
                out[pid] = exc
                continue
            if got is None:
                pending.append(pid)
            else:
                out[pid] = got
        width = self.pool_width(len(pending), tpl.volume.data.shape, limit_bytes,
                                baseline_bytes)
        made = self.registrations
        tick = _Progress(pulse, len(pending))
        if pending:
            log.info("registering %s: %d of %d patient(s) to %s in %d process(es), %d from the "
                     "cache; progress and an estimate follow each patient", pulse, len(pending),
                     len(patients), tpl.path.name, width, len(patients) - len(pending))
        if width > 1:
            self._run_pool(pulse, {pid: patients[pid] for pid in pending}, width, stop, tick)
        for pid in pending:
            if stop is not None and stop.is_set():
                break
            try:
                out[pid] = self.register_patient(pulse, patients[pid]["HR"],
                                                 list(patients[pid]["experts"]))
            except InputError as exc:
                out[pid] = exc
            if width <= 1:
                tick()
        log.info(
            "registration %s: %d patients to %s (mode=%s settings=%s): %d from the cache, "
            "%d registered by %d process(es) in %.1f s",
            pulse, len(patients), tpl.path.name, self.config.mode, self.config.settings,
            len(patients) - len(pending), len(pending), width if pending else 0,
            time.perf_counter() - t0,
        )
        if width <= 1:
            log.debug("registration: %d ANTs calls in this process", self.registrations - made)
        return {pid: out[pid] for pid in patients if pid in out}

    def pool_width(
        self,
        n_pending: int,
        shape: tuple[int, ...],
        limit_bytes: int | None,
        baseline_bytes: int,
    ) -> int:
        """How many registrations may run at once (0 when none is pending).

        Raises
        ------
        BudgetError
            If not even one registration fits in ``limit_bytes``.
        """
        if n_pending == 0:
            return 0
        width = min(self.processes, n_pending)
        if limit_bytes is None:
            return width
        each = registration_bytes(shape, ITK_THREADS)
        margin = margin_bytes(limit_bytes)  # the planner's safety-margin rule
        fits = (limit_bytes - baseline_bytes - margin) // each
        if fits < 1:
            need = limit_for(baseline_bytes + each)
            raise BudgetError(
                f"one registration to the atlas {tuple(shape)} needs {gib(each, 2)} on "
                f"top of {gib(baseline_bytes, 2)} baseline and a "
                f"{gib(margin, 2)} margin, but the job has {gib(limit_bytes, 2)}; "
                f"request at least {-(-need // 2**30)}G"
            )
        return int(min(width, fits))

    def _run_pool(
        self,
        pulse: str,
        patients: Mapping[str, Mapping[str, Any]],
        width: int,
        stop: threading.Event | None,
        tick: Any = None,
    ) -> None:
        """Register ``patients`` in ``width`` spawned processes; their entries land in the cache.

        Spawned, not forked: the parent runs OpenMP/Numba threads, which a fork would copy in
        an undefined state.  A failed patient is left to the caller, which retries it in this
        process and reports its error.
        """
        ctx = multiprocessing.get_context("spawn")
        # The workers are started from this thread (ProcessPoolExecutor starts them in
        # submit), which outlives them: PR_SET_PDEATHSIG fires when the creating *thread* ends.
        with ProcessPoolExecutor(width, mp_context=ctx, initializer=_worker_init,
                                 initargs=(os.getpid(),)) as pool:
            futures = {}
            for pid, paths in patients.items():
                futures[pool.submit(_worker_register, self.config, str(self.store.directory),
                                    pulse, str(paths["HR"]),
                                    [str(e) for e in paths["experts"]])] = pid
            for fut in as_completed(futures):
                if stop is not None and stop.is_set():
                    for f in futures:
                        f.cancel()
                try:
                    regs, res = fut.result()
                except InputError:
                    continue  # reported by the caller's own attempt
                except Exception as exc:  # BrokenProcessPool: a worker died (OOM kill?)
                    raise OutputError(
                        f"a registration process failed while registering patient "
                        f"{futures[fut]} ({type(exc).__name__}: {exc}); if it was killed, "
                        "the job is short of memory: see registration_bytes in the log"
                    ) from exc
                self.registrations += regs
                self.resamplings += res
                if tick is not None:
                    tick()


class _Progress:
    """One INFO line per registered patient: n/N, the time so far and an estimate of the rest."""

    def __init__(self, pulse: str, total: int) -> None:
        self.pulse, self.total, self.done = pulse, total, 0
        self.t0 = time.perf_counter()

    def __call__(self) -> None:
        self.done += 1
        secs = time.perf_counter() - self.t0
        left = secs / self.done * (self.total - self.done)
        log.info("registering %s: %d/%d patient(s) done in %.0f s%s", self.pulse, self.done,
                 self.total, secs, f", about {left:.0f} s left" if self.done < self.total
                 else "")


def _worker_init(parent_pid: int) -> None:
    """In a registration process: one thread for everything (ITK, OpenMP, Numba), and no orphans."""
    for var in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    die_with_parent(parent_pid)


#: prctl(2) option: the signal the kernel sends this process when its parent (thread) ends.
PR_SET_PDEATHSIG = 1
#: How often the fallback watchdog compares the parent pid, in seconds.
PARENT_POLL_S = 1.0


def die_with_parent(parent_pid: int) -> None:
    """End this process when ``parent_pid`` ends, however it ends (SIGKILL included).

    A spawned pool worker whose parent is gone waits on its task queue forever: it holds
    both ends of that pipe itself, so it never reads EOF, and it holds the write end of
    the multiprocessing resource tracker's pipe, which keeps the tracker alive too (about
    320 MB per worker once ANTs is loaded).  On Linux the kernel sends SIGKILL when the
    parent dies (``prctl(PR_SET_PDEATHSIG)``); that also ends a worker inside an ANTs call
    that holds the GIL.  A daemon thread that polls ``getppid`` is the fallback elsewhere
    or when prctl is refused.  Once the workers are gone the tracker reads EOF and exits.

    Parameters
    ----------
    parent_pid : int
        The pid of the process that started this one (``os.getpid()`` there).
    """
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
                log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
        except (OSError, AttributeError) as exc:  # no libc symbol: the watchdog remains
            log.debug("prctl unavailable (%s)", exc)
    # The parent may have died before prctl ran; then this process was already re-parented.
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="parent-watchdog",
                     daemon=True).start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGKILL)


def _worker_register(
    config: RegistrationConfig, cache_dir: str, pulse: str, hr: str, experts: list[str]
) -> tuple[int, int]:
    """Register one patient into the cache (in a pool process); ANTs calls made."""
    r = Registrar(config, VolumeStore(cache_dir), processes=1)
    r.register_patient(pulse, hr, experts)
    return r.registrations, r.resamplings


def clear_registered(store: VolumeStore) -> int:
    """Remove the registration entries under ``store``'s cache; return how many there were.

    Do not run it while another process registers into the same cache.
    """
    directory = store.directory / "registered"
    n = len(list(directory.glob("*.json"))) if directory.is_dir() else 0
    shutil.rmtree(directory, ignore_errors=True)
    return n


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("registration cache entry %s is unreadable (%s); rebuilding", path, exc)
        return None
    if not isinstance(rec, dict) or rec.get("format") != _FORMAT:
        return None
    return rec
