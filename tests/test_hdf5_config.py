"""The HDF5 form of the config (the published tool's current version): schema, keys, notes."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from pacs_numba.config import config_to_dict, dump_config, load_config, unused_settings
from pacs_numba.errors import ConfigError

# A config as a user of the published tool's current version writes it (the context file).
CURRENT_STYLE = """\
data:
  source-h5: /data/sr/source_data.h5
  experts-dir: /data/sr/experts
  spacings: [3mm, 5mm]
  pulses: [t1c, t2w]
  models: [BSPLINE, ECLARE]
  kfolds: 5
  seed: 42
  out: /data/sr/kfolds_manifest.json

registration:
  atlas: /dev/null
  t1: T1_brain.nii
  t2: T2_brain.nii
  epi: EPI_brain.nii
  pd: PD_brain.nii
  brain_mask: brain_mask.nii

pacs_sr:
  experiment_name: "PaCS_SR"
  patch_size: 32
  stride: 16
  simplex: true
  lambda_ridge: 1.0e-4
  laplacian_tau: 0.05
  lambda_edge: 0.25
  edge_power: 2.0
  normalize: "zscore"
  use_registration: false
  num_workers: 6
  device: "cpu"
  compute_kid: false
  ssim_axis: "axial"
  save_weight_volumes: true
  save_blends: true
  log_level: "WARNING"
  out_root: /data/sr/results

synthseg:
  enabled: true
pipeline:
  steps: [train, evaluate]
analysis: {}
visualizations: {dpi: 200}
"""


@pytest.fixture
def doc() -> dict:
    return yaml.safe_load(CURRENT_STYLE)


def _write(tmp_path: Path, doc: dict) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def test_hdf5_form_loads_with_schema_and_defaults(tmp_path, doc, caplog):
    with caplog.at_level(logging.INFO, logger="pacs_numba.config"):
        cfg = load_config(_write(tmp_path, doc))
    d = cfg.data
    assert d.schema == "hdf5"
    assert (d.source_h5, d.experts_dir) == (Path("/data/sr/source_data.h5"),
                                            Path("/data/sr/experts"))
    assert (d.models_root, d.hr_root, d.lr_root) == (None, None, None)
    assert cfg.pacs_sr.compute_lpips is False and cfg.pacs_sr.shape_policy == "harmonise"
    assert cfg.pacs_sr.log_level == "WARNING"
    assert cfg.ignored_sections == ("synthseg", "pipeline", "analysis", "visualizations")
    text = caplog.text
    for name in ("synthseg", "pipeline", "analysis", "visualizations", "registration"):
        assert f"section '{name}' not used" in text
    for key in ("parallel_backend", "device", "log_region_freq", "num_workers"):
        assert text.count(f"pacs_sr.{key}=") == 1


def test_nifti_default_shape_policy(tmp_path, doc):
    data = doc["data"]
    del data["source-h5"], data["experts-dir"]
    data.update({"models-root": "m", "hr-root": "h", "lr-root": "l"})
    cfg = load_config(_write(tmp_path, doc))
    assert cfg.data.schema == "nifti" and cfg.pacs_sr.shape_policy == "skip"


def test_both_forms_refused(tmp_path, doc):
    doc["data"]["hr-root"] = "/data/hr"
    with pytest.raises(ConfigError, match=r"data has keys of both forms \(hr-root, source-h5, "
                       r"experts-dir\); expected exactly one: the NIfTI form \(models-root, "
                       r"hr-root, lr-root\) or the HDF5 form \(source-h5, experts-dir\)"):
        load_config(_write(tmp_path, doc))


def test_neither_form_refused(tmp_path, doc):
    del doc["data"]["source-h5"], doc["data"]["experts-dir"]
    with pytest.raises(ConfigError, match=r"data names no volumes; expected the NIfTI form "
                       r"\(models-root, hr-root, lr-root\) or the HDF5 form"):
        load_config(_write(tmp_path, doc))


def test_half_hdf5_form_names_missing_key(tmp_path, doc):
    del doc["data"]["experts-dir"]
    with pytest.raises(ConfigError, match=r"data\.experts-dir is missing"):
        load_config(_write(tmp_path, doc))


def test_bad_shape_policy(tmp_path, doc):
    doc["pacs_sr"]["shape_policy"] = "crop"
    with pytest.raises(ConfigError, match=r"pacs_sr\.shape_policy must be one of skip, "
                       r"harmonise; got 'crop'"):
        load_config(_write(tmp_path, doc))


def test_lpips_kid_true_named_once(tmp_path, doc):
    doc["pacs_sr"].update(compute_lpips=True, compute_kid=True)
    cfg = load_config(_write(tmp_path, doc))
    lines = [x for x in unused_settings(cfg) if "pretrained network weights" in x]
    assert [x.split()[0] for x in lines] == ["pacs_sr.compute_lpips", "pacs_sr.compute_kid"]


def test_round_trip_hdf5_form(tmp_path, doc):
    cfg = load_config(_write(tmp_path, doc))
    data = config_to_dict(cfg)["data"]
    assert "source-h5" in data and "models-root" not in data and "schema" not in data
    out = tmp_path / "again.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again.data == cfg.data and again.pacs_sr == cfg.pacs_sr


def test_ssim_axis_z_of_the_current_release_reads_as_axial(tmp_path, doc, caplog):
    # the current release does not validate ssim_axis and its configs say "z" (axial); the
    # 2025 release's NIfTI form still refuses an unknown name (test_config.test_enum_values)
    doc["pacs_sr"]["ssim_axis"] = "z"
    with pytest.warns(UserWarning, match=r"pacs_sr\.ssim_axis='z' is not one of axial, "
                      r"coronal, sagittal; read as 'axial'") as rec:
        cfg = load_config(_write(tmp_path, doc))
    assert cfg.pacs_sr.ssim_axis == "axial"
    assert len([w for w in rec if "ssim_axis" in str(w.message)]) == 1  # named once
