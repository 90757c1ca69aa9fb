"""A registration-enabled train on a generated cohort: first run, rerun, and registration off.

Writes a cohort (``pacs_numba.store.cohort.make_cohort``) and an atlas (another generated head
with a brain mask), then times ``pacs-numba train --fold 1`` in child processes:

* ``off``: ``use_registration: false``;
* ``first``: registration on, empty registration cache (every patient registered);
* ``rerun``: the same command again with ``--force`` (every registration from the cache);
* ``fold2``: fold 2 on the warm cache (folds share registrations).

Each run's wall time and peak RSS (the pacs-numba process, and the largest of its registration
processes) go to a JSON file.

Usage::

    python scripts/profile_registration_train.py --shape 160,192,160 --patients 6 --out X.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml


def _run(argv: list[str]) -> dict:
    code = (
        "import resource, sys, time\n"
        "from pacs_numba.cli import main\n"
        "t0 = time.perf_counter()\n"
        "rc = main(sys.argv[1:])\n"
        "secs = time.perf_counter() - t0\n"
        "me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
        "print('RESULT', rc, secs, me, kids, file=sys.stderr)\n"
        "raise SystemExit(rc)\n"
    )
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    line = [x for x in p.stderr.splitlines() if x.startswith("RESULT")]
    if p.returncode != 0 or not line:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"run failed: {argv}")
    _, rc, secs, me, kids = line[-1].split()
    regs = [x.split("pacs_numba.store.registration: ")[-1] for x in p.stderr.splitlines()
            if "pacs_numba.store.registration: registration " in x]
    return {"argv": argv, "wall_s": wall, "main_s": float(secs), "peak_rss_main": int(me),
            "peak_rss_largest_child": int(kids), "registration_log": regs}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="160,192,160")
    ap.add_argument("--patients", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", type=Path, default=None, help="work folder (default: temp)")
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    from scipy import ndimage

    from pacs_numba.store.cohort import _anatomy, _hr_volume, make_cohort
    from pacs_numba.store.nifti import write_nifti

    work = Path(args.keep or tempfile.mkdtemp(prefix="pacs_regtrain_"))
    if work.exists():
        shutil.rmtree(work)
    t0 = time.perf_counter()
    cfg_path = make_cohort(work / "cohort", patients=args.patients, shape=shape,
                           spacings=("3mm",), pulses=("t1c",), kfolds=3, patch_size=32,
                           stride=16)
    anat = _anatomy(np.random.default_rng([99, 0]), shape)
    atlas = _hr_volume(np.random.default_rng([99, 0, 1]), anat, "t1c", shape)
    aff = np.eye(4)
    aff[:3, 3] = -(np.asarray(shape, float) - 1) / 2
    (work / "cohort" / "atlas").mkdir()
    write_nifti(work / "cohort" / "atlas" / "T1_brain.nii", atlas, aff)
    mask = ndimage.binary_erosion(anat.layers[3] > 0.5, iterations=1).astype(np.float32)
    write_nifti(work / "cohort" / "atlas" / "brain_mask.nii", mask, aff)
    gen_s = time.perf_counter() - t0
    doc = yaml.safe_load(cfg_path.read_text())
    doc["pacs_sr"]["log_to_file"] = False
    off = dict(doc, pacs_sr=dict(doc["pacs_sr"], use_registration=False,
                                 out_root=str(work / "out_off")))
    on = dict(doc, pacs_sr=dict(doc["pacs_sr"], use_registration=True,
                                out_root=str(work / "out_on")))
    (work / "off.yaml").write_text(yaml.safe_dump(off))
    (work / "on.yaml").write_text(yaml.safe_dump(on))
    cache = work / "cache"
    common = ["--cache-dir", str(cache), "--no-progress"]
    assert subprocess.run([sys.executable, "-m", "pacs_numba", "build-manifest", "--config",
                           str(work / "on.yaml")], capture_output=True).returncode == 0
    runs = {}
    # warm the volume cache and the compile cache first, so that "off" and "first" differ only
    # by registration
    runs["warmup_off"] = _run(["train", "--config", str(work / "off.yaml"), "--fold", "1",
                               *common, "--force"])
    runs["off"] = _run(["train", "--config", str(work / "off.yaml"), "--fold", "1", *common,
                        "--force"])
    runs["first"] = _run(["train", "--config", str(work / "on.yaml"), "--fold", "1", *common])
    runs["rerun"] = _run(["train", "--config", str(work / "on.yaml"), "--fold", "1", *common,
                          "--force"])
    runs["fold2"] = _run(["train", "--config", str(work / "on.yaml"), "--fold", "2", *common])
    for name, r in runs.items():
        print(f"{name:10s} wall={r['wall_s']:.1f}s main={r['main_s']:.1f}s "
              f"peak_main={r['peak_rss_main'] / 2**20:.0f}MiB "
              f"peak_child={r['peak_rss_largest_child'] / 2**20:.0f}MiB", flush=True)
    metrics = {}
    for tag in ("off", "on"):
        m = work / f"out_{tag}" / "PaCS_SR" / "3mm" / "model_data" / "fold_1" / "t1c"
        metrics[tag] = json.loads((m / "metrics.json").read_text())
    out = {"shape": shape, "patients": args.patients, "generate_s": gen_s,
           "cpus": len(os.sched_getaffinity(0)), "loadavg_end": os.getloadavg(),
           "host": os.uname().nodename, "runs": runs, "metrics": metrics,
           "maxrss_note": "RUSAGE_CHILDREN of the pacs-numba process: its largest child"}
    args.out.write_text(json.dumps(out, indent=1))
    _ = resource  # imported for the child code's sake in editors
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
