"""Annotated images for training and evaluation.

Two layouts are read, and several folders may be given:

* DSB 2018: ``ROOT/<id>/images/<id>.png`` with one binary PNG per nucleus in
  ``ROOT/<id>/masks/`` (ROOT may also be a single ``<id>`` folder);
* image/label pairs: ``ROOT/images/NAME.(png|tif)`` with ``ROOT/labels/NAME.(png|tif)``
  holding integer instance labels (0 = background).

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

from ..errors import BadAnnotationError, ImageReadError, UsageError
from .discover import followed_folder, linked_folder
from .imagefile import IMAGE_SUFFIXES, read_image_file

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
    label_path: Path | None = None  # pairs layout: one label image


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
        found = _discover_pairs(folders) if "labels" in folders else _discover_dsb(root, folders)
        if not found:
            links = sum(1 for p in root.iterdir() if p.is_symlink() and p.is_dir())
            unfollowed = (
                f"; its {links} symbolic link(s) to folders are not followed (nor by segment): give their targets as DATA, or copy them"
                if links
                else ""
            )
            raise UsageError(
                f"{root}: no annotated images found; expected <id>/images/<id>.png with <id>/masks/*.png, "
                f"or images/NAME.png with labels/NAME.png{unfollowed}"
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
        raise BadAnnotationError(f"{source.image_path}: image without a label image of the same name in labels/")
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
