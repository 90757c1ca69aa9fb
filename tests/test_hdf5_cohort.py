"""A user of the published tool's current version: HDF5 cohort, their config and manifest, train.

The same generated cohort exists in both forms (``make_h5_cohort`` converts the NIfTI one), so
the HDF5 path is checked against the NIfTI path: same folds, same volumes, same weights.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import yaml

from pacs_numba.cli import main
from pacs_numba.config import load_config
from pacs_numba.core.harmonise import common_shape, zoom_to
from pacs_numba.errors import ConfigError, InputError
from pacs_numba.store.convert import make_h5_cohort
from pacs_numba.store.manifest import build_manifest, load_manifest, select_task, write_manifest
from pacs_numba.store.nifti import read_nifti
from pacs_numba.store.results_h5 import ResultsH5
from pacs_numba.store.volumes import VolumeStore, file_fingerprint, volume_affine, volume_shape

h5py = pytest.importorskip("h5py")

SHAPE = (24, 28, 20)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("h5cohort")
    make_h5_cohort(root, patients=5, shape=SHAPE, spacings=("3mm",), pulses=("t1c",),
                   models=("BSPLINE", "LINEAR", "NEAREST"), kfolds=2, patch_size=8, stride=8)
    return root


def test_layout_is_the_published_one(cohort):
    with h5py.File(cohort / "source_data.h5", "r") as f:
        assert sorted(f["high_resolution"]) == [f"sub-00{i}" for i in range(1, 6)]
        d = f["high_resolution/sub-001/t1c"]
        assert d.dtype == np.float32 and d.shape == SHAPE and d.compression == "gzip"
        assert d.attrs["affine"].shape == (16,) and d.attrs["affine"].dtype == np.float64
        assert "low_resolution/3mm/sub-001/t1c" in f
    assert sorted(p.name for p in (cohort / "experts").iterdir()) == [
        "bspline.h5", "linear.h5", "nearest.h5"]
    with h5py.File(cohort / "experts" / "linear.h5", "r") as f:
        assert f["3mm/sub-003/t1c"].shape == SHAPE
    cfg = yaml.safe_load((cohort / "config.yaml").read_text())
    assert set(cfg["data"]) >= {"source-h5", "experts-dir"} and "hr-root" not in cfg["data"]


def test_same_folds_as_nifti_manifest(cohort):
    h5 = load_config(cohort / "config.yaml")
    nii = load_config(cohort / "nifti" / "config.yaml")
    m_h5, m_nii = build_manifest(h5.data), build_manifest(nii.data)
    assert all(isinstance(f["test"], list) for f in m_h5["folds"])
    assert [sorted(f["test"]) for f in m_h5["folds"]] == [sorted(f["test"])
                                                          for f in m_nii["folds"]]
    assert [sorted(f["train"]) for f in m_h5["folds"]] == [sorted(f["train"])
                                                           for f in m_nii["folds"]]


def test_id_list_read_in_file_order_and_resolved(cohort, tmp_path):
    cfg = load_config(cohort / "config.yaml")
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"folds": [{"test": ["sub-004", "sub-002"],
                                           "train": ["sub-005", "sub-001", "sub-003"]}]}))
    train, test = select_task(load_manifest(path, cfg.data), 1, "3mm", "t1c", ["LINEAR"])
    assert list(train) == ["sub-005", "sub-001", "sub-003"] and list(test) == ["sub-004",
                                                                               "sub-002"]
    assert test["sub-004"]["HR"] == f"{cohort / 'source_data.h5'}::high_resolution/sub-004/t1c"
    assert test["sub-004"]["experts"] == [f"{cohort / 'experts' / 'linear.h5'}::3mm/sub-004/t1c"]
    # the same ids resolve into NIfTI paths with a NIfTI config
    nii = load_config(cohort / "nifti" / "config.yaml")
    _, test = select_task(load_manifest(path, nii.data), 1, "3mm", "t1c", ["LINEAR"])
    assert test["sub-002"]["HR"].endswith("hr/sub-002/sub-002-t1c.nii.gz")


@pytest.mark.parametrize(("text", "match"), [
    ('{"folds": [{"test": ["a"], "train": ["a", "b"]}]}', "in both 'train' and 'test'"),
    ('{"folds": [{"test": ["a"], "train": ["b", "b"]}]}', "lists 'b' more than once"),
    ('{"folds": [{"test": ["a"], "train": [3]}]}', r"holds 3; expected patient ids"),
    ('{"folds": [{"test": ["a"]}]}', "has no 'train' list of patient ids"),
])
def test_id_list_errors(cohort, tmp_path, text, match):
    path = tmp_path / "m.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_manifest(path, load_config(cohort / "config.yaml").data)


def test_inclusion_rule_needs_hr_and_experts_not_lr(cohort, tmp_path):
    cfg = load_config(cohort / "config.yaml")
    work = tmp_path / "c"
    shutil.copytree(cohort, work, ignore=shutil.ignore_patterns("nifti", "results"))
    with h5py.File(work / "source_data.h5", "a") as f:
        del f["low_resolution/3mm/sub-001/t1c"]  # no LR: still included
    with h5py.File(work / "experts" / "nearest.h5", "a") as f:
        del f["3mm/sub-002/t1c"]  # one expert missing: dropped
    data = cfg.data.__class__(**{**cfg.data.__dict__, "source_h5": work / "source_data.h5",
                                 "experts_dir": work / "experts"})
    m = build_manifest(data)
    ids = sorted(m["folds"][0]["test"] + m["folds"][0]["train"])
    assert ids == ["sub-001", "sub-003", "sub-004", "sub-005"]


def test_volume_store_serves_hdf5_like_nifti(cohort, tmp_path):
    h5 = f"{cohort / 'source_data.h5'}::high_resolution/sub-002/t1c"
    nii = cohort / "nifti" / "hr" / "sub-002" / "sub-002-t1c.nii.gz"
    store = VolumeStore(tmp_path / "cache")
    a, b = store.get(h5), store.get(nii)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(a.meta.affine, b.meta.affine)
    assert a.data.flags.c_contiguous and not a.data.flags.writeable
    assert isinstance(a.data.base, np.memmap) or a.entry.suffix == ".npy"
    assert store.read_count == 2
    again = VolumeStore(tmp_path / "cache").get(h5)  # another process: maps the entry
    assert again.entry == a.entry
    assert volume_shape(h5) == SHAPE
    np.testing.assert_array_equal(volume_affine(h5), b.meta.affine)
    fp = file_fingerprint(h5)
    assert fp["path"] == h5 and fp["h5"]["h5_key"] == "high_resolution/sub-002/t1c"


def test_volume_store_missing_key_names_file_and_key(cohort, tmp_path):
    store = VolumeStore(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"has no dataset 'high_resolution/sub-009/t1c'"):
        store.get(f"{cohort / 'source_data.h5'}::high_resolution/sub-009/t1c")


def _weights(root: Path) -> dict:
    return json.loads((root / "PaCS_SR" / "3mm" / "model_data" / "fold_1" / "t1c"
                       / "weights.json").read_text())


def test_train_end_to_end_from_hdf5_same_weights_as_nifti(cohort, tmp_path, capsys):
    # one log file per main() call would stay open across the two calls of this test
    doc = yaml.safe_load((cohort / "config.yaml").read_text())
    doc["pacs_sr"]["log_to_file"] = False
    cfg_h5 = tmp_path / "h5.yaml"
    cfg_h5.write_text(yaml.safe_dump(doc))
    assert main(["build-manifest", "--config", str(cfg_h5)]) == 0
    manifest = json.loads((cohort / "manifest.json").read_text())
    assert set(manifest["folds"][0]) == {"test", "train"}
    assert isinstance(manifest["folds"][0]["test"], list)
    common = ["--fold", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    out_h5, out_nii = tmp_path / "out_h5", tmp_path / "out_nii"
    assert main(["train", "--config", str(cfg_h5), "--out-root", str(out_h5), *common]) == 0
    # the NIfTI form of the same cohort, with the same id-list manifest (same order)
    nii = yaml.safe_load((cohort / "nifti" / "config.yaml").read_text())
    nii["data"]["out"] = str(cohort / "manifest.json")
    nii["pacs_sr"].update(shape_policy="harmonise", log_to_file=False)
    (tmp_path / "nii.yaml").write_text(yaml.safe_dump(nii))
    assert main(["train", "--config", str(tmp_path / "nii.yaml"), "--out-root", str(out_nii),
                 *common]) == 0
    assert _weights(out_h5) == _weights(out_nii)
    # the paper's table from both runs: the same volumes and weights give the same numbers
    tables = []
    for cfg, out in ((cfg_h5, out_h5), (tmp_path / "nii.yaml", out_nii)):
        csv_path = tmp_path / f"{out.name}.csv"
        assert main(["metrics", "--config", str(cfg), "--out-root", str(out), "--out",
                     str(csv_path), "--fold", "1", "--cache-dir", str(tmp_path / "cache")]) == 0
        tables.append(csv_path.read_text())
    assert tables[0] == tables[1]
    lines = tables[0].splitlines()
    assert lines[0] == "patient,spacing,pulse,model,ms_ssim_3d,mmd_mf"
    assert len(lines) == 1 + len(manifest["folds"][0]["test"]) * 4
    assert {ln.split(",")[3] for ln in lines[1:]} == {"BSPLINE", "LINEAR", "NEAREST", "PACS_SR"}
    # and the published entry-form manifest of the NIfTI cohort gives the same folds
    nii_cfg = load_config(cohort / "nifti" / "config.yaml")
    write_manifest(build_manifest(nii_cfg.data), tmp_path / "entry.json")
    entry = json.loads((tmp_path / "entry.json").read_text())
    assert sorted(entry["folds"][0]["test"]) == sorted(manifest["folds"][0]["test"])


def test_outputs_in_the_current_release_form(cohort, tmp_path, capsys):
    doc = yaml.safe_load((cohort / "config.yaml").read_text())
    doc["pacs_sr"].update(log_to_file=False)
    doc["data"]["out"] = str(tmp_path / "manifest.json")
    cfg = tmp_path / "h5.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    assert main(["build-manifest", "--config", str(cfg)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    out = tmp_path / "out"
    args = ["train", "--config", str(cfg), "--out-root", str(out), "--fold", "1",
            "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    exp = out / "PaCS_SR"
    test_ids, train_ids = manifest["folds"][0]["test"], manifest["folds"][0]["train"]
    with h5py.File(exp / "results_fold_1.h5", "r") as f:  # plain h5py, as their scripts
        for pid in test_ids + train_ids:  # evaluate_train: train blends too
            d = f[f"3mm/blends/{pid}/t1c"]
            assert d.shape == SHAPE and d.dtype == np.float32 and d.attrs["affine"].size == 16
    assert not (exp / "3mm" / "output_volumes").exists()
    mdir = exp / "3mm" / "model_data" / "fold_1" / "t1c"
    metrics = json.loads((mdir / "metrics.json").read_text())
    for split, ids in (("test", test_ids), ("train", train_ids)):
        part = metrics[split]
        assert set(part) == {"aggregate", "std", "per_patient"}
        assert [r["patient_id"] for r in part["per_patient"]] == ids  # file order
        psnr = [r["psnr"] for r in part["per_patient"]]
        assert part["aggregate"]["psnr"] == pytest.approx(np.mean(psnr))
        assert part["std"]["psnr"] == pytest.approx(np.std(psnr))
        assert all(r["time_seconds"] > 0 for r in part["per_patient"])
    rec = json.loads((mdir / "training_record.json").read_text())
    assert rec["patient_ids"] == train_ids and rec["volume_shape"] == list(SHAPE)
    tile = rec["tiles"][0]
    assert tile["method"] == "exact-kkt" and 1 <= tile["active_set_size"] <= 3
    assert abs(sum(tile["weights"]) - 1) < 1e-5 and tile["voxels"] > 0
    assert max(t["kkt_residual"] for t in rec["tiles"]) <= 1e-6 * max(
        1.0, max(abs(t["objective"]) for t in rec["tiles"]))
    meta = json.loads((exp / "experiment_metadata.json").read_text())
    assert meta["data"]["schema"] == "hdf5" and meta["tasks"] == [
        {"fold": 1, "spacing": "3mm", "pulse": "t1c"}]
    capsys.readouterr()
    assert main(["summarize", str(out)]) == 0  # reads the current release's metrics.json
    assert "PaCS" in capsys.readouterr().out
    assert main(["report", str(mdir), "--config", str(cfg), "--cache-dir",
                 str(tmp_path / "cache")]) == 0  # HDF5 sources through the volume cache
    assert (mdir / "report" / "weights_by_region.png").is_file()
    assert main(["inspect", str(mdir / "pacs_model.npz")]) == 0
    assert main([*args, "--resume"]) == 0  # resume reads both forms
    again = json.loads((mdir / "metrics.json").read_text())
    assert again["test"]["aggregate"] == metrics["test"]["aggregate"]


def test_paper_metrics_resume_drops_partial_row(cohort, tmp_path, capsys):
    doc = yaml.safe_load((cohort / "config.yaml").read_text())
    doc["pacs_sr"].update(log_to_file=False, compute_paper_metrics=True, save_weight_volumes=False)
    doc["data"]["out"] = str(tmp_path / "manifest.json")
    cfg = tmp_path / "h5.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    assert main(["build-manifest", "--config", str(cfg)]) == 0
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--out-root", str(out), "--fold", "2",
                 "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    table = out / "PaCS_SR" / "paper_metrics.csv"  # written at evaluate time
    full = table.read_text()
    rows = full.splitlines()[1:]
    n_test = len(json.loads((tmp_path / "manifest.json").read_text())["folds"][1]["test"])
    assert len(rows) == n_test * 4
    vals = [float(v) for r in rows for v in r.split(",")[4:]]
    assert all(np.isfinite(vals))
    assert all(0 < float(r.split(",")[4]) <= 1 for r in rows)
    # a killed run: the last row half-written; the next run drops it and writes it again
    table.write_text(full[: full.rstrip("\n").rfind("\n") + 12])
    capsys.readouterr()
    assert main(["metrics", "--config", str(cfg), "--out-root", str(out), "--fold", "2",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "1 rows added" in capsys.readouterr().out
    assert table.read_text() == full
    assert main(["metrics", "--config", str(cfg), "--out-root", str(out), "--fold", "2",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "0 rows added" in capsys.readouterr().out


def test_paper_metrics_refuses_foreign_csv(cohort, tmp_path, capsys):
    bad = tmp_path / "t.csv"
    bad.write_text("a,b\n1,2\n")
    assert main(["metrics", "--config", str(cohort / "config.yaml"), "--out", str(bad),
                 "--out-root", str(tmp_path)]) == 2
    assert f"'{bad}' is not a paper-metrics table" in capsys.readouterr().err


def test_paper_metrics_unwritable_table_is_one_error_before_any_work(cohort, tmp_path, capsys):
    # found by a hostile pass: an --out in a folder that cannot hold files was a traceback
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    target = (Path("/proc") if os.geteuid() == 0 else ro) / "t.csv"  # root writes anywhere else
    assert main(["metrics", "--config", str(cohort / "config.yaml"), "--out", str(target),
                 "--out-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the metrics table '{target}'" in err and "Traceback" not in err
    assert "paper metrics patient=" not in err


def test_convert_cli_both_ways(cohort, tmp_path, capsys):
    out = tmp_path / "conv"
    nifti_cfg = cohort / "nifti" / "config.yaml"
    assert main(["convert", "--config", str(nifti_cfg), "--out", str(out)]) == 0
    with h5py.File(out / "source_data.h5", "r") as a, h5py.File(cohort / "source_data.h5",
                                                               "r") as b:
        key = "high_resolution/sub-003/t1c"
        np.testing.assert_array_equal(a[key][...], b[key][...])
        np.testing.assert_array_equal(a[key].attrs["affine"], b[key].attrs["affine"])
    cfg = load_config(out / "config.yaml")
    assert cfg.data.schema == "hdf5" and cfg.data.source_h5 == out / "source_data.h5"
    assert main(["convert", "--config", str(nifti_cfg), "--out", str(out)]) == 0  # resumes
    # blends -> NIfTI for viewers
    vol = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    aff = np.diag([1.0, 2.0, 3.0, 1.0])
    ResultsH5(tmp_path / "exp", 2).write_blend("3mm", "t1c", "sub-001", vol, aff)
    assert main(["convert", "--blends", str(tmp_path / "exp" / "results_fold_2.h5"),
                 "--out", str(tmp_path / "nii")]) == 0
    data, meta = read_nifti(tmp_path / "nii" / "3mm" / "sub-001-t1c.nii.gz")
    np.testing.assert_array_equal(data, vol)
    np.testing.assert_array_equal(meta.affine, aff)
    # a second export refuses to overwrite (found by a hostile pass), --force overwrites
    capsys.readouterr()
    assert main(["convert", "--blends", str(tmp_path / "exp" / "results_fold_2.h5"),
                 "--out", str(tmp_path / "nii")]) == 2
    assert "1 of the 1 NIfTI files exist already" in capsys.readouterr().err
    assert main(["convert", "--blends", str(tmp_path / "exp" / "results_fold_2.h5"),
                 "--out", str(tmp_path / "nii"), "--force"]) == 0


def test_convert_refuses_hdf5_config(cohort, tmp_path, capsys):
    assert main(["convert", "--config", str(cohort / "config.yaml"), "--out",
                 str(tmp_path)]) == 2
    assert "data is already in the HDF5 form; nothing to convert" in capsys.readouterr().err


def test_make_cohort_format_hdf5_cli(tmp_path, capsys):
    out = tmp_path / "c"
    assert main(["make-cohort", "--out", str(out), "--format", "hdf5", "--patients", "3",
                 "--kfolds", "2", "--shape", "12", "12", "10", "--spacings", "2mm"]) == 0
    cfg = load_config(out / "config.yaml")
    assert cfg.data.schema == "hdf5" and (out / "source_data.h5").is_file()
    assert load_config(out / "nifti" / "config.yaml").data.schema == "nifti"


def test_demo_runs_on_the_hdf5_form(tmp_path, capsys):
    assert main(["demo", "--format", "hdf5", "--out", str(tmp_path), "--patients", "4",
                 "--shape", "24", "24", "16", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "PaCS-SR" in text and "results_fold_1.h5" in text
    exp = tmp_path / "cohort_hdf5" / "results" / "PaCS_SR"
    assert (exp / "experiment_metadata.json").is_file()
    with h5py.File(exp / "results_fold_1.h5", "r") as f:
        assert len(f["3mm/blends"]) == 4  # test and train blends


def _cohort_with_expert_shape(cohort: Path, work: Path, shape: tuple[int, int, int]) -> Path:
    """A copy of the HDF5 cohort whose NEAREST expert comes on another grid (all patients)."""
    shutil.copytree(cohort, work, ignore=shutil.ignore_patterns("nifti", "results"))
    with h5py.File(work / "experts" / "nearest.h5", "a") as f:
        for pid in list(f["3mm"]):
            key = f"3mm/{pid}/t1c"
            vol, aff = f[key][...], f[key].attrs["affine"]
            del f[key]
            d = f.create_dataset(key, data=zoom_to(vol, shape), compression="gzip")
            d.attrs["affine"] = aff
    doc = yaml.safe_load((cohort / "config.yaml").read_text())
    doc["data"].update({"source-h5": str(work / "source_data.h5"),
                        "experts-dir": str(work / "experts"),
                        "out": str(work / "manifest.json")})
    doc["pacs_sr"].update(log_to_file=False, save_weight_volumes=False)
    (work / "config.yaml").write_text(yaml.safe_dump(doc))
    return work / "config.yaml"


@pytest.mark.parametrize("expert_shape", [(24, 28, 22), (24, 28, 18)])
def test_shape_harmonise_and_skip(cohort, tmp_path, capsys, expert_shape):
    cfg = _cohort_with_expert_shape(cohort, tmp_path / "c", expert_shape)
    assert main(["build-manifest", "--config", str(cfg)]) == 0
    common = ["--fold", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache")]
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--out-root", str(out), *common]) == 0
    target = common_shape([SHAPE, expert_shape])
    rec = json.loads((out / "PaCS_SR" / "3mm" / "model_data" / "fold_1" / "t1c"
                      / "training_record.json").read_text())
    assert tuple(rec["volume_shape"]) == target  # one grid on S, for fit and blend
    with h5py.File(out / "PaCS_SR" / "results_fold_1.h5", "r") as f:
        assert all(f[f"3mm/blends/{p}/t1c"].shape == target for p in f["3mm/blends"])
    # the 2025 release's policy: every patient skipped, one clear line
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"]["shape_policy"] = "skip"
    cfg.write_text(yaml.safe_dump(doc))
    capsys.readouterr()
    assert main(["train", "--config", str(cfg), "--out-root", str(tmp_path / "o2"),
                 *common]) == 2
    err = capsys.readouterr().err
    assert "every training patient was skipped" in err
    assert "nearest.h5::3mm/" in err and f"has shape {expert_shape}; expected {SHAPE}" in err
    assert "shape_policy: harmonise resamples it instead" in err


def test_zoom_to_is_scipy_zoom():
    rng = np.random.default_rng(0)
    vol = rng.random((9, 7, 5), dtype=np.float32)
    out = zoom_to(vol, (11, 7, 4))
    np.testing.assert_array_equal(out, ndi.zoom(vol, (11 / 9, 1.0, 4 / 5), order=3))
    assert out.dtype == np.float32 and out.flags.c_contiguous
    assert common_shape([(9, 7, 5), (11, 7, 4)]) == (11, 7, 5)
    with pytest.raises(ValueError, match="expected 3-D shapes with positive axes"):
        common_shape([(9, 7)])


def test_missing_h5py_is_one_line(cohort, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py raises ImportError
    rc = main(["train", "--config", str(cohort / "config.yaml"), "--fold", "1", "--out-root",
               str(tmp_path), "--no-progress", "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if " ERROR " in ln]
    assert len(lines) == 1
    assert lines[0].endswith("reading HDF5 cohorts needs h5py: pip install 'pacs-numba[hdf5]'")


def test_paper_metrics_table_that_is_empty_or_has_a_cut_header_counts_as_no_row(tmp_path):
    # the table is created empty before any volume is read (to fail early when unwritable),
    # and a run killed inside its first write leaves part of the header: neither is foreign
    from pacs_numba.runs.paper_metrics import _read_done

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert _read_done(empty) == set()
    cut = tmp_path / "cut.csv"
    cut.write_text("patient,spac")
    assert _read_done(cut) == set() and cut.read_text() == ""
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("a,b\n")
    with pytest.raises(InputError, match="is not a paper-metrics table"):
        _read_done(foreign)
