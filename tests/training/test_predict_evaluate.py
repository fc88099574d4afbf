"""``medt-predict`` and ``medt-evaluate``: files in, masks and reports out, bad files reported and skipped."""

import json
import os

import numpy as np
import pytest
from PIL import Image

import medt_keras

from medt_keras.inference import softmax
from training import evaluate, predict

TINY = dict(width_scale=0.03125, groups=2, blocks=(1, 1, 1, 1))


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    model = medt_keras.GatedAxialUNet(img_size=32, in_channels=3, **TINY)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return model, os.fspath(path)


def test_predict_writes_masks_and_skips_bad_files(saved_model, tmp_path, capsys):
    import tifffile

    model, path = saved_model
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (40, 50, 3)).astype(np.uint8)
    Image.fromarray(good).save(inputs / "good.png")
    Image.fromarray(np.zeros((32, 32, 4), np.uint8)).save(inputs / "rgba.png")  # alpha dropped
    (inputs / "broken.png").write_bytes(b"\x89PNG but not really")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(inputs / "gray.png")
    tifffile.imwrite(inputs / "nan.tif", np.full((32, 32, 3), np.nan, np.float32), photometric="rgb")
    output = tmp_path / "out"

    status = predict.main([path, os.fspath(inputs), "-o", os.fspath(output), "--probabilities", "--overlay", "--quiet"])
    captured = capsys.readouterr()
    assert status == 1
    assert "2 of 5 images segmented" in captured.out and "3 failed" in captured.out
    assert f"{inputs / 'broken.png'}: cannot read the image" in captured.err
    assert f"{inputs / 'gray.png'}: 1 channel(s), but the model takes 3" in captured.err
    assert f"{inputs / 'nan.tif'}: the image has NaN or infinite pixel values" in captured.err

    mask = np.asarray(Image.open(output / "good.png"))
    probabilities = np.load(output / "good_probabilities.npy")
    assert mask.shape == (40, 50) and set(np.unique(mask)) <= {0, 255}
    # Softmax + argmax, in the official BGR channel order; never a raw-logit threshold.
    np.testing.assert_array_equal(mask, (probabilities.argmax(-1) * 255).astype(np.uint8))
    tile = good[:32, :32, ::-1].astype(np.float32)[None] / 255
    assert probabilities[:32, :32].shape == softmax(model.predict_on_batch(tile))[0].shape
    assert (output / "good_overlay.png").is_file() and (output / "rgba.png").is_file()


def test_predict_on_a_model_size_image_equals_the_model(saved_model, tmp_path):
    model, path = saved_model
    image = np.random.default_rng(1).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "x.png")
    assert predict.main([path, os.fspath(tmp_path / "x.png"), "-o", os.fspath(tmp_path / "o"), "--quiet",
                         "--probabilities"]) == 0
    direct = softmax(model.predict_on_batch(image[None, :, :, ::-1].astype(np.float32) / 255))[0]
    # The prediction program's float32 softmax at batch 8 against Keras' batch of 1 in float64.
    np.testing.assert_allclose(np.load(tmp_path / "o" / "x_probabilities.npy"), direct, rtol=1e-5, atol=1e-6)


def test_predict_compiles_one_program_for_images_of_every_size(saved_model, tmp_path):
    import jax

    compile_event = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
    _, path = saved_model
    model = predict.load_model(path)  # a fresh model: nothing compiled for it yet
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(5)
    # Smaller than a tile, a tile, and 12 tiles (batches of 5, 5 and 2): one tile-batch shape for all.
    for name, shape in {"small": (20, 25), "tile": (32, 32), "large": (75, 101)}.items():
        Image.fromarray(rng.integers(0, 256, shape + (3,)).astype(np.uint8)).save(inputs / f"{name}.png")
    compiles = []

    def listener(event, duration, **kwargs):
        if event == compile_event:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        done, failed = predict.predict_files(model, predict.collect_inputs([inputs]), tmp_path / "out",
                                             batch_size=5, probabilities=True, progress=False)
        again, _ = predict.predict_files(model, [inputs / "large.png"], tmp_path / "again", batch_size=5,
                                         progress=False)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not failed and sorted(done) == ["large", "small", "tile"] and again == ["large"]
    assert np.load(tmp_path / "out" / "large_probabilities.npy").shape == (75, 101, 2)
    assert len(compiles) == 1, f"{len(compiles)} programs compiled; expected one per model input size"


