"""``scripts/slurm_array.sh`` in a fake SLURM environment.

The script runs for real (bash, pacs_numba, a generated cohort) with the SLURM variables an
array task sees, and a PATH shim directory in place of ``srun`` and ``sacct``: the fake
``srun`` records its arguments and environment and then runs the command it was given, as
the real one does inside an allocation.
"""

from __future__ import annotations

import fcntl
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

from pacs_numba.cohort import make_cohort

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_array.sh"
USER = "pacs-tester"
JOB_ID = "4242"

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or shutil.which("bash") is None,
    reason="the SLURM script needs bash on Linux",
)

needs_flock = pytest.mark.skipif(shutil.which("flock") is None, reason="needs flock(1)")

FAKE_SRUN = r"""#!/usr/bin/env bash
# fake srun: record the arguments (NUL-separated) and the environment, drop srun's own
# options, then run the command with the step id a real srun would set
printf '%s\0' "$@" > "${FAKE_SRUN_LOG:?}"
env > "$FAKE_SRUN_LOG.env"
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
export SLURM_STEP_ID=0
exec "$@"
"""

FAKE_SACCT = r"""#!/usr/bin/env bash
# fake sacct: accounting answers only when FAKE_SACCT is set (as if it were enabled)
echo "$*" >> "${FAKE_SACCT_LOG:-/dev/null}"
[[ -n ${FAKE_SACCT:-} ]] || { echo "sacct: accounting storage is disabled" >&2; exit 1; }
j=$SLURM_JOB_ID
printf '%s|\n%s.batch|10240K\n%s.extern|0\n%s.0|1572864K\n' "$j" "$j" "$j" "$j"
"""


FAKE_PACS_NUMBA = r"""#!/usr/bin/env bash
# fake pacs-numba: the real one for build-manifest; a train that runs until SIGTERM and then
# exits 143, as the real one does once its in-flight patients are done
if [[ $1 != train ]]; then exec "${REAL_PYTHON:?}" -m pacs_numba "$@"; fi
trap 'echo "fake train: got SIGTERM" >&2; exit 143' TERM
echo "fake train: running" >&2
sleep 60 &
wait
"""


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated cohort: 4 patients, 1 spacing, 2 pulses, 2 folds -> 4 tasks."""
    root = tmp_path_factory.mktemp("slurm_cohort")
    return make_cohort(root / "cohort", patients=4, shape=(20, 22, 18), spacings=("3mm",),
                       pulses=("t1c", "t2w"), kfolds=2, patch_size=8, stride=4)


@pytest.fixture
def config(cohort: Path, tmp_path: Path) -> Path:
    """The cohort's config with its own manifest and output folder, so tests do not share them."""
    doc = yaml.safe_load(cohort.read_text())
    doc["data"]["out"] = str(tmp_path / "run" / "manifest.json")
    doc["pacs_sr"]["out_root"] = str(tmp_path / "run" / "results")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def shims(tmp_path: Path) -> Path:
    d = tmp_path / "shims"
    d.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("sacct", FAKE_SACCT)):
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    return d


