"""Moving a cohort between the two forms: NIfTI folders and the current release's HDF5 files.

* :func:`nifti_to_h5` turns a NIfTI cohort (HR, LR and every expert of a NIfTI-form config)
  into ``source_data.h5`` and one ``{model lower-case}.h5`` per expert, in the layout the
  published tool's current version reads (``docs/hdf5.md``).  Unlike their converter it also
  converts the experts.  Keys already present are skipped, so a rerun after a kill resumes.
* :func:`h5_config` is the same config in the HDF5 form.
* :func:`blends_to_nifti` exports a fold's ``results_fold_{N}.h5`` blends to ``.nii.gz``
  files for viewers.
* :func:`make_h5_cohort` generates a synthetic cohort (:func:`cohort.make_cohort`) and
  converts it, so the same patients exist in both forms.

Volumes are stored exactly as nibabel's ``get_fdata(dtype=float32)`` returns them, with the
NIfTI affine as the ``affine`` attribute: reading either form gives identical arrays.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..config import FullConfig, dump_config, load_config
from ..errors import ConfigError, InputError, OutputError
from .atomic import host_tag
from .cohort import make_cohort
from .hdf5 import H5Source, create_h5_volume, h5_reason, h5py_module, read_h5_volume
from .layout import volume_name
from .manifest import h5_expert_file, hr_path, lr_path, scan_patients, sr_path
from .nifti import read_nifti, write_nifti

log = logging.getLogger(__name__)

#: File names of the HDF5 form written next to each other.
SOURCE_FILE = "source_data.h5"
EXPERTS_DIR = "experts"


@contextmanager
def _edit_h5(path: Path) -> Iterator[Any]:
    """Open ``path`` for appending through a copy, renamed over it only when all went well.

    A converter killed half-way leaves the previous file whole (and a hidden temporary).
    """
    h5py = h5py_module()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{host_tag()}-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        if path.exists():
            shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a", locking=False) as f:
            yield f
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write HDF5 file '{path}': {h5_reason(exc)}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _put(f: Any, key: str, source: Path) -> bool:
    """Copy one NIfTI volume into ``f[key]`` unless the key is there; whether it was copied."""
    if key in f:
        return False
    data, meta = read_nifti(source)
    create_h5_volume(f, key, data, np.asarray(meta.affine, np.float64).reshape(16))
    return True


def nifti_to_h5(config: FullConfig, out_dir: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Convert the complete patients of a NIfTI-form config into the HDF5 form.

    Parameters
    ----------
    config : FullConfig
        A config in the NIfTI form; its patients, spacings, pulses and models are converted.
    out_dir : str or path-like
        Receives ``source_data.h5`` and ``experts/{model lower-case}.h5``.

    Returns
    -------
    source_h5, experts_dir : Path

    Raises
    ------
    ConfigError
        The config is already in the HDF5 form, or has no complete patient.
    InputError
        A NIfTI file cannot be read (the message names it).

    Notes
    -----
    Only patients with every file of the config (``manifest.scan_patients``) are converted.
    Keys already present are kept, so a rerun completes an interrupted conversion.  Each file
    is edited through a copy renamed over it at the end.
    """
    d = config.data
    if d.schema != "nifti":
        raise ConfigError(f"{config.path}: data is already in the HDF5 form; nothing to convert")
    out = Path(out_dir)
    source_h5, experts_dir = out / SOURCE_FILE, out / EXPERTS_DIR
    pids, _ = scan_patients(d)
    if not pids:
        raise ConfigError(f"{config.path}: no complete patient under data.hr-root '{d.hr_root}'")
    added = 0
    with _edit_h5(source_h5) as f:
        for pid in pids:
            for pulse in d.pulses:
                added += _put(f, f"high_resolution/{pid}/{pulse}", hr_path(d, pid, pulse))
                for sp in d.spacings:
                    added += _put(f, f"low_resolution/{sp}/{pid}/{pulse}",
                                  lr_path(d, pid, sp, pulse))
    h5_data = dataclasses.replace(d, experts_dir=experts_dir)
    for model in d.models:
        with _edit_h5(h5_expert_file(h5_data, model)) as f:
            for pid in pids:
                for sp in d.spacings:
                    for pulse in d.pulses:
                        added += _put(f, f"{sp}/{pid}/{pulse}",
                                      sr_path(d, model, pid, sp, pulse))
    log.info("converted %d patients (%d volumes written) -> %s, %s", len(pids), added,
             source_h5, experts_dir)
    return source_h5, experts_dir


