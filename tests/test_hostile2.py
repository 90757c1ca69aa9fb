"""Data-integrity cases of the third hostile pass (issue 16): nothing kept that was not checked.

Each test reproduces one failure the pass found (a rerun keeping a damaged output, a file
written outside its folder, a cache serving damaged content, a damaged model member ending
in a traceback, a non-finite blend written with exit 0) and checks the fix.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.core.model import _checksum, model_members
from pacs_numba.errors import ConfigError, InputError
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.integrity import check_patient_id
from pacs_numba.store.manifest import build_manifest, load_manifest, select_task, write_manifest
from pacs_numba.store.modelfile import load_model, save_model
from pacs_numba.store.volumes import VolumeStore

SPACING = "3mm"
PULSE = "t1c"
MODELS = ("BSPLINE", "LINEAR", "NEAREST", "SHARPEN")
SHAPE = (24, 26, 22)


def _run(*argv) -> int:
    return cli.main([*map(str, argv)])


def _write_cfg(cfg: Path, **pacs) -> Path:
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=1, log_to_file=False, **pacs)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small cohort, its manifest and fold 1 trained (model, weights.json, test blends)."""
    root = tmp_path_factory.mktemp("hostile2")
    cfg = make_cohort(root, patients=6, shape=SHAPE, spacings=(SPACING,), pulses=(PULSE,),
                      models=MODELS, seed=5, kfolds=3, patch_size=8, stride=4)
    _write_cfg(cfg)
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    cache = root / "cache"
    out = root / "out"
    assert _run("train", "--config", cfg, "--fold", 1, "--out-root", out, "--cache-dir", cache,
                "--no-progress", "-q") == 0
    mdir = next(out.rglob("pacs_model.npz")).parent
    train, test = select_task(load_manifest(config.data.out), 1, SPACING, PULSE, list(MODELS))
    return {"root": root, "cfg": cfg, "config": config, "cache": cache, "out": out,
            "mdir": mdir, "train": train, "test": test}


# --------------------------------------------------------------------------------------
# 2. batch predict verifies its outputs
# --------------------------------------------------------------------------------------
def test_batch_predict_recomputes_outputs_truncated_or_replaced(trained, tmp_path, capsys):
    common = ("--model", trained["mdir"] / "pacs_model.npz", "--cache-dir", trained["cache"],
              "--no-progress", "-q", "--manifest", trained["config"].data.out)
    d = tmp_path / "pred"
    assert _run("predict", *common, "--out-dir", d) == 0
    outs = sorted(d.glob("*.nii.gz"))
    assert len(outs) == 2
    first = {p.name: p.read_bytes() for p in outs}
    outs[0].write_bytes(b"")  # truncated to 0 bytes
    capsys.readouterr()
    assert _run("predict", *common, "--out-dir", d) == 0
    assert "1 written, 1 kept" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in outs} == first
    shutil.copy(outs[1], outs[0])  # replaced by another patient's
    assert _run("predict", *common, "--out-dir", d) == 0
    assert "1 written, 1 kept" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in outs} == first
    # a record edited into another shape describes nothing: the outputs need --force
    for text in ("[]", '{"model": "x", "patients": []}'):
        (d / "pacs_numba_predict.json").write_text(text)
        assert _run("predict", *common, "--out-dir", d) == 2
        err = capsys.readouterr().err
        assert "--force" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------
# 3. patient ids and experiment names are one safe path component
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../../x", "-rf", ".hidden", "/abs", "a/b", "..", "", "x\ny"])
def test_check_patient_id_refuses_unsafe_names(bad):
    with pytest.raises(InputError, match="somewhere: patient id"):
        check_patient_id(bad, "somewhere")


