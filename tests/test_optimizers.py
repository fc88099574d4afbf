import numpy as np
import pytest

import keras

import medt_keras
from medt_keras.optimizers import OfficialAdam
from tests.conftest import TINY_IMG_SIZE, TINY_MODEL


def torch_adam(params, grads_fn, steps, lr, l2, frozen_until=None, beta_1=0.9, beta_2=0.999, eps=1e-8):
    """PyTorch's Adam (amsgrad off) as its documentation states it, in NumPy.

    ``frozen_until[i] = k``: parameter i has no gradient in steps < k.
    """
    state = [dict(m=np.zeros_like(p), v=np.zeros_like(p), t=0) for p in params]
    for step in range(steps):
        grads = grads_fn(params)
        for i, (p, g) in enumerate(zip(params, grads)):
            if frozen_until and step < frozen_until.get(i, 0):
                continue
            s = state[i]
            g = g + l2 * p
            s["t"] += 1
            s["m"] = beta_1 * s["m"] + (1 - beta_1) * g
            s["v"] = beta_2 * s["v"] + (1 - beta_2) * g * g
            denom = np.sqrt(s["v"]) / np.sqrt(1 - beta_2 ** s["t"]) + eps
            params[i] = p - lr / (1 - beta_1 ** s["t"]) * s["m"] / denom
    return params


# Keras keeps the learning rate in a float32 variable.
LR = float(np.float32(0.05))


@pytest.fixture(scope="module", autouse=True)
def x64():
    medt_keras.enable_float64()


def _problem():
    rng = np.random.default_rng(0)
    targets = [rng.normal(size=(3, 2)), rng.normal(size=())]
    start = [rng.normal(size=(3, 2)), np.array(0.3)]

    def grads(params):  # of sum((p - target)**3 / 3 + p**2), a non-quadratic loss
        return [(p - t) ** 2 + 2 * p for p, t in zip(params, targets)]

    return start, grads


def _run_keras(start, grads_fn, steps, optimizer, freeze_until=None):
    variables = [keras.Variable(p, dtype="float64", name=f"v{i}") for i, p in enumerate(start)]
    if freeze_until:
        optimizer.freeze([variables[i] for i in freeze_until])
    for step in range(steps):
        if freeze_until:
            optimizer.unfreeze([variables[i] for i, k in freeze_until.items() if step == k])
        grads = grads_fn([v.numpy() for v in variables])
        optimizer.apply(grads, variables)
    return [v.numpy() for v in variables]


def test_matches_torch_adam_with_coupled_l2():
    start, grads = _problem()
    expected = torch_adam([p.copy() for p in start], grads, 7, lr=LR, l2=0.1)
    ours = _run_keras(start, grads, 7, OfficialAdam(learning_rate=0.05, l2=0.1))
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_differs_from_decoupled_weight_decay():
    start, grads = _problem()
    expected = torch_adam([p.copy() for p in start], grads, 5, lr=LR, l2=0.1)
    decoupled = _run_keras(start, grads, 5, keras.optimizers.Adam(learning_rate=0.05, weight_decay=0.1))
    assert not np.allclose(decoupled[0], expected[0], rtol=1e-6)


def test_frozen_variables_hold_still_and_count_steps_from_unfreezing():
    # Parameter 1 (a scalar, like a gate) is frozen for the first 4 steps.
    start, grads = _problem()
    expected = torch_adam([p.copy() for p in start], grads, 9, lr=LR, l2=0.1, frozen_until={1: 4})
    optimizer = OfficialAdam(learning_rate=0.05, l2=0.1)
    ours = _run_keras(start, grads, 9, optimizer, freeze_until={1: 4})
    for a, b in zip(ours, expected):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    still = _run_keras(start, grads, 3, OfficialAdam(learning_rate=0.05, l2=0.1), freeze_until={1: 99})
    assert float(still[1]) == float(start[1])


@pytest.mark.slow
def test_freezes_medt_gates_in_fit():
    # The official schedule: gates frozen, then unfrozen by a callback.
    model = medt_keras.GatedAxialUNet(img_size=TINY_IMG_SIZE, gates_trainable=True, **TINY_MODEL)
    gates = [v for v in model.trainable_variables if "gate" in v.path]
    optimizer = OfficialAdam(1e-2, l2=1e-5)
    optimizer.freeze(gates)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 2, (4, 32, 32))
    before = [g.numpy().copy() for g in gates]
    other = model.get_layer("decoder3").kernel
    other_before = other.numpy().copy()

    class Unfreeze(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                optimizer.unfreeze(gates)
                self.after_first = [g.numpy().copy() for g in gates]

    callback = Unfreeze()
    model.fit(x, y, batch_size=2, epochs=2, verbose=0, callbacks=[callback])
    np.testing.assert_array_equal(callback.after_first, before)
    assert not np.array_equal(other.numpy(), other_before)
    assert all(not np.array_equal(g.numpy(), b) for g, b in zip(gates, before))
