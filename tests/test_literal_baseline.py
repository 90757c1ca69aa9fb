"""End-to-end checks of scripts/literal_baseline.py, the literal stand-in for the published tool.

The script must stay independent of pacs_numba; these tests check its algorithm A8 outputs and
recompute its metrics from the files it wrote with formulas written out here.
"""

from __future__ import annotations

import ast
import importlib
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy import ndimage as ndi

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "literal_baseline.py"

# The loky workers import the script by module name, so its folder goes on sys.path before
# the import (workers inherit the parent's sys.path).
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
lb = importlib.import_module("literal_baseline")

MODELS = ("BSPLINE", "ECLARE", "SMORE")
SPACING = "3mm"
PULSE = "t1c"
SHAPE = (20, 22, 18)
PIDS = [f"P{i:03d}" for i in range(5)]
METRIC_KEYS = ("mse", "mae", "psnr", "ssim")


def _phantom(rng: np.random.Generator) -> np.ndarray:
    """A smooth head-like blob with a zero background and some texture."""
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    r = np.sqrt((z / 0.8) ** 2 + (y / 0.85) ** 2 + (x / 0.75) ** 2)
    head = np.clip(1.0 - r, 0.0, None) * 800.0
    texture = ndi.gaussian_filter(rng.normal(size=SHAPE), 1.5) * 150.0
    vol = np.where(r < 0.95, head + 200.0 + texture, 0.0)
    return np.clip(vol, 0.0, None).astype(np.float32)


