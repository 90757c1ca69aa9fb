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


# --------------------------------------------------------------------------------------
# A log file that cannot be written
# --------------------------------------------------------------------------------------
@pytest.fixture
def _root_logging():
    """Leave the root logger as it was (setup_logging and add_file_log change it)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _log_through_a_failing_file(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    import logging

    from pacs_numba.logsetup import add_file_log, setup_logging

    setup_logging(logging.INFO)
    assert add_file_log(path) is not None
    log = logging.getLogger("pacs_numba.test")
    for i in range(9):
        log.info("record %d %s", i, "x" * 4000)
    return capsys.readouterr().err


def _one_failure_line_then_stderr(err: str, path: Path) -> None:
    assert "Logging error" not in err and "Traceback" not in err, err[:2000]
    failures = [ln for ln in err.splitlines() if "cannot write the log file" in ln]
    assert len(failures) == 1, err[:2000]
    assert " ERROR " in failures[0] and str(path) in failures[0]
    assert "No space left on device" in failures[0]
    assert "logging continues on stderr only" in failures[0]
    # every record still reached stderr
    assert all(f"record {i} " in err for i in range(9))


def test_log_file_on_dev_full_fails_once_and_logging_goes_on(
    _root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path("/dev/full")
    if not path.exists():
        pytest.skip("no /dev/full on this system")
    _one_failure_line_then_stderr(_log_through_a_failing_file(path, capsys), path)


@pytest.fixture
def full_tmpfs(tmp_path: Path):
    """A real 64 KiB tmpfs, filled up (needs root; skipped otherwise)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        (mnt / "logs").mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # ENOSPC: full
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_log_file_on_a_full_disk_fails_once_and_logging_goes_on(
    _root_logging: None, full_tmpfs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = full_tmpfs / "logs" / "run.log"
    _one_failure_line_then_stderr(_log_through_a_failing_file(path, capsys), path)


def test_log_file_that_cannot_be_created_is_one_warning(
    _root_logging: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from pacs_numba.logsetup import add_file_log, setup_logging

    setup_logging(logging.INFO)
    (tmp_path / "file").write_text("")
    assert add_file_log(tmp_path / "file" / "logs" / "run.log") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and " WARNING " in err and "cannot create the log file" in err
