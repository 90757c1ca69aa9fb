"""The command line a person expects: one ERROR line per mistake, help that helps, and runs that go on.

CLI tests call ``cli.main([...])`` and check the exit code and stderr (STYLE.md §5).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pacs_numba import cli
from pacs_numba.errors import InputError
from pacs_numba.model import read_weights_json


# --------------------------------------------------------------------------------------
# weights.json
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "vec",
    [["0.5", "0.5"], {"a": 0.5, "b": 0.5}, "0.5,0.5", [[0.5], [0.5]], [True, False], None, 0.5],
)
def test_weights_json_with_non_numbers_names_file_and_tile(tmp_path: Path, vec: object) -> None:
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"0": [0.5, 0.5], "3": vec}))
    with pytest.raises(InputError) as info:
        read_weights_json(path, n_tiles=8, n_models=2)
    msg = str(info.value)
    assert str(path) in msg and "tile 3 has" in msg
    assert "expected a list of 2 finite numbers" in msg
    assert "\n" not in msg


def test_weights_json_good_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"1": [0.25, 0.75], "2": [1, 0]}))
    w, learned = read_weights_json(path, n_tiles=3, n_models=2)
    assert learned.tolist() == [False, True, True]
    assert w.tolist() == [[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]]
