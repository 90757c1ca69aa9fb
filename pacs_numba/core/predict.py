"""Blending a patient with a saved model, with or without its HR (algorithm B6)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from .._config import HR_FREE_MAPPINGS
from ..errors import InputError
from .blending import Normalisation, blend_patient, brain_mask, expert_mean
from .model import StackingModel

log = logging.getLogger(__name__)


def predict_volume(
    experts: Sequence[NDArray[np.float32]],
    model: StackingModel,
    *,
    window: str | None = None,
    norm_source: NDArray[np.float32] | None = None,
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
    window : {"hann", "flat"} or None
        Mixing window where tiles overlap; None: the model's own (``model.window``).
    norm_source : (N0, N1, N2) float32 or None
        Where the statistics mask, the intensity mapping and the brain mask come from.
        None (a new patient): the experts, as the module docstring says, mapped back as
        the model's ``hr_free_mapping`` says (:func:`model_mapping`).  An HR volume:
        exactly ``evaluate``'s blend (algorithm A7).
    norm : Normalisation, optional
        An explicit statistics source (overrides ``norm_source`` for the statistics).
    mask : (N0, N1, N2) bool or uint8, optional
        An explicit brain mask, e.g. a registered atlas mask (overrides the default: the
        largest component of ``norm_source >= 0.1``, or of the experts' mean).

    Returns
    -------
    (N0, N1, N2) float32
        The blend, brain-masked, in the experts' intensity units.

    Raises
    ------
    InputError
        If the number of experts or their shape does not fit the model, or no window is
        known.
    """
    window = model_window(model, window)
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
    if norm_source is not None:
        if norm is None:
            norm = Normalisation.from_hr(norm_source, experts)
        if mask is None:
            mask = brain_mask(norm_source)
    if norm is None or mask is None:
        proxy = expert_mean(experts)
        if norm is None:
            norm = Normalisation.from_experts(experts, proxy, mapping=model_mapping(model))
        if mask is None:
            mask = brain_mask(proxy)
        del proxy
    return blend_patient(
        experts, model.grid, model.weights, window=window, norm=norm, brain_mask=mask
    )


def model_mapping(model: StackingModel) -> str:
    """Return how the model's HR-free blends are mapped back (``pacs_sr.hr_free_mapping``).

    The setting the model was trained with (algorithm B6); ``mean``, the published rule,
    for a model that does not record one (older files, a published ``weights.json``).

    Raises
    ------
    InputError
        If the recorded value is not one this version knows.
    """
    mapping = (model.settings.get("pacs_sr") or {}).get("hr_free_mapping", "mean")
    if mapping not in HR_FREE_MAPPINGS:
        raise InputError(f"the model was trained with hr_free_mapping: {mapping!r}; this "
                         f"version knows {list(HR_FREE_MAPPINGS)}")
    return str(mapping)


def model_window(model: StackingModel, requested: str | None) -> str:
    """Return the mixing window to predict with: the model's own; ``requested`` must agree.

    A model file records the ``pacs_sr`` settings it was trained with.  Tile size and stride
    come from its grid and the normalisation is z-score (the only one); the mixing window is
    the one setting a caller could pass differently, and a blend with another window than
    training used is a different blend, so a contradiction is an error.  A model without
    recorded settings (made from a weights.json) takes ``requested``, which it then needs.
    """
    trained = model.window or (model.settings.get("pacs_sr") or {}).get("mixing_window")
    if trained is None:
        if requested is None:
            raise InputError(
                "the model does not say which mixing window it was trained with (a published "
                "weights.json); pass --window hann|flat as in its config's mixing_window"
            )
        return requested
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
