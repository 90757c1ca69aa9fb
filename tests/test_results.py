"""Results people use: the model file, predict by name and in batches, NIfTI weight maps,
HR-free metrics, summarize and report (issue 12), on one small cohort trained on 3 folds."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from headless_chromium import render, require_chromium

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.core.model import FORMAT_VERSION
from pacs_numba.errors import InputError
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.manifest import build_manifest, select_task, write_manifest
from pacs_numba.store.modelfile import load_model, save_model

SHAPE = (29, 34, 27)
SPACING, PULSE = "3mm", "t1c"
MODELS = ("BSPLINE", "LINEAR", "NEAREST", "SHARPEN")


def _run(*argv) -> int:
    return cli.main([*map(str, argv)])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Three folds trained with weight volumes and blends written (hann window)."""
    root = tmp_path_factory.mktemp("results")
    cfg = make_cohort(root, patients=6, shape=SHAPE, spacings=(SPACING,), pulses=(PULSE,),
                      seed=5, kfolds=3, patch_size=8, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=2, log_to_file=False, save_weight_volumes=True,
                          save_weight_maps=True,
                          save_blends=True, mixing_window="hann")
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    cache = root / "cache"
    assert _run("train", "--config", cfg, "--cache-dir", cache, "--no-progress", "-q") == 0
    base = Path(config.pacs_sr.out_root) / "PaCS_SR" / SPACING
    manifest = json.loads(Path(config.data.out).read_text())
    return {"cfg": cfg, "config": config, "cache": cache, "base": base, "root": root,
            "out_root": Path(config.pacs_sr.out_root), "manifest": manifest,
            "mdir": base / "model_data" / "fold_1" / PULSE}


def _test_patients(run, fold=1):
    return select_task(run["manifest"], fold, SPACING, PULSE, MODELS)[1]


# --------------------------------------------------------------------------------------
# model file
# --------------------------------------------------------------------------------------
def test_model_file_describes_itself_and_round_trips(run, tmp_path, capsys):
    model = load_model(run["mdir"] / "pacs_model.npz")
    assert model.format_version == FORMAT_VERSION == 2
    assert model.model_names == MODELS and model.window == "hann"
    assert model.normalisation == "zscore"
    train = select_task(run["manifest"], 1, SPACING, PULSE, MODELS)[0]
    assert model.train_patients == tuple(train)
    hr_aff = nib.load(train[model.train_patients[0]]["HR"]).affine
    np.testing.assert_allclose(model.affine, hr_aff)
    assert model.settings["pacs_sr"]["patch_size"] == 8 and model.settings["fold"] == 1
    save_model(tmp_path / "m.npz", model)
    again = load_model(tmp_path / "m.npz")
    np.testing.assert_array_equal(again.weights, model.weights)
    np.testing.assert_array_equal(again.learned, model.learned)
    assert (again.grid, again.model_names, again.window, again.train_patients) == (
        model.grid, model.model_names, model.window, model.train_patients)
    assert _run("inspect", run["mdir"] / "pacs_model.npz") == 0
    out = capsys.readouterr().out
    assert "format version:  2" in out and "1=BSPLINE, 2=LINEAR, 3=NEAREST, 4=SHARPEN" in out
    assert "patch 8, stride 4" in out and "checksum:        verified" in out
    assert ", ".join(model.train_patients) in out


def _rewrite_member(src: Path, dst: Path, name: str, value) -> None:
    with np.load(src) as z:
        members = {k: z[k] for k in z.files}
    members[name] = value
    np.savez(dst, **members)


