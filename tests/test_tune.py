"""``pacs-numba tune`` and the statistics the K-fold ``train`` shares (issue 13)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from numpy.testing import assert_allclose

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.core.blending import Normalisation, blend_patient, brain_mask, expert_mean
from pacs_numba.core.cellstats import patient_statistics
from pacs_numba.core.metrics import volume_metrics
from pacs_numba.core.solve import fit_weights
from pacs_numba.core.tiling import TileGrid
from pacs_numba.errors import ConfigError
from pacs_numba.runs import cvunits
from pacs_numba.runs.engine import Engine, RunOptions
from pacs_numba.runs.tune import Candidate, load_grid, run_tune
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.manifest import build_manifest, select_task, write_manifest
from pacs_numba.store.volumes import VolumeStore

SHAPE = (22, 25, 21)  # no axis divisible by 4
SPACING, PULSE = "3mm", "t1c"


def _cohort(root: Path, **pacs_sr) -> Path:
    cfg = make_cohort(root, patients=5, shape=SHAPE, spacings=(SPACING,), pulses=(PULSE,),
                      seed=5, kfolds=3, patch_size=8, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=1, log_to_file=False, evaluate_train=False,
                          save_weight_volumes=False, save_blends=False, **pacs_sr)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    return cfg


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    return _cohort(root), root / "cache"


def _grid(path: Path, **values) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


def _forbid_reads(monkeypatch) -> None:
    def fail(self, path):
        raise AssertionError(f"volume '{path}' was read")

    monkeypatch.setattr(VolumeStore, "get", fail)


def test_kfold_train_computes_each_patients_statistics_once(cohort, monkeypatch, tmp_path):
    cfg, _ = cohort
    config = load_config(cfg)
    engine = Engine(config, RunOptions(cache_dir=tmp_path / "c", out_root=tmp_path / "out",
                                       no_progress=True))
    for task in engine.tasks():
        engine.train(task)
    n_patients = 5
    assert engine.stats_cache.computed == n_patients  # 3 folds x ~3.3 training patients
    # A rerun with another lambda_edge and lambda_ridge (same edge_power) reads no volume for
    # the fit: evaluation aside, the statistics come from the cache.
    import dataclasses

    config2 = dataclasses.replace(config, pacs_sr=dataclasses.replace(
        config.pacs_sr, lambda_edge=config.pacs_sr.lambda_edge * 2 + 0.1, lambda_ridge=0.5))
    engine2 = Engine(config2, RunOptions(cache_dir=tmp_path / "c", out_root=tmp_path / "o2"))
    train, _ = select_task(engine2.manifest(), 1, SPACING, PULSE, config.data.models)
    from pacs_numba.runs.engine import StageClock

    task = engine2.tasks()[0]
    plan = engine2.plan(task)["fit"]  # volume headers only
    with monkeypatch.context() as mp:
        _forbid_reads(mp)
        model = engine2._fit(task, train, StageClock(), {}, {}, plan)
    assert engine2.stats_cache.computed == 0 and model.learned.any()


def test_grid_errors_name_the_file_and_key(cohort, tmp_path):
    config = load_config(cohort[0])
    with pytest.raises(ConfigError, match=r"g.yaml: cannot sweep \['simplex'\]"):
        load_grid(_grid(tmp_path / "g.yaml", simplex=[True]), config)
    with pytest.raises(ConfigError, match=r"g.yaml: lambda_edge: -1 is not valid"):
        load_grid(_grid(tmp_path / "g.yaml", lambda_edge=[0, -1]), config)
    with pytest.raises(ConfigError, match="g.yaml: fit_region: 'box' is not valid"):
        load_grid(_grid(tmp_path / "g.yaml", fit_region="box"), config)
    with pytest.raises(ConfigError, match="every combination has stride > patch_size"):
        load_grid(_grid(tmp_path / "g.yaml", patch_size=[4], stride=[8]), config)
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid(tmp_path / "missing.yaml", config)


def test_grid_is_the_config_then_the_product_without_duplicates(cohort, tmp_path):
    config = load_config(cohort[0])
    cands = load_grid(_grid(tmp_path / "g.yaml", patch_size=[8], stride=[4, 8],
                            mixing_window=["flat", "hann"], fit_region=["first_block"]), config)
    own = Candidate(**{k: getattr(config.pacs_sr, k) for k in Candidate.__dataclass_fields__})
    assert cands[0] == own
    # stride 8 = patch 8: no overlap, so flat and hann are one candidate
    assert sorted((c.stride, c.window) for c in cands) == [(4, "flat"), (4, "hann"), (8, "flat")]
    # Without overlap the window-weighted box is the label cell: one candidate too.
    cands = load_grid(_grid(tmp_path / "g.yaml", patch_size=[8], stride=[4, 8],
                            fit_region=["first_block", "window"]), config)
    assert sorted((c.stride, c.fit_region) for c in cands) == [
        (4, "first_block"), (4, "window"), (8, "first_block")]


def test_tune_scores_held_out_patients_without_hr_and_resumes(cohort, tmp_path, monkeypatch,
                                                              capsys):
    cfg, cache = cohort
    grid = _grid(tmp_path / "g.yaml", patch_size=[8], stride=[4, 8], lambda_edge=[0.0, 0.7],
                 lambda_grad=[0.0, 0.3], lambda_ridge=[1e-3], fit_region=["first_block", "window"],
                 mixing_window=["hann"])
    out = tmp_path / "tune"
    rc = cli.main(["tune", "--config", str(cfg), "--grid", str(grid), "--out", str(out),
                   "--cache-dir", str(cache), "--no-progress", "--folds", "1", "2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "best: held-out PSNR" in printed
    config = load_config(cfg)
    cands = load_grid(grid, config)
    rows = list(csv.DictReader(io.StringIO((out / "tune_results.csv").read_text())))
    assert len(rows) == len(cands)
    psnr = [float(r["psnr"]) for r in rows]
    assert psnr == sorted(psnr, reverse=True) and all(np.isfinite(psnr))
    assert "| rank |" in (out / "tune_results.md").read_text()
    best = load_config(out / "best_config.yaml").pacs_sr
    assert best.stride == int(rows[0]["stride"]) and best.fit_region == rows[0]["fit_region"]
    assert len(list((out / "results").glob("*.json"))) == 2 * len(cands)

    # An independent recomputation of one unit: direct statistics of the fold's training
    # patients, exact QP, blend of a held-out patient with expert-derived statistics.
    c = Candidate(patch_size=8, stride=8, lambda_ridge=1e-3, lambda_edge=0.7, lambda_grad=0.3,
                  laplacian_tau=config.pacs_sr.laplacian_tau, fit_region="first_block",
                  mixing_window="hann")
    assert c in cands
    unit = next(
        u for u in (json.loads(p.read_text()) for p in (out / "results").glob("*.json"))
        if u["candidate"] == c.as_dict() and u["fold"] == 2
    )
    store = VolumeStore(cache)
    train, test = select_task(json.loads(Path(config.data.out).read_text()), 2, SPACING, PULSE,
                              config.data.models)
    grid8 = TileGrid(SHAPE, 8, 8)
    Q = B = n = 0
    for paths in train.values():
        st = patient_statistics(store.get(paths["HR"]).data,
                                [store.get(p).data for p in paths["experts"]], grid8,
                                lambda_edge=0.7, edge_power=config.pacs_sr.edge_power,
                                lambda_grad=0.3, grad_operator=config.pacs_sr.grad_operator)
        Q, B, n = Q + st.Q, B + st.B, n + st.counts
    from pacs_numba.core.solve import laplacian_smooth

    w, learned = fit_weights(Q, B, n, grid8.counts, simplex=config.pacs_sr.simplex,
                             lambda_ridge=1e-3, laplacian_tau=0.0)
    if c.laplacian_tau > 0:
        w = laplacian_smooth(w, learned, grid8.counts, c.laplacian_tau)
    for pid, paths in test.items():
        hr = store.get(paths["HR"]).data
        ex = [store.get(p).data for p in paths["experts"]]
        proxy = expert_mean(ex)
        blend = blend_patient(ex, grid8, w, window="hann",
                              norm=Normalisation.from_experts(ex, proxy),
                              brain_mask=brain_mask(proxy))
        m = volume_metrics(hr, blend, ssim_axis=config.pacs_sr.ssim_axis)
        assert_allclose(unit["patients"][pid]["psnr"], m["psnr"], rtol=1e-6)
        assert_allclose(unit["patients"][pid]["ssim"], m["ssim"], rtol=1e-6)

    # Rerun: every unit is resumed and no volume is read; a new fold adds only its units.
    before = {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}
    with monkeypatch.context() as mp:
        _forbid_reads(mp)
        res = run_tune(config, cands, out, folds=[1, 2], cache_dir=cache, no_progress=True)
    assert res.units_done == 0 and res.units_resumed == 2 * len(cands)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")} == before
    res = run_tune(config, cands, out, cache_dir=cache, no_progress=True)  # all 3 folds
    assert res.units_done == len(cands) and res.units_resumed == 2 * len(cands)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")
            if p.name in before} == before


def test_tune_rejects_a_fold_outside_the_manifest(cohort, tmp_path, capsys):
    cfg, cache = cohort
    grid = _grid(tmp_path / "g.yaml", stride=[4])
    rc = cli.main(["tune", "--config", str(cfg), "--grid", str(grid), "--out",
                   str(tmp_path / "o"), "--cache-dir", str(cache), "--folds", "7"])
    assert rc == 2
    assert "--folds 7: the manifest has folds 1..3" in capsys.readouterr().err


def test_window_fit_region_fits_each_box_with_the_blend_window(tmp_path):
    """Engine train with ``fit_region: window`` against the slow twin of the box statistics."""
    from reference import stats as ref

    from pacs_numba.core.solve import objective
    from pacs_numba.runs.engine import StageClock

    cfg = _cohort(tmp_path / "c", fit_region="window", mixing_window="hann", lambda_edge=0.4,
                  lambda_grad=0.3, laplacian_tau=0.0)
    config = load_config(cfg)
    assert config.pacs_sr.fit_region == "window"
    p = config.pacs_sr
    engine = Engine(config, RunOptions(cache_dir=tmp_path / "cache", out_root=tmp_path / "o"))
    train, _ = select_task(engine.manifest(), 1, SPACING, PULSE, config.data.models)
    model = engine._fit(engine.tasks()[0], train, StageClock(), {}, {},
                     engine.plan(engine.tasks()[0])["fit"])
    store = VolumeStore(tmp_path / "cache")
    m = len(config.data.models)
    parts = counts = 0
    for paths in train.values():
        twin = ref.box_moments(
            store.get(paths["HR"]).data, [store.get(x).data for x in paths["experts"]],
            patch_size=p.patch_size, stride=p.stride, window="hann",
            edge_power=p.edge_power, grad_operator=p.grad_operator)
        parts, counts = parts + twin["parts"], counts + twin["counts"]
    terms = parts[:, 0] + 0.4 * parts[:, 1] + 0.3 * (parts[:, 2] + 0.4 * parts[:, 3])
    idx = np.empty((m, m), int)
    t = m
    for a in range(m):
        for c in range(a, m):
            idx[a, c] = idx[c, a] = t
            t += 1
    Q, B = terms[:, idx], terms[:, :m]
    grid = TileGrid(SHAPE, p.patch_size, p.stride)
    w, learned = fit_weights(Q, B, counts, grid.counts, simplex=p.simplex,
                             lambda_ridge=p.lambda_ridge, laplacian_tau=0.0)
    assert np.array_equal(model.learned, learned) and learned.sum() > grid.n_tiles // 3
    f_model = objective(Q, B, p.lambda_ridge, model.weights)
    f_twin = objective(Q, B, p.lambda_ridge, w)
    scale = np.abs(Q).max(axis=(1, 2))
    assert np.all(f_model <= f_twin + 1e-5 * scale)
    # ... and it is a different fit from the published first-block one.
    import dataclasses

    fb = dataclasses.replace(config, pacs_sr=dataclasses.replace(p, fit_region="first_block"))
    eng_fb = Engine(fb, RunOptions(cache_dir=tmp_path / "cache", out_root=tmp_path / "o2"))
    model_fb = eng_fb._fit(eng_fb.tasks()[0], train, StageClock(), {}, {},
                        eng_fb.plan(eng_fb.tasks()[0])["fit"])
    assert np.abs(model_fb.weights - model.weights).max() > 1e-3


def test_bad_fit_region_is_a_config_error_naming_the_key(tmp_path):
    cfg = make_cohort(tmp_path / "c", patients=3, shape=(12, 12, 12), spacings=(SPACING,),
                      pulses=(PULSE,), kfolds=3)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"]["fit_region"] = "boxes"
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="fit_region"):
        load_config(cfg)


def test_tune_holds_one_folds_held_out_patients_at_a_time(cohort, tmp_path, monkeypatch):
    """Memory flat in the cohort: a fold's held-out preparation is dropped after the fold,
    and no held-out patient's volumes stay mapped between units."""
    cfg, cache = cohort
    config = load_config(cfg)
    manifest = json.loads(Path(config.data.out).read_text())
    most_test = max(len(f["test"]) for f in manifest["folds"])
    held_sizes: list[int] = []
    real = cvunits.Patients.held_out

    def spy(self, pid, ssim_axis):
        out = real(self, pid, ssim_axis)
        held_sizes.append(len(self._held))
        return out

    monkeypatch.setattr(cvunits.Patients, "held_out", spy)
    grid = _grid(tmp_path / "g.yaml", lambda_ridge=[0.001, 0.01], patch_size=[4, 8])
    run_tune(config, load_grid(grid, config), tmp_path / "o", cache_dir=cache,
             no_progress=True)
    assert held_sizes and max(held_sizes) <= most_test  # never two folds' patients at once
    assert len(held_sizes) > len(manifest["folds"]) * most_test  # reused across settings


