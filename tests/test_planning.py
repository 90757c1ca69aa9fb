"""One planner for the engine and diagnose; every stage planned before any volume is read.

Real runs of the CLI on small generated cohorts; the job's limits come from the real
``detect_limits`` (with ``SLURM_MEM_PER_NODE`` or ``--mem-budget``), and the process
baseline is pinned so that plans made at different moments can be compared.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from pacs_numba import cli, diagnose
from pacs_numba.config import load_config
from pacs_numba.resources import limits
from pacs_numba.resources.planning import plans_json
from pacs_numba.runs import engine
from pacs_numba.runs.engine import Engine, RunOptions
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.locks import LOCK_FILE
from pacs_numba.store.manifest import build_manifest, write_manifest

MiB = 1 << 20
BASELINE = 120 * MiB
SHAPE = (56, 60, 52)


def _cohort(root: Path, **pacs_sr) -> Path:
    cfg = make_cohort(root, patients=4, shape=SHAPE, spacings=("3mm",), pulses=("t1c",),
                      seed=5, kfolds=2, patch_size=8, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(dict(num_workers=4, log_to_file=False, **pacs_sr))
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    return cfg


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cohort(tmp_path_factory.mktemp("plan"))


@pytest.fixture
def pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the baseline (the RSS changes between two plans) and clear worker overrides."""
    monkeypatch.setattr(engine, "baseline_bytes", lambda: BASELINE)
    for k in ("PACS_NUMBA_MAX_WORKERS", "PACS_SR_MAX_WORKERS", "SLURM_MEM_PER_CPU"):
        monkeypatch.delenv(k, raising=False)


def _outputs(root: Path) -> list[Path]:
    """Files under ``root`` but the task lock, which a finished run leaves empty."""
    if not root.exists():
        return []
    files = [p for p in root.rglob("*") if p.is_file()]
    for lock in [p for p in files if p.name == LOCK_FILE]:
        assert lock.stat().st_size == 0, f"{lock} still names a holder"
    return [p for p in files if p.name != LOCK_FILE]


def test_engine_and_diagnose_plan_the_same(cohort, pinned, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "4096")
    budget = 3 * 1024 * MiB
    cache = tmp_path / "cache"
    run = Engine(load_config(cohort), RunOptions(cache_dir=cache, workers=3,
                                                 mem_budget_bytes=budget, no_progress=True,
                                                 out_root=tmp_path / "out"))
    task = run.tasks(fold=1)[0]
    result = run.train(task)
    assert set(result.plans) == {"fit", "evaluate"}
    # fit: the fold's 2 train patients; evaluate: 2 test + 2 train (evaluate_train)
    assert result.plans["fit"].n_patients == 2 and result.plans["evaluate"].n_patients == 4
    # each evaluated patient's own blend-and-score seconds, by split
    assert {k: len(v) for k, v in result.patient_seconds.items()} == {"train": 2, "test": 2}
    assert all(s > 0 for split in result.patient_seconds.values() for s in split.values())
    # --workers 3 < 4 patients; the CPUs may bind first
    assert result.plans["evaluate"].pool.width == min(3, int(run.limits.cpus.value))

    assert diagnose.main(["--json", "--config", str(cohort), "--cache-dir", str(cache),
                          "--workers", "3", "--mem-budget", str(budget)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and "checks" in doc
    assert doc["plan"] == plans_json(result.plans)
    assert doc["plan"]["shape"] == list(SHAPE) and doc["plan"]["n_experts"] == 4
    for name, stage in doc["plan"]["stages"].items():
        sp = result.plans[name]
        assert stage["width"] == sp.pool.width and stage["threads"] == sp.pool.threads
        assert stage["limit_bytes"] == budget  # --mem-budget binds below SLURM's 4096 MiB
        assert stage["baseline_bytes"] == BASELINE
        for key in ("n_patients", "per_patient_bytes", "fixed_bytes", "width", "threads",
                    "needed_bytes", "needed_bytes_one"):
            assert isinstance(stage[key], int), key
        assert stage["fixed_bytes"] + stage["width"] * stage["per_patient_bytes"] == \
            stage["needed_bytes"]
    # the same numbers come from the planner called directly, as diagnose does
    assert plans_json(run.plan(task)) == doc["plan"]


def test_a_job_too_small_for_evaluate_exits_3_before_the_fit(cohort, pinned, monkeypatch,
                                                              tmp_path, capsys):
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "65536")
    probe = Engine(load_config(cohort), RunOptions(workers=1))
    plans = probe.plan(probe.tasks(fold=1)[0])
    # the smallest SLURM --mem (MiB) with which the fit, but not the evaluate stage, can run
    mib = math.ceil(plans["fit"].needed_bytes_one / MiB)
    assert mib * MiB < plans["evaluate"].needed_bytes_one, (
        "the cohort must make evaluate need more than the fit: "
        f"{plans['fit'].needed_bytes_one} vs {plans['evaluate'].needed_bytes_one}")
    monkeypatch.setenv("SLURM_MEM_PER_NODE", str(mib))
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc = cli.main(["train", "--config", str(cohort), "--fold", "1", "--workers", "1",
                   "--out-root", str(out), "--cache-dir", str(cache), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 3, err
    assert f"SLURM_MEM_PER_NODE={mib}" in err and "not even one patient fits" in err
    assert "Traceback" not in err
    # stopped before the fit: no model, no weights, no record, nothing decompressed
    assert _outputs(out) == []
    assert not list(cache.glob("*.npy"))


def test_patch_size_beyond_the_volume_is_refused_before_any_work(tmp_path, capsys):
    # 1000 passes the config's own range check ([1, 4096]) but not the volume's shape
    cfg = _cohort(tmp_path / "c", patch_size=1000, stride=16)
    out, cache = tmp_path / "out", tmp_path / "cache"
    rc = cli.main(["train", "--config", str(cfg), "--fold", "1", "--out-root", str(out),
                   "--cache-dir", str(cache), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "pacs_sr.patch_size is 1000, larger than the largest axis of the volumes " \
           f"(shape {SHAPE}); expected an integer in [1, 60]" in err
    assert str(cfg) in err and "Traceback" not in err
    assert _outputs(out) == [] and not list(cache.glob("*.npy"))
    # diagnose says the same, as a failed check
    assert diagnose.main(["--config", str(cfg), "--cache-dir", str(cache)]) == 1
    assert "pacs_sr.patch_size is 1000" in capsys.readouterr().out


def test_diagnose_plan_names_the_stage_that_does_not_fit(cohort, pinned, monkeypatch, capsys,
                                                         tmp_path):
    monkeypatch.setattr(limits, "detect_limits", lambda: limits.Limits(
        limits.Figure(300 * MiB, "SLURM_MEM_PER_NODE=300"), limits.Figure(2, "test"), {}))
    assert diagnose.main(["--json", "--config", str(cohort),
                          "--cache-dir", str(tmp_path / "cache")]) == 1
    doc = json.loads(capsys.readouterr().out)
    by = {c["check"]: c for c in doc["checks"]}
    assert by["plan:fit"]["level"] == "fail"
    assert "request at least" in by["plan:fit"]["message"]
    assert "plan" not in doc
