"""Folding an image into a grid of patches stacked along the batch axis."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="medt_keras")
class PatchFold(keras.layers.Layer):
    """Cuts each image into a ``grid x grid`` array of patches, folded into the batch.

    Patches are ordered batch-major, then row-major: output item
    ``n * grid**2 + i * grid + j`` is patch (row i, column j) of image n.
    Each image's patches are contiguous, so a batch sharded over devices
    stays sharded with no data moving between them; the items of one patch
    position are every ``grid**2``-th, the interleaved groups of
    ``BatchNorm(batch_groups=grid**2)``, which normalises each patch
    position with its own statistics, as the official MedT local branch
    does by running once per patch.

    Input shape: ``(batch, height, width, channels)``, height and width
    divisible by ``grid``.
    Output shape: ``(grid**2 * batch, height // grid, width // grid, channels)``.
    """

    def __init__(self, grid=4, **kwargs):
        super().__init__(**kwargs)
        self.grid = int(grid)

    def build(self, input_shape):
        _, height, width, _ = input_shape
        for size, axis in ((height, "height"), (width, "width")):
            if size is not None and size % self.grid:
                raise ValueError(
                    f"{self.name}: input {axis} {size} is not divisible by the patch grid {self.grid}."
                )

    def call(self, inputs):
        g = self.grid
        _, height, width, channels = ops.shape(inputs)
        ph, pw = height // g, width // g
        x = ops.reshape(inputs, (-1, g, ph, g, pw, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, ph, pw, channels))

    def compute_output_shape(self, input_shape):
        batch, height, width, channels = input_shape
        g = self.grid
        return (
            None if batch is None else batch * g * g,
            None if height is None else height // g,
            None if width is None else width // g,
            channels,
        )

    def get_config(self):
        config = super().get_config()
        config["grid"] = self.grid
        return config
