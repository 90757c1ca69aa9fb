"""scripts/profile_tune.py end to end at a tiny size: every run exits 0, the report makes sense.

The children inherit this session's environment, NUMBA_CACHE_DIR included, so they load the
kernels the session compiled; ``--no-warmup`` skips the script's own un-measured warm-up.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "profile_tune.py"
KINDS = {"tune-1", "tune-grid", "train-published", "train-lean"}


def _load_script():
    spec = importlib.util.spec_from_file_location("pacs_profile_tune_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_tune_tiny(tmp_path: Path) -> None:
    results = tmp_path / "results"
    grid = tmp_path / "grid.yaml"
    grid.write_text("lambda_edge: [0.0, 0.25]\n")  # with the config's own: 2 settings
    # One axis reaches the published patch size (32): a patch longer than every axis is a
    # config error.
    cmd = [sys.executable, str(SCRIPT), "--shape", "24", "34", "22", "--patients", "4",
           "--kfolds", "2", "--repeats", "1", "--grid", str(grid), "--no-warmup",
           "--work", str(tmp_path / "work"), "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (jpath,) = results.glob("*-tune-*.json")
    doc = json.loads(jpath.read_text())
    md = jpath.with_suffix(".md").read_text()
    assert doc["parameters"]["shape"] == [24, 34, 22]
    assert (doc["parameters"]["patients"], doc["parameters"]["kfolds"]) == (4, 2)
    assert doc["parameters"]["published"]["lambda_ridge"] == 1e-4
    assert doc["parameters"]["published"]["edge_power"] == 2.0

    runs = doc["runs"]
    assert {(r["kind"], r["cache"]) for r in runs} == {
        (k, c) for k in KINDS for c in ("cold", "warm")}
    for r in runs:
        assert r["rc"] == 0, r["log_tail"]
        assert r["wall_s"] > 0 and r["cpu_s"] > 0 and r["peak_rss_bytes"] > 0, r["label"]
        assert r["loadavg_1min_before"] >= 0
        assert r["cmd"].split()[1] == r["kind"].split("-")[0]  # a pacs-numba tune/train process
    for r in (r for r in runs if r["kind"].startswith("tune")):
        assert r["settings"] == (1 if r["kind"] == "tune-1" else 2)
        st = r["stages"]
        assert st is not None and st["total"] > 0
        assert st["statistics"] + st["fit"] + st["blend_metrics"] <= st["total"] + 0.3

    for key, s in doc["summary"].items():
        assert s["cpu_s"]["min"] <= s["cpu_s"]["median"] <= s["cpu_s"]["max"], key
        assert s["wall_s"]["median"] > 0 and s["peak_rss_bytes"]["median"] > 0
    for cache in ("cold", "warm"):
        r = doc["ratios"][cache]
        assert r["tune_1_over_train_published"] > 0 and r["tune_1_over_train_lean"] > 0
        assert r["tune_grid_over_tune_1"] > 0

    g = doc["gains"]
    assert "best single expert" in g["label"] and g["best_expert"]
    assert g["settings"] == 2
    for key in ("published", "best", "published_alone"):
        assert math.isfinite(g[key]["gain_psnr_db"]) and math.isfinite(g[key]["gain_ssim"])
        assert g[key]["n_eval"] == 4  # every patient held out once
    assert g["best"]["rank"] == 1 and g["best"]["psnr"] >= g["published"]["psnr"]
    assert g["published"]["setting"]["lambda_edge"] == "0.25"
    # the published setting scores the same alone and inside the grid
    assert g["published_alone"]["gain_psnr_db"] == g["published"]["gain_psnr_db"]

    assert "| `tune`, grid = the published setting alone | cold |" in md
    assert "| `train` all folds, evaluate_train false, outputs off | warm |" in md
    assert "held-out blends and scores" in md and "(the same as in the grid)" in md
    assert f"{g['published']['gain_psnr_db']:+.4f} dB PSNR" in md


def test_result_paths_never_reuse_a_name(tmp_path: Path) -> None:
    mod = _load_script()
    first = mod.result_paths(tmp_path, "node1.example", "2026-12-07")
    assert [p.name for p in first] == ["2026-12-07-tune-node1.json", "2026-12-07-tune-node1.md"]
    first[1].write_text("an earlier profile")  # either file taken: the pair is taken
    second = mod.result_paths(tmp_path, "node1.example", "2026-12-07")
    assert [p.name for p in second] == ["2026-12-07-tune-node1-2.json",
                                        "2026-12-07-tune-node1-2.md"]
