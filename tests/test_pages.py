"""Giving back a mapped volume's resident pages (resources/pages.py) and scoring slab by slab.

The resident size of one mapping is read from ``/proc/self/smaps`` (Linux), so these tests
see what the kernel really charges the process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pacs_numba.core import scoring
from pacs_numba.core.blending import brain_mask, expert_mean
from pacs_numba.core.model import StackingModel
from pacs_numba.core.scoring import score_patient
from pacs_numba.core.statistics import normalisation, valid_mask
from pacs_numba.core.tiling import TileGrid
from pacs_numba.resources.pages import release_pages
from pacs_numba.store.volumes import map_npy

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc/self/smaps")


def _resident(path: Path) -> int:
    """Bytes of ``path`` resident in this process's mappings (summed over them)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and not head[0].endswith(":"):  # a mapping's first line
                inside = len(head) >= 6 and head[5] == str(path)
            elif inside and head[:1] == ["Rss:"]:
                total += int(head[1]) * 1024
    return total


def _entry(tmp_path: Path, name: str, vol: np.ndarray) -> np.ndarray:
    npy = tmp_path / f"{name}.npy"
    np.save(npy, np.ascontiguousarray(vol, dtype="<f4"))
    return map_npy(npy, vol.shape)


def test_release_drops_the_mapping_and_keeps_the_values(tmp_path, rng):
    vol = rng.random((40, 33, 29)).astype(np.float32)  # odd plane size: pages straddle planes
    mapped = _entry(tmp_path, "v", vol)
    path = tmp_path / "v.npy"
    assert float(mapped.sum(dtype=np.float64)) == pytest.approx(float(vol.sum(dtype=np.float64)))
    full = _resident(path)
    assert full >= vol.nbytes - 4096  # every page was touched
    freed = release_pages(mapped, 10, 30)
    assert freed >= 20 * vol[0].nbytes
    part = _resident(path)
    assert full - part >= 20 * vol[0].nbytes - 2 * 4096
    assert part >= 18 * vol[0].nbytes  # planes outside 10:30 stay (bar the shared pages)
    assert release_pages(mapped) > 0
    assert _resident(path) == 0
    assert_array_equal(mapped, vol)  # read back from the page cache, unchanged
    assert _resident(path) >= vol.nbytes - 4096


def test_release_leaves_private_and_writable_arrays_alone(tmp_path, rng):
    vol = rng.random((9, 8, 7)).astype(np.float32)
    copy = vol.copy()
    assert release_pages(vol) == 0
    assert_array_equal(vol, copy)
    npy = tmp_path / "w.npy"
    np.save(npy, vol)
    writable = np.load(npy, mmap_mode="r+")
    writable[0, 0, 0] = 5.0  # not yet on disk: dropping a page would lose it
    assert release_pages(writable) == 0
    assert writable[0, 0, 0] == 5.0
    private = np.load(npy, mmap_mode="c")  # copy-on-write: the same
    private[1, 1, 1] = 6.0
    assert release_pages(private) == 0
    assert private[1, 1, 1] == 6.0
    mapped = _entry(tmp_path, "v", vol)
    assert release_pages(mapped[:, ::2]) == 0  # not C-contiguous: left as is
    assert release_pages(mapped, 5, 5) == 0


@pytest.mark.parametrize("slab", [1, 3, 100])
def test_scoring_slab_by_slab_equals_one_call(monkeypatch, tmp_path, rng, slab):
    """Mapped volumes scored in slabs of any size: the same blend and metrics, pages given back."""
    shape = (21, 18, 16)
    hr = (rng.random(shape) * 300).astype(np.float32)
    hr[hr < 60] = 0
    experts = [(hr * (0.7 + 0.2 * e) + rng.normal(0, 9, shape)).astype(np.float32)
               for e in range(3)]
    grid = TileGrid(shape, 8, 4)
    w = rng.random((grid.n_tiles, 3)).astype(np.float32)
    w /= w.sum(axis=1, keepdims=True)
    model = StackingModel(w, np.ones(grid.n_tiles, bool), grid, ("A", "B", "C"), {})
    bmask = brain_mask(hr)
    kw = dict(window="hann", ssim_axis="axial", brain_mask=bmask, experts_alone=True,
              hr_free=True)
    monkeypatch.setattr(scoring, "SCORE_SLAB_PLANES", 10**6)
    whole = score_patient(hr, experts, model, **kw)
    monkeypatch.setattr(scoring, "SCORE_SLAB_PLANES", slab)
    m_hr = _entry(tmp_path, "hr", hr)
    m_ex = [_entry(tmp_path, f"e{e}", x) for e, x in enumerate(experts)]
    got = score_patient(m_hr, m_ex, model, **kw)
    assert_array_equal(got.blend, whole.blend)
    assert got.metrics == whole.metrics
    assert got.extras == whole.extras
    for name in ("hr", "e0", "e1", "e2"):  # nothing of the inputs is left mapped
        assert _resident(tmp_path / f"{name}.npy") == 0


@pytest.mark.parametrize("slab", [1, 4, 7, 1000])
def test_statistics_slab_by_slab_equal_whole_passes(tmp_path, rng, slab):
    """valid_mask, normalisation and expert_mean by slabs: identical values, pages given back."""
    shape = (13, 11, 9)
    hr = (rng.random(shape) * 200).astype(np.float32)
    hr[hr < 40] = 0
    hr[3, 2, 1] = np.nan
    experts = [(hr * (0.5 + e) + rng.normal(0, 5, shape)).astype(np.float32) for e in range(3)]
    experts[1][5, 5, 5] = np.inf
    m_hr = _entry(tmp_path, "hr", hr)
    m_ex = [_entry(tmp_path, f"e{e}", x) for e, x in enumerate(experts)]
    mask, bad = valid_mask(hr, experts)
    got_mask, got_bad = valid_mask(m_hr, m_ex, slab=slab)
    assert_array_equal(got_mask, mask)
    assert_array_equal(got_bad, bad)
    want = normalisation(hr, experts, mask)
    got = normalisation(m_hr, m_ex, mask, slab=slab)
    assert got[:2] == want[:2]
    assert_array_equal(got[2], want[2])
    assert_array_equal(got[3], want[3])
    assert_array_equal(expert_mean(m_ex, slab=slab), expert_mean(experts))
    for name in ("hr", "e0", "e1", "e2"):
        assert _resident(tmp_path / f"{name}.npy") == 0
