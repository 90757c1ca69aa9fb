"""The ``pacs-numba`` command line.

Exit codes: 0 success; 2 usage, config or input error; 3 memory budget; 1 unexpected
error (a bug: logged with its traceback); 130 SIGINT; 143 SIGTERM (SLURM's time limit);
141 the reader of stdout left early.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from . import __version__
from .errors import BudgetError, ConfigError, Interrupted, PacsError

log = logging.getLogger("pacs_numba.cli")

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_BUDGET = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
EXIT_SIGPIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader left


# --------------------------------------------------------------------------------------
# Parser: one function per subcommand, so that new subcommands merge as new functions
# --------------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description and adds ``(default: X)`` where help has none."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

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
            and action.option_strings
            and action.nargs != 0
        ):
            shown = action.default
            if isinstance(shown, list | tuple):
                shown = " ".join(str(v) for v in shown)
            text += f" (default: {shown})"
        return text


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose unknown options are reported by the subcommand they follow.

    argparse hands options it does not know back to the top-level parser, which prints
    the top-level usage.  ``parse_args`` here finds the subcommand's parser instead and
    suggests the closest of its options.
    """

    subparsers: dict[str, argparse.ArgumentParser]

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's API
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            target = getattr(self, "subparsers", {}).get(getattr(ns, "command", None), self)
            target.error(_unknown_message(target, extras))
        return ns


    def error(self, message: str) -> NoReturn:
        """Report a usage error; a mistyped subcommand also gets the closest one."""
        import difflib
        import re

        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            choices = re.findall(r"'([^']*)'", m.group(2))
            close = difflib.get_close_matches(m.group(1), choices, n=1, cutoff=0.6)
            if close:
                message += f"; did you mean {close[0]}?"
        super().error(message)


def _unknown_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """'unrecognized arguments: --x' with a 'did you mean' for the closest known option."""
    import difflib

    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for arg in extras:
        if arg.startswith("-"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], known, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]}?")
    msg = f"unrecognized arguments: {' '.join(extras)}"
    return msg + ("; " + " ".join(hints) if hints else "")


_CACHE_HELP = (
    "volume cache directory (default: $PACS_NUMBA_CACHE_DIR, else a per-user folder under the "
    "system temp dir)"
)


def _common(*, run: bool, cache_help: str = _CACHE_HELP) -> argparse.ArgumentParser:
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
    if run:
        r = p.add_argument_group("resources")
        r.add_argument(
            "--workers",
            type=int,
            default=None,
            help="at most this many patients at once (default: from memory and CPUs)",
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


def _task_args(p: argparse.ArgumentParser, required: bool) -> None:
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


def _add_train(sub, run_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "train",
        parents=[run_common],
        help="fit tile weights and evaluate",
        description="Fit the tile weights on each fold's training patients and evaluate "
        "them, like pacs-sr-train.  Without --fold/--spacing/--pulse every task of the "
        "config runs; a task that fails does not stop the others, and a table at the end "
        "gives each task's state.",
        formatter_class=_HelpFormatter,
    )
    _task_args(p, required=False)
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep outputs that are complete and were made from the same inputs "
        "and settings; compute the rest",
    )
    p.add_argument(
        "--no-expert-table",
        action="store_true",
        help="do not print the closing table of each expert alone vs PaCS-SR (default: print "
        "it; it reads metrics.json's test_experts, so it costs nothing)",
    )


def _add_evaluate(sub, run_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "evaluate",
        parents=[run_common],
        help="evaluate given tile weights",
        description="Blend and score one task's patients with given weights: ours or a "
        "weights.json of the published tool.  --fold, --spacing and --pulse are required.",
        formatter_class=_HelpFormatter,
    )
    _task_args(p, required=True)
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights.json or pacs_model.npz (default: the task's own model)",
    )


def _add_build_manifest(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "build-manifest",
        parents=[plain_common],
        help="scan the data layout and write the K-fold manifest",
        description="Scan data.hr-root and data.models-root for the patients that have an HR "
        "and every expert for every spacing and pulse, split them into data.kfolds folds "
        "(shuffled with data.seed, like the published tool) and write the manifest to "
        "data.out.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--config", type=Path, required=True, help="the PaCS-SR YAML config")


