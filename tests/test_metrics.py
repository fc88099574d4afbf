import numpy as np
import pytest

import medt_keras  # noqa: F401

import json
import math

from medt_keras.metrics import ForegroundF1, ForegroundIoU, json_safe, official_protocol_scores, pooled_scores


def _logits(labels, num_classes):
    return np.eye(num_classes, dtype=np.float32)[labels] * 3.0 - 1.0


@pytest.mark.parametrize("num_classes", [2, 4])
def test_keras_metrics_equal_pooled_counts_over_batches(num_classes):
    rng = np.random.default_rng(num_classes)
    truth = rng.integers(0, num_classes, (6, 9, 7))
    predicted = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, num_classes, truth.shape))
    f1, iou = ForegroundF1(num_classes), ForegroundIoU(num_classes)
    for start in (0, 2, 5):  # accumulates over unequal batches
        stop = {0: 2, 2: 5, 5: 6}[start]
        f1.update_state(truth[start:stop, ..., None], _logits(predicted[start:stop], num_classes))
        iou.update_state(truth[start:stop], _logits(predicted[start:stop], num_classes))
    expected_f1, expected_iou = pooled_scores(predicted, truth, num_classes)
    assert float(f1.result()) == pytest.approx(expected_f1, rel=1e-6)
    assert float(iou.result()) == pytest.approx(expected_iou, rel=1e-6)
    # Hand check for one class: F1 = 2TP / (2TP + FP + FN).
    tp = np.sum((predicted == 1) & (truth == 1))
    fp, fn = np.sum((predicted == 1) & (truth != 1)), np.sum((predicted != 1) & (truth == 1))
    single = pooled_scores(np.where(predicted == 1, 1, 0), np.where(truth == 1, 1, 0), 2)[0]
    assert single == pytest.approx(2 * tp / (2 * tp + fp + fn))
    f1.reset_state()
    assert math.isnan(float(f1.result()))  # nothing seen, nothing to find: undefined, not 1


def test_split_without_foreground_is_undefined_not_perfect():
    background = np.zeros((3, 5, 5), int)
    f1, iou = ForegroundF1(), ForegroundIoU()
    f1.update_state(background, _logits(background, 2))
    iou.update_state(background, _logits(background, 2))
    assert math.isnan(float(f1.result())) and math.isnan(float(iou.result()))
    with pytest.warns(RuntimeWarning, match="undefined"):
        scores = pooled_scores(background, background)
    assert all(math.isnan(s) for s in scores)
    # One false positive pixel makes it defined, and 0.
    predicted = background.copy()
    predicted[0, 0, 0] = 1
    assert pooled_scores(predicted, background) == (0.0, 0.0)
    f1.update_state(background, _logits(predicted, 2))
    assert float(f1.result()) == 0.0
    # JSON: NaN becomes null, so the file stays valid JSON.
    text = json.dumps(json_safe({"f1": scores[0], "nested": [float("inf"), 1.0]}), allow_nan=False)
    assert json.loads(text) == {"f1": None, "nested": [None, 1.0]}


def test_multiclass_mean_leaves_out_absent_classes():
    truth = np.array([[0, 1, 1, 0]])
    predicted = np.array([[0, 1, 0, 0]])  # class 1: TP 1, FN 1; classes 2 and 3 absent everywhere
    f1, iou = pooled_scores(predicted, truth, num_classes=4)
    assert f1 == pytest.approx(2 / 3) and iou == pytest.approx(1 / 2)
    metric = ForegroundF1(4)
    metric.update_state(truth, _logits(predicted, 4))
    assert float(metric.result()) == pytest.approx(2 / 3)


def test_official_protocol_averages_images_and_scores_tp_zero_as_one():
    masks = np.zeros((3, 4, 4), int)
    predictions = np.zeros_like(masks)
    masks[0, :2] = 1
    predictions[0, :1] = 1  # TP 4, FN 4: F1 2/3, IoU 1/2
    masks[1, 0, 0] = 1  # total miss: TP = 0
    # image 2: empty truth and empty prediction
    f1, iou = official_protocol_scores(predictions, masks)
    assert f1 == pytest.approx((2 / 3 + 1 + 1) / 3) and iou == pytest.approx((0.5 + 1 + 1) / 3)
    f1, iou = official_protocol_scores(predictions, masks, tp_zero_scores_one=False)
    assert f1 == pytest.approx((2 / 3 + 0 + 1) / 3) and iou == pytest.approx((0.5 + 0 + 1) / 3)


def test_weights_scale_pixel_counts_and_zero_leaves_pixels_out():
    # Padded evaluation weighs real pixels by a constant (e.g. 8/6) and padding by 0:
    # F1/IoU must equal those of the real pixels alone.
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, (3, 8, 8))
    predicted = np.where(rng.random((3, 8, 8)) < 0.8, labels, 1 - labels)
    weights = np.zeros((3, 8, 8), np.float32)
    weights[:2] = 4.0 / 3.0
    for metric_class in (ForegroundF1, ForegroundIoU):
        weighted, alone = metric_class(2), metric_class(2)
        weighted.update_state(labels, _logits(predicted, 2), sample_weight=weights)
        alone.update_state(labels[:2], _logits(predicted[:2], 2))
        assert np.isfinite(float(alone.result()))
        np.testing.assert_allclose(float(weighted.result()), float(alone.result()), rtol=1e-6)
