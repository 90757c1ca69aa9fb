"""Exceptions raised to users.  Only ``cli.main`` catches them."""

from __future__ import annotations


class PacsError(Exception):
    """Base class of every error pacs_numba reports to a user."""


class InputError(PacsError, ValueError):
    """An input file is missing, unreadable, not NIfTI, of the wrong shape or dimension."""


class ConfigError(PacsError, ValueError):
    """The YAML config, the manifest or a command-line setting is wrong."""


class BudgetError(PacsError, MemoryError):
    """Not even one patient fits in the memory the job has."""


class OutputError(PacsError, OSError):
    """An output could not be written (no space, no permission); nothing partial is left."""


class Interrupted(PacsError):
    """The run was stopped by SIGTERM (SLURM time limit) or SIGINT; complete outputs are kept."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum
