"""DSB-metric evaluation of a model on annotated folders."""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError
from .io.annotated import discover_annotated, iter_annotated
from .metrics import image_scores, mean_scores
from .model import NucleiModel
from .segment_array import segment_image

log = logging.getLogger(__name__)


def evaluate_model(
    model: NucleiModel,
    data: Sequence[str | Path],
    limit_images: int = 0,
    skip_bad: bool = False,
    image_ids: Sequence[str] | None = None,
    channel: int | None = None,
    instances_on: str = "cpu",
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Segment every annotated image exactly as ``segment`` does and score it.

    ``instances_on``: where probabilities become labels, ``"cpu"`` or ``"device"`` (see
    :func:`nucleibatch.segment_array.segment_image`).

    Returns:
        ``(summary, rows)``: the mean ``map``, ``ap50``, ``ap75``, ``f1_50`` (+ ``n_images``)
        and one row per image with its scores.
    """
    sources = discover_annotated(data)
    if image_ids is not None:
        wanted = set(image_ids)
        sources = [s for s in sources if s.image_id in wanted]
    if limit_images:
        sources = sources[:limit_images]
    rows = []
    for index, annotated in enumerate(iter_annotated(sources, skip_bad=skip_bad), start=1):
        labels = segment_image(annotated.image, model, channel=channel, instances_on=instances_on)
        rows.append({"image_id": annotated.image_id, **image_scores(annotated.labels, labels)})
        if index % 25 == 0:
            log.info("evaluated %d/%d images, running mAP %.4f", index, len(sources), mean_scores(rows)["map"])
    if not rows:
        raise UsageError(
            "no annotated image left to evaluate (all skipped as bad, or none of DATA matches the selected ids); "
            "check DATA, --ids-from-bundle and --skip-bad"
        )
    summary = {**mean_scores(rows), "n_images": len(rows)}
    return summary, rows


def write_rows_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Per-image scores as CSV (columns: image_id, map, ap50, ap75, f1_50, n_true, n_pred)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0].keys()) if rows else ["image_id"])
        writer.writeheader()
        writer.writerows(rows)
