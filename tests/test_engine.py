"""End to end: the CLI on generated cohorts, checked against independent recomputations.

The oracle for "what the published tool does" is ``scripts/literal_baseline.py``, a literal
NumPy/loky re-implementation that never imports pacs_numba.
"""

from __future__ import annotations

import importlib
import json
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numba
import numpy as np
import pytest
import yaml

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.core.solve import objective
from pacs_numba.core.tiling import TileGrid
from pacs_numba.errors import InputError
from pacs_numba.runs.engine import Engine
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.manifest import build_manifest, select_task, write_manifest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
lb = importlib.import_module("literal_baseline")

SHAPE = (29, 34, 27)  # no axis divisible by the stride; 29 % 4 == 1 leaves one-voxel tiles
SPACING, PULSE = "3mm", "t1c"


def _edit_config(path: Path, **pacs_sr) -> Path:
    doc = yaml.safe_load(path.read_text())
    doc["pacs_sr"].update(pacs_sr)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _cohort(root: Path, **pacs_sr) -> Path:
    cfg = make_cohort(root, patients=6, shape=SHAPE, spacings=(SPACING,), pulses=(PULSE,),
                      seed=3, kfolds=3, patch_size=8, stride=4)
    _edit_config(cfg, num_workers=2, log_to_file=False, **pacs_sr)
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    return cfg


