"""Run in a subprocess with 8 CPU devices (``XLA_FLAGS``): one device against data parallelism.

Prints one JSON line: the loss curves, the largest difference per variable,
the error message for a batch that does not divide over the devices, and
for each run what its compiled train step received and contains (the
devices the batch is sharded over, each shard's shape, the all-reduce
instructions of the optimised HLO and the shapes they reduce).
"""

import json

import medt_keras

import numpy as np

import keras

from training import distribution
from training.train import segmentation_loss
from training.data import SegmentationBatches
from medt_keras.optimizers import OfficialAdam

TINY = dict(width_scale=0.03125, groups=2, blocks=(1, 1, 1, 1))


def _source(count=16, size=128):
    rng = np.random.default_rng(0)
    images = rng.random((count, size, size, 1)).astype(np.float32)
    return [{"image": image, "mask": (image > 0.6).astype(np.uint8), "name": b"x"} for image in images]


class _StepRecorder:
    """Compiles Keras' jitted train step ahead of its first call and records what it saw.

    Keeps the compiled executable (so nothing compiles twice), the sharding of
    the first batch's images as the step receives them, and the all-reduce
    instructions of the optimised HLO.
    """

    def __init__(self):
        import keras.src.backend.jax.trainer as jax_trainer

        self.module, self.original = jax_trainer, jax_trainer.jit
        self.report = {}

    def __enter__(self):
        def recording_jit(fn, **kwargs):
            jitted = self.original(fn, **kwargs)
            if getattr(fn, "__name__", "") != "train_step":
                return jitted
            compiled = []

            def step(state, data):
                if not compiled:
                    compiled.append(jitted.lower(state, data).compile())
                    self._record(compiled[0], data)
                return compiled[0](state, data)

            return step

        self.module.jit = recording_jit
        return self

    def __exit__(self, *exc):
        self.module.jit = self.original

    def _record(self, compiled, data):
        import re

        images = data[0]
        hlo = compiled.as_text()
        # "%all-reduce.2 = (f64[2,7,7,3]{3,2,1,0}, f64[3]{0}) all-reduce(...)": the reduced operands' shapes,
        # as sorted dimensions (XLA may hand a gradient over in another layout).
        results = [m.group(1) for m in re.finditer(r"=\s*(\S.*?)\s+all-reduce(?:-start)?\(", hlo)]
        shapes = sorted({tuple(sorted(int(d) for d in dims.split(",") if d))
                         for result in results for dims in re.findall(r"[a-z0-9]+\[([0-9,]*)\]", result)})
        sharding = getattr(images, "sharding", None)  # None: a host numpy batch, put on the default device
        self.report = dict(
            input_devices=len(sharding.device_set) if sharding is not None else 1,
            input_spec=str(getattr(sharding, "spec", None)),
            input_shard_shapes=sorted({tuple(s.data.shape) for s in images.addressable_shards})
            if sharding is not None else [tuple(images.shape)],
            input_shape=list(images.shape),
            all_reduces=len(results),
            all_reduced_shapes=shapes,
        )


def _fit(data_parallel):
    if data_parallel:
        distribution.configure("data_parallel", batch_size=8)
    else:
        distribution.reset()
    keras.utils.set_random_seed(0)
    model = medt_keras.MedT(img_size=128, in_channels=1, gates_trainable=True, dtype="float64", **TINY)
    model.compile(optimizer=OfficialAdam(l2=1e-5), loss=segmentation_loss(model))
    batches = SegmentationBatches(_source(), 8, 128, shuffle=True, flip_probability=0.5, drop_remainder=data_parallel)
    losses = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"])))
    with _StepRecorder() as recorder:
        model.fit(batches, epochs=2, verbose=0, shuffle=False, callbacks=[record])
    step = dict(recorder.report, trainable_shapes=sorted({tuple(sorted(v.shape)) for v in model.trainable_variables}))
    return losses, {v.path: np.asarray(v.numpy(), np.float64) for v in model.variables}, step


def main():
    medt_keras.enable_float64()
    single_losses, single, single_step = _fit(False)
    parallel_losses, parallel, parallel_step = _fit(True)
    # Relative to the variable's magnitude (at least 1): float64 sums taken in
    # another order (per device, then all-reduced) differ in their last digits,
    # and a large statistic (a moving variance) carries that in absolute terms.
    differences = {
        path: float(np.max(np.abs(single[path] - parallel[path])) / max(1.0, float(np.max(np.abs(single[path])))))
        for path in single
    }
    try:
        distribution.configure("data_parallel", batch_size=4)
        mismatch = None
    except distribution.DistributionError as error:
        mismatch = str(error)
    print(json.dumps(dict(
        devices=len(keras.distribution.list_devices()),
        single_losses=single_losses,
        parallel_losses=parallel_losses,
        same_variables=sorted(single) == sorted(parallel),
        differences=differences,
        mismatch=mismatch,
        single_step=single_step,
        parallel_step=parallel_step,
    )))


if __name__ == "__main__":
    main()
