"""``medt-train`` end to end on small synthetic data: resume after SIGKILL, gate schedule, NaN, bad input."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import medt_keras  # noqa: F401

from training import checkpoint
from training.config import TrainConfig
from training.train import TrainingDiverged, _resolve_resume, build_model, compile_model, gate_variables, train
from tests.library_only import run_library_alone
from tests.training.kill_points import stopped
from tests.synthetic_data import write_medt_folder

TINY = ["--model", "gated", "--model-args", '{"blocks": [1, 1, 1, 1], "groups": 2}', "--img-size", "32",
        "--dataset", "medt_folder", "--batch-size", "4", "--gate-unfreeze-epoch", "1",
        "--checkpoint-every", "1", "--preview-images", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    manual = write_medt_folder(os.fspath(root / "manual"), {"train": 24, "validation": 4, "test": 4}, size=32)
    return dict(manual_dir=manual, data_dir=os.fspath(root / "tfds"))


def _command(data, output_dir, *extra):
    return [sys.executable, "-m", "training.train", *TINY, "--manual-dir", data["manual_dir"],
            "--data-dir", data["data_dir"], "--output-dir", os.fspath(output_dir), "--verbose", "0", *extra]


def _run(data, output_dir, *extra, check=True):
    result = subprocess.run(_command(data, output_dir, *extra), capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _state_arrays(directory):
    """The saved variables, ``{"model/<path>": array, "optimizer/<path>": array}``, in either format."""
    saved = checkpoint.state_arrays(directory)
    return {f"{prefix}/{path}": value for prefix, values in saved.items() for path, value in values.items()}


def _assert_same_state(expected_dir, resumed_dir):
    """Every saved model and optimiser variable of the two runs equal (float32 rounding allowed)."""
    expected, resumed = _state_arrays(expected_dir), _state_arrays(resumed_dir)
    assert expected.keys() == resumed.keys()
    for key in expected:
        if expected[key].dtype.kind in "fc":
            np.testing.assert_allclose(resumed[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
        else:
            np.testing.assert_array_equal(resumed[key], expected[key], err_msg=key)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    output = tmp_path_factory.mktemp("uninterrupted")
    _run(data, output, "--epochs", "3")
    return output


@pytest.mark.slow
def test_outputs_and_gate_schedule(uninterrupted):
    for name in ("best.weights.h5", "model.keras", "test_metrics.json", "test_predictions.png", "log.csv"):
        assert (uninterrupted / name).is_file(), name
    report = json.loads((uninterrupted / "test_metrics.json").read_text())
    assert report["f1"] == pytest.approx(report["f1_numpy_check"], abs=1e-6)
    assert {"official_f1", "official_iou", "official_logit_threshold_f1"} <= report.keys()
    meta = checkpoint.read_run_state(uninterrupted)
    config = TrainConfig(**meta["config"])
    model = build_model(config, in_channels=3)
    initial = {v.path: v.numpy() for v in gate_variables(model)}
    assert len(initial) == 4 * 2 * 4  # 4 gates x 2 attentions x 4 blocks

    # Frozen in epoch index 0 (unfreeze epoch 1 in TINY), trained from then on.
    model.load_weights(os.fspath(uninterrupted / "checkpoints" / "epoch_0001.weights.h5"))
    assert all(np.array_equal(v.numpy(), initial[v.path]) for v in gate_variables(model))
    model.load_weights(os.fspath(uninterrupted / "checkpoints" / "epoch_0003.weights.h5"))
    assert all(not np.array_equal(v.numpy(), initial[v.path]) for v in gate_variables(model))


@pytest.mark.slow
@pytest.mark.parametrize("each_step, match", [(False, r"epoch 2 \("), (True, "epoch 2, batch 1")])
def test_nan_loss_stops_and_keeps_the_last_good_state(data, tmp_path, monkeypatch, each_step, match):
    from training import data as data_module

    original = data_module.SegmentationBatches.example

    def poisoned(self, index, flip=False, crop=None):
        image, mask = original(self, index, flip, crop)
        if self.shuffle and self.epoch >= 1:
            image = image * np.nan
        return image, mask

    monkeypatch.setattr(data_module.SegmentationBatches, "example", poisoned)
    config = TrainConfig(model="gated", model_args={"blocks": [1, 1, 1, 1], "groups": 2}, img_size=32,
                         dataset="medt_folder", epochs=3, checkpoint_every=1, output_dir=os.fspath(tmp_path / "nan"),
                         **data)
    # The epoch's mean loss is checked at its end; the per-step check (opt-in) also names the batch.
    with pytest.raises(TrainingDiverged, match=match):
        train(dataclasses.replace(config, nan_check_each_step=each_step), verbose=0)
    meta = checkpoint.read_run_state(config.output_dir)
    assert meta["next_epoch"] == 1
    state = _state_arrays(config.output_dir)
    assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")


def test_dataset_smaller_than_one_batch_is_a_clear_error(data, tmp_path):
    result = _run(data, tmp_path / "small", "--max-train-examples", "3", check=False)
    assert result.returncode == 2
    assert "medt_folder train: 3 example(s), fewer than one batch of 4" in result.stderr


@pytest.mark.slow
def test_resume_may_switch_rematerialization(uninterrupted):
    # Rematerialising changes memory, not results (tests/layers: equal outputs, gradients and
    # statistics in float64), so a resumed run may switch it; the model is then built with it.
    saved = TrainConfig(**checkpoint.read_run_state(os.fspath(uninterrupted))["config"])
    wanted = dataclasses.replace(saved, rematerialize=True, epochs=5)
    config, state = _resolve_resume(wanted, os.fspath(uninterrupted), resume=True)
    assert state is not None and config.rematerialize and config.epochs == 5
    model = build_model(config, in_channels=3)
    attention = [layer for layer in model._flatten_layers() if isinstance(layer, medt_keras.layers.AxialAttention)]
    assert attention and all(layer.rematerialize for layer in attention)


@pytest.mark.slow
def test_existing_run_needs_resume_and_the_same_config(data, uninterrupted):
    result = _run(data, uninterrupted, "--epochs", "3", check=False)
    assert result.returncode != 0 and "Pass --resume" in result.stderr
    result = _run(data, uninterrupted, "--epochs", "3", "--seed", "1", "--resume", check=False)
    assert result.returncode != 0 and "seed: saved 0, now 1" in result.stderr


@pytest.mark.slow
def test_saved_model_loads_predicts_and_trains_with_the_library_alone(uninterrupted):
    # A fresh interpreter where `training` cannot be imported: `import medt_keras` must register the
    # model, OfficialAdam and the metrics, and restore the optimiser state (its step count and moments).
    # model.keras is the best epoch's state (best.weights.h5 carries the optimiser's variables too).
    meta = checkpoint.read_run_state(uninterrupted)
    best_steps = meta["best_epoch"] * int(next(iter(checkpoint.state_arrays(uninterrupted)["optimizer"].values()))) // meta["next_epoch"]
    result = run_library_alone(
        f"""
        import json
        import numpy as np
        import keras
        import medt_keras

        model = keras.saving.load_model({os.fspath(uninterrupted / "model.keras")!r})
        assert isinstance(model.optimizer, medt_keras.OfficialAdam), type(model.optimizer)
        before = int(model.optimizer.iterations.numpy())
        x = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
        y = (x[..., 0] > 0.5).astype("int32")
        shape = model.predict(x, verbose=0).shape
        history = model.fit(x, y, batch_size=4, epochs=1, verbose=0).history
        print(json.dumps(dict(before=before, after=int(model.optimizer.iterations.numpy()), shape=shape,
                              logs=sorted(history), loss=history["loss"][0], preprocessing=model.preprocessing,
                              application=sorted(m for m in sys.modules if m.split(".")[0] == "training"))))
        """
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "Skipping variable loading" not in result.stderr, result.stderr[-2000:]
    assert report["before"] == best_steps > 0 and report["after"] == best_steps + 1
    assert report["shape"] == [4, 32, 32, 2]
    assert {"loss", "f1", "iou"} <= set(report["logs"]) and np.isfinite(report["loss"])
    assert report["application"] == []
    # The synthetic dataset is 8-bit BGR-ordered training data: the model says so.
    assert report["preprocessing"] == {"channel_order": "bgr", "normalize": "dtype"}


@pytest.mark.slow
def test_predict_on_the_trained_model_needs_no_preprocessing_flags(data, uninterrupted, tmp_path, capsys):
    from training import predict

    images = os.path.join(data["manual_dir"], "test", "img")
    assert predict.main([os.fspath(uninterrupted / "model.keras"), images, "-o", os.fspath(tmp_path), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err
    assert len(os.listdir(tmp_path)) == len(os.listdir(images))


def _assert_every_file_readable(directory):
    """No file under its real name is half-written: each one parses whole. Temporaries are never read."""
    import zipfile

    import h5py

    for folder, _subfolders, files in os.walk(directory):
        for name in files:
            path = os.path.join(folder, name)
            if name.startswith(".tmp-"):
                continue
            if name.endswith(".npz"):
                with np.load(path) as archive:
                    for key in archive.files:
                        archive[key]
            elif name.endswith(".h5"):
                with h5py.File(path, "r") as handle:
                    handle.visititems(lambda _, item: item[()] if isinstance(item, h5py.Dataset) else None)
            elif name.endswith(".keras"):
                with zipfile.ZipFile(path) as archive:
                    assert archive.testzip() is None, path
            elif name.endswith(".json"):
                json.loads(open(path).read())
            elif name.endswith(".csv"):
                lines = open(path).read().strip().splitlines()
                assert len({line.count(",") for line in lines}) == 1, path
            elif name.endswith(".png"):
                raw = open(path, "rb").read()
                assert raw.startswith(b"\x89PNG") and raw.endswith(b"IEND\xaeB`\x82"), path
    meta = checkpoint.read_run_state(directory)
    if meta is not None:  # the state's epoch has every file it refers to
        done = meta["next_epoch"]
        assert [row["epoch"] for row in meta["history"]] == list(range(1, done + 1))
        for epoch in range(1, done + 1):
            assert os.path.isfile(os.path.join(directory, "checkpoints", f"epoch_{epoch:04d}.weights.h5"))
        if meta["best_epoch"]:
            assert os.path.isfile(os.path.join(directory, "best.weights.h5"))


def _launch_with_stop(data, output, stop_at, *extra):
    """``medt-train`` under ``tests.training.kill_points``: it stops itself at ``stop_at`` ("" runs through)."""
    env = dict(os.environ, MEDT_STOP_AT=stop_at,
               PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "tests.training.kill_points", *_command(data, output, *extra)[3:]]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill(process):
    process.kill()
    assert process.wait() == -signal.SIGKILL
    process.stderr.close()


@pytest.mark.slow
def test_random_kills_lose_nothing(data, uninterrupted, tmp_path):
    # Four SIGKILLs at seeded moments, each followed by --resume: during start-up
    # and compilation (a random delay), inside an epoch (a random training batch),
    # while an epoch checkpoint is renamed into place (just before or just after)
    # and while run_state.npz is (its temporary written, not yet renamed). The run
    # ends with the variables of the uninterrupted one, and after every kill each
    # file on disk parses whole.
    import random

    rng = random.Random(16)
    output = tmp_path / "killed"

    def next_epoch():
        meta = checkpoint.read_run_state(output) if (output / checkpoint.STATE_FILE).exists() else None
        return 0 if meta is None else meta["next_epoch"]

    moments = [
        lambda: ("", rng.uniform(1.0, 8.0)),
        lambda: (f"batch:{rng.randint(8, 11)}", None),  # the second epoch this process trains (6 batches each)
        lambda: (f"replace:epoch_{next_epoch() + 1:04d}.weights.h5:{rng.choice(['before', 'after'])}", None),
        lambda: ("replace:run_state.npz:before", None),
    ]
    resume = ()
    for moment in moments:
        stop_at, delay = moment()
        before = next_epoch()
        process = _launch_with_stop(data, output, stop_at, "--epochs", "3", *resume)
        if delay is not None:
            time.sleep(delay)
            assert process.poll() is None, f"ended before the kill at {delay:.1f} s: {process.stderr.read()[-2000:]}"
        else:
            assert stopped(process), f"ended before {stop_at}: {process.stderr.read()[-2000:]}"
        _kill(process)
        _assert_every_file_readable(output)
        assert next_epoch() >= before  # a kill never takes back a completed epoch
        resume = ("--resume",)
    assert next_epoch() < 3  # the kills all came before the end
    final = _launch_with_stop(data, output, "", "--epochs", "3", "--resume")
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    _assert_every_file_readable(output)
    assert not [n for _, _, files in os.walk(output) for n in files if n.startswith(".tmp-")]

    _assert_same_state(uninterrupted, output)
    history = [checkpoint.read_run_state(d)["history"] for d in (uninterrupted, output)]
    assert [row["epoch"] for row in history[1]] == [1, 2, 3]
    for a, b in zip(*history):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    with open(output / "log.csv") as handle:
        assert len(handle.read().strip().splitlines()) == 4  # header + one row per epoch, none repeated
    reports = [json.loads((d / "test_metrics.json").read_text()) for d in (uninterrupted, output)]
    np.testing.assert_allclose(reports[1]["f1"], reports[0]["f1"], rtol=1e-5)


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory):
    """Splits that no batch of 4 divides: 26 train, 6 validation, 5 test."""
    root = tmp_path_factory.mktemp("uneven_data")
    manual = write_medt_folder(os.fspath(root / "manual"), {"train": 26, "validation": 6, "test": 5}, size=32, seed=1)
    return dict(manual_dir=manual, data_dir=os.fspath(root / "tfds"))


def _tiny_config(data, output_dir, **changes):
    return TrainConfig(**{**dict(model="gated", model_args={"blocks": [1, 1, 1, 1], "groups": 2}, img_size=32,
                                 dataset="medt_folder", batch_size=4, gate_unfreeze_epoch=1, checkpoint_every=1,
                                 preview_images=2, eval_protocol="resize", output_dir=os.fspath(output_dir),
                                 **data), **changes})


@pytest.mark.slow
def test_one_program_per_phase_with_uneven_splits(uneven_data, tmp_path):
    """A whole run compiles one train, one evaluation and one predict program (partial batches dropped or padded)."""
    import jax.monitoring

    names = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(str(kwargs.get("fun_name", "")))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        report = train(_tiny_config(uneven_data, tmp_path / "run", epochs=2), verbose=0)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    steps = {}
    for name in names:
        for phase in ("train", "test", "predict"):
            if f"{phase}_step" in name:
                steps.setdefault(phase, []).append(name)
    assert {phase: len(found) for phase, found in steps.items()} == {"train": 1, "test": 1, "predict": 1}, names
    assert report["examples"] == 5
    history = checkpoint.read_run_state(tmp_path / "run")["history"]
    assert len(history) == 2 and all(np.isfinite(row["val_loss"]) for row in history)


def test_compiled_metrics_leave_zero_weight_examples_out():
    """The compiled F1/IoU get the sample weights: zero-weight examples do not count (they did under ``metrics=``)."""
    import keras

    from medt_keras.metrics import pooled_scores

    keras.utils.set_random_seed(0)
    model = compile_model(keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 1)]), 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    y = (rng.random((4, 8, 8)) < 0.5).astype(np.int32)
    weights = np.broadcast_to(np.array([2.0, 2.0, 0.0, 0.0], np.float32)[:, None, None], y.shape).copy()
    predicted = np.argmax(model.predict(x, verbose=0), axis=-1)
    real = pooled_scores(predicted[:2], y[:2])
    assert not np.allclose(real, pooled_scores(predicted, y))  # the two left out change the scores
    got = model.evaluate(x, y, sample_weight=weights, batch_size=4, verbose=0, return_dict=True)
    assert (got["f1"], got["iou"]) == pytest.approx(real, rel=1e-6)


@pytest.mark.slow
def test_float64_model_trains_on_a_float64_loss():
    """A float64 model's loss is computed in float64 (Keras' default float32 would round every pixel's term)."""
    import keras

    from medt_keras._backend import enable_float64
    from tests.conftest import TINY_IMG_SIZE, TINY_MODEL

    enable_float64()
    keras.utils.set_random_seed(0)
    model = medt_keras.GatedAxialUNet(img_size=TINY_IMG_SIZE, dtype="float64", **TINY_MODEL)
    compile_model(model, 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, TINY_IMG_SIZE, TINY_IMG_SIZE, 3))
    y = (rng.random((2, TINY_IMG_SIZE, TINY_IMG_SIZE)) < 0.5).astype(np.int32)
    logits = model(x)
    # The loss itself in float64 (Keras then rounds only the scalar total it reports).
    loss = model.loss(y, logits)
    assert keras.backend.standardize_dtype(loss.dtype) == "float64"
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(log_probs, y[..., None], -1))
    assert np.isfinite(float(loss)) and abs(float(loss) - expected) <= 1e-14 * abs(expected)
    float32_model = compile_model(keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 1)]), 2)
    assert keras.backend.standardize_dtype(float32_model.loss.dtype) == "float32"


