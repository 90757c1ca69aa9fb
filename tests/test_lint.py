"""``ruff check`` over the repository, as part of the README's test command (and so of .ci/run).

The package's doctests run through pytest itself (``--doctest-modules`` with ``pacs_numba`` in
``testpaths``, see pyproject.toml), so they need no test here.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    if "No module named ruff" in proc.stderr:
        raise AssertionError("ruff is not installed: pip install '.[test]' brings it")
    assert proc.returncode == 0, f"ruff check found problems:\n{proc.stdout}{proc.stderr}"


def test_doctests_are_collected() -> None:
    """The pytest configuration that makes ``python -m pytest`` run the package's doctests."""
    import tomllib

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in cfg["addopts"].split()
    assert "pacs_numba" in cfg["testpaths"]
