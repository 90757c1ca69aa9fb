"""``pacs-numba build-manifest``, ``make-cohort`` and ``demo``: the data a run starts from."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import load_config
from ..errors import ConfigError
from ..runs.demo import run_demo
from ..runs.warmup import load_kernels
from ..store.cohort import make_cohort
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
    p.set_defaults(run=_demo)


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
    cfg = make_cohort(
        args.out,
        patients=args.patients,
        shape=tuple(args.shape),
        spacings=tuple(args.spacings),
        pulses=tuple(args.pulses),
        seed=args.seed,
        kfolds=args.kfolds,
        patch_size=args.patch_size,
        stride=args.stride,
    )
    print(f"cohort written; config: {cfg}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:

    load_kernels("demo")
    with _DemoStop() as stop:
        text = run_demo(
            args.out,
            patients=args.patients,
            shape=tuple(args.shape),
            seed=args.seed,
            cache_dir=args.cache_dir,
            workers=args.workers,
            no_progress=args.no_progress,
            on_engine=stop.attach,
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
    _add_demo(sub)
