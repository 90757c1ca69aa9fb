"""The output layout has one home (issue 7): ``pacs_numba.store.layout`` names every output path."""

from __future__ import annotations

import ast
from pathlib import Path

from pacs_numba.store import layout
from pacs_numba.store.layout import ExperimentLayout, TaskLayout

PKG = Path(__file__).resolve().parents[1] / "pacs_numba"

OUTPUT_NAMES = {
    layout.WEIGHTS_FILE,
    layout.METRICS_FILE,
    layout.MODEL_FILE,
    layout.PATIENTS_FILE,
    layout.RECORD_FILE,
    "model_data",
}
FSTRING_PARTS = ("_blend_train", "_weights_", "_weight_analysis_", "fold_")


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def test_no_output_file_name_outside_layout():
    bad = []
    for path in PKG.rglob("*.py"):
        if path.name == "layout.py":
            continue
        tree = ast.parse(path.read_text())
        docs = _docstring_nodes(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in docs:
                if node.value in OUTPUT_NAMES:
                    bad.append(f"{path.name}:{node.lineno} {node.value!r}")
            elif isinstance(node, ast.JoinedStr):
                text = "".join(
                    v.value for v in node.values if isinstance(v, ast.Constant)
                )
                if any(part in text for part in FSTRING_PARTS):
                    bad.append(f"{path.name}:{node.lineno} f-string {text!r}")
    assert not bad, "output names belong in pacs_numba/layout.py: " + "; ".join(bad)


def test_task_layout_matches_the_published_tree(tmp_path):
    lay = TaskLayout(tmp_path, "exp", 3, "5mm", "t2w")
    mdir = tmp_path / "exp" / "5mm" / "model_data" / "fold_3" / "t2w"
    assert lay.model_dir == mdir
    assert lay.volumes_dir == tmp_path / "exp" / "5mm" / "output_volumes"
    assert lay.weights_json == mdir / "weights.json"
    assert lay.metrics_json == mdir / "metrics.json"
    assert lay.blend("test", "p1") == tmp_path / "exp" / "5mm" / "output_volumes" / "p1-t2w.nii.gz"
    assert lay.blend("train", "p1") == mdir / "p1_blend_train.nii.gz"
    assert lay.weight_npz("p1") == mdir / "p1_weights_test.npz"
    assert lay.weight_analysis_npz("p1") == mdir / "p1_weight_analysis_test.npz"
    assert lay.experiment_layout.task(3, "5mm", "t2w") == lay
    assert ExperimentLayout(tmp_path, "exp").logs_dir == tmp_path / "exp" / "logs"


def test_existing_weights_prefers_the_model_file(tmp_path):
    lay = TaskLayout(tmp_path, "exp", 1, "3mm", "t1c")
    assert lay.existing_weights() is None
    lay.model_dir.mkdir(parents=True)
    lay.weights_json.write_text("{}")
    assert lay.existing_weights() == lay.weights_json
    lay.model_file.write_bytes(b"")
    assert lay.existing_weights() == lay.model_file
