"""Memory and CPU limits of the job, and the width of the patient pool (algorithm B4, B5).

Everything here is a pure function of its inputs: the functions that read the
operating system take the cgroup mount, the ``/proc/self/cgroup`` file and the
environment as parameters, so the tests run them on fake trees.

Why not just ``psutil.virtual_memory()``: on a SLURM node it reports the whole
node (hundreds of GiB), while the job may use only what its cgroup allows; the
kernel OOM-kills the job when the cgroup is full, whatever the node has free.
The published PaCS-SR guessed at this with "use 50% of what psutil sees at
1.5 GB per worker" and was still OOM-killed.  Here the limit is the smallest of
every figure that can bind (cgroups over all ancestors, SLURM variables,
physical memory), each reported with its source, and the pool width follows
from a per-patient cost computed from the real volume shape.

Examples
--------
>>> limits = detect_limits()                                  # doctest: +SKIP
>>> plan = plan_pool(limits, per_patient_bytes=800 << 20,
...                  baseline_bytes=baseline_bytes(), n_patients=40)  # doctest: +SKIP
>>> log.info("%s; %s", limits.describe(), plan.describe())    # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import re
import resource
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import psutil

from .errors import BudgetError, ConfigError

log = logging.getLogger(__name__)

# Units, not settings: binary multiples as SLURM and ``free -g`` use them.
_KIB = 1 << 10
_MIB = 1 << 20
_GIB = 1 << 30

# cgroup v1 writes "no limit" as LONG_MAX rounded down to the page size
# (9223372036854771712 with 4 KiB pages); other page sizes give other values,
# so anything this large is treated as unlimited.
_UNLIMITED_BYTES = 1 << 60


# ---------------------------------------------------------------------------
# Figures and parsing
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    """One measured limit and where it came from.

    Parameters
    ----------
    value : int or float
        Bytes for memory figures, a CPU count for CPU figures.
    source : str
        Where the value was read, for the log and ``diagnose``, e.g.
        ``"cgroup v2 /sys/fs/cgroup/slurm/uid_1/job_7/memory.max"`` or
        ``"SLURM_MEM_PER_NODE=16000"``.
    """

    value: int | float
    source: str


def _gib(n_bytes: float, digits: int = 1) -> str:
    return f"{n_bytes / _GIB:.{digits}f} GiB"


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_MULT = {"": 1, "k": _KIB, "m": _MIB, "g": _GIB, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str, *, default_unit: str = "B") -> int:
    """Parse a memory size such as ``"64G"`` into bytes.

    Parameters
    ----------
    text : str
        A number with an optional unit ``K``, ``M``, ``G``, ``T`` or ``P``,
        optionally followed by ``B`` or ``iB`` (``"64G"``, ``"64GB"``, ``"64GiB"``,
        ``"1.5g"``, ``"1048576"``).  Units are binary (1K = 1024) whether or not
        the ``i`` is written, as in SLURM's ``--mem``.
    default_unit : str, optional
        Unit of a bare number: ``"B"`` (default, for ``--mem-budget``) or ``"M"``
        (for ``SLURM_MEM_PER_NODE``, which SLURM gives in MiB).

    Returns
    -------
    int
        Size in bytes, rounded down.

    Raises
    ------
    ConfigError
        (a ``ValueError``) if the text is not a non-negative size; the message
        quotes the text.

    Examples
    --------
    >>> parse_size("64G")
    68719476736
    >>> parse_size("512MiB"), parse_size("1.5k"), parse_size("100")
    (536870912, 1536, 100)
    >>> parse_size("16000", default_unit="M")
    16777216000
    """
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(
            f"cannot read {text!r} as a memory size; expected a number with an optional "
            "unit K, M, G or T (binary, e.g. '64G', '512MiB', '1.5T')"
        )
    number, unit, _suffix = m.groups()
    unit = unit.lower() if unit else default_unit.lower().rstrip("ib").rstrip("b")
    if unit not in _SIZE_MULT:
        raise ValueError(f"default_unit must be one of B, K, M, G, T, P; got {default_unit!r}")
    return int(float(number) * _SIZE_MULT[unit])


# ---------------------------------------------------------------------------
# cgroups
# ---------------------------------------------------------------------------


def read_cgroup_paths(proc_self_cgroup_text: str) -> list[tuple[int, tuple[str, ...], str]]:
    r"""Parse the text of ``/proc/self/cgroup``.

    Parameters
    ----------
    proc_self_cgroup_text : str
        Lines ``hierarchy-id:controller-list:path``; cgroup v2 is the line
        ``0::/path`` with an empty controller list.

    Returns
    -------
    list of (version, controllers, path)
        ``version`` is 1 or 2; ``controllers`` the v1 controllers of that
        hierarchy (``("cpu", "cpuacct")``; named hierarchies such as
        ``name=systemd`` are kept as written); ``path`` the cgroup path as the
        kernel reports it.  Malformed lines are skipped.

    Examples
    --------
    >>> read_cgroup_paths("4:memory:/slurm/uid_1/job_7/step_0\n0::/user.slice\n")
    [(1, ('memory',), '/slurm/uid_1/job_7/step_0'), (2, (), '/user.slice')]
    """
    out: list[tuple[int, tuple[str, ...], str]] = []
    for line in proc_self_cgroup_text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hier, ctrl, path = parts
        if hier == "0" and ctrl == "":
            out.append((2, (), path))
        else:
            out.append((1, tuple(c for c in ctrl.split(",") if c), path))
    return out


def _read_proc_cgroup(
    proc_cgroup: str | os.PathLike[str],
) -> list[tuple[int, tuple[str, ...], str]]:
    try:
        return read_cgroup_paths(Path(proc_cgroup).read_text())
    except OSError as exc:
        log.debug("cannot read %s: %s", proc_cgroup, exc)
        return []


def _v2_mount(root: Path) -> Path | None:
    """Find the unified (v2) mount: ``root`` on pure v2 hosts, ``root/unified`` on hybrid ones."""
    for cand in (root, root / "unified"):
        if (cand / "cgroup.controllers").is_file():
            return cand
    return None


def _v1_mounts(root: Path, controllers: Sequence[str]) -> list[Path]:
    """List where a v1 hierarchy with these controllers is mounted (``cpu,cpuacct``, ``cpu``)."""
    names = [",".join(controllers), ",".join(sorted(controllers)), *controllers]
    seen: list[Path] = []
    for n in names:
        p = root / n
        if p.is_dir() and p not in seen:
            seen.append(p)
    return seen


def _leaf_dir(mount: Path, cgroup_path: str) -> Path:
    """Find the directory of ``cgroup_path`` under ``mount``.

    In a container without a cgroup namespace, ``/proc/self/cgroup`` names the
    host path (``/docker/<id>``) while the container sees that cgroup as the
    mount's own root.  Leading components are dropped until the path exists,
    ending at the mount itself; a wrong match would need a directory of the same
    name at a shallower level, which cgroup layouts do not produce.
    """
    parts = [p for p in cgroup_path.strip("/").split("/") if p]
    for i in range(len(parts) + 1):
        cand = mount.joinpath(*parts[i:])
        if cand.is_dir():
            return cand
    return mount


def _ancestors(leaf: Path, mount: Path) -> list[Path]:
    """``leaf`` and every parent up to and including ``mount``, leaf first."""
    out = [leaf]
    cur = leaf
    while cur != mount and mount in cur.parents:
        cur = cur.parent
        out.append(cur)
    return out


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _read_bytes_value(path: Path) -> int | None:
    """Read a cgroup byte count; None if missing, unreadable, ``max`` or unlimited."""
    text = _read_text(path)
    if text is None or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        log.debug("ignoring unreadable %s: %r", path, text)
        return None
    if value < 0 or value >= _UNLIMITED_BYTES:
        return None
    return value


def _stat_value(path: Path, key: str) -> int | None:
    text = _read_text(path)
    if text is None:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            try:
                v = int(value)
            except ValueError:
                return None
            return None if v < 0 or v >= _UNLIMITED_BYTES else v
    return None


def _smallest(figures: Sequence[Figure]) -> Figure | None:
    """Pick the smallest figure; on a tie the first (callers list the preferred first)."""
    best: Figure | None = None
    for f in figures:
        if best is None or f.value < best.value:
            best = f
    return best


def _cgroup_memory_figures(root: Path, entries: Sequence[tuple[int, tuple[str, ...], str]]
                           ) -> list[Figure]:
    figures: list[Figure] = []
    for version, controllers, path in entries:
        if version == 2:
            mount = _v2_mount(root)
            if mount is None:
                continue
            for d in _ancestors(_leaf_dir(mount, path), mount):
                v = _read_bytes_value(d / "memory.max")
                if v is not None:
                    figures.append(Figure(v, f"cgroup v2 {d / 'memory.max'}"))
        elif "memory" in controllers:
            for mount in _v1_mounts(root, controllers):
                leaf = _leaf_dir(mount, path)
                # memory.stat's hierarchical_memory_limit already folds in every
                # ancestor (with use_hierarchy=1), even those a container cannot see.
                v = _stat_value(leaf / "memory.stat", "hierarchical_memory_limit")
                if v is not None:
                    figures.append(Figure(
                        v, f"cgroup v1 {leaf / 'memory.stat'} hierarchical_memory_limit"))
                for d in _ancestors(leaf, mount):
                    v = _read_bytes_value(d / "memory.limit_in_bytes")
                    if v is not None:
                        figures.append(Figure(v, f"cgroup v1 {d / 'memory.limit_in_bytes'}"))
                break
    return figures


def cgroup_memory_limit(root: str | os.PathLike[str] = "/sys/fs/cgroup",
                        proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup"
                        ) -> Figure | None:
    """Find the tightest cgroup memory limit over the process's cgroup and its ancestors.

    Parameters
    ----------
    root : path-like, optional
        Where the cgroup file systems are mounted.  cgroup v2 is looked for at
        ``root`` (pure v2) or ``root/unified`` (hybrid); v1 memory under
        ``root/memory``.
    proc_cgroup : path-like, optional
        The ``/proc/self/cgroup`` file naming the process's cgroups.

    Returns
    -------
    Figure or None
        The limit in bytes, with the file it came from, or None when no
        ancestor has a limit (``max``, or a v1 value of 2**60 or more such as
        the page-rounded ``LONG_MAX`` 9223372036854771712).

    Notes
    -----
    SLURM puts the job's limit on the job (or step) cgroup, not on the task
    leaf that ``/proc/self/cgroup`` names, so every ancestor is read: v2
    ``memory.max``; v1 ``memory.limit_in_bytes`` and the leaf's
    ``hierarchical_memory_limit`` from ``memory.stat``.  ``memory.high``
    (throttling, not OOM) is not a limit here.
    """
    figures = _cgroup_memory_figures(Path(root), _read_proc_cgroup(proc_cgroup))
    return _smallest(figures)


def cgroup_cpu_limit(root: str | os.PathLike[str] = "/sys/fs/cgroup",
                     proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup") -> Figure | None:
    """Find the tightest CPU quota over the process's cgroup and all its ancestors.

    Parameters
    ----------
    root : path-like, optional
        Where the cgroup file systems are mounted (see `cgroup_memory_limit`).
    proc_cgroup : path-like, optional
        The ``/proc/self/cgroup`` file.

    Returns
    -------
    Figure or None
        ``floor(quota / period)`` CPUs, at least 1, from v2 ``cpu.max``
        (``"quota period"``; ``"max period"`` = no quota) or v1
        ``cpu.cfs_quota_us / cpu.cfs_period_us`` (quota -1 = none); None when
        no ancestor sets a quota.
    """
    rootp = Path(root)
    figures: list[Figure] = []
    for version, controllers, path in _read_proc_cgroup(proc_cgroup):
        if version == 2:
            mount = _v2_mount(rootp)
            if mount is None:
                continue
            for d in _ancestors(_leaf_dir(mount, path), mount):
                text = _read_text(d / "cpu.max")
                if not text:
                    continue
                fields = text.split()
                if fields[0] == "max":
                    continue
                try:
                    quota = int(fields[0])
                    period = int(fields[1]) if len(fields) > 1 else 100000
                except ValueError:
                    continue
                if quota > 0 and period > 0:
                    figures.append(Figure(max(1, quota // period),
                                          f"cgroup v2 {d / 'cpu.max'} {quota} {period}"))
        elif "cpu" in controllers:
            for mount in _v1_mounts(rootp, controllers):
                for d in _ancestors(_leaf_dir(mount, path), mount):
                    q, p = _read_text(d / "cpu.cfs_quota_us"), _read_text(d / "cpu.cfs_period_us")
                    try:
                        quota, period = int(q or "-1"), int(p or "0")
                    except ValueError:
                        continue
                    if quota > 0 and period > 0:
                        figures.append(Figure(
                            max(1, quota // period),
                            f"cgroup v1 {d}/cpu.cfs_quota_us / cpu.cfs_period_us {quota}/{period}"))
                break
    return _smallest(figures)


@dataclass(frozen=True)
class CgroupUsage:
    """Memory charged to the process's cgroup, for profiling.

    Parameters
    ----------
    current_bytes : int or None
        v2 ``memory.current`` or v1 ``memory.usage_in_bytes`` (includes page cache,
        e.g. the pages of memory-mapped volumes).
    peak_bytes : int or None
        v2 ``memory.peak`` (kernel 5.19+) or v1 ``memory.max_usage_in_bytes``.
    source : str
        The cgroup directory read.
    """

    current_bytes: int | None
    peak_bytes: int | None
    source: str


def cgroup_memory_usage(root: str | os.PathLike[str] = "/sys/fs/cgroup",
                        proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup"
                        ) -> CgroupUsage | None:
    """Read the current and peak memory charged to the process's own (leaf) cgroup.

    Parameters
    ----------
    root : path-like, optional
        Where the cgroup file systems are mounted.
    proc_cgroup : path-like, optional
        The ``/proc/self/cgroup`` file.

    Returns
    -------
    CgroupUsage or None
        None when neither figure is readable (no cgroup memory controller, or
        no permission).
    """
    rootp = Path(root)
    for version, controllers, path in _read_proc_cgroup(proc_cgroup):
        if version == 2:
            mount = _v2_mount(rootp)
            dirs = [_leaf_dir(mount, path)] if mount is not None else []
            names = ("memory.current", "memory.peak")
        elif "memory" in controllers:
            dirs = [_leaf_dir(m, path) for m in _v1_mounts(rootp, controllers)][:1]
            names = ("memory.usage_in_bytes", "memory.max_usage_in_bytes")
        else:
            continue
        for d in dirs:
            cur, peak = (_read_bytes_value(d / n) for n in names)
            if cur is not None or peak is not None:
                return CgroupUsage(cur, peak, f"cgroup v{version} {d}")
    return None


# ---------------------------------------------------------------------------
# SLURM
# ---------------------------------------------------------------------------


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", name, raw)
        return None


def slurm_cpus(env: Mapping[str, str] | None = None) -> Figure | None:
    """CPUs SLURM allots to this task.

    Parameters
    ----------
    env : mapping, optional
        The environment (default ``os.environ``).

    Returns
    -------
    Figure or None
        ``SLURM_CPUS_PER_TASK``; failing that, and only inside the allocation
        (``SLURMD_NODENAME`` set, i.e. in the batch script or an ``srun`` step,
        not an ``salloc`` shell on the login node), ``SLURM_JOB_CPUS_PER_NODE``
        such as ``"32"`` or ``"32(x2)"``.  With different counts per node
        (``"32,16(x2)"``) the smallest is taken.  None otherwise.

    Examples
    --------
    >>> slurm_cpus({"SLURM_CPUS_PER_TASK": "8"})
    Figure(value=8, source='SLURM_CPUS_PER_TASK=8')
    >>> slurm_cpus({"SLURM_JOB_CPUS_PER_NODE": "32(x2)", "SLURMD_NODENAME": "n1"}).value
    32
    """
    env = os.environ if env is None else env
    n = _env_int(env, "SLURM_CPUS_PER_TASK")
    if n is not None and n > 0:
        return Figure(n, f"SLURM_CPUS_PER_TASK={n}")
    raw = env.get("SLURM_JOB_CPUS_PER_NODE", "").strip()
    if raw and env.get("SLURMD_NODENAME"):
        counts = re.findall(r"(\d+)(?:\(x\d+\))?", raw)
        if counts:
            return Figure(min(int(c) for c in counts), f"SLURM_JOB_CPUS_PER_NODE={raw}")
        log.warning("ignoring SLURM_JOB_CPUS_PER_NODE=%r: not a CPU count", raw)
    return None


def slurm_memory_limit(env: Mapping[str, str] | None, cpus: int) -> Figure | None:
    """Memory SLURM allots to the job on this node.

    Parameters
    ----------
    env : mapping or None
        The environment (None = ``os.environ``).
    cpus : int
        CPUs allotted on this node, multiplied by ``SLURM_MEM_PER_CPU``.

    Returns
    -------
    Figure or None
        ``SLURM_MEM_PER_NODE`` (MiB; ``0`` means the whole node, so None) or
        ``SLURM_MEM_PER_CPU`` x ``cpus``.  Values with a unit (``"16G"``) are
        accepted too.  Unreadable values are logged and ignored.

    Examples
    --------
    >>> slurm_memory_limit({"SLURM_MEM_PER_NODE": "16384"}, 8).value / 2**30
    16.0
    >>> slurm_memory_limit({"SLURM_MEM_PER_CPU": "2G"}, 4).source
    'SLURM_MEM_PER_CPU=2G x 4 CPUs'
    >>> slurm_memory_limit({"SLURM_MEM_PER_NODE": "0"}, 8) is None
    True
    """
    env = os.environ if env is None else env
    for name in ("SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU"):
        raw = env.get(name, "").strip()
        if not raw:
            continue
        try:
            value = parse_size(raw, default_unit="M")
        except ValueError:
            log.warning("ignoring %s=%r: not a memory size", name, raw)
            continue
        if value == 0:  # SLURM: --mem=0 asks for all the memory of the node
            continue
        if name == "SLURM_MEM_PER_NODE":
            return Figure(value, f"{name}={raw}")
        return Figure(value * max(1, int(cpus)), f"{name}={raw} x {int(cpus)} CPUs")
    return None


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------


def _physical_memory() -> Figure | None:
    try:
        n = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    return Figure(int(n), "physical (os.sysconf)") if n > 0 else None


def _affinity_cpus() -> Figure:
    try:
        return Figure(len(os.sched_getaffinity(0)), "sched_getaffinity")
    except (AttributeError, OSError):  # not Linux
        return Figure(os.cpu_count() or 1, "os.cpu_count")


def _shorten(source: str) -> str:
    """Keep the last two components of long paths: ``.../job_7/memory.max``."""
    words = []
    for w in source.split(" "):
        parts = w.split("/")
        if w.startswith("/") and len(parts) > 4:
            w = ".../" + "/".join(parts[-2:])
        words.append(w)
    return " ".join(words)


@dataclass(frozen=True)
class Limits:
    """What the job may use: memory in bytes and CPUs, each with its source.

    Parameters
    ----------
    memory : Figure
        The smallest memory figure, in bytes.
    cpus : Figure
        The smallest CPU figure.
    details : dict of str to Figure
        Every figure seen, keyed ``"memory.cgroup"``, ``"memory.slurm"``,
        ``"memory.physical"``, ``"memory.psutil"``, ``"cpus.affinity"``,
        ``"cpus.slurm"``, ``"cpus.cgroup"`` (for ``diagnose``).
    """

    memory: Figure
    cpus: Figure
    details: dict[str, Figure] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the start-up log naming every source.

        Returns
        -------
        str
            E.g. ``"memory limit 16.0 GiB (SLURM_MEM_PER_NODE=16384; cgroup v2
            .../job_7/memory.max 16.0 GiB; physical (os.sysconf) 251.5 GiB),
            CPUs 8 (SLURM_CPUS_PER_TASK=8; sched_getaffinity 32)"``: the binding
            source first, then the others with their values.
        """
        def part(kind: str, chosen: Figure, fmt: Callable[[float], str]) -> str:
            items = [_shorten(chosen.source)]
            for key, fig in self.details.items():
                if key.startswith(kind + ".") and fig is not chosen:
                    items.append(f"{_shorten(fig.source)} {fmt(fig.value)}")
            return "; ".join(items)

        return (f"memory limit {_gib(self.memory.value)} ({part('memory', self.memory, _gib)}), "
                f"CPUs {self.cpus.value} ({part('cpus', self.cpus, str)})")


