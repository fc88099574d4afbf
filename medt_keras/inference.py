"""Sliding-window inference: a model of one input size applied to images of any size.

The image is covered by tiles of the model's size, placed every ``stride``
pixels with the last tile of each row and column flush with the image's
edge. Tiles go to the model ``batch_size`` at a time, the last batch padded
with blank tiles (whose outputs are dropped), so one compiled program (the
model's forward and a float32 softmax, ``TilePredictor``) serves every batch
of every image of any size. Each tile's probabilities are weighted by a
separable window that is largest at the tile's centre (a Gaussian, or a
linear ramp), summed into a float32 ``(height, width, classes)`` accumulator
and divided by the sum of the windows. The host blends batch ``i`` while the
device computes batch ``i + 1`` (JAX's asynchronous dispatch).

Guarantees (tested): an image covered by a single tile (the model's size, or
smaller and padded) returns exactly the program's float32 softmax of that
tile; a pixel that only one tile covers gets that tile's probabilities within
float32 rounding (a window weight multiplied in and divided out: 1e-6
relative); blended pixels sum to 1 within float32 rounding. The program's
softmax equals the float64 ``softmax`` of ``model.predict_on_batch`` within
float32 rounding (it runs at ``batch_size`` tiles, and in float32).
"""

import weakref

import numpy as np

from medt_keras import compiler

BLENDS = ("gaussian", "linear", "uniform")


def tile_starts(length, tile, stride):
    """Start offsets of tiles of size ``tile`` covering ``[0, length)``; the last one ends at ``length``."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def blend_axes(height, width, blend="gaussian"):
    """The window's two factors: ``(height,)`` and ``(width,)`` float64, 1 at the centre, positive."""
    if blend not in BLENDS:
        raise ValueError(f"blend: {blend!r} is not one of {', '.join(BLENDS)}.")
    axes = []
    for n in (height, width):
        if blend == "uniform":
            axes.append(np.ones(n))
            continue
        position = (np.arange(n) + 0.5) / n - 0.5  # -0.5 .. 0.5 across the tile
        if blend == "gaussian":
            weights = np.exp(-0.5 * (position / 0.125) ** 2)  # sigma = 1/8 of the tile
        else:
            weights = 1.0 - 2.0 * np.abs(position)
        axes.append(np.maximum(weights / weights.max(), 1e-3))
    return axes[0], axes[1]


def blend_window(height, width, blend="gaussian"):
    """``(height, width)`` float64 weights, 1 at the centre, positive everywhere."""
    rows, columns = blend_axes(height, width, blend)
    return rows[:, None] * columns[None, :]


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)


def model_tile_size(model):
    shape = model.input_shape
    return int(shape[1]), int(shape[2])


# One jitted forward per model, kept while the model lives: the jit cache then
# holds one program per tile-batch shape, compiled once for all images.
_PROGRAMS = weakref.WeakKeyDictionary()


def _program(model):
    program = _PROGRAMS.get(model)
    if program is None:
        import jax
        import jax.numpy as jnp

        owner = weakref.ref(model)  # a strong reference from the value would keep its key alive forever

        def probabilities(trainable, non_trainable, tiles):
            logits, _ = owner().stateless_call(trainable, non_trainable, tiles, training=False)
            return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)

        program = compiler.jit(probabilities, "inference")
        _PROGRAMS[model] = program
    return program