def _add_make_cohort(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "make-cohort",
        parents=[plain_common],
        help="generate a synthetic cohort in the published layout",
        description="Generate phantom patients (HR, LR and one upsampled volume per expert) "
        "in the published folder layout, with a config.yaml that runs on them.  Refuses a "
        "folder that is not empty unless --force is given.",
        formatter_class=_HelpFormatter,
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


def _add_demo(sub) -> None:  # noqa: ANN001
    # its own copy of the common options: the demo keeps its cache in its own folder
    common = _common(run=True, cache_help="volume cache directory (default: OUT/cache)")
    p = sub.add_parser(
        "demo",
        parents=[common],
        help="generate a small cohort, train fold 1 and print a table",
        description="Train fold 1 of a generated 4-expert cohort and print each expert's test "
        "PSNR/SSIM next to the PaCS-SR blend's.  The cohort and the volume cache are kept "
        "in --out, so a second run reuses them and takes a few seconds.",
        formatter_class=_HelpFormatter,
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


def _add_predict(sub, run_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "predict",
        parents=[run_common],
        help="blend new patients' experts with a model (no HR needed)",
        description="Blend expert volumes with a trained model, without an HR: the z-score "
        "statistics and the brain mask come from the experts. One patient (--expert ... "
        "--out), or many (--manifest, --models-root or --csv with --out-dir), or the "
        "published config's predict section (--config).",
        formatter_class=_HelpFormatter,
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
                     help="one expert volume by model name; repeat for every expert")
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


def _add_inspect(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "inspect",
        parents=[plain_common],
        help="describe a model file (experts, grid, window, training patients, checksum)",
        description="Print what a pacs_model.npz holds and check its checksum.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("model", type=Path, help="pacs_model.npz written by train")


def _add_summarize(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "summarize",
        parents=[plain_common],
        help="one table (CSV and markdown) of every trained task under an out_root",
        description="Per spacing and pulse: each expert and PaCS-SR over folds and patients, "
        "the gain over the best expert with a Wilcoxon signed-rank test, dominance shares.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("out_root", type=Path, help="the run's out_root (pacs_sr.out_root)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for summary.csv and summary.md (default: OUT_ROOT)")


def _add_report(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "report",
        parents=[plain_common],
        help="PNG figures and a one-page HTML summary of one trained task",
        description="Figures of one trained (fold, spacing, pulse): mid slices of HR, experts, "
        "blend and error; dominant-expert and entropy maps; weights by region; metrics. "
        "Needs matplotlib (pip install 'pacs-numba[report]').",
        formatter_class=_HelpFormatter,
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


def _add_tune(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "tune",
        parents=[plain_common],
        help="K-fold cross-validated sweep of the fit settings",
        description="Fit every combination of a grid of pacs_sr settings on each fold's "
        "training patients and score it on the held-out patients without their HR "
        "(normalisation and brain mask from the experts), against each single expert. "
        "Writes a ranked table (CSV and markdown) and the best config; reruns resume.",
        formatter_class=_HelpFormatter,
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
        required=True,
        help="YAML mapping of pacs_sr keys to lists of values: patch_size, stride, "
        "lambda_ridge, lambda_edge, lambda_grad, laplacian_tau, fit_region, mixing_window",
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


def _add_cache(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "cache",
        parents=[plain_common],
        help="inspect or empty the volume cache",
        description="The volume cache holds each input decompressed to float32 once.  'info' "
        "prints its folder, entry count and size; 'clear' removes every entry.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("action", choices=["info", "clear"], help="info: show; clear: empty")


def _add_diagnose(sub, plain_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    from .diagnose import DESCRIPTION, add_arguments

    p = sub.add_parser(
        "diagnose",
        parents=[plain_common],
        help="check a node, plan the pool, fill the compile cache",
        description=DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    add_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``pacs-numba``."""
    parser = _Parser(
        prog="pacs-numba",
        description="PaCS-SR patchwise convex stacking of super-resolution experts, "
        "on a shared-memory Numba engine.",
    )
    parser.add_argument("--version", action="version", version=f"pacs-numba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run_common, plain_common = _common(run=True), _common(run=False)
    _add_train(sub, run_common)
    _add_evaluate(sub, run_common)
    _add_build_manifest(sub, plain_common)
    _add_make_cohort(sub, plain_common)
    _add_demo(sub)
    _add_predict(sub, run_common)
    _add_inspect(sub, plain_common)
    _add_summarize(sub, plain_common)
    _add_report(sub, plain_common)
    _add_tune(sub, plain_common)
    _add_cache(sub, plain_common)
    _add_diagnose(sub, plain_common)
    parser.subparsers = dict(sub.choices)
    return parser


# --------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------
def _startup_log(engine) -> None:  # noqa: ANN001 - Engine, imported lazily
    import numba

    from . import _config

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
        "volume cache %s; compile cache %s",
        __version__,
        platform.node(),
        slurm,
        engine.limits.describe(),
        numba.__version__,
        engine.layer,
        numba.config.NUMBA_NUM_THREADS,
        engine.store.directory,
        _config.KERNEL_CACHE_DIR or "off",
    )


def _engine(args: argparse.Namespace, config):  # noqa: ANN001, ANN202
    from .engine import Engine, RunOptions
    from .limits import parse_size

    budget = None
    if getattr(args, "mem_budget", None):
        try:
            budget = parse_size(args.mem_budget)
        except ValueError as exc:
            raise ConfigError(f"--mem-budget: {exc}") from None
    if getattr(args, "workers", None) is not None and args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    opts = RunOptions(
        cache_dir=args.cache_dir,
        workers=getattr(args, "workers", None),
        mem_budget_bytes=budget,
        force=getattr(args, "force", False),
        resume=getattr(args, "resume", False),
        no_progress=getattr(args, "no_progress", False),
        out_root=getattr(args, "out_root", None),
        wait=getattr(args, "wait", False),
    )
    return Engine(config, opts)


def _file_log(config, args: argparse.Namespace) -> None:  # noqa: ANN001
    if not config.pacs_sr.log_to_file:
        return
    from .layout import ExperimentLayout
    from .logsetup import add_file_log

    root = Path(getattr(args, "out_root", None) or config.pacs_sr.out_root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = ExperimentLayout(root, config.pacs_sr.experiment_name).log_file(
        args.command, stamp, platform.node(), os.getpid()
    )
    if add_file_log(path, logging.getLogger().level) is not None:
        log.info("logging to %s", path)


def _run_tasks(args: argparse.Namespace, evaluate: bool) -> int:
    """Run every selected task; one failing task never stops the others.

    A single task keeps the exit code of its error (2 input/config, 3 budget, 1 bug), as a
    SLURM array task needs.  With several tasks every one runs, a table at the end gives
    each task's state, and the exit code is 2 if any failed (1 if one hit a bug).
    """
    from .config import load_config

    config = load_config(args.config)
    _file_log(config, args)
    engine = _engine(args, config)
    _startup_log(engine)
    tasks = engine.tasks(args.fold, args.spacing, args.pulse)
    compiled_before = _load_kernels()
    verb = "evaluate" if evaluate else "train"
    single = len(tasks) == 1
    states: list[tuple[object, str, str]] = []
    tables: list[str] = []
    bug = False
    with _stop_on_signals(engine):
        for i, task in enumerate(tasks, 1):
            log.info("[task %d/%d] %s %s", i, len(tasks), verb, task)
            try:
                res = engine.evaluate(task, args.weights) if evaluate else engine.train(task)
            except Interrupted as exc:
                again = "rerun with --resume to finish" if not evaluate else "rerun to finish"
                log.error("%s; %d/%d tasks complete; %s", exc, i - 1, len(tasks), again)
                if not single:
                    states.append((task, "interrupted", str(exc)))
                    states += [(t, "not run", "interrupted before it started") for t in tasks[i:]]
                    _log_task_table(states)
                raise
            except PacsError as exc:
                if single:
                    raise
                log.error("task %s failed: %s", task, exc, exc_info=args.debug)
                kind = "failed (budget)" if isinstance(exc, BudgetError) else "failed"
                states.append((task, kind, str(exc)))
                continue
            except Exception as exc:  # a bug: logged with its traceback, the others still run
                if single:
                    raise
                log.exception("task %s failed with an unexpected error (a bug in pacs-numba; "
                              "please report it with this log)", task)
                bug = True
                states.append((task, "failed (bug)", f"{type(exc).__name__}: {exc}"))
                continue
            _print_result(res)
            states.append((task, "done", _result_note(res)))
            if not evaluate and not getattr(args, "no_expert_table", False):
                table = _expert_table(engine, task, res)
                if table:
                    tables.append(table)
    _check_no_compile(compiled_before)
    for table in tables:
        print(table, flush=True)
    if not single:
        _log_task_table(states)
    failed = [s for s in states if s[1] != "done"]
    if failed:
        log.error("%d of %d tasks did not finish: %s", len(failed), len(tasks),
                  "; ".join(f"{t} {st}" for t, st, _ in failed))
        return EXIT_BUG if bug else EXIT_USAGE
    return EXIT_OK


def _kernel_index_files() -> tuple[int, int]:
    """(kernels with a compile-cache index file, kernels) over the package's dispatchers."""
    from .diagnose import _dispatchers

    have = total = 0
    for disp in _dispatchers():
        total += 1
        cache = getattr(disp, "_cache", None)
        index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
        have += bool(index and os.path.exists(index))
    return have, total


def _load_kernels() -> int:
    """Compile the kernels, or load them from Numba's cache, before the first patient.

    On a first run this takes 20-60 s, and a person watching a terminal should know why
    nothing moves: an INFO line announces it when the compile cache lacks kernels, and one
    gives the time it took.  Returns the number of kernels compiled so far (cache misses),
    for :func:`_check_no_compile`.
    """
    import numba

    from ._config import CACHE
    from .diagnose import _cache_counts, _warm_kernels

    have, _ = _kernel_index_files()
    where = numba.config.CACHE_DIR or "the kernels' __pycache__ (set NUMBA_CACHE_DIR to move it)"
    # Some kernels (e.g. predict's) may never have been compiled, so "no index file at all"
    # is the sign of a first run; a partial cache only gets the line with the time below.
    announce = not CACHE or have == 0
    if announce:
        why = "the compile cache is off (PACS_NUMBA_CACHE=0)" if not CACHE else "first run only"
        log.info("compiling kernels (%s) ...", why)
    _, misses0 = _cache_counts()
    t0 = time.perf_counter()
    _warm_kernels()
    secs = time.perf_counter() - t0
    _, total_misses = _cache_counts()
    misses = total_misses - misses0
    if misses or not CACHE:
        log.info(
            "compiling kernels (first run only) took %.1f s: %d compiled%s",
            secs,
            misses,
            f", cached in {where}" if CACHE else "",
        )
    else:
        log.debug("kernels loaded from the compile cache in %.2f s (%s)", secs, where)
    return total_misses


def _check_no_compile(misses_before: int) -> None:
    """Say so if a task compiled a kernel that the start-up load did not cover."""
    from .diagnose import _cache_counts

    _, misses = _cache_counts()
    if misses > misses_before:
        log.info(
            "%d more kernel signature(s) compiled during the run (not covered by the start-up "
            "load; they are cached now)",
            misses - misses_before,
        )
    else:
        log.debug("no kernel compiled during the run")


def _result_note(res) -> str:  # noqa: ANN001
    m = res.metrics.get("test") or {}
    note = f"test PSNR {m['psnr']:.3f} dB" if "psnr" in m else ""
    if res.skipped:
        note += f"{', ' if note else ''}{len(res.skipped)} patient(s) skipped"
    return note


def _log_task_table(states: list[tuple[object, str, str]]) -> None:
    """Print one line per task with its state, as an aligned table (stdout: a result)."""
    width_task = max((len(str(t)) for t, _, _ in states), default=4)
    width_state = max((len(st) for _, st, _ in states), default=5)
    lines = [f"{'task':<{width_task}}  {'state':<{width_state}}  detail"]
    for task, state, detail in states:
        short = " ".join(detail.split())
        short = short if len(short) <= 140 else short[:137] + "..."
        lines.append(f"{str(task):<{width_task}}  {state:<{width_state}}  {short}")
    ok = sum(1 for _, st, _ in states if st == "done")
    print(f"tasks: {ok} of {len(states)} done", *lines, sep="\n  ", flush=True)


def _expert_table(engine, task, res) -> str | None:  # noqa: ANN001
    """Return the demo's per-expert vs PaCS-SR table of one trained task, or None."""
    from .demo import metrics_table

    stacked = res.metrics.get("test")
    n_test = len(res.per_patient.get("test") or {})
    if not stacked or not n_test or not res.extras.get("test_experts"):
        return None
    return "\n".join([f"{task}:", *metrics_table(res.extras["test_experts"], stacked, n_test,
                                                   res.extras.get("test_hr_free"))])


def _print_result(res) -> None:  # noqa: ANN001
    parts = [f"fold {res.task.fold} {res.task.spacing} {res.task.pulse}:"]
    for split in ("train", "test"):
        m = res.metrics.get(split)
        if m:
            parts.append(f"{split} PSNR {m['psnr']:.3f} dB SSIM {m['ssim']:.4f}")
    if res.skipped:
        parts.append(f"({len(res.skipped)} patient(s) skipped)")
    parts.append(f"-> {res.model_dir}")
    print("  ".join(parts), flush=True)


class _stop_on_signals:
    """SIGTERM/SIGINT ask the engine to stop; a second SIGINT interrupts at once."""

    def __init__(self, engine) -> None:  # noqa: ANN001
        self.engine = engine
        self._old: dict[int, object] = {}

    def _handler(self, signum: int, frame: object) -> None:
        if self.engine.stop_event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        log.warning(
            "received %s: finishing patients in flight, starting no new one",
            signal.Signals(signum).name,
        )
        self.engine.request_stop(signum)

    def __enter__(self) -> _stop_on_signals:
        if threading_main():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)  # type: ignore[arg-type]


def threading_main() -> bool:
    """Whether this is the main thread (only it may install signal handlers)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _build_manifest(args: argparse.Namespace) -> int:
    from .config import load_config
    from .manifest import build_manifest, write_manifest

    config = load_config(args.config)
    manifest = build_manifest(config.data)
    write_manifest(manifest, config.data.out)
    n = len(manifest["folds"][0]["train"]) + len(manifest["folds"][0]["test"])
    print(f"manifest with {n} patients in {len(manifest['folds'])} folds -> {config.data.out}")
    return EXIT_OK


def _make_cohort(args: argparse.Namespace) -> int:
    from .cohort import make_cohort

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


def _predict(args: argparse.Namespace) -> int:
    from .predict_cli import run_predict

    return run_predict(args)


def _inspect(args: argparse.Namespace) -> int:
    from .model import describe_model, load_model

    print(describe_model(load_model(args.model), args.model))
    return EXIT_OK


def _summarize(args: argparse.Namespace) -> int:
    from .summarize import summarize

    _, md, paths = summarize(args.out_root, args.out)
    print(md)
    print(f"summary -> {paths[0]}, {paths[1]}")
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from .report import make_report

    html = make_report(args.run_dir, config_path=args.config, out_dir=args.out,
                       patients=args.patients, cache_dir=args.cache_dir)
    print(f"report -> {html}")
    return EXIT_OK


def _tune(args: argparse.Namespace) -> int:
    from .config import load_config
    from .layout import ExperimentLayout
    from .tune import load_grid, run_tune

    config = load_config(args.config)
    candidates = load_grid(args.grid, config)
    out = args.out or ExperimentLayout(
        Path(config.pacs_sr.out_root), config.pacs_sr.experiment_name
    ).tune_dir
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


def _cache(args: argparse.Namespace) -> int:
    from .io import VolumeStore

    store = VolumeStore(args.cache_dir)
    if args.action == "clear":
        from .cellstats import StatsCache
        from .registration import clear_registered

        n = store.clear()
        n_reg = clear_registered(store)
        stats_dir = store.directory / "cellstats"
        n_stats = StatsCache(stats_dir).clear() if stats_dir.is_dir() else 0
        print(f"removed {n} cache entries from {store.directory}"
              + (f", {n_reg} registration entries" if n_reg else "")
              + (f" and {n_stats} statistics entries" if n_stats else ""))
    else:
        from .logsetup import human_size

        info = store.info()
        for k, v in info.items():
            if k == "total_bytes":
                print(f"size: {human_size(v)} ({v} bytes)")
            else:
                print(f"{k}: {v}")
    return EXIT_OK


def _diagnose(args: argparse.Namespace) -> int:
    from .diagnose import run

    return run(args)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _load_kernels()
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
        self._ctx: _stop_on_signals | None = None

    def attach(self, engine) -> None:  # noqa: ANN001
        self._ctx = _stop_on_signals(engine)
        self._ctx.__enter__()

    def __enter__(self) -> _DemoStop:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    from .logsetup import resolve_level, setup_logging
    from .process import pin_mmap_threshold

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
    commands = {
        "train": lambda a: _run_tasks(a, evaluate=False),
        "evaluate": lambda a: _run_tasks(a, evaluate=True),
        "build-manifest": _build_manifest,
        "make-cohort": _make_cohort,
        "cache": _cache,
        "predict": _predict,
        "inspect": _inspect,
        "summarize": _summarize,
        "report": _report,
        "demo": _demo,
        "diagnose": _diagnose,
        "tune": _tune,
    }
    try:
        return commands[args.command](args)
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
