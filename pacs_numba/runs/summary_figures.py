"""Figures of ``pacs-numba summarize``: what a lab meeting or a paper shows across folds.

For every (experiment, spacing, pulse), three PNG files in ``summary_figures/``:

* ``..._gain.png``: per test patient, the paired PSNR gain of PaCS-SR over the best single
  expert, one panel per protocol (each against its own best expert, as
  :func:`pacs_numba.core.scoring.gain_over_best` defines it);
* ``..._experts.png``: the PSNR of every expert alone and of PaCS-SR over the test patients,
  a box per method with every patient as a point, one panel per protocol;
* ``..._dominance.png``: per fold, the share of learned tiles where each expert has the
  largest weight.

Colours are the Okabe-Ito palette (distinguishable with the common colour-vision
deficiencies); text is at least 9 pt.  matplotlib is imported only here and only when a
figure is drawn; without it the tables are still written and a WARNING says how to install
it.  Figures are drawn with its object API on the Agg canvas (no pyplot state).
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..core.scoring import HR_FREE, PROTOCOLS, PUBLISHED, STACKED, gain_over_best
from ..store.atomic import atomic_write_bytes

log = logging.getLogger(__name__)


#: Okabe & Ito (2008), "Color Universal Design": safe for the common colour-vision deficiencies.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
             "#000000")


#: The figure kinds and what each shows (the alt text of ``report``'s links).
FIGURE_KINDS = {
    "gain": "Per-patient paired PSNR gain of PaCS-SR over the best single expert, per protocol",
    "experts": "PSNR of each expert alone and of PaCS-SR over the test patients, per protocol",
    "dominance": "Share of learned tiles each expert dominates, per fold",
}


FONT_PT = 10


DPI = 110


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def figure_name(experiment: str, spacing: str, pulse: str, kind: str) -> str:
    """File name of one summary figure (characters outside ``[A-Za-z0-9._-]`` become ``_``)."""
    parts = [_UNSAFE.sub("_", str(x)).strip(".") or "_" for x in (experiment, spacing, pulse)]
    return "_".join([*parts, kind]) + ".png"


def new_figure(width_in: float, height_in: float) -> Any:
    """Return a matplotlib Figure on the Agg canvas at :data:`DPI` (no pyplot, no globals)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG at :data:`DPI`, atomically; return ``path``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _colour(i: int) -> str:
    return OKABE_ITO[i % len(OKABE_ITO)]


def _protocols(group: Any) -> list[str]:
    return [p for p in (PUBLISHED, HR_FREE) if STACKED[p] in group.values.get(p, {})]


def gain_figure(group: Any, path: Path) -> Path | None:
    """Per-patient paired PSNR gain over each protocol's best expert; None if no experts."""
    panels = []
    for protocol in _protocols(group):
        methods = group.values[protocol]
        experts = {e: methods[e] for e in group.experts if e in methods}
        if not experts:
            continue
        g = gain_over_best(protocol, methods[STACKED[protocol]], experts)
        if g.best is None:
            continue
        diffs = [methods[STACKED[protocol]][u]["psnr"] - experts[g.best][u]["psnr"]
                 for u in g.units]
        panels.append((protocol, g, np.asarray(diffs, dtype=np.float64)))
    if not panels:
        return None
    fig = new_figure(5.2 * len(panels) + 0.6, 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    fig.subplots_adjust(left=0.1, right=0.98, top=0.78, bottom=0.2, wspace=0.3)
    for ax, (protocol, g, d) in zip(axes, panels, strict=True):
        order = np.argsort(d)
        x = np.arange(d.size)
        colours = [OKABE_ITO[2] if v > 0 else OKABE_ITO[5] for v in d[order]]
        ax.bar(x, d[order], color=colours, width=0.7)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.axhline(float(np.mean(d)), color=OKABE_ITO[4], lw=1.5, ls="--",
                   label=f"mean {np.mean(d):+.3f} dB")
        ax.set_xticks(x, [g.units[i] for i in order], rotation=60, ha="right",
                      fontsize=FONT_PT - 1)
        ax.set_xlabel(f"test {group.unit} (sorted by gain)", fontsize=FONT_PT)
        ax.set_ylabel(f"PSNR gain over {g.best} (dB)", fontsize=FONT_PT)
        ax.set_title(f"{PROTOCOLS[protocol]}\nbest expert {g.best}, n = {d.size}",
                     fontsize=FONT_PT)
        ax.tick_params(labelsize=FONT_PT - 1)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=FONT_PT - 1, frameon=False, loc="upper left")
    fig.suptitle(f"{group.experiment} {group.spacing} {group.pulse}: PaCS-SR minus the best "
                 f"single expert, per test {group.unit} ({len(group.folds)} fold(s))",
                 fontsize=FONT_PT + 1)
    return save_png(fig, path)


