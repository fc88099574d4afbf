"""Holder for tensors the official checkpoints carry but the forward never uses."""

import keras


@keras.saving.register_keras_serializable(package="medt_keras")
class UnusedOfficialWeights(keras.layers.Layer):
    """Keeps dead official parameters so a checkpoint round-trips exactly.

    The official ``medt_net`` (MedT, LoGo) has parameters its forward never
    reads: ``adjust_p`` and, in MedT's local blocks, a 1x1 ``conv1``. They
    are kept here, non-trainable and in PyTorch layout, keyed by their
    official names, so that a converted checkpoint exported back to
    PyTorch loads with ``strict=True`` and equals the original. The layer
    passes its input through unchanged.

    Args:
        tensor_shapes: dict from official key to shape.
    """

    def __init__(self, tensor_shapes, **kwargs):
        super().__init__(**kwargs)
        self.tensor_shapes = {key: tuple(shape) for key, shape in tensor_shapes.items()}

    def build(self, input_shape):
        self.tensors = {
            key: self.add_weight(
                name=key.replace(".", "_"), shape=shape, initializer="zeros", trainable=False
            )
            for key, shape in self.tensor_shapes.items()
        }

    def call(self, inputs):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["tensor_shapes"] = {key: list(shape) for key, shape in self.tensor_shapes.items()}
        return config