def _run(*argv: str) -> int:
    return cli.main([*map(str, argv)])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A cohort trained on fold 1 with the CLI (laplacian_tau 0 so the fit is a pure QP)."""
    root = tmp_path_factory.mktemp("cohort")
    cfg = _cohort(root, laplacian_tau=0.0)
    cache = root / "cache"
    rc = _run("train", "--config", cfg, "--fold", 1, "--cache-dir", cache, "--no-progress")
    assert rc == 0
    config = load_config(cfg)
    mdir = Path(config.pacs_sr.out_root) / "PaCS_SR" / SPACING / "model_data" / "fold_1" / PULSE
    return cfg, config, mdir, cache


def test_train_writes_every_output_of_the_published_layout(trained):
    cfg, config, mdir, _ = trained
    manifest = json.loads(Path(config.data.out).read_text())
    train, test = select_task(manifest, 1, SPACING, PULSE, config.data.models)
    vdir = mdir.parents[2] / "output_volumes"
    M = len(config.data.models)
    grid = TileGrid(SHAPE, 8, 4)

    metrics = json.loads((mdir / "metrics.json").read_text())
    # the published keys first and unchanged; ours (each expert, HR-free protocol) after them
    assert list(metrics) == ["train", "test", "test_hr_free", "test_experts"]
    for split in ("train", "test"):
        assert list(metrics[split]) == ["mse", "mae", "psnr", "ssim"]

    text = (mdir / "weights.json").read_text()
    weights = json.loads(text)
    keys = [int(k) for k in weights]
    assert keys == sorted(keys) and 0 < len(keys) <= grid.n_tiles
    assert text == json.dumps(weights, indent=2)
    for vec in weights.values():
        assert len(vec) == M
        assert all(float(np.float32(x)) == x for x in vec)  # float(float32) values
        assert min(vec) >= 0 and abs(sum(vec) - 1) < 1e-5

    for pid, paths in test.items():
        hr = nib.load(paths["HR"])
        out = nib.load(vdir / f"{pid}-{PULSE}.nii.gz")
        assert out.shape == SHAPE and out.get_data_dtype() == np.float32
        np.testing.assert_allclose(out.affine, hr.affine)
        with np.load(mdir / f"{pid}_weights_test.npz") as z:
            assert set(z.files) == {"weight_maps", "model_names", "patient_id", "split", "spacing",
                                    "pulse", "patch_size", "stride", "shape", "n_models"}
            assert z["weight_maps"].shape == (*SHAPE, M) and z["weight_maps"].dtype == np.float32
            assert str(z["patient_id"]) == pid and str(z["split"]) == "test"
            assert list(z["model_names"]) == list(config.data.models)
            labels = grid.labels()
            for t in (0, int(keys[len(keys) // 2])):
                np.testing.assert_array_equal(
                    z["weight_maps"][labels == t][0],
                    np.float32(weights[str(t)]) if str(t) in weights else np.float32(1 / M))
        with np.load(mdir / f"{pid}_weight_analysis_test.npz", allow_pickle=True) as z:
            assert set(z.files) == {"weight_maps", "entropy_map", "dominant_map", "model_names",
                                    "patient_id", "statistics"}
            assert z["entropy_map"].dtype == np.float32 and z["dominant_map"].dtype == np.int32
            stats = z["statistics"].item()
            assert set(stats) == set(config.data.models)
            assert set(stats[config.data.models[0]]) == {"mean", "std", "min", "max", "median",
                                                         "q25", "q75"}
    for pid in train:
        img = nib.load(mdir / f"{pid}_blend_train.nii.gz")
        assert img.shape == SHAPE and img.get_data_dtype() == np.float32
    assert (mdir / "pacs_model.npz").exists()
    leftovers = [p for p in mdir.parents[3].rglob("*") if ".tmp" in p.name]
    assert not leftovers


def test_metrics_json_equals_a_recomputation_from_the_written_blends(trained):
    _, config, mdir, _ = trained
    manifest = json.loads(Path(config.data.out).read_text())
    train, test = select_task(manifest, 1, SPACING, PULSE, config.data.models)
    vdir = mdir.parents[2] / "output_volumes"
    metrics = json.loads((mdir / "metrics.json").read_text())
    for split, patients, name in (("test", test, lambda p: vdir / f"{p}-{PULSE}.nii.gz"),
                                  ("train", train, lambda p: mdir / f"{p}_blend_train.nii.gz")):
        per = []
        for pid, paths in patients.items():
            hr = nib.load(paths["HR"]).get_fdata(dtype=np.float32)
            blend = nib.load(name(pid)).get_fdata(dtype=np.float32)
            per.append(lb.patient_metrics(hr, blend, "axial"))
        for k in ("mse", "mae", "psnr", "ssim"):
            expect = float(np.mean([m[k] for m in per]))
            assert metrics[split][k] == pytest.approx(expect, rel=1e-6, abs=1e-9), (split, k)


def _baseline_stats(config, train):
    p = config.pacs_sr
    grid = None
    Q = B = n = None
    for paths in train.values():
        hr = nib.load(paths["HR"]).get_fdata(dtype=np.float32)
        experts = [nib.load(e).get_fdata(dtype=np.float32) for e in paths["experts"]]
        grid = grid or TileGrid(hr.shape, p.patch_size, p.stride)
        M = len(experts)
        if Q is None:
            Q = np.zeros((grid.n_tiles, M, M))
            B = np.zeros((grid.n_tiles, M))
            n = np.zeros(grid.n_tiles, dtype=np.int64)
        # float64 products: an exact oracle (the published tool's own are float32)
        st = lb.patient_statistics(hr, experts, p.patch_size, p.stride, p.lambda_edge,
                                   p.edge_power, p.lambda_grad, p.grad_operator,
                                   product_dtype=np.float64)
        for t, (q, b, c) in st.items():
            Q[t] += q
            B[t] += b
            n[t] += c
    return Q, B, n


def test_train_weights_are_exact_minimisers_never_worse_than_any_expert(trained):
    """The fitted objective beats every single expert (a simplex vertex) on every tile."""
    _, config, mdir, _ = trained
    manifest = json.loads(Path(config.data.out).read_text())
    train, _ = select_task(manifest, 1, SPACING, PULSE, config.data.models)
    Q, B, n = _baseline_stats(config, train)
    lam = config.pacs_sr.lambda_ridge
    weights = json.loads((mdir / "weights.json").read_text())
    learned = np.flatnonzero(n > 0)
    assert sorted(int(k) for k in weights) == list(learned)
    W = np.array([weights[str(t)] for t in learned], dtype=np.float64)
    f = objective(Q[learned], B[learned], lam, W)
    scale = np.abs(f).max()
    M = Q.shape[1]
    for m in range(M):
        e = np.zeros_like(W)
        e[:, m] = 1
        assert np.all(f <= objective(Q[learned], B[learned], lam, e) + 1e-6 * scale)
    # and never worse than the published SLSQP weights, tile by tile (algorithm A5)
    for i, t in enumerate(learned):
        w_ref = lb.solve_tile(Q[t], B[t], lam, True)
        f_ref = lb.objective(w_ref, Q[t], B[t], lam)
        # float32 storage of our weights costs ~1e-7 relative of |f|
        assert f[i] <= f_ref + 1e-9 * abs(f_ref) + 1e-6 * abs(f[i]), t


def test_evaluate_published_weights_reproduces_published_metrics_and_blends(trained, tmp_path):
    cfg, config, _, cache = trained
    ref_root = tmp_path / "published"
    lb.run(cfg, 1, SPACING, PULSE, workers=2, out_root=ref_root)
    ref_mdir = ref_root / "PaCS_SR" / SPACING / "model_data" / "fold_1" / PULSE
    ours_root = tmp_path / "ours"
    rc = _run("evaluate", "--config", cfg, "--fold", 1, "--spacing", SPACING, "--pulse", PULSE,
              "--weights", ref_mdir / "weights.json", "--out-root", ours_root,
              "--cache-dir", cache, "--no-progress")
    assert rc == 0
    ours_mdir = ours_root / "PaCS_SR" / SPACING / "model_data" / "fold_1" / PULSE
    ref_m = json.loads((ref_mdir / "metrics.json").read_text())
    our_m = json.loads((ours_mdir / "metrics.json").read_text())
    for split in ("train", "test"):
        assert our_m[split]["psnr"] == pytest.approx(ref_m[split]["psnr"], abs=1e-4)
        assert our_m[split]["ssim"] == pytest.approx(ref_m[split]["ssim"], abs=1e-6)
        assert our_m[split]["mse"] == pytest.approx(ref_m[split]["mse"], rel=1e-5)
        assert our_m[split]["mae"] == pytest.approx(ref_m[split]["mae"], rel=1e-5)
    assert (ours_mdir / "weights.json").read_text() == (ref_mdir / "weights.json").read_text()
    for f in sorted((ref_root / "PaCS_SR" / SPACING / "output_volumes").glob("*.nii.gz")):
        a = nib.load(f).get_fdata(dtype=np.float32)
        b = nib.load(ours_root / "PaCS_SR" / SPACING / "output_volumes" / f.name).get_fdata(
            dtype=np.float32)
        # float32 rounding of a different summation order
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_result_does_not_depend_on_the_number_of_workers(trained, tmp_path):
    cfg, config, mdir, cache = trained
    rc = _run("train", "--config", cfg, "--fold", 1, "--out-root", tmp_path, "--workers", 1,
              "--cache-dir", cache, "--no-progress")
    assert rc == 0
    other = tmp_path / "PaCS_SR" / SPACING / "model_data" / "fold_1" / PULSE
    assert (other / "weights.json").read_text() == (mdir / "weights.json").read_text()
    assert (other / "metrics.json").read_text() == (mdir / "metrics.json").read_text()


def test_existing_outputs_are_not_overwritten_without_force(trained, capsys):
    cfg, _, _, cache = trained
    rc = _run("train", "--config", cfg, "--fold", 1, "--cache-dir", cache, "--no-progress")
    err = capsys.readouterr().err
    assert rc == 2
    assert "already exist" in err and "--force" in err and "Traceback" not in err


def test_corrupt_volume_skips_the_patient_and_metrics_name_it(tmp_path, capsys):
    cfg = _cohort(tmp_path)
    config = load_config(cfg)
    manifest = json.loads(Path(config.data.out).read_text())
    train, _ = select_task(manifest, 1, SPACING, PULSE, config.data.models)
    victim = sorted(train)[0]
    bad = Path(train[victim]["experts"][1])
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # a copy that died
    rc = _run("train", "--config", cfg, "--fold", 1, "--cache-dir", tmp_path / "c",
              "--no-progress")
    err = capsys.readouterr().err
    assert rc == 0
    assert victim in err and str(bad) in err
    mdir = Path(config.pacs_sr.out_root) / "PaCS_SR" / SPACING / "model_data" / "fold_1" / PULSE
    metrics = json.loads((mdir / "metrics.json").read_text())
    assert victim in metrics["skipped"] and str(bad) in metrics["skipped"][victim]
    assert np.isfinite(metrics["test"]["psnr"])


def test_missing_inputs_are_all_listed_before_any_work(tmp_path, capsys):
    cfg = _cohort(tmp_path)
    config = load_config(cfg)
    manifest = json.loads(Path(config.data.out).read_text())
    train, test = select_task(manifest, 1, SPACING, PULSE, config.data.models)
    gone = [Path(train[sorted(train)[0]]["HR"]), Path(test[sorted(test)[0]]["experts"][0])]
    for g in gone:
        g.unlink()
    rc = _run("train", "--config", cfg, "--fold", 1, "--cache-dir", tmp_path / "c")
    err = capsys.readouterr().err
    assert rc == 2
    assert all(str(g) in err for g in gone) and "2 input file(s)" in err
    assert not (Path(config.pacs_sr.out_root) / "PaCS_SR").exists()


def test_config_errors_exit_2_with_one_line_naming_the_key(tmp_path, capsys):
    cfg = _cohort(tmp_path)
    _edit_config(cfg, stride=99)
    rc = _run("train", "--config", cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "pacs_sr.stride" in err[0] and "Traceback" not in err[0]
    rc = _run("train", "--config", tmp_path / "nope.yaml")
    assert rc == 2 and "nope.yaml" in capsys.readouterr().err


def test_bad_fold_spacing_pulse_name_the_allowed_values(trained, capsys):
    cfg, _, _, _ = trained
    assert _run("train", "--config", cfg, "--fold", 9) == 2
    assert "1..3" in capsys.readouterr().err
    assert _run("train", "--config", cfg, "--spacing", "9mm") == 2
    assert "3mm" in capsys.readouterr().err


def test_build_manifest_make_cohort_cache_and_version_commands(tmp_path, capsys):
    out = tmp_path / "c"
    assert _run("make-cohort", "--out", out, "--patients", 4, "--shape", 20, 22, 18,
                "--kfolds", 2) == 0
    cfg = out / "config.yaml"
    assert cfg.exists()
    assert _run("build-manifest", "--config", cfg) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert len(man["folds"]) == 2
    cache = tmp_path / "cache"
    assert _run("cache", "info", "--cache-dir", cache) == 0
    assert "entries: 0" in capsys.readouterr().out
    assert _run("cache", "clear", "--cache-dir", cache) == 0
    assert _run("--version") == 0
    assert "pacs-numba" in capsys.readouterr().out


def test_demo_prints_the_table(tmp_path, capsys):
    from pacs_numba.runs.demo import run_demo

    text = run_demo(tmp_path, patients=4, shape=(28, 30, 26), cache_dir=tmp_path / "cache",
                    no_progress=True)
    assert "PaCS-SR" in text and "BSPLINE" in text and "PSNR" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("PaCS-SR "))
    psnr = float(row.split()[1])
    assert np.isfinite(psnr)


def test_train_metrics_equal_an_independent_exact_implementation(tmp_path):
    """Literal statistics + brute-force exact QP + literal smoothing, blending and metrics."""
    from reference.qp import simplex_qp

    cfg = _cohort(tmp_path)  # laplacian_tau 0.05 from make_cohort: smoothing is on
    config = load_config(cfg)
    p = config.pacs_sr
    assert p.laplacian_tau > 0 and p.lambda_grad > 0 and p.lambda_edge > 0
    assert _run("train", "--config", cfg, "--fold", 1, "--cache-dir", tmp_path / "cache",
                "--no-progress") == 0
    manifest = json.loads(Path(config.data.out).read_text())
    train, test = select_task(manifest, 1, SPACING, PULSE, config.data.models)
    Q, B, n = _baseline_stats(config, train)
    grid = TileGrid(SHAPE, p.patch_size, p.stride)
    weights = {int(t): simplex_qp(Q[t], B[t], p.lambda_ridge).astype(np.float32)
               for t in np.flatnonzero(n > 0)}
    weights = lb.laplacian_smooth(weights, grid.counts, p.laplacian_tau)
    expect = {}
    for split, patients in (("train", train), ("test", test)):
        per = []
        for paths in patients.values():
            hr = nib.load(paths["HR"]).get_fdata(dtype=np.float32)
            experts = [nib.load(e).get_fdata(dtype=np.float32) for e in paths["experts"]]
            blend = lb.blend_patient(hr, experts, weights, p.patch_size, p.stride,
                                     p.mixing_window)
            per.append(lb.patient_metrics(hr, blend, p.ssim_axis))
        expect[split] = {k: float(np.mean([m[k] for m in per])) for k in per[0]}
    mdir = Path(p.out_root) / "PaCS_SR" / SPACING / "model_data" / "fold_1" / PULSE
    ours = json.loads((mdir / "metrics.json").read_text())
    for split in ("train", "test"):
        assert ours[split]["psnr"] == pytest.approx(expect[split]["psnr"], abs=0.01)
        assert ours[split]["ssim"] == pytest.approx(expect[split]["ssim"], abs=1e-4)
    got = json.loads((mdir / "weights.json").read_text())
    assert sorted(map(int, got)) == sorted(weights)
    for t, w in weights.items():
        np.testing.assert_allclose(got[str(t)], w, atol=1e-5)


def test_predict_without_hr_is_close_to_the_evaluate_blend(trained, tmp_path):
    """algorithm B6: statistics and brain mask from the experts, against A7's HR-based blend."""
    from pacs_numba.core.predict import predict_volume

    _, config, mdir, cache = trained
    manifest = json.loads(Path(config.data.out).read_text())
    _, test = select_task(manifest, 1, SPACING, PULSE, config.data.models)
    pid, paths = sorted(test.items())[0]
    out = tmp_path / "pred.nii.gz"
    assert _run("predict", "--model", mdir / "pacs_model.npz", "--experts", *paths["experts"],
                "--out", out, "--cache-dir", cache) == 0
    pred = nib.load(out)
    hr_img = nib.load(paths["HR"])
    assert pred.shape == SHAPE and pred.get_data_dtype() == np.float32
    np.testing.assert_allclose(pred.affine, nib.load(paths["experts"][0]).affine)
    hr = hr_img.get_fdata(dtype=np.float32)
    p = pred.get_fdata(dtype=np.float32)
    evaluated = nib.load(mdir.parents[2] / "output_volumes" / f"{pid}-{PULSE}.nii.gz").get_fdata(
        dtype=np.float32)
    m_pred = lb.patient_metrics(hr, p, "axial")
    m_eval = lb.patient_metrics(hr, evaluated, "axial")
    assert np.isfinite(p).all()
    # the HR-free substitutions cost little: within 1.5 dB and 0.02 SSIM of the compat blend
    assert m_pred["psnr"] > m_eval["psnr"] - 1.5
    assert m_pred["ssim"] > m_eval["ssim"] - 0.02
    # and the same function on in-memory arrays gives the same volume
    from pacs_numba.store.modelfile import load_model

    experts = [nib.load(e).get_fdata(dtype=np.float32) for e in paths["experts"]]
    np.testing.assert_allclose(
        predict_volume(experts, load_model(mdir / "pacs_model.npz"), window="hann"), p,
        rtol=1e-6, atol=1e-4)


