"""The output layout has one home (issue 7): ``pacs_numba.store.layout`` names every output path."""

from __future__ import annotations

import ast
import re
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
    layout.SUMMARY_CSV,
    layout.SUMMARY_MD,
    "model_data",
    "output_volumes",
}
#: Pieces of the layout's names: a string or f-string without whitespace (a path or a name,
#: not a message or a help text) that holds one of them spells a name outside its home.
NAME_PARTS = (*sorted(OUTPUT_NAMES), "_blend_train", "_weights_test", "_weight_analysis_",
              "results_fold_")
#: Pieces that spell a name only inside an f-string (``f"{pid}_weights_{split}"``,
#: ``f"fold_{n}"``); as plain strings they also occur in config keys (``pacs_sr_weights_path``).
FSTRING_PARTS = ("_weights_", "fold_")
#: f-strings shaped like a per-patient volume name, ``{pid}-{pulse}.nii.gz`` (layout.volume_name).
VOLUME_NAME = re.compile(r"^-\.nii\.gz$")


def _docstring_nodes(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def _spelled_names(source: str) -> list[tuple[int, str]]:
    """``(line, text)`` of every literal in ``source`` that spells a name of the layout."""
    tree = ast.parse(source)
    docs = _docstring_nodes(tree)
    fstring_parts = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr)
                     for v in node.values}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docs and id(node) not in fstring_parts):
            text = node.value
        else:
            continue
        if any(ch.isspace() for ch in text):
            continue  # a message or help text that mentions a file, not a path
        fstring = isinstance(node, ast.JoinedStr)
        if (text in OUTPUT_NAMES or any(part in text for part in NAME_PARTS)
                or (fstring and any(part in text for part in FSTRING_PARTS))
                or (fstring and VOLUME_NAME.match(text))):
            out.append((node.lineno, text))
    return sorted(out)


def test_the_checker_sees_names_not_messages():
    src = (
        'a = "metrics.json"\n'
        'b = f"{pid}_blend_train.nii.gz"\n'
        'c = root / "output_volumes"\n'
        'd = f"results_fold_{n}.h5"\n'
        'e = f"{pid}-{pulse}.nii.gz"\n'
        'f = "give a weights.json or a pacs_model.npz"\n'
        'g = f"cannot read {path}: expected a weights.json"\n'
        'h = cfg["pacs_sr_weights_path"]\n'
        'i = f"{pid}_weights_{split}.npz"\n'
    )
    assert [line for line, _ in _spelled_names(src)] == [1, 2, 3, 4, 5, 9]


def test_no_output_file_name_outside_layout():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        if path == PKG / "store" / "layout.py":
            continue
        for line, text in _spelled_names(path.read_text()):
            bad.append(f"{path.relative_to(PKG)}:{line} {text!r}")
    assert not bad, "output names belong in pacs_numba/store/layout.py: " + "; ".join(bad)


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
