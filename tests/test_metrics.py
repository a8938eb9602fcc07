import json
import math

import numpy as np
import pytest
import torch

from digseg_diffusers.evaluation.metrics import (
    ConfusionMatrix,
    IoUThresholdCurve,
    binary_segmentation_metrics,
    iou_vs_threshold,
    to_jsonable,
)


def nan_equal(actual, expected, tol=1e-12):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if isinstance(e, float) and math.isnan(e):
            assert math.isnan(a), (actual, expected)
        else:
            assert a == pytest.approx(e, abs=tol), (actual, expected)


# 4 classes. Class 2 is only predicted (never in GT), class 3 appears nowhere, 255 is ignored.
TARGET = np.array([[0, 0, 1, 1], [0, 0, 1, 255], [255, 255, 1, 0]])
PRED = np.array([[0, 1, 1, 1], [0, 2, 1, 3], [0, 0, 0, 0]])
#   valid pixels (GT, pred): (0,0) (0,1) (1,1) (1,1) (0,0) (0,2) (1,1) (1,0) (0,0)
#   GT 0: 5 pixels -> pred 0: 3, pred 1: 1, pred 2: 1       GT 1: 4 pixels -> pred 1: 3, pred 0: 1
EXPECTED_MATRIX = [[3, 1, 1, 0], [1, 3, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_confusion_matrix_counts_and_ignore():
    cm = ConfusionMatrix(4, ignore_index=255)
    cm.update(PRED, TARGET)
    assert cm.matrix.tolist() == EXPECTED_MATRIX
    assert cm.unassigned.tolist() == [0, 0, 0, 0]


def test_metrics_from_hand_computed_matrix():
    cm = ConfusionMatrix(4, class_names=["a", "b", "c", "d"])
    cm.update(torch.from_numpy(PRED), torch.from_numpy(TARGET))
    out = cm.compute()
    # class 0: TP 3, FP 1 (GT1->0), FN 2 -> IoU 3/6; class 1: TP 3, FP 1, FN 1 -> 3/5
    # class 2: TP 0, FP 1, FN 0 -> IoU 0 (predicted but absent: counts); class 3: nowhere -> NaN (excluded)
    nan_equal(out["per_class_iou"], [0.5, 0.6, 0.0, float("nan")])
    assert out["mIoU"] == pytest.approx((0.5 + 0.6 + 0.0) / 3)
    assert out["num_valid_classes"] == 3
    assert out["pixel_accuracy"] == pytest.approx(6 / 9)
    nan_equal(out["per_class_accuracy"], [3 / 5, 3 / 4, float("nan"), float("nan")])
    assert out["mean_accuracy"] == pytest.approx((0.6 + 0.75) / 2)
    nan_equal(out["per_class_precision"], [3 / 4, 3 / 4, 0.0, float("nan")])
    nan_equal(out["per_class_dice"], [6 / 9, 6 / 8, 0.0, float("nan")])
    assert out["mean_dice"] == pytest.approx((6 / 9 + 6 / 8 + 0) / 3)
    assert out["per_class_pixels"] == [5, 4, 0, 0]
    assert out["num_pixels"] == 9
    assert out["class_names"] == ["a", "b", "c", "d"]


def test_unassigned_predictions_are_misses_without_false_positives():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 255, 1, 1]), np.array([0, 0, 1, 255]))
    assert cm.counts.tolist() == [[1, 0, 1], [0, 1, 0]]
    out = cm.compute()
    nan_equal(out["per_class_iou"], [0.5, 1.0])
    assert out["pixel_accuracy"] == pytest.approx(2 / 3)


def test_updates_accumulate_and_merge_like_one_pass():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 5, size=(3, 16, 16))
    target[rng.random(target.shape) < 0.1] = 255
    pred = rng.integers(0, 5, size=(3, 16, 16))
    whole = ConfusionMatrix(5)
    whole.update(pred, target)
    first, second = ConfusionMatrix(5), ConfusionMatrix(5)
    first.update(pred[:2], target[:2])
    second.update(pred[2:], target[2:])
    assert torch.equal(first.merge(second).counts, whole.counts)
    # the raw counts tensor is what a distributed reduce sums
    reduced = ConfusionMatrix(5)
    reduced.counts = torch.stack([first.counts - second.counts, second.counts]).sum(0)
    assert torch.equal(reduced.counts, first.counts)
    # reference: a per-pixel loop
    expected = np.zeros((5, 5), dtype=np.int64)
    for p, t in zip(pred.ravel(), target.ravel()):
        if t != 255:
            expected[t, p] += 1
    np.testing.assert_array_equal(whole.matrix.numpy(), expected)


def test_all_ignored_update_is_a_no_op_and_empty_metrics_are_nan():
    cm = ConfusionMatrix(3)
    cm.update(np.zeros((2, 2), dtype=np.int64), np.full((2, 2), 255))
    out = cm.compute()
    assert cm.counts.sum() == 0
    assert math.isnan(out["mIoU"]) and math.isnan(out["pixel_accuracy"])