def test_predict_path_equals_the_evaluate_path_given_the_same_source(trained):
    """One blend path (issue 7): predict with the HR as its source is evaluate's blend."""
    from pacs_numba.core.blending import Normalisation, brain_mask
    from pacs_numba.core.predict import predict_volume
    from pacs_numba.store.modelfile import load_model
    from pacs_numba.store.volumes import VolumeStore

    _, config, mdir, cache = trained
    manifest = json.loads(Path(config.data.out).read_text())
    _, test = select_task(manifest, 1, SPACING, PULSE, config.data.models)
    pid, paths = sorted(test.items())[0]
    store = VolumeStore(cache)  # the volumes exactly as the engine read them
    hr = store.get(paths["HR"]).data
    experts = [store.get(e).data for e in paths["experts"]]
    pred = predict_volume(
        experts, load_model(mdir / "pacs_model.npz"), window=config.pacs_sr.mixing_window,
        norm=Normalisation.from_hr(hr, experts), mask=brain_mask(hr),
    )
    evaluated = np.asanyarray(
        nib.load(mdir.parents[2] / "output_volumes" / f"{pid}-{PULSE}.nii.gz").dataobj
    )
    assert evaluated.dtype == np.float32
    np.testing.assert_array_equal(pred, evaluated)
    # and the HR-free source really is another source
    free = Normalisation.from_experts(experts)
    assert free.source == "experts"
    assert free.mu_out == pytest.approx(float(np.mean(free.mus)))
    assert free.sd_out == pytest.approx(float(np.mean(free.sds)))


