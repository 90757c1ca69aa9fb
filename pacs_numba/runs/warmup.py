"""Compiling or loading every kernel before a run (``diagnose --warmup``), and counting them."""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numba.core.dispatcher import Dispatcher

from .. import kernels
from .._config import CACHE, KERNEL_CACHE_DIR, KERNEL_CACHE_NOTE
from ..core.blending import blend_volume, brain_mask, weight_analysis, weight_maps
from ..core.cellstats import StatsKey, box_statistics
from ..core.metrics import volume_metrics
from ..core.model import StackingModel
from ..core.scoring import score_patient
from ..core.solve import fit_weights, laplacian_smooth, solve_simplex_qp
from ..core.statistics import normalisation, valid_mask
from ..core.tiling import TileGrid
from ..resources.limits import detect_limits
from ..resources.threads import ensure_threading_layer
from ..store.locks import node_lock

log = logging.getLogger(__name__)


#: Every warm-up step, in the order it runs.  A run compiles only the steps it needs
#: (:func:`steps_for`) at start; anything else it meets compiles lazily, and is cached.
STEPS = ("normalisation", "statistics", "solve", "solve_unconstrained", "solve_many_experts",
         "smoothing", "brain_mask", "blend", "score", "weight_maps", "weight_analysis",
         "metrics")
#: Rough first-ever compile seconds of each step's own kernels (without what it pulls in,
#: :data:`PULLS`), on one core of an idle 2-core machine: CPU seconds measured one step at a
#: time with an empty NUMBA_CACHE_DIR on a busy machine (load 8-12), less the steps it
#: pulls, times 0.7 (the ratio of last round's idle figures to these); docs/performance.md.
#: The normalisation, statistics and score steps were re-measured on an idle machine (one
#: process, two alternating runs) once their plane kernels stopped being compiled twice and
#: their two big kernels became serial chunks run by ``resources.threads.run_chunks``
#: (3.2-3.8, 6.5-6.7 and 4.1-4.3 s).  They split a first run between two processes and say
#: how long the wait will be.
TYPICAL_COMPILE_S = {"normalisation": 3.5, "statistics": 6.5, "solve": 4.0,
                     "solve_unconstrained": 3.5, "solve_many_experts": 5.5, "smoothing": 2.0,
                     "brain_mask": 4.2, "blend": 6.0, "score": 4.5, "weight_maps": 1.5,
                     "weight_analysis": 1.0, "metrics": 7.0}
#: Steps whose warm-up also compiles other steps' kernels on the way (scoring normalises and
#: masks, and scores the raw experts in its own kernel, so it needs no metrics kernel; the
#: statistics pass starts with the valid mask and the moments).  A step and what it pulls in
#: compile in one process.
PULLS = {"statistics": ("normalisation",), "blend": ("normalisation",),
         "score": ("normalisation", "brain_mask"),
         "weight_analysis": ("weight_maps",)}
#: Set to 0 to compile a first run in one process (no helper process).
COMPILE_CHILD_ENV = "PACS_NUMBA_COMPILE_CHILD"


def steps_for(command: str, pacs: Any = None) -> tuple[str, ...]:
    """Return the warm-up steps a command's run uses, from its ``pacs_sr`` settings.

    Parameters
    ----------
    command : {"train", "evaluate", "predict", "demo", "all"}
        ``all`` (``diagnose --warmup``) is every step.
    pacs : PacsConfig, optional
        The run's settings (solver, smoothing, outputs, SSIM axis); None: the defaults of
        a published config.

    Examples
    --------
    >>> steps_for("predict")
    ('normalisation', 'brain_mask', 'blend')
    """
    if command == "all":
        return STEPS
    if command == "predict":
        return ("normalisation", "brain_mask", "blend")
    want = {"normalisation", "brain_mask"}
    if command in {"train", "demo"}:
        want.add("statistics")
        simplex = True if pacs is None else bool(pacs.simplex)
        want.add("solve" if simplex else "solve_unconstrained")
        if pacs is None or pacs.laplacian_tau > 0:
            want.add("smoothing")
    axis = "axial" if pacs is None else pacs.ssim_axis
    want |= {"blend", "metrics"} if axis == "sagittal" else {"score"}
    if pacs is None or pacs.save_weight_volumes:
        want |= {"weight_maps", "weight_analysis"}
    if command == "demo":
        want.add("blend")  # the demo's prediction
    return tuple(s for s in STEPS if s in want)