def test_damaged_foreign_and_newer_model_files_are_refused(run, tmp_path, capsys):
    good = run["mdir"] / "pacs_model.npz"
    with np.load(good) as z:
        w = z["weights"].copy()
    w[0, 0] += 0.25
    cases = {
        "edited.npz": ("checksum does not match", lambda p: _rewrite_member(good, p, "weights", w)),
        "newer.npz": ("format version 3", lambda p: _rewrite_member(
            good, p, "format_version", np.int64(3))),
        "foreign.npz": ("not a pacs_numba model file", lambda p: np.savez(p, a=np.ones(3))),
        "truncated.npz": ("not a readable pacs_numba model file",
                          lambda p: p.write_bytes(good.read_bytes()[:300])),
        "text.npz": ("not a readable pacs_numba model file", lambda p: p.write_text("hello")),
    }
    for name, (msg, make) in cases.items():
        path = tmp_path / name
        make(path)
        with pytest.raises(InputError, match=msg):
            load_model(path)
    assert _run("inspect", tmp_path / "edited.npz") == 2
    err = capsys.readouterr().err
    assert "ERROR" in err and "damaged" in err and "edited.npz" in err


def test_format_1_model_files_are_still_read(run, tmp_path):
    good = run["mdir"] / "pacs_model.npz"
    with np.load(good) as z:
        v1 = {k: z[k] for k in ("weights", "learned", "shape", "patch_size", "stride",
                                "model_names", "settings")}
    np.savez(tmp_path / "v1.npz", **v1, format_version=np.int64(1))
    old = load_model(tmp_path / "v1.npz")
    new = load_model(good)
    assert old.format_version == 1 and old.window == "hann"  # from the settings it holds
    np.testing.assert_array_equal(old.weights, new.weights)
    assert old.train_patients == new.train_patients and old.affine is None


# --------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------
def _named(paths):
    return [a for n, p in zip(MODELS, paths, strict=True) for a in ("--expert", f"{n}={p}")]


def test_predict_with_the_hr_as_normalisation_source_equals_the_train_time_blend(run):
    from pacs_numba.core.predict import predict_volume

    model = load_model(run["mdir"] / "pacs_model.npz")
    for pid, paths in _test_patients(run).items():
        hr = nib.load(paths["HR"]).get_fdata(dtype=np.float32)
        exp = [nib.load(p).get_fdata(dtype=np.float32) for p in paths["experts"]]
        written = nib.load(run["base"] / "output_volumes" / f"{pid}-{PULSE}.nii.gz")
        np.testing.assert_array_equal(predict_volume(exp, model, norm_source=hr),
                                      written.get_fdata(dtype=np.float32))


def test_predict_by_name_checks_names_and_ignores_order(run, tmp_path, capsys):
    pid, paths = next(iter(_test_patients(run).items()))
    model = run["mdir"] / "pacs_model.npz"
    common = ("--model", model, "--cache-dir", run["cache"], "-q")
    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    assert _run("predict", *common, *_named(paths["experts"]), "--out", a) == 0
    shuffled = _named(paths["experts"])
    shuffled = shuffled[4:] + shuffled[:4]  # NEAREST, SHARPEN, BSPLINE, LINEAR
    assert _run("predict", *common, *shuffled, "--out", b) == 0
    np.testing.assert_array_equal(nib.load(a).get_fdata(), nib.load(b).get_fdata())
    capsys.readouterr()
    e = paths["experts"]
    bad = {
        "missing ['SHARPEN']": _named(e)[:6],
        "unknown ['HR']": [*_named(e), "--expert", f"HR={paths['HR']}"],
        "'BSPLINE' is given twice": [*_named(e)[:6], "--expert", f"BSPLINE={e[3]}"],
        "expected NAME=PATH": [*_named(e)[:6], "--expert", str(e[3])],
    }
    for msg, argv in bad.items():
        out = tmp_path / "bad.nii.gz"
        assert _run("predict", *common, *argv, "--out", out) == 2, msg
        err = capsys.readouterr().err
        assert msg in err and err.count("ERROR") == 1
        assert not out.exists()
    # the bare form states the order it assumes
    assert _run("predict", "--model", model, "--cache-dir", run["cache"], "--experts", *e,
                "--out", tmp_path / "c.nii.gz") == 0
    err = capsys.readouterr().err
    assert "taking them in the model's order" in err and f"BSPLINE='{e[0]}'" in err
    # an existing output needs --force
    assert _run("predict", *common, *_named(e), "--out", a) == 2
    assert "--force" in capsys.readouterr().err
    assert _run("predict", *common, *_named(e), "--out", a, "--force") == 0


