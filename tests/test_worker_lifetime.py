"""Registration workers die with their parent: a SIGKILLed run leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
from scipy import ndimage

from pacs_numba.store import registration as reg
from pacs_numba.store.cohort import make_cohort
from pacs_numba.store.nifti import write_nifti

pytest.importorskip("ants")

REPO = Path(__file__).resolve().parents[1]
PATIENTS = 4
# Polling bounds for events that take seconds on a loaded 2-core machine: a hang guard, not
# a timing assertion (the workers normally end within milliseconds of the parent).
START_S = 240.0
GONE_S = 15.0

PARENT = """\
import sys
from pathlib import Path

from pacs_numba.config import RegistrationConfig
from pacs_numba.store.registration import Registrar
from pacs_numba.store.volumes import VolumeStore

if __name__ == "__main__":  # spawned workers import this file as __mp_main__
    root = Path(sys.argv[1])
    config = RegistrationConfig(atlas=root / "atlas", t1="T1_brain.nii", t2="T2.nii",
                                epi="EPI.nii", pd="PD.nii", brain_mask="brain_mask.nii")
    patients = {p.name: {"HR": p / f"{p.name}-t1c.nii.gz",
                         "experts": [p / f"{p.name}-t1c.nii.gz"]}
                for p in sorted((root / "hr").iterdir())}
    Registrar(config, VolumeStore(root / "cache"), processes=2).prepare("t1c", patients)
    print("finished", flush=True)
"""


def _cohort(root: Path) -> Path:
    make_cohort(root, patients=PATIENTS, shape=(40, 48, 40), spacings=("3mm",),
                pulses=("t1c",), models=("BSPLINE",), kfolds=2, patch_size=8, stride=8)
    img = nib.load(root / "hr" / "sub-001" / "sub-001-t1c.nii.gz")
    data = np.asarray(img.dataobj, dtype=np.float32)
    (root / "atlas").mkdir()
    write_nifti(root / "atlas" / "T1_brain.nii", data, img.affine)
    mask = ndimage.binary_erosion(data > 0, iterations=2).astype(np.float32)
    write_nifti(root / "atlas" / "brain_mask.nii", mask, img.affine)
    script = root / "parent.py"
    script.write_text(PARENT)
    return script


def _alive(procs: list[psutil.Process]) -> list[str]:
    """The processes still running (a zombie waiting for init to reap it has ended)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigkill_of_the_parent_ends_the_workers_and_the_tracker(tmp_path):
    script = _cohort(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PACS_LOG_LEVEL": "WARNING"}
    # Output to a file, not a pipe: workers that outlive the parent would hold a pipe open.
    log = (tmp_path / "parent.log").open("w")
    parent = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    log.close()
    children: list[psutil.Process] = []
    try:
        proc = psutil.Process(parent.pid)
        registered = tmp_path / "cache" / "registered"
        deadline = time.monotonic() + START_S
        # kill while the pool is at work: after its first patient, before its last
        while not (registered.is_dir() and any(registered.glob("*.json"))):
            assert parent.poll() is None, (tmp_path / "parent.log").read_text()
            assert time.monotonic() < deadline, "the registration pool never produced an entry"
            time.sleep(0.05)
        children = proc.children(recursive=True)
        workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        tracker = [c for c in children if "resource_tracker" in " ".join(c.cmdline())]
        assert len(workers) == 2, [c.cmdline() for c in children]
        assert len(tracker) == 1, [c.cmdline() for c in children]
        done = len(list(registered.glob("*.json")))
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + GONE_S
        while _alive(children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(children), _alive(children)
        assert done < PATIENTS, "every registration ended before the kill: nothing was tested"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for p in children:  # the ones this test started, if they outlived the parent
            if _alive([p]):
                p.kill()


def test_die_with_parent_refuses_to_outlive_a_parent_already_gone():
    # the race: the parent died before the initializer ran, so getppid is init already
    code = ("import os, sys; from pacs_numba.store.registration import die_with_parent; "
            "die_with_parent(os.getppid() + 1); print('survived')")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert run.returncode == 1 and "survived" not in run.stdout, run
    assert reg.PR_SET_PDEATHSIG == 1
