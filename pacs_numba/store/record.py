"""The run record next to a task's outputs: what made them, so ``--resume`` can trust them.

``model_data/fold_N/{pulse}/pacs_numba_run.json`` holds the settings that change the numbers
(with registration, the fingerprints of the atlas template and brain mask among them), the
fingerprints (path, size, mtime, ctime, content sample) of the training inputs and a digest
of the model, and for each finished patient its input fingerprints, its output files (path
relative to the record's folder, size and SHA-256 checksum) and its metrics.  It is rewritten
atomically after every patient, so a run killed part-way (SLURM's time limit) leaves a record of
exactly the patients whose outputs are complete.  A resumed run reuses a patient only when its
inputs, the settings and the model are unchanged and every output file it wrote still has the
size and checksum it was written with; otherwise the patient is computed again.  Output paths
are relative to the task folder, so a resume works from any working directory (and after the
whole out_root was moved).  The record is strict JSON: an infinite PSNR is stored as null.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import PacsConfig
from ..core.metrics import METRIC_KEYS
from ..errors import InputError
from .atomic import atomic_write_json
from .integrity import file_digest, strict_json, verify_file
from .volumes import file_fingerprint

log = logging.getLogger(__name__)


#: 2: outputs carry size and checksum and are relative to the record's folder; inputs
#: carry ctime and a content sample.
FORMAT_VERSION = 2


#: ``pacs_sr`` keys that change how fast or where a task runs, or what it logs, but not
#: the numbers or files it writes.  Every other field of :class:`PacsConfig` is a result
#: setting, so a new config key is compared by ``--resume`` unless it is listed here.
#: ``parallel_backend``, ``device``, ``compute_lpips`` and ``compute_kid`` are accepted for
#: compatibility and unused; ``out_root`` locates the outputs (a record found under another
#: root was still made with the same settings).
NON_RESULT_SETTINGS = frozenset(
    {
        "num_workers",
        "parallel_backend",
        "device",
        "compute_lpips",
        "compute_kid",
        "log_level",
        "log_to_file",
        "log_region_freq",
        "disable_tqdm",
        "out_root",
    }
)


#: pacs_sr keys that change what a task computes or writes (not how fast), in config order.
RESULT_SETTINGS = tuple(
    f.name for f in dataclasses.fields(PacsConfig) if f.name not in NON_RESULT_SETTINGS
)


def result_settings(pacs_sr: Mapping[str, Any], models: Sequence[str]) -> dict[str, Any]:
    """Return the settings a task's numbers depend on, as a JSON-comparable dict."""
    out = {k: pacs_sr[k] for k in RESULT_SETTINGS if k in pacs_sr}
    out["models"] = list(models)
    return json.loads(json.dumps(out, default=str))


def fingerprints(paths: Iterable[str | Path]) -> list[dict[str, Any]] | None:
    """Fingerprints of input files; None if one cannot be examined (then nothing is reused)."""
    try:
        return [file_fingerprint(p) for p in paths]
    except InputError:
        return None


def atlas_fingerprints(template: str | Path, brain_mask: str | Path) -> dict[str, Any]:
    """Fingerprints of the atlas files a registered task depends on, for its settings.

    The registered volumes, the blend's brain mask and so every number of a task with
    ``use_registration`` come from the atlas template of its pulse and the atlas brain mask;
    with these in the recorded settings, ``--resume`` recomputes every patient after either
    file changed (in place too: size, times and a content sample are compared).  A brain
    mask that does not exist (registration then uses ``atlas > 0``) is recorded as absent.

    Raises
    ------
    InputError
        If the template cannot be examined (the registration would fail on it too).
    """
    try:
        mask: dict[str, Any] = file_fingerprint(brain_mask)
    except InputError:
        mask = {"path": os.path.abspath(brain_mask), "absent": True}
    return {"template": file_fingerprint(template), "brain_mask": mask}


