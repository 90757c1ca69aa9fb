"""Where a run's outputs live (algorithm A8): every path a task writes or reads back.

This is the only module that spells an output file name.  The engine, the run record,
the model reader, resume and the ``report`` command ask it for paths, so a new output
file is added here once and every reader finds it.

The tree under ``out_root`` (the published tool's layout, plus our own files)::

    {out_root}/{experiment}/
        logs/                                      per-process log files
        experiment_metadata.json  results_fold_{N}.h5 (+ .parts/)   HDF5-form configs
        paper_metrics.csv                          ``pacs-numba metrics``
        {spacing}/output_volumes/{pid}-{pulse}.nii.gz       test blends
        {spacing}/model_data/fold_{N}/{pulse}/
            weights.json  metrics.json                      published files
            {pid}_blend_train.nii.gz                        train blends
            {pid}_weights_test.npz  {pid}_weight_analysis_test.npz
            pacs_model.npz  patients.json  pacs_numba_run.json    ours
            training_record.json          current release's form (HDF5 configs)
            weight_maps_model_*  {pid}_weight_maps_test_*   ours: NIfTI weight maps
            report/                 ``pacs-numba report``'s default output folder

The inputs, in the published tool's layout (:func:`hr_file`, :func:`lr_file`,
:func:`expert_file`; the manifest and the generated cohort both ask here)::

    {models-root}/{MODEL}/{spacing}/output_volumes/{pid}-{pulse}.nii.gz   expert output
    {hr-root}/{pid}/{pid}-{pulse}.nii.gz                                  HR
    {lr-root}/{spacing}/{pid}/{pid}-{pulse}.nii.gz                        LR

(The NIfTI weight-map names come from :func:`pacs_numba.store.mapfiles.map_paths`; ``pacs-numba
summarize`` writes :data:`SUMMARY_CSV` and :data:`SUMMARY_MD` into the out_root or its
``--out``; ``pacs-numba tune`` writes under :attr:`ExperimentLayout.tune_dir`.)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .integrity import output_under

#: The published tool's tile weights of a task (``{"<tile id>": [w_1..w_M]}``).
WEIGHTS_FILE = "weights.json"


#: The published tool's mean metrics of a task; its presence means "this task has outputs".
METRICS_FILE = "metrics.json"


#: Our compact model file (every tile's weights, the grid, the expert names).
MODEL_FILE = "pacs_model.npz"


#: Per-patient metrics, skipped patients and stage timings of a task.
PATIENTS_FILE = "patients.json"


#: The current release's per-tile solver record of a task (HDF5-form configs).
TRAINING_RECORD_FILE = "training_record.json"


#: The current release's description of an experiment, at its root (HDF5-form configs).
EXPERIMENT_METADATA_FILE = "experiment_metadata.json"


#: ``pacs-numba metrics``'s default table of the paper's metrics, at the experiment root.
PAPER_METRICS_CSV = "paper_metrics.csv"


#: ``pacs-numba summarize``'s tables.
SUMMARY_CSV = "summary.csv"


SUMMARY_MD = "summary.md"


#: ``pacs-numba summarize``'s figures: a folder beside the tables (``report`` links them).
SUMMARY_FIGURES = "summary_figures"


#: The run record that ``--resume`` trusts (settings, fingerprints, finished patients).
RECORD_FILE = "pacs_numba_run.json"


_MODEL_DATA = "model_data"


_FOLD_DIR = re.compile(r"^fold_(\d+)$")


#: How a task folder is spelled, for messages.
TASK_DIR_PATTERN = "{experiment}/{spacing}/model_data/fold_{N}/{pulse}"


_OUTPUT_VOLUMES = "output_volumes"


_LOGS = "logs"


_REPORT = "report"


def volume_name(pid: str, pulse: str) -> str:
    """File name of one patient's volume of one pulse, ``{pid}-{pulse}.nii.gz``.

    The published tool names every per-patient volume so: HR, LR, expert outputs, test
    blends and ``predict``'s outputs in a folder.

    Examples
    --------
    >>> volume_name("sub-01", "t1c")
    'sub-01-t1c.nii.gz'
    """
    return f"{pid}-{pulse}.nii.gz"


def hr_file(hr_root: Path, pid: str, pulse: str) -> Path:
    """Path of a patient's HR volume, ``{hr-root}/{pid}/{pid}-{pulse}.nii.gz``."""
    return Path(hr_root) / pid / volume_name(pid, pulse)


