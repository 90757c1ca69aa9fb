"""One run per task folder: an advisory lock that the kernel drops when its holder dies.

Two runs of the same (fold, spacing, pulse) into the same out_root would mix their files
(one run's model next to the other's metrics).  Each task therefore takes an exclusive
``flock`` on ``.pacs_numba.lock`` in its folder before it reads or writes anything there.
The kernel releases the lock when the holder exits for any reason, SIGKILL included, so a
stale lock cannot exist; the file itself stays (removing it would let two processes lock
two different inodes).  The holder writes its host, pid and start time into the file so a
refused run can say who holds it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import OutputError, PacsError

#: Longest wait for another process that is building the same cache entry.
LOCK_WAIT_S = 300.0


log = logging.getLogger(__name__)


@contextmanager
def node_lock(path: Path) -> Iterator[None]:
    """Hold an advisory ``flock`` on ``path`` if the file system allows it.

    The lock only saves duplicate work: correctness never depends on it, since every entry is
    installed by an atomic rename.  So when locks are unsupported (some network file systems)
    or the holder takes longer than ``LOCK_WAIT_S``, carry on without it.  The kernel releases
    the lock if its holder dies.  Lock files are empty and left in place (removing them would
    let two processes lock different inodes); ``clear`` removes them.
    """
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("waited %.0f s for %s; building without it", LOCK_WAIT_S, path)
                    break
                time.sleep(0.01)
            except OSError:
                break  # no flock here
        yield
    finally:
        os.close(fd)  # releases the lock


try:
    import fcntl
except ImportError:  # not POSIX: no locking (documented in the README)
    fcntl = None  # type: ignore[assignment]


LOCK_FILE = ".pacs_numba.lock"


#: Seconds between two attempts while ``--wait`` waits for the holder.
POLL_S = 0.2


class TaskBusy(PacsError):
    """Another process holds the task's lock (exit 2, like any user error)."""


def describe_holder(info: dict[str, Any] | None) -> str:
    """``host H pid P since T`` from the lock file's content (or that it is unknown)."""
    if not info:
        return "an unknown process (the lock file names no holder yet)"
    return (
        f"pid {info.get('pid', '?')} on host {info.get('host', '?')} "
        f"since {info.get('start', '?')}"
    )


class TaskLock:
    """Exclusive advisory lock of one task folder, held for the whole task.

    Parameters
    ----------
    folder : Path
        The task folder; created if needed.
    what : str
        Name of the task for messages.
    wait : bool
        Wait for the holder (``--wait``) instead of failing at once.
    should_stop : callable, optional
        Polled while waiting; when it returns True the wait ends with ``PacsError``
        (SIGTERM or Ctrl-C while waiting).

    Attributes
    ----------
    start_ns : int
        ``time.time_ns()`` when the lock was taken; temporary files in the folder older than
        this were left by an earlier, dead holder.
    """

    def __init__(
        self,
        folder: Path,
        what: str,
        *,
        wait: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self.what = what
        self.wait = wait
        self.should_stop = should_stop
        self.start_ns = 0
        self._fd: int | None = None

    def read_holder(self) -> dict[str, Any] | None:
        """Return the holder information in the lock file (None if empty or unreadable)."""
        try:
            info = json.loads(self.path.read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def acquire(self) -> TaskLock:
        """Take the lock (waiting if asked); write this process into the lock file."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as exc:
            raise OutputError(
                f"cannot create the task lock '{self.path}': {exc.strerror or exc}"
            ) from exc
        if fcntl is None:
            self._fd = fd
            self.start_ns = time.time_ns()
            return self
        announced = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = describe_holder(self.read_holder())
                    if not self.wait:
                        raise TaskBusy(
                            f"{self.what} is already running in '{self.folder}': {holder} holds "
                            f"'{self.path}'; wait for it to finish, or pass --wait"
                        ) from None
                    if not announced:
                        log.info("%s: waiting for %s (lock '%s')", self.what, holder, self.path)
                        announced = True
                    if self.should_stop is not None and self.should_stop():
                        raise TaskBusy(
                            f"{self.what}: stopped while waiting for {holder} ('{self.path}')"
                        ) from None
                    time.sleep(POLL_S)
                except OSError as exc:  # no flock on this file system: carry on unlocked
                    log.warning(
                        "cannot lock '%s' (%s); two runs of %s would not be told apart",
                        self.path, exc.strerror or exc, self.what,
                    )
                    break
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.start_ns = time.time_ns()
        info = {
            "host": platform.node(),
            "pid": os.getpid(),
            "start": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.start_ns / 1e9)),
            "start_ns": self.start_ns,
        }
        try:  # same inode: truncate and write in place (never rename over a lock file)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        except OSError as exc:
            log.warning("cannot write the holder into '%s': %s", self.path, exc.strerror or exc)
        return self

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it).

        The holder is erased first, so a finished task leaves an empty lock file (and two
        runs of a task leave identical folders).
        """
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> TaskLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