def experts_figure(group: Any, path: Path) -> Path | None:
    """Box and points of each method's PSNR over the test patients, one panel per protocol."""
    protocols = _protocols(group)
    if not protocols:
        return None
    n_methods = max(len(group.values[p]) for p in protocols)
    fig = new_figure(max(4.0, 0.9 * n_methods + 1.5) * len(protocols), 4.6)
    axes = np.atleast_1d(fig.subplots(1, len(protocols), squeeze=False, sharey=True)[0])
    fig.subplots_adjust(left=0.08, right=0.98, top=0.8, bottom=0.3, wspace=0.08)
    rng = np.random.default_rng(0)  # a fixed jitter: the same figure on every run
    for ax, protocol in zip(axes, protocols, strict=True):
        methods = group.values[protocol]
        names = [e for e in group.experts if e in methods] + [STACKED[protocol]]
        data = [np.asarray([m["psnr"] for m in methods[n].values()
                            if np.isfinite(m.get("psnr", np.nan))], dtype=np.float64)
                for n in names]
        ax.boxplot(data, positions=range(len(names)), widths=0.55, showfliers=False,
                   medianprops={"color": "black"})
        for i, (n, d) in enumerate(zip(names, data, strict=True)):
            colour = _colour(group.experts.index(n)) if n in group.experts else "#000000"
            ax.scatter(i + rng.uniform(-0.12, 0.12, d.size), d, s=18, color=colour,
                       edgecolor="black", linewidths=0.4, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=FONT_PT - 1)
        ax.set_title(PROTOCOLS[protocol], fontsize=FONT_PT)
        ax.tick_params(labelsize=FONT_PT - 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"PSNR (dB), one point per test {group.unit}", fontsize=FONT_PT)
    fig.suptitle(f"{group.experiment} {group.spacing} {group.pulse}: each expert alone and "
                 "PaCS-SR (compare within a panel, not across)", fontsize=FONT_PT + 1)
    return save_png(fig, path)


def dominance_figure(group: Any, path: Path) -> Path | None:
    """Stacked bars: per fold, the share of learned tiles each expert dominates."""
    if not group.dominance:
        return None
    folds = sorted(group.dominance)
    experts = [e for e in group.experts if any(e in d for d in group.dominance.values())]
    fig = new_figure(max(4.5, 0.8 * len(folds) + 3.2), 4.2)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.13, right=0.7, top=0.85, bottom=0.15)
    bottom = np.zeros(len(folds))
    for e in experts:
        share = np.array([100.0 * group.dominance[f].get(e, 0.0) for f in folds])
        ax.bar(range(len(folds)), share, bottom=bottom, color=_colour(group.experts.index(e)),
               edgecolor="white", linewidth=0.5, label=e, width=0.7)
        bottom += share
    ax.set_xticks(range(len(folds)), [str(f) for f in folds], fontsize=FONT_PT - 1)
    ax.set_xlabel("fold", fontsize=FONT_PT)
    ax.set_ylabel("learned tiles dominated (%)", fontsize=FONT_PT)
    ax.set_ylim(0, 100)
    ax.tick_params(labelsize=FONT_PT - 1)
    ax.legend(fontsize=FONT_PT - 1, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1),
              title="largest weight", title_fontsize=FONT_PT - 1)
    ax.set_title(f"{group.experiment} {group.spacing} {group.pulse}: which expert each tile "
                 "trusts most", fontsize=FONT_PT)
    return save_png(fig, path)


def draw_group_figures(groups: Sequence[Any], folder: Path) -> list[Path]:
    """Draw every group's figures into ``folder``; [] (with a WARNING) without matplotlib.

    Parameters
    ----------
    groups : sequence of summarize.Group
        The pooled (experiment, spacing, pulse) groups.
    folder : Path
        Receives the PNG files (created if needed).

    Returns
    -------
    list of Path
        The files written, in group order, then :data:`FIGURE_KINDS` order.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("summarize: no figures drawn: matplotlib is not installed "
                    "(pip install 'pacs-numba[report]'); the tables are written")
        return []
    from matplotlib import rc_context

    folder.mkdir(parents=True, exist_ok=True)
    drawers = {"gain": gain_figure, "experts": experts_figure, "dominance": dominance_figure}
    out = []
    # names from folders and configs are text, never mathtext: "a$x$" stays "a$x$"
    with rc_context({"text.parse_math": False}):
        for g in groups:
            for kind in FIGURE_KINDS:
                f = drawers[kind](g, folder / figure_name(g.experiment, g.spacing, g.pulse,
                                                          kind))
                if f is not None:
                    out.append(f)
    log.info("summarize: %d figure(s) in %s", len(out), folder)
    return out
