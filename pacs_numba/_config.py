"""Package-wide settings: Numba decorator options, dtypes, tolerances, ``PACS_*`` overrides.

Everything a kernel needs from configuration comes from here, so the compiled
code and its cache depend on one small module (see STYLE.md §3).
"""

from __future__ import annotations

import os

import numba
import numpy as np


def _env_flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return raw.strip().lower() not in {"0", "false", "no", "off"}


#: LLVM fast-math flags for every kernel.  No ``nnan``/``ninf``: kernels test
#: ``np.isfinite`` to keep NaN voxels out of masks and statistics.
FASTMATH: set[str] | bool = (
    {"nsz", "arcp", "contract", "afn", "reassoc"} if _env_flag("PACS_FASTMATH", True) else False
)
#: Numba on-disk compile cache (``PACS_NUMBA_CACHE=0`` turns it off).
CACHE: bool = _env_flag("PACS_NUMBA_CACHE", True)
#: Volume dtype everywhere outside the accumulators.
DTYPE = np.float32

#: Floors and epsilons of the reference algorithm (docs/algorithm.md part A).
SD_FLOOR = 1e-8          # A3.2 std floor
EDGE_EPS = 1e-6          # A3.4 max(g) + eps
BLEND_EPS = 1e-8         # A7.4 acc / (den + eps)
SMOOTH_EPS = 1e-8        # A6 renormalisation
ENTROPY_EPS = 1e-10      # A8 entropy map
PSNR_EPS = 1e-12         # A7.6
SSIM_MIN_RANGE = 1e-7    # A7.6 slices with a smaller data range are skipped
BRAIN_THRESHOLD = 0.1    # A7.5 raw-HR threshold of the brain mask

#: Codes the kernels take instead of strings.
GRAD_OPERATORS = {"sobel": 0, "prewitt": 1, "scharr": 2}
WINDOWS = {"flat": 0, "hann": 1}
SSIM_AXES = {"axial": 0, "coronal": 1, "sagittal": 2}

# Numba's default "workqueue" threading layer aborts the process when two Python
# threads launch parallel kernels at once.  "threadsafe" picks omp or tbb.  It must
# be chosen before the first parallel kernel compiles; the engine verifies what it
# got with numba.threading_layer() and degrades to one worker if it is workqueue.
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "threadsafe"
