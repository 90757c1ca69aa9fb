"""The K-fold manifest of PaCS-SR (algorithm A1): which patient is in which fold, and its files.

Two forms.  The 2025 release's (NIfTI configs) maps each patient to its files; the current
release's (HDF5 configs) lists patient ids only, ``{"folds": [{"test": [pid, ...], "train":
[pid, ...]}, ...]}``, and the files come from the config at run time.  Both are read with
:func:`load_manifest`; given the config's ``data`` section, an id-list manifest is resolved
into the entry form (ids kept in file order) so that :func:`select_task` serves both.

HDF5 layout (the current release)::

    {source-h5}::high_resolution/{pid}/{pulse}                  HR
    {source-h5}::low_resolution/{spacing}/{pid}/{pulse}         LR
    {experts-dir}/{model lower-case}.h5::{spacing}/{pid}/{pulse}   expert output

NIfTI layout (the published tool's 2025 release): :mod:`pacs_numba.store.layout` spells it
(``hr_file``, ``lr_file``, ``expert_file``).

Manifest JSON: ``{"folds": [{"train": {pid: entry}, "test": {pid: entry}}, ...]}``
with ``entry[MODEL | "HR" | "LR"][spacing][pulse] = path``; the HR path is repeated
under every spacing.  Paths are built from the configured roots as written, so
relative roots give relative paths.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import ConfigError, InputError
from .hdf5 import H5Source, h5_reason, h5py_module
from .integrity import check_patient_id
from .layout import expert_file, hr_file, lr_file

log = logging.getLogger(__name__)


#: How many dropped patients an error message lists before "and N more".
_EXAMPLES = 3


def hr_path(data: DataConfig, pid: str, pulse: str) -> Path:
    """Path of a patient's HR volume under ``data.hr_root`` (:func:`layout.hr_file`)."""
    return hr_file(data.hr_root, pid, pulse)


def lr_path(data: DataConfig, pid: str, spacing: str, pulse: str) -> Path:
    """Path of a patient's LR volume under ``data.lr_root`` (:func:`layout.lr_file`)."""
    return lr_file(data.lr_root, spacing, pid, pulse)


def sr_path(data: DataConfig, model: str, pid: str, spacing: str, pulse: str) -> Path:
    """Path of an expert output under ``data.models_root`` (:func:`layout.expert_file`)."""
    return expert_file(data.models_root, model, spacing, pid, pulse)


def hr_source(data: DataConfig, pid: str, pulse: str) -> str:
    """Where a patient's HR is, in either schema (a path, or ``file.h5::key``)."""
    if data.schema == "hdf5":
        return str(H5Source(data.source_h5, f"high_resolution/{pid}/{pulse}"))
    return str(hr_path(data, pid, pulse))


def lr_source(data: DataConfig, pid: str, spacing: str, pulse: str) -> str:
    """Where a patient's LR is, in either schema (a path, or ``file.h5::key``)."""
    if data.schema == "hdf5":
        return str(H5Source(data.source_h5, f"low_resolution/{spacing}/{pid}/{pulse}"))
    return str(lr_path(data, pid, spacing, pulse))


def h5_expert_file(data: DataConfig, model: str) -> Path:
    """HDF5 schema: the file of one expert, ``{experts-dir}/{model lower-case}.h5``."""
    return data.experts_dir / f"{model.lower()}.h5"


def expert_source(data: DataConfig, model: str, pid: str, spacing: str, pulse: str) -> str:
    """Where an expert's output is, in either schema (a path, or ``file.h5::key``)."""
    if data.schema == "hdf5":
        return str(H5Source(h5_expert_file(data, model), f"{spacing}/{pid}/{pulse}"))
    return str(sr_path(data, model, pid, spacing, pulse))


def _required_files(data: DataConfig, pid: str) -> list[Path]:
    files = [hr_path(data, pid, pulse) for pulse in data.pulses]
    files += [lr_path(data, pid, sp, pulse) for sp in data.spacings for pulse in data.pulses]
    files += [
        sr_path(data, model, pid, sp, pulse)
        for model in data.models
        for sp in data.spacings
        for pulse in data.pulses
    ]
    return files


