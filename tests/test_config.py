"""The YAML config (algorithm A1): published-style files load; every rule has a message test."""

from __future__ import annotations

import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import yaml

from pacs_numba.config import (
    DataConfig,
    FullConfig,
    PacsConfig,
    RegistrationConfig,
    config_to_dict,
    dump_config,
    load_config,
)
from pacs_numba.errors import ConfigError
from pacs_numba.store.cohort import make_cohort

# A config in the style users of the published tool have: every section, comments,
# quoted strings, an exponent-only float, and the sections we do not use.
PUBLISHED_STYLE = """\
data:
  models-root: /data/sr/models
  hr-root: /data/sr/high_resolution
  lr-root: /data/sr/low_res
  spacings: [3mm, 5mm, 7mm]
  pulses: [t1c, t1n, t2w, t2f]
  models: [BSPLINE, ECLARE, SMORE, UNIRES]
  kfolds: 5
  seed: 42
  out: /data/sr/kfolds_manifest.json

registration:
  atlas: /data/atlas/templates
  t1: T1_brain.nii
  t2: T2_brain.nii
  epi: EPI_brain.nii
  pd: PD_brain.nii
  brain_mask: brain_mask.nii   # largest component of the thresholded atlas T1

pacs_sr:
  experiment_name: "PaCS_SR"
  disable_tqdm: false
  patch_size: 32          # tile edge
  stride: 16              # half overlap
  mixing_window: "hann"
  simplex: true
  lambda_ridge: 1e-4      # YAML 1.1 would read this as a string
  laplacian_tau: 0.05
  lambda_edge: 0.25
  edge_power: 2.0
  lambda_grad: 0.2
  grad_operator: "sobel"
  normalize: "zscore"
  use_registration: true
  num_workers: 6
  parallel_backend: "loky"
  device: "cpu"
  compute_lpips: false
  compute_kid: false
  ssim_axis: "axial"
  evaluate_train: true
  save_weight_volumes: true
  save_blends: true
  log_level: "INFO"
  log_to_file: true
  log_region_freq: 10
  out_root: /data/sr/results/PACS_SR

visualizations:
  results_root: /data/sr/results/models/PaCS_SR
  out_root: /data/sr/results/figures
  dpi: 200

analysis:
  data:
    gt_dir: /data/sr/high_resolution
    pred_dirs: {BSPLINE: /data/sr/models/BSPLINE}
  runtime: {seed: 1337}

predict:
  pacs_sr_weights_path: /path/to/weights.npy
  experts:
    expert1: {name: BSPLINE, opinion_path: /path/to/bspline}
  out_root: /path/to/predictions
"""

OPTIONAL_DEFAULTS = {
    "lambda_grad": 0.0,
    "grad_operator": "sobel",
    "mixing_window": "flat",
    "use_registration": False,
    "parallel_backend": "loky",
    "evaluate_train": True,
    "log_level": "INFO",
    "log_to_file": True,
    "log_region_freq": 10,
    "disable_tqdm": False,
}


@pytest.fixture
def doc() -> dict:
    return yaml.safe_load(PUBLISHED_STYLE.replace("1e-4", "1.0e-4"))


