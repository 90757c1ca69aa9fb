"""Import direction and Numba-option rules (docs/architecture.md), checked with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "pacs_numba"

# Lower number = lower layer.  A module may import only from its own or lower layers.
LAYERS = {
    "_config": 0, "errors": 0, "layout": 0, "integrity": 0,
    "kernels": 1,
    "tiling": 2, "limits": 2, "process": 2, "costs": 2, "planning": 2,
    "io": 2, "_arrays": 2, "_checks": 2, "config": 2, "manifest": 2,
    "statistics": 2, "solve": 2, "blending": 2, "metrics": 2, "cohort": 2,
    "progress": 2, "logsetup": 2, "model": 2, "record": 2, "locking": 2, "weightmaps": 2,
    "cellstats": 2,
    "registration": 2,
    "engine": 3, "demo": 3, "predict": 3, "scoring": 3, "report": 3, "summarize": 3, "tune": 3,
    "cli": 4, "diagnose": 4, "predict_cli": 4, "__main__": 5, "__init__": 5,
}


def _top(module: Path) -> str:
    rel = module.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported(tree: ast.AST, module: Path) -> set[str]:
    out: set[str] = set()
    depth_pkg = len(module.relative_to(PKG).parts) - 1
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("pacs_numba"):
                    parts = node.module.split(".")[1:]
                    out.add(parts[0] if parts else "__init__")
                continue
            up = node.level - 1
            if up > depth_pkg:
                continue
            base = list(module.relative_to(PKG).parts[:-1])[: depth_pkg - up]
            target = base + (node.module.split(".") if node.module else [])
            if target:
                out.add(target[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pacs_numba."):
                    out.add(a.name.split(".")[1])
    return out


def test_every_module_has_a_layer():
    missing = sorted({_top(p) for p in PKG.rglob("*.py")} - set(LAYERS))
    assert not missing, f"add these modules to LAYERS in test_layering.py: {missing}"


def test_imports_point_downwards():
    bad = []
    for path in PKG.rglob("*.py"):
        me = _top(path)
        for dep in _imported(ast.parse(path.read_text()), path):
            if dep in LAYERS and dep != me and LAYERS[dep] > LAYERS[me]:
                bad.append(f"{path.relative_to(PKG)} imports {dep}")
    assert not bad, "upward imports: " + "; ".join(bad)


def test_kernels_import_only_numpy_numba_math_config():
    # ... and each other: kernels/grid.py holds the tile-id arithmetic every kernel uses.
    siblings = {p.stem for p in (PKG / "kernels").glob("*.py")}
    allowed = {"numpy", "numba", "math", "_config", "__future__"} | siblings
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
