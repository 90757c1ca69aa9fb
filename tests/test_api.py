"""The public API (issue 17): cheap to import, every name resolves, docs/api.md's notebook runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import pacs_numba

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_import_is_cheap_and_lazy():
    code = ("import sys, pacs_numba; "
            "print(sorted(m for m in ('numba', 'numpy', 'scipy', 'nibabel') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_every_public_name_resolves_and_is_documented():
    for name in pacs_numba.__all__:
        obj = getattr(pacs_numba, name)
        if name != "__version__":
            assert obj.__doc__, f"pacs_numba.{name} has no docstring"
            assert f"`{name}`" in DOC.read_text(), f"docs/api.md does not list {name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pacs_numba.nope  # noqa: B018
    assert set(pacs_numba.__all__) <= set(dir(pacs_numba))


def test_the_notebook_in_docs_api_runs(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 22  # a notebook cell, not a program
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(DOC), "exec"), {"__name__": "notebook"})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("test PSNR ") and float(out[0].split()[-1]) > 10
    pid, ok = out[1].split()
    assert ok == "True"
    assert (tmp_path / f"{pid}-blend.nii.gz").is_file()
    assert (tmp_path / "cohort" / "results").is_dir()
