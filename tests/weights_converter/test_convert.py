import glob
import os

import numpy as np
import pytest

import medt_keras
from tests.conftest import OFFICIAL_TINY, TINY_IMG_SIZE, TINY_MODEL, fast_first
from tests.weights_converter.torch_format import torch_zip_bytes
from weights_converter import (
    CheckpointError,
    export_official_state_dict,
    infer_architecture,
    load_official_checkpoint,
    read_state_dict,
)
from weights_converter.__main__ import main as convert_main
from weights_converter.mapping import official_module_name, relative_index

CASES = sorted(glob.glob(os.path.join(OFFICIAL_TINY, "*.pth")))
GATED = next(p for p in CASES if os.path.basename(p).startswith("gated"))

EXPECTED = {
    "axialunet": ("axialunet", dict(img_size=32, in_channels=1, num_classes=3, groups=2)),
    "gated": ("gated", dict(img_size=32, in_channels=3, num_classes=2, groups=2)),
    "logo": ("logo", dict(img_size=128, in_channels=3, num_classes=2, groups=2)),
    "medt": ("medt", dict(img_size=128, in_channels=3, num_classes=2, groups=2)),
}


@pytest.fixture(scope="module")
def converted():
    """Each tiny official case, converted once (float32)."""
    return {path: load_official_checkpoint(path) for path in CASES}


@pytest.mark.parametrize("path", CASES, ids=os.path.basename)
def test_infers_architecture(path):
    name, hyper = infer_architecture(read_state_dict(path))
    expected_name, expected = EXPECTED[os.path.basename(path).split("_")[0]]
    assert name == expected_name
    for key, value in expected.items():
        assert hyper[key] == value
    assert hyper["width_scale"] == 0.03125 and hyper["blocks"] == (1, 1, 1, 1)


@pytest.mark.parametrize("path", CASES, ids=os.path.basename)
def test_export_round_trip_is_exact(converted, path):
    original = read_state_dict(path)
    exported = export_official_state_dict(converted[path])
    assert set(exported) == set(original)
    for key, value in original.items():
        assert exported[key].dtype == value.dtype, key
        assert exported[key].shape == value.shape, key
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_dead_official_parameters_survive(converted):
    medt = next(p for p in CASES if os.path.basename(p).startswith("medt"))
    exported = export_official_state_dict(converted[medt])
    original = read_state_dict(medt)
    for key in ("adjust_p.weight", "layer1_p.0.conv1.bias"):
        np.testing.assert_array_equal(exported[key], original[key])


def _write(tmp_path, name, state_dict):
    path = tmp_path / name
    path.write_bytes(torch_zip_bytes(state_dict))
    return str(path)


def _load_error(tmp_path, name, state_dict):
    with pytest.raises(CheckpointError) as error:
        load_official_checkpoint(_write(tmp_path, name, state_dict))
    return str(error.value)


def test_missing_key_is_named(tmp_path):
    state_dict = read_state_dict(GATED)
    del state_dict["layer2.0.hight_block.bn_qkv.running_var"]
    message = _load_error(tmp_path, "missing.pth", state_dict)
    assert "missing.pth" in message
    assert "missing key 'layer2.0.hight_block.bn_qkv.running_var' (expected shape (16,))" in message


def test_unexpected_key_and_wrong_shape_are_named(tmp_path):
    state_dict = read_state_dict(GATED)
    state_dict["layer9.0.conv_down.weight"] = np.zeros((2, 2, 1, 1), np.float32)
    state_dict["decoder2.weight"] = np.zeros((5, 128, 3, 3), np.float32)
    message = _load_error(tmp_path, "bad.pth", state_dict)
    assert "unexpected key 'layer9.0.conv_down.weight' (shape (2, 2, 1, 1))" in message
    assert "key 'decoder2.weight': expected shape (32, 64, 3, 3), found (5, 128, 3, 3)" in message
    assert "2 problems" in message


def test_override_that_does_not_fit_is_an_error():
    with pytest.raises(CheckpointError, match="expected shape"):
        load_official_checkpoint(GATED, num_classes=4)


def test_not_a_medt_checkpoint(tmp_path):
    message = _load_error(tmp_path, "other.pth", {"fc.weight": np.zeros((2, 2), np.float32)})
    assert "'conv1.weight' is missing" in message


def test_flatten_index_is_recomputed_and_checked():
    state_dict = read_state_dict(GATED)
    key = "layer1.0.hight_block.flatten_index"
    np.testing.assert_array_equal(state_dict[key], relative_index(16))


def test_name_table():
    assert official_module_name("local_stage2_block0") == "layer2_p.0"
    assert official_module_name("stage3_block2") == "layer3.2"
    assert official_module_name("stem_norm1") == "bn1"
    assert official_module_name("local_decoder1") == "decoder1_p"
    assert official_module_name("fusion_conv") == "decoderf"
    assert official_module_name("head") == "adjust"
    assert official_module_name("re_lu") is None


