"""pacs_numba: PaCS-SR patchwise convex stacking on a shared-memory Numba engine.

``import pacs_numba`` is cheap: the names below are loaded on first use (PEP 562), so a
notebook pays for Numba and the kernels only when it calls something that needs them.

Examples
--------
>>> import pacs_numba as pn
>>> pn.__version__
'0.1.0'
>>> sorted(n for n in pn.__all__ if n.endswith("Error"))[:3]
['BudgetError', 'ConfigError', 'InputError']

See docs/api.md for a notebook that trains a fold and predicts a patient.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from ._version import __version__

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: Public name -> the module that defines it.
_API: dict[str, str] = {
    # configuration and the run
    "load_config": "pacs_numba.config",
    "FullConfig": "pacs_numba.config",
    "Engine": "pacs_numba.runs.engine",
    "RunOptions": "pacs_numba.runs.tasks",
    "Task": "pacs_numba.runs.tasks",
    "TaskResult": "pacs_numba.runs.tasks",
    "build_manifest": "pacs_numba.store.manifest",
    "write_manifest": "pacs_numba.store.manifest",
    "load_manifest": "pacs_numba.store.manifest",
    "make_cohort": "pacs_numba.store.cohort",
    # the model
    "StackingModel": "pacs_numba.core.model",
    "load_model": "pacs_numba.store.modelfile",
    "save_model": "pacs_numba.store.modelfile",
    "TileGrid": "pacs_numba.core.tiling",
    # arrays in, arrays out
    "patient_statistics": "pacs_numba.core.cellstats",
    "fit_weights": "pacs_numba.core.solve",
    "solve_simplex_qp": "pacs_numba.core.solve",
    "Normalisation": "pacs_numba.core.blending",
    "blend_patient": "pacs_numba.core.blending",
    "brain_mask": "pacs_numba.core.blending",
    "predict_volume": "pacs_numba.core.predict",
    "volume_metrics": "pacs_numba.core.metrics",
    # files
    "read_nifti": "pacs_numba.store.nifti",
    "write_nifti": "pacs_numba.store.nifti",
    "VolumeStore": "pacs_numba.store.volumes",
    # errors
    "PacsError": "pacs_numba.errors",
    "InputError": "pacs_numba.errors",
    "ConfigError": "pacs_numba.errors",
    "BudgetError": "pacs_numba.errors",
    "OutputError": "pacs_numba.errors",
    "Interrupted": "pacs_numba.errors",
}

__all__ = ["__version__", *sorted(_API)]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use (PEP 562)."""
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'pacs_numba' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
