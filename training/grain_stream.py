"""A split's batches built ahead by grain, in worker processes (``SegmentationBatches(loader="grain")``).

A ``BatchStream`` reads the batches of a ``BatchBuilder`` in order: stream
position ``s`` is batch ``s % n`` of epoch ``s // n`` (``n`` batches an
epoch), so one stream runs through the epochs of a training run without
restarting its workers. It is a grain ``MapDataset`` over positions, mapped by
``BatchAt`` (the builder's pure function of (seed, epoch, index)), read
through ``mp_prefetch``: ``workers`` processes each build every
``workers``-th batch ahead, and grain hands them back in order. So the
batches are those built in the main process, exactly.

Worker processes are started by spawning a fresh Python (grain always
spawns), never by forking: nothing of the parent's JAX state is copied. Each
unpickles a plain ``BatchBuilder`` (NumPy and PIL; its module imports no
Keras) and builds NumPy batches; grain itself imports JAX there, but no
device is touched. A worker starts in about 2 s on a 2-core machine, once per
stream.

A worker ends by itself once its parent has gone (``exit_with_parent``):
a training run killed with ``kill -9`` leaves no worker behind.

Per-process sharding is the builder's: with ``process_count`` > 1 each
process's stream yields that process's slice of every global batch (what
``ShardByJaxProcess`` would give instead is a contiguous share of the
examples, i.e. other global batches for each process count).

A request for a batch the stream has passed (Keras reads batch 0 once to
build the model before the first epoch) is built in the calling thread;
one ahead of the stream (a jump) restarts it there.
"""

import math
import os
import threading
import time

import grain

# Positions a stream covers after its start: more epochs than any run.
STREAM_LENGTH = 2**40


class BatchAt:
    """Stream position -> ``builder.build(position // n, position % n)``; what grain's workers run."""

    def __init__(self, builder):
        self.builder = builder

    def __call__(self, position):
        return self.builder.build(*divmod(int(position), self.builder.num_batches))


def exit_with_parent(worker_index=0, worker_count=1, interval=0.5):
    """Run in each worker as it starts: ends the worker once the process that started it has gone.

    grain's workers are daemon processes, which end with their parent only
    when it exits normally; after a ``kill -9`` of a training run they would
    wait forever to hand over their next batch. A thread polls the parent's
    pid (a dead parent's children are re-parented).
    """
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _absl_flags_parsed():
    # grain 0.2.18 reads one of its absl flags when it starts worker processes, which raises
    # UnparsedFlagAccessError in a program that never parsed absl flags (google/grain#1355, fixed
    # after 0.2.18). Marking them parsed keeps every flag at its default.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class BatchStream:
    """Batches of ``builder`` from grain: ``workers`` processes (0: one thread of this process) keep
    about ``buffer`` batches ready.

    ``get(epoch, index)`` returns ``builder.build(epoch, index)``. For a
    builder whose batches do not change with the epoch (evaluation splits),
    the request's epoch is ignored and each pass over the split continues
    the stream.
    """

    def __init__(self, builder, workers=0, buffer=10):
        self.builder, self.workers, self.buffer = builder, int(workers), max(1, int(buffer))
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}.")
        self._iterator, self._next = None, None
        self._lock = threading.Lock()
        self.starts = 0  # how many times the stream (and its worker processes) started

    def _position(self, epoch, index):
        count = self.builder.num_batches
        if self.builder.epoch_dependent:
            return epoch * count + index
        return (self._next or 0) // count * count + index

    def get(self, epoch, index):
        with self._lock:
            position = self._position(epoch, index)
            if self._iterator is not None and position < self._next:
                return self.builder.build(epoch, index)
            if self._iterator is None or position > self._next:
                self._start(position)
            try:
                batch = next(self._iterator)
            except BaseException:
                self._close()  # a worker that raised stops; the next request starts a new stream
                raise
            self._next += 1
            return batch

    def _start(self, position):
        self._close()
        dataset = grain.MapDataset.range(position, position + STREAM_LENGTH)
        if self.workers == 0:
            # One thread of this process: the builder itself (its cache shared with direct builds).
            dataset = dataset.map(BatchAt(self.builder)).to_iter_dataset(
                grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.buffer)
            )
        else:
            _absl_flags_parsed()
            # Each worker runs its slice in order, one batch at a time; its own buffer holds its share.
            dataset = (
                dataset.map(BatchAt(self.builder.plain_copy()))
                .to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
                .mp_prefetch(
                    grain.MultiprocessingOptions(
                        num_workers=self.workers, per_worker_buffer_size=math.ceil(self.buffer / self.workers)
                    ),
                    worker_init_fn=exit_with_parent,
                )
            )
        self._iterator = iter(dataset)
        self._next = position
        self.starts += 1

    def _close(self):
        if self._iterator is not None:
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
        self._iterator, self._next = None, None

    def close(self):
        """Stops the workers; a later ``get`` starts them again."""
        with self._lock:
            self._close()