def scan_patients(data: DataConfig) -> tuple[list[str], dict[str, list[str]]]:
    """Find the patients that have every file the config asks for.

    Parameters
    ----------
    data : DataConfig
        Roots, spacings, pulses and models.

    Returns
    -------
    complete : list of str
        Sorted ids of the patients with every HR, LR and expert file present,
        for every spacing, pulse and model.
    missing : dict of str to list of str
        For every other patient, the paths that are missing (HR first, then
        LR, then expert outputs).

    Raises
    ------
    ConfigError
        ``hr-root`` does not exist or is not a directory.

    Notes
    -----
    Patients are the sub-directories of ``hr-root``; hidden ones (name starting
    with ``.``) are skipped.  Each dropped patient is logged at WARNING with its
    first missing file.
    """
    if data.schema == "hdf5":
        return _scan_h5(data)
    root = data.hr_root
    if not root.is_dir():
        raise ConfigError(
            f"data.hr-root {str(root)!r} is not a directory; expected one folder per patient"
        )
    candidates = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    complete: list[str] = []
    missing: dict[str, list[str]] = {}
    for pid in candidates:
        absent = [str(f) for f in _required_files(data, pid) if not f.is_file()]
        if absent:
            missing[pid] = absent
            log.warning(
                "dropping patient %s: %d of its files are missing, first %s",
                pid,
                len(absent),
                absent[0],
            )
        else:
            complete.append(pid)
    log.info(
        "found %d patient folders in %s: %d complete, %d dropped (spacings=%s pulses=%s models=%s)",
        len(candidates),
        root,
        len(complete),
        len(missing),
        ",".join(data.spacings),
        ",".join(data.pulses),
        ",".join(data.models),
    )
    return complete, missing


def _h5_file(path: Path, what: str):  # noqa: ANN202 - an open h5py.File
    h5py = h5py_module()
    if not path.is_file():
        raise ConfigError(f"{what} '{path}' is not a file; expected an HDF5 file")
    try:
        return h5py.File(path, "r", locking=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} '{path}' cannot be opened as HDF5 ({h5_reason(exc)})") from exc


def has_group(group, name: str) -> bool:  # noqa: ANN001 - an h5py.Group
    """Whether ``group[name]`` is a group (a dangling link is not)."""
    h5py = h5py_module()
    try:
        return isinstance(group.get(name), h5py.Group)
    except (KeyError, OSError):
        return False


def _scan_h5(data: DataConfig) -> tuple[list[str], dict[str, list[str]]]:
    """Apply the current release's inclusion rule to the HDF5 files.

    Patients are the sorted child groups of ``high_resolution``; a patient is complete when
    its HR exists for every pulse and every model has ``{spacing}/{pid}/{pulse}`` for every
    spacing and pulse (the LR is not required).
    """
    h5py = h5py_module()
    src = _h5_file(data.source_h5, "data.source-h5")
    experts = {}
    try:
        for model in data.models:
            experts[model] = _h5_file(h5_expert_file(data, model), f"expert {model!r} file")
        hr = src.get("high_resolution")
        if not isinstance(hr, h5py.Group):
            raise ConfigError(
                f"data.source-h5 '{data.source_h5}' has no group 'high_resolution'; expected "
                "one group per patient under it"
            )
        candidates = sorted(k for k in hr if has_group(hr, k))

        def has(f, key: str) -> bool:  # noqa: ANN001
            try:
                return isinstance(f.get(key), h5py.Dataset)
            except (KeyError, OSError):  # a dangling link: not there
                return False

        complete: list[str] = []
        missing: dict[str, list[str]] = {}
        for pid in candidates:
            absent = [hr_source(data, pid, pulse) for pulse in data.pulses
                      if not has(src, f"high_resolution/{pid}/{pulse}")]
            absent += [
                expert_source(data, model, pid, sp, pulse)
                for model in data.models for sp in data.spacings for pulse in data.pulses
                if not has(experts[model], f"{sp}/{pid}/{pulse}")
            ]
            if absent:
                missing[pid] = absent
                log.warning("dropping patient %s: %d of its volumes are missing, first %s",
                            pid, len(absent), absent[0])
            else:
                complete.append(pid)
    finally:
        for f in [src, *experts.values()]:
            f.close()
    log.info(
        "found %d patients in %s: %d complete, %d dropped (spacings=%s pulses=%s models=%s)",
        len(candidates), data.source_h5, len(complete), len(missing), ",".join(data.spacings),
        ",".join(data.pulses), ",".join(data.models),
    )
    return complete, missing


