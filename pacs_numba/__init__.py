"""pacs_numba: PaCS-SR patchwise convex stacking on a shared-memory Numba engine."""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = ["__version__"]
