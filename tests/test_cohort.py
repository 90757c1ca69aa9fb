"""The synthetic cohort generator: layout, geometry, determinism, and useful experts."""

from __future__ import annotations

import itertools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pacs_numba.config import load_config
from pacs_numba.errors import ConfigError
from pacs_numba.store.cohort import _expert_specs, make_cohort, parse_spacing, upsample_expert
from pacs_numba.store.manifest import build_manifest, select_task

SHAPE = (24, 28, 20)
SPACINGS = ("3mm", "4mm")  # 20 slices: 3mm leaves a 2-slice last block, 4mm divides evenly
PULSES = ("t1c", "t2w")
MODELS = ("BSPLINE", "LINEAR", "NEAREST", "SHARPEN")
PIDS = ["sub-001", "sub-002", "sub-003"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cohort")
    cfg = make_cohort(root, patients=3, shape=SHAPE, spacings=SPACINGS, pulses=PULSES, seed=5)
    assert cfg == root.resolve() / "config.yaml"
    return root.resolve()


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(path)
    assert img.get_data_dtype() == np.float32
    return img.get_fdata(dtype=np.float32), img.affine


def _hr(root: Path, pid: str, pulse: str) -> Path:
    return root / "hr" / pid / f"{pid}-{pulse}.nii.gz"


def _lr(root: Path, sp: str, pid: str, pulse: str) -> Path:
    return root / "lr" / sp / pid / f"{pid}-{pulse}.nii.gz"


def _sr(root: Path, m: str, sp: str, pid: str, pulse: str) -> Path:
    return root / "models" / m / sp / "output_volumes" / f"{pid}-{pulse}.nii.gz"


def test_every_file_with_shape_and_affine(cohort):
    assert sorted(p.name for p in (cohort / "hr").iterdir()) == PIDS
    for pid, pulse in itertools.product(PIDS, PULSES):
        hr, hr_aff = _load(_hr(cohort, pid, pulse))
        assert hr.shape == SHAPE
        assert np.allclose(np.diag(hr_aff)[:3], 1.0)
        for sp in SPACINGS:
            f = parse_spacing(sp)
            lr, lr_aff = _load(_lr(cohort, sp, pid, pulse))
            assert lr.shape == (SHAPE[0], SHAPE[1], -(-SHAPE[2] // f))
            assert np.allclose(nib.affines.voxel_sizes(lr_aff), (1, 1, f))
            # LR voxel k is centred on HR slices k*f .. k*f+f-1.
            assert np.allclose(lr_aff @ [0, 0, 1, 1], hr_aff @ [0, 0, f + (f - 1) / 2, 1])
            for m in MODELS:
                sr, sr_aff = _load(_sr(cohort, m, sp, pid, pulse))
                assert sr.shape == SHAPE and np.array_equal(sr_aff, hr_aff)


def test_hr_non_negative_with_zero_background(cohort):
    for pid, pulse in itertools.product(PIDS, PULSES):
        hr, _ = _load(_hr(cohort, pid, pulse))
        assert hr.min() == 0.0 and np.isfinite(hr).all()
        head = hr > 0
        assert 0.2 < head.mean() < 0.7
        for corner in itertools.product((0, -1), repeat=3):
            assert hr[corner] == 0.0


def test_contrasts_differ_between_pulses(cohort):
    t1, _ = _load(_hr(cohort, "sub-001", "t1c"))
    t2, _ = _load(_hr(cohort, "sub-001", "t2w"))
    head = (t1 > 0) & (t2 > 0)
    assert np.corrcoef(t1[head], t2[head])[0, 1] < 0.9


def test_lr_is_the_block_average_of_hr(cohort):
    hr, _ = _load(_hr(cohort, "sub-002", "t2w"))
    for sp in SPACINGS:
        f = parse_spacing(sp)
        lr, _ = _load(_lr(cohort, sp, "sub-002", "t2w"))
        for k in range(lr.shape[2]):
            block = hr[:, :, k * f : (k + 1) * f].astype(np.float64).mean(axis=2)
            np.testing.assert_allclose(lr[:, :, k], block, rtol=1e-6, atol=1e-3)


def test_experts_differ_from_each_other_and_from_hr(cohort):
    hr, _ = _load(_hr(cohort, "sub-001", "t1c"))
    for sp in SPACINGS:
        experts = [_load(_sr(cohort, m, sp, "sub-001", "t1c"))[0] for m in MODELS]
        scale = float(hr.max())
        for a, b in itertools.combinations([hr, *experts], 2):
            assert np.abs(a - b).mean() > 1e-3 * scale
        assert all(e.min() >= 0 for e in experts)


def test_nearest_expert_replicates_slabs(cohort):
    lr, _ = _load(_lr(cohort, "3mm", "sub-003", "t1c"))
    near, _ = _load(_sr(cohort, "NEAREST", "3mm", "sub-003", "t1c"))
    np.testing.assert_array_equal(near, lr[:, :, np.arange(SHAPE[2]) // 3])


def test_config_loads_and_manifest_builds(cohort):
    cfg = load_config(cohort / "config.yaml")
    assert cfg.data.hr_root == cohort / "hr" and cfg.data.out == cohort / "manifest.json"
    assert (cfg.data.spacings, cfg.data.pulses, cfg.data.models) == (SPACINGS, PULSES, MODELS)
    p = cfg.pacs_sr
    assert (p.patch_size, p.stride, p.mixing_window, p.simplex) == (16, 8, "hann", True)
    assert (p.lambda_ridge, p.laplacian_tau, p.lambda_edge, p.edge_power, p.lambda_grad) == (
        1e-4,
        0.05,
        0.25,
        2.0,
        0.2,
    )
    assert (p.normalize, p.use_registration, p.num_workers, p.ssim_axis) == (
        "zscore",
        False,
        2,
        "axial",
    )
    assert p.out_root == cohort / "results" and p.experiment_name == "PaCS_SR"
    assert cfg.registration is not None and cfg.registration.atlas.is_absolute()
    manifest = build_manifest(cfg.data)
    assert [len(f["test"]) for f in manifest["folds"]] == [1, 1, 1]
    train, test = select_task(manifest, 1, "4mm", "t2w", list(MODELS))
    for paths in [*train.values(), *test.values()]:
        assert all(Path(x).is_file() for x in [paths["HR"], paths["LR"], *paths["experts"]])


def test_deterministic_per_patient_and_seed(cohort, tmp_path):
    # Fewer patients, pulses and experts: patient 1's t1c volumes must not change.
    make_cohort(
        tmp_path / "same",
        patients=2,
        kfolds=2,
        shape=SHAPE,
        spacings=("3mm",),
        pulses=("t1c",),
        models=("BSPLINE",),
        seed=5,
    )
    for a, b in [
        (_hr(cohort, "sub-001", "t1c"), _hr(tmp_path / "same", "sub-001", "t1c")),
        (_lr(cohort, "3mm", "sub-001", "t1c"), _lr(tmp_path / "same", "3mm", "sub-001", "t1c")),
        (
            _sr(cohort, "BSPLINE", "3mm", "sub-001", "t1c"),
            _sr(tmp_path / "same", "BSPLINE", "3mm", "sub-001", "t1c"),
        ),
    ]:
        np.testing.assert_array_equal(_load(a)[0], _load(b)[0])
    make_cohort(tmp_path / "other", patients=2, kfolds=2, shape=SHAPE, spacings=("3mm",),
                pulses=("t1c",), models=("BSPLINE",), seed=6)  # fmt: skip
    other, _ = _load(_hr(tmp_path / "other", "sub-001", "t1c"))
    assert not np.array_equal(other, _load(_hr(cohort, "sub-001", "t1c"))[0])
    # Patients of one cohort differ too.
    assert not np.array_equal(
        _load(_hr(cohort, "sub-001", "t1c"))[0], _load(_hr(cohort, "sub-002", "t1c"))[0]
    )


def _simplex_ls(q: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact min w'Qw - 2b'w on the simplex by enumerating supports (tiny M only)."""
    m = len(b)
    best, best_w = np.inf, None
    for k in range(1, m + 1):
        for s in itertools.combinations(range(m), k):
            s = list(s)
            kkt = np.zeros((k + 1, k + 1))
            kkt[:k, :k] = 2 * q[np.ix_(s, s)]
            kkt[:k, k] = kkt[k, :k] = 1
            sol = np.linalg.lstsq(kkt, np.r_[2 * b[s], 1.0], rcond=None)[0]
            w = np.zeros(m)
            w[s] = sol[:k]
            f = w @ q @ w - 2 * b @ w
            if w.min() >= -1e-12 and f < best:
                best, best_w = f, w
    return best_w


def test_tile_wise_convex_blend_beats_every_single_expert(tmp_path):
    """The point of the cohort: per-tile convex weights fitted on other patients win."""
    shape, p = (40, 48, 40), 16
    make_cohort(tmp_path, patients=4, kfolds=2, shape=shape, spacings=("4mm",),
                pulses=("t1c",), seed=1)  # fmt: skip
    vols = []
    for pid in ["sub-001", "sub-002", "sub-003", "sub-004"]:
        hr = _load(_hr(tmp_path, pid, "t1c"))[0]
        mask = hr > 0

        def z(v, mask=mask):
            return (v - v[mask].mean()) / v[mask].std()

        xs = np.stack([z(_load(_sr(tmp_path, m, "4mm", pid, "t1c"))[0]) for m in MODELS], -1)
        vols.append((z(hr), xs, mask))
    n = [-(-s // p) for s in shape]
    idx = np.indices(shape) // p
    label = (idx[0] * n[1] + idx[1]) * n[2] + idx[2]
    n_tiles, m = int(np.prod(n)), len(MODELS)
    q = np.zeros((n_tiles, m, m))
    b = np.zeros((n_tiles, m))
    for y, xs, mask in vols[:3]:  # train on three patients
        lab, xm, ym = label[mask], xs[mask].astype(np.float64), y[mask]
        for i in range(m):
            b[:, i] += np.bincount(lab, xm[:, i] * ym, n_tiles)
            for j in range(m):
                q[:, i, j] += np.bincount(lab, xm[:, i] * xm[:, j], n_tiles)
    w = np.full((n_tiles, m), 1 / m)
    for t in range(n_tiles):
        if np.trace(q[t]) > 0:
            w[t] = _simplex_ls(q[t] + 1e-4 * np.eye(m), b[t])
    y, xs, mask = vols[3]  # test on the fourth
    blend = (xs * w[label]).sum(-1)
    mse_blend = np.mean((blend[mask] - y[mask]) ** 2)
    mse_experts = [np.mean((xs[..., i][mask] - y[mask]) ** 2) for i in range(m)]
    assert mse_blend < 0.97 * min(mse_experts), (mse_blend, mse_experts)
    # Not one expert everywhere: at least two experts lead some tile.
    assert len(set(np.argmax(w[np.trace(q, axis1=1, axis2=2) > 0], axis=1))) >= 2


@pytest.mark.parametrize(("text", "value"), [("3mm", 3), ("5 MM", 5), ("7", 7), (2, 2)])
def test_parse_spacing(text, value):
    assert parse_spacing(text) == value


@pytest.mark.parametrize("text", ["0mm", "2.5mm", "mm", "-3mm", "3cm", ""])
def test_parse_spacing_rejects(text):
    with pytest.raises(ConfigError, match="spacing"):
        parse_spacing(text)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patients": 2, "kfolds": 3}, r"patients must be an integer >= kfolds=3"),
        ({"kfolds": 1}, r"kfolds must be an integer >= 2"),
        ({"stride": 20, "patch_size": 16}, r"stride must be an integer in \[1, patch_size=16\]"),
        ({"patch_size": 0}, r"patch_size must be an integer >= 1"),
        ({"shape": (24, 28)}, r"shape must be 3 integers"),
        ({"spacings": ("3mm", "fine")}, r"spacing 'fine'"),
        ({"models": ("A", "A")}, r"models must be unique"),
        ({"pulses": ()}, r"pulses must be a non-empty list"),
    ],
)
def test_make_cohort_argument_errors(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        make_cohort(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written before the arguments are checked


def test_unknown_model_names_get_distinct_methods():
    specs = _expert_specs(["BSPLINE", "ECLARE", "SMORE", "UNIRES"])
    assert specs[0] == ("bspline", 1.0)
    assert len({k for k, _ in specs}) == 4
    many = _expert_specs([f"M{i}" for i in range(7)])
    assert len(set(many)) == 7  # beyond the five methods come stronger variants


def test_upsample_expert_keeps_constant_volumes():
    lr = np.full((3, 4, 5), 7.0, dtype=np.float32)
    for kind in ("bspline", "linear", "nearest", "sharpen", "smooth"):
        out = upsample_expert(lr, 14, 3, kind)
        assert out.shape == (3, 4, 14) and out.dtype == np.float32
        np.testing.assert_allclose(out, 7.0, rtol=1e-5)
