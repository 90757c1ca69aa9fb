"""PNG figures and a one-page HTML summary of one trained task (``pacs-numba report``).

For each test patient of one (fold, spacing, pulse):

* ``{pid}_slices.png``: axial, coronal and sagittal mid slices of the HR, every expert, the
  PaCS-SR blend and the absolute error of the blend, the intensities on one shared window;
* ``{pid}_weights.png``: the dominant-expert map (colours as in the NIfTI label map's
  legend) and the weight entropy, over the HR, masked with the blend's brain mask;

and for the model, ``weights_by_region.png``: the mean weight of each expert along each axis
of the tile grid (learned tiles only) and overall.  ``index.html`` puts them on one page with
the model's description and a PSNR/SSIM/MAE table per expert alone, for the blend (published
protocol: normalisation and mask from the HR) and for the HR-free protocol (as ``predict``).

The test patients and their volumes are found in the task's run record
(``pacs_numba_run.json``), or from the config and manifest when ``--config`` is given.
matplotlib is an optional dependency (``pip install 'pacs-numba[report]'``); figures are
drawn with its object API on the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from numpy.typing import NDArray

from ..config import load_config
from ..core.blending import brain_mask
from ..core.metrics import volume_metrics
from ..core.model import StackingModel, column_names, describe_model
from ..core.orientation import (
    PLANE_ACROSS,
    View,
    axis_direction,
    axis_worlds,
    display_slice,
    views,
)
from ..core.predict import predict_volume
from ..core.scoring import (
    HR_FREE,
    PROTOCOL_NOTE,
    PUBLISHED,
    STACKED,
    Gain,
    expert_alone,
    experts_as_they_are,
    gain_over_best,
)
from ..core.weightmaps import EXPERT_COLOURS, blend_weight_maps, dominant_labels, entropy_map
from ..errors import ConfigError, InputError
from ..store.atomic import atomic_write_text
from ..store.layout import (
    MODEL_FILE,
    RECORD_FILE,
    SUMMARY_FIGURES,
    TASK_DIR_PATTERN,
    TaskLayout,
    report_dir_of,
)
from ..store.manifest import load_manifest, select_task
from ..store.modelfile import load_model
from ..store.volumes import VolumeStore
from .escape import html_src, html_text
from .summary_figures import FIGURE_KINDS, figure_name, new_figure, save_png

log = logging.getLogger(__name__)


INSTALL_HINT = (
    "pacs-numba report needs matplotlib, an optional dependency: "
    "pip install 'pacs-numba[report]' (or: pip install matplotlib)"
)




def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


def _window(hr: NDArray) -> tuple[float, float]:
    inside = hr[np.isfinite(hr) & (hr > 0)]
    if not inside.size:
        return 0.0, 1.0
    lo, hi = np.percentile(inside, [0.5, 99.5])
    return float(lo), float(hi)


def _show(ax: Any, vol: NDArray, affine: NDArray, view: View, *, edges: bool,
          **kw: Any) -> Any:
    """Draw ``view`` of ``vol`` on ``ax`` in anatomical orientation; return the image."""
    img, aspect, ends = display_slice(vol, affine, view)
    im = ax.imshow(img, origin="lower", aspect=aspect, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    if edges:  # the anatomical letters on the left and top edges
        style = {"fontsize": 9, "color": "white", "fontweight": "bold", "transform": ax.transAxes}
        ax.text(0.03, 0.5, ends[0], ha="left", va="center", **style)
        ax.text(0.5, 0.97, ends[3], ha="center", va="top", **style)
    return im


def _test_patients(run_dir: Path, config_path: Path | None,
                   model: StackingModel) -> dict[str, dict[str, Any]]:
    """``{pid: {"HR": path, "experts": [paths in model order]}}`` of the task's test split."""
    if config_path is not None:

        cfg = load_config(config_path)
        s = model.settings
        if not all(k in s for k in ("fold", "spacing", "pulse")):
            raise InputError(f"model in '{run_dir}' does not name its fold, spacing and pulse")
        _, test = select_task(load_manifest(cfg.data.out, cfg.data), int(s["fold"]), s["spacing"],
                              s["pulse"], list(model.model_names))
        return {pid: {"HR": e["HR"], "experts": e["experts"]} for pid, e in test.items()}
    rec_path = run_dir / RECORD_FILE
    if not rec_path.exists():
        raise InputError(
            f"'{run_dir}' has no {RECORD_FILE} naming the test volumes; pass --config with "
            "the run's config"
        )
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read '{rec_path}': {exc}") from None
    out = {}
    for key, entry in sorted(rec.get("patients", {}).items()):
        split, _, pid = key.partition("/")
        inputs = entry.get("inputs") or []
        if split == "test" and len(inputs) == 1 + len(model.model_names):
            out[pid] = {"HR": inputs[0]["path"], "experts": [i["path"] for i in inputs[1:]]}
    if not out:
        raise InputError(f"'{rec_path}' names no test patient; pass --config")
    return out


