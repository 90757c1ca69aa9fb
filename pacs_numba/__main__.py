"""``python -m pacs_numba`` runs the command line."""

from .cli import main

raise SystemExit(main())