def test_predict_reads_a_published_weights_json_and_the_predict_config_section(run, tmp_path):
    pid, paths = next(iter(_test_patients(run).items()))
    common = ("--cache-dir", run["cache"], "-q")
    ref = tmp_path / "npz.nii.gz"
    assert _run("predict", "--model", run["mdir"] / "pacs_model.npz", *_named(paths["experts"]),
                "--out", ref, *common) == 0
    # the published weights.json: tile weights only; patch, stride, window and order given
    wj = tmp_path / "published_weights.json"
    shutil.copy(run["mdir"] / "weights.json", wj)
    out = tmp_path / "json.nii.gz"
    assert _run("predict", "--weights", wj, "--patch-size", 8, "--stride", 4, "--window",
                "hann", *_named(paths["experts"]), "--out", out, *common) == 0
    np.testing.assert_array_equal(nib.load(out).get_fdata(), nib.load(ref).get_fdata())
    # no patch size: one clear error
    assert _run("predict", "--weights", wj, *_named(paths["experts"]), "--out",
                tmp_path / "x.nii.gz", *common) == 2
    # the published config's predict section (keys are labels, names come from 'name')
    doc = yaml.safe_load(run["cfg"].read_text())
    order = [3, 0, 2, 1]
    doc["predict"] = {
        "pacs_sr_weights_path": str(wj),
        "experts": {f"expert{i + 1}": {"name": MODELS[k], "opinion_path": paths["experts"][k]}
                    for i, k in enumerate(order)},
        "out_root": str(tmp_path / "pred"),
    }
    cfg = tmp_path / "predict.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert _run("predict", "--config", cfg, *common) == 0
    got = nib.load(tmp_path / "pred" / "blended_prediction.nii.gz").get_fdata()
    np.testing.assert_array_equal(got, nib.load(ref).get_fdata())


def test_batch_predict_over_manifest_folder_and_csv_is_resumable(run, tmp_path, capsys, caplog):
    model = run["mdir"] / "pacs_model.npz"
    common = ("--model", model, "--cache-dir", run["cache"], "--no-progress", "-q")
    test = _test_patients(run)
    d1 = tmp_path / "manifest"
    assert _run("predict", *common, "--manifest", run["config"].data.out, "--out-dir", d1) == 0
    assert sorted(p.name for p in d1.glob("*.nii.gz")) == [f"{p}-{PULSE}.nii.gz" for p in test]
    first = {p: p.stat().st_mtime_ns for p in d1.glob("*.nii.gz")}
    capsys.readouterr()
    assert _run("predict", *common, "--manifest", run["config"].data.out, "--out-dir", d1) == 0
    assert f"0 written, {len(test)} kept" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in d1.glob("*.nii.gz")} == first
    # a folder in the published layout: every patient with all four experts
    d2 = tmp_path / "folder"
    models_root = run["root"] / "models"
    assert _run("predict", *common, "--models-root", models_root, "--spacing", SPACING,
                "--pulse", PULSE, "--workers", 2, "--out-dir", d2) == 0
    assert len(list(d2.glob("*.nii.gz"))) == 6
    for pid in test:  # same blend as the one-patient form
        np.testing.assert_array_equal(nib.load(d2 / f"{pid}-{PULSE}.nii.gz").get_fdata(),
                                      nib.load(d1 / f"{pid}-{PULSE}.nii.gz").get_fdata())
    # a CSV, columns in any order; a changed input is not silently kept
    rows = [{"pid": pid, **dict(zip(MODELS, e["experts"], strict=True))}
            for pid, e in test.items()]
    csv_path = tmp_path / "list.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["SHARPEN", "pid", "LINEAR", "BSPLINE", "NEAREST"])
        w.writeheader()
        w.writerows(rows)
    d3 = tmp_path / "csv"
    assert _run("predict", *common, "--csv", csv_path, "--out-dir", d3) == 0
    for pid in test:
        np.testing.assert_array_equal(nib.load(d3 / f"{pid}.nii.gz").get_fdata(),
                                      nib.load(d1 / f"{pid}-{PULSE}.nii.gz").get_fdata())
    rec = json.loads((d3 / "pacs_numba_predict.json").read_text())
    rec["patients"][next(iter(test))]["inputs"][0]["size"] += 1  # as if an expert changed
    (d3 / "pacs_numba_predict.json").write_text(json.dumps(rec))
    capsys.readouterr()
    assert _run("predict", *common, "--csv", csv_path, "--out-dir", d3) == 2
    assert "--force" in capsys.readouterr().err
    assert _run("predict", *common, "--csv", csv_path, "--out-dir", d3, "--force") == 0
    # a CSV with an unknown column
    bad = tmp_path / "bad.csv"
    bad.write_text("pid,BSPLINE,LINEAR,NEAREST,SHARPEN,HR\nsub-1,a,b,c,d,e\n")
    assert _run("predict", *common, "--csv", bad, "--out-dir", tmp_path / "x") == 2
    assert "unknown ['HR']" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# NIfTI weight maps and HR-free metrics