def _entry(data: DataConfig, pid: str) -> dict[str, dict[str, dict[str, str]]]:
    entry: dict[str, dict[str, dict[str, str]]] = {}
    for model in data.models:
        entry[model] = {
            sp: {pulse: expert_source(data, model, pid, sp, pulse) for pulse in data.pulses}
            for sp in data.spacings
        }
    entry["HR"] = {
        sp: {pulse: hr_source(data, pid, pulse) for pulse in data.pulses} for sp in data.spacings
    }
    entry["LR"] = {
        sp: {pulse: lr_source(data, pid, sp, pulse) for pulse in data.pulses}
        for sp in data.spacings
    }
    return entry


def build_manifest(data: DataConfig) -> dict:
    """Split the complete patients into ``data.kfolds`` folds.

    Parameters
    ----------
    data : DataConfig

    Returns
    -------
    dict
        NIfTI schema: ``{"folds": [{"train": {pid: entry}, "test": {pid: entry}}, ...]}``.
        HDF5 schema: the current release's id lists, ``{"folds": [{"test": [pid, ...],
        "train": [pid, ...]}, ...]}`` (shuffled order), with its inclusion rule (see
        ``_scan_h5``: the LR is not required).

    Raises
    ------
    ConfigError
        Fewer complete patients than folds; the message says how many were
        found and why (a few of) the others were dropped.

    Notes
    -----
    The sorted ids are shuffled with ``random.Random(seed).shuffle``.  Fold
    ``i`` (0-based) tests the ``(n + i) // k`` patients that follow the previous
    folds' test patients and trains on all others, so every patient is tested
    exactly once.
    """
    complete, missing = scan_patients(data)
    n, k = len(complete), data.kfolds
    if n < k:
        examples = list(missing.items())[:_EXAMPLES]
        why = "; ".join(f"{pid} lacks {files[0]}" for pid, files in examples)
        more = f" and {len(missing) - _EXAMPLES} more" if len(missing) > _EXAMPLES else ""
        dropped = f"; {len(missing)} dropped for missing files: {why}{more}" if missing else ""
        where = (f"data.hr-root {str(data.hr_root)!r}" if data.schema == "nifti"
                 else f"data.source-h5 {str(data.source_h5)!r}")
        raise ConfigError(
            f"found {n} complete patients in {where} but "
            f"data.kfolds = {k} needs at least {k}{dropped}"
        )
    order = list(complete)
    random.Random(data.seed).shuffle(order)
    ids_only = data.schema == "hdf5"
    entries = {} if ids_only else {pid: _entry(data, pid) for pid in complete}
    folds: list[dict[str, Any]] = []
    start = 0
    for i in range(k):
        size = (n + i) // k
        test = set(order[start : start + size])
        start += size
        if ids_only:
            folds.append({"test": [p for p in order if p in test],
                          "train": [p for p in order if p not in test]})
        else:
            folds.append(
                {
                    "train": {pid: entries[pid] for pid in order if pid not in test},
                    "test": {pid: entries[pid] for pid in order if pid in test},
                }
            )
        log.info("fold %d: train=%d test=%d", i + 1, n - len(test), len(test))
    return {"folds": folds}


