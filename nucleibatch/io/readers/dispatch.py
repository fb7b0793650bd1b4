"""Which reader a file is read with: the input kind discovery gave it and, for files, its first bytes.

:func:`probe` lists the images of a file or zarr store (discovery turns them into records);
:func:`open_source` opens one of them for region reads, in the worker that reads it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Protocol

from ...errors import ImageReadError
from ..location import Location, to_location
from .files import one_line, read_head, sniff_format
from .ome_zarr import open_zarr, probe_zarr
from .plain import PlainSource, probe_plain
from .source import ImageSource, ProbedImage
from .tiff import open_tiff, probe_tiff


class ImageLocator(Protocol):
    """What :func:`open_source` needs of an image: where discovery found it and what it saw
    (:class:`nucleibatch.io.discover.ImageRecord` is one)."""

    @property
    def source(self) -> str: ...  # the image's name in messages
    @property
    def path(self) -> str: ...  # the file or zarr store
    @property
    def kind(self) -> str: ...  # "plain", "tiff" or "zarr"
    @property
    def selector(self) -> dict: ...  # the image inside the file (ProbedImage.selector)
    @property
    def shape(self) -> tuple[int, int] | None: ...
    @property
    def channels(self) -> int | None: ...
    @property
    def dtype(self) -> str | None: ...
    @property
    def error(self) -> str | None: ...  # why the image cannot be read, set at discovery


def probe(path: str | Path | Location, kind: str) -> list[ProbedImage]:
    """List the images of one file or zarr store from its header/metadata (no pixel decoding).

    Never raises for a bad file: problems come back as a :class:`ProbedImage` with ``error``.
    For files (``kind`` ``"plain"`` or ``"tiff"``) the first bytes choose the reader: a TIFF
    named ``.png`` is probed as a TIFF and its images carry ``kind="tiff"``.
    """
    try:
        path = to_location(path)
        if kind in ("plain", "tiff"):
            error, size, head = read_head(path)
            if error:
                return [ProbedImage(error=error)]
            form = sniff_format(head)
            actual = "tiff" if form == "tiff" else ("plain" if form is not None else kind)
            found = [probe_plain(path, size, head)] if actual == "plain" else probe_tiff(path, size)
            return [replace(image, kind=actual) for image in found] if actual != kind else found
        if kind == "zarr":
            return probe_zarr(path)
        return [ProbedImage(error=f"unknown input kind {kind!r}")]
    except Exception as error:  # a probe must not stop discovery
        return [ProbedImage(error=f"cannot read ({type(error).__name__}: {one_line(error)})")]


def open_source(record: ImageLocator) -> ImageSource:
    """Open the image a discovery record points at, for region reads.

    Raises:
        ImageReadError: one line naming the source and the reason (the record's own
            error, a file that vanished or changed since discovery, an undecodable file).
    """
    if record.error:
        raise ImageReadError(f"{record.source}: {record.error}")
    try:
        if record.kind == "plain":
            source: ImageSource = PlainSource(record.path, record.shape, record.channels, record.dtype, record.source)
        elif record.kind == "tiff":
            source = open_tiff(record.path, record.selector, record.source)
        elif record.kind == "zarr":
            source = open_zarr(record.path, record.selector, record.source)
        else:
            raise ImageReadError(f"{record.source}: unknown input kind {record.kind!r}; expected 'plain', 'tiff' or 'zarr'")
    except ImageReadError:
        raise
    except Exception as error:
        raise ImageReadError(f"{record.source}: cannot open ({type(error).__name__}: {one_line(error)})") from None
    found = (source.shape, source.channels, str(source.dtype))
    expected = (tuple(record.shape or ()), record.channels, record.dtype)
    if found != expected:
        source.close()
        raise ImageReadError(f"{record.source}: is now {found}, discovery saw {expected}; the file changed since discovery, discover again")
    return source


def file_pixel_size(path: str | Path | Location) -> float | None:
    """The pixel size (micrometres) that an image file's metadata declares for its first image,
    or None (unknown, or not a file we read metadata from: :mod:`nucleibatch.io.readers.pixelsize`)."""
    found = probe(path, "plain")  # the file's first bytes choose the reader
    return found[0].pixel_size_um if found else None
