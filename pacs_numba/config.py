"""The YAML experiment config of PaCS-SR (algorithm A1), loaded into frozen dataclasses.

A config written for the published tool loads unchanged: sections ``data``,
``registration``, ``pacs_sr`` and the optional ``predict``, with the same keys
(``data`` keys are hyphenated, ``pacs_sr`` keys are the field names of
:class:`PacsConfig`).  Every problem is a :class:`~pacs_numba.errors.ConfigError`
whose one-line message names the file, the key and what was expected; unknown
keys only warn.

Relative paths are kept exactly as written and resolve against the working
directory at the moment they are used, as in the published tool.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import operator
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ._config import (
    FIT_NORMALISATIONS,
    GATINGS,
    GRAD_OPERATORS,
    HR_FREE_MAPPINGS,
    PRIORS,
    SSIM_AXES,
    WINDOWS,
)
from .errors import ConfigError
from .yamlfile import parse_yaml

log = logging.getLogger(__name__)

__all__ = [
    "DataConfig", "RegistrationConfig", "PacsConfig", "FullConfig", "load_config",
    "unused_settings", "config_to_dict", "dump_config", "name_problem",
]


#: What may not appear in a name that becomes one path component (a patient id, an
#: experiment name): path separators, NUL and the other control characters.
_UNSAFE_NAME = re.compile(r"[/\\\x00-\x1f\x7f]")


def name_problem(name: object) -> str | None:
    r"""Why ``name`` cannot be one component of an output path, or None if it can.

    The one rule for every name that becomes a file or folder name under an output root
    (patient ids from a manifest, a CSV or a folder; ``pacs_sr.experiment_name``): a
    non-empty string with no ``/``, ``\``, NUL or control character (so no absolute path
    and nothing that climbs with ``..``), not ``.`` or ``..``, and not starting with ``.``
    (hidden) or ``-`` (read as an option by the shell tools a user runs on the outputs).

    Examples
    --------
    >>> name_problem("sub-001") is None
    True
    >>> name_problem("../../x")
    "contains '/'"
    """
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not name:
        return "is empty"
    bad = _UNSAFE_NAME.search(name)
    if bad:
        return f"contains {bad.group()!r}"
    if name in (".", ".."):
        return "is a relative folder reference"
    if name[0] in ".-":
        return f"starts with {name[0]!r}"
    return None

#: Allowed values of the enumerated ``pacs_sr`` keys, in the order messages list them.
MIXING_WINDOWS = tuple(WINDOWS)
GRAD_OPERATOR_NAMES = tuple(GRAD_OPERATORS)
SSIM_AXIS_NAMES = tuple(SSIM_AXES)
NORMALIZATIONS = ("zscore",)
# Where each tile is fitted: the published label cell, or its whole box weighted by the
# blending window (pacs_numba only; see cellstats.py).
FIT_REGIONS = ("first_block", "window", "centre")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
PARALLEL_BACKENDS = ("loky", "threading", "multiprocessing", "sequential")
#: ``registration.mode`` and ``registration.settings`` (pacs_numba's own keys); first = default.
REGISTRATION_MODES = ("per_patient", "per_volume")
REGISTRATION_SETTINGS = ("fast", "published")

#: Top-level sections of the published tool's versions that pacs_numba does not use, and why:
#: accepted, and each one present is named once in the log.
IGNORED_SECTIONS = {
    "synthseg": "an external SynthSeg segmentation evaluation, not part of the stacking",
    "pipeline": "the published tool's job orchestration; pacs-numba runs tasks itself",
    "analysis": "the published tool's post-hoc analysis scripts",
    "visualizations": "the published tool's figure scripts (see `pacs-numba report`)",
}
#: The two forms of the ``data`` section: NIfTI folders (2025 release) or HDF5 files (current).
NIFTI_KEYS = ("models-root", "hr-root", "lr-root")
HDF5_KEYS = ("source-h5", "experts-dir")
#: ``pacs_sr.shape_policy``: an expert whose shape differs from the HR's skips the patient
#: (2025 release) or is resampled to the common shape (current release).
SHAPE_POLICIES = ("skip", "harmonise")
DEFAULT_SHAPE_POLICY = {"nifti": "skip", "hdf5": "harmonise"}
#: Accepted ``pacs_sr`` keys that are not used, and why (named once in the log).
_UNUSED_KEYS = {
    "parallel_backend": "not used: patients run on one thread pool sized by the memory budget",
    "device": "not used: every computation runs on the CPU",
    "num_workers": "is an upper bound only: the pool width also follows memory and --workers",
    "log_region_freq": "not used: tiles are solved at once; see PACS_PROGRESS_INTERVAL",
}
_NEEDS_WEIGHTS = ("it needs pretrained network weights (torchvision downloads) that this tool "
                  "does not download; the run goes on")
KNOWN_SECTIONS = ("data", "registration", "pacs_sr", "predict")


@dataclass(frozen=True)
class DataConfig:
    """The ``data`` section: where the volumes are and how to split patients.

    Parameters
    ----------
    models_root, hr_root, lr_root : Path or None
        Roots of the expert outputs, the HR volumes and the LR volumes
        (YAML keys ``models-root``, ``hr-root``, ``lr-root``); None in the HDF5 form.
    spacings, pulses, models : tuple of str
        Slice spacings (e.g. ``"3mm"``), pulse names and expert names.
    kfolds : int
        Number of cross-validation folds (>= 2).
    seed : int
        Seed of the patient shuffle.
    out : Path
        Path of the manifest JSON.
    source_h5, experts_dir : Path or None
        The HDF5 form (YAML keys ``source-h5``, ``experts-dir``): ``source_data.h5`` holding
        HR and LR, and the folder of one ``{model lower-case}.h5`` per expert; None in the
        NIfTI form.
    schema : str
        ``"nifti"`` or ``"hdf5"``: which of the two forms the section was written in.
    """

    models_root: Path | None
    hr_root: Path | None
    lr_root: Path | None
    spacings: tuple[str, ...]
    pulses: tuple[str, ...]
    models: tuple[str, ...]
    kfolds: int
    seed: int
    out: Path
    source_h5: Path | None = None
    experts_dir: Path | None = None
    schema: str = "nifti"


@dataclass(frozen=True)
class RegistrationConfig:
    """The ``registration`` section: an atlas folder and the file names inside it.

    ``mode`` and ``settings`` are pacs_numba's own optional keys (the published tool has
    neither): ``mode`` is ``per_patient`` (one registration per patient, its HR's transform
    resamples the experts) or ``per_volume`` (every volume on its own, as published);
    ``settings`` is ``fast`` (a cheaper rigid schedule) or ``published`` (ANTs' defaults).
    """

    atlas: Path
    t1: str
    t2: str
    epi: str
    pd: str
    brain_mask: str
    mode: str = "per_patient"
    settings: str = "fast"


@dataclass(frozen=True, kw_only=True)
class PacsConfig:
    """The ``pacs_sr`` section.  Field names are the YAML keys.

    Keys with a default are optional in the YAML; the others are required.
    ``parallel_backend``, ``device``, ``compute_lpips`` and ``compute_kid`` are
    accepted for compatibility with the published tool and otherwise unused
    (:func:`unused_settings` says why).  ``shape_policy`` and ``compute_paper_metrics``
    are pacs_numba's own: what to do with an expert whose shape differs from the HR's
    (default per data schema: ``skip`` for NIfTI, ``harmonise`` for HDF5), and whether
    ``evaluate`` also writes the paper's MS-SSIM/MMD-MF table.
    """

    experiment_name: str
    patch_size: int
    stride: int
    mixing_window: str = "flat"
    simplex: bool
    lambda_ridge: float
    laplacian_tau: float
    lambda_edge: float
    edge_power: float
    lambda_grad: float = 0.0
    grad_operator: str = "sobel"
    fit_region: str = "first_block"
    prior: str = "none"
    prior_strength: float = 1.0
    gating: str = "none"
    hr_free_mapping: str = "mean"
    fit_normalisation: str = "hr"
    normalize: str
    use_registration: bool = False
    num_workers: int
    parallel_backend: str = "loky"
    device: str
    compute_lpips: bool = False
    compute_kid: bool = False
    ssim_axis: str
    evaluate_train: bool = True
    save_weight_volumes: bool
    save_blends: bool
    save_weight_maps: bool = False
    score_experts: bool = True
    score_hr_free: bool = True
    log_level: str = "INFO"
    log_to_file: bool = True
    log_region_freq: int = 10
    disable_tqdm: bool = False
    out_root: Path
    shape_policy: str = "skip"
    compute_paper_metrics: bool = False


@dataclass(frozen=True)
class FullConfig:
    """A whole config file.

    Parameters
    ----------
    data : DataConfig
    registration : RegistrationConfig or None
        None when the file has no ``registration`` section (allowed only if
        ``pacs_sr.use_registration`` is false).
    pacs_sr : PacsConfig
    predict : dict or None
        The ``predict`` section as loaded, untouched.
    path : Path
        The file the config was loaded from.
    ignored_sections : tuple of str
        Top-level sections of the published tool present in the file and not used
        (:data:`IGNORED_SECTIONS`).
    """

    data: DataConfig
    registration: RegistrationConfig | None
    pacs_sr: PacsConfig
    predict: dict | None
    path: Path
    ignored_sections: tuple[str, ...] = dataclasses.field(default=(), compare=False)


# --------------------------------------------------------------------- validation

_MISSING = object()
#: Largest accepted pacs_sr.patch_size and stride, in voxels.
MAX_PATCH_SIZE = 4096
#: Largest accepted |pacs_sr.num_workers|.
MAX_WORKERS = 65536


def stride_problem(patch_size: int, stride: Any) -> str | None:
    """Say what is wrong with a ``stride`` for ``patch_size``, or None: the one home of that rule.

    A stride is an integer in ``[1, patch_size]``: each tile's label cell (the first
    ``stride^3`` block of its box, algorithm A2) must lie inside the tile.  The config, the
    planner, the tile grid, the statistics key, the cost model, the generated cohort and
    ``tune``'s grid all ask here.

    Parameters
    ----------
    patch_size : int
        The tile edge (already checked to be an integer >= 1).
    stride : object
        The value to check.

    Returns
    -------
    str or None
        ``"must be an integer in [1, patch_size=P]; got S"``, or None when ``stride`` is fine.

    Examples
    --------
    >>> stride_problem(32, 16) is None
    True
    >>> stride_problem(4, 5)
    'must be an integer in [1, patch_size=4]; got 5'
    """
    try:
        value = None if isinstance(stride, bool) else operator.index(stride)
    except TypeError:
        value = None
    if value is not None and 1 <= value <= patch_size:
        return None
    shown = stride if value is None else value
    return f"must be an integer in [1, patch_size={patch_size}]; got {shown!r}"


def check_stride(patch_size: int, stride: Any, *, name: str = "stride") -> int:
    """Return ``stride`` as an int, or raise :class:`ConfigError` from :func:`stride_problem`.

    Parameters
    ----------
    patch_size : int
        The tile edge.
    stride : object
        The value to check.
    name : str, optional
        How the message names the value (``"stride"``, ``"pacs_sr.stride"``).

    Returns
    -------
    int

    Raises
    ------
    ConfigError
        ``"<name> must be an integer in [1, patch_size=P]; got S"``.
    """
    problem = stride_problem(patch_size, stride)
    if problem is not None:
        raise ConfigError(f"{name} {problem}")
    return int(stride)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


class _Section:
    """Reads the keys of one YAML section, raising ConfigError with the file and key."""

    def __init__(self, file: Path, name: str, mapping: dict) -> None:
        self.file = file
        self.name = name
        self.mapping = mapping
        self.known: list[str] = []

    def fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.file}: {self.name}.{key} {what}")

    def _get(self, key: str, expected: str, default: Any) -> Any:
        self.known.append(key)
        value = self.mapping.get(key, _MISSING)
        if value is _MISSING:
            if default is not _MISSING:
                return default
            hint = ""
            alt = key.replace("-", "_") if "-" in key else key.replace("_", "-")
            if alt != key and alt in self.mapping:
                hint = f" (found {alt!r}; this key is spelled {key!r})"
            raise self.fail(key, f"is missing; expected {expected}{hint}")
        return value

    def _bad(self, key: str, expected: str, value: Any) -> ConfigError:
        return self.fail(key, f"must be {expected}; got {_show(value)} ({_kind(value)})")

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        expected = "true or false"
        value = self._get(key, expected, default)
        if not isinstance(value, bool):
            raise self._bad(key, expected, value)
        return value

    def integer(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        minimum: int | None = None,
        maximum: int | None = None,
        nonzero: bool = False,
        why: str = "",
    ) -> int:
        if minimum is not None and maximum is not None:
            expected = f"an integer in [{minimum}, {maximum}]"
        elif minimum is not None:
            expected = f"an integer >= {minimum}"
        elif maximum is not None:
            expected = f"an integer <= {maximum}"
        else:
            expected = "an integer"
        if nonzero:
            expected = expected.replace("an integer", "a non-zero integer", 1)
        expected += why
        value = self._get(key, expected, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, expected, value)
        if (
            (minimum is not None and value < minimum)
            or (maximum is not None and value > maximum)
            or (nonzero and value == 0)
        ):
            raise self.fail(key, f"must be {expected}; got {value}")
        return value

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        *,
        low: float | None = None,
        high: float | None = None,
        low_open: bool = False,
    ) -> float:
        if low is None:
            expected = "a number"
        elif high is None:
            expected = f"a number {'>' if low_open else '>='} {low:g}"
        else:
            expected = f"a number in [{low:g}, {high:g}]"
        value = self._get(key, expected, default)
        # Ints are numbers; bools are not, although Python says so.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, expected, value)
        value = float(value)
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and value > high
        # NaN compares False everywhere, so reject it explicitly.
        if too_low or too_high or value != value:
            raise self.fail(key, f"must be {expected}; got {value:g}")
        return value

    def string(self, key: str, default: Any = _MISSING) -> str:
        expected = "a non-empty string"
        value = self._get(key, expected, default)
        if not isinstance(value, str) or not value.strip():
            raise self._bad(key, expected, value)
        return value

    def path(self, key: str, default: Any = _MISSING) -> Path:
        expected = "a path (string)"
        value = self._get(key, expected, default)
        if isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value.strip():
            raise self._bad(key, expected, value)
        return Path(value)

    def choice(
        self, key: str, allowed: tuple[str, ...], default: Any = _MISSING, *, case: str = ""
    ) -> str:
        expected = "one of " + ", ".join(allowed)
        value = self._get(key, expected, default)
        if not isinstance(value, str):
            raise self._bad(key, expected, value)
        # The published tool lower-cases mixing_window and grad_operator; we also
        # accept log levels in any case because logging needs them upper-case.
        norm = value.lower() if case == "lower" else value.upper() if case == "upper" else value
        if norm not in allowed:
            raise self.fail(key, f"must be {expected}; got {value!r}")
        return norm

    def names(self, key: str) -> tuple[str, ...]:
        expected = "a non-empty list of names"
        value = self._get(key, expected, _MISSING)
        if not isinstance(value, list):
            raise self._bad(key, expected, value)
        if not value:
            raise self.fail(key, f"is an empty list; expected {expected}")
        out: list[str] = []
        for item in value:
            # `spacings: [3mm, 5mm]` gives strings; a bare number is taken as written.
            if isinstance(item, bool) or not isinstance(item, str | int) or not str(item).strip():
                raise self.fail(
                    key, f"must be {expected}; item {_show(item)} ({_kind(item)}) is not a name"
                )
            out.append(str(item))
        dupes = sorted({n for n in out if out.count(n) > 1})
        if dupes:
            raise self.fail(key, f"lists {', '.join(dupes)} more than once; names must be unique")
        return tuple(out)

    def unknown(self) -> list[str]:
        """Messages for the keys nobody read (call after reading every known key)."""
        out = []
        for key in self.mapping:
            if key in self.known:
                continue
            close = difflib.get_close_matches(str(key), self.known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            out.append(f"{self.file}: unknown key {self.name}.{key} ignored{hint}")
        return out


def _section(file: Path, doc: dict, name: str, required: bool, why: str = "") -> dict | None:
    value = doc.get(name)
    if value is None:
        if not required:
            return None
        state = "is empty" if name in doc else "is missing"
        keys = {
            "data": "models-root, hr-root, lr-root (or source-h5, experts-dir), spacings, "
                    "pulses, models, kfolds, seed, out",
            "registration": "atlas, t1, t2, epi, pd, brain_mask",
            "pacs_sr": "experiment_name, patch_size, stride, simplex, lambda_ridge, ...",
        }[name]
        raise ConfigError(f"{file}: section {name!r} {state}{why}; expected a mapping with {keys}")
    if not isinstance(value, dict):
        raise ConfigError(
            f"{file}: section {name!r} must be a mapping of keys; "
            f"got {_show(value)} ({_kind(value)})"
        )
    return value


def _ssim_axis(s: _Section, file: Path, notes: list[str], schema: str) -> str:
    """Read ``pacs_sr.ssim_axis``; in an HDF5-form config an unknown name is axial.

    The 2025 release (the NIfTI form) validates the three names, and so do we.  The current
    release (the HDF5 form) falls back to axial for any other value (its configs say
    ``"z"``), so there such a value is read as axial and named once in the log, instead of
    refusing a config that release accepts.
    """
    raw = s.mapping.get("ssim_axis")
    if schema == "hdf5" and isinstance(raw, str) and raw not in SSIM_AXIS_NAMES:
        s.known.append("ssim_axis")
        notes.append(f"{file}: pacs_sr.ssim_axis={raw!r} is not one of "
                     f"{', '.join(SSIM_AXIS_NAMES)}; read as 'axial', as the published tool does")
        return "axial"
    return s.choice("ssim_axis", SSIM_AXIS_NAMES)


def _read_yaml(file: Path) -> dict:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{file}: is a directory; expected a YAML config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read config file ({exc})") from None
    doc = parse_yaml(text, file)
    if doc is None:
        raise ConfigError(f"{file}: config file is empty; expected sections data and pacs_sr")
    if not isinstance(doc, dict):
        raise ConfigError(
            f"{file}: expected a mapping of sections (data, pacs_sr, ...); got a {_kind(doc)}"
        )
    return doc


def _data_schema(file: Path, mapping: dict) -> str:
    """Which form the ``data`` section is in: exactly one of the two key sets, else an error."""
    nifti, hdf5 = ([k for k in keys if k in mapping] for keys in (NIFTI_KEYS, HDF5_KEYS))
    forms = f"the NIfTI form ({', '.join(NIFTI_KEYS)}) or the HDF5 form ({', '.join(HDF5_KEYS)})"
    if nifti and hdf5:
        why = f"data has keys of both forms ({', '.join(nifti + hdf5)}); expected exactly one"
        raise ConfigError(f"{file}: {why}: {forms}")
    if not nifti and not hdf5:
        raise ConfigError(f"{file}: data names no volumes; expected {forms}")
    return "hdf5" if hdf5 else "nifti"


def _load_data(file: Path, mapping: dict, notes: list[str]) -> DataConfig:
    s = _Section(file, "data", mapping)
    schema = _data_schema(file, mapping)
    nifti = schema == "nifti"
    cfg = DataConfig(
        models_root=s.path("models-root") if nifti else None,
        hr_root=s.path("hr-root") if nifti else None,
        lr_root=s.path("lr-root") if nifti else None,
        source_h5=None if nifti else s.path("source-h5"),
        experts_dir=None if nifti else s.path("experts-dir"),
        schema=schema,
        spacings=s.names("spacings"),
        pulses=s.names("pulses"),
        models=s.names("models"),
        kfolds=s.integer("kfolds", minimum=2, maximum=100_000),
        seed=s.integer("seed"),
        out=s.path("out"),
    )
    notes.extend(s.unknown())
    return cfg


def _load_registration(file: Path, mapping: dict, notes: list[str]) -> RegistrationConfig:
    s = _Section(file, "registration", mapping)
    cfg = RegistrationConfig(
        atlas=s.path("atlas"),
        t1=s.string("t1"),
        t2=s.string("t2"),
        epi=s.string("epi"),
        pd=s.string("pd"),
        brain_mask=s.string("brain_mask"),
        mode=s.choice("mode", REGISTRATION_MODES, REGISTRATION_MODES[0], case="lower"),
        settings=s.choice("settings", REGISTRATION_SETTINGS, REGISTRATION_SETTINGS[0],
                          case="lower"),
    )
    notes.extend(s.unknown())
    return cfg


def _experiment_name(s: _Section) -> str:
    """``pacs_sr.experiment_name``: one folder under out_root (:func:`name_problem`)."""
    name = s.string("experiment_name")
    why = name_problem(name)
    if why is not None:
        raise s.fail(
            "experiment_name",
            f"{name!r} {why}; expected one folder name under out_root (no '/', '..', "
            "absolute path, leading '.' or '-')",
        )
    return name


def _load_pacs(file: Path, mapping: dict, notes: list[str], schema: str) -> PacsConfig:
    s = _Section(file, "pacs_sr", mapping)
    # Bounds keep every integer inside what the kernels index with (int64) and the
    # sizes compute with; a tile edge beyond MAX_PATCH_SIZE voxels is
    # larger than any MRI volume.
    patch_size = s.integer("patch_size", minimum=1, maximum=MAX_PATCH_SIZE)
    stride = s.integer("stride")
    problem = stride_problem(patch_size, stride)
    if problem is not None:
        raise s.fail("stride", problem)
    cfg = PacsConfig(
        experiment_name=_experiment_name(s),
        patch_size=patch_size,
        stride=stride,
        mixing_window=s.choice("mixing_window", MIXING_WINDOWS, "flat", case="lower"),
        simplex=s.boolean("simplex"),
        lambda_ridge=s.number("lambda_ridge", low=0.0),
        laplacian_tau=s.number("laplacian_tau", low=0.0, high=1.0),
        lambda_edge=s.number("lambda_edge", low=0.0),
        edge_power=s.number("edge_power", low=0.0, low_open=True),
        lambda_grad=s.number("lambda_grad", 0.0, low=0.0),
        grad_operator=s.choice("grad_operator", GRAD_OPERATOR_NAMES, "sobel", case="lower"),
        fit_region=s.choice("fit_region", FIT_REGIONS, "first_block", case="lower"),
        prior=s.choice("prior", PRIORS, "none", case="lower"),
        prior_strength=s.number("prior_strength", 1.0, low=0.0, low_open=True),
        gating=s.choice("gating", GATINGS, "none", case="lower"),
        hr_free_mapping=s.choice("hr_free_mapping", HR_FREE_MAPPINGS, "mean", case="lower"),
        fit_normalisation=s.choice("fit_normalisation", FIT_NORMALISATIONS, "hr", case="lower"),
        normalize=s.choice("normalize", NORMALIZATIONS),
        use_registration=s.boolean("use_registration", False),
        num_workers=s.integer("num_workers", minimum=-MAX_WORKERS, maximum=MAX_WORKERS,
                              nonzero=True,
                              why=" (negative as in joblib: -1 = all CPUs, -2 = all but one)"),
        parallel_backend=s.choice("parallel_backend", PARALLEL_BACKENDS, "loky"),
        device=s.string("device"),
        compute_lpips=s.boolean("compute_lpips", False),
        compute_kid=s.boolean("compute_kid", False),
        ssim_axis=_ssim_axis(s, file, notes, schema),
        evaluate_train=s.boolean("evaluate_train", True),
        save_weight_volumes=s.boolean("save_weight_volumes"),
        save_blends=s.boolean("save_blends"),
        # outputs beyond the published tool's (README, "What each output costs"): the NIfTI
        # weight maps are off by default (gzip of 4-D maps); the test scores are cheap
        save_weight_maps=s.boolean("save_weight_maps", False),
        score_experts=s.boolean("score_experts", True),
        score_hr_free=s.boolean("score_hr_free", True),
        log_level=s.choice("log_level", LOG_LEVELS, "INFO", case="upper"),
        log_to_file=s.boolean("log_to_file", True),
        log_region_freq=s.integer("log_region_freq", 10, minimum=1, maximum=2**31 - 1),
        disable_tqdm=s.boolean("disable_tqdm", False),
        out_root=s.path("out_root"),
        shape_policy=s.choice("shape_policy", SHAPE_POLICIES, DEFAULT_SHAPE_POLICY[schema],
                              case="lower"),
        compute_paper_metrics=s.boolean("compute_paper_metrics", False),
    )
    if cfg.prior == "multiscale" and cfg.fit_region == "window":  # algorithm A5.1
        raise s.fail("prior", "multiscale needs fit_region: first_block or centre (its "
                              "parent tiles)")
    if (cfg.gating == "edge" and cfg.fit_region == "centre" and cfg.stride < cfg.patch_size
            and cfg.mixing_window != "flat"):  # A5.2: gated statistics per label cell
        raise s.fail("gating", "edge needs fit_region: first_block")
    if cfg.gating == "edge" and (cfg.lambda_edge > 0 or cfg.lambda_grad > 0):  # A5.2
        raise s.fail("gating", "edge needs lambda_edge: 0 and lambda_grad: 0")
    notes.extend(s.unknown())
    return cfg


def load_config(path: str | os.PathLike[str]) -> FullConfig:
    """Load and validate a PaCS-SR YAML config.

    Parameters
    ----------
    path : str or PathLike
        The YAML file.

    Returns
    -------
    FullConfig
        The validated config; ``registration`` and ``predict`` are None when absent.

    Raises
    ------
    ConfigError
        The file is missing or not valid YAML, a required section or key is
        missing, or a value has the wrong type or is out of range.  The message
        names the file and the key (``pacs_sr.stride``) and says what is allowed.

    Warns
    -----
    UserWarning
        For every unknown key in a known section and every unknown top-level
        section.  The published tool's ``synthseg``, ``pipeline``, ``analysis`` and
        ``visualizations`` sections are accepted and named once in the log (INFO) as
        not used, as is every accepted key that is not used (:func:`unused_settings`).

    Examples
    --------
    >>> cfg = load_config("config.yaml")  # doctest: +SKIP
    >>> cfg.pacs_sr.patch_size, cfg.data.models  # doctest: +SKIP
    (32, ('BSPLINE', 'ECLARE', 'SMORE', 'UNIRES'))
    """
    file = Path(path)
    doc = _read_yaml(file)
    for name in doc:
        if name not in KNOWN_SECTIONS and name not in IGNORED_SECTIONS:
            warnings.warn(f"{file}: unknown section {name!r} ignored", stacklevel=2)

    data_map = _section(file, doc, "data", required=True)
    pacs_map = _section(file, doc, "pacs_sr", required=True)
    assert data_map is not None and pacs_map is not None  # required=True raised otherwise
    # Unknown keys are collected and warned about here, so that stacklevel=2
    # points at the caller of load_config.
    notes: list[str] = []
    data = _load_data(file, data_map, notes)
    pacs = _load_pacs(file, pacs_map, notes, data.schema)
    why = " but pacs_sr.use_registration is true" if pacs.use_registration else ""
    reg_map = _section(file, doc, "registration", required=pacs.use_registration, why=why)
    registration = None if reg_map is None else _load_registration(file, reg_map, notes)
    predict = _section(file, doc, "predict", required=False)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    ignored = tuple(name for name in doc if name in IGNORED_SECTIONS)
    cfg = FullConfig(
        data=data, registration=registration, pacs_sr=pacs, predict=predict, path=file,
        ignored_sections=ignored,
    )
    for line in unused_settings(cfg):
        log.info("%s: %s", file, line)
    return cfg


def unused_settings(cfg: FullConfig) -> list[str]:
    """Lines naming every accepted setting of ``cfg`` that pacs_numba does not use, and why.

    Parameters
    ----------
    cfg : FullConfig

    Returns
    -------
    list of str
        One line per setting or section, for the log (``load_config`` logs them at INFO).
    """
    p = cfg.pacs_sr
    out = [f"pacs_sr.{key}={getattr(p, key)!r} {why}" for key, why in _UNUSED_KEYS.items()]
    out += [f"pacs_sr.{key} is true but not computed: {_NEEDS_WEIGHTS}"
            for key in ("compute_lpips", "compute_kid") if getattr(p, key)]
    if cfg.registration is not None and not p.use_registration:
        out.append("section 'registration' not used: pacs_sr.use_registration is false")
    return out + [f"section {n!r} not used: {IGNORED_SECTIONS[n]}" for n in cfg.ignored_sections]


# ------------------------------------------------------------------------ writing


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def config_to_dict(cfg: FullConfig) -> dict:
    """Return the YAML-shaped dict of a config (to record the settings a run used).

    Parameters
    ----------
    cfg : FullConfig

    Returns
    -------
    dict
        Sections ``data`` (hyphenated keys), ``registration`` (if any),
        ``pacs_sr`` (every key, defaults included) and ``predict`` (if any);
        paths are strings and tuples are lists.  ``load_config`` of its YAML
        gives back ``cfg`` (apart from ``path``).
    """
    d = cfg.data  # the volume keys of its form first, then the shared keys
    data = {k: _plain(getattr(d, k.replace("-", "_")))
            for k in (NIFTI_KEYS if d.schema == "nifti" else HDF5_KEYS)}
    skip = {"schema", *(k.replace("-", "_") for k in NIFTI_KEYS + HDF5_KEYS)}
    data.update((f.name, _plain(getattr(d, f.name))) for f in dataclasses.fields(d)
                if f.name not in skip)
    out: dict[str, Any] = {"data": data}
    if cfg.registration is not None:
        out["registration"] = {
            f.name: _plain(getattr(cfg.registration, f.name))
            for f in dataclasses.fields(cfg.registration)
        }
    out["pacs_sr"] = {
        f.name: _plain(getattr(cfg.pacs_sr, f.name)) for f in dataclasses.fields(cfg.pacs_sr)
    }
    if cfg.predict is not None:
        out["predict"] = cfg.predict
    return out


def dump_config(cfg: FullConfig, path: str | os.PathLike[str]) -> None:
    """Write ``cfg`` as YAML to ``path`` (atomically: temp file, then rename).

    Parameters
    ----------
    cfg : FullConfig
    path : str or PathLike
        Destination; its folder is created if needed.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