def _write(tmp_path: Path, content: dict | str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
    path.write_text(text)
    return path


def _error(path: Path, *fragments: str) -> str:
    """Load ``path``, expect a ConfigError naming the file, and check its fragments."""
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg, f"message is not one line: {msg!r}"
    assert str(path) in msg, f"message does not name the file: {msg!r}"
    for frag in fragments:
        assert re.search(frag, msg), f"{frag!r} not in {msg!r}"
    return msg


# ------------------------------------------------------------------ loading


def test_published_style_config_loads(tmp_path):
    path = _write(tmp_path, PUBLISHED_STYLE)
    cfg = load_config(path)  # filterwarnings=error: no warning may be raised
    assert isinstance(cfg, FullConfig) and cfg.path == path
    assert cfg.data == DataConfig(
        models_root=Path("/data/sr/models"),
        hr_root=Path("/data/sr/high_resolution"),
        lr_root=Path("/data/sr/low_res"),
        spacings=("3mm", "5mm", "7mm"),
        pulses=("t1c", "t1n", "t2w", "t2f"),
        models=("BSPLINE", "ECLARE", "SMORE", "UNIRES"),
        kfolds=5,
        seed=42,
        out=Path("/data/sr/kfolds_manifest.json"),
    )
    assert cfg.registration == RegistrationConfig(
        atlas=Path("/data/atlas/templates"),
        t1="T1_brain.nii",
        t2="T2_brain.nii",
        epi="EPI_brain.nii",
        pd="PD_brain.nii",
        brain_mask="brain_mask.nii",
    )
    p = cfg.pacs_sr
    assert (p.patch_size, p.stride, p.mixing_window, p.simplex) == (32, 16, "hann", True)
    assert p.lambda_ridge == 1e-4 and isinstance(p.lambda_ridge, float)
    assert (p.lambda_grad, p.grad_operator, p.use_registration) == (0.2, "sobel", True)
    assert (p.device, p.compute_lpips, p.compute_kid, p.parallel_backend) == (
        "cpu",
        False,
        False,
        "loky",
    )
    assert p.out_root == Path("/data/sr/results/PACS_SR")
    assert cfg.predict["experts"]["expert1"]["name"] == "BSPLINE"
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.stride = 8  # type: ignore[misc]


def test_generated_config_loads(tmp_path):
    path = make_cohort(
        tmp_path / "cohort",
        patients=2,
        kfolds=2,
        shape=(12, 12, 10),
        spacings=("2mm",),
        pulses=("t1c",),
        models=("BSPLINE", "LINEAR"),
    )
    cfg = load_config(path)
    assert cfg.data.hr_root.is_absolute() and cfg.data.hr_root.is_dir()
    assert cfg.pacs_sr.mixing_window == "hann" and cfg.pacs_sr.use_registration is False
    assert cfg.registration is not None


def test_optional_keys_take_spec_defaults(tmp_path, doc):
    for key in OPTIONAL_DEFAULTS:
        del doc["pacs_sr"][key]
    del doc["registration"]  # not needed once use_registration defaults to false
    cfg = load_config(_write(tmp_path, doc))
    assert cfg.registration is None
    for key, value in OPTIONAL_DEFAULTS.items():
        assert getattr(cfg.pacs_sr, key) == value, key
    assert cfg.pacs_sr.compute_kid is False


def test_int_accepted_where_float_expected(tmp_path, doc):
    doc["pacs_sr"].update(lambda_ridge=0, edge_power=2, laplacian_tau=1)
    p = load_config(_write(tmp_path, doc)).pacs_sr
    assert (p.lambda_ridge, p.edge_power, p.laplacian_tau) == (0.0, 2.0, 1.0)
    assert all(isinstance(v, float) for v in (p.lambda_ridge, p.edge_power, p.laplacian_tau))


def test_relative_paths_kept_as_written(tmp_path, doc):
    doc["data"]["hr-root"] = "data/hr"
    doc["pacs_sr"]["out_root"] = "./results"
    cfg = load_config(_write(tmp_path, doc))
    assert cfg.data.hr_root == Path("data/hr") and not cfg.data.hr_root.is_absolute()
    assert cfg.pacs_sr.out_root == Path("results")


def test_case_of_window_operator_and_level_is_normalised(tmp_path, doc):
    doc["pacs_sr"].update(mixing_window="Hann", grad_operator="SCHARR", log_level="debug")
    p = load_config(_write(tmp_path, doc)).pacs_sr
    assert (p.mixing_window, p.grad_operator, p.log_level) == ("hann", "scharr", "DEBUG")


def test_round_trip_through_dump_config(tmp_path):
    cfg = load_config(_write(tmp_path, PUBLISHED_STYLE))
    d = config_to_dict(cfg)
    assert list(d) == ["data", "registration", "pacs_sr", "predict"]
    assert {"models-root", "hr-root", "lr-root"} <= set(d["data"])
    assert d["data"]["spacings"] == ["3mm", "5mm", "7mm"]
    assert set(d["pacs_sr"]) == {f.name for f in dataclasses.fields(PacsConfig)}
    assert d["pacs_sr"]["out_root"] == "/data/sr/results/PACS_SR"
    out = tmp_path / "sub" / "used.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert dataclasses.replace(again, path=cfg.path) == cfg
    assert [p.name for p in out.parent.iterdir()] == ["used.yaml"]  # no temp file left


# --------------------------------------------------------------- file errors


def test_missing_file(tmp_path):
    _error(tmp_path / "nope.yaml", "not found")


def test_yaml_syntax_error(tmp_path):
    path = _write(tmp_path, "data:\n  seed: [1, 2\npacs_sr: {}\n")
    _error(path, "invalid YAML", "line")


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file(tmp_path, text):
    _error(_write(tmp_path, text), "empty")


def test_top_level_not_a_mapping(tmp_path):
    _error(_write(tmp_path, "- data\n- pacs_sr\n"), "mapping")


# ------------------------------------------------------------ section errors


@pytest.mark.parametrize("section", ["data", "pacs_sr"])
def test_missing_required_section(tmp_path, doc, section):
    del doc[section]
    _error(_write(tmp_path, doc), f"section '{section}' is missing")


def test_registration_required_only_with_registration(tmp_path, doc):
    del doc["registration"]
    _error(_write(tmp_path, doc), "section 'registration' is missing", "use_registration")
    doc["pacs_sr"]["use_registration"] = False
    assert load_config(_write(tmp_path, doc)).registration is None


def test_section_must_be_a_mapping(tmp_path, doc):
    doc["pacs_sr"] = ["patch_size", 32]
    _error(_write(tmp_path, doc), "section 'pacs_sr' must be a mapping")


# ----------------------------------------------------------------- key errors


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("pacs_sr", "patch_size"),
        ("pacs_sr", "stride"),
        ("pacs_sr", "simplex"),
        ("pacs_sr", "lambda_ridge"),
        ("pacs_sr", "device"),
        ("pacs_sr", "out_root"),
        ("data", "hr-root"),
        ("data", "kfolds"),
        ("data", "models"),
        ("registration", "brain_mask"),
    ],
)
def test_missing_required_key(tmp_path, doc, section, key):
    del doc[section][key]
    _error(_write(tmp_path, doc), rf"{section}\.{key} is missing")