def detect_limits(env: Mapping[str, str] | None = None,
                  cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
                  proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
                  *,
                  affinity_cpus: int | None = None,
                  physical_bytes: int | None = None) -> Limits:
    """Find the memory and CPUs this process may use.

    Parameters
    ----------
    env : mapping, optional
        The environment (default ``os.environ``), for the SLURM variables.
    cgroup_root : path-like, optional
        Where the cgroup file systems are mounted.
    proc_cgroup : path-like, optional
        The ``/proc/self/cgroup`` file.
    affinity_cpus, physical_bytes : int, optional
        Stand-ins for ``len(os.sched_getaffinity(0))`` and the physical memory,
        for tests; None (default) reads them from the OS.

    Returns
    -------
    Limits
        memory = min(cgroup limit over all ancestors, SLURM_MEM_PER_NODE or
        SLURM_MEM_PER_CPU x CPUs, physical memory); psutil's total only if
        none of these is known.  CPUs = min(affinity, SLURM_CPUS_PER_TASK,
        cgroup CPU quota).

    Raises
    ------
    BudgetError
        If no memory figure at all can be found (pass ``--mem-budget``).
    """
    env = os.environ if env is None else env
    details: dict[str, Figure] = {}

    aff = Figure(affinity_cpus, "sched_getaffinity") if affinity_cpus else _affinity_cpus()
    for key, fig in (("cpus.affinity", aff),
                     ("cpus.slurm", slurm_cpus(env)),
                     ("cpus.cgroup", cgroup_cpu_limit(cgroup_root, proc_cgroup))):
        if fig is not None:
            details[key] = fig
    cpus = _smallest([f for k, f in details.items() if k.startswith("cpus.")])
    assert cpus is not None  # affinity is always there

    phys = (Figure(int(physical_bytes), "physical (os.sysconf)") if physical_bytes
            else _physical_memory())
    # Tie order = list order: the cgroup is what the kernel enforces, so it is
    # named as the binding source when SLURM or the node report the same figure.
    for key, fig in (("memory.cgroup", cgroup_memory_limit(cgroup_root, proc_cgroup)),
                     ("memory.slurm", slurm_memory_limit(env, int(cpus.value))),
                     ("memory.physical", phys)):
        if fig is not None:
            details[key] = fig
    memory = _smallest([f for k, f in details.items() if k.startswith("memory.")])
    if memory is None:
        try:
            memory = Figure(int(psutil.virtual_memory().total), "psutil.virtual_memory().total")
        except Exception as exc:  # noqa: BLE001 - psutil is the last resort; say so below
            raise BudgetError(
                f"cannot find how much memory this job may use (no cgroup limit, no SLURM "
                f"memory variable, os.sysconf and psutil failed: {exc}); pass --mem-budget"
            ) from exc
        details["memory.psutil"] = memory
    return Limits(memory=memory, cpus=cpus, details=details)