def test_fine_tuned_weights_export(converted):
    model = converted[GATED]
    variable = model.get_layer("decoder3").kernel
    before = variable.numpy().copy()
    variable.assign(before + 1.0)
    try:
        exported = export_official_state_dict(model)
        np.testing.assert_array_equal(exported["decoder3.weight"], np.transpose(before + 1.0, (3, 2, 0, 1)))
    finally:
        variable.assign(before)


@pytest.mark.parametrize("suffix", fast_first([".weights.h5", ".keras"]))
def test_cli_converts(tmp_path, capsys, suffix):
    destination = tmp_path / f"out{suffix}"
    assert convert_main([GATED, str(destination)]) == 0
    printed = capsys.readouterr().out
    assert "architecture: gated" in printed and "parameters" in printed
    assert destination.exists()
    reference = load_official_checkpoint(GATED)
    x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype("float32")
    if suffix == ".keras":
        import keras

        restored = keras.saving.load_model(destination)
        assert isinstance(restored, medt_keras.GatedAxialUNet)
    else:
        restored = medt_keras.GatedAxialUNet(img_size=TINY_IMG_SIZE, **TINY_MODEL)
        restored.load_weights(destination)
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(reference(x)))
    assert not list(tmp_path.glob("*partial*"))


def test_cli_bad_input_exits_nonzero(tmp_path, capsys):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(open(GATED, "rb").read()[:1000])
    assert convert_main([str(broken), str(tmp_path / "x.keras")]) == 1
    assert "broken.pth" in capsys.readouterr().err
    assert convert_main([GATED, str(tmp_path / "x.h5")]) == 2
    assert not (tmp_path / "x.keras").exists()


@pytest.mark.parametrize(
    "cls,name",
    [
        (medt_keras.AxialUNet, "axialunet"),
        (medt_keras.GatedAxialUNet, "gated"),
        (medt_keras.MedT, "medt"),
        (medt_keras.LoGo, "logo"),
    ],
)
def test_architecture_inference_inverts_export_for_unusual_hyperparameters(cls, name):
    hyperparameters = dict(
        img_size=128, in_channels=2, num_classes=3, width_scale=0.140625, groups=3, blocks=(2, 1, 3, 1)
    )
    inferred_name, inferred = infer_architecture(export_official_state_dict(cls(**hyperparameters)))
    assert inferred_name == name
    assert inferred == hyperparameters


def test_architecture_inference_reads_non_square_sizes():
    hyperparameters = dict(img_size=[64, 96], in_channels=1, num_classes=2, **TINY_MODEL)
    model = medt_keras.GatedAxialUNet(**hyperparameters)
    assert infer_architecture(export_official_state_dict(model)) == ("gated", hyperparameters)


def test_other_image_size_needs_explicit_resampling():
    with pytest.raises(CheckpointError) as error:
        load_official_checkpoint(GATED, img_size=64)
    message = str(error.value)
    assert "key 'layer1.0.hight_block.relative': expected shape (4, 63), found (4, 31)" in message
    assert "resample_positions=True" in message


def test_resampled_positions_run_at_another_size():
    from weights_converter.convert import resample_relative_table

    table = np.random.default_rng(0).normal(size=(4, 31)).astype("float32")
    wide = resample_relative_table(table, 32)
    assert wide.shape == (4, 63)
    np.testing.assert_allclose(wide[:, [0, 31, 62]], table[:, [0, 15, 30]], atol=1e-6)
    assert resample_relative_table(table, 16) is table

    model = load_official_checkpoint(GATED, img_size=(64, 96), resample_positions=True)
    assert model.output_shape == (None, 64, 96, 2)
    same = load_official_checkpoint(GATED, resample_positions=True)
    original = read_state_dict(GATED)
    exported = export_official_state_dict(same)
    for key in original:
        np.testing.assert_array_equal(exported[key], original[key])


def test_cli_other_size(tmp_path, capsys):
    destination = tmp_path / "wide.weights.h5"
    assert convert_main([GATED, str(destination), "--img-size", "64x96"]) == 1
    assert "--resample-positions" in capsys.readouterr().err
    assert convert_main([GATED, str(destination), "--img-size", "64x96", "--resample-positions"]) == 0
    assert "img_size = [64, 96]" in capsys.readouterr().out


def test_well_formed_file_that_fits_no_model_is_a_checkpoint_error(tmp_path, capsys):
    # Right key names, nonsense shapes: whatever goes wrong while inferring
    # and building the model surfaces as a CheckpointError naming the file.
    odd = {"conv1.weight": np.zeros((), np.float32), "adjust.weight": np.zeros((), np.float32),
           "decoder1.weight": np.zeros((), np.float32)}
    path = tmp_path / "odd.pth"
    path.write_bytes(torch_zip_bytes(odd))
    with pytest.raises(CheckpointError, match="odd.pth: "):
        load_official_checkpoint(path)
    assert convert_main([str(path), str(tmp_path / "out.keras")]) == 1
    assert "odd.pth" in capsys.readouterr().err
