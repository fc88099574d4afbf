import numpy as np
import pytest

import medt_keras
from medt_keras.inference import blend_window, softmax, sliding_window_probabilities, tile_starts

TINY = dict(width_scale=0.03125, groups=2, blocks=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def model():
    return medt_keras.GatedAxialUNet(img_size=128, in_channels=1, **TINY)


def test_tile_starts_cover_the_image_and_end_flush():
    assert tile_starts(1000, 128, 128) == [0, 128, 256, 384, 512, 640, 768, 872]
    assert tile_starts(128, 128, 96) == [0]
    assert tile_starts(300, 128, 96) == [0, 96, 172]
    assert tile_starts(50, 128, 96) == [0]


def test_blend_windows_peak_at_the_centre():
    for blend in ("gaussian", "linear"):
        window = blend_window(8, 6, blend)
        assert window.max() == pytest.approx(1.0, abs=0.1) and window.min() > 0
        assert window[4, 3] > window[0, 0]
    with pytest.raises(ValueError, match="blend"):
        blend_window(4, 4, "cosine")


def test_model_size_image_gives_exactly_the_model(model):
    image = np.random.default_rng(1).random((128, 128, 1)).astype(np.float32)
    expected = softmax(model.predict_on_batch(image[None]))[0]
    np.testing.assert_array_equal(sliding_window_probabilities(model, image), expected)


def test_large_image_interior_equals_the_model_on_each_tile(model):
    image = np.random.default_rng(2).random((1000, 1000, 1)).astype(np.float32)
    probabilities = sliding_window_probabilities(model, image, overlap=0.0, batch_size=16)
    assert probabilities.shape == (1000, 1000, 2)
    # With overlap 0 the tiles at 0, 128, ..., 640 are covered by no other tile.
    starts = [0, 128, 384, 640]
    tiles = np.stack([image[y : y + 128, x : x + 128] for y in starts for x in starts])
    direct = softmax(model.predict_on_batch(tiles))
    for k, (y, x) in enumerate((y, x) for y in starts for x in starts):
        np.testing.assert_array_equal(probabilities[y : y + 128, x : x + 128], direct[k])
    # Blended overlaps stay probabilities.
    blended = sliding_window_probabilities(model, image[:300, :200], overlap=0.5)
    np.testing.assert_allclose(blended.sum(-1), 1.0, rtol=1e-5)


def test_small_image_is_padded_and_cropped_back(model):
    image = np.random.default_rng(3).random((70, 90, 1)).astype(np.float32)
    assert sliding_window_probabilities(model, image).shape == (70, 90, 2)
