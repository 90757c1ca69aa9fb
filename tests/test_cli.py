"""The command line a person expects: one ERROR line per mistake, help that helps, runs go on.

CLI tests call ``cli.main([...])`` and check the exit code and stderr.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pacs_numba
from pacs_numba import cli
from pacs_numba.errors import InputError
from pacs_numba.runs import checks
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.modelfile import read_weights_json

SHAPE = (20, 22, 18)


@pytest.fixture(autouse=True)
def _info_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACS_LOG_LEVEL", "INFO")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 6-patient, 3-fold cohort (3 tasks); cases copy it."""
    root = tmp_path_factory.mktemp("pristine")
    cfg = make_cohort(root, patients=6, shape=SHAPE, spacings=("3mm",), pulses=("t1c",),
                      seed=3, kfolds=3, patch_size=8, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=2, log_to_file=False)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    return root


@pytest.fixture
def cohort(pristine: Path, tmp_path: Path) -> Path:
    """A private copy of the cohort with its paths rewritten; returns its config."""
    dest = tmp_path / "cohort"
    shutil.copytree(pristine, dest)
    cfg = dest / "config.yaml"
    text = cfg.read_text().replace(str(pristine), str(dest))
    cfg.write_text(text)
    assert cli.main(["build-manifest", "--config", str(cfg)]) == 0
    return cfg


def _run(cfg: Path, *args: str) -> int:
    cache = cfg.parent / "cache"
    return cli.main([args[0], "--config", str(cfg), "--cache-dir", str(cache), "--no-progress",
                     *args[1:]])


# --------------------------------------------------------------------------------------
# weights.json
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "vec",
    [["0.5", "0.5"], {"a": 0.5, "b": 0.5}, "0.5,0.5", [[0.5], [0.5]], [True, False], None, 0.5],
)
def test_weights_json_with_non_numbers_names_file_and_tile(tmp_path: Path, vec: object) -> None:
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"0": [0.5, 0.5], "3": vec}))
    with pytest.raises(InputError) as info:
        read_weights_json(path, n_tiles=8, n_models=2)
    msg = str(info.value)
    assert str(path) in msg and "tile 3 has" in msg
    assert "expected a list of 2 finite numbers" in msg
    assert "\n" not in msg


def test_weights_json_good_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"1": [0.25, 0.75], "2": [1, 0]}))
    w, learned = read_weights_json(path, n_tiles=3, n_models=2)
    assert learned.tolist() == [False, True, True]
    assert w.tolist() == [[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]]


