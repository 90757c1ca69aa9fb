"""The patient pool: patients on a bounded set of threads, stoppable between patients.

Every command that processes patients (train's fit and evaluate stages, predict's batches)
runs them through :func:`map_patients`, so all of them behave the same way on SIGTERM
(SLURM's time limit) and Ctrl-C: no new patient starts, the patients in flight finish and
are kept, and :class:`~pacs_numba.errors.Interrupted` says how far the stage got.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

import numba

from ..errors import Interrupted
from ..resources.planning import PoolPlan
from .progress import progress

_NOT_RUN = object()


class PatientSkipped(Exception):
    """A patient cannot be used (unreadable file, empty mask); the stage goes on without it."""


class StopFlag:
    """A stop request shared by a run's pool and its signal handlers.

    ``request_stop`` is safe to call from a signal handler: it only records the signal and
    sets an event that the pool reads between patients.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: int | None = None

    def request_stop(self, signum: int) -> None:
        """Ask the run to stop: no new patient starts; in-flight patients finish."""
        self.signal = signum
        self.event.set()

    def is_set(self) -> bool:
        """Whether a stop was requested."""
        return self.event.is_set()


def map_patients(
    desc: str,
    items: list[str],
    fn: Callable[[str], Any],
    plan: PoolPlan,
    stop: StopFlag,
    *,
    no_progress: bool = False,
    thread_name: str = "patient",
) -> dict[str, Any]:
    """Run ``fn(pid)`` for every patient on ``plan.width`` threads; results by pid.

    Parameters
    ----------
    desc : str
        What the stage is, for the progress line and the stop message.
    items : list of str
        Patient ids, started in this order.
    fn : callable
        ``fn(pid) -> result``; raising :class:`PatientSkipped` leaves the patient out.
    plan : PoolPlan
        Width (patients at once) and Numba threads per patient.
    stop : StopFlag
        Checked before each patient starts.
    no_progress : bool
        Never draw a bar (log lines instead).
    thread_name : str
        Prefix of the worker threads' names (they appear in every log line).

    Returns
    -------
    dict
        ``{pid: result}`` of the patients that finished, in completion order.

    Raises
    ------
    Interrupted
        After a stop request, once the patients in flight have finished.
    Exception
        The first exception of a patient (other than ``PatientSkipped``), after the pool
        has drained.
    """
    out: dict[str, Any] = {}
    threads = plan.threads

    def run_one(pid: str) -> Any:
        if stop.is_set():
            return _NOT_RUN
        numba.set_num_threads(threads)  # thread-local in numba
        return fn(pid)

    pending: set[Future] = set()
    queue = list(items)
    with (
        ThreadPoolExecutor(plan.width, thread_name_prefix=thread_name) as pool,
        progress(len(items), desc, disabled=no_progress) as bar,
    ):
        futures: dict[Future, str] = {}
        error: BaseException | None = None
        while queue or pending:
            while queue and len(pending) < plan.width and error is None and not stop.is_set():
                pid = queue.pop(0)
                fut = pool.submit(run_one, pid)
                futures[fut] = pid
                pending.add(fut)
            if not pending:
                break
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                pid = futures[fut]
                try:
                    res = fut.result()
                except PatientSkipped:
                    bar.update(1)
                    continue
                except BaseException as exc:  # noqa: BLE001 - re-raised after draining
                    error = error or exc
                    continue
                if res is not _NOT_RUN:
                    out[pid] = res
                bar.update(1)
        if error is not None:
            raise error
    if stop.is_set():
        raise Interrupted(
            stop.signal or 15,
            f"stopped by signal {stop.signal} during '{desc}': "
            f"{len(out)}/{len(items)} patients finished",
        )
    return out


def join_reasons(reasons: Mapping[str, str]) -> str:
    """``"sub-01: why; sub-02: why"`` for an error that lists skipped patients."""
    return "; ".join(f"{pid}: {why}" for pid, why in reasons.items())


def describe_plan(plan: PoolPlan) -> str:
    """``"2 worker(s) x 1 numba thread(s) (reason)"`` for the stage's log line."""
    return f"{plan.width} worker(s) x {plan.threads} numba thread(s) ({plan.reason})"
