"""``medt-predict`` takes the channel order and normalisation the model records; flags override with a warning."""

import os

import numpy as np
import pytest
from PIL import Image

import medt_keras

from training import predict

TINY = dict(img_size=32, in_channels=3, width_scale=0.03125, groups=2, blocks=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    model = medt_keras.AxialUNet(**TINY, preprocessing={"channel_order": "rgb", "normalize": "dtype"})
    path = tmp_path_factory.mktemp("model") / "rgb.keras"
    model.save(path)
    return os.fspath(path)


def _predict(model_path, image_dir, output, *flags):
    assert predict.main([model_path, os.fspath(image_dir), "-o", os.fspath(output), "--probabilities", "--quiet",
                         *flags]) == 0
    return np.load(output / "x_probabilities.npy")


@pytest.mark.slow
def test_predict_needs_no_preprocessing_flags(rgb_model, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)).save(images / "x.png")

    plain = _predict(rgb_model, images, tmp_path / "plain")
    assert "warning" not in capsys.readouterr().err

    overridden = _predict(rgb_model, images, tmp_path / "overridden", "--channel-order", "bgr")
    err = capsys.readouterr().err
    assert "warning: --channel-order bgr contradicts the model, which expects rgb; using bgr" in err
    assert not np.allclose(plain, overridden)


def test_files_without_a_record_keep_the_old_defaults():
    model = medt_keras.AxialUNet(**TINY)
    assert predict.resolve_preprocessing(model) == ("bgr", "auto")
    assert predict.resolve_preprocessing(model, "rgb", "percentile") == ("rgb", "percentile")


def test_flags_that_agree_with_the_model_are_silent(capsys):
    model = medt_keras.AxialUNet(**TINY, preprocessing={"channel_order": "rgb", "normalize": "dtype"})
    assert predict.resolve_preprocessing(model) == ("rgb", "dtype")
    assert predict.resolve_preprocessing(model, "rgb", "dtype") == ("rgb", "dtype")
    assert capsys.readouterr().err == ""
    assert predict.resolve_preprocessing(model, None, "percentile") == ("rgb", "percentile")
    assert "--normalize percentile contradicts the model, which expects dtype" in capsys.readouterr().err
