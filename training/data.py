"""Batches for ``model.fit`` from TFDS data sources, as the official loader prepares them.

``SegmentationBatches`` is a ``keras.utils.PyDataset`` over a random-access
data source. Batch ``i`` of epoch ``e`` is a pure function of (seed, e, i):
the order is a permutation drawn from ``(seed, e)`` and so are the flips and
crops, so a run resumed at epoch ``e`` sees exactly the data an
uninterrupted run would have.
"""

import numpy as np

import keras

from medt_keras.datasets.images import DatasetError


def to_model_input(image, channel_order="bgr"):
    """``(h, w, c)`` stored image -> float32 in [0, 1], channels in the official order.

    uint8 images are divided by 255 (torchvision's ``ToTensor``); float
    images are stored normalised. The official loader reads colour images
    with OpenCV, i.e. BGR, and converted official weights expect that.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    else:
        image = image.astype(np.float32)
    if image.shape[-1] == 3 and channel_order == "bgr":
        image = image[..., ::-1]
    return image


def _resize(array, size, nearest):
    from PIL import Image

    height, width = size
    channels = [
        np.asarray(
            Image.fromarray(array[..., c].astype(np.float32), mode="F").resize(
                (width, height), Image.NEAREST if nearest else Image.BILINEAR
            )
        )
        for c in range(array.shape[-1])
    ]
    return np.stack(channels, axis=-1).astype(array.dtype)


class SegmentationBatches(keras.utils.PyDataset):
    """``(images (b, h, w, c) float32, masks (b, h, w) int32)`` batches from a data source.

    Args:
        source: a ``tfds.data_source`` split (or any sequence of dicts with
            ``image`` (h, w, c) and ``mask`` (h, w, 1)).
        batch_size: examples per batch; the last batch may be smaller, as
            with PyTorch's DataLoader default.
        image_size: the model's (height, width). Examples of another size
            are resized to it (bilinear; masks nearest) unless ``crop_size``
            is set, in which case a random ``crop_size`` square is cut and
            resized.
        shuffle: a new permutation each epoch, drawn from ``(seed, epoch)``.
        examples_per_epoch: with ``shuffle``, an epoch is the first this
            many examples of the epoch's permutation (a fresh random sample
            each epoch) instead of all of them.
        flip_probability: random horizontal flip (official default 0.5).
        name: the split's name, for error messages.
        process_index, process_count: in a multi-process (multi-host) run,
            each process yields only its share of every global batch:
            examples ``[i * b / n, (i + 1) * b / n)`` of it, for process
            ``i`` of ``n`` and global batch ``b``.
        drop_remainder: drop the last batch if it is not full (data-parallel
            training needs every batch to divide over the devices).
        pad_remainder: fill the last batch up to ``batch_size`` with copies
            whose pixels get sample weight 0, and yield ``(images, masks,
            weights)`` for every batch (data-parallel evaluation).
    """

    def __init__(
        self,
        source,
        batch_size,
        image_size,
        *,
        shuffle=False,
        flip_probability=0.0,
        crop_size=None,
        channel_order="bgr",
        seed=0,
        limit=None,
        examples_per_epoch=None,
        name="split",
        process_index=0,
        process_count=1,
        drop_remainder=False,
        pad_remainder=False,
    ):
        super().__init__()
        self.source = source
        self.size = len(source) if limit is None else min(limit, len(source))
        if self.size == 0:
            raise DatasetError(f"{name}: the split is empty.")
        if self.size < batch_size and shuffle:
            raise DatasetError(
                f"{name}: {self.size} example(s), fewer than one batch of {batch_size}; "
                "add data or lower --batch-size."
            )
        self.batch_size = int(batch_size)
        self.epoch_size = self.size if not (shuffle and examples_per_epoch) else min(examples_per_epoch, self.size)
        self.image_size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
        self.shuffle = shuffle
        self.flip_probability = float(flip_probability)
        self.crop_size = crop_size
        self.channel_order = channel_order
        self.seed = int(seed)
        self.name = name
        self.epoch = 0
        if self.batch_size % process_count:
            raise DatasetError(f"{name}: batch size {self.batch_size} does not divide over {process_count} processes.")
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.drop_remainder, self.pad_remainder = bool(drop_remainder), bool(pad_remainder)

    @property
    def num_batches(self):
        if self.drop_remainder:
            return self.epoch_size // self.batch_size
        return -(-self.epoch_size // self.batch_size)

    def __len__(self):
        return self.num_batches

    def _epoch_plan(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        flips = rng.random(self.size) < self.flip_probability
        crops = rng.random((self.size, 2))
        return order, flips, crops

    def example(self, index, flip=False, crop=None):
        record = self.source[int(index)]
        image = to_model_input(record["image"], self.channel_order)
        mask = np.asarray(record["mask"])
        if mask.ndim == 3:
            mask = mask[..., 0]
        if image.shape[:2] != mask.shape:
            raise DatasetError(f"{self.name}: example {_name(record)} has image {image.shape[:2]} but mask {mask.shape}.")
        if self.crop_size and crop is not None:
            side = min(self.crop_size, *image.shape[:2])
            y = int(crop[0] * (image.shape[0] - side + 1))
            x = int(crop[1] * (image.shape[1] - side + 1))
            image, mask = image[y : y + side, x : x + side], mask[y : y + side, x : x + side]
        if image.shape[:2] != self.image_size:
            image = _resize(image, self.image_size, nearest=False)
            mask = _resize(mask[..., None], self.image_size, nearest=True)[..., 0]
        if flip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return image, mask.astype(np.int32)

    def __getitem__(self, batch_index):
        if batch_index >= self.num_batches:
            raise IndexError(batch_index)
        order, flips, crops = self._epoch_plan()
        start = batch_index * self.batch_size
        positions = list(range(start, min(start + self.batch_size, self.epoch_size)))
        real = len(positions)
        if self.pad_remainder:
            positions += [positions[-1]] * (self.batch_size - real)
        share = len(positions) // self.process_count
        mine = range(self.process_index * share, (self.process_index + 1) * share)
        pairs = [self.example(order[positions[k]], flips[positions[k]], crops[positions[k]] if self.shuffle else None)
                 for k in mine]
        images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
        if not self.pad_remainder:
            return images, masks
        weights = np.array([1.0 if k < real else 0.0 for k in mine], np.float32)
        return images, masks, np.broadcast_to(weights[:, None, None], masks.shape).copy()

    def names(self):
        return [_name(self.source[i]) for i in range(self.size)]


def _name(record):
    name = record.get("name", "?")
    return name.decode() if isinstance(name, bytes) else str(name)
