"""NIfTI input/output and the shared volume cache.  (Stub: being implemented.)"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from numpy.typing import ArrayLike


def write_nifti(path: str | Path, data: ArrayLike, affine: ArrayLike, header: object = None) -> None:
    """Write ``data`` as float32 NIfTI at ``path`` atomically (stub implementation)."""
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine), header)
    img.set_data_dtype(np.float32)
    nib.save(img, str(path))