# --------------------------------------------------------------------------------------
def test_nifti_weight_maps_per_model_and_per_test_patient(run):
    from pacs_numba.core.blending import brain_mask

    mdir = run["mdir"]
    model = load_model(mdir / "pacs_model.npz")
    whole = nib.load(mdir / "weight_maps_model_weights.nii.gz")
    assert whole.shape == (*SHAPE, 4)
    np.testing.assert_allclose(whole.affine, model.affine)
    for pid, paths in _test_patients(run).items():
        hr = nib.load(paths["HR"])
        img = nib.load(mdir / f"{pid}_weight_maps_test_weights.nii.gz")
        assert img.shape == (*SHAPE, 4)
        np.testing.assert_allclose(img.affine, hr.affine)
        maps = img.get_fdata(dtype=np.float32)
        mask = brain_mask(hr.get_fdata(dtype=np.float32)).astype(bool)
        np.testing.assert_allclose(maps.sum(-1)[mask], 1.0, atol=1e-5)
        assert not maps[~mask].any()
        dom = np.asarray(nib.load(mdir / f"{pid}_weight_maps_test_dominant.nii.gz").dataobj)
        np.testing.assert_array_equal(dom[mask], np.argmax(maps[mask], -1) + 1)
        ent = nib.load(mdir / f"{pid}_weight_maps_test_entropy.nii.gz")
        assert ent.shape == SHAPE
        legend = json.loads((mdir / f"{pid}_weight_maps_test_dominant.json").read_text())
        assert [legend["labels"][str(i + 1)]["name"] for i in range(4)] == list(MODELS)
        # the published npz files are still there, as they were
        with np.load(mdir / f"{pid}_weights_test.npz") as z:
            assert z["weight_maps"].shape == (*SHAPE, 4)


