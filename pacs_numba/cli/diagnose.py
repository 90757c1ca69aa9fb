"""pacs_numba.cli.diagnose."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import PacsError
from ..resources.units import parse_budget
from ..runs.checks import FAIL, run_checks
from .common import HelpFormatter
from .logsetup import resolve_level, setup_logging

DESCRIPTION = """\
Check a node: can a run start here, and how wide will it be.

Run it inside the SLURM allocation you will use (srun pacs-numba diagnose --config C
--warmup).  It reports the limits the job really has (cgroup, SLURM), the pool width
and Numba threads a run would use, and with --warmup it compiles every kernel into the
on-disk cache, so that array tasks start without compiling.  It also says which
pacs_numba it checked, and warns when the pacs-numba command imports another copy
(whose kernels it did not warm).  Exit status 0 when nothing failed, 1 otherwise.
"""


def add_arguments(parser: argparse.ArgumentParser, *, cache_dir: bool = False) -> None:
    """Add diagnose's options to ``parser`` (``pacs-numba diagnose`` and ``-m`` share them)."""
    parser.add_argument(
        "--config", type=Path, default=None,
        help="also load this config, size one patient of it and plan each stage's pool "
        "(default: no config checks)",
    )
    parser.add_argument(
        "--warmup", action="store_true",
        help="compile every kernel into the compile cache and check that a new process "
        "loads them from it",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    if cache_dir:
        parser.add_argument(
            "--cache-dir", type=Path, default=None,
            help="volume cache directory (default: $PACS_NUMBA_CACHE_DIR, else a per-user "
            "folder under the system temp dir)",
        )
    parser.add_argument(
        "--workers", type=int, default=None,
        help="as pacs-numba train --workers (default: from memory and CPUs)",
    )
    parser.add_argument(
        "--mem-budget", default=None,
        help="as pacs-numba train --mem-budget, e.g. 64G (default: the job's limit)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the checks of parsed ``args`` and print them; 0 when a run can start, else 1.

    With ``--json`` stdout is one JSON document: ``"ok"`` (bool), ``"checks"`` (a list of
    ``{"level", "check", "message"}``) and, with ``--config`` when the stages could be
    planned, ``"plan"``::

        {"shape": [n0, n1, n2], "n_experts": M,
         "stages": {"fit": {...}, "evaluate": {...}}}

    Each stage (``fit`` when the task fits a model, ``evaluate`` when it has patients to
    evaluate) holds integers: ``n_patients`` (fit: the fold's train patients; evaluate:
    its test patients plus, with ``evaluate_train``, its train patients),
    ``per_patient_bytes``, ``width`` and ``threads`` (the pool a run would use),
    ``needed_bytes`` (the smallest job memory limit with which the stage runs at that
    width) and ``needed_bytes_one`` (the same for one worker), ``fixed_bytes`` (what the
    planner counts besides the patients at ``needed_bytes``: ``needed_bytes - width *
    per_patient_bytes``), and its terms ``baseline_bytes``, ``per_task_bytes``,
    ``thread_bytes``, ``setup_bytes``, ``margin_bytes``, plus ``limit_bytes``, the
    limit planned with, and ``by_width``: for each width from 1 to ``n_patients``, the
    ``needed_bytes`` at that width, the ``sbatch_mem`` to ask for and its
    ``headroom_bytes`` over that need (``scripts/slurm_array.sh --list`` reads these).
    The planner's condition for a limit ``L`` and ``w`` workers is ``L - max(256 MiB,
    L / 10) >= baseline + per_task + max(setup, thread + w * per_patient)``;
    ``needed_bytes`` is the smallest ``L`` that meets it.
    """
    budget = parse_budget(getattr(args, "mem_budget", None))
    plan_doc: dict[str, Any] = {}
    checks = run_checks(
        args.config, warmup=args.warmup, cache_dir=args.cache_dir, workers=args.workers,
        mem_budget_bytes=budget, plan_out=plan_doc,
    )
    failed = any(level == FAIL for level, _, _ in checks)
    if args.json:
        print(
            json.dumps(
                {
                    "ok": not failed,
                    "checks": [
                        {"level": lv, "check": name, "message": msg} for lv, name, msg in checks
                    ],
                    **plan_doc,
                },
                indent=2,
            )
        )
    else:
        for level, name, msg in checks:
            print(f"[{level.upper():4}] {name}: {msg}")
        print("a run can start" if not failed else "a run cannot start: see [FAIL] lines")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pacs_numba.diagnose``: the same as ``pacs-numba diagnose``."""
    parser = argparse.ArgumentParser(
        prog="python -m pacs_numba.diagnose",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser, cache_dir=True)
    args = parser.parse_args(argv)
    setup_logging(resolve_level(default="WARNING"))
    try:
        rc = run(args)
    except PacsError as exc:  # a bad option value: one line and exit 2, as pacs-numba does
        logging.getLogger("pacs_numba.diagnose").error("%s", exc)
        rc = 2
    logging.shutdown()
    return rc


def _add_diagnose(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001

    p = sub.add_parser(
        "diagnose",
        parents=[plain_common],
        help="check a node, plan the pool, fill the compile cache",
        description=DESCRIPTION,
        formatter_class=HelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(run=run)


def add_parsers(sub, run_common: argparse.ArgumentParser,  # noqa: ANN001 - argparse's subparsers
                plain_common: argparse.ArgumentParser) -> None:
    """Add this family's subcommands to ``sub``; each one's ``run`` is set as a default."""
    _add_diagnose(sub, plain_common)