def _save(path: Path, vol: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(vol.astype(np.float32), affine)
    img.set_data_dtype(np.float32)
    nib.save(img, str(path))


def _make_cohort(root: Path, *, patch_size: int, stride: int, mixing_window: str,
                 lambda_edge: float, lambda_grad: float, laplacian_tau: float) -> Path:
    """Write a algorithm A1 layout, a config.yaml and a 2-fold manifest.json under ``root``."""
    rng = np.random.default_rng(1234)
    affine = np.diag([1.0, 1.0, 1.2, 1.0])
    hr_root, lr_root, models_root = root / "hr", root / "lr", root / "models"
    entries = {}
    for pid in PIDS:
        hr = _phantom(rng)
        blur = ndi.gaussian_filter(hr, (0.6, 0.6, 1.6))
        experts = {
            "BSPLINE": ndi.gaussian_filter(hr, (1.0, 1.0, 2.0)),
            "ECLARE": blur + rng.normal(0.0, 25.0, SHAPE).astype(np.float32),
            "SMORE": 0.9 * hr + 0.1 * blur + rng.normal(0.0, 40.0, SHAPE).astype(np.float32),
        }
        hr_path = hr_root / pid / f"{pid}-{PULSE}.nii.gz"
        lr_path = lr_root / SPACING / pid / f"{pid}-{PULSE}.nii.gz"
        _save(hr_path, hr, affine)
        _save(lr_path, blur[:, :, ::3], affine)
        entry = {"HR": {SPACING: {PULSE: str(hr_path)}}, "LR": {SPACING: {PULSE: str(lr_path)}}}
        for m, vol in experts.items():
            p = models_root / m / SPACING / "output_volumes" / f"{pid}-{PULSE}.nii.gz"
            _save(p, np.clip(vol, 0, None), affine)
            entry[m] = {SPACING: {PULSE: str(p)}}
        entries[pid] = entry
    folds = [
        {"train": {p: entries[p] for p in PIDS[2:]}, "test": {p: entries[p] for p in PIDS[:2]}},
        {"train": {p: entries[p] for p in PIDS[:2] + PIDS[4:]},
         "test": {p: entries[p] for p in PIDS[2:4]}},
    ]
    manifest = root / "manifest.json"
    manifest.write_text(json.dumps({"folds": folds}, indent=2, sort_keys=True))
    config = {
        "data": {"models-root": str(models_root), "hr-root": str(hr_root),
                 "lr-root": str(lr_root), "spacings": [SPACING], "pulses": [PULSE],
                 "models": list(MODELS), "kfolds": 2, "seed": 42, "out": str(manifest)},
        "registration": {"atlas": "atlas", "t1": "t1.nii.gz", "t2": "t2.nii.gz",
                         "epi": "epi.nii.gz", "pd": "pd.nii.gz", "brain_mask": "mask.nii.gz"},
        "pacs_sr": {
            "experiment_name": "literal", "patch_size": patch_size, "stride": stride,
            "mixing_window": mixing_window, "simplex": True, "lambda_ridge": 1e-3,
            "laplacian_tau": laplacian_tau, "lambda_edge": lambda_edge, "edge_power": 1.5,
            "lambda_grad": lambda_grad, "grad_operator": "sobel", "normalize": "zscore",
            "use_registration": False, "num_workers": 2, "parallel_backend": "loky",
            "device": "cpu", "compute_lpips": False, "ssim_axis": "axial",
            "evaluate_train": True, "save_weight_volumes": True, "save_blends": True,
            "log_level": "INFO", "log_to_file": False, "log_region_freq": 10,
            "disable_tqdm": True, "out_root": str(root / "out"),
        },
    }
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    return cfg


# ---------------------------------------------------------------- independent recomputation


def _metrics_by_hand(hr: np.ndarray, blend: np.ndarray) -> dict[str, float]:
    from skimage.metrics import structural_similarity

    m = hr > 0
    d = hr[m] - blend[m]
    sq = d * d
    out = {"mse": float(np.mean(sq, dtype=np.float64)), "mae": float(np.mean(np.abs(d)))}
    rng32 = np.float32(hr.max() - hr.min())
    out["psnr"] = float(20.0 * np.log10(np.float32(float(rng32) + 1e-12)
                                        / np.sqrt(np.mean(sq) + np.float32(1e-12))))
    scores = []
    for i in range(hr.shape[0]):
        ms = m[i]
        if not ms.any():
            continue
        t, p = hr[i] * ms, blend[i] * ms
        dr = float(t.max() - t.min())
        if dr < 1e-7:
            continue
        s = structural_similarity(t, p, data_range=dr)
        if not np.isnan(s):
            scores.append(s)
    out["ssim"] = float(np.mean(scores)) if scores else 0.0
    return out


def _load(path: Path) -> np.ndarray:
    return nib.load(str(path)).get_fdata(dtype=np.float32)


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    # Overlapping hann tiles, edge weights, gradient term and smoothing: every option on.
    return _make_cohort(root, patch_size=8, stride=4, mixing_window="hann", lambda_edge=0.5,
                        lambda_grad=0.2, laplacian_tau=0.3)


@pytest.fixture(scope="module")
def fitted(cohort: Path) -> dict:
    return lb.run(cohort, 1, SPACING, PULSE, workers=2)


# ---------------------------------------------------------------------------------- tests


def test_script_does_not_import_pacs_numba():
    tree = ast.parse(SCRIPT.read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        assert not any(n.split(".")[0] == "pacs_numba" for n in names), names


def test_tile_labels_match_painted_boxes():
    # The label is the largest id among covering tiles: paint boxes in id order, last wins.
    for shape, p, s in [((20, 22, 18), 8, 4), ((9, 7, 5), 4, 3), ((10, 7, 5), 4, 4)]:
        painted = np.full(shape, -1, dtype=np.int32)
        for rid, (z0, z1, y0, y1, x0, x1) in lb.tile_boxes(shape, p, s):
            painted[z0:z1, y0:y1, x0:x1] = rid
        np.testing.assert_array_equal(lb.tile_labels(shape, s), painted)


def test_a8_files_and_keys(fitted: dict, cohort: Path):
    base = cohort.parent / "out" / "literal" / SPACING
    mdir = base / "model_data" / "fold_1" / PULSE
    assert Path(fitted["paths"]["model_dir"]) == mdir
    test_pids, train_pids = PIDS[:2], PIDS[2:]
    for pid in test_pids:
        assert (base / "output_volumes" / f"{pid}-{PULSE}.nii.gz").is_file()
        w = np.load(mdir / f"{pid}_weights_test.npz", allow_pickle=True)
        assert set(w.files) == {"weight_maps", "model_names", "patient_id", "split", "spacing",
                                "pulse", "patch_size", "stride", "shape", "n_models"}
        assert w["weight_maps"].shape == SHAPE + (3,) and w["weight_maps"].dtype == np.float32
        assert list(w["model_names"]) == list(MODELS)
        assert str(w["patient_id"]) == pid and str(w["split"]) == "test"
        assert str(w["spacing"]) == SPACING and str(w["pulse"]) == PULSE
        assert int(w["patch_size"]) == 8 and int(w["stride"]) == 4 and int(w["n_models"]) == 3
        assert tuple(w["shape"]) == SHAPE
        a = np.load(mdir / f"{pid}_weight_analysis_test.npz", allow_pickle=True)
        assert set(a.files) == {"weight_maps", "entropy_map", "dominant_map", "model_names",
                                "patient_id", "statistics"}
        assert a["entropy_map"].dtype == np.float32 and a["entropy_map"].shape == SHAPE
        assert a["dominant_map"].dtype == np.int32
        stats = a["statistics"].item()
        assert set(stats) == set(MODELS)
        for m, st in stats.items():
            assert set(st) == {"mean", "std", "min", "max", "median", "q25", "q75"}
            col = a["weight_maps"][..., MODELS.index(m)]
            assert st["mean"] == float(np.mean(col)) and st["q75"] == float(np.percentile(col, 75))
        np.testing.assert_array_equal(a["weight_maps"], w["weight_maps"])
        np.testing.assert_array_equal(a["dominant_map"], np.argmax(w["weight_maps"], axis=-1))
    for pid in train_pids:
        assert (mdir / f"{pid}_blend_train.nii.gz").is_file()
        assert not (base / "output_volumes" / f"{pid}-{PULSE}.nii.gz").exists()
    metrics = json.loads((mdir / "metrics.json").read_text())
    assert list(metrics) == ["train", "test"]
    for split in ("train", "test"):
        assert list(metrics[split]) == list(METRIC_KEYS)
    # NIfTI outputs: float32, HR affine.
    hr_img = nib.load(str(cohort.parent / "hr" / test_pids[0] / f"{test_pids[0]}-{PULSE}.nii.gz"))
    out_img = nib.load(str(base / "output_volumes" / f"{test_pids[0]}-{PULSE}.nii.gz"))
    assert out_img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(out_img.affine, hr_img.affine)


def test_weights_json_on_simplex_and_maps_consistent(fitted: dict):
    mdir = Path(fitted["paths"]["model_dir"])
    text = (mdir / "weights.json").read_text()
    raw = json.loads(text)
    keys = [int(k) for k in raw]
    assert keys == sorted(keys)
    assert text.startswith('{\n  "')  # indent 2
    n_tiles = int(np.prod([int(np.ceil(n / 4)) for n in SHAPE]))
    assert set(keys) <= set(range(n_tiles)) and keys
    W = np.array([raw[str(k)] for k in keys])
    assert W.shape[1] == 3
    assert np.all(W >= 0)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-6)
    # values are float(float32)
    assert np.array_equal(W.astype(np.float32).astype(np.float64), W)
    # weight maps: each voxel carries its label tile's weight, 1/M where unlearned
    wm = np.load(mdir / f"{PIDS[0]}_weights_test.npz")["weight_maps"]
    labels = lb.tile_labels(SHAPE, 4)
    learned = {k: np.float32(raw[str(k)]) for k in keys}
    for r in np.unique(labels)[::7]:
        exp = learned.get(int(r), np.full(3, 1 / 3, dtype=np.float32))
        np.testing.assert_array_equal(wm[labels == r], np.broadcast_to(exp, wm[labels == r].shape))


def test_metrics_json_equals_recomputation_from_written_blends(fitted: dict, cohort: Path):
    mdir = Path(fitted["paths"]["model_dir"])
    base = Path(fitted["paths"]["base_dir"])
    metrics = json.loads((mdir / "metrics.json").read_text())
    hr_of = lambda pid: _load(cohort.parent / "hr" / pid / f"{pid}-{PULSE}.nii.gz")  # noqa: E731
    per = {
        "test": [_metrics_by_hand(hr_of(p), _load(base / "output_volumes" / f"{p}-{PULSE}.nii.gz"))
                 for p in PIDS[:2]],
        "train": [_metrics_by_hand(hr_of(p), _load(mdir / f"{p}_blend_train.nii.gz"))
                  for p in PIDS[2:]],
    }
    for split, rows in per.items():
        for k in METRIC_KEYS:
            assert metrics[split][k] == pytest.approx(float(np.mean([r[k] for r in rows])),
                                                      rel=1e-12, abs=0), (split, k)
    # sanity: stacking beats nothing-at-all and the blend is a sane image
    assert metrics["test"]["psnr"] > 15 and 0 < metrics["test"]["ssim"] <= 1


def test_weights_reevaluation_reproduces_metrics(fitted: dict, cohort: Path, tmp_path: Path):
    mdir = Path(fitted["paths"]["model_dir"])
    res = lb.run(cohort, 1, SPACING, PULSE, workers=2, weights_path=mdir / "weights.json",
                 out_root=tmp_path)
    again = Path(res["paths"]["model_dir"])
    assert again != mdir
    assert json.loads((again / "metrics.json").read_text()) == \
        json.loads((mdir / "metrics.json").read_text())
    assert (again / "weights.json").read_text() == (mdir / "weights.json").read_text()
    for p in PIDS[:2]:
        a = _load(Path(res["paths"]["base_dir"]) / "output_volumes" / f"{p}-{PULSE}.nii.gz")
        b = _load(Path(fitted["paths"]["base_dir"]) / "output_volumes" / f"{p}-{PULSE}.nii.gz")
        np.testing.assert_array_equal(a, b)
    assert "statistics" not in res["timings"] or res["timings"]["statistics"] == 0.0


def test_run_reports_timings_and_memory(fitted: dict):
    t = fitted["timings"]
    for key in ("load", "statistics", "solve", "smoothing", "blend", "metrics", "writes"):
        assert t[key] >= 0.0
    assert t["statistics"] > 0 and t["solve"] > 0 and t["blend"] > 0
    pr = fitted["peak_rss"]
    assert fitted["workers"] == 2
    assert pr["tree_bytes"] >= pr["parent_bytes"] > 0
    assert 1 <= len(pr["worker_maxrss_bytes"]) <= 2
    assert all(v > 0 for v in pr["worker_maxrss_bytes"].values())
    assert "workers: 2" in lb.format_summary(fitted)


def test_statistics_match_brute_force_per_tile(cohort: Path):
    """patient_statistics against a plain per-voxel float64 loop on a few tiles."""
    rng = np.random.default_rng(0)
    shape = (9, 10, 7)
    hr = np.where(rng.random(shape) < 0.8, rng.uniform(1, 100, shape), 0).astype(np.float32)
    xs = [(hr + rng.normal(0, 5, shape)).astype(np.float32) for _ in range(3)]
    lam_e, pw, lam_g, s = 0.7, 2.0, 0.3, 3
    stats = lb.patient_statistics(hr, xs, 4, s, lam_e, pw, lam_g, "scharr")
    m = hr > 0

    def z(v):
        vals = v[m]
        return ((v - float(vals.mean())) / max(float(vals.std()), 1e-8)).astype(np.float32)

    hn = z(hr)
    xn = [z(x) for x in xs]
    g = np.sqrt(sum(ndi.sobel(hn, axis=d, mode="nearest") ** 2 for d in range(3)))
    omega = (1 + lam_e * (g / (g.max() + 1e-6)) ** pw) * m

    def scharr(v, d):
        k1 = np.array([-1.0, 0, 1.0])
        k2 = np.array([3.0, 10.0, 3.0])
        ks = [k2, k2, k2]
        ks[d] = k1
        kern = ks[0][:, None, None] * ks[1][None, :, None] * ks[2][None, None, :]
        return ndi.correlate(v.astype(np.float64), kern, mode="nearest")

    gh = [scharr(hn, d) for d in range(3)]
    gx = [[scharr(x, d) for d in range(3)] for x in xn]
    n1, n2 = int(np.ceil(shape[1] / s)), int(np.ceil(shape[2] / s))
    for rid in [0, 5, 13, max(stats)]:
        Q = np.zeros((3, 3))
        B = np.zeros(3)
        n = 0
        for v in zip(*np.nonzero(m), strict=True):
            if (v[0] // s * n1 + v[1] // s) * n2 + v[2] // s != rid:
                continue
            n += 1
            w = float(omega[v])
            xv = np.array([x[v] for x in xn], dtype=np.float64)
            Q += w * np.outer(xv, xv)
            B += w * xv * float(hn[v])
            for d in range(3):
                gv = np.array([gx[e][d][v] for e in range(3)])
                Q += lam_g * w * np.outer(gv, gv)
                B += lam_g * w * gv * gh[d][v]
        q, b, c = stats[rid]
        assert c == n
        np.testing.assert_allclose(q, Q, rtol=1e-4)
        np.testing.assert_allclose(b, B, rtol=1e-4, atol=1e-6 * np.abs(B).max())


def test_solve_and_smoothing_stay_on_simplex():
    rng = np.random.default_rng(3)
    A = rng.normal(size=(50, 3))
    Q = A.T @ A
    B = A.T @ (A @ np.array([0.7, 0.3, 0.0]) + rng.normal(0, 0.01, 50))
    w = lb.solve_tile(Q, B, 1e-3, True)
    assert w.dtype == np.float32 and np.all(w >= 0) and abs(float(w.sum()) - 1) < 1e-6
    assert lb.objective(w, Q, B, 1e-3) <= lb.objective(np.full(3, 1 / 3), Q, B, 1e-3)
    wu = lb.solve_tile(Q, B, 1e-3, False)
    np.testing.assert_allclose(wu, np.linalg.solve(Q + 1e-3 * np.eye(3), B), rtol=1e-5)
    weights = {0: np.float32([1, 0, 0]), 1: np.float32([0, 1, 0]), 3: np.float32([0, 0, 1])}
    sm = lb.laplacian_smooth(weights, (1, 2, 2), 0.5)  # 0-1 and 1-3 are neighbours, 0-3 not
    np.testing.assert_allclose(sm[0], [0.5, 0.5, 0], atol=1e-7)
    np.testing.assert_allclose(sm[1], [0.25, 0.5, 0.25], atol=1e-7)
    np.testing.assert_allclose(sm[3], [0, 0.5, 0.5], atol=1e-7)


def test_unreadable_train_patient_is_skipped(cohort: Path, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture):
    """algorithm A4: an unreadable patient is skipped with a warning naming it; the fit goes on.

    The fit must then equal a fit on the manifest without that patient.
    """
    manifest = json.loads((cohort.parent / "manifest.json").read_text())
    fold = manifest["folds"][0]
    bad_pid = PIDS[3]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"\x1f\x8b not really gzip")
    fold["train"][bad_pid]["ECLARE"][SPACING][PULSE] = str(broken)
    with_bad = tmp_path / "with_bad.json"
    with_bad.write_text(json.dumps({"folds": [fold]}))
    without = tmp_path / "without.json"
    fold2 = json.loads(json.dumps(fold))
    del fold2["train"][bad_pid]
    without.write_text(json.dumps({"folds": [fold2]}))

    cfg = yaml.safe_load(cohort.read_text())
    cfg["pacs_sr"]["evaluate_train"] = False
    cfg["pacs_sr"]["save_weight_volumes"] = False
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))

    with caplog.at_level("WARNING", logger="literal_baseline"):
        a = lb.run(cfg_path, 1, SPACING, PULSE, workers=2, out_root=tmp_path / "a",
                   manifest_path=with_bad)
    assert any(bad_pid in r.getMessage() and "broken.nii.gz" in r.getMessage()
               for r in caplog.records)
    b = lb.run(cfg_path, 1, SPACING, PULSE, workers=1, out_root=tmp_path / "b",
               manifest_path=without)
    ma, mb = Path(a["paths"]["model_dir"]), Path(b["paths"]["model_dir"])
    assert (ma / "weights.json").read_text() == (mb / "weights.json").read_text()
    metrics = json.loads((ma / "metrics.json").read_text())
    assert list(metrics) == ["test"]  # evaluate_train false: no "train" entry
    assert metrics == json.loads((mb / "metrics.json").read_text())
    assert not list(ma.glob("*.npz")) and not list(ma.glob("*_blend_train.nii.gz"))


