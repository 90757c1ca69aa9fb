"""Sample a process's resident set size in a background thread (used by the memory tests).

Not part of the package: only the calibration and memory tests watch RSS over time.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType

import psutil


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
        Largest sample.

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
        self._proc = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _rss(self) -> int:
        total = self._proc.memory_info().rss
        if self.include_children:
            for child in self._proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # child exited between listing and reading
                    pass
        return int(total)

    def sample(self) -> int:
        """Take one sample now and return it in bytes.

        Returns
        -------
        int
        """
        rss = self._rss()
        self.samples.append((time.monotonic() - self._t0, rss))
        self.peak_bytes = max(self.peak_bytes, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except psutil.Error:  # watched process gone: nothing more to see
                return

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.sample()
        except psutil.Error:
            pass
