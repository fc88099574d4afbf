import warnings

import jax
import keras
import numpy as np
import pytest

import medt_keras
from medt_keras.layers import PatchProductConv2D
from tests.conftest import FIXTURES


@pytest.fixture(scope="module", autouse=True)
def x64():
    medt_keras.enable_float64()


# (input shape, filters, kernel, strides, padding): images smaller than the
# window after the convolution, which take the patch product.
PATCH_CASES = [
    ((3, 2, 2, 5), 4, 3, 1, "same"),  # MedT's local decoder2 (2x2)
    ((3, 4, 4, 5), 4, 3, 2, "valid"),  # decoder1 after its explicit padding
    ((3, 2, 2, 5), 4, 3, 2, "same"),  # asymmetric "same" padding of a strided conv
    ((2, 3, 3, 5), 6, 4, 2, "same"),  # even kernel
    ((2, 2, 1, 3), 2, (3, 2), 1, "same"),  # rectangular kernel and image
]


def _pair(shape, filters, kernel, strides, padding, use_bias=True):
    ours = PatchProductConv2D(filters, kernel, strides=strides, padding=padding, use_bias=use_bias, dtype="float64")
    reference = keras.layers.Conv2D(
        filters, kernel, strides=strides, padding=padding, use_bias=use_bias, dtype="float64"
    )
    ours.build(shape)
    reference.build(shape)
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=w.shape) for w in ours.get_weights()]
    ours.set_weights(weights)
    reference.set_weights(weights)
    return ours, reference


def _output_and_gradients(layer, x):
    # Output and the gradients of a fixed weighting of it by kernel and input.
    def loss(kernel, bias, x):
        y, _ = layer.stateless_call([kernel, bias], [], x)
        return (y * np.cos(np.arange(y.size).reshape(y.shape))).sum(), y

    kernel, bias = (v.value for v in layer.trainable_variables)
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)(kernel, bias, x)
    return y, grads


@pytest.mark.parametrize("shape,filters,kernel,strides,padding", PATCH_CASES)
def test_patch_product_matches_keras_conv2d(shape, filters, kernel, strides, padding):
    ours, reference = _pair(shape, filters, kernel, strides, padding)
    assert ours._patches_are_faster(shape)
    x = np.random.default_rng(1).normal(size=shape)
    y, (d_kernel, d_x) = _output_and_gradients(ours, x)
    y_ref, (d_kernel_ref, d_x_ref) = _output_and_gradients(reference, x)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_kernel, d_kernel_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(d_x, d_x_ref, rtol=1e-12, atol=1e-12)


def test_larger_images_use_the_convolution():
    shape = (2, 8, 8, 3)
    ours, reference = _pair(shape, 4, 3, 1, "same", use_bias=False)
    assert not ours._patches_are_faster(shape)
    assert not ours._patches_are_faster((2, 2, 3, 3))  # only one axis below the window
    x = np.random.default_rng(2).normal(size=shape)
    np.testing.assert_array_equal(np.asarray(ours(x)), np.asarray(reference(x)))


def test_config_round_trip_keeps_the_class():
    layer = PatchProductConv2D(4, 3, strides=2, padding="valid", use_bias=False, name="decoder1")
    config = keras.saving.serialize_keras_object(layer)
    assert config["registered_name"] == "medt_keras>PatchProductConv2D"
    restored = keras.saving.deserialize_keras_object(config)
    assert type(restored) is PatchProductConv2D
    assert restored.get_config() == layer.get_config()


# conv2d_old_name.keras and .weights.h5 were saved before the rename, when
# PatchProductConv2D was medt_keras.layers.Conv2D (registered as
# "medt_keras>Conv2D", weights kept under layers/conv2d*): the model below,
# with weights drawn from default_rng(0) in float32.
def _model_with_both_convolutions():
    inputs = keras.Input((4, 4, 3))
    x = PatchProductConv2D(4, 3, strides=2, padding="same", name="decoder1")(inputs)  # 2x2: patches
    x = keras.layers.Conv2D(5, 1, name="keras_conv")(x)
    return keras.Model(inputs, PatchProductConv2D(2, 3, padding="same", name="decoder2")(x))


def _expected_weights(model):
    rng = np.random.default_rng(0)
    return [rng.normal(size=w.shape).astype("float32") for w in model.get_weights()]


def test_keras_files_saved_under_the_old_name_load():
    model = keras.saving.load_model(f"{FIXTURES}/conv2d_old_name.keras")
    for name in ("decoder1", "decoder2"):
        assert isinstance(model.get_layer(name), PatchProductConv2D)
    assert type(model.get_layer("keras_conv")) is keras.layers.Conv2D
    for got, want in zip(model.get_weights(), _expected_weights(model)):
        np.testing.assert_array_equal(got, want)
    reference = _model_with_both_convolutions()
    reference.set_weights(model.get_weights())
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(reference(x)), rtol=1e-6, atol=1e-6)


def test_weights_files_saved_under_the_old_name_load():
    from medt_keras import loading

    path = f"{FIXTURES}/conv2d_old_name.weights.h5"
    model = _model_with_both_convolutions()
    with pytest.raises(ValueError), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras's per-container warnings before it raises
        model.load_weights(path)  # the groups are named after the old class
    renames = loading._pre_rename_weight_paths(model)
    assert renames == {
        "layers/conv2d": "layers/patch_product_conv2d",
        "layers/conv2d_1": "layers/conv2d",
        "layers/conv2d_2": "layers/patch_product_conv2d_1",
    }
    assert loading._holds_paths(path, renames)
    loading._load_pre_rename_weights(model, path, renames)
    for got, want in zip(model.get_weights(), _expected_weights(model)):
        np.testing.assert_array_equal(got, want)
