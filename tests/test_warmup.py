"""Start-up compile (issue 18): only what a run uses, announced, under a node lock."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from pacs_numba import _config
from pacs_numba.runs import warmup


def _pacs(**kw):
    base = dict(simplex=True, laplacian_tau=0.0, ssim_axis="axial", save_weight_volumes=False)
    return SimpleNamespace(**{**base, **kw})


def test_a_train_compiles_only_its_steps():
    got = warmup.steps_for("train", _pacs())
    assert got == ("normalisation", "statistics", "solve", "brain_mask", "score")
    full = warmup.steps_for("train", _pacs(simplex=False, laplacian_tau=0.1,
                                           save_weight_volumes=True, ssim_axis="sagittal"))
    assert set(full) == {"normalisation", "statistics", "solve_unconstrained", "smoothing",
                         "brain_mask", "blend", "metrics", "weight_maps", "weight_analysis"}
    assert "statistics" not in warmup.steps_for("evaluate", _pacs())
    assert warmup.steps_for("all") == warmup.STEPS
    assert set(warmup.TYPICAL_COMPILE_S) == set(warmup.STEPS)


def test_unknown_step_is_an_error():
    with pytest.raises(ValueError, match=r"unknown warm-up steps \['nope'\]"):
        warmup.warm_kernels(("nope",))


@pytest.mark.skipif(not _config.CACHE, reason="compile cache off")
def test_first_run_is_announced_and_compiles_under_the_node_lock(monkeypatch, caplog):
    seen = {}

    def fake_warm(steps, on_step=None):
        seen["steps"] = steps
        seen["lock"] = (_config.KERNEL_CACHE_DIR / ".compile.lock").exists()
        return {}

    monkeypatch.setattr(warmup, "kernel_index_files", lambda: (0, 10))
    monkeypatch.setattr(warmup, "warm_kernels", fake_warm)
    monkeypatch.setenv(warmup.COMPILE_CHILD_ENV, "0")  # no helper process here
    with caplog.at_level(logging.INFO, logger="pacs_numba.runs.warmup"):
        warmup.load_kernels("evaluate", _pacs())
    assert seen["steps"] == ("normalisation", "brain_mask", "score") and seen["lock"]
    line = next(r.getMessage() for r in caplog.records if "compiling 3 kernel groups" in
                r.getMessage())
    usual = warmup.expected_seconds(seen["steps"])
    assert f"for evaluate (first run only; usually ~{usual:.0f} s on 2 cores" in line


def test_compiled_where_names_numbas_real_folder():
    where = warmup.compiled_where()
    if _config.CACHE:
        assert where.startswith(str(_config.KERNEL_CACHE_DIR))
    else:
        assert where.startswith("nowhere")


# --------------------------------------------------------------------------- compiling in two

def test_split_covers_every_step_once_and_balances_the_typical_times():
    steps = warmup.steps_for("train")
    own, other = warmup.split_steps(steps)
    assert sorted(own + other) == sorted(steps) and other
    one = warmup.compile_seconds(steps)
    both = max(warmup.compile_seconds(own), warmup.compile_seconds(other) + warmup.CHILD_START_S)
    assert both < one
    # scoring pulls the normalisation and the brain mask into its side (it scores the raw
    # experts itself: no metrics kernel)
    side = own if "score" in own else other
    assert {"normalisation", "brain_mask"} <= warmup.with_pulled(side)
    assert "metrics" not in warmup.with_pulled(("score",))
    assert warmup.split_steps(("brain_mask",)) == (("brain_mask",), ())


def test_only_a_step_and_what_it_pulls_is_compiled(tmp_path):
    # the helper process compiles its steps alone: nothing outside their PULLS may compile
    script = ("import json; from pacs_numba.runs import warmup as w; "
              "w.warm_kernels(('smoothing',)); print(json.dumps(sorted("
              "d.py_func.__name__ for d in w.dispatchers() if d.signatures)))")
    got = _run(tmp_path, script)
    assert set(json.loads(got)) <= {"_laplacian_smooth", "_parallel_probe", "_n_anchors_one",
                                     "_tile_id_one", "_tile_index_one"}, got


def test_the_statistics_compile_each_parallel_kernel_once(tmp_path):
    # A jitted caller passing a constant (a Literal[int]) or another layout makes Numba compile
    # a parallel kernel a second time: seconds of every first run, for nothing.  Only a fresh
    # compile shows it (a cached caller does not load its callees' overloads), so an empty
    # cache and the two steps of the plane and box kernels (~15 CPU s).
    script = ("import json; from pacs_numba.runs import warmup as w; "
              "w.warm_kernels(('normalisation', 'statistics')); print(json.dumps({"
              "d.py_func.__name__: [str(s) for s in d.signatures] for d in w.dispatchers() "
              "if d.targetoptions.get('parallel') and d.signatures}))")
    sigs = json.loads(_run(tmp_path, script))
    assert {"_valid_mask_planes", "_moments_planes", "_sobel_magnitude_max"} <= set(sigs), sigs
    twice = {name: s for name, s in sigs.items() if len(s) > 1 or "Literal" in s[0]}
    assert not twice, twice


def _run(tmp_path, script, **env_over):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_CACHE", "PACS_"))}
    env.update(NUMBA_CACHE_DIR=str(tmp_path / "nb"), PACS_LOG_LEVEL="WARNING", **env_over)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().splitlines()[-1]


#: Compile two cheap steps in two processes with an empty cache; report who compiled what.
TWO = """
import json, sys
from pacs_numba.runs import warmup as w
w.split_steps = lambda steps: (("smoothing",), ("weight_maps",))
w.usable_cpus = lambda: 2
mode = sys.argv[1] if len(sys.argv) > 1 else ""
if mode:
    real = w.CompileChild.__init__
    def init(self, steps):
        real(self, steps)
        if mode == "kill":
            self.proc.kill()
            self.proc.wait()
    w.CompileChild.__init__ = init
    if mode == "fail":  # the child is told a cache folder that is not its own: it exits 2
        w.KERNEL_CACHE_DIR = w.KERNEL_CACHE_DIR.parent / "elsewhere"
        w.KERNEL_CACHE_DIR.mkdir()