def write_manifest(manifest: dict, path: str | os.PathLike[str]) -> None:
    """Write a manifest as JSON (indent 2, sorted keys, no trailing newline), atomically.

    Parameters
    ----------
    manifest : dict
        As returned by :func:`build_manifest`.
    path : str or PathLike
        Destination; its folder is created if needed.  The text goes to a
        temporary file in the same folder that then replaces ``path``, so a
        reader never sees a half-written manifest.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(manifest, indent=2, sort_keys=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("wrote manifest %s (%d folds)", dest, len(manifest.get("folds", ())))


#: Set on a manifest resolved from the id-list form: its patients are taken in file order.
FILE_ORDER = "_ids_in_file_order"


def load_manifest(path: str | os.PathLike[str], data: DataConfig | None = None) -> dict:
    """Read and check the shape of a manifest JSON, in either form.

    Parameters
    ----------
    path : str or PathLike
    data : DataConfig, optional
        The config's ``data`` section.  Needed for the id-list form (the current release's),
        whose file paths come from the config: its ids are resolved into entries of
        ``data``'s schema (HDF5 datasets or NIfTI paths), in file order.

    Returns
    -------
    dict
        ``{"folds": [{"train": {pid: entry}, "test": {pid: entry}}, ...]}``; from the
        id-list form with ``FILE_ORDER`` set, so that :func:`select_task` keeps file order.

    Raises
    ------
    ConfigError
        The file is missing, not JSON, or not shaped like a manifest; an id-list manifest
        without ``data``; the message names the file and what is wrong.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        where = (
            ""
            if file.is_absolute()
            else f" (a relative path is read from the working directory: '{file.absolute()}')"
        )
        raise ConfigError(
            f"manifest {str(file)!r} not found{where}; build it first (data.out of the config)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"manifest {str(file)!r} cannot be read ({exc})") from None
    try:
        manifest = json.loads(text, object_pairs_hook=_no_duplicates(file, text))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"manifest {str(file)!r} is not valid JSON: {exc.msg} at line {exc.lineno}, "
            f"column {exc.colno}"
        ) from None
    where = f"manifest {str(file)!r}"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("folds"), list):
        raise ConfigError(f'{where} must be an object with a "folds" list')
    if not manifest["folds"]:
        raise ConfigError(f'{where} has an empty "folds" list')
    if any(isinstance(f, dict) and isinstance(f.get(sp), list)
           for f in manifest["folds"] for sp in ("train", "test")):
        return _resolve_id_lists(manifest, where, data)
    for i, fold in enumerate(manifest["folds"], start=1):
        if not isinstance(fold, dict):
            raise ConfigError(f'{where}: fold {i} must be an object with "train" and "test"')
        for split in ("train", "test"):
            part = fold.get(split)
            if not isinstance(part, dict):
                raise ConfigError(
                    f"{where}: fold {i} has no {split!r} mapping of patient -> file entry"
                )
            for pid, entry in part.items():
                try:
                    check_patient_id(pid, f"{where}: fold {i} {split}")
                except InputError as exc:
                    raise ConfigError(str(exc)) from None
                if not isinstance(entry, dict):
                    raise ConfigError(
                        f"{where}: fold {i} {split} patient {pid!r} must map to an object "
                        'entry[MODEL|"HR"|"LR"][spacing][pulse] = path'
                    )
        both = sorted(set(fold["train"]) & set(fold["test"]))
        if both:
            raise ConfigError(
                f"{where}: fold {i} lists patient(s) {', '.join(map(repr, both))} in both "
                "'train' and 'test'; a test patient must not be trained on (rebuild the manifest)"
            )
    return manifest


