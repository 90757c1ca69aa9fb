"""Nothing mixed, stale or trusted unchecked (issue 8): locks, cache identity, verified resume,
temporary-file sweeps, safe ids and output paths, strict JSON, refused non-regular inputs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.core.model import StackingModel
from pacs_numba.core.predict import predict_volume
from pacs_numba.core.tiling import TileGrid
from pacs_numba.errors import ConfigError, InputError
from pacs_numba.store.atomic import atomic_write_json
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.integrity import (
    SAMPLE_BLOCK_BYTES,
    SAMPLE_BLOCKS,
    check_patient_id,
    content_sample,
    file_digest,
    output_under,
    sample_offsets,
    strict_json,
    temp_writer,
    verify_file,
)
from pacs_numba.store.locks import LOCK_FILE, TaskBusy, TaskLock
from pacs_numba.store.manifest import build_manifest, load_manifest, select_task, write_manifest
from pacs_numba.store.modelfile import load_model, save_model
from pacs_numba.store.nifti import read_nifti
from pacs_numba.store.volumes import VolumeStore

SPACING, PULSE = "3mm", "t1c"
ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cohort(root: Path, **pacs_sr) -> Path:
    cfg = make_cohort(root, patients=6, shape=(20, 22, 18), spacings=(SPACING,),
                      pulses=(PULSE,), seed=7, kfolds=3, patch_size=8, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=1, log_to_file=False, **pacs_sr)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    return cfg


def _task_dir(out: Path) -> Path:
    return out / "PaCS_SR" / SPACING / "model_data" / "fold_1" / PULSE


def _split(cfg: Path) -> tuple[dict, dict]:
    config = load_config(cfg)
    return select_task(load_manifest(config.data.out), 1, SPACING, PULSE, config.data.models)


def _outputs(root: Path) -> dict[str, bytes]:
    skip = {"patients.json", "pacs_numba_run.json"}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip and "logs" not in p.parts}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """A small cohort trained once on fold 1; tests copy ``out`` before changing it."""
    root = tmp_path_factory.mktemp("integrity")
    cfg = _cohort(root / "c")
    out = root / "out"
    base = ["train", "--config", str(cfg), "--fold", "1", "--out-root", str(out),
            "--cache-dir", str(root / "cache"), "--no-progress"]
    assert cli.main(base) == 0
    return cfg, out, root / "cache", base


# --------------------------------------------------------------------------------------
# Per-task lock
# --------------------------------------------------------------------------------------
_HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pacs_numba.store.locks import TaskLock
    lock = TaskLock(Path(sys.argv[1]), "holder").acquire()
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _start_holder(folder: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), str(seconds)],
                            stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_of_a_task_exits_2_naming_the_holder_and_a_killed_holder_leaves_no_lock(
    trained, tmp_path, capsys
):
    cfg, out, cache, base = trained
    mdir = _task_dir(out)
    holder = _start_holder(mdir, 60)
    try:
        capsys.readouterr()
        rc = cli.main([*base, "--force"])
        err = capsys.readouterr().err
        assert rc == 2
        assert f"pid {holder.pid}" in err and "already running" in err and "--wait" in err
        with pytest.raises(TaskBusy, match=f"pid {holder.pid} on host"):
            TaskLock(mdir, "t").acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
    # the kernel released the SIGKILLed holder's lock: no stale lock
    lock = TaskLock(mdir, "t").acquire()
    assert json.loads((mdir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert (mdir / LOCK_FILE).read_text() == ""


def test_wait_waits_for_the_holder_instead_of_failing(tmp_path):
    holder = _start_holder(tmp_path / "task", 1.5)
    t0 = time.monotonic()
    with TaskLock(tmp_path / "task", "t", wait=True):
        waited = time.monotonic() - t0
        assert holder.poll() is not None  # it only got the lock once the holder had exited
    holder.wait()
    holder.stdout.close()
    assert waited > 0.2


def test_wait_flag_is_accepted_by_train_and_evaluate():
    parser = cli.build_parser()
    for cmd in ("train", "evaluate"):
        args = parser.parse_args([cmd, "--config", "c.yaml", "--fold", "1", "--spacing", "3mm",
                                  "--pulse", "t1c", "--wait"])
        assert args.wait is True


# --------------------------------------------------------------------------------------
# Volume cache identity
# --------------------------------------------------------------------------------------
def test_a_same_size_same_mtime_rewrite_is_read_fresh_from_the_cache(tmp_path):
    path = tmp_path / "v.nii"  # uncompressed: every volume of this shape has the same size
    a = np.arange(6 * 7 * 8, dtype=np.float32).reshape(6, 7, 8)
    nib.save(nib.Nifti1Image(a, np.eye(4)), path)
    st = path.stat()
    store = VolumeStore(tmp_path / "cache")
    np.testing.assert_array_equal(store.get(path).data, a)
    nib.save(nib.Nifti1Image(a[::-1].copy() + 5, np.eye(4)), path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    fresh = VolumeStore(tmp_path / "cache")  # a new process: no in-memory mapping to reuse
    np.testing.assert_array_equal(fresh.get(path).data, a[::-1] + 5)
    assert fresh.read_count == 1


def test_content_sample_sees_a_change_at_either_end_and_in_between(tmp_path):
    p = tmp_path / "f"
    data = bytearray(os.urandom(1 << 22))
    p.write_bytes(data)
    fd = os.open(p, os.O_RDONLY)
    ref = content_sample(fd, len(data))
    os.close(fd)
    # the blocks in between are spread over the file: one lies near its very middle
    middle = [o for o in sample_offsets(len(data)) if o > 0]
    assert len(middle) == SAMPLE_BLOCKS
    assert min(abs(o - len(data) // 2) for o in middle) < len(data) // 8
    # a byte inside each of them, and both ends
    inside = [o + SAMPLE_BLOCK_BYTES // 2 for o in middle]
    for pos in (0, *inside, len(data) - 1):
        changed = bytearray(data)
        changed[pos] ^= 1
        p.write_bytes(changed)
        fd = os.open(p, os.O_RDONLY)
        try:
            assert content_sample(fd, len(data)) != ref
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------
# Inputs that are not regular files
# --------------------------------------------------------------------------------------
def _bounded(fn, timeout_s: float = 20.0):
    """Run ``fn`` in a thread; fail (not hang) if it does not return in time."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    return t, box


