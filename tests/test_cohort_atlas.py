"""Registration on generated data (issue 20, item 4): ``make-cohort --atlas`` and
``demo --atlas`` write the population mean HR and its brain mask in the registration
section's file names, and registration logs its start, n/N and an estimate."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.core.blending import brain_mask
from pacs_numba.errors import ConfigError
from pacs_numba.store.cohort import make_cohort


def test_make_cohort_atlas_is_the_mean_hr_and_its_mask_under_the_config_names(tmp_path):
    cfg = make_cohort(tmp_path, patients=3, shape=(16, 18, 14), spacings=("3mm",),
                      pulses=("t1c", "t2w", "t1n"), kfolds=2, atlas=True)
    reg = load_config(cfg).registration
    folder = reg.atlas
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [reg.t1, reg.t2, reg.brain_mask])  # t1n shares t1c's template: made from t1c
    for name, pulse in ((reg.t1, "t1c"), (reg.t2, "t2w")):
        hrs = [nib.load(tmp_path / "hr" / pid / f"{pid}-{pulse}.nii.gz").get_fdata(dtype=np.float32)
               for pid in ("sub-001", "sub-002", "sub-003")]
        img = nib.load(folder / name)
        np.testing.assert_allclose(img.get_fdata(dtype=np.float32), np.mean(hrs, axis=0), rtol=1e-5,
                                   atol=1e-4)
        assert np.allclose(img.affine, nib.load(tmp_path / "hr" / "sub-001" /
                                                f"sub-001-{pulse}.nii.gz").affine)
    mean_t1 = nib.load(folder / reg.t1).get_fdata(dtype=np.float32)
    mask = np.asarray(nib.load(folder / reg.brain_mask).dataobj)
    np.testing.assert_array_equal(mask, brain_mask(mean_t1))
    assert 0 < mask.sum() < mask.size
    # without --atlas no folder is made
    cfg2 = make_cohort(tmp_path / "plain", patients=2, shape=(16, 18, 14), spacings=("3mm",),
                       pulses=("t1c",), kfolds=2)
    assert not load_config(cfg2).registration.atlas.exists()


def test_an_atlas_for_a_pulse_without_template_is_refused_before_writing(tmp_path):
    with pytest.raises(ConfigError, match="pulse 'dwi' has no atlas template"):
        make_cohort(tmp_path, patients=2, shape=(16, 18, 14), spacings=("3mm",),
                    pulses=("dwi",), kfolds=2, atlas=True)
    assert not (tmp_path / "hr").exists()


def test_demo_with_an_atlas_registers_and_logs_progress(tmp_path, capsys, caplog):
    pytest.importorskip("ants")
    argv = ["demo", "--out", str(tmp_path / "demo"), "--patients", "4", "--shape", "40", "44",
            "36", "--no-progress", "--atlas"]
    with caplog.at_level(logging.INFO, logger="pacs_numba.store.registration"):
        assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "registered to the atlas" in out and "PaCS-SR" in out
    lines = [r.getMessage() for r in caplog.records]
    start = [m for m in lines if m.startswith("registering t1c: 4 of 4 patient(s) to T1_brain")]
    assert start, lines
    progress = [m for m in lines if m.startswith("registering t1c: ") and "done in" in m]
    assert [m.split()[2] for m in progress] == ["1/4", "2/4", "3/4", "4/4"]
    assert "s left" in progress[0] and "s left" not in progress[-1]
    assert (tmp_path / "demo" / "cohort" / "atlas" / "brain_mask.nii").is_file()
