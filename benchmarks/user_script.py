"""A plain user script: how fast does MedT train and infer as a researcher would run it?

Nothing here is tuned: the model is built through the public API, compiled with
Keras' Adam and cross-entropy, and driven by ``train_on_batch``,
``predict_on_batch`` and ``fit`` on a ``keras.utils.PyDataset``. No environment
variables, XLA flags or project internals (``training``) are touched, so what
it measures is what a user gets out of the box.

It times, after warm-up (which includes compilation):
  (a) ``train_on_batch`` on 4 random images with random 0/1 masks;
  (b) ``predict_on_batch`` on 8 random images;
  (c) ``fit`` on a PyDataset of batches of 4: one short warm-up ``fit``, then one
      timed epoch; each batch's time is from the end of the batch before it
      (or the epoch's start) to its own end, so loading the batch counts.
and prints one JSON line (seconds per step, median and fastest; versions).

Run: ``python benchmarks/user_script.py`` (MedT, 128x128), or e.g.
``python benchmarks/user_script.py --model gated --size 64 --steps 2 --fit-steps 2``.
``benchmarks/user_script_vs_official.py`` runs it against the official code.

``--as-medt-train`` is the one departure, for comparing the user's training
step with ``medt-train``'s: the model is compiled as ``medt-train`` compiles
it (``training.train.compile_model``: ``OfficialAdam`` with the official
weight decay, the weighted foreground F1/IoU metrics) and only the training
workloads are timed.
"""

import argparse
import json
import statistics
import time

import medt_keras  # first: it selects the JAX backend before Keras loads
import keras
import numpy as np

TRAIN_BATCH, INFER_BATCH, WARMUP_STEPS, FIT_WARMUP_STEPS = 4, 8, 2, 3


def summary(seconds):
    return {"seconds": seconds, "median": statistics.median(seconds), "fastest": min(seconds)}


def time_steps(step, steps):
    for _ in range(WARMUP_STEPS):
        step()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()  # both calls return NumPy values, so the step has finished when they return
        seconds.append(time.perf_counter() - start)
    return summary(seconds)


class RandomBatches(keras.utils.PyDataset):
    """``steps`` fixed random batches of (images in [0, 1), 0/1 masks)."""

    def __init__(self, steps, size, seed=0, **kwargs):
        super().__init__(**kwargs)
        rng = np.random.default_rng(seed)
        self.x = rng.random((steps, TRAIN_BATCH, size, size, 3), dtype=np.float32)
        self.y = rng.integers(0, 2, (steps, TRAIN_BATCH, size, size)).astype("int32")

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return self.x[index], self.y[index]


class BatchTimes(keras.callbacks.Callback):
    """Timestamps of the epoch and of each batch's end.

    Keras calls a callback that is not marked async-safe on the training thread
    with the logs already converted to Python numbers, so by ``on_train_batch_end``
    the step has finished.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self.ends = [time.perf_counter()]

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds = time.perf_counter() - self.ends[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medt", help="a model name of medt_keras.MODEL_NAMES")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed train_on_batch / predict_on_batch steps")
    parser.add_argument("--fit-steps", type=int, default=8, help="steps of the timed fit epoch")
    parser.add_argument("--skip-fit", action="store_true")
    parser.add_argument("--as-medt-train", action="store_true", help="compile as medt-train does; training only")
    args = parser.parse_args()

    start = time.perf_counter()
    model = medt_keras.get_spec(args.model).model_class(img_size=args.size, in_channels=3, num_classes=2)
    if args.as_medt_train:
        from training.train import compile_model

        compile_model(model, 2, medt_keras.OfficialAdam(learning_rate=1e-3, l2=1e-5))
    else:
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    build_seconds = time.perf_counter() - start

    rng = np.random.default_rng(0)
    x4 = rng.random((TRAIN_BATCH, args.size, args.size, 3), dtype=np.float32)
    y4 = rng.integers(0, 2, (TRAIN_BATCH, args.size, args.size)).astype("int32")
    x8 = rng.random((INFER_BATCH, args.size, args.size, 3), dtype=np.float32)

    result = {"model": args.model, "size": args.size, "compiled_as": "medt-train" if args.as_medt_train else "user", "train_batch": TRAIN_BATCH, "infer_batch": INFER_BATCH,
              "warmup_steps": WARMUP_STEPS, "build_seconds": build_seconds}
    start = time.perf_counter()
    model.train_on_batch(x4, y4)  # the first step compiles; timed apart from the warm-up
    result["first_train_on_batch_seconds"] = time.perf_counter() - start
    result["train_on_batch"] = time_steps(lambda: model.train_on_batch(x4, y4), args.steps)
    if not args.as_medt_train:
        start = time.perf_counter()
        model.predict_on_batch(x8)  # compiles the inference program
        result["first_predict_on_batch_seconds"] = time.perf_counter() - start
        result["predict_on_batch"] = time_steps(lambda: model.predict_on_batch(x8), args.steps)

    if not args.skip_fit:
        # verbose=0: a progress bar would only add its printing to the steps.
        start = time.perf_counter()
        model.fit(RandomBatches(FIT_WARMUP_STEPS, args.size, seed=1), epochs=1, verbose=0)
        warmup_seconds = time.perf_counter() - start
        timer = BatchTimes()
        model.fit(RandomBatches(args.fit_steps, args.size, seed=2), epochs=1, verbose=0, callbacks=[timer])
        batches = [end - begin for begin, end in zip(timer.ends, timer.ends[1:])]
        result["fit"] = dict(summary(batches), warmup_steps=FIT_WARMUP_STEPS, warmup_seconds=warmup_seconds,
                             epoch_seconds=timer.epoch_seconds,
                             epoch_seconds_per_step=timer.epoch_seconds / args.fit_steps)

    import jax  # only to report its version and device

    result.update(keras=keras.__version__, jax=jax.__version__, backend=keras.backend.backend(),
                  device=str(jax.devices()[0].device_kind))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
