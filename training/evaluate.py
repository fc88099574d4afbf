"""``medt-evaluate``: predicted masks against ground truth, per image and overall.

    medt-evaluate predictions/ ground_truth/ --images frames/ --report report/

Predictions and ground truth are mask images matched by file stem (a
prediction ``x.png`` for ground truth ``x.png`` / ``x.tif``; ``medt-predict``'s
own ``_overlay`` and ``_probabilities`` files are skipped). Binary masks
(``--num-classes 2``, the default) are foreground where the value is
> ``--mask-threshold`` (127, the official loader's rule; a 0/1 mask has no
value above 127, so masks whose maximum is 1 are read as 0/1); with more
classes the values are class indices.

``evaluate_test`` and ``evaluate_test_tiled`` score a trained model on its
test split for ``medt-train``; both commands report the paper's per-image
protocol through ``official_scores`` and draw their pictures through
``write_preview``.

Reported, per image and overall: foreground F1 (Dice) = 2TP / (2TP + FP +
FN) and IoU = TP / (TP + FP + FN), mean over foreground classes; overall
both pooled over all pixels and as the mean of the per-image scores. An
image with no foreground in ground truth or prediction has no F1/IoU: its
row reads ``nan``, it is left out of the per-image mean and counted
(``images_without_foreground``); a pooled score with no foreground in the
whole set is NaN with a warning, ``null`` in ``summary.json``. With
``--official-protocol`` the per-image mean scores an image without any true
positive as 1, as the paper's MATLAB scripts do (``official_mean_f1``), so
the numbers compare with the paper's table; it is never the headline. Writes ``per_image.csv``, ``summary.json`` and
``report.png`` (the best and worst images as overlays).
"""

import argparse
import json
import os
import sys

import numpy as np

from medt_keras.datasets.images import DatasetError, percentile_normalize, read_image_native
from training.files import atomic_write_csv, atomic_write_text
from medt_keras.metrics import json_safe, official_protocol_scores, pooled_scores

MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")


def _index(folder, skip_suffixes=("_overlay", "_probabilities")):
    if not os.path.isdir(folder):
        raise DatasetError(f"{folder}: folder not found.")
    found = {}
    for filename in sorted(os.listdir(folder)):
        stem, suffix = os.path.splitext(filename)
        if suffix.lower() in MASK_SUFFIXES and not filename.startswith(".") and not stem.endswith(skip_suffixes):
            found[stem] = os.path.join(folder, filename)
    if not found:
        raise DatasetError(f"{folder}: no mask images ({', '.join(MASK_SUFFIXES)}).")
    return found


def read_classes(path, num_classes, threshold=127):
    mask = read_image_native(path)[..., 0]
    if num_classes == 2:
        return (mask > (0 if mask.max() <= 1 else threshold)).astype(np.int64)
    if mask.max() >= num_classes:
        raise DatasetError(f"{path}: value {mask.max()} is not a class index below {num_classes}.")
    return mask.astype(np.int64)


def image_scores(prediction, truth, num_classes):
    f1, iou = pooled_scores(prediction, truth, num_classes, warn=False)  # NaN: nothing to find, counted later
    counts = {}
    for name, where in (("tp", (prediction > 0) & (prediction == truth)), ("fp", (prediction > 0) & (prediction != truth)),
                        ("fn", (truth > 0) & (prediction != truth))):
        counts[name] = int(where.sum())
    return f1, iou, counts


def evaluate_folders(predictions_dir, truth_dir, num_classes=2, threshold=127, official_protocol=False):
    """Per-image rows and the summary; every prediction needs its ground truth and the same size."""
    predictions, truths = _index(predictions_dir), _index(truth_dir)
    missing = sorted(set(predictions) - set(truths))
    if missing:
        raise DatasetError(f"{predictions[missing[0]]}: no ground truth named {missing[0]}.* in {truth_dir}.")
    rows, all_predictions, all_truths = [], [], []
    for stem, path in predictions.items():
        prediction = read_classes(path, num_classes, threshold)
        truth = read_classes(truths[stem], num_classes, threshold)
        if prediction.shape != truth.shape:
            raise DatasetError(f"{path}: {prediction.shape[0]}x{prediction.shape[1]} but the ground truth "
                               f"{truths[stem]} is {truth.shape[0]}x{truth.shape[1]}.")
        f1, iou, counts = image_scores(prediction, truth, num_classes)
        rows.append(dict(name=stem, f1=f1, iou=iou, **counts))
        all_predictions.append(prediction.ravel())
        all_truths.append(truth.ravel())
    pooled_f1, pooled_iou = pooled_scores(np.concatenate(all_predictions), np.concatenate(all_truths), num_classes)
    summary = dict(
        images=len(rows),
        ground_truth_without_prediction=sorted(set(truths) - set(predictions)),
        pooled_f1=pooled_f1,
        pooled_iou=pooled_iou,
        mean_f1=_mean_defined([r["f1"] for r in rows]),
        mean_iou=_mean_defined([r["iou"] for r in rows]),
        images_without_foreground=int(sum(np.isnan(r["f1"]) for r in rows)),
    )
    if official_protocol:
        if num_classes != 2:
            raise ValueError("--official-protocol is the binary protocol of the paper; use it with two classes.")
        masks = [read_classes(truths[r["name"]], 2, threshold) for r in rows]
        preds = [read_classes(predictions[r["name"]], 2, threshold) for r in rows]
        for row, prediction, mask in zip(rows, preds, masks):
            scores = official_scores([prediction], [mask])
            row["official_f1"], row["official_iou"] = scores["official_f1"], scores["official_iou"]
        scores = official_scores(preds, masks)
        summary["official_mean_f1"], summary["official_mean_iou"] = scores["official_f1"], scores["official_iou"]
    return rows, summary, predictions, truths