def test_predict_rejects_experts_that_do_not_fit_the_model(trained, tmp_path, capsys):
    _, config, mdir, cache = trained
    manifest = json.loads(Path(config.data.out).read_text())
    _, test = select_task(manifest, 1, SPACING, PULSE, config.data.models)
    paths = next(iter(test.values()))
    rc = _run("predict", "--model", mdir / "pacs_model.npz", "--experts", *paths["experts"][:2],
              "--out", tmp_path / "x.nii.gz", "--cache-dir", cache)
    err = capsys.readouterr().err
    assert rc == 2 and "4 experts" in err and "got 2" in err
    assert not (tmp_path / "x.nii.gz").exists()


def test_a_job_too_small_for_one_patient_exits_3_before_reading_any_volume(trained, tmp_path,
                                                                            capsys):
    cfg, _, _, _ = trained
    cache = tmp_path / "empty-cache"
    rc = _run("train", "--config", cfg, "--fold", 1, "--out-root", tmp_path / "o",
              "--cache-dir", cache, "--mem-budget", "64M", "--no-progress")
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "GiB" in err and "--mem-budget" in err and "Traceback" not in err
    assert not list(cache.glob("*.npy"))  # nothing was decompressed


CONCURRENT = r"""
import sys, threading
import numpy as np
from pacs_numba.resources.threads import ensure_threading_layer
from pacs_numba.core.cellstats import patient_statistics
from pacs_numba.core.blending import Normalisation, blend_patient, brain_mask
from pacs_numba.core.tiling import TileGrid

layer = ensure_threading_layer()
rng = np.random.default_rng(0)
shape = (40, 36, 30)
grid = TileGrid(shape, 8, 4)
hr = (rng.random(shape, dtype=np.float32) + 0.05)
experts = [hr + rng.normal(0, 0.1, shape).astype(np.float32) for _ in range(3)]
w = np.full((grid.n_tiles, 3), 1 / 3, dtype=np.float32)
serial = patient_statistics(hr, experts, grid, lambda_edge=0.25, edge_power=2.0,
                            lambda_grad=0.2)
norm, bmask = Normalisation.from_hr(hr, experts), brain_mask(hr)
ref_blend = blend_patient(experts, grid, w, window="hann", norm=norm, brain_mask=bmask)
errors = []

def work():
    try:
        for _ in range(5):
            st = patient_statistics(hr, experts, grid, lambda_edge=0.25, edge_power=2.0,
                                    lambda_grad=0.2)
            assert np.array_equal(st.Q, serial.Q) and np.array_equal(st.B, serial.B)
            got = blend_patient(experts, grid, w, window="hann", norm=norm, brain_mask=bmask)
            assert np.array_equal(got, ref_blend)
    except BaseException as exc:
        errors.append(repr(exc))

threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(layer, "errors:", errors)
sys.exit(1 if errors else 0)
"""


