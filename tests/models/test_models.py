import numpy as np
import pytest

import keras

import medt_keras
from tests.conftest import TINY_IMG_SIZE, fast_first
from tests.conftest import TINY_MODEL as TINY
from weights_converter.__main__ import count_official_parameters


def test_default_medt_has_the_official_parameter_count():
    # Measured on the official code: MedT(img_size=128) has 1,560,140
    # parameters (35,570 of them dead, kept for exact round trips).
    model = medt_keras.MedT()
    assert count_official_parameters(model) == 1_560_140
    gates = [v for v in model.weights if "gate" in v.path]
    assert len(gates) == 24 and not any(v.trainable for v in gates)


@pytest.mark.parametrize(
    "cls,img_size,local",
    [
        (medt_keras.AxialUNet, 32, False),
        (medt_keras.GatedAxialUNet, 64, False),
        (medt_keras.MedT, 128, True),
        (medt_keras.LoGo, 128, True),
    ],
)
def test_output_is_logits_at_input_resolution(cls, img_size, local):
    model = cls(img_size=img_size, in_channels=1, num_classes=3, **TINY)
    assert model.input_shape == (None, img_size, img_size, 1)
    assert model.output_shape == (None, img_size, img_size, 3)
    assert any(layer.name.startswith("local_") for layer in model.layers) == local


def _blocks(model):
    return [layer for layer in model.layers if isinstance(layer, medt_keras.layers.AxialBlock)]


def test_gated_and_positional_layers_are_where_the_official_code_puts_them():
    medt = _blocks(medt_keras.MedT(**TINY))
    global_blocks = [b for b in medt if not b.name.startswith("local_")]
    local_blocks = [b for b in medt if b.name.startswith("local_")]
    assert len(global_blocks) == 2 and len(local_blocks) == 4
    assert all(b.gated and b.positional_encoding and b.batch_groups == 1 for b in global_blocks)
    assert all(not b.gated and not b.positional_encoding and b.batch_groups == 16 for b in local_blocks)
    logo = _blocks(medt_keras.LoGo(**TINY))
    assert all(b.positional_encoding and not b.gated for b in logo)


def test_gates_trainable_option():
    model = medt_keras.GatedAxialUNet(img_size=TINY_IMG_SIZE, gates_trainable=True, **TINY)
    assert sum("gate" in v.path for v in model.trainable_variables) == 4 * 2 * 4


