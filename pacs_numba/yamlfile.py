"""YAML as every file of ours is read: bounded, strict about repeated keys, ``1e-4`` a float.

The config and ``tune``'s grid go through :func:`parse_yaml`.  A key given twice in one
mapping is refused (PyYAML would keep the last one silently), and so are documents nested
deeper than :data:`MAX_YAML_DEPTH` or whose aliases expand to more than
:data:`MAX_YAML_VALUES` values (an "alias bomb"), quickly and with one message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

#: Deepest nesting of lists and mappings a config may have (the published schema needs 3).
MAX_YAML_DEPTH = 64
#: Most values (scalars, lists, mappings) a config may hold once its aliases are expanded.
MAX_YAML_VALUES = 100_000


class _Refused(Exception):
    """A YAML document over :data:`MAX_YAML_DEPTH` or :data:`MAX_YAML_VALUES`."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float, with bounded nesting and aliases.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-4``), so the common
    ``lambda_ridge: 1e-4`` would arrive as the *string* ``"1e-4"``.  The published
    tool hides this by calling ``float()`` on every value; we type-check instead,
    so we resolve exponent-only numbers the YAML 1.2 way.

    Two bounds keep a hostile file from hanging or crashing the loader.  Nesting is
    checked as the scanner opens each level, before PyYAML's pure-Python scanner goes
    quadratic (20,000 ``[`` take it minutes) and before its recursive composer overflows
    the stack.  Aliases are checked on the composed node graph, where an alias is one
    shared node: a "billion laughs" file composes to a few hundred nodes, but any
    consumer that walks the values (``repr`` in an error message, the validation of a
    list) would visit every expanded copy, so the expanded count is computed per
    distinct node and refused above :data:`MAX_YAML_VALUES`.
    """

    def fetch_more_tokens(self) -> None:  # noqa: D102 - PyYAML's scanner hook
        super().fetch_more_tokens()
        # flow_level counts open [ and {, indents the open block levels
        if max(self.flow_level, len(self.indents)) > MAX_YAML_DEPTH:
            raise _Refused(
                f"nesting deeper than {MAX_YAML_DEPTH} levels at line {self.line + 1}; "
                "a config needs a few"
            )

    def construct_document(self, node: yaml.Node) -> Any:  # noqa: D102 - PyYAML's hook
        values, depth = _expanded_size(node)
        if values > MAX_YAML_VALUES:
            raise _Refused(
                f"its aliases (*name) expand to more than {MAX_YAML_VALUES:,} values; "
                "a config needs a few dozen"
            )
        if depth > MAX_YAML_DEPTH:
            raise _Refused(
                f"its aliases (*name) nest deeper than {MAX_YAML_DEPTH} levels; "
                "a config needs a few"
            )
        return super().construct_document(node)


def _expanded_size(root: yaml.Node) -> tuple[int, int]:
    """Count the values and levels of ``root`` with every alias expanded.

    Iterative and memoised by node identity, so the cost is the number of distinct
    nodes however many times aliases repeat them (the composer already refuses an
    anchor that contains its own alias, so the graph has no cycle).
    """
    memo: dict[int, tuple[int, int]] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in memo:
            continue
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            children = []
        if not children_done:
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in memo)
            continue
        values = 1 + sum(memo[id(child)][0] for child in children)
        depth = 1 + max((memo[id(child)][1] for child in children), default=0)
        # capped, so that a bomb's count stays a small int
        memo[id(node)] = (min(values, MAX_YAML_VALUES + 1), depth)
    return memo[id(root)]


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


def _construct_mapping_once(
    loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False
) -> dict[Any, Any]:
    """Build a mapping, refusing a key written twice (PyYAML keeps the last one silently)."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        try:
            key = loader.construct_object(key_node, deep=True)
            hash(key)
        except Exception:  # noqa: BLE001 - unhashable keys: PyYAML reports them itself
            continue
        line = key_node.start_mark.line + 1
        if key in seen:
            raise _DuplicateKey(key, seen[key], line)
        seen[key] = line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_once)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, file: Path) -> Any:
    """Parse YAML the way every file of ours is read (the config, ``tune``'s grid).

    ``1e-4`` is a float, and a key given twice in one mapping is refused (PyYAML would keep
    the last one silently).

    Raises
    ------
    ConfigError
        Naming ``file`` (and the line) on a repeated key or invalid YAML.
    """
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as why:
        raise ConfigError(f"{file}: YAML refused: {why}") from None
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{file}: key {dup.key!r} is given twice in one section, at lines {dup.first} and "
            f"{dup.second}; keep one (YAML would silently use the last)"
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(exc.problem or exc.context or "syntax error").split())
        raise ConfigError(f"{file}: invalid YAML{where}: {what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {' '.join(str(exc).split())}") from None
