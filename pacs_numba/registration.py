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
  of ``<volume cache>/registered/``, keyed by the source file (path, size, mtime), the atlas
  template file, the settings and the seed; a volume's key adds the transform that resampled it
  and the brain mask.  Entries are installed by atomic rename and built under the same per-node
  ``flock`` as the volume cache, so folds, tasks, reruns and SLURM tasks on a node share them.
* ANTs samples the metric at jittered points: the seed is pinned (``REGISTRATION_SEED``), and
  ITK's static "Platform" threader is chosen, because its default thread pool makes seeded
  multi-threaded runs differ; two runs then give identical volumes.  ITK's thread count is set
  from the job's CPUs before ``import ants`` (a result depends slightly on that count; a cached
  entry is reused whatever count made it).  antspyx holds the GIL while it registers, so registrations run one at a time,
  each with every CPU, before the patient pool starts.

This is the only module that imports ``ants``, and only when a registration is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .blending import blend_volume
from .config import REGISTRATION_MODES, REGISTRATION_SETTINGS, RegistrationConfig
from .errors import BudgetError, ConfigError, InputError, OutputError
from .io import (
    CachedVolume,
    NiftiMeta,
    VolumeStore,
    _install,
    _map_npy,
    _node_lock,
    file_fingerprint,
)
from .statistics import normalisation, valid_mask
from .tiling import TileGrid

log = logging.getLogger(__name__)

__all__ = [
    "MODES",
    "SETTINGS",
    "PULSE_TEMPLATES",
    "REGISTRATION_SEED",
    "Registrar",
    "template_key",
    "registration_bytes",
    "ants_import_bytes",
    "ants_status",
    "blend_with_mask",
]

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

#: Pulse name -> ``registration`` key naming its template, as in the published tool
#: (t1c/t1n -> t1, t2w/t2f -> t2); epi and pd have their own template keys.
PULSE_TEMPLATES = {"t1c": "t1", "t1n": "t1", "t2w": "t2", "t2f": "t2", "epi": "epi", "pd": "pd"}

#: Seed of ANTs' metric sampling (``antsRegistration --random-seed``).
REGISTRATION_SEED = 1
#: ITK threader that makes seeded multi-threaded registrations reproducible.
ITK_THREADER = "Platform"

#: Format of the registration cache entries; bump to invalidate them all.
_FORMAT = 1

#: Resident memory that ``import ants`` adds to the process (measured: ~250 MB, antspyx 0.6.3).
_ANTS_IMPORT_BYTES = 260 * (1 << 20)
#: Working memory of one rigid registration beyond the import, per voxel of the larger of the
#: fixed and moving images, and its constant part (fitted to peak RSS at 197x233x189 with 1
#: and 2 ITK threads, ANTs defaults and ``fast``; see profiling/registration-2026-11-30.md).
_REG_BYTES_PER_VOXEL = 72
_REG_FIXED_BYTES = 64 * (1 << 20)
_REG_BYTES_PER_THREAD = 16 * (1 << 20)

_ANTS_LOCK = threading.Lock()  # one registration at a time per process (antspyx holds the GIL)
_ants_module: Any = None
_ants_threads: int | None = None


# --------------------------------------------------------------------------------------
# Settings, templates and costs
# --------------------------------------------------------------------------------------
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
    A linear fit to the peak RSS measured at 197x233x189 (8.7 M voxels) with 1 and 2 ITK
    threads, for both presets (profiling/registration-2026-11-30.md).

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


def _import_ants(threads: int) -> Any:
    """Import antspyx with ITK set to ``threads`` threads (ITK reads it once, at first use)."""
    global _ants_module, _ants_threads
    if _ants_module is None:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, threads))
        # ITK's default "Pool" threader hands work out dynamically, and seeded registrations
        # with 2+ threads then differ from run to run (measured: rotations 1-9 degrees apart on
        # a small phantom).  The "Platform" threader splits the work statically: reproducible.
        os.environ["ITK_GLOBAL_DEFAULT_THREADER"] = ITK_THREADER
        try:
            import ants  # noqa: PLC0415 - only when registration is on
        except ImportError as exc:
            raise ConfigError(
                "pacs_sr.use_registration is true but antspyx cannot be imported "
                f"({exc}); install it with `pip install 'pacs-numba[registration]'`"
            ) from exc
        _ants_module, _ants_threads = ants, max(1, threads)
        log.info("antspyx %s imported; ITK threads %d", ants.__version__, _ants_threads)
    elif threads != _ants_threads:
        log.debug("ITK threads stay %s (set at import); asked for %d", _ants_threads, threads)
    return _ants_module


