"""Every "algorithm A5"-style citation in the code names a section of docs/algorithm.md."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "algorithm.md"

# "algorithm A7.2-A7.5", "algorithm A3.2-3", "algorithm A5, A6, B3", "algorithm A3-A4"
_ONE = r"[AB]\d+(?:\.\d+)?(?:-[AB]?\d+(?:\.\d+)?)?"
CITATION = re.compile(rf"algorithm ({_ONE}(?:(?:, | and ){_ONE})*)")


def _sections() -> set[str]:
    text = DOC.read_text()
    heads = set(re.findall(r"^### ([AB]\d+)\. ", text, flags=re.M))
    subs = set(re.findall(r"\*\*([AB]\d+\.\d+) ", text))
    return heads | subs


def _expand(ref: str) -> list[str]:
    """'A3.2-3' -> ['A3.2', 'A3.3']; 'A7.1-A7.5' -> ['A7.1', 'A7.5']; 'A3-A4' -> ['A3', 'A4']."""
    if "-" not in ref:
        return [ref]
    lo, hi = ref.split("-")
    if hi[0] not in "AB":
        hi = (lo.rsplit(".", 1)[0] + "." + hi) if "." in lo else lo[0] + hi
    return [lo, hi]


def _citations() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    files = [*(ROOT / "pacs_numba").rglob("*.py"), *(ROOT / "tests").rglob("*.py"),
             *(ROOT / "scripts").glob("*"), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    for f in files:
        if not f.is_file() or f.suffix not in {".py", ".md", ".sh"}:
            continue
        for m in CITATION.finditer(f.read_text(errors="replace")):
            for ref in re.split(r", | and ", m.group(1)):
                for sec in _expand(ref):
                    out.setdefault(sec, []).append(f.relative_to(ROOT).as_posix())
    return out


def test_expand_ranges() -> None:
    assert _expand("A3.2-3") == ["A3.2", "A3.3"]
    assert _expand("A7.1-A7.5") == ["A7.1", "A7.5"]
    assert _expand("A3-A4") == ["A3", "A4"]
    assert _expand("B6") == ["B6"]


def test_every_cited_section_exists() -> None:
    sections = _sections()
    # the document has every top-level section the code is organised by
    assert {f"A{i}" for i in range(1, 9)} | {f"B{i}" for i in range(1, 7)} <= sections
    assert {"A3.1", "A3.5", "A7.1", "A7.6"} <= sections
    cited = _citations()
    assert len(cited) > 10  # the code does cite the document
    missing = {sec: sorted(set(where)) for sec, where in cited.items() if sec not in sections}
    assert not missing, f"cited but not in docs/algorithm.md: {missing}"


def test_no_reference_to_a_spec_file() -> None:
    hits = []
    files = [*(ROOT / "pacs_numba").rglob("*.py"), ROOT / "README.md",
             *(ROOT / "docs").glob("*.md")]
    for f in files:
        if re.search(r"\bSPEC\b", f.read_text()):
            hits.append(f.relative_to(ROOT).as_posix())
    assert not hits, f"cite docs/algorithm.md, not SPEC: {hits}"


def test_docs_links_point_at_existing_files() -> None:
    for f in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", f.read_text()):
            if "://" in target:
                continue
            assert (f.parent / target).exists(), f"{f.name} links to missing {target}"
