"""``pacs-numba train`` and ``pacs-numba evaluate``: every selected task, one table at the end."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import load_config
from ..errors import BudgetError, Interrupted, PacsError
from ..runs.demo import metrics_table
from ..runs.warmup import check_no_compile, load_kernels
from .common import (
    EXIT_BUG,
    EXIT_OK,
    EXIT_USAGE,
    HelpFormatter,
    StopOnSignals,
    file_log,
    make_engine,
    startup_log,
    task_args,
)

log = logging.getLogger(__name__)


def _add_train(sub, run_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "train",
        parents=[run_common],
        help="fit tile weights and evaluate",
        description="Fit the tile weights on each fold's training patients and evaluate "
        "them, like pacs-sr-train.  Without --fold/--spacing/--pulse every task of the "
        "config runs; a task that fails does not stop the others, and a table at the end "
        "gives each task's state.",
        formatter_class=HelpFormatter,
    )
    task_args(p, required=False)
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
    p.set_defaults(run=run_train)


def _add_evaluate(sub, run_common: argparse.ArgumentParser) -> None:  # noqa: ANN001
    p = sub.add_parser(
        "evaluate",
        parents=[run_common],
        help="evaluate given tile weights",
        description="Blend and score one task's patients with given weights: ours or a "
        "weights.json of the published tool.  --fold, --spacing and --pulse are required.",
        formatter_class=HelpFormatter,
    )
    task_args(p, required=True)
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights.json or pacs_model.npz (default: the task's own model)",
    )
    p.set_defaults(run=run_evaluate)


def _run_tasks(args: argparse.Namespace, evaluate: bool) -> int:
    """Run every selected task; one failing task never stops the others.

    A single task keeps the exit code of its error (2 input/config, 3 budget, 1 bug), as a
    SLURM array task needs.  With several tasks every one runs, a table at the end gives
    each task's state, and the exit code is 2 if any failed (1 if one hit a bug).
    """
    config = load_config(args.config)
    file_log(config, args)
    engine = make_engine(args, config)
    startup_log(engine)
    tasks = engine.tasks(args.fold, args.spacing, args.pulse)
    engine.write_metadata(tasks, args.command)  # HDF5-form configs only
    compiled_before = load_kernels("evaluate" if evaluate else "train", config.pacs_sr)
    verb = "evaluate" if evaluate else "train"
    single = len(tasks) == 1
    states: list[tuple[object, str, str]] = []
    tables: list[str] = []
    bug = False
    with StopOnSignals(engine):
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
    check_no_compile(compiled_before)
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


def add_parsers(sub, run_common: argparse.ArgumentParser,  # noqa: ANN001 - argparse's subparsers
                plain_common: argparse.ArgumentParser) -> None:
    """Add this family's subcommands to ``sub``; each one's ``run`` is set as a default."""
    _add_train(sub, run_common)
    _add_evaluate(sub, run_common)


def run_train(args: argparse.Namespace) -> int:
    """``pacs-numba train``: fit and evaluate every selected task."""
    return _run_tasks(args, evaluate=False)


def run_evaluate(args: argparse.Namespace) -> int:
    """``pacs-numba evaluate``: evaluate given weights on one task."""
    return _run_tasks(args, evaluate=True)
