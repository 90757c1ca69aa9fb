"""Outputs must not depend on the BLAS thread count.

``scripts/slurm_array.sh`` runs pacs-numba with ``OPENBLAS_NUM_THREADS=1`` (BLAS must not
compete with Numba for the cores), while a plain run leaves OpenBLAS at its default.  A BLAS
dot product splits a long sum between its threads, so any statistic computed with one would
change in its last digit between the two.  These tests run the same computation in two fresh
processes, with 1 and 2 OpenBLAS threads, and compare the files byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Writes {out}: the weight-analysis npz of a test patient exactly as the engine composes it
# (weight maps -> statistics from the tile weights -> template bytes -> file).  32^3 tiles:
# OpenBLAS only splits a dot product between threads above ~10,000 elements.
WRITE_ANALYSIS = r"""
import sys
import numpy as np
from pacs_numba.core.blending import weight_analysis, weight_maps
from pacs_numba.store.atomic import atomic_savez_from, npz_bytes
from pacs_numba.core.tiling import TileGrid

grid = TileGrid((64, 64, 64), 4, 2)
rng = np.random.default_rng(7)
w = rng.dirichlet(np.ones(3), grid.n_tiles).astype(np.float32)
names = ["BSPLINE", "LINEAR", "NEAREST"]
analysis = weight_analysis(weight_maps(w, grid), names, tiles=(w, grid))
atomic_savez_from(sys.argv[1], npz_bytes(**analysis), patient_id=np.asarray("sub-001"))
"""


def _env(blas_threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENBLAS_", "OMP_", "MKL_", "GOTO_"))}
    env["OPENBLAS_NUM_THREADS"] = str(blas_threads)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2,
                    reason="OpenBLAS uses one thread whatever it is told on a single CPU")
def test_weight_analysis_npz_is_byte_identical_with_1_and_2_blas_threads(tmp_path: Path) -> None:
    files = {}
    for n in (1, 2):
        files[n] = tmp_path / f"analysis-{n}.npz"
        res = subprocess.run([sys.executable, "-c", WRITE_ANALYSIS, str(files[n])],
                             env=_env(n), capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
    assert files[1].read_bytes() == files[2].read_bytes()
