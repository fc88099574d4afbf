import numpy as np
import pytest

import keras

import medt_keras
from medt_keras.kernels import blocked_attention
from medt_keras.layers import AxialAttention
from tests.conftest import fast_first
from tests.official_reference import axial_attention, random_attention_params

GATES = {"f_qr": 0.7, "f_kr": 1.3, "f_sv": 0.9, "f_sve": 0.4}


@pytest.fixture(scope="module", autouse=True)
def x64():
    medt_keras.enable_float64()


def _keras_layer(params, x_nhwc, groups, axis, positional, gated, strides=1, attention="auto"):
    filters = params["qkv_weight"].shape[0] // 2
    layer = AxialAttention(
        filters,
        num_heads=groups,
        axis=axis,
        strides=strides,
        positional_encoding=positional,
        gated=gated,
        attention=attention,
        dtype="float64",
    )
    layer.build(x_nhwc.shape)
    layer.qkv_kernel.assign(params["qkv_weight"].T)
    for attribute, name in (
        ("qkv_norm", "bn_qkv"),
        ("similarity_norm", "bn_similarity"),
        ("output_norm", "bn_output"),
    ):
        norm, p = getattr(layer, attribute), params[name]
        shape = norm.gamma.shape
        norm.gamma.assign(p["weight"].reshape(shape))
        norm.beta.assign(p["bias"].reshape(shape))
        norm.moving_mean.assign(p["running_mean"].reshape(shape))
        norm.moving_variance.assign(p["running_var"].reshape(shape))
    if positional:
        layer.relative_embedding.assign(params["relative"].T)
    if gated:
        layer.gate_query_position.assign(GATES["f_qr"])
        layer.gate_key_position.assign(GATES["f_kr"])
        layer.gate_value.assign(GATES["f_sv"])
        layer.gate_value_position.assign(GATES["f_sve"])
    return layer


@pytest.fixture(params=["blocked", "keras_ops"])
def implementation(request, monkeypatch):
    # The blocked kernel in blocks of one line, so that these small maps
    # span several blocks; "keras_ops" is the form GPU and TPU use.
    monkeypatch.setattr(blocked_attention, "BLOCK_ELEMENTS", 1)
    return request.param


FORMS = [
    pytest.param(True, False, id="positional"),
    pytest.param(True, True, id="gated"),
    pytest.param(False, False, id="without-position"),
]


