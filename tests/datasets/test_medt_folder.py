import os

import numpy as np
import pytest
from PIL import Image

from medt_keras import datasets
from medt_keras.datasets import DatasetError
from tests.synthetic_data import write_medt_folder


def _load(tmp_path, manual, name="medt_folder"):
    return datasets.load(name, data_dir=os.fspath(tmp_path / "data"), manual_dir=os.fspath(manual))


def test_splits_masks_and_held_out_validation(tmp_path):
    manual = write_medt_folder(os.fspath(tmp_path / "manual"), {"train": 10, "test": 3}, size=20)
    sources = _load(tmp_path, manual)
    # No validation folder: 10% of train (1 image) is held out, never the test set.
    assert {k: len(v) for k, v in sources.items()} == {"train": 9, "validation": 1, "test": 3}
    names = {split: {sources[split][i]["name"] for i in range(len(sources[split]))} for split in sources}
    assert not names["train"] & names["validation"]
    assert all(n.startswith(b"test_") for n in names["test"])
    example = sources["test"][0]
    stem = example["name"].decode()
    raw_mask = np.asarray(Image.open(manual + f"/test/labelcol/{stem}.png"))
    raw_image = np.asarray(Image.open(manual + f"/test/img/{stem}.png"))
    assert example["image"].shape == (20, 20, 3) and example["image"].dtype == np.uint8
    np.testing.assert_array_equal(example["image"], raw_image)  # stored RGB, as read
    np.testing.assert_array_equal(example["mask"][..., 0], (raw_mask > 127).astype(np.uint8))


def test_validation_folder_is_used_and_gray_config(tmp_path):
    manual = write_medt_folder(os.fspath(tmp_path / "manual"), {"train": 3, "val": 2, "test": 1}, size=16)
    sources = _load(tmp_path, manual, "medt_folder/gray")
    assert {k: len(v) for k, v in sources.items()} == {"train": 3, "validation": 2, "test": 1}
    assert sources["train"][0]["image"].shape == (16, 16, 1)


def test_multiclass_keeps_pixel_values(tmp_path):
    manual = write_medt_folder(os.fspath(tmp_path / "manual"), {"train": 2, "validation": 1, "test": 1}, size=8)
    Image.fromarray(np.array([[0, 1, 2, 200]] * 8, np.uint8).repeat(2, axis=1)).save(
        manual + "/test/labelcol/test_000.png"
    )
    sources = _load(tmp_path, manual, "medt_folder/rgb_multiclass")
    assert sorted(np.unique(sources["test"][0]["mask"]).tolist()) == [0, 1, 2, 200]


def _expect_error(tmp_path, manual, *fragments):
    with pytest.raises(DatasetError) as info:
        _load(tmp_path, manual)
    for fragment in fragments:
        assert fragment in str(info.value)
    return str(info.value)


def test_image_without_mask_names_the_file(tmp_path):
    manual = write_medt_folder(os.fspath(tmp_path / "m"), {"train": 3, "test": 1}, size=8)
    os.remove(manual + "/train/labelcol/train_001.png")
    _expect_error(tmp_path, manual, "train/img/train_001.png", "no mask", "train/labelcol/train_001.png")


def test_mask_without_image_names_the_file(tmp_path):
    manual = write_medt_folder(os.fspath(tmp_path / "m"), {"train": 3, "test": 2}, size=8)
    os.remove(manual + "/test/img/test_000.png")
    _expect_error(tmp_path, manual, "test/labelcol/test_000.png", "without an image")


def test_mask_of_another_size_names_both_files(tmp_path):
    manual = write_medt_folder(os.fspath(tmp_path / "m"), {"train": 3, "test": 1}, size=8)
    Image.fromarray(np.zeros((9, 8), np.uint8)).save(manual + "/test/labelcol/test_000.png")
    _expect_error(tmp_path, manual, "test/labelcol/test_000.png", "9x8", "test/img/test_000.png", "8x8")


def test_unreadable_image_names_the_file(tmp_path):
    manual = write_medt_folder(os.fspath(tmp_path / "m"), {"train": 3, "test": 1}, size=8)
    with open(manual + "/train/img/train_002.png", "wb") as handle:
        handle.write(b"not a png at all")
    _expect_error(tmp_path, manual, "train/img/train_002.png", "cannot read")


def test_empty_split_names_the_folder(tmp_path):
    manual = write_medt_folder(os.fspath(tmp_path / "m"), {"train": 3, "test": 0}, size=8)
    _expect_error(tmp_path, manual, "test/img", "no images")


def test_missing_split_folder(tmp_path):
    manual = write_medt_folder(os.fspath(tmp_path / "m"), {"train": 3}, size=8)
    _expect_error(tmp_path, manual, os.path.join(manual, "test"), "not found")
