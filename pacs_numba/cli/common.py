"""What every command shares.

Exit codes, the parser classes, the common options, the engine built from the command line,
the start-up log line and the signal handling of a run.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import platform
import re
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import numba

from .. import _config
from .._version import __version__
from ..errors import ConfigError
from ..resources.units import parse_budget
from ..runs.engine import Engine, RunOptions
from ..store.layout import ExperimentLayout
from ..store.volumes import VOLUME_CACHE_ENV, VOLUME_CACHES
from .logsetup import add_file_log

log = logging.getLogger(__name__)


EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_BUDGET = 0, 1, 2, 3


EXIT_SIGINT, EXIT_SIGTERM = 130, 143


EXIT_SIGPIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left


class HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description and adds ``(default: X)`` where help has none."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:

        paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
        return "\n\n".join(
            textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent)
            for p in paragraphs
        )

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" not in text
            and action.default is not None
            and action.default is not False
            and action.default is not argparse.SUPPRESS
            and action.default not in ([], (), "")  # an empty default says nothing
            and action.option_strings
            and action.nargs != 0
        ):
            shown = action.default
            if isinstance(shown, list | tuple):
                shown = " ".join(str(v) for v in shown)
            text += f" (default: {shown})"
        return text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose unknown options are reported by the subcommand they follow.

    argparse hands options it does not know back to the top-level parser, which prints
    the top-level usage.  ``parse_args`` here finds the subcommand's parser instead and
    suggests the closest of its options.
    """

    subparsers: dict[str, argparse.ArgumentParser]

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's API
        """Parse ``args``; an unknown option is reported by its subcommand's parser."""
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            target = getattr(self, "subparsers", {}).get(getattr(ns, "command", None), self)
            target.error(_unknown_message(target, extras))
        return ns


    def error(self, message: str) -> NoReturn:
        """Report a usage error; a mistyped subcommand also gets the closest one."""
        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]}?"
        super().error(message)


def _unknown_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """'unrecognized arguments: --x' with a 'did you mean' for the closest known option."""
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for arg in extras:
        if arg.startswith("-"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]}?")
    msg = f"unrecognized arguments: {' '.join(extras)}"
    return msg + ("; " + " ".join(hints) if hints else "")


CACHE_HELP = (
    "volume cache directory (default: $PACS_NUMBA_CACHE_DIR, else a per-user folder under the "
    "system temp dir)"
)


