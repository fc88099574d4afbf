"""Run in a subprocess with 8 CPU devices: the collectives of MedT's data-parallel train step.

Compiles (does not run) Keras' train step of a tiny MedT under
``DataParallel`` over 8 devices and prints one JSON line: the number of
each collective operation in the optimised HLO, and the device count.
"""

import collections
import json
import re
import sys

import medt_keras

import jax
import numpy as np

import keras
from keras.src.backend.jax.trainer import _distribute_data

from training import distribution

TINY = dict(width_scale=0.03125, groups=2, blocks=(1, 1, 1, 1))
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def compiled_train_step_hlo(attention):
    """The optimised HLO text of ``model.train_step`` as ``fit`` compiles it, batch 8 of 128x128 images."""
    distribution.configure("data_parallel", batch_size=8)
    model = medt_keras.MedT(img_size=128, in_channels=1, attention=attention, **TINY)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((8, 128, 128, 1), dtype=np.float32)
    y = (x[..., 0] > 0.5).astype(np.int32)
    model._symbolic_build(data_batch=(x, y, None))
    # What make_train_function jits, with fit's input layout.
    step = jax.jit(model.train_step, donate_argnums=0, out_shardings=(None, model._get_state_sharding_spec()))
    state = model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True, optimizer_variables=True, metrics_variables=True
    )
    data = _distribute_data((x, y, None))
    return step.lower(state, data).compile().as_text()


def count_collectives(hlo):
    """``{op: count}`` over HLO instructions (``-start`` forms counted as their op)."""
    counts = collections.Counter()
    for op in re.findall(r"=\s*[^=]*?\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(", hlo):
        counts[op] += 1
    return dict(counts)


def main():
    attention = sys.argv[1] if len(sys.argv) > 1 else "auto"
    hlo = compiled_train_step_hlo(attention)
    lines = [line.strip() for line in hlo.splitlines() if re.search("|".join(COLLECTIVES), line)]
    print(json.dumps(dict(
        devices=len(keras.distribution.list_devices()),
        collectives=count_collectives(hlo),
        examples=[line[:300] for line in lines if "all-reduce" not in line][:20],
    )))


if __name__ == "__main__":
    main()
