"""Bad input, end to end: every fault goes through ``cli.main`` on a tiny generated cohort.

Each case checks the outcome (exit code, which patients were used), the message (the file, the
reason, the allowed values; never a traceback) and that nothing non-finite reached a weight, a
blend or a metric.  One cohort is generated per module; every case works on its own copy
(``shutil.copytree``), with the config and the manifest rewritten to point at the copy.

Fold 1 of the 6-patient, 3-fold cohort has 4 training and 2 test patients.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.manifest import build_manifest, select_task, write_manifest

SHAPE = (20, 22, 18)
SPACING, PULSE = "3mm", "t1c"
PATCH, STRIDE = 8, 4
METRICS = ("mse", "mae", "psnr", "ssim")


# --------------------------------------------------------------------------------------
# The cohort and its copies
# --------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _warnings_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """WARNING level: skip/affine warnings reach stderr, INFO chatter does not."""
    monkeypatch.setenv("PACS_LOG_LEVEL", "WARNING")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One generated cohort (no manifest, no results); cases copy it, never change it."""
    root = tmp_path_factory.mktemp("pristine")
    cfg = make_cohort(root, patients=6, shape=SHAPE, spacings=(SPACING,), pulses=(PULSE,),
                      seed=5, kfolds=3, patch_size=PATCH, stride=STRIDE)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=2, log_to_file=False)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


@dataclass
class Cohort:
    """A private copy of the pristine cohort with its manifest built (fold 1 selected)."""

    root: Path
    cfg: Path
    models: tuple[str, ...]
    train: dict[str, dict[str, Any]]
    test: dict[str, dict[str, Any]]

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def out(self) -> Path:
        return self.root / "results" / "PaCS_SR" / SPACING

    @property
    def mdir(self) -> Path:
        return self.out / "model_data" / "fold_1" / PULSE

    @property
    def vdir(self) -> Path:
        return self.out / "output_volumes"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def run(self, command: str = "train", *extra: Any) -> int:
        argv = [command, "--config", self.cfg, "--fold", 1, "--cache-dir", self.cache,
                "--no-progress", *extra]
        return cli.main([str(a) for a in argv])

    def metrics(self) -> dict[str, Any]:
        return json.loads((self.mdir / "metrics.json").read_text())

    def patients(self) -> dict[str, Any]:
        return json.loads((self.mdir / "patients.json").read_text())

    def weights(self) -> dict[str, list[float]]:
        return json.loads((self.mdir / "weights.json").read_text())

    def edit_config(self, fn: Callable[[dict], None]) -> None:
        doc = yaml.safe_load(self.cfg.read_text())
        fn(doc)
        self.cfg.write_text(yaml.safe_dump(doc, sort_keys=False))


def copy_cohort(pristine: Path, dest: Path) -> Cohort:
    """Copy the pristine cohort to ``dest``, point its config there and build the manifest."""
    shutil.copytree(pristine, dest)
    cfg = dest / "config.yaml"
    doc = yaml.safe_load(cfg.read_text())
    for key in ("models-root", "hr-root", "lr-root"):
        doc["data"][key] = str(dest / Path(doc["data"][key]).name)
    doc["data"]["out"] = str(dest / "manifest.json")
    doc["registration"]["atlas"] = str(dest / "atlas")
    doc["pacs_sr"]["out_root"] = str(dest / "results")
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    manifest = build_manifest(config.data)
    write_manifest(manifest, config.data.out)
    train, test = select_task(manifest, 1, SPACING, PULSE, config.data.models)
    assert (len(train), len(test)) == (4, 2)
    return Cohort(dest, cfg, tuple(config.data.models), train, test)


@pytest.fixture
def cohort(pristine: Path, tmp_path: Path) -> Cohort:
    return copy_cohort(pristine, tmp_path / "cohort")


