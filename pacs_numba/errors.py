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