@pytest.mark.slow
def test_local_branch_runs_one_graph_for_all_patches():
    # Each local BatchNorm counts 16 updates per train-mode forward, one
    # per patch, from a single call.
    import jax

    model = medt_keras.MedT(**TINY)
    x = np.random.default_rng(0).normal(size=(2, 128, 128, 3)).astype("float32")
    forward = jax.jit(lambda t, n, x: model.stateless_call(t, n, x, training=True))
    _, new = forward(
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        x,
    )
    counters = {
        v.path: int(n)
        for v, n in zip(model.non_trainable_variables, new)
        if v.path.endswith("num_batches_tracked")
    }
    assert counters["local_stem_norm1/num_batches_tracked"] == 16
    assert counters["stem_norm1/num_batches_tracked"] == 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(img_size=100), "divisible by 32"),
        (dict(blocks=(1, 2, 3)), "four positive block counts"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        medt_keras.AxialUNet(**{**TINY, **kwargs})


def test_medt_needs_image_divisible_by_patch_grid_times_32():
    with pytest.raises(ValueError, match="divisible by 128"):
        medt_keras.MedT(img_size=96, **TINY)


@pytest.mark.slow
def test_save_and_load_round_trip(tmp_path):
    model = medt_keras.MedT(in_channels=1, num_classes=3, **TINY)
    x = np.random.default_rng(1).normal(size=(1, 128, 128, 1)).astype("float32")
    path = tmp_path / "medt.keras"
    model.save(path)
    restored = keras.saving.load_model(path)
    assert type(restored) is medt_keras.MedT
    assert restored.get_config() == model.get_config()
    np.testing.assert_array_equal(restored.predict(x, verbose=0), model.predict(x, verbose=0))


def test_backend_defaults_to_jax():
    assert keras.backend.backend() == "jax"


@pytest.mark.parametrize(
    "cls,size",
    fast_first([pytest.param(medt_keras.MedT, (128, 256)), pytest.param(medt_keras.GatedAxialUNet, (64, 96)),
                pytest.param(medt_keras.LoGo, (256, 128))]),
)
def test_non_square_inputs(cls, size):
    model = cls(img_size=size, **TINY)
    assert model.output_shape == (None, *size, 2)
    spans = {
        (block.height_attention.span, block.width_attention.span)
        for block in _blocks(model)
        if block.positional_encoding and not block.name.startswith("local_")
    }
    assert (size[0] // 2, size[1] // 2) in spans  # each axis attends over its own length
    assert model.get_config()["img_size"] == list(size)
    x = np.random.default_rng(0).normal(size=(1, *size, 3)).astype("float32")
    assert model.predict(x, verbose=0).shape == (1, *size, 2)


def test_non_square_size_not_divisible_names_the_axis():
    with pytest.raises(ValueError, match="width 100 must be divisible by 32"):
        medt_keras.AxialUNet(img_size=(64, 100), **TINY)


def test_rematerialize_reaches_every_attention_layer_and_round_trips():
    model = medt_keras.MedT(img_size=128, rematerialize=True, **TINY)
    attention = [layer for block in _blocks(model) for layer in (block.height_attention, block.width_attention)]
    assert attention and all(layer.rematerialize for layer in attention)
    assert model.get_config()["rematerialize"] is True
    assert not any(b.height_attention.rematerialize for b in _blocks(medt_keras.MedT(img_size=128, **TINY)))


@pytest.mark.parametrize("cls", [medt_keras.MedT, medt_keras.LoGo, medt_keras.AxialUNet, medt_keras.GatedAxialUNet])
def test_attention_implementation_reaches_every_attention_layer_and_round_trips(cls):
    model = cls(img_size=64 if cls in (medt_keras.AxialUNet, medt_keras.GatedAxialUNet) else 128,
                attention="keras_ops", **TINY)
    attention = [layer for block in _blocks(model) for layer in (block.height_attention, block.width_attention)]
    assert attention and all(layer.attention == "keras_ops" for layer in attention)
    assert model.get_config()["attention"] == "keras_ops"
    restored = cls.from_config(model.get_config())
    assert all(b.width_attention.attention == "keras_ops" for b in _blocks(restored))


@pytest.mark.slow
def test_mixed_bfloat16_policy_trains_with_float32_statistics():
    # bf16 compute for accelerators; variables and BatchNorm statistics stay float32.
    rng = np.random.default_rng(0)
    x = rng.random((2, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 2, (2, 32, 32))
    reference = medt_keras.GatedAxialUNet(img_size=TINY_IMG_SIZE, **TINY)
    model = medt_keras.GatedAxialUNet(img_size=TINY_IMG_SIZE, dtype="mixed_bfloat16", **TINY)
    model.set_weights(reference.get_weights())
    assert all(b.height_attention.compute_dtype == "bfloat16" for b in _blocks(model))
    assert all(v.dtype in ("float32", "int32") for v in model.weights)
    expected = np.asarray(reference.predict_on_batch(x))
    logits = model.predict_on_batch(x)
    assert str(logits.dtype) == "bfloat16"
    logits = np.asarray(logits).astype("float32")
    # bf16 keeps 8 bits of mantissa: agreement to a few percent of the logit range.
    np.testing.assert_allclose(logits, expected, atol=0.05 * np.abs(expected).max())
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = model.train_on_batch(x, y)
    assert np.isfinite(loss)
    norms = [v for v in model.non_trainable_variables if "moving_variance" in v.path]
    assert norms and all(v.dtype == "float32" and np.all(np.isfinite(np.asarray(v.value))) for v in norms)
