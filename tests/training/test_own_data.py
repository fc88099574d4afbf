"""Own data: a few large images with small objects, trained on random crops, validated and tested whole."""

import json
import os
import warnings

import numpy as np
import pytest

import medt_keras  # noqa: F401

from training import data as data_module
from training import whole_image
from training.config import TrainConfig, load_config
from training.train import train
from tests.synthetic_data import write_large_medt_folder

HEIGHT, WIDTH = 700, 1000


@pytest.mark.slow
def test_large_images_train_on_crops_and_evaluate_whole(tmp_path, monkeypatch):
    # 3 training images give 24 crops per epoch; the test split has no object at all.
    manual = write_large_medt_folder(os.fspath(tmp_path / "manual"),
                                     {"train": (3, None), "validation": (1, None), "test": (1, 0)},
                                     HEIGHT, WIDTH, objects=12)
    train_batches_seen, whole_images_seen = [], []
    original_getitem = data_module.SegmentationBatches.__getitem__
    original_window = whole_image.sliding_window_probabilities

    def getitem(self, index):
        if self.shuffle:
            train_batches_seen.append((self.epoch, index))
        return original_getitem(self, index)

    def window(model, image, **kwargs):
        whole_images_seen.append(image.shape)
        return original_window(model, image, **kwargs)

    monkeypatch.setattr(data_module.SegmentationBatches, "__getitem__", getitem)
    monkeypatch.setattr(whole_image, "sliding_window_probabilities", window)
    config = load_config("own_data")
    assert config.crop_size and config.eval_protocol == "tiled"
    config = TrainConfig(**{**config.__dict__, **dict(
        model_args={"blocks": [1, 1, 1, 1], "groups": 2}, img_size=32, crop_size=32, examples_per_epoch=24,
        epochs=2, gate_unfreeze_epoch=1, preview_images=1, tile_overlap=0.0,
        manual_dir=manual, data_dir=os.fspath(tmp_path / "tfds"), output_dir=os.fspath(tmp_path / "run"))})
    with warnings.catch_warnings():  # the test split's F1 is undefined unless the model predicts something
        warnings.simplefilter("ignore", RuntimeWarning)
        report = train(config, verbose=0)

    # An epoch is examples_per_epoch / batch_size steps of crops, not one pass over the 3 images.
    for epoch in (0, 1):
        assert sorted({i for e, i in train_batches_seen if e == epoch}) == list(range(24 // 4))
    # Validation (each epoch) and test ran on the whole 700 x 1000 images, never resized.
    assert whole_images_seen == [(HEIGHT, WIDTH, 1)] * 3
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0].split(",")[:7] == ["epoch", "f1", "iou", "loss", "val_loss", "val_f1", "val_iou"]
    assert len(rows) == 3 and all(row.split(",")[5] not in ("", "nan") for row in rows[1:])
    # The all-background test split: undefined (null in JSON), or 0 if anything was predicted; never 1.
    saved = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert saved["eval_protocol"] == "tiled" and saved["examples"] == 1 and saved["pixels"] == HEIGHT * WIDTH
    assert saved["f1"] != 1.0 and saved["iou"] != 1.0
    assert (saved["f1"] is None) == np.isnan(report["f1"])
    assert (tmp_path / "run" / "test_predictions.png").is_file()


def test_eval_protocol_auto_is_tiled_for_crops_or_large_images_else_resize():
    def split(*shapes):
        source = [{"image": np.zeros((h, w, 1), np.uint8), "mask": np.zeros((h, w, 1), np.uint8)} for h, w in shapes]
        return data_module.SegmentationBatches(source, 1, 64)

    tiles, frames = split((64, 64), (64, 64)), split((64, 64), (700, 1100))
    config = TrainConfig(img_size=64)
    assert whole_image.resolve_protocol(config, tiles, tiles) == "resize"  # model-size tiles: as before
    assert whole_image.resolve_protocol(config, tiles, frames) == "tiled"
    assert whole_image.resolve_protocol(TrainConfig(img_size=64, crop_size=64), tiles, tiles) == "tiled"
    assert whole_image.resolve_protocol(TrainConfig(img_size=64, eval_protocol="resize"), frames, frames) == "resize"
    with pytest.raises(ValueError, match="eval_protocol"):
        TrainConfig(eval_protocol="whole")
