"""The model table and ``medt_keras.load``: every kind of input, every error."""

import inspect
import os
import warnings

import numpy as np
import pytest

import medt_keras
from medt_keras import LoadError, load
from medt_keras.models.registry import MODELS, OFFICIAL_HYPERPARAMETERS, get_spec
from tests.conftest import TINY_IMG_SIZE, TINY_MODEL
from tests.library_only import ROOT
from tests.weights_converter.torch_format import safetensors_bytes

OFFICIAL_AXIALUNET = ROOT / "tests" / "fixtures" / "official" / "axialunet_img32_c1_k3_b2_s3_w0.03125_g2_l1-1-1-1.pth"
TINY = dict(img_size=TINY_IMG_SIZE, in_channels=1, num_classes=3, **TINY_MODEL)


@pytest.fixture(scope="module")
def tiny_model():
    return medt_keras.AxialUNet(**TINY)


# --- the table of models -----------------------------------------------------


def test_table_defaults_are_the_classes_defaults():
    for spec in MODELS:
        parameters = inspect.signature(spec.model_class.__init__).parameters
        for key, value in OFFICIAL_HYPERPARAMETERS.items():
            assert parameters[key].default == value, (spec.name, key)


def test_names_and_aliases():
    assert [s.name for s in MODELS] == ["medt", "logo", "gated", "axialunet"]  # the CLI names stay
    assert get_spec("gated_axial_unet") is get_spec("gated") is get_spec("GatedAxialUNet")
    assert get_spec("axial_unet").model_class is medt_keras.AxialUNet
    assert get_spec("MEDT").model_class is medt_keras.MedT
    with pytest.raises(LoadError, match="unknown model 'unet'; known: medt"):
        get_spec("unet")


def test_every_reader_uses_the_table():
    from training.config import TrainConfig
    from weights_converter.convert import ARCHITECTURES

    assert ARCHITECTURES == {s.name: s.model_class for s in MODELS}
    assert TrainConfig(model="gated_axial_unet").model == "gated"
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        TrainConfig(model="unet")


# --- medt_keras.load ---------------------------------------------------------


@pytest.mark.parametrize("name", ["gated_axial_unet", "axial_unet", "medt", "logo"])
def test_preset_names_build_with_the_official_hyperparameters(name):
    # Small overrides keep the build fast; the rest are the official values.
    model = load(name, width_scale=0.03125, groups=2)
    assert type(model) is get_spec(name).model_class
    config = model.get_config()
    for key, value in OFFICIAL_HYPERPARAMETERS.items():
        expected = {"width_scale": 0.03125, "groups": 2}.get(key, value)
        assert config[key] == (list(expected) if key == "blocks" else expected), key


