"""The ``pacs-numba`` command line: one parser, one dispatch site.

Each command family lives in its own module with ``add_parsers`` (its subcommands, each with
``set_defaults(run=...)``) and its ``run`` functions (``args -> exit code``).

Exit codes: 0 success; 2 usage, config or input error; 3 memory budget; 1 unexpected
error (a bug: logged with its traceback); 130 SIGINT; 143 SIGTERM (SLURM's time limit);
141 the reader of stdout left early.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from .._version import __version__
from ..errors import BudgetError, Interrupted, PacsError
from ..resources.process import pin_mmap_threshold
from . import cache, data, diagnose, metrics, predict, results, train, tune
from .common import (
    EXIT_BUDGET,
    EXIT_BUG,
    EXIT_SIGINT,
    EXIT_SIGPIPE,
    EXIT_SIGTERM,
    EXIT_USAGE,
    Parser,
    cache_options,
    common_groups_last,
    common_options,
)
from .logsetup import resolve_level, setup_logging

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``pacs-numba``."""
    parser = Parser(
        prog="pacs-numba",
        description="PaCS-SR patchwise convex stacking of super-resolution experts, "
        "on a shared-memory Numba engine.",
    )
    parser.add_argument("--version", action="version", version=f"pacs-numba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run_common, plain_common = common_options(run=True), common_options(run=False)
    for family in (train, data, predict, results, metrics, tune, cache, diagnose):
        family.add_parsers(sub, run_common, plain_common)
    for command in sub.choices.values():
        common_groups_last(command)
    parser.subparsers = dict(sub.choices)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    # Volume-sized temporaries get their own mmap and go back to the OS when freed, instead
    # of staying resident in glibc's per-thread arenas (measured: 20-40 MiB per worker).
    pin_mmap_threshold()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return int(exc.code or 0)
    # diagnose prints its checks on stdout; its INFO chatter would only interleave with them
    default_level = "WARNING" if args.command == "diagnose" else "INFO"
    setup_logging(resolve_level(args.verbose, args.quiet, default=default_level))
    try:
        with cache_options(args):
            return args.run(args)
    except Interrupted as exc:
        return EXIT_SIGINT if exc.signum == signal.SIGINT else EXIT_SIGTERM
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_SIGINT
    except BrokenPipeError:
        # stdout's reader left (``pacs-numba inspect M | head``): not an error of ours.  Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_SIGPIPE
    except BudgetError as exc:
        log.error("%s", exc, exc_info=args.debug)
        return EXIT_BUDGET
    except PacsError as exc:
        log.error("%s", exc, exc_info=args.debug)
        return EXIT_USAGE
    except Exception:
        log.exception("unexpected error (a bug in pacs-numba; please report it with this log)")
        return EXIT_BUG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