def _unblock(fifo: Path, t: threading.Thread) -> bool:
    """Whether ``t`` was hung; if so, feed EOF to every reader that opens ``fifo`` until it ends,
    so a failing test does not leave a thread blocked for ever."""
    hung = t.is_alive()
    for _ in range(600):
        if not t.is_alive():
            break
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while nobody reads
        except OSError:
            pass
        time.sleep(0.1)
    return hung


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "expert.nii.gz"
    os.mkfifo(fifo)
    store = VolumeStore(tmp_path / "cache")
    for fn in (lambda: store.get(fifo), lambda: read_nifti(fifo)):
        t, box = _bounded(fn)
        assert not _unblock(fifo, t), "reading a FIFO blocked"
        assert isinstance(box.get("error"), InputError)
        assert "FIFO" in str(box["error"]) and str(fifo) in str(box["error"])
    with pytest.raises(InputError, match="is a directory"):
        store.get(tmp_path)


def test_a_fifo_in_the_manifest_stops_the_task_before_any_work(tmp_path, capsys):
    cfg = _cohort(tmp_path / "c")
    train, _ = _split(cfg)
    victim = Path(next(iter(train.values()))["experts"][1])
    victim.unlink()
    os.mkfifo(victim)
    out = tmp_path / "out"
    t, box = _bounded(lambda: cli.main(
        ["train", "--config", str(cfg), "--fold", "1", "--out-root", str(out),
         "--cache-dir", str(tmp_path / "cache"), "--no-progress"]), 120)
    assert not _unblock(victim, t), "the run blocked on a FIFO"
    err = capsys.readouterr().err
    assert box["value"] == 2 and "FIFO" in err and str(victim) in err
    assert not (_task_dir(out) / "metrics.json").exists()


