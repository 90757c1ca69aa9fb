"""The model file (``pacs_model.npz``) and the published ``weights.json``: reading and writing."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from ..core.model import StackingModel, model_from_members, model_members, weights_json_text
from ..errors import InputError
from .atomic import atomic_savez, atomic_write_text
from .integrity import require_regular_file

log = logging.getLogger(__name__)


def write_weights_json(
    path: Path, weights: NDArray[np.float32], learned: NDArray[np.bool_]
) -> None:
    """Write ``weights.json`` atomically (see :func:`weights_json_text`)."""
    atomic_write_text(path, weights_json_text(weights, learned))


def read_weights_json(
    path: Path, n_tiles: int, n_models: int
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Read a ``weights.json`` (ours or the published tool's) into full weight arrays.

    Returns
    -------
    weights : (n_tiles, n_models) float32
        The file's weights; tiles it does not list hold ``1/n_models``.
    learned : (n_tiles,) bool
        The tiles the file lists.

    Raises
    ------
    InputError
        If the file is missing or malformed, names a tile id outside ``[0, n_tiles)``, or
        holds a vector whose length is not ``n_models`` or that is not finite.
    """
    path = Path(path)
    try:
        require_regular_file(path, "weights file")
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"weights file '{path}' does not exist") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"weights file '{path}' is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"weights file '{path}': expected an object {{tile id: [weights]}}")
    weights = np.full((n_tiles, n_models), 1.0 / n_models, dtype=np.float32)
    learned = np.zeros(n_tiles, dtype=bool)
    for key, vec in data.items():
        try:
            t = int(key)
        except ValueError:
            raise InputError(f"weights file '{path}': tile id '{key}' is not an integer") from None
        if not 0 <= t < n_tiles:
            raise InputError(
                f"weights file '{path}': tile id {t} is outside [0, {n_tiles}) for this grid; "
                "were the weights made with another patch_size, stride or volume shape?"
            )
        # Only a list of plain numbers is a weight vector: strings, objects, nested
        # lists and booleans would reach numpy as ValueError/TypeError otherwise.
        numbers = isinstance(vec, list) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in vec
        )
        arr = np.asarray(vec, dtype=np.float64) if numbers else None
        if arr is None or arr.shape != (n_models,) or not np.all(np.isfinite(arr)):
            shown = json.dumps(vec)
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            raise InputError(
                f"weights file '{path}': tile {t} has {shown}; expected a list of {n_models} "
                "finite numbers (one weight per model in data.models)"
            )
        weights[t] = arr.astype(np.float32)
        learned[t] = True
    return weights, learned


def save_model(path: Path, model: StackingModel) -> None:
    """Write the compact model file (format :data:`FORMAT_VERSION`) atomically."""
    atomic_savez(path, **model_members(model))


def load_model(path: Path) -> StackingModel:
    """Read a model file written by :func:`save_model` (format 1 or 2).

    Raises
    ------
    InputError
        If the file is missing, is not a pacs_numba model file (another ``.npz``, not a zip),
        was written by a newer format, or is damaged (truncated, or its checksum does not
        match its content).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file '{path}' does not exist")
    require_regular_file(path, "model file")  # np.load would block on a FIFO
    if path.suffix.lower() == ".json":
        raise InputError(
            f"'{path}' is a weights.json, not a model file: it holds only tile weights "
            "(give the pacs_model.npz next to it, or patch size, stride and expert names)"
        )
    try:
        # our own file object: np.load leaks its handle when the zip directory is broken
        with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
            members = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, KeyError...
        # a truncated or damaged file fails in many ways; each is an input error naming it
        raise InputError(
            f"'{path}' is not a readable pacs_numba model file (damaged or not an .npz): {exc}"
        ) from None
    return model_from_members(members, str(path))


def ensure_weights_json(path: Path, model: StackingModel) -> None:
    """Rewrite ``weights.json`` when it is missing or is not the reused model's (resume)."""
    text = weights_json_text(model.weights, model.learned)
    try:
        same = path.read_text(encoding="utf-8") == text
    except (OSError, UnicodeDecodeError):
        same = False
    if not same:
        log.info("resume: '%s' is missing or differs from the model; writing it again", path)
        atomic_write_text(path, text)
