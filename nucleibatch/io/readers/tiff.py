"""TIFF: BigTIFF, OME-TIFF, ImageJ hyperstacks, Aperio SVS and other whole-slide TIFFs.

Probed from the header (series, axes, pixel size, channel names) and read lazily: uncompressed
contiguous data is memory-mapped, everything else goes through tifffile's zarr store
(``TiffPageSeries.aszarr``), so a region read decodes only the strips/tiles that overlap it.
Pyramid levels (SubIFDs, SVS resolutions, reduced-resolution pages) are used for
:meth:`~nucleibatch.io.readers.source.ImageSource.overview`. A damaged or hostile header (looping
pages, missing tiles, a decompression bomb) is refused at the probe, with the reason.
"""

from __future__ import annotations

import io
import logging
import os
import re
import struct
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import numpy as np

from ...errors import ImageReadError
from ..location import Location, is_remote, open_binary, to_location
from .axes import AxesPlan, plan_axes
from .files import one_line
from .pixelsize import plausible, unit_factor
from .source import (
    CHECK_BYTES,
    MAX_IN_MEMORY_PIXELS,
    AxesSource,
    ImageSource,
    ProbedImage,
    check_image,
    native,
)

log = logging.getLogger(__name__)

# A TIFF whose pixels (uncompressed) are more than MAX_TIFF_RATIO times its file size, and
# more than CHECK_BYTES, is refused as a decompression bomb: real compressed microscopy is
# < 100:1 (JPEG) and deflate / LZW cannot exceed ~3000:1. (Without it a damaged header can
# make a 2 kB file a 10^6 x 40 image whose 10^5 missing tiles take minutes to "read".)
MAX_TIFF_RATIO = 10_000
# Whole-slide TIFF flavours whose extra series are slide pictures, not the specimen.
WSI_KINDS = frozenset({"svs", "ndpi", "philips", "scn", "bif", "qpi"})
ASSOCIATED_SERIES = frozenset({"thumbnail", "label", "macro", "map", "overview"})
RESOLUTION_UNIT_UM = {2: 25400.0, 3: 10000.0}  # TIFF ResolutionUnit: inch, centimetre
MPP_PATTERN = re.compile(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)")


def probe_tiff(path: Location, file_size: int) -> list[ProbedImage]:
    """The images of a TIFF file of ``file_size`` bytes, from its header: one per plane of each
    series (whole-slide label/macro/thumbnail pictures left out), or one with ``error``."""
    try:
        tif = _open_tiff_file(path)
    except Exception as error:
        return [ProbedImage(error=f"not a readable TIFF ({type(error).__name__}: {one_line(error)})")]
    with tif:
        try:
            all_series = list(tif.series)
        except Exception as error:
            return [ProbedImage(error=f"cannot list the TIFF's images ({type(error).__name__}: {one_line(error)})")]
        series_list = [(i, s) for i, s in enumerate(all_series) if not _is_associated(s)]
        if not series_list:
            return [ProbedImage(error="the TIFF holds no image series")]
        prefix_needed = len(series_list) > 1
        found: list[ProbedImage] = []
        for number, series in series_list:
            prefix = (("series", number),) if prefix_needed else ()
            try:
                plan = _tiff_plan(series)
                check_image(plan.hw, plan.channels, series.dtype)
                damage = _tiff_data_error(series, file_size)
                if damage:
                    raise ValueError(damage)
                if series.dataoffset is None:  # not memory-mappable: read by strips/tiles
                    chunk = tuple(series.keyframe.chunks)
                    chunk_pixels = int(np.prod(chunk[:2]))
                    if chunk_pixels > MAX_IN_MEMORY_PIXELS:
                        raise ValueError(
                            f"stored as one compressed strip/tile of {chunk_pixels:,} pixels, too large to read in pieces; "
                            "re-save it tiled (e.g. tifffile.imwrite(..., tile=(512, 512)))"
                        )
            except Exception as error:
                found.append(ProbedImage(parts=prefix, selector={"series": number}, error=f"{one_line(error)}"))
                continue
            pixel_size = tiff_pixel_size(tif, number)
            names = tiff_channel_names(tif, number, plan.channels)
            for index in plan.planes():
                parts = prefix + tuple((name, value) for name, value in index.items() if plan.shape[plan.names.index(name)] > 1)
                found.append(
                    ProbedImage(
                        parts=parts,
                        selector={"series": number, "axes": list(plan.names), "index": index},
                        shape=plan.hw,
                        channels=plan.channels,
                        dtype=str(native(series.dtype)),
                        pixel_size_um=pixel_size,
                        channel_names=names,
                    )
                )
        return found