class TilePredictor:
    """Float32 softmax probabilities of batches of tiles, through one compiled program per batch shape.

    ``TilePredictor(model)(tiles)``: ``tiles`` ``(batch, th, tw, channels)``
    float32 -> ``(batch, th, tw, classes)`` float32. On the JAX backend the
    result is a JAX array returned before the device has finished
    (``np.asarray`` waits for it). The weights are read at every call: Keras'
    own train and predict functions donate the variables' buffers, so values
    read earlier may be gone. Other backends: ``model.predict_on_batch`` and
    a float64 softmax.
    """

    def __init__(self, model):
        import keras

        self.model = model
        self.jax = keras.backend.backend() == "jax"
        if self.jax:
            self.program = _program(model)
            # Collecting the variables walks every layer; their values are read per call.
            self.trainable = list(model.trainable_variables)
            self.non_trainable = list(model.non_trainable_variables)

    def __call__(self, tiles):
        if self.jax:
            trainable = [v.value for v in self.trainable]
            return self.program(trainable, [v.value for v in self.non_trainable], tiles)
        return softmax(self.model.predict_on_batch(tiles))


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
        batch_size: tiles per model call; every call gets exactly this many
            (the last batch padded), so one program serves all images.
        blend: ``"gaussian"``, ``"linear"`` or ``"uniform"`` tile weights.
        progress: show a Keras progress bar over the tiles.

    An image smaller than a tile is padded by reflection and the result
    cropped back. Memory: the image, the float32 ``(height, width, classes)``
    sums and one batch of tiles; never one array per tile.
    """
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"image: expected (height, width, channels), got shape {image.shape}.")
    tile_h, tile_w = tile_size or model_tile_size(model)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}.")
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    height, width = image.shape[:2]
    pad_h, pad_w = max(0, tile_h - height), max(0, tile_w - width)
    if pad_h or pad_w:
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric")
    full_h, full_w, channels = image.shape
    stride_h = max(1, int(round(tile_h * (1.0 - overlap))))
    stride_w = max(1, int(round(tile_w * (1.0 - overlap))))
    rows, columns = tile_starts(full_h, tile_h, stride_h), tile_starts(full_w, tile_w, stride_w)
    corners = [(y, x) for y in rows for x in columns]
    axis_h, axis_w = blend_axes(tile_h, tile_w, blend)
    window = (axis_h[:, None] * axis_w[None, :]).astype(np.float32)[..., None]
    predict = TilePredictor(model)
    bar = None
    if progress:
        import keras

        bar = keras.utils.Progbar(len(corners), unit_name="tile")
    state = {"total": None}

    def dispatch(start):
        chunk = corners[start : start + batch_size]
        tiles = np.zeros((batch_size, tile_h, tile_w, channels), np.float32)  # blank padding tiles
        for k, (y, x) in enumerate(chunk):
            tiles[k] = image[y : y + tile_h, x : x + tile_w]
        return chunk, predict(tiles)

    def accumulate(chunk, result):
        probabilities = np.asarray(result)[: len(chunk)]  # waits for the device; drops the padding
        if len(corners) == 1:
            state["total"] = probabilities[0]
        else:
            if state["total"] is None:
                state["total"] = np.zeros((full_h, full_w, probabilities.shape[-1]), np.float32)
            total = state["total"]
            weighted = probabilities * window
            for (y, x), tile in zip(chunk, weighted):
                total[y : y + tile_h, x : x + tile_w] += tile
        if bar is not None:
            bar.add(len(chunk))

    # Dispatch batch i + 1 before blending batch i, so host and device work at once.
    pending = dispatch(0)
    for start in range(batch_size, len(corners), batch_size):
        following = dispatch(start)
        accumulate(*pending)
        pending = following
    accumulate(*pending)
    total = state["total"]
    if len(corners) == 1:
        return np.array(total[:height, :width], np.float32)
    _divide_by_window_sums(total, (rows, axis_h), (columns, axis_w), height)
    return np.ascontiguousarray(total[:height, :width]) if (pad_h or pad_w) else total


def _divide_by_window_sums(total, vertical, horizontal, height):
    """``total`` (full_h, full_w, classes) divided in place by the sum of the tiles' windows over each pixel.

    ``vertical`` / ``horizontal``: the tiles' starts and their window along
    that axis. The windows' sum is separable (tiles on a grid): per-axis
    sums, multiplied a band of rows at a time, so no full-size window sum
    is ever held.
    """
    sums = []
    for (starts, axis), length in zip((vertical, horizontal), total.shape[:2]):
        summed = np.zeros(length)
        for start in starts:
            summed[start : start + len(axis)] += axis
        sums.append(summed)
    sum_h, sum_w = sums
    for top in range(0, height, 256):
        bottom = min(height, top + 256)
        total[top:bottom] /= (sum_h[top:bottom, None] * sum_w[None, :]).astype(np.float32)[..., None]
