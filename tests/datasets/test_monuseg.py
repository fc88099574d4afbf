"""The ``monuseg`` builder on tiny archives laid out like the real MoNuSeg 2018 zips."""

import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from medt_keras import datasets
from medt_keras.datasets import DatasetError
from medt_keras.datasets.monuseg import (
    TEST_ARCHIVE,
    TEST_FOLDER,
    TRAIN_ANNOTATIONS,
    TRAIN_ARCHIVE,
    TRAIN_FOLDER,
    TRAIN_IMAGES,
    read_polygons,
)

HEIGHT, WIDTH = 20, 24
TRAIN_IDS = [
    "TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1", "TCGA-38-6178-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1",
]
TEST_IDS = ["TCGA-2Z-A9J9-01A-01-TS1", "TCGA-AC-A2FO-01A-01-TS1"]
# Per image: a rectangle and a triangle (offset by the image's index), plus a
# degenerate 2-vertex region that must be skipped.
TRIANGLE = [(14.0, 2.0), (22.0, 2.0), (14.0, 10.0)]


def polygons_for(index):
    x0 = 2.5 + index
    rectangle = [(x0, 11.5), (x0 + 8.0, 11.5), (x0 + 8.0, 17.5), (x0, 17.5)]
    return [rectangle, TRIANGLE]


def image_for(index):
    return np.random.default_rng(100 + index).integers(0, 256, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)


def tif_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="TIFF")
    return buffer.getvalue()


def xml_text(polygons):
    """An annotation in the real files' Aperio ImageScope layout, attributes and all."""
    regions = []
    for number, points in enumerate(polygons + [[(1.0, 1.0), (5.0, 1.0)]], start=1):
        vertices = "".join(f'<Vertex X="{x}" Y="{y}" Z="0" />' for x, y in points)
        regions.append(
            f'<Region Id="{number}" Type="0" Zoom="0.5" Selected="0" ImageLocation="" ImageFocus="-1" '
            f'Length="30.5" Area="60.2" LengthMicrons="7.6" AreaMicrons="3.8" Text="" NegativeROA="0" '
            f'InputRegionId="0" Analyze="1" DisplayId="{number}">'
            f"<Attributes/><Vertices>{vertices}</Vertices></Region>"
        )
    return (
        '<Annotations MicronsPerPixel="0.252100">'
        '<Annotation Id="1" Name="" ReadOnly="0" NameReadOnly="0" LineColorReadOnly="0" Incremental="0" Type="4" '
        'LineColor="65280" Visible="1" Selected="1" MarkupImagePath="" MacroName="">'
        '<Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes>'
        '<Regions><RegionAttributeHeaders>'
        '<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>'
        '<AttributeHeader Id="9997" Name="Length" ColumnWidth="-1"/>'
        "</RegionAttributeHeaders>" + "".join(regions) + "</Regions><Plots/></Annotation></Annotations>"
    )


def write_archives(manual_dir, train=True, test=True, drop_xml=None, bad_xml=None):
    os.makedirs(manual_dir, exist_ok=True)

    def xml_for(image_id, index):
        if image_id == bad_xml:
            return xml_text(polygons_for(index))[:-40]  # cut short: does not parse
        return xml_text(polygons_for(index))

    if train:
        with zipfile.ZipFile(os.path.join(manual_dir, TRAIN_ARCHIVE), "w") as archive:
            for index, image_id in enumerate(TRAIN_IDS):
                folder = f"{TRAIN_FOLDER}/{TRAIN_IMAGES}"
                archive.writestr(f"{folder}/{image_id}.tif", tif_bytes(image_for(index)))
                if image_id != drop_xml:
                    folder = f"{TRAIN_FOLDER}/{TRAIN_ANNOTATIONS}"
                    archive.writestr(f"{folder}/{image_id}.xml", xml_for(image_id, index))
    if test:
        with zipfile.ZipFile(os.path.join(manual_dir, TEST_ARCHIVE), "w") as archive:
            for offset, image_id in enumerate(TEST_IDS):
                index = len(TRAIN_IDS) + offset
                archive.writestr(f"{TEST_FOLDER}/{image_id}.tif", tif_bytes(image_for(index)))
                if image_id != drop_xml:
                    archive.writestr(f"{TEST_FOLDER}/{image_id}.xml", xml_for(image_id, index))


def by_name(source):
    """``{name: example}``; the data source gives Text features as bytes."""
    examples = [source[i] for i in range(len(source))]
    return {example["name"].decode(): example for example in examples}