# ---------------------------------------------------------------------------
# Per-patient cost and baseline
# ---------------------------------------------------------------------------


#: What numpy's ``savez`` holds per array while writing it to a zip member:
#: ``numpy.lib.format.write_array`` walks the array with ``nditer(buffersize=16 MiB)``
#: and writes ``chunk.tobytes()``, one 16 MiB ``bytes`` at a time.
_SAVEZ_CHUNK_BYTES = 16 * _MIB

#: Memory that loading every kernel from a warm Numba cache adds (LLVM code
#: objects, NRT, type caches): measured 22-30 MiB for all kernels between the
#: Engine's start and the end of a run, whatever the volume shape.
WARM_JIT_BYTES = 32 * _MIB
#: Memory that compiling every kernel adds when the cache is cold or off (LLVM
#: keeps the compiled modules): measured ~300 MiB retained (numba 0.60-0.61, 4
#: experts), almost all of it still resident at the end of the run.
COLD_JIT_BYTES = 320 * _MIB

_STAGES = ("fit", "evaluate", "predict")


def _volume_terms(shape: Sequence[int], n_experts: int) -> tuple[int, int]:
    if len(shape) != 3 or min(int(s) for s in shape) < 1:
        raise ValueError(f"shape must be three positive lengths, got {tuple(shape)}")
    if n_experts < 1:
        raise ValueError(f"n_experts must be >= 1, got {n_experts}")
    return math.prod(int(s) for s in shape), int(n_experts)


