"""The checks every layer and initialiser of medt_keras passes (``check_layer``, ``check_initializer``).

``tests/layers/test_every_layer.py`` applies them to every class the library
registers with Keras, so a new layer is covered as soon as it has a case in
``LAYER_CASES`` there (and that test fails until it has one).
"""

import jax
import keras
import numpy as np

import medt_keras

# Tolerances of the compiled call against the eager one, by compute dtype:
# XLA may fuse and reorder a jitted program's arithmetic.
_TOLERANCE = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 3e-2}


def registered_classes(package="medt_keras"):
    """Every class registered as ``package>Name``, with its registered names."""
    classes = {}
    for name, obj in keras.saving.get_custom_objects().items():
        if name.startswith(f"{package}>") and isinstance(obj, type):
            classes.setdefault(obj, []).append(name)
    return classes


def _compute_dtype(policy):
    return keras.dtype_policies.get(policy).compute_dtype


def _inputs(shape, dtype, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def check_layer(make_layer, input_shape, policy, tmp_path):
    """Config round trip, ``model.save``/``load_model``, eager against compiled, under ``policy``.

    Args:
        make_layer: ``dtype -> layer``; called with ``policy``.
        input_shape: a small input shape with the batch, e.g. ``(2, 4, 4, 3)``.
        policy: a Keras dtype policy name ("float32", "float64",
            "mixed_bfloat16"); "float64" turns on JAX's 64-bit mode.
        tmp_path: a folder for the saved model.

    Checks that the layer
      * rebuilds from its config and serialises to its own class, with the
        same config after the round trip;
      * in a one-layer functional model, with its weights set to random
        values (positive, so variances stay valid), saves and loads with the
        same class, weights and outputs;
      * gives the same outputs eagerly and as one jitted program
        (``stateless_call``), in the policy's compute dtype.
    """
    if policy == "float64":
        medt_keras.enable_float64()
    layer = make_layer(policy)
    cls = type(layer)

    config = layer.get_config()
    rebuilt = cls.from_config(config)
    assert type(rebuilt) is cls
    assert rebuilt.get_config() == config
    serialized = keras.saving.serialize_keras_object(layer)
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is cls
    assert restored.get_config() == config

    # A functional model casts its inputs to its Input's dtype (floatx by default).
    inputs = keras.Input(input_shape[1:], dtype="float64" if policy == "float64" else "float32")
    model = keras.Model(inputs, layer(inputs))
    rng = np.random.default_rng(1)
    model.set_weights([rng.uniform(0.5, 1.5, size=w.shape).astype(w.dtype) for w in model.get_weights()])
    compute_dtype = _compute_dtype(policy)
    x = _inputs(input_shape, compute_dtype if compute_dtype != "bfloat16" else "float32")
    eager = np.asarray(model(x, training=False))
    assert keras.backend.standardize_dtype(model(x).dtype) == compute_dtype

    path = tmp_path / f"{cls.__name__}_{policy}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    (loaded_layer,) = (lay for lay in loaded.layers if lay.name == layer.name)
    assert type(loaded_layer) is cls
    assert loaded_layer.get_config() == layer.get_config()
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), eager)

    if keras.backend.backend() == "jax":
        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]

        kwargs = {"training": False} if layer._call_has_training_arg else {}

        @jax.jit
        def compiled(trainable, non_trainable, x):
            return layer.stateless_call(trainable, non_trainable, x, **kwargs)[0]

        tolerance = _TOLERANCE[compute_dtype]
        np.testing.assert_allclose(
            np.asarray(compiled(trainable, non_trainable, x)).astype("float64"),
            eager.astype("float64"),
            rtol=tolerance,
            atol=tolerance,
        )


def check_initializer(make_initializer, shape=(3, 4)):
    """Config round trip, and the same draws after it.

    ``make_initializer(seed)`` builds the initialiser: with a fixed seed the
    original and the rebuilt one draw the same values; with ``seed=None`` they
    do from the same state of NumPy's global generator (which
    ``keras.utils.set_random_seed`` seeds).
    """
    for seed in (7, None):
        initializer = make_initializer(seed)
        cls = type(initializer)
        config = initializer.get_config()
        rebuilt = cls.from_config(config)
        assert type(rebuilt) is cls and rebuilt.get_config() == config
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(initializer))
        assert type(restored) is cls and restored.get_config() == config
        for dtype in ("float32", "float64"):
            draws = []
            for candidate in (initializer, rebuilt, restored):
                np.random.seed(3)
                draws.append(np.asarray(candidate(shape, dtype=dtype)))
            assert draws[0].shape == shape and draws[0].dtype == dtype
            assert np.std(draws[0]) > 0
            np.testing.assert_array_equal(draws[1], draws[0])
            np.testing.assert_array_equal(draws[2], draws[0])
