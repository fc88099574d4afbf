"""Our Keras models as the benchmark builds, times and counts them.

``measure_keras`` is one workload of one model in its own process (``medt-bench
models``); ``KerasTimer`` keeps a model compiled and times steps on request
(the interleaved comparison's worker); ``lower_step`` and ``xla_flops`` are
the one way FLOPs are counted, with the native attention kernel turned off
(XLA counts no FLOPs in its custom call).

Heavy imports (JAX, Keras) happen inside the functions: a process that times
the official PyTorch code must not carry JAX in its memory.
"""

import argparse
import os
import time

from training.bench.timing import median_seconds, peak_rss_gib, time_then_sample


def model_name(text):
    """A registered model name or alias, as its canonical name (argparse ``type``)."""
    from medt_keras.models.registry import get_spec

    try:
        return get_spec(text).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def random_inputs(size, batch, infer_batch=None, channels_first=False):
    """``(x, y, x_infer)``: seeded random float32 images, 0/1 int32 masks, and images for inference.

    Both implementations time the same values: ``channels_first`` gives the
    images as the official PyTorch code takes them (``(batch, 3, size, size)``).
    ``x_infer`` is None without ``infer_batch``.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (lambda n: (n, 3, size, size)) if channels_first else (lambda n: (n, size, size, 3))
    x = rng.random(shape(batch), dtype=np.float32)
    y = rng.integers(0, 2, (batch, size, size)).astype("int32")
    x_infer = None if infer_batch is None else rng.random(shape(infer_batch), dtype=np.float32)
    return x, y, x_infer


def compiled_model(name, size, dtype="float32", rematerialize=False, **overrides):
    """A fresh model with the official hyperparameters, compiled with Adam and cross-entropy on logits."""
    import medt_keras  # noqa: F401  (the JAX backend, before Keras loads)
    import keras
    from medt_keras.models.registry import get_spec

    model = get_spec(name).build(img_size=size, rematerialize=rematerialize, dtype=dtype, **overrides)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def step_function(model, workload="train"):
    """``f(trainable, non_trainable, x, y)``: forward and backward of the loss ("train") or the forward ("infer").

    Stateless, as the model's training and inference programs compute them
    (Adam's update, a negligible share, left out); ``y`` is unused in inference.
    """
    import jax
    import keras

    def loss_fn(t, n, x, y):
        logits, n = model.stateless_call(t, n, x, training=True)
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)), n

    def forward(t, n, x, y):
        return model.stateless_call(t, n, x, training=False)[0]

    return jax.value_and_grad(loss_fn, has_aux=True) if workload == "train" else forward


def step_arguments(model, x, y=None):
    """``(trainable values, non-trainable values, x, y)``: the arguments of ``step_function``."""
    return ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables], x, y)


def lower_step(model, x, y=None, workload="train"):
    """``step_function`` jitted and lowered for counting: the native attention kernel turned off."""
    import jax
    from medt_keras.kernels import native_attention

    with native_attention.turned_off():  # XLA counts no FLOPs in its custom call
        return jax.jit(step_function(model, workload)).lower(*step_arguments(model, x, y))


def xla_flops(program):
    """The FLOPs of XLA's cost analysis of a lowered or compiled program (NaN where it has none)."""
    analysis = program.cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float(analysis.get("flops", float("nan"))) if analysis else float("nan")


def compiler_options_of(workload):
    """The XLA options the programs of ``workload`` ("train" or "infer") compile with (``medt_keras.compiler``)."""
    from medt_keras import compiler

    return compiler.compiler_options("training" if workload == "train" else "inference")


def describe_ours(rematerialize=False, dtype="float32", threads=None, workload=None):
    """E.g. ``medt-keras float32, XLA default threads (2), training's CPU compiler options``."""
    text = f"medt-keras {dtype}"
    text += ", rematerialize" if rematerialize else ""
    text += f", XLA default threads ({threads or os.cpu_count()})"
    if workload is not None:
        text += ", training's CPU compiler options" if workload == "train" else ", inference's CPU compiler options"
    return text


def measure_keras(model_name, size, batch, infer_batch, repeats, workload, rematerialize=False, dtype="float32"):
    """Our model's training step ("train") or inference batch ("infer"), timed after compilation, with FLOPs and memory.

    The model's programs carry their workload's XLA options
    (``medt_keras.compiler``); ``medt-bench models`` calls it once per
    workload, each in its own process (``measure_keras_per_workload``).
    FLOPs per image: XLA's cost analysis of the same computation
    (``lower_step``), compiled, which also gives XLA's working memory.
    """
    import numpy as np

    model = compiled_model(model_name, size, dtype=dtype, rematerialize=rematerialize)
    x, y, x_infer = random_inputs(size, batch, infer_batch)
    result = {
        "implementation": "medt-keras",
        "rematerialize": bool(rematerialize),
        "dtype": dtype,
        "device": _device_kind(),
        "xla_flags": {workload: os.environ.get("XLA_FLAGS", "")},
        "compiler_options": {workload: compiler_options_of(workload)},
    }
    if workload == "train":
        start = time.perf_counter()
        model.train_on_batch(x, y)
        result["compile_seconds"] = time.perf_counter() - start
        train, step_memory = time_then_sample(lambda: model.train_on_batch(x, y), repeats)
        compiled = lower_step(model, x, y, "train").compile()
        memory = compiled.memory_analysis()
        result.update(
            train_seconds=train,
            train_images_per_second=batch / train,
            train_flops_per_image=xla_flops(compiled) / batch,
            xla_train_temp_gib=None if memory is None else memory.temp_size_in_bytes / 2**30,
            train_step_peak_rss_gib=step_memory.peak_gib,
        )
    else:
        start = time.perf_counter()
        np.asarray(model.predict_on_batch(x_infer))
        result["compile_seconds"] = time.perf_counter() - start
        infer = median_seconds(lambda: np.asarray(model.predict_on_batch(x_infer)), repeats)
        compiled = lower_step(model, x_infer, None, "infer").compile()
        result.update(
            infer_seconds=infer,
            infer_images_per_second=infer_batch / infer,
            infer_flops_per_image=xla_flops(compiled) / infer_batch,
        )
    result["peak_rss_gib"] = peak_rss_gib()
    return result


def measure_keras_per_workload(run_child, spec):
    """``measure_keras`` in one child process per workload, merged into one result (the larger peak RSS)."""
    train = run_child(dict(spec, workload="train"))
    infer = run_child(dict(spec, workload="infer"))
    merged = dict(train, **{k: v for k, v in infer.items()
                            if k not in ("compile_seconds", "peak_rss_gib", "xla_flags", "compiler_options")})
    merged["compile_seconds"] = train["compile_seconds"] + infer["compile_seconds"]
    merged["peak_rss_gib"] = max(train["peak_rss_gib"], infer["peak_rss_gib"])
    merged["xla_flags"] = dict(train["xla_flags"], **infer["xla_flags"])
    merged["compiler_options"] = dict(train.get("compiler_options", {}), **infer.get("compiler_options", {}))
    return merged


def _device_kind():
    import jax

    return str(jax.devices()[0].device_kind)


class KerasTimer:
    """Our model, compiled once, timed on request (the worker of the interleaved comparison).

    With ``workload`` ("train" or "infer") it compiles that workload only;
    without it, both. Each program carries its workload's XLA options.
    """

    def __init__(self, model_name, size, batch, infer_batch, rematerialize=False, dtype="float32", workload=None):
        import jax

        self.model = compiled_model(model_name, size, dtype=dtype, rematerialize=rematerialize)
        self.x, self.y, self.x_infer = random_inputs(size, batch, infer_batch)
        start = time.perf_counter()
        for name in ("train", "infer") if workload is None else (workload,):
            getattr(self, name)()
        self.info = {
            "implementation": "medt-keras",
            "compile_seconds": time.perf_counter() - start,
            "jax": jax.__version__,
            "device": _device_kind(),
            "config": describe_ours(rematerialize, dtype, workload=workload),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "compiler_options": {name: compiler_options_of(name) for name in ("train", "infer")},
        }

    def train(self, config=None):
        self.model.train_on_batch(self.x, self.y)

    def infer(self, config=None):
        import numpy as np

        np.asarray(self.model.predict_on_batch(self.x_infer))
