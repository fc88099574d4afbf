import numpy as np
import pytest

import keras

from medt_keras.layers import AxialBlock


@pytest.mark.parametrize(
    "in_channels,strides,projection",
    [(8, 1, False), (4, 1, True), (8, 2, True)],
)
def test_shapes_and_shortcut(in_channels, strides, projection):
    block = AxialBlock(4, num_heads=2, strides=strides)
    y = block(np.random.default_rng(0).normal(size=(2, 8, 8, in_channels)).astype("float32"))
    assert y.shape == (2, 8 // strides, 8 // strides, 8)
    assert block.has_shortcut_projection == projection
    assert (getattr(block, "shortcut_conv", None) is not None) == projection
    assert float(np.min(y)) >= 0.0  # ends in ReLU


def test_identity_shortcut_adds_the_input():
    # With the residual branch's last BatchNorm zeroed, the block is relu(x).
    block = AxialBlock(4, num_heads=2)
    x = np.random.default_rng(1).normal(size=(1, 8, 8, 8)).astype("float32")
    block.build(x.shape)
    block.expand_norm.gamma.assign(np.zeros(8, "float32"))
    block.expand_norm.beta.assign(np.zeros(8, "float32"))
    np.testing.assert_allclose(np.asarray(block(x)), np.maximum(x, 0), atol=1e-6)


def test_both_attention_layers_share_span_and_only_width_strides():
    block = AxialBlock(8, num_heads=2, strides=2, gated=True)
    block.build((None, 16, 16, 8))
    assert block.height_attention.span == block.width_attention.span == 16
    assert block.height_attention.strides == 1 and block.width_attention.strides == 2
    assert block.height_attention.gated and block.width_attention.axis == "width"


def test_serialization_round_trip():
    block = AxialBlock(4, num_heads=2, strides=2, positional_encoding=False, batch_groups=4)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(block))
    assert restored.get_config() == block.get_config()
