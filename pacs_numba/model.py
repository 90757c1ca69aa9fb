"""The learned model of one (fold, spacing, pulse) task: tile weights plus what they mean.

Two on-disk forms:

* ``weights.json`` — the published tool's format (algorithm A8): ``{"<tile id>": [w_1..w_M]}``
  for the tiles with a learned weight, ids ascending, indent 2, values ``float(float32)``.
  It is written for compatibility and can be read back (``evaluate --weights``).
* ``pacs_model.npz`` — our compact model file: every tile's weights (1/M where none was
  learned), the learned mask, the grid geometry, the expert names in order and the settings
  used, so a model can be applied (``evaluate``/``predict``) without the config that made it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import InputError
from .integrity import require_regular_file
from .io import atomic_savez, atomic_write_text
from .layout import MODEL_FILE  # noqa: F401 - re-exported: the model's file name
from .tiling import TileGrid

FORMAT_VERSION = 1


@dataclass(frozen=True)
class StackingModel:
    """Tile weights of one task and the geometry they belong to.

    Parameters
    ----------
    weights : (n_tiles, n_experts) float32
        Weight of every tile; tiles without a learned weight hold ``1/M``.
    learned : (n_tiles,) bool
        Which tiles had mask voxels in some training patient.
    grid : TileGrid
        Volume shape, patch size and stride the weights belong to.
    model_names : tuple of str
        Expert names in the order of the weight columns.
    settings : dict
        The ``pacs_sr`` settings and task identity the model was made with.
    """

    weights: NDArray[np.float32]
    learned: NDArray[np.bool_]
    grid: TileGrid
    model_names: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t, m = self.weights.shape
        if t != self.grid.n_tiles or m != len(self.model_names) or self.learned.shape != (t,):
            raise ValueError(
                f"weights {self.weights.shape}, learned {self.learned.shape} do not fit "
                f"{self.grid.n_tiles} tiles x {len(self.model_names)} experts"
            )


def weights_json_text(weights: NDArray[np.float32], learned: NDArray[np.bool_]) -> str:
    """Return the published ``weights.json`` text for the learned tiles."""
    w32 = np.asarray(weights, dtype=np.float32)
    data = {str(int(t)): [float(x) for x in w32[t]] for t in np.flatnonzero(learned)}
    return json.dumps(data, indent=2)


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
    """Write the compact model file atomically."""
    g = model.grid
    atomic_savez(
        path,
        weights=np.asarray(model.weights, dtype=np.float32),
        learned=np.asarray(model.learned, dtype=bool),
        shape=np.asarray(g.shape, dtype=np.int64),
        patch_size=np.int64(g.patch_size),
        stride=np.int64(g.stride),
        model_names=np.asarray(model.model_names),
        settings=np.asarray(json.dumps(model.settings, sort_keys=True, default=str)),
        format_version=np.int64(FORMAT_VERSION),
    )


def load_model(path: Path) -> StackingModel:
    """Read a model file written by :func:`save_model`.

    Raises
    ------
    InputError
        If the file is missing or is not a pacs_numba model file.
    """
    path = Path(path)
    require_regular_file(path, "model file")  # np.load would block on a FIFO
    try:
        # our own file object: np.load leaks the one it opens when the zip is damaged
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            grid = TileGrid(
                tuple(int(x) for x in z["shape"]), int(z["patch_size"]), int(z["stride"])
            )
            return StackingModel(
                weights=z["weights"].astype(np.float32),
                learned=z["learned"].astype(bool),
                grid=grid,
                model_names=tuple(str(x) for x in z["model_names"]),
                settings=json.loads(str(z["settings"])),
            )
    except FileNotFoundError:
        raise InputError(f"model file '{path}' does not exist") from None
    except Exception as exc:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, KeyError...
        # a truncated or damaged file fails in many ways; each is an input error naming it
        raise InputError(
            f"model file '{path}' is damaged or not a pacs_numba model file "
            f"({type(exc).__name__}: {exc}); train again or restore it"
        ) from None
