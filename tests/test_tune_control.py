"""``pacs-numba tune`` under control (issue 16): SIGTERM and Ctrl-C as ``train``, the grid's
size said and bounded before it starts, a key given twice refused; its best expert and gain
from the one definition (issue 20)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.core.scoring import gain_over_best
from pacs_numba.errors import ConfigError
from pacs_numba.runs import tune as tune_mod
from pacs_numba.runs.tune import load_grid, run_tune
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.manifest import build_manifest, write_manifest

SHAPE = (16, 18, 14)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("tunectl")
    cfg = make_cohort(root, patients=4, shape=SHAPE, spacings=("3mm",), pulses=("t1c",),
                      seed=2, kfolds=2, patch_size=8, stride=8)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=1, log_to_file=False)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    return cfg, root / "cache"


def _grid(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_key_given_twice_in_the_grid_is_refused(cohort, tmp_path):
    config = load_config(cohort[0])
    grid = _grid(tmp_path / "g.yaml", "stride: [4]\nlambda_edge: [0]\nstride: [8]\n")
    with pytest.raises(ConfigError, match=r"g.yaml: key 'stride' is given twice.*lines 1 and 3"):
        load_grid(grid, config)


def test_a_grid_above_the_bound_needs_yes_and_its_size_is_logged(cohort, tmp_path, capsys,
                                                                 caplog):
    cfg, cache = cohort
    grid = _grid(tmp_path / "g.yaml", "lambda_ridge: [0.001, 0.01, 0.1]\n")
    base = ["tune", "--config", str(cfg), "--grid", str(grid), "--out", str(tmp_path / "o"),
            "--cache-dir", str(cache), "--no-progress"]
    config = load_config(cfg)
    cands = load_grid(grid, config)
    with pytest.raises(ConfigError, match=rf"{len(cands)} setting\(s\) x 2 fold\(s\) x 1 "
                       r"spacing\(s\) x 1 pulse\(s\) = \d+ units, more than 3; .*--yes"):
        run_tune(config, cands, tmp_path / "o", cache_dir=cache, max_units=3)
    assert not (tmp_path / "o" / "results").exists()  # refused before anything ran
    with caplog.at_level(logging.INFO, logger="pacs_numba"):
        res = run_tune(config, cands, tmp_path / "o", cache_dir=cache, max_units=3,
                       yes=True, no_progress=True)
    assert res.units_done == 2 * len(cands)
    assert f"the grid is {len(cands)} setting(s) x 2 fold(s)" in caplog.text
    # the estimate multiplies the unit's own fit and scoring, not the statistics before it
    est = re.search(r"first unit took ([\d.]+) s to fit and score \(after ([\d.]+) s of "
                    r"statistics\); about \S+ for the other (\d+) unit", caplog.text)
    assert est and int(est.group(3)) == 2 * len(cands) - 1
    assert cli.main(base) == 0  # below the default bound: runs (everything resumed)


def test_tune_names_its_protocol_and_uses_the_one_best_expert(cohort, tmp_path):
    cfg, cache = cohort
    config = load_config(cfg)
    cands = load_grid(_grid(tmp_path / "g.yaml", "lambda_ridge: [0.001, 0.1]\n"), config)
    out = tmp_path / "o"
    res = run_tune(config, cands, out, cache_dir=cache, no_progress=True)
    stacked, experts = {}, {}
    for path in (out / "results").glob("*.json"):
        unit = json.loads(path.read_text())
        if unit["candidate"] != res.table[0]["candidate"]:
            continue
        for pid, r in unit["patients"].items():
            key = f"{unit['fold']}/{pid}"
            stacked[key] = r
            for name, e in r["experts"].items():
                experts.setdefault(name, {})[key] = e
    g = gain_over_best("hr_free", stacked, experts)
    assert res.experts["_best"]["name"] == g.best
    assert res.table[0]["gain_psnr"] == pytest.approx(g.psnr)
    best = max(experts, key=lambda n: np.mean([m["psnr"] for m in experts[n].values()]))
    assert g.best == best
    md = (out / "tune_results.md").read_text()
    assert "HR-free protocol: statistics and mask from the experts" in md
    assert "never across" in md


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_stop_between_units_and_keep_finished_ones(
        cohort, tmp_path, monkeypatch, caplog, signum, code):
    cfg, cache = cohort
    grid = _grid(tmp_path / "g.yaml", "lambda_ridge: [0.001, 0.01, 0.1]\n")
    out = tmp_path / "o"
    real = tune_mod._fit_and_score
    calls = []

    def fit_then_signal(*a, **k):
        unit = real(*a, **k)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signum)  # arrives while the first unit finishes
        return unit

    monkeypatch.setattr(tune_mod, "_fit_and_score", fit_then_signal)
    argv = ["tune", "--config", str(cfg), "--grid", str(grid), "--out", str(out),
            "--cache-dir", str(cache), "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == code
    assert len(calls) == 1  # no new unit started after the signal
    assert len(list((out / "results").glob("*.json"))) == 1  # the finished one is kept
    name = signal.Signals(signum).name
    assert f"received {name}: finishing units in flight" in caplog.text
    assert f"stopped by {name} after 1 of " in caplog.text and "resume" in caplog.text
    monkeypatch.setattr(tune_mod, "_fit_and_score", real)
    config = load_config(cfg)
    res = run_tune(config, load_grid(grid, config), out, cache_dir=cache, no_progress=True)
    assert res.units_resumed == 1  # the rerun resumes
    assert res.units_done == len(list((out / "results").glob("*.json"))) - 1
