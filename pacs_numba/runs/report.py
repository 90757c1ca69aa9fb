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

import html
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..config import load_config
from ..core.blending import brain_mask
from ..core.metrics import volume_metrics
from ..core.model import StackingModel, describe_model
from ..core.predict import predict_volume
from ..core.scoring import expert_alone
from ..core.weightmaps import EXPERT_COLOURS, blend_weight_maps, dominant_labels, entropy_map
from ..errors import ConfigError, InputError
from ..store.atomic import atomic_write_bytes, atomic_write_text
from ..store.layout import MODEL_FILE, RECORD_FILE, TASK_DIR_PATTERN, report_dir_of
from ..store.manifest import load_manifest, select_task
from ..store.modelfile import load_model
from ..store.volumes import VolumeStore

log = logging.getLogger(__name__)


INSTALL_HINT = (
    "pacs-numba report needs matplotlib, an optional dependency: "
    "pip install 'pacs-numba[report]' (or: pip install matplotlib)"
)


VIEWS = (("axial", 0), ("coronal", 1), ("sagittal", 2))


DPI = 110


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


def _figure(width_in: float, height_in: float):  # noqa: ANN202
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _slice(vol: NDArray, axis: int) -> NDArray:
    """Mid slice across ``axis``, oriented for display (first remaining axis vertical)."""
    mid = vol.shape[axis] // 2
    return np.take(vol, mid, axis=axis)


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


def slices_figure(hr: NDArray, experts: Sequence[NDArray], blend: NDArray,
                  names: Sequence[str], title: str, path: Path) -> Path:
    """HR, experts, blend and |blend - HR| on three mid slices, one intensity window."""
    inside = hr[np.isfinite(hr) & (hr > 0)]
    lo, hi = (np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0))
    err = np.abs(np.nan_to_num(blend) - np.nan_to_num(hr))
    err_hi = float(np.percentile(err[hr > 0], 99.5)) if inside.size else 1.0
    cols = [("HR", hr), *zip(names, experts, strict=True), ("PaCS-SR", blend),
            ("|PaCS-SR − HR|", err)]
    n = len(cols)
    fig = _figure(1.9 * n + 0.9, 1.9 * 3 + 0.7)
    axes = fig.subplots(3, n, squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.93, top=0.9, bottom=0.02, wspace=0.04, hspace=0.08)
    for r, (view, axis) in enumerate(VIEWS):
        for c, (label, vol) in enumerate(cols):
            ax = axes[r][c]
            is_err = c == n - 1
            im = ax.imshow(_slice(vol, axis), cmap="inferno" if is_err else "gray",
                           vmin=0 if is_err else lo, vmax=err_hi if is_err else hi,
                           interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=10)
            if c == 0:
                ax.set_ylabel(view, fontsize=10)
        if r == 0:
            cax = fig.add_axes([0.945, 0.35, 0.012, 0.5])
            fig.colorbar(im, cax=cax).set_label("absolute error", fontsize=8)
    fig.suptitle(f"{title}: one intensity window [{lo:.3g}, {hi:.3g}] for every image but "
                 "the error", fontsize=10)
    return _save(fig, path)


