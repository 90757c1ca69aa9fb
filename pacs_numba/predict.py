"""Inference without HR (algorithm B6): blend a new patient's experts with a saved model.

The compat evaluate path (algorithm A7) takes three things from the HR: the mask that the z-score
statistics are taken over, the mean/std the blend is mapped back with, and the brain mask.
A new patient has no HR, so ``predict`` takes them from the experts:

* the statistics mask is ``mean(experts) > 0`` (finite voxels only), and each expert is
  z-scored over it with its own mean and std, as in training;
* the blend is mapped back with the mean of the experts' means and the mean of their
  standard deviations — the experts are all estimates of the same scan, so these estimate
  the HR's mean and std;
* the brain mask is the largest 26-connected component of ``mean(experts) >= 0.1``.

On a patient that does have an HR, the prediction differs from ``evaluate``'s blend only by
these substitutions (the tests bound the difference).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from .blending import Normalisation, blend_patient, brain_mask, expert_mean
from .errors import InputError
from .io import VolumeStore, write_nifti
from .model import StackingModel, load_model

log = logging.getLogger(__name__)


def predict_volume(
    experts: Sequence[NDArray[np.float32]],
    model: StackingModel,
    *,
    window: str = "hann",
    norm: Normalisation | None = None,
    mask: NDArray | None = None,
) -> NDArray[np.float32]:
    """Blend one patient's expert volumes with a model, without an HR.

    Parameters
    ----------
    experts : sequence of (N0, N1, N2) float32
        The expert volumes, in the model's expert order.
    model : StackingModel
        Tile weights and grid (``pacs_model.npz`` from ``train``).
    window : {"hann", "flat"}
        Mixing window when tiles overlap (the config's ``mixing_window``).
    norm : Normalisation, optional
        Statistics source; default :meth:`Normalisation.from_experts` (algorithm B6).
        ``Normalisation.from_hr`` gives the evaluate blend when an HR exists.
    mask : (N0, N1, N2) bool or uint8, optional
        Brain mask; default the largest component of ``mean(experts) >= 0.1``.  A
        registered atlas mask goes here.

    Returns
    -------
    (N0, N1, N2) float32
        The blend, brain-masked, in the experts' intensity units.

    Raises
    ------
    InputError
        If the number of experts or their shape does not fit the model.
    """
    if len(experts) != len(model.model_names):
        raise InputError(
            f"the model blends {len(model.model_names)} experts {list(model.model_names)}; "
            f"got {len(experts)} volumes"
        )
    for name, vol in zip(model.model_names, experts, strict=True):
        if tuple(vol.shape) != model.grid.shape:
            raise InputError(
                f"expert {name} has shape {tuple(vol.shape)}; the model was trained on "
                f"{model.grid.shape}"
            )
    if norm is None or mask is None:
        proxy = expert_mean(experts)
        if norm is None:
            norm = Normalisation.from_experts(experts, proxy)
        if mask is None:
            mask = brain_mask(proxy)
        del proxy
    return blend_patient(
        experts, model.grid, model.weights, window=window, norm=norm, brain_mask=mask
    )


def check_out_path(out_path: Path, inputs: Sequence[Path], *, force: bool = False) -> Path:
    """Check ``predict``'s output path before anything is read.

    Raises
    ------
    InputError
        If ``out_path`` does not end in ``.nii`` or ``.nii.gz`` (a folder or a name without
        extension), is one of ``inputs`` (same file, whatever the spelling), or exists and
        ``force`` is False.
    """
    out = Path(out_path)
    name = str(out_path)
    if name.endswith(("/", os.sep)) or out.is_dir():
        raise InputError(f"--out '{name}' is a folder; expected a file name ending in .nii.gz")
    if not out.name.lower().endswith((".nii", ".nii.gz")):
        raise InputError(f"--out '{name}' must end in .nii or .nii.gz")
    real = os.path.realpath(out)
    for src in inputs:
        same = os.path.realpath(src) == real
        if not same and out.exists():
            try:
                same = os.path.samefile(src, out)
            except OSError:
                same = False
        if same:
            raise InputError(f"--out '{name}' is the input '{src}'; choose another output file")
    if out.exists() and not force:
        raise InputError(f"--out '{name}' already exists; pass --force to overwrite it")
    return out


def model_window(model: StackingModel, requested: str | None) -> str:
    """Return the mixing window to predict with: the model's own; ``requested`` must agree.

    A model file records the ``pacs_sr`` settings it was trained with.  Tile size and stride
    come from its grid and the normalisation is z-score (the only one); the mixing window is
    the one setting a caller could pass differently, and a blend with another window than
    training used is a different blend, so a contradiction is an error.  A model without
    recorded settings (made from a weights.json) takes ``requested`` or ``"hann"``.
    """
    trained = (model.settings.get("pacs_sr") or {}).get("mixing_window")
    if trained is None:
        return requested or "hann"
    if requested is not None and requested != trained:
        raise InputError(
            f"--window {requested} contradicts the model, which was trained with "
            f"mixing_window: {trained}; drop --window (the model's setting is used)"
        )
    normalize = (model.settings.get("pacs_sr") or {}).get("normalize", "zscore")
    if normalize != "zscore":
        raise InputError(f"the model was trained with normalize: {normalize}; only zscore is "
                         "supported")
    return str(trained)


def predict_files(
    model_path: Path,
    expert_paths: Sequence[Path],
    out_path: Path,
    *,
    window: str | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
) -> Path:
    """Read the experts, blend them with the model file and write the prediction.

    The output keeps the first expert's affine and header, as float32.  ``window`` None
    uses the model's mixing window (:func:`model_window`); ``out_path`` is checked by
    :func:`check_out_path` before anything is read.
    """
    check_out_path(out_path, [Path(model_path), *map(Path, expert_paths)], force=force)
    model = load_model(model_path)
    window = model_window(model, window)
    store = VolumeStore(cache_dir)
    vols = [store.get(p) for p in expert_paths]
    pred = predict_volume([v.data for v in vols], model, window=window)
    write_nifti(out_path, pred, vols[0].meta.affine, vols[0].meta.header)
    log.info("predicted %s from %d experts with %s", out_path, len(vols), model_path)
    return Path(out_path)
