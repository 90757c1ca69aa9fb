"""Shared fixtures and named tolerances for the test-suite."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

# Compare float32 kernel results to the float64/float32 NumPy twins.
RTOL32 = 1e-5
ATOL32 = 1e-6
# Statistics accumulated in float64 from float32 inputs.
RTOL64 = 1e-9

# Keep Numba from writing its cache next to the installed sources in CI clones.
os.environ.setdefault("PACS_LOG_LEVEL", "WARNING")


_ROOT_LEVEL = logging.getLogger().level
_NUMBA_LEVEL = logging.getLogger("numba").level


@pytest.fixture(autouse=True)
def _restore_logging():
    """Undo what a ``cli.main`` call did to the root logger (level, handlers).

    The CLI configures logging for its process; in the test process that would leak into
    later tests (a ``-q`` run leaves the root at ERROR and hides the warnings that they read
    with ``caplog``).  Module-scoped fixtures call the CLI before this fixture starts, so
    the state is restored to the one at import time, not to the one at set-up.
    """
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if type(h).__module__.startswith("pacs_numba"):
            root.removeHandler(h)
            h.close()
    root.setLevel(_ROOT_LEVEL)
    logging.getLogger("numba").setLevel(_NUMBA_LEVEL)


@pytest.fixture(params=[0, 1, 2])
def seed(request: pytest.FixtureRequest) -> int:
    """Seeds for randomised kernel checks."""
    return int(request.param)


@pytest.fixture
def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Write ``{relative path: text}`` under ``root`` (fake cgroup and /proc trees)."""
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\n")
    return root
