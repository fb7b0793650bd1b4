"""The DSB 2018 metric against hand-computed cases.

AP at one threshold t is TP / (TP + FP + FN) where a pair matches when IoU > t
(strictly); the image score is the mean of AP over t = 0.50, 0.55, ..., 0.95.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nucleibatch.metrics import DSB_THRESHOLDS, image_scores, iou_matrix, matches_at, mean_scores

SHAPE = (40, 40)


def square(labels: np.ndarray, y: int, x: int, value: int, height: int = 10, width: int = 10) -> np.ndarray:
    labels[y : y + height, x : x + width] = value
    return labels


def blank() -> np.ndarray:
    return np.zeros(SHAPE, dtype=np.int32)


def test_thresholds_are_the_ten_dsb_thresholds():
    assert DSB_THRESHOLDS.tolist() == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


# --- empty images ---------------------------------------------------------------------------


def test_empty_prediction_of_a_nonempty_truth_scores_zero():
    truth = square(square(blank(), 2, 2, 1), 20, 20, 2)
    scores = image_scores(truth, blank())
    assert scores == {"map": 0.0, "ap50": 0.0, "ap75": 0.0, "f1_50": 0.0, "n_true": 2, "n_pred": 0}


def test_predictions_on_an_empty_truth_score_zero():
    prediction = square(blank(), 5, 5, 3)
    scores = image_scores(blank(), prediction)
    assert scores == {"map": 0.0, "ap50": 0.0, "ap75": 0.0, "f1_50": 0.0, "n_true": 0, "n_pred": 1}


def test_both_empty_scores_one():
    scores = image_scores(blank(), blank())
    assert scores == {"map": 1.0, "ap50": 1.0, "ap75": 1.0, "f1_50": 1.0, "n_true": 0, "n_pred": 0}


# --- exact matches and known IoUs ------------------------------------------------------------


def test_perfect_prediction_scores_one_even_when_renumbered():
    truth = square(square(square(blank(), 0, 0, 1), 0, 10, 2), 25, 25, 3)
    prediction = np.select([truth == 1, truth == 2, truth == 3], [7, 5, 6], 0)  # other ids, same objects
    scores = image_scores(truth, prediction)
    assert scores == {"map": 1.0, "ap50": 1.0, "ap75": 1.0, "f1_50": 1.0, "n_true": 3, "n_pred": 3}


def test_square_shifted_by_two_pixels():
    # two 10x10 squares shifted by 2 px: intersection 10*8 = 80, union 100 + 100 - 80 = 120,
    # IoU = 0.667 > 0.5, 0.55, 0.6, 0.65 only -> AP 1 at 4 of the 10 thresholds -> mAP 0.4
    truth = square(blank(), 10, 10, 1)
    prediction = square(blank(), 10, 12, 1)
    iou = iou_matrix(truth, prediction)
    assert iou.shape == (1, 1)
    assert iou[0, 0] == pytest.approx(80 / 120)
    scores = image_scores(truth, prediction)
    assert scores["map"] == pytest.approx(0.4)
    assert scores["ap50"] == 1.0
    assert scores["ap75"] == 0.0  # TP 0, FP 1, FN 1
    assert scores["f1_50"] == 1.0
    for threshold, expected in zip(DSB_THRESHOLDS, [1, 1, 1, 1, 0, 0, 0, 0, 0, 0], strict=True):
        assert matches_at(iou, threshold) == ((1, 0, 0) if expected else (0, 1, 1))


def test_iou_exactly_at_a_threshold_does_not_match():
    # prediction = 75 of the 100 truth pixels: IoU = 75/100 = 0.75 exactly; a match needs IoU > t,
    # so it matches at 0.50 .. 0.70 (5 thresholds) and not at 0.75 -> mAP 0.5
    truth = square(blank(), 0, 0, 1)
    prediction = square(blank(), 0, 0, 1, width=7)  # 70 pixels inside the truth
    prediction[0:5, 7] = 1  # + 5 = 75
    assert (prediction > 0).sum() == 75
    iou = iou_matrix(truth, prediction)
    assert iou[0, 0] == 0.75
    scores = image_scores(truth, prediction)
    assert scores["map"] == pytest.approx(0.5)
    assert scores["ap75"] == 0.0
    assert scores["ap50"] == 1.0


def test_nucleus_split_in_two_halves_gives_no_match():
    # each half of a 10x10 nucleus covers 50 of its 100 pixels: IoU 0.5, not > 0.5 -> no TP;
    # at every threshold TP 0, FP 2, FN 1
    truth = square(blank(), 10, 10, 1)
    prediction = square(square(blank(), 10, 10, 1, width=5), 10, 15, 2, width=5)
    iou = iou_matrix(truth, prediction)
    np.testing.assert_allclose(iou, [[0.5, 0.5]])
    scores = image_scores(truth, prediction)
    assert scores == {"map": 0.0, "ap50": 0.0, "ap75": 0.0, "f1_50": 0.0, "n_true": 1, "n_pred": 2}
    assert matches_at(iou, 0.5) == (0, 2, 1)


def test_two_nuclei_merged_into_one():
    # truth: A = 10x10 (100 px) touching B = 10x5 (50 px); prediction: one object over both (150 px).
    # IoU(A) = 100/150 = 0.667 -> TP at 0.50..0.65; IoU(B) = 50/150 = 0.333.
    # thresholds 0.50..0.65: TP 1, FP 0, FN 1 -> 1/2; the other six: TP 0, FP 1, FN 2 -> 0.
    # mAP = 4 * 0.5 / 10 = 0.2; F1@0.5 = 2*1 / (2*1 + 0 + 1) = 2/3
    truth = square(square(blank(), 10, 10, 1), 10, 20, 2, width=5)
    prediction = square(blank(), 10, 10, 1, width=15)
    iou = iou_matrix(truth, prediction)
    np.testing.assert_allclose(iou, [[100 / 150], [50 / 150]])
    scores = image_scores(truth, prediction)
    assert scores["map"] == pytest.approx(0.2)
    assert scores["ap50"] == pytest.approx(0.5)
    assert scores["ap75"] == 0.0
    assert scores["f1_50"] == pytest.approx(2 / 3)
    assert (scores["n_true"], scores["n_pred"]) == (2, 1)


def test_missed_nucleus_and_false_positive_f1_and_ap():
    # truth 3 nuclei, prediction finds 2 exactly and adds 1 false object:
    # every threshold: TP 2, FP 1, FN 1 -> AP 0.5; F1 = 4 / (4 + 1 + 1) = 2/3
    truth = square(square(square(blank(), 0, 0, 1), 0, 20, 2), 20, 0, 3)
    prediction = square(square(square(blank(), 0, 0, 1), 0, 20, 2), 28, 28, 3)
    scores = image_scores(truth, prediction)
    assert scores["map"] == pytest.approx(0.5)
    assert scores["ap50"] == pytest.approx(0.5)
    assert scores["ap75"] == pytest.approx(0.5)
    assert scores["f1_50"] == pytest.approx(2 / 3)
    assert (scores["n_true"], scores["n_pred"]) == (3, 3)


def test_mixed_quality_ap50_and_ap75():
    # nucleus 1 exact (IoU 1), nucleus 2 shifted by 2 px (IoU 80/120 = 0.667), nucleus 3 missed.
    # t <= 0.65: TP 2, FP 0, FN 1 -> 2/3;  t >= 0.70: TP 1, FP 1, FN 2 -> 1/4
    # mAP = (4 * 2/3 + 6 * 1/4) / 10
    truth = square(square(square(blank(), 0, 0, 1), 0, 20, 2), 25, 25, 3)
    prediction = square(square(blank(), 0, 0, 1), 0, 22, 2)
    scores = image_scores(truth, prediction)
    assert scores["ap50"] == pytest.approx(2 / 3)
    assert scores["ap75"] == pytest.approx(1 / 4)
    assert scores["map"] == pytest.approx((4 * 2 / 3 + 6 * 1 / 4) / 10)
    assert scores["f1_50"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))


def test_non_consecutive_label_values_give_the_same_scores():
    truth = square(square(blank(), 10, 10, 1), 10, 25, 2)
    prediction = square(square(blank(), 10, 12, 1), 10, 25, 2)
    reference = image_scores(truth, prediction)
    truth_sparse = np.select([truth == 1, truth == 2], [1000, 7], 0).astype(np.int64)
    prediction_sparse = np.select([prediction == 1, prediction == 2], [3, 99999], 0).astype(np.uint32)
    assert image_scores(truth_sparse, prediction_sparse) == reference
    # square 1: IoU 0.667 (4 thresholds), square 2 exact (10 thresholds)
    # t <= 0.65: TP 2 -> 1; t >= 0.7: TP 1, FP 1, FN 1 -> 1/3
    assert reference["map"] == pytest.approx((4 * 1 + 6 / 3) / 10)


# --- iou_matrix ---------------------------------------------------------------------------


def test_iou_matrix_shape_order_and_values():
    truth = blank()
    square(truth, 0, 0, 9)  # rows follow increasing label values: 4, then 9
    square(truth, 20, 20, 4)
    prediction = blank()
    square(prediction, 0, 2, 50)  # overlaps truth 9 by 80 px
    square(prediction, 20, 20, 3, width=5)  # half of truth 4
    square(prediction, 35, 0, 60, height=5)  # overlaps nothing
    iou = iou_matrix(truth, prediction)
    assert iou.shape == (2, 3)
    assert iou.dtype == np.float64
    expected = np.array(
        [
            [50 / 100, 0.0, 0.0],  # truth 4 vs prediction 3, 50, 60
            [0.0, 80 / 120, 0.0],  # truth 9
        ]
    )
    np.testing.assert_allclose(iou, expected)


def test_iou_matrix_of_empty_images_has_zero_rows_or_columns():
    truth = square(blank(), 0, 0, 1)
    assert iou_matrix(truth, blank()).shape == (1, 0)
    assert iou_matrix(blank(), truth).shape == (0, 1)
    assert iou_matrix(blank(), blank()).shape == (0, 0)


def test_iou_matrix_rejects_different_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        iou_matrix(np.zeros((4, 4), int), np.zeros((4, 5), int))


def _brute_force_iou(truth: np.ndarray, prediction: np.ndarray) -> np.ndarray:
    true_ids = [v for v in np.unique(truth) if v]
    pred_ids = [v for v in np.unique(prediction) if v]
    out = np.zeros((len(true_ids), len(pred_ids)))
    for i, t in enumerate(true_ids):
        for j, p in enumerate(pred_ids):
            a, b = truth == t, prediction == p
            out[i, j] = (a & b).sum() / (a | b).sum()
    return out


@settings(max_examples=40, deadline=None, database=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(1, 12),
    st.integers(1, 12),
)
def test_iou_matrix_matches_brute_force(seed, n_truth, n_pred):
    rng = np.random.default_rng(seed)
    truth = rng.choice(np.r_[0, rng.choice(1000, n_truth, replace=False) + 1], size=(12, 13))
    prediction = rng.choice(np.r_[0, rng.choice(1000, n_pred, replace=False) + 1], size=(12, 13))
    np.testing.assert_allclose(iou_matrix(truth, prediction), _brute_force_iou(truth, prediction))


# --- mean_scores ----------------------------------------------------------------------------


def test_mean_scores_is_the_mean_of_per_image_scores():
    perfect = image_scores(square(blank(), 0, 0, 1), square(blank(), 0, 0, 1))
    shifted = image_scores(square(blank(), 10, 10, 1), square(blank(), 10, 12, 1))
    missed = image_scores(square(blank(), 0, 0, 1), blank())
    mean = mean_scores([perfect, shifted, missed])
    assert set(mean) == {"map", "ap50", "ap75", "f1_50"}
    assert mean["map"] == pytest.approx((1.0 + 0.4 + 0.0) / 3)
    assert mean["ap50"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)
    assert mean["ap75"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert mean["f1_50"] == pytest.approx((1.0 + 1.0 + 0.0) / 3)


def test_mean_scores_of_no_images_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        mean_scores([])
