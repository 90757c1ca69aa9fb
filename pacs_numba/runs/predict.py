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

With registration (``pacs_sr.use_registration: true``; ``predict --config C --pulse P``) the
experts' mean stands for the missing HR: it is registered rigidly to the atlas template of the
pulse, the same transform resamples every expert onto the atlas grid, the atlas brain mask
replaces the connected-component mask, and the prediction is written with the atlas affine.

On a patient that does have an HR, the prediction differs from ``evaluate``'s blend only by
these substitutions (the tests bound the difference); given the HR as ``norm_source`` it *is*
``evaluate``'s blend.

Experts are matched to the model by name (``--expert NAME=PATH``): a missing, unknown or
repeated name is an error, so a wrong order can no longer give a quietly worse blend.  The
model is a ``pacs_model.npz`` (self-describing) or a published ``weights.json`` plus its patch
size, stride and the expert order.  Many patients at once (:func:`predict_batch`) come from a
manifest split, a folder in the published layout or a CSV; they run concurrently within the
memory budget, and a rerun keeps the outputs already made from the same inputs and model.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numba

from ..config import RegistrationConfig
from ..core.blending import NonFiniteBlend
from ..core.model import StackingModel
from ..core.predict import model_window, predict_volume
from ..core.tiling import TileGrid
from ..errors import ConfigError, InputError
from ..resources.limits import detect_limits
from ..resources.planning import plan_stage
from ..resources.process import baseline_bytes
from ..resources.threads import thread_safe_layer
from ..store.atomic import atomic_write_json
from ..store.integrity import check_patient_id, file_digest, verify_file
from ..store.layout import EXPERT_FILE_PATTERN, expert_dir, volume_name
from ..store.manifest import load_manifest, select_task
from ..store.modelfile import load_model, read_weights_json
from ..store.nifti import AFFINE_ATOL, affine_difference, read_affine, read_shape, write_nifti
from ..store.record import fingerprints, model_digest
from ..store.registration import Registrar
from ..store.volumes import VolumeStore
from .progress import progress

log = logging.getLogger(__name__)


PREDICT_RECORD = "pacs_numba_predict.json"


PUBLISHED_OUTPUT = "blended_prediction.nii.gz"  # the published pacs-sr-predict's file name


ID_COLUMNS = ("pid", "patient", "patient_id", "id")


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


def parse_named_experts(items: Sequence[str]) -> dict[str, Path]:
    """Parse ``NAME=PATH`` items (``--expert``) into ``{name: path}``, in the given order.

    Raises
    ------
    InputError
        If an item has no ``=``, an empty name or path, or a name is given twice.
    """
    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = str(item).partition("=")
        name = name.strip()
        if not sep or not name or not path:
            raise InputError(
                f"--expert {item!r}: expected NAME=PATH, e.g. BSPLINE=sub-01_bspline.nii.gz"
            )
        if name in out:
            raise InputError(f"--expert: expert {name!r} is given twice ('{out[name]}', '{path}')")
        out[name] = Path(path)
    return out