def open_tiff(path: str, selector: dict, source: str) -> ImageSource:
    """Open one image of a TIFF file for region reads.

    Args:
        path: the file (local path or object-store URL).
        selector: ``{"series", "axes", "index"}``, as :func:`probe_tiff` found the image.
        source: the image's name in messages.

    Raises:
        ImageReadError: the file is no longer a readable TIFF, or its axes changed.
    """
    import zarr

    location = to_location(path)
    try:
        tif = _open_tiff_file(location)
    except Exception as error:
        raise ImageReadError(f"{source}: not a readable TIFF ({type(error).__name__}: {one_line(error)})") from None
    try:
        series = tif.series[int(selector["series"])]
        plan = _tiff_plan(series)
        if list(plan.names) != list(selector["axes"]):
            raise ImageReadError(f"{source}: axes are now {plan.names}, discovery saw {selector['axes']}; discover again")
        levels: list[Any] = []
        for number, level in enumerate(series.levels):
            if number == 0 and series.dataoffset is not None and getattr(series, "transform", None) is None and not is_remote(location):
                # uncompressed and contiguous: map it, no decoding at all
                dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
                levels.append(np.memmap(path, dtype=dtype, mode="r", offset=series.dataoffset, shape=tuple(series.shape)))
                continue
            try:
                levels.append(zarr.open_array(series.aszarr(level=number), mode="r"))
            except Exception:
                if number == 0:
                    if int(np.prod(level.shape)) > MAX_IN_MEMORY_PIXELS:
                        raise
                    levels.append(level.asarray())  # odd layouts tifffile's zarr store refuses: small enough to decode
        return AxesSource(levels, plan, selector["index"], source, on_close=tif.close)
    except BaseException:
        tif.close()
        raise


