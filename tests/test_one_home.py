"""One home per rule (issue 17): each rule is written once, and every caller says the same thing.

The stride rule, the volume-list check, ``--mem-budget`` parsing, the task filter and the
input layout each have one function; these tests call it through every caller that used
to carry its own copy and check that the answers (and the messages) agree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pacs_numba.cli import main
from pacs_numba.config import DataConfig, check_stride, load_config, stride_problem
from pacs_numba.core.blending import expert_mean
from pacs_numba.core.cellstats import StatsKey
from pacs_numba.core.checks import as_volume_list, check_volume_list
from pacs_numba.core.statistics import check_volumes, volume_moments
from pacs_numba.core.tiling import TileGrid
from pacs_numba.errors import ConfigError, InputError
from pacs_numba.resources import costs, planning
from pacs_numba.resources.units import parse_budget
from pacs_numba.store import layout
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.manifest import filter_tasks, hr_path, lr_path, sr_path

STRIDE_MSG = r"must be an integer in \[1, patch_size=4\]; got 5"


# ---------------------------------------------------------------- 1 <= stride <= patch_size
@pytest.mark.parametrize(("patch", "stride", "ok"), [
    (4, 1, True), (4, 4, True), (4, 5, False), (4, 0, False), (4, -1, False),
    (4, 2.0, False), (4, True, False), (4, np.int64(3), True), (4, "2", False),
])
def test_stride_problem(patch: int, stride: object, ok: bool) -> None:
    assert (stride_problem(patch, stride) is None) is ok


def test_every_caller_of_the_stride_rule_says_the_same() -> None:
    callers = [
        lambda: check_stride(4, 5),
        lambda: TileGrid((8, 8, 8), 4, 5),
        lambda: StatsKey.make(region="window", stride=5, patch_size=4, window="hann",
                              edge_power=1.0, grad_operator="sobel", with_edge=False,
                              with_grad=False),
        lambda: costs.stage_cost("fit", (8, 8, 8), 2, patch_size=4, stride=5),
        lambda: planning.check_tile_settings(4, 5, (8, 8, 8), "cfg.yaml"),
        lambda: make_cohort(Path("/nonexistent-never-written"), patients=4, patch_size=4,
                            stride=5),
    ]
    for call in callers:
        with pytest.raises(ConfigError, match=STRIDE_MSG):
            call()


# ---------------------------------------------------------------- volume lists
def test_volume_list_rule() -> None:
    a, b = np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 5), np.float32)
    assert check_volume_list([a, a]) == (2, 3, 4)
    with pytest.raises(InputError, match="need at least one expert volume, got none"):
        check_volume_list([])
    with pytest.raises(InputError, match=r"expert 0 has shape \(3, 4\); expected a 3-D volume"):
        check_volume_list([a[0]])
    with pytest.raises(InputError, match=r"expert 1 has shape \(2, 3, 5\); expected \(2, 3, 4\) "
                                         "like expert 0"):
        check_volume_list([a, b])


def test_every_caller_of_the_volume_list_rule_says_the_same() -> None:
    a, b = np.ones((2, 3, 4), np.float32), np.ones((2, 3, 5), np.float32)
    mask = np.ones((2, 3, 4), bool)
    for call, like in [(lambda: as_volume_list([a, b]), "expert 0"),
                       (lambda: expert_mean([a, b]), "expert 0"),
                       (lambda: check_volumes(a, [a, b]), "the HR volume"),
                       (lambda: volume_moments([a, b], mask), "volume 0")]:
        with pytest.raises(InputError, match=rf"1 has shape \(2, 3, 5\); expected \(2, 3, 4\) "
                                             rf"like {like}"):
            call()
    for call in (lambda: as_volume_list([]), lambda: expert_mean([]),
                 lambda: check_volumes(a, [])):
        with pytest.raises(InputError, match="need at least one expert volume, got none"):
            call()


# ---------------------------------------------------------------- --mem-budget
def test_parse_budget() -> None:
    assert parse_budget(None) is None and parse_budget("") is None
    assert parse_budget("1.5G") == 3 * 2**29
    with pytest.raises(ConfigError, match=r"--mem-budget: cannot read 'lots' as a memory size"):
        parse_budget("lots")


@pytest.fixture(scope="module")
def cohort_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = make_cohort(tmp_path_factory.mktemp("one_home") / "c", patients=4, shape=(12, 12, 12),
                      spacings=("3mm",), pulses=("t1c",), kfolds=2, patch_size=4, stride=2)
    return Path(out)  # the config file it wrote


@pytest.mark.parametrize("command", ["train", "diagnose"])
def test_every_command_reads_mem_budget_the_same_way(command: str, cohort_config: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    rc = main([command, "--config", str(cohort_config), "--mem-budget", "lots"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--mem-budget: cannot read 'lots' as a memory size" in err
    assert "Traceback" not in err


def test_python_m_diagnose_reads_mem_budget_the_same_way(capsys: pytest.CaptureFixture) -> None:
    from pacs_numba.cli.diagnose import main as diagnose_main

    assert diagnose_main(["--mem-budget", "lots"]) == 2
    assert "--mem-budget: cannot read 'lots' as a memory size" in capsys.readouterr().err


# ---------------------------------------------------------------- the task filter
def _data(tmp_path: Path) -> DataConfig:
    return DataConfig(models_root=tmp_path / "m", hr_root=tmp_path / "h", lr_root=tmp_path / "l",
                      spacings=("3mm", "5mm"), pulses=("t1c", "t2w"), models=("A", "B"),
                      kfolds=3, seed=1, out=tmp_path / "manifest.json")


def test_filter_tasks(tmp_path: Path) -> None:
    data, manifest = _data(tmp_path), {"folds": [{}, {}, {}]}
    assert filter_tasks(manifest, data) == ([1, 2, 3], ["3mm", "5mm"], ["t1c", "t2w"])
    assert filter_tasks(manifest, data, [3, 1, 3], ["5mm"], None) == ([1, 3], ["5mm"],
                                                                       ["t1c", "t2w"])
    with pytest.raises(ConfigError, match=r"--folds 4: the manifest has folds 1\.\.3"):
        filter_tasks(manifest, data, [4], fold_option="--folds")
    with pytest.raises(ConfigError, match=r"--pulse 'flair': data\.pulses in the config has "
                                          r"\['t1c', 't2w'\]"):
        filter_tasks(manifest, data, pulses=["flair"])


# ---------------------------------------------------------------- the input layout
def test_input_layout_has_one_home(tmp_path: Path) -> None:
    data = _data(tmp_path)
    assert hr_path(data, "p1", "t1c") == tmp_path / "h" / "p1" / "p1-t1c.nii.gz"
    assert lr_path(data, "p1", "3mm", "t1c") == tmp_path / "l" / "3mm" / "p1" / "p1-t1c.nii.gz"
    assert sr_path(data, "A", "p1", "3mm", "t1c") == (
        tmp_path / "m" / "A" / "3mm" / "output_volumes" / "p1-t1c.nii.gz")
    assert sr_path(data, "A", "p1", "3mm", "t1c") == layout.expert_file(
        data.models_root, "A", "3mm", "p1", "t1c")


def test_generated_cohort_follows_the_layout(cohort_config: Path) -> None:
    d = load_config(cohort_config).data
    for pid in ("sub-001", "sub-004"):
        assert hr_path(d, pid, "t1c").is_file()
        assert lr_path(d, pid, "3mm", "t1c").is_file()
        for model in d.models:
            assert sr_path(d, model, pid, "3mm", "t1c").is_file()


# ---------------------------------------------------------------- one RSS sampler
def test_one_rss_sampler_for_tests_and_scripts() -> None:
    import ast

    root = Path(__file__).resolve().parents[1]
    samplers = []
    for f in [*(root / "tests").rglob("*.py"), *(root / "scripts").glob("*.py")]:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef) and "Sampler" in node.name:
                samplers.append(f"{f.relative_to(root)}:{node.name}")
    assert samplers == ["tests/rss_sampler.py:RssSampler"]


def test_rss_sampler_follows_children_and_phases() -> None:
    import subprocess
    import sys

    from rss_sampler import RssSampler

    child = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(64 << 20); "
                              "print('ready', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with RssSampler(0.01, include_children=True) as s:
            s.phase = "child up"
            s.sample()
    finally:
        child.kill()
        child.communicate()  # reaps it and closes its stdout
    assert s.peak_by_pid[child.pid] >= 64 << 20
    assert s.peak_bytes >= s.peak_root_bytes + (64 << 20)
    assert s.peak_by_phase["child up"] == s.peak_bytes
    assert s.peak_anon_bytes > 0 and len(s.samples) >= 3