# --------------------------------------------------------------------------------------
# A log file that cannot be written
# --------------------------------------------------------------------------------------
@pytest.fixture
def _root_logging():
    """Leave the root logger as it was (setup_logging and add_file_log change it)."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def _log_through_a_failing_file(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    import logging

    from pacs_numba.cli.logsetup import add_file_log, setup_logging

    setup_logging(logging.INFO)
    assert add_file_log(path) is not None
    log = logging.getLogger("pacs_numba.test")
    for i in range(9):
        log.info("record %d %s", i, "x" * 4000)
    return capsys.readouterr().err


def _one_failure_line_then_stderr(err: str, path: Path) -> None:
    assert "Logging error" not in err and "Traceback" not in err, err[:2000]
    failures = [ln for ln in err.splitlines() if "cannot write the log file" in ln]
    assert len(failures) == 1, err[:2000]
    assert " ERROR " in failures[0] and str(path) in failures[0]
    assert "No space left on device" in failures[0]
    assert "logging continues on stderr only" in failures[0]
    # every record still reached stderr
    assert all(f"record {i} " in err for i in range(9))


def test_log_file_on_dev_full_fails_once_and_logging_goes_on(
    _root_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path("/dev/full")
    if not path.exists():
        pytest.skip("no /dev/full on this system")
    _one_failure_line_then_stderr(_log_through_a_failing_file(path, capsys), path)


@pytest.fixture
def full_tmpfs(tmp_path: Path):
    """A real 64 KiB tmpfs, filled up (needs root; skipped otherwise)."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        (mnt / "logs").mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass  # ENOSPC: full
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_log_file_on_a_full_disk_fails_once_and_logging_goes_on(
    _root_logging: None, full_tmpfs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = full_tmpfs / "logs" / "run.log"
    _one_failure_line_then_stderr(_log_through_a_failing_file(path, capsys), path)


def test_log_file_that_cannot_be_created_is_one_warning(
    _root_logging: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import logging

    from pacs_numba.cli.logsetup import add_file_log, setup_logging

    setup_logging(logging.INFO)
    (tmp_path / "file").write_text("")
    assert add_file_log(tmp_path / "file" / "logs" / "run.log") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and " WARNING " in err and "cannot create the log file" in err


# --------------------------------------------------------------------------------------
# Multi-task runs
# --------------------------------------------------------------------------------------
def test_existing_task_does_not_stop_the_others(cohort: Path, capsys) -> None:
    # issue 11.4: after a --fold 1 run, a run of every task refused fold 1 and stopped
    assert _run(cohort, "train", "--fold", "1", "--no-expert-table") == 0
    capsys.readouterr()
    assert _run(cohort, "train", "--no-expert-table") == 2
    out, err = capsys.readouterr()
    table = out[out.index("tasks: 2 of 3 done"):].splitlines()
    assert re.match(r"\s+task\s+state\s+detail", table[1])
    assert re.match(r"\s+fold 1 3mm t1c\s+failed\s+outputs of fold 1 3mm t1c already exist",
                    table[2])
    assert re.match(r"\s+fold 2 3mm t1c\s+done\s+test PSNR", table[3])
    assert re.match(r"\s+fold 3 3mm t1c\s+done\s+test PSNR", table[4])
    assert "1 of 3 tasks did not finish: fold 1 3mm t1c failed" in err
    assert "Traceback" not in err
    results = cohort.parent / "results" / "PaCS_SR" / "3mm" / "model_data"
    assert all((results / f"fold_{k}" / "t1c" / "metrics.json").exists() for k in (1, 2, 3))


def test_single_task_keeps_its_exit_code_and_prints_the_expert_table(cohort: Path, capsys) -> None:
    assert _run(cohort, "train", "--fold", "2") == 0
    out = capsys.readouterr().out
    assert "fold 2 3mm t1c:\ntest metrics, mean over 2 patient(s):" in out
    for name in ("BSPLINE", "LINEAR", "NEAREST", "SHARPEN", "PaCS-SR", r"PaCS-SR \(HR-free\)"):
        assert re.search(rf"^    {name}\s+\d+\.\d{{3}}\s+0\.\d{{4}}$", out, re.M), name
    # one block per protocol, each with its own best expert and gain
    assert out.count("gain over the best single expert") == 2
    assert "published protocol: HR statistics and HR brain mask" in out
    assert "tasks:" not in out  # no state table for one task
    assert _run(cohort, "train", "--fold", "2") == 2  # outputs exist
    err = capsys.readouterr().err
    assert "--force" in err and "--resume" in err


def test_evaluate_on_existing_outputs_suggests_what_evaluate_accepts(cohort: Path, capsys) -> None:
    assert _run(cohort, "train", "--fold", "1", "--no-expert-table") == 0
    capsys.readouterr()
    args = ("--fold", "1", "--spacing", "3mm", "--pulse", "t1c")
    assert _run(cohort, "evaluate", *args) == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--force" in err and "--resume" not in err
    other = cohort.parent / "weights.json"
    shutil.copy(cohort.parent / "results/PaCS_SR/3mm/model_data/fold_1/t1c/weights.json", other)
    assert _run(cohort, "evaluate", *args, "--weights", str(other)) == 2
    err = capsys.readouterr().err
    assert "--out-root" in err and "--resume" not in err
    assert _run(cohort, "evaluate", *args, "--force") == 0


# --------------------------------------------------------------------------------------
# Help and usage
# --------------------------------------------------------------------------------------
SUBCOMMANDS = ["train", "evaluate", "build-manifest", "make-cohort", "demo", "predict", "cache",
               "diagnose"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_a_description_and_every_option_help(command: str) -> None:
    parser = cli.build_parser()
    sub = parser.subparsers[command]
    assert sub.description and "``" not in sub.description
    text = sub.format_help()
    assert "``" not in text
    for action in sub._actions:
        assert action.help, (command, action.option_strings)
        needs_default = (action.option_strings and action.nargs != 0 and not action.required
                         and action.default is not None)
        if needs_default:
            assert "default" in sub._get_formatter()._get_help_string(action), action.dest
    # --cache-dir is not a logging option
    groups = {a.dest: g.title for g in sub._action_groups for a in g._group_actions}
    assert groups["cache_dir"] == "caches"


def test_evaluate_help_says_spacing_and_pulse_are_required(capsys) -> None:
    assert cli.main(["evaluate", "--help"]) == 0
    out = capsys.readouterr().out
    spacing = out[out.index("  --spacing"):out.index("  --pulse")]
    assert "default" not in spacing and "required" in out


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["train", "--config", "c.yaml", "--fodl", "1"], "did you mean --fold?"),
        (["evaluate", "--config", "c", "--fold", "1", "--spacing", "3mm", "--pulse", "t1c",
          "--weigths", "w.json"], "did you mean --weights?"),
        (["make-cohort", "--out", "x", "--patiens", "3"], "did you mean --patients?"),
        (["diagnose", "--warm-up"], "did you mean --warmup?"),
        (["trian", "--config", "c.yaml"], "did you mean train?"),
    ],
)
def test_mistyped_option_shows_the_subcommand_usage_and_a_suggestion(argv, hint, capsys) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    if argv[0] in SUBCOMMANDS:
        assert err.startswith(f"usage: pacs-numba {argv[0]} ")
        assert "unrecognized arguments" in err
    assert hint in err


