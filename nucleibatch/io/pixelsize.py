"""Pixel size (micrometres per pixel) from a file's metadata.

Read, in this order, from:

* OME-TIFF: ``Pixels/@PhysicalSizeX`` (and its unit) of the OME-XML image a series comes from;
* Aperio SVS: ``MPP = ...`` in the first page's description;
* ImageJ TIFF: ``unit=micron`` (or nm, mm) with the X resolution in pixels per unit;
* other TIFF (NDPI and scanners writing the baseline tags): ``XResolution`` with ``ResolutionUnit``
  centimetre or inch;
* OME-Zarr: the ``scale`` coordinate transformations of the multiscale (its own and its first
  dataset's) on the ``x`` axis, with that axis' ``unit``.

Only sizes in :data:`PLAUSIBLE_UM` are kept: a TIFF saved by a generic program declares 72 to 1200
dots per inch (353 to 21 um per pixel), which says nothing about a microscope.
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ElementTree
from typing import Any

log = logging.getLogger(__name__)

PLAUSIBLE_UM = (1e-3, 20.0)
UNIT_UM = {
    "um": 1.0, "µm": 1.0, "\u03bcm": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
    "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3,
    "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3,
    "cm": 1e4, "centimeter": 1e4, "centimetre": 1e4,
    "m": 1e6, "meter": 1e6, "metre": 1e6,
    "pm": 1e-6, "picometer": 1e-6, "angstrom": 1e-4, "å": 1e-4,
}  # fmt: skip
RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre
MPP_PATTERN = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


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


def tiff_pixel_size(tif: Any, series_index: int) -> float | None:
    """The pixel size (um) of series ``series_index`` of an open ``tifffile.TiffFile``, or None."""
    try:
        if tif.is_ome and tif.ome_metadata:
            size = ome_xml_pixel_size(tif.ome_metadata, series_index)
            if size is not None:
                return size
        page = tif.series[series_index].keyframe
        description = str(getattr(page, "description", "") or tif.pages.first.description or "")
        if description.startswith("Aperio"):
            match = MPP_PATTERN.search(description)
            if match:
                return plausible(float(match.group(1)))
        return resolution_pixel_size(page, tif.imagej_metadata if tif.is_imagej else None)
    except Exception as error:  # metadata is a bonus: a damaged tag never stops a probe
        log.debug("pixel size of %s unreadable: %s", getattr(tif, "filename", tif), error)
        return None


def ome_xml_pixel_size(xml: str, image_index: int = 0) -> float | None:
    """``PhysicalSizeX`` (else ``PhysicalSizeY``) of the ``image_index``-th OME ``Image``, in um."""
    root = ElementTree.fromstring(xml)
    images = [element for element in root.iter() if element.tag.rsplit("}", 1)[-1] == "Image"]
    if not images:
        return None
    image = images[min(image_index, len(images) - 1)]
    pixels = next((element for element in image.iter() if element.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    for axis in ("X", "Y"):
        value = pixels.get(f"PhysicalSize{axis}")
        if value is not None:
            factor = unit_factor(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
            return plausible(float(value) * factor) if factor is not None else None
    return None


def resolution_pixel_size(page: Any, imagej: dict | None = None) -> float | None:
    """The pixel size (um) from a TIFF page's ``XResolution`` and ``ResolutionUnit`` tags (ImageJ's
    ``unit`` where the unit tag says none), or None."""
    tags = page.tags
    resolution = tags.get("XResolution")
    if resolution is None:
        return None
    value = resolution.value
    try:
        pixels_per_unit = value[0] / value[1] if isinstance(value, tuple) else float(value)
    except (ZeroDivisionError, TypeError, ValueError, IndexError):
        return None
    if not pixels_per_unit > 0:
        return None
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2
    if unit in RESOLUTION_UNIT_UM:
        return plausible(RESOLUTION_UNIT_UM[unit] / pixels_per_unit)
    factor = unit_factor((imagej or {}).get("unit"))
    return plausible(factor / pixels_per_unit) if factor is not None else None


def ome_zarr_pixel_size(multiscale: dict, dataset_index: int = 0) -> float | None:
    """The pixel size (um) of one dataset of an OME-Zarr multiscale: the product of the ``scale``
    transformations (the multiscale's own, then the dataset's) on its ``x`` axis, times that
    axis' unit (None when the axis has no unit we know)."""
    axes = multiscale.get("axes")
    if not isinstance(axes, list):
        return None
    names = [str(a.get("name", "")).lower() if isinstance(a, dict) else str(a).lower() for a in axes]
    if "x" not in names:
        return None
    axis = axes[names.index("x")]
    factor = unit_factor(axis.get("unit")) if isinstance(axis, dict) else None
    if factor is None:
        return None
    datasets = multiscale.get("datasets") or []
    if not 0 <= dataset_index < len(datasets):
        return None
    scale = 1.0
    for transformations in (datasets[dataset_index].get("coordinateTransformations"), multiscale.get("coordinateTransformations")):
        for transformation in transformations or []:
            if isinstance(transformation, dict) and transformation.get("type") == "scale":
                values = transformation.get("scale") or []
                if len(values) != len(names):
                    return None
                scale *= float(values[names.index("x")])
    return plausible(scale * factor)