@pytest.mark.parametrize("positional,gated", FORMS)
@pytest.mark.parametrize("axis", ["height", "width"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize(
    "filters", fast_first([pytest.param(8, id="2-query-channels"), pytest.param(32, id="8-query-channels"),
                           pytest.param(16, id="4-query-channels")], 2)
)
def test_matches_official_formulas(positional, gated, axis, training, filters, implementation):
    # Over 2 heads, queries and keys get filters / 4 channels each. Inference
    # writes the logits over <= 4 channels as broadcast products and over more
    # as einsums: both forms are checked.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, filters, 6, 6))  # NCHW, square as the official code needs
    params = random_attention_params(rng, filters, filters, 2, 6, positional=positional)
    expected = axial_attention(
        x, params, 2, axis == "width", training, gates=GATES if gated else None, positional=positional
    )
    x_nhwc = x.transpose(0, 2, 3, 1)
    layer = _keras_layer(params, x_nhwc, 2, axis, positional, gated, attention=implementation)
    y = np.asarray(layer(x_nhwc, training=training)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-11 * np.abs(expected).max())


def test_one_query_channel_per_head_and_stride(implementation):
    # MedT's first stage has 2 channels per head (1 for q and k); the width
    # pass of a strided block pools after attention.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 16, 8, 8))
    params = random_attention_params(rng, 16, 16, 8, 8)
    expected = axial_attention(x, params, 8, True, True, gates=GATES, stride=2)
    x_nhwc = x.transpose(0, 2, 3, 1)
    layer = _keras_layer(params, x_nhwc, 8, "width", True, True, strides=2, attention=implementation)
    y = np.asarray(layer(x_nhwc, training=True)).transpose(0, 3, 1, 2)
    assert y.shape == (1, 16, 4, 4)
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-11 * np.abs(expected).max())


def test_span_mismatch_is_a_clear_error():
    layer = AxialAttention(8, num_heads=2, span=16, axis="height")
    with pytest.raises(ValueError, match="height is 8 but the positional encodings span 16"):
        layer.build((None, 8, 8, 8))


def test_without_positional_encoding_any_size_and_non_square():
    layer = AxialAttention(8, num_heads=2, axis="width", positional_encoding=False)
    y = layer(np.random.default_rng(0).normal(size=(2, 5, 12, 4)).astype("float32"))
    assert y.shape == (2, 5, 12, 8)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(filters=10, num_heads=4), "divisible by num_heads"),
        (dict(filters=6, num_heads=2), "must be even"),
        (dict(filters=8, num_heads=2, gated=True, positional_encoding=False), "gated=True needs"),
        (dict(filters=8, num_heads=2, axis="depth"), "axis must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AxialAttention(**kwargs)


def test_gates_frozen_by_default_and_trainable_on_request():
    frozen = AxialAttention(8, num_heads=2, gated=True)
    frozen.build((None, 4, 4, 8))
    assert not frozen.gate_query_position.trainable
    assert all("gate" not in v.path for v in frozen.trainable_variables)
    free = AxialAttention(8, num_heads=2, gated=True, gates_trainable=True)
    free.build((None, 4, 4, 8))
    assert sum("gate" in v.path for v in free.trainable_variables) == 4


@pytest.mark.parametrize("attention", ["auto", "keras_ops", "blocked"])
def test_serialization_round_trip(attention):
    layer = AxialAttention(8, num_heads=2, axis="width", strides=2, gated=True, attention=attention, name="attn")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, AxialAttention)
    assert restored.attention == attention
    assert restored.get_config() == layer.get_config()


def test_auto_takes_the_kernel_for_one_block_in_training_only(monkeypatch):
    # Maps of exactly one block: the kernel in training, keras.ops in
    # inference (where the kernel's loop lost at that size); the kernel
    # for both once the maps fill more than one block.
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("attention='auto' uses the kernel on the CPU only")
    calls = []
    kernel = blocked_attention.blocked_attention
    monkeypatch.setattr(blocked_attention, "blocked_attention", lambda *a: calls.append(1) or kernel(*a))
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 8))
    layer = AxialAttention(8, num_heads=2, dtype="float64")
    layer(x)
    one_block = 2 * 6 * 2 * 6 * 6  # (batch, lines, heads, L, L) of the height attention
    for block_elements, expected in ((one_block, {True: 1, False: 0}), (one_block - 1, {True: 1, False: 1})):
        monkeypatch.setattr(blocked_attention, "BLOCK_ELEMENTS", block_elements)
        for training in (True, False):
            calls.clear()
            y = layer(x, training=training)
            assert np.isfinite(np.asarray(y)).all()
            assert len(calls) == expected[training], (block_elements, training)


def test_unknown_attention_is_a_clear_error():
    with pytest.raises(ValueError, match="attention must be one of"):
        AxialAttention(8, num_heads=2, attention="flash")


def _gradients_and_updates(layer, x):
    import jax

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss(trainable, x):
        y, updated = layer.stateless_call(trainable, non_trainable, x, training=True)
        # A loss that weights every output differently, so no gradient vanishes by symmetry.
        weights = keras.ops.reshape(keras.ops.arange(y.size, dtype=y.dtype), y.shape) / y.size
        return keras.ops.sum(keras.ops.sin(y) * weights), (y, updated)

    (grads, x_grad), (y, updated) = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(trainable, x)
    return y, grads, x_grad, updated


