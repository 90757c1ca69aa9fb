"""The ``pacs-numba`` command line (STYLE.md §6, §9).

Exit codes: 0 success; 2 usage, config or input error; 3 memory budget; 1 unexpected
error (a bug: logged with its traceback); 130 SIGINT; 143 SIGTERM (SLURM's time limit).
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

from . import __version__
from .errors import BudgetError, ConfigError, Interrupted, PacsError

log = logging.getLogger("pacs_numba.cli")

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_BUDGET = 0, 1, 2, 3
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


# --------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------
def _common(*, run: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("logging")
    g.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv: DEBUG)"
    )
    g.add_argument("-q", "--quiet", action="count", default=0, help="less log output")
    g.add_argument("--debug", action="store_true", help="show tracebacks of user errors too")
    g.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="volume cache directory (default: $PACS_NUMBA_CACHE_DIR or a per-user "
        "folder under the system temp dir)",
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
            help="log progress lines instead of drawing a progress bar",
        )
    return p


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``pacs-numba``."""
    parser = argparse.ArgumentParser(
        prog="pacs-numba",
        description="PaCS-SR patchwise convex stacking of super-resolution experts, "
        "on a shared-memory Numba engine.",
    )
    parser.add_argument("--version", action="version", version=f"pacs-numba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    run_common, plain_common = _common(run=True), _common(run=False)

    def task_args(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--config", type=Path, required=True, help="the PaCS-SR YAML config")
        p.add_argument(
            "--fold",
            type=int,
            required=required,
            default=None,
            help="fold number, 1-based (default: all)" if not required else "fold, 1-based",
        )
        p.add_argument(
            "--spacing",
            required=required,
            default=None,
            help="spacing, e.g. 3mm (default: all of data.spacings)",
        )
        p.add_argument(
            "--pulse",
            required=required,
            default=None,
            help="pulse, e.g. t1c (default: all of data.pulses)",
        )
        p.add_argument(
            "--out-root",
            type=Path,
            default=None,
            help="write outputs here instead of pacs_sr.out_root",
        )
        p.add_argument("--force", action="store_true", help="overwrite existing outputs")

    p = sub.add_parser(
        "train",
        parents=[run_common],
        help="fit tile weights and evaluate",
        description="Fit the tile weights on each fold's training patients and "
        "evaluate them, like pacs-sr-train.",
    )
    task_args(p, required=False)
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep outputs that are complete and were made from the same inputs "
        "and settings; compute the rest",
    )

    p = sub.add_parser(
        "evaluate",
        parents=[run_common],
        help="evaluate given tile weights",
        description="Blend and score one task's patients with given weights: "
        "ours or a weights.json of the published tool.",
    )
    task_args(p, required=True)
    p.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="weights.json or pacs_model.npz (default: the task's own model)",
    )

    p = sub.add_parser(
        "build-manifest",
        parents=[plain_common],
        help="scan the data layout and write the K-fold manifest",
    )
    p.add_argument("--config", type=Path, required=True)

    p = sub.add_parser(
        "make-cohort",
        parents=[plain_common],
        help="generate a synthetic cohort in the published layout",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to create")
    p.add_argument("--patients", type=int, default=6)
    p.add_argument("--shape", type=int, nargs=3, default=(96, 112, 96), metavar=("Z", "Y", "X"))
    p.add_argument("--spacings", nargs="+", default=["3mm"])
    p.add_argument("--pulses", nargs="+", default=["t1c"])
    p.add_argument("--kfolds", type=int, default=3)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--stride", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "demo", parents=[run_common], help="generate a small cohort, train fold 1 and print a table"
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("pacs_numba_demo"),
        help="folder for the cohort and the results (default: ./pacs_numba_demo)",
    )
    p.add_argument("--patients", type=int, default=8)
    p.add_argument("--shape", type=int, nargs=3, default=(96, 112, 96), metavar=("Z", "Y", "X"))
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser(
        "predict",
        parents=[plain_common],
        help="blend a new patient's experts with a model",
        description="Blend one patient's expert volumes with a trained model (pacs_model.npz), "
        "without an HR: the z-score statistics and the brain mask come from the experts.",
    )
    p.add_argument("--model", type=Path, required=True, help="pacs_model.npz written by train")
    p.add_argument(
        "--experts",
        type=Path,
        nargs="+",
        required=True,
        help="the expert volumes, in the model's expert order",
    )
    p.add_argument("--out", type=Path, required=True, help="output .nii.gz")
    p.add_argument(
        "--window",
        choices=["hann", "flat"],
        default="hann",
        help="mixing window where tiles overlap (default hann)",
    )

    p = sub.add_parser(
        "tune",
        parents=[plain_common],
        help="K-fold cross-validated sweep of the fit settings",
        description="Fit every combination of a grid of pacs_sr settings on each fold's "
        "training patients and score it on the held-out patients without their HR "
        "(normalisation and brain mask from the experts), against each single expert. "
        "Writes a ranked table (CSV and markdown) and the best config; reruns resume.",
    )
    p.add_argument("--config", type=Path, required=True)
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="log progress lines instead of drawing a progress bar",
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
    p.add_argument("--spacing", nargs="+", default=None, help="default: all of data.spacings")
    p.add_argument("--pulse", nargs="+", default=None, help="default: all of data.pulses")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: {out_root}/{experiment_name}/tune)",
    )

    p = sub.add_parser("cache", parents=[plain_common], help="inspect or empty the volume cache")
    p.add_argument("action", choices=["info", "clear"])
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
    from .memory import parse_size

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
    add_file_log(path, logging.getLogger().level)
    log.info("logging to %s", path)


