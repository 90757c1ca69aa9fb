"""``pacs-numba metrics``: the paper's MS-SSIM / MMD-MF table of a finished run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import load_config
from ..errors import ConfigError
from ..resources.units import parse_size
from ..runs.paper_metrics import COLUMNS, paper_metrics_table
from ..runs.tasks import Task
from ..runs.warmup import load_kernels
from .common import EXIT_OK, HelpFormatter

log = logging.getLogger(__name__)


def _add_metrics(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "metrics",
        parents=[plain_common],
        help="the paper's 3-D MS-SSIM and MMD-MF table of a finished run",
        description="Score every test patient of every fold, spacing and pulse with the two "
        "volume metrics of the PaCS-SR paper (3-D MS-SSIM, MMD-MF) for each expert and the "
        f"blend (PACS_SR), and write the table ({', '.join(COLUMNS)}).  Works on NIfTI and "
        "HDF5 runs.  Rows already in the CSV are kept, so an interrupted run resumes.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--config", type=Path, required=True, help="the run's YAML config")
    p.add_argument("--out", type=Path, default=None,
                   help="the CSV (default: {out_root}/{experiment}/paper_metrics.csv)")
    p.add_argument("--out-root", type=Path, default=None,
                   help="where the run wrote its outputs (default: pacs_sr.out_root)")
    p.add_argument("--fold", type=int, default=None, help="only this fold (1-based)")
    p.add_argument("--mem-budget", default=None, help="memory upper bound, e.g. 8G")
    p.set_defaults(run=_metrics)


def _metrics(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    budget = None
    if args.mem_budget:
        try:
            budget = parse_size(args.mem_budget)
        except ValueError as exc:
            raise ConfigError(f"--mem-budget: {exc}") from None
    tasks = None
    if args.fold is not None:
        if args.fold < 1:
            raise ConfigError(f"--fold must be >= 1, got {args.fold}")
        d = config.data
        tasks = [Task(args.fold, s, p) for s in d.spacings for p in d.pulses]
    load_kernels()
    path, added = paper_metrics_table(config, out=args.out, out_root=args.out_root,
                                      cache_dir=args.cache_dir, tasks=tasks,
                                      mem_budget_bytes=budget)
    print(f"{added} rows added -> {path}")
    return EXIT_OK


def add_parsers(sub, run_common: argparse.ArgumentParser,  # noqa: ANN001 - argparse's subparsers
                plain_common: argparse.ArgumentParser) -> None:
    """Add this family's subcommands to ``sub``; each one's ``run`` is set as a default."""
    _add_metrics(sub, plain_common)