def shoelace(points):
    x, y = np.asarray(points).T
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def perimeter(points):
    points = np.asarray(points)
    return float(np.linalg.norm(points - np.roll(points, -1, axis=0), axis=1).sum())


def test_monuseg_from_the_archives(tmp_path):
    write_archives(tmp_path / "manual")
    splits = datasets.load("monuseg", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")

    assert {name: len(source) for name, source in splits.items()} == {"train": 3, "validation": 1, "test": 2}
    assert set(by_name(splits["train"])) | set(by_name(splits["validation"])) == set(TRAIN_IDS)
    assert set(by_name(splits["test"])) == set(TEST_IDS)

    examples = {}
    for source in splits.values():
        examples.update(by_name(source))
    for index, image_id in enumerate(TRAIN_IDS + TEST_IDS):
        example = examples[image_id]
        assert example["image"].shape == (HEIGHT, WIDTH, 3) and example["image"].dtype == np.uint8
        np.testing.assert_array_equal(example["image"], image_for(index))
        mask = example["mask"]
        assert mask.shape == (HEIGHT, WIDTH, 1) and mask.dtype == np.uint8
        mask = mask[:, :, 0]
        assert set(np.unique(mask)) == {0, 1}
        rectangle, triangle = polygons_for(index)
        # Clearly inside each polygon, clearly outside both.
        assert mask[14, int(rectangle[0][0]) + 4] == 1
        assert mask[4, 16] == 1
        assert mask[6, 21] == 0  # beyond the triangle's hypotenuse
        assert mask[2, 0] == 0 and mask[19, 23] == 0
        # The degenerate 2-vertex region along y = 1 is skipped.
        assert mask[1, 3] == 0
        # Area: the polygons' own area, plus at most the boundary pixels Pillow's outline adds.
        expected = shoelace(rectangle) + shoelace(triangle)
        boundary = perimeter(rectangle) + perimeter(triangle)
        assert expected - 1 <= mask.sum() <= expected + boundary, (mask.sum(), expected, boundary)


def test_monuseg_gray_config(tmp_path):
    write_archives(tmp_path / "manual")
    splits = datasets.load("monuseg/gray", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")

    example = by_name(splits["test"])[TEST_IDS[0]]
    assert example["image"].shape == (HEIGHT, WIDTH, 1)
    expected = np.asarray(Image.fromarray(image_for(len(TRAIN_IDS))).convert("L"))
    np.testing.assert_array_equal(example["image"][:, :, 0], expected)
    assert example["mask"].shape == (HEIGHT, WIDTH, 1)


def test_monuseg_missing_test_archive(tmp_path):
    write_archives(tmp_path / "manual", test=False)
    with pytest.raises(DatasetError, match=r"MoNuSegTestData\.zip") as error:
        datasets.load("monuseg", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")
    assert str(tmp_path / "manual") in str(error.value)


def test_monuseg_missing_training_archive(tmp_path):
    write_archives(tmp_path / "manual", train=False)
    with pytest.raises(DatasetError, match=r"MoNuSeg 2018 Training Data\.zip"):
        datasets.load("monuseg", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")


def test_monuseg_image_without_annotation(tmp_path):
    write_archives(tmp_path / "manual", drop_xml=TRAIN_IDS[1])
    with pytest.raises(DatasetError, match=rf"{TRAIN_IDS[1]}\.tif: no annotation; expected .*{TRAIN_IDS[1]}\.xml"):
        datasets.load("monuseg", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")


def test_monuseg_malformed_xml(tmp_path):
    write_archives(tmp_path / "manual", bad_xml=TEST_IDS[1])
    with pytest.raises(DatasetError, match=rf"{TEST_IDS[1]}\.xml: cannot parse"):
        datasets.load("monuseg", data_dir=tmp_path / "data", manual_dir=tmp_path / "manual")


def test_read_polygons_rejects_bad_vertices_and_skips_degenerate_regions(tmp_path):
    good = tmp_path / "good.xml"
    good.write_text(xml_text([TRIANGLE]))
    assert read_polygons(good) == [TRIANGLE]  # the 2-vertex region is dropped

    bad = tmp_path / "bad_vertex.xml"
    bad.write_text(xml_text([TRIANGLE]).replace('X="14.0"', 'X="fourteen"', 1))
    with pytest.raises(DatasetError, match=r"bad_vertex\.xml: region 1 has a vertex"):
        read_polygons(bad)

    empty = tmp_path / "no_regions.xml"
    empty.write_text("<Annotations><Annotation/></Annotations>")
    with pytest.raises(DatasetError, match=r"no_regions\.xml: no <Region>"):
        read_polygons(empty)