def _run_tasks(args: argparse.Namespace, evaluate: bool) -> int:
    from .config import load_config

    config = load_config(args.config)
    _file_log(config, args)
    engine = _engine(args, config)
    _startup_log(engine)
    tasks = engine.tasks(args.fold, args.spacing, args.pulse)
    failures = 0
    with _stop_on_signals(engine):
        for i, task in enumerate(tasks, 1):
            log.info("[task %d/%d] %s %s", i, len(tasks), "evaluate" if evaluate else "train", task)
            try:
                res = engine.evaluate(task, args.weights) if evaluate else engine.train(task)
            except Interrupted as exc:
                log.error(
                    "%s; %d/%d tasks complete; rerun with --resume to finish",
                    exc,
                    i - 1,
                    len(tasks),
                )
                raise
            except (BudgetError, ConfigError):
                raise
            except PacsError as exc:
                # like the published tool: one broken task does not stop the others
                failures += 1
                log.error("task %s failed: %s", task, exc)
                continue
            _print_result(res)
    if failures:
        log.error("%d of %d tasks failed", failures, len(tasks))
        return EXIT_USAGE
    return EXIT_OK


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
    from .predict import predict_files

    out = predict_files(
        args.model, args.experts, args.out, window=args.window, cache_dir=args.cache_dir
    )
    print(f"prediction -> {out}")
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

        n = store.clear()
        stats_dir = store.directory / "cellstats"
        n_stats = StatsCache(stats_dir).clear() if stats_dir.is_dir() else 0
        print(f"removed {n} cache entries from {store.directory} and {n_stats} statistics "
              f"entries from {stats_dir}")
    else:
        info = store.info()
        for k, v in info.items():
            print(f"{k}: {v}")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

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
    from .memory import pin_mmap_threshold

    # Volume-sized temporaries get their own mmap and go back to the OS when freed, instead
    # of staying resident in glibc's per-thread arenas (measured: 20-40 MiB per worker).
    pin_mmap_threshold()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return int(exc.code or 0)
    setup_logging(resolve_level(args.verbose, args.quiet))
    commands = {
        "train": lambda a: _run_tasks(a, evaluate=False),
        "evaluate": lambda a: _run_tasks(a, evaluate=True),
        "build-manifest": _build_manifest,
        "make-cohort": _make_cohort,
        "cache": _cache,
        "predict": _predict,
        "demo": _demo,
        "tune": _tune,
    }
    try:
        return commands[args.command](args)
    except Interrupted as exc:
        return EXIT_SIGINT if exc.signum == signal.SIGINT else EXIT_SIGTERM
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_SIGINT
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
