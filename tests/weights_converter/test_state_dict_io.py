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


# Crafted files: only the numbers inside tensor records are hostile (no
# code-running global). Each must be refused with a CheckpointError naming
# the file and the tensor, fast and without allocating more than the file.


def _refused_quickly(path, match, memory_bound=64 << 20):
    import time
    import tracemalloc

    tracemalloc.start()
    # This thread's CPU time: the machine may be shared, and the process's
    # other threads (XLA's pool, a background save of a test before) may be busy.
    start = time.thread_time()
    try:
        with pytest.raises(CheckpointError, match=match) as error:
            read_state_dict(path)
        seconds = time.thread_time() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(error.value)
    assert seconds < 1.0, seconds
    assert peak < os.path.getsize(path) + memory_bound, peak
    return str(error.value)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize(
    "offset, stride, what",
    [(0, (-1,), "strides is negative"), (-2, (1,), "storage offset is negative"), (2, (1,), "reach element 5")],
)
def test_refuses_view_outside_its_storage(tmp_path, fmt, offset, stride, what):
    from tests.weights_converter.torch_format import RawTensor, torch_legacy_bytes

    storage = np.arange(4, dtype=np.float32)
    tensors = {"w": RawTensor(storage, offset, (4,), stride)}
    path = tmp_path / "outside.pth"
    path.write_bytes(torch_zip_bytes(tensors) if fmt == "zip" else torch_legacy_bytes(tensors))
    message = _refused_quickly(path, "tensor 'w': ")
    assert what in message


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_refuses_stride_zero_broadcast_of_2_to_31_elements(tmp_path, fmt):
    # 650 bytes that the unchecked reader turned into an 8 GiB array (41 s).
    from tests.weights_converter.torch_format import RawTensor, torch_legacy_bytes

    tensors = {"w": RawTensor(np.zeros(1, np.float32), 0, (2**31,), (0,))}
    path = tmp_path / "broadcast.pth"
    path.write_bytes(torch_zip_bytes(tensors) if fmt == "zip" else torch_legacy_bytes(tensors))
    assert os.path.getsize(path) < 1000
    _refused_quickly(path, r"tensor 'w': shape \(2147483648,\) has 2147483648 elements but its storage holds only 1")


def test_refuses_overlapping_views_and_small_broadcasts(tmp_path):
    from tests.weights_converter.torch_format import RawTensor

    storage = np.arange(8, dtype=np.float32)
    path = tmp_path / "overlap.pth"
    path.write_bytes(torch_zip_bytes({"w": RawTensor(storage, 0, (2, 4), (0, 1))}))
    _refused_quickly(path, "tensor 'w': .*overlap")
    # Two tensors over the same 8 elements: each fits, together they hold 16.
    path.write_bytes(torch_zip_bytes({
        "a": RawTensor(storage, 0, (8,), (1,), key="s"),
        "b": RawTensor(storage, 0, (2, 4), (4, 1), key="s"),
    }))
    _refused_quickly(path, "tensor 'b': it overlaps other tensors of storage s")


def test_shared_storage_disjoint_slices_and_tied_weights_still_load(tmp_path):
    from tests.weights_converter.torch_format import RawTensor

    storage = np.arange(12, dtype=np.float32)
    path = tmp_path / "shared.pth"
    path.write_bytes(torch_zip_bytes({
        "first": RawTensor(storage, 0, (2, 3), (3, 1), key="s"),
        "second_t": RawTensor(storage, 6, (3, 2), (1, 3), key="s"),  # a transposed view
        "tied": RawTensor(storage, 0, (2, 3), (3, 1), key="s"),
    }))
    loaded = read_state_dict(path)
    np.testing.assert_array_equal(loaded["first"], storage[:6].reshape(2, 3))
    np.testing.assert_array_equal(loaded["second_t"], storage[6:].reshape(2, 3).T)
    np.testing.assert_array_equal(loaded["tied"], loaded["first"])