def _view_label(v: View) -> str:
    return f"{v.plane}\nslice {v.index} of axis {v.axis}\n{'xyz'[v.world_axis]} = {v.mm:+.1f} mm"


def slices_figure(hr: NDArray, experts: Sequence[NDArray], blend: NDArray,
                  names: Sequence[str], title: str, path: Path,
                  affine: NDArray | None = None) -> Path:
    """HR, experts, blend and |blend - HR| on three mid slices, one intensity window.

    Rows are the axial, coronal and sagittal planes as the HR's ``affine`` defines them
    (:mod:`pacs_numba.core.orientation`), each labelled with its array axis, slice index and
    world position; an identity affine is assumed when ``affine`` is None.
    """
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    vs = views(affine, hr.shape)
    lo, hi = _window(hr)
    err = np.abs(np.nan_to_num(blend) - np.nan_to_num(hr))
    err_hi = float(np.percentile(err[hr > 0], 99.5)) if np.any(hr > 0) else 1.0
    err_hi = err_hi if err_hi > 0 else 1.0
    cols = [("HR", hr), *zip(names, experts, strict=True), ("PaCS-SR", blend),
            ("|PaCS-SR − HR|", err)]
    n = len(cols)
    fig = new_figure(1.9 * n + 1.6, 1.9 * 3 + 1.0)
    axes = fig.subplots(3, n, squeeze=False)
    fig.subplots_adjust(left=0.1, right=0.92, top=0.86, bottom=0.02, wspace=0.04, hspace=0.08)
    im = None
    for r, view in enumerate(vs):
        for c, (label, vol) in enumerate(cols):
            ax = axes[r][c]
            is_err = c == n - 1
            shown = _show(ax, vol, affine, view, edges=c == 0,
                          cmap="inferno" if is_err else "gray",
                          vmin=0 if is_err else lo, vmax=err_hi if is_err else hi)
            if is_err:
                im = shown
            if r == 0:
                ax.set_title(label, fontsize=10)
            if c == 0:
                ax.set_ylabel(_view_label(view), fontsize=9)
    cax = fig.add_axes([0.935, 0.3, 0.012, 0.5])
    fig.colorbar(im, cax=cax).set_label("absolute error (image intensity)", fontsize=9)
    cax.tick_params(labelsize=9)
    fig.suptitle(f"{title}: one intensity window [{lo:.3g}, {hi:.3g}] for every image but "
                 f"the error\norientation {vs[0].codes}; neurological view (patient's right "
                 "on the right)", fontsize=10)
    return save_png(fig, path)


