"""``pacs-numba inspect``, ``summarize`` and ``report``: reading what runs wrote."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..core.model import describe_model
from ..runs.report import make_report
from ..runs.summarize import summarize
from ..store.modelfile import load_model
from .common import EXIT_OK, HelpFormatter

log = logging.getLogger(__name__)


def _add_inspect(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "inspect",
        parents=[plain_common],
        help="describe a model file (experts, grid, window, training patients, checksum)",
        description="Print what a pacs_model.npz holds and check its checksum.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("model", type=Path, help="pacs_model.npz written by train")
    p.set_defaults(run=_inspect)


def _add_summarize(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "summarize",
        parents=[plain_common],
        help="tables (CSV, markdown) and figures of every trained task under an out_root",
        description="Per spacing and pulse and per protocol (published: HR statistics and HR "
        "brain mask; HR-free: statistics and mask from the experts): each expert alone and "
        "PaCS-SR over the distinct test patients of all folds, the gain over that protocol's "
        "best expert with a Wilcoxon signed-rank test, dominance shares; and figures of the "
        "per-patient gains, per-expert distributions and dominance across folds "
        "(summary_figures/, needs matplotlib).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("out_root", type=Path, help="the run's out_root (pacs_sr.out_root)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for summary.csv, summary.md and summary_figures/ "
                   "(default: OUT_ROOT)")
    p.add_argument("--no-figures", action="store_true",
                   help="write the tables only (default: draw the figures too)")
    p.set_defaults(run=_summarize)


def _add_report(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "report",
        parents=[plain_common],
        help="PNG figures and a one-page HTML summary of one trained task",
        description="Figures of one trained (fold, spacing, pulse): mid slices of HR, experts, "
        "blend and error; dominant-expert and entropy maps; weights by region; metrics. "
        "Needs matplotlib (pip install 'pacs-numba[report]').",
        formatter_class=HelpFormatter,
    )
    p.add_argument("run_dir", type=Path,
                   help="the task's model_data/fold_N/{pulse} folder")
    p.add_argument("--config", type=Path, default=None,
                   help="the run's config (default: found from the folder, else needed to "
                   "locate the test volumes)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the report (default: RUN_DIR/report)")
    p.add_argument("--patients", nargs="+", default=None,
                   help="test patients to show (default: all)")
    p.set_defaults(run=_report)


def _inspect(args: argparse.Namespace) -> int:

    print(describe_model(load_model(args.model), args.model))
    return EXIT_OK


def _summarize(args: argparse.Namespace) -> int:

    _, md, paths = summarize(args.out_root, args.out, figures_wanted=not args.no_figures)
    print(md)
    print(f"summary -> {paths[0]}, {paths[1]}")
    if len(paths) > 2:
        print(f"figures -> {paths[2].parent} ({len(paths) - 2} PNG files)")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:

    html = make_report(args.run_dir, config_path=args.config, out_dir=args.out,
                       patients=args.patients, cache_dir=args.cache_dir)
    print(f"report -> {html}")
    return EXIT_OK


def add_parsers(sub, run_common: argparse.ArgumentParser,  # noqa: ANN001 - argparse's subparsers
                plain_common: argparse.ArgumentParser) -> None:
    """Add this family's subcommands to ``sub``; each one's ``run`` is set as a default."""
    _add_inspect(sub, plain_common)
    _add_summarize(sub, plain_common)
    _add_report(sub, plain_common)
