import numpy as np
import pytest

import medt_keras  # noqa: F401

from medt_keras.metrics import ForegroundF1, ForegroundIoU, official_protocol_scores, pooled_scores


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
    assert float(f1.result()) == 1.0  # nothing seen, nothing to find


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