@pytest.mark.parametrize("bad", ["../../x", "-rf", ".hidden"])
def test_a_csv_patient_id_that_is_not_one_safe_component_is_refused(trained, tmp_path, capsys,
                                                                    bad):
    paths = next(iter(trained["test"].values()))["experts"]
    csv_path = tmp_path / "list.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pid", *MODELS])
        w.writerow([bad, *paths])
    capsys.readouterr()
    assert _run("predict", "--model", trained["mdir"] / "pacs_model.npz", "--csv", csv_path,
                "--out-dir", tmp_path / "o" / "p", "--cache-dir", trained["cache"], "-q") == 2
    err = capsys.readouterr().err
    assert f"CSV '{csv_path}' line 2: patient id {bad!r} cannot be used" in err
    assert not list(tmp_path.rglob("*.nii.gz"))


def test_a_folder_patient_id_that_is_not_a_safe_component_is_refused(trained, tmp_path, capsys):
    root = tmp_path / "models"
    pid, entry = next(iter(trained["test"].items()))
    for name, src in zip(MODELS, entry["experts"], strict=True):
        d = root / name / SPACING / "output_volumes"
        d.mkdir(parents=True)
        shutil.copy(src, d / f"-rf-{PULSE}.nii.gz")
    capsys.readouterr()
    assert _run("predict", "--model", trained["mdir"] / "pacs_model.npz", "--models-root", root,
                "--spacing", SPACING, "--pulse", PULSE, "--out-dir", tmp_path / "o",
                "--cache-dir", trained["cache"], "-q") == 2
    err = capsys.readouterr().err
    assert "patient id '-rf' cannot be used" in err and f"-rf-{PULSE}.nii.gz" in err


@pytest.mark.parametrize("bad", ["../../x", "/tmp/elsewhere", "-x", ".x", "a/b"])
def test_an_experiment_name_that_is_not_one_safe_component_is_a_config_error(tmp_path, bad):
    cfg = make_cohort(tmp_path / "c", patients=3, shape=(8, 8, 8), spacings=(SPACING,),
                      pulses=(PULSE,), kfolds=3, patch_size=4, stride=4)
    _write_cfg(cfg, experiment_name=bad)
    with pytest.raises(ConfigError, match=re.escape(f"pacs_sr.experiment_name {bad!r} ")):
        load_config(cfg)


# --------------------------------------------------------------------------------------
# 4. a CSV header that repeats a column
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("column", ["BSPLINE", "pid"])
def test_a_csv_header_that_repeats_a_column_is_refused(trained, tmp_path, capsys, column):
    (a, ea), (b, eb) = list(trained["test"].items())[:2]
    header = ["pid", *MODELS, column]
    extra = eb["experts"][0] if column == "BSPLINE" else b
    csv_path = tmp_path / "dup.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerow([a, *ea["experts"], extra])
    capsys.readouterr()
    assert _run("predict", "--model", trained["mdir"] / "pacs_model.npz", "--csv", csv_path,
                "--out-dir", tmp_path / "o", "--cache-dir", trained["cache"], "-q") == 2
    err = capsys.readouterr().err
    assert f"CSV '{csv_path}': column {column!r} appears twice in the header" in err
    assert not (tmp_path / "o").exists()


def test_a_csv_row_with_more_fields_than_the_header_is_refused_and_a_bom_is_read(tmp_path):
    from pacs_numba.runs.predict import jobs_from_csv

    p = tmp_path / "bom.csv"
    p.write_text("\ufeffpid,A,B\np1,a.nii.gz,b.nii.gz\n", encoding="utf-8")
    (job,) = jobs_from_csv(p, ["A", "B"], tmp_path / "o")
    assert job.pid == "p1" and job.experts == (tmp_path / "a.nii.gz", tmp_path / "b.nii.gz")
    p.write_text("pid,A,B\np1,a.nii.gz,b.nii.gz,c.nii.gz\n")
    with pytest.raises(InputError, match=re.escape(f"CSV '{p}' line 2 (p1): 1 more field(s)")):
        jobs_from_csv(p, ["A", "B"], tmp_path / "o")