# --------------------------------------------------------------------------------------
# make-cohort and demo
# --------------------------------------------------------------------------------------
def test_make_cohort_refuses_a_non_empty_folder_without_force(tmp_path: Path, capsys) -> None:
    out = tmp_path / "c"
    argv = ["make-cohort", "--out", str(out), "--patients", "3", "--shape", "12", "12", "12",
            "--kfolds", "2"]
    assert cli.main(argv) == 0
    cfg = out / "config.yaml"
    cfg.write_text(cfg.read_text() + "# my edit\n")
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "is not empty" in err and "--force" in err
    assert cfg.read_text().endswith("# my edit\n")  # untouched
    assert cli.main([*argv, "--force"]) == 0
    assert not cfg.read_text().endswith("# my edit\n")


def test_demo_reuses_its_cohort_and_keeps_its_cache_inside(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--patients", "4", "--shape", "20", "22", "18",
            "--no-progress"]
    assert cli.main(argv) == 0
    first = capsys.readouterr()
    assert "reusing the cohort" not in first.err
    hr = sorted((out / "cohort" / "hr").rglob("*.nii.gz"))
    mtimes = [p.stat().st_mtime_ns for p in hr]
    assert (out / "cache").is_dir() and any((out / "cache").iterdir())
    assert cli.main(argv) == 0
    second = capsys.readouterr()
    assert "reusing the cohort" in second.err
    assert [p.stat().st_mtime_ns for p in hr] == mtimes  # not regenerated
    # same table (the timing line aside)
    strip = lambda text: [ln for ln in text.splitlines() if not ln.startswith("took ")]  # noqa: E731
    assert strip(second.out) == strip(first.out)
    # other settings: a new cohort, with no patient of the old one left over
    assert cli.main([*argv[:3], "--patients", "5", *argv[5:]]) == 0
    assert "reusing the cohort" not in capsys.readouterr().err
    assert len(list((out / "cohort" / "hr").iterdir())) == 5


