"""The ``glas`` builder on a tiny archive laid out like the real Warwick QU zip."""

import io
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from medt_keras import datasets
from medt_keras.datasets import DatasetError
from medt_keras.datasets.glas import ARCHIVE, FOLDER

HEIGHT, WIDTH = 20, 24
# 3 train + 2 testA + 1 testB: hold_out keeps 2 train and holds out 1 for validation.
STEMS = ["train_1", "train_2", "train_10", "testA_1", "testA_2", "testB_1"]


def image_for(index):
    rng = np.random.default_rng(index)
    return rng.integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


def labels_for(index):
    """Instance labels 0..3: gland 1 a block, gland 2 a strip, gland 3 a single pixel (label 3 must count)."""
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    labels[2:8, 3 + index : 9 + index] = 1
    labels[12:15, :] = 2
    labels[18, 20 - index] = 3
    return labels


def bmp_bytes(array, palette=None):
    image = Image.fromarray(array)
    if palette is not None:  # an indexed BMP whose palette is not a gray ramp: labels are the indices
        image = image.convert("L").convert("P")
        image.putdata(array.reshape(-1).tolist())
        image.putpalette(palette)
    buffer = io.BytesIO()
    image.save(buffer, format="BMP")
    return buffer.getvalue()


def write_archive(manual_dir, stems=STEMS, drop_annotation=None):
    """The zip as released: one top folder with <stem>.bmp, <stem>_anno.bmp and Grade.csv."""
    os.makedirs(manual_dir, exist_ok=True)
    colours = [0, 0, 0, 200, 30, 30, 30, 200, 30, 30, 30, 200] + [255] * (256 * 3 - 12)
    with zipfile.ZipFile(os.path.join(manual_dir, ARCHIVE), "w") as archive:
        archive.writestr(f"{FOLDER}/Grade.csv", "name,patient ID,GlaS,grade (Sirinukunwattana et al. 2015)\n")
        for index, stem in enumerate(STEMS):
            if stem not in stems:
                continue
            archive.writestr(f"{FOLDER}/{stem}.bmp", bmp_bytes(image_for(index)))
            if stem != drop_annotation:
                palette = colours if stem == "testA_2" else None
                archive.writestr(f"{FOLDER}/{stem}_anno.bmp", bmp_bytes(labels_for(index), palette))
    return os.path.join(manual_dir, ARCHIVE)


def by_name(source):
    """``{name: example}``; the data source gives Text features as bytes."""
    examples = [source[i] for i in range(len(source))]
    return {example["name"].decode(): example for example in examples}


def test_glas_from_the_archive(tmp_path):
    write_archive(tmp_path / "manual")
    splits = datasets.load("glas", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")

    assert {name: len(source) for name, source in splits.items()} == {
        "train": 2, "validation": 1, "test": 3, "test_a": 2, "test_b": 1,
    }
    train_names = set(by_name(splits["train"])) | set(by_name(splits["validation"]))
    assert train_names == {"train_1", "train_2", "train_10"}
    assert set(by_name(splits["test"])) == {"testA_1", "testA_2", "testB_1"}
    assert set(by_name(splits["test_b"])) == {"testB_1"}

    examples = {}
    for source in splits.values():
        examples.update(by_name(source))
    for index, stem in enumerate(STEMS):
        example = examples[stem]
        assert example["image"].shape == (HEIGHT, WIDTH, 3) and example["image"].dtype == np.uint8
        np.testing.assert_array_equal(example["image"], image_for(index))
        mask = example["mask"]
        assert mask.shape == (HEIGHT, WIDTH, 1) and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask[:, :, 0], (labels_for(index) > 0).astype(np.uint8), err_msg=stem)
        assert mask[18, 20 - index, 0] == 1  # instance label 3 is foreground (it is not > 127)


@pytest.mark.parametrize("layout", ["extracted_folder", "loose_files"])
def test_glas_gray_config_without_the_zip(tmp_path, layout):
    archive = write_archive(tmp_path / "zip")
    with zipfile.ZipFile(archive) as handle:
        handle.extractall(tmp_path / "manual")  # the extracted folder, no zip
    if layout == "loose_files":  # the files themselves in the manual dir
        for filename in os.listdir(tmp_path / "manual" / FOLDER):
            shutil.move(tmp_path / "manual" / FOLDER / filename, tmp_path / "manual" / filename)
        os.rmdir(tmp_path / "manual" / FOLDER)
    splits = datasets.load("glas/gray", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")

    example = by_name(splits["test_a"])["testA_1"]
    expected = np.asarray(Image.fromarray(image_for(STEMS.index("testA_1"))).convert("L"))
    assert example["image"].shape == (HEIGHT, WIDTH, 1)
    np.testing.assert_array_equal(example["image"][:, :, 0], expected)
    np.testing.assert_array_equal(example["mask"][:, :, 0], labels_for(STEMS.index("testA_1")) > 0)


def test_glas_missing_archive(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "notes.txt").write_text("not the data")
    with pytest.raises(DatasetError, match=r"Warwick QU Dataset \(Released 2016_07_08\)\.zip") as error:
        datasets.load("glas", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    assert str(tmp_path / "manual") in str(error.value)


def test_glas_missing_manual_dir(tmp_path):
    with pytest.raises(DatasetError, match=r"Warwick QU Dataset \(Released 2016_07_08\)\.zip") as error:
        datasets.load("glas", data_dir=tmp_path / "data", manual_dir=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_glas_image_without_annotation(tmp_path):
    write_archive(tmp_path / "manual", drop_annotation="train_2")
    with pytest.raises(DatasetError, match=r"train_2\.bmp: no annotation; expected .*train_2_anno\.bmp"):
        datasets.load("glas", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")


def test_glas_archive_is_reused_and_reextracted_when_changed(tmp_path):
    from medt_keras.datasets.archives import extract_zip

    archive = write_archive(tmp_path / "manual")
    first = extract_zip(archive, tmp_path / "extracted")
    stamp = os.path.join(first, FOLDER, "Grade.csv")
    os.utime(stamp, ns=(0, 0))
    assert extract_zip(archive, tmp_path / "extracted") == first
    assert os.stat(stamp).st_mtime_ns == 0  # unchanged archive: not extracted again
    shutil.copy(archive, archive + ".tmp")
    os.replace(archive + ".tmp", archive)
    os.utime(archive, ns=(1, 1))
    extract_zip(archive, tmp_path / "extracted")
    assert os.stat(stamp).st_mtime_ns != 0