@pytest.fixture(scope="module")
def baseline(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Cohort:
    """The untouched cohort, trained once: what a fault that changes nothing must reproduce."""
    c = copy_cohort(pristine, tmp_path_factory.mktemp("baseline") / "cohort")
    assert c.run() == 0
    return c


# --------------------------------------------------------------------------------------
# Writing bad volumes
# --------------------------------------------------------------------------------------
def _data(path: str | Path) -> np.ndarray:
    return nib.load(path).get_fdata(dtype=np.float32)


def _save(path: str | Path, data: np.ndarray, like: str | Path, *,
          affine: np.ndarray | None = None, dtype: Any = np.float32) -> None:
    """Write ``data`` with the affine and header of ``like`` (read before ``path`` is replaced)."""
    ref = nib.load(like)
    img = nib.Nifti1Image(np.asarray(data), ref.affine if affine is None else affine,
                          ref.header.copy())
    img.set_data_dtype(dtype)
    nib.save(img, path)


def _random_bytes(path: Path) -> None:
    buf = np.random.default_rng(0).bytes(4096)
    path.write_bytes(b"XX" + buf)  # never the gzip magic


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _four_d(path: Path) -> None:
    vol = _data(path)
    _save(path, np.stack([vol, vol], axis=-1), path)


CORRUPT = {
    # name: (how, words the reason must contain)
    "random-bytes": (_random_bytes, "not gzip-compressed"),
    "truncated-gzip": (_truncate, "truncated"),
    "zero-byte": (_zero_bytes, "empty (0 bytes)"),
    "4d-two-volumes": (_four_d, "4-D with 2 volumes"),
}


# --------------------------------------------------------------------------------------
# Checks shared by the cases
# --------------------------------------------------------------------------------------
def _no_traceback(err: str) -> None:
    assert "Traceback" not in err, err


def _finite_outputs(c: Cohort, splits: tuple[str, ...] = ("train", "test")) -> dict[str, Any]:
    """metrics.json, per-patient metrics, weights, blends and weight maps: all finite."""
    metrics = c.metrics()
    for split in splits:
        assert list(metrics[split]) == list(METRICS), (split, metrics)
        assert all(math.isfinite(v) for v in metrics[split].values()), (split, metrics[split])
    per = c.patients()["per_patient"]
    for split in splits:
        assert per[split], split
        for pid, m in per[split].items():
            assert all(math.isfinite(v) for v in m.values()), (split, pid, m)
    w = np.array(list(c.weights().values()), dtype=np.float64)
    assert w.ndim == 2 and w.shape[1] == len(c.models) and len(w) > 0
    assert np.isfinite(w).all()
    assert (w >= 0).all() and np.allclose(w.sum(axis=1), 1.0, atol=1e-5)
    blends = [c.vdir / f"{pid}-{PULSE}.nii.gz" for pid in per["test"]]
    blends += [c.mdir / f"{pid}_blend_train.nii.gz" for pid in per.get("train", {})]
    for b in blends:
        img = nib.load(b)
        assert img.shape == SHAPE and img.get_data_dtype() == np.float32, b
        assert np.isfinite(img.get_fdata(dtype=np.float32)).all(), b
    for npz in c.mdir.glob("*_weights_test.npz"):
        with np.load(npz) as z:
            assert np.isfinite(z["weight_maps"]).all(), npz
    return metrics


def _warning_lines(err: str, *words: str) -> list[str]:
    return [ln for ln in err.splitlines() if " WARNING " in ln and all(w in ln for w in words)]


# --------------------------------------------------------------------------------------
# Unreadable files: the patient is skipped, the run goes on
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fault", "role", "split"),
    [
        ("random-bytes", "expert", "train"),
        ("truncated-gzip", "expert", "train"),
        ("zero-byte", "expert", "train"),
        ("4d-two-volumes", "expert", "train"),
        ("random-bytes", "HR", "train"),
        ("truncated-gzip", "HR", "train"),
        ("zero-byte", "HR", "train"),
        ("4d-two-volumes", "HR", "train"),
        ("truncated-gzip", "expert", "test"),
        ("zero-byte", "HR", "test"),
    ],
)
def test_unreadable_file_skips_the_patient_and_names_file_and_reason(
    cohort: Cohort, capsys: pytest.CaptureFixture[str], fault: str, role: str, split: str
) -> None:
    patients = cohort.train if split == "train" else cohort.test
    victim = sorted(patients)[0]
    bad = Path(patients[victim]["HR"] if role == "HR" else patients[victim]["experts"][1])
    how, reason = CORRUPT[fault]
    how(bad)

    rc = cohort.run()
    out, err = capsys.readouterr()
    assert rc == 0, err
    _no_traceback(err)
    assert "(1 patient(s) skipped)" in out
    lines = _warning_lines(err, f"skipping patient {victim}", str(bad), reason)
    assert lines, err
    metrics = _finite_outputs(cohort)
    assert set(metrics["skipped"]) == {victim}
    assert str(bad) in metrics["skipped"][victim] and reason in metrics["skipped"][victim]
    assert "nonfinite_voxels" not in metrics
    doc = cohort.patients()
    assert set(doc["skipped"]) == {victim}
    assert victim not in doc["per_patient"][split]
    assert len(doc["per_patient"][split]) == len(patients) - 1
    if split == "test":
        assert not (cohort.vdir / f"{victim}-{PULSE}.nii.gz").exists()
    else:
        assert not (cohort.mdir / f"{victim}_blend_train.nii.gz").exists()


