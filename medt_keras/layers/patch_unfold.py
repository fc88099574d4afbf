"""The inverse of PatchFold: patches in the batch back into whole images."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="medt_keras")
class PatchUnfold(keras.layers.Layer):
    """Reassembles ``grid x grid`` patches folded by ``PatchFold`` into images.

    Input shape: ``(grid**2 * batch, patch_height, patch_width, channels)``,
    batch-major as ``PatchFold`` writes it (item ``n * grid**2 + i * grid + j``
    is patch (i, j) of image n).
    Output shape: ``(batch, grid * patch_height, grid * patch_width, channels)``.
    """

    def __init__(self, grid=4, **kwargs):
        super().__init__(**kwargs)
        self.grid = int(grid)

    def call(self, inputs):
        g = self.grid
        _, ph, pw, channels = ops.shape(inputs)
        x = ops.reshape(inputs, (-1, g, g, ph, pw, channels))
        x = ops.transpose(x, (0, 1, 3, 2, 4, 5))
        return ops.reshape(x, (-1, g * ph, g * pw, channels))

    def compute_output_shape(self, input_shape):
        batch, ph, pw, channels = input_shape
        g = self.grid
        return (
            None if batch is None else batch // (g * g),
            None if ph is None else ph * g,
            None if pw is None else pw * g,
            channels,
        )

    def get_config(self):
        config = super().get_config()
        config["grid"] = self.grid
        return config
