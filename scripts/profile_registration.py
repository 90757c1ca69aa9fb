"""Accuracy, time and peak memory of rigid registration settings at full size (issue 9).

A generated phantom is the atlas; the moving image is the same head with fresh noise, moved by
a known rotation and translation.  Each (settings, ITK threads) case runs in a fresh child
process, so that ITK reads its thread count before ``import ants`` and the child's peak RSS is
its own.  The recovered transform is compared with the true motion (mean and max displacement
error over head voxels, rotation error in degrees) and with the transform ANTs' defaults find.

Usage::

    python scripts/profile_registration.py --out profiling/registration-<date>.json
    python scripts/profile_registration.py --quick        # small shape, for a smoke run

Writes raw JSON; profiling/*.md summarises it by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FULL_SHAPE = (197, 233, 189)
ROT_DEG = (4.0, -3.0, 3.0)  # about 5.8 degrees in all
SHIFT_VOX = (3.5, -2.5, 4.0)


def _rotation(deg):
    a, b, c = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_pair(shape, folder: Path) -> dict:
    """Write atlas.npy and moving.npy; return the true fixed->moving map (voxel units)."""
    from scipy import ndimage

    from pacs_numba.store.cohort import _anatomy, _hr_volume

    anat = _anatomy(np.random.default_rng([7, 0]), shape)
    atlas = _hr_volume(np.random.default_rng([7, 0, 1]), anat, "t1c", shape)
    other = _hr_volume(np.random.default_rng([7, 0, 2]), anat, "t1c", shape)
    R = _rotation(ROT_DEG)
    c = (np.asarray(shape, float) - 1) / 2
    t = np.asarray(SHIFT_VOX)
    # moving[y] = other[x] with y = R (x - c) + c + t, i.e. x = R^T (y - c - t) + c
    moving = ndimage.affine_transform(
        other, R.T, offset=c - R.T @ (c + t), order=1, mode="constant", cval=0.0
    ).astype(np.float32)
    np.save(folder / "atlas.npy", atlas)
    np.save(folder / "moving.npy", moving)
    return {"R": R.tolist(), "c": c.tolist(), "t": t.tolist()}


def child(spec: dict) -> dict:
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(spec["threads"])
    # ITK's default Pool threader makes seeded registrations differ run to run with more than
    # one thread; the Platform threader splits work statically and is reproducible.
    os.environ["ITK_GLOBAL_DEFAULT_THREADER"] = spec.get("threader", "Platform")
    t_imp = time.perf_counter()
    import ants

    import_s = time.perf_counter() - t_imp
    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    folder = Path(spec["folder"])
    atlas = np.load(folder / "atlas.npy")
    moving = np.load(folder / "moving.npy")
    fixed_img = ants.from_numpy(atlas)
    moving_img = ants.from_numpy(moving)
    ants.config._random_seed = spec.get("seed", 1)
    t0 = time.perf_counter()
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["kwargs"].items()}
    reg = ants.registration(fixed_img, moving_img, type_of_transform="Rigid", **kwargs)
    secs = time.perf_counter() - t0
    tx = ants.read_transform(reg["fwdtransforms"][0])
    p = np.asarray(tx.parameters, float)
    M = p[:9].reshape(3, 3)
    ctr = np.asarray(tx.fixed_parameters, float)
    off = p[9:12] + ctr - M @ ctr
    x = np.array([10.0, 20.0, 30.0])
    assert np.allclose(tx.apply_to_point(tuple(x)), M @ x + off, atol=1e-3)
    warped = reg["warpedmovout"].numpy()
    mask = atlas > 0
    corr = float(np.corrcoef(warped[mask], atlas[mask])[0, 1])
    return {
        "secs": secs,
        "import_s": import_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_import_bytes": rss_import,
        "M": M.tolist(),
        "offset": off.tolist(),
        "corr": corr,
    }


def errors(found: dict, ref_M, ref_off, pts) -> dict:
    M = np.asarray(found["M"])
    off = np.asarray(found["offset"])
    d = np.linalg.norm(pts @ M.T + off - (pts @ np.asarray(ref_M).T + ref_off), axis=1)
    rel = M @ np.asarray(ref_M).T
    ang = np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1, 1)))
    return {"mean_vox": float(d.mean()), "max_vox": float(d.max()), "rot_deg": float(ang)}


CASES = {
    # ANTs' defaults as the published tool calls them: type_of_transform="Rigid" only
    "published": {},
    "no_full_res": dict(
        aff_shrink_factors=(6, 4, 2), aff_smoothing_sigmas=(3, 2, 1),
        aff_iterations=(2100, 1200, 1200),
    ),
    "fast_a": dict(
        aff_shrink_factors=(6, 4, 2), aff_smoothing_sigmas=(3, 2, 1),
        aff_iterations=(200, 100, 50), aff_random_sampling_rate=0.1,
    ),
    "fast_b": dict(
        aff_shrink_factors=(8, 4, 2), aff_smoothing_sigmas=(3, 2, 1),
        aff_iterations=(100, 50, 25), aff_random_sampling_rate=0.05,
    ),
    "fast_d": dict(
        aff_shrink_factors=(4, 2, 1), aff_smoothing_sigmas=(2, 1, 0),
        aff_iterations=(100, 50, 10),
    ),
    "fast_e": dict(
        aff_shrink_factors=(6, 4, 2), aff_smoothing_sigmas=(3, 2, 1),
        aff_iterations=(1000, 500, 100),
    ),
    "fast_f": dict(
        aff_shrink_factors=(4, 2), aff_smoothing_sigmas=(2, 1),
        aff_iterations=(500, 100),
    ),
    "fast_c": dict(
        aff_shrink_factors=(4, 2), aff_smoothing_sigmas=(2, 1),
        aff_iterations=(200, 50), aff_random_sampling_rate=0.1,
    ),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threader", default="Platform")
    ap.add_argument("--shape", default=None, help="e.g. 96,112,96")
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    load_start = os.getloadavg()
    shape = (64, 72, 60) if args.quick else FULL_SHAPE
    if args.shape:
        shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        truth = make_pair(shape, Path(tmp))
        R, c, t = (np.asarray(truth[k]) for k in ("R", "c", "t"))
        true_M, true_off = R, c + t - R @ c  # fixed -> moving point map
        atlas = np.load(Path(tmp) / "atlas.npy")
        rng = np.random.default_rng(0)
        pts = np.argwhere(atlas > 0).astype(float)
        pts = pts[rng.choice(len(pts), min(20000, len(pts)), replace=False)]
        runs = []
        for threads in [int(x) for x in args.threads.split(",")]:
            for name in args.cases.split(","):
                for rep in range(args.repeats):
                    spec = {"folder": tmp, "threads": threads, "kwargs": CASES[name],
                            "threader": args.threader}
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", json.dumps(spec)],
                        capture_output=True, text=True, check=True,
                    )
                    res = json.loads(out.stdout.strip().splitlines()[-1])
                    res.update(case=name, threads=threads, repeat=rep,
                               vs_truth=errors(res, true_M, true_off, pts))
                    runs.append(res)
                    print(f"{name:12s} threads={threads} secs={res['secs']:.1f} "
                          f"peak={res['peak_rss_bytes'] / 2**20:.0f}MiB corr={res['corr']:.4f} "
                          f"truth={res['vs_truth']}", flush=True)
        for res in runs:
            ref = next((r for r in runs if r["case"] == "published"
                        and r["threads"] == res["threads"]), None)
            if ref is not None:
                res["vs_published"] = errors(res, ref["M"], np.asarray(ref["offset"]), pts)
    doc = {
        "shape": shape, "rotation_deg": ROT_DEG, "shift_vox": SHIFT_VOX,
        "host": os.uname().nodename, "cpus": len(os.sched_getaffinity(0)),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "threader": args.threader, "cases": CASES, "runs": runs,
    }
    text = json.dumps(doc, indent=1, default=list)
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