def _to_ants(ants: Any, vol: NDArray, affine: NDArray) -> Any:
    """An ANTs image with the voxels of ``vol`` and the world geometry of a NIfTI affine.

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


# --------------------------------------------------------------------------------------
# Blend with a given brain mask (the engine's hook)
# --------------------------------------------------------------------------------------
def blend_with_mask(
    hr: NDArray[np.float32],
    experts: list[NDArray[np.float32]],
    grid: TileGrid,
    weights: NDArray[np.float32],
    *,
    window: str,
    mask: NDArray[np.uint8],
) -> NDArray[np.float32]:
    """Blend one patient as ``blending.blend_patient`` does, with the atlas brain mask.

    Parameters
    ----------
    hr, experts, grid, weights, window
        As for :func:`pacs_numba.blending.blend_patient` (atlas-space volumes).
    mask : (N0, N1, N2) uint8
        The atlas brain mask (algorithm A7.5 with registration), used instead of the largest
        connected component of the HR.

    Returns
    -------
    (N0, N1, N2) float32

    Raises
    ------
    InputError
        If the registered HR has no voxel > 0.
    """
    valid, _ = valid_mask(hr, experts)
    if not valid.any():
        raise InputError("the registered HR has no voxel > 0 (empty mask)")
    mu_hr, sd_hr, mus, sds = normalisation(hr, experts, valid)
    del valid
    return blend_volume(experts, grid, weights, mus=mus, sds=sds, mu_hr=mu_hr, sd_hr=sd_hr,
                        mask=mask, window=window)


# --------------------------------------------------------------------------------------
# The registrar
# --------------------------------------------------------------------------------------
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
    threads : int
        ITK threads (the job's CPUs).

    Attributes
    ----------
    registrations, resamplings : int
        How many ``ants.registration`` and ``ants.apply_transforms`` calls this instance made
        (the rest came from the cache).
    """

    def __init__(self, config: RegistrationConfig, store: VolumeStore, threads: int) -> None:
        if config.mode not in MODES:
            raise ConfigError(f"registration.mode must be one of {', '.join(MODES)}; "
                              f"got {config.mode!r}")
        if config.settings not in SETTINGS:
            raise ConfigError(f"registration.settings must be one of {', '.join(SETTINGS)}; "
                              f"got {config.settings!r}")
        self.config = config
        self.store = store
        self.threads = max(1, int(threads))
        self.directory = store.directory / "registered"
        self.registrations = 0
        self.resamplings = 0
        self._templates: dict[str, _Template] = {}
        self._guard = threading.Lock()

    # ---------------------------------------------------------------- templates
    def template_path(self, pulse: str) -> Path:
        """The atlas template file of ``pulse``; ``InputError`` if it does not exist."""
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
        """The atlas template of ``pulse`` (memory-mapped) and its brain mask."""
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
        if m.data.shape == atlas.data.shape and np.allclose(
            m.meta.affine, atlas.meta.affine, atol=1e-3
        ):
            return (np.asarray(m.data) > 0).astype(np.uint8), json.dumps(_fp(path))
        log.warning(
            "registration: brain mask '%s' has shape %s, the atlas '%s' %s; resampling it "
            "nearest-neighbour onto the atlas grid",
            path, m.data.shape, atlas.source, atlas.data.shape,
        )
        ants = _import_ants(self.threads)
        res = ants.resample_image_to_target(
            _to_ants(ants, m.data, m.meta.affine),
            _to_ants(ants, atlas.data, atlas.meta.affine),
            interp_type="nearestNeighbor",
        )
        return (res.numpy() > 0).astype(np.uint8), json.dumps(_fp(path)) + " resampled"

    def brain_mask(self, pulse: str) -> NDArray[np.uint8]:
        """The atlas brain mask for ``pulse`` (uint8, atlas grid): the engine's mask hook."""
        return self.template(pulse).mask

    def shape(self, pulse: str) -> tuple[int, int, int]:
        """The atlas grid of ``pulse``: every registered volume has this shape."""
        return tuple(self.template(pulse).volume.data.shape)  # type: ignore[return-value]

    # ---------------------------------------------------------------- patients
    def register_patient(
        self, pulse: str, hr: str | os.PathLike[str], experts: list[str | os.PathLike[str]]
    ) -> tuple[CachedVolume, list[CachedVolume]]:
        """The patient's HR and experts in atlas space (from the cache, or made now).

        Parameters
        ----------
        pulse : str
            Selects the atlas template.
        hr : path
            The HR volume: registered to the template.
        experts : list of path
            Resampled with the HR's transform (``per_patient``) or registered on their own
            (``per_volume``).

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
        hr_tx = self._transform(tpl, hr)
        header = self.store.get(hr).meta.header_bytes
        out_hr = self._resampled(tpl, hr, hr_tx, header)
        out_ex = []
        for e in experts:
            tx = hr_tx if self.config.mode == "per_patient" else self._transform(tpl, e)
            out_ex.append(self._resampled(tpl, e, tx, header))
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
        header = vols[0].meta.header_bytes
        return [self._resampled(tpl, e, tx, header) for e in experts], tx

    # ---------------------------------------------------------------- entries
    def _settings_doc(self) -> dict[str, Any]:
        return {
            "settings": self.config.settings,
            "ants_kwargs": SETTINGS[self.config.settings],
            "seed": REGISTRATION_SEED,
        }

    def _transform(
        self,
        tpl: _Template,
        source: str | os.PathLike[str] | None,
        *,
        moving: tuple[NDArray, NDArray, dict] | None = None,
    ) -> dict[str, Any]:
        """The rigid transform of ``source`` (or of an in-memory ``moving``) to ``tpl``."""
        ident = moving[2] if moving is not None else {"source": _fp(source)}
        key = _key({"format": _FORMAT, "kind": "transform", **ident,
                    "atlas": tpl.fingerprint, **self._settings_doc()})
        side = self.directory / f"{key}.json"
        rec = _read_json(side)
        if rec is not None:
            return rec
        self._ensure_dir()
        with _node_lock(self.directory / f".{key}.lock"):
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
                _install(side, lambda f: f.write(text.encode("utf-8")))
            except OSError as exc:
                raise self._write_error(side, exc) from exc
        return rec

    def _register(
        self, tpl: _Template, data: NDArray, affine: NDArray, what: str, key: str
    ) -> dict[str, Any]:
        ants = _import_ants(self.threads)
        kwargs = SETTINGS[self.config.settings]
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
                    _install(final, lambda f: f.write(mat.read_bytes()))
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
            **self._settings_doc(),
            "matrix_lps": matrix.tolist(),
            "offset_lps": offset.tolist(),
            "rotation_deg": angle,
            "secs": secs,
            "itk_threads": _ants_threads,
        }

    def _resampled(
        self, tpl: _Template, source: str | os.PathLike[str], tx: dict[str, Any], header: bytes
    ) -> CachedVolume:
        """``source`` resampled by ``tx`` onto the atlas grid (linear), times the brain mask."""
        key = _key({"format": _FORMAT, "kind": "volume", "source": _fp(source),
                    "transform": tx["key"], "mask": tpl.mask_source, "header": _digest(header)})
        side = self.directory / f"{key}.json"
        npy = self.directory / f"{key}.npy"
        cv = self._open(key, source)
        if cv is not None:
            return cv
        self._ensure_dir()
        with _node_lock(self.directory / f".{key}.lock"):
            cv = self._open(key, source)
            if cv is not None:
                return cv
            vol = self.store.get(source)
            ants = _import_ants(self.threads)
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
                _install(npy, lambda f: np.lib.format.write_array(f, out, allow_pickle=False))
                _install(side, lambda f: f.write(text.encode("utf-8")))
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
            data = _map_npy(self.directory / f"{key}.npy", meta.shape)
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
        """Register every patient of a task, one at a time, before the patient pool starts.

        Parameters
        ----------
        pulse : str
        patients : mapping
            ``{pid: {"HR": path, "experts": [paths]}}`` as the manifest gives them.
        limit_bytes, baseline_bytes : int, optional
            The job's memory limit and what the process already needs; a registration that
            would not fit raises :class:`BudgetError` before it starts.
        stop : threading.Event, optional
            Set by a signal: no new patient starts.

        Returns
        -------
        dict
            ``{pid: (hr, experts)}``, or ``{pid: InputError}`` for a patient whose files could
            not be read (the engine skips it, as it skips unreadable inputs).
        """
        tpl = self.template(pulse)
        if limit_bytes is not None:
            need = baseline_bytes + registration_bytes(tpl.volume.data.shape, self.threads)
            if need > limit_bytes:
                raise BudgetError(
                    f"one registration needs {need / 2**30:.2f} GiB (ANTs "
                    f"{registration_bytes(tpl.volume.data.shape, self.threads) / 2**30:.2f} GiB "
                    f"+ {baseline_bytes / 2**30:.2f} GiB baseline) but the job has "
                    f"{limit_bytes / 2**30:.2f} GiB; request more memory"
                )
        out: dict[str, Any] = {}
        t0 = time.perf_counter()
        made = self.registrations
        for pid, paths in patients.items():
            if stop is not None and stop.is_set():
                break
            try:
                out[pid] = self.register_patient(pulse, paths["HR"], list(paths["experts"]))
            except InputError as exc:
                out[pid] = exc
        log.info(
            "registration %s: %d patients to %s (mode=%s settings=%s) in %.1f s, "
            "%d registered now, the rest from the cache",
            pulse, len(out), tpl.path.name, self.config.mode, self.config.settings,
            time.perf_counter() - t0, self.registrations - made,
        )
        return out

    def clear(self) -> None:
        """Remove every registration cache entry."""
        shutil.rmtree(self.directory, ignore_errors=True)


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