def warm_kernels(
    steps: tuple[str, ...] | None = None,
    on_step: Callable[[str, float], Any] | None = None,
) -> dict[str, float]:
    """Compile (or load from cache) the kernels of ``steps`` on a tiny input (None: all).

    ``on_step(name, seconds)`` is called after each step (``load_kernels`` logs progress).
    Returns the seconds of each step.
    """
    todo = set(STEPS if steps is None else steps)
    unknown = todo - set(STEPS)
    if unknown:
        raise ValueError(f"unknown warm-up steps {sorted(unknown)}; known: {list(STEPS)}")
    ensure_threading_layer()
    rng = np.random.default_rng(0)
    shape = (12, 11, 10)
    hr = (rng.random(shape, dtype=np.float32) + 0.1).astype(np.float32)
    experts = [hr + rng.normal(0, 0.05, shape).astype(np.float32) for _ in range(2)]
    grid = TileGrid(shape, 4, 2)
    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        if name not in todo:
            return None
        t0 = time.perf_counter()
        res = fn()
        times[name] = time.perf_counter() - t0
        if on_step is not None:
            on_step(name, times[name])
        return res

    def stats():
        # the engine's fit pass: the statistics cache computes its entries with box_statistics
        return box_statistics(hr, experts, StatsKey.make(
            region="first_block", stride=grid.stride, patch_size=grid.patch_size,
            window="hann", edge_power=2.0, grad_operator="sobel", with_edge=True,
            with_grad=True))

    def norm():
        mask, _ = valid_mask(hr, experts)
        return normalisation(hr, experts, mask)

    timed("normalisation", norm)
    timed("statistics", stats)
    # The solve and everything after it get made-up inputs of the run's dtypes and layouts,
    # so each step compiles only its own kernels (a step compiled by the helper process of
    # load_kernels must not compile another's on the way).
    q = np.tile(np.eye(2) + 0.5, (grid.n_tiles, 1, 1))
    b = np.ones((grid.n_tiles, 2))
    counts = np.ones(grid.n_tiles, np.int64)
    w = np.full((grid.n_tiles, 2), 0.5, np.float32)
    learned = np.ones(grid.n_tiles, bool)
    got = timed("solve", lambda: fit_weights(
        q, b, counts, grid.counts, simplex=True, lambda_ridge=1e-4, laplacian_tau=0.0))
    timed("solve_unconstrained", lambda: fit_weights(
        q, b, counts, grid.counts, simplex=False, lambda_ridge=1e-4, laplacian_tau=0.0))
    if got is not None:
        w, learned = got
    # more experts than the support enumeration takes: the active-set solver
    many = 8
    q_many = np.tile(np.eye(many) + 0.5, (3, 1, 1))
    timed("solve_many_experts", lambda: solve_simplex_qp(q_many, np.ones((3, many)), 1e-4))
    timed("smoothing", lambda: laplacian_smooth(w, learned, grid.counts, 0.05))
    mu, sd, mus, sds = norm() if "blend" in todo else (0.0, 1.0, None, None)
    bm = timed("brain_mask", lambda: brain_mask(hr))
    if bm is None and {"blend", "score"} & todo:
        bm = np.ones(shape, np.uint8)  # a mask without compiling the brain-mask kernel
    pred = timed("blend", lambda: blend_volume(
        experts, grid, w, mus=mus, sds=sds, mu_hr=mu, sd_hr=sd, mask=bm, window="hann"))
    model = StackingModel(w, learned, grid, ("a", "b"), {})
    timed("score", lambda: score_patient(hr, experts, model, window="hann", ssim_axis="axial",
                                         brain_mask=bm, experts_alone=True, hr_free=True))
    maps = timed("weight_maps", lambda: weight_maps(w, grid))
    if maps is None and "weight_analysis" in todo:
        maps = weight_maps(w, grid)
    timed("weight_analysis", lambda: weight_analysis(maps, ["a", "b"]))
    if pred is None and "metrics" in todo:
        pred = hr
    timed("metrics", lambda: volume_metrics(hr, pred, ssim_axis="axial"))
    return times


