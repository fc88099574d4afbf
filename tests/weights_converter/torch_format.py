"""Writes files in torch.save's zip format without PyTorch, for tests.

The pickle names the same globals PyTorch writes (``torch.FloatStorage``,
``torch._utils._rebuild_tensor_v2``, ``collections.OrderedDict``); they
are resolved through stand-in modules registered only while pickling.
"""

import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile

import numpy as np

_STORAGE_NAMES = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.int64): "LongStorage",
}


@contextlib.contextmanager
def _stand_in_torch():
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in _STORAGE_NAMES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for key, module in saved.items():
            if module is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = module


class _Storage:
    def __init__(self, key, array, numel=None, view=None):
        self.key, self.array = key, array
        self.numel = array.size if numel is None else numel
        self.view = view


class RawTensor:
    """A tensor record written with the given numbers, whatever they are (for crafted files).

    ``storage`` (1-d array) is the storage's content; ``storage_numel`` the
    element count the pickle declares for it (default: its size); ``key``
    shares one storage between records; ``view`` is a legacy storage view
    ``(offset, size)``.
    """

    def __init__(self, storage, offset, size, stride, storage_numel=None, key=None, view=None):
        self.storage = np.asarray(storage).reshape(-1)
        self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)
        self.storage_numel, self.key, self.view = storage_numel, key, view


def _state_dict_pickle(tensors, legacy=False):
    """data.pkl of ``torch.save(OrderedDict(tensors))`` and its storages (in first-use order)."""
    storages = {}
    with _stand_in_torch() as torch:

        def new_storage(array, numel=None, key=None, view=None):
            key = str(len(storages)) if key is None else key
            if key not in storages:
                storages[key] = _Storage(key, array, numel, view)
            return storages[key]

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _Storage):
                    storage_type = getattr(torch, _STORAGE_NAMES[obj.array.dtype])
                    pid = ("storage", storage_type, obj.key, "cpu", obj.numel)
                    if legacy:
                        view = None if obj.view is None else (obj.key + "_view", *obj.view)
                        pid += (view,)
                    return pid
                return None

            def reducer_override(self, obj):
                rebuild = torch._utils._rebuild_tensor_v2
                if isinstance(obj, RawTensor):
                    storage = new_storage(obj.storage, obj.storage_numel, obj.key, obj.view)
                    return rebuild, (storage, obj.offset, obj.size, obj.stride, False, collections.OrderedDict())
                if isinstance(obj, np.ndarray):
                    contiguous = np.array(obj, order="C")  # keeps 0-d arrays 0-d
                    storage = new_storage(contiguous.reshape(-1))
                    strides = tuple(s // obj.itemsize for s in contiguous.strides)
                    return rebuild, (storage, 0, obj.shape, strides, False, collections.OrderedDict())
                return NotImplemented

        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump(collections.OrderedDict(tensors))
    return buffer.getvalue(), list(storages.values())


def torch_zip_bytes(tensors, archive="archive", extra_pickle=None, compression=zipfile.ZIP_STORED, compresslevel=None,
                    storage_bytes=None):
    """Bytes of ``torch.save(OrderedDict(tensors))``; ``extra_pickle`` replaces data.pkl.

    Values may be arrays or ``RawTensor`` records. ``storage_bytes`` maps a
    storage key to a callable writing that entry's content to a file object
    instead of the storage's own bytes (for entries too big to hold).
    """
    data_pkl, storages = _state_dict_pickle(tensors)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression, compresslevel=compresslevel) as archive_file:
        archive_file.writestr(f"{archive}/data.pkl", extra_pickle or data_pkl)
        archive_file.writestr(f"{archive}/byteorder", "little")
        for storage in storages:
            name = f"{archive}/data/{storage.key}"
            if storage_bytes and storage.key in storage_bytes:
                with archive_file.open(name, "w", force_zip64=True) as entry:
                    storage_bytes[storage.key](entry)
            else:
                archive_file.writestr(name, storage.array.tobytes())
    return out.getvalue()


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def torch_legacy_bytes(tensors, stored_numel=None):
    """Bytes of ``torch.save(..., _use_new_zipfile_serialization=False)`` (the pre-1.6 format).

    ``stored_numel`` maps a storage key to the element count written before
    its bytes, instead of the true one.
    """
    import struct

    data_pkl, storages = _state_dict_pickle(tensors, legacy=True)
    parts = [
        pickle.dumps(LEGACY_MAGIC, protocol=2),
        pickle.dumps(1001, protocol=2),
        pickle.dumps({"protocol_version": 1001, "little_endian": True}, protocol=2),
        data_pkl,
        pickle.dumps([s.key for s in storages], protocol=2),
    ]
    for storage in storages:
        numel = (stored_numel or {}).get(storage.key, storage.array.size)
        parts.append(struct.pack("<q", numel) + storage.array.tobytes())
    return b"".join(parts)


def safetensors_bytes(tensors, edit_header=None, header_length=None):
    """A ``.safetensors`` file; ``edit_header(header)`` may change the header dict before it is written,
    ``header_length`` replaces the 8-byte header length."""
    import json
    import struct

    names = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}
    header, chunks, offset = {}, [], 0
    for key, value in tensors.items():
        raw = np.ascontiguousarray(value).tobytes()
        header[key] = {"dtype": names[value.dtype], "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if edit_header:
        edit_header(header)
    encoded = json.dumps(header).encode()
    length = len(encoded) if header_length is None else header_length
    return struct.pack("<Q", length) + encoded + b"".join(chunks)
