"""Lazy region readers for every input kind, and the probes that discovery uses.

One module per format family: :mod:`.plain` (PNG / JPEG / BMP / GIF, decoded whole),
:mod:`.tiff` (TIFF, OME-TIFF, whole-slide TIFFs: tiled, pyramidal, read lazily) and
:mod:`.ome_zarr` (zarr arrays, OME-Zarr images and plates, read lazily). :mod:`.axes` is the rule
by which an N-D array becomes 2-D images with channels (docs/inputs.md), :mod:`.source` the
:class:`ImageSource` every reader gives, and :mod:`.dispatch` picks the reader.

Sources hold open files: they cannot be pickled. Send discovery's records to workers and call
:func:`open_source` there.
"""

from .axes import MAX_CHANNELS, guess_axes, plan_axes
from .dispatch import file_pixel_size, open_source, probe
from .files import IMAGE_SUFFIXES, PIL_SUFFIXES, printable
from .plain import forget_decoded_images, read_image_file
from .source import MAX_IMAGE_PIXELS, MIN_SIDE, ArraySource, ImageSource, ProbedImage

__all__ = [
    "IMAGE_SUFFIXES", "MAX_CHANNELS", "MAX_IMAGE_PIXELS", "MIN_SIDE", "PIL_SUFFIXES", "ArraySource", "ImageSource",
    "ProbedImage", "file_pixel_size", "forget_decoded_images", "guess_axes", "open_source", "plan_axes", "printable", "probe",
    "read_image_file",
]  # fmt: skip