# --------------------------------------------------------------------------------------
# Temporary files of writers that are gone
# --------------------------------------------------------------------------------------
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_cache_temp_files_of_dead_writers_are_reported_and_swept(tmp_path, capsys):
    from pacs_numba.store.atomic import host_tag

    cache = tmp_path / "cache"
    store = VolumeStore(cache)
    key = "0" * 32
    dead = cache / f".{key}.npy.tmp-{host_tag()}-{_dead_pid()}-123-abcd"
    live = cache / f".{key}.npy.tmp-{host_tag()}-{os.getpid()}-123-abcd"
    other_host = cache / f".{key}.json.tmp-elsewhere-{_dead_pid()}-1-ab"
    for p in (dead, live, other_host):
        p.write_bytes(b"x" * 10)
    info = store.info()
    assert info["temp_files"] == 3 and info["stale_temp_files"] == 1
    assert cli.main(["cache", "info", "--cache-dir", str(cache)]) == 0
    assert "stale_temp_files: 1" in capsys.readouterr().out
    assert store.sweep_temps() == [dead]
    assert live.exists() and other_host.exists() and not dead.exists()
    dead.write_bytes(b"again")
    assert cli.main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert live.exists() and not dead.exists()


def test_temp_writer_parses_both_name_forms():
    assert temp_writer("weights.json.tmp-123-456") == (None, 123)
    assert temp_writer(".ab.npy.tmp-node_1.x-77-99-0f0f") == ("node_1.x", 77)
    assert temp_writer("sub-01-t1c.nii.gz") is None


def test_a_task_sweeps_its_orphaned_temp_files(trained, tmp_path):
    cfg, out0, cache, base = trained
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    mdir = _task_dir(out)
    vdir = out / "PaCS_SR" / SPACING / "output_volumes"
    _, test = _split(cfg)
    pid = next(iter(test))
    orphans = [mdir / f"weights.json.tmp-{_dead_pid()}-1",
               vdir / f"{pid}-{PULSE}.nii.gz.tmp-{os.getpid()}-2"]
    foreign = vdir / f"sub-999-{PULSE}.nii.gz.tmp-{os.getpid()}-3"  # not this task's file
    for p in [*orphans, foreign]:
        p.write_bytes(b"partial")
    old = time.time() - 5
    for p in [*orphans, foreign]:
        os.utime(p, (old, old))
    argv = [a if a != str(out0) else str(out) for a in base]
    assert cli.main([*argv, "--resume"]) == 0
    assert not any(p.exists() for p in orphans)
    assert foreign.exists()


