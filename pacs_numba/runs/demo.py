"""``pacs-numba demo``: a generated cohort, fold 1 trained, and a table of what stacking gained."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import load_config
from ..core.scoring import HR_FREE, PROTOCOL_NOTE, PROTOCOLS, PUBLISHED, STACKED, gain_over_best
from ..store.atomic import atomic_write_text
from ..store.cohort import make_cohort
from ..store.convert import make_h5_cohort
from ..store.manifest import build_manifest, write_manifest
from .engine import Engine
from .tasks import RunOptions, Task

log = logging.getLogger(__name__)


def metrics_table(
    alone: dict[str, dict[str, float]], stacked: dict[str, float], n_test: int,
    hr_free: dict[str, Any] | None = None,
) -> list[str]:
    """Lines of the per-expert vs PaCS-SR table (test PSNR/SSIM), one block per protocol.

    ``alone`` and ``hr_free`` are ``metrics.json``'s ``test_experts`` and ``test_hr_free``
    (whose ``experts`` are each expert as it is, under the HR-free protocol).  Each block
    names its protocol and ends with the gain over its own best single expert
    (:func:`pacs_numba.core.scoring.gain_over_best`); the closing lines say why the blocks
    differ and what compares across them.
    """
    lines = [f"test metrics, mean over {n_test} patient(s):"]
    blocks = [(PUBLISHED, alone, stacked)]
    if hr_free:
        blocks.append((HR_FREE, hr_free.get("experts") or {}, hr_free))
    for protocol, experts, blend in blocks:
        lines.append(f"  {PROTOCOLS[protocol]}")
        lines.append(f"    {'method':<18} {'PSNR (dB)':>10} {'SSIM':>8}")
        for name, m in experts.items():
            lines.append(f"    {name:<18} {m['psnr']:>10.3f} {m['ssim']:>8.4f}")
        label = STACKED[protocol]
        lines.append(f"    {label:<18} {blend['psnr']:>10.3f} {blend['ssim']:>8.4f}")
        if experts:
            g = gain_over_best(protocol, {"mean": blend},
                               {n: {"mean": m} for n, m in experts.items()})
            lines.append(f"    {g.describe().replace(' over 1 unit', '')}")
        else:
            lines.append("    (no per-expert scores under this protocol: an older run)")
    if hr_free:
        lines += ["  " + ln for ln in textwrap.wrap(PROTOCOL_NOTE, 92)]
    return lines


_COHORT_STAMP = "demo_cohort.json"


def _demo_cohort(folder: Path, *, patients: int, shape: tuple[int, int, int], seed: int,
                 atlas: bool = False, data_format: str = "nifti") -> Path:
    """Return the config of the demo's cohort in ``folder``, generating it if needed.

    A cohort is reused when it is complete and was made with these settings.
    """
    settings = {"patients": patients, "shape": list(shape), "seed": seed, "version": 1}
    if atlas:  # a cohort with an atlas serves a run without one, not the other way round
        settings["atlas"] = True
    if data_format != "nifti":
        settings["format"] = data_format
    stamp = folder / _COHORT_STAMP
    config_path = folder / "config.yaml"
    try:
        made = json.loads(stamp.read_text())
        reusable = config_path.exists() and (
            made == settings or (not atlas and made == {**settings, "atlas": True}))
    except (OSError, ValueError):
        reusable = False
    if reusable:
        log.info("demo: reusing the cohort in %s", folder)
        return config_path
    stamp.unlink(missing_ok=True)
    # Patients of an earlier cohort with other settings must not be scanned again.
    for sub in ("hr", "lr", "models", "atlas", "nifti", "experts"):
        shutil.rmtree(folder / sub, ignore_errors=True)
    (folder / "source_data.h5").unlink(missing_ok=True)
    make = make_h5_cohort if data_format == "hdf5" else make_cohort
    config_path = make(
        folder,
        patients=patients,
        shape=shape,
        spacings=("3mm",),
        pulses=("t1c",),
        seed=seed,
        kfolds=4,
        patch_size=16,
        stride=8,
        atlas=atlas,
    )
    # A manifest of an earlier, different cohort would name the wrong patients.
    (folder / "manifest.json").unlink(missing_ok=True)
    # Written last: its presence means every file above is complete.
    atomic_write_text(stamp, json.dumps(settings))
    return config_path


def run_demo(
    out: Path,
    *,
    patients: int = 8,
    shape: tuple[int, int, int] = (96, 112, 96),
    seed: int = 0,
    data_format: str = "nifti",
    cache_dir: Path | None = None,
    workers: int | None = None,
    no_progress: bool = False,
    on_engine: Callable[[Engine], Any] | None = None,
    atlas: bool = False,
) -> str:
    """Train fold 1 on a generated cohort under ``out`` and return the results table as text.

    The cohort (``out/cohort``, or ``out/cohort_hdf5`` with ``data_format="hdf5"``: the
    current release's HDF5 files) is generated on the first run and reused by later runs
    with the same ``patients``, ``shape`` and ``seed``; the volume cache defaults to
    ``out/cache``, so a second run neither regenerates nor decompresses anything and
    leaves nothing outside ``out``.  With ``atlas`` the cohort gets an atlas (the mean of
    its HRs, :func:`~pacs_numba.store.cohort.make_cohort`) and the run registers every
    patient to it (``use_registration: true``; needs antspyx).
    """
    t0 = time.perf_counter()
    out = Path(out).resolve()
    if cache_dir is None:
        cache_dir = out / "cache"
    # each form in its own folder, so that switching --format reuses both cohorts
    folder = out / ("cohort" if data_format == "nifti" else "cohort_hdf5")
    config_path = _demo_cohort(folder, patients=patients, shape=shape, seed=seed,
                               atlas=atlas, data_format=data_format)
    config = load_config(config_path)
    if atlas:
        config = dataclasses.replace(
            config, pacs_sr=dataclasses.replace(config.pacs_sr, use_registration=True))
    if not Path(config.data.out).exists():
        write_manifest(build_manifest(config.data), config.data.out)
    engine = Engine(
        config,
        RunOptions(cache_dir=cache_dir, workers=workers, force=True, no_progress=no_progress),
    )
    if on_engine is not None:
        on_engine(engine)
    task = Task(1, config.data.spacings[0], config.data.pulses[0])
    engine.write_metadata([task], "demo")  # the HDF5 form only
    result = engine.train(task)
    secs = time.perf_counter() - t0

    n_test = len(result.per_patient["test"])
    n_train = len(result.per_patient["train"]) if result.per_patient["train"] else "?"
    p = config.pacs_sr
    lines = [
        f"pacs-numba demo: {patients} generated patients {shape[0]}x{shape[1]}x{shape[2]}, "
        f"{len(engine.models)} experts, {task} ({n_train} train / {n_test} test), "
        f"patch {p.patch_size}, stride {p.stride}"
        + (f", registered to the atlas {config.registration.atlas}" if atlas else ""),
    ]
    lines += metrics_table(result.extras.get("test_experts", {}), result.metrics["test"], n_test,
                           result.extras.get("test_hr_free"))
    lines.append(f"outputs: {result.model_dir}")
    blends = (engine.volumes_dir(task) if data_format == "nifti"
              else engine.layout(task).experiment_layout.results_h5(task.fold))
    lines.append(f"         {blends}")
    lines.append(f"took {secs:.1f} s")
    return "\n".join(lines)
