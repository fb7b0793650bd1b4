"""Channel names from file metadata: OME-XML ``Channel Name`` (OME-TIFF) and NGFF ``omero.channels[].label``.

Names are a bonus, like pixel sizes: unreadable or inconsistent metadata gives None (channels are
then known by index), never an error.
"""

from __future__ import annotations

import logging
from typing import Any
from xml.etree import ElementTree

log = logging.getLogger(__name__)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


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


def ome_zarr_channel_names(attrs: dict, channels: int) -> tuple[str, ...] | None:
    """``omero.channels[].label`` of an OME-Zarr image group's attributes (NGFF 0.5 under ``ome``,
    earlier versions at the top), when there is one entry per channel; else None."""
    if channels < 2:
        return None
    ome = attrs.get("ome")
    omero = (ome.get("omero") if isinstance(ome, dict) else None) or attrs.get("omero")
    entries = omero.get("channels") if isinstance(omero, dict) else None
    if not isinstance(entries, list) or len(entries) != channels:
        return None
    names = tuple(str(entry.get("label") or "").strip() if isinstance(entry, dict) else "" for entry in entries)
    return names if any(names) else None
