"""Memory and CPU limits of the job: cgroups, SLURM, affinity (algorithm B4).

Everything here is a pure function of its inputs: the functions that read the
operating system take the cgroup mount, the ``/proc/self/cgroup`` file and the
environment as parameters, so the tests run them on fake trees.

Why not just ``psutil.virtual_memory()``: on a SLURM node it reports the whole
node (hundreds of GiB), while the job may use only what its cgroup allows; the
kernel OOM-kills the job when the cgroup is full, whatever the node has free.
The published PaCS-SR guessed at this with "use 50% of what psutil sees at
1.5 GB per worker" and was still OOM-killed.  Here the limit is the smallest of
every figure that can bind (cgroups over all ancestors, SLURM variables,
physical memory), each reported with its source; :mod:`pacs_numba.resources.planning`
turns it into the width of the patient pool.

Examples
--------
>>> limits = detect_limits()                                  # doctest: +SKIP
>>> log.info("%s", limits.describe())                         # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ..errors import BudgetError
from .units import gib, parse_size

log = logging.getLogger(__name__)








# cgroup v1 writes "no limit" as LONG_MAX rounded down to the page size
# (9223372036854771712 with 4 KiB pages); other page sizes give other values,
# so anything this large is treated as unlimited.
_UNLIMITED_BYTES = 1 << 60


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

        return (f"memory limit {gib(self.memory.value)} ({part('memory', self.memory, gib)}), "
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
