"""``glas``: the GlaS (Gland Segmentation) challenge data, MICCAI 2015, Warwick QU.

The archive is downloaded by hand (the challenge asks for registration):
``Warwick QU Dataset (Released 2016_07_08).zip``; ``archives.py`` finds it,
its extracted folder or the loose files in the manual directory.
"""

import os
import re
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from medt_keras.datasets.archives import archive_folder, manual_directory, visible_files
from medt_keras.datasets.images import (
    DatasetError,
    check_same_size,
    encode_png,
    read_image,
)
from medt_keras.datasets.segmentation import (
    SegmentationBuilder,
    binary_configs,
    hold_out,
)

ARCHIVE = "Warwick QU Dataset (Released 2016_07_08).zip"
FOLDER = "Warwick QU Dataset (Released 2016_07_08)"
VALIDATION_FRACTION = 0.1
IMAGE_PATTERN = re.compile(r"^(train|testA|testB)_(\d+)\.bmp$")
ANNOTATION_PATTERN = re.compile(r"^(train|testA|testB)_(\d+)_anno\.bmp$")
SOURCE_SPLITS = ("train", "testA", "testB")




def read_instance_mask(path):
    """``(height, width, 1)`` uint8: 1 where the instance label image is > 0 (any gland), else 0.

    The label values are read as stored: the palette indices of an indexed
    BMP, not the colours the palette maps them to, so that instance ``k`` is
    foreground whatever colour a viewer would show it in.
    """
    from PIL import Image, UnidentifiedImageError

    path = os.fspath(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("P", "PA", "LA"):
                image = image.getchannel(0)
            array = np.asarray(image)
    except (OSError, UnidentifiedImageError, SyntaxError) as error:
        raise DatasetError(f"{path}: cannot read the annotation image ({error}).") from error
    if array.ndim == 3:  # colour-coded labels: any non-black colour is a gland
        array = array[:, :, :3].max(axis=-1)
    return (array > 0).astype(np.uint8)[:, :, None]


def glas_pairs(folder):
    """``{source split: [(name, image_path, annotation_path), ...]}``, each sorted by image number."""
    files = visible_files(folder)
    present = set(files)
    pairs = {split: [] for split in SOURCE_SPLITS}
    annotations = set()
    for filename in files:
        match = IMAGE_PATTERN.match(filename)
        if match is None:
            continue
        stem = os.path.splitext(filename)[0]
        annotation = stem + "_anno.bmp"
        if annotation not in present:
            raise DatasetError(
                f"{os.path.join(folder, filename)}: no annotation; expected {os.path.join(folder, annotation)}."
            )
        annotations.add(annotation)
        image_path, annotation_path = os.path.join(folder, filename), os.path.join(folder, annotation)
        pairs[match.group(1)].append((int(match.group(2)), stem, image_path, annotation_path))
    for filename in files:
        if ANNOTATION_PATTERN.match(filename) and filename not in annotations:
            raise DatasetError(f"{os.path.join(folder, filename)}: annotation without its image in {folder}.")
    for split, found in pairs.items():
        if not found:
            raise DatasetError(
                f"{folder}: no {split}_<n>.bmp images; the GlaS archive has 85 train, 60 testA, 20 testB."
            )
    return {split: [entry[1:] for entry in sorted(found)] for split, found in pairs.items()}


def holds_glas(folder):
    return any(IMAGE_PATTERN.match(f) for f in os.listdir(folder))


class Glas(SegmentationBuilder):
    """GlaS: H&E colon histology (Warwick QU, 165 images) with binary gland masks.

    The MICCAI 2015 Gland Segmentation challenge data: ``train_<n>.bmp``
    (85), ``testA_<n>.bmp`` (60) and ``testB_<n>.bmp`` (20), each with an
    instance label image ``<stem>_anno.bmp`` (0 = background, 1..k = the
    glands). The mask is foreground = label > 0, not the official loader's
    > 127 (which suits 0/255 masks, not instance labels).

    Splits: ``train``, the train images less a validation split of 10% of
    them (9, chosen with a fixed seed); ``validation``; ``test``, testA and
    testB together (the 80 images the paper evaluates on); ``test_a`` and
    ``test_b``, the two parts alone. Configs: ``rgb`` (default) and
    ``gray`` (luminance), both binary.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict] = {"1.0.0": "First release."}
    BUILDER_CONFIGS: ClassVar[list] = binary_configs("gland (instance label > 0) = 1")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download `{ARCHIVE}` from the GlaS challenge page of the University of
    Warwick (https://warwick.ac.uk/fac/cross_fac/tia/data/glascontest/download/)
    and put it, as it is, in the manual directory. The folder it extracts to,
    `{FOLDER}/`, or the loose train_*/testA_*/testB_* .bmp files, are
    accepted there too.
    """

    def _split_generators(self, dl_manager):
        manual_dir = manual_directory(dl_manager)
        folder = archive_folder(
            manual_dir, ARCHIVE, FOLDER, os.path.join(os.fspath(dl_manager.download_dir), "extracted"), holds_glas
        )
        pairs = glas_pairs(folder)
        train, validation = hold_out(pairs["train"], VALIDATION_FRACTION)
        return {
            "train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
            "test": self._generate_examples(pairs["testA"] + pairs["testB"]),
            "test_a": self._generate_examples(pairs["testA"]),
            "test_b": self._generate_examples(pairs["testB"]),
        }

    def _generate_examples(self, pairs):
        channels = self.builder_config.channels
        for name, image_path, annotation_path in pairs:
            image = read_image(image_path, channels)
            mask = read_instance_mask(annotation_path)
            check_same_size(image, mask, image_path, annotation_path)
            yield name, {"image": encode_png(image), "mask": encode_png(mask), "name": name}
