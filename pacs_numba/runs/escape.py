"""Escaping of every string that reaches an HTML or Markdown output.

Patient ids, expert names and experiment names come from folder names, CSV cells and
configs: a patient id ``x" onerror="...`` must not become an HTML attribute, and an expert
named ``A|B`` must not add a column to a Markdown table.  Every writer of ``index.html``,
``summary.md`` or ``tune_results.md`` passes its strings through these functions.
"""

from __future__ import annotations

import html
import re
from urllib.parse import quote

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|#~])")


def html_text(value: object) -> str:
    """Return ``value`` as HTML text or attribute value (``&``, ``<``, ``>``, quotes escaped).

    Examples
    --------
    >>> html_text('x" onerror="alert(1)')
    'x&quot; onerror=&quot;alert(1)'
    """
    return html.escape(str(value), quote=True)


def html_src(file_name: str) -> str:
    """Return a file name in the same folder as an ``src``/``href`` attribute value.

    Percent-encodes it as a relative URL path (so ``#``, ``?``, ``%`` and ``/`` stay part
    of the name), then HTML-escapes it.

    Examples
    --------
    >>> html_src('a"b #1.png')
    'a%22b%20%231.png'
    """
    return html.escape(quote(str(file_name), safe=""), quote=True)


def md_text(value: object) -> str:
    r"""Return ``value`` as Markdown text or a table cell, markup characters escaped.

    ``|``, ``*``, ``_``, `````, ``<``, ``>`` (and the other inline markup characters) get a
    backslash; line breaks become spaces, so one value stays on one table row.

    Examples
    --------
    >>> md_text("A|B *c*")
    'A\\|B \\*c\\*'
    """
    s = " ".join(str(value).splitlines())
    return _MD_SPECIAL.sub(r"\\\1", s)