def test_cli_weights_mode_prints_summary(fitted: dict, cohort: Path, tmp_path: Path):
    import subprocess

    mdir = Path(fitted["paths"]["model_dir"])
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(cohort), "--fold", "1", "--spacing",
         SPACING, "--pulse", PULSE, "--workers", "1", "--weights", str(mdir / "weights.json"),
         "--out-root", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert "workers: 1" in out.stdout and "peak RSS, process tree" in out.stdout
    for stage in ("load", "statistics", "solve", "smoothing", "blend", "metrics", "writes"):
        assert f"  {stage} " in out.stdout
    again = tmp_path / "literal" / SPACING / "model_data" / "fold_1" / PULSE / "metrics.json"
    assert json.loads(again.read_text()) == json.loads((mdir / "metrics.json").read_text())


def test_published_details_adjacency_loops_and_float32_products():
    """The faithful points: graph read off the label volume, per-tile products in float32."""
    for shape, s in [((9, 7, 5), 3), ((10, 7, 5), 4), ((8, 8, 8), 8)]:
        counts = lb.tile_counts(shape, s)
        adj = lb.label_adjacency(lb.tile_labels(shape, s))
        n_tiles = int(np.prod(counts))
        for r in range(n_tiles):
            assert sorted(adj.get(r, ())) == lb.grid_neighbours(r, counts), (shape, s, r)
    rng = np.random.default_rng(5)
    hr = rng.uniform(1, 10, (6, 6, 6)).astype(np.float32)
    st = lb.patient_statistics(hr, [hr * 1.1, hr + 1], 4, 3, 0.5, 1.0, 0.2)
    q, b, _ = st[0]
    assert q.dtype == np.float32 and b.dtype == np.float32