# --------------------------------------------------------------------------------------
# 5. evaluate --weights with a model beside it that records another expert order
# --------------------------------------------------------------------------------------
def test_evaluate_weights_json_takes_the_expert_order_of_the_model_beside_it(trained, tmp_path):
    model = load_model(trained["mdir"] / "pacs_model.npz")
    perm = [2, 0, 3, 1]
    other = type(model)(model.weights[:, perm].copy(), model.learned, model.grid,
                        tuple(model.model_names[i] for i in perm), model.settings,
                        window=model.window, affine=model.affine)
    d = tmp_path / "permuted"
    d.mkdir()
    save_model(d / "pacs_model.npz", other)
    from pacs_numba.store.modelfile import write_weights_json

    write_weights_json(d / "weights.json", other.weights, other.learned)
    base = ["evaluate", "--config", trained["cfg"], "--cache-dir", trained["cache"],
            "--fold", 1, "--spacing", SPACING, "--pulse", PULSE, "--no-progress", "-q"]
    assert _run(*base, "--weights", d / "weights.json", "--out-root", tmp_path / "e1") == 0
    want = json.loads((trained["mdir"] / "metrics.json").read_text())
    # the model file itself, in that other order: its columns are named, so reordered too
    assert _run(*base, "--weights", d / "pacs_model.npz", "--out-root", tmp_path / "e2") == 0
    for out in ("e1", "e2"):
        got = json.loads(next((tmp_path / out).rglob("metrics.json")).read_text())
        assert got["test"]["psnr"] == pytest.approx(want["test"]["psnr"], rel=1e-6)
        assert got["train"]["psnr"] == pytest.approx(want["train"]["psnr"], rel=1e-6)


def test_evaluate_weights_json_beside_a_model_of_other_experts_is_refused(trained, tmp_path,
                                                                          capsys):
    model = load_model(trained["mdir"] / "pacs_model.npz")
    other = type(model)(model.weights, model.learned, model.grid,
                        ("BSPLINE", "LINEAR", "NEAREST", "UNIRES"), model.settings,
                        window=model.window)
    d = tmp_path / "other"
    d.mkdir()
    save_model(d / "pacs_model.npz", other)
    shutil.copy(trained["mdir"] / "weights.json", d / "weights.json")
    capsys.readouterr()
    assert _run("evaluate", "--config", trained["cfg"], "--cache-dir", trained["cache"],
                "--fold", 1, "--spacing", SPACING, "--pulse", PULSE, "--no-progress", "-q",
                "--weights", d / "weights.json", "--out-root", tmp_path / "e") == 2
    err = capsys.readouterr().err
    assert "experts ['BSPLINE', 'LINEAR', 'NEAREST', 'UNIRES']" in err
    assert str(d / "pacs_model.npz") in err


# --------------------------------------------------------------------------------------
# 6. predict checks the experts' affines against each other
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["shift", "flip"])
def test_predict_refuses_experts_whose_affines_disagree(trained, tmp_path, capsys, change):
    paths = [Path(p) for p in next(iter(trained["test"].values()))["experts"]]
    img = nib.load(paths[2])
    aff = img.affine.copy()
    if change == "shift":
        aff[0, 3] += 10.0
    else:
        aff[:, 1] *= -1
    moved = tmp_path / "moved.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), aff, img.header), moved)
    named = [f"{n}={p}" for n, p in zip(MODELS, [*paths[:2], moved, paths[3]], strict=True)]
    args = ["predict", "--model", trained["mdir"] / "pacs_model.npz", "--out",
            tmp_path / "p.nii.gz", "--cache-dir", trained["cache"], "-q"]
    capsys.readouterr()
    assert _run(*args, *(x for n in named for x in ("--expert", n))) == 2
    err = capsys.readouterr().err
    assert f"'{moved}'" in err and f"'{paths[0]}'" in err and "affine" in err
    assert not (tmp_path / "p.nii.gz").exists()