def test_keras_file(tiny_model, tmp_path):
    path = tmp_path / "tiny.keras"
    tiny_model.compile(optimizer=medt_keras.OfficialAdam(l2=1e-5), loss="sparse_categorical_crossentropy",
                       metrics=[medt_keras.ForegroundF1(3), medt_keras.ForegroundIoU(3)])
    tiny_model.optimizer.build(tiny_model.trainable_variables)  # saved with its (zero) moments
    tiny_model.save(path)
    model = load(path)
    assert type(model) is medt_keras.AxialUNet
    assert isinstance(model.optimizer, medt_keras.OfficialAdam) and model.optimizer.l2 == 1e-5
    for a, b in zip(model.weights, tiny_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert len(model.optimizer.variables) == len(tiny_model.optimizer.variables)
    assert not load(path, compile=False).compiled
    with pytest.raises(LoadError, match="tiny.keras: a .keras file holds its architecture; .* img_size"):
        load(path, img_size=64)


@pytest.mark.slow
def test_keras_file_in_another_dtype_policy(tiny_model, tmp_path):
    path = tmp_path / "tiny.keras"
    tiny_model.save(path)
    model = load(path, dtype="mixed_bfloat16")
    assert type(model) is medt_keras.AxialUNet and not model.compiled
    assert model.get_config()["dtype"] == "mixed_bfloat16"
    assert {layer.compute_dtype for layer in model.layers if layer.weights} == {"bfloat16"}
    for a, b in zip(model.weights, tiny_model.weights):  # variables stay float32, values as saved
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    ours, reference = model.predict_on_batch(x), tiny_model.predict_on_batch(x)
    assert ours.dtype == np.float32 or str(ours.dtype) == "bfloat16"
    ours = np.asarray(ours, np.float32)
    assert np.isfinite(ours).all()
    # bfloat16 keeps 8 bits of mantissa: the logits agree to a few percent of their range, not exactly.
    scale = np.abs(reference).max()
    assert 0 < np.abs(ours - reference).max() < 0.1 * scale
    model.save(tmp_path / "bf16.keras")  # the policy survives a save and a load
    assert load(tmp_path / "bf16.keras", compile=False).get_config()["dtype"] == "mixed_bfloat16"


def test_weights_file_with_its_architecture(tiny_model, tmp_path):
    path = os.fspath(tmp_path / "tiny.weights.h5")
    tiny_model.save_weights(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        by_name = load(path, architecture="axial_unet", **TINY)
        by_config = load(path, config={**tiny_model.get_config(), "architecture": "axialunet"})
    for model in (by_name, by_config):
        assert type(model) is medt_keras.AxialUNet
        for a, b in zip(model.weights, tiny_model.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    with pytest.raises(LoadError, match="tiny.weights.h5: a .weights.h5 file holds no architecture"):
        load(path)
    # One error, not Keras's warnings that layers "will retain their
    # freshly-initialized weights" before it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(LoadError, match="tiny.weights.h5: does not fit AxialUNet"):
            load(path, architecture="axialunet", **{**TINY, "num_classes": 2})
    with pytest.raises(LoadError, match="unknown model 'unet'"):
        load(path, architecture="unet")


def test_weights_file_saved_before_the_patch_product_rename(tiny_model, tmp_path):
    # Before PatchProductConv2D was renamed from Conv2D, .weights.h5 files
    # kept its weights under layers/conv2d*; this writes such a file from the
    # current one (the mapping itself is checked against a file saved by
    # the old code in tests/layers/test_patch_product_conv2d.py).
    import h5py

    from medt_keras.loading import _pre_rename_weight_paths

    path = os.fspath(tmp_path / "old.weights.h5")
    tiny_model.save_weights(path)
    renames = _pre_rename_weight_paths(tiny_model)
    assert renames and all("patch_product_conv2d" in new for new in renames.values())
    with h5py.File(path, "r+") as f:
        for old, new in renames.items():
            f.move(new, old)
    with warnings.catch_warnings():
        # The first try, under the current names, fails; its warnings are not the user's concern.
        warnings.simplefilter("error")
        model = load(path, architecture="axialunet", **TINY)
    for a, b in zip(model.weights, tiny_model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_official_checkpoints_pth_and_safetensors(tmp_path):
    from weights_converter import load_official_checkpoint, read_state_dict

    reference = load_official_checkpoint(OFFICIAL_AXIALUNET)
    safetensors = tmp_path / "official.safetensors"
    safetensors.write_bytes(safetensors_bytes(read_state_dict(OFFICIAL_AXIALUNET)))
    for source in (OFFICIAL_AXIALUNET, safetensors):
        model = load(source)
        assert type(model) is medt_keras.AxialUNet
        for a, b in zip(model.weights, reference.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(LoadError, match="broken.pth"):
        load(broken)


def test_errors_name_the_file_or_name(tmp_path):
    (tmp_path / "model.h5").write_bytes(b"")
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    cases = {
        os.fspath(tmp_path / "missing.keras"): "missing.keras: no such file",
        "runs/x/best.weights.h5": r"runs/x/best.weights.h5: no such file",
        "unet": "'unet': neither a file nor a model name; known names: medt",
        os.fspath(tmp_path / "model.h5"): r"model.h5: unknown kind of file \(by its extension\); expected one of .ker",
        os.fspath(tmp_path / "model.onnx"): "model.onnx: unknown kind of file",
        os.fspath(tmp_path): "is a directory; pass a model file in it",
        os.fspath(tmp_path / "broken.keras"): "broken.keras: not a readable Keras model file",
    }
    for source, message in cases.items():
        with pytest.raises(LoadError, match=message):
            load(source)
    with pytest.raises(LoadError, match="'medt': MedT takes no no_such_argument; it takes attention, blocks, dtype"):
        load("medt", no_such_argument=1, width_scale=0.03125, groups=2)
    assert issubclass(LoadError, ValueError)  # callers that caught ValueError keep working


def test_converter_errors_are_load_errors():
    from weights_converter import CheckpointError

    assert issubclass(CheckpointError, LoadError)


def test_models_carry_their_preprocessing(tiny_model, tmp_path):
    assert tiny_model.preprocessing is None  # not recorded: built without it, as files saved before it existed
    assert load(OFFICIAL_AXIALUNET).preprocessing == {"channel_order": "bgr", "normalize": "auto"}
    assert load("gated", width_scale=0.03125, groups=2).preprocessing["channel_order"] == "bgr"
    model = medt_keras.AxialUNet(**TINY, preprocessing={"channel_order": "rgb", "normalize": "percentile"})
    model.save(tmp_path / "rgb.keras")
    assert load(tmp_path / "rgb.keras").preprocessing == {"channel_order": "rgb", "normalize": "percentile"}
    with pytest.raises(LoadError, match="channel_order 'rgba'"):
        load("axialunet", width_scale=0.03125, groups=2, preprocessing={"channel_order": "rgba"})
