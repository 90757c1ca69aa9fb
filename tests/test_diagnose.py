"""``python -m pacs_numba.diagnose`` on fake cgroup trees, SLURM variables and real configs."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import yaml
from conftest import write_tree as _tree

# Imported before any test patches limits.detect_limits: modules that bind the name at
# import time must keep the real function.
from pacs_numba import diagnose
from pacs_numba.config import load_config
from pacs_numba.resources import limits
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.manifest import build_manifest, write_manifest

GiB = 1 << 30
TASK = "/slurm/uid_1/job_7/step_0/task_0"


def _fake_node(monkeypatch, tmp_path: Path, *, version: int, job_limit: int, env: dict) -> None:
    """Point detect_limits at a fake cgroup tree and a fake SLURM environment."""
    if version == 2:
        root = _tree(tmp_path / "cg", {
            "cgroup.controllers": "cpu memory",
            "slurm/uid_1/job_7/memory.max": str(job_limit),
            "slurm/uid_1/job_7/cpu.max": "800000 100000",
            "slurm/uid_1/job_7/step_0/task_0/memory.max": "max",
        })
        proc_text = f"0::{TASK}\n"
    else:
        root = _tree(tmp_path / "cg", {
            "memory/slurm/uid_1/job_7/memory.limit_in_bytes": str(job_limit),
            "memory/slurm/uid_1/job_7/step_0/memory.limit_in_bytes": "9223372036854771712",
            "cpu,cpuacct/slurm/uid_1/job_7/cpu.cfs_quota_us": "-1",
            "cpu,cpuacct/slurm/uid_1/job_7/cpu.cfs_period_us": "100000",
        })
        proc_text = ("5:memory:/slurm/uid_1/job_7/step_0\n"
                     "3:cpu,cpuacct:/slurm/uid_1/job_7/step_0\n")
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_text)
    fake = functools.partial(limits.detect_limits, env, root, proc, affinity_cpus=8,
                             physical_bytes=256 * GiB)
    monkeypatch.setattr(limits, "detect_limits", fake)
    for k in list(__import__("os").environ):
        if k.startswith("SLURM_") or k.endswith("MAX_WORKERS"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("version", [1, 2])
def test_limits_name_their_sources(monkeypatch, tmp_path, capsys, version):
    env = {"SLURM_JOB_ID": "7", "SLURM_CPUS_PER_TASK": "4", "SLURM_MEM_PER_NODE": "20480"}
    _fake_node(monkeypatch, tmp_path, version=version, job_limit=16 * GiB, env=env)
    assert diagnose.main(["--json", "--cache-dir", str(tmp_path / "cache")]) == 0
    doc = json.loads(capsys.readouterr().out)
    by = {c["check"]: c for c in doc["checks"]}
    assert doc["ok"] is True
    limits = by["limits"]["message"]
    assert "16.0 GiB" in limits and f"cgroup v{version}" in limits and "job_7" in limits
    assert "CPUs 4" in limits and "SLURM_CPUS_PER_TASK=4" in limits
    assert "SLURM_MEM_PER_NODE=20480" in by["slurm"]["message"]
    assert by["threading"]["level"] in {"ok", "warn"}
    assert by["volume cache"]["level"] == "ok"


def test_overrides_are_reported(monkeypatch, tmp_path, capsys):
    _fake_node(monkeypatch, tmp_path, version=2, job_limit=16 * GiB,
               env={"PACS_SR_MAX_WORKERS": "3"})
    assert diagnose.main(["--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "PACS_SR_MAX_WORKERS=3" in out and "a run can start" in out


@pytest.fixture(scope="module")
def cohort_config(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("diag")
    cfg = make_cohort(root, patients=4, shape=(40, 44, 36), spacings=("3mm",), pulses=("t1c",),
                      seed=1, kfolds=2, patch_size=8, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"]["num_workers"] = 8
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    return cfg


def test_config_is_sized_and_the_pool_planned(monkeypatch, tmp_path, capsys, cohort_config):
    _fake_node(monkeypatch, tmp_path, version=2, job_limit=16 * GiB,
               env={"SLURM_CPUS_PER_TASK": "2"})
    assert diagnose.main(["--json", "--config", str(cohort_config),
                          "--cache-dir", str(tmp_path / "cache")]) == 0
    by = {c["check"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert "(40, 44, 36)" in by["manifest"]["message"]
    for stage in ("fit", "evaluate"):
        msg = by[f"plan:{stage}"]["message"]
        assert by[f"plan:{stage}"]["level"] == "ok"
        # 2 train patients, 2 CPUs: 2 workers x 1 thread
        assert "2 worker(s) x 1 numba thread(s)" in msg, msg


def test_a_job_too_small_for_one_patient_fails_with_the_memory_needed(
        monkeypatch, tmp_path, capsys, cohort_config):
    _fake_node(monkeypatch, tmp_path, version=2, job_limit=64 * 1024**2, env={})
    assert diagnose.main(["--config", str(cohort_config),
                          "--cache-dir", str(tmp_path / "cache")]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] plan:fit" in out and "GiB" in out and "needs" in out
    assert "a run cannot start" in out


def test_unwritable_cache_dir_fails(monkeypatch, tmp_path, capsys):
    _fake_node(monkeypatch, tmp_path, version=2, job_limit=16 * GiB, env={})
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert diagnose.main(["--cache-dir", str(blocker / "cache")]) == 1
    assert "[FAIL] volume cache" in capsys.readouterr().out


def test_warmup_compiles_every_kernel_and_the_cache_reloads(capsys, tmp_path):
    assert diagnose.main(["--warmup", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    warm = next(line for line in out.splitlines() if "] warmup:" in line)
    for kernel in ("statistics", "solve", "smoothing", "brain_mask", "blend", "metrics"):
        assert kernel in warm
    assert "[OK  ] compile cache: a new process loads every kernel" in out
