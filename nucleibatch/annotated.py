"""Annotated images for training and evaluation.

Four layouts are read, and several folders may be given:

* DSB 2018: ``ROOT/<id>/images/<id>.png`` with one binary PNG per nucleus in
  ``ROOT/<id>/masks/`` (ROOT may also be a single ``<id>`` folder);
* image/label pairs: ``ROOT/images/NAME.(png|tif)`` with ``ROOT/labels/NAME.(png|tif)``
  holding integer instance labels (0 = background);
* Cellpose pairs: ``ROOT/NAME.(png|tif)`` with ``ROOT/NAME_masks.(png|tif)`` (Cellpose's
  training layout) or ``ROOT/NAME_cp_masks.png`` (what Cellpose writes), integer labels;
* the OUT of ``nucleibatch segment``: each ok image's stored copy with its labels in
  ``masks.zarr`` (as corrected in napari, say): the annotation loop's way back into training.

Symbolic links are treated as ``segment`` treats them (:func:`nucleibatch.io.discover.linked_folder`):
a ROOT that is a link is followed, links to files are followed, links to folders inside ROOT
(a ``<id>`` sample, ``images/``, ``masks/``, ``labels/``) are not.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import BadAnnotationError, ImageReadError, UsageError
from .io.discover import followed_folder, linked_folder
from .io.readers import IMAGE_SUFFIXES, read_image_file
from .output.folder import MASKS, OutputFolder, label_path

log = logging.getLogger(__name__)
# Masks may share a few rim pixels (annotation jitter, seen in 3 of the 545 DSB images);
# an overlap above this fraction of the smaller mask is an annotation error.
MAX_OVERLAP_FRACTION = 0.1


@dataclass(frozen=True)
class AnnotatedSource:
    """Where one annotated image lives (cheap; nothing is read)."""

    image_id: str
    image_path: Path
    masks_dir: Path | None = None  # DSB layout: one PNG per nucleus
    label_path: Path | None = None  # pairs layouts: one label image
    store_path: str | None = None  # a segment OUT: the image's group in image_path (OUT/masks.zarr)
    pixel_size_um: float | None = None  # a segment OUT: the pixel size its run used (images.parquet)


@dataclass
class AnnotatedImage:
    """One annotated image in memory.

    image: ``(H, W)`` or ``(H, W, C)`` as stored; labels: ``(H, W)`` int32, 0 = background.
    """

    image_id: str
    image: np.ndarray
    labels: np.ndarray
    source: AnnotatedSource


def discover_annotated(roots: Sequence[str | Path]) -> list[AnnotatedSource]:
    """Find annotated images under each root (DSB or pairs layout), sorted by id.

    Raises:
        UsageError: a root does not exist or holds no annotated image in either layout.
    """
    sources: list[AnnotatedSource] = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            raise UsageError(f"{root}: not a folder; give a DSB-layout folder (<id>/images, <id>/masks) or one with images/ and labels/")
        folders = _subfolders(root)
        if MASKS in folders and OutputFolder(root).images.is_file():
            found = _discover_segment_output(root)
        elif "labels" in folders:
            found = _discover_pairs(folders)
        else:
            found = _discover_dsb(root, folders) or _discover_cellpose(root)
        if not found:
            links = sum(1 for p in root.iterdir() if p.is_symlink() and p.is_dir())
            unfollowed = (
                f"; its {links} symbolic link(s) to folders are not followed (nor by segment): give their targets as DATA, or copy them"
                if links
                else ""
            )
            raise UsageError(
                f"{root}: no annotated images found; expected <id>/images/<id>.png with <id>/masks/*.png, "
                f"images/NAME.png with labels/NAME.png, NAME.png with NAME_masks.png (Cellpose), "
                f"or the -o folder of a finished `nucleibatch segment` run{unfollowed}"
            )
        sources.extend(found)
    ids = [s.image_id for s in sources]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise UsageError(f"image ids occur in more than one folder: {duplicates[:5]}; give each folder once")
    return sorted(sources, key=lambda s: s.image_id)


def _subfolders(folder: Path) -> dict[str, Path]:
    """The folders in ``folder`` that discovery enters, by name: links to folders are left out (and logged)."""
    return {p.name: p for p in sorted(folder.iterdir()) if followed_folder(p)}


def _discover_dsb(root: Path, folders: dict[str, Path]) -> list[AnnotatedSource]:
    candidates = [root] if "images" in folders else [f for f in folders.values() if followed_folder(f / "images")]
    sources = []
    for folder in candidates:
        images = sorted(p for p in (folder / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            continue
        image_path = next((p for p in images if p.stem == folder.name), images[0])
        sources.append(AnnotatedSource(folder.name, image_path, masks_dir=folder / "masks"))
    return sources


def _discover_pairs(folders: dict[str, Path]) -> list[AnnotatedSource]:
    images_dir, labels_dir = folders.get("images"), folders["labels"]
    if images_dir is None:
        return []
    label_by_stem = {p.stem: p for p in labels_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    return [
        AnnotatedSource(p.stem, p, label_path=label_by_stem.get(p.stem))
        for p in sorted(images_dir.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]


# Cellpose's label files: NAME_masks.* (its training layout) and NAME_cp_masks.* (what it writes)
CELLPOSE_MASK_SUFFIXES = ("_cp_masks", "_masks")


def _discover_cellpose(root: Path) -> list[AnnotatedSource]:
    """``NAME.ext`` + ``NAME_masks.ext`` / ``NAME_cp_masks.ext`` files in ``root`` (not below it)."""
    files = [p for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    labels_by_stem = {}
    for path in files:
        for suffix in CELLPOSE_MASK_SUFFIXES:
            if path.stem.endswith(suffix):
                labels_by_stem.setdefault(path.stem[: -len(suffix)], path)
                break
    if not labels_by_stem:
        return []
    label_files = set(labels_by_stem.values())
    return [AnnotatedSource(p.stem, p, label_path=labels_by_stem.get(p.stem)) for p in files if p not in label_files]


def _discover_segment_output(root: Path) -> list[AnnotatedSource]:
    """The ok images of a segment OUT (``images.parquet``), read from ``masks.zarr``."""
    import pyarrow.parquet as pq

    out = OutputFolder(root)
    names = set(pq.read_schema(out.images).names)
    columns = ["image_id", "status", "store_path"] + (["pixel_size_um"] if "pixel_size_um" in names else [])
    rows = pq.read_table(out.images, columns=columns).to_pylist()
    return [
        AnnotatedSource(row["image_id"], out.masks, store_path=row["store_path"], pixel_size_um=row.get("pixel_size_um"))
        for row in rows
        if row["status"] == "ok"
    ]


def link_dsb_sample(sample: str | Path, into: str | Path) -> Path:
    """Make ``into/<id>``, a DSB-layout sample of symbolic links to the files of ``sample``
    (``<id>/images/*``, ``<id>/masks/*``): a subset of a DSB folder without copying images.
    Discovery follows links to files but not to folders, so the folders are real ones here.
    Returns the new sample folder."""
    sample = Path(sample).resolve()
    target = Path(into) / sample.name
    if target.is_symlink():  # a link to the folder itself (what discovery would not follow)
        target.unlink()
    for part in ("images", "masks"):
        if (sample / part).is_dir():
            (target / part).mkdir(parents=True, exist_ok=True)
            for file in sorted((sample / part).iterdir()):
                link = target / part / file.name
                if not link.is_symlink():
                    link.symlink_to(file)
    return target


def load_annotated(source: AnnotatedSource) -> AnnotatedImage:
    """Read one annotated image and build its instance labels.

    Raises:
        BadAnnotationError: naming the file and the problem (unreadable image or mask,
            mask of the wrong size, no masks, overlapping masks, non-integer labels).
    """
    if source.store_path is not None:
        return _load_from_segment_output(source)
    try:
        image = read_image_file(source.image_path)
    except ImageReadError as error:
        raise BadAnnotationError(str(error)) from None
    if image.ndim not in (2, 3):
        raise BadAnnotationError(f"{source.image_path}: expected a 2-D image, got shape {image.shape}")
    shape = image.shape[:2]
    if source.label_path is not None or source.masks_dir is None:
        labels = _labels_from_label_image(source, shape)
    else:
        labels = _labels_from_masks(source, shape)
    return AnnotatedImage(source.image_id, image, labels, source)


def _load_from_segment_output(source: AnnotatedSource) -> AnnotatedImage:
    """The stored image copy (level 0, ``(C, H, W)`` as ``(H, W)`` or ``(H, W, C)``) and its
    labels (level 0: where napari saves corrections) of one image of a segment OUT."""
    import zarr

    where = f"{source.image_path}/{source.store_path}"
    try:
        group = zarr.open_group(source.image_path, mode="r")[source.store_path]
        image_array, label_array = group["0"], group[label_path(0)]
        if int(image_array.nchunks_initialized) == 0:
            raise BadAnnotationError(f"{where}: no image copy (the run used --no-store-image); segment the images again without it to train on them")
        image, labels = np.asarray(image_array[:]), np.asarray(label_array[:])
    except BadAnnotationError:
        raise
    except Exception as error:  # a damaged or missing node, a chunk that does not decode
        raise BadAnnotationError(f"{where}: cannot read the image or its labels ({type(error).__name__}: {error}); `nucleibatch verify` checks the folder") from None
    if labels.shape != image.shape[1:]:
        raise BadAnnotationError(f"{where}: labels of shape {labels.shape} for an image of {image.shape[1:]}")
    image = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
    if labels.max(initial=0) > np.iinfo(np.int32).max:
        raise BadAnnotationError(f"{where}: label values above 2^31 - 1; renumber the labels")
    return AnnotatedImage(source.image_id, image, labels.astype(np.int32), source)


def annotated_channel_names(source: AnnotatedSource, channels: int) -> tuple[str, ...] | None:
    """The channel names of an annotated image with ``channels`` channels (``--channel NAME``):
    a segment OUT's ``omero`` labels, or an image file's metadata (OME-TIFF); None when unnamed."""
    if channels < 2:
        return None
    if source.store_path is not None:
        import zarr

        from .io.readers.ome_zarr import ome_zarr_channel_names

        try:
            attrs = zarr.open_group(source.image_path, mode="r")[source.store_path].attrs.asdict()
        except Exception:  # names are a bonus; the image itself was read
            return None
        return ome_zarr_channel_names(attrs, channels)
    from .io.readers import probe

    found = probe(source.image_path, "plain")  # the file's first bytes choose the reader
    return found[0].channel_names if found and found[0].channels == channels else None


def _labels_from_masks(source: AnnotatedSource, shape: tuple[int, int]) -> np.ndarray:
    masks_dir = source.masks_dir
    if linked_folder(masks_dir):
        raise BadAnnotationError(f"{source.image_path}: its masks folder {masks_dir} is a symbolic link, not followed (as segment does not follow them); copy the masks there")
    mask_paths = sorted(p for p in masks_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if masks_dir.is_dir() else []
    if not mask_paths:
        raise BadAnnotationError(f"{source.image_path}: image without masks (no mask PNG in {masks_dir})")
    labels = np.zeros(shape, dtype=np.int32)
    for index, mask_path in enumerate(mask_paths, start=1):
        try:
            mask = read_image_file(mask_path)
        except ImageReadError as error:
            raise BadAnnotationError(f"unreadable mask: {error}") from None
        if mask.ndim == 3:
            mask = mask[..., 0]
        if mask.shape != shape:
            raise BadAnnotationError(f"{mask_path}: mask of the wrong size {mask.shape}, the image is {shape}")
        on = mask > 0
        if not on.any():
            continue  # an empty mask adds no nucleus; harmless
        overlap = on & (labels > 0)
        if overlap.any():
            other = int(np.bincount(labels[overlap]).argmax())
            smaller = min(int(on.sum()), int((labels == other).sum()))
            if overlap.sum() > MAX_OVERLAP_FRACTION * smaller:
                raise BadAnnotationError(
                    f"{mask_path}: overlaps mask {mask_paths[other - 1].name} on {int(overlap.sum())} pixels; "
                    "nuclei masks must not overlap (fix the masks or pass --skip-bad)"
                )
            # a rim pixel drawn twice is annotation jitter: it stays with the first mask
            on &= labels == 0
        labels[on] = index
    return labels


def _labels_from_label_image(source: AnnotatedSource, shape: tuple[int, int]) -> np.ndarray:
    if source.label_path is None:
        raise BadAnnotationError(f"{source.image_path}: image without a label image (labels/NAME.png in the images/ + labels/ layout, NAME_masks.png beside it in the Cellpose layout)")
    try:
        labels = read_image_file(source.label_path)
    except ImageReadError as error:
        raise BadAnnotationError(f"unreadable label image: {error}") from None
    if labels.ndim == 3 and labels.shape[2] in (3, 4) and np.ptp(labels[..., :3], axis=2).max() == 0:
        labels = labels[..., 0]
    if labels.ndim != 2:
        raise BadAnnotationError(f"{source.label_path}: label image must be single-channel integers, got shape {labels.shape}")
    if labels.shape != shape:
        raise BadAnnotationError(f"{source.label_path}: label image of the wrong size {labels.shape}, the image is {shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise BadAnnotationError(f"{source.label_path}: labels must be integers, got {labels.dtype}")
    if labels.min() < 0:
        raise BadAnnotationError(f"{source.label_path}: negative label values")
    return labels.astype(np.int32)


def iter_annotated(sources: Sequence[AnnotatedSource], skip_bad: bool = False) -> Iterator[AnnotatedImage]:
    """Load sources in order; a bad one raises, or is skipped with a warning when ``skip_bad``."""
    for source in sources:
        try:
            yield load_annotated(source)
        except BadAnnotationError as error:
            if not skip_bad:
                raise BadAnnotationError(f"{error} (pass --skip-bad to skip such images with a warning)") from None
            log.warning("skipping %s: %s", source.image_id, error)
