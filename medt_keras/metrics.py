"""Segmentation metrics: in-graph Keras metrics and the official evaluation protocol.

Keras metrics (``ForegroundF1``, ``ForegroundIoU``) accumulate true/false
positives and false negatives of every foreground class over all pixels of
the split (prediction = argmax of the logits) and report the mean over the
foreground classes (for two classes: the class-1 score). These are the
numbers of ``shared/reference/hela-official.md``. A sample weight
multiplies each pixel's counts (0 leaves it out), but Keras passes
``sample_weight`` only to metrics compiled as ``weighted_metrics``: under
``compile(metrics=...)`` every pixel counts once, whatever its weight.

A class with no foreground pixel in either ground truth or prediction
(TP + FP + FN = 0) has no F1 or IoU: it is left out of the mean over
classes, and when no class has a score the result is NaN (Keras logs
``nan``; ``pooled_scores`` warns), never 1. Crops or splits without any
object must not look perfect. ``json_safe`` turns NaN into ``null`` for the
JSON reports.

``official_protocol_scores`` reproduces the paper's evaluation (the MATLAB
scripts the authors point to): F1 = 2TP / (2TP + FP + FN) and IoU =
TP / (TP + FP + FN) per image, averaged over images, with an image whose
TP = 0 scored 1 (a quirk of those scripts, kept behind a flag).
"""

import math
import warnings

import numpy as np

import keras
from keras import ops


def _defined_mean(scores, defined):
    """Mean of ``scores`` over the classes where ``defined``; NaN (0 / 0) where none is."""
    defined = ops.cast(defined, "float32")
    return ops.sum(ops.where(defined > 0, scores, 0.0)) / ops.sum(defined)


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
        # Per-pixel weights scale each pixel's count (0 leaves a padded pixel out);
        # they multiply the counts, not the indicators, which must stay 0/1.
        weight = 1.0 if sample_weight is None else ops.cast(ops.reshape(sample_weight, (-1, 1)), "float32")
        self.true_positives.assign_add(ops.sum(truth * guess * weight, axis=0))
        self.false_positives.assign_add(ops.sum((1.0 - truth) * guess * weight, axis=0))
        self.false_negatives.assign_add(ops.sum(truth * (1.0 - guess) * weight, axis=0))

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
    """Foreground F1 (Dice) over all pixels seen, mean over foreground classes; NaN when there is nothing to find."""

    def __init__(self, num_classes=2, name="f1", **kwargs):
        super().__init__(num_classes, name=name, **kwargs)

    def result(self):
        tp, fp, fn = self._counts()
        denominator = 2.0 * tp + fp + fn
        return _defined_mean(2.0 * tp / ops.maximum(denominator, 1.0), denominator > 0)


@keras.saving.register_keras_serializable(package="medt_keras")
class ForegroundIoU(_ForegroundCounts):
    """Foreground intersection over union over all pixels seen, mean over foreground classes; NaN as F1."""

    def __init__(self, num_classes=2, name="iou", **kwargs):
        super().__init__(num_classes, name=name, **kwargs)

    def result(self):
        tp, fp, fn = self._counts()
        denominator = tp + fp + fn
        return _defined_mean(tp / ops.maximum(denominator, 1.0), denominator > 0)


def class_counts(predictions, masks, num_classes=2):
    """``(num_classes - 1, 3)`` int64 TP, FP, FN of each foreground class; arrays of any equal shape."""
    predictions, masks = np.asarray(predictions), np.asarray(masks)
    rows = []
    for c in range(1, num_classes):
        guess, truth = predictions == c, masks == c
        rows.append([np.sum(guess & truth), np.sum(guess & ~truth), np.sum(~guess & truth)])
    return np.array(rows, np.int64).reshape(-1, 3)


def scores_from_counts(counts, warn=True, where="the split"):
    """Pooled ``(F1, IoU)`` from ``class_counts`` (summed over images); NaN when no class has any foreground.

    A class with TP + FP + FN = 0 is left out of the mean over classes;
    with none left the scores are undefined: NaN, with a warning unless
    ``warn`` is false.
    """
    counts = np.asarray(counts, np.float64).reshape(-1, 3)
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    defined = tp + fp + fn > 0
    if not defined.any():
        if warn:
            warnings.warn(f"F1/IoU undefined on {where}: no foreground pixel in ground truth or prediction; "
                          "reported as NaN (null in JSON), not 1.", RuntimeWarning, stacklevel=2)
        return float("nan"), float("nan")
    f1 = 2 * tp[defined] / (2 * tp[defined] + fp[defined] + fn[defined])
    iou = tp[defined] / (tp[defined] + fp[defined] + fn[defined])
    return float(np.mean(f1)), float(np.mean(iou))


def pooled_scores(predictions, masks, num_classes=2, warn=True):
    """F1 and IoU over all pixels (NumPy), mean over foreground classes: the Keras metrics' numbers.

    NaN (with a warning unless ``warn`` is false) when neither ground truth
    nor prediction has any foreground pixel.
    """
    return scores_from_counts(class_counts(predictions, masks, num_classes), warn=warn)


def json_safe(value):
    """``value`` with every NaN or infinite float replaced by ``None`` (JSON ``null``), recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value


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
