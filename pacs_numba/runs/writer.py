"""Write a split's outputs in the background, while the next patient is computed.

A test patient's optional outputs (its blend NIfTI, the weight npz files, the NIfTI weight
maps) take as long to compress as the patient takes to score.  :class:`OutputWriter` runs
them on one thread of its own, so the pool moves on to the next patient meanwhile.  It stays
within the memory plan: at most ``depth`` patients' outputs wait in its queue (a full queue
blocks the patient that submits), and ``resources.costs.queued_outputs_bytes`` charges
them to the task.  Every file is still written atomically by the job itself, a patient is
recorded for ``--resume`` by its job after its files are on disk, and leaving the ``with``
block drains the queue, so a stopped run (SIGTERM) leaves only whole, recorded outputs.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from types import TracebackType

log = logging.getLogger(__name__)


class OutputWriter:
    """One background thread running write jobs in submission order, ``depth`` queued at most.

    Parameters
    ----------
    depth : int
        Jobs that may wait besides the one being written (>= 1).
    name : str
        The thread's name (it shows in the log lines of the jobs).

    Notes
    -----
    A job that raises stops the writer: the jobs after it are dropped (their patients stay
    unrecorded, so ``--resume`` computes them again), and :meth:`close` and the next
    :meth:`submit` raise that error in the caller's thread.

    Examples
    --------
    >>> done = []
    >>> with OutputWriter() as w:
    ...     w.submit(lambda: done.append(1))
    >>> done
    [1]
    """

    def __init__(self, depth: int = 1, name: str = "writer") -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller in close()
                log.debug("write job failed: %r", exc)
                self._error = exc
            finally:
                self._queue.task_done()

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; blocks while ``depth`` jobs wait (the memory bound).

        Raises
        ------
        RuntimeError
            If the writer is closed.
        BaseException
            The error of an earlier job, if one failed.
        """
        if self._closed:
            raise RuntimeError("the output writer is closed")
        if self._error is not None:
            raise self._error
        self._queue.put(job)

    def close(self) -> None:
        """Finish every queued job, stop the thread, and raise a job's error if one failed."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # already failing: drain what was queued, keep the original error
            self.close()
        except BaseException as err:  # noqa: BLE001
            log.warning("a background write failed too: %r", err)