def test_missing_hyphenated_key_hints_at_spelling(tmp_path, doc):
    doc["data"]["models_root"] = doc["data"].pop("models-root")
    msg = _error(_write(tmp_path, doc), r"data\.models-root is missing")
    assert "found 'models_root'" in msg


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("simplex", "yes", "true or false"),
        ("simplex", 1, "true or false"),
        ("patch_size", 32.0, "an integer"),
        ("patch_size", "32", "an integer"),
        ("patch_size", True, "an integer"),
        ("num_workers", 2.5, "a non-zero integer"),
        ("lambda_ridge", True, "a number"),
        ("lambda_ridge", "small", "a number"),
        ("edge_power", None, "a number"),
        ("experiment_name", 12, "a non-empty string"),
        ("out_root", 5, "a path"),
        ("mixing_window", 1, "one of flat, hann"),
    ],
)
def test_ill_typed_key(tmp_path, doc, key, value, expected):
    doc["pacs_sr"][key] = value
    _error(_write(tmp_path, doc), rf"pacs_sr\.{key} must be {re.escape(expected)}", "got")


def test_ill_typed_data_keys(tmp_path, doc):
    doc["data"]["seed"] = "42"
    _error(_write(tmp_path, doc), r"data\.seed must be an integer")
    doc["data"]["seed"] = 42
    doc["data"]["spacings"] = "3mm"
    _error(_write(tmp_path, doc), r"data\.spacings must be a non-empty list")
    doc["data"]["spacings"] = ["3mm", {"a": 1}]
    _error(_write(tmp_path, doc), r"data\.spacings .*not a name")


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("mixing_window", "gauss", "flat, hann"),
        ("grad_operator", "roberts", "sobel, prewitt, scharr"),
        ("normalize", "minmax", "zscore"),
        ("ssim_axis", "transverse", "axial, coronal, sagittal"),
        ("log_level", "VERBOSE", "DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("parallel_backend", "dask", "loky, threading, multiprocessing, sequential"),
    ],
)
def test_enum_values(tmp_path, doc, key, value, allowed):
    doc["pacs_sr"][key] = value
    _error(_write(tmp_path, doc), rf"pacs_sr\.{key} must be one of {allowed}; got '{value}'")


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("pacs_sr", "patch_size", 0, r"an integer in \[1, 4096\]; got 0"),
        ("pacs_sr", "stride", 0, r"in \[1, patch_size=32\]"),
        ("pacs_sr", "stride", 33, r"in \[1, patch_size=32\]; got 33"),
        ("pacs_sr", "lambda_ridge", -1e-6, r">= 0"),
        ("pacs_sr", "lambda_edge", -0.1, r">= 0"),
        ("pacs_sr", "lambda_grad", -1, r">= 0"),
        ("pacs_sr", "edge_power", 0, r"> 0"),
        ("pacs_sr", "laplacian_tau", 1.5, r"in \[0, 1\]"),
        ("pacs_sr", "laplacian_tau", -0.1, r"in \[0, 1\]"),
        ("pacs_sr", "num_workers", 0,
         r"a non-zero integer in \[-65536, 65536\] \(negative as in joblib: -1 = all CPUs"),
        ("pacs_sr", "patch_size", 1e30, r"an integer in \[1, 4096\]; got 1e\+30 \(number\)"),
        ("pacs_sr", "patch_size", 10**30,
         r"an integer in \[1, 4096\]; got 1000000000000000000000000000000$"),
        ("pacs_sr", "stride", 2**70, r"in \[1, patch_size=32\]; got 1180591620717411303424"),
        ("pacs_sr", "log_region_freq", 0, r"in \[1, 2147483647\]"),
        ("pacs_sr", "lambda_ridge", float("nan"), r">= 0"),
        ("data", "kfolds", 1, r"in \[2, 100000\]"),
    ],
)
def test_ranges(tmp_path, doc, section, key, value, expected):
    doc[section][key] = value
    _error(_write(tmp_path, doc), rf"{section}\.{key} must be .*{expected}")


