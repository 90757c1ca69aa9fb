"""Logging handlers for the command line (STYLE.md §7).  Only ``cli`` and ``diagnose`` call this."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from .errors import OutputError

FORMAT = "%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"

_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}


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


def add_file_log(path: Path, level: int = logging.INFO) -> logging.Handler:
    """Also write the log to ``path`` (the config's ``log_to_file``); returns the handler."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:  # e.g. out_root is a file: a user error (exit 2), not a bug
        raise OutputError(
            f"cannot write the log file '{path}' (pacs_sr.log_to_file: true): "
            f"{exc.strerror or exc}; check the out_root (or --out-root)"
        ) from exc
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.setLevel(level)
    handler._pacs_numba = True  # type: ignore[attr-defined]
    logging.getLogger().addHandler(handler)
    return handler
