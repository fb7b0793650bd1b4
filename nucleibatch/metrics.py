"""The DSB 2018 metric: mean over IoU thresholds of TP / (TP + FP + FN) (pure).

A predicted nucleus matches a true one when their IoU is strictly greater than
the threshold; for thresholds >= 0.5 such matches are one-to-one.
"""

from __future__ import annotations

import numpy as np

DSB_THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)  # 0.50, 0.55, ..., 0.95


def iou_matrix(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    """IoU of every (true, predicted) pair of objects.

    Args:
        truth, prediction: ``(H, W)`` integer label images of the same shape (0 = background;
            labels need not be consecutive).

    Returns:
        ``(n_true, n_pred)`` float64, rows/columns in increasing label order.
    """
    if truth.shape != prediction.shape:
        raise ValueError(f"truth {truth.shape} and prediction {prediction.shape} differ in shape")
    true_ids, true_inv = np.unique(truth.ravel(), return_inverse=True)
    pred_ids, pred_inv = np.unique(prediction.ravel(), return_inverse=True)
    n_t, n_p = true_ids.size, pred_ids.size
    counts = np.bincount(true_inv * n_p + pred_inv, minlength=n_t * n_p).reshape(n_t, n_p)
    area_t = counts.sum(axis=1, keepdims=True)
    area_p = counts.sum(axis=0, keepdims=True)
    union = area_t + area_p - counts
    iou = counts / np.maximum(union, 1)
    keep_t = true_ids != 0
    keep_p = pred_ids != 0
    return iou[np.ix_(keep_t, keep_p)]


def matches_at(iou: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(TP, FP, FN) at one IoU threshold (>= 0.5) from an ``(n_true, n_pred)`` IoU matrix."""
    tp = int((iou > threshold).sum())
    n_true, n_pred = iou.shape
    return tp, n_pred - tp, n_true - tp


def _ratio(tp: int, fp: int, fn: int) -> float:
    denominator = tp + fp + fn
    return 1.0 if denominator == 0 else tp / denominator


def image_scores(truth: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    """DSB scores of one image.

    Returns:
        ``{"map": mean AP over 0.50..0.95, "ap50", "ap75", "f1_50", "n_true", "n_pred"}``
        where AP = TP / (TP + FP + FN) and an image with no true and no predicted
        nuclei scores 1.
    """
    iou = iou_matrix(truth, prediction)
    aps = [_ratio(*matches_at(iou, t)) for t in DSB_THRESHOLDS]
    tp, fp, fn = matches_at(iou, 0.5)
    f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return {
        "map": float(np.mean(aps)),
        "ap50": aps[0],
        "ap75": aps[5],
        "f1_50": float(f1),
        "n_true": int(iou.shape[0]),
        "n_pred": int(iou.shape[1]),
    }


def mean_scores(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Mean of :func:`image_scores` over images (the DSB score is the mean of per-image mAP)."""
    if not per_image:
        raise ValueError("no images to average")
    return {key: float(np.mean([row[key] for row in per_image])) for key in ("map", "ap50", "ap75", "f1_50")}