def test_four_threads_launching_parallel_kernels_at_once():
    """The workqueue layer would abort the process here; the engine selects a safe layer."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", CONCURRENT], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    layer = res.stdout.split()[0]
    assert layer in {"omp", "tbb"}, res.stdout


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_a_patients_volumes_are_decoded_concurrently_and_fail_in_file_order():
    """Cold cache: a worker with 2 threads decodes 2 volumes at once; errors as if serial."""
    barrier = threading.Barrier(2, timeout=10)  # broken if the first two never overlap
    seen: list[str] = []

    class Store:
        def get(self, path):
            seen.append(threading.current_thread().name)
            if path in ("a", "b"):
                barrier.wait()
            if path.startswith("bad"):
                raise InputError(f"input '{path}' is damaged")
            return f"volume {path}"

    eng = SimpleNamespace(store=Store())
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        got = Engine._get_volumes(eng, ["a", "b", "c", "d", "e"])
        assert got == [f"volume {p}" for p in "abcde"]
        assert all("-load" in name for name in seen)
        with pytest.raises(InputError, match="'bad1'"):
            Engine._get_volumes(eng, ["c", "bad1", "bad2"])
        numba.set_num_threads(1)  # one thread: serial, in the calling thread
        seen.clear()
        assert Engine._get_volumes(eng, ["c", "d"]) == ["volume c", "volume d"]
        assert seen == [threading.current_thread().name] * 2
    finally:
        numba.set_num_threads(before)
