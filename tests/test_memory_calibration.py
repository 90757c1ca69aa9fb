"""The memory model of ``pacs_numba.memory`` against the peak RSS of real runs (algorithm B5).

A generated cohort (160x192x160, 4 experts, patch 32 / stride 16, lambda_grad 0.2,
lambda_edge 0.25, blends and weight volumes saved; 2 train and 2 test patients) is trained
by ``python -m pacs_numba train`` in fresh processes with ``--workers 1`` and
``--workers 2``, their RSS sampled every 10 ms from here.  Checked:

- the peak of each run is within 30% of ``memory.predict_peak_bytes`` (baseline as the
  engine measures it + the stage's once-per-task memory + width x per-patient memory of the
  heaviest stage);
- the growth of the peak from 1 to 2 workers is within 30% of ``per_patient_bytes`` of that
  stage.

The volume and kernel caches are warmed first, so neither run decompresses or compiles.
The shape is large enough for one patient (~130 MiB) to stand well above allocator noise
(~20 MiB), small enough for the whole test to take ~30 s on two cores.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pacs_numba import memory
from pacs_numba._config import CACHE
from pacs_numba.cohort import make_cohort
from pacs_numba.config import load_config
from pacs_numba.manifest import build_manifest, write_manifest
from pacs_numba.tiling import TileGrid

MiB = 1 << 20
SHAPE = (160, 192, 160)
MODELS = ("BSPLINE", "LINEAR", "NEAREST", "SHARPEN")
PATCH, STRIDE = 32, 16
N_PATIENTS = 4  # kfolds 2: fold 1 has 2 train and 2 test patients
TOLERANCE = 0.30
SAMPLE_S = 0.01

# Runs in a fresh interpreter: what the engine sees when it plans the first pool (imports
# done, Engine started), then warm the volume cache (and the kernel cache if it is cold).
PREPARE = r"""
import json, sys
from pacs_numba import memory
from pacs_numba._config import CACHE
from pacs_numba.config import load_config
from pacs_numba.engine import Engine, RunOptions, thread_safe_layer
from pacs_numba.manifest import select_task

engine = Engine(load_config(sys.argv[1]), RunOptions(cache_dir=sys.argv[2], force=True,
                                                     no_progress=True))
n_kernels, n_cached = memory.kernel_cache_state()
out = {"baseline": memory.baseline_bytes(), "rss": memory.current_rss_bytes(),
       "kernels": n_kernels, "cached": n_cached, "thread_safe": thread_safe_layer()}
task = engine.tasks(fold=1)[0]
if n_cached < n_kernels and sys.argv[3] == "compile":
    engine.train(task)  # compiles into the Numba cache and fills the volume cache
else:
    train, test = select_task(engine.manifest(), 1, task.spacing, task.pulse, engine.models)
    for paths in {**train, **test}.values():
        for path in [paths["HR"], *paths["experts"]]:
            engine.store.get(path)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("memcal")
    cfg_path = make_cohort(root / "cohort", patients=N_PATIENTS, shape=SHAPE, spacings=("3mm",),
                           pulses=("t1c",), models=MODELS, kfolds=2, patch_size=PATCH,
                           stride=STRIDE)
    cfg = load_config(cfg_path)
    write_manifest(build_manifest(cfg.data), cfg.data.out)
    return cfg_path, root / "volumes"


def _prepare(cfg: Path, cache: Path, mode: str) -> dict:
    res = subprocess.run([sys.executable, "-c", PREPARE, str(cfg), str(cache), mode],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _peak_rss(cfg: Path, cache: Path, workers: int) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pacs_numba", "train", "--config", str(cfg), "--fold", "1",
           "--workers", str(workers), "--force", "--no-progress", "--cache-dir", str(cache)]
    env = {**os.environ, "PACS_LOG_LEVEL": "INFO"}  # the pool lines are INFO
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        with memory.RssSampler(SAMPLE_S, pid=proc.pid) as sampler:
            log, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{log}"
    return sampler.peak_bytes, log


def _within(measured: float, predicted: float) -> bool:
    return abs(measured - predicted) <= TOLERANCE * predicted


def test_predicted_peak_and_growth_per_worker(cohort: tuple[Path, Path]) -> None:
    cfg, cache = cohort
    if not CACHE:
        pytest.skip("PACS_NUMBA_CACHE=0: every run would compile the kernels (minutes)")
    if memory.detect_limits().cpus.value < 2:
        pytest.skip("one CPU: the engine caps the pool at one worker")
    prep = _prepare(cfg, cache, "compile")
    if prep["cached"] < prep["kernels"]:
        # It compiled what `train` uses: measure the baseline again with a warm cache (a few
        # kernels `train` never calls may stay uncached; baseline_bytes allows for them).
        prep = _prepare(cfg, cache, "check")
        if prep["cached"] == 0:
            pytest.skip("the Numba cache is not written (read-only?): every run would compile")
    if not prep["thread_safe"]:
        pytest.skip("no thread-safe Numba threading layer (omp/tbb): the engine runs one "
                    "patient at a time")

    p = load_config(cfg).pacs_sr
    grid = TileGrid(SHAPE, p.patch_size, p.stride)
    peaks, preds = {}, {}
    for width in (1, 2):
        peaks[width], log = _peak_rss(cfg, cache, width)
        # The test split (the heaviest stage: it makes the weight maps) ran this wide.
        assert re.search(rf"evaluate fold 1 3mm t1c test: {width} worker\(s\)", log), log
        preds[width] = memory.predict_peak_bytes(
            SHAPE, len(MODELS), width=width, lambda_grad=p.lambda_grad,
            lambda_edge=p.lambda_edge, n_tiles=grid.n_tiles,
            save_weight_volumes=p.save_weight_volumes, baseline=prep["baseline"],
            n_train=N_PATIENTS // 2, n_test=N_PATIENTS - N_PATIENTS // 2,
        )
    report = "; ".join(
        f"--workers {w}: measured peak {peaks[w] / MiB:.0f} MiB, predicted "
        f"{preds[w].describe()} (ratio {peaks[w] / preds[w].peak_bytes:.2f})"
        for w in (1, 2)
    ) + f"; RSS when the engine plans {prep['rss'] / MiB:.0f} MiB"
    print(report)  # shown with -rP
    for w in (1, 2):
        assert _within(peaks[w], preds[w].peak_bytes), report

    stage = preds[2].stage
    growth = peaks[2] - peaks[1]
    per = preds[2].per_patient[stage]
    assert _within(growth, per), (
        f"growth per extra worker: measured {growth / MiB:.0f} MiB, predicted "
        f"per_patient_bytes({stage}) {per / MiB:.0f} MiB (ratio {growth / per:.2f}); {report}"
    )