def lr_file(lr_root: Path, spacing: str, pid: str, pulse: str) -> Path:
    """Path of a patient's LR volume, ``{lr-root}/{spacing}/{pid}/{pid}-{pulse}.nii.gz``."""
    return Path(lr_root) / spacing / pid / volume_name(pid, pulse)


def expert_dir(models_root: Path, model: str, spacing: str) -> Path:
    """Folder of one expert's outputs at one spacing.

    ``{models-root}/{MODEL}/{spacing}/output_volumes``.
    """
    return Path(models_root) / model / spacing / _OUTPUT_VOLUMES


def expert_file(models_root: Path, model: str, spacing: str, pid: str, pulse: str) -> Path:
    """Path of an expert output.

    ``{models-root}/{MODEL}/{spacing}/output_volumes/{pid}-{pulse}.nii.gz``.

    Examples
    --------
    >>> expert_file(Path("models"), "BSPLINE", "3mm", "sub-01", "t1c").as_posix()
    'models/BSPLINE/3mm/output_volumes/sub-01-t1c.nii.gz'
    """
    return expert_dir(models_root, model, spacing) / volume_name(pid, pulse)


def fold_results_h5(root: Path, fold: int) -> tuple[Path, Path, Path]:
    """Return the files of one fold's HDF5 results: the index, the part folder and its lock.

    Examples
    --------
    >>> [p.name for p in fold_results_h5(Path("exp"), 2)]
    ['results_fold_2.h5', 'results_fold_2.parts', 'results_fold_2.h5.lock']
    """
    stem = f"results_fold_{int(fold)}"
    root = Path(root)
    return root / f"{stem}.h5", root / f"{stem}.parts", root / f"{stem}.h5.lock"


#: How the expert layout is spelled, for messages.
EXPERT_FILE_PATTERN = "{models_root}/{MODEL}/{spacing}/output_volumes/{pid}-{pulse}.nii.gz"


@dataclass(frozen=True)
class ExperimentLayout:
    """Folders shared by every task of one experiment.

    Parameters
    ----------
    out_root : Path
        ``--out-root`` or the config's ``pacs_sr.out_root``.
    experiment : str
        ``pacs_sr.experiment_name``.

    Examples
    --------
    >>> lay = ExperimentLayout(Path("out"), "exp")
    >>> lay.logs_dir.as_posix(), lay.tune_dir.as_posix()
    ('out/exp/logs', 'out/exp/tune')
    """

    out_root: Path
    experiment: str

    @property
    def root(self) -> Path:
        """``{out_root}/{experiment}``."""
        return Path(self.out_root) / self.experiment

    @property
    def logs_dir(self) -> Path:
        """Folder of the per-process log files (``pacs_sr.log_to_file``)."""
        return self.root / _LOGS

    @property
    def tune_dir(self) -> Path:
        """Default folder of ``pacs-numba tune``'s results, tables and best config."""
        return self.root / "tune"

    @property
    def metadata_file(self) -> Path:
        """``experiment_metadata.json`` (HDF5-form configs)."""
        return self.root / EXPERIMENT_METADATA_FILE

    @property
    def paper_metrics_csv(self) -> Path:
        """Default output of ``pacs-numba metrics``."""
        return self.root / PAPER_METRICS_CSV

    def results_h5(self, fold: int) -> Path:
        """``results_fold_{N}.h5``: a fold's blends (HDF5-form configs; see ``ResultsH5``)."""
        return fold_results_h5(self.root, fold)[0]

    def log_file(self, command: str, stamp: str, host: str, pid: int) -> Path:
        """Log file of one process: ``logs/pacs_numba-{command}-{stamp}-{host}-{pid}.log``."""
        return self.logs_dir / f"pacs_numba-{command}-{stamp}-{host}-{pid}.log"

    def task(self, fold: int, spacing: str, pulse: str) -> TaskLayout:
        """Return the layout of one (fold, spacing, pulse) task of this experiment."""
        return TaskLayout(self.out_root, self.experiment, fold, spacing, pulse)


