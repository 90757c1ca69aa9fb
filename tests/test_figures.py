"""Results people can show (issue 20) and escaped outputs (issue 16): plane names from the
image's orientation, one definition of the best expert and the gain, summarize's figures,
distinct patients, and every string escaped in HTML and Markdown.

The tasks here are written by hand (a model file, a run record, metrics), so no training runs.
"""

from __future__ import annotations

import json
import struct
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, io_orientation

from pacs_numba import cli
from pacs_numba.core.model import StackingModel
from pacs_numba.core.orientation import axis_direction, display_slice, views
from pacs_numba.core.scoring import PROTOCOL_NOTE, gain_over_best
from pacs_numba.core.tiling import TileGrid
from pacs_numba.store.layout import RECORD_FILE, TaskLayout
from pacs_numba.store.modelfile import save_model

EVIL_PID = 'x" onerror="alert(1)'
EVIL_EXPERT = "A|B*<b>_`$\\frac$"  # bad mathtext too

# Array axis 0 runs inferior -> superior, axis 1 anterior -> posterior, axis 2 left -> right.
PERMUTED = np.array([[0.0, 0.0, 1.0, -10.0],
                     [0.0, -1.0, 0.0, 20.0],
                     [3.0, 0.0, 0.0, -30.0],
                     [0.0, 0.0, 0.0, 1.0]])


# --------------------------------------------------------------------------------------
# orientation
# --------------------------------------------------------------------------------------
def _reference_slice(vol, affine, plane, index_canonical):
    """The RAS-canonical volume (nibabel), sliced and laid out row = up, column = right."""
    canon = apply_orientation(vol, io_orientation(affine))  # axes x (R), y (A), z (S)
    if plane == "axial":
        return canon[:, :, index_canonical].T
    if plane == "coronal":
        return canon[:, index_canonical, :].T
    return canon[index_canonical, :, :].T


@pytest.mark.parametrize("affine", [np.diag([1.0, 1.0, 3.0, 1.0]), PERMUTED,
                                    np.diag([-1.0, 1.0, 1.0, 1.0])])
def test_planes_come_from_the_affine_not_the_array_axes(affine):
    rng = np.random.default_rng(0)
    vol = rng.random((7, 9, 5)).astype(np.float32)
    vs = {v.plane: v for v in views(affine, vol.shape)}
    ornt = io_orientation(affine)
    for plane, world in (("sagittal", 0), ("coronal", 1), ("axial", 2)):
        v = vs[plane]
        assert int(ornt[v.axis, 0]) == world
        img, aspect, _ = display_slice(vol, affine, v)
        flip = ornt[v.axis, 1] < 0
        idx = vol.shape[v.axis] - 1 - v.index if flip else v.index
        np.testing.assert_array_equal(img, _reference_slice(vol, affine, plane, idx))
        assert aspect > 0
    if affine is PERMUTED:
        assert vs["axial"].axis == 0 and vs["sagittal"].axis == 2
        assert vs["axial"].codes == "SPR"
        assert axis_direction(affine, 1) == "anterior → posterior"
        # the slice's world position: voxel centre index 3 along axis 0 -> z = 3 * 3 - 30
        assert vs["axial"].mm == pytest.approx(3 * 3.0 - 30.0)
        assert vs["axial"].caption == "axial: array axis 0, slice 3 (z = -21.0 mm)"
    if affine[2, 2] == 3.0:  # thick slices along array axis 2, RAS: that plane is axial
        assert vs["axial"].axis == 2
        _, aspect, ends = display_slice(vol, affine, vs["coronal"])
        assert aspect == pytest.approx(3.0) and ends == ("L", "R", "I", "S")


# --------------------------------------------------------------------------------------
# one definition of the best expert and the gain
# --------------------------------------------------------------------------------------
def test_gain_is_over_each_protocols_own_best_expert_on_common_patients():
    stacked = {"p1": {"psnr": 30.0, "ssim": 0.9}, "p2": {"psnr": 32.0, "ssim": 0.8},
               "p3": {"psnr": 50.0, "ssim": 1.0}}
    experts = {"A": {"p1": {"psnr": 29.0, "ssim": 0.8}, "p2": {"psnr": 31.0, "ssim": 0.7}},
               "B": {"p1": {"psnr": 29.5, "ssim": 0.85}, "p2": {"psnr": 31.0, "ssim": 0.7},
                     "p3": {"psnr": 1.0, "ssim": 0.0}}}
    g = gain_over_best("hr_free", stacked, experts)
    # p3 lacks A: left out of every mean; B's mean over p1, p2 is the higher
    assert g.units == ("p1", "p2") and g.best == "B"
    assert g.psnr == pytest.approx(np.mean([0.5, 1.0]))
    assert g.ssim == pytest.approx(np.mean([0.05, 0.1]))
    assert "HR-free protocol" in g.words and "B" in g.describe()
    with pytest.raises(ValueError, match="protocol 'other'"):
        gain_over_best("other", stacked, experts)


