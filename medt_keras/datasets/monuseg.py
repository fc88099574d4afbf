"""``monuseg``: the MoNuSeg 2018 challenge data (multi-organ nucleus segmentation), MICCAI 2018.

Both archives are downloaded by hand from monuseg.grand-challenge.org. The
annotations are XML polygon files (Aperio ImageScope layout), one polygon
(``Region``) per nucleus; this builder rasterises them with Pillow.
"""

import os
from typing import ClassVar
from xml.etree import ElementTree

import numpy as np
import tensorflow_datasets as tfds

from medt_keras.datasets.archives import archive_folder, manual_directory, visible_files
from medt_keras.datasets.images import DatasetError, encode_png, read_image
from medt_keras.datasets.segmentation import (
    SegmentationBuilder,
    binary_configs,
    hold_out,
)

TRAIN_ARCHIVE = "MoNuSeg 2018 Training Data.zip"
TRAIN_FOLDER = "MoNuSeg 2018 Training Data"
TRAIN_IMAGES = "Tissue Images"
TRAIN_ANNOTATIONS = "Annotations"
TEST_ARCHIVE = "MoNuSegTestData.zip"
TEST_FOLDER = "MoNuSegTestData"
IMAGE_EXTENSIONS = (".tif", ".tiff")
VALIDATION_FRACTION = 0.1


def read_polygons(path):
    """The ``Region`` polygons of a MoNuSeg XML file: a list of ``[(x, y), ...]`` in pixels.

    Every ``Region`` element is taken, wherever it sits in the tree.
    Regions of fewer than 3 vertices (no area) are skipped; a file that does
    not parse, has no ``Region`` at all, or a vertex without numeric X and Y
    is a ``DatasetError`` naming it.
    """
    path = os.fspath(path)
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, OSError) as error:
        raise DatasetError(f"{path}: cannot parse the XML annotation ({error}).") from error
    regions = list(root.iter("Region"))
    if not regions:
        raise DatasetError(f"{path}: no <Region> element; not a MoNuSeg annotation file.")
    polygons = []
    for region in regions:
        points = []
        for vertex in region.iter("Vertex"):
            try:
                points.append((float(vertex.attrib["X"]), float(vertex.attrib["Y"])))
            except (KeyError, ValueError) as error:
                raise DatasetError(
                    f"{path}: region {region.get('Id', '?')} has a vertex without numeric X and Y "
                    f"({dict(vertex.attrib)})."
                ) from error
        if len(points) >= 3:
            polygons.append(points)
    return polygons


def rasterize(polygons, height, width):
    """``(height, width, 1)`` uint8: 1 inside or on the boundary of any polygon, else 0."""
    from PIL import Image, ImageDraw

    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for points in polygons:
        draw.polygon(points, fill=1, outline=1)
    return np.asarray(canvas, dtype=np.uint8)[:, :, None]


def annotated_images(image_dir, annotation_dir):
    """``(stem, image_path, xml_path)`` for every TIFF in ``image_dir``, sorted; each must have ``<stem>.xml``."""
    images = [f for f in visible_files(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not images:
        raise DatasetError(f"{image_dir}: no .tif images.")
    annotations = {f for f in visible_files(annotation_dir) if f.lower().endswith(".xml")}
    pairs = []
    for filename in images:
        stem = os.path.splitext(filename)[0]
        image_path, xml_path = os.path.join(image_dir, filename), os.path.join(annotation_dir, stem + ".xml")
        if stem + ".xml" not in annotations:
            raise DatasetError(f"{image_path}: no annotation; expected {xml_path}.")
        annotations.discard(stem + ".xml")
        pairs.append((stem, image_path, xml_path))
    if annotations:
        orphan = os.path.join(annotation_dir, min(annotations))
        raise DatasetError(f"{orphan}: annotation without its image in {image_dir}.")
    return pairs


def holds_training_data(folder):
    return all(os.path.isdir(os.path.join(folder, name)) for name in (TRAIN_IMAGES, TRAIN_ANNOTATIONS))


def holds_test_data(folder):
    names = [f.lower() for f in os.listdir(folder)]
    return any(f.endswith(IMAGE_EXTENSIONS) for f in names) and any(f.endswith(".xml") for f in names)


class Monuseg(SegmentationBuilder):
    """MoNuSeg 2018: H&E tissue images (1000x1000, 7 organs) with binary nucleus masks.

    The training archive holds 30 images (``Tissue Images/<id>.tif``) with
    their annotations (``Annotations/<id>.xml``), the test archive 14 images
    with their XML files side by side. Each XML ``Region`` is a nucleus
    outline; the mask is 1 inside or on any outline (Pillow's filled
    polygon), else 0, so touching nuclei merge. Regions of fewer than 3
    vertices are skipped.

    Splits: ``train``, the 30 training images less a validation split of
    10% of them (3, chosen with a fixed seed); ``validation``; ``test``, the
    14 test images. Configs: ``rgb`` (default) and ``gray`` (luminance),
    both binary.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict] = {"1.0.0": "First release."}
    BUILDER_CONFIGS: ClassVar[list] = binary_configs("nucleus (inside an annotated polygon) = 1")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Download both archives of the MoNuSeg challenge from
    https://monuseg.grand-challenge.org (Data page): `{TRAIN_ARCHIVE}` and
    `{TEST_ARCHIVE}`, and put them, as they are, in the manual directory.
    The folders they extract to, `{TRAIN_FOLDER}/` (with `{TRAIN_IMAGES}/` and
    `{TRAIN_ANNOTATIONS}/`) and `{TEST_FOLDER}/`, are accepted there too.
    """

    def _split_generators(self, dl_manager):
        manual_dir = manual_directory(dl_manager)
        extract_root = os.path.join(os.fspath(dl_manager.download_dir), "extracted")
        train_folder = archive_folder(manual_dir, TRAIN_ARCHIVE, TRAIN_FOLDER, extract_root, holds_training_data)
        test_folder = archive_folder(manual_dir, TEST_ARCHIVE, TEST_FOLDER, extract_root, holds_test_data)
        train = annotated_images(
            os.path.join(train_folder, TRAIN_IMAGES), os.path.join(train_folder, TRAIN_ANNOTATIONS)
        )
        train, validation = hold_out(train, VALIDATION_FRACTION)
        test = annotated_images(test_folder, test_folder)
        return {
            "train": self._generate_examples(train),
            "validation": self._generate_examples(validation),
            "test": self._generate_examples(test),
        }

    def _generate_examples(self, pairs):
        channels = self.builder_config.channels
        for name, image_path, xml_path in pairs:
            image = read_image(image_path, channels)
            mask = rasterize(read_polygons(xml_path), *image.shape[:2])
            yield name, {"image": encode_png(image), "mask": encode_png(mask), "name": name}
