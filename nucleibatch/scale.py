"""Physical and nuclear scale: how much an image is resampled for a network (pure functions).

A bundle records the scale it was trained at: the median nucleus diameter in its pixels, and the
pixel size of its training data where known. An image is resampled by ``scale`` (> 1 enlarges)
so that its nuclei have the size the network saw in training:

* from pixel sizes, when both are known: ``scale = image_pixel_size / model_pixel_size``;
* from diameters, when the user gives the image's nucleus diameter (``--diameter PX``):
  ``scale = model_diameter / image_diameter``; when it is estimated (``--diameter auto``), most of
  the way there in log scale, ``scale = (model_diameter / estimate) ** AUTO_PULL``: a bundle
  trained at its data's own magnifications knows its image types at their native sizes, and
  pulling every image all the way to one diameter costs accuracy (the 54 DSB validation images
  upscaled 2x, the plain command with ``--diameter auto``, docs/performance.md: pulled 0.35, 0.5,
  0.65, 0.8 and 1 of the way, mAP 0.6006, 0.6050, 0.6068, 0.6097, 0.6026; as they are, without
  auto: 0.6351);
* else 1 (the image is taken to be at the model's scale).
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .errors import UsageError

log = logging.getLogger(__name__)

# a resampling this close to 1 is skipped: it would cost a pass and move outlines by < 1 px
SCALE_TOLERANCE = 0.03
# the most an image is resampled by (beyond, something is wrong with its metadata or --diameter)
MAX_SCALE = 8.0
# --diameter auto: how far (in log scale) an image's estimated diameter is brought to the model's
# (the best of 5 on the DSB validation images upscaled 2x, see above)
AUTO_PULL = 0.8


def check_diameter(value: str | float | None) -> float | str | None:
    """``--diameter``: None, ``"auto"``, or a positive number of pixels (returned as a float).

    Raises:
        UsageError: anything else.
    """
    if value is None or value == "auto":
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"--diameter must be a number of pixels or auto, got {value!r}") from None
    if not (math.isfinite(number) and number > 0):
        raise UsageError(f"--diameter must be a positive number of pixels, got {value!r}")
    return number


def check_pixel_size(value: float | None) -> float | None:
    """``--pixel-size``: None or a positive number of micrometres.

    Raises:
        UsageError: anything else.
    """
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UsageError(f"--pixel-size must be a positive number of micrometres, got {value!r}")
    return value


def median_diameter(areas: np.ndarray) -> float:
    """Median equivalent diameter ``sqrt(4 area / pi)`` of objects of ``areas`` (pixels, > 0
    counted); NaN when there is none."""
    areas = np.asarray(areas, dtype=np.float64)
    areas = areas[areas > 0]
    if areas.size == 0:
        return float("nan")
    return float(np.median(np.sqrt(4.0 * areas / np.pi)))


def resample_scale(
    model_scale: dict,
    pixel_size_um: float | None = None,
    diameter_px: float | None = None,
    pull: float = 1.0,
) -> float:
    """The factor by which an image is resampled for a network (1: not at all).

    Args:
        model_scale: the bundle's ``scale`` (``nucleus_diameter_px``, ``pixel_size_um``; either None).
        pixel_size_um: the image's pixel size, micrometres (None: unknown).
        diameter_px: the image's nucleus diameter in its own pixels (``--diameter``, or the
            estimate of ``--diameter auto``); it wins over the pixel size.
        pull: the fraction (in log scale) of the way from the image's diameter to the model's
            that the scale goes (1: all the way; :data:`AUTO_PULL` for estimates).

    Returns:
        ``scale`` > 0: the network sees the image enlarged ``scale`` times; 1 within
        :data:`SCALE_TOLERANCE`, and 1 (with a warning) beyond ``[1 / MAX_SCALE, MAX_SCALE]``: such
        a factor says that the metadata or the diameter is wrong, not that the image needs it.
    """
    scale = 1.0
    model_diameter = model_scale.get("nucleus_diameter_px")
    model_pixel = model_scale.get("pixel_size_um")
    if diameter_px is not None and model_diameter:
        scale = (float(model_diameter) / float(diameter_px)) ** pull
    elif pixel_size_um is not None and model_pixel:
        scale = float(pixel_size_um) / float(model_pixel)
    if not math.isfinite(scale) or scale <= 0 or abs(scale - 1.0) <= SCALE_TOLERANCE:
        return 1.0
    if not 1.0 / MAX_SCALE <= scale <= MAX_SCALE:
        log.warning(
            "resampling by %.3g for a model trained at %s (image: %s um/px, diameter %s px) is beyond %g: "
            "not resampled; check the file's pixel size, or give --pixel-size / --diameter", scale, model_scale, pixel_size_um, diameter_px, MAX_SCALE
        )  # fmt: skip
        return 1.0
    return float(scale)


def scaled_shape(shape: tuple[int, int], scale: float) -> tuple[int, int]:
    """The shape of an ``(H, W)`` region resampled by ``scale`` (at least 1 x 1)."""
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))



def network_box(box: tuple[int, int, int, int], scale: float, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box of a region resampled by ``scale`` (of shape ``shape``) whose pixels
    :func:`from_network_scale` needs for the box ``(y0, y1, x0, x1)`` of the region: the box scaled,
    grown to whole pixels, by one for the interpolation and by the reach of the smoothing that
    shrinking back applies (4 sigma), inside ``shape``."""
    y0, y1, x0, x1 = box
    grow = 1 + (math.ceil(4 * _shrink_sigma(scale)) if scale > 1.0 else 0)
    return (
        max(0, math.floor(y0 * scale) - grow),
        min(shape[0], math.ceil(y1 * scale) + grow),
        max(0, math.floor(x0 * scale) - grow),
        min(shape[1], math.ceil(x1 * scale) + grow),
    )


