"""Help texts and log lines that say what the code does (issue 20, item 6)."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from pacs_numba import cli
from pacs_numba.core.model import StackingModel
from pacs_numba.core.tiling import TileGrid
from pacs_numba.runs import warmup
from pacs_numba.store.modelfile import save_model


def _help(capsys, *command: str) -> str:
    assert cli.main([*command, "--help"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "report", "summarize",
                                     "tune", "make-cohort", "demo", "inspect",
                                     "build-manifest", "cache"])
def test_own_options_come_before_the_shared_groups(capsys, command):
    text = _help(capsys, command)
    titles = [line[:-1] for line in text.splitlines() if line.endswith(":")
              and not line.startswith(" ") and not line.startswith("usage")]
    shared = [t for t in titles if t in ("logging", "caches", "resources")]
    assert shared and titles[-len(shared):] == shared, titles
    assert "(default: )" not in text


def test_predict_help_puts_model_and_inputs_first_and_says_what_decides_workers(capsys):
    text = _help(capsys, "predict")
    for before in ("model:", "one patient:", "many patients:"):
        assert text.index(before) < text.index("logging:")
    assert "(default: )" not in text
    assert "NAME=PATH" in text
    workers = " ".join(_help(capsys, "train").split())
    assert "pacs_sr.num_workers" in workers and "capped by the memory budget and the CPUs" \
        in workers


def test_predict_one_patient_does_not_log_a_workers_option_nobody_passed(tmp_path, capsys):
    rng = np.random.default_rng(1)
    shape = (10, 9, 8)
    grid = TileGrid(shape, 4, 4)
    names = ("A", "B")
    model = StackingModel(np.full((grid.n_tiles, 2), 0.5, np.float32),
                          np.ones(grid.n_tiles, bool), grid, names, window="flat",
                          affine=np.eye(4))
    save_model(tmp_path / "m.npz", model)
    argv = ["predict", "--model", str(tmp_path / "m.npz"), "--out", str(tmp_path / "p.nii.gz"),
            "--cache-dir", str(tmp_path / "cache"), "-v", "-v"]  # INFO under conftest's WARNING
    for n in names:
        f = tmp_path / f"{n}.nii.gz"
        nib.save(nib.Nifti1Image((rng.random(shape) + 0.5).astype(np.float32), np.eye(4)), f)
        argv += ["--expert", f"{n}={f}"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "predict 1 patient(s): 1 worker(s)" in err and "--workers" not in err
    assert cli.main([*argv, "--force", "--workers", "1"]) == 0
    assert "--workers=1" in capsys.readouterr().err  # now someone passed it


def test_a_first_compile_logs_kernels_ready_out_of_all(monkeypatch, caplog):
    steps = []
    times = warmup.warm_kernels(on_step=lambda name, secs: steps.append(name))
    assert steps == list(times)  # one call per step, in order
    ready, total = warmup.kernels_ready()
    assert 0 < ready <= total == len(warmup.dispatchers())
    # a compile cache without any index file: the first-run lines, with progress
    monkeypatch.setattr(warmup, "kernel_index_files", lambda: (0, total))
    with caplog.at_level(logging.INFO, logger="pacs_numba.runs.warmup"):
        warmup.load_kernels()
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("compiling 12 kernel groups for all (first run only") for m in lines)
    progress = [m for m in lines if m.startswith("compiling kernels: ")]
    assert len(progress) == len(steps)
    # every step once (split between this process and the compile helper in any order),
    # each line with the count of kernels ready out of all
    named = sorted(m.split("(", 1)[1].split(":", 1)[0] for m in progress)
    assert named == sorted(steps)
    assert all(m.startswith(f"compiling kernels: {ready}/{total} ready (") for m in progress)
