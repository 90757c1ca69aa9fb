"""Hostile YAML: alias bombs and deep nesting end with exit 2 and one line, never a hang."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.store.cohort import make_cohort
from pacs_numba.yamlfile import MAX_YAML_DEPTH, MAX_YAML_VALUES

# A hang guard, not a timing assertion: each refusal takes well under a second here
# (measured in the loader alone), while the unbounded loader ran for minutes.
HANG_GUARD_S = 30

DATA = """\
data:
  models-root: /data/models
  hr-root: /data/hr
  lr-root: /data/lr
  spacings: [3mm]
  pulses: [t1c]
  models: [BSPLINE, ECLARE]
  kfolds: 2
  seed: 1
  out: /data/manifest.json
"""


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _no_hang(seconds: float) -> Iterator[None]:
    def _raise(signum: int, frame: object) -> None:
        raise _Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _bomb(levels: int = 9, width: int = 9) -> str:
    """Nested anchors in an unused key, then ``patch_size: *a8``: width**levels values."""
    lines = ["  anchors:", "    a0: &a0 [" + ", ".join(["1"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return (DATA + "pacs_sr:\n  experiment_name: x\n" + "\n".join(lines)
            + f"\n  patch_size: *a{levels - 1}\n  stride: 4\n")


def _run(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    cfg = tmp_path / "hostile.yaml"
    cfg.write_text(text)
    capsys.readouterr()
    with _no_hang(HANG_GUARD_S):
        rc = cli.main(["train", "--config", str(cfg), "--out-root", str(tmp_path / "out")])
    err = capsys.readouterr().err
    return rc, err


def _one_error_line(err: str, cfg: str, *parts: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "ERROR" in lines[0] and f"{cfg}: YAML refused:" in lines[0], err
    for part in parts:
        assert part in lines[0], err
    assert "Traceback" not in err


def test_alias_bomb_in_a_known_key_is_refused(tmp_path, capsys):
    rc, err = _run(tmp_path, _bomb(), capsys)
    assert rc == 2
    _one_error_line(err, str(tmp_path / "hostile.yaml"), "aliases",
                    f"more than {MAX_YAML_VALUES:,} values")


@pytest.mark.parametrize("kind", ["flow", "block-sequence", "block-mapping"])
def test_deep_nesting_is_refused(tmp_path, capsys, kind):
    depth = 20_000
    if kind == "flow":
        body = "pacs_sr:\n  patch_size: " + "[" * depth + "]" * depth + "\n"
    elif kind == "block-sequence":
        body = "pacs_sr:\n  patch_size:\n" + "  " + "- " * depth + "1\n"
    else:  # each level one more space of indentation: quadratic text, so fewer levels
        body = "pacs_sr:\n" + "".join(f"{' ' * (i + 1)}k{i}:\n" for i in range(2_000))
    rc, err = _run(tmp_path, DATA + body, capsys)
    assert rc == 2
    _one_error_line(err, str(tmp_path / "hostile.yaml"),
                    f"nesting deeper than {MAX_YAML_DEPTH} levels")


def test_aliases_that_nest_deep_are_refused(tmp_path, capsys):
    # each anchor is shallow where it is written; only the expansion is deep
    chain = ["  a0: &a0 [1]"] + [f"  a{i}: &a{i} [*a{i - 1}]" for i in range(1, 200)]
    text = DATA + "anchors:\n" + "\n".join(chain) + "\npacs_sr:\n  patch_size: *a199\n"
    rc, err = _run(tmp_path, text, capsys)
    assert rc == 2
    _one_error_line(err, str(tmp_path / "hostile.yaml"), "aliases (*name) nest deeper")


def test_ordinary_anchors_still_load(tmp_path):
    cfg = make_cohort(tmp_path / "c", patients=4, shape=(12, 12, 12), spacings=("3mm",),
                      pulses=("t1c",), kfolds=2, patch_size=8, stride=8)
    lines = cfg.read_text().splitlines()
    at = {line.split(":")[0].strip(): i for i, line in enumerate(lines)}
    lines[at["patch_size"]] = "  patch_size: &edge 8"
    lines[at["stride"]] = "  stride: *edge"
    cfg.write_text("\n".join(lines) + "\n")
    full = load_config(cfg)
    assert full.pacs_sr.patch_size == full.pacs_sr.stride == 8