def per_patient_bytes(shape: Sequence[int], n_experts: int, *, lambda_grad: float,
                      lambda_edge: float, n_tiles: int, stage: str,
                      save_weight_volumes: bool = True, n_threads: int = 1) -> int:
    """Peak memory of one patient in flight in a stage (calibrated, see Notes).

    Parameters
    ----------
    shape : sequence of 3 int
        Volume shape ``(N0, N1, N2)``; ``N`` = number of voxels.
    n_experts : int
        ``M``, the number of experts.
    lambda_grad, lambda_edge : float
        Options of algorithm A3-A4 (they only change the fit's per-line scratch).
    n_tiles : int
        ``T``, the number of tiles (the fit's Q/B/count outputs).
    stage : {"fit", "evaluate", "predict"}
        The pass the patient is in.
    save_weight_volumes : bool, optional
        Whether evaluate writes the weight npz files (A8): each patient then
        holds a ``numpy.savez`` write buffer.  The weight maps themselves are
        made once per task: see `per_task_bytes`.
    n_threads : int, optional
        Numba threads per patient (``PoolPlan.threads``): each has its own
        per-line scratch.

    Returns
    -------
    int
        Bytes.  The memory of ``w`` patients in flight is ``w`` times this;
        add `baseline_bytes` and `per_task_bytes` for the process.

    Raises
    ------
    ValueError
        On a bad shape, expert count or stage.

    Notes
    -----
    Terms in bytes, with ``N`` voxels, ``M`` experts, ``T`` tiles, ``t`` Numba
    threads.  "Mapped pages" are the ``VolumeStore`` ``.npy`` pages the kernels
    touch: every page of every input, resident (and charged to the cgroup) while
    the patient holds its memmaps, released when it drops them.

    fit (``engine.Engine._fit`` -> ``statistics.patient_statistics``)
        mapped pages of HR + M experts ``4N(M + 1)``; the uint8 valid mask ``N``
        (``kernels.stats._valid_mask``, alive for the whole call); the returned
        Q, B, counts ``8T(M*M + M + 1)``; per-thread line scratch of
        ``_tile_statistics`` / ``_sobel_magnitude_max``
        ``t * N2 * 8 * ((M + 1)(1 + 3g) + 3e + M + M(M + 1)/2 + 3) + 12t(N2 + 2)``
        (``g = lambda_grad > 0``, ``e = lambda_edge > 0``).  Neither option
        allocates a volume: gradients and the edge map are computed per line.
    evaluate (``engine.Engine._evaluate_split.eval_one``)
        the same mapped pages, plus the largest of what is alive at once in
        each step:

        - ``blending.brain_mask``: its uint8 mask ``N`` + union-find labels
          ``4N`` (int32; ``8N`` from 2**31 voxels);
        - ``blending.blend_volume``: brain mask ``N`` + float32 blend ``4N``
          (+ per-row scratch ``4t * N2 * 4 (M + 3)``);
        - ``metrics.volume_metrics``: blend ``4N`` + the ``hr > 0`` mask ``N`` +
          SSIM slice scratch ``28t`` x the largest slice;
        - writes: blend ``4N`` + one ``N0 * N1`` float32 slice (nibabel writes
          the F-ordered volume slice by slice; python-isal keeps only a small
          window), and with weight volumes the ``numpy.savez`` chunk
          ``min(16 MiB, 4NM)`` (the blend is still alive then).

        The valid mask (``N``) is deleted before the brain mask is built.
        Then, once the blend is written and freed, the test split scores each expert
        alone and the HR-free blend (``scoring.test_extras``): the largest of the predict
        steps below (without the mapped pages, already counted).  With weight volumes,
        the patient's NIfTI maps (``weightmaps.BlendWeightMaps.write``): its brain mask
        ``N`` + one expert's float64 map and its float32 copy ``12N``.
    predict (``predict.predict_volume``, one patient, no pool)
        the experts' mapped pages ``4NM``, plus the largest of: the float32
        HR proxy ``4N`` with, while it is summed, one ``np.where`` copy and an
        ``isfinite`` mask ``5N``; the validity test ``4N + 2MN + 2N`` (``np.all``
        over a list of M boolean ``isfinite`` volumes stacks them into a second
        ``MN`` array) -- the peak for M >= 2; the brain mask with the proxy still
        alive ``4N + N + 4N``; the blend ``5N``; the write ``4N``.  Measured
        14.0 N above the mapped pages at M = 4 (160x192x160).  Building the
        validity mask with ``statistics.valid_mask(proxy, experts)`` would cut
        the ``2MN + 2N`` to ``N``.

    Calibrated against the sampled RSS of ``pacs-numba train`` runs
    (tests/test_memory_calibration.py): with 4 experts the evaluate stage
    dominates, and the growth of the peak per extra worker matched this within
    ~15% at 96x112x96, 128x144x128 and 160x192x160 (M = 2, 4, 6).  Not counted:
    freed blocks glibc keeps in its malloc arenas (up to ~40 MiB per process
    measured; none once `pin_mmap_threshold` is called).

    Examples
    --------
    >>> per_patient_bytes((160, 192, 160), 4, lambda_grad=0.2, lambda_edge=0.25,
    ...                   n_tiles=1200, stage="evaluate") // 2**20
    159
    >>> per_patient_bytes((160, 192, 160), 4, lambda_grad=0.2, lambda_edge=0.25,
    ...                   n_tiles=1200, stage="fit") // 2**20
    98
    """
    n, m = _volume_terms(shape, n_experts)
    n0, n1, n2 = (int(s) for s in shape)
    t = max(1, int(n_threads))
    if stage == "fit":
        g = 1 if lambda_grad > 0 else 0
        e = 1 if lambda_edge > 0 else 0
        total = 4 * n * (m + 1)                                # mapped HR + expert pages
        total += n                                             # uint8 valid mask
        total += 8 * max(0, int(n_tiles)) * (m * m + m + 1)    # Q, B, counts
        n_terms = m + m * (m + 1) // 2
        total += t * n2 * 8 * ((m + 1) * (1 + 3 * g) + 3 * e + n_terms + 3)
        total += t * 12 * (n2 + 2)                             # float32 stencil rows
        return int(total)
    if stage not in _STAGES:
        raise ValueError(f"stage must be 'fit', 'evaluate' or 'predict', got {stage!r}")
    label_bytes = 4 if n < 2**31 - 1 else 8
    proxy = 4 * n
    hr_free = max(proxy + 5 * n,                               # sum of np.where copies
                  proxy + 2 * m * n + 2 * n,                   # np.all over isfinite list
                  proxy + n + label_bytes * n,                 # brain mask of the proxy
                  5 * n + 4 * t * n2 * 4 * (m + 3),            # blend
                  4 * n + 4 * n0 * n1)                         # write
    if stage == "predict":
        return int(4 * n * m + hr_free)                        # + mapped expert pages
    total = 4 * n * (m + 1)                                    # mapped HR + expert pages
    largest_slice = n // min(n0, n1, n2)
    brain = n + label_bytes * n
    blend = n + 4 * n + 4 * t * n2 * 4 * (m + 3)
    metrics = 4 * n + n + 28 * t * largest_slice
    writes = 4 * n + 4 * n0 * n1
    extras = hr_free                                           # test split: scoring.test_extras
    if save_weight_volumes:
        writes += min(_SAVEZ_CHUNK_BYTES, 4 * n * m)
        extras = max(extras, n + 12 * n)                       # brain mask + one expert's map
    total += max(brain, blend, metrics, writes, extras)
    return int(total)


