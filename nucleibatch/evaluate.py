"""DSB-metric evaluation of a model (or of the per-image model choice of ``segment``) on annotated folders."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .annotated import (
    AnnotatedImage,
    annotated_channel_names,
    discover_annotated,
    iter_annotated,
)
from .channels import resolve_channel
from .errors import ImageReadError, UsageError
from .io.readers import ArraySource, file_pixel_size
from .metrics import image_scores, mean_scores
from .modality import MODALITIES, classify_modality
from .model.predict import NucleiModel
from .scale import AUTO_PULL, resample_scale
from .segment.array import segment_image
from .segment.choose import AUTO, ModelSet, image_diameter

log = logging.getLogger(__name__)


def evaluate_model(
    model: NucleiModel | ModelSet,
    data: Sequence[str | Path],
    limit_images: int = 0,
    skip_bad: bool = False,
    image_ids: Sequence[str] | None = None,
    channel: int | str | None = None,
    instances_on: str = "cpu",
    invert: str | None = None,
    pixel_size: float | None = None,
    diameter: float | str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Segment every annotated image exactly as ``segment`` does and score it.

    Each image gets the model, normalisation and scale ``segment`` would give it
    (:mod:`nucleibatch.segment.choose`): its kind picks the model of a :class:`ModelSet` that routes
    by image kind; its scale comes from ``diameter`` (pixels, or ``"auto"``), else from its pixel
    size (``pixel_size``, else the image file's metadata) and the model's.

    ``instances_on``: where probabilities become labels, ``"cpu"`` or ``"device"`` (see
    :func:`nucleibatch.segment.array.segment_image`).

    Returns:
        ``(summary, rows)``: the mean ``map``, ``ap50``, ``ap75``, ``f1_50`` (+ ``n_images``, and
        ``by_modality``: the same per modality present) and one row per image with its scores,
        modality, model and scale.
    """
    models = model if isinstance(model, ModelSet) else ModelSet({model.name: model}, {})
    sources = discover_annotated(data)
    if image_ids is not None:
        wanted = set(image_ids)
        sources = [s for s in sources if s.image_id in wanted]
    if limit_images:
        sources = sources[:limit_images]
    rows = []
    for index, annotated in enumerate(iter_annotated(sources, skip_bad=skip_bad), start=1):
        row = evaluate_image(annotated, models, channel, instances_on, invert, pixel_size, diameter)
        rows.append(row)
        if index % 25 == 0:
            log.info("evaluated %d/%d images, running mAP %.4f", index, len(sources), mean_scores(rows)["map"])
    if not rows:
        raise UsageError(
            "no annotated image left to evaluate (all skipped as bad, or none of DATA matches the selected ids); "
            "check DATA, --ids-from-bundle and --skip-bad"
        )
    summary: dict[str, Any] = {**mean_scores(rows), "n_images": len(rows)}
    summary["by_modality"] = {
        modality: {**mean_scores(chosen), "n_images": len(chosen)}
        for modality in MODALITIES
        if (chosen := [r for r in rows if r["modality"] == modality])
    }
    return summary, rows


def evaluate_image(
    annotated: AnnotatedImage,
    models: ModelSet,
    channel: int | str | None = None,
    instances_on: str = "cpu",
    invert: str | None = None,
    pixel_size: float | None = None,
    diameter: float | str | None = None,
) -> dict[str, Any]:
    """One annotated image segmented as ``segment`` would, and its scores (a row of :func:`evaluate_model`).

    ``channel``: an index, or a channel name resolved against the image's names
    (:func:`~nucleibatch.annotated.annotated_channel_names`).

    Raises:
        UsageError: ``channel`` is a name the image has no channel of (a score without it
            would not be the model's on that stain).
    """
    image = annotated.image
    if isinstance(channel, str):
        channels = image.shape[2] if image.ndim == 3 else 1
        try:
            channel = resolve_channel(channel, annotated_channel_names(annotated.source, channels), channels)
        except ImageReadError as error:
            raise UsageError(f"{annotated.image_id}: {error}; give an index or pick images that name that channel") from None
    evidence = classify_modality(image, channel)
    modality = evidence.modality
    name = models.name_for(evidence.kind)
    model = models.models[name]
    source = annotated.source
    pixel = pixel_size if pixel_size is not None else source.pixel_size_um if source.store_path is not None else file_pixel_size(source.image_path)
    found = image_diameter(ArraySource(image, annotated.image_id), image, model, channel, invert) if diameter == AUTO else diameter
    scale = resample_scale(model.config.scale, pixel, found, AUTO_PULL if diameter == AUTO else 1.0)
    labels = segment_image(image, model, channel=channel, instances_on=instances_on, scale=scale, invert=invert)
    return {"image_id": annotated.image_id, **image_scores(annotated.labels, labels), "modality": modality, "model": name, "pixel_size_um": pixel, "scale": round(scale, 4)}


def write_rows_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Per-image scores as CSV (columns: image_id, map, ap50, ap75, f1_50, n_true, n_pred, modality, model, pixel_size_um, scale)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()) if rows else ["image_id"])
        writer.writeheader()
        writer.writerows(rows)