def test_refuses_deflated_gigabyte_storage_for_a_four_element_tensor(tmp_path):
    # 1 MB on disk, 1 GiB of zeros once inflated: the unchecked reader
    # inflated all of it (2 GiB peak) for 4 elements.
    import zipfile

    from tests.weights_converter.torch_format import RawTensor

    def zeros(mebibytes):
        def write(entry):
            chunk = bytes(1 << 20)
            for _ in range(mebibytes):
                entry.write(chunk)

        return write

    gigabyte_of_zeros = zeros(1024)

    tensors = {"w": RawTensor(np.zeros(4, np.float32), 0, (4,), (1,), key="0")}
    path = tmp_path / "bomb.pth"
    path.write_bytes(torch_zip_bytes(tensors, compression=zipfile.ZIP_DEFLATED, storage_bytes={"0": gigabyte_of_zeros}))
    assert os.path.getsize(path) < 2 << 20
    _refused_quickly(path, r"storage 0: archive/data/0 holds 1073741824 bytes, 16 expected")
    # Declared by the pickle as the 2^26 floats it inflates to: larger than the file, not read either.
    tensors = {"w": RawTensor(np.zeros(4, np.float32), 0, (4,), (1,), storage_numel=2**26, key="0")}
    path.write_bytes(torch_zip_bytes(tensors, compression=zipfile.ZIP_DEFLATED, storage_bytes={"0": zeros(256)}))
    _refused_quickly(path, r"tensor 'w': its storage 0 \(268435456 bytes\).* larger than the file")


def test_refuses_storage_whose_bytes_disagree_with_the_pickle(tmp_path):
    from tests.weights_converter.torch_format import RawTensor, torch_legacy_bytes

    tensors = {"w": RawTensor(np.zeros(4, np.float32), 0, (2,), (1,), storage_numel=3)}
    path = tmp_path / "short.pth"
    path.write_bytes(torch_zip_bytes(tensors))
    _refused_quickly(path, "storage 0: archive/data/0 holds 16 bytes, 12 expected")
    path.write_bytes(torch_legacy_bytes({"w": RawTensor(np.zeros(4, np.float32), 0, (2,), (1,))}, stored_numel={"0": 2**40}))
    _refused_quickly(path, "storage 0 holds 1099511627776 elements but the pickle declares 4")


def test_refuses_legacy_view_outside_its_storage(tmp_path):
    from tests.weights_converter.torch_format import RawTensor, torch_legacy_bytes

    path = tmp_path / "view.pth"
    path.write_bytes(torch_legacy_bytes({"w": RawTensor(np.zeros(4, np.float32), 0, (2,), (1,), view=(3, 2))}))
    _refused_quickly(path, "view of 2 elements at offset 3 lies outside its 4 elements")
    # Inside the view's bounds, the tensor is checked against the view, not the whole storage.
    path.write_bytes(torch_legacy_bytes({"w": RawTensor(np.arange(4, dtype=np.float32), 1, (2,), (1,), view=(1, 2))}))
    _refused_quickly(path, r"tensor 'w': shape \(2,\), strides \(1,\) at offset 1 reach element 2 of a storage of 2")
    path.write_bytes(torch_legacy_bytes({"w": RawTensor(np.arange(4, dtype=np.float32), 0, (2,), (1,), view=(2, 2))}))
    np.testing.assert_array_equal(read_state_dict(path)["w"], [2, 3])


def test_legacy_writer_here_reads_back_identically(tmp_path, gated):
    from tests.weights_converter.torch_format import torch_legacy_bytes

    path = tmp_path / "legacy.pth"
    path.write_bytes(torch_legacy_bytes(gated))
    assert_same_tensors(read_state_dict(path), gated)


@pytest.mark.parametrize(
    "edit, length, match",
    [
        (lambda h: h["a"].update(data_offsets=h["a"]["data_offsets"][::-1]), None, r"tensor 'a': data_offsets \[16, 0\]"),
        (lambda h: h["a"].update(shape=[5]), None, r"tensor 'a': shape \[5\] of F32 needs 20 bytes, data_offsets give 16"),
        (lambda h: h["b"].update(data_offsets=[8, 24]), None, r"tensor 'b': its bytes overlap those of 'a'"),
        (lambda h: h["a"].update(dtype="F128"), None, "tensor 'a': unsupported dtype 'F128'"),
        (lambda h: h["a"].update(shape=[-4]), None, "tensor 'a': shape is negative"),
        (lambda h: h["a"].update(shape=[4.0]), None, "tensor 'a': shape is 4.0, not an integer"),
        (lambda h: h.update(a=[1]), None, r"tensor 'a': its entry is \[1\], not an object"),
        (None, 2**60, "the header length 1152921504606846976 runs past the end of the file"),
    ],
    ids=["reversed-offsets", "shape-disagrees", "overlap", "unknown-dtype", "negative-shape", "float-shape",
         "entry-not-object", "header-length-2^60"],
)
def test_refuses_malformed_safetensors(tmp_path, edit, length, match):
    from tests.weights_converter.torch_format import safetensors_bytes

    path = tmp_path / "bad.safetensors"
    tensors = {"a": np.arange(4, dtype=np.float32), "b": np.arange(4, dtype=np.float32)}
    path.write_bytes(safetensors_bytes(tensors, edit_header=edit, header_length=length))
    _refused_quickly(path, match)