def _resolve_id_lists(manifest: dict, where: str, data: DataConfig | None) -> dict:
    """Check an id-list manifest and resolve its ids into entries of ``data``'s schema."""
    folds = []
    for i, fold in enumerate(manifest["folds"], start=1):
        if not isinstance(fold, dict):
            raise ConfigError(f'{where}: fold {i} must be an object with "train" and "test"')
        lists = {}
        for split in ("train", "test"):
            part = fold.get(split)
            if not isinstance(part, list):
                raise ConfigError(
                    f"{where}: fold {i} has no {split!r} list of patient ids; every fold of an "
                    "id-list manifest must have both lists"
                )
            for pid in part:
                if not isinstance(pid, str):
                    raise ConfigError(
                        f"{where}: fold {i} {split!r} holds {pid!r}; expected patient ids "
                        "(strings)"
                    )
                try:
                    check_patient_id(pid, f"{where}: fold {i} {split}")
                except InputError as exc:
                    raise ConfigError(str(exc)) from None
            dupes = sorted({p for p in part if part.count(p) > 1})
            if dupes:
                raise ConfigError(
                    f"{where}: fold {i} {split!r} lists {', '.join(map(repr, dupes))} more than "
                    "once"
                )
            lists[split] = part
        both = sorted(set(lists["train"]) & set(lists["test"]))
        if both:
            raise ConfigError(
                f"{where}: fold {i} lists patient(s) {', '.join(map(repr, both))} in both "
                "'train' and 'test'; a test patient must not be trained on (rebuild the manifest)"
            )
        folds.append(lists)
    if data is None:
        raise ConfigError(
            f"{where} lists patient ids only (the current PaCS-SR release's form); their files "
            "come from the config: read it with the config's data section"
        )
    return {
        "folds": [{split: {pid: _entry(data, pid) for pid in f[split]}
                   for split in ("train", "test")} for f in folds],
        FILE_ORDER: True,
    }


def _no_duplicates(file: Path, text: str):  # noqa: ANN202 - a json object_pairs_hook
    """Return an ``object_pairs_hook`` that refuses a key listed twice in one object.

    ``json`` keeps the last of two equal keys silently; in a manifest that hides a patient
    listed twice (with different files) or a fold entry overwritten.
    """

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                lines = _duplicate_key_lines(text, key)
                at = f" (lines {lines[0]} and {lines[1]})" if lines else ""
                raise ConfigError(
                    f"manifest {str(file)!r} lists the key {key!r} twice in one object{at}; "
                    "each patient and setting may appear once"
                )
            out[key] = value
        return out

    return hook


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]]')


_COLON = re.compile(r"\s*:")


def _duplicate_key_lines(text: str, key: str) -> tuple[int, int] | None:
    """Lines of the first two occurrences of ``key`` in one JSON object of ``text``.

    Only called after ``json`` has found the duplicate, so ``text`` is valid JSON up to it.
    The same key in different objects (a patient in several folds) is not a duplicate.
    """
    stack: list[dict[str, int] | None] = []
    line, last = 1, 0
    for m in _JSON_TOKEN.finditer(text):
        tok = m.group()
        if tok in "{[":
            stack.append({} if tok == "{" else None)
        elif tok in "}]":
            if stack:
                stack.pop()
        elif tok.startswith('"') and stack and stack[-1] is not None:
            if not _COLON.match(text, m.end()):
                continue
            line += text.count("\n", last, m.start())
            last = m.start()
            name = json.loads(tok)
            if name == key and name in stack[-1]:
                return stack[-1][name], line
            stack[-1].setdefault(name, line)
    return None


def _lookup(entry: Any, keys: Sequence[str], pid: str, fold: int) -> str:
    """Follow ``entry[keys[0]][keys[1]]...`` and return the path, or say what is there."""
    what = ("entry", "spacing", "pulse")
    node = entry
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            avail = sorted(map(str, node)) if isinstance(node, dict) else []
            kind = what[depth]
            if depth == 0 and key not in ("HR", "LR"):
                kind = "model"
                avail = [a for a in avail if a not in ("HR", "LR")]
            context = "/".join(keys[:depth])
            inside = f" under {context}" if context else ""
            raise ConfigError(
                f"manifest fold {fold} patient {pid!r} has no {kind} {key!r}{inside}; "
                f"available: {', '.join(avail) or 'none'}"
            )
        node = node[key]
    if not isinstance(node, str):
        raise ConfigError(
            f"manifest fold {fold} patient {pid!r}: {'/'.join(keys)} must be a path string; "
            f"got {type(node).__name__}"
        )
    return node


