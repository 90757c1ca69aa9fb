"""One home for boundary checks (issue 7): shape errors are InputError everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from pacs_numba.core.blending import blend_volume, weight_maps
from pacs_numba.core.checks import (
    as_mask_u8,
    as_tile_weights,
    check_grid_counts,
    check_shape,
    readonly,
)
from pacs_numba.core.metrics import ssim_slices, volume_metrics
from pacs_numba.core.solve import laplacian_smooth, solve_unconstrained
from pacs_numba.core.statistics import normalisation
from pacs_numba.core.tiling import TileGrid
from pacs_numba.errors import InputError, PacsError


def test_readonly_is_a_view_and_leaves_the_caller_writable():
    a = np.arange(4.0)
    r = readonly(a)
    assert not r.flags.writeable and a.flags.writeable
    assert np.shares_memory(a, r)


def test_masks_become_readonly_uint8_without_copying_bool_or_uint8():
    b = np.zeros((2, 3, 4), bool)
    b[0, 1, 2] = True
    m = as_mask_u8(b, b.shape)
    assert m.dtype == np.uint8 and not m.flags.writeable and m.flags.c_contiguous
    assert np.shares_memory(m, b) and m.sum() == 1
    u = np.full((2, 3, 4), 7, np.uint8)
    assert np.shares_memory(as_mask_u8(u, u.shape), u)
    f = np.array([0.0, -0.5, np.nan, 2.0]).reshape(1, 1, 4)
    assert as_mask_u8(f, f.shape).ravel().tolist() == [0, 1, 1, 1]  # nonzero = inside
    nc = np.asfortranarray(b)
    assert as_mask_u8(nc, b.shape).flags.c_contiguous


def test_check_helpers_raise_input_error():
    with pytest.raises(InputError, match=r"expert 2 has shape \(1, 2\); expected \(1, 3\)$"):
        check_shape((1, 2), (1, 3), what="expert 2")
    with pytest.raises(InputError, match="do not describe 7 tiles"):
        check_grid_counts((2, 2, 2), 7)
    with pytest.raises(InputError, match="three positive integers"):
        check_grid_counts((2, 2), 4)
    g = TileGrid((4, 4, 4), 2, 2)
    with pytest.raises(InputError, match=r"weights have shape \(7, 2\); expected \(8, n_experts\)"):
        as_tile_weights(np.ones((7, 2)), g)
    with pytest.raises(InputError, match="3 columns but 2 experts"):
        as_tile_weights(np.ones((8, 3)), g, 2)


def test_wrappers_report_shape_mismatches_as_input_errors():
    """A shape error is the user's (exit 2), never a bare ValueError (exit 1, 'a bug')."""
    x = np.ones((4, 4, 4), np.float32)
    g = TileGrid(x.shape, 2, 2)
    w = np.full((g.n_tiles, 1), 1.0, np.float32)
    cases = [
        lambda: blend_volume([x], g, w, mus=[0.0], sds=[1.0], mu_hr=0.0, sd_hr=1.0,
                             mask=np.ones((4, 4, 3), bool), window="flat"),
        lambda: blend_volume([x[..., :3]], g, w, mus=[0.0], sds=[1.0], mu_hr=0.0, sd_hr=1.0,
                             mask=None, window="flat"),
        lambda: blend_volume([x], g, w, mus=[0.0, 1.0], sds=[1.0], mu_hr=0.0, sd_hr=1.0,
                             mask=None, window="flat"),
        lambda: weight_maps(np.ones((3, 1), np.float32), g),
        lambda: ssim_slices(x, x, np.ones((4, 4, 3), bool), "axial"),
        lambda: volume_metrics(x, x[..., :3]),
        lambda: volume_metrics(x[0], x[0]),
        lambda: normalisation(x, [x[..., :3]], x > 0),
        lambda: normalisation(x, [x], np.ones((4, 3, 4), bool)),
        lambda: solve_unconstrained(np.ones((2, 2, 2)), np.ones((3, 2)), 0.0),
        lambda: laplacian_smooth(np.ones((8, 1), np.float32), np.ones(8, bool), (2, 2, 3), 0.1),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(PacsError) as info:
            case()
        assert isinstance(info.value, InputError), (i, info.value)
        assert isinstance(info.value, ValueError)  # except ValueError callers keep working
