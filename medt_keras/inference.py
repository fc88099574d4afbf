"""Sliding-window inference: a model of one input size applied to images of any size.

The image is covered by tiles of the model's size, placed every ``stride``
pixels with the last tile of each row and column flush with the image's
edge. Each tile's softmax probabilities are weighted by a window that is
largest at the tile's centre (a Gaussian, or a linear ramp) and the
weighted sum is divided by the sum of the weights. Sums are kept in float64,
so a pixel that only one tile covers gets exactly that tile's float32
probabilities back, and an image of the model's size gets exactly the
model's output.
"""

import numpy as np

BLENDS = ("gaussian", "linear", "uniform")


def tile_starts(length, tile, stride):
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``; the last one ends at ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_window(height, width, blend="gaussian"):
    """``(height, width)`` float64 weights, 1 at the centre, positive everywhere."""
    if blend not in BLENDS:
        raise ValueError(f"blend: {blend!r} is not one of {', '.join(BLENDS)}.")
    if blend == "uniform":
        return np.ones((height, width))
    axes = []
    for n in (height, width):
        position = (np.arange(n) + 0.5) / n - 0.5  # -0.5 .. 0.5 across the tile
        if blend == "gaussian":
            weights = np.exp(-0.5 * (position / 0.125) ** 2)  # sigma = 1/8 of the tile
        else:
            weights = 1.0 - 2.0 * np.abs(position)
        axes.append(np.maximum(weights / weights.max(), 1e-3))
    return axes[0][:, None] * axes[1][None, :]


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


def model_tile_size(model):
    shape = model.input_shape
    return int(shape[1]), int(shape[2])


def sliding_window_probabilities(
    model, image, tile_size=None, overlap=0.25, batch_size=8, blend="gaussian", progress=False
):
    """Softmax class probabilities ``(height, width, classes)`` float32 for one image of any size.

    Args:
        model: a Keras model mapping ``(batch, th, tw, channels)`` to logits
            ``(batch, th, tw, classes)``.
        image: ``(height, width, channels)`` float array, as the model expects it.
        tile_size: ``(th, tw)``; default the model's input size.
        overlap: fraction of a tile shared with its neighbour (0 <= overlap < 1).
        batch_size: tiles per model call.
        blend: ``"gaussian"``, ``"linear"`` or ``"uniform"`` tile weights.
        progress: show a Keras progress bar over the tiles.

    An image smaller than a tile is padded by reflection and the result cropped back.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"image: expected (height, width, channels), got shape {image.shape}.")
    tile_h, tile_w = tile_size or model_tile_size(model)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
    height, width = image.shape[:2]
    pad_h, pad_w = max(0, tile_h - height), max(0, tile_w - width)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    full_h, full_w = image.shape[:2]
    stride_h = max(1, int(round(tile_h * (1.0 - overlap))))
    stride_w = max(1, int(round(tile_w * (1.0 - overlap))))
    corners = [(y, x) for y in tile_starts(full_h, tile_h, stride_h) for x in tile_starts(full_w, tile_w, stride_w)]
    window = blend_window(tile_h, tile_w, blend)[..., None]
    total = None
    weight = np.zeros((full_h, full_w, 1))
    bar = None
    if progress:
        import keras

        bar = keras.utils.Progbar(len(corners), unit_name="tile")
    for start in range(0, len(corners), batch_size):
        chunk = corners[start : start + batch_size]
        tiles = np.stack([image[y : y + tile_h, x : x + tile_w] for y, x in chunk])
        probabilities = softmax(model.predict_on_batch(tiles))
        if total is None:
            total = np.zeros((full_h, full_w, probabilities.shape[-1]))
        for (y, x), p in zip(chunk, probabilities):
            total[y : y + tile_h, x : x + tile_w] += window * p
            weight[y : y + tile_h, x : x + tile_w] += window
        if bar is not None:
            bar.add(len(chunk))
    return (total / weight)[:height, :width].astype(np.float32)