def test_demo_and_train_table_name_each_protocol_and_its_own_best():
    from pacs_numba.runs.demo import metrics_table

    alone = {"A": {"psnr": 30.0, "ssim": 0.8}, "B": {"psnr": 31.0, "ssim": 0.85}}
    hr_free = {"psnr": 31.5, "ssim": 0.86, "experts": {"A": {"psnr": 31.2, "ssim": 0.82},
                                                        "B": {"psnr": 30.9, "ssim": 0.8}}}
    text = "\n".join(metrics_table(alone, {"psnr": 31.2, "ssim": 0.86}, 3, hr_free))
    assert "published protocol: HR statistics and HR brain mask" in text
    assert "HR-free protocol: statistics and mask from the experts" in text
    assert "(B, highest mean PSNR): +0.200 dB" in text
    assert "(A, highest mean PSNR): +0.300 dB" in text
    assert "never across" in text  # the note on what compares across protocols


# --------------------------------------------------------------------------------------
# a hand-made task: model file, run record, volumes with a permuted affine
# --------------------------------------------------------------------------------------
SHAPE = (12, 10, 8)


def _phantom(rng, shape):
    i, j, k = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    head = ((i**2 + j**2 + k**2) < 0.8).astype(np.float32)
    return (head * (100 + 20 * i) + rng.normal(0, 1, shape) * head).astype(np.float32)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("figs")
    rng = np.random.default_rng(3)
    lay = TaskLayout(root / "out", "exp", 1, "3mm", "t1c")
    lay.model_dir.mkdir(parents=True)
    names = ("BSPLINE", EVIL_EXPERT)
    patients = {}
    for pid in ("sub-01", EVIL_PID):
        hr = _phantom(rng, SHAPE)
        files = []
        for tag, vol in (("HR", hr), *((n, hr + rng.normal(0, 3, SHAPE).astype(np.float32))
                                       for n in ("e0", "e1"))):
            f = root / "vols" / f"{pid}-{tag}.nii.gz"
            f.parent.mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(vol, PERMUTED), f)
            files.append({"path": str(f)})
        patients[f"test/{pid}"] = {"inputs": files}
    grid = TileGrid(SHAPE, 4, 4)
    w = np.tile(np.array([[0.7, 0.3]], np.float32), (grid.n_tiles, 1))
    model = StackingModel(w, np.ones(grid.n_tiles, bool), grid, names,
                          settings={"fold": 1, "spacing": "3mm", "pulse": "t1c"},
                          window="flat", affine=PERMUTED)
    save_model(lay.model_file, model)
    (lay.model_dir / RECORD_FILE).write_text(json.dumps({"patients": patients}))
    return {"root": root, "lay": lay, "cache": root / "cache"}


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.attrs = [], []

    def handle_starttag(self, tag, attrs):
        self.attrs += [(tag, k) for k, _ in attrs]
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_report_escapes_patient_ids_and_names_planes_from_the_affine(task):
    pytest.importorskip("matplotlib")
    lay = task["lay"]
    assert cli.main(["report", str(lay.model_dir), "--cache-dir", str(task["cache"]),
                     "-q"]) == 0
    text = (lay.report_dir / "index.html").read_text()
    page = _Page()
    page.feed(text)
    # the hostile id stays inside its attribute: no onerror attribute, and the src finds the file
    assert ("img", "onerror") not in page.attrs
    from urllib.parse import unquote

    for src in page.images:
        assert (lay.report_dir / unquote(src)).is_file(), src
    assert EVIL_EXPERT not in text and "A|B*&lt;b&gt;_`" in text
    # array axis 0 runs inferior -> superior in this affine: it is the axial plane
    assert "axial: array axis 0, slice 6" in text and "sagittal: array axis 2" in text
    assert "highest PSNR" not in text and "class=\"best\"" not in text
    assert "never across" in text


# --------------------------------------------------------------------------------------
# summarize: distinct patients, escaped names, figures
# --------------------------------------------------------------------------------------
def _metrics(psnr):
    return {"mse": 1.0, "mae": 1.0, "psnr": psnr, "ssim": psnr / 100.0}


