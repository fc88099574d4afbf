"""Segmentation metrics: in-graph Keras metrics and the official evaluation protocol.

Keras metrics (``ForegroundF1``, ``ForegroundIoU``) accumulate true/false
positives and false negatives of every foreground class over all pixels of
the split (prediction = argmax of the logits) and report the mean over the
foreground classes (for two classes: the class-1 score). These are the
numbers of ``shared/reference/hela-official.md``.

``official_protocol_scores`` reproduces the paper's evaluation (the MATLAB
scripts the authors point to): F1 = 2TP / (2TP + FP + FN) and IoU =
TP / (TP + FP + FN) per image, averaged over images, with an image whose
TP = 0 scored 1 (a quirk of those scripts, kept behind a flag).
"""

import numpy as np

import keras
from keras import ops


class _ForegroundCounts(keras.metrics.Metric):
    def __init__(self, num_classes=2, name=None, **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        shape = (self.num_classes - 1,)
        self.true_positives = self.add_variable(shape, "zeros", name="true_positives", dtype="float32")
        self.false_positives = self.add_variable(shape, "zeros", name="false_positives", dtype="float32")
        self.false_negatives = self.add_variable(shape, "zeros", name="false_negatives", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        """``y_true``: (batch, h, w) or (batch, h, w, 1) class indices; ``y_pred``: (batch, h, w, classes) logits."""
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        predicted = ops.reshape(ops.argmax(y_pred, axis=-1), (-1,))
        classes = ops.arange(1, self.num_classes, dtype="int32")[None, :]
        truth = ops.cast(labels[:, None] == classes, "float32")
        guess = ops.cast(ops.cast(predicted, "int32")[:, None] == classes, "float32")
        if sample_weight is not None:  # per-pixel weights; 0 leaves a pixel out (padding)
            weight = ops.cast(ops.reshape(sample_weight, (-1, 1)), "float32")
            truth, guess = truth * weight, guess * weight
        self.true_positives.assign_add(ops.sum(truth * guess, axis=0))
        self.false_positives.assign_add(ops.sum((1.0 - truth) * guess, axis=0))
        self.false_negatives.assign_add(ops.sum(truth * (1.0 - guess), axis=0))

    def _counts(self):
        return tuple(
            ops.convert_to_tensor(v) for v in (self.true_positives, self.false_positives, self.false_negatives)
        )

    def reset_state(self):
        for variable in (self.true_positives, self.false_positives, self.false_negatives):
            variable.assign(ops.zeros(variable.shape, variable.dtype))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package="medt_keras")
class ForegroundF1(_ForegroundCounts):
    """Foreground F1 (Dice) over all pixels seen, mean over foreground classes; 1 when there is nothing to find."""

    def __init__(self, num_classes=2, name="f1", **kwargs):
        super().__init__(num_classes, name=name, **kwargs)

    def result(self):
        tp, fp, fn = self._counts()
        denominator = 2.0 * tp + fp + fn
        return ops.mean(ops.where(denominator > 0, 2.0 * tp / ops.maximum(denominator, 1.0), 1.0))


@keras.saving.register_keras_serializable(package="medt_keras")
class ForegroundIoU(_ForegroundCounts):
    """Foreground intersection over union over all pixels seen, mean over foreground classes."""

    def __init__(self, num_classes=2, name="iou", **kwargs):
        super().__init__(num_classes, name=name, **kwargs)

    def result(self):
        tp, fp, fn = self._counts()
        denominator = tp + fp + fn
        return ops.mean(ops.where(denominator > 0, tp / ops.maximum(denominator, 1.0), 1.0))


def pooled_scores(predictions, masks, num_classes=2):
    """F1 and IoU over all pixels (NumPy), mean over foreground classes: the Keras metrics' numbers."""
    f1s, ious = [], []
    for c in range(1, num_classes):
        tp = np.sum((predictions == c) & (masks == c))
        fp = np.sum((predictions == c) & (masks != c))
        fn = np.sum((predictions != c) & (masks == c))
        f1s.append(1.0 if 2 * tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        ious.append(1.0 if tp + fp + fn == 0 else tp / (tp + fp + fn))
    return float(np.mean(f1s)), float(np.mean(ious))


def official_protocol_scores(predictions, masks, tp_zero_scores_one=True):
    """Mean over images of the per-image foreground F1 and IoU (binary masks), as the paper's scripts.

    Args:
        predictions, masks: ``(images, h, w)`` arrays, foreground = nonzero.
        tp_zero_scores_one: score an image with no true positive as F1 = IoU
            = 1, as the official MATLAB scripts do (even for a total miss).

    Returns:
        ``(mean F1, mean IoU)``.
    """
    f1s, ious = [], []
    for prediction, mask in zip(predictions, masks):
        prediction, mask = prediction > 0, mask > 0
        tp = np.sum(prediction & mask)
        fp = np.sum(prediction & ~mask)
        fn = np.sum(~prediction & mask)
        if tp == 0:
            if tp_zero_scores_one:
                f1s.append(1.0)
                ious.append(1.0)
            else:
                empty = fp + fn == 0
                f1s.append(1.0 if empty else 0.0)
                ious.append(1.0 if empty else 0.0)
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
        ious.append(tp / (tp + fp + fn))
    return float(np.mean(f1s)), float(np.mean(ious))
