"""Which kind of microscopy an image is, from its pixels (pure functions).

The modality is ``fluorescence`` (bright nuclei on a dark background: one channel, grey, several
channels or a colour composite) or ``brightfield`` (transmitted light: dark nuclei on a bright
background). A brightfield image in colour is ``stained`` (H&E, IHC: haematoxylin-stained nuclei
on a light, coloured background). Shipped bundles say which of the three image kinds they serve
(``serves`` in ``config.json``): ``fluorescence``, ``brightfield`` (unstained, grey) and ``stained``.

The rule reads colour and background, not the median alone, so that dense tissue with no white
background is still found to be stained brightfield:

1. an RGB(A) image whose typical specimen pixel is coloured (median of ``max - min`` over R, G, B
   at least :data:`MIN_CHROMA` of the full scale; specimen pixels are those not as bright as the
   glass, :data:`GLASS_MARGIN` below the 99th percentile of ``max``, so that a slide's white
   background does not hide its tissue) is stained ``brightfield`` when that pixel is bright
   (median of ``max`` at least :data:`MIN_STAINED_BRIGHTNESS`: light is transmitted through tissue,
   also through nuclei-dense tissue), and ``fluorescence`` otherwise (a colour composite of
   fluorescence channels: a dark background);
2. otherwise (one channel, grey stored as RGB, other channel counts, or ``--channel``) it is
   ``brightfield`` when the background is bright: the median lies in the upper half of the
   1-99.8 percentile range (the rule the grey model's ``invert: auto`` uses), else ``fluorescence``.

On ../shared/data: the 30 MoNuSeg H&E tiles are stained brightfield (chroma 0.125-0.361,
brightness 0.43-0.82), also on a white slide background and as their densest 256² crops
(tests/test_tissue.py); of DSB's 545 images, the 91 colour ones are stained brightfield (chroma
>= 0.027), the 13 grey ones on a bright background (unstained) brightfield and the other 441
fluorescence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODALITIES = ("fluorescence", "brightfield")
# what a bundle serves: the modalities, brightfield split into unstained (grey) and stained (colour)
IMAGE_KINDS = ("fluorescence", "brightfield", "stained")
MIN_CHROMA = 0.025  # grey images have 0; the palest stained DSB image 0.027, H&E tiles >= 0.125
MIN_STAINED_BRIGHTNESS = 0.25  # H&E tiles >= 0.43; fluorescence composites: their dark background
# pixels within this fraction of the full scale of the brightest are glass (a slide's background)
GLASS_MARGIN = 0.08
# pixels looked at (a regular subsample): the decision needs the typical pixel, not every one
MAX_PIXELS = 1_000_000


@dataclass(frozen=True)
class ModalityEvidence:
    """What the decision read: ``chroma`` and ``brightness`` (medians, fractions of the full
    scale; None for images that are not RGB), ``background`` (the grey median's place in the
    1-99.8 percentile range), the ``modality`` and whether the image is ``stained`` brightfield."""

    modality: str
    stained: bool
    chroma: float | None
    brightness: float | None
    background: float

    @property
    def kind(self) -> str:
        """The image kind a bundle serves (:data:`IMAGE_KINDS`)."""
        return "stained" if self.stained else self.modality


def full_scale(values: np.ndarray, dtype: np.dtype) -> float:
    """The value of full brightness for an image of ``dtype``: 255 for 8 bits; for 16 bits the
    smallest of 2^10, 2^12, 2^14, 2^16 (minus one) that holds the image's maximum (cameras write
    10-14 bits into 16-bit files); for floats 1 when the image lies in [0, 1], else its 99.9th
    percentile."""
    dtype = np.dtype(dtype)
    top = float(np.max(values)) if values.size else 0.0
    if dtype == np.uint8:
        return 255.0
    if np.issubdtype(dtype, np.integer):
        for bits in (10, 12, 14, 16, 32):
            if top <= 2**bits - 1:
                return float(2**bits - 1)
        return float(np.iinfo(dtype).max)
    if top <= 1.0:
        return 1.0
    finite = values[np.isfinite(values)]
    return float(np.percentile(finite, 99.9)) if finite.size else 1.0


def classify_modality(image: np.ndarray, channel: int | None = None) -> ModalityEvidence:
    """The modality of an image (see the module docstring).

    Args:
        image: ``(H, W)`` or ``(H, W, C)``, any real dtype: the image or its overview (a pyramid
            level, a strided read).
        channel: the ``--channel`` picked, if any (one channel: rule 2).

    Returns:
        :class:`ModalityEvidence` with ``modality`` in :data:`MODALITIES` and ``kind`` in :data:`IMAGE_KINDS`.
    """
    step = max(1, int(np.ceil(np.sqrt(image.shape[0] * image.shape[1] / MAX_PIXELS))))
    sample = np.asarray(image[::step, ::step])
    chroma = brightness = None
    if sample.ndim == 3 and sample.shape[2] in (3, 4) and channel is None:
        colour = np.nan_to_num(sample[:, :, :3].astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        scale = full_scale(colour, sample.dtype) or 1.0
        top, bottom = colour.max(axis=2), colour.min(axis=2)
        # the specimen, not the glass: a slide is mostly white background, which has no colour
        specimen = top < np.percentile(top, 99.0) - GLASS_MARGIN * scale
        if specimen.mean() < 0.01:
            specimen = np.ones_like(specimen)
        chroma = float(np.median((top - bottom)[specimen])) / scale
        brightness = float(np.median(top[specimen])) / scale
    if sample.ndim == 2:
        grey = sample.astype(np.float32)
    elif channel is not None:
        grey = sample[:, :, channel].astype(np.float32)
    else:
        grey = (sample[:, :, :3] if sample.shape[2] in (3, 4) else sample).astype(np.float32).mean(axis=2)
    grey = grey[np.isfinite(grey)]
    background = 0.0
    if grey.size:
        low, high, median = np.percentile(grey, [1.0, 99.8, 50.0])
        background = float((median - low) / (high - low)) if high > low else 0.0
    if chroma is not None and chroma >= MIN_CHROMA:
        stained = brightness >= MIN_STAINED_BRIGHTNESS
        modality = "brightfield" if stained else "fluorescence"
    else:
        stained = False
        modality = "brightfield" if background > 0.5 else "fluorescence"
    return ModalityEvidence(modality, stained, chroma, brightness, background)
