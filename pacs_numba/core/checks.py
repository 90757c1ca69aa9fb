"""Bring arrays into the one layout every kernel is compiled for.

Kernels are compiled once for read-only, C-contiguous float32 3-D arrays, and
take the experts as a ``numba.typed.List`` of such arrays, so one compiled
kernel serves any number of experts and both memmapped and in-memory volumes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba.typed import List
from numpy.typing import ArrayLike, NDArray

from ..errors import InputError
from .tiling import TileGrid


def as_volume(arr: ArrayLike) -> NDArray[np.float32]:
    """Return a read-only, C-contiguous float32 3-D view of ``arr`` (a copy only if needed)."""
    vol = np.ascontiguousarray(arr, dtype=np.float32)
    if vol.ndim != 3:
        raise InputError(f"expected a 3-D volume, got shape {vol.shape}")
    vol = vol.view(np.ndarray)  # drop np.memmap: the view still maps the same pages
    vol.flags.writeable = False
    return vol


def check_volume_list(vols: Sequence[ArrayLike], *, what: str = "expert",
                      shape: Sequence[int] | None = None,
                      like: str | None = None) -> tuple[int, int, int]:
    """Raise :class:`InputError` unless ``vols`` are one or more 3-D volumes of one shape.

    The one home of the volume-list rule that every wrapper taking a list of volumes applies.

    Parameters
    ----------
    vols : sequence of array_like
        The volumes (only their shapes are read).
    what : str, optional
        What a volume is, for the message (``"expert"``: "expert 2 has shape ...").
    shape : sequence of 3 int, optional
        The shape every volume must have (default: the first volume's).
    like : str, optional
        Where ``shape`` comes from, for the message (default: ``"<what> 0"``).

    Returns
    -------
    tuple of 3 int
        The common shape.

    Examples
    --------
    >>> check_volume_list([np.zeros((2, 3, 4)), np.ones((2, 3, 4))])
    (2, 3, 4)
    >>> check_volume_list([np.zeros((2, 3, 4)), np.ones((2, 3, 5))])
    Traceback (most recent call last):
    ...
    pacs_numba.errors.InputError: expert 1 has shape (2, 3, 5); expected (2, 3, 4) like expert 0
    """
    if len(vols) == 0:
        raise InputError(f"need at least one {what} volume, got none")
    if shape is None:
        shape, like = tuple(np.shape(vols[0])), like or f"{what} 0"
    want = tuple(int(n) for n in shape)
    if len(want) != 3:
        source = f"{what} 0" if like == f"{what} 0" else (like or "the expected shape")
        raise InputError(f"{source} has shape {want}; expected a 3-D volume")
    for e, v in enumerate(vols):
        check_shape(np.shape(v), want, what=f"{what} {e}", like=like)
    return want  # type: ignore[return-value]


def as_volume_list(vols: Sequence[ArrayLike], shape: Sequence[int] | None = None, *,
                   what: str = "expert", like: str | None = None) -> List:
    """Return the volumes as a ``numba.typed.List`` of :func:`as_volume` views.

    Raises
    ------
    InputError
        As :func:`check_volume_list`: the list is empty, or the shapes are not 3-D or differ
        (from each other or from ``shape``).
    """
    check_volume_list(vols, what=what, shape=shape, like=like)
    out = List()
    for v in vols:
        out.append(as_volume(v))
    return out


def readonly(arr: NDArray) -> NDArray:
    """Return a read-only view of ``arr``; the caller's array keeps its flags.

    Numba compiles a kernel once per "readonly-ness" of each argument, so every array
    handed to a kernel goes through here (or comes read-only from the volume cache) and
    each kernel compiles once.

    Examples
    --------
    >>> a = np.zeros(3)
    >>> readonly(a).flags.writeable, a.flags.writeable
    (False, True)
    """
    view = arr.view()
    view.flags.writeable = False
    return view


def check_shape(
    shape: Sequence[int], expected: Sequence[int], *, what: str, like: str | None = None
) -> None:
    """Raise :class:`InputError` unless ``shape == expected``.

    Parameters
    ----------
    shape, expected : sequence of int
        The shape found and the one required.
    what : str
        What has ``shape`` (starts the message, e.g. ``"mask"``, ``"expert 2"``).
    like : str, optional
        Where ``expected`` comes from (ends the message, e.g. ``"the HR volume"``).

    Examples
    --------
    >>> check_shape((2, 3), (2, 4), what="mask", like="the volumes")
    Traceback (most recent call last):
    ...
    pacs_numba.errors.InputError: mask has shape (2, 3); expected (2, 4) like the volumes
    """
    got, want = tuple(int(n) for n in shape), tuple(int(n) for n in expected)
    if got != want:
        tail = f" like {like}" if like else ""
        raise InputError(f"{what} has shape {got}; expected {want}{tail}")


def as_mask_u8(
    mask: ArrayLike, shape: Sequence[int], *, what: str = "mask", like: str = "the volumes"
) -> NDArray[np.uint8]:
    """Return ``mask`` as the kernels take it: read-only, C-contiguous uint8, nonzero = inside.

    A bool or uint8 mask is passed on without a copy when it is already C-contiguous (a
    bool array is viewed as uint8); any other dtype becomes ``mask != 0``.

    Raises
    ------
    InputError
        If ``mask`` does not have ``shape``.

    Examples
    --------
    >>> as_mask_u8(np.array([[[0.0, 2.5]]]), (1, 1, 2)).tolist()
    [[[0, 1]]]
    """
    m = np.asarray(mask)
    check_shape(m.shape, shape, what=what, like=like)
    if m.dtype == np.bool_:
        m = np.ascontiguousarray(m).view(np.uint8)
    elif m.dtype != np.uint8:
        m = (m != 0).view(np.uint8)
    return readonly(np.ascontiguousarray(m))


def as_tile_weights(
    weights: ArrayLike, grid: TileGrid, n_experts: int | None = None
) -> NDArray[np.float32]:
    """Return tile weights as a read-only C-contiguous ``(grid.n_tiles, M)`` float32 array.

    Raises
    ------
    InputError
        If ``weights`` does not have one row per tile of ``grid`` (or, given
        ``n_experts``, one column per expert).
    """
    w = readonly(np.ascontiguousarray(weights, dtype=np.float32))
    if w.ndim != 2 or w.shape[0] != grid.n_tiles or w.shape[1] < 1:
        raise InputError(
            f"weights have shape {w.shape}; expected ({grid.n_tiles}, n_experts) for the "
            f"{grid.counts} tile grid of a {grid.shape} volume "
            f"(patch_size={grid.patch_size}, stride={grid.stride})"
        )
    if n_experts is not None and w.shape[1] != n_experts:
        raise InputError(
            f"weights have {w.shape[1]} columns but {n_experts} experts were given"
        )
    return w


def check_grid_counts(counts: Sequence[int], n_tiles: int) -> tuple[int, int, int]:
    """Return ``counts`` as three ints whose product is ``n_tiles``, or raise InputError.

    Examples
    --------
    >>> check_grid_counts((2, 3, 1), 6)
    (2, 3, 1)
    """
    try:
        n0, n1, n2 = (int(n) for n in counts)
    except (TypeError, ValueError):
        raise InputError(
            f"grid counts must be three positive integers (n0, n1, n2), got {counts!r}"
        ) from None
    if min(n0, n1, n2) < 1 or n0 * n1 * n2 != n_tiles:
        raise InputError(
            f"grid counts {(n0, n1, n2)} do not describe {n_tiles} tiles; expected three "
            f"positive integers whose product is {n_tiles} (TileGrid.counts)"
        )
    return n0, n1, n2
