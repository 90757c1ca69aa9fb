"""The folders state the layers (docs/architecture.md), checked with ``ast``.

kernels < core, resources < store < runs < cli.  A module imports only from its own layer or
lower ones, never another module's private names, and the import graph has no circle.  Only
the heavy optional libraries (ants, matplotlib, h5py) and scipy's heavy submodules may be
imported inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pacs_numba"

# Lower number = lower layer.  Top-level modules are named by their stem, the rest by folder.
LAYERS = {
    "_version": 0, "_config": 0, "errors": 0, "yamlfile": 0,
    "kernels": 1, "config": 1,
    "core": 2, "resources": 2,
    "store": 3,
    "runs": 4,
    "cli": 5, "diagnose": 5, "__main__": 5,
    "__init__": 6,
}
#: Libraries that cost a lot to import, or are optional: the only lazy imports allowed.
#: scipy: its submodules cost 20-60 MB of RSS each (optimize ~40, ndimage ~26, stats ~58),
#: in every patient-pool process, for paths a run rarely takes (the SLSQP reference solver,
#: mixed-shape resampling, the paper metrics).
HEAVY = {"ants", "matplotlib", "h5py", "scipy"}
#: Kernel modules may import only these (and each other).
KERNEL_IMPORTS = {"numpy", "numba", "math", "_config", "__future__"}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _layer(mod: str) -> str:
    return mod.split(".")[0]


def _resolve(node: ast.ImportFrom, mod: str, path: Path) -> str | None:
    """The package-relative module an ``ImportFrom`` names, or None when not ours."""
    if node.level == 0:
        m = node.module or ""
        if m == "pacs_numba":
            return "__init__"
        return m[len("pacs_numba."):] if m.startswith("pacs_numba.") else None
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    if mod == "__init__":
        base = []
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    target = ".".join([*base, *([node.module] if node.module else [])])
    return target or "__init__"


def _imports(path: Path, mod: str) -> list[tuple[str, list[str], ast.ImportFrom]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(node, mod, path)
            if target is not None:
                out.append((target, [a.name for a in node.names], node))
    return out


def _module_of(target: str, name: str, modules: dict[str, Path]) -> str:
    """``from target import name``: the module imported (``name`` may be a submodule)."""
    sub = f"{target}.{name}" if target != "__init__" else name
    return sub if sub in modules else target


def test_every_module_has_a_layer():
    missing = sorted({_layer(m) for m in _modules()} - set(LAYERS))
    assert not missing, f"add these to LAYERS in test_layering.py: {missing}"


def test_imports_point_downwards():
    modules = _modules()
    bad = []
    for mod, path in modules.items():
        for target, names, _ in _imports(path, mod):
            for name in names:
                dep = _module_of(target, name, modules)
                if dep == "__init__" or _layer(dep) == _layer(mod):
                    continue
                if LAYERS[_layer(dep)] > LAYERS[_layer(mod)]:
                    bad.append(f"{mod} imports {dep}")
    assert not bad, "upward imports: " + "; ".join(sorted(set(bad)))


def test_no_module_imports_the_package_root():
    # the root's lazy attributes import everything: a module importing it would import all
    modules = _modules()
    bad = [mod for mod, path in modules.items() if mod != "__main__"
           for target, names, _ in _imports(path, mod) if target == "__init__"
           for name in names if _module_of(target, name, modules) == "__init__"]
    assert not bad, f"these import pacs_numba itself (use pacs_numba._version): {bad}"


def test_no_private_names_across_modules():
    modules = _modules()
    bad = []
    for mod, path in modules.items():
        for target, names, _ in _imports(path, mod):
            for name in names:
                dep = _module_of(target, name, modules)
                if dep == target and name.startswith("_") and not name.startswith("__"):
                    # kernels are private by convention (_solve -> solve) and _config is the
                    # package's settings module: both are meant to be imported
                    if _layer(target) == "kernels" or target == "_config":
                        continue
                    bad.append(f"{mod} imports {target}.{name}")
    assert not bad, "private names imported across modules: " + "; ".join(bad)


def test_no_import_cycle():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, names, _ in _imports(path, mod):
            for name in names:
                dep = _module_of(target, name, modules)
                if dep in graph and dep != mod and not dep.endswith("__init__"):
                    graph[mod].add(dep)
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d):], d]))
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_lazy_imports_only_for_heavy_libraries():
    bad = []
    for mod, path in _modules().items():
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = {(node.module or "").split(".")[0]}
                elif isinstance(node, ast.ImportFrom):
                    names = {"pacs_numba"}
                else:
                    continue
                if not names <= HEAVY:
                    bad.append(f"{mod}:{node.lineno} {sorted(names)}")
    assert not bad, "imports inside functions (allowed only for " + ", ".join(sorted(HEAVY)) + \
        "): " + "; ".join(bad)


def test_kernels_import_only_numpy_numba_math_config():
    siblings = {p.stem for p in (PKG / "kernels").glob("*.py")}
    allowed = KERNEL_IMPORTS | siblings
    for path in (PKG / "kernels").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    names = {(node.module or "").split(".")[-1]}
                else:
                    names = {(node.module or "").split(".")[0]}
            else:
                continue
            assert names <= allowed, f"{path.name} imports {names - allowed}"


def test_njit_only_in_kernels():
    for mod, path in _modules().items():
        if _layer(mod) == "kernels":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Name) and node.id in {"njit", "jit", "prange"}:
                raise AssertionError(f"{mod} uses numba.{node.id}: kernels belong in kernels/")


def test_fastmath_comes_from_config():
    for path in (PKG / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "fastmath":
                ok = isinstance(node.value, ast.Name) and node.value.id == "FASTMATH"
                assert ok, f"{path.name}:{node.value.lineno} sets fastmath other than FASTMATH"
            if isinstance(node, ast.keyword) and node.arg == "cache":
                assert isinstance(node.value, ast.Name) and node.value.id == "CACHE", (
                    f"{path.name}:{node.value.lineno} sets cache to something other than CACHE"
                )


def test_modules_stay_readable():
    """No module over ~600 lines of code (docstrings, comments and blank lines not counted)."""
    long = {}
    for mod, path in _modules().items():
        src = path.read_text()
        doc_lines: set[int] = set()
        for node in ast.walk(ast.parse(src)):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
                    and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                doc_lines.update(range(body[0].lineno, body[0].end_lineno + 1))
        code = sum(1 for i, line in enumerate(src.splitlines(), 1)
                   if line.strip() and not line.strip().startswith("#") and i not in doc_lines)
        if code > 600:
            long[mod] = code
    assert not long, f"modules over 600 lines of code: {long}"


def test_a_run_does_not_import_the_heavy_scipy_modules():
    """Every patient-pool process (and the command line) pays RSS for what it imports: scipy's
    optimize, ndimage and stats (20-60 MB each) load only on the rare paths that need them."""
    code = ("import sys, pacs_numba.runs.engine, pacs_numba.runs.predict, pacs_numba.cli; "
            "print(sorted(m for m in ('scipy.optimize', 'scipy.ndimage', 'scipy.stats', "
            "'scipy.spatial') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", out
