"""The base of the segmentation dataset builders: one feature layout for all.

Every builder stores examples as::

    image: (height, width, channels) uint8 PNG (float32 for already
           normalised data such as the HeLa frames)
    mask:  (height, width, 1) uint8 class indices (0 = background)
    name:  text, the source file (and tile) the example comes from

and is prepared to array_record, so that ``tfds.data_source`` reads it with
random access and without TensorFlow.
"""

import os

import numpy as np
import tensorflow_datasets as tfds

from medt_keras.datasets.images import DatasetError, check_same_size, encode_png, read_image, read_mask


class SegmentationConfig(tfds.core.BuilderConfig):
    """``channels``: 3 (RGB, the official colour read) or 1 (grayscale);
    ``binary``: masks thresholded at > 127 (the official loader) or kept as class indices."""

    def __init__(self, *, channels=3, binary=True, **kwargs):
        super().__init__(**kwargs)
        self.channels = channels
        self.binary = binary


def binary_configs(mask_rule, version="1.0.0"):
    """``rgb`` (default) and ``gray`` (luminance) configs with binary masks; ``mask_rule`` says what is foreground."""
    return [
        SegmentationConfig(name="rgb", channels=3, binary=True, version=version,
                           description=f"RGB images, masks: {mask_rule}."),
        SegmentationConfig(name="gray", channels=1, binary=True, version=version,
                           description=f"Grayscale images (luminance), masks: {mask_rule}."),
    ]


def segmentation_configs(version="1.0.0"):
    """The four configs of the image-file builders: rgb (default), gray, and their multi-class forms."""
    return [
        SegmentationConfig(name="rgb", channels=3, binary=True, version=version,
                           description="RGB images, masks binarised at > 127 (official)."),
        SegmentationConfig(name="gray", channels=1, binary=True, version=version,
                           description="Grayscale images (official --gray yes), masks binarised at > 127."),
        SegmentationConfig(name="rgb_multiclass", channels=3, binary=False, version=version,
                           description="RGB images, mask pixel values kept as class indices."),
        SegmentationConfig(name="gray_multiclass", channels=1, binary=False, version=version,
                           description="Grayscale images, mask pixel values kept as class indices."),
    ]


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared ``_info`` and example writing; subclasses list their (image, mask) files per split."""

    image_dtype = np.uint8

    def _info(self):
        if self.image_dtype == np.uint8:
            image = tfds.features.Image(shape=(None, None, self.builder_config.channels), dtype=np.uint8)
        else:
            image = tfds.features.Tensor(
                shape=(None, None, self.builder_config.channels), dtype=self.image_dtype, encoding="zlib"
            )
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip().split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {
                    "image": image,
                    "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
                    "name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "mask"),
        )

    def _pair_examples(self, pairs):
        """Yields examples from ``(name, image_path, mask_path)`` triples, checking each pair."""
        config = self.builder_config
        for name, image_path, mask_path in pairs:
            image = read_image(image_path, config.channels)
            mask = read_mask(mask_path, binary=config.binary)
            check_same_size(image, mask, image_path, mask_path)
            yield name, {"image": encode_png(image), "mask": encode_png(mask), "name": name}


def find_pairs(image_dir, mask_dir, mask_name):
    """``(stem, image_path, mask_path)`` for every image in ``image_dir``, sorted by name.

    ``mask_name(image_filename)`` gives the mask's file name. An image
    without its mask, a mask without its image, and an empty folder are
    errors naming the file or folder.
    """
    image_dir, mask_dir = os.fspath(image_dir), os.fspath(mask_dir)
    for folder in (image_dir, mask_dir):
        if not os.path.isdir(folder):
            raise DatasetError(f"{folder}: folder not found.")
    images = sorted(f for f in os.listdir(image_dir) if not f.startswith("."))
    if not images:
        raise DatasetError(f"{image_dir}: no images; a split needs at least one.")
    masks = set(f for f in os.listdir(mask_dir) if not f.startswith("."))
    pairs, used = [], set()
    for filename in images:
        mask_filename = mask_name(filename)
        if mask_filename not in masks:
            raise DatasetError(
                f"{os.path.join(image_dir, filename)}: no mask; expected {os.path.join(mask_dir, mask_filename)}."
            )
        used.add(mask_filename)
        stem = os.path.splitext(filename)[0]
        pairs.append((stem, os.path.join(image_dir, filename), os.path.join(mask_dir, mask_filename)))
    orphans = sorted(masks - used)
    if orphans:
        raise DatasetError(f"{os.path.join(mask_dir, orphans[0])}: mask without an image in {image_dir}.")
    return pairs


def hold_out(pairs, fraction, seed=0):
    """Splits ``pairs`` into (kept, held out): ``ceil(fraction * n)`` (at least 1) chosen with a fixed seed."""
    if len(pairs) < 2:
        name = pairs[0][1] if pairs else "the train split"
        raise DatasetError(f"{name}: cannot hold out a validation split from {len(pairs)} example(s).")
    count = min(len(pairs) - 1, max(1, int(np.ceil(fraction * len(pairs)))))
    order = np.random.default_rng(seed).permutation(len(pairs))
    held = set(order[:count].tolist())
    kept = [p for i, p in enumerate(pairs) if i not in held]
    return kept, [p for i, p in enumerate(pairs) if i in held]