def order_experts(named: Mapping[str, Any], model_names: Sequence[str], where: str) -> list[Any]:
    """Return ``named``'s values in the model's expert order.

    Raises
    ------
    InputError
        Naming every expert the model needs that is missing and every name it does not
        know (``where`` says where the names came from).
    """
    missing = [n for n in model_names if n not in named]
    extra = [n for n in named if n not in model_names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unknown {extra}")
        raise InputError(
            f"{where}: {' and '.join(parts)}; the model blends exactly "
            f"{list(model_names)} (one NAME=PATH each)"
        )
    return [named[n] for n in model_names]


def state_bare_order(model: StackingModel, paths: Sequence[Path]) -> None:
    """Log how bare ``--experts`` paths are matched to the model's names (they are unnamed)."""
    if len(paths) != len(model.model_names):
        raise InputError(
            f"the model blends {len(model.model_names)} experts {list(model.model_names)}; "
            f"got {len(paths)} volumes"
        )
    pairs = ", ".join(f"{n}='{p}'" for n, p in zip(model.model_names, paths, strict=True))
    log.warning(
        "--experts gives paths without names: taking them in the model's order %s; "
        "check it (or use --expert NAME=PATH): %s", list(model.model_names), pairs,
    )


def load_any_model(
    path: Path,
    *,
    model_names: Sequence[str] | None = None,
    shape: Sequence[int] | None = None,
    patch_size: int | None = None,
    stride: int | None = None,
    window: str | None = None,
) -> StackingModel:
    """Load a ``pacs_model.npz``, or a published ``weights.json`` with its geometry.

    A ``weights.json`` says nothing but tile weights: the volume ``shape`` (from the
    experts), ``patch_size``, ``stride`` (the training config's) and the expert order
    ``model_names`` (the weight columns, the order of ``data.models``) must be given.

    Raises
    ------
    InputError
        If a model file is unreadable, or a weights.json lacks what it needs or does not
        fit that geometry.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        need = {"expert names": model_names, "patch size": patch_size, "stride": stride,
                "shape": shape}
        absent = [k for k, v in need.items() if not v]
        if absent:
            raise InputError(
                f"weights file '{path}' holds only tile weights; also give the {absent} "
                "it was trained with (--patch-size, --stride, --expert NAME=PATH in the "
                "config's data.models order)"
            )
        try:
            grid = TileGrid(tuple(int(n) for n in shape), int(patch_size), int(stride))
        except ValueError as exc:
            raise InputError(f"weights file '{path}': {exc}") from None
        weights, learned = read_weights_json(path, grid.n_tiles, len(model_names))
        log.info("weights.json '%s': %d tiles, patch %d, stride %d, experts %s",
                 path, int(learned.sum()), patch_size, stride, list(model_names))
        return StackingModel(weights, learned, grid, tuple(model_names),
                             {"weights_from": str(path)}, window=window)
    model = load_model(path)
    model_window(model, window)  # a --window that contradicts the model is an error
    return model


def predict_files(
    model_path: Path | StackingModel,
    expert_paths: Sequence[Path],
    out_path: Path,
    *,
    window: str | None = None,
    cache_dir: Path | None = None,
    store: VolumeStore | None = None,
    registration: RegistrationConfig | None = None,
    pulse: str | None = None,
) -> Path:
    """Read the experts (in the model's order), blend them and write the prediction.

    The output keeps the first expert's affine and header, as float32.  ``window`` None
    uses the model's mixing window (:func:`model_window`).  With ``registration`` (and
    ``pulse``), the experts are first brought to the atlas (see the module notes) and the
    output has the atlas affine and the first expert's header.
    """
    model = model_path if isinstance(model_path, StackingModel) else load_model(model_path)
    check_expert_affines(expert_paths)
    store = store or VolumeStore(cache_dir)
    mask = None
    if registration is not None:
        if pulse is None:
            raise ConfigError("predict with registration needs the pulse (--pulse)")

        registrar = Registrar(registration, store, detect_limits().cpus.value)
        vols, _ = registrar.register_mean(pulse, list(expert_paths))
        mask = registrar.brain_mask(pulse)
    else:
        vols = [store.get(p) for p in expert_paths]
    for name, v, p in zip(model.model_names, vols, expert_paths, strict=False):
        if tuple(v.data.shape) != model.grid.shape:
            raise InputError(
                f"expert {name} '{p}' has shape {tuple(v.data.shape)}; the model was trained "
                f"on {model.grid.shape}"
            )
    try:
        pred = predict_volume([v.data for v in vols], model, window=window, mask=mask)
    except NonFiniteBlend as exc:  # refused before anything is written
        cause = f" (expert {model.model_names[exc.expert]} '{expert_paths[exc.expert]}')" if (
            exc.expert is not None) else ""
        raise InputError(f"prediction '{out_path}'{cause}: {exc}") from None
    write_nifti(out_path, pred, vols[0].meta.affine, vols[0].meta.header)
    log.info("predicted %s from %d experts", out_path, len(vols))
    return Path(out_path)


def check_expert_affines(expert_paths: Sequence[Path]) -> None:
    """Refuse experts whose affines disagree (:func:`~pacs_numba.store.nifti.affine_difference`).

    Train compares each expert with the HR and warns; predict has no HR and writes the first
    expert's affine, so a shifted or flipped expert would be blended voxel by voxel with the
    others and mislabelled in space: an error naming both files.  Headers only.

    Raises
    ------
    InputError
        Naming the first expert and the one that differs, and how.
    """
    if len(expert_paths) < 2:
        return
    first = read_affine(expert_paths[0])
    for p in expert_paths[1:]:
        why = affine_difference(read_affine(p), first)
        if why is not None:
            raise InputError(
                f"expert '{p}' has another affine than expert '{expert_paths[0]}' ({why}; "
                f"tolerance {AFFINE_ATOL} mm): the experts must be on one grid (the "
                "prediction takes the first expert's affine); resample or register them"
            )


@dataclass(frozen=True)
class PredictJob:
    """One patient to predict: its id, its experts in the model's order and the output."""

    pid: str
    experts: tuple[Path, ...]
    out: Path


@dataclass
class BatchResult:
    """What :func:`predict_batch` did, by patient id."""

    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def jobs_from_manifest(
    manifest_path: Path, fold: int, spacing: str, pulse: str, split: str,
    model_names: Sequence[str], out_dir: Path,
) -> list[PredictJob]:
    """One job per patient of a manifest's fold/spacing/pulse ``split`` (train or test)."""
    train, test = select_task(load_manifest(manifest_path), fold, spacing, pulse,
                              list(model_names))
    chosen = {"train": train, "test": test}.get(split)
    if chosen is None:
        raise ConfigError(f"--split must be train or test, got {split!r}")
    return [PredictJob(pid, tuple(Path(p) for p in e["experts"]),
                       Path(out_dir) / volume_name(pid, pulse)) for pid, e in chosen.items()]


def jobs_from_folder(
    models_root: Path, spacing: str, pulse: str, model_names: Sequence[str], out_dir: Path,
) -> list[PredictJob]:
    """Patients found in the published layout ``{root}/{MODEL}/{spacing}/output_volumes``.

    Every ``{pid}-{pulse}.nii.gz`` present for every expert is a job; a patient some
    expert lacks is left out with a warning that names the missing expert.
    """
    root = Path(models_root)
    suffix = volume_name("", pulse)
    found: dict[str, dict[str, Path]] = {}
    for name in model_names:
        folder = expert_dir(root, name, spacing)
        if not folder.is_dir():
            raise InputError(
                f"'{folder}' does not exist: expected the published layout "
                f"{EXPERT_FILE_PATTERN} for every expert of the model {list(model_names)}"
            )
        for f in sorted(folder.glob(f"*{suffix}")):
            pid = check_patient_id(f.name[: -len(suffix)], f"'{f}'")
            found.setdefault(pid, {})[name] = f
    jobs = []
    for pid in sorted(found):
        lacking = [n for n in model_names if n not in found[pid]]
        if lacking:
            log.warning("patient %s left out: no volume of %s under '%s'", pid, lacking, root)
            continue
        jobs.append(PredictJob(pid, tuple(found[pid][n] for n in model_names),
                               Path(out_dir) / volume_name(pid, pulse)))
    if not jobs:
        raise InputError(f"no patient with every expert's '*{suffix}' under '{root}' ({spacing})")
    return jobs


def jobs_from_csv(csv_path: Path, model_names: Sequence[str], out_dir: Path) -> list[PredictJob]:
    """Jobs from a CSV with a patient-id column and one column per expert name.

    The id column is one of ``pid``, ``patient``, ``patient_id``, ``id``; an optional
    ``out`` column names the output (default ``{out_dir}/{pid}.nii.gz``).  Relative paths
    are taken from the CSV's folder.
    """
    path = Path(csv_path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # a spreadsheet's BOM too
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read CSV '{path}': {exc}") from None
    if not rows:
        raise InputError(f"CSV '{path}' has no rows")
    # DictReader keeps the last of two equal columns: one patient blended with another's
    # expert.  A repeated column is refused, whichever it is.
    seen_cols: set[str] = set()
    for c in header:
        if c in seen_cols:
            raise InputError(
                f"CSV '{path}': column {c!r} appears twice in the header {header}; give each "
                "expert (and the patient id) one column"
            )
        seen_cols.add(c)
    ids = [c for c in header if c.strip().lower() in ID_COLUMNS]
    if len(ids) != 1:
        raise InputError(
            f"CSV '{path}': expected one patient-id column named one of {list(ID_COLUMNS)}; "
            f"the header is {header}"
        )
    expert_cols = [c for c in header if c not in (ids[0], "out")]
    order_experts(dict.fromkeys(expert_cols), model_names, f"CSV '{path}' columns")
    base = path.parent
    jobs, seen = [], set()
    for line, row in enumerate(rows, start=2):
        pid = (row[ids[0]] or "").strip()
        if not pid or pid in seen:
            raise InputError(f"CSV '{path}' line {line}: patient id {pid!r} is empty or repeated")
        check_patient_id(pid, f"CSV '{path}' line {line}")  # it names the output file
        seen.add(pid)
        if None in row:  # DictReader's key for fields beyond the header
            raise InputError(
                f"CSV '{path}' line {line} ({pid}): {len(row[None])} more field(s) than the "
                f"header's {len(header)} columns"
            )
        blank = [n for n in model_names if not (row.get(n) or "").strip()]
        if blank:
            raise InputError(f"CSV '{path}' line {line} ({pid}): no path for {blank}")
        experts = tuple(base / Path(row[n].strip()) for n in model_names)
        out = (row.get("out") or "").strip()
        target = base / out if out else Path(out_dir) / f"{pid}.nii.gz"
        jobs.append(PredictJob(pid, experts, target))
    return jobs


def _plan_width(model: StackingModel, n_jobs: int, shape: Sequence[int], *, workers: int | None,
                mem_budget_bytes: int | None) -> tuple[int, int, str]:
    """Pool width and Numba threads for ``n_jobs`` predictions (the engine's planner)."""
    # predict has no fit options and writes no weight maps: only the grid matters
    settings = SimpleNamespace(
        patch_size=model.grid.patch_size, stride=model.grid.stride, lambda_grad=0.0,
        lambda_edge=0.0, grad_operator="sobel", ssim_axis="axial", save_weight_volumes=False,
        num_workers=None,
    )
    plan = plan_stage(
        "predict", settings, len(model.model_names), shape, max(1, n_jobs), detect_limits(),
        baseline_bytes=baseline_bytes(), workers=workers, mem_budget_bytes=mem_budget_bytes,
        thread_safe=thread_safe_layer(), where="the model",
    )
    return plan.pool.width, plan.pool.threads, plan.pool.reason


def _check_outputs_apart(jobs: Sequence[PredictJob]) -> None:
    outs: dict[Path, str] = {}
    inputs = {p.resolve() for j in jobs for p in j.experts}
    for j in jobs:
        o = j.out.resolve()
        if o in outs:
            raise InputError(f"patients {outs[o]} and {j.pid} would both write '{j.out}'")
        if o in inputs:
            raise InputError(f"output '{j.out}' of patient {j.pid} is one of the input volumes")
        outs[o] = j.pid


def predict_batch(
    model: StackingModel,
    jobs: Sequence[PredictJob],
    *,
    window: str | None = None,
    cache_dir: Path | None = None,
    workers: int | None = None,
    mem_budget_bytes: int | None = None,
    force: bool = False,
    no_progress: bool = False,
    record_dir: Path | None = None,
    use_record: bool = True,
    registration: RegistrationConfig | None = None,
    pulse: str | None = None,
) -> BatchResult:
    """Predict many patients concurrently within the memory budget; resumable.

    A record (``pacs_numba_predict.json`` in ``record_dir``, default the first output's
    folder) keeps, for each written output, the fingerprints of its experts, the model's
    digest and the output's size and SHA-256 checksum.  On a rerun, a patient whose output
    was made from the same inputs and model and still has that size and checksum is kept;
    one whose output was truncated, replaced or removed since is predicted again; an
    existing output made otherwise is an error unless ``force``.
    ``use_record=False`` (one patient from the command line) writes no record.
    ``registration`` and ``pulse`` register each patient's experts to the atlas first (see
    :func:`predict_files`).

    Returns
    -------
    BatchResult
        Patients written, kept and failed (a failed patient does not stop the others).
    """
    if not jobs:
        raise InputError("nothing to predict: no patient")
    _check_outputs_apart(jobs)
    window = window or model.window
    digest = model_digest(model.weights, model.learned, model.grid.shape)
    record_path = Path(record_dir or jobs[0].out.parent) / PREDICT_RECORD
    try:
        old = (json.loads(record_path.read_text())
               if use_record and record_path.exists() else {})
    except (OSError, ValueError):
        old = {}
    old_patients = old.get("patients") if isinstance(old, dict) else None
    if not isinstance(old_patients, dict) or old.get("model") != digest:
        old_patients = {}  # another model, or a record edited into another shape: keep nothing
    doc: dict[str, Any] = {"model": digest, "window": window,
                           "patients": {k: v for k, v in old_patients.items()
                                        if isinstance(v, dict)}}
    lock = threading.Lock()
    res = BatchResult()
    todo = []
    for j in jobs:
        fp = fingerprints(j.experts)
        rec = doc["patients"].get(j.pid)
        ours = bool(rec and fp is not None and rec.get("inputs") == fp
                    and rec.get("out") == str(j.out) and rec.get("window") == window)
        if ours and j.out.exists():
            # as train's record: the output must still be the file written (size, SHA-256)
            described = rec.get("output")
            why = (verify_file(j.out, described) if isinstance(described, dict)
                   else "the record has no checksum of it")
            if why is None:
                res.kept.append(j.pid)
                continue
            log.info("patient %s: output %s; predicting it again", j.pid, why)
        elif j.out.exists() and not force:
            raise InputError(
                f"output '{j.out}' of patient {j.pid} exists and was not made from these "
                "experts and model; pass --force to overwrite it"
            )
        todo.append((j, fp))
    if res.kept:
        log.info("keeping %d complete prediction(s) made from the same inputs: %s",
                 len(res.kept), ", ".join(res.kept))
    if not todo:
        return res
    shape = read_shape(todo[0][0].experts[0])[:3]
    width, threads, reason = _plan_width(model, len(todo), shape, workers=workers,
                                         mem_budget_bytes=mem_budget_bytes)
    log.info("predict %d patient(s): %d worker(s) x %d numba thread(s) (%s)",
             len(todo), width, threads, reason)
    store = VolumeStore(cache_dir)

    def one(job: PredictJob, fp: Any) -> None:
        numba.set_num_threads(threads)  # thread-local in numba
        predict_files(model, job.experts, job.out, window=window, store=store,
                      registration=registration, pulse=pulse)
        if use_record:
            with lock:
                doc["patients"][job.pid] = {"inputs": fp, "out": str(job.out),
                                            "window": window, "output": file_digest(job.out)}
                atomic_write_json(record_path, doc, indent=1)

    with (
        ThreadPoolExecutor(width, thread_name_prefix="predict") as pool,
        progress(len(todo), "predict", disabled=no_progress) as bar,
    ):
        futures = {pool.submit(one, j, fp): j.pid for j, fp in todo}
        for fut in as_completed(futures):
            pid = futures[fut]
            try:
                fut.result()
                res.written.append(pid)
            except InputError as exc:
                log.error("patient %s: %s", pid, exc)
                res.failed[pid] = str(exc)
            bar.update(1)
    return res


def published_predict_section(
    section: Any, where: str
) -> tuple[Path | None, dict[str, Path], Path | None]:
    """Read the published config's ``predict`` section.

    Returns ``(pacs_sr_weights_path, {expert name: opinion_path}, out_root)``; the expert
    names come from each entry's ``name`` (the section's keys are only labels).

    Raises
    ------
    ConfigError
        If the section or an expert entry is malformed, or a name is repeated.
    """
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: the 'predict' section must be a mapping")
    experts = section.get("experts")
    if not isinstance(experts, dict) or not experts:
        raise ConfigError(
            f"{where}: predict.experts must map labels to {{name: ..., opinion_path: ...}}"
        )
    named: dict[str, Path] = {}
    for label, entry in experts.items():
        if not isinstance(entry, dict) or "name" not in entry or "opinion_path" not in entry:
            raise ConfigError(f"{where}: predict.experts.{label} needs 'name' and 'opinion_path'")
        name = str(entry["name"])
        if name in named:
            raise ConfigError(f"{where}: predict.experts: expert {name!r} appears twice")
        named[name] = Path(str(entry["opinion_path"]))
    w = section.get("pacs_sr_weights_path")
    out = section.get("out_root")
    return (Path(str(w)) if w else None), named, (Path(str(out)) if out else None)
