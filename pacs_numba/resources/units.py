"""Byte sizes: parsing ``--mem-budget 12G`` and printing sizes, in one place."""

from __future__ import annotations

import re

from ..errors import ConfigError

# Units, not settings: binary multiples as SLURM and ``free -g`` use them.
_KIB = 1 << 10
_MIB = 1 << 20
_GIB = 1 << 30
_SIZE_MULT = {"": 1, "k": _KIB, "m": _MIB, "g": _GIB, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b)?\s*$", re.IGNORECASE)


def gib(n_bytes: float, digits: int = 1) -> str:
    """Format a byte count in GiB with ``digits`` decimals: ``gib(3 << 30) == "3.0 GiB"``."""
    return f"{n_bytes / _GIB:.{digits}f} GiB"


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


def parse_budget(text: str | None, *, flag: str = "--mem-budget") -> int | None:
    """Read a ``--mem-budget`` value: the one place every command parses it.

    Parameters
    ----------
    text : str or None
        The option's value as given; None or ``""`` means "not given".
    flag : str, optional
        The option's name, for the message.

    Returns
    -------
    int or None
        Bytes, or None when not given.

    Raises
    ------
    ConfigError
        ``"--mem-budget: cannot read 'x' as a memory size; ..."`` (exit 2 on the command
        line).

    Examples
    --------
    >>> parse_budget("12G"), parse_budget(None)
    (12884901888, None)
    """
    if text is None or text == "":
        return None
    try:
        return parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def human_size(n_bytes: float) -> str:
    """Format a byte count as a person reads it: ``"3.4 GiB"``, ``"512 KiB"``, ``"17 B"``.

    Examples
    --------
    >>> human_size(3632128033), human_size(1536), human_size(17)
    ('3.4 GiB', '1.5 KiB', '17 B')
    """
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