def model_digest(weights: np.ndarray, learned: np.ndarray, shape: Sequence[int]) -> str:
    """Return a digest of a model's weights, learned mask and grid shape."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(weights, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(learned, dtype=bool).tobytes())
    h.update(repr(tuple(int(n) for n in shape)).encode())
    return h.hexdigest()


class RunRecord:
    """Read the previous record (when resuming) and write the new one as work completes.

    Parameters
    ----------
    path : Path
        The record file.
    settings : dict
        :func:`result_settings` of this run.
    resume : bool
        Whether the previous record may be used.  Without it everything is recomputed.

    Notes
    -----
    Thread-safe: patients finishing on several worker threads call :meth:`add_patient`.
    """

    def __init__(self, path: Path, settings: dict[str, Any], *, resume: bool) -> None:
        self.path = Path(path)
        self.settings = settings
        self._lock = threading.Lock()
        self.doc: dict[str, Any] = {
            "format": FORMAT_VERSION,
            "settings": settings,
            "model": None,
            "patients": {},
            "complete": False,
        }
        self.old: dict[str, Any] | None = None
        if resume:
            self.old = self._read_old()

    def _read_old(self) -> dict[str, Any] | None:
        try:
            old = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("resume: ignoring unreadable run record '%s' (%s)", self.path, exc)
            return None
        if not isinstance(old, dict) or old.get("format") != FORMAT_VERSION:
            log.warning("resume: run record '%s' has another format; recomputing", self.path)
            return None
        patients, model = old.get("patients", {}), old.get("model")
        if not (isinstance(patients, dict) and all(isinstance(v, dict) for v in patients.values())
                and (model is None or isinstance(model, dict))
                and isinstance(old.get("settings"), dict)):
            log.warning("resume: run record '%s' is malformed (edited?); recomputing", self.path)
            return None
        if old.get("settings") != self.settings:
            changed = sorted(
                k
                for k in set(self.settings) | set(old.get("settings") or {})
                if (old.get("settings") or {}).get(k) != self.settings.get(k)
            )
            log.info(
                "resume: settings changed since '%s' (%s); recomputing",
                self.path,
                ", ".join(changed),
            )
            return None
        return old

    # ---------------------------------------------------------------- model
    def reusable_model(self, source: Mapping[str, Any]) -> str | None:
        """Return the previous model's digest if it was made from the same ``source``."""
        if self.old is None or not self.old.get("model"):
            return None
        if self.old["model"].get("source") != json.loads(json.dumps(source, default=str)):
            log.info("resume: the model's inputs changed; fitting again")
            return None
        return self.old["model"].get("digest")

    def set_model(
        self, digest: str, source: Mapping[str, Any], skipped: Mapping[str, str] | None = None
    ) -> None:
        """Record the model in use; previous patients count only if they used the same one.

        ``skipped`` are the training patients the fit left out (restored when it is reused).
        """
        with self._lock:
            self.doc["model"] = {
                "digest": digest,
                "source": json.loads(json.dumps(source, default=str)),
                "skipped": dict(skipped or {}),
            }
            if self.old is not None and (self.old.get("model") or {}).get("digest") != digest:
                self.old = {**self.old, "patients": {}}
            self._save()

    # ---------------------------------------------------------------- patients
    def reusable_patient(
        self, split: str, pid: str, inputs: list[dict[str, Any]] | None
    ) -> dict[str, float] | None:
        """Metrics of a patient whose complete outputs may be kept, else None."""
        if self.old is None or inputs is None:
            return None
        rec = self.old.get("patients", {}).get(f"{split}/{pid}")
        if not rec or rec.get("inputs") != inputs:
            return None
        metrics = rec.get("metrics")
        # the published metrics, each a number (None: an infinite PSNR); a test patient also
        # carries its extras (each expert alone, the HR-free protocol: scoring.test_extras)
        extras = {"experts", "hr_free"} if split == "test" else set()
        if not isinstance(metrics, dict) or set(metrics) != set(METRIC_KEYS) | extras or not all(
            v is None or isinstance(v, (int, float))
            for k, v in metrics.items() if k in METRIC_KEYS
        ):  # a record of another version (a metric added since) or edited by hand
            have = sorted(metrics) if isinstance(metrics, dict) else []
            log.info(
                "resume: patient %s (%s): the record has metrics %s, not %s; computing it again",
                pid, split, have, sorted(set(METRIC_KEYS) | extras),
            )
            return None
        for out in rec.get("outputs", []):
            why = (
                # lexically, as add_patient stored it: '..' after a symlinked folder must
                # not follow the link (test blends live outside the task folder)
                verify_file(os.path.normpath(self.path.parent / out["path"]), out)
                if isinstance(out, dict) and isinstance(out.get("path"), str)
                else "the record lists a malformed output"
            )
            if why is not None:
                log.info("resume: patient %s (%s): %s; computing it again", pid, split, why)
                return None
        with self._lock:
            self.doc["patients"][f"{split}/{pid}"] = rec
            self._save()
        # strict JSON stores an infinite PSNR (blend == HR) as null
        return {k: (math.inf if v is None else v) for k, v in rec["metrics"].items()}

    def add_patient(
        self,
        split: str,
        pid: str,
        inputs: list[dict[str, Any]] | None,
        outputs: list[Path],
        metrics: Mapping[str, float],
    ) -> None:
        """Record a finished patient (after its outputs were written).

        Each output's size and checksum are taken now, from the file just written (it is
        still in the page cache), so a later resume can verify it.
        """
        described = [
            {"path": os.path.relpath(os.path.abspath(p), os.path.abspath(self.path.parent)),
             **file_digest(p)}
            for p in outputs
        ]
        with self._lock:
            self.doc["patients"][f"{split}/{pid}"] = {
                "inputs": inputs,
                "outputs": described,
                "metrics": dict(metrics),
            }
            self._save()

    def mark_complete(self) -> None:
        """Every output of the task is written."""
        with self._lock:
            self.doc["complete"] = True
            self._save()

    def _save(self) -> None:
        atomic_write_json(self.path, strict_json(self.doc), indent=1)
