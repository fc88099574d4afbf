"""The blocked JAX attention kernel against the ``keras.ops`` form it replaces on CPU."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import medt_keras
from medt_keras.kernels import blocked_attention as kernel
from medt_keras.layers._attention_ops import softmax_attention
from tests.conftest import fast_first


@pytest.fixture(scope="module", autouse=True)
def x64():
    medt_keras.enable_float64()


def _inputs(rng, batch, lines, heads, length, channels, value_channels, positional, dtype="float64"):
    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    per_line = (batch, lines, heads, length)
    q, k = normal(*per_line, channels), normal(*per_line, channels)
    v = normal(*per_line, value_channels)
    extra = None
    if positional:
        extra = (
            normal(*per_line, channels),
            normal(*per_line, channels),
            normal(length, length, channels),
            normal(length, length, channels),
            normal(length, length, value_channels),
        )
    return q, k, v, extra


def _loss(attention, weights):
    def loss(q, k, v, positional):
        return sum(jnp.sum(jnp.sin(y) * w) for y, w in zip(attention(q, k, v, positional), weights))

    return loss


def _check_against_keras_ops(inputs, weights, rtol=1e-11):
    def keras_ops(q, k, v, positional):
        return softmax_attention(q, k, v, positional, broadcast=False)

    expected = keras_ops(*inputs)
    actual = kernel.blocked_attention(*inputs)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=rtol)
    grads = jax.grad(_loss(kernel.blocked_attention, weights), argnums=(0, 1, 2, 3))(*inputs)
    expected_grads = jax.grad(_loss(keras_ops, weights), argnums=(0, 1, 2, 3))(*inputs)
    leaves, expected_leaves = jax.tree.leaves(grads), jax.tree.leaves(expected_grads)
    # q, k, v, and with positional terms their two per-line inputs and three tables.
    assert len(leaves) == len(expected_leaves) == (8 if inputs[3] is not None else 3)
    for a, e in zip(leaves, expected_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=rtol * np.abs(e).max())


@pytest.mark.parametrize("positional", [True, False], ids=["positional", "without-position"])
@pytest.mark.parametrize(
    "channels,value_channels",
    fast_first([pytest.param(2, 4, id="2-channels"), pytest.param(1, 2, id="1-channel"),
                pytest.param(6, 12, id="6-channels")]),
)
@pytest.mark.parametrize("block_elements", [1, 2 * 3 * 7 * 7 * 2, 1 << 18], ids=["line", "two-lines", "one-block"])
def test_outputs_and_gradients_equal_the_keras_ops_form(
    monkeypatch, positional, channels, value_channels, block_elements
):
    # 6 lines of length 7 in 2 images, 3 heads: blocks of one line, of two
    # lines (three blocks) and one block for all; broadcast products (logits
    # over <= 4 channels, map-times-vector products over 1) and batched
    # products (the rest) inside the kernel.
    monkeypatch.setattr(kernel, "BLOCK_ELEMENTS", block_elements)
    rng = np.random.default_rng(channels + 10 * positional)
    inputs = _inputs(rng, 2, 6, 3, 7, channels, value_channels, positional)
    weights = [jnp.asarray(rng.normal(size=(2, 6, 3, 7, value_channels))) for _ in range(2)]
    _check_against_keras_ops(inputs, weights)


def test_lines_per_block_divides_the_lines_and_fits_the_budget(monkeypatch):
    monkeypatch.setattr(kernel, "BLOCK_ELEMENTS", 4 * 8 * 64 * 64 * 2)
    assert kernel._lines_per_block((4, 64, 8, 64)) == 2
    # 7 lines, budget for 3: the largest divisor of 7 within it is 1.
    monkeypatch.setattr(kernel, "BLOCK_ELEMENTS", 3 * 5 * 5)
    assert kernel._lines_per_block((1, 7, 1, 5)) == 1
    # A budget smaller than one line still makes blocks of one line.
    monkeypatch.setattr(kernel, "BLOCK_ELEMENTS", 1)
    assert kernel._lines_per_block((2, 6, 3, 7)) == 1


def test_large_logits_do_not_overflow():
    # The softmax subtracts each row's maximum: logits of several hundred
    # would overflow exp in float32 otherwise.
    rng = np.random.default_rng(2)
    q, k, v, positional = _inputs(rng, 1, 4, 2, 8, 2, 4, True, dtype="float32")
    q = q * 300.0
    outputs = kernel.blocked_attention(q, k, v, positional)
    grads = jax.grad(_loss(kernel.blocked_attention, [jnp.ones((1, 4, 2, 8, 4))] * 2), argnums=(0, 1))(
        q, k, v, positional
    )
    assert all(np.isfinite(np.asarray(t)).all() for t in list(outputs) + list(grads))


def test_bfloat16_keeps_its_dtype_and_computes_the_softmax_in_float32():
    rng = np.random.default_rng(4)
    inputs = _inputs(rng, 2, 4, 2, 8, 2, 4, True, dtype="float32")
    low = jax.tree.map(lambda t: t.astype(jnp.bfloat16), inputs)
    reference = kernel.blocked_attention(*jax.tree.map(lambda t: t.astype(jnp.float32), low))
    outputs = kernel.blocked_attention(*low)
    for y, r in zip(outputs, reference):
        assert y.dtype == jnp.bfloat16
        # Only the final rounding to bfloat16 differs (8 bits of mantissa).
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(r), rtol=1e-2, atol=1e-2)
    weights = [jnp.ones((2, 4, 2, 8, 4), jnp.bfloat16)] * 2
    grads = jax.grad(_loss(kernel.blocked_attention, weights), argnums=(0, 1, 2, 3))(*low)
    assert {t.dtype for t in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}


@pytest.mark.parametrize("positional", [True, False], ids=["positional", "without-position"])
@pytest.mark.parametrize("channels", [1, 3])
def test_softmax_shift_bounds_every_row_maximum(positional, channels):
    # The forward pass shifts each row by `_row_bound` instead of its
    # maximum: it must never be below the maximum (exp would exceed 1 and
    # could overflow), and for one channel without positional terms it is
    # the maximum itself.
    rng = np.random.default_rng(7 + channels)
    q, k, _, extra = _inputs(rng, 2, 5, 3, 9, channels, 2, positional)
    per_line, tables = kernel._split(extra)
    q, k = kernel._channels(q), kernel._channels(k)
    bound = kernel._row_bound(q, k, per_line, kernel._table_ranges(tables))
    rows = functools.partial(kernel._rows, dtype=jnp.float64)
    logits = kernel._logits(
        [rows(t) for t in q], [rows(t) for t in k],
        None if per_line is None else jax.tree.map(rows, per_line), tables,
    )
    row_max = np.asarray(jnp.max(logits, axis=-1)).reshape(bound.shape)
    assert np.isfinite(row_max).all()
    assert (np.asarray(bound) >= row_max - 1e-12).all()
    if channels == 1 and not positional:
        np.testing.assert_allclose(np.asarray(bound), row_max, rtol=1e-13)
    else:
        assert (np.asarray(bound) > row_max + 1e-6).any()  # a bound, not the maximum


def test_loose_bounds_fall_back_to_the_exact_maximum():
    # Two channels whose largest products fall on different keys: every
    # row's bound is 2 * 10 * 20 = 400 while its largest logit is 0, so
    # shifted by the bound all of a row's weights underflow in float32.
    # The kernel must notice and compute with the exact maxima.
    rng = np.random.default_rng(3)
    length = 8
    q = jnp.full((1, 4, 2, length, 2), 10.0, jnp.float32)
    keys = np.zeros((length, 2), np.float32)
    keys[0] = (20.0, -20.0)
    keys[1] = (-20.0, 20.0)
    k = jnp.broadcast_to(jnp.asarray(keys), q.shape)
    v = jnp.asarray(rng.normal(size=(1, 4, 2, length, 3)), jnp.float32)
    bound = kernel._row_bound(kernel._channels(q), kernel._channels(k), None, None)
    assert float(jnp.min(bound)) == pytest.approx(400.0)
    (actual,) = kernel.blocked_attention(q, k, v)
    (expected,) = softmax_attention(q, k, v, None, broadcast=False)
    assert np.isfinite(np.asarray(actual)).all()
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=1e-5, atol=1e-6)
    grads = jax.grad(_loss(kernel.blocked_attention, [jnp.ones((1, 4, 2, length, 3))]), argnums=(0, 1, 2))(
        q, k, v, None
    )
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