# --------------------------------------------------------------------------------------
# Verified resume, damaged model files, record paths
# --------------------------------------------------------------------------------------
def test_resume_verifies_every_kept_output_and_redoes_what_fails(trained, tmp_path, capsys):
    cfg, out0, cache, base = trained
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    first = _outputs(out)
    mdir = _task_dir(out)
    argv = [a if a != str(out0) else str(out) for a in base]
    (mdir / "weights.json").unlink()
    blend = next((out / "PaCS_SR" / SPACING / "output_volumes").glob("*.nii.gz"))
    blend.write_bytes(b"")
    train_blend = next(mdir.glob("*_blend_train.nii.gz"))
    data = bytearray(train_blend.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    train_blend.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.main([*argv, "--resume", "-v"]) == 0
    err = capsys.readouterr().err
    assert "reusing the fitted model" in err
    assert "weights.json" in err and "writing it again" in err
    assert "has 0 bytes" in err and "checksum" in err
    assert err.count("resumed (outputs complete)") == 4
    assert _outputs(out) == first


def test_a_damaged_model_is_exit_2_for_predict_and_evaluate_and_refitted_by_resume(
    trained, tmp_path, capsys
):
    cfg, out0, cache, base = trained
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    first = _outputs(out)
    model = _task_dir(out) / "pacs_model.npz"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with pytest.raises(InputError, match="damaged"):
        load_model(model)
    _, test = _split(cfg)
    experts = next(iter(test.values()))["experts"]
    capsys.readouterr()
    rc = cli.main(["predict", "--model", str(model), "--experts", *experts,
                   "--out", str(tmp_path / "p.nii.gz"), "--cache-dir", str(cache)])
    err = capsys.readouterr().err
    assert rc == 2 and str(model) in err and "Traceback" not in err
    rc = cli.main(["evaluate", "--config", str(cfg), "--fold", "1", "--spacing", SPACING,
                   "--pulse", PULSE, "--out-root", str(out), "--cache-dir", str(cache),
                   "--force", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and str(model) in err and "Traceback" not in err
    argv = [a if a != str(out0) else str(out) for a in base]
    assert cli.main([*argv, "--resume", "-v"]) == 0
    err = capsys.readouterr().err
    assert "damaged" in err and "fitting again" in err
    assert err.count("resumed (outputs complete)") == 6  # the same model: patients kept
    refit = load_model(model)  # a zip's member times differ: compare the content
    ref = load_model(_task_dir(out0) / "pacs_model.npz")
    np.testing.assert_array_equal(refit.weights, ref.weights)
    key = str(model.relative_to(out))
    assert {k: v for k, v in _outputs(out).items() if k != key} == {
        k: v for k, v in first.items() if k != key}


def test_resume_from_another_working_directory(trained, tmp_path, monkeypatch, capsys):
    cfg, out0, cache, base = trained
    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    shutil.copytree(out0, tmp_path / "a" / "out")
    argv = ["train", "--config", str(cfg), "--fold", "1", "--cache-dir", str(cache),
            "--no-progress", "-v"]
    monkeypatch.chdir(tmp_path / "a")
    assert cli.main([*argv, "--out-root", "out", "--force"]) == 0
    monkeypatch.chdir(tmp_path / "b" / "deeper")
    capsys.readouterr()
    assert cli.main([*argv, "--out-root", "../../a/out", "--resume"]) == 0
    assert capsys.readouterr().err.count("resumed (outputs complete)") == 6
    record = json.loads((_task_dir(tmp_path / "a" / "out") / "pacs_numba_run.json").read_text())
    for rec in record["patients"].values():
        for o in rec["outputs"]:
            assert not os.path.isabs(o["path"]) and set(o) == {"path", "size", "sha256"}


def test_verify_file_reports_missing_truncated_and_changed(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abcdef")
    d = file_digest(p)
    assert d["size"] == 6 and verify_file(p, d) is None
    p.write_bytes(b"abcdeF")
    assert "checksum" in verify_file(p, d)
    p.write_bytes(b"abc")
    assert "3 bytes" in verify_file(p, d)
    p.unlink()
    assert "missing" in verify_file(p, d)


# --------------------------------------------------------------------------------------
# Weights files and the task grid
# --------------------------------------------------------------------------------------
def test_weights_json_of_another_grid_is_refused(trained, tmp_path, capsys):
    cfg, out0, cache, base = trained
    doc = yaml.safe_load(Path(cfg).read_text())
    doc["pacs_sr"].update(patch_size=6, stride=3)  # more tiles: every id of the 8/4 grid fits
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(doc, sort_keys=False))
    capsys.readouterr()
    rc = cli.main(["evaluate", "--config", str(other), "--fold", "1", "--spacing", SPACING,
                   "--pulse", PULSE, "--out-root", str(tmp_path / "o"), "--cache-dir",
                   str(cache), "--weights", str(_task_dir(out0) / "weights.json"),
                   "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "weights.json" in err and "grid" in err


def test_evaluate_force_writes_model_and_weights_json_that_agree(trained, tmp_path):
    cfg, out0, cache, base = trained
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    mdir = _task_dir(out)
    trained_model = load_model(mdir / "pacs_model.npz")
    w = {str(t): [0.0, 1.0, 0.0, 0.0] for t in range(5)}
    ext = tmp_path / "ext.json"
    ext.write_text(json.dumps(w))
    rc = cli.main(["evaluate", "--config", str(cfg), "--fold", "1", "--spacing", SPACING,
                   "--pulse", PULSE, "--out-root", str(out), "--cache-dir", str(cache),
                   "--weights", str(ext), "--force", "--no-progress"])
    assert rc == 0
    now = load_model(mdir / "pacs_model.npz")
    assert not np.array_equal(now.weights, trained_model.weights)
    listed = json.loads((mdir / "weights.json").read_text())
    assert listed == w
    np.testing.assert_array_equal(np.flatnonzero(now.learned), np.arange(5))
    np.testing.assert_array_equal(now.weights[:5], np.asarray(list(w.values()), np.float32))


# --------------------------------------------------------------------------------------
# Manifest and config checks, patient ids, output paths
# --------------------------------------------------------------------------------------
def _manifest_doc(tmp_path: Path) -> tuple[Path, dict]:
    cfg = _cohort(tmp_path / "c")
    path = Path(load_config(cfg).data.out)
    return path, json.loads(path.read_text())


def test_a_patient_in_both_splits_is_a_manifest_error(tmp_path):
    path, doc = _manifest_doc(tmp_path)
    pid, entry = next(iter(doc["folds"][0]["test"].items()))
    doc["folds"][0]["train"][pid] = entry
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=f"'{pid}' in both 'train' and 'test'"):
        load_manifest(path)


def test_a_patient_listed_twice_is_a_manifest_error(tmp_path):
    path, doc = _manifest_doc(tmp_path)
    pid, entry = next(iter(doc["folds"][0]["test"].items()))
    text = json.dumps(doc, indent=2)
    dup = json.dumps({pid: entry}, indent=2)[1:-1].strip()
    text = text.replace('"test": {', '"test": {' + dup + ",", 1)
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"key '{pid}' twice.*lines"):
        load_manifest(path)


@pytest.mark.parametrize("bad", ["../../../../../escaped", "a/b", "..", "", "x\\y", ".hidden"])
def test_a_patient_id_that_is_no_file_name_is_a_manifest_error(tmp_path, bad):
    path, doc = _manifest_doc(tmp_path)
    fold = doc["folds"][0]
    pid = next(iter(fold["test"]))
    fold["test"][bad] = fold["test"].pop(pid)
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="cannot be used in a file name") as err:
        load_manifest(path)
    assert repr(bad) in str(err.value)


def test_output_paths_stay_inside_their_folder(tmp_path):
    assert output_under(tmp_path, "a.nii.gz") == tmp_path / "a.nii.gz"
    (tmp_path / "link.nii.gz").symlink_to(tmp_path.parent / "elsewhere.nii.gz")
    for name in ("../x.nii.gz", "sub/../../x", "link.nii.gz"):
        with pytest.raises(InputError, match="outside its folder"):
            output_under(tmp_path, name)
    with pytest.raises(InputError):
        check_patient_id("../../x", "manifest")


def test_duplicate_yaml_keys_name_the_key_and_both_lines(tmp_path):
    cfg = _cohort(tmp_path / "c")
    lines = cfg.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("patch_size:"))
    lines.insert(at + 2, lines[at].replace("8", "16"))
    cfg.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=rf"'patch_size' is given twice.*lines {at + 1} and "
                                          rf"{at + 3}"):
        load_config(cfg)


