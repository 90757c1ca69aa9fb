"""``pacs-numba predict``: turn the command line into :mod:`pacs_numba.runs.predict` calls.

Kept apart from ``cli.py`` because predict has several input forms (one patient by name, a
manifest split, a folder in the published layout, a CSV, the published config's ``predict``
section) and two model forms (``pacs_model.npz`` or a published ``weights.json``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..config import load_config
from ..core.model import StackingModel
from ..errors import ConfigError, InputError
from ..resources.units import parse_budget
from ..runs.predict import (
    PUBLISHED_OUTPUT,
    PredictJob,
    check_out_path,
    jobs_from_csv,
    jobs_from_folder,
    jobs_from_manifest,
    load_any_model,
    order_experts,
    parse_named_experts,
    predict_batch,
    published_predict_section,
    state_bare_order,
)
from ..store.nifti import read_shape
from .common import HelpFormatter

log = logging.getLogger(__name__)


def _budget(args: argparse.Namespace) -> int | None:
    return parse_budget(getattr(args, "mem_budget", None))


def _model(args: argparse.Namespace, path: Path, names: list[str] | None,
           first_expert: Path | None, *, patch: int | None, stride: int | None,
           window: str | None) -> StackingModel:
    shape = read_shape(first_expert)[:3] if first_expert is not None else None
    return load_any_model(path, model_names=names, shape=shape, patch_size=patch,
                          stride=stride, window=window)


def _check_single_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output that is an input, is not NIfTI, or exists without --force."""
    check_out_path(out, inputs, force=force)


def run_predict(args: argparse.Namespace) -> int:
    """Run ``pacs-numba predict``; returns the exit code (0, or 2 if a patient failed)."""
    args.registration = None
    cfg = None
    if args.config is not None:

        cfg = load_config(args.config)
        if cfg.pacs_sr.use_registration:
            if not args.pulse:
                raise ConfigError(f"{args.config} has pacs_sr.use_registration: true: predict "
                                  "needs --pulse (it selects the atlas template)")
            args.registration = cfg.registration
    batch_forms = [f for f in ("manifest", "models_root", "csv") if getattr(args, f)]
    explicit = args.model or args.weights or args.expert or args.experts or batch_forms
    if cfg is not None and not explicit:
        return _from_config(args, cfg)
    path = args.model or args.weights
    if path is None:
        raise ConfigError("predict needs --model (pacs_model.npz or weights.json) or --config")
    if len(batch_forms) > 1:
        raise ConfigError("give one of --manifest, --models-root, --csv")
    if batch_forms:
        if args.expert or args.experts or args.out:
            raise ConfigError("--expert/--experts/--out are for one patient; use --out-dir "
                              "with --manifest, --models-root or --csv")
        if args.out_dir is None:
            raise ConfigError(f"--{batch_forms[0].replace('_', '-')} needs --out-dir")
        return _batch(args, path, batch_forms[0])
    return _single(args, path)


def _single(args: argparse.Namespace, path: Path) -> int:
    if args.out is None:
        raise ConfigError("predict needs --out for one patient (or --out-dir for many)")
    if args.expert and args.experts:
        raise ConfigError("give the experts either by name (--expert NAME=PATH) or as bare "
                          "--experts paths, not both")
    is_json = Path(path).suffix.lower() == ".json"
    if args.expert:
        named = parse_named_experts(args.expert)
        first = next(iter(named.values()))
        # a weights.json has no names: the --expert order is the column order
        names = list(named) if is_json else None
        model = _model(args, path, names, first, patch=args.patch_size, stride=args.stride,
                       window=args.window)
        experts = order_experts(named, model.model_names, "--expert")
    elif args.experts:
        if is_json:
            raise ConfigError("a weights.json has no expert names: give --expert NAME=PATH "
                              "in the config's data.models order")
        model = _model(args, path, None, args.experts[0], patch=None, stride=None,
                       window=args.window)
        state_bare_order(model, args.experts)
        experts = list(args.experts)
    else:
        raise ConfigError("predict needs the experts: --expert NAME=PATH for each expert")
    _check_single_output(args.out, [Path(path), *map(Path, experts)], args.force)
    res = predict_batch(model, [PredictJob("patient", tuple(experts), args.out)],
                        registration=args.registration, pulse=args.pulse,
                        window=args.window, cache_dir=args.cache_dir, workers=args.workers,
                        mem_budget_bytes=_budget(args), force=True,
                        no_progress=True, record_dir=None, use_record=False)
    if res.failed:
        raise InputError(res.failed["patient"])
    print(f"prediction -> {args.out}")
    return 0


def _batch(args: argparse.Namespace, path: Path, form: str) -> int:
    if Path(path).suffix.lower() == ".json":
        raise ConfigError("many patients need a pacs_model.npz (it names its experts) or "
                          "--config with the training config")
    model = load_any_model(path, window=args.window)
    names = list(model.model_names)
    pulse = args.pulse or model.settings.get("pulse")
    spacing = args.spacing or model.settings.get("spacing")
    if form == "manifest":
        fold = args.fold or model.settings.get("fold")
        if not (fold and spacing and pulse):
            raise ConfigError("--manifest needs --fold, --spacing and --pulse")
        jobs = jobs_from_manifest(args.manifest, int(fold), spacing, pulse, args.split, names,
                                  args.out_dir)
    elif form == "models_root":
        if not (spacing and pulse):
            raise ConfigError("--models-root needs --spacing and --pulse")
        jobs = jobs_from_folder(args.models_root, spacing, pulse, names, args.out_dir)
    else:
        jobs = jobs_from_csv(args.csv, names, args.out_dir)
    return _run_batch(args, model, jobs, args.out_dir)