def _twin_layers(x, axis, positional, gated, variants, dtype="float64", batch_groups=2):
    """Layers for input ``x`` differing only by ``variants`` (one dict each), all with the first's weights."""
    layers = [
        AxialAttention(8, num_heads=2, axis=axis, positional_encoding=positional, gated=gated,
                       gates_trainable=gated, batch_groups=batch_groups, dtype=dtype, **variant)
        for variant in variants
    ]
    for layer in layers:
        layer.build(x.shape)
    for layer in layers[1:]:
        for target, source in zip(layer.variables, layers[0].variables):
            target.assign(source.value)
    return layers


@pytest.mark.parametrize("positional,gated", fast_first(FORMS[::-1]))
def test_kernel_and_keras_ops_give_the_same_outputs_gradients_and_statistics(positional, gated, monkeypatch):
    # The same layer with attention="blocked" (blocks of two lines) and
    # attention="keras_ops": training outputs, every gradient (tables and
    # gates included) and the BatchNorm updates agree in float64, and so do
    # the inference outputs.
    monkeypatch.setattr(blocked_attention, "BLOCK_ELEMENTS", 4 * 2 * 2 * 6 * 6)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 6, 6, 8))
    layers = _twin_layers(x, "height", positional, gated, [dict(attention="blocked"), dict(attention="keras_ops")])
    results, inference = [], []
    for layer in layers:
        results.append(_gradients_and_updates(layer, x))
        inference.append(np.asarray(layer(x, training=False)))
    layer = layers[0]
    (y0, g0, xg0, u0), (y1, g1, xg1, u1) = results
    np.testing.assert_allclose(np.asarray(y0), np.asarray(y1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(xg0), np.asarray(xg1), rtol=1e-10, atol=1e-12)
    assert len(g0) == len(g1) == len(layer.trainable_variables)
    for a, b in zip(g0 + u0, g1 + u1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(inference[0], inference[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("positional,gated", fast_first(FORMS[::-1]))
def test_rematerialize_gives_the_same_outputs_gradients_and_statistics(positional, gated):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 6, 6, 8))
    layers = _twin_layers(x, "width", positional, gated, [dict(rematerialize=False), dict(rematerialize=True)])
    reference = layers[0]
    results = [_gradients_and_updates(layer, x) for layer in layers]
    (y0, g0, xg0, u0), (y1, g1, xg1, u1) = results
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(xg1), np.asarray(xg0), rtol=1e-10, atol=1e-12)
    assert len(g0) == len(g1) and len(u0) == len(u1)
    for a, b in zip(g0 + u0, g1 + u1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-10, atol=1e-12)
    # The moving statistics moved: the update happened outside the rematerialised part.
    initial = [np.asarray(v.value) for v in reference.non_trainable_variables if "moving_mean" in v.path]
    updated = [np.asarray(u) for u, v in zip(u1, reference.non_trainable_variables) if "moving_mean" in v.path]
    assert any(not np.allclose(a, b) for a, b in zip(initial, updated))


def test_float32_training_statistics_hold_for_offset_queries_and_keys():
    # The similarity statistics come from E[t^2] - E[t]^2; with queries and
    # keys far from zero mean (a large qkv BatchNorm shift) float32 must
    # still match the float64 computation closely.
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 8, 8, 8))
    layers = {}
    for dtype in ("float64", "float32"):
        layer = AxialAttention(8, num_heads=2, axis="height", gated=True, dtype=dtype)
        layer.build(x.shape)
        if layers:
            for target, source in zip(layer.variables, layers["float64"].variables):
                target.assign(np.asarray(source.value).astype(target.dtype))
        else:
            layer.qkv_norm.beta.assign(np.full(layer.qkv_norm.beta.shape, 4.0))
        layers[dtype] = layer
    y64 = np.asarray(layers["float64"](x, training=True))
    y32 = np.asarray(layers["float32"](x.astype("float32"), training=True))
    np.testing.assert_allclose(y32, y64, rtol=0, atol=2e-4 * np.abs(y64).max())
    for name in ("moving_mean", "moving_variance"):
        a = np.asarray(getattr(layers["float32"].similarity_norm, name).value)
        b = np.asarray(getattr(layers["float64"].similarity_norm, name).value)
        np.testing.assert_allclose(a, b, rtol=1e-4)
