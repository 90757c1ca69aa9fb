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


# ---------------------------------------------------------------- names cited in the docs
#: Endings that make a dotted token a file name, not ``module.name``.
FILE_ENDINGS = {"json", "csv", "md", "npz", "npy", "py", "yaml", "yml", "gz", "nii", "h5", "sh",
                "txt", "html", "log", "lock", "mat", "toml", "out", "parts", "png", "tmp",
                "cfg", "ini", "label"}
#: Files of the published tool or its scripts that the docs compare with, not ours.
EXTERNAL_FILES = ("pacs_sr/", "scripts/diagnose_memory.py")
DOTTED = re.compile(r"`((?:pacs_numba\.)?[a-z_][a-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")
PY_PATH = re.compile(r"`((?:[a-z_]+/)*[a-z_][a-z0-9_]*\.py)`")


def _pkg_modules() -> dict[str, list[str]]:
    """Every module of the package, by its stem (``layout`` -> ``pacs_numba.store.layout``)."""
    by_stem: dict[str, list[str]] = {}
    pkg = ROOT / "pacs_numba"
    for f in pkg.rglob("*.py"):
        rel = f.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        by_stem.setdefault(parts[-1], []).append(".".join(parts))
    return by_stem


def _resolves(token: str, by_stem: dict[str, list[str]]) -> bool | None:
    """True if ``token`` names something importable, False if not, None if it is no name.

    ``pacs_numba.a.b``: import the longest module prefix, getattr the rest.  ``a.b`` with
    ``a`` a module stem of the package (``layout.TaskLayout``, ``store.layout``): the same
    from each module of that stem; one that resolves is enough.
    """
    import importlib

    parts = token.split(".")
    if parts[-1] in FILE_ENDINGS:
        return None
    if len(parts) == 2 and parts[1] in _config_keys().get(parts[0], ()):
        return True  # a config key such as `registration.atlas`, not a module attribute
    if parts[0] == "pacs_numba":
        starts = ["pacs_numba"]
        rest = parts[1:]
    elif parts[0] in by_stem:
        starts = by_stem[parts[0]]
        rest = parts[1:]
    else:
        return None
    for start in starts:
        names = list(rest)
        mod_name = start
        try:
            obj = importlib.import_module(mod_name)
        except ImportError:
            continue
        ok = True
        while names:
            sub = f"{mod_name}.{names[0]}"
            try:
                obj = importlib.import_module(sub)
                mod_name = sub
                names.pop(0)
                continue
            except ImportError:
                pass
            try:
                obj = getattr(obj, names.pop(0))
            except AttributeError:
                ok = False
                break
        if ok:
            return True
    return False


def _config_keys() -> dict[str, set[str]]:
    """The YAML config's keys by section (``data``, ``registration``, ``pacs_sr``)."""
    import dataclasses

    from pacs_numba.config import DataConfig, PacsConfig, RegistrationConfig

    return {name: {f.name for f in dataclasses.fields(cls)}
            for name, cls in (("data", DataConfig), ("registration", RegistrationConfig),
                              ("pacs_sr", PacsConfig))}


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_module_name_cited_in_the_docs_resolves() -> None:
    by_stem = _pkg_modules()
    bad, checked = [], 0
    for f in _doc_files():
        for token in sorted(set(DOTTED.findall(f.read_text()))):
            ok = _resolves(token, by_stem)
            if ok is None:
                continue
            checked += 1
            if not ok:
                bad.append(f"{f.relative_to(ROOT)}: `{token}`")
    assert checked > 30  # the docs do cite the code
    assert not bad, "names cited in the docs that do not exist: " + "; ".join(bad)


def test_every_source_file_cited_in_the_docs_exists() -> None:
    files = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if ".venv" not in p.parts}
    bad = []
    for f in _doc_files():
        for token in sorted(set(PY_PATH.findall(f.read_text()))):
            if token.startswith(EXTERNAL_FILES):
                continue
            if not any(p == token or p.endswith("/" + token) for p in files):
                bad.append(f"{f.relative_to(ROOT)}: `{token}`")
    assert not bad, "source files cited in the docs that do not exist: " + "; ".join(bad)


def test_resolver_tells_names_from_files() -> None:
    by_stem = _pkg_modules()
    assert _resolves("layout.TaskLayout", by_stem) is True
    assert _resolves("pacs_numba.store.layout.TaskLayout", by_stem) is True
    assert _resolves("planning.plan_stage", by_stem) is True
    assert _resolves("metrics.volume_metrics", by_stem) is True  # core.metrics, not kernels
    assert _resolves("layout.NoSuchThing", by_stem) is False
    assert _resolves("metrics.json", by_stem) is None
    assert _resolves("numpy.float32", by_stem) is None
    assert _resolves("registration.atlas", by_stem) is True  # a config key
    assert _resolves("registration.Registrar", by_stem) is True  # the module


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_docs_anchors_point_at_existing_headings() -> None:
    bad = []
    for f in _doc_files():
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", f.read_text()):
            page = (f.parent / target) if target else f
            if "://" in target or page.suffix != ".md":
                continue
            heads = {_slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(), flags=re.M)}
            if anchor not in heads:
                bad.append(f"{f.relative_to(ROOT)} -> {target or f.name}#{anchor}")
    assert not bad, "links to headings that do not exist: " + "; ".join(bad)


def test_slug_follows_github() -> None:
    assert _slug("Atlas registration (`use_registration: true`)") == \
        "atlas-registration-use_registration-true"
    assert _slug("Reading the log, and `diagnose`") == "reading-the-log-and-diagnose"
