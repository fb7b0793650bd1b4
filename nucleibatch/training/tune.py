"""Tuning of post-processing thresholds on validation images (grid search on cached probabilities)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import numpy as np

from ..instances import InstanceParams, probabilities_to_labels
from ..metrics import image_scores, mean_scores
from .data import Example

log = logging.getLogger(__name__)

GRID = {
    "mask_threshold": (0.4, 0.5, 0.6),
    "seed_threshold": (0.3, 0.5, 0.7),
    "min_seed_size": (3, 8, 16),
    "min_size": (8, 20),
}


def tune_postprocess(model, examples: Sequence[Example], start: InstanceParams, search: bool = True, grid: dict = GRID) -> tuple[InstanceParams, dict[str, float]]:
    """Best :class:`InstanceParams` by mean validation mAP (or ``start`` when ``search`` is False).

    Returns the parameters and their mean scores (``map``, ``ap50``, ``ap75``, ``f1_50``).
    """
    probabilities = [model.predict(example.image) for example in examples]

    def score(params: InstanceParams) -> dict[str, float]:
        return mean_scores([image_scores(e.labels, probabilities_to_labels(p, params)) for e, p in zip(examples, probabilities, strict=True)])

    best_params, best = start, score(start)
    if search:
        for values in itertools.product(*grid.values()):
            params = InstanceParams(**dict(zip(grid.keys(), values, strict=True)))
            scores = score(params)
            if scores["map"] > best["map"] + 1e-9:
                best_params, best = params, scores
        log.info("post-processing tuned on %d images: %s -> mAP %.4f", len(examples), best_params, best["map"])
    return best_params, {k: float(np.round(v, 6)) for k, v in best.items()}
