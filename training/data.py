"""Batches for ``model.fit`` from TFDS data sources, as the official loader prepares them.

``SegmentationBatches`` is a ``keras.utils.PyDataset`` over a random-access
data source. Batch ``i`` of epoch ``e`` is a pure function of (seed, e, i)
(``training/batch_builder.py``, which computes it without Keras): the order
is a permutation drawn from ``(seed, e)`` and so are the flips and crops, so
a run resumed at epoch ``e`` sees exactly the data an uninterrupted run
would have. Two loaders build the batches ahead of the model, with the same
results: threads of this process (``loader="threads"``, the default), or
grain worker processes (``loader="grain"``, ``training/grain_stream.py``).
"""

import concurrent.futures
import importlib.util
import threading

import keras

from training.batch_builder import BatchBuilder, to_model_input  # noqa: F401  (to_model_input: re-exported)

LOADERS = ("threads", "grain")


class SegmentationBatches(BatchBuilder, keras.utils.PyDataset):
    """``(images (b, h, w, c) float32, masks (b, h, w) int32)`` batches from a data source.

    Every argument but ``loader``, ``workers`` and ``max_queue_size`` is
    ``BatchBuilder``'s (the data, the plan, the per-process share of each
    global batch, padding): see ``training/batch_builder.py``.

    Args:
        loader: how batches are built ahead of the model; either gives the
            same batches (tested), only speed and memory differ.
            ``"threads"``: a pool of ``workers`` threads of this process
            builds the next ``max_queue_size`` batches of the epoch while
            the model runs (0 or 1: each batch is built when asked for). A
            prefetched batch is keyed by (epoch, index) and built from that
            epoch's plan. (Not Keras' own ``PyDataset`` workers: its
            enqueuer may start the next epoch's batches before ``epoch`` is
            set.) ``"grain"``: ``workers`` grain worker processes (0: one
            grain thread of this process) keep about ``max_queue_size``
            batches ready, in one stream through the epochs
            (``training/grain_stream.py``); each process starts a fresh
            Python (about 2 s each on 2 cores, once per split and run) and
            holds its own copy of the source's reader and crop cache. Needs
            the ``grain`` package (Python 3.11 and later) and a picklable
            ``source`` (a TFDS data source is).
        workers, max_queue_size: see ``loader``.
    """

    def __init__(self, source, batch_size, image_size, *, workers=1, max_queue_size=10, loader="threads", **plan):
        keras.utils.PyDataset.__init__(self)
        if loader not in LOADERS:
            raise ValueError(f"loader: {loader!r}; use {' or '.join(LOADERS)}.")
        if loader == "grain" and importlib.util.find_spec("grain") is None:
            raise ImportError('loader "grain" needs the grain package: pip install "medt-keras[grain]" '
                              "(Python 3.11 or later), or use the threads loader.")
        self.loader = loader
        self.workers_, self.max_queue_size_ = int(workers), int(max_queue_size)
        self._pool, self._ahead, self._lock = None, {}, threading.Lock()
        self._stream = None
        BatchBuilder.__init__(self, source, batch_size, image_size, **plan)

    def __len__(self):
        return self.num_batches

    def __getitem__(self, batch_index):
        if batch_index >= self.num_batches:
            raise IndexError(batch_index)
        if self.loader == "grain":
            with self._lock:
                if self._stream is None:
                    from training.grain_stream import BatchStream  # grain is needed for this loader only

                    self._stream = BatchStream(self, self.workers_, self.max_queue_size_)
            return self._stream.get(self.epoch, batch_index)
        if self.workers_ <= 1:
            return self.build(self.epoch, batch_index)
        key = (self.epoch, batch_index)
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.workers_, thread_name_prefix=self.name)
            future = self._ahead.pop(key, None) or self._pool.submit(self.build, *key)
            for stale in [k for k in self._ahead if k[0] != key[0] or k[1] < batch_index]:
                self._ahead.pop(stale).cancel()
            for ahead in range(batch_index + 1, min(batch_index + 1 + self.max_queue_size_, self.num_batches)):
                if (key[0], ahead) not in self._ahead:
                    self._ahead[key[0], ahead] = self._pool.submit(self.build, key[0], ahead)
        return future.result()

    def close(self):
        """Stops the loader's threads or worker processes (they start again if a batch is asked for)."""
        with self._lock:
            stream, self._stream = self._stream, None
            pool, self._pool = self._pool, None
            for future in self._ahead.values():
                future.cancel()
            self._ahead = {}
        if stream is not None:
            stream.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


class EpochTail(keras.utils.PyDataset):
    """The batches ``start, start + 1, ...`` of ``batches``' current epoch: what a run resumed mid-epoch trains on.

    ``model.fit`` over it for the one resumed epoch continues that epoch at
    the exact batch where the saved run stopped; item ``i`` is
    ``batches[start + i]``, so it is built from the same (seed, epoch, index).
    """

    def __init__(self, batches, start):
        super().__init__()
        if not 0 < start < batches.num_batches:
            raise ValueError(f"{batches.name}: cannot resume at batch {start} of {batches.num_batches}.")
        self.batches, self.start = batches, start

    def __len__(self):
        return self.batches.num_batches - self.start

    def __getitem__(self, index):
        if index >= len(self):
            raise IndexError(index)
        return self.batches[self.start + index]