def test_tune_sweeps_the_centre_region_and_the_experts_z_scores(cohort, tmp_path):
    """``fit_region: centre`` and ``fit_normalisation: experts`` (algorithm A4) are swept keys;
    a unit equals a recomputation from each training patient's own statistics."""
    from pacs_numba.core.cellstats import StatsKey, box_statistics, sum_stats
    from pacs_numba.core.weightfit import fit_model

    cfg, cache = cohort
    config = load_config(cfg)
    grid = _grid(tmp_path / "g.yaml", patch_size=[8], stride=[4], lambda_edge=[0.0],
                 lambda_grad=[0.0], laplacian_tau=[0.0], mixing_window=["hann", "flat"],
                 fit_region=["first_block", "centre"], fit_normalisation=["hr", "experts"])
    cands = load_grid(grid, config)[1:]
    # with flat windows the centre region is the label cell: one candidate per normalisation
    assert sorted((c.window, c.fit_region, c.fit_normalisation) for c in cands) == sorted(
        (w, r, n) for w in ("flat", "hann") for r in ("first_block", "centre")
        for n in ("hr", "experts") if not (w == "flat" and r == "centre"))
    out = tmp_path / "tune"
    res = run_tune(config, cands, out, folds=[1], cache_dir=cache, no_progress=True)
    assert res.units_done == len(cands)
    c = next(c for c in cands if c.fit_region == "centre" and c.fit_normalisation == "experts")
    unit = next(u for u in (json.loads(p.read_text()) for p in (out / "results").glob("*.json"))
                if u["candidate"] == c.as_dict())
    store = VolumeStore(cache)
    train, test = select_task(json.loads(Path(config.data.out).read_text()), 1, SPACING, PULSE,
                              config.data.models)
    key = StatsKey.make(region="centre", stride=4, patch_size=8, window="hann", edge_power=1.0,
                        grad_operator="sobel", with_edge=False, with_grad=False,
                        normalisation="experts")
    st = sum_stats([box_statistics(store.get(p["HR"]).data,
                                   [store.get(x).data for x in p["experts"]], key)
                    for p in train.values()])
    w, _ = fit_model(st, simplex=config.pacs_sr.simplex, lambda_ridge=c.lambda_ridge)
    for pid, paths in test.items():
        hr = store.get(paths["HR"]).data
        ex = [store.get(p).data for p in paths["experts"]]
        proxy = expert_mean(ex)
        blend = blend_patient(ex, TileGrid(SHAPE, 8, 4), w, window="hann",
                              norm=Normalisation.from_experts(ex, proxy),
                              brain_mask=brain_mask(proxy))
        m = volume_metrics(hr, blend, ssim_axis=config.pacs_sr.ssim_axis)
        assert_allclose(unit["patients"][pid]["psnr"], m["psnr"], rtol=1e-6)
    psnr = {(r["candidate"]["fit_region"], r["candidate"]["fit_normalisation"],
             r["candidate"]["mixing_window"]): r["psnr"] for r in res.table}
    assert len(set(psnr.values())) == len(psnr)  # every setting fits differently
