"""``medt-evaluate``: predicted masks against ground truth, per image and overall.

    medt-evaluate predictions/ ground_truth/ --images frames/ --report report/

Predictions and ground truth are mask images matched by file stem (a
prediction ``x.png`` for ground truth ``x.png`` / ``x.tif``; ``medt-predict``'s
own ``_overlay`` and ``_probabilities`` files are skipped). Binary masks
(``--num-classes 2``, the default) are foreground where the value is
> ``--mask-threshold`` (127, the official loader's rule; a 0/1 mask has no
value above 127, so masks whose maximum is 1 are read as 0/1); with more
classes the values are class indices.

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
        scores = [official_protocol_scores([p], [m]) for p, m in zip(preds, masks)]
        for row, (f1, iou) in zip(rows, scores):
            row["official_f1"], row["official_iou"] = f1, iou
        summary["official_mean_f1"] = float(np.mean([s[0] for s in scores]))
        summary["official_mean_iou"] = float(np.mean([s[1] for s in scores]))
    return rows, summary, predictions, truths


def _mean_defined(values):
    """Mean of the values that are not NaN; NaN if none is."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def write_report(rows, predictions, truths, num_classes, threshold, path, images_dir=None, count=3, width=1200):
    """``report.png``: the ``count`` best and worst images by F1, as image | ground truth | overlay.

    Images wider than a third of ``width`` pixels are shown subsampled by an
    integer factor, so a report of whole histology images stays small.
    """
    from training.visualize import prediction_grid

    ordered = sorted(rows, key=lambda r: -1.0 if np.isnan(r["f1"]) else r["f1"])
    chosen = ordered[-count:][::-1] + [r for r in ordered[:count] if r not in ordered[-count:]]
    pictures, masks, preds, names = [], [], [], []
    size = None
    for row in chosen:
        truth = read_classes(truths[row["name"]], num_classes, threshold)
        prediction = read_classes(predictions[row["name"]], num_classes, threshold)
        image = truth[..., None].astype(np.float32)
        if images_dir:
            candidates = [os.path.join(images_dir, row["name"] + s) for s in (".png", ".tif", ".tiff", ".jpg", ".bmp")]
            found = [c for c in candidates if os.path.isfile(c)]
            if found:
                raw = read_image_native(found[0]).astype(np.float32)
                image = percentile_normalize(raw, per_channel=True)
        size = size or truth.shape
        if truth.shape != size:  # the grid needs one size: crop or pad to the first image's
            pad = [(0, max(0, size[0] - truth.shape[0])), (0, max(0, size[1] - truth.shape[1]))]
            truth, prediction = (np.pad(a, pad)[: size[0], : size[1]] for a in (truth, prediction))
            image = np.pad(image, pad + [(0, 0)])[: size[0], : size[1]]
        pictures.append(image)
        masks.append(truth)
        preds.append(prediction)
        names.append(f"{row['name']}  F1 {row['f1']:.3f}")
    step = max(1, -(-size[1] * 3 // width))
    pictures, masks, preds = (np.stack(a)[:, ::step, ::step] for a in (pictures, masks, preds))
    scale = 1 if max(masks.shape[1:]) >= 256 else None
    return prediction_grid(pictures, masks, preds, path, names=names, scale=scale)


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
