import numpy as np
import pytest

import keras

import medt_keras
from medt_keras.layers import BatchNorm
from tests.official_reference import batch_norm


@pytest.fixture(scope="module", autouse=True)
def x64():
    medt_keras.enable_float64()


def _random_params(rng, shape):
    return {
        "weight": rng.uniform(0.5, 1.5, shape),
        "bias": rng.normal(0, 0.2, shape),
        "running_mean": rng.normal(0, 0.3, shape),
        "running_var": rng.uniform(0.5, 2.0, shape),
    }


def _layer(params, shape, **kwargs):
    layer = BatchNorm(dtype="float64", **kwargs)
    layer.build(shape)
    layer.gamma.assign(params["weight"].reshape(layer.gamma.shape))
    layer.beta.assign(params["beta"] if "beta" in params else params["bias"].reshape(layer.gamma.shape))
    layer.moving_mean.assign(params["running_mean"].reshape(layer.gamma.shape))
    layer.moving_variance.assign(params["running_var"].reshape(layer.gamma.shape))
    return layer


@pytest.mark.parametrize("training", [False, True])
def test_matches_torch_batchnorm_including_unbiased_running_variance(training):
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (3, 5, 6, 4))
    params = _random_params(rng, 4)
    layer = _layer(params, x.shape)
    y = np.asarray(layer(x, training=training))
    expected, stats = batch_norm(x.transpose(0, 3, 1, 2), params, training)
    np.testing.assert_allclose(y, expected.transpose(0, 2, 3, 1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.moving_mean.numpy(), stats["running_mean"], atol=1e-14)
    np.testing.assert_allclose(layer.moving_variance.numpy(), stats["running_var"], atol=1e-14)
    assert int(layer.num_batches_tracked.numpy()) == (1 if training else 0)


def test_epsilon_is_pytorchs():
    assert BatchNorm().epsilon == 1e-5


def test_batch_groups_equal_one_call_per_group_in_order():
    rng = np.random.default_rng(1)
    groups, per_group = 4, 2
    x = rng.normal(0.5, 1.5, (groups * per_group, 3, 3, 5))
    params = _random_params(rng, 5)
    grouped = _layer(params, x.shape, batch_groups=groups)
    y = np.asarray(grouped(x, training=True))

    sequential = _layer(params, x.shape)
    # Group g is items g, g + groups, g + 2 * groups, ...
    parts = [np.asarray(sequential(x[g::groups], training=True)) for g in range(groups)]
    np.testing.assert_allclose(y, np.stack(parts, axis=1).reshape(y.shape), atol=1e-12)
    np.testing.assert_allclose(
        grouped.moving_mean.numpy(), sequential.moving_mean.numpy(), atol=1e-14
    )
    np.testing.assert_allclose(
        grouped.moving_variance.numpy(), sequential.moving_variance.numpy(), atol=1e-14
    )
    assert int(grouped.num_batches_tracked.numpy()) == groups


def test_multi_axis_channels_flatten_in_official_order():
    # Channels laid out (term, head) must normalise like torch's flat term*G + g.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 3, 2, 4, 4))  # (batch, lines, term, head, i, j)
    params = _random_params(rng, 6)
    layer = _layer(params, x.shape, axis=(2, 3))
    y = np.asarray(layer(x, training=True))
    flat = x.reshape(6, 6, 4, 4)  # (batch*lines, term*head, i, j)
    expected, stats = batch_norm(flat, params, True)
    np.testing.assert_allclose(y.reshape(flat.shape), expected, atol=1e-12)
    np.testing.assert_allclose(layer.moving_mean.numpy().reshape(-1), stats["running_mean"], atol=1e-14)


def test_config_round_trip():
    layer = BatchNorm(axis=(2, 3), momentum=0.8, epsilon=1e-4, batch_groups=16)
    clone = BatchNorm.from_config(layer.get_config())
    assert clone.axis == (2, 3) and clone.batch_groups == 16
    assert clone.momentum == 0.8 and clone.epsilon == 1e-4
    assert keras.saving.get_registered_object("medt_keras>BatchNorm") is BatchNorm


def test_inference_affine_is_the_eval_transform():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 3, 2, 4))
    params = _random_params(rng, 8)
    layer = _layer(params, x.shape, axis=(-2, -1))
    scale, shift = (np.asarray(t) for t in layer.inference_affine())
    assert scale.shape == shift.shape == (2, 4)
    np.testing.assert_allclose(x * scale + shift, np.asarray(layer(x, training=False)), atol=1e-13)


@pytest.mark.parametrize("groups,axis", [(1, -1), (4, -1), (2, (2, 3))], ids=["one-group", "groups", "two-axes"])
def test_training_gradients_equal_automatic_differentiation(groups, axis):
    # The layer's backward pass is written out (closed form); it must equal
    # what automatic differentiation of the plain formula gives, for the
    # input and both parameters, per-group statistics and several channel axes.
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(5 + groups)
    x = rng.normal(0.3, 1.7, (groups * 3, 4, 3, 5))
    layer = BatchNorm(axis=axis, batch_groups=groups, dtype="float64")
    layer.build(x.shape)
    gamma = rng.uniform(0.5, 1.5, layer.gamma.shape)
    beta = rng.normal(0, 0.3, layer.beta.shape)
    upstream = rng.normal(size=x.shape)
    channel_axes = layer._channel_axes

    def through_layer(x, gamma, beta):
        out, _ = layer.stateless_call([gamma, beta], [v.value for v in layer.non_trainable_variables], x,
                                      training=True)
        return jnp.sum(out * upstream)

    def plain(x, gamma, beta):
        grouped = jnp.reshape(x, (-1, groups) + x.shape[1:])
        axes = (0,) + tuple(a + 1 for a in range(1, x.ndim) if a not in channel_axes)
        mean = jnp.mean(grouped, axis=axes, keepdims=True)
        variance = jnp.mean((grouped - mean) ** 2, axis=axes, keepdims=True)
        shape = [1] * (x.ndim + 1)
        for a in channel_axes:
            shape[a + 1] = x.shape[a]
        out = (grouped - mean) / jnp.sqrt(variance + 1e-5) * gamma.reshape(shape) + beta.reshape(shape)
        return jnp.sum(jnp.reshape(out, x.shape) * upstream)

    assert layer.trainable_variables[0] is layer.gamma
    got = jax.grad(through_layer, argnums=(0, 1, 2))(x, gamma, beta)
    expected = jax.grad(plain, argnums=(0, 1, 2))(x, gamma, beta)
    for g, e in zip(got, expected):
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-11, atol=1e-12)