def test_refuses_safetensors_header_that_is_not_an_object(tmp_path):
    import struct

    path = tmp_path / "list.safetensors"
    path.write_bytes(struct.pack("<Q", 2) + b"[]")
    _refused_quickly(path, "the header is a list, not a JSON object")
    path.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    _refused_quickly(path, "the header is not JSON")


# PROTO 2, 100,000 EMPTY_LISTs, then 99,999 APPENDs each putting the top
# list into the one beneath, STOP: lists nested 100 times deeper than
# Python's recursion limit.
NESTED_LISTS_PICKLE = b"\x80\x02" + b"]" * 100000 + b"a" * 99999 + b"."


def test_reading_sets_off_no_garbage_collection_and_restores_the_collector(tmp_path):
    # 100,000 lists would set off collections of the caller's whole heap,
    # whose time grows with the caller's objects, not the file's. At most
    # the youngest generation is collected once, as the collector comes
    # back on (the objects made since: the state_dict, or nothing). Each
    # read starts from a full collection: otherwise the caller's earlier
    # objects may have left generation 1 one young collection short of its
    # own threshold, and the young collection at the end would take it along
    # (CI saw that once), which says nothing about the file.
    import gc

    nested = tmp_path / "nested.pth"
    nested.write_bytes(torch_zip_bytes({}, extra_pickle=NESTED_LISTS_PICKLE))
    good = tmp_path / "good.pth"
    good.write_bytes(torch_zip_bytes({"w": np.ones((2, 3), np.float32)}))
    reading, collections_per_read = [False], []

    def seen(phase, info):
        if phase == "start" and reading[0]:
            collections_per_read[-1].append(info["generation"])

    def read(path):
        gc.collect()
        reading[0] = True
        collections_per_read.append([])
        try:
            return read_state_dict(path)
        finally:
            reading[0] = False

    gc.callbacks.append(seen)
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            with pytest.raises(CheckpointError, match="holds a list"):
                read(nested)
            assert gc.isenabled() == enabled
            assert list(read(good)) == ["w"] and gc.isenabled() == enabled
    finally:
        gc.enable()
        gc.callbacks.remove(seen)
    assert len(collections_per_read) == 4
    assert all(generations in ([], [0]) for generations in collections_per_read), collections_per_read


def test_deep_nesting_and_huge_memo_index_are_checkpoint_errors(tmp_path):
    # Deeply nested lists (RecursionError in anything that walks them) and a
    # memo index of 2^31 (the C unpickler sizes its memo table by it).
    path = tmp_path / "nested.pth"
    path.write_bytes(torch_zip_bytes({}, extra_pickle=NESTED_LISTS_PICKLE))
    _refused_quickly(path, "nested.pth: holds a list, not a state_dict")
    memo = b"\x80\x02}r\xff\xff\xff\x7f."  # EMPTY_DICT, LONG_BINPUT 2^31-1, STOP
    path.write_bytes(torch_zip_bytes({}, extra_pickle=memo))
    _refused_quickly(path, "nested.pth: holds a dict, not a state_dict")


def test_reading_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from weights_converter import read_state_dict, load_official_checkpoint; "
        f"read_state_dict({GATED!r}); read_state_dict({os.path.join(FIXTURES, 'legacy_format_gated_tiny.pth')!r}); "
        "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules), 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_fuzzer_found_bytearray8_is_refused_before_allocating(tmp_path):
    # Found by fuzz_state_dict (seed 0, case 8850: a flipped byte in data.pkl):
    # the BYTEARRAY8 opcode makes the pure-Python unpickler allocate its
    # declared length before reading anything; 2^33 would be 8 GiB.
    import struct

    path = tmp_path / "bytearray.pth"
    payload = b"\x80\x05\x96" + struct.pack("<Q", 2**33) + b"tiny."
    path.write_bytes(torch_zip_bytes({}, extra_pickle=payload))
    _refused_quickly(path, "bytearray.pth: the pickle holds a bytearray or an out-of-band buffer", memory_bound=1 << 20)