def common_options(*, run: bool, cache_help: str = CACHE_HELP) -> argparse.ArgumentParser:
    """Options of every command (logging, caches), and resources for those that run patients."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("logging")
    g.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: DEBUG)"
    )
    g.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    g.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    c = p.add_argument_group("caches")
    c.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=cache_help,
    )
    c.add_argument(
        "--volume-cache",
        choices=VOLUME_CACHES,
        default=None,
        help="where decoded input volumes live.  disk: each decoded once into the cache "
        "folder (3.5x the .nii.gz size) and memory-mapped from there; memory: decoded into "
        "this process's memory when a patient needs it, none written, for a cohort whose "
        "volumes do not fit on the node's disk (the statistics cache stays on disk) "
        f"(default: ${VOLUME_CACHE_ENV}, else disk)",
    )
    if run:
        r = p.add_argument_group("resources")
        r.add_argument(
            "--workers",
            type=int,
            default=None,
            help="at most this many patients at once (default: the config's "
            "pacs_sr.num_workers where there is a config, else as many as fit; either way "
            "capped by the memory budget and the CPUs, and the log says what bound it)",
        )
        r.add_argument(
            "--mem-budget",
            default=None,
            metavar="SIZE",
            help="use at most this much memory, e.g. 64G (default: the job's limit)",
        )
        r.add_argument(
            "--no-progress",
            action="store_true",
            help="log progress lines instead of drawing a progress bar (default: a bar on a "
            "terminal)",
        )
    return p


#: The option groups every command shares (:func:`common_options`), listed last in ``--help``.
COMMON_GROUPS = ("logging", "caches", "resources")


def common_groups_last(p: argparse.ArgumentParser) -> None:
    """Put a command's own options (its input and output first) before the shared groups.

    argparse lists groups in the order they were made, and the shared groups come from the
    parent parser, so they would be listed before the command's own.
    """
    groups = p._action_groups  # noqa: SLF001 - argparse keeps no public handle on the order
    own = [g for g in groups if g.title not in COMMON_GROUPS]
    p._action_groups = own + [g for g in groups if g.title in COMMON_GROUPS]  # noqa: SLF001


def task_args(p: argparse.ArgumentParser, required: bool) -> None:
    """Add the config and task selection (fold, spacing, pulse; ``required`` for evaluate)."""
    p.add_argument("--config", type=Path, required=True, help="the PaCS-SR YAML config")
    if required:
        p.add_argument("--fold", type=int, required=True, help="fold number, 1-based")
        p.add_argument("--spacing", required=True, help="spacing, one of data.spacings, e.g. 3mm")
        p.add_argument("--pulse", required=True, help="pulse, one of data.pulses, e.g. t1c")
    else:
        p.add_argument(
            "--fold", type=int, default=None, help="fold number, 1-based (default: every fold)"
        )
        p.add_argument(
            "--spacing", default=None, help="spacing, e.g. 3mm (default: all of data.spacings)"
        )
        p.add_argument(
            "--pulse", default=None, help="pulse, e.g. t1c (default: all of data.pulses)"
        )
    p.add_argument(
        "--out-root",
        type=Path,
        default=None,
        help="write outputs here (default: pacs_sr.out_root of the config)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="overwrite existing outputs (default: refuse to overwrite them)",
    )
    p.add_argument(
        "--wait",
        action="store_true",
        help="when another process runs the same task, wait for it to finish (default: exit "
        "with status 2 naming the process that holds the task)",
    )


def startup_log(engine) -> None:  # noqa: ANN001 - an Engine
    """Log the start-up line: version, host, SLURM job, limits, Numba and the caches."""
    env = os.environ
    slurm = (
        " ".join(
            f"{k}={env[k]}"
            for k in (
                "SLURM_JOB_ID",
                "SLURM_ARRAY_TASK_ID",
                "SLURM_CPUS_PER_TASK",
                "SLURM_MEM_PER_NODE",
                "SLURM_MEM_PER_CPU",
            )
            if k in env
        )
        or "no SLURM job"
    )
    log.info(
        "pacs-numba %s on %s (%s); %s; numba %s, threading layer %s, %d numba threads; "
        "volume cache %s (%s); compile cache %s",
        __version__,
        platform.node(),
        slurm,
        engine.limits.describe(),
        numba.__version__,
        engine.layer,
        numba.config.NUMBA_NUM_THREADS,
        engine.store.directory,
        engine.store.mode,
        _config.KERNEL_CACHE_DIR or "off",
    )


@contextmanager
def cache_options(args: argparse.Namespace) -> Iterator[None]:
    """Export ``--volume-cache`` as ``PACS_NUMBA_VOLUME_CACHE`` while the command runs.

    Every volume store the command makes (the engine's, tune's, predict's, report's) and
    every process it spawns (registration workers) then uses the chosen mode; the
    variable's previous value is restored afterwards (``main`` may run in a caller's
    process).
    """
    mode = getattr(args, "volume_cache", None)
    if mode is None:
        yield
        return
    old = os.environ.get(VOLUME_CACHE_ENV)
    os.environ[VOLUME_CACHE_ENV] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(VOLUME_CACHE_ENV, None)
        else:
            os.environ[VOLUME_CACHE_ENV] = old


def make_engine(args: argparse.Namespace, config):  # noqa: ANN001, ANN202
    """Build the :class:`~pacs_numba.runs.engine.Engine` of ``config`` with the CLI's options."""
    budget = parse_budget(getattr(args, "mem_budget", None))
    if getattr(args, "workers", None) is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    opts = RunOptions(
        cache_dir=args.cache_dir,
        volume_cache=getattr(args, "volume_cache", None),
        workers=getattr(args, "workers", None),
        mem_budget_bytes=budget,
        force=getattr(args, "force", False),
        resume=getattr(args, "resume", False),
        no_progress=getattr(args, "no_progress", False),
        out_root=getattr(args, "out_root", None),
        wait=getattr(args, "wait", False),
    )
    return Engine(config, opts)


def file_log(config, args: argparse.Namespace) -> None:  # noqa: ANN001
    """Apply ``pacs_sr.log_level``; also log to a file when ``pacs_sr.log_to_file`` is on.

    The config's level applies unless ``-v``/``-q`` or ``PACS_LOG_LEVEL`` chose one.
    """
    chosen = getattr(args, "verbose", 0) or getattr(args, "quiet", 0)
    if not chosen and not os.environ.get("PACS_LOG_LEVEL", "").strip():
        logging.getLogger().setLevel(config.pacs_sr.log_level)
    if not config.pacs_sr.log_to_file:
        return

    root = Path(getattr(args, "out_root", None) or config.pacs_sr.out_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = ExperimentLayout(root, config.pacs_sr.experiment_name).log_file(
        args.command, stamp, platform.node(), os.getpid()
    )
    if add_file_log(path, logging.getLogger().level) is not None:
        log.info("logging to %s", path)


class StopOnSignals:
    """SIGTERM/SIGINT ask the engine to stop; a second SIGINT interrupts at once."""

    def __init__(self, engine, what: str = "patients") -> None:  # noqa: ANN001
        self.engine = engine
        self.what = what
        self._old: dict[int, object] = {}

    def _handler(self, signum: int, frame: object) -> None:
        if self.engine.stop_event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning(
            "received %s: finishing %s in flight, starting no new one",
            signal.Signals(signum).name, self.what,
        )
        self.engine.request_stop(signum)

    def __enter__(self) -> StopOnSignals:
        if threading_main():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]


def threading_main() -> bool:
    """Whether this is the main thread (only it may install signal handlers)."""
    return threading.current_thread() is threading.main_thread()