class _CappedReader(io.BufferedReader):
    """A local file whose ``read(n)`` never asks for more than what is left in it.

    A damaged TIFF can declare a strip of 2 GB in a 2 kB file; tifffile then calls
    ``read(2 GB)``, and a plain file object allocates the 2 GB before finding 2 kB to read.
    (fsspec files, for object stores, already cap their reads this way.)
    """

    def __init__(self, path: str | Path) -> None:
        super().__init__(io.FileIO(path, "rb"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = min(size, max(0, self._size - self.tell()))
        return super().read(size)


def _ifd_chain_error(stream: Any) -> str | None:
    """Why the chain of IFDs (pages) of a TIFF cannot be followed, or None.

    tifffile follows the next-IFD offsets without remembering where it has been: an IFD that
    points back to itself or to an earlier one (one damaged offset) makes it list pages for
    ever. We walk the chain first and refuse a loop. Other damage is left to tifffile's own
    messages. NDPI files (8-byte next-IFD offsets in a classic TIFF) are not checked.
    """
    stream.seek(0)
    head = stream.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 16:
        return None
    version = struct.unpack(order + "H", head[2:4])[0]
    if version == 42:
        count_format, count_size, tag_size, offset_format, offset_size = "H", 2, 12, "I", 4
        offset = struct.unpack(order + "I", head[4:8])[0]
    elif version == 43:
        count_format, count_size, tag_size, offset_format, offset_size = "Q", 8, 20, "Q", 8
        offset = struct.unpack(order + "Q", head[8:16])[0]
    else:
        return None
    seen: set[int] = set()
    while offset:
        if offset in seen:
            return f"its chain of pages (IFDs) loops back to offset {offset} after {len(seen)} page(s): the file is damaged"
        seen.add(offset)
        stream.seek(offset)
        raw = stream.read(count_size)
        if len(raw) < count_size:
            break
        n_tags = struct.unpack(order + count_format, raw)[0]
        if n_tags > 4096:  # tifffile stops there itself ("suspicious number of tags")
            break
        if len(seen) == 1 and version == 42:
            tags = stream.read(n_tags * tag_size)
            if any(struct.unpack(order + "H", tags[i : i + 2])[0] == 65420 for i in range(0, len(tags) - 1, tag_size)):
                break  # Hamamatsu NDPI: offsets are 8 bytes, tifffile knows
        stream.seek(offset + count_size + n_tags * tag_size)
        raw = stream.read(offset_size)
        if len(raw) < offset_size:
            break
        offset = struct.unpack(order + offset_format, raw)[0]
    return None


def _open_tiff_file(path: Location) -> Any:
    """A tifffile.TiffFile of a local file or an object-store object (closing it closes the stream).

    Raises:
        ValueError: the chain of pages loops (:func:`_ifd_chain_error`).
    """
    import tifffile

    stream = open_binary(path) if is_remote(path) else _CappedReader(path)
    try:
        loop = _ifd_chain_error(stream)
        if loop:
            raise ValueError(loop)
        stream.seek(0)
        tif = tifffile.TiffFile(stream, name=path.name)
    except BaseException:
        stream.close()
        raise
    close_tif = tif.close

    def close() -> None:  # tifffile leaves a stream it was given open
        close_tif()
        stream.close()

    tif.close = close
    return tif


def _is_associated(series: Any) -> bool:
    """A whole-slide file's label / macro / thumbnail picture (not the specimen)."""
    return str(getattr(series, "kind", "")).lower() in WSI_KINDS and str(series.name).lower() in ASSOCIATED_SERIES


def _tiff_plan(series: Any) -> AxesPlan:
    return plan_axes(tuple(series.axes.lower()), tuple(series.shape))


def _tiff_data_error(series: Any, file_size: int) -> str | None:
    """Why a TIFF series' pixel data cannot be there (checked from the header alone), or None:
    uncompressed data that would end past the end of the file, no strip/tile offsets at all,
    or more pixels than a file of this size can hold compressed (a decompression bomb)."""
    nbytes = int(series.nbytes)
    if series.dataoffset is not None:
        end = int(series.dataoffset) + nbytes
        if end > file_size:
            return (
                f"declares {nbytes:,} bytes of uncompressed pixel data, ending past the end of the {file_size:,}-byte file: "
                "a truncated file or a damaged header"
            )
        return None
    offsets = getattr(series.keyframe, "dataoffsets", ())
    if len(offsets) == 0 or not any(offsets):
        return "no strip or tile offsets (missing or unreadable tags): no pixel data to read; the file is damaged"
    if nbytes > CHECK_BYTES and nbytes > MAX_TIFF_RATIO * file_size:
        return (
            f"declares {nbytes:,} bytes of pixels in a file of {file_size:,} bytes (more than {MAX_TIFF_RATIO:,}:1): "
            "a damaged header or a decompression bomb"
        )
    return None


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
    images = [element for element in root.iter() if _local(element.tag) == "Image"]
    if not images:
        return None
    image = images[min(image_index, len(images) - 1)]
    pixels = next((element for element in image.iter() if _local(element.tag) == "Pixels"), None)
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


def tiff_channel_names(tif: Any, series_index: int, channels: int) -> tuple[str, ...] | None:
    """Channel names of series ``series_index`` of an open ``tifffile.TiffFile`` with ``channels``
    channels, from its OME-XML; None when it has none."""
    if channels < 2:
        return None
    try:
        if tif.is_ome and tif.ome_metadata:
            return ome_xml_channel_names(tif.ome_metadata, series_index, channels)
    except Exception as error:  # metadata is a bonus: damaged XML never stops a probe
        log.debug("channel names of %s unreadable: %s", getattr(tif, "filename", tif), error)
    return None


def ome_xml_channel_names(xml: str, image_index: int, channels: int) -> tuple[str, ...] | None:
    """Names of the ``channels`` channels of the ``image_index``-th OME ``Image`` (``""`` where a
    ``Channel`` has no ``Name``), or None when the XML has no such image or its ``Channel``
    elements are not one per channel (e.g. one RGB ``Channel`` of ``SamplesPerPixel="3"``)."""
    root = ElementTree.fromstring(xml)
    images = [element for element in root.iter() if _local(element.tag) == "Image"]
    if image_index >= len(images):
        return None
    pixels = next((element for element in images[image_index] if _local(element.tag) == "Pixels"), None)
    if pixels is None:
        return None
    found = [element for element in pixels if _local(element.tag) == "Channel"]
    if len(found) != channels:
        return None
    names = tuple((element.get("Name") or "").strip() for element in found)
    return names if any(names) else None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]