def _shrink_sigma(factor: float) -> float:
    """The Gaussian smoothing (pixels of the larger grid) before shrinking by ``factor`` > 1: scikit-image's
    anti-aliasing choice, ``(factor - 1) / 2``."""
    return (factor - 1.0) / 2.0


def to_network_scale(image: np.ndarray, scale: float) -> np.ndarray:
    """An image ``(H, W)`` float32 resampled by ``scale`` to :func:`scaled_shape`: the pixel centres
    of both grids on the same positions (pixel ``j`` of the result samples ``(j + 0.5) / scale - 0.5``),
    bilinear, smoothed first when shrinking (no aliasing). ``(h, w)`` float32."""
    if scale == 1.0:
        return image
    shape = scaled_shape(image.shape, scale)
    if scale < 1.0:
        from scipy import ndimage as ndi

        image = ndi.gaussian_filter(image.astype(np.float32, copy=False), _shrink_sigma(1.0 / scale), mode="nearest")
    out = image.astype(np.float32, copy=False)
    for axis, size in enumerate(shape):
        out = _interpolate(out, axis + out.ndim - 2, (np.arange(size) + 0.5) / scale - 0.5)
    return out


def from_network_scale(array: np.ndarray, scale: float, origin: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """Back to the input's pixels: ``array`` ``(K, h', w')`` holds values of a region resampled by
    ``scale`` (:func:`to_network_scale`) from its pixel ``origin`` = ``(y, x)`` on; returns them at
    the region's pixels of ``box`` = ``(y0, y1, x0, x1)``: ``(K, y1 - y0, x1 - x0)``, bilinear,
    smoothed first when shrinking, in the dtype of ``array`` (float16 or float32)."""
    y0, y1, x0, x1 = box
    out = array.astype(np.float32, copy=False)
    if scale > 1.0:
        from scipy import ndimage as ndi

        out = ndi.gaussian_filter(out, (0.0, _shrink_sigma(scale), _shrink_sigma(scale)), mode="nearest")
    out = _interpolate(out, 1, (np.arange(y0, y1) + 0.5) * scale - 0.5 - origin[0])
    out = _interpolate(out, 2, (np.arange(x0, x1) + 0.5) * scale - 0.5 - origin[1])
    return out.astype(array.dtype, copy=False)


def _interpolate(array: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``array`` along ``axis`` at fractional ``positions`` (edge values
    beyond the ends): float32."""
    size = array.shape[axis]
    positions = np.clip(positions, 0.0, size - 1)
    below = np.floor(positions).astype(np.intp)
    above = np.minimum(below + 1, size - 1)
    weight = (positions - below).astype(np.float32)
    shape = [1] * array.ndim
    shape[axis] = -1
    weight = weight.reshape(shape)
    low = np.take(array, below, axis=axis)
    high = np.take(array, above, axis=axis)
    low *= 1.0 - weight
    high *= weight
    low += high
    return low.astype(np.float32, copy=False)
