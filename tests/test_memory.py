"""Limits detection and pool planning (pacs_numba.memory) on fake cgroup trees and environments."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tree as _tree

from pacs_numba import memory as mem
from pacs_numba.errors import BudgetError, ConfigError
from pacs_numba.memory import (
    Figure,
    Limits,
    RssSampler,
    cgroup_cpu_limit,
    cgroup_memory_limit,
    cgroup_memory_usage,
    detect_limits,
    parse_size,
    plan_pool,
    read_cgroup_paths,
    slurm_cpus,
    slurm_memory_limit,
)

MiB = 1 << 20
GiB = 1 << 30
V1_UNLIMITED = "9223372036854771712"  # LONG_MAX rounded down to 4 KiB pages
TASK = "/slurm/uid_1/job_7/step_0/task_0"


def _proc(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "proc_self_cgroup"
    p.write_text(text)
    return p


@pytest.fixture
def v2(tmp_path: Path):
    """A pure-v2 host: limit on the job, nothing on step or task."""
    root = _tree(tmp_path / "cg", {
        "cgroup.controllers": "cpu memory",
        "slurm/memory.max": "max",
        "slurm/uid_1/memory.max": "max",
        "slurm/uid_1/job_7/memory.max": str(16 * GiB),
        "slurm/uid_1/job_7/cpu.max": "800000 100000",
        "slurm/uid_1/job_7/step_0/memory.max": "max",
        "slurm/uid_1/job_7/step_0/cpu.max": "max 100000",
        "slurm/uid_1/job_7/step_0/task_0/memory.max": "max",
        "slurm/uid_1/job_7/step_0/task_0/memory.current": str(300 * MiB),
        "slurm/uid_1/job_7/step_0/task_0/memory.peak": str(900 * MiB),
    })
    return root, _proc(tmp_path, f"0::{TASK}\n")


# ---------------------------------------------------------------- /proc/self/cgroup


def test_read_cgroup_paths_v1_and_v2():
    text = ("12:memory:/slurm/uid_1/job_7/step_0\n"
            "4:cpu,cpuacct:/slurm/uid_1/job_7\n"
            "1:name=systemd:/init.scope\n"
            "garbage\n"
            f"0::{TASK}\n")
    assert read_cgroup_paths(text) == [
        (1, ("memory",), "/slurm/uid_1/job_7/step_0"),
        (1, ("cpu", "cpuacct"), "/slurm/uid_1/job_7"),
        (1, ("name=systemd",), "/init.scope"),
        (2, (), TASK),
    ]


# ---------------------------------------------------------------- cgroup v2


def test_v2_limit_on_job_ancestor_not_leaf(v2):
    root, proc = v2
    fig = cgroup_memory_limit(root, proc)
    assert fig is not None and fig.value == 16 * GiB
    assert fig.source == f"cgroup v2 {root}/slurm/uid_1/job_7/memory.max"


def test_v2_tighter_step_limit_wins(v2):
    root, proc = v2
    (root / "slurm/uid_1/job_7/step_0/memory.max").write_text(f"{6 * GiB}\n")
    fig = cgroup_memory_limit(root, proc)
    assert fig.value == 6 * GiB and "step_0/memory.max" in fig.source


def test_v2_max_everywhere_is_no_limit(tmp_path):
    root = _tree(tmp_path / "cg", {"cgroup.controllers": "memory",
                                   "a/memory.max": "max", "a/b/memory.max": "max"})
    assert cgroup_memory_limit(root, _proc(tmp_path, "0::/a/b\n")) is None


def test_v2_container_path_is_the_mount_root(tmp_path):
    # Without a cgroup namespace the container sees its own cgroup as the mount root
    # while /proc/self/cgroup still names the host path.
    root = _tree(tmp_path / "cg", {"cgroup.controllers": "memory", "memory.max": str(2 * GiB)})
    fig = cgroup_memory_limit(root, _proc(tmp_path, "0::/docker/0123abcd\n"))
    assert fig.value == 2 * GiB and fig.source == f"cgroup v2 {root}/memory.max"


def test_v2_hybrid_unified_mount(tmp_path):
    root = _tree(tmp_path / "cg", {"unified/cgroup.controllers": "",
                                   "unified/job/memory.max": str(3 * GiB)})
    assert cgroup_memory_limit(root, _proc(tmp_path, "0::/job\n")).value == 3 * GiB


def test_missing_proc_file_and_tree(tmp_path):
    assert cgroup_memory_limit(tmp_path / "nope", tmp_path / "nope.txt") is None
    assert cgroup_cpu_limit(tmp_path / "nope", tmp_path / "nope.txt") is None
    assert cgroup_memory_usage(tmp_path / "nope", tmp_path / "nope.txt") is None


def test_v2_cpu_max_over_ancestors(v2):
    root, proc = v2
    fig = cgroup_cpu_limit(root, proc)
    assert fig.value == 8
    assert fig.source == f"cgroup v2 {root}/slurm/uid_1/job_7/cpu.max 800000 100000"


@pytest.mark.parametrize("text,expected", [("150000 100000", 1), ("50000 100000", 1),
                                            ("250000 100000", 2), ("max 100000", None),
                                            ("garbage", None)])
def test_v2_cpu_max_rounding(tmp_path, text, expected):
    root = _tree(tmp_path / "cg", {"cgroup.controllers": "cpu", "j/cpu.max": text})
    fig = cgroup_cpu_limit(root, _proc(tmp_path, "0::/j\n"))
    assert (fig.value if fig else None) == expected


def test_v2_usage(v2):
    root, proc = v2
    u = cgroup_memory_usage(root, proc)
    assert (u.current_bytes, u.peak_bytes) == (300 * MiB, 900 * MiB)
    assert u.source.endswith("task_0")


# ---------------------------------------------------------------- cgroup v1


@pytest.fixture
def v1(tmp_path: Path):
    step = "memory/slurm/uid_1/job_7/step_0"
    root = _tree(tmp_path / "cg", {
        "memory/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/slurm/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/slurm/uid_1/job_7/memory.limit_in_bytes": str(12 * GiB),
        f"{step}/memory.limit_in_bytes": V1_UNLIMITED,
        f"{step}/memory.stat": f"cache 0\nrss 0\nhierarchical_memory_limit {12 * GiB}\n"
                               f"hierarchical_memsw_limit {V1_UNLIMITED}",
        f"{step}/memory.usage_in_bytes": str(100 * MiB),
        f"{step}/memory.max_usage_in_bytes": str(700 * MiB),
        "cpu,cpuacct/slurm/uid_1/job_7/cpu.cfs_quota_us": "400000",
        "cpu,cpuacct/slurm/uid_1/job_7/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/slurm/uid_1/job_7/step_0/cpu.cfs_quota_us": "-1",
        "cpu,cpuacct/slurm/uid_1/job_7/step_0/cpu.cfs_period_us": "100000",
    })
    proc = _proc(tmp_path, "11:pids:/slurm/uid_1/job_7/step_0\n"
                           "4:memory:/slurm/uid_1/job_7/step_0\n"
                           "3:cpu,cpuacct:/slurm/uid_1/job_7/step_0\n")
    return root, proc


def test_v1_limit_on_job_ancestor(v1):
    root, proc = v1
    fig = cgroup_memory_limit(root, proc)
    assert fig.value == 12 * GiB
    # The leaf's hierarchical_memory_limit is listed first and equals the job's limit.
    assert "step_0/memory.stat hierarchical_memory_limit" in fig.source


def test_v1_limit_in_bytes_when_no_stat(v1):
    root, proc = v1
    (root / "memory/slurm/uid_1/job_7/step_0/memory.stat").unlink()
    fig = cgroup_memory_limit(root, proc)
    assert fig.value == 12 * GiB
    assert fig.source == f"cgroup v1 {root}/memory/slurm/uid_1/job_7/memory.limit_in_bytes"


def test_v1_hierarchical_limit_sees_invisible_ancestors(v1):
    # In a container the job's directory may be invisible; memory.stat still knows.
    root, proc = v1
    (root / "memory/slurm/uid_1/job_7/memory.limit_in_bytes").write_text(V1_UNLIMITED)
    stat = root / "memory/slurm/uid_1/job_7/step_0/memory.stat"
    stat.write_text(f"hierarchical_memory_limit {5 * GiB}\n")
    assert cgroup_memory_limit(root, proc).value == 5 * GiB


def test_v1_unlimited_everywhere(tmp_path):
    root = _tree(tmp_path / "cg", {
        "memory/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/a/memory.limit_in_bytes": V1_UNLIMITED,
        "memory/a/memory.stat": f"hierarchical_memory_limit {V1_UNLIMITED}",
        "memory/b/memory.limit_in_bytes": str(2**62),  # another page size's LONG_MAX
    })
    assert cgroup_memory_limit(root, _proc(tmp_path, "4:memory:/a\n")) is None
    assert cgroup_memory_limit(root, _proc(tmp_path, "4:memory:/b\n")) is None


def test_v1_container_path_is_the_mount_root(tmp_path):
    root = _tree(tmp_path / "cg", {"memory/memory.limit_in_bytes": str(4 * GiB)})
    fig = cgroup_memory_limit(root, _proc(tmp_path, "4:memory:/docker/0123abcd\n"))
    assert fig.value == 4 * GiB


def test_v1_cpu_quota(v1):
    root, proc = v1
    fig = cgroup_cpu_limit(root, proc)
    assert fig.value == 4 and "400000/100000" in fig.source


def test_v1_usage(v1):
    root, proc = v1
    u = cgroup_memory_usage(root, proc)
    assert (u.current_bytes, u.peak_bytes) == (100 * MiB, 700 * MiB)
    assert u.source.startswith("cgroup v1")


# ---------------------------------------------------------------- SLURM


def test_slurm_mem_per_node():
    fig = slurm_memory_limit({"SLURM_MEM_PER_NODE": "16000"}, 8)
    assert fig == Figure(16000 * MiB, "SLURM_MEM_PER_NODE=16000")


def test_slurm_mem_per_node_zero_means_whole_node():
    assert slurm_memory_limit({"SLURM_MEM_PER_NODE": "0"}, 8) is None


def test_slurm_mem_per_cpu_times_cpus():
    fig = slurm_memory_limit({"SLURM_MEM_PER_CPU": "2048"}, 6)
    assert fig.value == 6 * 2 * GiB and fig.source == "SLURM_MEM_PER_CPU=2048 x 6 CPUs"


@pytest.mark.parametrize("raw,expected", [("16G", 16 * GiB), ("16g", 16 * GiB),
                                          ("512M", 512 * MiB), ("1T", 1024 * GiB)])
def test_slurm_suffix_forms(raw, expected):
    assert slurm_memory_limit({"SLURM_MEM_PER_NODE": raw}, 1).value == expected


def test_slurm_garbage_is_logged_and_ignored(caplog):
    assert slurm_memory_limit({"SLURM_MEM_PER_NODE": "lots"}, 1) is None
    assert "SLURM_MEM_PER_NODE='lots'" in caplog.text
    assert slurm_memory_limit({}, 4) is None


def test_slurm_cpus():
    assert slurm_cpus({"SLURM_CPUS_PER_TASK": "8"}) == Figure(8, "SLURM_CPUS_PER_TASK=8")
    assert slurm_cpus({}) is None
    on_node = {"SLURM_JOB_CPUS_PER_NODE": "32(x2)", "SLURMD_NODENAME": "node1"}
    assert slurm_cpus(on_node).value == 32
    assert slurm_cpus({**on_node, "SLURM_JOB_CPUS_PER_NODE": "32,16(x2)"}).value == 16
    # salloc shell on the login node: not the job's node
    assert slurm_cpus({"SLURM_JOB_CPUS_PER_NODE": "32"}) is None
    # CPUS_PER_TASK wins over the per-node count
    assert slurm_cpus({**on_node, "SLURM_CPUS_PER_TASK": "4"}).value == 4


# ---------------------------------------------------------------- detect_limits


def test_detect_takes_minimum_and_reports_sources(v2):
    root, proc = v2
    env = {"SLURM_MEM_PER_NODE": "20480", "SLURM_CPUS_PER_TASK": "12"}
    lim = detect_limits(env, root, proc, affinity_cpus=32, physical_bytes=251 * GiB)
    assert lim.memory.value == 16 * GiB and "job_7/memory.max" in lim.memory.source
    assert lim.cpus.value == 8 and "cpu.max" in lim.cpus.source
    assert set(lim.details) == {"memory.cgroup", "memory.slurm", "memory.physical",
                                "cpus.affinity", "cpus.slurm", "cpus.cgroup"}
    line = lim.describe()
    assert line.startswith("memory limit 16.0 GiB (cgroup v2 .../job_7/memory.max; ")
    assert "SLURM_MEM_PER_NODE=20480 20.0 GiB" in line
    assert "physical (os.sysconf) 251.0 GiB" in line
    assert "CPUs 8 (cgroup v2 .../job_7/cpu.max 800000 100000; " in line
    assert "sched_getaffinity 32" in line and "SLURM_CPUS_PER_TASK=12 12" in line
    assert "\n" not in line


def test_detect_slurm_binding_without_cgroup(tmp_path):
    env = {"SLURM_MEM_PER_CPU": "1G", "SLURM_CPUS_PER_TASK": "4"}
    lim = detect_limits(env, tmp_path / "none", tmp_path / "none.txt",
                        affinity_cpus=64, physical_bytes=512 * GiB)
    assert lim.cpus == Figure(4, "SLURM_CPUS_PER_TASK=4")
    assert lim.memory == Figure(4 * GiB, "SLURM_MEM_PER_CPU=1G x 4 CPUs")
    assert lim.describe().startswith(
        "memory limit 4.0 GiB (SLURM_MEM_PER_CPU=1G x 4 CPUs; physical (os.sysconf) 512.0 GiB), "
        "CPUs 4 (SLURM_CPUS_PER_TASK=4; sched_getaffinity 64)")


def test_detect_physical_binding_and_affinity(tmp_path):
    lim = detect_limits({"SLURM_MEM_PER_NODE": "0"}, tmp_path / "none", tmp_path / "none.txt",
                        affinity_cpus=3, physical_bytes=8 * GiB)
    assert lim.memory.value == 8 * GiB and lim.memory.source == "physical (os.sysconf)"
    assert lim.cpus == Figure(3, "sched_getaffinity")


def test_detect_psutil_only_as_last_resort(tmp_path, monkeypatch):
    monkeypatch.setattr(mem, "_physical_memory", lambda: None)
    lim = detect_limits({}, tmp_path / "none", tmp_path / "none.txt", affinity_cpus=2)
    assert lim.memory.source == "psutil.virtual_memory().total" and lim.memory.value > 0
    # ... and not consulted when anything else is known
    lim = detect_limits({"SLURM_MEM_PER_NODE": "1024"}, tmp_path / "none",
                        tmp_path / "none.txt", affinity_cpus=2)
    assert "memory.psutil" not in lim.details and lim.memory.value == GiB


def test_detect_limits_on_this_machine():
    lim = detect_limits()
    assert lim.memory.value > 0 and lim.cpus.value >= 1
    assert lim.memory.source and lim.cpus.source
    assert lim.describe().startswith("memory limit ")


# ---------------------------------------------------------------- parse_size


@pytest.mark.parametrize("text,expected", [
    ("64G", 64 * GiB), ("64GB", 64 * GiB), ("64GiB", 64 * GiB), ("64 gib", 64 * GiB),
    ("512M", 512 * MiB), ("512MiB", 512 * MiB), ("1.5G", 3 * GiB // 2), ("2T", 2048 * GiB),
    ("10K", 10240), ("1048576", MiB), ("100B", 100), (" 8g ", 8 * GiB),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "G", "-1G", "64X", "sixty", "1.2.3G", "64 G B"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_size(text)


def test_parse_size_error_is_config_error():
    with pytest.raises(ConfigError, match="cannot read 'lots' as a memory size"):
        parse_size("lots")


# ---------------------------------------------------------------- plan_pool


def _limits(mem_gib: float = 16, cpus: int = 8) -> Limits:
    m = Figure(int(mem_gib * GiB), "SLURM_MEM_PER_NODE=16384")
    c = Figure(cpus, "SLURM_CPUS_PER_TASK=8")
    return Limits(m, c, {"memory.slurm": m, "cpus.slurm": c})


def _plan(limits: Limits | None = None, **kw):
    args = dict(per_patient_bytes=int(0.8 * GiB), baseline_bytes=int(0.4 * GiB),
                n_patients=40, env={})
    args.update(kw)
    return plan_pool(limits or _limits(), **args)


def test_plan_memory_bound():
    # 16 GiB - 0.4 baseline - 1.6 margin = 14 GiB -> 17 patients of 0.8 GiB; 8 CPUs bind first,
    # so give it 32 CPUs to see memory bind.
    p = _plan(_limits(16, 32), per_patient_bytes=int(2.5 * GiB))
    assert p.width == 5 and p.threads == 6
    assert p.margin_bytes == int(1.6 * GiB)
    assert p.reason.startswith(
        "memory: 5 x 2.5 GiB fits in 16.0 GiB (SLURM_MEM_PER_NODE=16384) - 0.4 GiB baseline "
        "- 1.6 GiB margin")


def test_plan_min_margin():
    p = _plan(_limits(1, 8), per_patient_bytes=100 * MiB, baseline_bytes=0)
    assert p.margin_bytes == 256 * MiB
    assert p.width == 7  # (1024 - 256) // 100


def test_plan_cpu_bound():
    p = _plan(_limits(256, 8))
    assert (p.width, p.threads) == (8, 1)
    assert p.reason == "CPUs: 8 (SLURM_CPUS_PER_TASK=8)"


def test_plan_config_bound():
    p = _plan(_limits(256, 8), num_workers=3)
    assert (p.width, p.threads) == (3, 2)
    assert p.reason == "config num_workers=3"


def test_plan_config_joblib_negative():
    assert _plan(_limits(256, 8), num_workers=-1).width == 8
    assert _plan(_limits(256, 8), num_workers=-3).width == 6


def test_plan_patients_fewer_than_cpus():
    p = _plan(_limits(256, 8), n_patients=3)
    assert (p.width, p.threads) == (3, 2)
    assert p.reason == "patients: 3 to process"
    assert _plan(_limits(256, 8), n_patients=0).width == 1


@pytest.mark.parametrize("cpus,width,threads", [(8, 3, 2), (7, 3, 2), (2, 2, 1), (32, 3, 10)])
def test_plan_threads_arithmetic(cpus, width, threads):
    p = _plan(_limits(256, cpus), num_workers=3)
    assert (p.width, p.threads) == (width, threads)
    assert p.width * p.threads <= max(cpus, p.width)


def test_plan_override_bound_env():
    p = _plan(_limits(256, 8), num_workers=6, env={"PACS_SR_MAX_WORKERS": "4"})
    assert (p.width, p.threads) == (4, 2)
    assert p.reason == "PACS_SR_MAX_WORKERS=4"
    assert p.overrides == {"PACS_SR_MAX_WORKERS": 4}


def test_plan_numba_env_beats_sr_env():
    env = {"PACS_NUMBA_MAX_WORKERS": "2", "PACS_SR_MAX_WORKERS": "5"}
    p = _plan(_limits(256, 8), env=env)
    assert p.width == 2
    assert p.reason.startswith("PACS_NUMBA_MAX_WORKERS=2")
    assert "PACS_SR_MAX_WORKERS ignored" in p.reason


def test_plan_workers_flag_beats_env_and_config():
    env = {"PACS_NUMBA_MAX_WORKERS": "2"}
    p = _plan(_limits(256, 8), num_workers=4, workers_override=6, env=env)
    assert p.width == 6 and p.reason.startswith("--workers=6")
    assert "PACS_NUMBA_MAX_WORKERS ignored" in p.reason
    assert p.overrides == {"--workers": 6, "PACS_NUMBA_MAX_WORKERS": 2}


def test_plan_override_above_memory_is_capped():
    p = _plan(_limits(16, 32), per_patient_bytes=int(2.5 * GiB), workers_override=16)
    assert p.width == 5
    assert p.reason.startswith("memory: 5 x 2.5 GiB")
    assert "--workers=16 capped to 5" in p.reason


def test_plan_override_above_cpus_is_capped():
    p = _plan(_limits(256, 8), env={"PACS_SR_MAX_WORKERS": "32"})
    assert (p.width, p.threads) == (8, 1)
    assert "PACS_SR_MAX_WORKERS=32 capped to 8" in p.reason


def test_plan_mem_budget_lowers_limit():
    p = _plan(_limits(64, 32), mem_budget_bytes=4 * GiB)
    assert p.limit.value == 4 * GiB and p.limit.source == "--mem-budget 4.00 GiB"
    assert p.width == (4 * GiB - int(0.4 * GiB) - int(0.4 * GiB)) // int(0.8 * GiB)
    # a budget above the detected limit is ignored
    assert _plan(_limits(4, 32), mem_budget_bytes=64 * GiB).limit.value == 4 * GiB


def test_plan_describe_one_line():
    line = _plan().describe()
    assert line.startswith("pool 8 workers x 1 numba threads (bound: CPUs: 8")
    assert "\n" not in line


def test_budget_error_message():
    lim = _limits(2, 8)
    with pytest.raises(BudgetError) as ei:
        _plan(lim, per_patient_bytes=3 * GiB, baseline_bytes=GiB // 2)
    msg = str(ei.value)
    # needs (3 + 0.5) / 0.9 = 3.89 GiB: 3.00 per patient + 0.50 baseline + 0.39 margin
    assert "one patient needs 3.89 GiB (3.00 GiB per patient + 0.50 GiB baseline + " \
           "0.39 GiB safety margin)" in msg
    assert "the job has 2.00 GiB (SLURM_MEM_PER_NODE=16384)" in msg
    assert "--mem=4G" in msg
    assert "smaller volumes or fewer experts" in msg
    assert "patch" not in msg
    assert isinstance(ei.value, MemoryError)


def test_budget_error_names_mem_budget():
    with pytest.raises(BudgetError, match=r"the job has 1\.00 GiB \(--mem-budget 1\.00 GiB\)"
                                          r".*Raise --mem-budget to at least 2G"):
        _plan(_limits(64, 8), mem_budget_bytes=GiB, per_patient_bytes=GiB)


def test_budget_error_min_margin_dominates():
    with pytest.raises(BudgetError, match=r"needs 1\.35 GiB \(1\.00 GiB per patient \+ "
                                          r"0\.10 GiB baseline \+ 0\.25 GiB safety margin\)"):
        _plan(_limits(1, 8), per_patient_bytes=GiB, baseline_bytes=int(0.1 * GiB))


@pytest.mark.parametrize("kw,name", [
    (dict(workers_override=0), "--workers=0"),
    (dict(workers_override=-2), "--workers=-2"),
    (dict(env={"PACS_NUMBA_MAX_WORKERS": "four"}), "PACS_NUMBA_MAX_WORKERS='four'"),
    (dict(env={"PACS_SR_MAX_WORKERS": "0"}), "PACS_SR_MAX_WORKERS='0'"),
    (dict(env={"PACS_SR_MAX_WORKERS": "2.5"}), "PACS_SR_MAX_WORKERS='2.5'"),
    (dict(num_workers=0), "num_workers=0"),
])
def test_bad_override_values(kw, name):
    with pytest.raises(ConfigError, match=re.escape(name)):
        _plan(**kw)


def test_empty_env_override_is_unset():
    assert _plan(_limits(256, 8), env={"PACS_SR_MAX_WORKERS": " "}).width == 8


# ---------------------------------------------------------------- cost model and RSS


def _pp(stage, shape=(10, 12, 14), m=4, t=30, **kw):
    args = dict(lambda_grad=0, lambda_edge=0, n_tiles=t, n_threads=1)
    args.update(kw)
    return mem.per_patient_bytes(shape, m, stage=stage, **args)


def test_per_patient_fit_terms():
    n, m, t, n2 = 10 * 12 * 14, 4, 30, 14
    n_terms = m + m * (m + 1) // 2
    scratch = n2 * 8 * ((m + 1) + n_terms + 3) + 12 * (n2 + 2)
    fit = _pp("fit")
    # mapped HR + experts, uint8 mask, Q/B/counts, one thread's line scratch
    assert fit == 4 * n * (m + 1) + n + 8 * t * (m * m + m + 1) + scratch
    # the options add per-line scratch only, never a volume
    opts = _pp("fit", lambda_grad=1, lambda_edge=1)
    assert opts - fit == n2 * 8 * (3 * (m + 1) + 3)
    big = dict(shape=(160, 192, 160), t=1200)
    assert _pp("fit", **big, lambda_grad=1, lambda_edge=1) - _pp("fit", **big) < 64 * 1024
    # each Numba thread has its own scratch
    assert _pp("fit", n_threads=3) - fit == 2 * scratch


def test_per_patient_evaluate_terms():
    shape, m = (40, 48, 40), 4
    n = 40 * 48 * 40
    ev = _pp("evaluate", shape, m)
    ev_nosave = _pp("evaluate", shape, m, save_weight_volumes=False)
    pred = _pp("predict", shape, m)
    # mapped inputs + blend + the npz write chunk (the whole 4NM array when < 16 MiB)
    assert ev == 4 * n * (m + 1) + 4 * n + 4 * 40 * 48 + 4 * n * m
    # without it: the largest of brain mask + labels, mask + blend (+ row scratch),
    # blend + hr>0 mask (+ SSIM scratch), and the test split's HR-free blend, which is
    # predict's peak: the proxy and np.all's stacked copy
    assert ev_nosave == 4 * n * (m + 1) + 4 * n + 2 * m * n + 2 * n
    # predict (no HR, one patient): the experts' pages + the proxy and np.all's stacked copy
    assert pred == 4 * n * m + 4 * n + 2 * m * n + 2 * n
    # the savez chunk is capped at 16 MiB, so at this size the HR-free scoring is the peak
    big = (160, 192, 160)
    nb = 160 * 192 * 160
    assert _pp("evaluate", big, m) == 4 * nb * (m + 1) + 4 * nb + 2 * m * nb + 2 * nb
    assert _pp("evaluate", big, 8) - _pp("evaluate", big, 4) == 4 * 4 * nb + 2 * 4 * nb
    with pytest.raises(ValueError, match="stage"):
        _pp("train")
    with pytest.raises(ValueError, match="shape"):
        _pp("fit", (10, 0, 3))
    with pytest.raises(ValueError, match="n_experts"):
        _pp("fit", m=0)


def test_per_patient_evaluate_scales_with_voxels():
    # everything volume-sized is linear in N: doubling one axis nearly doubles the cost
    a = _pp("evaluate", (128, 144, 128), 4, save_weight_volumes=False)
    b = _pp("evaluate", (256, 144, 128), 4, save_weight_volumes=False)
    assert 1.95 < b / a < 2.01


def test_per_task_bytes():
    n, m, t = 10 * 12 * 14, 4, 30
    ev = mem.per_task_bytes((10, 12, 14), m, n_tiles=t, stage="evaluate")
    # the compressed npz templates + the NIfTI maps' 1/den, entropy and labels
    assert ev == int(0.05 * (4 * n * m + 8 * n) + 9 * n)
    # the maps themselves exist only before the pool starts (npz maps, or building the
    # NIfTI ones, whichever is larger)
    assert mem.setup_bytes((10, 12, 14), m, stage="evaluate") == max(4 * n * m + 8 * n, 29 * n)
    assert mem.setup_bytes((10, 12, 14), 8, stage="evaluate") == 4 * n * 8 + 8 * n
    assert mem.setup_bytes((10, 12, 14), m, stage="fit") == 0
    assert mem.setup_bytes((10, 12, 14), m, stage="evaluate", save_weight_volumes=False) == 0
    assert mem.per_task_bytes((10, 12, 14), m, n_tiles=t, stage="predict") == 0
    assert mem.per_task_bytes((10, 12, 14), m, n_tiles=t, stage="evaluate",
                              save_weight_volumes=False) == 0
    fit = mem.per_task_bytes((10, 12, 14), m, n_tiles=t, stage="fit", n_patients=5)
    assert fit == 8 * t * (m * m + m + 1) * 6 + 32 * t * m
    with pytest.raises(ValueError, match="stage"):
        mem.per_task_bytes((10, 12, 14), m, n_tiles=t, stage="solve")


def test_predict_peak_bytes_picks_heaviest_stage():
    shape, m, t = (160, 192, 160), 4, 1200
    kw = dict(lambda_grad=0.2, lambda_edge=0.25, n_tiles=t, baseline=200 * MiB, n_threads=1)
    p1 = mem.predict_peak_bytes(shape, m, width=1, **kw)
    p2 = mem.predict_peak_bytes(shape, m, width=2, **kw)
    assert p1.stage == p2.stage == "evaluate"
    assert p2.peak_bytes - p1.peak_bytes == p1.per_patient["evaluate"]
    assert p1.peak_bytes == 200 * MiB + p1.per_task["evaluate"] + p1.per_patient["evaluate"]
    # a stage is never wider than its patients
    p4 = mem.predict_peak_bytes(shape, m, width=4, n_train=4, n_test=2, **kw)
    assert p4.widths == {"fit": 4, "evaluate": 2}
    # without weight volumes and with many train patients the fit can dominate
    pf = mem.predict_peak_bytes(shape, m, width=8, n_train=8, n_test=1,
                                save_weight_volumes=False, **kw)
    assert pf.stage == "fit"
    line = p2.describe()
    assert line.startswith("peak ") and "2 x " in line and "baseline 200" in line
    with pytest.raises(ValueError, match="width"):
        mem.predict_peak_bytes(shape, m, width=0, **kw)


def test_plan_counts_per_task_bytes():
    # 16 GiB - 0.4 baseline - 1.6 margin = 14 GiB: 5 x 2.5; with 2 GiB once per task, 4.
    p = _plan(_limits(16, 32), per_patient_bytes=int(2.5 * GiB), per_task_bytes=2 * GiB)
    assert p.width == 4 and p.per_task_bytes == 2 * GiB
    assert "- 2.0 GiB once per task - 1.6 GiB margin" in p.reason
    assert "once per task 2.00 GiB" in p.describe()
    assert "once per task" not in _plan().describe()
    with pytest.raises(ValueError, match="per_task_bytes"):
        _plan(per_task_bytes=-1)


def test_budget_error_counts_per_task_bytes():
    with pytest.raises(BudgetError) as ei:
        _plan(_limits(2, 8), per_patient_bytes=GiB, baseline_bytes=GiB // 2,
              per_task_bytes=GiB)
    # (1 + 0.5 + 1) / 0.9 = 2.78 GiB
    assert ("one patient needs 2.78 GiB (1.00 GiB per patient + 0.50 GiB baseline + "
            "1.00 GiB once per task + 0.28 GiB safety margin)") in str(ei.value)
    assert "--mem=3G" in str(ei.value)


def test_baseline_allowance_follows_kernel_cache(monkeypatch):
    monkeypatch.setattr(mem, "current_rss_bytes", lambda: 100 * MiB)
    monkeypatch.setattr(mem, "kernel_cache_state", lambda: (40, 40))
    assert mem.baseline_bytes() == 100 * MiB + mem.WARM_JIT_BYTES
    monkeypatch.setattr(mem, "kernel_cache_state", lambda: (40, 0))
    assert mem.baseline_bytes() == 100 * MiB + mem.WARM_JIT_BYTES + mem.COLD_JIT_BYTES
    monkeypatch.setattr(mem, "kernel_cache_state", lambda: (40, 30))
    assert mem.baseline_bytes() == 100 * MiB + mem.WARM_JIT_BYTES + mem.COLD_JIT_BYTES // 4
    monkeypatch.setattr(mem, "kernel_cache_state", lambda: (0, 0))  # cannot tell: cold
    assert mem.baseline_bytes() == 100 * MiB + mem.WARM_JIT_BYTES + mem.COLD_JIT_BYTES
    assert mem.baseline_bytes(compile_allowance_bytes=0) == 100 * MiB


def test_kernel_cache_state_counts_the_kernels():
    total, cached = mem.kernel_cache_state()
    assert total >= 20 and 0 <= cached <= total


def test_pin_mmap_threshold_respects_env():
    assert mem.pin_mmap_threshold(env={"MALLOC_MMAP_THRESHOLD_": "65536"}) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_pin_mmap_threshold_returns_freed_volumes():
    # In a fresh process: a freed 20 MiB array stays resident (glibc's dynamic threshold)
    # unless the threshold is pinned.
    code = (
        "import sys, numpy as np, psutil\n"
        "from pacs_numba.memory import pin_mmap_threshold\n"
        "ok = pin_mmap_threshold(env={}) if sys.argv[1] == 'pin' else None\n"
        "p = psutil.Process()\n"
        "a = np.ones(20 << 17); del a\n"
        "r0 = p.memory_info().rss\n"
        "a = np.ones(20 << 17); del a\n"
        "print(ok, (p.memory_info().rss - r0) >> 20)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = {}
    for mode in ("pin", "default"):
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True,
                             text=True, check=True, env=env)
        ok, kept = res.stdout.split()
        out[mode] = (ok, int(kept))
    if out["default"][1] < 10:
        pytest.skip(f"this malloc returns freed blocks by itself ({out})")
    assert out["pin"] == ("True", 0) or out["pin"][1] < 2, out


def test_rss_figures_positive():
    assert mem.current_rss_bytes() > 10 * MiB
    assert mem.peak_rss_bytes() >= mem.current_rss_bytes() // 2
    assert mem.baseline_bytes() > mem.current_rss_bytes()


def test_rss_sampler_sees_200mb():
    with RssSampler(0.02) as s:
        start = s.samples[0][1]
        a = np.ones(200 * MiB // 8)  # np.ones writes every page
        time.sleep(0.15)
        a.sum()
    del a
    assert s.peak_bytes - start >= 180 * MiB
    assert len(s.samples) >= 3
    assert all(t2 >= t1 for (t1, _), (t2, _) in zip(s.samples, s.samples[1:], strict=False))
