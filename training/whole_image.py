"""Validation and test on whole images with sliding-window inference (the ``tiled`` evaluation protocol).

A model trained on crops (or on any input smaller than the images) is
evaluated the way ``medt-predict`` segments: each whole image is covered
by overlapping tiles of the model's size, blended
(``medt_keras.inference.sliding_window_probabilities``), and the mask is
the argmax of the blended probabilities. F1 and IoU are pooled over every
pixel of the split (NaN when the split has no foreground in ground truth
or prediction, see ``medt_keras.metrics``). The ``resize`` protocol (each
image resized to the model's size, the paper's GlaS/MoNuSeg protocol) stays
with ``model.evaluate`` on ``SegmentationBatches``.
"""

import medt_keras  # noqa: F401  (selects the JAX backend before keras is imported)

import numpy as np

import keras

from medt_keras.inference import sliding_window_probabilities
from medt_keras.metrics import class_counts, scores_from_counts

PROTOCOLS = ("auto", "tiled", "resize")
# Tiles per model call in tiled evaluation: larger than training batches, as nothing is kept for a backward pass.
TILE_BATCH = 16


def resolve_protocol(config, *splits):
    """``"tiled"`` or ``"resize"`` for ``config.eval_protocol``; ``auto`` looks at the data.

    ``auto`` is ``tiled`` when training on crops or when any image of the
    given ``SegmentationBatches`` splits has a side larger than the
    model's input, else ``resize`` (model-size tiles, such as the HeLa
    demo's, are evaluated with ``model.evaluate`` as before; the two give
    the same numbers there).
    """
    if config.eval_protocol not in PROTOCOLS:
        raise ValueError(f"eval_protocol: {config.eval_protocol!r} is not one of {', '.join(PROTOCOLS)}.")
    if config.eval_protocol != "auto":
        return config.eval_protocol
    if config.crop_size:
        return "tiled"
    larger = any((split.image_shapes() > config.img_size).any() for split in splits)
    return "tiled" if larger else "resize"


def predict_whole_images(model, batches, overlap=0.25, batch_size=TILE_BATCH):
    """Yields ``(image (h, w, c) float32, mask (h, w) int32, probabilities (h, w, classes) float32)`` per example.

    ``batches``: a ``SegmentationBatches``; its examples are read whole
    (no resize, no flip, no crop).
    """
    for index in range(batches.size):
        image, mask = batches.example(index, resize=False)
        probabilities = sliding_window_probabilities(model, image, overlap=overlap, batch_size=batch_size)
        yield image, mask, probabilities


def _cross_entropy_sum(probabilities, mask):
    """Sum over pixels of -log p(true class) of the blended probabilities (the loss, up to the blend)."""
    chosen = np.take_along_axis(probabilities, mask[..., None].astype(np.int64), axis=-1)[..., 0]
    return float(-np.log(np.clip(chosen, 1e-7, 1.0)).sum())


def whole_image_scores(model, batches, num_classes, overlap=0.25, keep=False, warn=True):
    """Pooled F1, IoU and the pixel-mean cross-entropy over a split's whole images.

    Returns ``(scores, kept)``: ``scores`` a dict with ``f1``, ``iou``
    (NaN when undefined), ``loss`` and ``pixels``; ``kept`` a list of
    ``(image, mask, prediction)`` per image when ``keep``, else ``None``.
    """
    counts = np.zeros((num_classes - 1, 3), np.int64)
    loss, pixels, kept = 0.0, 0, [] if keep else None
    for image, mask, probabilities in predict_whole_images(model, batches, overlap):
        prediction = np.argmax(probabilities, axis=-1).astype(np.int32)
        counts += class_counts(prediction, mask, num_classes)
        loss += _cross_entropy_sum(probabilities, mask)
        pixels += mask.size
        if keep:
            kept.append((image, mask, prediction))
    f1, iou = scores_from_counts(counts, warn=warn, where=batches.name)
    return dict(f1=f1, iou=iou, loss=loss / pixels, pixels=int(pixels)), kept


class WholeImageValidation(keras.callbacks.Callback):
    """At each epoch's end, logs ``val_loss``, ``val_f1`` and ``val_iou`` of the whole validation images.

    Placed before the callbacks that read ``val_f1`` (the best-epoch
    choice, the CSV log); Keras' progress bar comes after all of them and
    prints the numbers.
    """

    def __init__(self, batches, num_classes, overlap=0.25):
        super().__init__()
        self.batches, self.num_classes, self.overlap = batches, num_classes, overlap

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        scores, _ = whole_image_scores(self.model, self.batches, self.num_classes, self.overlap)
        logs.update(val_loss=scores["loss"], val_f1=scores["f1"], val_iou=scores["iou"])
