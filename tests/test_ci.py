"""``.ci/run``: the README's test command, after Debian's Chromium for the browser test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from headless_chromium import require_chromium

REPO = Path(__file__).resolve().parents[1]
CI_RUN = REPO / ".ci" / "run"
CHROMIUM_STEP = REPO / ".ci" / "chromium.sh"
TOOLS = ("bash", "env", "mktemp", "rm", "tail", "sleep")
FAKE_APT = r"""#!/usr/bin/env bash
# fake apt-get: count the calls; fail the first $FAIL_FIRST installs (all: -1), and on
# success put a chromium on PATH as the real package would
[[ $1 == update ]] && exit 0
n=0
[[ -f $APT_DIR/install.count ]] && n=$(<"$APT_DIR/install.count")
n=$((n + 1))
echo "$n" >"$APT_DIR/install.count"
if ((FAIL_FIRST < 0 || n <= FAIL_FIRST)); then
    echo "E: Unable to fetch some archives, maybe run apt-get update" >&2
    exit 100
fi
printf '#!/usr/bin/env bash\necho Chromium 156\n' >"$BIN/chromium"
chmod +x "$BIN/chromium" 2>/dev/null || exit 1
"""


def _readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    found = re.findall(r"^python3 -m venv .*pip install \"\.\[test\]\".*$", text, re.M)
    assert len(found) == 1, found
    return found[0]


def test_ci_run_installs_chromium_before_the_readme_test_command():
    lines = CI_RUN.read_text().splitlines()
    command = _readme_test_command()
    assert lines.count(command) == 1  # exactly the README's line, unchanged
    assert lines.index("bash .ci/chromium.sh") < lines.index(command)


@pytest.fixture
def step(tmp_path: Path):
    if sys.platform != "linux" or shutil.which("bash") is None:
        pytest.skip("the CI step is bash on Linux")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in (*TOOLS, "chmod"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "apt-get").write_text(FAKE_APT)
    (bin_dir / "apt-get").chmod(0o755)

    def run(fail_first: int, ci: bool) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        env.update(PATH=str(bin_dir), BIN=str(bin_dir), APT_DIR=str(tmp_path),
                   FAIL_FIRST=str(fail_first), PACS_CI_APT_TRIES="3", PACS_CI_APT_WAIT="0")
        if ci:
            env["CI"] = "true"
        return subprocess.run(["bash", str(CHROMIUM_STEP)], env=env, capture_output=True,
                              text=True, timeout=60)

    return run


def _installs(tmp_path: Path) -> int:
    f = tmp_path / "install.count"
    return int(f.read_text()) if f.exists() else 0


def test_chromium_step_under_ci_fails_when_the_download_keeps_failing(tmp_path, step):
    res = step(-1, ci=True)
    assert res.returncode == 1, res
    assert "apt-get install chromium failed 3 times under CI=true" in res.stderr
    assert "E: Unable to fetch some archives" in res.stderr
    assert _installs(tmp_path) == 3


def test_chromium_step_retries_a_failed_download(tmp_path, step):
    res = step(2, ci=True)
    assert res.returncode == 0, res
    assert "apt-get failed (try 1 of 3); retrying" in res.stderr
    assert "chromium: installed" in res.stdout and "(apt-get, try 3)" in res.stdout
    assert _installs(tmp_path) == 3


def test_chromium_step_outside_ci_installs_nothing_and_says_so(tmp_path, step):
    res = step(0, ci=False)
    assert res.returncode == 0, res
    assert res.stdout.count("\n") == 1 and "the report's browser test will skip" in res.stdout
    assert _installs(tmp_path) == 0


def test_browser_tests_fail_under_ci_and_skip_elsewhere_without_chromium(tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no chromium here
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true but chromium is not installed"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="apt-get install chromium"):
        require_chromium()