def test_metrics_json_keeps_published_keys_and_adds_the_hr_free_protocol(run):
    from pacs_numba.core.metrics import volume_metrics
    from pacs_numba.core.predict import predict_volume

    mdir = run["mdir"]
    metrics = json.loads((mdir / "metrics.json").read_text())
    assert list(metrics)[:2] == ["train", "test"]
    assert list(metrics["test"]) == ["mse", "mae", "psnr", "ssim"]
    assert "HR-free" in metrics["test_hr_free"]["protocol"]
    assert set(metrics["test_experts"]) == set(MODELS)
    patients = json.loads((mdir / "patients.json").read_text())
    model = load_model(mdir / "pacs_model.npz")
    psnr_free, psnr_exp = [], []
    for pid, paths in _test_patients(run).items():
        hr = nib.load(paths["HR"]).get_fdata(dtype=np.float32)
        exp = [nib.load(p).get_fdata(dtype=np.float32) for p in paths["experts"]]
        m = volume_metrics(hr, predict_volume(exp, model))
        assert patients["test_hr_free"][pid]["psnr"] == pytest.approx(m["psnr"], abs=1e-5)
        psnr_free.append(m["psnr"])
        # BSPLINE alone, scored like the blend: one-hot tile weights through the HR's
        # normalisation and brain mask (evaluate's path, which predict_volume takes with the
        # HR as normalisation source)
        w = np.zeros_like(model.weights)
        w[:, model.model_names.index("BSPLINE")] = 1.0
        one_hot = dataclasses.replace(model, weights=w)
        e0 = volume_metrics(hr, predict_volume(exp, one_hot, norm_source=hr))
        assert patients["test_experts"][pid]["BSPLINE"]["ssim"] == pytest.approx(e0["ssim"])
        psnr_exp.append(e0["psnr"])
    assert metrics["test_hr_free"]["psnr"] == pytest.approx(np.mean(psnr_free))
    assert metrics["test_experts"]["BSPLINE"]["psnr"] == pytest.approx(np.mean(psnr_exp))


# --------------------------------------------------------------------------------------
# summarize
# --------------------------------------------------------------------------------------
def test_summarize_matches_the_per_task_metrics(run, tmp_path, capsys):
    out_root = run["out_root"]
    assert _run("summarize", out_root, "--out", tmp_path, "-q") == 0
    md = capsys.readouterr().out
    assert "| PaCS-SR (HR-free) |" in md and "Wilcoxon" in md
    with (tmp_path / "summary.csv").open() as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {*MODELS, *(f"{m} (HR-free)" for m in MODELS), "PaCS-SR",
                         "PaCS-SR (HR-free)"}
    assert {rows[m]["protocol"] for m in MODELS} == {"published"}
    assert rows["PaCS-SR (HR-free)"]["protocol"] == "hr_free"
    assert "Published protocol: HR statistics and HR brain mask" in md
    assert "HR-free protocol: statistics and mask from the experts" in md
    per: dict[str, list[float]] = {}
    free: dict[str, list[float]] = {}
    shares = {m: [] for m in MODELS}
    for fold in (1, 2, 3):
        mdir = run["base"] / "model_data" / f"fold_{fold}" / PULSE
        pj = json.loads((mdir / "patients.json").read_text())
        mj = json.loads((mdir / "metrics.json").read_text())
        vals = [v["psnr"] for v in pj["per_patient"]["test"].values()]
        assert np.mean(vals) == pytest.approx(mj["test"]["psnr"])  # summarize's input
        per.setdefault("PaCS-SR", []).extend(vals)
        for e in pj["test_experts"].values():
            for name in MODELS:
                per.setdefault(name, []).append(e[name]["psnr"])
        for m in pj["test_hr_free"].values():
            free.setdefault("PaCS-SR (HR-free)", []).append(m["psnr"])
            for name in MODELS:
                free.setdefault(name, []).append(m["experts"][name]["psnr"])
        model = load_model(mdir / "pacs_model.npz")
        dom = np.argmax(model.weights[model.learned], 1)
        for i, name in enumerate(MODELS):
            shares[name].append(np.mean(dom == i))
    for method, vals in per.items():
        assert int(rows[method]["n"]) == 6 and int(rows[method]["folds"]) == 3
        assert float(rows[method]["psnr_mean"]) == pytest.approx(np.mean(vals))
        assert float(rows[method]["psnr_std"]) == pytest.approx(np.std(vals, ddof=1))
    for name in MODELS:
        assert float(rows[name]["dominant_share"]) == pytest.approx(np.mean(shares[name]))
    best = max(MODELS, key=lambda n: np.mean(per[n]))
    assert rows["PaCS-SR"]["best_expert"] == best
    diffs = np.subtract(per["PaCS-SR"], per[best])
    assert float(rows["PaCS-SR"]["gain_psnr"]) == pytest.approx(np.mean(diffs))
    from scipy.stats import wilcoxon

    assert float(rows["PaCS-SR"]["p_psnr"]) == pytest.approx(wilcoxon(diffs).pvalue)
    # the HR-free protocol has its own best expert: each expert as it is, experts' mask
    best_free = max(MODELS, key=lambda n: np.mean(free[n]))
    assert rows["PaCS-SR (HR-free)"]["best_expert"] == best_free
    assert float(rows["PaCS-SR (HR-free)"]["gain_psnr"]) == pytest.approx(
        np.mean(np.subtract(free["PaCS-SR (HR-free)"], free[best_free])))


