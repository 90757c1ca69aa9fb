"""scripts/profile.py end to end at a tiny size: it runs and writes the JSON and markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile.py"
STAGES = ("load", "statistics", "solve", "smoothing", "blend", "metrics", "writes")


def test_profile_script_tiny(tmp_path: Path) -> None:
    results = tmp_path / "results"
    work = tmp_path / "work"
    # One axis reaches the benchmark's patch size (32): a patch longer than every axis is a
    # config error.
    cmd = [sys.executable, str(SCRIPT), "--shape", "24", "34", "22", "--train", "3", "--test",
           "1", "--repeats", "1", "--widths", "1", "--threads", "1", "--out", str(work),
           "--results", str(results), "--name", "tiny", "--no-snapshot"]
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

    base = doc["baseline"]["1"]["summary"]
    assert base["wall_s"]["median"] > 0 and base["peak_rss_bytes"]["median"] > 0
    ratios = doc["ratios"]
    assert ratios["speedup"]["warm"]["headline"]["speedup"] > 0
    assert set(doc["targets_met"]) == {"warm_speedup", "cold_speedup", "peak_rss_ratio",
                                       "per_worker_rss_ratio"}
    assert "| pacs_numba | warm | 1 x 1 |" in md and "| literal baseline |" in md
