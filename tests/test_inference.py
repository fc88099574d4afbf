import numpy as np
import pytest

import medt_keras
from medt_keras.inference import TilePredictor, blend_window, softmax, sliding_window_probabilities, tile_starts
from tests.conftest import TINY_IMG_SIZE
from tests.conftest import TINY_MODEL as TINY


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


@pytest.mark.slow
def test_model_size_image_gives_exactly_the_model(model):
    image = np.random.default_rng(1).random((128, 128, 1)).astype(np.float32)
    batch = np.zeros((8, 128, 128, 1), np.float32)
    batch[0] = image
    program = np.asarray(TilePredictor(model)(batch))[0]
    result = sliding_window_probabilities(model, image)
    assert result.dtype == np.float32 and result.shape == (128, 128, 2)
    np.testing.assert_array_equal(result, program)  # one tile: the program's softmax, untouched
    # The program (batch 8, float32 softmax) is the model within float32 rounding.
    np.testing.assert_allclose(result, softmax(model.predict_on_batch(image[None]))[0], rtol=1e-5, atol=1e-6)
    # Keras' predict function donated the variables' buffers: a predictor made before still works.
    predictor = TilePredictor(model)
    model.predict_on_batch(image[None])
    np.testing.assert_array_equal(np.asarray(predictor(batch))[0], program)


@pytest.mark.slow
def test_large_image_interior_equals_the_model_on_each_tile(model):
    image = np.random.default_rng(2).random((1000, 1000, 1)).astype(np.float32)
    probabilities = sliding_window_probabilities(model, image, overlap=0.0, batch_size=16)
    assert probabilities.shape == (1000, 1000, 2) and probabilities.dtype == np.float32
    # With overlap 0 the tiles at 0, 128, ..., 640 are covered by no other tile.
    starts = [0, 128, 384, 640]
    tiles = np.stack([image[y : y + 128, x : x + 128] for y in starts for x in starts])
    direct = np.asarray(TilePredictor(model)(tiles))
    for k, (y, x) in enumerate((y, x) for y in starts for x in starts):
        # A window weight multiplied in and divided out in float32.
        np.testing.assert_allclose(probabilities[y : y + 128, x : x + 128], direct[k], rtol=1e-6, atol=0)
    # Blended overlaps stay probabilities.
    blended = sliding_window_probabilities(model, image[:300, :200], overlap=0.5)
    np.testing.assert_allclose(blended.sum(-1), 1.0, rtol=1e-5)


def test_blending_equals_a_float64_reference(model):
    """The float32 accumulation, batching with padding and separable weights equal a direct float64 blend."""
    image = np.random.default_rng(4).random((200, 300, 1)).astype(np.float32)
    result = sliding_window_probabilities(model, image, overlap=0.25, batch_size=3, blend="linear")
    corners = [(y, x) for y in tile_starts(200, 128, 96) for x in tile_starts(300, 128, 96)]
    tiles = np.stack([image[y : y + 128, x : x + 128] for y, x in corners])
    probabilities = np.asarray(TilePredictor(model)(tiles), np.float64)
    window = blend_window(128, 128, "linear")[..., None]
    total, weight = np.zeros((200, 300, 2)), np.zeros((200, 300, 1))
    for (y, x), p in zip(corners, probabilities):
        total[y : y + 128, x : x + 128] += window * p
        weight[y : y + 128, x : x + 128] += window
    np.testing.assert_allclose(result, total / weight, rtol=1e-5, atol=1e-6)


def test_small_image_is_padded_and_cropped_back(model):
    image = np.random.default_rng(3).random((70, 90, 1)).astype(np.float32)
    result = sliding_window_probabilities(model, image)
    assert result.shape == (70, 90, 2) and result.flags.c_contiguous


def test_the_program_cache_lets_a_model_go():
    import gc
    import weakref

    from medt_keras.inference import _program

    temporary = medt_keras.GatedAxialUNet(img_size=TINY_IMG_SIZE, in_channels=1, **TINY)
    _program(temporary)
    gone = weakref.ref(temporary)
    del temporary
    gc.collect()
    assert gone() is None