def weights_figure(hr: NDArray, maps: NDArray, mask: NDArray, names: Sequence[str],
                   title: str, path: Path, affine: NDArray | None = None) -> Path:
    """Dominant expert and weight entropy over the HR on three mid slices.

    Columns are the axial, coronal and sagittal planes of the HR's ``affine``, as in
    :func:`slices_figure`.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    vs = views(affine, hr.shape)
    labels = dominant_labels(maps, mask)
    ent = entropy_map(maps * mask[..., None])
    colours = np.array([EXPERT_COLOURS[e % len(EXPERT_COLOURS)] for e in range(len(names))])
    cmap = ListedColormap(colours / 255.0)
    lo, hi = _window(hr)
    fig = new_figure(3 * 2.6 + 2.0, 2 * 2.6 + 1.3)
    axes = fig.subplots(2, 3, squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.8, top=0.82, bottom=0.03, wspace=0.05, hspace=0.12)
    ent_max = float(np.log(len(names))) if len(names) > 1 else 1.0
    im = None
    for c, view in enumerate(vs):
        for r in range(2):
            _show(axes[r][c], hr, affine, view, edges=True, cmap="gray", vmin=lo, vmax=hi)
        lab = display_slice(labels, affine, view)[0].astype(float)
        ov = np.ma.masked_where(lab == 0, lab - 1)
        _, aspect, _ = display_slice(mask, affine, view)
        axes[0][c].imshow(ov, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, alpha=0.6,
                          interpolation="nearest", origin="lower", aspect=aspect)
        m2 = display_slice(mask, affine, view)[0]
        e = np.ma.masked_where(m2 == 0, display_slice(ent, affine, view)[0])
        im = axes[1][c].imshow(e, cmap="viridis", vmin=0, vmax=ent_max, alpha=0.75,
                               interpolation="nearest", origin="lower", aspect=aspect)
        axes[0][c].set_title(view.caption.replace(": ", "\n", 1), fontsize=9)
    axes[0][0].set_ylabel("dominant expert", fontsize=10)
    axes[1][0].set_ylabel("weight entropy", fontsize=10)
    handles = [Patch(facecolor=colours[e] / 255.0, label=n) for e, n in enumerate(names)]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.81, 0.8), fontsize=9,
               title="dominant", title_fontsize=9, frameon=False)
    cax = fig.add_axes([0.83, 0.06, 0.015, 0.34])
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(f"entropy (nats; max ln {len(names)} = {ent_max:.2f})", fontsize=9)
    cax.tick_params(labelsize=9)
    fig.suptitle(f"{title}: which expert the blend trusts, inside the brain mask\n"
                 f"orientation {vs[0].codes}; neurological view", fontsize=10)
    return save_png(fig, path)


def region_figure(model: StackingModel, path: Path, affine: NDArray | None = None) -> Path:
    """Mean weight of each expert along each axis of the tile grid, and overall.

    Each panel follows one array axis; its title says which anatomical direction that axis
    runs in (from ``affine``, default the model's, else unknown) and which planes its
    tiles are stacked across.
    """
    g = model.grid
    names = column_names(model)  # with gating: each expert on edges, then on flat tissue
    w = model.weights.reshape(*g.counts, len(names)).astype(np.float64)
    learned = model.learned.reshape(g.counts)
    if affine is None:
        affine = model.affine
    fig = new_figure(13.5, 3.9)
    axes = fig.subplots(1, 4, squeeze=True, gridspec_kw={"width_ratios": [3, 3, 3, 2]})
    fig.subplots_adjust(left=0.05, right=0.98, top=0.76, bottom=0.2, wspace=0.3)
    worlds = axis_worlds(affine) if affine is not None else None
    for axis, ax in enumerate(axes[:3]):
        other = tuple(a for a in range(3) if a != axis)
        cnt = learned.sum(axis=other)
        pos = (np.arange(g.counts[axis]) * g.stride + min(g.patch_size, g.shape[axis]) / 2)
        for e, name in enumerate(names):
            tot = (w[..., e] * learned).sum(axis=other)
            mean = np.divide(tot, cnt, out=np.full(cnt.shape, np.nan), where=cnt > 0)
            ax.plot(pos, mean, marker="o", ms=3, lw=1.5, label=name,
                    color=np.array(EXPERT_COLOURS[e % len(EXPERT_COLOURS)]) / 255.0)
        if worlds is not None:
            plane = PLANE_ACROSS[worlds[axis][0]]
            ax.set_title(f"array axis {axis}: {axis_direction(affine, axis)}\n"
                         f"(mean over each {plane} slab of tiles)", fontsize=10)
        else:
            ax.set_title(f"array axis {axis} (orientation unknown)", fontsize=10)
        ax.set_xlabel(f"tile centre along axis {axis} (voxel)", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9)
    axes[0].set_ylabel("mean weight (learned tiles)", fontsize=9)
    means = (w[learned].mean(axis=0) if learned.any()
             else np.full(len(names), 1.0 / len(names)))
    axes[3].bar(range(len(names)), means,
                color=[np.array(EXPERT_COLOURS[e % len(EXPERT_COLOURS)]) / 255.0
                       for e in range(len(names))])
    axes[3].set_xticks(range(len(names)), names, rotation=30, fontsize=9)
    axes[3].set_title("whole grid", fontsize=10)
    axes[3].set_ylabel("mean weight", fontsize=9)
    axes[3].set_ylim(0, 1)
    axes[3].tick_params(labelsize=9)
    axes[0].legend(fontsize=9, loc="upper right", ncol=2, frameon=False)
    fig.suptitle(f"mean weight per expert by region: {int(model.learned.sum())} of "
                 f"{g.n_tiles} tiles learned (patch {g.patch_size}, stride {g.stride})",
                 fontsize=10)
    return save_png(fig, path)


def _metrics_table(blocks: Sequence[tuple[Gain, dict[str, dict[str, float]]]],
                   caption: str) -> str:
    """One table, one section per protocol: each expert alone, PaCS-SR, the gain.

    The best single expert of each protocol is marked; nothing is ranked across protocols.
    """
    out = [f"<table><caption>{html_text(caption)}</caption>",
           "<tr><th>method</th><th>PSNR (dB)</th><th>SSIM</th><th>MAE</th></tr>"]
    for gain, rows in blocks:
        out.append(f'<tr class="protocol"><th colspan="4">{html_text(gain.words)}</th></tr>')
        for name, m in rows.items():
            best = name == gain.best
            mark = ' <span class="mark">(best expert)</span>' if best else ""
            out.append(f"<tr><td>{html_text(name)}{mark}</td><td>{m['psnr']:.3f}</td>"
                       f"<td>{m['ssim']:.4f}</td><td>{m['mae']:.4g}</td></tr>")
        if gain.best is not None and np.isfinite(gain.psnr):
            out.append(f'<tr class="gain"><td>gain over {html_text(gain.best)}</td>'
                       f"<td>{gain.psnr:+.3f}</td><td>{gain.ssim:+.4f}</td><td></td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _blocks(per: dict[str, dict[str, dict[str, dict[str, float]]]],
            model_names: Sequence[str]) -> list[tuple[Gain, dict[str, dict[str, float]]]]:
    """``per[protocol][method][pid]`` -> table blocks with means over patients and the gain."""
    blocks = []
    for protocol in (PUBLISHED, HR_FREE):
        methods = per.get(protocol) or {}
        label = STACKED[protocol]
        if label not in methods:
            continue
        experts = {n: methods[n] for n in model_names if n in methods}
        gain = gain_over_best(protocol, methods[label], experts)
        rows = {n: {k: float(np.mean([m[k] for m in units.values()]))
                    for k in ("psnr", "ssim", "mae")} for n, units in methods.items()}
        blocks.append((gain, rows))
    return blocks


def _summary_figures(run_dir: Path, out: Path) -> list[tuple[str, str]]:
    """``summarize``'s figures of this task's experiment, spacing and pulse, if drawn."""
    try:
        lay = TaskLayout.from_model_dir(run_dir)
    except ValueError:
        return []
    folder = Path(lay.out_root) / SUMMARY_FIGURES
    found = []
    for kind, alt in FIGURE_KINDS.items():
        f = folder / figure_name(lay.experiment, lay.spacing, lay.pulse, kind)
        if f.is_file():
            found.append((alt, os.path.relpath(f, out)))
    return found


CSS = """
body{font-family:system-ui,Arial,sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;
color:#222} h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
img{max-width:100%;height:auto;border:1px solid #ddd;margin:.4em 0}
table{border-collapse:collapse;margin:.6em 1.5em .6em 0;display:inline-table;vertical-align:top}
td,th{border:1px solid #bbb;padding:.2em .6em;text-align:right} td:first-child{text-align:left}
caption{font-weight:bold;text-align:left;padding:.2em 0}
tr.protocol th{text-align:left;background:#f0f0f0;font-weight:normal;font-style:italic}
tr.gain td{font-style:italic} .mark{color:#555;font-size:.85em}
pre{background:#f6f6f6;padding:.6em;font-size:.85em;overflow-x:auto} .note{color:#555}
"""


def make_report(
    run_dir: Path,
    *,
    config_path: Path | None = None,
    out_dir: Path | None = None,
    patients: Sequence[str] | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Draw the figures and write ``index.html`` for one trained task folder.

    Parameters
    ----------
    run_dir : Path
        ``{out_root}/{experiment}/{spacing}/model_data/fold_{N}/{pulse}``.
    config_path : Path, optional
        The run's config, to find the test volumes when the run record cannot.
    out_dir : Path, optional
        Where to write (default ``run_dir/report``).
    patients : sequence of str, optional
        Test patients to show (default: every one).
    cache_dir : Path, optional
        Volume cache directory.

    Returns
    -------
    Path
        The HTML file.

    Raises
    ------
    ConfigError
        If matplotlib is not installed (the message says how to install it).
    InputError
        If the folder has no model, or its test patients cannot be found or read.
    """
    _require_matplotlib()
    from matplotlib import rc_context

    # patient ids and expert names are text, never mathtext: "a$x$" stays "a$x$"
    with rc_context({"text.parse_math": False}):
        return _make_report(Path(run_dir), config_path, out_dir, patients, cache_dir)


def _make_report(run_dir: Path, config_path: Path | None, out_dir: Path | None,
                 patients: Sequence[str] | None, cache_dir: Path | None) -> Path:
    """:func:`make_report` once matplotlib is known to be there."""
    run_dir = Path(run_dir)
    mpath = run_dir / MODEL_FILE
    if not mpath.exists():
        raise InputError(f"'{run_dir}' has no {MODEL_FILE}: expected a trained task folder "
                         f"(.../{TASK_DIR_PATTERN})")
    model = load_model(mpath)
    window = model.window or "flat"
    test = _test_patients(run_dir, config_path, model)
    if patients:
        unknown = [p for p in patients if p not in test]
        if unknown:
            raise InputError(f"--patients {unknown}: the task's test patients are {list(test)}")
        test = {p: test[p] for p in patients}
    out = Path(out_dir or report_dir_of(run_dir))
    out.mkdir(parents=True, exist_ok=True)
    s = model.settings
    title = " ".join(str(s[k]) for k in ("spacing", "pulse") if k in s)
    title = f"fold {s.get('fold', '?')} {title}".strip()
    ssim_axis = (s.get("pacs_sr") or {}).get("ssim_axis", "axial")
    store = VolumeStore(cache_dir)
    maps = blend_weight_maps(model.weights, model.grid, window)
    first = next(iter(test.values()))
    region_affine = model.affine if model.affine is not None else store.get(first["HR"]).meta.affine
    images: list[tuple[str, str]] = []
    images.append(("Weights by region of the grid",
                   region_figure(model, out / "weights_by_region.png", region_affine).name))
    sections = []
    pooled: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for pid, paths in test.items():
        hr_v = store.get(paths["HR"])
        exp = [store.get(p).data for p in paths["experts"]]
        hr = hr_v.data
        affine = hr_v.meta.affine
        blend = predict_volume(exp, model, window=window, norm_source=hr)  # evaluate's blend
        hr_free = predict_volume(exp, model, window=window)
        mask = brain_mask(hr).astype(bool)
        # each expert alone under each protocol, as metrics.json's test_experts and
        # test_hr_free's experts (core/scoring.py)
        per = {
            PUBLISHED: {**expert_alone(hr, exp, model, window=window, ssim_axis=ssim_axis),
                        STACKED[PUBLISHED]: volume_metrics(hr, blend, ssim_axis=ssim_axis)},
            HR_FREE: {**experts_as_they_are(hr, exp, model.model_names, ssim_axis=ssim_axis),
                      STACKED[HR_FREE]: volume_metrics(hr, hr_free, ssim_axis=ssim_axis)},
        }
        for protocol, methods in per.items():
            for n, m in methods.items():
                pooled.setdefault(protocol, {}).setdefault(n, {})[pid] = m
        one = {pr: {n: {pid: m} for n, m in ms.items()} for pr, ms in per.items()}
        f1 = slices_figure(hr, exp, blend, model.model_names, f"{pid} ({title})",
                           out / f"{pid}_slices.png", affine)
        f2 = weights_figure(hr, maps, mask, column_names(model), f"{pid} ({title})",
                            out / f"{pid}_weights.png", affine)
        captions = "; ".join(v.caption for v in views(affine, hr.shape))
        sections.append(
            f"<h2>Test patient {html_text(pid)}</h2>\n"
            + _metrics_table(_blocks(one, model.model_names),
                             f"{pid}: each expert alone and the blend, per protocol")
            + f'\n<div><img src="{html_src(f1.name)}" alt="mid slices of {html_text(pid)}">'
            + f'<p class="note">Slices: {html_text(captions)}.</p></div>'
            + f'\n<div><img src="{html_src(f2.name)}" alt="weight maps of {html_text(pid)}">'
            + "</div>"
        )
        log.info("report: patient %s drawn", pid)
        del hr, exp, blend, hr_free, mask
    links = _summary_figures(run_dir, out)
    notes = []
    if (s.get("pacs_sr") or {}).get("use_registration"):
        why = ("this task was trained with registration (use_registration: true), but the "
               "report draws and scores the volumes as they are on disk, unregistered: its "
               "numbers differ from metrics.json, which scores in atlas space")
        log.warning("report: %s", why)
        notes.append(f'<p class="note"><b>Note:</b> {html_text(why)}.</p>')
    page = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>PaCS-SR report: {html_text(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>PaCS-SR report: {html_text(title)}</h1>",
        *notes,
        _metrics_table(_blocks(pooled, model.model_names),
                       f"mean over {len(test)} test patient(s)"),
        f'<p class="note">{html_text(PROTOCOL_NOTE)}</p>',
        *(f'<div><img src="{html_src(src)}" alt="{html_text(alt)}"></div>'
          for alt, src in images),
        *(["<h2>Across folds (pacs-numba summarize)</h2>"] if links else []),
        *(f'<div><img src="{html_text(quote(src))}" alt="{html_text(alt)}"></div>'
          for alt, src in links),
        *sections,
        "<h2>Model</h2>",
        f"<pre>{html_text(describe_model(model, mpath))}</pre>",
        "</body></html>",
    ]
    path = out / "index.html"
    atomic_write_text(path, "\n".join(page) + "\n")
    return path