def dispatchers() -> list[Any]:
    """Every Numba dispatcher (kernel) of ``pacs_numba.kernels``."""
    out = []
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"{kernels.__name__}.{info.name}")
        out += [obj for obj in vars(mod).values() if isinstance(obj, Dispatcher)]
    return out


def cache_counts() -> tuple[int, int]:
    """Numba compile-cache hits and misses over every kernel dispatcher of the package."""
    hits = misses = 0
    for obj in dispatchers():
        hits += sum(obj.stats.cache_hits.values())
        misses += sum(obj.stats.cache_misses.values())
    return hits, misses


#: Kernels every process compiles or loads at start-up, before :func:`load_kernels`
#: (``resources.threads.ensure_threading_layer`` starts the threading layer with one): their
#: index file says nothing about whether a run's kernels were ever compiled here.
STARTUP_KERNELS = frozenset({"_parallel_probe"})


def kernel_index_files() -> tuple[int, int]:
    """(kernels with a compile-cache index file, kernels) over the package's dispatchers.

    The start-up kernels (`STARTUP_KERNELS`) are not counted: with them a first run looked
    like a partial cache, so it compiled in one process and did not say so.
    """
    have = total = 0
    for disp in dispatchers():
        if disp.py_func.__name__ in STARTUP_KERNELS:
            continue
        total += 1
        cache = getattr(disp, "_cache", None)
        index = getattr(getattr(cache, "_cache_file", None), "_index_path", None)
        have += bool(index and os.path.exists(index))
    return have, total


def kernels_ready() -> tuple[int, int]:
    """(kernels compiled or loaded in this process, kernels) over the package's dispatchers."""
    disps = dispatchers()
    return sum(1 for d in disps if d.signatures), len(disps)


def _log_progress(step: str, secs: float) -> None:
    """One INFO line per warm-up step of a first compile: kernels ready out of all."""
    ready, total = kernels_ready()
    log.info("compiling kernels: %d/%d ready (%s: %.1f s)", ready, total, step, secs)


def expected_seconds(steps: tuple[str, ...]) -> float:
    """Typical wall seconds of a first-ever compile of ``steps`` on an idle node."""
    if not compile_child_wanted():
        return compile_seconds(steps)
    own, other = split_steps(steps)
    return max(compile_seconds(own), compile_seconds(other) + CHILD_START_S if other else 0.0)


def compiled_where() -> str:
    """Return the folder Numba really keeps the compiled kernels in.

    Numba takes ``NUMBA_CACHE_DIR`` only if it can write there, and otherwise quietly
    tries other folders; a kernel's own cache object knows which one it took.
    """
    if not CACHE:
        return "nowhere (the compile cache is off)"
    for disp in dispatchers():
        path = getattr(getattr(disp, "_cache", None), "cache_path", None)
        if path:
            return str(path)
    return str(KERNEL_CACHE_DIR)


def with_pulled(steps: Iterable[str]) -> set[str]:
    """Return ``steps`` and every step they compile on the way (:data:`PULLS`)."""
    out = set(steps)
    for step in list(out):
        out.update(PULLS.get(step, ()))
    return out


def compile_seconds(steps: Iterable[str]) -> float:
    """Typical first-ever compile seconds of ``steps`` in one process, pulled steps included."""
    return sum(TYPICAL_COMPILE_S.get(s, 2.0) for s in with_pulled(steps))


#: Typical seconds a helper process takes to start (interpreter, NumPy, Numba, the package).
CHILD_START_S = 1.5


