"""``pacs-numba tune``: the cross-validated sweep of the fit settings."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import load_config
from ..errors import ConfigError
from ..runs.nested import default_grid, run_nested
from ..runs.tune import load_grid, run_tune
from ..store.layout import ExperimentLayout
from .common import EXIT_OK, HelpFormatter

log = logging.getLogger(__name__)


def _add_tune(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "tune",
        parents=[plain_common],
        help="K-fold cross-validated sweep of the fit settings",
        description="Fit every combination of a grid of pacs_sr settings on each fold's "
        "training patients and score it on the held-out patients without their HR "
        "(normalisation and brain mask from the experts), against each single expert. "
        "Writes a ranked table (CSV and markdown) and the best config; reruns resume.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", type=Path, required=True, help="the PaCS-SR YAML config")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="log progress lines instead of drawing a progress bar (default: a bar on a "
        "terminal)",
    )
    p.add_argument(
        "--grid",
        type=Path,
        default=None,
        help="YAML mapping of pacs_sr keys to lists of values: patch_size, stride, "
        "lambda_ridge, lambda_edge, lambda_grad, laplacian_tau, fit_region, mixing_window, "
        "prior, prior_strength, gating (required without --nested)",
    )
    p.add_argument(
        "--nested",
        action="store_true",
        help="nested cross-validation: choose the setting and the best expert on inner folds "
        "of each outer fold's training patients, score the choice on its held-out patients; "
        "writes nested.json and nested.md (without --grid: a default grid of the config's "
        "setting and the weight models)",
    )
    p.add_argument(
        "--folds", type=int, nargs="+", default=None, help="1-based folds (default: all)"
    )
    p.add_argument("--spacing", nargs="+", default=None,
                   help="spacings (default: all of data.spacings)")
    p.add_argument("--pulse", nargs="+", default=None, help="pulses (default: all of data.pulses)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: {out_root}/{experiment_name}/tune)",
    )
    p.set_defaults(run=_tune)


def _tune(args: argparse.Namespace) -> int:

    config = load_config(args.config)
    if args.grid is None and not args.nested:
        raise ConfigError("tune needs --grid FILE (or --nested, which has a default grid)")
    candidates = load_grid(args.grid, config) if args.grid is not None else default_grid(config)
    out = args.out or ExperimentLayout(
        Path(config.pacs_sr.out_root), config.pacs_sr.experiment_name
    ).tune_dir
    if args.nested:
        nres = run_nested(
            config, candidates, out, folds=args.folds, spacings=args.spacing,
            pulses=args.pulse, cache_dir=args.cache_dir, no_progress=args.no_progress,
        )
        s = nres.summary
        print(
            f"{s['n_candidates']} settings, {len(s['outer_folds'])} outer folds; nested held-out "
            f"gain {s['gain_psnr']:+.4f} dB PSNR over the best expert (per fold "
            + " ".join(f"{g:+.3f}" for g in s["gain_psnr_per_fold"])
            + f") -> {nres.out_dir / 'nested.json'}",
            flush=True,
        )
        return EXIT_OK
    res = run_tune(
        config, candidates, out, folds=args.folds, spacings=args.spacing, pulses=args.pulse,
        cache_dir=args.cache_dir, no_progress=args.no_progress,
    )
    b = res.table[0]
    print(
        f"{len(res.table)} settings; best: held-out PSNR {b['psnr']:.4f} dB "
        f"({b['gain_psnr']:+.4f} dB vs {res.experts['_best']['name']}) -> "
        f"{res.out_dir / 'best_config.yaml'}",
        flush=True,
    )
    return EXIT_OK


def add_parsers(sub, run_common: argparse.ArgumentParser,  # noqa: ANN001 - argparse's subparsers
                plain_common: argparse.ArgumentParser) -> None:
    """Add this family's subcommands to ``sub``; each one's ``run`` is set as a default."""
    _add_tune(sub, plain_common)