# --------------------------------------------------------------------------------------
# 7. caches that verify their content
# --------------------------------------------------------------------------------------
def _vol(tmp_path: Path, shape=(40, 44, 36)) -> tuple[Path, np.ndarray]:
    a = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(a, np.eye(4)), path)
    return path, a


def test_a_volume_cache_entry_damaged_in_its_middle_is_not_served(tmp_path, caplog):
    path, a = _vol(tmp_path)
    store = VolumeStore(tmp_path / "cache")
    entry = store.get(path).entry
    size = entry.stat().st_size
    with open(entry, "r+b") as f:  # 4 KiB flipped in the middle, in place (same size)
        f.seek(size // 2)
        block = bytearray(f.read(4096))
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    fresh = VolumeStore(tmp_path / "cache")  # another process: no mapping to reuse
    with caplog.at_level(logging.WARNING, logger="pacs_numba.store.volumes"):
        got = fresh.get(path)
    np.testing.assert_array_equal(got.data, a)
    assert fresh.read_count == 1  # rebuilt from the source
    assert "checksum" in caplog.text


def test_a_statistics_entry_replaced_by_another_patients_is_detected(tmp_path, caplog):
    from pacs_numba.core.cellstats import StatsKey
    from pacs_numba.store.statscache import StatsCache

    rng = np.random.default_rng(2)
    shape = (12, 10, 8)
    files, arrays = [], []
    for pid in ("a", "b"):
        hr = (rng.random(shape) + 0.5).astype(np.float32)
        ex = [(hr + rng.normal(0, 0.1, shape)).astype(np.float32) for _ in range(2)]
        fs = []
        for i, v in enumerate([hr, *ex]):
            f = tmp_path / f"{pid}{i}.nii.gz"
            nib.save(nib.Nifti1Image(v, np.eye(4)), f)
            fs.append(f)
        files.append(fs)
        arrays.append((hr, ex))
    key = StatsKey(region="first_block", stride=4, patch_size=4, window="flat",
                   with_edge=False, edge_power=0.0, with_grad=False, grad_operator="")
    cache = StatsCache(tmp_path / "cs")
    sa = cache.get(files[0], key, lambda: arrays[0])
    cache.get(files[1], key, lambda: arrays[1])
    assert cache.computed == 2
    shutil.copy(cache.entry(files[1], key), cache.entry(files[0], key))
    fresh = StatsCache(tmp_path / "cs")
    with caplog.at_level(logging.WARNING, logger="pacs_numba.store.statscache"):
        again = fresh.get(files[0], key, lambda: arrays[0])
    assert fresh.computed == 1 and "belongs to another" in caplog.text
    np.testing.assert_array_equal(again.parts, sa.parts)
    # damaged in place, in its middle: the members' CRC-32 catches it
    entry = cache.entry(files[0], key)
    size = entry.stat().st_size
    with open(entry, "r+b") as f:
        f.seek(size // 2)
        block = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    caplog.clear()
    third = StatsCache(tmp_path / "cs")
    with caplog.at_level(logging.WARNING, logger="pacs_numba.store.statscache"):
        np.testing.assert_array_equal(third.get(files[0], key, lambda: arrays[0]).parts, sa.parts)
    assert third.computed == 1 and "unreadable" in caplog.text


# --------------------------------------------------------------------------------------
# 8. damaged model-file members
# --------------------------------------------------------------------------------------
def _damaged(trained, tmp_path: Path, **changes) -> Path:
    members = model_members(load_model(trained["mdir"] / "pacs_model.npz"))
    for k, v in changes.items():
        if v is None:
            del members[k]
        else:
            members[k] = np.asarray(v)
    members["checksum"] = np.asarray(_checksum(members))  # a consistent, damaged file
    path = tmp_path / "damaged.npz"
    np.savez(path, **members)
    return path


@pytest.mark.parametrize(
    ("change", "member"),
    [
        ({"format_version": "two"}, "format_version"),
        ({"format_version": np.array([2, 2])}, "format_version"),
        ({"settings": json.dumps([1, 2])}, "settings"),
        ({"settings": "{not json"}, "settings"),
        ({"settings": json.dumps({"pacs_sr": 3})}, "settings"),
        ({"window": "gauss"}, "window"),
        ({"weights": None}, "weights"),
        ({"learned": None}, "learned"),
        ({"patch_size": "eight"}, "patch_size"),
        ({"shape": np.array([24, 26])}, "shape"),
        ({"model_names": np.array([1.5, 2.5, 3.5, 4.5])}, "model_names"),
    ],
)
def test_a_damaged_model_member_is_one_clear_error(trained, tmp_path, capsys, change, member):
    path = _damaged(trained, tmp_path, **change)
    with pytest.raises(InputError, match=f"'{path}'.*{member}"):
        load_model(path)
    capsys.readouterr()
    assert _run("inspect", path) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and member in err and str(path) in err


def test_a_model_with_nan_weights_is_refused_at_load(trained, tmp_path, capsys):
    w = load_model(trained["mdir"] / "pacs_model.npz").weights.copy()
    w[3, 1] = np.nan
    path = _damaged(trained, tmp_path, weights=w)
    with pytest.raises(InputError, match=f"'{path}'.*weights.*not finite"):
        load_model(path)
    expert_args = [
        x for n, p in zip(MODELS, next(iter(trained["test"].values()))["experts"], strict=True)
        for x in ("--expert", f"{n}={p}")
    ]
    capsys.readouterr()
    assert _run("predict", "--model", path, *expert_args, "--out", tmp_path / "p.nii.gz",
                "--cache-dir", trained["cache"], "-q") == 2
    assert "not finite" in capsys.readouterr().err
    assert not (tmp_path / "p.nii.gz").exists()


# --------------------------------------------------------------------------------------
# 9. non-finite outputs are refused with the cause named
# --------------------------------------------------------------------------------------
def _huge(img) -> np.ndarray:
    """The volume with every voxel > 0 at +-3e38: finite, but its blend overflows float32."""
    data = np.asarray(img.dataobj, dtype=np.float32)
    high = data > np.percentile(data, 60)
    return np.where(high, np.float32(3e38), np.where(data > 0, np.float32(-3e38), data))


def test_predict_refuses_a_blend_that_overflows(trained, tmp_path, capsys):
    paths = [Path(p) for p in next(iter(trained["test"].values()))["experts"]]
    img = nib.load(paths[1])
    huge = tmp_path / "huge.nii.gz"
    nib.save(nib.Nifti1Image(_huge(img), img.affine), huge)
    named = [f"{n}={p}" for n, p in zip(MODELS, [paths[0], huge, *paths[2:]], strict=True)]
    capsys.readouterr()
    assert _run("predict", "--model", trained["mdir"] / "pacs_model.npz",
                *(x for n in named for x in ("--expert", n)), "--out", tmp_path / "p.nii.gz",
                "--cache-dir", trained["cache"], "-q") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "not finite" in err and str(huge) in err
    assert not (tmp_path / "p.nii.gz").exists()


def test_evaluate_refuses_a_blend_that_overflows(trained, tmp_path, capsys):
    # the huge expert values of one test patient: the patient is skipped, named with the file
    cohort = tmp_path / "c"
    shutil.copytree(trained["root"], cohort, ignore=shutil.ignore_patterns("out", "cache"))
    cfg = cohort / "config.yaml"
    doc = yaml.safe_load(cfg.read_text())
    text = yaml.safe_dump(doc).replace(str(trained["root"]), str(cohort))
    cfg.write_text(text)
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    _, test = select_task(load_manifest(config.data.out), 1, SPACING, PULSE, list(MODELS))
    pid, entry = next(iter(test.items()))
    target = Path(entry["experts"][1])
    img = nib.load(target)
    nib.save(nib.Nifti1Image(_huge(img), img.affine, img.header), target)
    capsys.readouterr()
    rc = _run("evaluate", "--config", cfg, "--cache-dir", tmp_path / "cache", "--fold", 1,
              "--spacing", SPACING, "--pulse", PULSE, "--no-progress", "-v", "--weights",
              trained["mdir"] / "pacs_model.npz", "--out-root", tmp_path / "e")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"patient {pid}" in err and "not finite" in err and str(target) in err
    assert rc == 0  # the other test patient is still evaluated; this one is skipped
    metrics = json.loads(next((tmp_path / "e").rglob("metrics.json")).read_text())
    assert "not finite" in metrics["skipped"][pid]
    assert not any((tmp_path / "e").rglob(f"{pid}-{PULSE}.nii.gz"))  # its blend removed
    assert any((tmp_path / "e").rglob(f"*-{PULSE}.nii.gz"))


# --------------------------------------------------------------------------------------
# 1. --resume fingerprints the atlas files
# --------------------------------------------------------------------------------------
def test_resume_recomputes_every_patient_after_the_atlas_brain_mask_changed(tmp_path, capsys):
    pytest.importorskip("ants")
    from scipy import ndimage

    from pacs_numba.store.nifti import write_nifti

    root = tmp_path / "c"
    cfg = make_cohort(root, patients=3, shape=(32, 36, 30), spacings=(SPACING,), pulses=(PULSE,),
                      models=("BSPLINE", "SHARPEN"), kfolds=3, patch_size=8, stride=8)
    atlas = nib.load(root / "hr" / "sub-001" / f"sub-001-{PULSE}.nii.gz")
    data = np.asarray(atlas.dataobj, dtype=np.float32)
    (root / "atlas").mkdir()
    write_nifti(root / "atlas" / "T1_brain.nii", data, atlas.affine)
    mask_path = root / "atlas" / "brain_mask.nii"
    write_nifti(mask_path, ndimage.binary_erosion(data > 0, iterations=1).astype(np.float32),
                atlas.affine)
    _write_cfg(cfg, use_registration=True, save_weight_volumes=False)
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    base = ["train", "--config", cfg, "--fold", 1, "--cache-dir", tmp_path / "cache",
            "--out-root", tmp_path / "out", "--no-progress", "-v"]
    assert _run(*base) == 0
    record = json.loads(next((tmp_path / "out").rglob("pacs_numba_run.json")).read_text())
    atlas_fp = record["settings"]["atlas"]
    assert atlas_fp["template"]["path"] == str(root / "atlas" / "T1_brain.nii")
    assert atlas_fp["brain_mask"]["path"] == str(mask_path)
    capsys.readouterr()
    assert _run(*base, "--resume") == 0
    assert capsys.readouterr().err.count("resumed (outputs complete)") == 3  # unchanged: kept
    # the atlas brain mask rewritten in place (same name, same size)
    write_nifti(mask_path, ndimage.binary_erosion(data > 0, iterations=3).astype(np.float32),
                atlas.affine)
    assert _run(*base, "--resume") == 0
    err = capsys.readouterr().err
    assert "resumed (outputs complete)" not in err
    assert "settings changed" in err and "atlas" in err


@pytest.mark.parametrize(
    "doc",
    [
        {"patients": [], "model": None},
        {"patients": {"test/p1": "x"}, "model": None},
        {"patients": {}, "model": ["digest"]},
        {"patients": {}, "model": None, "settings": []},
    ],
)
def test_a_run_record_edited_into_another_shape_is_ignored(tmp_path, caplog, doc):
    from pacs_numba.store.record import FORMAT_VERSION, RunRecord

    path = tmp_path / "pacs_numba_run.json"
    path.write_text(json.dumps({"format": FORMAT_VERSION, "settings": {"a": 1}, "complete": True,
                                **doc}))
    with caplog.at_level(logging.WARNING, logger="pacs_numba.store.record"):
        rec = RunRecord(path, {"a": 1}, resume=True)
    assert rec.old is None and "malformed" in caplog.text
    assert rec.reusable_model({}) is None
    assert rec.reusable_patient("test", "p1", []) is None