def test_update_rejects_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="same shape"):
        cm.update(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="target contains 7"):
        cm.update(np.zeros(2, dtype=np.int64), np.array([0, 7]))
    with pytest.raises(ValueError, match="integer class indices"):
        cm.update(np.zeros(2, dtype=np.float32), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="collides"):
        ConfusionMatrix(300, ignore_index=255)
    with pytest.raises(ValueError, match="cannot merge"):
        cm.merge(ConfusionMatrix(4))


def test_large_vocabulary_with_65535_ignore():
    cm = ConfusionMatrix(847, ignore_index=65535)
    cm.update(np.array([255, 846, 3], dtype=np.int64), np.array([255, 846, 65535], dtype=np.uint16))
    out = cm.compute()
    assert out["num_valid_classes"] == 2 and out["mIoU"] == 1.0


def test_foreground_iou_is_class_agnostic():
    # classes 0, 1 and background 2
    cm = ConfusionMatrix(3)
    cm.update(pred=np.array([1, 0, 1, 2, 2, 0]), target=np.array([0, 0, 1, 1, 2, 2]))
    # hits (a class on a class, whichever): 0->1, 0->0, 1->1 = 3; misses: 1->background = 1; false alarms: 1
    assert cm.foreground_iou(background_class=2) == pytest.approx(3 / 5)
    cm.update(pred=np.array([-1]), target=np.array([1]))  # a foreground pixel left without a class: a miss
    assert cm.foreground_iou(background_class=2) == pytest.approx(3 / 6)
    assert math.isnan(ConfusionMatrix(2).foreground_iou(background_class=1))
    with pytest.raises(ValueError, match="background_class"):
        cm.foreground_iou(background_class=3)


def test_binary_precision_recall_f1_dice():
    target = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
    pred = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0], dtype=bool)
    # TP 3, FN 1, FP 2, TN 4
    scores = binary_segmentation_metrics(pred, target)
    assert scores["precision"] == pytest.approx(3 / 5)
    assert scores["recall"] == pytest.approx(3 / 4)
    assert scores["f1"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    assert scores["dice"] == pytest.approx(6 / 9)
    assert scores["iou"] == pytest.approx(3 / 6)
    assert scores["accuracy"] == pytest.approx(7 / 10)
    # ignoring the false negative and one false positive
    ignore = np.zeros(10, dtype=bool)
    ignore[[3, 4]] = True
    scores = binary_segmentation_metrics(pred, target, ignore_mask=ignore)
    assert scores["recall"] == 1.0 and scores["precision"] == pytest.approx(3 / 4)


def test_binary_scores_with_no_positive_anywhere_are_nan():
    scores = binary_segmentation_metrics(np.zeros(4, dtype=bool), np.zeros(4, dtype=bool))
    assert math.isnan(scores["iou"]) and math.isnan(scores["precision"]) and scores["accuracy"] == 1.0


def test_iou_vs_threshold_matches_direct_thresholding():
    rng = np.random.default_rng(1)
    probs = rng.random((3, 8, 8))
    targets = rng.random((3, 8, 8)) < 0.4
    thresholds = [0.1, 0.3, 0.5, 0.7, 0.9]
    curve = iou_vs_threshold(probs, targets, thresholds)
    expected = [((probs > t) & targets).sum() / ((probs > t) | targets).sum() for t in thresholds]
    np.testing.assert_allclose(curve, expected)


def test_iou_vs_threshold_hand_example_strict_threshold_and_lists():
    probs = [np.array([[0.9, 0.7], [0.5, 0.2]]), np.array([0.8, 0.1])[None]]
    targets = [np.array([[1, 1], [0, 0]], dtype=bool), np.array([1, 0], dtype=bool)[None]]
    # t=0.5: positives 0.9, 0.7, 0.8 (0.5 is not > 0.5) -> 3/3; t=0.75: 0.9, 0.8 -> 2/3; t=0.95: none -> 0
    np.testing.assert_allclose(iou_vs_threshold(probs, targets, [0.5, 0.75, 0.95]), [1.0, 2 / 3, 0.0])


def test_threshold_curve_per_class_and_ignore():
    curve = IoUThresholdCurve([0.25, 0.5, 0.75], num_classes=3)
    probs = torch.tensor([[[0.6, 0.3]], [[0.9, 0.8]]])
    targets = torch.tensor([[[True, False]], [[True, False]]])
    ignore = torch.tensor([[[False, False]], [[False, True]]])
    curve.update(probs, targets, class_ids=[0, 1], ignore_mask=ignore)
    out = curve.compute()
    nan_equal(out["per_class_iou"][0], [0.5, 1.0, 0.0])
    nan_equal(out["per_class_iou"][1], [1.0, 1.0, 1.0])
    assert all(math.isnan(v) for v in out["per_class_iou"][2])
    nan_equal(out["mean_iou"], [0.75, 1.0, 0.5])
    assert out["best_threshold"] == 0.5 and out["best_mean_iou"] == 1.0
    assert out["per_class_best_threshold"] == [0.5, 0.25, None]


def test_threshold_curve_validates_thresholds():
    with pytest.raises(ValueError, match="strictly increasing"):
        IoUThresholdCurve([0.5, 0.5])


def test_to_jsonable_replaces_nan():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0]), np.array([0]))
    text = json.dumps(to_jsonable(cm.compute()), allow_nan=False)
    assert json.loads(text)["per_class_iou"] == [1.0, None]
