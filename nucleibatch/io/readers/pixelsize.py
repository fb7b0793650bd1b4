"""Pixel size (micrometres per pixel) from a file's metadata: the units and the plausible range
that every format shares. Each format reads its own metadata, in this order:

* TIFF (:func:`~nucleibatch.io.readers.tiff.tiff_pixel_size`): OME-TIFF ``Pixels/@PhysicalSizeX``
  (and its unit) of the OME-XML image a series comes from; Aperio SVS ``MPP = ...`` in the first
  page's description; ImageJ ``unit=micron`` (or nm, mm) with the X resolution in pixels per unit;
  other TIFF (NDPI and scanners writing the baseline tags) ``XResolution`` with
  ``ResolutionUnit`` centimetre or inch;
* OME-Zarr (:func:`~nucleibatch.io.readers.ome_zarr.ome_zarr_pixel_size`): the ``scale``
  coordinate transformations of the multiscale (its own and its first dataset's) on the ``x``
  axis, with that axis' ``unit``.

Only sizes in :data:`PLAUSIBLE_UM` are kept: a TIFF saved by a generic program declares 72 to 1200
dots per inch (353 to 21 um per pixel), which says nothing about a microscope.
"""

from __future__ import annotations

import math
from typing import Any

PLAUSIBLE_UM = (1e-3, 20.0)
UNIT_UM = {
    "um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
    "m": 1e6, "meter": 1e6, "metre": 1e6,
    "pm": 1e-6, "picometer": 1e-6, "angstrom": 1e-4, "å": 1e-4,
}  # fmt: skip


def plausible(size_um: float | None) -> float | None:
    """``size_um`` if it is a finite pixel size in :data:`PLAUSIBLE_UM`, else None."""
    if size_um is None or not math.isfinite(size_um):
        return None
    return float(size_um) if PLAUSIBLE_UM[0] <= size_um <= PLAUSIBLE_UM[1] else None


def unit_factor(unit: Any) -> float | None:
    """Micrometres in one ``unit`` (OME / NGFF / ImageJ spellings); None for an unknown unit."""
    if unit is None:
        return None
    return UNIT_UM.get(str(unit).strip().lower())
