"""Training targets from instance labels (pure).

Three channels, after the DSB 2018 winners: the nucleus body, its contour (a thin
ring inside each nucleus) and the contact zone (pixels within reach of two
different nuclei). Post-processing seeds a watershed with body minus contour minus
contact, which separates touching nuclei that a plain foreground mask merges.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

TARGET_CLASSES = ("body", "contour", "contact")


def make_targets(labels: np.ndarray, contour_width: int = 2, contact_radius: int = 2) -> np.ndarray:
    """Body / contour / contact targets of an instance label image.

    Args:
        labels: ``(H, W)`` integer instance labels, 0 = background.
        contour_width: thickness in pixels of the contour ring inside each nucleus.
        contact_radius: a pixel is "contact" when the square of this radius around it
            holds two different nuclei.

    Returns:
        ``(3, H, W)`` float32 in {0, 1}: body, contour, contact.
    """
    labels = np.asarray(labels).astype(np.int64, copy=False)
    body = labels > 0
    size = 2 * contour_width + 1
    # a body pixel is on the contour when a pixel with another value (background or
    # another nucleus) lies within contour_width of it
    local_max = ndi.maximum_filter(labels, size=size, mode="nearest")
    local_min = ndi.minimum_filter(labels, size=size, mode="nearest")
    contour = body & ((local_max != labels) | (local_min != labels))
    size = 2 * contact_radius + 1
    # background stands in as a value above every label; it must survive scipy's
    # float64 round trip, so it is max + 1 and not the int64 maximum
    above = int(labels.max()) + 1 if labels.size else 1
    highest = ndi.maximum_filter(labels, size=size, mode="constant", cval=0)
    lowest_nucleus = ndi.minimum_filter(np.where(body, labels, above), size=size, mode="constant", cval=above)
    contact = (highest > 0) & (lowest_nucleus != above) & (highest != lowest_nucleus)
    return np.stack([body, contour, contact]).astype(np.float32)