@pytest.mark.slow
def test_padded_evaluation_equals_the_exact_examples():
    """6 examples in batches of 4 (2 zero-weight copies): loss, F1 and IoU of the 6 examples alone."""
    import keras

    from training.data import SegmentationBatches

    keras.utils.set_random_seed(3)  # the model's initial weights independent of the tests run before
    rng = np.random.default_rng(3)
    source = [dict(image=rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                   mask=(rng.random((32, 32, 1)) < 0.3).astype(np.uint8)) for _ in range(6)]
    config = TrainConfig(model="gated", model_args={"blocks": [1, 1, 1, 1], "groups": 2}, img_size=32)
    model = compile_model(build_model(config, in_channels=3), 2)  # compiled as medt-train compiles
    padded = SegmentationBatches(source, 4, 32, pad_remainder=True, workers=2)
    assert padded.num_batches == 2 and padded[1][0].shape[0] == 4
    exact = SegmentationBatches(source, 6, 32)
    got = model.evaluate(padded, verbose=0, return_dict=True)
    x, y = exact[0]
    want = model.evaluate(x, y, batch_size=6, verbose=0, return_dict=True)
    # With these initial weights the copies' pixels would move F1 (0.4636 with
    # them, 0.4663 without): the metrics must receive the zero weights.
    assert np.isfinite(got["loss"]) and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["f1"] == pytest.approx(want["f1"], rel=1e-5)
    assert got["iou"] == pytest.approx(want["iou"], rel=1e-5)


@pytest.mark.slow
def test_steps_per_execution_trains_the_same_weights(data, uninterrupted, tmp_path):
    """Three steps per compiled call (6 batches per epoch) end where one step per call does."""
    output = tmp_path / "spe"
    _run(data, output, "--epochs", "3", "--steps-per-execution", "3", "--loader-workers", "1")
    expected, got = _state_arrays(uninterrupted), _state_arrays(output)
    for key in expected:
        if expected[key].dtype.kind in "fc":
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key)
    history = [checkpoint.read_run_state(d)["history"] for d in (uninterrupted, output)]
    assert [row["epoch"] for row in history[1]] == [1, 2, 3]
    for a, b in zip(*history):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)
        np.testing.assert_allclose(b["val_loss"], a["val_loss"], rtol=1e-4)