def _env(tmp_path: Path, shims: Path | None, **extra: str) -> dict[str, str]:
    """A clean environment: shims first on PATH, then this Python's scripts folder."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PACS_", "OMP_", "NUMBA_NUM_", "OPENBLAS_", "MKL_"))}
    path = [str(Path(sys.executable).parent), env.get("PATH", "/usr/bin:/bin")]
    if shims is not None:
        path.insert(0, str(shims))
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    env.update(
        PATH=os.pathsep.join(path),
        HOME=str(tmp_path / "home"),
        USER=USER,
        TMPDIR=str(scratch),  # the node-local scratch
        # Share the compiled kernels with the rest of the test-suite: an empty value keeps
        # Numba's default location (next to the sources) unless the runner chose one.
        NUMBA_CACHE_DIR=os.environ.get("NUMBA_CACHE_DIR", ""),
        PACS_LOG_LEVEL="INFO",
    )
    env.update(extra)
    return env


def _slurm(task: int | None, **extra: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": JOB_ID, "SLURM_CPUS_PER_TASK": "1", "SLURM_MEM_PER_NODE": "2048",
           "SLURM_JOB_NAME": "pacs-numba"}
    if task is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(task)
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _srun_args(log: Path) -> list[str]:
    return log.read_text().split("\0")[:-1]


def _srun_env(log: Path) -> dict[str, str]:
    out = {}
    for line in Path(f"{log}.env").read_text().splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


def _after(args: list[str], word: str) -> list[str]:
    return args[args.index(word):]


# --------------------------------------------------------------------------- cheap checks
def test_list_prints_mapping_and_array_range(config: Path, tmp_path: Path) -> None:
    res = _run(["--list", str(config)], _env(tmp_path, None))
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines() if line.split()[:1] and
            line.split()[0].isdigit()]
    assert rows == [["0", "1", "3mm", "t1c"], ["1", "1", "3mm", "t2w"],
                    ["2", "2", "3mm", "t1c"], ["3", "2", "3mm", "t2w"]]
    assert "2 folds x 1 spacings (3mm) x 2 pulses (t1c t2w) = 4 tasks" in res.stdout
    assert "data.kfolds" in res.stdout  # no manifest yet
    assert f"sbatch --array=0-3 {SCRIPT} {config}" in res.stdout
    assert not (tmp_path / "run" / "manifest.json").exists()


@pytest.mark.parametrize(("task", "message"), [
    ("4", "SLURM_ARRAY_TASK_ID=4 is out of range"),
    ("-1", "is not a task id"),
    (None, "no task id"),
])
def test_bad_task_id_exits_2_before_any_work(config: Path, tmp_path: Path, shims: Path,
                                             task: str | None, message: str) -> None:
    log = tmp_path / "srun.args"
    env = _env(tmp_path, shims, **_slurm(None), FAKE_SRUN_LOG=str(log))
    if task is not None:
        env["SLURM_ARRAY_TASK_ID"] = task
    res = _run([str(config)], env)
    assert res.returncode == 2
    assert message in res.stderr
    assert "--array=0-3" in res.stderr
    assert not log.exists()  # nothing was launched
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert not list((tmp_path / "scratch").glob("pacs_numba_slurm.*"))  # no temp dir left


def test_dry_run_environment(config: Path, tmp_path: Path, shims: Path) -> None:
    env = _env(tmp_path, shims, **_slurm(3, SLURM_CPUS_PER_TASK="3"))
    del env["NUMBA_CACHE_DIR"]  # unset: the per-user default under $HOME
    res = _run(["--dry-run", str(config), "--", "--workers", "2"], env)
    assert res.returncode == 0, res.stderr
    out = dict(line.split("=", 1) for line in res.stdout.splitlines()
               if line.split("=", 1)[0] in {"NUMBA_CACHE_DIR", "PACS_NUMBA_CACHE_DIR"})
    assert "task=3 fold=2 spacing=3mm pulse=t2w" in res.stdout
    assert "NUMBA_NUM_THREADS=3 OMP_NUM_THREADS=3" in res.stdout
    assert out["NUMBA_CACHE_DIR"] == str(tmp_path / "home" / ".cache" / "pacs_numba" / "numba")
    scratch_cache = tmp_path / "scratch" / f"pacs_numba-{USER}" / "volumes"
    assert out["PACS_NUMBA_CACHE_DIR"] == str(scratch_cache)
    command = next(line for line in res.stdout.splitlines() if line.startswith("command: "))
    assert command.startswith("command: srun --nodes=1 --ntasks=1 --cpus-per-task=3 ")
    assert command.endswith(f"train --config {config} --fold 2 --spacing 3mm --pulse t2w "
                            "--resume --no-progress --workers 2")
    # by hand, outside SLURM: no srun, threads from the affinity mask, the cache dir as given
    env = _env(tmp_path, shims, PACS_NUMBA_CACHE_DIR=str(tmp_path / "mine"))
    res = _run(["--dry-run", "--task", "0", str(config)], env)
    assert res.returncode == 0, res.stderr
    n = len(os.sched_getaffinity(0))
    assert f"NUMBA_NUM_THREADS={n} OMP_NUM_THREADS={n}" in res.stdout
    assert f"PACS_NUMBA_CACHE_DIR={tmp_path / 'mine'}" in res.stdout
    assert "command: pacs-numba train" in res.stdout or "command: " + sys.executable in res.stdout


@needs_flock
def test_waits_for_the_manifest_lock_and_reuses_the_manifest(
        config: Path, tmp_path: Path, shims: Path) -> None:
    """A task that finds the lock taken waits, then uses the manifest the holder built."""
    from pacs_numba.config import load_config
    from pacs_numba.manifest import build_manifest, write_manifest

    manifest = tmp_path / "run" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    env = _env(tmp_path, shims, **_slurm(0), FAKE_SRUN_LOG=str(tmp_path / "srun.args"))
    with open(f"{manifest}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # what flock(1) in another task would hold
        # `--workers 0` makes train stop at once with a usage error: only the manifest matters
        proc = subprocess.Popen(["bash", str(SCRIPT), str(config), "--", "--workers", "0"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        head = ""
        try:
            # wait until the script is at the lock (readline returns "" if it exits first)
            while "taking the lock" not in head:
                line = proc.stderr.readline()
                if not line:
                    break
                head += line
            time.sleep(0.3)  # let it block in flock
            assert proc.poll() is None, head
            write_manifest(build_manifest(load_config(config).data), manifest)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=120)
    err = head + err
    assert "taking the lock" in err
    assert "was built by another task while this one waited" in err
    assert "building manifest" not in err
    assert proc.returncode == 2  # train's usage error, passed through
    assert "exit code:   2, usage, config or input error" in out
    assert "summary task=0 fold=1 spacing=3mm pulse=t1c exit=2" in out


def test_failed_manifest_build_still_prints_the_summary(
        config: Path, tmp_path: Path, shims: Path) -> None:
    doc = yaml.safe_load(config.read_text())
    doc["data"]["hr-root"] = str(tmp_path / "no-such-folder")
    config.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = _env(tmp_path, shims, **_slurm(1), FAKE_SRUN_LOG=str(tmp_path / "srun.args"))
    res = _run([str(config)], env)
    assert res.returncode == 2
    assert "building the manifest failed (exit 2)" in res.stderr
    assert "in the manifest stage, before training" in res.stdout
    assert "summary task=1 fold=1 spacing=3mm pulse=t2w exit=2" in res.stdout
    assert not (tmp_path / "srun.args").exists()


def test_sigterm_stops_the_task_and_still_prints_the_summary(
        config: Path, tmp_path: Path, shims: Path) -> None:
    """SLURM's time limit (SIGTERM to the whole step): exit 143 passed on, summary printed."""
    (shims / "pacs-numba").write_text(FAKE_PACS_NUMBA)
    (shims / "pacs-numba").chmod(0o755)
    env = _env(tmp_path, shims, **_slurm(3), FAKE_SRUN_LOG=str(tmp_path / "srun.args"),
               REAL_PYTHON=sys.executable)
    proc = subprocess.Popen(["bash", str(SCRIPT), str(config)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    head = ""
    try:
        while "fake train: running" not in head:
            line = proc.stderr.readline()
            if not line:
                break
            head += line
        assert proc.poll() is None, head
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = head + err
    assert proc.returncode == 143, err
    assert "fake train: got SIGTERM" in err
    assert "exit code:   143, stopped by SIGTERM" in out
    assert "(max RSS of pacs-numba)" in out
    assert "summary task=3 fold=2 spacing=3mm pulse=t2w exit=143" in out
    assert not list((tmp_path / "scratch").glob("pacs_numba_slurm.*"))


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
@needs_flock
def test_two_array_tasks_end_to_end(config: Path, tmp_path: Path, shims: Path) -> None:
    """Tasks 1 and 2 start together: one manifest build, the right task each, a summary each."""
    logs = {t: tmp_path / f"srun-{t}.args" for t in (1, 2)}
    envs = {t: _env(tmp_path, shims, **_slurm(t), FAKE_SRUN_LOG=str(logs[t]),
                    FAKE_SACCT_LOG=str(tmp_path / f"sacct-{t}.log")) for t in (1, 2)}
    envs[1]["FAKE_SACCT"] = "1"  # task 1 has accounting, task 2 falls back to its own figure
    procs = {t: subprocess.Popen(["bash", str(SCRIPT), str(config)], env=envs[t],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for t in (1, 2)}
    res = {t: p.communicate(timeout=300) for t, p in procs.items()}
    for t, p in procs.items():
        assert p.returncode == 0, res[t][1][-3000:]

    # the manifest was built by exactly one of the two
    errs = res[1][1] + res[2][1]
    assert errs.count("slurm_array: building manifest") == 1
    assert errs.count("slurm_array: manifest built") == 1
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert len(manifest["folds"]) == 2

    # each task ran its own (fold, spacing, pulse) and nothing else
    spacing_dir = tmp_path / "run" / "results" / "PaCS_SR" / "3mm"
    done = {(p.parent.name, p.name) for p in (spacing_dir / "model_data").glob("fold_*/*")}
    assert done == {("fold_1", "t2w"), ("fold_2", "t1c")}
    for fold, pulse in done:
        for name in ("metrics.json", "weights.json"):
            assert (spacing_dir / "model_data" / fold / pulse / name).is_file()
    expected = {f"{pid}-t2w.nii.gz" for pid in manifest["folds"][0]["test"]}
    expected |= {f"{pid}-t1c.nii.gz" for pid in manifest["folds"][1]["test"]}
    assert {p.name for p in (spacing_dir / "output_volumes").iterdir()} == expected

    # srun got the task's CPUs and the train command; threads and caches were set for it
    scratch_cache = tmp_path / "scratch" / f"pacs_numba-{USER}" / "volumes"
    for t, (fold, pulse) in {1: (1, "t2w"), 2: (2, "t1c")}.items():
        args = _srun_args(logs[t])
        assert args[:3] == ["--nodes=1", "--ntasks=1", "--cpus-per-task=1"]
        assert _after(args, "train") == ["train", "--config", str(config), "--fold", str(fold),
                                         "--spacing", "3mm", "--pulse", pulse, "--resume",
                                         "--no-progress"]
        env = _srun_env(logs[t])
        assert env["NUMBA_NUM_THREADS"] == env["OMP_NUM_THREADS"] == "1"
        assert env["OPENBLAS_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "1"
        assert env["PACS_NUMBA_CACHE_DIR"] == str(scratch_cache)
        out = res[t][0]
        assert "==== pacs-numba task summary ====" in out
        assert "exit code:   0, success" in out
        assert f"summary task={t} fold={fold} spacing=3mm pulse={pulse} exit=0" in out
        assert f"fold {fold} 3mm {pulse}:" in out  # pacs-numba's own result line
    assert list(scratch_cache.glob("*.npy"))  # the volumes were cached on the scratch
    assert not list((tmp_path / "scratch").glob("pacs_numba_slurm.*"))  # temp dirs removed

    # peak memory: sacct's MaxRSS of the step when accounting answers, else the measured RSS
    assert "peak memory: 1.50 GiB (sacct MaxRSS, job 4242 step 0)" in res[1][0]
    assert "peak_source=sacct" in res[1][0]
    assert f"-j {JOB_ID}" in (tmp_path / "sacct-1.log").read_text()
    assert "(max RSS of pacs-numba)" in res[2][0]
    assert "peak_source=maxrss" in res[2][0]
