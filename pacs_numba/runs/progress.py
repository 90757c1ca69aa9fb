"""One progress reporter for terminals and for SLURM logs.

On a terminal it draws a tqdm bar on stderr; otherwise (a batch job's log file,
``disable_tqdm: true`` or ``--no-progress``) it writes one INFO line every
``PACS_PROGRESS_INTERVAL`` seconds (default 60) and one at the end, so logs stay
greppable and free of carriage returns.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm import tqdm

log = logging.getLogger(__name__)


def _interval_s() -> float:
    raw = os.environ.get("PACS_PROGRESS_INTERVAL", "60")
    try:
        return max(0.0, float(raw))
    except ValueError:
        return 60.0


def _fmt_eta(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class _LogProgress:
    def __init__(self, total: int, desc: str, unit: str, interval_s: float) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.interval_s = interval_s
        self.n = 0
        self.t0 = time.monotonic()
        self._last = self.t0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval_s and self.n < self.total:
            self._last = now
            self._emit(now)

    def _emit(self, now: float) -> None:
        elapsed = max(now - self.t0, 1e-9)
        rate = self.n / elapsed
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        log.info(
            "%s: %d/%d %s (%.0f%%) %.2f %s/s eta %s",
            self.desc,
            self.n,
            self.total,
            self.unit,
            pct,
            rate,
            self.unit,
            _fmt_eta(eta),
        )

    def close(self) -> None:
        now = time.monotonic()
        log.info(
            "%s: %d/%d %s done in %.1fs", self.desc, self.n, self.total, self.unit, now - self.t0
        )


class _TqdmProgress:
    def __init__(self, total: int, desc: str, unit: str) -> None:

        self._bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def use_tqdm(disabled: bool = False) -> bool:
    """Whether a tqdm bar should be drawn: stderr is a terminal and nothing disabled it."""
    return not disabled and sys.stderr.isatty()


@contextmanager
def progress(
    total: int, desc: str, unit: str = "patients", *, disabled: bool = False
) -> Iterator[_LogProgress | _TqdmProgress]:
    """Report progress of ``total`` units of work; call ``.update(n)`` as they complete.

    Parameters
    ----------
    total : int
        Units of work expected.
    desc : str
        What is being done, e.g. ``"fit fold 1 3mm t1c"``.
    unit : str
        Name of one unit in the log line.
    disabled : bool
        Never draw a tqdm bar (``disable_tqdm`` in the config, ``--no-progress``); log lines
        are still written.

    Examples
    --------
    >>> with progress(3, "demo", disabled=True) as bar:
    ...     for _ in range(3):
    ...         bar.update(1)
    """
    bar: _LogProgress | _TqdmProgress
    if use_tqdm(disabled):
        bar = _TqdmProgress(total, desc, unit)
    else:
        bar = _LogProgress(total, desc, unit, _interval_s())
    try:
        yield bar
    finally:
        bar.close()
