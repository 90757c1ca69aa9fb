"""The K-fold manifest of PaCS-SR (algorithm A1): which patient is in which fold, and its files.

The input files are found in the published tool's layout, which
:mod:`pacs_numba.store.layout` spells (``hr_file``, ``lr_file``, ``expert_file``).

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


def _entry(data: DataConfig, pid: str) -> dict[str, dict[str, dict[str, str]]]:
    entry: dict[str, dict[str, dict[str, str]]] = {}
    for model in data.models:
        entry[model] = {
            sp: {pulse: str(sr_path(data, model, pid, sp, pulse)) for pulse in data.pulses}
            for sp in data.spacings
        }
    entry["HR"] = {
        sp: {pulse: str(hr_path(data, pid, pulse)) for pulse in data.pulses} for sp in data.spacings
    }
    entry["LR"] = {
        sp: {pulse: str(lr_path(data, pid, sp, pulse)) for pulse in data.pulses}
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
        ``{"folds": [{"train": {pid: entry}, "test": {pid: entry}}, ...]}``.

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
        raise ConfigError(
            f"found {n} complete patients in data.hr-root {str(data.hr_root)!r} but "
            f"data.kfolds = {k} needs at least {k}{dropped}"
        )
    order = list(complete)
    random.Random(data.seed).shuffle(order)
    entries = {pid: _entry(data, pid) for pid in complete}
    folds = []
    start = 0
    for i in range(k):
        size = (n + i) // k
        test = set(order[start : start + size])
        start += size
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


def load_manifest(path: str | os.PathLike[str]) -> dict:
    """Read and check the shape of a manifest JSON.

    Parameters
    ----------
    path : str or PathLike

    Returns
    -------
    dict
        ``{"folds": [{"train": {pid: entry}, "test": {pid: entry}}, ...]}``.

    Raises
    ------
    ConfigError
        The file is missing, not JSON, or not shaped like a manifest; the
        message names the file and what is wrong.
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
    for i, fold in enumerate(manifest["folds"], start=1):
        if not isinstance(fold, dict):
            raise ConfigError(f'{where}: fold {i} must be an object with "train" and "test"')
        for split in ("train", "test"):
            part = fold.get(split)
            if isinstance(part, list):
                raise ConfigError(
                    f"{where}: fold {i} {split!r} is a list of patient ids (the HDF5 manifest "
                    "of newer PaCS-SR versions); expected a mapping patient -> file entry; "
                    "rebuild the manifest from the config"
                )
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
        for pid in sorted(part):
            entry = part[pid]
            sel[pid] = {
                "HR": _lookup(entry, ("HR", spacing, pulse), pid, fold),
                "LR": _lookup(entry, ("LR", spacing, pulse), pid, fold),
                "experts": [_lookup(entry, (m, spacing, pulse), pid, fold) for m in models],
            }
        out.append(sel)
    return out[0], out[1]
