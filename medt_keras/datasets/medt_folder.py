"""``medt_folder``: a dataset in the official MedT on-disk layout.

The official code reads ``<dir>/img/<name>.<ext>`` with its mask
``<dir>/labelcol/<name>.png`` (same stem, PNG). This builder takes a manual
directory holding one such folder per split::

    <manual_dir>/train/{img,labelcol}/
    <manual_dir>/validation/{img,labelcol}/   (optional; "val" also accepted)
    <manual_dir>/test/{img,labelcol}/

Without a validation folder, 10% of the training images (at least one,
chosen with a fixed seed) become the validation split: validation is never
the test set, unlike the official scripts, which validate on it.
"""

import os

import tensorflow_datasets as tfds

from medt_keras.datasets.images import DatasetError
from medt_keras.datasets.segmentation import SegmentationBuilder, find_pairs, hold_out, segmentation_configs

VALIDATION_FRACTION = 0.1


def official_mask_name(image_filename):
    """The official loader's rule: the image's stem with ``.png``."""
    return os.path.splitext(image_filename)[0] + ".png"


class MedtFolder(SegmentationBuilder):
    """Images and masks in the official MedT layout (img/ and labelcol/), one folder per split."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = segmentation_configs()
    MANUAL_DOWNLOAD_INSTRUCTIONS = """
    Put your data in the official MedT layout under the manual directory:
    train/img/*.png|jpg|bmp|tif with train/labelcol/<same stem>.png, the same
    for test/, and optionally validation/ (or val/). Masks are 8-bit: 0 for
    background, 255 (or > 127) for foreground; for the *_multiclass configs,
    pixel value = class index.
    """

    def _split_folder(self, root, names):
        for name in names:
            folder = os.path.join(root, name)
            if os.path.isdir(folder):
                return folder
        return None

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        train_dir = self._split_folder(root, ["train"])
        test_dir = self._split_folder(root, ["test"])
        for split, folder in (("train", train_dir), ("test", test_dir)):
            if folder is None:
                raise DatasetError(f"{os.path.join(root, split)}: folder not found (medt_folder needs train/ and test/).")
        train = find_pairs(os.path.join(train_dir, "img"), os.path.join(train_dir, "labelcol"), official_mask_name)
        validation_dir = self._split_folder(root, ["validation", "val"])
        if validation_dir is None:
            train, validation = hold_out(train, VALIDATION_FRACTION)
        else:
            validation = find_pairs(
                os.path.join(validation_dir, "img"), os.path.join(validation_dir, "labelcol"), official_mask_name
            )
        test = find_pairs(os.path.join(test_dir, "img"), os.path.join(test_dir, "labelcol"), official_mask_name)
        return {
            "train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
            "test": self._generate_examples(test),
        }

    def _generate_examples(self, pairs):
        yield from self._pair_examples(pairs)
