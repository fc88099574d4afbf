"""The batches of a split as a pure function of (seed, epoch, index), in NumPy alone.

``BatchBuilder`` is everything ``training.data.SegmentationBatches`` computes,
without Keras: the grain loader's worker processes (``training/grain_stream.py``)
unpickle a ``BatchBuilder`` and import only this module, NumPy and PIL, so a
worker starts without loading Keras (it starts about twice as fast) and never
touches the parent's JAX state.

Batch ``i`` of epoch ``e`` is a pure function of (seed, e, i): the order is a
permutation drawn from ``(seed, e)`` and so are the flips and crops, so a run
resumed at epoch ``e`` sees exactly the data an uninterrupted run would have,
whichever loader builds it.

With ``crop_size`` set, the unit of an epoch is a crop, not an image: an
epoch is ``examples_per_epoch`` crops drawn with replacement across the
images, each image with probability proportional to its area (so every
pixel of the split is equally likely to be in a crop), the crop's corner
uniform over the positions where it fits. With ``foreground_fraction`` > 0,
that fraction of the crops is instead centred on a foreground pixel of the
image (uniform over its foreground pixels), for masks where objects are
sparse; an image without foreground gets a uniform crop.
"""

import numpy as np


def _dataset_error(message):
    # Imported when raised: importing medt_keras loads Keras, which worker processes do without.
    from medt_keras.datasets.images import DatasetError

    return DatasetError(message)


def to_model_input(image, channel_order="bgr", normalize="dtype"):
    """``(h, w, c)`` stored or read image -> float32 in [0, 1], channels in the model's order.

    The one place pixels become a model's input, for training batches and
    ``medt-predict`` alike (``medt_keras.preprocessing`` describes the
    options a model records). ``normalize``: ``"dtype"`` divides integers
    by their type's maximum (uint8 / 255, torchvision's ``ToTensor``) and
    takes floats as stored (normalised); ``"percentile"`` maps the image's
    1st / 99.8th percentiles to 0 / 1 per channel (16-bit microscopy);
    ``"auto"``: dtype for uint8, percentile otherwise. The official loader
    reads colour images with OpenCV, i.e. BGR, and converted official
    weights expect that.
    """
    image = np.asarray(image)
    if normalize == "auto":
        normalize = "dtype" if image.dtype == np.uint8 else "percentile"
    if normalize == "dtype":
        integers = image.dtype.kind in "ui"
        image = image.astype(np.float32) / float(np.iinfo(image.dtype).max) if integers else image.astype(np.float32)
    elif normalize == "percentile":
        # Imported here: worker processes (dtype only) never load the library, and with it Keras.
        from medt_keras.datasets.images import percentile_normalize

        image = percentile_normalize(image, per_channel=True)
    else:
        raise ValueError(f"normalize: {normalize!r}; use auto, dtype or percentile.")
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


CROP_CACHE_BYTES = 2 << 30


class TfdsRecords:
    """The decoded records of a ``tfds.data_source`` split, without its ``DatasetInfo``.

    What worker processes unpickle in place of the data source: unpickling a
    data source imports the module of its dataset's builder (for this
    project's datasets ``medt_keras``, hence Keras: about 3 s a worker on 2
    cores), its array_record reader and features alone only TFDS (about
    1 s). Records are decoded as the data source decodes them.
    """

    def __init__(self, source):
        self.records, self.features, self.decoders = source.data_source, source.dataset_info.features, source.decoders

    @staticmethod
    def applies(source):
        method = getattr(source, "deserialize_method", None)
        return (getattr(method, "name", None) == "DESERIALIZE_AND_DECODE"
                and all(hasattr(source, a) for a in ("data_source", "dataset_info", "decoders")))

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.features.deserialize_example_np(self.records[index], decoders=self.decoders)


