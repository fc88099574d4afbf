import numpy as np
import pytest

import medt_keras  # noqa: F401

from medt_keras.datasets import DatasetError
from training.data import SegmentationBatches, to_model_input


def _source(count, size=6, channels=3):
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, (size, size, channels)).astype(np.uint8),
            "mask": (rng.random((size, size, 1)) < 0.5).astype(np.uint8),
            "name": f"ex{i}".encode(),
        }
        for i in range(count)
    ]


def test_batches_are_a_pure_function_of_seed_epoch_and_index():
    source = _source(10)
    a = SegmentationBatches(source, 4, 6, shuffle=True, flip_probability=0.5, seed=3)
    b = SegmentationBatches(source, 4, 6, shuffle=True, flip_probability=0.5, seed=3)
    assert a.num_batches == 3 and a[2][0].shape == (2, 6, 6, 3)  # last batch keeps the remainder
    for epoch in (0, 1, 5):
        a.epoch = b.epoch = epoch
        for index in (2, 0, 1):  # any order, any process: same batch
            np.testing.assert_array_equal(a[index][0], b[index][0])
    a.epoch = 0
    first = np.concatenate([a[i][1] for i in range(3)])
    a.epoch = 1
    second = np.concatenate([a[i][1] for i in range(3)])
    assert not np.array_equal(first, second)  # a new order each epoch


def test_flip_moves_image_and_mask_together_and_channel_order():
    source = _source(1)
    flipped = SegmentationBatches(source, 1, 6, shuffle=True, flip_probability=1.0)
    image, mask = flipped[0]
    expected = source[0]["image"][:, ::-1, ::-1].astype(np.float32) / 255  # flipped, BGR
    np.testing.assert_allclose(image[0], expected)
    np.testing.assert_array_equal(mask[0], source[0]["mask"][:, ::-1, 0])
    rgb = to_model_input(source[0]["image"], "rgb")
    np.testing.assert_allclose(rgb, source[0]["image"] / 255.0, rtol=1e-6)


def test_examples_per_epoch_draws_a_fresh_sample():
    source = _source(12)
    batches = SegmentationBatches(source, 2, 6, shuffle=True, examples_per_epoch=4)
    assert batches.num_batches == 2
    seen = set()
    for epoch in range(4):
        batches.epoch = epoch
        seen |= {m.tobytes() for i in range(2) for m in batches[i][1]}
    assert len(seen) > 4


def test_crop_and_resize_to_the_model_size():
    source = _source(2, size=16)
    cropped = SegmentationBatches(source, 2, 8, shuffle=True, crop_size=8)
    image, mask = cropped[0]
    assert image.shape == (2, 8, 8, 3) and mask.shape == (2, 8, 8)
    resized = SegmentationBatches(source, 2, 8)
    assert resized[0][0].shape == (2, 8, 8, 3) and set(np.unique(resized[0][1])) <= {0, 1}


def test_split_errors_name_the_split():
    with pytest.raises(DatasetError, match="hela train: the split is empty"):
        SegmentationBatches([], 4, 6, name="hela train")
    with pytest.raises(DatasetError, match="hela train: 3 example.*one batch of 4"):
        SegmentationBatches(_source(3), 4, 6, shuffle=True, name="hela train")
    bad = _source(1)
    bad[0]["mask"] = bad[0]["mask"][:5]
    with pytest.raises(DatasetError, match="ex0"):
        SegmentationBatches(bad, 1, 6, name="x")[0]


def _large_source(shapes, foreground=None):
    """Examples of the given ``(h, w)`` sizes; pixel value = example index, mask 1 only at ``foreground[i]``."""
    records = []
    for i, (h, w) in enumerate(shapes):
        mask = np.zeros((h, w, 1), np.uint8)
        if foreground and foreground[i] is not None:
            y, x = foreground[i]
            mask[y, x] = 1
        records.append({"image": np.full((h, w, 1), i, np.uint8), "mask": mask, "name": f"ex{i}"})
    return records


def test_crops_are_the_unit_of_an_epoch_drawn_by_area_and_deterministic():
    source = _large_source([(40, 60), (120, 180), (40, 60)])  # areas 1 : 9 : 1
    batches = SegmentationBatches(source, 4, 8, shuffle=True, crop_size=8, examples_per_epoch=400, seed=5)
    assert len(batches) == 100  # 400 crops from 3 images, drawn with replacement
    order, _, crops = batches._epoch_plan()
    assert len(order) == 400 and np.mean(order == 1) == pytest.approx(9 / 11, abs=0.06)
    image, mask = batches[7]
    assert image.shape == (4, 8, 8, 1) and mask.shape == (4, 8, 8)
    again = SegmentationBatches(source, 4, 8, shuffle=True, crop_size=8, examples_per_epoch=400, seed=5)
    again.epoch = batches.epoch = 3
    np.testing.assert_array_equal(again[7][0], batches[7][0])  # a pure function of (seed, epoch, batch)
    batches.epoch = 4
    assert not np.array_equal(again._epoch_plan()[0], batches._epoch_plan()[0])


def test_foreground_fraction_centres_crops_on_foreground():
    source = _large_source([(64, 64)] * 2, foreground=[(50, 10), None])
    uniform = SegmentationBatches(source, 4, 8, shuffle=True, crop_size=8, examples_per_epoch=200)
    centred = SegmentationBatches(source, 4, 8, shuffle=True, crop_size=8, examples_per_epoch=200,
                                  foreground_fraction=1.0)
    hits = [sum(int(b[i][1].sum()) for i in range(len(b))) for b in (uniform, centred)]
    # Every crop of image 0 holds its one foreground pixel (about 100 of 200); image 1 has none: uniform crops.
    assert hits[1] == np.sum(centred._epoch_plan()[0] == 0) and hits[0] < hits[1] / 5
    with pytest.raises(ValueError, match="foreground_fraction"):
        SegmentationBatches(source, 4, 8, shuffle=True, crop_size=8, examples_per_epoch=8, foreground_fraction=1.5)


def test_prefetching_workers_give_the_same_batches_as_none():
    """Threads build batches ahead, keyed by (epoch, index): an epoch change mid-prefetch uses the new plan."""
    source = _source(22, size=8)
    plain = SegmentationBatches(source, 4, 8, shuffle=True, flip_probability=0.5, crop_size=6, drop_remainder=True)
    threaded = SegmentationBatches(source, 4, 8, shuffle=True, flip_probability=0.5, crop_size=6,
                                   drop_remainder=True, workers=3, max_queue_size=4)
    assert threaded.num_batches == 5  # 22 crops: the partial sixth batch is dropped
    for epoch in (0, 1, 2):
        plain.epoch = threaded.epoch = epoch
        for index in (0, 1, 4, 2) if epoch == 1 else range(threaded.num_batches):
            for a, b in zip(plain[index], threaded[index]):
                np.testing.assert_array_equal(a, b)


def test_padded_evaluation_batches_weigh_real_examples_to_the_exact_mean():
    """6 examples in batches of 4: 2 zero-weight copies; real pixels weigh 8/6 so Keras' mean over 8 is exact."""
    batches = SegmentationBatches(_source(6), 4, 6, pad_remainder=True)
    weights = np.concatenate([batches[i][2] for i in range(batches.num_batches)])
    assert weights.shape == (8, 6, 6)
    np.testing.assert_allclose(weights[:6], 8 / 6)
    np.testing.assert_array_equal(weights[6:], 0.0)
    assert weights.sum() == pytest.approx(6 * 36 * 8 / 6)
