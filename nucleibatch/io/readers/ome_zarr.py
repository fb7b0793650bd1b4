"""Zarr: zarr v2/v3 arrays, OME-Zarr (NGFF 0.1-0.5) images and plates of them.

Probed from the metadata (axes, pixel size, channel names, plate -> well -> field positions) and
read lazily with zarr; OME-Zarr multiscale levels are used for
:meth:`~nucleibatch.io.readers.source.ImageSource.overview`. A plain array without axis names is
read when its shape leaves no doubt (:func:`~nucleibatch.io.readers.axes.guess_axes`). OME-Zarr
label images are outputs, never inputs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from ...errors import ImageReadError
from ..location import Location, to_location, zarr_store
from .axes import CHANNEL_AXES, guess_axes, plan_axes
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

# A zarr array of more than CHECK_BYTES with fewer than 1 in MAX_UNWRITTEN_CHUNKS of its
# chunks stored is refused: a few bytes of zarr.json declaring a huge image of fill values
# (unfinished or damaged store, or a bomb that would keep a worker busy for hours). Real
# images store nearly every chunk.
MAX_UNWRITTEN_CHUNKS = 100


def probe_zarr(path: Location) -> list[ProbedImage]:
    """The images of a zarr store, from its metadata: one per plane of each array or OME-Zarr
    multiscale image in it (plate fields carry their position), or one with ``error``."""
    import zarr

    if not any((path / name).is_file() for name in ("zarr.json", ".zgroup", ".zarray")):
        return [ProbedImage(error="not a zarr store: no zarr.json, .zgroup or .zarray in the folder")]
    try:
        root = zarr.open(zarr_store(path, read_only=True), mode="r")
    except Exception as error:
        return [ProbedImage(error=f"not a readable zarr store ({type(error).__name__}: {one_line(error)})")]
    found: list[ProbedImage] = []
    plates: dict[str, dict[str, list[str]]] = {}
    _visit_zarr(root, "", found, plates)
    if not found:
        return [ProbedImage(error="the zarr store holds no array")]
    return [replace(image, plate=plate_position(image.node, plates)) for image in found]


def open_zarr(path: str, selector: dict, source: str) -> ImageSource:
    """Open one image of a zarr store for region reads.

    Args:
        path: the store (local folder or object-store URL).
        selector: ``{"node", "levels", "axes", "index"}``, as :func:`probe_zarr` found the image.
        source: the image's name in messages.

    Raises:
        ImageReadError: the array or one of its levels cannot be opened.
    """
    import zarr

    try:
        root = zarr.open(zarr_store(to_location(path), read_only=True), mode="r")
        node = root[selector["node"]] if selector["node"] else root
        levels = [node if level_path == "" else node[level_path] for level_path in selector["levels"]]
    except Exception as error:
        raise ImageReadError(f"{source}: cannot open the zarr array ({type(error).__name__}: {one_line(error)})") from None
    plan = plan_axes(selector["axes"], levels[0].shape)
    return AxesSource(levels, plan, selector["index"], source)


def _visit_zarr(node: Any, node_path: str, found: list[ProbedImage], plates: dict[str, dict[str, list[str]]]) -> None:
    """Add the images at and under ``node`` (depth first, members in name order) to ``found``, and
    the wells of the plates among them to ``plates`` (plate group path -> well path -> field paths)."""
    import zarr

    if isinstance(node, zarr.Array):
        found.extend(_zarr_image(node_path, [node], [""], None))
        return
    try:
        attrs = node.attrs.asdict()
        plate = _ome_attrs(attrs, "plate")
        if plate is not None:
            plates[node_path] = _plate_wells(node, plate)
        multiscale = _ome_multiscales(attrs)
        if multiscale is not None:
            paths = [str(d["path"]) for d in multiscale.get("datasets", [])]
            if not paths:
                raise ValueError("OME-Zarr multiscales without datasets")
            levels = [node[p] for p in paths]
            if not all(isinstance(level, zarr.Array) for level in levels):
                raise ValueError("an OME-Zarr dataset path is not an array")
            found.extend(_zarr_image(node_path, levels, paths, _ome_axis_names(multiscale, levels[0].ndim), ome_zarr_pixel_size(multiscale), attrs))
            return
        members = sorted(node.members(), key=lambda m: m[0])
    except Exception as error:
        found.append(ProbedImage(node=node_path, error=f"cannot read zarr group ({type(error).__name__}: {one_line(error)})"))
        return
    for name, child in members:
        if name.startswith(".") or name == "labels":  # OME-Zarr label images are outputs, not inputs
            continue
        _visit_zarr(child, f"{node_path}/{name}" if node_path else name, found, plates)


def _zarr_image(
    node_path: str, levels: list[Any], level_paths: list[str], names: tuple[str, ...] | None, pixel_size_um: float | None = None, attrs: dict | None = None
) -> list[ProbedImage]:
    """The images of one zarr array (or OME-Zarr multiscale image, ``attrs`` its group's attributes)."""
    base = levels[0]
    try:
        if names is None:
            names = _array_axis_names(base) or guess_axes(base.shape)
        plan = plan_axes(names, base.shape)
        check_image(plan.hw, plan.channels, base.dtype)
        chunk_elements = int(np.prod(base.chunks, dtype=np.float64))
        if chunk_elements > MAX_IN_MEMORY_PIXELS:  # a read decodes whole chunks
            raise ValueError(
                f"stored in chunks of {chunk_elements:,} values (chunk shape {tuple(base.chunks)}), too large to read in pieces; "
                "rewrite it with smaller chunks (e.g. 1024 x 1024)"
            )
        if base.nbytes > CHECK_BYTES:
            written, total = base.nchunks_initialized, base.nchunks
            if written * MAX_UNWRITTEN_CHUNKS < total:
                raise ValueError(
                    f"declares {base.nbytes:,} bytes of pixels in {total:,} chunks but only {written:,} are stored: "
                    "an unfinished or damaged store (every missing chunk reads as the fill value)"
                )
    except Exception as error:
        return [ProbedImage(node=node_path, error=one_line(error))]
    channel_names = ome_zarr_channel_names(attrs, plan.channels) if attrs else None
    found = []
    for index in plan.planes():
        parts = tuple((name, value) for name, value in index.items() if plan.shape[plan.names.index(name)] > 1)
        selector = {"node": node_path, "levels": level_paths, "axes": list(plan.names), "index": index}
        found.append(
            ProbedImage(
                parts=parts, node=node_path, selector=selector, shape=plan.hw, channels=plan.channels, dtype=str(native(base.dtype)),
                pixel_size_um=pixel_size_um, channel_names=channel_names,
            )
        )  # fmt: skip
    return found


def _ome_multiscales(attrs: dict) -> dict | None:
    """The first OME-Zarr multiscales entry of a group's attributes (NGFF 0.1-0.4 or 0.5)."""
    ome = attrs.get("ome")
    multiscales = ome.get("multiscales") if isinstance(ome, dict) else attrs.get("multiscales")
    if isinstance(multiscales, list) and multiscales and isinstance(multiscales[0], dict):
        return multiscales[0]
    return None


def _array_axis_names(array: Any) -> tuple[str, ...] | None:
    """Axis names a zarr array carries (v3 dimension_names, or xarray's _ARRAY_DIMENSIONS)."""
    names = getattr(array.metadata, "dimension_names", None)
    if not names:
        names = array.attrs.get("_ARRAY_DIMENSIONS")
    if names and len(names) == array.ndim and all(isinstance(n, str) and n for n in names):
        return tuple(n.lower() for n in names)
    return None


def _ome_axis_names(multiscale: dict, ndim: int) -> tuple[str, ...] | None:
    axes = multiscale.get("axes")
    if axes is None:
        return ("t", "c", "z", "y", "x") if ndim == 5 else None  # NGFF 0.1/0.2: always 5-D tczyx
    names = []
    for axis in axes:
        if isinstance(axis, dict):
            name = str(axis.get("name", "")).lower()
            names.append("c" if axis.get("type") == "channel" and name not in CHANNEL_AXES else name)
        else:
            names.append(str(axis).lower())
    return tuple(names)


def _ome_attrs(attrs: dict, key: str) -> Any:
    """An OME-Zarr attribute (``plate``, ``well``...) of NGFF 0.5 (under ``ome``) or 0.1-0.4."""
    ome = attrs.get("ome")
    return ome.get(key) if isinstance(ome, dict) and key in ome else attrs.get(key)


def _plate_wells(node: Any, plate: Any) -> dict[str, list[str]]:
    """The wells of an NGFF plate group and the field paths each well's metadata lists
    (``{"B/2": ["0", "1"]}``); wells or fields whose metadata is missing or malformed are left out
    (their images are then ordinary images of the store)."""
    wells: dict[str, list[str]] = {}
    for well in plate.get("wells", []) if isinstance(plate, dict) else []:
        path = well.get("path") if isinstance(well, dict) else None
        if not isinstance(path, str) or path.count("/") != 1:
            continue
        try:
            metadata = _ome_attrs(node[path].attrs.asdict(), "well")
        except Exception:  # a well listed but absent: no field of it is found either
            continue
        images = metadata.get("images", []) if isinstance(metadata, dict) else []
        wells[path] = [str(image["path"]) for image in images if isinstance(image, dict) and "path" in image]
    return wells


def plate_position(node_path: str, plates: dict[str, dict[str, list[str]]]) -> tuple[str, str, str] | None:
    """``(plate, well, field)`` of the image at ``node_path`` when it is a field that a plate's
    well metadata lists (``plates``: plate group path -> well path -> field paths), else None."""
    for plate_path, wells in plates.items():
        prefix = f"{plate_path}/" if plate_path else ""
        if not node_path.startswith(prefix):
            continue
        parts = node_path[len(prefix) :].split("/")
        if len(parts) == 3 and parts[2] in wells.get(f"{parts[0]}/{parts[1]}", ()):
            return plate_path, f"{parts[0]}/{parts[1]}", parts[2]
    return None


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