class BatchBuilder:
    """``(images (b, h, w, c) float32, masks (b, h, w) int32)`` batches from a data source.

    Args:
        source: a ``tfds.data_source`` split (or any sequence of dicts with
            ``image`` (h, w, c) and ``mask`` (h, w, 1)); picklable for the
            grain loader's worker processes (a TFDS data source is).
        batch_size: examples per batch; the last batch may be smaller, as
            with PyTorch's DataLoader default.
        image_size: the model's (height, width). Examples of another size
            are resized to it (bilinear; masks nearest) unless ``crop_size``
            is set, in which case a random ``crop_size`` square is cut and
            resized.
        shuffle: a new permutation each epoch, drawn from ``(seed, epoch)``.
        examples_per_epoch: with ``shuffle``, an epoch is the first this
            many examples of the epoch's permutation (a fresh random sample
            each epoch) instead of all of them. With ``crop_size`` (and
            ``shuffle``), an epoch is this many random crops (default: one
            per image), drawn with replacement, so it may exceed the number
            of images.
        crop_size: with ``shuffle``, cut a random ``crop_size`` square from
            each drawn image (the whole side where the image is smaller),
            resized to ``image_size`` if it differs.
        foreground_fraction: with ``crop_size``, the probability that a crop
            is centred on a random foreground pixel (0: all crops uniform).
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
            weights (b, h, w) float32)`` for every batch, so evaluation runs
            one program whatever the split's size. Real pixels get weight
            ``num_batches * batch_size / epoch_size`` (1 when nothing is
            padded): Keras divides a batch's weighted loss sum by all its
            elements, padding included, and averages batches by their full
            size, so this factor makes the reported loss the mean over the
            real examples exactly. Ratios such as F1 and IoU are unchanged
            by a common factor. Metrics see the weights only when compiled
            as ``weighted_metrics`` (``training.train.compile_model``).
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
        foreground_fraction=0.0,
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
        inherited = set(vars(self))
        self.source = source
        self.size = len(source) if limit is None else min(limit, len(source))
        if self.size == 0:
            raise _dataset_error(f"{name}: the split is empty.")
        # Crops are drawn with replacement: a few large images can fill any number of batches.
        self.crops = bool(shuffle and crop_size)
        if self.crops:
            self.epoch_size = int(examples_per_epoch or self.size)
        elif shuffle and examples_per_epoch:
            self.epoch_size = min(examples_per_epoch, self.size)
        else:
            self.epoch_size = self.size
        if self.epoch_size < batch_size and shuffle:
            raise _dataset_error(
                f"{name}: {self.epoch_size} example(s), fewer than one batch of {batch_size}; "
                "add data or lower --batch-size."
            )
        if not 0.0 <= foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {foreground_fraction}.")
        self.foreground_fraction = float(foreground_fraction)
        self._areas = None
        # Decoded (image, mask) of the examples crops are cut from: a large PNG takes ~0.1 s to
        # decode and an epoch cuts many crops from each image. Filled up to CROP_CACHE_BYTES.
        self._decoded, self._decoded_bytes = {}, 0
        self.batch_size = int(batch_size)
        self.image_size = (image_size, image_size) if np.isscalar(image_size) else tuple(image_size)
        self.shuffle = shuffle
        self.flip_probability = float(flip_probability)
        self.crop_size = crop_size
        self.channel_order = channel_order
        self.seed = int(seed)
        self.name = name
        self.epoch = 0
        if self.batch_size % process_count:
            raise _dataset_error(
                f"{name}: batch size {self.batch_size} does not divide over {process_count} processes."
            )
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.drop_remainder, self.pad_remainder = bool(drop_remainder), bool(pad_remainder)
        # What plain_copy carries: the attributes set here, not a subclass's (threads, Keras state).
        self._builder_fields = tuple(sorted(set(vars(self)) - inherited))

    @property
    def num_batches(self):
        if self.drop_remainder:
            return self.epoch_size // self.batch_size
        return -(-self.epoch_size // self.batch_size)

    @property
    def epoch_dependent(self):
        """Whether batches change with the epoch (a new order, flips or crops); if not, every epoch is epoch 0's."""
        return bool(self.shuffle or self.flip_probability > 0)

    def plain_copy(self):
        """A ``BatchBuilder`` (whatever this object's class) computing the same batches, without the
        decoded-image cache: what worker processes unpickle. Reads the image sizes first if the plan needs them."""
        if self.crops:
            self.image_shapes()
        copy = BatchBuilder.__new__(BatchBuilder)
        copy.__dict__.update({name: getattr(self, name) for name in self._builder_fields})
        copy._decoded, copy._decoded_bytes = {}, 0
        if TfdsRecords.applies(self.source):
            copy.source = TfdsRecords(self.source)
        return copy

    def image_shapes(self):
        """``(height, width)`` of every example, read once (the crop plan weights images by area)."""
        if self._areas is None:
            shapes = []
            for i in range(self.size):
                shapes.append(self._read(i, cache=self.crops)[1].shape[:2])
            self._areas = np.array(shapes, np.int64).reshape(-1, 2)
        return self._areas

    def _epoch_plan(self, epoch=None):
        """``(order, flips, crops)`` for the epoch, each of length ``epoch_size``.

        ``crops[k]`` is ``(u_y, u_x, u_foreground, centred)``: uniforms that
        place crop ``k`` (see ``example``); drawn here so the plan depends on
        (seed, epoch) alone.
        """
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        if self.crops:
            areas = np.prod(self.image_shapes(), axis=1).astype(np.float64)
            order = rng.choice(self.size, size=self.epoch_size, replace=True, p=areas / areas.sum())
            flips = rng.random(self.epoch_size) < self.flip_probability
            crops = rng.random((self.epoch_size, 4))
            crops[:, 3] = crops[:, 3] < self.foreground_fraction
            return order, flips, crops
        order = rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        flips = rng.random(self.size) < self.flip_probability
        crops = rng.random((self.size, 2))
        return order, flips, crops

    def _crop_corner(self, mask, side, crop):
        """Top-left corner of a ``side`` square: uniform, or (``crop[3]``) centred on a foreground pixel."""
        height, width = mask.shape
        if len(crop) > 3 and crop[3]:
            ys, xs = np.nonzero(mask)
            if len(ys):
                pick = min(int(crop[2] * len(ys)), len(ys) - 1)
                y = int(np.clip(ys[pick] - side // 2, 0, height - side))
                x = int(np.clip(xs[pick] - side // 2, 0, width - side))
                return y, x
        return int(crop[0] * (height - side + 1)), int(crop[1] * (width - side + 1))

    def _read(self, index, cache=False):
        """``(image, mask, record)`` as stored (not yet converted), from the cache when ``cache``."""
        if index in self._decoded:
            return self._decoded[index]
        record = self.source[index]
        image = np.asarray(record["image"])  # converted after the crop: a crop of a large image is cheap
        mask = np.asarray(record["mask"])
        entry = (image, mask, {"name": record.get("name", "?")})
        if cache and self._decoded_bytes + image.nbytes + mask.nbytes <= CROP_CACHE_BYTES:
            self._decoded[index] = entry
            self._decoded_bytes += image.nbytes + mask.nbytes
        return entry

    def example(self, index, flip=False, crop=None, resize=True):
        """``(image (h, w, c) float32, mask (h, w) int32)``: example ``index``, cropped, resized (unless
        ``resize`` is false: then the whole stored size) and flipped as asked."""
        image, mask, record = self._read(int(index), cache=self.crops)
        if mask.ndim == 3:
            mask = mask[..., 0]
        if image.shape[:2] != mask.shape:
            raise _dataset_error(
                f"{self.name}: example {_name(record)} has image {image.shape[:2]} but mask {mask.shape}."
            )
        if self.crop_size and crop is not None:
            side = min(self.crop_size, *image.shape[:2])
            y, x = self._crop_corner(mask, side, crop)
            image, mask = image[y : y + side, x : x + side], mask[y : y + side, x : x + side]
        image = to_model_input(image, self.channel_order)
        if resize and image.shape[:2] != self.image_size:
            image = _resize(image, self.image_size, nearest=False)
            mask = _resize(mask[..., None], self.image_size, nearest=True)[..., 0]
        if flip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return image, mask.astype(np.int32)

    def build(self, epoch, batch_index):
        """Batch ``batch_index`` of epoch ``epoch`` (see the class docstring for what it holds)."""
        order, flips, crops = self._epoch_plan(epoch)
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
        scale = self.num_batches * self.batch_size / self.epoch_size
        weights = np.array([scale if k < real else 0.0 for k in mine], np.float32)
        return images, masks, np.broadcast_to(weights[:, None, None], masks.shape).copy()

    def names(self):
        return [_name(self.source[i]) for i in range(self.size)]


def _name(record):
    name = record.get("name", "?")
    return name.decode() if isinstance(name, bytes) else str(name)
