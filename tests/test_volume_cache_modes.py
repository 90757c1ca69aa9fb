"""The volume cache's two modes (issue 18, item 6): ``disk`` and ``memory``.

``memory`` (``--volume-cache memory``, ``PACS_NUMBA_VOLUME_CACHE=memory``) decodes each
volume into the process's memory when asked and writes no entry; a cohort trained both
ways gives the same numbers and files.  Also: the memory plan of the mode, the free-space
check at the start of a task, and bad values of the setting.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from collections import namedtuple
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

import pacs_numba.store.volumes as pio
from pacs_numba import cli
from pacs_numba.config import load_config
from pacs_numba.errors import ConfigError
from pacs_numba.resources import costs
from pacs_numba.runs.engine import Engine, RunOptions
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.manifest import build_manifest, select_task, write_manifest
from pacs_numba.store.nifti import read_nifti
from pacs_numba.store.volumes import VOLUME_CACHE_ENV, VolumeStore, volume_cache_mode

SHAPE = (20, 24, 18)


def _nifti(path: Path, seed: int = 0, nan: bool = False) -> Path:
    vol = np.random.default_rng(seed).normal(100.0, 30.0, SHAPE).astype(np.float32)
    if nan:
        vol[0, 0, :3] = np.nan
    nib.save(nib.Nifti1Image(vol, np.diag([1.1, 0.9, 1.3, 1.0])), str(path))
    return path


def _entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.suffix in (".npy", ".json"))


# ------------------------------------------------------------------------------ the store


def test_memory_store_decodes_into_memory_and_writes_nothing(tmp_path):
    src = _nifti(tmp_path / "v.nii.gz", nan=True)
    store = VolumeStore(tmp_path / "cache", mode="memory")
    cv = store.get(src)
    ref, meta = read_nifti(src)
    np.testing.assert_array_equal(cv.data, ref)
    assert cv.data.dtype == np.float32 and cv.data.flags.c_contiguous
    assert cv.data.flags.owndata and not cv.data.flags.writeable
    assert cv.entry is None and cv.nonfinite == 3 and cv.source == src
    assert cv.meta.header_bytes == meta.header_bytes
    assert _entries(tmp_path / "cache") == []
    assert store.read_count == 1
    # held (the volume or only a view of it): the same array, not decoded again
    assert store.get(src).data is cv.data
    view = cv.data[1:, ::2]
    data_id = id(cv.data)
    del cv
    gc.collect()
    again = store.get(str(src))
    assert id(again.data) == data_id and view.base is again.data
    assert store.read_count == 1
    # let go by everyone: freed, and the next request decodes again
    del again, view
    gc.collect()
    assert store._held == {}
    third = store.get(src)
    assert store.read_count == 2
    np.testing.assert_array_equal(third.data, ref)
    assert _entries(tmp_path / "cache") == []


def test_memory_store_sees_a_rewritten_source(tmp_path):
    src = _nifti(tmp_path / "v.nii.gz", seed=2)
    store = VolumeStore(tmp_path / "cache", mode="memory")
    first = store.get(src)
    _nifti(src, seed=3)  # rewritten while the old volume is still held
    second = store.get(src)
    np.testing.assert_array_equal(second.data, read_nifti(src)[0])
    assert not np.array_equal(first.data, second.data) and store.read_count == 2


# ------------------------------------------------------------------------------ the setting


def test_mode_from_argument_then_environment_then_disk(tmp_path, monkeypatch):
    monkeypatch.delenv(VOLUME_CACHE_ENV, raising=False)
    assert volume_cache_mode() == "disk"
    assert VolumeStore(tmp_path / "c").mode == "disk"
    monkeypatch.setenv(VOLUME_CACHE_ENV, " Memory ")
    assert VolumeStore(tmp_path / "c").mode == "memory"
    assert VolumeStore(tmp_path / "c", mode="disk").mode == "disk"
    monkeypatch.setenv(VOLUME_CACHE_ENV, "")
    assert volume_cache_mode() == "disk"


def test_bad_mode_is_one_clear_error_naming_the_setting(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(VOLUME_CACHE_ENV, "ram")
    with pytest.raises(ConfigError, match=r"PACS_NUMBA_VOLUME_CACHE='ram' is not a volume "
                                          r"cache mode; expected one of disk, memory"):
        VolumeStore(tmp_path / "c")
    with pytest.raises(ConfigError, match=r"--volume-cache='tape'"):
        VolumeStore(tmp_path / "c", mode="tape")
    with caplog.at_level(logging.ERROR):
        rc = cli.main(["cache", "info", "--cache-dir", str(tmp_path / "c")])
    assert rc == 2
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "PACS_NUMBA_VOLUME_CACHE='ram' is not a volume cache mode; expected one of disk, "
        "memory (disk: decoded once into the cache folder; memory: decoded per patient, "
        "nothing written)"]


def test_cli_option_rejects_other_values(capsys):
    assert cli.main(["cache", "info", "--volume-cache", "ram"]) == 2
    assert "argument --volume-cache: invalid choice: 'ram' (choose from disk, memory)" in (
        capsys.readouterr().err.replace("'disk', 'memory'", "disk, memory"))


def test_cli_option_holds_for_the_command_only(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(VOLUME_CACHE_ENV, "disk")
    seen = []
    monkeypatch.setattr(pio.VolumeStore, "info", lambda self: seen.append(self.mode) or {})
    assert cli.main(["cache", "info", "--cache-dir", str(tmp_path / "c"),
                     "--volume-cache", "memory"]) == 0
    assert seen == ["memory"]
    assert pio.os.environ[VOLUME_CACHE_ENV] == "disk"


# ------------------------------------------------------------------------------ free space

_Usage = namedtuple("_Usage", "total used free")


def test_check_space_warns_before_the_disk_fills(tmp_path, monkeypatch, caplog):
    srcs = [_nifti(tmp_path / f"v{i}.nii.gz", seed=i) for i in range(3)]
    store = VolumeStore(tmp_path / "cache")
    store.get(srcs[0])
    n = math.prod(SHAPE)
    one = 4 * n + pio.ENTRY_OVERHEAD_BYTES
    monkeypatch.delenv("PACS_NUMBA_CACHE_MAX", raising=False)
    monkeypatch.setattr(pio.shutil, "disk_usage", lambda p: _Usage(10**9, 0, 2 * one))
    with caplog.at_level(logging.INFO, logger="pacs_numba.store.volumes"):
        need = store.check_space("task t", srcs, n)
    assert need == {"inputs": 3, "cached": 1, "needed_bytes": 2 * one, "free_bytes": 2 * one,
                    "limit_bytes": -1}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "task t: volume cache" in caplog.text and "1 of 3 inputs cached" in caplog.text

    caplog.clear()  # room for every input: no input is examined, the bound is logged
    monkeypatch.setattr(pio.shutil, "disk_usage", lambda p: _Usage(10**9, 0, 3 * one))
    monkeypatch.setattr(pio, "_identity", lambda p: pytest.fail("examined an input"))
    with caplog.at_level(logging.INFO, logger="pacs_numba.store.volumes"):
        need = store.check_space("task t", srcs, n)
    assert need["needed_bytes"] == 3 * one and "3 inputs, at most" in caplog.text
    monkeypatch.undo()
    monkeypatch.delenv("PACS_NUMBA_CACHE_MAX", raising=False)

    caplog.clear()
    monkeypatch.setattr(pio.shutil, "disk_usage", lambda p: _Usage(10**9, 0, one))
    with caplog.at_level(logging.INFO, logger="pacs_numba.store.volumes"):
        store.check_space("task t", srcs, n)
    warn = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warn) == 1 and "for 2 inputs but its file system has" in warn[0]
    assert "--volume-cache memory" in warn[0] and "PACS_NUMBA_CACHE_MAX" in warn[0]

    caplog.clear()  # a size limit below the free space: the cache evicts, it cannot fill it
    monkeypatch.setenv("PACS_NUMBA_CACHE_MAX", str(one // 2))
    with caplog.at_level(logging.INFO, logger="pacs_numba.store.volumes"):
        store.check_space("task t", srcs, n)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]

    caplog.clear()  # memory: nothing to write, whatever the disk
    monkeypatch.delenv("PACS_NUMBA_CACHE_MAX")
    mem = VolumeStore(tmp_path / "cache", mode="memory")
    with caplog.at_level(logging.INFO, logger="pacs_numba.store.volumes"):
        need = mem.check_space("task t", srcs, n)
    assert need["needed_bytes"] == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "volume cache in memory: 3 inputs decoded per patient" in caplog.text


# ------------------------------------------------------------------------------ memory plan


@pytest.mark.parametrize("stage", ["fit", "evaluate", "predict"])
@pytest.mark.parametrize("shape, m", [((96, 112, 96), 4), ((197, 233, 189), 4),
                                      ((64, 64, 64), 1), ((64, 64, 64), 7)])
def test_memory_mode_charges_held_copies_and_their_decodes(stage, shape, m):
    kw = dict(patch_size=16, stride=8, lambda_grad=0.2, lambda_edge=0.25)
    disk = costs.stage_cost(stage, shape, m, **kw)
    mem = costs.stage_cost(stage, shape, m, volume_cache="memory", **kw)
    n = math.prod(shape)
    volumes = m if stage == "predict" else m + 1
    parallel = 1 if stage == "predict" else (m + 2) // 2
    step = max(disk.steps.values())
    # mapped: every volume whole, but evaluate's one axial pass keeps the HR whole and a
    # slab of each (costs.evaluate_mapped_bytes); a cold cache decodes ``parallel`` at once
    mapped = (costs.evaluate_mapped_bytes(shape, volumes) if stage == "evaluate"
              else 4 * n * volumes)
    if stage == "evaluate":  # and the HR whole while the brain mask reads it
        step = max(step, 4 * n + disk.steps["brain mask"])
    assert mapped <= 4 * n * volumes
    assert disk.per_patient_bytes == max(8 * n * parallel, mapped + step)
    warm = costs.stage_cost(stage, shape, m, cold=False, **kw)
    assert warm.per_patient_bytes == mapped + step
    assert mem.per_patient_bytes == 4 * n * volumes + max(4 * n * parallel, step)
    assert mem.per_patient_bytes >= disk.per_patient_bytes
    assert (mem.per_thread_bytes, mem.per_task_bytes, mem.setup_bytes, mem.steps) == (
        disk.per_thread_bytes, disk.per_task_bytes, disk.setup_bytes, disk.steps)
    with pytest.raises(ValueError, match="volume_cache must be one of"):
        costs.stage_cost(stage, shape, m, volume_cache="tape", **kw)


def test_load_parallelism_is_the_engines_rule():
    assert [costs.load_parallelism(5, t) for t in (0, 1, 2, 3, 8)] == [1, 1, 2, 3, 3]
    assert costs.load_parallelism(2, 4) == 1


# ------------------------------------------------------------------------------ end to end


def _cohort(root: Path) -> Path:
    cfg = make_cohort(root, patients=6, shape=(29, 34, 27), spacings=("3mm",),
                      pulses=("t1c",), seed=5, kfolds=3, patch_size=8, stride=4)
    doc = yaml.safe_load(cfg.read_text())
    doc["pacs_sr"].update(num_workers=2, log_to_file=False, save_weight_maps=True)
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    config = load_config(cfg)
    write_manifest(build_manifest(config.data), config.data.out)
    return cfg


def _outputs(root: Path) -> dict[str, bytes]:
    skip = {"pacs_numba_run.json", "patients.json"}  # timings, completion order
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in skip and "logs" not in p.parts}


def test_a_cohort_trained_both_ways_gives_the_same_numbers_and_files(tmp_path):
    cfg = _cohort(tmp_path / "cohort")
    caches = {m: tmp_path / f"cache-{m}" for m in ("disk", "memory")}
    outs = {m: tmp_path / f"out-{m}" for m in ("disk", "memory")}
    base = ["train", "--config", str(cfg), "--fold", "1", "--no-progress", "--force"]
    assert cli.main([*base, "--cache-dir", str(caches["disk"]),
                     "--out-root", str(outs["disk"])]) == 0
    assert cli.main([*base, "--cache-dir", str(caches["memory"]),
                     "--out-root", str(outs["memory"]), "--volume-cache", "memory"]) == 0
    disk, mem = _outputs(outs["disk"]), _outputs(outs["memory"])
    assert disk.keys() == mem.keys() and any(k.endswith(".nii.gz") for k in disk)
    assert [k for k in disk if disk[k] != mem[k]] == []
    pj = [json.loads(next(o.rglob("patients.json")).read_text()) for o in outs.values()]
    assert pj[0]["per_patient"] == pj[1]["per_patient"]
    # memory: only the statistics cache is on disk
    assert _entries(caches["memory"]) == [] and len(_entries(caches["disk"])) == 2 * 6 * 5
    stats = list((caches["memory"] / "cellstats").glob("*.npz"))
    assert len(stats) == 4  # fold 1's training patients

    # predict (no engine) follows --volume-cache too: the same blend, no entry written
    model = next(outs["disk"].rglob("pacs_model.npz"))
    experts = sorted((tmp_path / "cohort" / "models").rglob("sub-001*.nii.gz"))
    assert len(experts) == 4
    preds = {}
    for mode in ("disk", "memory"):
        preds[mode] = tmp_path / f"pred-{mode}.nii.gz"
        assert cli.main(["predict", "--model", str(model), "--experts", *map(str, experts),
                         "--out", str(preds[mode]), "--cache-dir", str(tmp_path / f"p-{mode}"),
                         "--volume-cache", mode]) == 0
    assert preds["disk"].read_bytes() == preds["memory"].read_bytes()
    assert _entries(tmp_path / "p-memory") == [] and len(_entries(tmp_path / "p-disk")) == 8

    # statistics cached: a second memory run reads each volume only to blend it
    config = load_config(cfg)
    engine = Engine(config, RunOptions(cache_dir=caches["memory"], volume_cache="memory",
                                       out_root=outs["memory"], force=True, no_progress=True))
    task = engine.tasks(fold=1)[0]
    train, test = select_task(engine.manifest(), 1, "3mm", "t1c", engine.models)
    result = engine.train(task)
    assert engine.stats_cache.computed == 0 and engine.stats_cache.loaded == len(train)
    assert engine.store.read_count == (len(train) + len(test)) * (1 + len(engine.models))
    gc.collect()
    assert engine.store._held == {}  # every volume released once its patient was done
    assert result.metrics["test"] == json.loads(
        next(outs["disk"].rglob("metrics.json")).read_text())["test"]
    assert result.plans["evaluate"].cost.per_patient_bytes == costs.stage_cost(
        "evaluate", (29, 34, 27), 4, patch_size=8, stride=4, lambda_grad=0.2,
        lambda_edge=0.25, save_weight_maps=True, n_patients=len(train) + len(test),
        volume_cache="memory").per_patient_bytes