def filter_tasks(
    manifest: dict, data: Any, folds: Iterable[int] | None = None,
    spacings: Sequence[str] | None = None, pulses: Sequence[str] | None = None,
    *, fold_option: str = "--fold",
) -> tuple[list[int], list[str], list[str]]:
    """Return the folds, spacings and pulses a command runs for its filters (the one home).

    Parameters
    ----------
    manifest : dict
        As returned by :func:`load_manifest` (its ``"folds"`` give K).
    data : config.DataConfig
        The config's ``data`` section (``spacings``, ``pulses``).
    folds : iterable of int, optional
        1-based folds (default: all K).
    spacings, pulses : sequence of str, optional
        Subsets of ``data.spacings`` / ``data.pulses`` (default: all, in the config's order).
    fold_option : str, optional
        How the command spells its fold option, for the message (``--fold``, ``--folds``).

    Returns
    -------
    folds, spacings, pulses : list
        Folds sorted and without repeats; spacings and pulses in the order given.

    Raises
    ------
    ConfigError
        A fold outside ``1..K``, or a spacing or pulse the config does not list.
    """
    k = len(manifest["folds"])
    fold_list = sorted(set(folds)) if folds is not None else list(range(1, k + 1))
    for f in fold_list:
        if not 1 <= f <= k:
            raise ConfigError(f"{fold_option} {f}: the manifest has folds 1..{k}")
    for name, chosen, allowed in (("spacing", spacings, data.spacings),
                                  ("pulse", pulses, data.pulses)):
        for v in chosen or ():
            if v not in allowed:
                raise ConfigError(f"--{name} {v!r}: data.{name}s in the config has {list(allowed)}")
    return fold_list, list(spacings or data.spacings), list(pulses or data.pulses)


def select_task(
    manifest: dict, fold: int, spacing: str, pulse: str, models: Sequence[str]
) -> tuple[dict[str, dict], dict[str, dict]]:
    """Pick one fold, spacing and pulse out of a manifest.

    Parameters
    ----------
    manifest : dict
        As returned by :func:`load_manifest` or :func:`build_manifest`.
    fold : int
        1-based fold number, ``1 <= fold <= K``.
    spacing, pulse : str
        E.g. ``"3mm"`` and ``"t1c"``.
    models : sequence of str
        Expert names, in the order the expert paths are returned.

    Returns
    -------
    train, test : dict of str to dict
        For each patient (sorted ids): ``{"HR": path, "LR": path, "experts":
        [path per model, in models order]}``.

    Raises
    ------
    ConfigError
        The fold is outside ``1..K`` (the message says K), or the spacing,
        pulse or a model is not in the entries (the message lists what is).

    Examples
    --------
    >>> train, test = select_task(m, 1, "3mm", "t1c", ["BSPLINE", "LINEAR"])  # doctest: +SKIP
    >>> test["sub-001"]["experts"]  # doctest: +SKIP
    ['models/BSPLINE/3mm/output_volumes/sub-001-t1c.nii.gz', 'models/LINEAR/...']
    """
    folds = manifest.get("folds") if isinstance(manifest, dict) else None
    if not isinstance(folds, list) or not folds:
        raise ConfigError('manifest must be an object with a non-empty "folds" list')
    k = len(folds)
    if isinstance(fold, bool) or not isinstance(fold, int) or not 1 <= fold <= k:
        raise ConfigError(
            f"fold must be an integer in 1..{k} (the manifest has K={k} folds); got {fold!r}"
        )
    if isinstance(models, str) or not models:
        raise ConfigError(f"models must be a non-empty list of names; got {models!r}")
    chosen = folds[fold - 1]
    out: list[dict[str, dict]] = []
    for split in ("train", "test"):
        part = chosen.get(split) if isinstance(chosen, dict) else None
        if not isinstance(part, dict):
            raise ConfigError(f"manifest fold {fold} has no {split!r} mapping of patient -> entry")
        sel: dict[str, dict] = {}
        # the id-list form is read in file order, as the current release does
        for pid in (list(part) if manifest.get(FILE_ORDER) else sorted(part)):
            entry = part[pid]
            sel[pid] = {
                "HR": _lookup(entry, ("HR", spacing, pulse), pid, fold),
                "LR": _lookup(entry, ("LR", spacing, pulse), pid, fold),
                "experts": [_lookup(entry, (m, spacing, pulse), pid, fold) for m in models],
            }
        out.append(sel)
    return out[0], out[1]