def weights_figure(hr: NDArray, maps: NDArray, mask: NDArray, names: Sequence[str],
                   title: str, path: Path) -> Path:
    """Dominant expert and weight entropy over the HR on three mid slices."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    labels = dominant_labels(maps, mask)
    ent = entropy_map(maps * mask[..., None])
    colours = np.array([EXPERT_COLOURS[e % len(EXPERT_COLOURS)] for e in range(len(names))])
    cmap = ListedColormap(colours / 255.0)
    inside = hr[np.isfinite(hr) & (hr > 0)]
    lo, hi = (np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0))
    fig = _figure(3 * 2.6 + 1.6, 2 * 2.6 + 0.9)
    axes = fig.subplots(2, 3, squeeze=False)
    fig.subplots_adjust(left=0.04, right=0.8, top=0.88, bottom=0.03, wspace=0.05, hspace=0.12)
    ent_max = float(np.log(len(names))) if len(names) > 1 else 1.0
    for c, (view, axis) in enumerate(VIEWS):
        base = _slice(hr, axis)
        for r in range(2):
            ax = axes[r][c]
            ax.imshow(base, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        lab = _slice(labels, axis).astype(float)
        ov = np.ma.masked_where(lab == 0, lab - 1)
        axes[0][c].imshow(ov, cmap=cmap, vmin=-0.5, vmax=len(names) - 0.5, alpha=0.6,
                          interpolation="nearest")
        e = np.ma.masked_where(_slice(mask, axis) == 0, _slice(ent, axis))
        im = axes[1][c].imshow(e, cmap="viridis", vmin=0, vmax=ent_max, alpha=0.75,
                               interpolation="nearest")
        axes[0][c].set_title(view, fontsize=10)
    axes[0][0].set_ylabel("dominant expert", fontsize=10)
    axes[1][0].set_ylabel("weight entropy", fontsize=10)
    handles = [Patch(facecolor=colours[e] / 255.0, label=n) for e, n in enumerate(names)]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.81, 0.86), fontsize=9,
               title="dominant", title_fontsize=9, frameon=False)
    cax = fig.add_axes([0.83, 0.06, 0.015, 0.36])
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(f"entropy (nats; max ln {len(names)} = {ent_max:.2f})", fontsize=8)
    fig.suptitle(f"{title}: which expert the blend trusts, inside the brain mask", fontsize=10)
    return _save(fig, path)


def region_figure(model: StackingModel, path: Path) -> Path:
    """Mean weight of each expert along each axis of the tile grid, and overall."""
    g = model.grid
    names = model.model_names
    w = model.weights.reshape(*g.counts, len(names)).astype(np.float64)
    learned = model.learned.reshape(g.counts)
    fig = _figure(13.0, 3.4)
    axes = fig.subplots(1, 4, squeeze=True, gridspec_kw={"width_ratios": [3, 3, 3, 2]})
    fig.subplots_adjust(left=0.05, right=0.98, top=0.82, bottom=0.2, wspace=0.3)
    for ax, (label, axis) in zip(axes[:3], VIEWS, strict=True):
        other = tuple(a for a in range(3) if a != axis)
        cnt = learned.sum(axis=other)
        pos = (np.arange(g.counts[axis]) * g.stride + min(g.patch_size, g.shape[axis]) / 2)
        for e, name in enumerate(names):
            tot = (w[..., e] * learned).sum(axis=other)
            mean = np.divide(tot, cnt, out=np.full(cnt.shape, np.nan), where=cnt > 0)
            ax.plot(pos, mean, marker="o", ms=3, lw=1.5, label=name,
                    color=np.array(EXPERT_COLOURS[e % len(EXPERT_COLOURS)]) / 255.0)
        ax.set_title(f"along axis {axis} ({label} slices)", fontsize=10)
        ax.set_xlabel("tile centre (voxel)", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_ylabel("mean weight (learned tiles)", fontsize=9)
    means = (w[learned].mean(axis=0) if learned.any()
             else np.full(len(names), 1.0 / len(names)))
    axes[3].bar(range(len(names)), means,
                color=[np.array(EXPERT_COLOURS[e % len(EXPERT_COLOURS)]) / 255.0
                       for e in range(len(names))])
    axes[3].set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    axes[3].set_title("whole grid", fontsize=10)
    axes[3].set_ylim(0, 1)
    axes[3].tick_params(labelsize=8)
    axes[0].legend(fontsize=8, loc="upper right", ncol=2, frameon=False)
    fig.suptitle(f"mean weight per expert by region: {int(model.learned.sum())} of "
                 f"{g.n_tiles} tiles learned (patch {g.patch_size}, stride {g.stride})",
                 fontsize=10)
    return _save(fig, path)


def _metrics_table(rows: list[tuple[str, dict[str, float]]], caption: str) -> str:
    best_psnr = max((m["psnr"] for _, m in rows), default=None)
    out = [f"<table><caption>{html.escape(caption)}</caption>",
           "<tr><th>method</th><th>PSNR (dB)</th><th>SSIM</th><th>MAE</th></tr>"]
    for name, m in rows:
        cls = ' class="best"' if m["psnr"] == best_psnr else ""
        out.append(f"<tr{cls}><td>{html.escape(name)}</td><td>{m['psnr']:.3f}</td>"
                   f"<td>{m['ssim']:.4f}</td><td>{m['mae']:.4g}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


CSS = """
body{font-family:system-ui,Arial,sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;
color:#222} h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
img{max-width:100%;height:auto;border:1px solid #ddd;margin:.4em 0}
table{border-collapse:collapse;margin:.6em 1.5em .6em 0;display:inline-table;vertical-align:top}
td,th{border:1px solid #bbb;padding:.2em .6em;text-align:right} td:first-child{text-align:left}
caption{font-weight:bold;text-align:left;padding:.2em 0} tr.best{background:#eaf5ea}
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
    images: list[tuple[str, str]] = []
    images.append(("Weights by region of the grid",
                   region_figure(model, out / "weights_by_region.png").name))
    sections = []
    mean_rows: dict[str, list[dict[str, float]]] = {}
    for pid, paths in test.items():
        hr_v = store.get(paths["HR"])
        exp = [store.get(p).data for p in paths["experts"]]
        hr = hr_v.data
        blend = predict_volume(exp, model, window=window, norm_source=hr)  # evaluate's blend
        hr_free = predict_volume(exp, model, window=window)
        mask = brain_mask(hr).astype(bool)
        # each expert alone is scored like the blend, as metrics.json's test_experts
        rows = list(expert_alone(hr, exp, model, window=window, ssim_axis=ssim_axis).items())
        rows.append(("PaCS-SR", volume_metrics(hr, blend, ssim_axis=ssim_axis)))
        rows.append(("PaCS-SR (HR-free)", volume_metrics(hr, hr_free, ssim_axis=ssim_axis)))
        for n, m in rows:
            mean_rows.setdefault(n, []).append(m)
        f1 = slices_figure(hr, exp, blend, model.model_names, f"{pid} ({title})",
                           out / f"{pid}_slices.png")
        f2 = weights_figure(hr, maps, mask, model.model_names, f"{pid} ({title})",
                            out / f"{pid}_weights.png")
        sections.append(
            f"<h2>Test patient {html.escape(pid)}</h2>\n"
            + _metrics_table(rows, f"{pid}: each expert alone and the blend")
            + f'\n<div><img src="{f1.name}" alt="mid slices of {html.escape(pid)}"></div>'
            + f'\n<div><img src="{f2.name}" alt="weight maps of {html.escape(pid)}"></div>'
        )
        log.info("report: patient %s drawn", pid)
        del hr, exp, blend, hr_free, mask
    means = [(n, {k: float(np.mean([m[k] for m in ms])) for k in ("psnr", "ssim", "mae")})
             for n, ms in mean_rows.items()]
    page = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>PaCS-SR report: {html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>PaCS-SR report: {html.escape(title)}</h1>",
        _metrics_table(means, f"mean over {len(test)} test patient(s)"),
        '<p class="note">PaCS-SR: the published evaluation, which normalises and masks the '
        "blend with the test HR itself. PaCS-SR (HR-free): normalisation and brain mask from "
        "the experts, as <code>pacs-numba predict</code> does for a new patient. Green: the "
        "highest PSNR.</p>",
        "<h2>Model</h2>",
        f"<pre>{html.escape(describe_model(model, mpath))}</pre>",
        *(f'<div><img src="{src}" alt="{html.escape(alt)}"></div>' for alt, src in images),
        *sections,
        "</body></html>",
    ]
    path = out / "index.html"
    atomic_write_text(path, "\n".join(page) + "\n")
    return path