def per_task_bytes(shape: Sequence[int], n_experts: int, *, n_tiles: int, stage: str,
                   save_weight_volumes: bool = True, n_patients: int = 1) -> int:
    """Memory a stage holds once per task, whatever the pool width.

    Parameters
    ----------
    shape : sequence of 3 int
        Volume shape; ``N`` = number of voxels.
    n_experts : int
        ``M``, the number of experts.
    n_tiles : int
        ``T``, the number of tiles.
    stage : {"fit", "evaluate", "predict"}
        The pass.
    save_weight_volumes : bool, optional
        Whether the weight maps of A8 are made (evaluate / predict).
    n_patients : int, optional
        Patients of the stage (the fit keeps every patient's Q, B and counts
        until it sums them in manifest order).

    Returns
    -------
    int
        Bytes.

    Raises
    ------
    ValueError
        On a bad shape, expert count or stage.

    Notes
    -----
    fit
        every patient's Q, B, counts ``8T(M*M + M + 1)`` kept for the ordered
        sum, plus the sums, plus the solver's ``T x M`` float64 arrays
        (``solve.fit_weights``, ``laplacian_smooth``; 4 of them).
    evaluate (with weight volumes)
        ``engine._WeightNpz``: the two weight-map ``.npz`` files compressed once
        into template bytes, held while the test patients run.  The maps are
        piecewise constant per tile and deflate to a few percent; 5% of the raw
        ``4NM + 8N`` is a generous bound (measured 3% at 200x230x190x4).  The
        maps themselves exist only before the pool starts: see `setup_bytes`.
        Plus ``engine._WeightNifti``: the float32 ``1/den`` and entropy maps and the
        uint8 label map of the NIfTI weight maps, ``9N``.
    predict
        nothing (``predict`` makes no weight maps).

    Examples
    --------
    >>> per_task_bytes((160, 192, 160), 4, n_tiles=1200, stage="evaluate") // 2**20
    47
    """
    n, m = _volume_terms(shape, n_experts)
    if stage not in _STAGES:
        raise ValueError(f"stage must be 'fit', 'evaluate' or 'predict', got {stage!r}")
    t = max(0, int(n_tiles))
    if stage == "fit":
        return int(8 * t * (m * m + m + 1) * (max(0, int(n_patients)) + 1) + 4 * 8 * t * m)
    if stage == "predict" or not save_weight_volumes:
        return 0
    return int(0.05 * (4 * n * m + 8 * n) + 9 * n)


