"""Limits detection (limits), pool planning (planning), the cost model (costs) and RSS (process).

Limits run on fake cgroup trees and environments.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np
import pytest
from conftest import write_tree as _tree
from rss_sampler import RssSampler

from pacs_numba.errors import BudgetError, ConfigError
from pacs_numba.resources import costs, planning, process
from pacs_numba.resources import limits as lim_mod
from pacs_numba.resources.limits import (
    Figure,
    Limits,
    cgroup_cpu_limit,
    cgroup_memory_limit,
    cgroup_memory_usage,
    detect_limits,
    read_cgroup_paths,
    slurm_cpus,
    slurm_memory_limit,
)
from pacs_numba.resources.planning import plan_pool
from pacs_numba.resources.units import parse_size


@pytest.fixture(autouse=True)
def _numba_pool_of_the_simulated_node(monkeypatch):
    """The plans here are for simulated nodes with more CPUs than this machine: let Numba's
    thread pool be as large (the cap at the real pool has its own test)."""
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 1024)

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
    monkeypatch.setattr(lim_mod, "_physical_memory", lambda: None)
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
    assert "--mem=4000M" in msg
    assert "smaller volumes or fewer experts" in msg
    assert "patch" not in msg
    assert isinstance(ei.value, MemoryError)


def test_budget_error_names_mem_budget():
    with pytest.raises(BudgetError, match=r"the job has 1\.00 GiB \(--mem-budget 1\.00 GiB\)"
                                          r".*raise --mem-budget to at least 1700M"):
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


# ---------------------------------------------------------------- cost model


def _cost(stage, shape=(10, 12, 14), m=4, patch=4, stride=2, **kw):
    return costs.stage_cost(stage, shape, m, patch_size=patch, stride=stride, **kw)


def test_fit_cost_terms():
    n0, n1, n2 = shape = (10, 12, 14)
    n, m = n0 * n1 * n2, 4
    t = 5 * 6 * 7  # stride 2
    c = _cost("fit", shape, m, n_patients=3)
    n_terms = m + m * (m + 1) // 2
    # mapped HR + experts, the uint8 valid mask + per-plane counts, the moments, and the
    # patient's decomposed statistics (4 parts of n_terms per cell, float64, + counts)
    parts = 8 * t * (4 * n_terms + 1)
    assert c.per_patient_bytes == (4 * n * (m + 1) + n + 8 * n0 * (m + 1) + 8 * n0 * (2 * m + 3)
                                   + parts)
    # _box_moments' rows: values, then ets/wps/wes/cnts and the 4-part accumulators
    assert c.per_thread_bytes == 8 * n2 * ((m + 1) + 4 + 4 * n_terms) + 12 * (n2 + 2)
    # every patient's Q, B, counts + their sums + the solver's T x M arrays
    stats = 8 * t * (m * m + m + 1)
    assert c.per_task_bytes == 4 * stats + t * (m * m + m) + 24 * t * m
    assert c.setup_bytes == 0
    # gradient terms and edge weights add per-line scratch, never a volume
    g = _cost("fit", shape, m, lambda_grad=1.0, lambda_edge=1.0, grad_operator="prewitt")
    assert g.per_patient_bytes == c.per_patient_bytes
    assert g.per_thread_bytes - c.per_thread_bytes == 8 * n2 * (3 * (m + 1) + 3)
    # with sobel the edge map reuses the HR's gradients: no separate sobel rows
    s = _cost("fit", shape, m, lambda_grad=1.0, lambda_edge=1.0, grad_operator="sobel")
    assert g.per_thread_bytes - s.per_thread_bytes == 8 * n2 * 3


def test_evaluate_cost_terms():
    n0, n1, n2 = shape = (40, 48, 40)
    n, m = n0 * n1 * n2, 4
    c = _cost("evaluate", shape, m, patch=8, stride=4)
    tables = 4 * 8 * (10 + 12 + 10)
    # the blend step dominates: brain mask + its != 0 copy + float32 blend + window tables
    assert c.steps["blend"] == 6 * n + tables
    # the test split then scores each expert alone and the HR-free blend in one pass: its
    # largest step is the HR proxy with the proxy's brain mask (4N + int32 labels, the mask
    # and a copy) while the HR's brain mask N is alive
    assert c.steps["scores"] == 11 * n
    # the writes (the NIfTI maps' 13N the largest) run on the background writer: per task
    assert "weight maps" not in c.steps and "writes" not in c.steps
    # scored in one pass along the axial axis, a patient keeps mapped of every volume a slab
    # of 16 planes, the next one and the 64 KiB fault-around at each end (at most the whole
    # volumes), and the HR whole while the brain mask reads it (its step: the mask and its
    # labels 6N); a cold cache may decode (M + 2) // 2 inputs at once, 8N each
    slab = min(4 * n * (m + 1), (m + 1) * (2 * 16 * 4 * n1 * n2 + 2 * 65536))
    assert c.steps["brain mask"] == 6 * n
    held = slab + max(11 * n, 4 * n + 6 * n)
    assert c.per_patient_bytes == max(8 * n * ((m + 2) // 2), held)
    warm = _cost("evaluate", shape, m, patch=8, stride=4, cold=False)
    assert warm.per_patient_bytes == held
    # every volume mapped whole: a slice of the coronal axis spans every plane, and the
    # separate path (edge gates, the weighted HR-free mapping) reads whole volumes
    assert _cost("evaluate", shape, m, patch=8, stride=4, ssim_axis="coronal",
                 cold=False).per_patient_bytes == 4 * n * (m + 1) + 11 * n
    assert _cost("evaluate", shape, m, patch=8, stride=4, one_pass=False,
                 cold=False).per_patient_bytes == 4 * n * (m + 1) + 11 * n
    # the weighted HR-free mapping holds three float32 maps per voxel beside the blend, two
    # sets with edge gates, which also hold the gate and the edge blend: both leave the
    # one pass, so every volume is mapped whole
    for gated, weighted in ((False, True), (True, False), (True, True)):
        o = _cost("evaluate", shape, m, patch=8, stride=4, cold=False, gated=gated,
                  weighted_mapping=weighted)
        blend = c.steps["blend"] + (8 * n if gated else 0)
        assert o.steps["blend"] == blend
        free_blend = blend + (12 * n * (2 if gated else 1) if weighted else 0)
        assert o.steps["scores"] == n + max(11 * n - n, free_blend)
        assert o.per_patient_bytes == 4 * n * (m + 1) + max(o.steps.values())
        p = _cost("predict", shape, m, patch=8, stride=4, gated=gated, weighted_mapping=weighted)
        assert p.steps["blend"] == free_blend
    # per thread: the one-pass scoring's rows and axial slices (P = 2M + 2 predictions: the
    # blend, each expert alone, the HR-free blend and each raw expert under its mask)
    p = 2 * m + 2
    ch = 2 + 3 * p
    score = 4 * n2 * (2 * m + 5) + 4 * n1 * n2 * (p + 1) + 4 * ch * n1 * n2 + 8 * ch * (n2 + 1)
    assert c.per_thread_bytes == max(16 * n2 * (m + 3), 28 * n1 * n2 + 40 * n2 + 40, score)
    # the weight maps exist before the pool; their compressed templates during it
    # (or, if larger, the NIfTI maps' 29N while they are built)
    assert c.setup_bytes == max(4 * n * m + 8 * n + 4 * n * m, 29 * n)
    assert _cost("evaluate", shape, 1, patch=8, stride=4).setup_bytes == 29 * n
    # the npz templates + the NIfTI maps' float32 1/den and entropy and uint8 labels + the
    # background writer: 2 patients' float32 blend and uint8 brain mask, and the maps'
    # float64 map of one expert with its float32 copy while one is written
    assert c.per_task_bytes == int(0.05 * (8 * n * m + 8 * n)) + 9 * n + 2 * 5 * n + 12 * n
    off = _cost("evaluate", shape, m, patch=8, stride=4, save_weight_volumes=False,
                save_weight_maps=False, save_blends=False)
    assert off.setup_bytes == off.per_task_bytes == 0
    assert off.per_patient_bytes == c.per_patient_bytes
    # the SSIM scratch follows the slice axis
    sag = _cost("evaluate", shape, m, patch=8, stride=4, ssim_axis="sagittal")
    assert sag.per_thread_bytes == 28 * n0 * n1 + 40 * n1 + 40
    big = (160, 192, 160)
    nb = 160 * 192 * 160
    # the savez chunk is capped at 16 MiB, so at this size building the NIfTI maps (29N)
    # is the larger setup
    assert _cost("evaluate", big, 4, 32, 16).setup_bytes == max(4 * nb * 4 + 8 * nb + 16 * MiB,
                                                                29 * nb)
    with pytest.raises(ValueError, match="stage"):
        _cost("train")
    with pytest.raises(ValueError, match="shape"):
        _cost("fit", (10, 0, 3))
    with pytest.raises(ValueError, match="n_experts"):
        _cost("fit", m=0)


def test_window_tables_grow_with_patch_size():
    # kernels.blend._window_table: one (ceil(N_d / s), p) float32 table per axis
    shape = (30, 40, 50)
    a = _cost("evaluate", shape, 2, patch=10, stride=1)
    b = _cost("evaluate", shape, 2, patch=40, stride=1)
    assert b.steps["blend"] - a.steps["blend"] == 4 * 30 * (30 + 40 + 50)
    assert costs.window_table_bytes(shape, 50, 1) == 4 * 50 * 120
    pa = _cost("predict", shape, 2, patch=10, stride=1)
    pb = _cost("predict", shape, 2, patch=50, stride=1)
    assert pb.steps["blend"] - pa.steps["blend"] == 4 * 40 * 120


def test_predict_cost_has_no_stacked_isfinite_pass():
    shape, n = (40, 48, 40), 40 * 48 * 40
    c4 = _cost("predict", shape, 4, patch=8, stride=4)
    c8 = _cost("predict", shape, 8, patch=8, stride=4)
    # the proxy with the brain mask's labels, mask and sizes is the largest step: 4N + 6N
    assert c4.steps["brain mask"] == 10 * n
    assert c4.per_patient_bytes == 4 * n * 4 + 10 * n
    # each expert adds its mapped pages and nothing else (no M-fold boolean stack)
    assert c8.per_patient_bytes - c4.per_patient_bytes == 4 * 4 * n
    assert c4.per_task_bytes == c4.setup_bytes == 0


def test_costs_scale_with_voxels():
    a = _cost("evaluate", (128, 144, 128), 4, 32, 16, save_weight_volumes=False)
    b = _cost("evaluate", (256, 144, 128), 4, 32, 16, save_weight_volumes=False)
    assert 1.95 < b.per_patient_bytes / a.per_patient_bytes < 2.01


# ---------------------------------------------------------------- tile settings vs the volume


@pytest.mark.parametrize("patch,stride,match", [
    (10**9, 16, r"pacs_sr\.patch_size is 1000000000, larger than the largest axis of the "
                r"volumes \(shape \(40, 44, 36\)\); expected an integer in \[1, 44\]"),
    (45, 16, r"pacs_sr\.patch_size is 45, larger than the largest axis"),
    (0, 1, r"pacs_sr\.patch_size is 0, below 1"),
    (8, 9, r"pacs_sr\.stride must be an integer in \[1, patch_size=8\]; got 9 "
           r"\(volume shape \(40, 44, 36\)\)"),
    (8, 0, r"pacs_sr\.stride must be an integer in \[1, patch_size=8\]; got 0"),
    (1e30, 4, r"pacs_sr\.patch_size is 1e\+30; expected an integer"),
])
def test_tile_settings_checked_against_the_shape(patch, stride, match):
    with pytest.raises(ConfigError, match="cfg.yaml: " + match):
        planning.check_tile_settings(patch, stride, (40, 44, 36), "cfg.yaml")


def test_tile_settings_that_fit():
    # a patch longer than some axes (not all) is clipped per axis, as in the published tool
    assert planning.check_tile_settings(44, 44, (40, 44, 36)) == (44, 44)
    assert planning.check_tile_settings(1, 1, (40, 44, 36)) == (1, 1)


# ---------------------------------------------------------------- stage plans


def _pacs(**kw):
    from types import SimpleNamespace
    base = dict(patch_size=8, stride=4, lambda_grad=0.2, lambda_edge=0.25, grad_operator="sobel",
                ssim_axis="axial", save_weight_volumes=True, num_workers=8, evaluate_train=True)
    base.update(kw)
    return SimpleNamespace(**base)


def test_stage_patients_follow_the_engine():
    assert planning.stage_patients(_pacs(), 6, 2) == {"fit": 6, "evaluate": 8}
    assert planning.stage_patients(_pacs(evaluate_train=False), 6, 2) == {"fit": 6, "evaluate": 2}
    assert planning.stage_patients(_pacs(), 6, 2, fit=False) == {"evaluate": 8}
    assert planning.stage_patients(_pacs(evaluate_train=False), 6, 0) == {"fit": 6}


def test_plan_stage_charges_threads_for_every_cpu():
    shape = (40, 44, 36)
    sp = planning.plan_stage("fit", _pacs(), 4, shape, 6, _limits(16, 8), baseline_bytes=GiB,
                             env={})
    cost = costs.stage_cost("fit", shape, 4, patch_size=8, stride=4, lambda_grad=0.2,
                            lambda_edge=0.25, n_patients=6)
    assert sp.cost == cost
    assert sp.pool.thread_bytes == 8 * cost.per_thread_bytes
    assert sp.pool.per_task_bytes == cost.per_task_bytes
    assert (sp.pool.width, sp.pool.threads) == (6, 1)


@pytest.mark.parametrize("stage,n", [("fit", 6), ("evaluate", 8)])
def test_needed_bytes_is_the_smallest_limit_for_the_width(stage, n):
    shape = (96, 112, 96)
    kw = dict(baseline_bytes=200 * MiB, env={})
    sp = planning.plan_stage(stage, _pacs(), 4, shape, n, _limits(64, 4), **kw)
    assert sp.pool.width == 4
    assert sp.fixed_bytes + 4 * sp.cost.per_patient_bytes == sp.needed_bytes
    for width, need in ((4, sp.needed_bytes), (1, sp.needed_bytes_one)):
        exact = Limits(Figure(need, "x"), Figure(4, "c"), {})
        assert planning.plan_stage(stage, _pacs(), 4, shape, n, exact, **kw).pool.width >= width
        less = Limits(Figure(need - 1, "x"), Figure(4, "c"), {})
        try:
            got = planning.plan_stage(stage, _pacs(), 4, shape, n, less, **kw).pool.width
        except BudgetError:
            got = 0
        assert got == width - 1
    doc = sp.to_json()
    assert doc["needed_bytes"] == sp.needed_bytes and doc["width"] == 4
    assert all(isinstance(v, int) for k, v in doc.items() if k != "by_width")
    # by_width: the planner's figure for every width a script may plan (slurm_array.sh --list)
    rows = doc["by_width"]
    assert [r["width"] for r in rows] == list(range(1, n + 1))
    assert rows[0]["needed_bytes"] == sp.needed_bytes_one
    assert rows[3]["needed_bytes"] == sp.needed_bytes
    for r in rows:
        mem, headroom = planning.sbatch_request(r["needed_bytes"])
        assert (r["sbatch_mem"], r["headroom_bytes"]) == (mem, headroom)
        assert headroom >= planning.SBATCH_HEADROOM_BYTES


def test_workqueue_layer_runs_one_worker():
    sp = planning.plan_stage("fit", _pacs(), 4, (40, 44, 36), 6, _limits(16, 8),
                             baseline_bytes=GiB, thread_safe=False, env={})
    assert (sp.pool.width, sp.pool.threads) == (1, 6)
    assert "workqueue" in sp.pool.reason


def test_for_patients_narrows_the_pool():
    p = _plan(_limits(256, 8))
    assert p.for_patients(100) is p
    q = p.for_patients(3)
    assert (q.width, q.threads) == (3, 2) and "3 in this split" in q.reason


def test_limit_for_matches_the_margin_rule():
    for core in (0, 1, 100 * MiB, GiB, 7 * GiB + 12345, 300 * GiB):
        L = planning.limit_for(core)
        assert L - planning.margin_bytes(L) >= core
        assert L - 1 - planning.margin_bytes(L - 1) < core


@pytest.mark.parametrize("n,text", [
    (int(0.63 * GiB), "700M"), (100 * MiB, "100M"), (101 * MiB, "200M"),
    (int(3.9 * GiB), "4000M"), (4 * GiB - 1, "4G"), (4 * GiB + 1, "5G"), (64 * GiB, "64G"),
])
def test_slurm_mem_rounding(n, text):
    assert planning.slurm_mem(n) == text


def test_budget_error_asks_for_a_rounded_amount():
    # 0.63 GiB needed: ask for 700M, not 1G
    with pytest.raises(BudgetError) as ei:
        _plan(_limits(0.5, 2), per_patient_bytes=int(0.33 * GiB), baseline_bytes=int(0.05 * GiB))
    msg = str(ei.value)
    assert "one patient needs 0.63 GiB" in msg
    assert "To run, request at least 700M (sbatch --mem=700M," in msg
    assert "1G" not in msg
    with pytest.raises(BudgetError) as ei:
        _plan(_limits(64, 8), mem_budget_bytes=GiB // 2, per_patient_bytes=int(0.33 * GiB),
              baseline_bytes=int(0.05 * GiB))
    assert ("To run, raise --mem-budget to at least 700M if the job has that much memory, or "
            "request at least 700M") in str(ei.value)


def test_budget_error_names_setup_and_thread_scratch():
    with pytest.raises(BudgetError, match=r"2\.00 GiB of weight maps before the first patient"):
        _plan(_limits(2, 8), per_patient_bytes=GiB // 4, baseline_bytes=0, setup_bytes=2 * GiB)
    with pytest.raises(BudgetError, match=r"0\.50 GiB thread scratch"):
        _plan(_limits(1, 8), per_patient_bytes=GiB // 2, baseline_bytes=0,
              per_thread_bytes=GiB // 16)


def test_baseline_allowance_follows_kernel_cache(monkeypatch):
    monkeypatch.setattr(process, "current_rss_bytes", lambda: 100 * MiB)
    monkeypatch.setattr(process, "kernel_cache_state", lambda: (40, 40))
    assert process.baseline_bytes() == 100 * MiB + process.WARM_JIT_BYTES
    monkeypatch.setattr(process, "kernel_cache_state", lambda: (40, 0))
    assert process.baseline_bytes() == 100 * MiB + process.WARM_JIT_BYTES + process.COLD_JIT_BYTES
    monkeypatch.setattr(process, "kernel_cache_state", lambda: (40, 30))
    assert (process.baseline_bytes()
            == 100 * MiB + process.WARM_JIT_BYTES + process.COLD_JIT_BYTES // 4)
    monkeypatch.setattr(process, "kernel_cache_state", lambda: (0, 0))  # cannot tell: cold
    assert process.baseline_bytes() == 100 * MiB + process.WARM_JIT_BYTES + process.COLD_JIT_BYTES
    assert process.baseline_bytes(compile_allowance_bytes=0) == 100 * MiB


def test_kernel_cache_state_counts_the_kernels():
    total, cached = process.kernel_cache_state()
    assert total >= 20 and 0 <= cached <= total


def test_pin_mmap_threshold_respects_env():
    assert process.pin_mmap_threshold(env={"MALLOC_MMAP_THRESHOLD_": "65536"}) is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_pin_mmap_threshold_returns_freed_volumes():
    # In a fresh process: a freed 20 MiB array stays resident (glibc's dynamic threshold)
    # unless the threshold is pinned.
    code = (
        "import sys, numpy as np, psutil\n"
        "from pacs_numba.resources.process import pin_mmap_threshold\n"
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
    assert process.current_rss_bytes() > 10 * MiB
    assert process.peak_rss_bytes() >= process.current_rss_bytes() // 2
    assert process.baseline_bytes() > process.current_rss_bytes()


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


def test_threads_capped_at_numbas_pool(monkeypatch):
    """NUMBA_NUM_THREADS=1 on a 2-CPU node: set_num_threads(2) would refuse (issue 18)."""
    monkeypatch.setattr(numba.config, "NUMBA_NUM_THREADS", 1)
    lim = Limits(Figure(64 * GiB, "test"), Figure(2, "test"), {})
    p = plan_pool(lim, per_patient_bytes=GiB, baseline_bytes=0, n_patients=1, env={})
    assert (p.width, p.threads) == (1, 1)
    assert p.for_patients(1).threads == 1
    assert planning.numba_threads(0) == 1
    wide = plan_pool(lim, per_patient_bytes=GiB, baseline_bytes=0, n_patients=8, env={})
    assert wide.width * wide.threads <= 2 and wide.threads == 1
