"""Blend-weight maps (pacs_numba.core.weightmaps) against their slow twin and the blend itself."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pacs_numba.core.blending import blend_volume
from pacs_numba.core.tiling import TileGrid
from pacs_numba.core.weightmaps import blend_weight_maps, dominant_labels, entropy_map
from pacs_numba.store.mapfiles import write_weight_niftis
from tests.reference import weightmaps as ref

CASES = [((9, 7, 5), 4, 2), ((11, 6, 9), 4, 3), ((5, 5, 5), 3, 3), ((8, 9, 10), 5, 1)]


def _weights(rng, n_tiles, m):
    w = rng.random((n_tiles, m))
    return (w / w.sum(axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize(("shape", "patch", "stride"), CASES)
@pytest.mark.parametrize("window", ["hann", "flat"])
def test_maps_equal_the_tile_by_tile_overlap_add(rng, shape, patch, stride, window):
    grid = TileGrid(shape, patch, stride)
    w = _weights(rng, grid.n_tiles, 3)
    got = blend_weight_maps(w, grid, window)
    want = ref.blend_weight_maps(w, shape, patch, stride, window)
    assert got.shape == (*shape, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # the weights sum to 1 wherever a window reaches the voxel
    total = got.sum(axis=-1)
    reached = total > 0.5
    np.testing.assert_allclose(total[reached], 1.0, atol=1e-5)
    if window == "flat" or stride == patch:
        assert reached.all()


@pytest.mark.parametrize(("shape", "patch", "stride"), CASES[:2])
def test_maps_reproduce_the_blend_of_the_zscored_experts(rng, shape, patch, stride):
    """blend_z = sum_e W_e z_e: the maps are the weights the blend applies, voxel by voxel."""
    grid = TileGrid(shape, patch, stride)
    m = 3
    w = _weights(rng, grid.n_tiles, m)
    experts = [rng.random(shape, dtype=np.float32) * 100 + 10 for _ in range(m)]
    mus, sds = [40.0, 50.0, 60.0], [20.0, 25.0, 30.0]
    blend = blend_volume(experts, grid, w, mus=mus, sds=sds, mu_hr=0.0, sd_hr=1.0, mask=None,
                         window="hann")
    maps = blend_weight_maps(w, grid, "hann").astype(np.float64)
    z = np.stack([(e.astype(np.float64) - mu) / sd
                  for e, mu, sd in zip(experts, mus, sds, strict=True)], -1)
    np.testing.assert_allclose(blend, (maps * z).sum(-1), rtol=1e-4, atol=1e-4)


def test_entropy_and_dominant_labels():
    maps = np.array([[[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.2, 0.3, 0.5], [0, 0, 0]]]],
                    np.float32)
    ent = entropy_map(maps)
    np.testing.assert_allclose(ent[0, 0], [np.log(2), 0.0, -(0.2 * np.log(0.2) + 0.3 *
                               np.log(0.3) + 0.5 * np.log(0.5)), 0.0], rtol=1e-6)
    assert dominant_labels(maps)[0, 0].tolist() == [1, 3, 3, 0]
    mask = np.array([[[True, False, True, True]]])
    assert dominant_labels(maps, mask)[0, 0].tolist() == [1, 0, 3, 0]


def test_written_niftis_carry_the_affine_mask_and_legend(rng, tmp_path):
    grid = TileGrid((9, 8, 7), 4, 2)
    w = _weights(rng, grid.n_tiles, 2)
    maps = blend_weight_maps(w, grid, "hann")
    mask = np.zeros(grid.shape, bool)
    mask[2:7, 2:6, 2:6] = True
    aff = np.diag([0.9, 1.1, 3.0, 1.0])
    aff[:3, 3] = [-4, 5, 6]
    paths = write_weight_niftis(tmp_path, "x", maps, ["A", "B"], aff, mask=mask)
    assert all(p.exists() for p in paths)
    img = nib.load(tmp_path / "x_weights.nii.gz")
    assert img.shape == (9, 8, 7, 2) and img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.affine, aff)
    data = img.get_fdata()
    np.testing.assert_allclose(data.sum(-1)[mask], 1.0, atol=1e-5)
    assert not data[~mask].any()
    lab = nib.load(tmp_path / "x_dominant.nii.gz")
    assert lab.get_data_dtype() == np.uint8
    np.testing.assert_allclose(lab.affine, aff)
    labels = np.asarray(lab.dataobj)
    assert set(np.unique(labels[mask])) <= {1, 2} and not labels[~mask].any()
    legend = json.loads((tmp_path / "x_dominant.json").read_text())
    assert [legend["labels"][k]["name"] for k in ("0", "1", "2")] == ["background", "A", "B"]
    ent = nib.load(tmp_path / "x_entropy.nii.gz").get_fdata()
    assert ent.shape == grid.shape
    assert (ent[mask] >= 0).all() and (ent[mask] <= np.log(2) + 1e-6).all()


@pytest.mark.parametrize(("shape", "patch", "stride"), CASES)
def test_the_lean_maps_equal_the_whole_ones(rng, shape, patch, stride, tmp_path):
    from pacs_numba.core.weightmaps import BlendWeightMaps
    from pacs_numba.store.mapfiles import write_blend_weight_maps

    grid = TileGrid(shape, patch, stride)
    w = _weights(rng, grid.n_tiles, 3)
    whole = blend_weight_maps(w, grid, "hann")
    lean = BlendWeightMaps(w, grid, "hann")
    np.testing.assert_allclose(lean.maps(), whole, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lean.entropy, entropy_map(whole), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(lean.labels, dominant_labels(whole))
    mask = rng.random(shape) > 0.3
    write_blend_weight_maps(lean, tmp_path / "a", "x", ["A", "B", "C"], None, mask=mask)
    write_weight_niftis(tmp_path / "b", "x", whole, ["A", "B", "C"], None, mask=mask)
    for name in ("x_weights.nii.gz", "x_dominant.nii.gz", "x_entropy.nii.gz"):
        a = nib.load(tmp_path / "a" / name).get_fdata()
        b = nib.load(tmp_path / "b" / name).get_fdata()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
