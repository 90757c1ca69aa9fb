"""Sample the resident set size of a process (and its children) in a background thread.

The one RSS sampler of the repository: the memory tests, the calibration test's child
script, ``scripts/profile.py`` and ``scripts/literal_baseline.py`` all use it (the scripts
put this folder on ``sys.path``).  Not part of the package: only measurements watch RSS
over time, and psutil is the only dependency.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import psutil


def _status(pid: int) -> tuple[int, int] | None:
    """``(VmRSS, RssAnon)`` in bytes from ``/proc/PID/status``, or None where unreadable."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            text = fh.read()
    except OSError:
        return None
    rss = anon = None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("RssAnon:"):
            anon = int(line.split()[1]) * 1024
    if rss is None:
        return None
    return rss, anon if anon is not None else rss


class RssSampler:
    """Sample the resident set size in a background thread.

    Parameters
    ----------
    interval_s : float, optional
        Seconds between samples (default 0.05).
    include_children : bool, optional
        Add the RSS of every child process (recursively).
    pid : int, optional
        Process to watch (default: this one).

    Attributes
    ----------
    samples : list of (float, int)
        ``(seconds since start, bytes)``; one at entry, one at exit and one per
        interval between.
    peak_bytes : int
        Largest sample (the whole tree with ``include_children``).
    peak_root_bytes : int
        Largest RSS of the watched process alone.
    peak_anon_bytes : int
        Largest anonymous RSS (``RssAnon``: not file-backed, so not memory-mapped inputs)
        of the sampled processes, summed like ``peak_bytes``.
    peak_by_pid : dict of int to int
        Largest RSS of each sampled process.
    phase : str
        A label the caller sets (``sampler.phase = "fit"``); ``peak_by_phase`` keeps the
        largest sample seen under each label.
    peak_by_phase : dict of str to int

    Examples
    --------
    >>> with RssSampler(0.01) as s:
    ...     x = bytearray(50 * 2**20)
    >>> s.peak_bytes > 0
    True
    """

    def __init__(self, interval_s: float = 0.05, *, include_children: bool = False,
                 pid: int | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.include_children = include_children
        self.samples: list[tuple[float, int]] = []
        self.peak_bytes = 0
        self.peak_root_bytes = 0
        self.peak_anon_bytes = 0
        self.peak_by_pid: dict[int, int] = {}
        self.phase = "start"
        self.peak_by_phase: dict[str, int] = {}
        self._proc = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    def _one(self, proc: psutil.Process) -> tuple[int, int]:
        st = _status(proc.pid)
        if st is not None:
            return st
        rss = int(proc.memory_info().rss)
        return rss, rss

    def sample(self) -> int:
        """Take one sample now and return it in bytes.

        Returns
        -------
        int

        Raises
        ------
        psutil.Error
            If the watched process is gone.
        """
        root, anon = self._one(self._proc)
        total = root
        self.peak_by_pid[self._proc.pid] = max(self.peak_by_pid.get(self._proc.pid, 0), root)
        if self.include_children:
            try:
                children = self._proc.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                try:
                    rss, a = self._one(child)
                except psutil.Error:  # child exited between listing and reading
                    continue
                total += rss
                anon += a
                self.peak_by_pid[child.pid] = max(self.peak_by_pid.get(child.pid, 0), rss)
        self.samples.append((time.monotonic() - self._t0, total))
        self.peak_bytes = max(self.peak_bytes, total)
        self.peak_root_bytes = max(self.peak_root_bytes, root)
        self.peak_anon_bytes = max(self.peak_anon_bytes, anon)
        self.peak_by_phase[self.phase] = max(self.peak_by_phase.get(self.phase, 0), total)
        return total

    def _sample_if_alive(self) -> bool:
        try:
            self.sample()
        except psutil.Error:  # watched process gone: nothing more to see
            return False
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s) and self._sample_if_alive():
            pass

    def start(self) -> RssSampler:
        """Take a first sample and start sampling in the background."""
        self._t0 = time.monotonic()
        self._stop.clear()
        self._sample_if_alive()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread and take a last sample."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample_if_alive()

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def wait_sampled(proc: subprocess.Popen, interval_s: float,
                 on_interrupt: Callable[[subprocess.Popen], None]) -> tuple[int, Any, RssSampler]:
    """Wait for ``proc`` while sampling the RSS of its process tree; its status, rusage, samples.

    Polls ``wait4`` rather than blocking in it: a signal may be delivered to the sampler
    thread, and a blocking ``wait4`` in the main thread would not return to run the handler.
    On any exception here (Ctrl-C, a signal handler's exception) ``on_interrupt(proc)`` stops
    what was started before the exception goes on.
    """
    sampler = RssSampler(interval_s, pid=proc.pid, include_children=True).start()
    try:
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                return status, ru, sampler
            time.sleep(0.05)
    except BaseException:
        on_interrupt(proc)
        raise
    finally:
        sampler.stop()