def setup_bytes(shape: Sequence[int], n_experts: int, *, stage: str,
                save_weight_volumes: bool = True) -> int:
    """Memory a stage needs once before its pool starts (no patient in flight then).

    Parameters
    ----------
    shape : sequence of 3 int
        Volume shape; ``N`` = number of voxels.
    n_experts : int
        ``M``, the number of experts.
    stage : {"fit", "evaluate", "predict"}
        The pass.
    save_weight_volumes : bool, optional
        Whether the weight maps of A8 are made.

    Returns
    -------
    int
        Bytes: for evaluate with weight volumes, the per-voxel weight maps ``4NM``
        (``blending.weight_maps``) plus the entropy (float32) and dominant (int32) maps
        ``8N`` while ``engine._WeightNpz`` compresses them, or, if larger, the ``29N``
        ``weightmaps.BlendWeightMaps`` peaks at while it is built; 0 otherwise.

    Examples
    --------
    >>> setup_bytes((160, 192, 160), 4, stage="evaluate") // 2**20
    135
    """
    n, m = _volume_terms(shape, n_experts)
    if stage not in _STAGES:
        raise ValueError(f"stage must be 'fit', 'evaluate' or 'predict', got {stage!r}")
    if stage != "evaluate" or not save_weight_volumes:
        return 0
    return int(max(4 * n * m + 8 * n, 29 * n))


@dataclass(frozen=True)
class PeakPrediction:
    """The predicted peak RSS of a task, term by term (see `predict_peak_bytes`).

    Parameters
    ----------
    baseline_bytes : int
        Process before any patient (`baseline_bytes`).
    per_patient : dict of str to int
        `per_patient_bytes` of each stage.
    per_task : dict of str to int
        `per_task_bytes` of each stage.
    widths : dict of str to int
        Patients in flight in each stage.
    stage : str
        The stage that sets the peak.
    peak_bytes : int
        ``baseline + per_task[stage] + widths[stage] * per_patient[stage]``.
    """

    baseline_bytes: int
    per_patient: dict[str, int]
    per_task: dict[str, int]
    widths: dict[str, int]
    stage: str
    peak_bytes: int

    def describe(self) -> str:
        """One line with every term in MiB.

        Returns
        -------
        str
        """
        s = self.stage
        return (f"peak {self.peak_bytes / _MIB:.0f} MiB in {s} = baseline "
                f"{self.baseline_bytes / _MIB:.0f} + once per task {self.per_task[s] / _MIB:.0f} "
                f"+ {self.widths[s]} x {self.per_patient[s] / _MIB:.0f} per patient")


def predict_peak_bytes(shape: Sequence[int], n_experts: int, *, width: int,
                       lambda_grad: float, lambda_edge: float, n_tiles: int,
                       save_weight_volumes: bool = True, baseline: int | None = None,
                       n_train: int | None = None, n_test: int | None = None,
                       n_threads: int | None = None,
                       stages: Sequence[str] = ("fit", "evaluate")) -> PeakPrediction:
    """Predict the peak RSS of a ``train`` task run on ``width`` workers.

    Parameters
    ----------
    shape, n_experts, lambda_grad, lambda_edge, n_tiles, save_weight_volumes
        As for `per_patient_bytes`.
    width : int
        Pool width (``--workers``); a stage never has more patients in flight
        than it has patients.
    baseline : int, optional
        `baseline_bytes` as the engine sees it; measured in this process when None.
    n_train, n_test : int, optional
        Patients of the fit and of the evaluate stage (None: no cap on the width).
    n_threads : int, optional
        Numba threads per worker (default: ``max(1, CPUs // width)`` as `plan_pool`).
    stages : sequence of str, optional
        Stages the run goes through.

    Returns
    -------
    PeakPrediction
        ``baseline + max over stages of max(setup, per_task + width * per_patient)``.
    """
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    base = baseline_bytes() if baseline is None else int(baseline)
    if n_threads is None:
        n_threads = max(1, int(_affinity_cpus().value) // width)
    caps = {"fit": n_train, "evaluate": n_test, "predict": n_test}
    per: dict[str, int] = {}
    task: dict[str, int] = {}
    widths: dict[str, int] = {}
    for stage in stages:
        per[stage] = per_patient_bytes(shape, n_experts, lambda_grad=lambda_grad,
                                       lambda_edge=lambda_edge, n_tiles=n_tiles, stage=stage,
                                       save_weight_volumes=save_weight_volumes,
                                       n_threads=n_threads)
        task[stage] = per_task_bytes(shape, n_experts, n_tiles=n_tiles, stage=stage,
                                     save_weight_volumes=save_weight_volumes,
                                     n_patients=caps[stage] or 1)
        cap = caps[stage]
        widths[stage] = max(1, min(width, cap)) if cap is not None else width
    def stage_peak(s: str) -> int:
        setup = setup_bytes(shape, n_experts, stage=s, save_weight_volumes=save_weight_volumes)
        return max(setup, task[s] + widths[s] * per[s])

    stage = max(stages, key=stage_peak)
    return PeakPrediction(base, per, task, widths, stage, base + stage_peak(stage))


def current_rss_bytes() -> int:
    """Resident set size of this process now, in bytes (psutil).

    Returns
    -------
    int
    """
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes.

    Returns
    -------
    int
        ``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which Linux reports in
        KiB and macOS in bytes.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * _KIB)


_M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def pin_mmap_threshold(threshold_bytes: int = _MIB,
                       env: Mapping[str, str] | None = None) -> bool:
    """Make glibc serve every allocation of ``threshold_bytes`` or more with its own mmap.

    Parameters
    ----------
    threshold_bytes : int, optional
        Allocations at least this large are mapped and unmapped on their own
        (default 1 MiB: every volume-sized array; small scratch stays on the heap).
    env : mapping, optional
        Environment (default ``os.environ``); if it sets
        ``MALLOC_MMAP_THRESHOLD_``, glibc already obeys that and nothing is done.

    Returns
    -------
    bool
        Whether the threshold was set (False off glibc, e.g. macOS or musl).

    Notes
    -----
    glibc raises its mmap threshold to the size of every mapped block that is
    freed (up to 32 MiB), so after the first volume is freed, later volumes of
    up to 32 MiB (up to 8M float32 voxels, e.g. 160x192x160) come from the
    per-thread malloc arenas, which keep freed blocks resident.  Measured on a
    160x192x160 cohort: +20-40 MiB of RSS at one worker that no live array
    accounts for.  Setting the threshold explicitly turns the dynamic
    adjustment off, so RSS follows the live arrays (`per_patient_bytes`); no
    run-time cost was measurable.  Call it once at start-up, before the pool.
    """
    env = os.environ if env is None else env
    if env.get("MALLOC_MMAP_THRESHOLD_", "").strip():
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)))


_KERNEL_MODULES = ("blend", "metrics", "probe", "qp", "stats")


def kernel_cache_state() -> tuple[int, int]:
    """Count the package's kernels and those the Numba cache can serve.

    Returns
    -------
    (n_kernels, n_cached) : tuple of int
        Every ``@njit`` dispatcher defined in ``pacs_numba.kernels``, and those
        whose on-disk cache index exists and matches the current source (what
        Numba's own loader checks before it loads instead of compiling).  With
        the cache off (``PACS_NUMBA_CACHE=0``) ``n_cached`` is 0.  ``(0, 0)``
        if the kernels cannot be inspected.
    """
    import importlib

    total = cached = 0
    for name in _KERNEL_MODULES:
        try:
            mod = importlib.import_module(f"pacs_numba.kernels.{name}")
        except Exception as exc:  # noqa: BLE001 - an estimate; never fail the run for it
            log.debug("cannot inspect kernels of %s: %s", name, exc)
            return 0, 0
        for obj in vars(mod).values():
            py_func = getattr(obj, "py_func", None)
            if py_func is None or getattr(py_func, "__module__", None) != mod.__name__:
                continue
            total += 1
            cache = getattr(obj, "_cache", None)
            try:
                if cache is not None and cache._cache_file._load_index():
                    cached += 1
            except Exception:  # noqa: BLE001 - numba internals: unreadable = not cached
                pass
    return total, cached


