"""Nothing lost: resume, interruption by real signals, concurrent tasks, failing writes."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.manifest import build_manifest, write_manifest

SPACING = "3mm"


def _cohort(root: Path, *, patients: int = 6, shape=(28, 30, 26), pulses=("t1c",),
            kfolds: int = 3, **pacs_sr) -> Path:
    cfg = make_cohort(root, patients=patients, shape=shape, spacings=(SPACING,), pulses=pulses,
                      seed=5, kfolds=kfolds, patch_size=8, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=1, log_to_file=False, **pacs_sr)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    return cfg


def _task_dir(root: Path, fold: int = 1, pulse: str = "t1c") -> Path:
    return root / "PaCS_SR" / SPACING / "model_data" / f"fold_{fold}" / pulse


def _outputs(root: Path) -> dict[str, bytes]:
    """Every output file under an out_root (logs and run records aside), by relative path.

    ``.gz`` files are compared by content: ISA-L's deflate output for equal data is not
    guaranteed to be the same byte stream from one writer to another (seen with concurrent
    tasks), while the volumes, headers and every other file must be identical.
    """
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and "logs" not in p.parts and p.name not in {"patients.json",
                                                                      "pacs_numba_run.json"}:
            data = p.read_bytes()
            out[str(p.relative_to(root))] = gzip.decompress(data) if p.suffix == ".gz" else data
    return out


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PACS_LOG_LEVEL"] = "INFO"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get(
        "PYTHONPATH", "")
    return env


def test_resume_keeps_complete_outputs_and_recomputes_changed_ones(tmp_path, capsys):
    cfg = _cohort(tmp_path / "c")
    out = tmp_path / "out"
    base = ["train", "--config", str(cfg), "--fold", "1", "--out-root", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress", "-v"]
    assert cli.main(base) == 0
    first = _outputs(out)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}

    capsys.readouterr()
    assert cli.main([*base, "--resume"]) == 0
    log = capsys.readouterr().err
    assert "reusing the fitted model" in log
    assert log.count("resumed (outputs complete)") == 6  # 4 train + 2 test
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == mtimes
    assert _outputs(out) == first

    # a test patient's expert changes: only that patient is evaluated again
    config = load_config(cfg)
    manifest = json.loads(Path(config.data.out).read_text())
    pid, entry = sorted(manifest["folds"][0]["test"].items())[0]
    expert = Path(entry["BSPLINE"][SPACING]["t1c"])
    os.utime(expert, ns=(time.time_ns(), time.time_ns()))
    assert cli.main([*base, "--resume"]) == 0
    log = capsys.readouterr().err
    assert "reusing the fitted model" in log
    assert log.count("resumed (outputs complete)") == 5
    assert f"patient={pid} split=test secs" in log

    # a deleted output is written again
    victim = next(out.rglob("*_blend_train.nii.gz"))
    victim.unlink()
    assert cli.main([*base, "--resume"]) == 0
    assert victim.exists()
    assert _outputs(out) == first

    # a setting that changes the numbers: everything is fitted and evaluated again
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"]["lambda_ridge"] = 0.5
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    capsys.readouterr()
    assert cli.main([*base, "--resume"]) == 0
    log = capsys.readouterr().err
    assert "settings changed" in log and "lambda_ridge" in log
    assert "resumed (outputs complete)" not in log


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_killed_run_resumes_to_the_uninterrupted_result(tmp_path, sig, code):
    cfg = _cohort(tmp_path / "c", patients=9, shape=(40, 44, 36))
    cache = tmp_path / "cache"
    ref = tmp_path / "ref"
    common = [sys.executable, "-m", "pacs_numba", "train", "--config", str(cfg), "--fold", "1",
              "--cache-dir", str(cache), "--no-progress", "--workers", "1"]
    subprocess.run([*common, "--out-root", str(ref)], check=True, env=_cli_env(),
                   capture_output=True)

    out = tmp_path / "out"
    seen = []
    with subprocess.Popen([*common, "--out-root", str(out)], env=_cli_env(),
                          stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stderr:  # kill it once the evaluation has begun
            seen.append(line)
            if "split=train secs" in line:
                proc.send_signal(sig)
                break
        rest = proc.stderr.read()
        rc = proc.wait(timeout=120)
    log = "".join(seen) + rest
    assert rc == code, log
    assert "stopped by signal" in log and "--resume" in log
    assert "Traceback" not in log
    assert not (_task_dir(out) / "metrics.json").exists()  # the task did not complete
    assert (_task_dir(out) / "weights.json").exists()  # but the fit is kept
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # no partial files

    res = subprocess.run([*common, "--out-root", str(out), "--resume"], env=_cli_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "resumed (outputs complete)" in res.stderr
    assert _outputs(out) == _outputs(ref)


def test_concurrent_tasks_share_one_cache_and_out_root(tmp_path):
    cfg = _cohort(tmp_path / "c", pulses=("t1c", "t2w"))
    cache, shared = tmp_path / "cache", tmp_path / "shared"
    tasks = [("1", "t1c"), ("1", "t2w"), ("2", "t1c")]

    def cmd(fold: str, pulse: str, out: Path) -> list[str]:
        return [sys.executable, "-m", "pacs_numba", "train", "--config", str(cfg), "--fold", fold,
                "--pulse", pulse, "--out-root", str(out), "--cache-dir", str(cache),
                "--no-progress"]

    procs = [subprocess.Popen(cmd(f, p, shared), env=_cli_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for f, p in tasks]
    errs = []
    for proc in procs:
        with proc:
            _, err = proc.communicate(timeout=300)
        errs.append((proc.returncode, err))
    for rc, err in errs:
        assert rc == 0, err
    # the same tasks one after the other, with a cache of their own
    alone = tmp_path / "alone"
    for f, p in tasks:
        res = subprocess.run([*cmd(f, p, alone), "--cache-dir", str(tmp_path / "cache2")],
                             env=_cli_env(), capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    assert _outputs(shared) == _outputs(alone)
    assert len([k for k in _outputs(shared) if k.endswith("metrics.json")]) == 3


def test_a_failing_write_names_the_path_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    cfg = _cohort(tmp_path / "c")
    out = tmp_path / "out"
    real_replace = os.replace

    def full_disk(src, dst, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        if str(dst).endswith("_blend_train.nii.gz"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", full_disk)
    rc = cli.main(["train", "--config", str(cfg), "--fold", "1", "--out-root", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "No space left on device" in err and "_blend_train.nii.gz" in err
    assert "Traceback" not in err
    assert not list(out.rglob("*_blend_train.nii.gz"))
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    # the fitted model is kept, and a resumed run with space finishes the task
    monkeypatch.setattr(os, "replace", real_replace)
    assert (_task_dir(out) / "weights.json").exists()
    rc = cli.main(["train", "--config", str(cfg), "--fold", "1", "--out-root", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--resume"])
    assert rc == 0
    assert (_task_dir(out) / "metrics.json").exists()
    shutil.rmtree(out)