def split_steps(steps: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Split ``steps`` into (this process's, a helper process's) with the closest compile times.

    Each side also compiles what its steps pull in (:data:`PULLS`), so a shared step such as
    the normalisation costs on both sides.  Every split is tried (at most 2^12).  The
    helper's side is empty when a split would not beat one process.

    Examples
    --------
    >>> split_steps(("normalisation",))
    (('normalisation',), ())
    """
    best = (compile_seconds(steps), steps, ())
    n = len(steps)
    for bits in range(1, 2 ** n - 1):
        child = tuple(s for i, s in enumerate(steps) if bits >> i & 1)
        own = tuple(s for s in steps if s not in child)
        cost = max(compile_seconds(own), compile_seconds(child) + CHILD_START_S)
        if cost < best[0] - 1e-9:
            best = (cost, own, child)
    return best[1], best[2]


def usable_cpus() -> int:
    """CPUs this process may run on: the engine's figure (affinity, SLURM, cgroup quota)."""
    return max(1, int(detect_limits().cpus.value))


def compile_child_wanted() -> bool:
    """Whether a first run may compile half of its kernels in a helper process."""
    flag = os.environ.get(COMPILE_CHILD_ENV, "1").strip().lower()
    return (CACHE and KERNEL_CACHE_DIR is not None and bool(sys.executable)
            and flag not in {"0", "false", "no", "off"} and usable_cpus() >= 2)


class CompileChild:
    """A helper process that compiles some warm-up steps into the shared compile cache.

    A fresh interpreter (not a fork: a forked child that runs a parallel kernel under the
    omp layer dies), with the same compile-cache folder and settings.  It exits when its
    standard input closes, so it dies with this process however that ends; :meth:`stop`
    closes it.  It takes no node lock: its parent holds it.
    """

    def __init__(self, steps: tuple[str, ...]) -> None:
        assert KERNEL_CACHE_DIR is not None
        self.steps = steps
        self.started = time.perf_counter()
        self._err = tempfile.TemporaryFile()
        env = dict(os.environ)
        env["NUMBA_CACHE_DIR"] = str(KERNEL_CACHE_DIR.parent)  # the same folder, whoever chose it
        env[COMPILE_CHILD_ENV] = "0"
        root = str(Path(kernels.__file__).resolve().parents[2])  # this very package, not the cwd's
        code = (f"import sys; sys.path.insert(0, {root!r}); "
                "from pacs_numba.runs.warmup import compile_child_main; compile_child_main()")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(KERNEL_CACHE_DIR), *steps],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._err, env=env,
        )

    def wait(self, until: float) -> bool:
        """Wait until the child ends or ``time.perf_counter()`` reaches ``until``.

        Returns True if it compiled everything.
        """
        while self.proc.poll() is None and time.perf_counter() < until:
            time.sleep(0.05)
        return self.proc.poll() == 0

    def why(self) -> str:
        """Why the child did not finish, for the log."""
        code = self.proc.poll()
        if code is None:
            return "still running, stopped"
        self._err.seek(0)
        lines = self._err.read().decode(errors="replace").strip().splitlines()
        return f"exit code {code}" + (f": {lines[-1]}" if lines else "")

    def stop(self) -> None:
        """End the child if it still runs (closing its input; killing it if that is not enough)."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=2.0)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            self._err.close()


def compile_child_main(argv: list[str] | None = None) -> None:
    """Entry point of :class:`CompileChild`: ``<cache folder> <step> ...``.

    Exits 2 if this interpreter would use another compile-cache folder than its parent
    (the parent then compiles those steps itself) and as soon as its standard input closes.
    """
    args = sys.argv[1:] if argv is None else argv
    expected, steps = args[0], tuple(args[1:])

    def exit_with_parent() -> None:
        # the raw descriptor, not sys.stdin: a daemon thread blocked in a buffered read
        # aborts the interpreter at shutdown
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        os._exit(3)

    threading.Thread(target=exit_with_parent, daemon=True).start()
    if KERNEL_CACHE_DIR is None or str(KERNEL_CACHE_DIR) != expected:
        os._exit(2)
    warm_kernels(steps)
    os._exit(0)  # every kernel is in the cache; nothing else to tidy


def compile_in_two(
    steps: tuple[str, ...], on_step: Callable[[str, float], Any] | None = None,
) -> dict[str, float]:
    """Compile ``steps`` here and, split by :func:`split_steps`, in a :class:`CompileChild`.

    This process compiles its share, waits for the child, then loads the child's kernels
    from the cache.  A child that fails, is killed or takes more than three times its share
    (judged by how long this process took for its own) only costs time: whatever it did not
    cache is compiled here.  Returns the seconds of each step, as :func:`warm_kernels`.
    """
    own, other = split_steps(steps)
    child = None
    if other and compile_child_wanted():
        try:
            child = CompileChild(other)
        except OSError as exc:
            log.debug("no helper compile process (%s)", exc)
    if child is None:
        return warm_kernels(steps, on_step)
    log.debug("compiling %s here and %s in a helper process (pid %d)", ", ".join(own),
              ", ".join(other), child.proc.pid)
    try:
        t0 = time.perf_counter()
        times = warm_kernels(own, on_step)
        spent = time.perf_counter() - t0
        share = compile_seconds(other) / max(compile_seconds(own), 1e-3)
        done = child.wait(child.started + max(60.0, 3.0 * spent * max(share, 1.0)))
        if not done:
            log.info("the helper compile process did not finish (%s); compiling its part here",
                     child.why())
    finally:
        child.stop()
    times.update(warm_kernels(other, on_step))  # loads what the child cached, compiles the rest
    return times


def load_kernels(command: str = "all", pacs: Any = None) -> int:
    """Compile the kernels a run needs, or load them from Numba's cache, before its first patient.

    Only the steps of :func:`steps_for` are compiled here; anything else compiles when it
    is first met.  A first run announces what it compiles and roughly how long that takes,
    and logs after each step how many kernels are ready out of all, since nothing else moves
    meanwhile.  With two CPUs or more a first run compiles about half of the steps in a
    helper process (:func:`compile_in_two`), then loads them.  Processes on one node that
    start together (SLURM array tasks) take a node lock in the cache folder around the
    compile, so one compiles and the others wait, then load.  Returns the number of kernels
    compiled so far (cache misses), for :func:`check_no_compile`.
    """
    if KERNEL_CACHE_NOTE:
        log.warning("%s", KERNEL_CACHE_NOTE)
    steps = steps_for(command, pacs)
    have, _ = kernel_index_files()
    # Some kernels (e.g. predict's) may never have been compiled, so "no index file at all"
    # is the sign of a first run; a partial cache only gets the line with the time below.
    first = not CACHE or have == 0
    if first:
        why = "the compile cache is off (PACS_NUMBA_CACHE=0)" if not CACHE else "first run only"
        usual = expected_seconds(steps)
        log.info("compiling %d kernel groups for %s (%s; usually ~%.0f s on 2 cores, "
                 "longer on a busy node): %s", len(steps), command, why, usual,
                 ", ".join(steps))
    _, misses0 = cache_counts()
    t0 = time.perf_counter()
    if CACHE and KERNEL_CACHE_DIR is not None and first:
        with node_lock(KERNEL_CACHE_DIR / ".compile.lock"):
            waited = time.perf_counter() - t0
            if waited > 1.0:
                log.info("waited %.0f s for another process compiling the kernels", waited)
            if kernel_index_files()[0] == 0:
                compile_in_two(steps, _log_progress)
            else:  # the other process compiled them: load
                warm_kernels(steps, _log_progress)
    else:
        warm_kernels(steps, _log_progress if first else None)
    secs = time.perf_counter() - t0
    _, total_misses = cache_counts()
    misses = total_misses - misses0
    if misses or not CACHE:
        log.info("compiling kernels took %.1f s: %d compiled%s", secs, misses,
                 f", cached in {compiled_where()}" if CACHE else "")
    else:
        log.debug("kernels loaded from the compile cache in %.2f s (%s)", secs, compiled_where())
    return total_misses


def check_no_compile(misses_before: int) -> None:
    """Say so if a task compiled a kernel that the start-up load did not cover."""
    _, misses = cache_counts()
    if misses > misses_before:
        log.info(
            "%d more kernel signature(s) compiled during the run (not covered by the start-up "
            "load; they are cached now)",
            misses - misses_before,
        )
    else:
        log.debug("no kernel compiled during the run")