def _run_batch(args: argparse.Namespace, model: StackingModel, jobs: list[PredictJob],
               record_dir: Path) -> int:
    res = predict_batch(model, jobs, window=args.window, cache_dir=args.cache_dir,
                        registration=args.registration, pulse=args.pulse,
                        workers=args.workers, mem_budget_bytes=_budget(args), force=args.force,
                        no_progress=args.no_progress, record_dir=record_dir)
    print(f"predictions: {len(res.written)} written, {len(res.kept)} kept, "
          f"{len(res.failed)} failed -> {record_dir}")
    if res.failed:
        log.error("%d of %d patients failed: %s", len(res.failed), len(jobs),
                  "; ".join(f"{k}: {v}" for k, v in res.failed.items()))
        return 2
    return 0


def _from_config(args: argparse.Namespace, cfg: Any) -> int:
    """Run the published ``pacs-sr-predict --config``: experts, weights, output from the config."""
    if cfg.predict is None:
        raise ConfigError(f"{args.config}: " + "no 'predict' section (pacs_sr_weights_path, "
                          "experts, out_root)")
    weights, named, out_root = published_predict_section(cfg.predict, str(args.config))
    path = args.model or args.weights or weights
    if path is None:
        raise ConfigError(f"{args.config}: " + "predict.pacs_sr_weights_path is not set; "
                          "pass --model or --weights")
    out = args.out or (out_root / PUBLISHED_OUTPUT if out_root else None)
    if out is None:
        raise ConfigError(f"{args.config}: predict.out_root is not set; pass --out")
    first = next(iter(named.values()))
    window = args.window or cfg.pacs_sr.mixing_window
    model = load_any_model(
        path, model_names=list(cfg.data.models), shape=read_shape(first)[:3],
        patch_size=args.patch_size or cfg.pacs_sr.patch_size,
        stride=args.stride or cfg.pacs_sr.stride, window=window,
    )
    experts = order_experts(named, model.model_names, f"{args.config}: predict.experts")
    _check_single_output(out, experts, args.force)
    res = predict_batch(model, [PredictJob("patient", tuple(experts), out)], window=window,
                        registration=args.registration, pulse=args.pulse,
                        cache_dir=args.cache_dir, workers=args.workers,
                        mem_budget_bytes=_budget(args), force=True, no_progress=True,
                        use_record=False)
    if res.failed:
        raise InputError(res.failed["patient"])
    print(f"prediction -> {out}")
    return 0


def _add_predict(sub, run_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "predict",
        parents=[run_common],
        help="blend new patients' experts with a model (no HR needed)",
        description="Blend expert volumes with a trained model, without an HR: the z-score "
        "statistics and the brain mask come from the experts. One patient (--expert ... "
        "--out), or many (--manifest, --models-root or --csv with --out-dir), or the "
        "published config's predict section (--config).",
        formatter_class=HelpFormatter,
    )
    src = p.add_argument_group("model")
    src.add_argument("--model", type=Path, default=None,
                     help="pacs_model.npz written by train, or a weights.json")
    src.add_argument("--weights", type=Path, default=None,
                     help="a published weights.json (needs --patch-size and --stride)")
    src.add_argument("--patch-size", type=int, default=None,
                     help="patch size a weights.json was trained with")
    src.add_argument("--stride", type=int, default=None,
                     help="stride a weights.json was trained with")
    src.add_argument("--window", choices=["hann", "flat"], default=None,
                     help="mixing window (default: the model's; a different value is an "
                     "error)")
    one = p.add_argument_group("one patient")
    one.add_argument("--expert", action="append", default=[], metavar="NAME=PATH",
                     help="one expert volume by model name; repeat for every expert "
                     "(default: none; one patient needs all of the model's experts)")
    one.add_argument("--experts", type=Path, nargs="+", default=None, metavar="PATH",
                     help="bare expert paths in the model's order (the order is logged; "
                     "prefer --expert)")
    one.add_argument("--out", type=Path, default=None,
                     help="output file ending in .nii or .nii.gz; never one of the inputs")
    many = p.add_argument_group("many patients")
    many.add_argument("--manifest", type=Path, default=None,
                      help="a K-fold manifest; with --fold, --spacing, --pulse, --split")
    many.add_argument("--fold", type=int, default=None, help="default: the model's fold")
    many.add_argument("--spacing", default=None, help="default: the model's spacing")
    many.add_argument("--pulse", default=None, help="default: the model's pulse")
    many.add_argument("--split", choices=["train", "test"], default="test",
                      help="manifest split to predict")
    many.add_argument("--models-root", type=Path, default=None,
                      help="folder in the published layout {root}/{MODEL}/{spacing}/"
                      "output_volumes/{pid}-{pulse}.nii.gz; with --spacing, --pulse")
    many.add_argument("--csv", type=Path, default=None,
                      help="CSV with a pid column and one column per expert name")
    many.add_argument("--out-dir", type=Path, default=None, help="folder for the predictions")
    p.add_argument("--config", type=Path, default=None,
                   help="a config: its published 'predict' section is run when no --model, "
                   "--expert or batch option is given; with pacs_sr.use_registration: true the "
                   "experts are first registered to the atlas of its registration section "
                   "(needs --pulse)")
    p.add_argument("--force", action="store_true",
                   help="overwrite existing outputs (default: refuse)")
    p.set_defaults(run=run_predict)


def add_parsers(sub, run_common: argparse.ArgumentParser,  # noqa: ANN001 - argparse's subparsers
                plain_common: argparse.ArgumentParser) -> None:
    """Add this family's subcommands to ``sub``; each one's ``run`` is set as a default."""
    _add_predict(sub, run_common)
