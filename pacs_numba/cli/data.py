"""``pacs-numba build-manifest``, ``make-cohort`` and ``demo``: the data a run starts from."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from ..config import dump_config, load_config
from ..errors import ConfigError
from ..runs.demo import run_demo
from ..runs.warmup import load_kernels
from ..store.cohort import EXPERT_SETS, make_cohort
from ..store.convert import blends_to_nifti, h5_config, make_h5_cohort, nifti_to_h5
from ..store.manifest import build_manifest, write_manifest
from .common import EXIT_OK, HelpFormatter, StopOnSignals, common_options

log = logging.getLogger(__name__)


def _add_build_manifest(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "build-manifest",
        parents=[plain_common],
        help="scan the data layout and write the K-fold manifest",
        description="Scan data.hr-root and data.models-root for the patients that have an HR "
        "and every expert for every spacing and pulse, split them into data.kfolds folds "
        "(shuffled with data.seed, like the published tool) and write the manifest to "
        "data.out.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", type=Path, required=True, help="the PaCS-SR YAML config")
    p.set_defaults(run=_build_manifest)


def _add_make_cohort(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "make-cohort",
        parents=[plain_common],
        help="generate a synthetic cohort in the published layout",
        description="Generate phantom patients (HR, LR and one upsampled volume per expert) "
        "in the published folder layout, with a config.yaml that runs on them.  Refuses a "
        "folder that is not empty unless --force is given.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", type=Path, required=True, help="folder to create")
    p.add_argument("--patients", type=int, default=6, help="number of patients")
    p.add_argument(
        "--shape", type=int, nargs=3, default=(96, 112, 96), metavar=("X", "Y", "Z"),
        help="HR volume shape in voxels",
    )
    p.add_argument("--spacings", nargs="+", default=["3mm"], help="LR slice spacings")
    p.add_argument("--pulses", nargs="+", default=["t1c"], help="pulse names")
    p.add_argument("--kfolds", type=int, default=3, help="folds written into the config")
    p.add_argument("--patch-size", type=int, default=16, help="pacs_sr.patch_size of the config")
    p.add_argument("--stride", type=int, default=8, help="pacs_sr.stride of the config")
    p.add_argument("--seed", type=int, default=0, help="random seed of the phantoms")
    p.add_argument("--models", nargs="+", default=None,
                   help="expert names (default: BSPLINE LINEAR NEAREST SHARPEN)")
    p.add_argument(
        "--experts", choices=EXPERT_SETS, default="methods",
        help="methods: each expert up-samples with its named method; complementary: one "
        "sharp and noisy, one smooth, one right on edges only, in turn",
    )
    p.add_argument("--format", choices=["nifti", "hdf5"], default="nifti",
                   help="nifti: the 2025 release's folders; hdf5: the current release's "
                   "source_data.h5 and experts/*.h5 (the NIfTI form is kept in OUT/nifti)")
    p.add_argument(
        "--atlas",
        action="store_true",
        help="also write an atlas (OUT/atlas: the mean of the generated HRs per template and "
        "its brain mask, in the registration section's file names), so that "
        "pacs_sr.use_registration: true runs on the cohort (needs antspyx) (default: no atlas)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a folder that is not empty, replacing its cohort and config.yaml",
    )
    p.set_defaults(run=_make_cohort)


def _add_demo(sub) -> None:  # noqa: ANN001
    # its own copy of the common options: the demo keeps its cache in its own folder
    common = common_options(run=True, cache_help="volume cache directory (default: OUT/cache)")
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="generate a small cohort, train fold 1 and print a table",
        description="Train fold 1 of a generated 4-expert cohort and print each expert's test "
        "PSNR/SSIM next to the PaCS-SR blend's.  The cohort and the volume cache are kept "
        "in --out, so a second run reuses them and takes a few seconds.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("pacs_numba_demo"),
        help="folder for the cohort, the cache and the results",
    )
    p.add_argument("--patients", type=int, default=8, help="number of patients")
    p.add_argument(
        "--shape", type=int, nargs=3, default=(96, 112, 96), metavar=("X", "Y", "Z"),
        help="HR volume shape in voxels",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the phantoms")
    p.add_argument("--format", choices=["nifti", "hdf5"], default="nifti",
                   help="run on the cohort's NIfTI form or its HDF5 form")
    p.add_argument(
        "--atlas",
        action="store_true",
        help="write an atlas with the cohort (the mean of its HRs and its brain mask) and "
        "train with registration to it (use_registration: true; needs antspyx) (default: "
        "no registration)",
    )
    p.set_defaults(run=_demo)


def _add_convert(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "convert",
        parents=[plain_common],
        help="NIfTI cohort -> the current release's HDF5 files, or HDF5 blends -> NIfTI",
        description="With --config (a NIfTI-form config): write every complete patient's HR, "
        "LR and expert outputs to OUT/source_data.h5 and OUT/experts/{model}.h5, and the same "
        "config in the HDF5 form to OUT/config.yaml (keys already converted are skipped, so "
        "a rerun resumes).  With --blends RESULTS_H5: write each blend of a fold's results "
        "file to OUT/{spacing}/{pid}-{pulse}.nii.gz for viewers.",
        formatter_class=HelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="a NIfTI-form config to convert")
    src.add_argument("--blends", type=Path, help="a results_fold_{N}.h5 to export")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--force", action="store_true",
                   help="with --blends: overwrite NIfTI files that exist (default: refuse)")
    p.set_defaults(run=_convert)


def _convert(args: argparse.Namespace) -> int:
    if args.blends is not None:
        written = blends_to_nifti(args.blends, args.out, force=args.force)
        print(f"{len(written)} blends -> {args.out}")
        return EXIT_OK
    config = load_config(args.config)
    source_h5, experts_dir = nifti_to_h5(config, args.out)
    cfg = h5_config(config, source_h5, experts_dir, Path(args.out).resolve() / "manifest.json")
    cfg = dataclasses.replace(cfg, path=Path(args.out) / "config.yaml")
    dump_config(cfg, cfg.path)
    print(f"HDF5 cohort: {source_h5}, {experts_dir}; config: {cfg.path}")
    return EXIT_OK


def _build_manifest(args: argparse.Namespace) -> int:

    config = load_config(args.config)
    manifest = build_manifest(config.data)
    write_manifest(manifest, config.data.out)
    n = len(manifest["folds"][0]["train"]) + len(manifest["folds"][0]["test"])
    print(f"manifest with {n} patients in {len(manifest['folds'])} folds -> {config.data.out}")
    return EXIT_OK


def _make_cohort(args: argparse.Namespace) -> int:

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a folder to create")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise ConfigError(
            f"--out {out}: folder is not empty ({len(names)} entries: {shown}); pass --force "
            "to generate the cohort there anyway (config.yaml is rewritten), or choose an "
            "empty or new folder"
        )
    make = make_h5_cohort if args.format == "hdf5" else make_cohort
    cfg = make(
        args.out,
        patients=args.patients,
        shape=tuple(args.shape),
        spacings=tuple(args.spacings),
        pulses=tuple(args.pulses),
        seed=args.seed,
        kfolds=args.kfolds,
        patch_size=args.patch_size,
        stride=args.stride,
        experts=args.experts,
        **({"models": tuple(args.models)} if args.models else {}),
        atlas=args.atlas,
    )
    print(f"cohort written; config: {cfg}")
    if args.atlas:
        print(f"atlas: {Path(args.out).resolve() / 'atlas'}; set pacs_sr.use_registration: "
              "true in the config to register every patient to it")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:

    load_kernels("demo")
    with _DemoStop() as stop:
        text = run_demo(
            args.out,
            patients=args.patients,
            shape=tuple(args.shape),
            seed=args.seed,
            data_format=args.format,
            cache_dir=args.cache_dir,
            workers=args.workers,
            no_progress=args.no_progress,
            on_engine=stop.attach,
            atlas=args.atlas,
        )
    print(text)
    return EXIT_OK


class _DemoStop:
    def __init__(self) -> None:
        self._ctx: StopOnSignals | None = None

    def attach(self, engine) -> None:  # noqa: ANN001
        self._ctx = StopOnSignals(engine)
        self._ctx.__enter__()

    def __enter__(self) -> _DemoStop:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def add_parsers(sub, run_common: argparse.ArgumentParser,  # noqa: ANN001 - argparse's subparsers
                plain_common: argparse.ArgumentParser) -> None:
    """Add this family's subcommands to ``sub``; each one's ``run`` is set as a default."""
    _add_build_manifest(sub, plain_common)
    _add_make_cohort(sub, plain_common)
    _add_convert(sub, plain_common)
    _add_demo(sub)