@pytest.mark.parametrize("n", [-1, -2, 3])
def test_num_workers_negative_follows_joblib(tmp_path, doc, n):
    doc["pacs_sr"]["num_workers"] = n
    assert load_config(_write(tmp_path, doc)).pacs_sr.num_workers == n


def test_stride_equal_to_patch_size_is_allowed(tmp_path, doc):
    doc["pacs_sr"]["stride"] = 32
    assert load_config(_write(tmp_path, doc)).pacs_sr.stride == 32


@pytest.mark.parametrize("key", ["spacings", "pulses", "models"])
def test_empty_lists(tmp_path, doc, key):
    doc["data"][key] = []
    _error(_write(tmp_path, doc), rf"data\.{key} is an empty list")


def test_duplicate_names(tmp_path, doc):
    doc["data"]["models"] = ["BSPLINE", "SMORE", "BSPLINE"]
    _error(_write(tmp_path, doc), r"data\.models lists BSPLINE more than once")


# ------------------------------------------------------------------ warnings


def test_unknown_key_warns_with_key_and_file(tmp_path, doc):
    doc["pacs_sr"]["strid"] = 8
    path = _write(tmp_path, doc)
    with pytest.warns(
        UserWarning, match=r"unknown key pacs_sr\.strid.*did you mean 'stride'"
    ) as rec:
        cfg = load_config(path)
    assert str(path) in str(rec[0].message)
    assert rec[0].filename == __file__  # stacklevel points at the caller
    assert cfg.pacs_sr.stride == 16


def test_unknown_keys_in_every_known_section_warn(tmp_path, doc):
    doc["data"]["extra"] = 1
    doc["registration"]["t3"] = "x.nii"
    with pytest.warns(UserWarning) as rec:
        load_config(_write(tmp_path, doc))
    text = " ".join(str(r.message) for r in rec)
    assert "data.extra" in text and "registration.t3" in text


def test_unknown_top_level_section_warns_but_published_ones_do_not(tmp_path, doc):
    doc["experiments"] = {"a": 1}
    with pytest.warns(UserWarning, match="unknown section 'experiments'") as rec:
        load_config(_write(tmp_path, doc))
    assert len(rec) == 1  # visualizations and analysis stay silent


def test_known_but_unused_keys_do_not_warn(tmp_path, doc):
    doc["pacs_sr"].update(compute_kid=True, device="cuda", compute_lpips=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = load_config(_write(tmp_path, doc)).pacs_sr
    assert (p.compute_kid, p.device, p.compute_lpips) == (True, "cuda", True)
