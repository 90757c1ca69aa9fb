"""The learned model of one (fold, spacing, pulse) task: tile weights plus what they mean.

Two on-disk forms:

* ``weights.json`` — the published tool's format (algorithm A8): ``{"<tile id>": [w_1..w_M]}``
  for the tiles with a learned weight, ids ascending, indent 2, values ``float(float32)``.
  It is written for compatibility and can be read back (``evaluate --weights``).
* ``pacs_model.npz`` — our compact model file: every tile's weights (1/M where none was
  learned), the learned mask, the grid geometry, the expert names in order and the settings
  used, so a model can be applied (``evaluate``/``predict``) without the config that made it.

The model file is self-describing and versioned (format 2): besides the weights it holds a
``format`` tag, the format version, the mixing window, the normalisation, the grid's affine
(the first training HR's, when known), the training patients and a SHA-256 checksum over
every other member, so a truncated, edited or foreign file is refused with a clear
:class:`~pacs_numba.errors.InputError` instead of blending garbage.  Format 1 files (no tag,
window, affine or checksum) are still read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..errors import InputError
from .tiling import TileGrid

FORMAT_VERSION = 2


FORMAT_TAG = "pacs_numba.model"


#: members every format-1 file has; format 2 adds the ones in ``_V2_MEMBERS``
_V1_MEMBERS = ("weights", "learned", "shape", "patch_size", "stride", "model_names", "settings")


_V2_MEMBERS = ("format", "window", "normalisation", "affine", "train_patients", "checksum")


@dataclass(frozen=True)
class StackingModel:
    """Tile weights of one task and the geometry they belong to.

    Parameters
    ----------
    weights : (n_tiles, n_experts) or (n_tiles, 2 n_experts) float32
        Weight of every tile; tiles without a learned weight hold ``1/M``.  With
        ``gating="edge"`` the edge weights then the flat weights (algorithm A5.2).
    learned : (n_tiles,) bool
        Which tiles had mask voxels in some training patient.
    grid : TileGrid
        Volume shape, patch size and stride the weights belong to.
    model_names : tuple of str
        Expert names in the order of the weight columns.
    settings : dict
        The ``pacs_sr`` settings and task identity the model was made with.
    window : {"hann", "flat"} or None
        The mixing window the model was trained and evaluated with (None: unknown, e.g. a
        published ``weights.json``; the caller's config decides).
    affine : (4, 4) float64 or None
        The affine of the grid (the first training HR's), None when unknown.
    normalisation : str
        How experts are normalised before blending (``"zscore"``, algorithm A3.3).
    train_patients : tuple of str
        The patients the weights were fitted on (empty when unknown).
    format_version : int
        The file format the model was read from (``FORMAT_VERSION`` for a new model).
    gating : {"none", "edge"}
        The weight model's gating (``edge``: two weight vectors per tile, mixed per voxel
        by the experts' edge gate, algorithm A5.2).
    """

    weights: NDArray[np.float32]
    learned: NDArray[np.bool_]
    grid: TileGrid
    model_names: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    window: str | None = None
    affine: NDArray[np.float64] | None = None
    normalisation: str = "zscore"
    train_patients: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION
    gating: str = "none"

    def __post_init__(self) -> None:
        t, m = self.weights.shape
        if self.gating not in ("none", "edge"):
            raise ValueError(f"gating {self.gating!r}: expected 'none' or 'edge'")
        cols = len(self.model_names) * (2 if self.gating == "edge" else 1)
        if t != self.grid.n_tiles or m != cols or self.learned.shape != (t,):
            raise ValueError(
                f"weights {self.weights.shape}, learned {self.learned.shape} do not fit "
                f"{self.grid.n_tiles} tiles x {cols} weights ({len(self.model_names)} experts, "
                f"gating {self.gating})"
            )


def column_names(model: StackingModel) -> list[str]:
    """Name of each weight column: the experts, or each expert on edges then on flat tissue.

    Examples
    --------
    >>> from pacs_numba.core.tiling import TileGrid
    >>> g = TileGrid((2, 2, 2), 2, 2)
    >>> m = StackingModel(np.full((1, 4), 0.5, np.float32), np.ones(1, bool), g, ("A", "B"),
    ...                   gating="edge")
    >>> column_names(m)
    ['A (edge)', 'B (edge)', 'A (flat)', 'B (flat)']
    """
    if model.gating == "edge":
        return ([f"{n} (edge)" for n in model.model_names]
                + [f"{n} (flat)" for n in model.model_names])
    return list(model.model_names)


def weights_json_text(weights: NDArray[np.float32], learned: NDArray[np.bool_]) -> str:
    """Return the published ``weights.json`` text for the learned tiles."""
    w32 = np.asarray(weights, dtype=np.float32)
    data = {str(int(t)): [float(x) for x in w32[t]] for t in np.flatnonzero(learned)}
    return json.dumps(data, indent=2)


def _checksum(members: dict[str, np.ndarray]) -> str:
    """SHA-256 over every member but ``checksum``: name, dtype, shape and bytes, sorted by name."""
    h = hashlib.sha256()
    for name in sorted(members):
        if name == "checksum":
            continue
        arr = np.ascontiguousarray(members[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def model_members(model: StackingModel) -> dict[str, np.ndarray]:
    """Return the arrays the model file stores for ``model`` (its checksum covers them)."""
    g = model.grid
    affine = (
        np.full((4, 4), np.nan) if model.affine is None else np.asarray(model.affine, np.float64)
    )
    train = model.train_patients or tuple(model.settings.get("train_patients", ()))
    members = {
        "format": np.asarray(FORMAT_TAG),
        "format_version": np.int64(FORMAT_VERSION),
        "weights": np.asarray(model.weights, dtype=np.float32),
        "learned": np.asarray(model.learned, dtype=bool),
        "shape": np.asarray(g.shape, dtype=np.int64),
        "patch_size": np.int64(g.patch_size),
        "stride": np.int64(g.stride),
        "model_names": np.asarray(model.model_names),
        "window": np.asarray(model.window or ""),
        "normalisation": np.asarray(model.normalisation),
        "affine": affine,
        "train_patients": np.asarray([str(p) for p in train], dtype=str),
        "settings": np.asarray(json.dumps(model.settings, sort_keys=True, default=str)),
    }
    if model.gating != "none":  # only then: ungated files stay what older versions write
        members["gating"] = np.asarray(model.gating)
    members = {k: np.asarray(v) for k, v in members.items()}
    members["checksum"] = np.asarray(_checksum(members))
    return members


def _damaged(where: str, name: str, what: str) -> InputError:
    return InputError(
        f"model file '{where}' is damaged: member '{name}' {what}; re-train the task or "
        "restore the file"
    )


def _shown(arr: np.ndarray) -> str:
    text = repr(arr.tolist()) if arr.size <= 4 else f"{arr.dtype} array of shape {arr.shape}"
    return text if len(text) <= 60 else text[:57] + "..."


def _member_int(members: dict[str, np.ndarray], name: str, where: str) -> int:
    """Return the integer scalar ``members[name]``; ``InputError`` naming the member if not."""
    arr = np.asarray(members[name])
    if arr.shape != () or arr.dtype.kind not in "iu":
        raise _damaged(where, name, f"is {_shown(arr)}; expected an integer")
    return int(arr)


def _member_text(members: dict[str, np.ndarray], name: str, where: str) -> str:
    """Return the string scalar ``members[name]``; ``InputError`` naming the member if not."""
    arr = np.asarray(members[name])
    if arr.shape != () or arr.dtype.kind != "U":
        raise _damaged(where, name, f"is {_shown(arr)}; expected a string")
    return str(arr)


def _member_texts(members: dict[str, np.ndarray], name: str, where: str) -> tuple[str, ...]:
    """Return the 1-D string array ``members[name]`` as a tuple; ``InputError`` if not."""
    arr = np.asarray(members[name])
    if arr.ndim != 1 or (arr.size and arr.dtype.kind != "U"):
        raise _damaged(where, name, f"is {_shown(arr)}; expected a list of names")
    return tuple(str(x) for x in arr)


def _member_array(
    members: dict[str, np.ndarray], name: str, where: str, *, kinds: str, ndim: int, what: str
) -> np.ndarray:
    arr = np.asarray(members[name])
    if arr.ndim != ndim or arr.dtype.kind not in kinds:
        raise _damaged(where, name, f"is {_shown(arr)}; expected {what}")
    return arr


def model_from_members(members: dict[str, np.ndarray], where: str) -> StackingModel:
    """Check and decode the members of a model file (see :func:`load_model`).

    Every member is checked for its type and shape before it is used, so a damaged file
    (a member of another type, ``settings`` that are not a mapping, an unknown window,
    weights that are not finite) gives one :class:`~pacs_numba.errors.InputError` naming
    the file and the member.
    """
    missing = [k for k in _V1_MEMBERS if k not in members]
    if missing:
        raise InputError(
            f"'{where}' is not a pacs_numba model file: it has no {missing} "
            f"(members: {sorted(members)}); expected a pacs_model.npz written by train"
        )
    version = _member_int(members, "format_version", where) if "format_version" in members else 1
    if version > FORMAT_VERSION:
        raise InputError(
            f"model file '{where}' has format version {version}; this pacs_numba reads up to "
            f"{FORMAT_VERSION}: upgrade pacs_numba"
        )
    if version < 1:
        raise _damaged(where, "format_version", f"is {version}; expected 1..{FORMAT_VERSION}")
    if version >= 2:
        absent = [k for k in _V2_MEMBERS if k not in members]
        if absent:
            raise InputError(f"model file '{where}' (format {version}) is damaged: no {absent}")
        if str(members["format"]) != FORMAT_TAG:
            raise InputError(
                f"'{where}' is not a pacs_numba model file (format tag {str(members['format'])!r})"
            )
        if _checksum(members) != str(members["checksum"]):
            raise InputError(
                f"model file '{where}' is damaged: its checksum does not match its content; "
                "re-train the task or restore the file"
            )
    shape = _member_array(members, "shape", where, kinds="iu", ndim=1, what="3 integers")
    if shape.shape != (3,):
        raise _damaged(where, "shape", f"is {_shown(shape)}; expected 3 integers")
    patch_size = _member_int(members, "patch_size", where)
    stride = _member_int(members, "stride", where)
    try:
        grid = TileGrid(tuple(int(x) for x in shape), patch_size, stride)
    except ValueError as exc:
        raise _damaged(
            where, "shape/patch_size/stride", f"do not make a tile grid ({exc})"
        ) from None
    text = _member_text(members, "settings", where)
    try:
        settings = json.loads(text)
    except ValueError as exc:
        raise _damaged(where, "settings", f"is not JSON ({exc})") from None
    if not isinstance(settings, dict):
        kind = type(settings).__name__
        raise _damaged(where, "settings", f"is a JSON {kind}; expected an object")
    if not isinstance(settings.get("pacs_sr", {}), dict):
        raise _damaged(where, "settings", "has a 'pacs_sr' that is not an object")
    weights = _member_array(members, "weights", where, kinds="f", ndim=2,
                            what="a (tiles, experts) float array")
    if not np.all(np.isfinite(weights)):
        bad = int(np.count_nonzero(~np.isfinite(weights)))
        raise _damaged(where, "weights", f"holds {bad} values that are not finite (NaN or Inf)")
    learned = _member_array(members, "learned", where, kinds="b", ndim=1,
                            what="a boolean per tile")
    names = _member_texts(members, "model_names", where)
    if version >= 2:
        window = _member_text(members, "window", where) or None
        if window is not None and window not in ("flat", "hann"):
            raise _damaged(where, "window", f"is {window!r}; expected 'flat', 'hann' or ''")
        affine = _member_array(members, "affine", where, kinds="f", ndim=2, what="a 4x4 affine")
        if affine.shape != (4, 4):
            raise _damaged(where, "affine", f"is {_shown(affine)}; expected a 4x4 affine")
        extra: dict[str, Any] = {
            "window": window,
            "affine": None if not np.all(np.isfinite(affine)) else affine.astype(np.float64),
            "normalisation": _member_text(members, "normalisation", where),
            "train_patients": _member_texts(members, "train_patients", where),
            "gating": _member_text(members, "gating", where) if "gating" in members else "none",
        }
    else:
        window = settings.get("pacs_sr", {}).get("mixing_window")
        if window is not None and window not in ("flat", "hann"):
            raise _damaged(where, "settings", f"has mixing_window {window!r}; expected flat|hann")
        train = settings.get("train_patients") or []
        if not isinstance(train, list):
            raise _damaged(where, "settings", "has train_patients that are not a list")
        extra = {"window": window, "train_patients": tuple(str(p) for p in train)}
    try:
        return StackingModel(
            weights=weights.astype(np.float32),
            learned=learned.astype(bool),
            grid=grid,
            model_names=names,
            settings=settings,
            format_version=version,
            **extra,
        )
    except ValueError as exc:  # weights, learned and names that do not fit the grid
        raise _damaged(where, "weights", str(exc)) from None


def describe_model(model: StackingModel, path: Path | str | None = None) -> str:
    """Return a human-readable description of a model (what ``pacs-numba inspect`` prints)."""
    g = model.grid
    n_learned = int(np.count_nonzero(model.learned))
    lines = []
    if path is not None:
        lines.append(f"model file:      {path}")
    lines += [
        f"format version:  {model.format_version}",
        f"experts (order): {', '.join(f'{i + 1}={n}' for i, n in enumerate(model.model_names))}",
        f"grid:            shape {g.shape}, patch {g.patch_size}, stride {g.stride}, "
        f"{g.counts[0]}x{g.counts[1]}x{g.counts[2]} = {g.n_tiles} tiles, {n_learned} learned",
        f"mixing window:   {model.window or 'unknown (the config decides)'}",
        f"normalisation:   {model.normalisation}",
    ]
    if model.affine is not None:
        rows = ["[" + " ".join(f"{x:9.4f}" for x in row) + "]" for row in model.affine]
        lines.append("affine:          " + rows[0])
        lines += ["                 " + r for r in rows[1:]]
    else:
        lines.append("affine:          unknown")
    s = model.settings
    task = {k: s[k] for k in ("fold", "spacing", "pulse") if k in s}
    if task:
        lines.append("task:            " + " ".join(f"{k}={v}" for k, v in task.items()))
    tp = model.train_patients
    lines.append(f"train patients:  {len(tp)}" + (f" ({', '.join(tp)})" if tp else ""))
    m = len(model.model_names)
    halves = ([("", model.weights)] if model.gating == "none" else
              [(" edge", model.weights[:, :m]), (" flat", model.weights[:, m:])])
    for tag, w in halves if n_learned else ():
        dom = np.bincount(np.argmax(w[model.learned], axis=1), minlength=m)
        share = ", ".join(
            f"{n} {100.0 * c / n_learned:.1f}%" for n, c in zip(model.model_names, dom, strict=True)
        )
        lines.append(f"dominant share{tag}:".ljust(17) + f"{share} (of learned tiles)")
        mean = w[model.learned].mean(axis=0)
        lines.append(
            f"mean weight{tag}:".ljust(17)
            + ", ".join(f"{n} {x:.3f}" for n, x in zip(model.model_names, mean, strict=True))
        )
    pacs = s.get("pacs_sr")
    if isinstance(pacs, dict):
        keys = ("patch_size", "stride", "mixing_window", "simplex", "lambda_ridge",
                "laplacian_tau", "lambda_edge", "edge_power", "lambda_grad", "grad_operator",
                "prior", "prior_strength", "gating")
        lines.append(
            "settings:        " + " ".join(f"{k}={pacs[k]}" for k in keys if k in pacs)
        )
    if "pacs_numba_version" in s:
        lines.append(f"written by:      pacs_numba {s['pacs_numba_version']}")
    lines.append(
        "checksum:        " + ("verified" if model.format_version >= 2 else "none (format 1)")
    )
    return "\n".join(lines)