times = w.compile_in_two(("smoothing", "weight_maps"))
import numpy as np
from pacs_numba.core.blending import weight_maps
from pacs_numba.core.tiling import TileGrid
g = TileGrid((6, 5, 4), 2, 2)
wts = np.arange(g.n_tiles * 2, dtype=np.float32).reshape(-1, 2)
maps = weight_maps(wts, g)
ok = bool(np.array_equal(maps[1, 3, 2], wts[(0 * 3 + 1) * 2 + 1]))
d = {x.py_func.__name__: x for x in w.dispatchers()}
wm = d["_weight_maps"].stats
print(json.dumps({"steps": sorted(times), "ok": ok,
                  "hits": sum(wm.cache_hits.values()), "misses": sum(wm.cache_misses.values())}))
"""


def test_the_main_process_loads_what_the_helper_compiled(tmp_path):
    got = json.loads(_run(tmp_path, TWO))
    assert got["steps"] == ["smoothing", "weight_maps"] and got["ok"]
    assert got["hits"] >= 1 and got["misses"] == 0  # compiled by the child, loaded here


@pytest.mark.parametrize("mode", ["kill", "fail"])
def test_a_helper_that_dies_or_fails_only_costs_time(tmp_path, mode):
    got = json.loads(_run(tmp_path, TWO.replace("sys.argv[1] if len(sys.argv) > 1 else \"\"",
                                                repr(mode))))
    assert got["steps"] == ["smoothing", "weight_maps"] and got["ok"]
    assert got["misses"] >= 1  # compiled here after all


def test_the_helper_dies_with_its_parent(tmp_path):
    script = """
import os, sys
from pacs_numba.runs import warmup as w
child = w.CompileChild(("score", "statistics"))
print(child.proc.pid, flush=True)
os._exit(0)
"""
    pid = int(_run(tmp_path, script))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        try:  # a zombie of ours would still answer: reap it if it is our child
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            pass
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split()[2] == "Z":
                return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError("the helper compile process outlived its parent")


def test_the_node_lock_serialises_two_processes(tmp_path):
    script = f"""
import time
from pathlib import Path
from pacs_numba.store.locks import node_lock
with node_lock(Path({str(tmp_path / 'x.lock')!r})):
    t0 = time.time(); time.sleep(0.6); print(t0, time.time())
"""
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    spans = sorted(tuple(map(float, p.communicate(timeout=120)[0].split())) for p in procs)
    assert spans[0][1] <= spans[1][0]


#: A fresh compile cache after start-up: the threading layer's probe kernel is compiled (and
#: cached) before load_kernels looks, which must still see a first run.
AFTER_STARTUP = """
from pacs_numba.resources.threads import ensure_threading_layer
from pacs_numba.runs import warmup as w
ensure_threading_layer()
probe = [d for d in w.dispatchers() if d.py_func.__name__ == "_parallel_probe"][0]
import os
index = probe._cache._cache_file._index_path
print(os.path.exists(index), w.kernel_index_files()[0], w.kernel_index_files()[1] > 10)
"""


def test_the_start_up_probe_does_not_hide_a_first_run(tmp_path):
    assert _run(tmp_path, AFTER_STARTUP) == "True 0 True"
