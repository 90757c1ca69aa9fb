"""Compile-cache identity (issue 7): one cache folder per build of the kernels.

Numba's own cache key (signature, bytecode, source file) ignores fast-math flags and the
constants a kernel reads from ``_config``; ``_config`` therefore puts the cache in a folder
named by a digest of them, under the user's ``NUMBA_CACHE_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pacs_numba import _config

ROOT = Path(__file__).resolve().parents[1]

# One small serial kernel with floating-point arithmetic: compiles in about a second.
PROBE = """
import json, warnings
import numpy as np
from pacs_numba import _config
from pacs_numba.kernels.blend import _entropy_dominant_one as k
k(np.array([0.25, 0.75], np.float32), np.float32(1e-10))
s = k.stats
misses = sum(s.cache_misses.values())
ir = "".join(k.inspect_llvm().values()) if misses else ""  # cached code has no IR
print(json.dumps({"dir": str(_config.KERNEL_CACHE_DIR),
                  "hits": sum(s.cache_hits.values()), "misses": misses,
                  "fast_ir": " reassoc " in ir}))
"""


def _probe(base: Path, fastmath: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "PACS_"))}
    env.update(
        NUMBA_CACHE_DIR=str(base),
        PACS_FASTMATH=fastmath,
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    res = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_fastmath_flip_on_a_warm_cache_runs_the_other_build(tmp_path):
    fast = _probe(tmp_path, "1")
    assert (fast["misses"], fast["hits"], fast["fast_ir"]) == (1, 0, True)
    assert Path(fast["dir"]).parent == tmp_path  # the user's NUMBA_CACHE_DIR is the base

    # The fast-math build is now cached; PACS_FASTMATH=0 must compile its own, not load it.
    exact = _probe(tmp_path, "0")
    assert (exact["misses"], exact["hits"], exact["fast_ir"]) == (1, 0, False)
    assert exact["dir"] != fast["dir"] and Path(exact["dir"]).parent == tmp_path

    # Both builds stay cached side by side.
    assert _probe(tmp_path, "1") == {**fast, "hits": 1, "misses": 0, "fast_ir": False}
    assert _probe(tmp_path, "0") == {**exact, "hits": 1, "misses": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        Path(d).name for d in (fast["dir"], exact["dir"])
    )


def test_every_constant_of_config_is_in_the_key():
    settings = vars(_config)
    key = _config.kernel_cache_key(settings)
    assert _config.kernel_cache_digest(key) == _config.KERNEL_CACHE_DIGEST
    for name in ("SD_FLOOR", "EDGE_EPS", "BLEND_EPS", "SMOOTH_EPS", "FASTMATH", "WINDOWS"):
        assert name in key["settings"]
    changed = _config.kernel_cache_key({**settings, "SD_FLOOR": 1e-7})
    assert _config.kernel_cache_digest(changed) != _config.KERNEL_CACHE_DIGEST
    added = _config.kernel_cache_key({**settings, "NEW_TOLERANCE": 1e-3})
    assert _config.kernel_cache_digest(added) != _config.KERNEL_CACHE_DIGEST
    # Set order does not matter, only content.
    reordered = _config.kernel_cache_key({**settings, "FASTMATH": set(sorted(_config.FASTMATH))})
    assert _config.kernel_cache_digest(reordered) == _config.KERNEL_CACHE_DIGEST
    assert key["numba"] and key["llvmlite"] and key["numpy"]


def test_numba_saves_kernels_in_the_keyed_folder():
    import numba

    if not _config.CACHE:  # PACS_NUMBA_CACHE=0: nothing is saved
        assert _config.KERNEL_CACHE_DIR is None
        return
    assert numba.config.CACHE_DIR == str(_config.KERNEL_CACHE_DIR)
    assert _config.KERNEL_CACHE_DIR.name == f"pacs_numba-{_config.KERNEL_CACHE_DIGEST}"


def test_diagnose_reports_the_folder_in_use(tmp_path):
    from pacs_numba.runs.checks import check_caches

    checks = {name: (level, msg) for level, name, msg in check_caches(tmp_path / "vol")}
    level, msg = checks["compile cache"]
    if _config.KERNEL_CACHE_DIR is None:
        assert "off" in msg
    else:
        assert str(_config.KERNEL_CACHE_DIR) in msg


def test_editing_a_sibling_kernel_file_changes_the_compile_cache_key(tmp_path):
    # Numba keys a cached kernel by its own file only: a change to a helper in kernels/grid.py
    # must still move every kernel to a fresh cache folder.
    import shutil

    kernels = Path(_config.__file__).resolve().parent / "kernels"
    copy = tmp_path / "kernels"
    shutil.copytree(kernels, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = _config.kernels_source_digest(copy)
    assert before == _config.kernels_source_digest(kernels)
    assert _config.KERNEL_CACHE_KEY["kernels_source"] == before
    grid = copy / "grid.py"
    grid.write_text(grid.read_text() + "\n# an edit to a helper only\n")
    after = _config.kernels_source_digest(copy)
    assert after != before
    key = {**_config.KERNEL_CACHE_KEY, "kernels_source": after}
    assert _config.kernel_cache_digest(key) != _config.KERNEL_CACHE_DIGEST
    (copy / "new_kernel.py").write_text("X = 1\n")  # a new file counts too
    assert _config.kernels_source_digest(copy) != after


# ---------------------------------------------------------------------------- issue 18
WHERE = """
import json
import numpy as np
from pacs_numba import _config
from pacs_numba.kernels.blend import _entropy_dominant_one as k
k(np.array([0.25, 0.75], np.float32), np.float32(1e-10))
d = _config.KERNEL_CACHE_DIR
print(json.dumps({"dir": None if d is None else str(d),
                  "cache": _config.CACHE, "note": _config.KERNEL_CACHE_NOTE}))
"""


def _where(tmp_path: Path, **env_over: str) -> dict:
    """Import a copy of the package whose kernels' ``__pycache__`` cannot be a folder."""
    pkg = tmp_path / "site" / "pacs_numba"
    shutil.copytree(ROOT / "pacs_numba", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (pkg / "kernels" / "__pycache__").write_text("a file: no cache folder can be made here")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "PACS_", "XDG_"))}
    env.update(PYTHONPATH=str(pkg.parent), **env_over)
    res = subprocess.run([sys.executable, "-c", WHERE], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_read_only_package_falls_back_to_the_per_user_folder(tmp_path):
    got = _where(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg"))
    assert got["cache"] and got["dir"].startswith(str(tmp_path / "xdg" / "pacs_numba" / "numba"))
    assert "the package folder" in got["note"] and "is not writable" in got["note"]


def test_nothing_writable_runs_uncached_with_a_warning(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    got = _where(tmp_path, XDG_CACHE_HOME=str(blocker / "xdg"),
                 NUMBA_CACHE_DIR=str(blocker / "numba"))
    assert got["cache"] is False and got["dir"] is None
    assert got["note"].startswith("no writable folder for compiled kernels (tried NUMBA_CACHE_DIR")


def test_a_warm_read_only_cache_seeds_the_per_user_folder(tmp_path):
    warm = tmp_path / "warm"
    (warm / "sub").mkdir(parents=True)
    (warm / "sub" / "k.nbi").write_bytes(b"index")
    target = tmp_path / "user"
    target.mkdir()
    _config._seed_from(warm, target)
    assert (target / "sub" / "k.nbi").read_bytes() == b"index"
    (warm / "sub" / "k.nbi").write_bytes(b"newer")
    _config._seed_from(warm, target)  # only a new, empty folder is seeded
    assert (target / "sub" / "k.nbi").read_bytes() == b"index"