def _mean_defined(values):
    """Mean of the values that are not NaN; NaN if none is."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def official_scores(predictions, masks):
    """The paper's per-image protocol over binary ``predictions`` and ``masks`` (lists of (h, w) arrays).

    ``official_f1`` / ``official_iou``: the mean over images, an image with
    no true positive scored 1 as the MATLAB scripts do; ``*_tp0_as_0``: such
    an image scored 0 unless it is empty in both (``medt_keras.metrics``).
    """
    f1, iou = official_protocol_scores(predictions, masks)
    strict_f1, strict_iou = official_protocol_scores(predictions, masks, tp_zero_scores_one=False)
    return dict(official_f1=f1, official_iou=iou, official_f1_tp0_as_0=strict_f1, official_iou_tp0_as_0=strict_iou)


def write_preview(images, masks, predictions, names, path, count=None, width=768, order=None):
    """``path``: examples as image | ground truth | prediction, one row each.

    Shown: those at the indices ``order`` in that order or else, in their
    own order, the ``count`` with the most foreground. Examples of different
    sizes are cut to the smallest common size (top-left) and subsampled by
    an integer step so three panels fit in about ``width`` pixels; small
    ones are drawn enlarged.
    """
    from training.visualize import prediction_grid

    chosen = order if order is not None else np.sort(np.argsort([-(m > 0).sum() for m in masks], kind="stable")[:count])
    height = min(masks[i].shape[0] for i in chosen)
    side = min(masks[i].shape[1] for i in chosen)
    step = max(1, -(-side * 3 // width))
    shown = [np.stack([a[i][:height:step, :side:step] for i in chosen]) for a in (images, masks, predictions)]
    scale = 1 if max(shown[1].shape[1:]) >= 256 else None
    return prediction_grid(*shown, path, names=[names[i] for i in chosen], scale=scale)


def write_report(rows, predictions, truths, num_classes, threshold, path, images_dir=None, count=3, width=1200):
    """``report.png``: the ``count`` best and worst images by F1, as image | ground truth | overlay."""
    ordered = sorted(rows, key=lambda r: -1.0 if np.isnan(r["f1"]) else r["f1"])
    chosen = ordered[-count:][::-1] + [r for r in ordered[:count] if r not in ordered[-count:]]
    pictures, masks, preds, names = [], [], [], []
    for row in chosen:
        truth = read_classes(truths[row["name"]], num_classes, threshold)
        prediction = read_classes(predictions[row["name"]], num_classes, threshold)
        image = truth[..., None].astype(np.float32)
        if images_dir:
            candidates = [os.path.join(images_dir, row["name"] + s) for s in (".png", ".tif", ".tiff", ".jpg", ".bmp")]
            found = [c for c in candidates if os.path.isfile(c)]
            if found:
                image = percentile_normalize(read_image_native(found[0]).astype(np.float32), per_channel=True)
        pictures.append(image)
        masks.append(truth)
        preds.append(prediction)
        names.append(f"{row['name']}  F1 {row['f1']:.3f}")
    return write_preview(pictures, masks, preds, names, path, width=width, order=range(len(masks)))


def evaluate_test(model, batches, config, directory, full=True):
    """``medt-train``'s test on model-size examples: pooled F1/IoU, the official protocol, the picture.

    ``full=False`` (a multi-process run, where no process holds whole
    predictions): the Keras metrics only.
    """
    results = model.evaluate(batches, verbose=0, return_dict=True)
    if not full:
        return dict(f1=float(results["f1"]), iou=float(results["iou"]), loss=float(results["loss"]),
                    official_f1=float("nan"), official_iou=float("nan"))
    predictions, masks, images, logit_threshold = [], [], [], []
    for index in range(batches.num_batches):
        x, y, *weights = batches[index]
        # The whole padded batch: one predict program for every batch.
        logits = np.asarray(model.predict_on_batch(x))
        if weights:  # padded copies out
            keep = weights[0].reshape(len(y), -1)[:, 0] > 0
            x, y, logits = x[keep], y[keep], logits[keep]
        predictions.append(np.argmax(logits, axis=-1))
        if config.num_classes == 2:
            logit_threshold.append(logits[..., 1] >= 0.5)
        masks.append(y)
        images.append(x)
    predictions, masks, images = np.concatenate(predictions), np.concatenate(masks), np.concatenate(images)
    f1, iou = pooled_scores(predictions, masks, config.num_classes)
    report = dict(f1=float(results["f1"]), iou=float(results["iou"]), loss=float(results["loss"]),
                  f1_numpy_check=f1, iou_numpy_check=iou, examples=int(len(masks)))
    if config.num_classes == 2:
        report.update(official_scores(predictions, masks))
        threshold = official_scores(np.concatenate(logit_threshold), masks)
        report["official_logit_threshold_f1"] = threshold["official_f1"]
        report["official_logit_threshold_iou"] = threshold["official_iou"]
    else:
        report["official_f1"], report["official_iou"] = f1, iou
    _test_preview(config, images, masks, predictions, batches, directory)
    return report


def evaluate_test_tiled(model, batches, config, directory):
    """The ``tiled`` protocol on the test split: whole images, sliding windows, pooled and per-image scores.

    ``f1``/``iou``: pooled over all pixels of the whole test images (NaN if
    undefined); ``official_*``: the paper's per-image mean on the same whole
    images (``official_scores``).
    """
    from training.whole_image import whole_image_scores

    scores, kept = whole_image_scores(model, batches, config.num_classes, config.tile_overlap, keep=True)
    images, masks, predictions = ([k[i] for k in kept] for i in range(3))
    report = dict(f1=scores["f1"], iou=scores["iou"], loss=scores["loss"], examples=len(kept),
                  pixels=scores["pixels"])
    if config.num_classes == 2:
        report.update(official_scores(predictions, masks))
    else:
        report["official_f1"], report["official_iou"] = scores["f1"], scores["iou"]
    _test_preview(config, images, masks, predictions, batches, directory)
    return report


def _test_preview(config, images, masks, predictions, batches, directory):
    count = min(config.preview_images, len(masks))
    if count:
        write_preview(images, masks, predictions, batches.names(), os.path.join(directory, "test_predictions.png"),
                      count)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="medt-evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", help="folder of predicted masks")
    parser.add_argument("ground_truth", help="folder of ground-truth masks (same stems)")
    parser.add_argument("--num-classes", type=int, default=2)
    parser.add_argument("--mask-threshold", type=int, default=127)
    parser.add_argument("--official-protocol", action="store_true",
                        help="also the paper's per-image mean with TP = 0 scored 1")
    parser.add_argument("--images", help="folder of the input images, shown in the report")
    parser.add_argument("--report-width", type=int, default=1200, help="report.png width in pixels, about")
    parser.add_argument("--report", help="folder for per_image.csv, summary.json and report.png (default: predictions)")
    args = parser.parse_args(argv)
    report_dir = args.report or args.predictions
    try:
        rows, summary, predictions, truths = evaluate_folders(
            args.predictions, args.ground_truth, args.num_classes, args.mask_threshold, args.official_protocol
        )
    except (DatasetError, ValueError) as error:
        print(f"medt-evaluate: error: {error}", file=sys.stderr)
        return 2
    os.makedirs(report_dir, exist_ok=True)
    atomic_write_csv(os.path.join(report_dir, "per_image.csv"), rows, float_format="{:.6f}")
    atomic_write_text(os.path.join(report_dir, "summary.json"), json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    write_report(rows, predictions, truths, args.num_classes, args.mask_threshold,
                 os.path.join(report_dir, "report.png"), args.images, width=args.report_width)
    excluded = summary["images_without_foreground"]
    text = (f"medt-evaluate: {summary['images']} images"
            + (f" ({excluded} without any foreground, left out of the per-image mean)" if excluded else "")
            + f": pooled F1 {summary['pooled_f1']:.4f} IoU "
            f"{summary['pooled_iou']:.4f}; per-image mean F1 {summary['mean_f1']:.4f} IoU {summary['mean_iou']:.4f}")
    if args.official_protocol:
        text += f"; official protocol F1 {summary['official_mean_f1']:.4f} IoU {summary['official_mean_iou']:.4f}"
    print(text + f"; report in {report_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
