"""Multi-class end to end (data, training, prediction, evaluation) and training at other sizes."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import medt_keras

import keras

from training import evaluate, predict
from training.config import TrainConfig
from medt_keras.optimizers import OfficialAdam
from training.train import train

TINY = dict(width_scale=0.03125, groups=2, blocks=(1, 1, 1, 1))


def _three_class_folder(root, counts, size=32, seed=0):
    """Discs are class 1, squares class 2, on noise; masks store the class index."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split, count in counts.items():
        for sub in ("img", "labelcol"):
            os.makedirs(os.path.join(root, split, sub), exist_ok=True)
        for i in range(count):
            mask = np.zeros((size, size), np.uint8)
            cy, cx = rng.uniform(6, size - 6, 2)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = 1
            y, x = rng.integers(0, size - 8, 2)
            mask[y : y + 8, x : x + 8] = 2
            image = rng.normal(40, 10, (size, size, 3))
            image[mask == 1] += [150, 20, 20]
            image[mask == 2] += [20, 20, 150]
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(f"{root}/{split}/img/{split}{i}.png")
            Image.fromarray(mask).save(f"{root}/{split}/labelcol/{split}{i}.png")
    return root


@pytest.mark.slow
def test_three_classes_train_predict_evaluate(tmp_path):
    manual = _three_class_folder(os.fspath(tmp_path / "manual"), {"train": 16, "validation": 4, "test": 4})
    config = TrainConfig(model="gated", model_args=dict(TINY), img_size=32, num_classes=3,
                         dataset="medt_folder/rgb_multiclass", epochs=2, learning_rate=3e-3, checkpoint_every=1,
                         manual_dir=manual, data_dir=os.fspath(tmp_path / "tfds"),
                         output_dir=os.fspath(tmp_path / "run"))
    report = train(config, verbose=0)
    assert report["f1"] == pytest.approx(report["f1_numpy_check"], abs=1e-6)
    assert 0.0 <= report["f1"] <= 1.0
    assert (tmp_path / "run" / "test_predictions.png").is_file()

    output = tmp_path / "pred"
    assert predict.main([os.fspath(tmp_path / "run" / "model.keras"), f"{manual}/test/img", "-o", os.fspath(output),
                         "--quiet"]) == 0
    masks = [np.asarray(Image.open(output / f"test{i}.png")) for i in range(4)]
    assert all(m.shape == (32, 32) and set(np.unique(m)) <= {0, 1, 2} for m in masks)  # class indices
    assert evaluate.main([os.fspath(output), f"{manual}/test/labelcol", "--num-classes", "3",
                          "--report", os.fspath(tmp_path / "report")]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["images"] == 4 and 0.0 <= summary["pooled_f1"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("size", [(256, 256), (64, 96)])
def test_models_train_and_predict_at_other_sizes(size):
    # Seeded: the initial weights otherwise depend on what ran before in the same process.
    keras.utils.set_random_seed(0)
    model = medt_keras.GatedAxialUNet(img_size=size, in_channels=1, gates_trainable=True, **TINY)
    # At 1e-2 the loss jumped to 5.6 on the second step and came back to chance level
    # (ln 2), so "the last loss below the first" held or not by 1e-4; at 1e-3 it falls
    # at every step (0.697 -> 0.689 at 256x256, 0.706 -> 0.689 at 64x96 in 10 steps).
    model.compile(optimizer=OfficialAdam(learning_rate=1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((2, *size, 1)).astype(np.float32)
    y = (x[..., 0] > 0.5).astype(np.int32)
    losses = [float(model.train_on_batch(x, y)) for _ in range(10)]
    assert all(np.isfinite(losses)) and all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.005, losses
    assert model.predict_on_batch(x).shape == (2, *size, 2)
