"""Cases found by trying the CLI as a hostile user (issues 7 and 8, verified on merged code)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.errors import ConfigError
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.locks import TaskLock
from pacs_numba.store.manifest import build_manifest, load_manifest, write_manifest

SPACING = "3mm"


def _cohort(root: Path) -> Path:
    cfg = make_cohort(root, patients=6, shape=(24, 26, 22), spacings=(SPACING,), pulses=("t1c",),
                      seed=3, kfolds=3, patch_size=8, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=1, log_to_file=False)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    return cfg


def _outputs(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in {"patients.json", "pacs_numba_run.json"}
    }


def test_resume_recomputes_a_patient_whose_record_lacks_a_metric(tmp_path, capsys):
    # A record written before a metric was added (or edited by hand) keeps one metric
    # fewer for a patient.  Resume used to reuse that patient and then crash averaging
    # the split (ValueError, exit 1 "a bug"); it must compute the patient again instead.
    cfg = _cohort(tmp_path / "c")
    out = tmp_path / "out"
    base = ["train", "--config", str(cfg), "--fold", "1", "--out-root", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "-v"]
    assert cli.main(base) == 0
    first = _outputs(out)
    record = next(out.rglob("pacs_numba_run.json"))
    doc = json.loads(record.read_text())
    key = sorted(k for k in doc["patients"] if k.startswith("train/"))[1]
    del doc["patients"][key]["metrics"]["mae"]
    record.write_text(json.dumps(doc))

    capsys.readouterr()
    assert cli.main([*base, "--resume"]) == 0
    log = capsys.readouterr().err
    pid = key.split("/", 1)[1]
    assert f"patient={pid} split=train secs" in log
    assert log.count("resumed (outputs complete)") == 5
    assert _outputs(out) == first


def test_a_duplicate_manifest_key_names_the_two_lines_of_its_object(tmp_path):
    # The same patient id legitimately appears in other folds; the message used to list
    # every line holding the id, naming lines that are not duplicates at all.
    entry = {"HR": {SPACING: {"t1c": "/x/hr.nii.gz"}}}
    folds = [{"train": {"a": entry, "b": entry}, "test": {"c": entry}},
             {"train": {"c": entry, "b": entry}, "test": {"a": entry}}]
    text = json.dumps({"folds": folds}, indent=1)
    lines = text.splitlines()
    first_c = next(i for i, s in enumerate(lines) if s.strip().startswith('"c"'))
    # list 'c' a second time in the first fold's test split, just before the first one
    lines.insert(first_c, '  "c": {},')
    path = tmp_path / "manifest.json"
    path.write_text("\n".join(lines))
    with pytest.raises(ConfigError) as err:
        load_manifest(path)
    msg = str(err.value)
    assert f"(lines {first_c + 1} and {first_c + 2})" in msg, msg
    assert msg.count("line") == 1


def test_evaluate_of_a_task_being_trained_names_the_holder_and_waits_with_wait(
    tmp_path, capsys
):
    # evaluate without --weights used to look for the model before taking the task lock:
    # while a train of the task ran it said "no model ... run train first", even with --wait.
    cfg = _cohort(tmp_path / "c")
    common = ["--config", str(cfg), "--fold", "1", "--cache-dir", str(tmp_path / "cache"),
              "--no-progress"]
    trained = tmp_path / "trained"
    assert cli.main(["train", *common, "--out-root", str(trained)]) == 0
    model = next(trained.rglob("pacs_model.npz"))

    out = tmp_path / "out"
    task_dir = out / model.parent.relative_to(trained)
    holder = TaskLock(task_dir, "a train").acquire()  # another open file: flock conflicts
    evaluate = ["evaluate", *common, "--spacing", SPACING, "--pulse", "t1c",
                "--out-root", str(out)]
    try:
        capsys.readouterr()
        assert cli.main(evaluate) == 2
        err = capsys.readouterr().err
        assert "already running" in err and f"pid {os.getpid()}" in err
        assert "no model" not in err

        def finish_train() -> None:  # the holder writes its model and ends
            shutil.copy2(model, task_dir / model.name)
            holder.release()

        timer = threading.Timer(1.0, finish_train)
        timer.start()
        assert cli.main([*evaluate, "--wait"]) == 0
        timer.join()
    finally:
        holder.release()
    assert (task_dir / "metrics.json").read_bytes() == (model.parent / "metrics.json").read_bytes()


def test_evaluate_without_a_model_or_task_folder_creates_nothing(tmp_path, capsys):
    cfg = _cohort(tmp_path / "c")
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--config", str(cfg), "--fold", "1", "--spacing", SPACING,
                     "--pulse", "t1c", "--out-root", str(out), "--no-progress"]) == 2
    assert "no model for" in capsys.readouterr().err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_an_out_root_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    # with log_to_file: true the log folder under out_root was made first: a file there
    # raised NotADirectoryError as "a bug" (exit 1, traceback)
    cfg = _cohort(tmp_path / "c")
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"]["log_to_file"] = True
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    afile = tmp_path / "afile"
    afile.write_text("")
    assert cli.main(["train", "--config", str(cfg), "--fold", "1", "--out-root", str(afile),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(afile) in err and "log" in err


def test_resume_keeps_test_blends_when_model_data_is_a_symlink(tmp_path, capsys):
    # Test blends are stored relative to the task folder ('../../../output_volumes/...').
    # With model_data a symlink (to larger storage), the OS resolved '..' from the link's
    # target, so every test patient looked "missing" and was computed again on each resume.
    cfg = _cohort(tmp_path / "c")
    out = tmp_path / "out"
    (out / "PaCS_SR" / SPACING).mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (out / "PaCS_SR" / SPACING / "model_data").symlink_to(tmp_path / "elsewhere")
    base = ["train", "--config", str(cfg), "--fold", "1", "--out-root", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "-v"]
    assert cli.main(base) == 0
    capsys.readouterr()
    assert cli.main([*base, "--resume"]) == 0
    log = capsys.readouterr().err
    assert "missing" not in log
    assert log.count("resumed (outputs complete)") == 6


def test_a_relative_manifest_path_that_is_missing_names_the_folder_it_was_looked_in(
    tmp_path, monkeypatch
):
    # data.out: ./manifest.json run from another folder said only "'manifest.json' not found"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_manifest("manifest.json")
    assert str(tmp_path / "manifest.json") in str(err.value)


def test_an_unknown_on_off_value_warns_and_keeps_the_default():
    code = "from pacs_numba import _config; print(bool(_config.FASTMATH))"
    for value, on in (("0", False), ("off", False), ("yes", True)):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, "PACS_FASTMATH": value})
        assert res.returncode == 0 and res.stdout.strip() == str(on), res.stderr
    res = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True,
                         text=True, env={**os.environ, "PACS_FASTMATH": "maybe"})
    assert res.returncode == 0 and res.stdout.strip() == "True"
    assert "PACS_FASTMATH='maybe' is not one of" in res.stderr


def test_a_reader_that_leaves_early_is_not_a_traceback(tmp_path):
    # `pacs-numba --help | head -1` once head has left: stdout is a pipe with no reader,
    # so the first write fails with EPIPE; the answer is exit 141, no traceback
    r, w = os.pipe()
    os.close(r)
    try:
        res = subprocess.run([sys.executable, "-m", "pacs_numba", "cache", "info", "--cache-dir",
                              str(tmp_path / "cache")], stdout=w, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(w)
    assert "Traceback" not in res.stderr and "BrokenPipeError" not in res.stderr, res.stderr
    assert res.returncode == 141, (res.returncode, res.stderr)