def test_predict_errors_for_empty_folder_and_bad_checkpoint(saved_model, tmp_path, capsys):
    _, path = saved_model
    (tmp_path / "empty").mkdir()
    assert predict.main([path, os.fspath(tmp_path / "empty"), "-o", os.fspath(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'empty'}: no images" in capsys.readouterr().err
    assert predict.main([os.fspath(tmp_path / "missing.keras"), os.fspath(tmp_path), "-o", "x"]) == 2
    assert "missing.keras: checkpoint not found" in capsys.readouterr().err


def _mask(path, array):
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_evaluate_scores_reports_and_official_protocol(tmp_path, capsys):
    predictions, truth = tmp_path / "pred", tmp_path / "gt"
    predictions.mkdir()
    truth.mkdir()
    a_truth, a_pred = np.zeros((8, 8)), np.zeros((8, 8))
    a_truth[0, :8], a_truth[1, :2] = 255, 255  # 10 foreground pixels
    a_pred[0, :5], a_pred[2, :5] = 255, 255  # 5 hits, 5 false positives, 5 misses
    b_truth = np.zeros((8, 8))
    b_truth[5, 5] = 255  # a total miss: TP = 0
    _mask(truth / "a.png", a_truth)
    _mask(predictions / "a.png", a_pred)
    _mask(truth / "b.png", b_truth)
    _mask(predictions / "b.png", np.zeros((8, 8)))
    _mask(predictions / "b_overlay.png", np.zeros((8, 8, 3)))  # medt-predict's extras are skipped
    assert evaluate.main([os.fspath(predictions), os.fspath(truth), "--official-protocol",
                          "--report", os.fspath(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["images"] == 2
    assert summary["mean_f1"] == pytest.approx((0.5 + 0.0) / 2)
    assert summary["official_mean_f1"] == pytest.approx((0.5 + 1.0) / 2)  # TP = 0 scores 1
    assert summary["pooled_f1"] == pytest.approx(2 * 5 / (2 * 5 + 5 + 6))
    assert summary["mean_iou"] == pytest.approx((1 / 3) / 2)
    assert summary["images_without_foreground"] == 0
    rows = (tmp_path / "r" / "per_image.csv").read_text().splitlines()
    assert rows[0].startswith("name,f1,iou,tp,fp,fn") and rows[1].startswith("a,0.500000,0.333333,5,5,5")
    assert (tmp_path / "r" / "report.png").is_file()


def test_evaluate_without_foreground_is_undefined_not_perfect(tmp_path, capsys):
    predictions, truth = tmp_path / "pred", tmp_path / "gt"
    predictions.mkdir()
    truth.mkdir()
    for name in ("a", "b"):  # all background in truth and prediction
        _mask(truth / f"{name}.png", np.zeros((8, 8)))
        _mask(predictions / f"{name}.png", np.zeros((8, 8)))
    with pytest.warns(RuntimeWarning, match="undefined"):
        assert evaluate.main([os.fspath(predictions), os.fspath(truth), "--official-protocol",
                              "--report", os.fspath(tmp_path / "r")]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())  # valid JSON: NaN written as null
    assert summary["pooled_f1"] is None and summary["mean_f1"] is None and summary["pooled_iou"] is None
    assert summary["images_without_foreground"] == 2
    assert summary["official_mean_f1"] == 1.0  # the paper's quirk, under its own name only
    assert "2 without any foreground" in capsys.readouterr().out


def test_evaluate_errors_name_the_file(tmp_path, capsys):
    predictions, truth = tmp_path / "pred", tmp_path / "gt"
    predictions.mkdir()
    truth.mkdir()
    _mask(predictions / "a.png", np.zeros((8, 8)))
    _mask(truth / "b.png", np.zeros((8, 8)))
    assert evaluate.main([os.fspath(predictions), os.fspath(truth)]) == 2
    assert f"{predictions / 'a.png'}: no ground truth named a.*" in capsys.readouterr().err
    _mask(truth / "a.png", np.zeros((9, 8)))
    assert evaluate.main([os.fspath(predictions), os.fspath(truth)]) == 2
    assert "a.png: 8x8 but the ground truth" in capsys.readouterr().err


def test_predict_with_an_official_checkpoint_matches_the_official_outputs(tmp_path):
    """An official .pth, converted on the fly, segments as the official PyTorch code did (softmax + argmax)."""
    import tifffile

    fixture = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "official",
                           "gated_img32_c3_k2_b2_s3_w0.03125_g2_l1-1-1-1")
    reference = np.load(fixture + ".npz")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for i, image in enumerate(reference["x"]):
        # Float pixels kept as they are (--normalize dtype) and in the stored order (--channel-order rgb).
        tifffile.imwrite(inputs / f"x{i}.tif", np.transpose(image, (1, 2, 0)), photometric="rgb")
    assert predict.main([fixture + ".pth", os.fspath(inputs), "-o", os.fspath(tmp_path / "out"), "--quiet",
                         "--normalize", "dtype", "--channel-order", "rgb", "--probabilities"]) == 0
    for i, logits in enumerate(reference["y_eval64"]):
        official = softmax(np.transpose(logits, (1, 2, 0)))
        ours = np.load(tmp_path / "out" / f"x{i}_probabilities.npy")
        np.testing.assert_allclose(ours, official, atol=1e-5)
        mask = np.asarray(Image.open(tmp_path / "out" / f"x{i}.png"))
        np.testing.assert_array_equal(mask > 0, official.argmax(-1) == 1)


def test_predict_reads_16_bit_images(saved_model, tmp_path):
    _, path = saved_model
    gray16 = (np.random.default_rng(4).random((36, 40)) * 60000).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "deep.png")
    rgb = np.repeat(gray16[..., None], 3, axis=-1)
    import tifffile

    tifffile.imwrite(tmp_path / "deep.tif", rgb, photometric="rgb")
    output = tmp_path / "out"
    assert predict.main([path, os.fspath(tmp_path / "deep.tif"), "-o", os.fspath(output), "--quiet"]) == 0
    assert np.asarray(Image.open(output / "deep.png")).shape == (36, 40)
    image = predict.prepare_image(tmp_path / "deep.png", 1)
    assert image.dtype == np.float32 and image.min() == 0.0 and image.max() == 1.0  # percentile-normalised
