"""NIfTI weight-map files for viewers (ITK-SNAP, FSLeyes): names, legends and writers."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..core.blending import weight_analysis, weight_maps
from ..core.model import StackingModel, column_names
from ..core.weightmaps import EXPERT_COLOURS, BlendWeightMaps, dominant_labels, entropy_map, legend
from .atomic import atomic_savez_from, atomic_write_text, npz_bytes
from .layout import TaskLayout
from .nifti import write_nifti, write_nifti_volumes
from .record import model_digest


def _itksnap_labels(model_names: Sequence[str]) -> str:
    lines = ["# ITK-SNAP label description file (pacs_numba dominant-expert map)",
             '    0     0    0    0        0  0  0    "background"']
    for e, name in enumerate(model_names):
        r, g, b = EXPERT_COLOURS[e % len(EXPERT_COLOURS)]
        lines.append(f'{e + 1:5d} {r:5d} {g:4d} {b:4d}        1  1  1    "{name}"')
    return "\n".join(lines) + "\n"


def _write_legends(paths: dict[str, Path], model_names: Sequence[str],
                   legend_extra: dict | None) -> None:
    atomic_write_text(paths["itksnap"], _itksnap_labels(model_names))
    # the legend last: its presence means the maps before it are complete
    atomic_write_text(paths["legend"],
                      json.dumps({**legend(model_names), **(legend_extra or {})}, indent=2))


def map_paths(directory: Path, stem: str) -> dict[str, Path]:
    """Paths of one set of maps: ``{stem}_weights.nii.gz``, ``_entropy``, ``_dominant``, legends."""
    d = Path(directory)
    return {
        "weights": d / f"{stem}_weights.nii.gz",
        "entropy": d / f"{stem}_entropy.nii.gz",
        "dominant": d / f"{stem}_dominant.nii.gz",
        "legend": d / f"{stem}_dominant.json",
        "itksnap": d / f"{stem}_dominant_itksnap.txt",
    }


def write_weight_niftis(
    directory: Path,
    stem: str,
    maps: NDArray[np.float32],
    model_names: Sequence[str],
    affine: ArrayLike | None,
    *,
    mask: ArrayLike | None = None,
    legend_extra: dict | None = None,
) -> list[Path]:
    """Write the 4-D weight map, entropy map, dominant-expert map and legends.

    Parameters
    ----------
    directory : Path
        Output folder.
    stem : str
        File name prefix (see :func:`map_paths`).
    maps : (N0, N1, N2, M) float32
        From :func:`blend_weight_maps`.
    model_names : sequence of str
        Expert names in the order of the last axis.
    affine : (4, 4) array_like or None
        The HR's affine (identity when None).
    mask : (N0, N1, N2) array_like or None
        Brain mask: weights, entropy and labels are 0 outside it (as the blend is).
    legend_extra : dict, optional
        More entries for the JSON legend (e.g. the model's digest).

    Returns
    -------
    list of Path
        The files written (atomically).
    """
    paths = map_paths(directory, stem)
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    inside = None if mask is None else np.asarray(mask, dtype=bool)
    if inside is not None:
        maps = maps * inside[..., None].astype(np.float32)
    m = np.asarray(maps, np.float32)
    write_nifti_volumes(paths["weights"], (m[..., e] for e in range(m.shape[-1])), m.shape, aff)
    write_nifti(paths["entropy"], entropy_map(m), aff, None)
    write_nifti(paths["dominant"], dominant_labels(m, inside), aff, None, dtype=np.uint8)
    _write_legends(paths, model_names, legend_extra)
    return list(paths.values())


def write_blend_weight_maps(
    maps: BlendWeightMaps,
    directory: Path,
    stem: str,
    model_names: Sequence[str],
    affine: ArrayLike | None,
    *,
    mask: ArrayLike | None = None,
    legend_extra: dict | None = None,
) -> list[Path]:
    """Write the NIfTI set of ``maps`` (see :func:`write_weight_niftis`), one expert at a time."""
    paths = map_paths(directory, stem)
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    inside = None if mask is None else np.asarray(mask, dtype=bool)

    def volumes():
        for e in range(maps.n_experts):
            v = maps.expert(e)
            if inside is not None:
                v *= inside
            yield v

    write_nifti_volumes(paths["weights"], volumes(), (*maps.grid.shape, maps.n_experts),
                        aff)
    ent = maps.entropy if inside is None else np.where(inside, maps.entropy, np.float32(0))
    write_nifti(paths["entropy"], ent, aff, None)
    del ent
    lab = maps.labels if inside is None else np.where(inside, maps.labels, np.uint8(0))
    write_nifti(paths["dominant"], lab, aff, None, dtype=np.uint8)
    del lab
    _write_legends(paths, model_names, legend_extra)
    return list(paths.values())


class WeightNpz:
    """The two weight-map ``.npz`` files of a task's test patients (algorithm A8).

    Their content is the same for every test patient but ``patient_id``, so both are
    compressed once into template bytes (a few MB) before the pool starts; the per-voxel
    maps (``4NM + 8N`` bytes) are freed at once, and each patient's files are the template
    plus a ``patient_id`` member.
    """

    def __init__(self, model: StackingModel, spacing: str, pulse: str) -> None:
        grid, names = model.grid, np.asarray(column_names(model))  # 2M with gating (A5.2)
        maps = weight_maps(model.weights, grid)
        analysis = weight_analysis(maps, list(names), tiles=(model.weights, grid))
        self.weights = npz_bytes(
            weight_maps=maps, model_names=names, split=np.asarray("test"),
            spacing=np.asarray(spacing), pulse=np.asarray(pulse),
            patch_size=np.int64(grid.patch_size), stride=np.int64(grid.stride),
            shape=np.asarray(grid.shape, dtype=np.int64), n_models=np.int64(len(names)),
        )
        self.analysis = npz_bytes(**analysis)  # weight_maps, entropy, dominant, statistics
        del maps, analysis

    def write(self, lay: TaskLayout, pid: str) -> list[Path]:
        """Write ``{pid}_weights_test.npz`` and ``{pid}_weight_analysis_test.npz``."""
        paths = [lay.weight_npz(pid), lay.weight_analysis_npz(pid)]
        atomic_savez_from(paths[0], self.weights, patient_id=np.asarray(pid))
        atomic_savez_from(paths[1], self.analysis, patient_id=np.asarray(pid))
        return paths

class WeightNifti:
    """The NIfTI weight maps of a task (see :mod:`pacs_numba.core.weightmaps`).

    The maps the blend applies do not depend on the patient, so the entropy and label maps
    are made once (``weightmaps.BlendWeightMaps``); each test patient's copy is masked with
    that patient's brain mask and carries its HR's affine.  The model's own copy
    (``weight_maps_model_*``) is unmasked, on the model's affine.
    """

    def __init__(self, model: StackingModel, window: str) -> None:
        self.model = model
        self.maps = BlendWeightMaps(model.weights, model.grid, window)

    def write_model(self, mdir: Path) -> list[Path]:
        """Write ``weight_maps_model_{weights,entropy,dominant}`` for the model itself.

        The legend records the model's digest; files of the same model are kept as they are
        (a resumed run leaves its complete outputs untouched).
        """
        m = self.model
        digest = model_digest(m.weights, m.learned, m.grid.shape)
        paths = map_paths(mdir, "weight_maps_model")
        try:
            same = json.loads(paths["legend"].read_text()).get("model_digest") == digest
        except (OSError, ValueError):
            same = False
        if same and all(p.exists() for p in paths.values()):
            return list(paths.values())
        return write_blend_weight_maps(self.maps, mdir, "weight_maps_model", column_names(m),
                                       m.affine, legend_extra={"model_digest": digest})

    def write_patient(self, mdir: Path, pid: str, affine: Any, mask: Any) -> list[Path]:
        """Write ``{pid}_weight_maps_test_*`` masked like the patient's blend."""
        return write_blend_weight_maps(self.maps, mdir, f"{pid}_weight_maps_test",
                                       column_names(self.model), affine, mask=mask)
