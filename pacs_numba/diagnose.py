"""``python -m pacs_numba.diagnose``: check a node before a run.

The same as ``pacs-numba diagnose`` (:mod:`pacs_numba.cli.diagnose`).
"""

from __future__ import annotations

from .cli.diagnose import main

if __name__ == "__main__":
    raise SystemExit(main())