# --------------------------------------------------------------------------------------
# diagnose and the compile cache
# --------------------------------------------------------------------------------------
PKG_PARENT = str(Path(pacs_numba.__file__).resolve().parents[1])  # the package under test
REPO_ROOT = str(Path(__file__).resolve().parents[1])  # has a ./pacs_numba that could shadow


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = os.pathsep.join([PKG_PARENT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def _console_script() -> str:
    script = shutil.which("pacs-numba")
    if script is None:
        pytest.skip("no pacs-numba command on PATH (install the package)")
    return script


def test_diagnose_warns_when_the_command_imports_another_copy(tmp_path: Path) -> None:
    _console_script()
    fake = tmp_path / "shadow" / "pacs_numba"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    env = _env(PYTHONPATH=str(fake.parent))
    [(level, name, msg)] = checks.check_package(env)
    assert (level, name) == ("warn", "package")
    assert str(fake) in msg and "compile the kernels again" in msg
    [(level, _, msg)] = checks.check_package(_env())
    assert level == "ok" and str(Path(pacs_numba.__file__).parent.resolve()) in msg


def test_warmup_then_a_task_from_the_repository_root_compiles_nothing(cohort: Path) -> None:
    # issue 11.1: the warm-up and the task must load the same package, so that the
    # task finds every kernel in the compile cache.  Both run as the installed command,
    # from the repository root (where ./pacs_numba could shadow it).
    script = _console_script()
    env = _env()
    diag = subprocess.run([script, "diagnose", "--warmup", "--json"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    checks = {c["check"]: c for c in json.loads(diag.stdout)["checks"]}
    assert checks["package"]["level"] == "ok", checks["package"]
    assert checks["warmup"]["level"] == "ok", checks["warmup"]
    train = subprocess.run(
        [script, "train", "--config", str(cohort), "--fold", "1", "--no-progress",
         "--no-expert-table", "--cache-dir", str(cohort.parent / "cache"), "-v"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "kernels loaded from the compile cache" in train.stderr
    assert "compiling kernels" not in train.stderr
    assert "no kernel compiled during the run" in train.stderr


# --------------------------------------------------------------------------------------
# Progress bars, log lines and sizes
# --------------------------------------------------------------------------------------
def test_log_lines_are_written_above_an_open_bar(_root_logging: None, capsys) -> None:
    import logging

    from tqdm import tqdm

    from pacs_numba.cli.logsetup import setup_logging

    setup_logging(logging.INFO)
    bar = tqdm(total=4, desc="fit", unit="patients", file=sys.stderr, leave=False)
    bar.update(1)
    bar.refresh()
    logging.getLogger("pacs_numba.test").info("patient=sub-001 secs=1.0")
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    pieces = re.split(r"[\r\n]", err)
    # the record is a piece of its own: not glued to the bar's text on the same line
    assert any(re.fullmatch(r"\d{4}-\d\d-\d\d [\d:,]+ INFO \S+ pacs_numba\.test: "
                            r"patient=sub-001 secs=1\.0", p) for p in pieces), repr(err)
    assert not any("patients/s]" in p and "INFO" in p for p in pieces), repr(err)
    # the closed bar (leave=False) is wiped: the output ends without a bar's text
    assert "1/4" not in pieces[-1] and "2/4" not in pieces[-1]


def test_sizes_are_human_readable(tmp_path: Path, capsys) -> None:
    from pacs_numba.resources.units import human_size

    assert human_size(3632128033) == "3.4 GiB"
    assert human_size(0) == "0 B" and human_size(1023) == "1023 B"
    assert human_size(5 * 2**20) == "5.0 MiB"
    cache = tmp_path / "cache"
    assert cli.main(["cache", "info", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^size: \d+(\.\d)? (B|KiB|MiB|GiB) \(\d+ bytes\)$", out, re.M), out
    assert "total_bytes" not in out


# --------------------------------------------------------------------------------------
# Many experts
# --------------------------------------------------------------------------------------
def test_fifteen_experts_train_end_to_end(tmp_path: Path, capsys) -> None:
    # issue 11.2: 15 experts used to fail with a ValueError after the statistics stage
    models = tuple(f"E{i:02d}" for i in range(1, 16))
    cfg = make_cohort(tmp_path / "c", patients=4, shape=(16, 16, 12), spacings=("3mm",),
                      pulses=("t1c",), models=models, seed=1, kfolds=2, patch_size=8, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(log_to_file=False, save_weight_volumes=False)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert cli.main(["build-manifest", "--config", str(cfg)]) == 0
    assert _run(cfg, "train", "--fold", "1", "--no-expert-table") == 0, capsys.readouterr().err
    mdir = tmp_path / "c" / "results" / "PaCS_SR" / "3mm" / "model_data" / "fold_1" / "t1c"
    weights = json.loads((mdir / "weights.json").read_text())
    assert weights
    for vec in weights.values():
        assert len(vec) == 15 and min(vec) >= 0 and abs(sum(vec) - 1) < 1e-5
