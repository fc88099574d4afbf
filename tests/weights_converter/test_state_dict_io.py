import os
import pickle

import numpy as np
import pytest

from tests.conftest import FIXTURES, OFFICIAL_TINY
from tests.weights_converter.torch_format import safetensors_bytes, torch_zip_bytes
from weights_converter import CheckpointError, read_state_dict

GATED = os.path.join(OFFICIAL_TINY, "gated_img32_c3_k2_b2_s3_w0.03125_g2_l1-1-1-1.pth")


def assert_same_tensors(ours, reference):
    assert list(ours) == list(reference)
    for key in reference:
        np.testing.assert_array_equal(ours[key], reference[key])
        assert ours[key].dtype == reference[key].dtype


@pytest.fixture(scope="module")
def gated():
    return read_state_dict(GATED)


def test_reads_official_checkpoint(gated):
    assert len(gated) == 278
    assert gated["conv1.weight"].shape == (2, 3, 7, 7)
    assert gated["conv1.weight"].dtype == np.float32
    assert gated["bn1.num_batches_tracked"].dtype == np.int64
    assert gated["bn1.num_batches_tracked"].shape == ()
    assert gated["layer1.0.hight_block.f_qr"].shape == ()
    assert gated["layer1.0.hight_block.flatten_index"].dtype == np.int64


def test_zip_written_here_reads_back_identically(tmp_path, gated):
    path = tmp_path / "copy.pth"
    path.write_bytes(torch_zip_bytes(gated))
    assert_same_tensors(read_state_dict(path), gated)


def test_strips_dataparallel_prefix(tmp_path, gated):
    path = tmp_path / "dp.pth"
    path.write_bytes(torch_zip_bytes({"module." + k: v for k, v in list(gated.items())[:5]}))
    assert list(read_state_dict(path)) == list(gated)[:5]


def test_unwraps_checkpoint_dict(tmp_path, gated):
    # {"state_dict": ..., "epoch": 3}, as many training scripts save.
    raw = torch_zip_bytes({"state_dict": dict(list(gated.items())[:3])})
    path = tmp_path / "ckpt.pth"
    path.write_bytes(raw)
    assert list(read_state_dict(path)) == list(gated)[:3]


def test_legacy_format_matches_zip_format(gated):
    # Written by torch.save(..., _use_new_zipfile_serialization=False), the
    # format of PyTorch < 1.6, which the official code was released with.
    assert_same_tensors(read_state_dict(os.path.join(FIXTURES, "legacy_format_gated_tiny.pth")), gated)


def test_safetensors(tmp_path, gated):
    path = tmp_path / "w.safetensors"
    subset = {k: v for k, v in list(gated.items())[:6]}
    path.write_bytes(safetensors_bytes(subset))
    assert_same_tensors(read_state_dict(path), subset)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


@pytest.mark.parametrize("container", ["zip", "plain"])
def test_refuses_pickle_that_runs_code(tmp_path, container, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"weight": _RunsCode()}, protocol=2)
    path = tmp_path / "evil.pth"
    if container == "zip":
        path.write_bytes(torch_zip_bytes({}, extra_pickle=payload))
    else:
        path.write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"refusing to load '(posix|nt)\.system'"):
        read_state_dict(path)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_refuses_whole_pickled_model_with_hint(tmp_path):
    class medt_net:  # stands for lib.models.axialnet.medt_net
        pass

    medt_net.__module__ = "lib.models.axialnet"
    medt_net.__qualname__ = "medt_net"
    import sys
    import types

    fake = types.ModuleType("lib.models.axialnet")
    fake.medt_net = medt_net
    for name in ("lib", "lib.models", "lib.models.axialnet"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["lib.models.axialnet"] = fake
    try:
        payload = pickle.dumps(medt_net(), protocol=2)
    finally:
        for name in ("lib", "lib.models", "lib.models.axialnet"):
            sys.modules.pop(name, None)
    path = tmp_path / "model.pth"
    path.write_bytes(torch_zip_bytes({}, extra_pickle=payload))
    with pytest.raises(CheckpointError, match="save its model.state_dict"):
        read_state_dict(path)


def test_truncated_file_is_a_clear_error(tmp_path):
    raw = open(GATED, "rb").read()
    path = tmp_path / "truncated.pth"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: .*(truncated|damaged)"):
        read_state_dict(path)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(empty)
    with pytest.raises(CheckpointError, match="no such file"):
        read_state_dict(tmp_path / "absent.pth")