def test_paired_test_is_honest_about_small_and_null_samples():
    from pacs_numba.runs.summarize import paired_test

    p, note = paired_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert np.isnan(p) and "all differences are zero" in note
    p, note = paired_test([1.0, 2.0, 3.5, 4.0], [0.5, 1.0, 3.0, 3.0])
    assert p == pytest.approx(0.125) and "n=4 < 6" in note and "0.125" in note
    p, note = paired_test(np.arange(10.0) + 1, np.zeros(10))
    assert p < 0.01 and note == ""


def test_summarize_refuses_a_folder_without_tasks(tmp_path, capsys):
    assert _run("summarize", tmp_path) == 2
    assert "no trained task" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(run):
    pytest.importorskip("matplotlib")
    assert _run("report", run["mdir"], "--cache-dir", run["cache"], "-q") == 0
    return run["mdir"] / "report" / "index.html"


def test_report_writes_valid_pngs_and_an_html_page_that_names_them(run, report):
    from html.parser import HTMLParser

    import matplotlib.image as mpimg

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.tables, self.stack = [], 0, []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.images.append(dict(attrs)["src"])
            if tag == "table":
                self.tables += 1
            if tag not in ("img", "meta", "br"):
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

    page = Page()
    text = report.read_text()
    page.feed(text)
    page.close()
    assert page.stack == []
    test = _test_patients(run)
    expected = {"weights_by_region.png"} | {f"{p}_{k}.png" for p in test
                                             for k in ("slices", "weights")}
    assert set(page.images) == expected
    assert page.tables == 1 + len(test)
    for name in page.images:
        png = report.parent / name
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE
        width, height = struct.unpack(">II", data[16:24])
        img = mpimg.imread(png)
        assert img.shape[:2] == (height, width) and width > 500 and height > 200
        assert img[..., :3].std() > 0.05  # not a blank canvas
    assert "PaCS-SR (HR-free)" in text and "1=BSPLINE" in text


