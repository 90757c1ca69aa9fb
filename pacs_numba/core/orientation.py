"""Anatomical plane names and display slices from an image's orientation, not its array axes.

A volume's array axes say nothing about anatomy: a generated cohort with thick slices along
array axis 2 and an RAS affine is acquired axially, while another file may store the same
head with axis 0 running inferior to superior.  Figures therefore name their planes from the
affine (nibabel's ``io_orientation``, the closest RAS axis of each array axis): slicing
across the array axis that runs left-right gives a *sagittal* plane, anterior-posterior a
*coronal* one, inferior-superior an *axial* one.

Slices are shown in neurological convention: the patient's right on the image's right,
anterior or superior at the top, posterior at the left of a sagittal slice.  Each slice is
named by its array index and its world position in mm, so a caption can be checked against
a viewer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import aff2axcodes, io_orientation
from numpy.typing import NDArray

#: The plane cut by slicing across each RAS world axis (x: left-right, y, z).
PLANE_ACROSS = ("sagittal", "coronal", "axial")

#: Display order of the planes.
PLANES = ("axial", "coronal", "sagittal")

#: (horizontal, vertical) world axes of each plane's display.
_DISPLAY_AXES = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}

#: Letters at the negative and positive end of each RAS world axis.
_ENDS = (("L", "R"), ("P", "A"), ("I", "S"))

#: How each world axis's direction is written, from its negative to its positive end.
DIRECTION = ("left → right", "posterior → anterior", "inferior → superior")

_WORLD = "xyz"


@dataclass(frozen=True)
class View:
    """One anatomical plane through a volume.

    Attributes
    ----------
    plane : str
        ``"axial"``, ``"coronal"`` or ``"sagittal"``.
    axis : int
        The array axis the plane is sliced across.
    index : int
        The array index of the slice along ``axis``.
    world_axis : int
        0, 1 or 2 for the RAS axis ``axis`` runs closest to (x, y, z).
    mm : float
        World coordinate of the slice's centre along ``world_axis``.
    codes : str
        The volume's axis codes (``aff2axcodes``), e.g. ``"RAS"``.
    """

    plane: str
    axis: int
    index: int
    world_axis: int
    mm: float
    codes: str

    @property
    def caption(self) -> str:
        """E.g. ``axial: array axis 2, slice 13 (z = +4.5 mm)``."""
        return (f"{self.plane}: array axis {self.axis}, slice {self.index} "
                f"({_WORLD[self.world_axis]} = {self.mm:+.1f} mm)")


def axis_worlds(affine: NDArray) -> tuple[tuple[int, int], ...]:
    """``(world axis, sign)`` of each array axis: the closest RAS axis and its direction.

    Parameters
    ----------
    affine : (4, 4) float
        Voxel-to-world affine.

    Returns
    -------
    tuple of (int, int)
        For array axes 0, 1, 2: the RAS axis (0 x, 1 y, 2 z) and +1 or -1.
    """
    ornt = io_orientation(np.asarray(affine, dtype=np.float64))
    if not np.all(np.isfinite(ornt)):
        # A degenerate affine (a zero column): no anatomy can be read from it.
        return ((0, 1), (1, 1), (2, 1))
    return tuple((int(w), int(s)) for w, s in ornt)


def axis_direction(affine: NDArray, axis: int) -> str:
    """How array ``axis`` runs anatomically, e.g. ``"inferior → superior"``."""
    w, s = axis_worlds(affine)[axis]
    a, b = DIRECTION[w].split(" → ")
    return f"{a} → {b}" if s > 0 else f"{b} → {a}"


def views(affine: NDArray, shape: tuple[int, ...],
          index: dict[str, int] | None = None) -> tuple[View, View, View]:
    """Return the axial, coronal and sagittal mid slices of a volume of this affine and shape.

    Parameters
    ----------
    affine : (4, 4) float
        Voxel-to-world affine of the volume.
    shape : tuple of int
        Its 3-D shape.
    index : dict, optional
        ``{plane: array index}`` to override a mid slice.

    Returns
    -------
    tuple of View
        In :data:`PLANES` order.
    """
    aff = np.asarray(affine, dtype=np.float64)
    worlds = axis_worlds(aff)
    try:
        codes = "".join(c or "?" for c in aff2axcodes(aff))
    except ValueError:
        codes = "???"
    mid = np.array([(n - 1) / 2.0 for n in shape[:3]] + [1.0])
    out = []
    for plane in PLANES:
        w = PLANE_ACROSS.index(plane)
        axis = next(a for a, (wa, _) in enumerate(worlds) if wa == w)
        i = int((index or {}).get(plane, shape[axis] // 2))
        pos = mid.copy()
        pos[axis] = i
        mm = float(aff[w] @ pos)
        out.append(View(plane, axis, i, w, mm, codes))
    return tuple(out)  # type: ignore[return-value]


def display_slice(vol: NDArray, affine: NDArray, view: View) -> tuple[NDArray, float,
                                                                        tuple[str, str, str, str]]:
    """Return the 2-D slice of ``view``, arranged for ``imshow(..., origin="lower")``.

    Parameters
    ----------
    vol : (N0, N1, N2) array
        The volume (any dtype).
    affine : (4, 4) float
        Its voxel-to-world affine.
    view : View
        From :func:`views`.

    Returns
    -------
    image : 2-D array
        Rows run up the display's vertical world axis, columns along its horizontal one
        (a view of ``vol`` where possible).
    aspect : float
        Voxel height / width on the display, for ``imshow(aspect=...)``.
    ends : (left, right, bottom, top) str
        The anatomical letters at the image's edges, e.g. ``("L", "R", "P", "A")``.
    """
    aff = np.asarray(affine, dtype=np.float64)
    worlds = axis_worlds(aff)
    sl = np.take(vol, view.index, axis=view.axis)
    rest = [a for a in range(3) if a != view.axis]
    h_world, v_world = _DISPLAY_AXES[view.plane]
    if worlds[rest[0]][0] == h_world:  # rows are the horizontal axis: transpose
        sl = sl.T
        rest = rest[::-1]
    v_axis, h_axis = rest
    if worlds[v_axis][1] < 0:
        sl = sl[::-1, :]
    if worlds[h_axis][1] < 0:
        sl = sl[:, ::-1]
    zooms = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    aspect = float(zooms[v_axis] / zooms[h_axis]) if zooms[h_axis] > 0 else 1.0
    if not np.isfinite(aspect) or aspect <= 0:
        aspect = 1.0
    ends = (*_ENDS[h_world], *_ENDS[v_world])
    return sl, aspect, ends  # type: ignore[return-value]
