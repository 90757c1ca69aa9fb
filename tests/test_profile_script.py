"""scripts/profile.py end to end at a tiny size: it runs and writes the JSON and markdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile.py"
STAGES = ("load", "statistics", "solve", "smoothing", "blend", "metrics", "writes")


def test_profile_script_tiny(tmp_path: Path) -> None:
    results = tmp_path / "results"
    work = tmp_path / "work"
    # One axis reaches the benchmark's patch size (32): a patch longer than every axis is a
    # config error.
    cmd = [sys.executable, str(SCRIPT), "--shape", "24", "34", "22", "--train", "3", "--test",
           "1", "--repeats", "1", "--widths", "1", "--threads", "1", "--out", str(work),
           "--results", str(results), "--name", "tiny", "--no-snapshot",
           "--no-first-ever"]  # a first-ever run would compile every kernel again (minutes)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not work.exists()  # made by the script and removed without --keep

    doc = json.loads((results / "tiny.json").read_text())
    md = (results / "tiny.md").read_text()
    assert "--shape 24 34 22" in doc["command"] and doc["command"] in md
    assert doc["parameters"]["shape"] == [24, 34, 22]
    assert (doc["parameters"]["train"], doc["parameters"]["test"]) == (3, 1)
    assert doc["parameters"]["configs"] == ["1x1"]
    assert doc["threading_layer"] in {"omp", "tbb", "workqueue"}
    assert doc["environment"]["measured_source"]["unchanged"] is True
    env = doc["environment"]
    assert env["host"] and env["cpus_used"] >= 1 and env["versions"]["numba"]

    cfg = doc["engine"]["1x1"]
    assert (cfg["width"], cfg["threads"]) == (1, 1)
    for cache in ("cold", "warm"):
        s = cfg[cache]
        assert s["wall_s"]["median"] > 0 and s["patients_per_min"]["median"] > 0
        assert s["peak_rss_bytes"]["median"] >= s["peak_rss_sampled_bytes"]["median"] > 0
        assert set(STAGES) <= set(s["timings_s"])
    runs = [r for r in doc["runs"] if r["kind"] == "engine"]
    assert sorted(r["cache"] for r in runs) == ["cold", "warm"]
    cold = next(r for r in runs if r["cache"] == "cold")
    warm = next(r for r in runs if r["cache"] == "warm")
    assert cold["timings_s"]["load"] > warm["timings_s"]["load"]  # decompress vs memory-map
    assert all(r["pool"]["width"] == 1 and r["pool"]["threads"] == 1 for r in runs)
    assert all(r["metrics"]["test"]["psnr"] > 0 for r in runs)
    for r in runs:  # every evaluated patient's own time, by split
        assert {k: len(v) for k, v in r["patient_seconds"].items()} == {"train": 3, "test": 1}
        assert all(v > 0 for split in r["patient_seconds"].values() for v in split.values())
    assert cfg["warm"]["test_patient_s"]["median"] > 0
    assert "One test patient's evaluation (1x1;" in md
    fl = doc["floors"]  # inflating the fold's inputs once: 4 patients x (HR + 4 experts)
    assert fl["inputs"] == 20 and fl["gzip_cpu_s"] > 0 and fl["raw_bytes"] > 0
    assert "Floor here: inflating the fold's 20 .nii.gz inputs" in md

    base = doc["baseline"]["1"]["summary"]
    assert base["wall_s"]["median"] > 0 and base["peak_rss_bytes"]["median"] > 0
    ratios = doc["ratios"]
    assert ratios["speedup"]["warm"]["headline"]["speedup"] > 0
    assert set(doc["targets_met"]) == {"first_ever_speedup", "warm_speedup", "cold_speedup",
                                       "peak_rss_ratio", "per_worker_rss_ratio"}
    assert doc["targets_met"]["first_ever_speedup"] is None  # --no-first-ever: not measured
    assert doc["warmup"]["first_ever"] is False
    assert "not measured (--no-first-ever)" in md
    assert "| pacs_numba | warm | 1 x 1 |" in md and "| literal baseline |" in md


# ------------------------------------------------------- cheap checks: options, names, signals
def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pacs_profile_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_sets_small_defaults_that_explicit_options_override():
    prof = _load_script()
    args = prof.parse_args(["--quick"])
    assert tuple(args.shape) == prof.QUICK["shape"] and args.repeats == 1
    assert (args.train, args.test) == (prof.QUICK["train"], prof.QUICK["test"])
    args = prof.parse_args(["--quick", "--repeats", "2", "--shape", "10", "11", "12"])
    assert args.repeats == 2 and tuple(args.shape) == (10, 11, 12)
    assert args.train == prof.QUICK["train"]
    full = prof.parse_args([])
    assert tuple(full.shape) == prof.DEFAULT_SHAPE and full.repeats == 3
    # the plan: every configuration twice (cold, warm) per repeat, then the baseline runs
    runs = prof.plan(args, [(1, 1), (2, 1)], [1, 2])
    assert [label for label, _ in runs] == [
        "engine-1x1-cold-r1", "engine-1x1-warm-r1", "engine-2x1-cold-r1", "engine-2x1-warm-r1",
        "engine-1x1-cold-r2", "engine-1x1-warm-r2", "engine-2x1-cold-r2", "engine-2x1-warm-r2",
        "baseline-1w-r1", "baseline-2w-r1"]
    assert all(est > 0 for _, est in runs)
    # the baseline estimate grows faster than the volume (one mask per tile over the volume)
    small = dict(prof.plan(prof.parse_args(["--quick"]), [(1, 1)], [1]))["baseline-1w-r1"]
    big = dict(prof.plan(prof.parse_args([]), [(1, 1)], [1]))["baseline-1w-r1"]
    assert big > 20 * small


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--shape", "0", "4", "4"], "--shape"),
    (["--widths", "0"], "--widths must be >= 1"),
    (["--baseline-repeats", "-1"], "--baseline-repeats must be >= 0"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    prof = _load_script()
    with pytest.raises(SystemExit) as exc:
        prof.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_results_never_overwrite_a_profile(tmp_path: Path):
    prof = _load_script()
    import datetime as dt

    now = dt.datetime(2026, 11, 30, 1, 2)
    j, m = prof.result_paths(tmp_path, None, "vm.example", now)
    assert (j.name, m.name) == ("2026-11-30-vm-0102.json", "2026-11-30-vm-0102.md")
    m.write_text("committed profile")  # either file of the pair makes the stem taken
    j2, m2 = prof.result_paths(tmp_path, None, "vm.example", now)
    assert (j2.name, m2.name) == ("2026-11-30-vm-0102-2.json", "2026-11-30-vm-0102-2.md")
    j2.write_text("{}")
    assert prof.result_paths(tmp_path, None, "vm", now)[0].name == "2026-11-30-vm-0102-3.json"
    with pytest.raises(SystemExit, match="never overwritten"):
        prof.result_paths(tmp_path, "2026-11-30-vm-0102", "vm", now)
    with pytest.raises(SystemExit, match="file stem"):
        prof.result_paths(tmp_path, "../x", "vm", now)
    with pytest.raises(FileExistsError):  # a file that appears meanwhile is not replaced
        prof._write_new(m, "new")
    assert m.read_text() == "committed profile"


def test_existing_name_is_refused_before_anything_runs(tmp_path: Path):
    (tmp_path / "mine.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--name", "mine", "--results",
                           str(tmp_path), "--quick"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "never overwritten" in proc.stderr
    assert "measuring" not in proc.stderr and (tmp_path / "mine.json").read_text() == "{}"
    dry = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dry-run", "--results",
                          str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "plan: 8 measured runs" in dry.stderr and "estimate:" in dry.stderr
    assert "8/8 baseline-2w-r1" in dry.stderr and not list(tmp_path.glob("*.md"))


def _first_child(parent: int, timeout_s: float = 60.0):
    import psutil

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        for c in psutil.Process(parent).children():
            try:
                if "--_child" in c.cmdline():
                    return c
            except psutil.Error:
                continue
        time.sleep(0.05)
    raise AssertionError("no child started")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_children_stop_with_the_parent(tmp_path: Path, sig):
    import psutil

    cmd = [sys.executable, str(SCRIPT), "--shape", "40", "40", "40", "--train", "3", "--test",
           "1", "--widths", "1", "--threads", "1", "--no-snapshot", "--out", str(tmp_path / "w"),
           "--results", str(tmp_path / "r")]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        child = _first_child(parent.pid)
        time.sleep(1.0)  # let the child install its SIGTERM handler
        os.kill(parent.pid, sig)
        _, err = parent.communicate(timeout=60)
        if sig == signal.SIGTERM:
            assert parent.returncode == 128 + signal.SIGTERM, err[-2000:]
            assert "stopped by signal" in err
        gone, alive = psutil.wait_procs([child], timeout=30)
        assert not alive, "the child outlived its parent"
    finally:
        if parent.poll() is None:
            parent.kill()
    assert not (tmp_path / "r").exists()  # nothing written for a stopped run


def test_first_ever_ratio_is_the_baseline_wall_over_the_whole_first_process():
    """The first-ever figure counts imports and compile; the baseline of the same CPUs."""
    mod = _load_script()

    def summary(wall, rss=1e9):
        st = {"median": wall, "min": wall, "max": wall}
        return {"wall_s": st, "peak_rss_bytes": {"median": rss, "min": rss, "max": rss}}

    engine = {"2x1": {"width": 2, "threads": 1, "cold": summary(10.0, 8e8),
                      "warm": summary(5.0, 7e8)}}
    baseline = {"2": {"workers": 2, "summary": summary(700.0, 3e9), "runs": []}}
    first = {"width": 2, "threads": 1, "process_elapsed_s": 35.0, "wall_s": 30.0}
    r = mod.compute_ratios(engine, baseline, 2, first)
    assert r["first_ever"]["speedup"] == pytest.approx(20.0)  # 700 / 35, not 700 / 30
    assert r["targets"]["first_ever_speedup"]["met"] is False  # target 25x
    assert r["targets"]["warm_speedup"]["value"] == pytest.approx(140.0)
    assert r["targets"]["cold_speedup"]["met"] is True  # 70x >= 60x
    assert r["targets"]["peak_rss_ratio"]["value"] == pytest.approx(8e8 / 3e9)
    assert mod.compute_ratios(engine, baseline, 2)["targets"]["first_ever_speedup"]["met"] is None