def test_report_without_matplotlib_says_how_to_install_it(run, tmp_path, monkeypatch, capsys):
    import sys

    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert _run("report", run["mdir"], "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err
    assert "pip install 'pacs-numba[report]'" in err
    assert not (tmp_path / "r").exists()


# What the page looks like to a reader, read from the rendered DOM after the load event.
REPORT_PROBE = """(() => ({
    title: document.title,
    h1: Array.from(document.querySelectorAll("h1"), h => h.textContent),
    h2: Array.from(document.querySelectorAll("h2"), h => h.textContent),
    tables: document.querySelectorAll("table").length,
    images: Array.from(document.images, i => ({
        src: i.getAttribute("src"), complete: i.complete,
        width: i.naturalWidth, height: i.naturalHeight})),
}))()"""


def test_report_renders_in_headless_chromium(run, report, tmp_path):
    """The report in a real browser: every image decoded, no console error, every section.

    Under CI=true a missing Chromium fails the test (.ci/run installs Debian's chromium);
    elsewhere it skips with how to install it.
    """
    chromium = require_chromium()
    page = render(chromium, report.as_uri(), REPORT_PROBE, tmp_path / "profile")
    assert page.problems == []
    dom = page.value
    test = _test_patients(run)
    assert dom["title"].startswith("PaCS-SR report: ")
    assert dom["h1"] == [dom["title"]]
    # one section per test patient, summarize's figures when they exist, the model last
    across = [h for h in dom["h2"] if h.startswith("Across folds")]
    assert dom["h2"] == [*(f"Test patient {p}" for p in test), *across, "Model"]
    assert dom["tables"] == 1 + len(test)
    expected = {"weights_by_region.png"} | {f"{p}_{k}.png" for p in test
                                             for k in ("slices", "weights")}
    assert {img["src"] for img in dom["images"]} == expected
    for img in dom["images"]:  # decoded by the browser, at the size the PNG says
        data = (report.parent / img["src"]).read_bytes()
        assert img["complete"] and img["width"] > 0, img
        assert (img["width"], img["height"]) == struct.unpack(">II", data[16:24]), img


def test_report_browser_check_sees_a_broken_image_and_a_script_error(report, tmp_path):
    """The check above can fail: a missing image and a throwing script are both reported."""
    chromium = require_chromium()
    bad = tmp_path / "bad"
    shutil.copytree(report.parent, bad)
    (bad / "weights_by_region.png").unlink()
    page = (bad / "index.html").read_text().replace(
        "</body>", "<script>console.error('boom'); undefinedCall();</script></body>")
    (bad / "index.html").write_text(page)
    got = render(chromium, (bad / "index.html").as_uri(), REPORT_PROBE, tmp_path / "profile")
    assert any("console.error: boom" in p for p in got.problems), got.problems
    assert any("undefinedCall" in p for p in got.problems), got.problems
    assert any("weights_by_region.png" in p for p in got.problems), got.problems
    broken = [i for i in got.value["images"] if i["width"] == 0]
    assert [i["src"] for i in broken] == ["weights_by_region.png"]


def test_summarize_reads_published_outputs_as_fold_means(run, tmp_path):
    """The published tool writes no patients.json or model file: one unit per fold."""
    from pacs_numba.runs.summarize import summarize

    copy = tmp_path / "published"
    shutil.copytree(run["base"] / "model_data", copy / "PaCS_SR" / SPACING / "model_data",
                    ignore=shutil.ignore_patterns("*.nii.gz", "*.npz", "patients.json"))
    means = []
    for fold in (1, 2, 3):
        mj = copy / "PaCS_SR" / SPACING / "model_data" / f"fold_{fold}" / PULSE / "metrics.json"
        doc = json.loads(mj.read_text())
        mj.write_text(json.dumps({"train": doc["train"], "test": doc["test"]}))
        means.append(doc["test"]["psnr"])
    rows, md, _ = summarize(copy)
    assert [r["method"] for r in rows] == ["PaCS-SR"]
    (row,) = rows
    assert row["unit"] == "fold mean" and row["n"] == 3
    assert row["psnr_mean"] == pytest.approx(np.mean(means))
    assert "fold means" in md


def test_report_from_the_config_for_chosen_patients(run, tmp_path):
    pytest.importorskip("matplotlib")
    pid = next(iter(_test_patients(run)))
    out = tmp_path / "rep"
    assert _run("report", run["mdir"], "--config", run["cfg"], "--patients", pid, "--out", out,
                "--cache-dir", run["cache"], "-q") == 0
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        [f"{pid}_slices.png", f"{pid}_weights.png", "weights_by_region.png"])
    assert _run("report", run["mdir"], "--patients", "nobody", "--out", out, "-q") == 2
