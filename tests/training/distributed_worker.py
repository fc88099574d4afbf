"""Run in a subprocess with 8 CPU devices (``XLA_FLAGS``): one device against data parallelism.

Prints one JSON line: the loss curves, the largest difference per variable
and the error message for a batch that does not divide over the devices.
"""

import json

import medt_keras

import numpy as np

import keras

from training import distribution
from training.data import SegmentationBatches
from medt_keras.optimizers import OfficialAdam

TINY = dict(width_scale=0.03125, groups=2, blocks=(1, 1, 1, 1))


def _source(count=16, size=128):
    rng = np.random.default_rng(0)
    images = rng.random((count, size, size, 1)).astype(np.float32)
    return [{"image": image, "mask": (image > 0.6).astype(np.uint8), "name": b"x"} for image in images]


def _fit(data_parallel):
    if data_parallel:
        distribution.configure("data_parallel", batch_size=8)
    else:
        distribution.reset()
    keras.utils.set_random_seed(0)
    model = medt_keras.MedT(img_size=128, in_channels=1, gates_trainable=True, dtype="float64", **TINY)
    model.compile(optimizer=OfficialAdam(l2=1e-5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batches = SegmentationBatches(_source(), 8, 128, shuffle=True, flip_probability=0.5, drop_remainder=data_parallel)
    losses = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: losses.append(float(logs["loss"])))
    model.fit(batches, epochs=2, verbose=0, shuffle=False, callbacks=[record])
    return losses, {v.path: np.asarray(v.numpy(), np.float64) for v in model.variables}


def main():
    medt_keras.enable_float64()
    single_losses, single = _fit(False)
    parallel_losses, parallel = _fit(True)
    differences = {path: float(np.max(np.abs(single[path] - parallel[path]))) for path in single}
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
    )))


if __name__ == "__main__":
    main()