def h5_config(config: FullConfig, source_h5: Path, experts_dir: Path,
              manifest: Path | None = None) -> FullConfig:
    """Return ``config`` with its ``data`` section in the HDF5 form (and ``manifest`` as out)."""
    data = dataclasses.replace(
        config.data, schema="hdf5", source_h5=Path(source_h5), experts_dir=Path(experts_dir),
        models_root=None, hr_root=None, lr_root=None,
        out=Path(manifest) if manifest is not None else config.data.out,
    )
    pacs = dataclasses.replace(config.pacs_sr, shape_policy="harmonise")
    return dataclasses.replace(config, data=data, pacs_sr=pacs)


def blends_to_nifti(results_h5: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                    *, force: bool = False) -> list[Path]:
    """Export every blend of a ``results_fold_{N}.h5`` to ``{out}/{spacing}/{pid}-{pulse}.nii.gz``.

    Parameters
    ----------
    results_h5 : str or path-like
        A fold's results file (ours, or the published tool's own with real datasets).
    out_dir : str or path-like
        Created if needed.
    force : bool
        Overwrite NIfTI files that already exist (otherwise they are refused, all named
        before anything is written).

    Returns
    -------
    list of Path
        The written files, sorted.

    Raises
    ------
    InputError
        The file cannot be read, or holds no ``{spacing}/blends/{pid}/{pulse}`` dataset.
    OutputError
        A target exists and ``force`` is false.
    """
    h5py = h5py_module()
    path = Path(results_h5)
    src = H5Source(path, "blends")  # for messages only
    keys: list[str] = []
    try:
        with h5py.File(path, "r", locking=False) as f:
            for spacing in f:
                blends = f[spacing].get("blends") if isinstance(f[spacing], h5py.Group) else None
                if not isinstance(blends, h5py.Group):
                    continue
                for pid in blends:
                    for pulse in blends[pid]:
                        keys.append(f"{spacing}/blends/{pid}/{pulse}")
    except OSError as exc:
        raise InputError(f"cannot read results file '{path}': {h5_reason(exc)}") from exc
    if not keys:
        raise InputError(f"results file '{src.file}' holds no '{{spacing}}/blends/{{pid}}/"
                         "{pulse}' dataset")
    targets = {}
    for key in sorted(keys):
        spacing, _, pid, pulse = key.split("/")
        targets[key] = Path(out_dir) / spacing / volume_name(pid, pulse)
    existing = [str(t) for t in targets.values() if t.exists()]
    if existing and not force:
        shown = ", ".join(existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise OutputError(f"{len(existing)} of the {len(targets)} NIfTI files exist already "
                          f"({shown}); pass --force to overwrite them, or choose another --out")
    written = []
    for key, target in targets.items():
        data, affine = read_h5_volume(H5Source(path, key))
        target.parent.mkdir(parents=True, exist_ok=True)
        write_nifti(target, data, affine)
        written.append(target)
    log.info("exported %d blends of '%s' -> %s", len(written), path, out_dir)
    return written


def make_h5_cohort(out_dir: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Generate a synthetic cohort (as :func:`cohort.make_cohort`) in the HDF5 form.

    The NIfTI files are generated under ``out_dir/nifti`` and converted into
    ``out_dir/source_data.h5`` and ``out_dir/experts/``; the NIfTI config stays at
    ``out_dir/nifti/config.yaml`` (the same cohort in the other form), and the HDF5-form
    config is written to ``out_dir/config.yaml`` (manifest ``out_dir/manifest.json``,
    results under ``out_dir/results``).

    Returns
    -------
    Path
        The HDF5-form ``config.yaml``.
    """
    out = Path(out_dir).resolve()
    nifti_cfg = load_config(make_cohort(out / "nifti", **kwargs))
    source_h5, experts_dir = nifti_to_h5(nifti_cfg, out)
    cfg = h5_config(nifti_cfg, source_h5, experts_dir, out / "manifest.json")
    cfg = dataclasses.replace(
        cfg, pacs_sr=dataclasses.replace(cfg.pacs_sr, out_root=out / "results"),
        path=out / "config.yaml",
    )
    dump_config(cfg, cfg.path)
    log.info("cohort (HDF5 form): wrote %s", cfg.path)
    return cfg.path


__all__ = ["blends_to_nifti", "h5_config", "make_h5_cohort", "nifti_to_h5"]
