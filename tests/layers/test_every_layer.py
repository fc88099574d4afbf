"""``tests/layer_checks.py`` applied to every layer and initialiser medt_keras registers."""

import keras
import pytest

import medt_keras
import medt_keras.layers
from medt_keras import initializers, layers
from medt_keras.layers.patch_product_conv2d import Conv2D as PreRenameConv2D
from tests.layer_checks import check_initializer, check_layer, registered_classes

POLICIES = ("float32", "float64", "mixed_bfloat16")

# class -> (dtype -> layer, input shape with batch): tiny shapes, so that all
# of them under every policy take seconds.
LAYER_CASES = {
    layers.AxialAttention: (
        lambda dtype: layers.AxialAttention(4, num_heads=2, axis="width", gated=True, strides=2, dtype=dtype),
        (2, 4, 4, 3),
    ),
    layers.AxialBlock: (lambda dtype: layers.AxialBlock(4, num_heads=2, gated=True, dtype=dtype), (2, 4, 4, 3)),
    layers.BatchNorm: (lambda dtype: layers.BatchNorm(batch_groups=2, dtype=dtype), (2, 2, 2, 3)),
    layers.PatchFold: (lambda dtype: layers.PatchFold(grid=2, dtype=dtype), (2, 4, 4, 3)),
    layers.PatchUnfold: (lambda dtype: layers.PatchUnfold(grid=2, dtype=dtype), (8, 2, 2, 3)),
    layers.PatchProductConv2D: (
        lambda dtype: layers.PatchProductConv2D(4, 3, padding="same", dtype=dtype),
        (2, 2, 2, 3),  # smaller than the window: the patch product
    ),
    PreRenameConv2D: (lambda dtype: PreRenameConv2D(4, 3, strides=2, padding="same", dtype=dtype), (2, 4, 4, 3)),
    layers.UnusedOfficialWeights: (
        lambda dtype: layers.UnusedOfficialWeights({"adjust_p.weight": (2, 3, 1, 1)}, dtype=dtype),
        (2, 2, 2, 3),
    ),
}

INITIALIZER_CASES = {
    initializers.FanInUniform: lambda seed: initializers.FanInUniform(seed=seed),
    initializers.Normal: lambda seed: initializers.Normal(0.5, seed=seed),
}


def _registered(base, exclude=()):
    found = {cls for cls in registered_classes() if issubclass(cls, base) and not issubclass(cls, exclude)}
    return sorted(found, key=lambda cls: cls.__name__ + cls.__module__)


# Models are layers too; tests/models covers them.
REGISTERED_LAYERS = _registered(keras.layers.Layer, exclude=keras.Model)
REGISTERED_INITIALIZERS = _registered(keras.initializers.Initializer)


def test_every_layer_is_registered_and_has_a_case():
    exported = {getattr(medt_keras.layers, name) for name in medt_keras.layers.__all__}
    assert exported <= set(REGISTERED_LAYERS), "every exported layer is registered for loading"
    missing = [cls.__name__ for cls in REGISTERED_LAYERS if cls not in LAYER_CASES]
    assert not missing, f"add a case to LAYER_CASES for {missing}"
    missing = [cls.__name__ for cls in REGISTERED_INITIALIZERS if cls not in INITIALIZER_CASES]
    assert not missing, f"add a case to INITIALIZER_CASES for {missing}"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("cls", REGISTERED_LAYERS, ids=lambda cls: f"{cls.__module__.split('.')[-1]}.{cls.__name__}")
def test_layer(cls, policy, tmp_path):
    if cls not in LAYER_CASES:
        pytest.fail(f"add a case to LAYER_CASES for {cls.__name__}")
    make_layer, input_shape = LAYER_CASES[cls]
    check_layer(make_layer, input_shape, policy, tmp_path)


@pytest.mark.parametrize("cls", REGISTERED_INITIALIZERS, ids=lambda cls: cls.__name__)
def test_initializer(cls):
    if cls not in INITIALIZER_CASES:
        pytest.fail(f"add a case to INITIALIZER_CASES for {cls.__name__}")
    check_initializer(INITIALIZER_CASES[cls])