# --------------------------------------------------------------------------------------
# Flat HR, strict JSON
# --------------------------------------------------------------------------------------
def test_strict_json_everywhere():
    with pytest.raises(ValueError):
        atomic_write_json("/nonexistent/never.json", {"psnr": float("inf")})
    assert strict_json({"a": [1.0, float("nan")], "b": {"c": float("-inf")}, "d": np.float32(2)}
                       ) == {"a": [1.0, None], "b": {"c": None}, "d": 2.0}


def test_a_flat_hr_is_skipped_with_its_reason_and_json_stays_strict(tmp_path, capsys):
    cfg = _cohort(tmp_path / "c")
    train, test = _split(cfg)
    for paths in (next(iter(train.values())), next(iter(test.values()))):
        img = nib.load(paths["HR"])
        flat = np.where(np.asarray(img.dataobj) > 0, 100.0, 0.0).astype(np.float32)
        nib.save(nib.Nifti1Image(flat, img.affine, img.header), paths["HR"])
    out = tmp_path / "out"
    capsys.readouterr()
    rc = cli.main(["train", "--config", str(cfg), "--fold", "1", "--out-root", str(out),
                   "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    assert rc == 0
    mdir = _task_dir(out)
    metrics = json.loads((mdir / "metrics.json").read_text())
    reasons = metrics["skipped"]
    assert {next(iter(train)), next(iter(test))} <= set(reasons)
    assert all("no variance" in why for why in reasons.values())
    for name in ("metrics.json", "patients.json", "pacs_numba_run.json"):
        json.loads((mdir / name).read_text(), parse_constant=_no_constant)


def _no_constant(name: str):
    raise AssertionError(f"non-standard JSON constant {name}")


def test_an_exact_blend_writes_null_psnr(trained, tmp_path, monkeypatch):
    """PSNR is infinite when the blend equals the HR: metrics.json says null, not Infinity."""
    from pacs_numba.core import scoring as scoring_mod
    from pacs_numba.runs import engine as engine_mod

    cfg, out0, cache, base = trained
    engine = engine_mod.Engine(
        load_config(cfg), engine_mod.RunOptions(cache_dir=cache, out_root=tmp_path / "o"))
    real = scoring_mod.metrics_from_sums  # the one pass turns its sums into metrics here

    def exact(*args, **kw):  # as if the blend were the HR itself
        return {**real(*args, **kw), "psnr": float("inf"), "mse": 0.0}

    monkeypatch.setattr(scoring_mod, "metrics_from_sums", exact)
    engine.train(engine.tasks(1)[0])
    mdir = engine.model_dir(engine.tasks(1)[0])
    metrics = json.loads((mdir / "metrics.json").read_text(), parse_constant=_no_constant)
    assert metrics["test"]["psnr"] is None


# --------------------------------------------------------------------------------------
# predict: --out checks and the model's own settings
# --------------------------------------------------------------------------------------
@pytest.fixture
def small_model(tmp_path):
    shape = (16, 18, 14)
    grid = TileGrid(shape, 8, 4)
    rng = np.random.default_rng(0)
    w = rng.random((grid.n_tiles, 2)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    model = StackingModel(w, np.ones(grid.n_tiles, bool), grid, ("A", "B"),
                          {"pacs_sr": {"mixing_window": "flat", "normalize": "zscore"}})
    mpath = tmp_path / "m.npz"
    save_model(mpath, model)
    base = rng.random(shape).astype(np.float32) * 100 + 20
    experts = []
    for i in range(2):
        p = tmp_path / f"e{i}.nii.gz"
        nib.save(nib.Nifti1Image(base + rng.normal(0, 5, shape).astype(np.float32), np.eye(4)), p)
        experts.append(p)
    return mpath, experts, model


def _predict(mpath, experts, out, *extra) -> int:
    cache = Path(mpath).parent / "cache"
    return cli.main(["predict", "--model", str(mpath), "--experts", *map(str, experts),
                     "--out", str(out), "--cache-dir", str(cache), *extra])


def test_predict_uses_the_model_window_and_refuses_a_contradiction(small_model, tmp_path,
                                                                   capsys):
    mpath, experts, model = small_model
    out = tmp_path / "p.nii.gz"
    assert _predict(mpath, experts, out) == 0
    vols = [read_nifti(p)[0] for p in experts]
    np.testing.assert_allclose(nib.load(out).get_fdata(dtype=np.float32),
                               predict_volume(vols, model, window="flat"), rtol=1e-6, atol=1e-4)
    capsys.readouterr()
    rc = _predict(mpath, experts, tmp_path / "q.nii.gz", "--window", "hann")
    err = capsys.readouterr().err
    assert rc == 2 and "--window hann contradicts" in err and "flat" in err
    assert not (tmp_path / "q.nii.gz").exists()


def test_predict_out_checks(small_model, tmp_path, capsys):
    mpath, experts, _ = small_model
    (tmp_path / "alias.nii.gz").symlink_to(experts[0])
    before = experts[1].read_bytes()
    cases = [
        (experts[1], "is the input"),
        (tmp_path / "alias.nii.gz", "is the input"),  # a symlink to an expert
        (mpath, "must end in .nii"),
        (tmp_path, "is a folder"),
        (str(tmp_path / "newdir") + "/", "must end in .nii"),  # argparse's Path drops the /
        (tmp_path / "noext", "must end in .nii"),
    ]
    for out, msg in cases:
        capsys.readouterr()
        assert _predict(mpath, experts, out) == 2, out
        assert msg in capsys.readouterr().err, out
    assert experts[1].read_bytes() == before
    existing = tmp_path / "exists.nii.gz"
    existing.write_bytes(b"keep")
    assert _predict(mpath, experts, existing) == 2
    assert "--force" in capsys.readouterr().err and existing.read_bytes() == b"keep"
    assert _predict(mpath, experts, existing, "--force") == 0
    assert nib.load(existing).shape == (16, 18, 14)
