"""Data-parallel training on many devices and hosts, through Keras' distribution API.

One place sets it up (``configure``), before the model is built:

* several processes (a TPU pod slice, several GPU hosts): ``keras.distribution.initialize``
  (``jax.distributed.initialize``); on Cloud TPU its arguments come from the
  environment, elsewhere from ``--coordinator-address``, ``--num-processes``
  and ``--process-id`` (or JAX's ``JAX_COORDINATOR_ADDRESS`` /
  ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables);
* ``keras.distribution.set_distribution(DataParallel(devices=all devices))``:
  variables are replicated, every batch is split along its first axis over
  all devices of all hosts, and XLA inserts the gradient all-reduce.

BatchNorm: under JAX data parallelism a BatchNorm's batch mean and variance
are computed over the *global* batch (XLA reduces across devices), i.e.
synchronised BatchNorm. The official code with ``nn.DataParallel``
normalises each device's slice on its own; a data-parallel run here
computes exactly what one device would compute on the whole global batch
(``tests/training/test_distribution.py``).

Each process reads only its own share of every global batch
(``SegmentationBatches(process_index, process_count)``), and the global
batch must divide by the device count. A model of these sizes (about 1.5 M
parameters) fits on any one device, so model parallelism (a layout map) is
not offered.
"""

import os

import keras

STRATEGIES = ("none", "data_parallel")


class DistributionError(ValueError):
    """The distribution setup cannot work (bad batch size, missing coordinator, ...)."""


def _multi_process_arguments(coordinator_address, num_processes, process_id):
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes or os.environ.get("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
    return coordinator_address, num_processes, process_id


def configure(strategy="none", batch_size=None, coordinator_address=None, num_processes=None, process_id=None,
              cloud_tpu=False):
    """Sets up distribution for the run; returns ``(process_index, process_count, device_count)``.

    Must run before any model is built. ``strategy="none"`` leaves Keras'
    default (one device) alone.
    """
    if strategy not in STRATEGIES:
        raise DistributionError(f"distribution: {strategy!r} is not one of {', '.join(STRATEGIES)}.")
    if strategy == "none":
        return 0, 1, 1
    import jax

    # Cross-process collectives of JAX's CPU backend (the tests; CPU-only
    # hosts); TPU and GPU backends have their own and ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    address, count, index = _multi_process_arguments(coordinator_address, num_processes, process_id)
    if cloud_tpu:
        keras.distribution.initialize()  # arguments from the TPU environment
    elif address is not None:
        if count is None or index is None:
            raise DistributionError(
                "multi-process run: give --num-processes and --process-id with --coordinator-address "
                "(or JAX_NUM_PROCESSES / JAX_PROCESS_ID)."
            )
        keras.distribution.initialize(
            job_addresses=address, num_processes=int(count), process_id=int(index)
        )
    devices = keras.distribution.list_devices()
    if batch_size is not None and batch_size % len(devices):
        raise DistributionError(
            f"batch size {batch_size} does not divide over {len(devices)} devices; "
            f"use a multiple of {len(devices)} (e.g. --batch-size {len(devices) * max(1, batch_size // len(devices))})."
        )
    # Each process already reads only its share of every batch (SegmentationBatches).
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False))
    return jax.process_index(), jax.process_count(), len(devices)


def reset():
    """Back to Keras' default (no distribution); for tests."""
    keras.distribution.set_distribution(None)
