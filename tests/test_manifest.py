"""The K-fold manifest (algorithm A1) against a hand-built expectation on a fake layout."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from pacs_numba.config import DataConfig
from pacs_numba.errors import ConfigError
from pacs_numba.store.manifest import (
    build_manifest,
    load_manifest,
    scan_patients,
    select_task,
    write_manifest,
)

SPACINGS = ("3mm", "5mm")
PULSES = ("t1c", "t2w")
MODELS = ("BSPLINE", "SMORE")
COMPLETE = ["P01", "P02", "P03", "P04", "P05", "P06", "P07"]
SEED = 7


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def _layout(root: Path, pids: list[str]) -> None:
    """Empty files at every path the published layout expects for ``pids``."""
    for pid in pids:
        for pulse in PULSES:
            _touch(root / "hr" / pid / f"{pid}-{pulse}.nii.gz")
            for sp in SPACINGS:
                _touch(root / "lr" / sp / pid / f"{pid}-{pulse}.nii.gz")
                for m in MODELS:
                    _touch(root / "models" / m / sp / "output_volumes" / f"{pid}-{pulse}.nii.gz")


@pytest.fixture
def fake(tmp_path: Path) -> DataConfig:
    _layout(tmp_path, COMPLETE + ["X_noLR", "X_noSR"])
    (tmp_path / "lr" / "5mm" / "X_noLR" / "X_noLR-t2w.nii.gz").unlink()
    (tmp_path / "models" / "SMORE" / "3mm" / "output_volumes" / "X_noSR-t1c.nii.gz").unlink()
    (tmp_path / "hr" / "X_empty").mkdir()  # a patient folder without any file
    (tmp_path / "hr" / ".hidden").mkdir()  # not a patient
    (tmp_path / "hr" / "README.txt").write_text("not a patient either")
    return _data(tmp_path)


def _data(root: Path, **kw) -> DataConfig:
    args = dict(
        models_root=root / "models",
        hr_root=root / "hr",
        lr_root=root / "lr",
        spacings=SPACINGS,
        pulses=PULSES,
        models=MODELS,
        kfolds=3,
        seed=SEED,
        out=root / "manifest.json",
    )
    args.update(kw)
    return DataConfig(**args)


def _expected_entry(root: Path, pid: str) -> dict:
    # Written out longhand on purpose: this is the contract, not a re-implementation.
    sr = str(root / "models") + "/{m}/{sp}/output_volumes/" + pid + "-{p}.nii.gz"
    return {
        "BSPLINE": {
            "3mm": {p: sr.format(m="BSPLINE", sp="3mm", p=p) for p in PULSES},
            "5mm": {p: sr.format(m="BSPLINE", sp="5mm", p=p) for p in PULSES},
        },
        "SMORE": {
            "3mm": {p: sr.format(m="SMORE", sp="3mm", p=p) for p in PULSES},
            "5mm": {p: sr.format(m="SMORE", sp="5mm", p=p) for p in PULSES},
        },
        "HR": {
            "3mm": {
                "t1c": f"{root}/hr/{pid}/{pid}-t1c.nii.gz",
                "t2w": f"{root}/hr/{pid}/{pid}-t2w.nii.gz",
            },
            "5mm": {
                "t1c": f"{root}/hr/{pid}/{pid}-t1c.nii.gz",
                "t2w": f"{root}/hr/{pid}/{pid}-t2w.nii.gz",
            },
        },
        "LR": {
            "3mm": {
                "t1c": f"{root}/lr/3mm/{pid}/{pid}-t1c.nii.gz",
                "t2w": f"{root}/lr/3mm/{pid}/{pid}-t2w.nii.gz",
            },
            "5mm": {
                "t1c": f"{root}/lr/5mm/{pid}/{pid}-t1c.nii.gz",
                "t2w": f"{root}/lr/5mm/{pid}/{pid}-t2w.nii.gz",
            },
        },
    }


def _expected_manifest(root: Path) -> dict:
    order = sorted(COMPLETE)
    random.Random(SEED).shuffle(order)
    # n = 7, k = 3: test slices of length (7+0)//3, (7+1)//3, (7+2)//3 = 2, 2, 3.
    tests = [order[0:2], order[2:4], order[4:7]]
    return {
        "folds": [
            {
                "train": {p: _expected_entry(root, p) for p in order if p not in test},
                "test": {p: _expected_entry(root, p) for p in test},
            }
            for test in tests
        ]
    }


# ----------------------------------------------------------------- scanning


def test_scan_keeps_complete_and_explains_the_others(fake, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pacs_numba.store.manifest"):
        complete, missing = scan_patients(fake)
    assert complete == COMPLETE
    assert sorted(missing) == ["X_empty", "X_noLR", "X_noSR"]
    assert missing["X_noLR"] == [str(tmp_path / "lr/5mm/X_noLR/X_noLR-t2w.nii.gz")]
    assert missing["X_noSR"] == [
        str(tmp_path / "models/SMORE/3mm/output_volumes/X_noSR-t1c.nii.gz")
    ]
    # HR first, then LR, then experts; 2 HR + 4 LR + 8 SR files.
    assert len(missing["X_empty"]) == 14
    assert missing["X_empty"][0] == str(tmp_path / "hr/X_empty/X_empty-t1c.nii.gz")
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 3
    assert any("X_noLR" in r.getMessage() and "X_noLR-t2w" in r.getMessage() for r in warned)
    assert any(r.levelno == logging.INFO and "7 complete" in r.getMessage() for r in caplog.records)


def test_missing_hr_root(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.hr-root .* is not a directory"):
        scan_patients(_data(tmp_path / "nowhere"))


# ------------------------------------------------------------------ folds


def test_build_manifest_matches_hand_built_expectation(fake, tmp_path):
    manifest = build_manifest(fake)
    assert manifest == _expected_manifest(tmp_path)
    tested = [p for f in manifest["folds"] for p in f["test"]]
    assert sorted(tested) == COMPLETE  # each patient tested exactly once


def test_fold_sizes_follow_n_plus_i_over_k(tmp_path):
    _layout(tmp_path, [f"Q{i:02d}" for i in range(10)])
    manifest = build_manifest(_data(tmp_path, kfolds=4, seed=0))
    assert [len(f["test"]) for f in manifest["folds"]] == [2, 2, 3, 3]
    assert [len(f["train"]) for f in manifest["folds"]] == [8, 8, 7, 7]


def test_too_few_patients(fake):
    data = _data(fake.hr_root.parent, kfolds=8)
    with pytest.raises(ConfigError, match=r"found 7 complete patients.*kfolds = 8") as info:
        build_manifest(data)
    msg = str(info.value)
    assert "3 dropped" in msg and "X_empty lacks" in msg and "X_noLR lacks" in msg


def test_too_few_patients_lists_at_most_a_few(tmp_path):
    _layout(tmp_path, ["A"])
    for i in range(6):
        (tmp_path / "hr" / f"Z{i}").mkdir()
    with pytest.raises(ConfigError, match=r"found 1 complete.*6 dropped.* and 3 more"):
        build_manifest(_data(tmp_path))


def test_relative_roots_give_relative_paths(tmp_path, monkeypatch):
    _layout(tmp_path, ["A", "B"])
    monkeypatch.chdir(tmp_path)
    data = _data(Path("."), kfolds=2)
    entry = build_manifest(data)["folds"][0]["test"]
    (pid,) = entry
    assert entry[pid]["HR"]["3mm"]["t1c"] == f"hr/{pid}/{pid}-t1c.nii.gz"


# ------------------------------------------------------------- JSON on disk


def test_written_text_format(fake, tmp_path):
    out = tmp_path / "out" / "kfolds_manifest.json"
    write_manifest(build_manifest(fake), out)
    text = out.read_text()
    assert text == json.dumps(_expected_manifest(tmp_path), indent=2, sort_keys=True)
    assert not text.endswith("\n")
    assert text.startswith('{\n  "folds": [\n    {\n      "test": {\n        "')
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # temp file renamed away
    assert load_manifest(out) == _expected_manifest(tmp_path)


def test_write_replaces_existing(fake, tmp_path):
    out = tmp_path / "m.json"
    out.write_text("old")
    write_manifest({"folds": []}, out)
    assert out.read_text() == '{\n  "folds": []\n}'


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "not found"),
        ("{not json", "not valid JSON.*line 1"),
        ("[]", 'object with a "folds" list'),
        ('{"folds": []}', 'empty "folds"'),
        ('{"folds": [7]}', "fold 1 must be an object"),
        ('{"folds": [{"train": {}}]}', "fold 1 has no 'test'"),
        ('{"folds": [{"train": ["A"], "test": ["B"]}]}', "lists patient ids only"),
        ('{"folds": [{"train": {"A": 3}, "test": {}}]}', "patient 'A' must map to an object"),
    ],
)
def test_load_manifest_errors(tmp_path, text, match):
    path = tmp_path / "manifest.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_manifest(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ select


def test_select_task(fake, tmp_path):
    manifest = _expected_manifest(tmp_path)
    train, test = select_task(manifest, 2, "5mm", "t2w", ["SMORE", "BSPLINE"])
    assert sorted(train) == list(train) and sorted(test) == list(test)
    assert set(test) == set(manifest["folds"][1]["test"])
    assert sorted(set(train) | set(test)) == COMPLETE and not set(train) & set(test)
    pid = next(iter(test))
    assert test[pid] == {
        "HR": f"{tmp_path}/hr/{pid}/{pid}-t2w.nii.gz",
        "LR": f"{tmp_path}/lr/5mm/{pid}/{pid}-t2w.nii.gz",
        "experts": [
            f"{tmp_path}/models/SMORE/5mm/output_volumes/{pid}-t2w.nii.gz",
            f"{tmp_path}/models/BSPLINE/5mm/output_volumes/{pid}-t2w.nii.gz",
        ],
    }


@pytest.mark.parametrize(
    ("fold", "spacing", "pulse", "models", "match"),
    [
        (0, "3mm", "t1c", ["SMORE"], r"1\.\.3 .*K=3"),
        (4, "3mm", "t1c", ["SMORE"], r"1\.\.3 .*K=3.*got 4"),
        (True, "3mm", "t1c", ["SMORE"], r"1\.\.3"),
        (1, "7mm", "t1c", ["SMORE"], r"no spacing '7mm'.*available: 3mm, 5mm"),
        (1, "3mm", "flair", ["SMORE"], r"no pulse 'flair'.*available: t1c, t2w"),
        (1, "3mm", "t1c", ["SMORE", "UNIRES"], r"no model 'UNIRES'; available: BSPLINE, SMORE"),
        (1, "3mm", "t1c", [], r"non-empty list"),
        (1, "3mm", "t1c", "SMORE", r"non-empty list"),
    ],
)
def test_select_task_errors(tmp_path, fold, spacing, pulse, models, match):
    manifest = _expected_manifest(tmp_path)
    with pytest.raises(ConfigError, match=match):
        select_task(manifest, fold, spacing, pulse, models)