def baseline_bytes(*, compile_allowance_bytes: int | None = None,
                   fallback_rss_bytes: int = 400 * _MIB) -> int:
    """Memory the process needs before any patient: RSS now + a JIT allowance.

    Parameters
    ----------
    compile_allowance_bytes : int, optional
        Memory the kernels will add when they are first used, after this is
        measured.  None (default): from the Numba cache (`kernel_cache_state`):
        ``WARM_JIT_BYTES`` (32 MiB) if every kernel loads from the cache, else
        ``WARM_JIT_BYTES`` plus ``COLD_JIT_BYTES`` (320 MiB) times the fraction
        of kernels that must be compiled.
    fallback_rss_bytes : int, optional
        Used when psutil cannot read the RSS: roughly the interpreter plus
        numpy, scipy, numba and nibabel imported.

    Returns
    -------
    int
        Current RSS (call this after the imports, as the engine does when it
        plans a pool) + the allowance.

    Notes
    -----
    Measured on ``pacs-numba train`` (4 experts): RSS after the imports and the
    Engine's start 160-165 MiB (about 70 MiB anonymous + 93 MiB of mapped
    shared libraries), 185-195 MiB once every kernel is loaded from a warm
    cache; compiling them all instead left ~300 MiB more resident.  Both are
    independent of the volume shape.  Calling it again once the kernels are
    loaded counts them twice (RSS and allowance): at most 32 MiB too much with
    a warm cache.
    """
    if compile_allowance_bytes is None:
        total, cached = kernel_cache_state()
        cold_fraction = (total - cached) / total if total else 1.0
        compile_allowance_bytes = int(WARM_JIT_BYTES + COLD_JIT_BYTES * cold_fraction)
    try:
        rss = current_rss_bytes()
    except Exception:  # noqa: BLE001 - any psutil failure: fall back to the estimate
        rss = fallback_rss_bytes
    return int(rss + compile_allowance_bytes)


# ---------------------------------------------------------------------------
# Pool plan
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolPlan:
    """How many patients run at once, and with how many Numba threads each.

    Parameters
    ----------
    width : int
        Patients in flight (ThreadPoolExecutor workers).
    threads : int
        Numba threads per worker, ``max(1, CPUs // width)``.
    per_patient_bytes, baseline_bytes, margin_bytes : int
        The terms of the memory bound.
    limit : Figure
        Memory limit used (the detected one, or ``--mem-budget`` if smaller).
    cpus : Figure
        CPU figure used.
    reason : str
        Which bound set the width, in words.
    overrides : dict of str to int
        Every worker override seen (``--workers``, ``PACS_NUMBA_MAX_WORKERS``,
        ``PACS_SR_MAX_WORKERS``), whether it applied or not (see ``reason``).
    per_task_bytes : int
        Memory the stage holds once whatever the width (`per_task_bytes`).
    """

    width: int
    threads: int
    per_patient_bytes: int
    baseline_bytes: int
    margin_bytes: int
    limit: Figure
    cpus: Figure
    reason: str
    overrides: dict[str, int] = field(default_factory=dict)
    per_task_bytes: int = 0

    def describe(self) -> str:
        """One log line: ``"pool 4 workers x 2 numba threads (memory: ...)"``.

        Returns
        -------
        str
        """
        once = f", once per task {_gib(self.per_task_bytes, 2)}" if self.per_task_bytes else ""
        return (f"pool {self.width} workers x {self.threads} numba threads "
                f"(bound: {self.reason}; {_gib(self.per_patient_bytes, 2)}/patient, "
                f"baseline {_gib(self.baseline_bytes, 2)}{once}, "
                f"margin {_gib(self.margin_bytes, 2)})")


_OVERRIDE_ENV = ("PACS_NUMBA_MAX_WORKERS", "PACS_SR_MAX_WORKERS")


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool):
        value = None  # True/False are not worker counts
    try:
        n = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        n = None
    if n is None or n < 1:
        raise ConfigError(f"{name}={value!r} is not a worker count; expected an integer >= 1")
    return n