def _write_task(root, fold, pids, offset):
    lay = TaskLayout(root, "exp|x", fold, "3mm", "t1c")
    lay.model_dir.mkdir(parents=True)
    per = {p: _metrics(30.0 + offset + i) for i, p in enumerate(pids)}
    experts = {p: {"BSPLINE": _metrics(29.0 + i), EVIL_EXPERT: _metrics(29.5 + i)}
               for i, p in enumerate(pids)}
    hr_free = {p: {**_metrics(29.8 + i), "experts": {"BSPLINE": _metrics(29.6 + i),
                                                     EVIL_EXPERT: _metrics(29.0 + i)}}
               for i, p in enumerate(pids)}
    lay.metrics_json.write_text(json.dumps({"train": {}, "test": _metrics(30.0)}))
    lay.patients_json.write_text(json.dumps({"per_patient": {"test": per},
                                             "test_experts": experts,
                                             "test_hr_free": hr_free}))
    names = ("BSPLINE", EVIL_EXPERT)
    grid = TileGrid((8, 8, 8), 4, 4)
    w = np.zeros((grid.n_tiles, 2), np.float32)
    w[: fold * 2, 0] = 1.0
    w[fold * 2:, 1] = 1.0
    save_model(lay.model_file, StackingModel(w, np.ones(grid.n_tiles, bool), grid, names))


def test_summarize_counts_distinct_patients_escapes_and_draws(tmp_path, capsys, caplog):
    pytest.importorskip("matplotlib")
    from pacs_numba.runs.summarize import summarize

    root = tmp_path / "out"
    _write_task(root, 1, ["p1", "p2", "p3"], 0.0)
    _write_task(root, 2, ["p3", "p4"], 1.0)  # p3 is a test patient in folds 1 and 2
    rows, md, paths = summarize(root)
    pacs = next(r for r in rows if r["method"] == "PaCS-SR")
    assert pacs["n"] == 4  # distinct patients, not 5 samples
    # p3's value is its mean over the two folds: (32 + 31) / 2
    assert pacs["psnr_mean"] == pytest.approx(np.mean([30.0, 31.0, 31.5, 32.0]))
    assert "p3 (folds 1, 2)" in pacs["note"] and "counted once" in md
    assert "more than one fold" in caplog.text
    # escaped Markdown: no raw pipe, star or tag from the expert or experiment name
    assert EVIL_EXPERT not in md and r"A\|B\*\<b\>\_\`" in md and r"exp\|x" in md
    for line in md.splitlines():
        if line.startswith("| "):
            assert line.count(" | ") == 7 - 1 or line.startswith("|---"), line
    assert md.count(PROTOCOL_NOTE[:40]) == 1
    # figures: every one a PNG of a readable size, every one referenced in summary.md
    figs = [p for p in paths if p.suffix == ".png"]
    assert sorted(f.name.rsplit("_", 1)[1] for f in figs) == ["dominance.png", "experts.png",
                                                             "gain.png"]
    summary_md = (root / "summary.md").read_text()
    for f in figs:
        data = f.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 400 and height >= 300
        assert f"summary_figures/{f.name}" in summary_md


def test_report_links_the_summary_figures_of_its_task(task):
    pytest.importorskip("matplotlib")
    from pacs_numba.runs.summarize import summarize

    lay = task["lay"]
    out_root = Path(lay.out_root)
    # the hand-made task has no metrics: add the files summarize reads
    lay.metrics_json.write_text(json.dumps({"train": {}, "test": _metrics(30.0)}))
    lay.patients_json.write_text(json.dumps({"per_patient": {"test": {
        "sub-01": _metrics(30.0)}}, "test_experts": {"sub-01": {
            "BSPLINE": _metrics(29.0), EVIL_EXPERT: _metrics(28.0)}}}))
    _, _, paths = summarize(out_root)
    figs = [p for p in paths if p.suffix == ".png"]
    assert figs
    assert cli.main(["report", str(lay.model_dir), "--cache-dir", str(task["cache"]),
                     "--patients", "sub-01", "-q"]) == 0
    page = _Page()
    page.feed((lay.report_dir / "index.html").read_text())
    from urllib.parse import unquote

    linked = {(lay.report_dir / unquote(s)).resolve() for s in page.images}
    assert {f.resolve() for f in figs} <= linked


def test_report_says_when_the_task_was_trained_with_registration(task, tmp_path, caplog):
    pytest.importorskip("matplotlib")
    import dataclasses
    import shutil

    from pacs_numba.store.modelfile import load_model

    lay = task["lay"]
    copy = TaskLayout(tmp_path / "out", "exp", 1, "3mm", "t1c")
    shutil.copytree(lay.model_dir, copy.model_dir, ignore=shutil.ignore_patterns("report"))
    model = load_model(copy.model_file)
    settings = {**model.settings, "pacs_sr": {"use_registration": True}}
    save_model(copy.model_file, dataclasses.replace(model, settings=settings))
    assert cli.main(["report", str(copy.model_dir), "--cache-dir", str(task["cache"]),
                     "--patients", "sub-01", "-q"]) == 0
    text = (copy.report_dir / "index.html").read_text()
    assert "trained with registration" in text and "unregistered" in text
