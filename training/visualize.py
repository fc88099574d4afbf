"""Pictures of predictions: a PNG grid of image | ground truth | prediction overlay."""

import numpy as np

# Overlay colours: true positive, false positive, false negative.
TRUE_POSITIVE = np.array([40, 200, 60], np.float32)
FALSE_POSITIVE = np.array([230, 40, 200], np.float32)
FALSE_NEGATIVE = np.array([255, 200, 0], np.float32)
PALETTE = np.array(
    [[0, 0, 0], [40, 200, 60], [230, 40, 200], [255, 200, 0], [0, 160, 255], [255, 90, 40], [150, 90, 255]],
    np.float32,
)


def _display_image(image):
    """float [0, 1] (h, w, 1|3) -> uint8 RGB, contrast-stretched per image for visibility."""
    image = np.asarray(image, np.float32)
    low, high = np.percentile(image, [0.5, 99.5])
    image = np.clip((image - low) / max(high - low, 1e-6), 0, 1)
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image * 255.0


def overlay(image, mask, prediction, alpha=0.55):
    """The image with prediction against ground truth coloured (binary: TP green, FP magenta, FN amber)."""
    base = _display_image(image)
    out = base.copy()
    if max(mask.max(), prediction.max()) <= 1:
        for colour, where in (
            (TRUE_POSITIVE, (prediction > 0) & (mask > 0)),
            (FALSE_POSITIVE, (prediction > 0) & (mask == 0)),
            (FALSE_NEGATIVE, (prediction == 0) & (mask > 0)),
        ):
            out[where] = (1 - alpha) * base[where] + alpha * colour
    else:
        colours = PALETTE[prediction % len(PALETTE)]
        where = prediction > 0
        out[where] = (1 - alpha) * base[where] + alpha * colours[where]
    return out


def prediction_grid(images, masks, predictions, path, names=None, scale=None):
    """Writes a PNG: one row per example, columns image | ground truth | prediction overlay.

    Args:
        images: ``(n, h, w, 1|3)`` floats in [0, 1] (BGR images are shown as given).
        masks, predictions: ``(n, h, w)`` class indices.
        path: the PNG to write.
        scale: integer upscaling (default: enough for tiles to be about 256 px).
    """
    from PIL import Image, ImageDraw

    images, masks, predictions = np.asarray(images), np.asarray(masks), np.asarray(predictions)
    n, height, width = masks.shape
    scale = scale or max(1, 256 // max(height, width))
    gap, header = 4, 18
    tile_h, tile_w = height * scale, width * scale
    canvas = np.full((header + n * (tile_h + gap), 3 * (tile_w + gap), 3), 255, np.uint8)
    for row in range(n):
        truth = PALETTE[masks[row] % len(PALETTE)] if masks[row].max() > 1 else np.repeat(masks[row][..., None] > 0, 3, -1) * 255.0
        panels = [_display_image(images[row]), truth, overlay(images[row], masks[row], predictions[row])]
        for col, panel in enumerate(panels):
            panel = np.kron(panel, np.ones((scale, scale, 1))).astype(np.uint8)
            y, x = header + row * (tile_h + gap), col * (tile_w + gap)
            canvas[y : y + tile_h, x : x + tile_w] = panel
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for col, title in enumerate(["image", "ground truth", "prediction (green TP, magenta FP, amber FN)"]):
        draw.text((col * (tile_w + gap) + 2, 2), title, fill=(0, 0, 0))
    if names:
        for row, name in enumerate(names[:n]):
            draw.text((2, header + row * (tile_h + gap) + 2), str(name), fill=(255, 255, 0))
    from training.files import atomic_path

    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")
    return path