def plan_pool(limits: Limits, *, per_patient_bytes: int, baseline_bytes: int, n_patients: int,
              num_workers: int | None = None, workers_override: int | None = None,
              env: Mapping[str, str] | None = None, margin_fraction: float = 0.10,
              min_margin_bytes: int = 256 * _MIB,
              mem_budget_bytes: int | None = None, per_task_bytes: int = 0) -> PoolPlan:
    """Choose the pool width and Numba threads per worker (algorithm B4, B5).

    Parameters
    ----------
    limits : Limits
        From `detect_limits`.
    per_patient_bytes : int
        Memory of one patient in flight (`per_patient_bytes`), > 0.
    baseline_bytes : int
        Memory of the process before any patient (`baseline_bytes`), >= 0.
    n_patients : int
        Patients to process; the pool is never wider.
    num_workers : int, optional
        The config's ``num_workers``.  Negative values follow joblib, as the
        reference passed them to it: -1 = all CPUs, -2 = all but one.
    workers_override : int, optional
        ``--workers``.  It replaces ``num_workers`` (the command line beats the
        config file) and makes the environment overrides ignored.
    env : mapping, optional
        Environment (default ``os.environ``) for ``PACS_NUMBA_MAX_WORKERS`` and,
        if that is unset, the reference's ``PACS_SR_MAX_WORKERS``: caps.
    margin_fraction : float, optional
        Safety margin as a fraction of the limit (default 10%).
    min_margin_bytes : int, optional
        Smallest safety margin (default 256 MiB).
    mem_budget_bytes : int, optional
        ``--mem-budget``; used instead of the detected limit when smaller.
    per_task_bytes : int, optional
        Memory the stage holds once, whatever the width (`per_task_bytes`:
        the evaluate stage's weight maps), >= 0; default 0.

    Returns
    -------
    PoolPlan
        ``width = min(requested workers, CPUs, n_patients,
        floor((limit - baseline - per_task - margin) / per_patient))`` with
        ``margin = max(min_margin_bytes, margin_fraction * limit)``, and
        ``threads = max(1, CPUs // width)``.  No override can go above what
        memory or the CPUs allow; ``reason`` says when one was capped.

    Raises
    ------
    BudgetError
        If not even one patient fits; the message says how much memory one
        patient needs, how much the job has and from where, and what to do.
    ConfigError
        If an override or ``num_workers`` is not an integer >= 1 (the message
        names it).

    Examples
    --------
    >>> lim = Limits(Figure(16 * 2**30, "SLURM_MEM_PER_NODE=16384"),
    ...              Figure(8, "SLURM_CPUS_PER_TASK=8"), {})
    >>> p = plan_pool(lim, per_patient_bytes=3 * 2**30, baseline_bytes=2**29,
    ...               n_patients=40, env={})
    >>> p.width, p.threads
    (4, 2)
    """
    env = os.environ if env is None else env
    if per_patient_bytes <= 0:
        raise ValueError(f"per_patient_bytes must be > 0, got {per_patient_bytes}")
    if baseline_bytes < 0:
        raise ValueError(f"baseline_bytes must be >= 0, got {baseline_bytes}")
    if per_task_bytes < 0:
        raise ValueError(f"per_task_bytes must be >= 0, got {per_task_bytes}")
    if n_patients < 0:
        raise ValueError(f"n_patients must be >= 0, got {n_patients}")
    if not 0 <= margin_fraction < 1:
        raise ValueError(f"margin_fraction must be in [0, 1), got {margin_fraction}")

    cpus = int(limits.cpus.value)
    limit = limits.memory
    if mem_budget_bytes is not None:
        if mem_budget_bytes <= 0:
            raise ConfigError(f"--mem-budget must be > 0 bytes, got {mem_budget_bytes}")
        if mem_budget_bytes < limit.value:
            limit = Figure(int(mem_budget_bytes), f"--mem-budget {_gib(mem_budget_bytes, 2)}")

    # Overrides: all set values are checked so a typo never passes silently.
    overrides: dict[str, int] = {}
    if workers_override is not None:
        overrides["--workers"] = _check_count("--workers", workers_override)
    for name in _OVERRIDE_ENV:
        raw = env.get(name, "")
        if raw.strip():
            overrides[name] = _check_count(name, raw)

    # Requested width: --workers, else the config; then an environment cap.
    bounds: list[tuple[int, str]] = []   # (value, words); order = order named on ties
    override_name: str | None = None
    if "--workers" in overrides:
        override_name = "--workers"
        bounds.append((overrides["--workers"], f"--workers={overrides['--workers']}"))
    else:
        env_name = next((n for n in _OVERRIDE_ENV if n in overrides), None)
        if env_name is not None:
            override_name = env_name
            bounds.append((overrides[env_name], f"{env_name}={overrides[env_name]}"))
        if num_workers is not None:
            nw = int(num_workers)
            if nw == 0 or isinstance(num_workers, bool):
                raise ConfigError(f"num_workers={num_workers!r} is not a worker count; "
                                  "expected an integer >= 1 (or -1 for all CPUs)")
            if nw > 0:
                bounds.append((nw, f"config num_workers={nw}"))
            else:
                bounds.append((max(1, cpus + 1 + nw), f"config num_workers={nw} (joblib style)"))
    bounds.append((max(1, n_patients), f"patients: {n_patients} to process"))
    bounds.append((cpus, f"CPUs: {cpus} ({limits.cpus.source})"))

    margin = int(max(min_margin_bytes, margin_fraction * limit.value))
    free = int(limit.value) - baseline_bytes - per_task_bytes - margin
    fit = free // per_patient_bytes if free > 0 else 0
    if fit < 1:
        raise BudgetError(_budget_message(limit, per_patient_bytes, baseline_bytes,
                                          margin_fraction, min_margin_bytes, per_task_bytes))
    once = f" - {_gib(per_task_bytes)} once per task" if per_task_bytes else ""
    bounds.append((fit, f"memory: {fit} x {_gib(per_patient_bytes)} fits in "
                        f"{_gib(limit.value)} ({limit.source}) - {_gib(baseline_bytes)} baseline"
                        f"{once} - {_gib(margin)} margin"))

    width = min(v for v, _ in bounds)
    binding = [words for v, words in bounds if v == width]
    reason = "; ".join(binding)
    if override_name is not None and overrides[override_name] > width:
        reason += (f" ({override_name}={overrides[override_name]} capped to {width}: the pool "
                   "never exceeds the memory, the CPUs or the patients)")
    ignored = [n for n in overrides if n != override_name]
    if ignored:
        reason += f" ({', '.join(ignored)} ignored: {override_name} takes precedence)"
    threads = max(1, cpus // width)
    plan = PoolPlan(width=width, threads=threads, per_patient_bytes=int(per_patient_bytes),
                    baseline_bytes=int(baseline_bytes), margin_bytes=margin, limit=limit,
                    cpus=limits.cpus, reason=reason, overrides=overrides,
                    per_task_bytes=int(per_task_bytes))
    log.debug("%s", plan.describe())
    return plan


def _budget_message(limit: Figure, per_patient: int, baseline: int,
                    margin_fraction: float, min_margin_bytes: int, per_task: int = 0) -> str:
    # The margin grows with the limit, so the memory to ask for solves
    # L - baseline - per_task - max(min_margin, f * L) >= per_patient.
    fixed = baseline + per_task
    need = max(math.ceil((per_patient + fixed) / (1 - margin_fraction)),
               per_patient + fixed + min_margin_bytes)
    margin_at_need = need - per_patient - fixed
    once = f"{_gib(per_task, 2)} once per task + " if per_task else ""
    ask_gib = math.ceil(need / _GIB)
    fix = (f"Request at least {ask_gib}G (sbatch --mem={ask_gib}G, or --mem-per-cpu so that "
           f"it times the CPUs reaches {ask_gib}G)")
    if limit.source.startswith("--mem-budget"):
        fix = f"Raise --mem-budget to at least {ask_gib}G if the job has it, or {fix}"
    return (f"not even one patient fits in memory: one patient needs {_gib(need, 2)} "
            f"({_gib(per_patient, 2)} per patient + {_gib(baseline, 2)} baseline + {once}"
            f"{_gib(margin_at_need, 2)} safety margin) but the job has {_gib(limit.value, 2)} "
            f"({limit.source}). {fix}, or process smaller volumes or fewer experts "
            "(when evaluating, save_weight_volumes: false also helps).")


# ---------------------------------------------------------------------------
# RSS sampling
# ---------------------------------------------------------------------------


class RssSampler:
    """Sample the resident set size in a background thread.

    Parameters
    ----------
    interval_s : float, optional
        Seconds between samples (default 0.05).
    include_children : bool, optional
        Add the RSS of every child process (recursively).
    pid : int, optional
        Process to watch (default: this one).

    Attributes
    ----------
    samples : list of (float, int)
        ``(seconds since start, bytes)``; one at entry, one at exit and one per
        interval between.
    peak_bytes : int
        Largest sample.

    Examples
    --------
    >>> with RssSampler(0.01) as s:
    ...     x = bytearray(50 * 2**20)
    >>> s.peak_bytes > 0
    True
    """

    def __init__(self, interval_s: float = 0.05, *, include_children: bool = False,
                 pid: int | None = None) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self.include_children = include_children
        self.samples: list[tuple[float, int]] = []
        self.peak_bytes = 0
        self._proc = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _rss(self) -> int:
        total = self._proc.memory_info().rss
        if self.include_children:
            for child in self._proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # child exited between listing and reading
                    pass
        return int(total)

    def sample(self) -> int:
        """Take one sample now and return it in bytes.

        Returns
        -------
        int
        """
        rss = self._rss()
        self.samples.append((time.monotonic() - self._t0, rss))
        self.peak_bytes = max(self.peak_bytes, rss)
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except psutil.Error:  # watched process gone: nothing more to see
                return

    def __enter__(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.sample()
        except psutil.Error:
            pass