@dataclass(frozen=True)
class TaskLayout:
    """Every path one (fold, spacing, pulse) task writes or reads back.

    Parameters
    ----------
    out_root : Path
        ``--out-root`` or the config's ``pacs_sr.out_root``.
    experiment : str
        ``pacs_sr.experiment_name``.
    fold : int
        Fold number, 1-based.
    spacing, pulse : str
        The task's spacing and pulse.

    Examples
    --------
    >>> lay = TaskLayout(Path("out"), "exp", 2, "3mm", "t1c")
    >>> lay.model_dir.as_posix()
    'out/exp/3mm/model_data/fold_2/t1c'
    >>> lay.test_blend("sub-01").as_posix()
    'out/exp/3mm/output_volumes/sub-01-t1c.nii.gz'
    """

    out_root: Path
    experiment: str
    fold: int
    spacing: str
    pulse: str

    @property
    def experiment_layout(self) -> ExperimentLayout:
        """The experiment this task belongs to."""
        return ExperimentLayout(self.out_root, self.experiment)

    @property
    def model_dir(self) -> Path:
        """``{out_root}/{experiment}/{spacing}/model_data/fold_{N}/{pulse}``."""
        return (
            Path(self.out_root)
            / self.experiment
            / self.spacing
            / _MODEL_DATA
            / f"fold_{self.fold}"
            / self.pulse
        )

    @property
    def volumes_dir(self) -> Path:
        """``{out_root}/{experiment}/{spacing}/output_volumes`` (shared by the folds)."""
        return Path(self.out_root) / self.experiment / self.spacing / _OUTPUT_VOLUMES

    @property
    def weights_json(self) -> Path:
        """The published ``weights.json``."""
        return self.model_dir / WEIGHTS_FILE

    @property
    def metrics_json(self) -> Path:
        """The published ``metrics.json``."""
        return self.model_dir / METRICS_FILE

    @property
    def model_file(self) -> Path:
        """Our ``pacs_model.npz``."""
        return self.model_dir / MODEL_FILE

    @property
    def patients_json(self) -> Path:
        """Our ``patients.json`` (per-patient metrics and timings)."""
        return self.model_dir / PATIENTS_FILE

    @property
    def record_file(self) -> Path:
        """The run record ``pacs_numba_run.json``."""
        return self.model_dir / RECORD_FILE

    @property
    def training_record(self) -> Path:
        """The current release's ``training_record.json`` (HDF5-form configs)."""
        return self.model_dir / TRAINING_RECORD_FILE

    def blend(self, split: str, pid: str) -> Path:
        """Blend of a patient: test blends go to ``output_volumes``, train blends to model_dir."""
        return self.test_blend(pid) if split == "test" else self.train_blend(pid)

    def test_blend(self, pid: str) -> Path:
        """``output_volumes/{pid}-{pulse}.nii.gz``."""
        return output_under(self.volumes_dir, volume_name(pid, self.pulse))

    def train_blend(self, pid: str) -> Path:
        """``model_dir/{pid}_blend_train.nii.gz``."""
        return output_under(self.model_dir, f"{pid}_blend_train.nii.gz")

    def weight_npz(self, pid: str, split: str = "test") -> Path:
        """``model_dir/{pid}_weights_{split}.npz`` (per-voxel weight maps)."""
        return output_under(self.model_dir, f"{pid}_weights_{split}.npz")

    def weight_analysis_npz(self, pid: str, split: str = "test") -> Path:
        """``model_dir/{pid}_weight_analysis_{split}.npz`` (entropy, dominant expert, stats)."""
        return output_under(self.model_dir, f"{pid}_weight_analysis_{split}.npz")

    @property
    def report_dir(self) -> Path:
        """``model_dir/report``: ``pacs-numba report``'s default folder."""
        return report_dir_of(self.model_dir)

    def existing_weights(self) -> Path | None:
        """Return the weights ``evaluate`` reads back: the model file, else ``weights.json``."""
        for path in (self.model_file, self.weights_json):
            if path.exists():
                return path
        return None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> TaskLayout:
        """Return the layout whose :attr:`model_dir` is ``model_dir`` (the inverse).

        Raises
        ------
        ValueError
            If ``model_dir`` is not spelled ``.../{experiment}/{spacing}/model_data/fold_{N}/
            {pulse}``.
        """
        d = Path(model_dir)
        fold = _FOLD_DIR.match(d.parent.name)
        if fold is None or len(d.parents) < 5 or d.parents[1].name != _MODEL_DATA:
            raise ValueError(f"'{d}' is not a task folder ({TASK_DIR_PATTERN})")
        return cls(d.parents[4], d.parents[3].name, int(fold.group(1)), d.parents[2].name,
                   d.name)


def report_dir_of(model_dir: str | Path) -> Path:
    """``pacs-numba report``'s default folder for a task folder, wherever that folder lies."""
    return Path(model_dir) / _REPORT


def find_task_dirs(out_root: str | Path) -> list[TaskLayout]:
    """Every task under ``out_root`` that has a ``metrics.json``, sorted by folder."""
    found = []
    for metrics in sorted(Path(out_root).rglob(METRICS_FILE)):
        try:
            found.append(TaskLayout.from_model_dir(metrics.parent))
        except ValueError:
            continue
    return found