def test_every_training_patient_skipped_fails_the_task_naming_each(
    cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {pid: Path(paths["experts"][0]) for pid, paths in cohort.train.items()}
    for p in bad.values():
        _truncate(p)
    rc = cohort.run()
    err = capsys.readouterr().err
    assert rc == 2, err
    _no_traceback(err)
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert any("every training patient was skipped" in ln for ln in errors), err
    for pid, p in bad.items():
        assert _warning_lines(err, f"skipping patient {pid}", str(p), "truncated"), err
    assert not (cohort.mdir / "weights.json").exists()


def test_every_training_hr_unreadable_fails_the_task_naming_each(
    cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {pid: Path(paths["HR"]) for pid, paths in cohort.train.items()}
    for p in bad.values():
        _zero_bytes(p)
    rc = cohort.run()
    err = capsys.readouterr().err
    assert rc == 2, err
    _no_traceback(err)
    for pid, p in bad.items():
        assert _warning_lines(err, f"skipping patient {pid}", str(p), "empty (0 bytes)"), err
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert any("every training patient was skipped" in ln for ln in errors), err


def test_every_test_patient_skipped_fails_the_task(
    cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {pid: Path(paths["HR"]) for pid, paths in cohort.test.items()}
    for p in bad.values():
        _truncate(p)
    rc = cohort.run()
    err = capsys.readouterr().err
    assert rc == 2, err
    _no_traceback(err)
    for pid, p in bad.items():
        assert _warning_lines(err, f"skipping patient {pid}", str(p), "truncated"), err
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert any("every test patient was skipped" in ln and all(pid in ln for pid in bad)
               for ln in errors), err


# --------------------------------------------------------------------------------------
# NaN / Inf voxels
# --------------------------------------------------------------------------------------
def _poison(path: str, values: list[float], seed: int) -> int:
    """Put ``values`` into distinct foreground voxels of ``path``; return how many."""
    vol = _data(path)
    fg = np.flatnonzero(vol > 0)
    idx = np.random.default_rng(seed).choice(fg, size=len(values), replace=False)
    vol[np.unravel_index(idx, vol.shape)] = values  # nibabel's array may be Fortran-ordered
    _save(path, vol, path)
    assert int(np.count_nonzero(~np.isfinite(_data(path)))) == len(values)
    return len(values)


def test_nan_and_inf_voxels_are_counted_per_file_and_never_reach_an_output(
    cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    tr = sorted(cohort.train)
    te = sorted(cohort.test)
    nan, inf = float("nan"), float("inf")
    targets = {
        (tr[0], cohort.train[tr[0]]["experts"][0]): [nan] * 5 + [inf] * 3 + [-inf] * 2,
        (tr[1], cohort.train[tr[1]]["HR"]): [nan] * 4,
        (te[0], cohort.test[te[0]]["experts"][2]): [nan] * 6 + [-inf],
        (te[1], cohort.test[te[1]]["HR"]): [inf] * 3,
    }
    expect: dict[str, dict[str, int]] = {}
    for i, ((pid, path), values) in enumerate(targets.items()):
        expect.setdefault(pid, {})[str(Path(path))] = _poison(path, values, seed=i)

    rc = cohort.run()
    err = capsys.readouterr().err
    assert rc == 0, err
    _no_traceback(err)
    metrics = _finite_outputs(cohort)
    assert "skipped" not in metrics
    assert metrics["nonfinite_voxels"] == expect
    for pid, files in expect.items():
        for f, n in files.items():
            assert _warning_lines(err, f"patient {pid}", f"{n} NaN/Inf", f), err
    assert len(cohort.patients()["per_patient"]["train"]) == 4


# --------------------------------------------------------------------------------------
# Empty HR mask, shapes, affines
# --------------------------------------------------------------------------------------
def test_hr_with_empty_mask_is_skipped_with_a_warning(
    cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    victims = {sorted(cohort.train)[1]: cohort.train, sorted(cohort.test)[1]: cohort.test}
    for pid, patients in victims.items():
        hr = patients[pid]["HR"]
        _save(hr, np.zeros(SHAPE, np.float32), hr)
    rc = cohort.run()
    err = capsys.readouterr().err
    assert rc == 0, err
    _no_traceback(err)
    metrics = _finite_outputs(cohort)
    assert set(metrics["skipped"]) == set(victims)
    for pid, patients in victims.items():
        assert _warning_lines(err, f"skipping patient {pid}", patients[pid]["HR"], "empty mask")
        assert patients[pid]["HR"] in metrics["skipped"][pid]
        assert "empty mask" in metrics["skipped"][pid]


def test_expert_shape_differing_from_hr_skips_the_patient_naming_both_files_and_shapes(
    cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    # pacs_sr.shape_policy defaults to skip for NIfTI configs (the 2025 release)
    pid = sorted(cohort.train)[2]
    hr, expert = cohort.train[pid]["HR"], cohort.train[pid]["experts"][3]
    _save(expert, _data(expert)[:, :, :-1], expert)
    rc = cohort.run()
    err = capsys.readouterr().err
    assert rc == 0, err
    _no_traceback(err)
    warnings = [ln for ln in err.splitlines() if " WARNING " in ln]
    wanted = (f"skipping patient {pid}", expert, hr, str((*SHAPE[:2], SHAPE[2] - 1)), str(SHAPE))
    assert any(all(w in ln for w in wanted) for ln in warnings), err


def test_hr_off_the_task_grid_is_an_error_naming_the_file_and_both_shapes(
    cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    pid = sorted(cohort.test)[0]
    paths = cohort.test[pid]
    for p in [paths["HR"], *paths["experts"]]:
        _save(p, _data(p)[:-1], p)
    rc = cohort.run()
    err = capsys.readouterr().err
    assert rc == 2, err
    _no_traceback(err)
    errors = [ln for ln in err.splitlines() if " ERROR " in ln]
    wanted = (paths["HR"], str((SHAPE[0] - 1, *SHAPE[1:])), str(SHAPE))
    assert any(all(w in ln for w in wanted) for ln in errors), err


def test_affine_mismatch_beyond_tolerance_warns_naming_both_files(
    cohort: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    far_pid, near_pid = sorted(cohort.train)[:2]
    far = cohort.train[far_pid]["experts"][1]
    near = cohort.train[near_pid]["experts"][2]
    for path, shift in ((far, 2.0), (near, 5e-4)):  # AFFINE_ATOL is 1e-3
        aff = nib.load(path).affine.copy()
        aff[0, 3] += shift
        _save(path, _data(path), path, affine=aff)
    rc = cohort.run()
    err = capsys.readouterr().err
    assert rc == 0, err
    _no_traceback(err)
    assert _warning_lines(err, far_pid, far, cohort.train[far_pid]["HR"], "affine"), err
    assert near not in err
    metrics = _finite_outputs(cohort)
    assert "skipped" not in metrics


# --------------------------------------------------------------------------------------
# Accepted variants: 4-D with a singleton axis, scaled integers
# --------------------------------------------------------------------------------------
def test_trailing_singleton_4d_volumes_give_the_same_results(
    cohort: Cohort, baseline: Cohort, capsys: pytest.CaptureFixture[str]
) -> None:
    tr, te = sorted(cohort.train)[0], sorted(cohort.test)[0]
    files = [cohort.train[tr]["HR"], cohort.train[tr]["experts"][0],
             cohort.test[te]["HR"], cohort.test[te]["experts"][1]]
    for p in files:
        _save(p, _data(p)[..., None], p)
        assert nib.load(p).shape == (*SHAPE, 1)
    rc = cohort.run()
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "skipping" not in err and "WARNING" not in err, err
    metrics = _finite_outputs(cohort)
    assert metrics == baseline.metrics()
    assert cohort.weights() == baseline.weights()
    for name in (f"{te}-{PULSE}.nii.gz",):
        a = nib.load(cohort.vdir / name)
        assert a.shape == SHAPE
        np.testing.assert_array_equal(a.get_fdata(dtype=np.float32),
                                      _data(baseline.vdir / name))


def _to_scaled_int16(path: str) -> None:
    """Rewrite ``path`` as int16 with scl_slope/scl_inter chosen by nibabel."""
    _save(path, _data(path), path, dtype=np.int16)
    proxy = nib.load(path).dataobj
    assert nib.load(path).get_data_dtype() == np.int16
    assert float(proxy.slope) != 1.0 and float(proxy.inter) != 0.0


def test_scaled_integer_volumes_are_read_like_nibabel(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scaled = copy_cohort(pristine, tmp_path / "scaled")
    floats = copy_cohort(pristine, tmp_path / "floats")
    for paths in [*scaled.train.values(), *scaled.test.values()]:
        for p in (paths["HR"], paths["experts"][0]):
            _to_scaled_int16(p)
            # the float twin holds exactly what nibabel reads from the scaled file
            twin = Path(str(p).replace(str(scaled.root), str(floats.root)))
            _save(twin, _data(p), twin)
    assert scaled.run() == 0
    assert floats.run() == 0
    err = capsys.readouterr().err
    _no_traceback(err)
    assert "WARNING" not in err, err
    ms, mf = _finite_outputs(scaled), _finite_outputs(floats)
    for split in ("train", "test"):
        for k in METRICS:
            assert ms[split][k] == pytest.approx(mf[split][k], rel=1e-6), (split, k)
    ws, wf = scaled.weights(), floats.weights()
    assert ws.keys() == wf.keys()
    np.testing.assert_allclose(np.array(list(ws.values())), np.array(list(wf.values())),
                               rtol=1e-5, atol=1e-6)
    for pid in scaled.test:
        name = f"{pid}-{PULSE}.nii.gz"
        np.testing.assert_allclose(_data(scaled.vdir / name), _data(floats.vdir / name),
                                   rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------------------
# Config and manifest: one line naming the key or value and the allowed ones, exit 2
# --------------------------------------------------------------------------------------
def _set(section: str, key: str, value: Any) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        doc[section][key] = value
    return edit


def _drop(section: str, key: str | None = None) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:
        if key is None:
            del doc[section]
        else:
            del doc[section][key]
    return edit


CONFIG_FAULTS = {
    "window": (_set("pacs_sr", "mixing_window", "gaussian"),
               ["pacs_sr.mixing_window", "one of flat, hann", "'gaussian'"]),
    "operator": (_set("pacs_sr", "grad_operator", "canny"),
                 ["pacs_sr.grad_operator", "one of sobel, prewitt, scharr", "'canny'"]),
    "normalize": (_set("pacs_sr", "normalize", "minmax"),
                  ["pacs_sr.normalize", "one of zscore", "'minmax'"]),
    "ssim_axis": (_set("pacs_sr", "ssim_axis", "oblique"),
                  ["pacs_sr.ssim_axis", "one of axial, coronal, sagittal", "'oblique'"]),
    "stride-0": (_set("pacs_sr", "stride", 0), ["pacs_sr.stride", "[1, patch_size=8]", "got 0"]),
    "stride-big": (_set("pacs_sr", "stride", 9), ["pacs_sr.stride", "[1, patch_size=8]", "got 9"]),
    "patch-0": (_set("pacs_sr", "patch_size", 0), ["pacs_sr.patch_size", "[1, 4096]", "got 0"]),
    "patch-neg": (_set("pacs_sr", "patch_size", -4),
                  ["pacs_sr.patch_size", "[1, 4096]", "got -4"]),
    "patch-1e30": (_set("pacs_sr", "patch_size", 1e30),
                   ["pacs_sr.patch_size", "an integer in [1, 4096]", "got 1e+30 (number)"]),
    "workers-0": (_set("pacs_sr", "num_workers", 0),
                  ["pacs_sr.num_workers", "non-zero integer", "-1 = all CPUs", "got 0"]),
    "ridge-neg": (_set("pacs_sr", "lambda_ridge", -1e-4), ["pacs_sr.lambda_ridge", ">= 0"]),
    "edge-neg": (_set("pacs_sr", "lambda_edge", -0.5), ["pacs_sr.lambda_edge", ">= 0"]),
    "grad-neg": (_set("pacs_sr", "lambda_grad", -0.2), ["pacs_sr.lambda_grad", ">= 0"]),
    "tau-big": (_set("pacs_sr", "laplacian_tau", 1.5), ["pacs_sr.laplacian_tau", "[0, 1]", "1.5"]),
    "tau-neg": (_set("pacs_sr", "laplacian_tau", -0.1),
                ["pacs_sr.laplacian_tau", "[0, 1]", "-0.1"]),
    "no-data": (_drop("data"), ["section 'data' is missing", "models-root"]),
    "no-pacs_sr": (_drop("pacs_sr"), ["section 'pacs_sr' is missing", "patch_size"]),
    "no-patch_size": (_drop("pacs_sr", "patch_size"), ["pacs_sr.patch_size is missing"]),
    "no-kfolds": (_drop("data", "kfolds"), ["data.kfolds is missing"]),
}


def _one_error_line(err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert " ERROR " in lines[0], err
    for w in words:
        assert w in lines[0], (w, lines[0])
    _no_traceback(err)


@pytest.mark.parametrize("case", list(CONFIG_FAULTS))
def test_config_error_is_one_line_naming_key_and_allowed_values(
    cohort: Cohort, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    edit, words = CONFIG_FAULTS[case]
    cohort.edit_config(edit)
    rc = cohort.run()
    err = capsys.readouterr().err
    assert rc == 2, err
    _one_error_line(err, str(cohort.cfg), *words)
    assert not cohort.out.exists()


def _manifest_text(text: str) -> Callable[[Cohort], None]:
    def edit(c: Cohort) -> None:
        c.manifest.write_text(text)
    return edit


def _config_names(key: str, names: list[str]) -> Callable[[Cohort], None]:
    def edit(c: Cohort) -> None:
        c.edit_config(_set("data", key, names))
    return edit


MANIFEST_FAULTS = {
    # name: (edit, extra CLI args, words of the one error line; "{manifest}" is its path)
    "missing": (lambda c: c.manifest.unlink(), [], ["{manifest}", "not found", "data.out"]),
    "not-json": (_manifest_text('{"folds": [{"train": '), [], ["{manifest}", "not valid JSON"]),
    "no-folds": (_manifest_text('{"splits": []}'), [], ["{manifest}", '"folds" list']),
    "empty-folds": (_manifest_text('{"folds": []}'), [], ["{manifest}", 'empty "folds" list']),
    "fold-list": (_manifest_text('{"folds": [{"train": ["a"], "test": ["a"]}]}'), [],
                  ["{manifest}", "fold 1", "in both 'train' and 'test'"]),
    "fold-4": (lambda c: None, ["--fold", "4"], ["--fold 4", "folds 1..3"]),
    "fold-0": (lambda c: None, ["--fold", "0"], ["--fold 0", "folds 1..3"]),
    "spacing-not-in-config": (lambda c: None, ["--spacing", "5mm"], ["'5mm'", "['3mm']"]),
    "pulse-not-in-config": (lambda c: None, ["--pulse", "flair"], ["'flair'", "['t1c']"]),
    "spacing-not-in-manifest": (_config_names("spacings", ["3mm", "5mm"]), ["--spacing", "5mm"],
                                ["manifest fold 1", "spacing '5mm'", "available: 3mm"]),
    "pulse-not-in-manifest": (_config_names("pulses", ["t1c", "t2w"]), ["--pulse", "t2w"],
                              ["manifest fold 1", "pulse 't2w'", "available: t1c"]),
    "model-not-in-manifest": (
        _config_names("models", ["BSPLINE", "LINEAR", "NEAREST", "SHARPEN", "SMORE"]), [],
        ["manifest fold 1", "model 'SMORE'", "available: BSPLINE, LINEAR, NEAREST, SHARPEN"]),
}


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("case", list(MANIFEST_FAULTS))
def test_manifest_error_is_one_line_naming_the_value_and_the_allowed_ones(
    cohort: Cohort, capsys: pytest.CaptureFixture[str], case: str, command: str
) -> None:
    edit, extra, words = MANIFEST_FAULTS[case]
    edit(cohort)
    if command == "evaluate":  # evaluate needs a spacing and pulse; a weights file is not read
        extra = [*extra, *(["--spacing", SPACING] if "--spacing" not in extra else []),
                 *(["--pulse", PULSE] if "--pulse" not in extra else []),
                 "--weights", cohort.root / "nowhere.json"]
    # a later --fold wins in argparse, so the fold faults override the default --fold 1
    rc = cohort.run(command, *extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    _one_error_line(err, *(w.format(manifest=cohort.manifest) for w in words))
    assert not cohort.mdir.exists()
