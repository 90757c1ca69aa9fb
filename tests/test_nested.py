"""``pacs-numba tune --nested``: nested cross-validation of the settings (issue 21)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.core.blending import Normalisation, blend_patient, brain_mask, expert_mean
from pacs_numba.core.metrics import volume_metrics
from pacs_numba.core.tiling import TileGrid
from pacs_numba.errors import ConfigError
from pacs_numba.runs.nested import default_grid, family, run_nested
from pacs_numba.runs.tune import load_grid, run_tune
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.manifest import build_manifest, load_manifest, select_task, write_manifest
from pacs_numba.store.volumes import VolumeStore

SHAPE = (18, 21, 17)  # no axis divisible by 4


def _cohort(root: Path, kfolds: int = 3, patients: int = 6) -> Path:
    cfg = make_cohort(root, patients=patients, shape=SHAPE, spacings=("3mm",), pulses=("t1c",),
                      seed=3, kfolds=kfolds, patch_size=8, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=1, log_to_file=False)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    return cfg


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("nested")
    return _cohort(root), root / "cache"


def _grid(path: Path) -> Path:
    path.write_text(yaml.safe_dump({"lambda_edge": [0.0], "lambda_grad": [0.0],
                                    "laplacian_tau": [0.0], "gating": ["none", "edge"],
                                    "prior": ["none", "multiscale"]}))
    return path


def test_nested_chooses_on_inner_folds_only_and_resumes(cohort, tmp_path, capsys):
    cfg, cache = cohort
    out = tmp_path / "out"
    rc = cli.main(["tune", "--config", str(cfg), "--grid", str(_grid(tmp_path / "g.yaml")),
                   "--nested", "--out", str(out), "--cache-dir", str(cache), "--no-progress"])
    assert rc == 0
    assert "nested held-out gain" in capsys.readouterr().out
    summary = json.loads((out / "nested.json").read_text())
    folds = load_manifest(load_config(cfg).data.out)["folds"]
    assert summary["outer_folds"] == [1, 2, 3] and len(summary["best_expert"]) == 3
    assert summary["gain_psnr"] == pytest.approx(np.mean(summary["gain_psnr_per_fold"]))
    assert len(summary["chosen"]) == 3 and summary["wilcoxon"]["n"] == 6
    assert set(summary["families"]) == {"published", "multiscale", "edge-gated",
                                        "multiscale+edge-gated"}
    md = (out / "nested.md").read_text()
    assert "| chosen among all settings and the best expert alone |" in md
    assert "| chosen among all blend settings |" in md
    assert set(summary["mappings"]) == {"mean"}
    assert isinstance(summary["gain_psnr_vs_expert_path"], float)
    # No peeking: an inner unit of outer fold f neither trains nor tests on test(f).
    n_inner = 0
    for path in (out / "results").glob("*.json"):
        unit = json.loads(path.read_text())
        f, g = unit["split"]
        held = set(folds[f - 1]["test"])
        if g:
            n_inner += 1
            assert not held & set(unit["train"]) and not held & set(unit["patients"])
            assert set(unit["patients"]) == set(folds[g - 1]["test"])
        else:
            assert set(unit["patients"]) == held and not held & set(unit["train"])
    assert n_inner == summary["n_candidates"] * 3 * 2
    # The choice is the best mean inner PSNR, recomputed from the unit files.
    config = load_config(cfg)
    res = run_nested(config, load_grid(_grid(tmp_path / "g.yaml"), config), out,
                     cache_dir=cache, no_progress=True)
    assert res.units_done == 0 and res.units_resumed > 0
    for fi, f in enumerate([1, 2, 3]):
        means: dict[str, list[float]] = {}
        for path in (out / "results").glob("*.json"):
            unit = json.loads(path.read_text())
            if unit["split"][0] == f and unit["split"][1]:
                key = json.dumps(unit["candidate"], sort_keys=True)
                means.setdefault(key, []).extend(r["psnr"] for r in unit["patients"].values())
        best = max(means, key=lambda k: np.mean(means[k]))
        assert json.loads(best) == summary["blends_only"]["chosen"][fi]
        # the best expert alone is chosen when no blend beat it on the same inner units
        inner = summary["inner"][fi]
        alone = inner["best_expert_psnr"] >= np.mean(means[best])
        assert summary["expert_alone_chosen"][fi] == alone == inner["expert_alone_chosen"]
        if alone:
            assert summary["chosen"][fi] == {"expert": summary["best_expert"][fi]}
            assert summary["gain_psnr_per_fold"][fi] == 0.0
        else:
            assert summary["chosen"][fi] == summary["blends_only"]["chosen"][fi]


def test_outer_units_are_the_plain_sweeps_units(cohort, tmp_path):
    cfg, cache = cohort
    config = load_config(cfg)
    cands = load_grid(_grid(tmp_path / "g.yaml"), config)[:2]
    out = tmp_path / "out"
    res = run_nested(config, cands, out, cache_dir=cache, no_progress=True)
    plain = run_tune(config, cands, out, cache_dir=cache, no_progress=True)
    assert plain.units_done == sum(  # only outer units of settings no fold chose remain
        1 for c in cands for f in (1, 2, 3) if c.as_dict() not in
        [res.summary["blends_only"]["chosen"][f - 1], cands[0].as_dict()]
        and all(c.as_dict() != fam["chosen"][f - 1] for fam in [
            *res.summary["families"].values(), *res.summary["mappings"].values()])
    )


def test_default_grid_covers_the_config_and_every_weight_model(cohort):
    config = load_config(cohort[0])
    grid = default_grid(config)
    own = grid[0]
    assert (own.patch_size, own.stride, own.lambda_edge) == (8, 4, 0.25)
    aligned = "fitted centre + experts' z-scores"
    assert {family(c) for c in grid} == {"published", "multiscale", "edge-gated",
                                         "multiscale+edge-gated", f"published, {aligned}",
                                         f"multiscale, {aligned}"}
    assert any(c.stride == 2 and c.prior == "multiscale" for c in grid)
    assert all(c.lambda_edge == 0 and c.lambda_grad == 0 for c in grid if c.gating == "edge")


def test_tune_without_grid_or_nested_is_a_usage_error(cohort, capsys):
    assert cli.main(["tune", "--config", str(cohort[0])]) == 2
    assert "tune needs --grid FILE (or --nested" in capsys.readouterr().err


def test_nested_needs_three_folds(tmp_path):
    cfg = _cohort(tmp_path / "c", kfolds=2, patients=4)
    with pytest.raises(ConfigError, match="needs a manifest with at least 3 folds"):
        run_nested(load_config(cfg), default_grid(load_config(cfg)), tmp_path / "o",
                   cache_dir=tmp_path / "cache")


def test_grid_drops_weight_models_their_settings_exclude(cohort, tmp_path):
    config = load_config(cohort[0])
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"gating": ["none", "edge"], "lambda_edge": [0.0, 0.5]}))
    cands = load_grid(path, config)
    assert all(not (c.gating == "edge" and c.lambda_edge > 0) for c in cands)
    path.write_text(yaml.safe_dump({"gating": ["sharp"]}))
    with pytest.raises(ConfigError, match="gating: 'sharp' is not valid"):
        load_grid(path, config)
    path.write_text(yaml.safe_dump({"prior_strength": [0]}))
    with pytest.raises(ConfigError, match="prior_strength: 0 is not valid; expected numbers > 0"):
        load_grid(path, config)


def test_complementary_cohort_has_experts_that_win_in_different_places(tmp_path):
    from pacs_numba.store.cohort import complementary_expert, downsample_slices

    cfg = make_cohort(tmp_path / "c", patients=2, shape=(20, 22, 18), spacings=("3mm",),
                      pulses=("t1c",), models=("A", "B", "C"), kfolds=2, patch_size=8,
                      stride=4, experts="complementary")
    assert cfg.exists()
    rng = np.random.default_rng(0)
    hr = np.zeros((20, 22, 18), np.float32)
    hr[4:16, 4:18, 3:15] = 100.0
    lr = downsample_slices(hr, 3)
    ex = {k: complementary_expert(lr, hr, 3, k, np.random.default_rng(1))
          for k in ("sharp_noisy", "smooth", "edge_only")}
    assert all(v.shape == hr.shape and v.min() >= 0 for v in ex.values())
    flat = np.zeros(hr.shape, bool)
    flat[8:12, 8:14, 7:11] = True  # deep inside the block
    err = {k: np.abs(v - hr) for k, v in ex.items()}
    assert err["smooth"][flat].mean() < err["sharp_noisy"][flat].mean()
    with pytest.raises(ConfigError, match="experts must be one of"):
        make_cohort(tmp_path / "d", patients=2, kfolds=2, experts="random")
    with pytest.raises(ConfigError, match="complementary expert kind 'x'"):
        complementary_expert(lr, hr, 3, "x", rng)


def test_make_cohort_cli_writes_complementary_experts(tmp_path, capsys):
    out = tmp_path / "c"
    assert cli.main(["make-cohort", "--out", str(out), "--patients", "2", "--shape", "12", "13",
                     "12", "--kfolds", "2", "--models", "A", "B", "C", "--experts",
                     "complementary"]) == 0
    assert "cohort written" in capsys.readouterr().out
    assert load_config(out / "config.yaml").data.models == ("A", "B", "C")
    assert len(list((out / "models" / "C" / "3mm" / "output_volumes").glob("*.nii.gz"))) == 2


def test_expert_through_the_blend_path_is_the_one_hot_blend(cohort, tmp_path):

    cfg, cache = cohort
    config = load_config(cfg)
    cands = load_grid(_grid(tmp_path / "g.yaml"), config)[:1]
    out = tmp_path / "out"
    run_tune(config, cands, out, folds=[1], cache_dir=cache, no_progress=True)
    unit = json.loads(next((out / "results").glob("*.json")).read_text())
    pid, rec = sorted(unit["patients"].items())[0]
    _, test = select_task(load_manifest(config.data.out), 1, "3mm", "t1c", config.data.models)
    store = VolumeStore(cache)
    hr = store.get(test[pid]["HR"]).data
    ex = [store.get(p).data for p in test[pid]["experts"]]
    proxy = expert_mean(ex)
    norm = Normalisation.from_experts(ex, proxy)
    grid = TileGrid(hr.shape, 8, 4)
    for e, name in enumerate(config.data.models):
        w = np.zeros((grid.n_tiles, len(ex)), np.float32)
        w[:, e] = 1
        blend = blend_patient(ex, grid, w, window="hann", norm=norm, brain_mask=brain_mask(proxy))
        want = volume_metrics(hr, blend, ssim_axis="axial")["psnr"]
        assert rec["experts_path"][name]["psnr"] == pytest.approx(want, abs=1e-3)


def test_sigterm_stops_nested_between_units_and_a_rerun_resumes(cohort, tmp_path, monkeypatch,
                                                                caplog):
    import logging
    import os
    import signal

    import pacs_numba.runs.nested as nested_mod

    cfg, cache = cohort
    out = tmp_path / "o"
    real = nested_mod.fit_and_score
    calls = []

    def fit_then_signal(*a, **k):
        unit = real(*a, **k)
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return unit

    monkeypatch.setattr(nested_mod, "fit_and_score", fit_then_signal)
    argv = ["tune", "--config", str(cfg), "--grid", str(_grid(tmp_path / "g.yaml")),
            "--nested", "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    with caplog.at_level(logging.INFO):
        assert cli.main(argv) == 143
    assert len(calls) == 1 and len(list((out / "results").glob("*.json"))) == 1
    assert "tune --nested: stopped by SIGTERM after 1 unit(s)" in caplog.text
    monkeypatch.setattr(nested_mod, "fit_and_score", real)
    config = load_config(cfg)
    res = run_nested(config, load_grid(_grid(tmp_path / "g.yaml"), config), out,
                     cache_dir=cache, no_progress=True)
    assert res.units_resumed >= 1 and (out / "nested.json").exists()


def test_an_expert_no_blend_beats_is_chosen_alone_with_a_gain_of_exactly_zero(tmp_path):
    # One expert is the HR with a little noise: no blend beats it, so every outer fold
    # chooses it on its inner folds, and then its held-out gain is exactly 0 (its own volume).
    import nibabel as nib

    cfg = _cohort(tmp_path / "c")
    config = load_config(cfg)
    manifest = load_manifest(config.data.out)
    first = config.data.models[0]
    rng = np.random.default_rng(5)
    for fold in manifest["folds"]:
        for entry in fold["test"].values():
            img = nib.load(entry["HR"]["3mm"]["t1c"])
            hr = img.get_fdata(dtype=np.float32)
            noisy = hr + rng.normal(0, 0.002 * float(hr.max()), hr.shape).astype(np.float32)
            nib.save(nib.Nifti1Image(noisy, img.affine, img.header),
                     entry[first]["3mm"]["t1c"])
    out = tmp_path / "out"
    cands = load_grid(_grid(tmp_path / "g.yaml"), config)[:2]
    res = run_nested(config, cands, out, cache_dir=tmp_path / "cache", no_progress=True)
    s = res.summary
    assert s["best_expert"] == [first] * 3 and s["expert_alone_chosen"] == [True] * 3
    assert s["chosen"] == [{"expert": first}] * 3
    assert s["gain_psnr"] == 0.0 and s["gain_psnr_per_fold"] == [0.0] * 3
    assert s["wilcoxon"]["p_value"] is None  # all differences are 0
    assert s["blends_only"]["gain_psnr"] < 0  # the blends alone would have lost
    assert "fold 1: expert " + first + " alone" in (out / "nested.md").read_text()


def test_default_grid_sweeps_the_hr_free_mapping(cohort):
    grid = default_grid(load_config(cohort[0]))
    weighted = [c for c in grid if c.hr_free_mapping == "weighted"]
    assert grid[0].hr_free_mapping == "mean" and weighted
    plain = {dataclasses.replace(c, hr_free_mapping="mean") for c in weighted}
    assert plain <= set(grid)  # each weighted setting is the twin of a mean one
    assert all(c.lambda_edge == 0 and c.lambda_grad == 0 for c in weighted)


def test_default_grid_fits_as_predict_blends_at_both_tile_sizes(cohort):
    """The options fitted as predict blends (algorithm A4): the published model and the prior
    on each window's central block with the experts' z-scores, both sizes, both map-backs;
    every setting of the grid without them is still there."""
    grid = default_grid(load_config(cohort[0]))
    aligned = [c for c in grid if c.fit_region == "centre"]
    assert all(c.fit_normalisation == "experts" and c.gating == "none" for c in aligned)
    assert {(c.patch_size, c.stride) for c in aligned} == {(8, 4), (4, 2)}
    assert {c.prior for c in aligned} == {"none", "multiscale"}
    assert {c.hr_free_mapping for c in aligned} == {"mean", "weighted"}
    assert all(c.fit_normalisation == "hr" for c in grid if c.fit_region != "centre")
    assert len(grid) == len(set(grid)) == 36 + len(aligned)
