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
    def __init__(self, key, array):
        self.key, self.array = key, array


def torch_zip_bytes(tensors, archive="archive", extra_pickle=None):
    """Bytes of ``torch.save(OrderedDict(tensors))``; ``extra_pickle`` replaces data.pkl."""
    storages = []
    with _stand_in_torch() as torch:

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _Storage):
                    storage_type = getattr(torch, _STORAGE_NAMES[obj.array.dtype])
                    return ("storage", storage_type, obj.key, "cpu", obj.array.size)
                return None

            def reducer_override(self, obj):
                if isinstance(obj, np.ndarray):
                    contiguous = np.array(obj, order="C")  # keeps 0-d arrays 0-d
                    storage = _Storage(str(len(storages)), contiguous.reshape(-1))
                    storages.append(storage)
                    strides = tuple(s // obj.itemsize for s in contiguous.strides)
                    rebuild = torch._utils._rebuild_tensor_v2
                    return rebuild, (storage, 0, obj.shape, strides, False, collections.OrderedDict())
                return NotImplemented

        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump(collections.OrderedDict(tensors))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive_file:
        archive_file.writestr(f"{archive}/data.pkl", extra_pickle or buffer.getvalue())
        archive_file.writestr(f"{archive}/byteorder", "little")
        for storage in storages:
            archive_file.writestr(f"{archive}/data/{storage.key}", storage.array.tobytes())
    return out.getvalue()


def safetensors_bytes(tensors):
    import json
    import struct

    names = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int64): "I64"}
    header, chunks, offset = {}, [], 0
    for key, value in tensors.items():
        raw = np.ascontiguousarray(value).tobytes()
        header[key] = {"dtype": names[value.dtype], "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)
