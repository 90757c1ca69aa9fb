"""Logging handlers for the command line.  Only ``cli`` and ``diagnose`` call this."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm

FORMAT = "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"


_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}


def _bars_on_screen() -> bool:
    """Whether a tqdm bar is open (only then must log lines go through ``tqdm.write``)."""
    tqdm_mod = sys.modules.get("tqdm")
    if tqdm_mod is None:
        return False
    return bool(getattr(tqdm_mod.tqdm, "_instances", None))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record.

    ``main()`` may be called many times in one process (tests, notebooks) while ``sys.stderr``
    is swapped underneath; a handler bound to the stream of the first call would write to a
    closed file.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass

    def emit(self, record: logging.LogRecord) -> None:
        """Write the record; while a tqdm bar is drawn, above it through ``tqdm.write``.

        A plain write would land after the bar's text on the same line and leave a
        stale copy of the bar behind; ``tqdm.write`` clears the bars, prints the
        line and redraws them.
        """
        if not _bars_on_screen():
            super().emit(record)
            return
        try:

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging's contract: never raise from emit
            self.handleError(record)


def resolve_level(verbose: int = 0, quiet: int = 0, default: str = "INFO") -> int:
    """Log level from ``-v``/``-q`` counts, else ``PACS_LOG_LEVEL``, else ``default``."""
    base = _LEVELS.get(os.environ.get("PACS_LOG_LEVEL", default).upper(), logging.INFO)
    return min(logging.CRITICAL, max(logging.DEBUG, base - 10 * verbose + 10 * quiet))


def setup_logging(level: int = logging.INFO) -> None:
    """Send the package's records (and captured warnings) to stderr, one line each."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_pacs_numba", False):
            root.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._pacs_numba = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    # numba logs its compiler passes at DEBUG; they drown ours.
    logging.getLogger("numba").setLevel(max(level, logging.INFO))


class _FileHandler(logging.FileHandler):
    """A log file that, when a write fails (full disk, quota, lost mount), says so once.

    logging's default reaction to a failing handler is a ``--- Logging error ---``
    traceback on stderr for every record.  This handler instead detaches itself at the
    first failure and logs one ERROR line saying where the log goes from then on
    (stderr, which the other handler still writes); the run goes on.
    """

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        exc = sys.exc_info()[1]
        root = logging.getLogger()
        if self not in root.handlers:
            return
        root.removeHandler(self)
        try:
            self.close()
        except OSError:
            pass  # closing flushes, which fails again on a full disk
        reason = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
        logging.getLogger("pacs_numba.cli.logsetup").error(
            "cannot write the log file %s (%s); logging continues on stderr only",
            self.baseFilename,
            reason,
        )


def add_file_log(path: Path, level: int = logging.INFO) -> logging.Handler | None:
    """Also write the log to ``path`` (the config's ``log_to_file``); returns the handler.

    If the file cannot be created, logs one WARNING and returns None: a log file is a
    convenience, and the records still reach stderr.  If a later write fails, the handler
    detaches itself with one ERROR line (see :class:`_FileHandler`).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _FileHandler(path, encoding="utf-8")
    except OSError as exc:
        logging.getLogger("pacs_numba.cli.logsetup").warning(
            "cannot create the log file %s (%s: %s); logging to stderr only",
            path,
            type(exc).__name__,
            exc,
        )
        return None
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(level)
    handler._pacs_numba = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    return handler
